// Mira's AWS foundations (DESIGN §11): network, data, messaging, storage, identity, keys,
// registries and the services' roles. Plain `@pulumi/aws` resources only, so that a test under
// Pulumi's mocks sees everything that is created.

import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";
import { filterPolicy, loadTopology, queueArgs } from "./topology";

export type FoundationsConfig = {
  /** Names every resource: `mira-<stack>-…`. */
  stack: string;
  region: string;
  /** The SPA's origin: CORS on the uploads and results buckets, Cognito's callback. */
  appOrigin: string;
  cognitoDomainPrefix: string;
  multiAz: boolean;
  deletionProtection: boolean;
  dbInstanceClass: string;
  witnessRetentionDays: number;
  ecrKeepImages: number;
  /** Availability zones used (two at least). */
  azs: string[];
  /**
   * The trusted public audit key, 64 hex digits, as `mira keys init` prints it ("public audit
   * key: …"). Set: the verifiers (the daily `mira audit verify`, the API's per-job check) get it
   * as `Audit__PublicKey` and never read the signing key's secret. Unset: see compute.ts.
   */
  auditPublicKey?: string;
  /**
   * The handlers' admission of ready jobs to the GPU queues (ADR 0027), given to the roles'
   * services as `Jobs__AdmissionWindow` and `Jobs__MaxRunningPerTenant`: routine jobs queued and
   * not started, at most (1 to 10000; Mira's default 2), and one tenant's jobs admitted and not
   * finished, at most (0: no limit, Mira's default; STAT jobs are admitted whatever it says).
   */
  jobsAdmissionWindow: number;
  jobsMaxRunningPerTenant: number;
  /**
   * Days an overwritten or deleted slide's or result's old version is kept in the uploads and
   * results buckets before S3 expires it (the lab's retention policy; ADR 0037).
   */
  noncurrentVersionDays: number;
  /**
   * Days every log is kept (the lab's retention policy; ADR 0037): each CloudWatch log group
   * (one of CloudWatch's retention values), the trail's and the access logs' objects.
   */
  logRetentionDays: number;
  /**
   * The user pool's mail goes through SES, not Cognito's default sender (50 messages a day): the
   * ARN of a verified SES identity (a domain or an address) in the stack's region, and the
   * From address (`Mira <no-reply@lab.example.org>`), of that identity.
   */
  sesIdentityArn: string;
  mailFrom: string;
};

/** Mira's own defaults for the admission settings (config/src/lib.rs, `JobsSettings`). */
export const JOBS_DEFAULTS = { jobsAdmissionWindow: 2, jobsMaxRunningPerTenant: 0 };

/**
 * `mira:jobsAdmissionWindow` and `mira:jobsMaxRunningPerTenant`, checked as Mira checks them at
 * start, so that a value it would refuse stops the preview rather than every handler task.
 */
export function checkJobsSettings(window: number, maxPerTenant: number) {
  if (!Number.isInteger(window) || window < 1 || window > 10_000) {
    throw new Error(`mira:jobsAdmissionWindow ${JSON.stringify(window)}: routine jobs queued at once, a whole number from 1 to 10000`);
  }
  if (!Number.isInteger(maxPerTenant) || maxPerTenant < 0 || maxPerTenant > 0xffff_ffff) {
    throw new Error(`mira:jobsMaxRunningPerTenant ${JSON.stringify(maxPerTenant)}: one tenant's jobs admitted at once, a whole number, 0 for no limit`);
  }
  return { Jobs__AdmissionWindow: String(window), Jobs__MaxRunningPerTenant: String(maxPerTenant) };
}

/** `mira:auditPublicKey`, checked: 64 hex digits (what Mira's `Audit__PublicKey` accepts), or none. */
export function checkAuditPublicKey(key: string | undefined): string | undefined {
  if (key === undefined) return undefined;
  if (!/^[0-9a-fA-F]{64}$/.test(key)) {
    throw new Error(`mira:auditPublicKey must be 64 hex digits, the "public audit key" that mira keys init prints; got ${JSON.stringify(key)}`);
  }
  return key;
}

/**
 * The queues the GPU worker (`mira-worker run`, fleet.ts) consumes, and KEDA scales it on:
 * STAT jobs first (polled without waiting before each receive from the routine queue; a job in
 * hand is never preempted), then routine ones. Both are groups of bus/topology.json.
 */
export const GPU_QUEUES = ["gpu-jobs-stat", "gpu-jobs"] as const;

export const tags = (stack: string, part: string) => ({ app: "mira", stack, part });

/** The connection string's TLS parameters: RDS refuses plain connections, and both images carry RDS's CA bundle. */
export const DB_TLS = "sslmode=verify-full&sslrootcert=/usr/share/mira/rds-global-bundle.pem";

type Group = { id: pulumi.Input<string> };
/** Where a rule admits traffic from, or sends it to: another group, an address range, or a prefix list. */
export type Peer = { group: Group } | { cidrIpv4: string } | { prefixListId: pulumi.Input<string> };
const peer = (x: Peer) =>
  "group" in x ? { referencedSecurityGroupId: x.group.id } : "cidrIpv4" in x ? { cidrIpv4: x.cidrIpv4 } : { prefixListId: x.prefixListId };
const ports = (port: number | "all") => (port === "all" ? { ipProtocol: "-1" } : { ipProtocol: "tcp", fromPort: port, toPort: port });

/** A standalone ingress rule: `group` admits TCP `port` from `source` (a group, or any peer). */
export function ingressFrom(name: string, group: Group, source: Group | Peer, port: number, description: string) {
  const from: Peer = "id" in source ? { group: source } : source;
  return new aws.vpc.SecurityGroupIngressRule(name, { securityGroupId: group.id, ...peer(from), ...ports(port), description });
}

/** A standalone egress rule: `group` may send to `to` on TCP `port`, or everything (`all`). */
export function egressTo(name: string, group: Group, to: Group | Peer, port: number | "all", description: string) {
  const dest: Peer = "id" in to ? { group: to } : to;
  return new aws.vpc.SecurityGroupEgressRule(name, { securityGroupId: group.id, ...peer(dest), ...ports(port), description });
}

/**
 * The processes that connect to the database, each as its own login role: the four ECS
 * services and the worker (`mira-worker`: `run` on the GPU fleet, `verify` on ECS). `mira
 * migrate` creates each login (`mira_svc_<process>`), grants it its group role
 * (`mira_<process>`) and sets its password from `Database__Logins__<Process>`; the process reads
 * the same URL as `DATABASE_URL`.
 */
export const DB_LOGINS = ["api", "relay", "projector", "handlers", "worker"] as const;
export type DbLogin = (typeof DB_LOGINS)[number];
/** The login role a process connects as. */
export const loginRole = (login: DbLogin) => `mira_svc_${login}`;
/** The setting `mira migrate` reads a login's URL from: `Database__Logins__Api`, … */
export const loginSetting = (login: DbLogin) => `Database__Logins__${login[0].toUpperCase()}${login.slice(1)}`;

