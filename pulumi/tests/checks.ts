// What the tests require of the program, as functions over the recorded resources that return
// the problems found: each test runs them on the program, and on a broken copy to show they
// can fail.

import { loadTopology } from "../src/topology";
import { ofType, type Recorded } from "./harness";

const T = {
  bucket: "aws:s3/bucket:Bucket",
  access: "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock",
  policy: "aws:s3/bucketPolicy:BucketPolicy",
  sse: "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
  topic: "aws:sns/topic:Topic",
  sub: "aws:sns/topicSubscription:TopicSubscription",
  queue: "aws:sqs/queue:Queue",
  db: "aws:rds/instance:Instance",
  sg: "aws:ec2/securityGroup:SecurityGroup",
  sgRule: "aws:ec2/securityGroupRule:SecurityGroupRule",
  sgIngress: "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
  sgEgress: "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule",
  rolePolicy: "aws:iam/rolePolicy:RolePolicy",
  pool: "aws:cognito/userPool:UserPool",
  key: "aws:kms/key:Key",
  lifecycle: "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration",
};
export { T };

/** The SNS/SQS resources are the topology file, exactly. */
export function messagingProblems(rs: Recorded[], prefix = "mira-test-"): string[] {
  const t = loadTopology();
  const p: string[] = [];
  // The events topic (the alarms have a topic of their own).
  const topics = ofType(rs, T.topic).filter((x) => String(x.inputs.name).endsWith("events.fifo"));
  if (topics.length !== 1) p.push(`${topics.length} topics`);
  for (const topic of topics) {
    if (String(topic.inputs.fifoTopic) !== t.topic.attributes.FifoTopic) p.push("topic FifoTopic");
    if (String(topic.inputs.contentBasedDeduplication ?? false) !== t.topic.attributes.ContentBasedDeduplication)
      p.push("topic ContentBasedDeduplication");
  }
  const queues = ofType(rs, T.queue);
  const subs = ofType(rs, T.sub);
  if (queues.length !== 2 * t.queues.length) p.push(`${queues.length} queues for ${t.queues.length} groups`);
  if (subs.length !== t.queues.length) p.push(`${subs.length} subscriptions`);
  const same = (q: Recorded, what: string) => {
    const a = t.queue_attributes;
    if (String(q.inputs.fifoQueue) !== a.FifoQueue) p.push(`${what}: FifoQueue`);
    if (q.inputs.deduplicationScope !== a.DeduplicationScope) p.push(`${what}: DeduplicationScope`);
    if (q.inputs.fifoThroughputLimit !== a.FifoThroughputLimit) p.push(`${what}: FifoThroughputLimit`);
    if (String(q.inputs.visibilityTimeoutSeconds) !== a.VisibilityTimeout) p.push(`${what}: VisibilityTimeout`);
  };
  for (const spec of t.queues) {
    const name = `${prefix}${spec.group}.fifo`;
    const dlqName = `${prefix}${spec.group}${t.dead_letter.suffix}.fifo`;
    const q = queues.find((x) => x.inputs.name === name);
    const dlq = queues.find((x) => x.inputs.name === dlqName);
    if (!q || !dlq) {
      p.push(`${spec.group}: no queue ${name} or ${dlqName}`);
      continue;
    }
    same(q, name);
    same(dlq, dlqName);
    const redrive = JSON.parse(q.inputs.redrivePolicy ?? "{}");
    if (redrive.deadLetterTargetArn !== dlq.state.arn) p.push(`${name}: redrive target`);
    if (Number(redrive.maxReceiveCount) !== t.dead_letter.max_receive_count) p.push(`${name}: maxReceiveCount`);
    const sub = subs.find((x) => x.inputs.endpoint === q.state.arn);
    if (!sub) {
      p.push(`${name}: no subscription`);
      continue;
    }
    if (String(sub.inputs.rawMessageDelivery) !== t.subscription_attributes.RawMessageDelivery) p.push(`${name}: RawMessageDelivery`);
    const filter = sub.inputs.filterPolicy ? JSON.parse(sub.inputs.filterPolicy) : null;
    if (JSON.stringify(filter) !== JSON.stringify(spec.filter_policy)) p.push(`${name}: filter policy ${JSON.stringify(filter)}`);
  }
  return p;
}

