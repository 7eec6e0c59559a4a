// ADR 0037: the account around Mira fit for patient data. Each check runs on the program (a
// production configuration: CONFIG has deletionProtection) and on broken copies it must catch,
// with exact problem lists.

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { auditProblems, identityProblems, keyPolicyProblems, noncurrentProblems, protectionProblems, T } from "./checks";
import { ACCOUNT, CONFIG, ofType, type Recorded, run, urnOf } from "./harness";

const clone = (rs: Recorded[]): Recorded[] => JSON.parse(JSON.stringify(rs));

describe("identity", () => {
  it("asks every user for a TOTP code, enforces threat protection, and keeps the pool", async () => {
    const { resources } = await run();
    assert.deepEqual(identityProblems(resources), []);
    const pool = ofType(resources, T.pool)[0];
    assert.deepEqual(pool.inputs.emailConfiguration, { emailSendingAccount: "DEVELOPER", sourceArn: CONFIG.sesIdentityArn, fromEmailAddress: CONFIG.mailFrom });
    // The client can read and write the required name (Cognito refuses a client that cannot).
    const client = ofType(resources, "aws:cognito/userPoolClient:UserPoolClient")[0];
    assert.ok(client.inputs.writeAttributes.includes("name") && client.inputs.readAttributes.includes("name"));
    // Broken: MFA optional (as before), no threat protection, no deletion protection.
    const optional = clone(resources);
    const i = ofType(optional, T.pool)[0].inputs;
    i.mfaConfiguration = "OPTIONAL";
    delete i.userPoolAddOns;
    delete i.deletionProtection;
    assert.deepEqual(identityProblems(optional), [
      "user pool users: MFA OPTIONAL, not ON",
      "user pool users: threat protection OFF, not ENFORCED",
      "user pool users: no deletion protection",
    ]);
    // Broken: the pool as it was before ADR 0037 in every other respect.
    const old = clone(resources);
    const o = ofType(old, T.pool)[0].inputs;
    o.userPoolTier = "ESSENTIALS";
    delete o.userAttributeUpdateSettings;
    o.schemas = o.schemas.filter((x: any) => x.name !== "name");
    delete o.emailConfiguration;
    delete o.softwareTokenMfaConfiguration;
    assert.deepEqual(identityProblems(old), [
      "user pool users: no TOTP",
      "user pool users: threat protection needs the PLUS tier",
      "user pool users: an e-mail change takes effect unverified",
      "user pool users: name is not required",
      "user pool users: mail through Cognito's default sender, not SES",
    ]);
  });
});

describe("a production stack", () => {
  it("protects and retains every stateful resource", async () => {
    const { resources } = await run();
    assert.ok(CONFIG.deletionProtection);
    assert.deepEqual(protectionProblems(resources), []);
    // What it covers: the database, the five buckets, the five keys, the pool, the six secrets.
    const kept = resources.filter((r) => r.protect && r.retainOnDelete).map((r) => `${r.type.split(":").pop()} ${r.name}`);
    assert.deepEqual(kept.sort(), [
      "Bucket frontend",
      "Bucket logs",
      "Bucket results",
      "Bucket uploads",
      "Bucket witness",
      "Instance db",
      "Key logs-key",
      "Key messaging-key",
      "Key phi-key",
      "Key rds-key",
      "Key s3-key",
      "Secret audit-signing-key",
      "Secret db-login-api",
      "Secret db-login-handlers",
      "Secret db-login-projector",
      "Secret db-login-relay",
      "Secret db-login-worker",
      "UserPool users",
    ]);
    // Broken: an unprotected database, a witness that a removal would delete.
    const broken = clone(resources);
    ofType(broken, T.db)[0].protect = false;
    ofType(broken, T.bucket).find((b) => b.name === "witness")!.retainOnDelete = false;
    assert.deepEqual(protectionProblems(broken), ["Bucket witness: not retained on delete", "Instance db: not protected"]);
  });

  it("lets no one but the break-glass role schedule a key's deletion or disable it", async () => {
    const { resources } = await run();
    assert.deepEqual(keyPolicyProblems(resources, ACCOUNT), []);
    // The break-glass role is assumed with MFA only.
    const role = ofType(resources, "aws:iam/role:Role").find((r) => r.name === "break-glass")!;
    assert.deepEqual(JSON.parse(role.inputs.assumeRolePolicy).Statement[0].Condition, { Bool: { "aws:MultiFactorAuthPresent": "true" } });
    // Broken: the RDS key with the account's kms:* only (a key that can be deleted), the PHI
    // key's deny exempting the deploy role too, and no break-glass role.
    const broken = clone(resources);
    const keyOf = (n: string) => ofType(broken, T.key).find((k) => k.name === n)!;
    const rds = keyOf("rds-key");
    rds.inputs.policy = JSON.stringify({ Statement: JSON.parse(rds.inputs.policy).Statement.filter((s: any) => s.Effect !== "Deny") });
    const phi = keyOf("phi-key");
    const st = JSON.parse(phi.inputs.policy).Statement;
    for (const s of st) if (s.Effect === "Deny") s.Condition.ArnNotEquals["aws:PrincipalArn"] = [s.Condition.ArnNotEquals["aws:PrincipalArn"], `arn:aws:iam::${ACCOUNT}:role/mira-test-deploy`];
    phi.inputs.policy = JSON.stringify({ Statement: st });
    broken.splice(broken.indexOf(ofType(broken, "aws:iam/role:Role").find((r) => r.name === "break-glass")!), 1);
    assert.deepEqual(keyPolicyProblems(broken, ACCOUNT), [
      "no break-glass role mira-test-break-glass",
      "key phi-key: kms:ScheduleKeyDeletion not denied to all but the break-glass role",
      "key phi-key: kms:DisableKey not denied to all but the break-glass role",
      "key rds-key: kms:ScheduleKeyDeletion not denied to all but the break-glass role",
      "key rds-key: kms:DisableKey not denied to all but the break-glass role",
    ]);
  });

  it("expires the slides' and results' old versions after the setting's days", async () => {
    const { resources } = await run();
    assert.deepEqual(noncurrentProblems(resources, CONFIG.noncurrentVersionDays), []);
    // The witness keeps every version (object lock), the frontend has nothing to keep.
    for (const b of ["witness", "frontend"]) {
      const lc = ofType(resources, T.lifecycle).find((x) => x.inputs.bucket === `${b}-id`)!;
      assert.ok(!lc.inputs.rules.some((r: any) => r.noncurrentVersionExpiration), b);
    }
    // Broken: the uploads bucket keeping old versions for ever, the results' a year.
    const broken = clone(resources);
    const rules = (b: string) => ofType(broken, T.lifecycle).find((x) => x.inputs.bucket === `${b}-id`)!.inputs;
    rules("uploads").rules = rules("uploads").rules.filter((r: any) => !r.noncurrentVersionExpiration);
    rules("results").rules.find((r: any) => r.noncurrentVersionExpiration).noncurrentVersionExpiration.noncurrentDays = 365;
    assert.deepEqual(noncurrentProblems(broken, 90), ["bucket uploads: old versions kept for ever", "bucket results: old versions kept 365 days, not 90"]);
  });
});