/**
 * What keeps a stack's data when someone runs `pulumi destroy` or a change would replace it
 * (ADR 0037): in a production stack (`mira:deletionProtection` true) every stateful resource
 * (the database, the buckets, the keys, the user pool, the secrets) is `protect`ed, so that
 * Pulumi refuses to delete or replace it, and `retainOnDelete`, so that removing it from the
 * program leaves it in the account. Dev stacks may be destroyed.
 */
export const keep = (production: boolean): pulumi.CustomResourceOptions => (production ? { protect: true, retainOnDelete: true } : {});

/** The retention periods CloudWatch Logs accepts, in days. */
export const LOG_RETENTION_DAYS = [1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653];

export function checkLogRetention(days: number): number {
  if (!LOG_RETENTION_DAYS.includes(days)) throw new Error(`mira:logRetentionDays ${JSON.stringify(days)}: one of CloudWatch's retention periods (${LOG_RETENTION_DAYS.join(", ")})`);
  return days;
}

/**
 * A log group under the logs key, kept `mira:logRetentionDays` (ADR 0037). A group that AWS
 * would make on its own (EKS's control plane, RDS's exports) is made here first, by its name,
 * so that it too has the key and the retention.
 */
export function logGroup(logicalName: string, name: pulumi.Input<string>, logs: { key: aws.kms.Key; retentionDays: number; stack: string }, part: string) {
  return new aws.cloudwatch.LogGroup(logicalName, { name, retentionInDays: logs.retentionDays, kmsKeyId: logs.key.arn, tags: tags(logs.stack, part) });
}

/**
 * Who writes an ALB's access logs into a bucket: the region's Elastic Load Balancing account
 * (regions older than August 2022), or the log delivery service (the newer ones).
 */
const ELB_ACCOUNTS: Record<string, string> = {
  "us-east-1": "127311923021",
  "us-east-2": "033677994240",
  "us-west-1": "027434742980",
  "us-west-2": "797873946194",
  "eu-west-1": "156460612806",
  "eu-west-2": "652711504416",
  "eu-west-3": "009996457667",
  "eu-central-1": "054676820928",
  "eu-north-1": "897822967062",
};
export const elbLogWriter = (region: string) =>
  ELB_ACCOUNTS[region] ? { AWS: `arn:aws:iam::${ELB_ACCOUNTS[region]}:root` } : { Service: "logdelivery.elasticloadbalancing.amazonaws.com" };

/** The role that alone may schedule a key's deletion or disable it, in a production stack (ADR 0037). */
export const breakGlassRoleName = (stack: string) => `mira-${stack}-break-glass`;

/** The actions the key policies deny to everyone but the break-glass role, in production stacks. */
export const KEY_GUARDED_ACTIONS = ["kms:ScheduleKeyDeletion", "kms:DisableKey"];

/**
 * A KMS key with rotation. Its policy lets the account administer it (as the default policy
 * does) plus `grants`: statements for AWS services, given the account id. In a production stack
 * it also denies KEY_GUARDED_ACTIONS to every principal but the break-glass role: a key
 * scheduled for deletion takes the witness, the snapshots and the slides with it.
 */
function key(name: string, stack: string, description: string, production: boolean, grants?: (account: string) => object[]) {
  const policy =
    grants || production
      ? pulumi.output(aws.getCallerIdentityOutput()).apply((id) =>
          JSON.stringify({
            Version: "2012-10-17",
            Statement: [
              { Sid: "Account", Effect: "Allow", Principal: { AWS: `arn:aws:iam::${id.accountId}:root` }, Action: "kms:*", Resource: "*" },
              ...(production
                ? [
                    {
                      Sid: "OnlyBreakGlassDeletesOrDisables",
                      Effect: "Deny",
                      Principal: { AWS: "*" },
                      Action: KEY_GUARDED_ACTIONS,
                      Resource: "*",
                      Condition: { ArnNotEquals: { "aws:PrincipalArn": `arn:aws:iam::${id.accountId}:role/${breakGlassRoleName(stack)}` } },
                    },
                  ]
                : []),
              ...(grants?.(id.accountId) ?? []),
            ],
          }),
        )
      : undefined;
  const k = new aws.kms.Key(
    name,
    {
      description,
      enableKeyRotation: true,
      deletionWindowInDays: 30,
      policy,
      tags: tags(stack, "keys"),
    },
    keep(production),
  );
  new aws.kms.Alias(`${name}-alias`, { name: `alias/mira-${stack}-${name.replace(/-key$/, "")}`, targetKeyId: k.keyId });
  return k;
}

/**
 * A bucket's name prefix, `mira-<stack>-<name>-`: S3 names are global, so a fixed name
 * (`mira-prod-uploads`) may already be anyone's, and the first `pulumi up` would stop there; the
 * provider appends a unique suffix to the prefix (26 characters) instead. S3 takes a prefix of
 * 37 characters at most.
 */
export function bucketPrefix(stack: string, name: string): string {
  const prefix = `mira-${stack}-${name}-`;
  if (prefix.length > 37 || !/^[a-z0-9][a-z0-9-]*-$/.test(prefix)) {
    throw new Error(`bucket prefix ${JSON.stringify(prefix)}: S3 takes lowercase letters, digits and hyphens, 37 characters at most (a shorter stack name)`);
  }
  return prefix;
}