const byBucket = (rs: Recorded[], type: string, b: Recorded) => ofType(rs, type).filter((x) => x.inputs.bucket === `${b.name}-id`);

/**
 * An ingress rule, wherever it is written: inline in a group's `ingress`, an
 * `aws.ec2.SecurityGroupRule` of type ingress, or an `aws.vpc.SecurityGroupIngressRule`. `group`
 * is the id of the group it admits into; `cidrs`, `groups` and `prefixLists` what it admits.
 */
export type Ingress = { rule: string; group: string; cidrs: string[]; groups: string[]; prefixLists: string[] };

const present = (...xs: any[]): string[] => xs.flat().filter((x) => x !== undefined && x !== null && x !== "");

export function ingressRules(rs: Recorded[]): Ingress[] {
  const out: Ingress[] = [];
  for (const g of ofType(rs, T.sg)) {
    (g.inputs.ingress ?? []).forEach((r: any, i: number) =>
      out.push({
        rule: `${g.name} ingress[${i}]`,
        group: `${g.name}-id`,
        cidrs: present(r.cidrBlocks, r.ipv6CidrBlocks),
        groups: present(r.securityGroups, r.self ? `${g.name}-id` : undefined),
        prefixLists: present(r.prefixListIds),
      }),
    );
  }
  for (const r of ofType(rs, T.sgRule).filter((x) => x.inputs.type === "ingress")) {
    const i = r.inputs;
    out.push({ rule: r.name, group: i.securityGroupId, cidrs: present(i.cidrBlocks, i.ipv6CidrBlocks), groups: present(i.sourceSecurityGroupId, i.self ? i.securityGroupId : undefined), prefixLists: present(i.prefixListIds) });
  }
  for (const r of ofType(rs, T.sgIngress)) {
    const i = r.inputs;
    out.push({ rule: r.name, group: i.securityGroupId, cidrs: present(i.cidrIpv4, i.cidrIpv6), groups: present(i.referencedSecurityGroupId), prefixLists: present(i.prefixListId) });
  }
  return out;
}

/** A group's logical name by its id, or the id itself (the EKS cluster's group is made by EKS, not by the program). */
export const groupName = (rs: Recorded[], id: string) => {
  if (id === eksClusterGroup(rs)) return "the EKS cluster security group";
  return ofType(rs, T.sg).find((g) => `${g.name}-id` === id)?.name ?? id;
};
/** The security group EKS made for the cluster (its nodes and pods carry it). */
export const eksClusterGroup = (rs: Recorded[]): string | undefined => ofType(rs, "aws:eks/cluster:Cluster")[0]?.state.vpcConfig?.clusterSecurityGroupId;

/**
 * Nothing is public: buckets block public access and refuse plain HTTP; the database is private,
 * and the rules of its groups (inline or standalone) admit no address range and no group but the
 * compute group and the EKS cluster's; no ingress rule anywhere admits the whole internet.
 */
export function publicProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  for (const b of ofType(rs, T.bucket)) {
    const block = byBucket(rs, T.access, b)[0];
    const all = block && ["blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets"].every((k) => block.inputs[k] === true);
    if (!all) p.push(`bucket ${b.name}: public access not blocked`);
    const tls = byBucket(rs, T.policy, b).some((pol) =>
      JSON.parse(pol.inputs.policy).Statement.some(
        (s: any) => s.Effect === "Deny" && s.Principal === "*" && s.Condition?.Bool?.["aws:SecureTransport"] === "false",
      ),
    );
    if (!tls) p.push(`bucket ${b.name}: no TLS-only policy`);
  }
  const rules = ingressRules(rs);
  const compute = ofType(rs, T.sg).find((g) => g.name === "compute-sg");
  const allowed = present(compute ? `${compute.name}-id` : undefined, eksClusterGroup(rs));
  for (const db of ofType(rs, T.db)) {
    if (db.inputs.publiclyAccessible !== false) p.push(`database ${db.name}: publicly accessible`);
    const groups: string[] = db.inputs.vpcSecurityGroupIds ?? [];
    if (groups.length === 0) p.push(`database ${db.name}: no security group`);
    for (const r of rules.filter((x) => groups.includes(x.group))) {
      const into = groupName(rs, r.group);
      if (r.cidrs.length || r.prefixLists.length) p.push(`${into}: admits addresses (${r.rule})`);
      for (const g of r.groups.filter((x) => !allowed.includes(x))) p.push(`${into}: admits another group, ${groupName(rs, g)} (${r.rule})`);
    }
  }
  for (const r of rules) {
    for (const c of r.cidrs.filter((x) => x === "0.0.0.0/0" || x === "::/0")) p.push(`${r.rule}: admits ${c} into ${groupName(rs, r.group)}`);
  }
  return p;
}