describe("the audit trail", () => {
  it("records the account, the PHI buckets' objects, the network and every request, kept as long as the setting says", async () => {
    const { resources } = await run();
    assert.deepEqual(auditProblems(resources, CONFIG.logRetentionDays), []);
    // Every log group is there, under the logs key.
    const groups = ofType(resources, "aws:cloudwatch/logGroup:LogGroup");
    assert.deepEqual(groups.map((g) => g.inputs.name).sort(), [
      "/aws/eks/mira-test/cluster",
      "/aws/rds/instance/mira-test/postgresql",
      "/aws/rds/instance/mira-test/upgrade",
      "/mira/test/audit-verify",
      "/mira/test/metrics",
      "/mira/test/services",
      "/mira/test/vpc-flow-logs",
    ]);
    const logsKey = ofType(resources, T.key).find((k) => k.name === "logs-key")!;
    assert.ok(groups.every((g) => g.inputs.kmsKeyId === logsKey.state.arn));
    // The trail and the EKS cluster wait for what they need: the log bucket's policy, the group.
    const trail = ofType(resources, "aws:cloudtrail/trail:Trail")[0];
    assert.ok(trail.dependencies!.includes(urnOf("aws:s3/bucketPolicy:BucketPolicy", "logs-tls-only")));
    const eks = ofType(resources, "aws:eks/cluster:Cluster")[0];
    assert.ok(eks.dependencies!.includes(urnOf("aws:cloudwatch/logGroup:LogGroup", "eks-control-plane-logs")));

    // Broken: a bucket without data events (the witness), a trail in one region without
    // validation, the EKS group never expiring (as before), RDS exporting nothing, no flow logs.
    const broken = clone(resources);
    const t = ofType(broken, "aws:cloudtrail/trail:Trail")[0];
    const witness = ofType(broken, T.bucket).find((b) => b.name === "witness")!;
    t.inputs.eventSelectors[0].dataResources[0].values = t.inputs.eventSelectors[0].dataResources[0].values.filter((v: string) => v !== `${witness.state.arn}/`);
    t.inputs.isMultiRegionTrail = false;
    delete t.inputs.enableLogFileValidation;
    const eksGroup = ofType(broken, "aws:cloudwatch/logGroup:LogGroup").find((g) => g.name === "eks-control-plane-logs")!;
    delete eksGroup.inputs.retentionInDays;
    delete eksGroup.inputs.kmsKeyId;
    delete ofType(broken, T.db)[0].inputs.enabledCloudwatchLogsExports;
    broken.splice(broken.indexOf(ofType(broken, "aws:ec2/flowLog:FlowLog")[0]), 1);
    delete ofType(broken, "aws:lb/loadBalancer:LoadBalancer")[0].inputs.accessLogs;
    assert.deepEqual(auditProblems(broken, CONFIG.logRetentionDays), [
      "trail trail: one region only",
      "trail trail: no log file validation",
      "trail trail: no data events on bucket witness",
      "vpc vpc: no flow logs",
      "load balancer alb: no access logs in the log bucket",
      "database db: its logs not exported",
      "log group eks-control-plane-logs: no customer key",
      "log group eks-control-plane-logs: kept for ever days, not 2192",
    ]);
    // Broken: the services' logs kept 90 days as before, and the cluster's group not made.
    const short = clone(resources);
    ofType(short, "aws:cloudwatch/logGroup:LogGroup").find((g) => g.name === "service-logs")!.inputs.retentionInDays = 90;
    short.splice(short.indexOf(ofType(short, "aws:cloudwatch/logGroup:LogGroup").find((g) => g.name === "eks-control-plane-logs")!), 1);
    delete ofType(short, "aws:cloudfront/distribution:Distribution")[0].inputs.loggingConfig;
    assert.deepEqual(auditProblems(short, CONFIG.logRetentionDays), [
      "distribution cdn: no access logs in the log bucket",
      "cluster eks: its control-plane log group is not made first",
      "log group service-logs: kept 90 days, not 2192",
    ]);
  });
});