/** A private, encrypted, versioned bucket that refuses plain HTTP. */
function bucket(
  name: string,
  stack: string,
  kmsKey: aws.kms.Key,
  production: boolean,
  opts: {
    objectLockDays?: number;
    corsOrigin?: string;
    policyElsewhere?: boolean;
    statements?: (b: aws.s3.Bucket) => object[];
    /** Days an overwritten or deleted object's old version is kept (none: for ever). */
    noncurrentDays?: number;
    /**
     * The access-log bucket (ADR 0037): S3-managed keys by default (the ALB writes to no other),
     * ACLs for CloudFront's log delivery, every object and old version gone after `expireDays`.
     */
    logs?: { expireDays: number };
  } = {},
) {
  const b = new aws.s3.Bucket(
    name,
    {
      bucketPrefix: bucketPrefix(stack, name),
      objectLockEnabled: opts.objectLockDays !== undefined,
      forceDestroy: false,
      tags: tags(stack, "storage"),
    },
    keep(production),
  );
  new aws.s3.BucketPublicAccessBlock(`${name}-public-access`, {
    bucket: b.id,
    blockPublicAcls: true,
    blockPublicPolicy: true,
    ignorePublicAcls: true,
    restrictPublicBuckets: true,
  });
  new aws.s3.BucketServerSideEncryptionConfiguration(`${name}-encryption`, {
    bucket: b.id,
    rules: [
      opts.logs
        ? { applyServerSideEncryptionByDefault: { sseAlgorithm: "AES256" } }
        : { applyServerSideEncryptionByDefault: { sseAlgorithm: "aws:kms", kmsMasterKeyId: kmsKey.arn }, bucketKeyEnabled: true },
    ],
  });
  if (opts.logs) {
    // CloudFront's standard logs are written with an ACL (the awslogsdelivery account's): a
    // bucket with ACLs disabled gets none. No ACL is public (the public access block stays).
    new aws.s3.BucketOwnershipControls(`${name}-ownership`, { bucket: b.id, rule: { objectOwnership: "BucketOwnerPreferred" } });
  }
  new aws.s3.BucketVersioning(`${name}-versioning`, { bucket: b.id, versioningConfiguration: { status: "Enabled" } });
  // A bucket has one policy: where another part adds statements (the frontend's CloudFront
  // read), that part writes it, starting from tlsOnly(). `statements` follow tlsOnly() in this
  // one (the witness's create-only rule). The logical name stays `-tls-only` whatever follows:
  // renamed, Pulumi would put the new policy, then delete the old one, and the bucket would be
  // left with none.
  if (!opts.policyElsewhere) {
    new aws.s3.BucketPolicy(`${name}-tls-only`, {
      bucket: b.id,
      policy: pulumi.jsonStringify({ Version: "2012-10-17", Statement: [tlsOnly(b), ...(opts.statements?.(b) ?? [])] }),
    });
  }
  new aws.s3.BucketLifecycleConfiguration(`${name}-lifecycle`, {
    bucket: b.id,
    rules: [
      { id: "abort-incomplete-multipart", status: "Enabled", filter: {}, abortIncompleteMultipartUpload: { daysAfterInitiation: 7 } },
      ...(opts.logs
        ? [{ id: "expire-logs", status: "Enabled", filter: {}, expiration: { days: opts.logs.expireDays }, noncurrentVersionExpiration: { noncurrentDays: 1 } }]
        : []),
      ...(opts.noncurrentDays !== undefined
        ? [{ id: "expire-noncurrent-versions", status: "Enabled", filter: {}, noncurrentVersionExpiration: { noncurrentDays: opts.noncurrentDays } }]
        : []),
    ],
  });
  if (opts.objectLockDays !== undefined) {
    new aws.s3.BucketObjectLockConfiguration(`${name}-object-lock`, {
      bucket: b.id,
      rule: { defaultRetention: { mode: "COMPLIANCE", days: opts.objectLockDays } },
    });
  }
  if (opts.corsOrigin) {
    new aws.s3.BucketCorsConfiguration(`${name}-cors`, {
      bucket: b.id,
      corsRules: [
        { allowedOrigins: [opts.corsOrigin], allowedMethods: ["GET", "HEAD", "PUT"], allowedHeaders: ["*"], exposeHeaders: ["ETag"], maxAgeSeconds: 3600 },
      ],
    });
  }
  return b;
}

/** Refuses plain HTTP to the bucket: the first statement of every bucket's policy. */
export function tlsOnly(b: aws.s3.Bucket) {
  return {
    Sid: "TlsOnly",
    Effect: "Deny",
    Principal: "*",
    Action: "s3:*",
    Resource: [b.arn, pulumi.interpolate`${b.arn}/*`],
    Condition: { Bool: { "aws:SecureTransport": "false" } },
  };
}

/**
 * The witness takes only create-only writes: a PutObject without `If-None-Match: *` is refused,
 * so no principal, however privileged its role, writes a second version over a checkpoint record
 * (Object Lock keeps the first; this keeps the key's current version the first one too). The
 * relay writes every record with `If-None-Match: *` (keys/src/s3_witness.rs). Multipart uploads
 * and copies into the bucket are refused with it (CreateMultipartUpload and CopyObject carry no
 * such header): a record is one small PutObject.
 */
export function createOnly(b: aws.s3.Bucket) {
  return {
    Sid: "CreateOnlyWrites",
    Effect: "Deny",
    Principal: "*",
    Action: "s3:PutObject",
    Resource: pulumi.interpolate`${b.arn}/*`,
    Condition: { Null: { "s3:if-none-match": "true" } },
  };
}

export type Statement = { Effect: "Allow"; Action: string[]; Resource: pulumi.Input<string>[]; Condition?: object };

/** A role assumed by `principal` (a service, or a trust policy written out), with exactly `statements`. */
export function role(
  name: string,
  stack: string,
  principal: { Service: string } | pulumi.Input<string>,
  statements: Statement[],
  extraAssume: string[] = [],
) {
  const r = new aws.iam.Role(name, {
    name: `mira-${stack}-${name}`,
    assumeRolePolicy:
      typeof principal === "object" && "Service" in principal
        ? JSON.stringify({
            Version: "2012-10-17",
            Statement: [{ Effect: "Allow", Principal: principal, Action: ["sts:AssumeRole", ...extraAssume] }],
          })
        : principal,
    tags: tags(stack, "iam"),
  });
  new aws.iam.RolePolicy(`${name}-policy`, {
    role: r.id,
    policy: pulumi.jsonStringify({ Version: "2012-10-17", Statement: statements }),
  });
  return r;
}

