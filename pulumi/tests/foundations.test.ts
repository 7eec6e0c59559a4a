import assert from "node:assert/strict";
import { describe, it } from "node:test";
import {
  apiProblems,
  bucketNameProblems,
  encryptionProblems,
  ingressRules,
  messagingProblems,
  publicProblems,
  ruleStyleProblems,
  settingsProblems,
  startupProblems,
  statementsOf,
  T,
  witnessProblems,
  workerProblems,
} from "./checks";
import { ACCOUNT, ofType, type Recorded, run } from "./harness";

const clone = (rs: Recorded[]): Recorded[] => JSON.parse(JSON.stringify(rs));

describe("the foundations", () => {
  it("make the SNS/SQS topology of bus/topology.json, exactly", async () => {
    const { resources } = await run();
    assert.deepEqual(messagingProblems(resources), []);
    // Broken: a filter dropped and a redrive count changed.
    const broken = clone(resources);
    const sub = ofType(broken, T.sub).find((s) => s.inputs.filterPolicy);
    delete sub!.inputs.filterPolicy;
    const q = ofType(broken, T.queue).find((x) => x.inputs.redrivePolicy)!;
    q.inputs.redrivePolicy = JSON.stringify({ ...JSON.parse(q.inputs.redrivePolicy), maxReceiveCount: 99 });
    const found = messagingProblems(broken);
    assert.ok(found.some((x) => x.includes("filter policy")) && found.some((x) => x.includes("maxReceiveCount")), String(found));
  });

  it("make nothing public", async () => {
    const { resources } = await run();
    assert.equal(ofType(resources, T.bucket).length, 5);
    assert.deepEqual(publicProblems(resources), []);
    const broken = clone(resources);
    const uploadsBlock = ofType(broken, T.access).findIndex((x) => x.inputs.bucket === "uploads-id");
    broken.splice(broken.indexOf(ofType(broken, T.access)[uploadsBlock]), 1);
    ofType(broken, T.db)[0].inputs.publiclyAccessible = true;
    assert.deepEqual(publicProblems(broken).sort(), ["bucket uploads: public access not blocked", "database db: publicly accessible"]);
    // The database's groups are admitted by standalone rules only: the compute group's and the
    // EKS cluster's, which the check reads.
    assert.deepEqual(
      ingressRules(resources)
        .filter((r) => r.group === "database-sg-id")
        .map((r) => [r.rule, r.groups])
        .sort(),
      [
        ["database-from-compute", ["compute-sg-id"]],
        ["database-from-eks", ["sg-eks-cluster"]],
      ],
    );
    // Broken: a standalone rule that admits the internet into the database's group (the
    // "nothing public" check read inline rules only, and saw nothing), and one from the
    // deploy runners' group.
    const open = clone(resources);
    open.push(
      { type: T.sgIngress, name: "database-from-anywhere", inputs: { securityGroupId: "database-sg-id", cidrIpv4: "0.0.0.0/0", ipProtocol: "tcp", fromPort: 5432, toPort: 5432 }, state: {} },
      { type: T.sgIngress, name: "database-from-runners", inputs: { securityGroupId: "database-sg-id", referencedSecurityGroupId: "deploy-runners-sg-id", ipProtocol: "tcp", fromPort: 5432, toPort: 5432 }, state: {} },
    );
    assert.deepEqual(publicProblems(open), [
      "database-sg: admits addresses (database-from-anywhere)",
      "database-sg: admits another group, deploy-runners-sg (database-from-runners)",
      "database-from-anywhere: admits 0.0.0.0/0 into database-sg",
    ]);
    // Broken: the internet admitted to the endpoints by a rule of the old kind.
    const old = clone(resources);
    old.push({ type: T.sgRule, name: "endpoints-from-anywhere", inputs: { type: "ingress", securityGroupId: "endpoints-sg-id", cidrBlocks: ["10.0.0.0/8", "0.0.0.0/0"], protocol: "tcp", fromPort: 443, toPort: 443 }, state: {} });
    assert.deepEqual(publicProblems(old), ["endpoints-from-anywhere: admits 0.0.0.0/0 into endpoints-sg"]);
  });

  it("write every security group's rules as standalone rules of one kind", async () => {
    const { resources } = await run();
    assert.deepEqual(ruleStyleProblems(resources), []);
    // Every group the program makes, and the rules each has.
    const byGroup = (type: string) =>
      Object.fromEntries(
        ofType(resources, T.sg).map((g) => [g.name, ofType(resources, type).filter((r) => r.inputs.securityGroupId === `${g.name}-id`).map((r) => r.name).sort()]),
      );
    assert.deepEqual(byGroup(T.sgIngress), {
      "compute-sg": ["compute-from-alb"],
      "database-sg": ["database-from-compute", "database-from-eks"],
      "endpoints-sg": ["endpoints-from-compute", "endpoints-from-deploy-runners", "endpoints-from-eks"],
      "deploy-runners-sg": [],
      "alb-sg": ["alb-from-cloudfront"],
      "eks-api-sg": ["eks-api-from-deploy-runners"],
    });
    assert.deepEqual(byGroup(T.sgEgress), {
      "compute-sg": ["compute-to-anywhere"],
      "database-sg": [],
      "endpoints-sg": [],
      "deploy-runners-sg": ["deploy-runners-to-anywhere"],
      "alb-sg": ["alb-to-compute"],
      "eks-api-sg": [],
    });
    // Broken: the database's group with its inline rule back beside the standalone ones, the
    // ALB's egress inline, and an aws.ec2.SecurityGroupRule on the endpoints' group.
    const mixed = clone(resources);
    ofType(mixed, T.sg).find((g) => g.name === "database-sg")!.inputs.ingress = [{ protocol: "tcp", fromPort: 5432, toPort: 5432, securityGroups: ["compute-sg-id"] }];
    ofType(mixed, T.sg).find((g) => g.name === "alb-sg")!.inputs.egress = [
      { protocol: "tcp", fromPort: 8080, toPort: 8080, securityGroups: ["compute-sg-id"] },
      { protocol: "tcp", fromPort: 9464, toPort: 9464, securityGroups: ["compute-sg-id"] },
    ];
    mixed.push({ type: T.sgRule, name: "endpoints-from-eks-old", inputs: { type: "ingress", securityGroupId: "endpoints-sg-id", sourceSecurityGroupId: "sg-eks-cluster", protocol: "tcp", fromPort: 443, toPort: 443 }, state: {} });
    assert.deepEqual(ruleStyleProblems(mixed), [
      "security group database-sg: 1 inline ingress rule",
      "security group endpoints-sg: aws.ec2.SecurityGroupRule rules beside aws.vpc rules",
      "security group alb-sg: 2 inline egress rules",
    ]);
  });

  it("name no bucket with a fixed global name", async () => {
    const { resources } = await run();
    assert.deepEqual(bucketNameProblems(resources, ACCOUNT), []);
    assert.deepEqual(
      ofType(resources, T.bucket).map((b) => [b.name, b.inputs.bucketPrefix]),
      ["uploads", "results", "frontend", "witness", "logs"].map((n) => [n, `mira-test-${n}-`]),
    );
    // The names the provider makes are unique, and every setting is the made one (settingsProblems).
    assert.equal(new Set(ofType(resources, T.bucket).map((b) => b.state.bucket)).size, 5);
    // Broken: the uploads bucket named as before, the witness with the account's id.
    const fixed = clone(resources);
    Object.assign(ofType(fixed, T.bucket).find((b) => b.name === "uploads")!.inputs, { bucket: "mira-test-uploads", bucketPrefix: undefined });
    Object.assign(ofType(fixed, T.bucket).find((b) => b.name === "witness")!.inputs, { bucket: `mira-test-witness-${ACCOUNT}`, bucketPrefix: undefined });
    assert.deepEqual(bucketNameProblems(fixed, ACCOUNT), ["bucket uploads: the fixed name mira-test-uploads may be taken in another account"]);
  });

  it("encrypt at rest on RDS, S3, SQS and SNS", async () => {
    const { resources } = await run();
    assert.deepEqual(encryptionProblems(resources), []);
    const broken = clone(resources);
    delete ofType(broken, T.topic).find((x) => x.name === "events")!.inputs.kmsMasterKeyId;
    ofType(broken, T.db)[0].inputs.storageEncrypted = false;
    // The access-log bucket alone may use S3's keys (the ALB writes with no other): the slides may not.
    const uploadsSse = ofType(broken, T.sse).find((x) => x.inputs.bucket === "uploads-id")!;
    uploadsSse.inputs.rules = [{ applyServerSideEncryptionByDefault: { sseAlgorithm: "AES256" } }];
    assert.deepEqual(encryptionProblems(broken).sort(), ["bucket uploads", "database db", "topic events"]);
  });

  it("give each service its settings from the resources", async () => {
    const { out, resources } = await run();
    assert.deepEqual(settingsProblems(out.settings, resources), []);
    assert.equal(out.settings.roles.Audit__SigningKeySecretId, resources.find((r) => r.name === "audit-signing-key")!.state.arn);
    assert.equal(out.settings.api.Messaging__Provider, "Aws");
    // Broken: a literal bucket name, and a queue prefix that names no queue.
    const broken = { ...out.settings, api: { ...out.settings.api, AWS__S3__BucketName: "mira-uploads", AWS__SQS__QueuePrefix: "mira-" } };
    const found = settingsProblems(broken, resources);
    assert.ok(found.some((x) => x.startsWith("api: AWS__S3__BucketName")) && found.some((x) => x.includes("no queue mira-projections.fifo")), String(found));
  });

  it("give the worker and the API least privilege", async () => {
    const { resources } = await run();
    const worker = statementsOf(resources, "worker");
    const api = statementsOf(resources, "api");
    assert.ok(worker.length > 0 && api.length > 0);
    assert.deepEqual(workerProblems(worker), []);
    assert.deepEqual(apiProblems(api), []);
    // Broken: the worker with s3:* on the uploads bucket and every queue; the API deleting from the witness.
    const badWorker = [...worker, { Effect: "Allow", Action: ["s3:*", "sqs:ReceiveMessage"], Resource: ["arn:aws:s3:eu-west-1:1:mira-test-uploads-00000000000000000000000001/*", "arn:aws:sqs:eu-west-1:1:mira-test-handlers.fifo"] }];
    const w = workerProblems(badWorker);
    assert.ok(w.some((x) => x.includes("wildcard action s3:*")) && w.some((x) => x.includes("beyond the GPU queues")) && w.some((x) => x.includes("uploads")), String(w));
    // Broken: the worker reading the copies at their newest version only (a GetObject with the
    // recorded versionId needs s3:GetObjectVersion).
    const latest = worker.map((s) => ({ ...s, Action: s.Action.filter((a) => a !== "s3:GetObjectVersion") }));
    assert.deepEqual(workerProblems(latest), ["cannot s3:GetObjectVersion on the slides' immutable copies"]);
    const badApi = [...api, { Effect: "Allow", Action: ["s3:DeleteObjectVersion"], Resource: ["arn:aws:s3:eu-west-1:1:mira-test-witness-00000000000000000000000004/*"] }];
    assert.deepEqual(apiProblems(badApi), ["s3:DeleteObjectVersion on the witness bucket"]);
  });

  it("let every process find the bus, and the API answer /readyz", async () => {
    const { resources } = await run();
    assert.deepEqual(startupProblems(resources, "api", true), []);
    assert.deepEqual(startupProblems(resources, "worker", false), []);
    // The roles' role serves no ALB, but its /readyz asks the same of the bus.
    assert.deepEqual(startupProblems(resources, "roles", false), []);
    // Broken: the API without ListTopics, GetQueueUrl on one dead-letter queue, or ListBucket.
    const broken = clone(resources);
    const pol = ofType(broken, T.rolePolicy).find((x) => x.name === "api-policy")!;
    const st = JSON.parse(pol.inputs.policy).Statement.filter((x: any) => !x.Action.includes("sns:ListTopics") && !x.Action.includes("s3:ListBucket"));
    for (const x of st) if (x.Action.includes("sqs:GetQueueUrl")) x.Resource = x.Resource.filter((r: string) => !r.endsWith("handlers-dlq.fifo"));
    pol.inputs.policy = JSON.stringify({ Statement: st });
    assert.deepEqual(startupProblems(broken, "api", true), [
      "api: cannot list topics",
      "api: cannot find mira-test-handlers-dlq.fifo",
      "api: /readyz cannot reach the uploads bucket",
    ]);
  });

  it("make the witness create-only, written by the relay and read in every version by the verifiers", async () => {
    const { resources } = await run();
    assert.deepEqual(witnessProblems(resources), []);
    const policyOf = (rs: Recorded[]) => ofType(rs, T.policy).find((x) => x.name === "witness-tls-only")!;
    const statements = (rs: Recorded[]) => JSON.parse(policyOf(rs).inputs.policy).Statement as any[];
    const rewrite = (rs: Recorded[], f: (st: any[]) => any[]) => {
      policyOf(rs).inputs.policy = JSON.stringify({ Version: "2012-10-17", Statement: f(statements(rs)) });
    };
    // Broken: the policy without the create-only statement (TLS-only kept).
    const without = clone(resources);
    rewrite(without, (st) => st.filter((x) => !x.Condition?.Null));
    assert.deepEqual(witnessProblems(without), ["witness: a PutObject without If-None-Match is not denied"]);
    // Broken: the condition that denies nothing (Null false: only requests that carry the header).
    const inverted = clone(resources);
    rewrite(inverted, (st) => st.map((x) => (x.Condition?.Null ? { ...x, Condition: { Null: { "s3:if-none-match": "false" } } } : x)));
    assert.deepEqual(witnessProblems(inverted), ["witness: a PutObject without If-None-Match is not denied"]);
    // Broken: the relay's role without ListBucketVersions, the API deleting a version.
    const roles = clone(resources);
    const pol = ofType(roles, T.rolePolicy).find((x) => x.name === "roles-policy")!;
    const st = JSON.parse(pol.inputs.policy).Statement.map((x: any) => ({ ...x, Action: x.Action.filter((a: string) => a !== "s3:ListBucketVersions") }));
    pol.inputs.policy = JSON.stringify({ Statement: st });
    const api = ofType(roles, T.rolePolicy).find((x) => x.name === "api-policy")!;
    const witness = ofType(roles, T.bucket).find((b) => b.name === "witness")!.state.arn;
    api.inputs.policy = JSON.stringify({
      Statement: [...JSON.parse(api.inputs.policy).Statement, { Effect: "Allow", Action: ["s3:DeleteObjectVersion"], Resource: [`${witness}/*`] }],
    });
    assert.deepEqual(witnessProblems(roles), ["roles: cannot s3:ListBucketVersions on the witness", "api-policy: s3:DeleteObjectVersion on the witness"]);
  });

  it("count what they create", async () => {
    const { resources } = await run();
    // Printed for the record (the note quotes it).
    console.log(`resources: ${resources.length}`);
    assert.ok(resources.length > 80);
  });
});
