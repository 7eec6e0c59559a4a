// A dev stack (deletionProtection false, single-AZ) may be destroyed: nothing protected, no key
// denies, one NAT gateway (ADR 0037).

import assert from "node:assert/strict";
import { it } from "node:test";
import { keyPolicyProblems, protectionProblems } from "./checks";
import { ACCOUNT, CONFIG, ofType, run } from "./harness";

const DEV = { ...CONFIG, deletionProtection: false, multiAz: false };

it("a dev stack protects nothing and its keys deny nothing", async () => {
  const { resources } = await run(DEV);
  assert.equal(resources.filter((r) => r.protect || r.retainOnDelete).length, 0);
  assert.ok(protectionProblems(resources).length > 0);
  assert.ok(keyPolicyProblems(resources, ACCOUNT).includes("no break-glass role mira-test-break-glass"));
  // A single-AZ stack keeps one NAT gateway (its cost line in README.md).
  assert.equal(ofType(resources, "aws:ec2/natGateway:NatGateway").length, 1);
});