/**
 * Every security group's rules are standalone resources of one kind (`aws.vpc` ingress and
 * egress rules): no inline `ingress` or `egress`, and no `aws.ec2.SecurityGroupRule` beside
 * them. Mixed, the group's own list and the rules fight: a `pulumi refresh` folds the standalone
 * rules into the group's, and the next `up` deletes them.
 */
export function ruleStyleProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const ruleGroups = (type: string) => new Set(ofType(rs, type).map((r) => r.inputs.securityGroupId));
  const ec2Rules = ruleGroups(T.sgRule);
  const vpcRules = new Set([...ruleGroups(T.sgIngress), ...ruleGroups(T.sgEgress)]);
  for (const g of ofType(rs, T.sg)) {
    const id = `${g.name}-id`;
    for (const kind of ["ingress", "egress"]) {
      const n = (g.inputs[kind] ?? []).length;
      if (n) p.push(`security group ${g.name}: ${n} inline ${kind} rule${n > 1 ? "s" : ""}`);
    }
    if (ec2Rules.has(id)) p.push(`security group ${g.name}: aws.ec2.SecurityGroupRule rules${vpcRules.has(id) ? " beside aws.vpc rules" : ""}`);
  }
  // The EKS cluster's group is EKS's: the program only adds rules to it, of one kind too.
  const eks = eksClusterGroup(rs);
  if (eks && ec2Rules.has(eks)) p.push("the EKS cluster security group: aws.ec2.SecurityGroupRule rules");
  return p;
}

/**
 * No bucket has a fixed name that anyone else could have taken first (S3's names are global):
 * each is named by a `bucketPrefix`, to which the provider adds a unique suffix, or, if it has a
 * fixed name, that name carries the account's id.
 */
export function bucketNameProblems(rs: Recorded[], account: string): string[] {
  const p: string[] = [];
  for (const b of ofType(rs, T.bucket)) {
    const fixed = b.inputs.bucket;
    if (fixed !== undefined && !String(fixed).includes(account)) p.push(`bucket ${b.name}: the fixed name ${fixed} may be taken in another account`);
    if (fixed === undefined && !b.inputs.bucketPrefix) p.push(`bucket ${b.name}: neither a name nor a prefix`);
  }
  return p;
}

/** Encryption at rest on RDS, S3, SQS and SNS. */
export function encryptionProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  for (const db of ofType(rs, T.db)) if (db.inputs.storageEncrypted !== true || !db.inputs.kmsKeyId) p.push(`database ${db.name}`);
  for (const b of ofType(rs, T.bucket)) {
    const sse = byBucket(rs, T.sse, b)[0];
    // The access-log bucket (ADR 0037) holds no patient data and takes S3's keys: an ALB writes
    // its logs with no other. Every other bucket, a customer key.
    const algorithm = sse?.inputs.rules?.[0]?.applyServerSideEncryptionByDefault?.sseAlgorithm;
    if (algorithm !== "aws:kms" && !(b.name === "logs" && algorithm === "AES256")) p.push(`bucket ${b.name}`);
  }
  for (const q of ofType(rs, T.queue)) if (!q.inputs.kmsMasterKeyId && q.inputs.sqsManagedSseEnabled !== true) p.push(`queue ${q.name}`);
  for (const t of ofType(rs, T.topic)) if (!t.inputs.kmsMasterKeyId) p.push(`topic ${t.name}`);
  return p;
}

type Statement = { Effect: string; Action: string[]; Resource: string[] };

export function statementsOf(rs: Recorded[], role: string): Statement[] {
  // Every inline policy of the role (its own, and the collector's telemetry).
  return ofType(rs, T.rolePolicy)
    .filter((x) => x.inputs.role === `${role}-id`)
    .flatMap((pol) => JSON.parse(pol.inputs.policy).Statement);
}

