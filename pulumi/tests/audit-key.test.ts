// The stack with `mira:auditPublicKey`: a file of its own, since the program runs once per
// process (harness.ts) and every other test runs it without the key.

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { witnessProblems } from "./checks";
import { CONFIG, ofType, type Recorded, recorded, run, stackOutputs } from "./harness";
import { K, trustedKeyProblems, verifyProblems } from "./operations";

/** A public audit key as `mira keys init` prints it (64 hex digits). */
const KEY = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
const WITH_KEY = { ...CONFIG, auditPublicKey: KEY };

const clone = (rs: Recorded[]): Recorded[] => JSON.parse(JSON.stringify(rs));
const mira = (td: Recorded) => JSON.parse(td.inputs.containerDefinitions).find((c: any) => c.name === "mira");
const envOf = (td: Recorded): Record<string, string> => Object.fromEntries(mira(td).environment.map((e: any) => [e.name, e.value]));
const taskDef = (rs: Recorded[], family: string) => ofType(rs, K.taskDef).find((t) => t.inputs.family === family)!;

describe("with mira:auditPublicKey", () => {
  it("give the daily verification the public key, and its role no way to the signing key's secret", async () => {
    const { resources } = await run(WITH_KEY);
    assert.deepEqual(verifyProblems(resources), []);
    assert.deepEqual(trustedKeyProblems(resources, KEY), []);
    assert.deepEqual(witnessProblems(resources), []);
    const env = envOf(taskDef(resources, "mira-test-audit-verify"));
    assert.equal(env.Audit__PublicKey, KEY);
    assert.ok(!("Audit__SigningKeySecretId" in env), JSON.stringify(env));
    // Broken: the role given today's grants back (the secret, and the key it is under), the
    // task given the secret's id beside the key.
    const broken = clone(resources);
    const secret = ofType(broken, K.secret).find((x) => x.name === "audit-signing-key")!.state.arn;
    const phiKey = ofType(broken, "aws:kms/key:Key").find((x) => x.name === "phi-key")!.state.arn;
    const pol = ofType(broken, K.rolePolicy).find((x) => x.name === "audit-verify-policy")!;
    pol.inputs.policy = JSON.stringify({
      Statement: [
        ...JSON.parse(pol.inputs.policy).Statement,
        { Effect: "Allow", Action: ["secretsmanager:GetSecretValue"], Resource: [secret] },
        { Effect: "Allow", Action: ["kms:Decrypt"], Resource: [phiKey] },
      ],
    });
    const td = taskDef(broken, "mira-test-audit-verify");
    const containers = JSON.parse(td.inputs.containerDefinitions);
    containers[0].environment.push({ name: "Audit__SigningKeySecretId", value: secret });
    td.inputs.containerDefinitions = JSON.stringify(containers);
    assert.deepEqual(trustedKeyProblems(broken, KEY), [
      "the verification is given Audit__SigningKeySecretId",
      "the verification's role can read the signing key's secret",
      "the verification's role can decrypt with the patient-data key",
    ]);
    // Broken: the task without the key (nor the secret's id): no trusted key at all.
    const keyless = clone(resources);
    const ktd = taskDef(keyless, "mira-test-audit-verify");
    ktd.inputs.containerDefinitions = ktd.inputs.containerDefinitions.replace(`{"name":"Audit__PublicKey","value":"${KEY}"},`, "");
    assert.deepEqual(verifyProblems(keyless), ["no trusted key: neither Audit__PublicKey, Audit__SigningKeySecretId nor Audit__PublicKeyFile"]);
    assert.deepEqual(trustedKeyProblems(keyless, KEY), [`the verification: Audit__PublicKey is not set, not ${KEY}`]);
  });

  it("give the API the public key for a job's verification, and in its settings output", async () => {
    const { resources } = await run(WITH_KEY);
    const out = await stackOutputs(WITH_KEY);
    const env = envOf(taskDef(resources, "mira-test-api"));
    assert.equal(env.Audit__PublicKey, KEY);
    assert.equal(out.settings.api.Audit__PublicKey, KEY);
    // The roles (which sign) keep the secret, and get no public key.
    assert.equal(out.settings.roles.Audit__PublicKey, undefined);
    assert.equal(envOf(taskDef(resources, "mira-test-relay")).Audit__PublicKey, undefined);
    // Broken: the API's task without it.
    const broken = clone(resources);
    const api = taskDef(broken, "mira-test-api");
    api.inputs.containerDefinitions = api.inputs.containerDefinitions.replace(`{"name":"Audit__PublicKey","value":"${KEY}"},`, "");
    assert.deepEqual(trustedKeyProblems(broken, KEY), [`the API: Audit__PublicKey is not set, not ${KEY}`]);
  });

  it("refuse a key that is not 64 hex digits, before anything is made", async () => {
    await run(WITH_KEY);
    const { program } = await import("../src/program");
    const { checkAuditPublicKey } = await import("../src/foundations");
    const before = recorded.length;
    for (const bad of ["", KEY.slice(1), `${KEY}0`, `0x${KEY.slice(2)}`, `${KEY.slice(1)}g`, ` ${KEY.slice(1)}`, "public audit key: " + KEY]) {
      assert.throws(() => program({ ...CONFIG, auditPublicKey: bad }), /mira:auditPublicKey must be 64 hex digits/, JSON.stringify(bad));
    }
    assert.equal(recorded.length, before, "a refused key made resources");
    // Upper case is hex too (Mira's Audit__PublicKey takes it); no key is no key.
    assert.equal(checkAuditPublicKey(KEY.toUpperCase()), KEY.toUpperCase());
    assert.equal(checkAuditPublicKey(undefined), undefined);
  });
});