export function foundations(cfg: FoundationsConfig) {
  const s = cfg.stack;
  // Checked before anything is made: a bad key stops the program here.
  const auditPublicKey = checkAuditPublicKey(cfg.auditPublicKey);
  const jobs = checkJobsSettings(cfg.jobsAdmissionWindow, cfg.jobsMaxRunningPerTenant);
  const topology = loadTopology();
  // A production stack keeps its data (keep(), ADR 0037); a dev stack may be destroyed.
  const prod = cfg.deletionProtection;

  // ---- keys -------------------------------------------------------------------------------
  const phiKey = key("phi-key", s, "Mira: the patient-data keyring's data keys (AWS__KMS__KeyId)", prod);
  const rdsKey = key("rds-key", s, "Mira: RDS storage and its master secret", prod);
  // CloudFront (origin access control) decrypts the SPA's objects for this account's distributions.
  const s3Key = key("s3-key", s, "Mira: the buckets", prod, (account) => [
    {
      Sid: "CloudFrontReadsTheFrontend",
      Effect: "Allow",
      Principal: { Service: "cloudfront.amazonaws.com" },
      Action: ["kms:Decrypt"],
      Resource: "*",
      Condition: { ArnLike: { "AWS:SourceArn": `arn:aws:cloudfront::${account}:distribution/*` } },
    },
  ]);
  const messagingKey = key("messaging-key", s, "Mira: the topic and the queues", prod, (account) => [
    {
      // SNS into the encrypted queues; CloudWatch alarms into the encrypted alarm topic.
      Sid: "SnsDeliversToEncryptedQueues",
      Effect: "Allow",
      Principal: { Service: ["sns.amazonaws.com", "cloudwatch.amazonaws.com"] },
      Action: ["kms:GenerateDataKey*", "kms:Decrypt"],
      Resource: "*",
      Condition: { StringEquals: { "aws:SourceAccount": account } },
    },
    {
      // RDS's event notifications (failure, failover, low storage: observability.ts) into the
      // encrypted alarm topic.
      Sid: "RdsEventsToEncryptedAlarmTopic",
      Effect: "Allow",
      Principal: { Service: "events.rds.amazonaws.com" },
      Action: ["kms:GenerateDataKey*", "kms:Decrypt"],
      Resource: "*",
      Condition: { StringEquals: { "aws:SourceAccount": account } },
    },
  ]);

  // The logs' key (ADR 0037): the CloudWatch log groups and CloudTrail's files.
  const logRetentionDays = checkLogRetention(cfg.logRetentionDays);
  const logsKey = key("logs-key", s, "Mira: the log groups and the trail", prod, (account) => [
    {
      Sid: "CloudWatchLogsEncryptsTheGroups",
      Effect: "Allow",
      Principal: { Service: `logs.${cfg.region}.amazonaws.com` },
      Action: ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"],
      Resource: "*",
      Condition: { ArnLike: { "kms:EncryptionContext:aws:logs:arn": `arn:aws:logs:${cfg.region}:${account}:log-group:*` } },
    },
    {
      Sid: "CloudTrailEncryptsItsFiles",
      Effect: "Allow",
      Principal: { Service: "cloudtrail.amazonaws.com" },
      Action: ["kms:GenerateDataKey*"],
      Resource: "*",
      Condition: { StringLike: { "kms:EncryptionContext:aws:cloudtrail:arn": `arn:aws:cloudtrail:*:${account}:trail/*` } },
    },
    { Sid: "CloudTrailDescribesTheKey", Effect: "Allow", Principal: { Service: "cloudtrail.amazonaws.com" }, Action: ["kms:DescribeKey"], Resource: "*" },
  ]);
  const logs = { key: logsKey, retentionDays: logRetentionDays, stack: s };

  // ---- network ----------------------------------------------------------------------------
  const vpc = new aws.ec2.Vpc("vpc", {
    cidrBlock: "10.40.0.0/16",
    enableDnsHostnames: true,
    enableDnsSupport: true,
    tags: { ...tags(s, "network"), Name: `mira-${s}` },
  });
  const subnets = (kind: string, offset: number) =>
    cfg.azs.map(
      (az, i) =>
        new aws.ec2.Subnet(`${kind}-${i}`, {
          vpcId: vpc.id,
          availabilityZone: az,
          cidrBlock: `10.40.${offset + i}.0/24`,
          mapPublicIpOnLaunch: kind === "public",
          tags: { ...tags(s, "network"), Name: `mira-${s}-${kind}-${az}`, tier: kind },
        }),
    );
  const publicSubnets = subnets("public", 0);
  const dataSubnets = subnets("data", 10);
  const computeSubnets = subnets("compute", 20);
  const igw = new aws.ec2.InternetGateway("igw", { vpcId: vpc.id, tags: tags(s, "network") });
  const publicRoutes = new aws.ec2.RouteTable("public-routes", {
    vpcId: vpc.id,
    routes: [{ cidrBlock: "0.0.0.0/0", gatewayId: igw.id }],
    tags: tags(s, "network"),
  });
  publicSubnets.forEach((sn, i) => new aws.ec2.RouteTableAssociation(`public-${i}-routes`, { subnetId: sn.id, routeTableId: publicRoutes.id }));
  // Private subnets reach AWS through the endpoints below, and the public registries the
  // cluster's add-ons come from (KEDA, the autoscaler, NVIDIA's plugin, ADOT) through one NAT.
  // A NAT gateway per AZ in a Multi-AZ stack (ADR 0037): the tasks pull the collector's image
  // from the internet, and one NAT in one AZ would take every AZ's tasks down with it. A
  // single-AZ (dev) stack keeps one. The first keeps its logical names.
  const natAzs = cfg.multiAz ? cfg.azs.length : 1;
  const privateRouteTables = Array.from({ length: natAzs }, (_, a) => {
    const suffix = a === 0 ? "" : `-${a}`;
    const natIp = new aws.ec2.Eip(`nat-ip${suffix}`, { domain: "vpc", tags: tags(s, "network") });
    const nat = new aws.ec2.NatGateway(`nat${suffix}`, { allocationId: natIp.id, subnetId: publicSubnets[a].id, tags: tags(s, "network") }, { dependsOn: [igw] });
    return new aws.ec2.RouteTable(`private-routes${suffix}`, {
      vpcId: vpc.id,
      routes: [{ cidrBlock: "0.0.0.0/0", natGatewayId: nat.id }],
      tags: tags(s, "network"),
    });
  });
  // Each private subnet routes through its own AZ's NAT (the subnets are made one per AZ, in order).
  [...dataSubnets, ...computeSubnets].forEach(
    (sn, i) =>
      new aws.ec2.RouteTableAssociation(`private-${i}-routes`, { subnetId: sn.id, routeTableId: privateRouteTables[(i % cfg.azs.length) % natAzs].id }),
  );
  // Every group is made without rules, and every rule is a resource of its own (ingressFrom,
  // egressTo): a group's inline rules and standalone rules on the same group fight, and after a
  // `pulumi refresh` the next `up` deletes whichever the group's own list does not name (the
  // EKS cluster's rules on the database and the endpoints, fleet.ts, were such rules).
  const computeSg = new aws.ec2.SecurityGroup("compute-sg", {
    vpcId: vpc.id,
    description: "Mira's API, roles and workers",
    tags: tags(s, "network"),
  });
  egressTo("compute-to-anywhere", computeSg, { cidrIpv4: "0.0.0.0/0" }, "all", "the public registries (NAT) and AWS");
  const databaseSg = new aws.ec2.SecurityGroup("database-sg", {
    vpcId: vpc.id,
    description: "Mira's database: PostgreSQL from the compute group only",
    tags: tags(s, "network"),
  });
  ingressFrom("database-from-compute", databaseSg, computeSg, 5432, "Mira's API, roles and workers");
  const endpointSg = new aws.ec2.SecurityGroup("endpoints-sg", {
    vpcId: vpc.id,
    description: "VPC endpoints: HTTPS from the compute group only",
    tags: tags(s, "network"),
  });
  ingressFrom("endpoints-from-compute", endpointSg, computeSg, 443, "Mira's API, roles and workers");
  // The deploy runners (ADR 0035): self-hosted GitHub runners the operator starts in the compute
  // subnets with this group, the one way in to the cluster's private API endpoint (fleet.ts).
  // With private DNS on the interface endpoints, their AWS calls (STS, ECR, Logs, Secrets
  // Manager, …) go to the endpoints too, which must admit them.
  const runnerSg = new aws.ec2.SecurityGroup("deploy-runners-sg", {
    vpcId: vpc.id,
    description: "Mira's deploy runners (self-hosted GitHub runners): the EKS API from inside the VPC",
    tags: tags(s, "delivery"),
  });
  egressTo("deploy-runners-to-anywhere", runnerSg, { cidrIpv4: "0.0.0.0/0" }, "all", "GitHub, the registries (NAT) and AWS");
  ingressFrom("endpoints-from-deploy-runners", endpointSg, runnerSg, 443, "the deploy runners' AWS calls");
  new aws.ec2.VpcEndpoint("s3-endpoint", {
    vpcId: vpc.id,
    serviceName: `com.amazonaws.${cfg.region}.s3`,
    vpcEndpointType: "Gateway",
    routeTableIds: privateRouteTables.map((t) => t.id),
    tags: tags(s, "network"),
  });
  for (const svc of ["sqs", "sns", "kms", "secretsmanager", "ecr.api", "ecr.dkr", "logs", "sts"]) {
    new aws.ec2.VpcEndpoint(`${svc.replace(".", "-")}-endpoint`, {
      vpcId: vpc.id,
      serviceName: `com.amazonaws.${cfg.region}.${svc}`,
      vpcEndpointType: "Interface",
      privateDnsEnabled: true,
      subnetIds: computeSubnets.map((x) => x.id),
      securityGroupIds: [endpointSg.id],
      tags: tags(s, "network"),
    });
  }

  // ---- messaging (bus/topology.json) -------------------------------------------------------
  const topicName = `mira-${s}-events.fifo`;
  const queuePrefix = `mira-${s}-`;
  const t = topology.topic.attributes;
  const topic = new aws.sns.Topic("events", {
    name: topicName,
    fifoTopic: t.FifoTopic === "true",
    contentBasedDeduplication: t.ContentBasedDeduplication === "true",
    kmsMasterKeyId: messagingKey.id,
    tags: tags(s, "messaging"),
  });
  const queues: Record<string, { queue: aws.sqs.Queue; dlq: aws.sqs.Queue }> = {};
  for (const spec of topology.queues) {
    const attrs = queueArgs(topology.queue_attributes);
    const dlq = new aws.sqs.Queue(`${spec.group}-dlq`, {
      name: `${queuePrefix}${spec.group}${topology.dead_letter.suffix}.fifo`,
      ...attrs,
      kmsMasterKeyId: messagingKey.id,
      messageRetentionSeconds: 1_209_600,
      tags: tags(s, "messaging"),
    });
    const queue = new aws.sqs.Queue(spec.group, {
      name: `${queuePrefix}${spec.group}.fifo`,
      ...attrs,
      kmsMasterKeyId: messagingKey.id,
      redrivePolicy: pulumi.jsonStringify({ deadLetterTargetArn: dlq.arn, maxReceiveCount: topology.dead_letter.max_receive_count }),
      tags: tags(s, "messaging"),
    });
    new aws.sqs.QueuePolicy(`${spec.group}-from-topic`, {
      queueUrl: queue.url,
      policy: pulumi.jsonStringify({
        Version: "2012-10-17",
        Statement: [
          {
            Effect: "Allow",
            Principal: { Service: "sns.amazonaws.com" },
            Action: "sqs:SendMessage",
            Resource: queue.arn,
            Condition: { ArnEquals: { "aws:SourceArn": topic.arn } },
          },
        ],
      }),
    });
    new aws.sns.TopicSubscription(`${spec.group}-subscription`, {
      topic: topic.arn,
      protocol: "sqs",
      endpoint: queue.arn,
      rawMessageDelivery: topology.subscription_attributes.RawMessageDelivery === "true",
      filterPolicy: filterPolicy(spec, topology),
    });
    queues[spec.group] = { queue, dlq };
  }
  for (const g of [...GPU_QUEUES, "projections", "handlers", "verify"]) {
    if (!queues[g]) throw new Error(`bus/topology.json has no ${g} group, which the program's consumers need`);
  }

  // ---- storage ----------------------------------------------------------------------------
  // The slides' and the results' old versions (an overwritten or deleted object) go after
  // mira:noncurrentVersionDays; the witness keeps every version (object lock).
  const uploads = bucket("uploads", s, s3Key, prod, { corsOrigin: cfg.appOrigin, noncurrentDays: cfg.noncurrentVersionDays });
  const results = bucket("results", s, s3Key, prod, { corsOrigin: cfg.appOrigin, noncurrentDays: cfg.noncurrentVersionDays });
  const frontend = bucket("frontend", s, s3Key, prod, { policyElsewhere: true });
  const witness = bucket("witness", s, s3Key, prod, { objectLockDays: cfg.witnessRetentionDays, statements: (b) => [createOnly(b)] });

  // The access logs and the trail (ADR 0037): the ALB's and CloudFront's logs, CloudTrail's
  // files (under the logs key, which the trail names). Kept mira:logRetentionDays.
  const account = aws.getCallerIdentityOutput().accountId;
  const trailName = `mira-${s}`;
  const trailArn = pulumi.interpolate`arn:aws:cloudtrail:${cfg.region}:${account}:trail/${trailName}`;
  const logBucket = bucket("logs", s, s3Key, prod, { logs: { expireDays: logRetentionDays }, policyElsewhere: true });
  // Written here, not by bucket(): the trail waits for it (CloudTrail checks the policy).
  const logBucketPolicy = new aws.s3.BucketPolicy("logs-tls-only", {
    bucket: logBucket.id,
    policy: pulumi.jsonStringify({
      Version: "2012-10-17",
      Statement: ((b: aws.s3.Bucket) => [
        tlsOnly(b),
      {
        // The ALB's access logs: the region's Elastic Load Balancing account writes them.
        Sid: "AlbAccessLogs",
        Effect: "Allow",
        Principal: elbLogWriter(cfg.region),
        Action: "s3:PutObject",
        Resource: pulumi.interpolate`${b.arn}/alb/AWSLogs/${account}/*`,
      },
      { Sid: "CloudTrailAclCheck", Effect: "Allow", Principal: { Service: "cloudtrail.amazonaws.com" }, Action: "s3:GetBucketAcl", Resource: b.arn, Condition: { StringEquals: { "aws:SourceArn": trailArn } } },
      {
        Sid: "CloudTrailWrites",
        Effect: "Allow",
        Principal: { Service: "cloudtrail.amazonaws.com" },
        Action: "s3:PutObject",
        Resource: pulumi.interpolate`${b.arn}/trail/AWSLogs/${account}/*`,
        Condition: { StringEquals: { "s3:x-amz-acl": "bucket-owner-full-control", "aws:SourceArn": trailArn } },
      },
      ])(logBucket),
    }),
  });

  // ---- audit trail (ADR 0037) -----------------------------------------------------------------
  // Every management event in every region, and every read and write of an object in the PHI
  // buckets (the slides, the results, the witness), to the log bucket under the logs key, with
  // digest files that prove no file was changed or removed.
  const trail = new aws.cloudtrail.Trail(
    "trail",
    {
      name: trailName,
      s3BucketName: logBucket.bucket,
      s3KeyPrefix: "trail",
      isMultiRegionTrail: true,
      includeGlobalServiceEvents: true,
      enableLogFileValidation: true,
      kmsKeyId: logsKey.arn,
      eventSelectors: [
        {
          readWriteType: "All",
          includeManagementEvents: true,
          dataResources: [{ type: "AWS::S3::Object", values: [uploads, results, witness].map((b) => pulumi.interpolate`${b.arn}/`) }],
        },
      ],
      tags: tags(s, "audit"),
    },
    { dependsOn: [logBucketPolicy] },
  );

  // The VPC's flow logs (every accepted and rejected connection) into a group under the logs key.
  const flowLogGroup = logGroup("flow-logs", `/mira/${s}/vpc-flow-logs`, logs, "network");
  const flowLogRole = new aws.iam.Role("flow-logs", {
    assumeRolePolicy: JSON.stringify({
      Version: "2012-10-17",
      Statement: [{ Effect: "Allow", Principal: { Service: "vpc-flow-logs.amazonaws.com" }, Action: "sts:AssumeRole" }],
    }),
    tags: tags(s, "network"),
  });
  new aws.iam.RolePolicy("flow-logs-policy", {
    role: flowLogRole.id,
    policy: pulumi.jsonStringify({
      Version: "2012-10-17",
      Statement: [
        { Effect: "Allow", Action: ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"], Resource: [pulumi.interpolate`${flowLogGroup.arn}:*`] },
      ],
    }),
  });
  new aws.ec2.FlowLog("vpc-flow-logs", {
    vpcId: vpc.id,
    trafficType: "ALL",
    logDestinationType: "cloud-watch-logs",
    logDestination: flowLogGroup.arn,
    iamRoleArn: flowLogRole.arn,
    maxAggregationInterval: 600,
    tags: tags(s, "network"),
  });

  // ---- secrets ----------------------------------------------------------------------------
  // One login per process (DB_LOGINS): its URL, with its password, is written once by the
  // operator (docs/runbooks/deploy.md); `mira migrate` makes the login from it, and the process
  // reads it as DATABASE_URL. The audit signing key is written by `mira keys init`
  // (Audit__SigningKeySecretId).
  const dbLogins = Object.fromEntries(
    DB_LOGINS.map((login) => [
      login,
      new aws.secretsmanager.Secret(
        `db-login-${login}`,
        {
          name: `mira-${s}/database/login/${login}`,
          kmsKeyId: rdsKey.arn,
          description: `Mira's ${login} login role ${loginRole(login)} (made by mira migrate): DATABASE_URL for the ${login}, ${loginSetting(login)} for mira migrate`,
          tags: tags(s, "secrets"),
        },
        keep(prod),
      ),
    ]),
  ) as Record<DbLogin, aws.secretsmanager.Secret>;
  const signingKeySecret = new aws.secretsmanager.Secret("audit-signing-key", {
    name: `mira-${s}/audit/signing-key`,
    kmsKeyId: phiKey.arn,
    description: "Mira's checkpoint signing key (written once by mira keys init)",
    tags: tags(s, "secrets"),
  }, keep(prod));

  // ---- database ---------------------------------------------------------------------------
  const dbSubnets = new aws.rds.SubnetGroup("db-subnets", { subnetIds: dataSubnets.map((x) => x.id), tags: tags(s, "data") });
  const dbParams = new aws.rds.ParameterGroup("db-params", {
    family: "postgres16",
    description: "Mira: log slow statements, lock waits and long-idle transactions",
    parameters: [
      { name: "log_min_duration_statement", value: "1000" },
      { name: "log_lock_waits", value: "1" },
      { name: "idle_in_transaction_session_timeout", value: "600000" },
      { name: "rds.force_ssl", value: "1" },
    ],
    tags: tags(s, "data"),
  });
  // RDS's exported logs (the slow statements, lock waits and connections the parameters log;
  // upgrades) into groups made first, under the logs key (ADR 0037).
  const dbLogGroups = ["postgresql", "upgrade"].map((t) => logGroup(`db-logs-${t}`, `/aws/rds/instance/mira-${s}/${t}`, logs, "data"));
  const db = new aws.rds.Instance("db", {
    identifier: `mira-${s}`,
    engine: "postgres",
    engineVersion: "16",
    instanceClass: cfg.dbInstanceClass,
    allocatedStorage: 100,
    maxAllocatedStorage: 1000,
    storageType: "gp3",
    storageEncrypted: true,
    kmsKeyId: rdsKey.arn,
    dbName: "mira",
    username: "mira_owner",
    manageMasterUserPassword: true,
    masterUserSecretKmsKeyId: rdsKey.arn,
    multiAz: cfg.multiAz,
    dbSubnetGroupName: dbSubnets.name,
    vpcSecurityGroupIds: [databaseSg.id],
    parameterGroupName: dbParams.name,
    publiclyAccessible: false,
    backupRetentionPeriod: 14,
    deletionProtection: cfg.deletionProtection,
    copyTagsToSnapshot: true,
    finalSnapshotIdentifier: `mira-${s}-final`,
    skipFinalSnapshot: false,
    performanceInsightsEnabled: true,
    performanceInsightsKmsKeyId: rdsKey.arn,
    tags: tags(s, "data"),
    enabledCloudwatchLogsExports: ["postgresql", "upgrade"],
  }, { ...keep(prod), dependsOn: dbLogGroups });

  // ---- identity ---------------------------------------------------------------------------
  // Identity fit for patient data (ADR 0037): every sign-in asks for a TOTP code; threat
  // protection (the Plus tier) blocks compromised credentials and risky sign-ins; a changed
  // e-mail takes effect only once its code is entered; the pool cannot be deleted while
  // protected; `name` is required (a signed review prints the signer's name); mail goes through SES.
  const pool = new aws.cognito.UserPool(
    "users",
    {
      name: `mira-${s}`,
      usernameAttributes: ["email"],
      autoVerifiedAttributes: ["email"],
      mfaConfiguration: "ON",
      softwareTokenMfaConfiguration: { enabled: true },
      userPoolTier: "PLUS",
      userPoolAddOns: { advancedSecurityMode: "ENFORCED" },
      deletionProtection: "ACTIVE",
      userAttributeUpdateSettings: { attributesRequireVerificationBeforeUpdates: ["email"] },
      emailConfiguration: { emailSendingAccount: "DEVELOPER", sourceArn: cfg.sesIdentityArn, fromEmailAddress: cfg.mailFrom },
      passwordPolicy: { minimumLength: 12, requireLowercase: true, requireUppercase: true, requireNumbers: true, requireSymbols: false },
      schemas: [
        { name: "name", attributeDataType: "String", required: true, mutable: true, stringAttributeConstraints: { minLength: "1", maxLength: "256" } },
        { name: "tenant", attributeDataType: "String", mutable: true, stringAttributeConstraints: { minLength: "1", maxLength: "64" } },
      ],
      adminCreateUserConfig: { allowAdminCreateUserOnly: true },
      tags: tags(s, "identity"),
    },
    keep(prod),
  );
  for (const g of ["pathologist", "auditor", "admin"]) {
    new aws.cognito.UserGroup(`group-${g}`, { name: g, userPoolId: pool.id, description: `Mira's ${g} role (DESIGN §7)` });
  }
  const client = new aws.cognito.UserPoolClient("spa", {
    name: `mira-${s}-spa`,
    userPoolId: pool.id,
    generateSecret: false,
    allowedOauthFlowsUserPoolClient: true,
    allowedOauthFlows: ["code"],
    allowedOauthScopes: ["openid", "email", "profile"],
    callbackUrls: [`${cfg.appOrigin}/signed-in`],
    logoutUrls: [`${cfg.appOrigin}/`],
    supportedIdentityProviders: ["COGNITO"],
    explicitAuthFlows: ["ALLOW_REFRESH_TOKEN_AUTH", "ALLOW_USER_SRP_AUTH"],
    preventUserExistenceErrors: "ENABLED",
    // Users read their tenant; only administrators (through the pool) set it.
    // A required attribute must be writable by the client; `name` is the signer's printed name.
    readAttributes: ["email", "email_verified", "name", "custom:tenant"],
    writeAttributes: ["email", "name"],
    idTokenValidity: 60,
    accessTokenValidity: 60,
    refreshTokenValidity: 12,
    tokenValidityUnits: { idToken: "minutes", accessToken: "minutes", refreshToken: "hours" },
  });
  const domain = new aws.cognito.UserPoolDomain("hosted-ui", { domain: cfg.cognitoDomainPrefix, userPoolId: pool.id });

  // ---- registries -------------------------------------------------------------------------
  const repos: Record<string, aws.ecr.Repository> = {};
  for (const name of ["mira-api", "mira-wsi-worker"]) {
    const repo = new aws.ecr.Repository(name, {
      name,
      imageTagMutability: "IMMUTABLE",
      imageScanningConfiguration: { scanOnPush: true },
      encryptionConfigurations: [{ encryptionType: "KMS", kmsKey: s3Key.arn }],
      tags: tags(s, "registry"),
    });
    new aws.ecr.LifecyclePolicy(`${name}-lifecycle`, {
      repository: repo.name,
      policy: JSON.stringify({
        rules: [
          {
            rulePriority: 1,
            description: `keep the last ${cfg.ecrKeepImages} images`,
            selection: { tagStatus: "any", countType: "imageCountMoreThan", countNumber: cfg.ecrKeepImages },
            action: { type: "expire" },
          },
        ],
      }),
    });
    repos[name] = repo;
  }

  // ---- break glass (production stacks) ------------------------------------------------------
  // The one principal the key policies let schedule a key's deletion or disable it (ADR 0037):
  // assumed by a person of this account with MFA, after the lab's two-person approval
  // (docs/runbooks/break-glass.md). Nothing assumes it day to day.
  const breakGlass = prod
    ? new aws.iam.Role("break-glass", {
        name: breakGlassRoleName(s),
        description: "Mira: the only principal that may schedule a key's deletion or disable it (ADR 0037)",
        maxSessionDuration: 3600,
        assumeRolePolicy: pulumi.output(aws.getCallerIdentityOutput()).apply((id) =>
          JSON.stringify({
            Version: "2012-10-17",
            Statement: [
              {
                Effect: "Allow",
                Principal: { AWS: `arn:aws:iam::${id.accountId}:root` },
                Action: "sts:AssumeRole",
                Condition: { Bool: { "aws:MultiFactorAuthPresent": "true" } },
              },
            ],
          }),
        ),
        tags: tags(s, "keys"),
      })
    : undefined;
  if (breakGlass) {
    new aws.iam.RolePolicy("break-glass-keys", {
      role: breakGlass.id,
      policy: pulumi.jsonStringify({
        Version: "2012-10-17",
        Statement: [
          {
            Effect: "Allow",
            Action: [...KEY_GUARDED_ACTIONS, "kms:CancelKeyDeletion", "kms:EnableKey", "kms:DescribeKey"],
            Resource: [phiKey.arn, rdsKey.arn, s3Key.arn, messagingKey.arn, logsKey.arn],
          },
        ],
      }),
    });
  }

  // ---- roles: exactly what each process calls ------------------------------------------------
  const obj = (b: aws.s3.Bucket, prefix = "") => pulumi.interpolate`${b.arn}/${prefix}*`;
  const consume = (q: aws.sqs.Queue): Statement => ({
    Effect: "Allow",
    Action: ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueAttributes", "sqs:GetQueueUrl"],
    Resource: [q.arn],
  });
  const secrets = (...ss: aws.secretsmanager.Secret[]): Statement => ({
    Effect: "Allow",
    Action: ["secretsmanager:GetSecretValue"],
    Resource: ss.map((x) => x.arn),
  });
  const kms = (actions: string[], ...ks: aws.kms.Key[]): Statement => ({ Effect: "Allow", Action: actions, Resource: ks.map((k) => k.arn) });
  // Verifying reads every version of every witness record (ListObjectVersions, then GETs).
  const witnessRead: Statement = {
    Effect: "Allow",
    Action: ["s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket", "s3:ListBucketVersions"],
    Resource: [witness.arn, obj(witness)],
  };
  // Every process that speaks to the bus finds the topic and every queue and dead-letter queue
  // by name at start (mira_bus::aws::lookup): a URL is all it learns of the queues it does not
  // consume.
  const allQueues = Object.values(queues).flatMap((q) => [q.queue.arn, q.dlq.arn]);
  const lookup: Statement[] = [
    { Effect: "Allow", Action: ["sns:ListTopics"], Resource: ["*"] },
    { Effect: "Allow", Action: ["sqs:GetQueueUrl"], Resource: allQueues },
  ];

  // The API: presigned uploads and downloads, the immutable copy at `uploaded`, sealing names,
  // and the witness to verify against; it publishes and consumes nothing. /readyz asks for the
  // uploads bucket (HeadBucket) and the projections' dead-letter depth. DATABASE_URL comes
  // from ECS (the execution role), not from this role.
  const apiRole = role("api", s, { Service: "ecs-tasks.amazonaws.com" }, [
    {
      Effect: "Allow",
      Action: ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
      Resource: [obj(uploads)],
    },
    { Effect: "Allow", Action: ["s3:ListBucket"], Resource: [uploads.arn] },
    { Effect: "Allow", Action: ["s3:GetObject"], Resource: [obj(results)] },
    witnessRead,
    ...lookup,
    { Effect: "Allow", Action: ["sqs:GetQueueAttributes"], Resource: [queues.projections.dlq.arn] },
    kms(["kms:Decrypt", "kms:GenerateDataKey"], s3Key, phiKey),
  ]);
  // The relay, the projector and the handlers: publish, consume their two queues, write
  // checkpoints to the witness (create-only, never delete), sign with the key in Secrets Manager.
  // Listing versions: before the first epoch's record is written, the checkpointer lists the
  // witness's records, every version (eventlog/src/checkpoint.rs, epoch_record).
  const rolesRole = role("roles", s, { Service: "ecs-tasks.amazonaws.com" }, [
    { Effect: "Allow", Action: ["sns:Publish"], Resource: [topic.arn] },
    consume(queues.projections.queue),
    consume(queues.handlers.queue),
    { Effect: "Allow", Action: ["s3:PutObject", "s3:GetObject", "s3:ListBucket", "s3:ListBucketVersions"], Resource: [witness.arn, obj(witness)] },
    ...lookup,
    // /readyz: every `mira serve` asks for the projections' dead-letter depth.
    { Effect: "Allow", Action: ["sqs:GetQueueAttributes"], Resource: [queues.projections.dlq.arn] },
    kms(["kms:Decrypt", "kms:GenerateDataKey"], s3Key, phiKey, messagingKey),
    secrets(signingKeySecret),
  ]);
  // The slides as the worker and the verifier read them: the immutable copy the API made at
  // `uploaded`, never the upload itself (which its URL could still replace). The copy is read at
  // the version the log recorded (a GetObject with a versionId: s3:GetObjectVersion).
  const slideRead: Statement = { Effect: "Allow", Action: ["s3:GetObject", "s3:GetObjectVersion"], Resource: [obj(uploads, "immutable/")] };
  // The worker's pods: the two GPU queues only (`mira-worker run` polls gpu-jobs-stat, without
  // waiting, before each receive from gpu-jobs), the slides read, results written. Its role is
  // made with the cluster (fleet.ts), whose service account it trusts (IRSA).
  const workerStatements: Statement[] = [
    ...GPU_QUEUES.map((g) => consume(queues[g].queue)),
    ...lookup,
    slideRead,
    { Effect: "Allow", Action: ["s3:PutObject", "s3:AbortMultipartUpload"], Resource: [obj(results)] },
    kms(["kms:Decrypt", "kms:GenerateDataKey"], s3Key, phiKey, rdsKey, messagingKey),
    // Its own login only (fleet.ts reads it into DATABASE_URL).
    secrets(dbLogins.worker),
  ];
  // The slide verifier (`mira-worker verify` on ECS, verifier.ts): the verify queue only, the
  // slides read and nothing written to any bucket; the messages under the messaging key, the
  // slides under the buckets' key, and the keyring's data keys under the patient-data key (it
  // seals a slide's identifying properties into SlideVerified). Its login comes from ECS (the
  // execution role), not from this role.
  const verifierStatements: Statement[] = [
    consume(queues.verify.queue),
    ...lookup,
    slideRead,
    kms(["kms:Decrypt"], s3Key, messagingKey),
    kms(["kms:Decrypt", "kms:GenerateDataKey"], phiKey),
  ];

  // ---- the settings each service gets (DESIGN §2), from the resources ------------------------
  const common = {
    AWS__Region: pulumi.output(cfg.region),
    AWS__SNS__TopicName: topic.name,
    AWS__SQS__QueuePrefix: pulumi.output(queuePrefix),
    AWS__Cognito__UserPoolId: pool.id,
    AWS__Cognito__ClientId: client.id,
    AWS__S3__BucketName: uploads.bucket,
    AWS__S3__ResultsBucketName: results.bucket,
    AWS__KMS__KeyId: phiKey.arn,
    Audit__WitnessBucket: witness.bucket,
    Messaging__Provider: pulumi.output("Aws"),
    Storage__Provider: pulumi.output("S3"),
  };
  // The API verifies a job's events (`GET /api/jobs/{id}/verify`) against a trusted public key:
  // `mira:auditPublicKey` when the stack has it. Without it the API has no key (it must not read
  // the signing key's secret), and that endpoint answers 503: it has nothing to verify against.
  const settings = {
    api: {
      ...common,
      Web__CognitoDomain: pulumi.interpolate`https://${domain.domain}.auth.${cfg.region}.amazoncognito.com`,
      Web__RedirectUrl: pulumi.output(`${cfg.appOrigin}/signed-in`),
      ...(auditPublicKey ? { Audit__PublicKey: pulumi.output(auditPublicKey) } : {}),
    },
    // The handlers role reads the admission settings; the relay and the projector, which share
    // the map, ignore them. The API's tasks run no role and need neither.
    roles: {
      ...common,
      Audit__SigningKeySecretId: signingKeySecret.arn,
      Jobs__AdmissionWindow: pulumi.output(jobs.Jobs__AdmissionWindow),
      Jobs__MaxRunningPerTenant: pulumi.output(jobs.Jobs__MaxRunningPerTenant),
    },
    worker: { ...common },
  };

  const loginArns = Object.fromEntries(DB_LOGINS.map((l) => [l, dbLogins[l].arn])) as Record<DbLogin, pulumi.Output<string>>;

  return {
    network: {
      vpcId: vpc.id,
      publicSubnetIds: publicSubnets.map((x) => x.id),
      computeSubnetIds: computeSubnets.map((x) => x.id),
      dataSubnetIds: dataSubnets.map((x) => x.id),
      computeSecurityGroupId: computeSg.id,
      databaseSecurityGroupId: databaseSg.id,
      /** The group the deploy runners start in (ADR 0035), in the compute subnets. */
      runnerSecurityGroupId: runnerSg.id,
    },
    database: {
      endpoint: db.endpoint,
      masterSecretArn: db.masterUserSecrets.apply((x) => x?.[0]?.secretArn),
      /** Each process's login secret (DB_LOGINS), which the operator fills once (docs/runbooks/deploy.md). */
      loginSecretArns: loginArns,
    },
    messaging: {
      topicArn: topic.arn,
      queueUrls: Object.fromEntries(Object.entries(queues).map(([g, q]) => [g, q.queue.url])),
      dlqUrls: Object.fromEntries(Object.entries(queues).map(([g, q]) => [g, q.dlq.url])),
    },
    buckets: { uploads: uploads.bucket, results: results.bucket, frontend: frontend.bucket, witness: witness.bucket },
    identity: { userPoolId: pool.id, clientId: client.id, domain: domain.domain },
    registries: Object.fromEntries(Object.entries(repos).map(([n, r]) => [n, r.repositoryUrl])),
    roles: { api: apiRole.arn, roles: rolesRole.arn },
    settings,
    /** What the compute, fleet and edge parts build on (not stack outputs). */
    parts: {
      vpc,
      publicSubnets,
      computeSubnets,
      computeSg,
      databaseSg,
      endpointSg,
      runnerSg,
      topic,
      queues,
      buckets: { uploads, results, frontend, witness },
      keys: { phiKey, rdsKey, s3Key, messagingKey, logsKey },
      /** The logs' key, retention and stack, for logGroup() (ADR 0037). */
      logs,
      logBucket,
      trail,
      secrets: { dbLogins, signingKeySecret },
      auditPublicKey,
      db,
      repos,
      apiRole,
      rolesRole,
      workerStatements,
      verifierStatements,
      witnessRead,
    },
  };
}