/**
 * The worker: no wildcard service actions, consumes the two GPU queues (gpu-jobs-stat and
 * gpu-jobs) and no other, writes nothing to uploads, reads the slides' immutable copies at the
 * version the log recorded.
 */
export function workerProblems(statements: Statement[], prefix = "mira-test-"): string[] {
  const p: string[] = [];
  const gpuQueues = ["gpu-jobs", "gpu-jobs-stat"].map((g) => `:${prefix}${g}.fifo`);
  for (const s of statements) {
    for (const a of s.Action) {
      if (a === "*" || a.endsWith(":*")) p.push(`wildcard action ${a}`);
      // Finding a queue's URL by name is what every bus client does at start; nothing more.
      if (a.startsWith("sqs:") && a !== "sqs:GetQueueUrl" && s.Resource.some((r) => !gpuQueues.some((q) => r.endsWith(q)))) {
        p.push(`${a} beyond the GPU queues: ${s.Resource}`);
      }
      if (/^s3:(Put|Delete|Abort|Restore|Replicate)/.test(a) && s.Resource.some((r) => r.includes(`:${prefix}uploads-`))) {
        p.push(`${a} on the uploads bucket`);
      }
    }
  }
  for (const q of gpuQueues) {
    for (const a of ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueAttributes"]) {
      if (!statements.some((s) => s.Action.includes(a) && s.Resource.some((r) => r.endsWith(q)))) p.push(`cannot ${a} on ${q.slice(1)}`);
    }
  }
  for (const a of ["s3:GetObject", "s3:GetObjectVersion"]) {
    const copies = new RegExp(`:${prefix}uploads-\\d+/immutable/\\*$`);
    if (!statements.some((s) => s.Action.includes(a) && s.Resource.some((r) => copies.test(r)))) p.push(`cannot ${a} on the slides' immutable copies`);
  }
  return p;
}

/** The API: never deletes from the witness bucket. */
export function apiProblems(statements: Statement[]): string[] {
  const p: string[] = [];
  for (const s of statements) {
    for (const a of s.Action) {
      const onWitness = s.Resource.some((r) => r.includes(":mira-test-witness-"));
      if (onWitness && (a === "s3:*" || a === "*" || a.startsWith("s3:Delete") || a.startsWith("s3:PutObjectRetention") || a.startsWith("s3:BypassGovernance"))) {
        p.push(`${a} on the witness bucket`);
      }
      if (a === "*" || a.endsWith(":*")) p.push(`wildcard action ${a}`);
    }
  }
  return p;
}

/** The settings each service gets: every value the resources' own, none a literal. */
export function settingsProblems(settings: Record<string, Record<string, string>>, rs: Recorded[]): string[] {
  const state = (type: string, name: string) => rs.find((r) => r.type === type && r.name === name)?.state ?? {};
  const expected: Record<string, string> = {
    AWS__Cognito__UserPoolId: "users-id",
    AWS__Cognito__ClientId: "spa-id",
    AWS__S3__BucketName: state(T.bucket, "uploads").bucket,
    AWS__S3__ResultsBucketName: state(T.bucket, "results").bucket,
    AWS__SNS__TopicName: state(T.topic, "events").name,
    AWS__KMS__KeyId: state("aws:kms/key:Key", "phi-key").arn,
    Audit__WitnessBucket: state(T.bucket, "witness").bucket,
  };
  const p: string[] = [];
  for (const [service, map] of Object.entries(settings)) {
    for (const [k, v] of Object.entries(expected)) if (map[k] !== v) p.push(`${service}: ${k} is ${map[k]}, not ${v}`);
    const prefix = map.AWS__SQS__QueuePrefix;
    for (const g of loadTopology().queues) {
      if (!ofType(rs, T.queue).some((q) => q.inputs.name === `${prefix}${g.group}.fifo`)) p.push(`${service}: no queue ${prefix}${g.group}.fifo`);
    }
  }
  return p;
}

/**
 * What every bus client calls at start (mira_bus::aws::lookup: ListTopics, then GetQueueUrl for
 * each queue and dead-letter queue) and, for a process serving /readyz, what readiness asks.
 */
