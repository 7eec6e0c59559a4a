import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import * as path from "node:path";
import { describe, it } from "node:test";
import { K8S_DIR, validateK8s } from "./k8s/validate";

const FIXTURES = path.join(K8S_DIR, "fixtures");
const read = (name: string) => JSON.parse(readFileSync(path.join(FIXTURES, name), "utf8"));
const expected: { valid: string[]; invalid: Record<string, string> } = read("expected.json");

describe("the offline validation of Kubernetes and KEDA objects", () => {
  it("has an expectation for every fixture", () => {
    const fixtures = readdirSync(FIXTURES).filter((f) => f !== "expected.json");
    assert.deepEqual(fixtures.sort(), [...expected.valid, ...Object.keys(expected.invalid)].sort());
  });

  for (const name of expected.valid) {
    it(`finds nothing wrong in ${name}`, () => {
      assert.deepEqual(validateK8s(read(name)), []);
    });
  }

  // Each bad fixture holds one planted fault, so exactly one problem, and it names the fault.
  for (const [name, fault] of Object.entries(expected.invalid)) {
    it(`finds the one fault in ${name}`, () => {
      const found = validateK8s(read(name));
      assert.equal(found.length, 1, String(found));
      assert.ok(found[0].includes(fault), `expected "${fault}" in ${found[0]}`);
    });
  }
});