export function startupProblems(rs: Recorded[], role: string, servesReadyz: boolean): string[] {
  const st = statementsOf(rs, role);
  const allows = (action: string, resource: string) =>
    st.some((s) => s.Action.includes(action) && s.Resource.some((r) => r === "*" || r === resource));
  const p: string[] = [];
  if (!allows("sns:ListTopics", "*")) p.push(`${role}: cannot list topics`);
  for (const q of ofType(rs, T.queue)) if (!allows("sqs:GetQueueUrl", q.state.arn)) p.push(`${role}: cannot find ${q.inputs.name}`);
  if (servesReadyz) {
    const uploads = ofType(rs, T.bucket).find((b) => b.name === "uploads")!;
    if (!allows("s3:ListBucket", uploads.state.arn)) p.push(`${role}: /readyz cannot reach the uploads bucket`);
    const dlq = ofType(rs, T.queue).find((q) => String(q.inputs.name).endsWith("projections-dlq.fifo"))!;
    if (!allows("sqs:GetQueueAttributes", dlq.state.arn)) p.push(`${role}: /readyz cannot read the projections' dead-letter depth`);
  }
  return p;
}

const asList = <T>(x: T | T[] | undefined): T[] => (x === undefined ? [] : Array.isArray(x) ? x : [x]);

/**
 * The witness (the bucket with Object Lock): its policy keeps refusing plain HTTP and refuses
 * every PutObject without `If-None-Match` (the condition key `s3:if-none-match` absent), so a
 * record is written once; the process that writes checkpoints writes and lists every version,
 * and the ones that verify read every version; nobody deletes, or changes a record's retention.
 */
export function witnessProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const witness = ofType(rs, T.bucket).find((b) => b.inputs.objectLockEnabled === true);
  if (!witness) return ["no bucket with Object Lock"];
  const arn = witness.state.arn;
  const objects = `${arn}/*`;
  const statements: any[] = byBucket(rs, T.policy, witness).flatMap((pol) => JSON.parse(pol.inputs.policy).Statement);
  if (!statements.some((s) => s.Effect === "Deny" && s.Condition?.Bool?.["aws:SecureTransport"] === "false")) p.push(`${witness.name}: no TLS-only statement`);
  const createOnly = statements.some(
    (s) =>
      s.Effect === "Deny" &&
      s.Principal === "*" &&
      asList(s.Action).some((a: string) => a === "s3:PutObject" || a === "s3:*") &&
      asList(s.Resource).includes(objects) &&
      JSON.stringify(s.Condition) === JSON.stringify({ Null: { "s3:if-none-match": "true" } }),
  );
  if (!createOnly) p.push(`${witness.name}: a PutObject without If-None-Match is not denied`);

  const can = (role: string, action: string, resource: string) =>
    statementsOf(rs, role).some((s: any) => s.Effect === "Allow" && asList(s.Action).includes(action) && asList(s.Resource).includes(resource));
  // The relay, which writes checkpoints (the roles' role), and the verifiers (the API, per job; the daily task).
  const need: [string, string, string][] = [
    ["roles", "s3:PutObject", objects],
    ["roles", "s3:GetObject", objects],
    ["roles", "s3:ListBucket", arn],
    ["roles", "s3:ListBucketVersions", arn],
  ];
  for (const verifier of ["api", "audit-verify"]) {
    need.push([verifier, "s3:GetObject", objects], [verifier, "s3:GetObjectVersion", objects], [verifier, "s3:ListBucket", arn], [verifier, "s3:ListBucketVersions", arn]);
  }
  for (const [role, action, resource] of need) if (!can(role, action, resource)) p.push(`${role}: cannot ${action} on the witness`);
  for (const pol of ofType(rs, T.rolePolicy)) {
    for (const s of JSON.parse(pol.inputs.policy).Statement as any[]) {
      if (s.Effect !== "Allow" || !asList(s.Resource).some((r: string) => r === arn || r === objects || r === "*")) continue;
      for (const a of asList<string>(s.Action)) {
        if (/^s3:(\*|Delete|PutObjectRetention|PutObjectLegalHold|BypassGovernanceRetention|PutBucketPolicy|PutBucketVersioning|PutObjectLockConfiguration)/.test(a)) {
          p.push(`${pol.name}: ${a} on the witness`);
        }
      }
    }
  }
  return p;
}

// ---- ADR 0037: an account fit for patient data ---------------------------------------------


/**
 * The user pool resists a stolen password and an operator's mistake: MFA on for everyone (TOTP),
 * threat protection enforced, deletion protection, an e-mail change only once verified, a
 * required `name`, mail through SES.
 */
export function identityProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const pools = ofType(rs, T.pool);
  if (pools.length !== 1) p.push(`${pools.length} user pools`);
  for (const pool of pools) {
    const i = pool.inputs;
    const at = `user pool ${pool.name}`;
    if (i.mfaConfiguration !== "ON") p.push(`${at}: MFA ${i.mfaConfiguration ?? "OFF"}, not ON`);
    if (i.softwareTokenMfaConfiguration?.enabled !== true) p.push(`${at}: no TOTP`);
    if (i.userPoolAddOns?.advancedSecurityMode !== "ENFORCED") p.push(`${at}: threat protection ${i.userPoolAddOns?.advancedSecurityMode ?? "OFF"}, not ENFORCED`);
    if (i.userPoolAddOns?.advancedSecurityMode === "ENFORCED" && i.userPoolTier !== "PLUS") p.push(`${at}: threat protection needs the PLUS tier`);
    if (i.deletionProtection !== "ACTIVE") p.push(`${at}: no deletion protection`);
    if (!(i.userAttributeUpdateSettings?.attributesRequireVerificationBeforeUpdates ?? []).includes("email")) p.push(`${at}: an e-mail change takes effect unverified`);
    const name = (i.schemas ?? []).find((x: any) => x.name === "name");
    if (name?.required !== true) p.push(`${at}: name is not required`);
    const mail = i.emailConfiguration ?? {};
    if (mail.emailSendingAccount !== "DEVELOPER" || !mail.sourceArn) p.push(`${at}: mail through Cognito's default sender, not SES`);
  }
  return p;
}

/** The resources whose loss loses data, by type: each is protected and retained in production. */
export const STATEFUL = [T.db, T.bucket, T.key, T.pool, "aws:secretsmanager/secret:Secret"];

/** In a production stack, every stateful resource is `protect`ed and `retainOnDelete`. */
export function protectionProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  for (const r of rs.filter((x) => STATEFUL.includes(x.type))) {
    const what = `${r.type.split(":").pop()} ${r.name}`;
    if (!r.protect) p.push(`${what}: not protected`);
    if (!r.retainOnDelete) p.push(`${what}: not retained on delete`);
  }
  return p;
}

/**
 * In a production stack, each key's policy denies `kms:ScheduleKeyDeletion` and `kms:DisableKey`
 * to every principal but the break-glass role (and the role exists); nothing in the policy
 * allows those to anyone else without the deny.
 */
export function keyPolicyProblems(rs: Recorded[], account: string, stack = "test"): string[] {
  const p: string[] = [];
  const breakGlass = `arn:aws:iam::${account}:role/mira-${stack}-break-glass`;
  if (!ofType(rs, "aws:iam/role:Role").some((r) => r.inputs.name === `mira-${stack}-break-glass`)) p.push(`no break-glass role mira-${stack}-break-glass`);
  const list = (x: any): string[] => (x === undefined ? [] : Array.isArray(x) ? x : [x]);
  for (const k of ofType(rs, T.key)) {
    const statements: any[] = k.inputs.policy ? JSON.parse(k.inputs.policy).Statement : [];
    for (const action of ["kms:ScheduleKeyDeletion", "kms:DisableKey"]) {
      const denied = statements.some(
        (st) =>
          st.Effect === "Deny" &&
          (st.Principal === "*" || list(st.Principal?.AWS).includes("*")) &&
          list(st.Action).some((a) => a === action || a === "kms:*") &&
          list(st.Resource).includes("*") &&
          // Only the break-glass role is exempt, and nothing else narrows the deny.
          JSON.stringify(st.Condition ?? {}) === JSON.stringify({ ArnNotEquals: { "aws:PrincipalArn": breakGlass } }),
      );
      if (!denied) p.push(`key ${k.name}: ${action} not denied to all but the break-glass role`);
    }
  }
  return p;
}

/** The uploads and results buckets expire old versions after `days`. */
export function noncurrentProblems(rs: Recorded[], days: number): string[] {
  const p: string[] = [];
  for (const name of ["uploads", "results"]) {
    const lc = ofType(rs, T.lifecycle).find((x) => x.inputs.bucket === `${name}-id`);
    const rule = (lc?.inputs.rules ?? []).find((r: any) => r.status === "Enabled" && r.noncurrentVersionExpiration);
    if (!rule) p.push(`bucket ${name}: old versions kept for ever`);
    else if (Number(rule.noncurrentVersionExpiration.noncurrentDays) !== days) p.push(`bucket ${name}: old versions kept ${rule.noncurrentVersionExpiration.noncurrentDays} days, not ${days}`);
  }
  return p;
}

/**
 * The account records who touched what (ADR 0037): one multi-region trail with digest files under
 * a customer key and S3 data events on the PHI buckets (uploads, results, witness); the VPC's flow
 * logs; the ALB's and CloudFront's access logs in the log bucket; RDS's logs exported; every log
 * group under a customer key, kept `retentionDays`, the groups AWS would make itself (EKS's
 * control plane, RDS's exports) made first.
 */
export function auditProblems(rs: Recorded[], retentionDays: number): string[] {
  const p: string[] = [];
  const logBucket = ofType(rs, T.bucket).find((b) => b.name === "logs");
  if (!logBucket) p.push("no log bucket");
  const trails = ofType(rs, "aws:cloudtrail/trail:Trail");
  if (trails.length !== 1) p.push(`${trails.length} trails`);
  for (const t of trails) {
    const i = t.inputs;
    if (i.isMultiRegionTrail !== true) p.push(`trail ${t.name}: one region only`);
    if (i.enableLogFileValidation !== true) p.push(`trail ${t.name}: no log file validation`);
    if (!i.kmsKeyId) p.push(`trail ${t.name}: no customer key`);
    if (logBucket && i.s3BucketName !== logBucket.state.bucket) p.push(`trail ${t.name}: not into the log bucket`);
    const objects = (i.eventSelectors ?? [])
      .filter((s: any) => (s.readWriteType ?? "All") === "All")
      .flatMap((s: any) => s.dataResources ?? [])
      .filter((d: any) => d.type === "AWS::S3::Object")
      .flatMap((d: any) => d.values ?? []);
    for (const name of ["uploads", "results", "witness"]) {
      const b = ofType(rs, T.bucket).find((x) => x.name === name);
      if (b && !objects.includes(`${b.state.arn}/`)) p.push(`trail ${t.name}: no data events on bucket ${name}`);
    }
  }
  for (const vpc of ofType(rs, "aws:ec2/vpc:Vpc")) {
    if (!ofType(rs, "aws:ec2/flowLog:FlowLog").some((f) => f.inputs.vpcId === `${vpc.name}-id` && f.inputs.trafficType === "ALL")) p.push(`vpc ${vpc.name}: no flow logs`);
  }
  for (const lb of ofType(rs, "aws:lb/loadBalancer:LoadBalancer")) {
    const a = lb.inputs.accessLogs;
    if (a?.enabled !== true || !logBucket || a.bucket !== logBucket.state.bucket) p.push(`load balancer ${lb.name}: no access logs in the log bucket`);
  }
  for (const d of ofType(rs, "aws:cloudfront/distribution:Distribution")) {
    if (!logBucket || d.inputs.loggingConfig?.bucket !== logBucket.state.bucketDomainName) p.push(`distribution ${d.name}: no access logs in the log bucket`);
  }
  const groups = ofType(rs, "aws:cloudwatch/logGroup:LogGroup");
  for (const db of ofType(rs, T.db)) {
    const exports: string[] = db.inputs.enabledCloudwatchLogsExports ?? [];
    if (!exports.includes("postgresql")) p.push(`database ${db.name}: its logs not exported`);
    for (const e of exports) {
      if (!groups.some((g) => g.inputs.name === `/aws/rds/instance/${db.inputs.identifier}/${e}`)) p.push(`database ${db.name}: its ${e} log group is not made first`);
    }
  }
  for (const c of ofType(rs, "aws:eks/cluster:Cluster")) {
    if (!groups.some((g) => g.inputs.name === `/aws/eks/${c.inputs.name}/cluster`)) p.push(`cluster ${c.name}: its control-plane log group is not made first`);
  }
  for (const g of groups) {
    if (!g.inputs.kmsKeyId) p.push(`log group ${g.name}: no customer key`);
    if (g.inputs.retentionInDays !== retentionDays) p.push(`log group ${g.name}: kept ${g.inputs.retentionInDays ?? "for ever"} days, not ${retentionDays}`);
  }
  return p;
}

/**
 * The edge (ADR 0037): every distribution behind a CloudFront web ACL with AWS's managed rule
 * groups and a blocking rate limit; its response policy's Content-Security-Policy is `csp` (the
 * gateway's), nothing looser, and never replaces the origin's.
 */
export function edgeProblems(rs: Recorded[], csp: string, groups: string[]): string[] {
  const p: string[] = [];
  const acls = ofType(rs, "aws:wafv2/webAcl:WebAcl");
  for (const d of ofType(rs, "aws:cloudfront/distribution:Distribution")) {
    const acl = acls.find((a) => a.state.arn === d.inputs.webAclId);
    if (!acl) {
      p.push(`distribution ${d.name}: no web ACL`);
      continue;
    }
    if (acl.inputs.scope !== "CLOUDFRONT") p.push(`web ACL ${acl.name}: scope ${acl.inputs.scope}`);
    const rules: any[] = acl.inputs.rules ?? [];
    for (const g of groups) {
      const r = rules.find((x) => x.statement?.managedRuleGroupStatement?.vendorName === "AWS" && x.statement.managedRuleGroupStatement.name === g);
      if (!r) p.push(`web ACL ${acl.name}: no ${g}`);
      else if (r.overrideAction?.count) p.push(`web ACL ${acl.name}: ${g} only counts`);
    }
    if (!rules.some((x) => x.statement?.rateBasedStatement?.limit > 0 && x.action?.block)) p.push(`web ACL ${acl.name}: no blocking rate limit`);
  }
  for (const h of ofType(rs, "aws:cloudfront/responseHeadersPolicy:ResponseHeadersPolicy")) {
    const c = h.inputs.securityHeadersConfig?.contentSecurityPolicy;
    if (!c) continue;
    const policy: string = c.contentSecurityPolicy;
    for (const loose of ["'unsafe-inline'", "'unsafe-eval'"]) if (policy.includes(loose)) p.push(`response policy ${h.name}: ${loose}`);
    for (const bare of policy.split(/[ ;]+/).filter((x) => /^(wss|ws|https|http):$/.test(x))) p.push(`response policy ${h.name}: any ${bare} origin`);
    if (policy !== csp) p.push(`response policy ${h.name}: not the gateway's Content-Security-Policy`);
    if (c.override !== false) p.push(`response policy ${h.name}: replaces the gateway's Content-Security-Policy`);
  }
  return p;
}

/** In a Multi-AZ stack, each AZ's private subnets leave through a NAT gateway in that AZ. */
export function natProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const subnets = ofType(rs, "aws:ec2/subnet:Subnet");
  const azOf = (id: string) => subnets.find((x) => `${x.name}-id` === id)?.inputs.availabilityZone;
  const nats = ofType(rs, "aws:ec2/natGateway:NatGateway");
  const tables = ofType(rs, "aws:ec2/routeTable:RouteTable");
  for (const sn of subnets.filter((x) => x.inputs.tags?.tier !== "public")) {
    const assoc = ofType(rs, "aws:ec2/routeTableAssociation:RouteTableAssociation").find((a) => a.inputs.subnetId === `${sn.name}-id`);
    const table = tables.find((t) => `${t.name}-id` === assoc?.inputs.routeTableId);
    const natId = (table?.inputs.routes ?? []).find((r: any) => r.cidrBlock === "0.0.0.0/0")?.natGatewayId;
    const nat = nats.find((n) => `${n.name}-id` === natId);
    if (!nat) p.push(`subnet ${sn.name}: no NAT gateway`);
    else if (azOf(nat.inputs.subnetId) !== sn.inputs.availabilityZone) p.push(`subnet ${sn.name} (${sn.inputs.availabilityZone}): through the NAT in ${azOf(nat.inputs.subnetId)}`);
  }
  return p;
}
