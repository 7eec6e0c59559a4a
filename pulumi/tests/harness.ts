// Runs the program under Pulumi's mocks (no CLI, no cloud) and records every resource with
// its inputs, so the tests can read what would be created.

import * as pulumi from "@pulumi/pulumi";
import type { ProgramConfig } from "../src/program";

/**
 * A resource as the program registered it: its inputs, the mocks' state, its `ignoreChanges`
 * option, and the URNs of the resources it depends on (its `dependsOn`, and those its inputs
 * come from), so that a test can check what a first `up` makes before what.
 */
export type Recorded = {
  type: string;
  name: string;
  inputs: Record<string, any>;
  state: Record<string, any>;
  ignoreChanges?: string[];
  dependencies?: string[];
  /** The `protect` and `retainOnDelete` options it was registered with. */
  protect?: boolean;
  retainOnDelete?: boolean;
};

export const ACCOUNT = "123456789012";
export const REGION = "eu-west-1";

export const recorded: Recorded[] = [];
/** Each resource's `ignoreChanges` (which the mocks are not given), by type and logical name. */
const ignored = new Map<string, string[]>();
/** Each resource's dependencies' URNs (which the mocks are not given either), by type and logical name. */
const depends = new Map<string, string[]>();
/** Each resource's `protect` and `retainOnDelete` options, by type and logical name. */
const kept = new Map<string, { protect: boolean; retainOnDelete: boolean }>();

/** The URN a resource of the test stack has: what Recorded.dependencies lists. */
export const urnOf = (type: string, name: string) => `urn:pulumi:test::mira::${type}::${name}`;

/**
 * The bucket name the provider makes from a `bucketPrefix`: the prefix and 26 digits (a time and
 * a counter), so no two are alike. The mocks count from 1.
 */
let bucketCount = 0;
const prefixed = (prefix: string) => `${prefix}${String(++bucketCount).padStart(26, "0")}`;

pulumi.runtime.setMocks(
  {
    newResource(a: pulumi.runtime.MockResourceArgs) {
      const generated = a.type === "aws:s3/bucket:Bucket" && a.inputs.bucketPrefix && !a.inputs.bucket ? prefixed(a.inputs.bucketPrefix) : undefined;
      const name = a.inputs.name ?? a.inputs.bucket ?? generated ?? a.inputs.identifier ?? a.name;
      const service = a.type.split(":")[1].split("/")[0];
      const state: Record<string, any> = { ...a.inputs, name, arn: `arn:aws:${service}:${REGION}:${ACCOUNT}:${name}` };
      if (a.type === "aws:sqs/queue:Queue") state.url = `https://sqs.${REGION}.amazonaws.com/${ACCOUNT}/${name}`;
      if (a.type === "aws:kms/key:Key") state.keyId = `${a.name}-key-id`;
      if (a.type === "aws:ecr/repository:Repository") state.repositoryUrl = `${ACCOUNT}.dkr.ecr.${REGION}.amazonaws.com/${name}`;
      if (a.type === "aws:rds/instance:Instance") {
        state.endpoint = `${name}.cluster.${REGION}.rds.amazonaws.com:5432`;
        state.masterUserSecrets = [{ secretArn: `arn:aws:secretsmanager:${REGION}:${ACCOUNT}:secret:rds-master` }];
      }
      if (a.type === "aws:eks/cluster:Cluster") {
        state.endpoint = `https://${name}.gr7.${REGION}.eks.amazonaws.com`;
        state.certificateAuthority = { data: "LS0tLS1CRUdJTi1DRVJUSUZJQ0FURS0tLS0t" };
        state.identities = [{ oidcs: [{ issuer: `https://oidc.eks.${REGION}.amazonaws.com/id/MIRATEST` }] }];
        state.vpcConfig = { ...a.inputs.vpcConfig, clusterSecurityGroupId: "sg-eks-cluster" };
      }
      if (a.type === "aws:lb/loadBalancer:LoadBalancer") {
        state.arnSuffix = `app/${name}/0123456789abcdef`;
        state.dnsName = `${name}-123.${REGION}.elb.amazonaws.com`;
      }
      if (a.type === "aws:cloudfront/distribution:Distribution") {
        state.arn = `arn:aws:cloudfront::${ACCOUNT}:distribution/${a.name}-id`;
        state.domainName = "d111111abcdef8.cloudfront.net";
      }
      if (a.type === "aws:s3/bucket:Bucket") {
        state.bucket = name;
        state.bucketRegionalDomainName = `${name}.s3.${REGION}.amazonaws.com`;
        state.bucketDomainName = `${name}.s3.amazonaws.com`;
      }
      if (a.type === "aws:ecs/taskDefinition:TaskDefinition") state.arn = `arn:aws:ecs:${REGION}:${ACCOUNT}:task-definition/${a.inputs.family}:1`;
      const key = `${a.type}::${a.name}`;
      recorded.push({ type: a.type, name: a.name, inputs: a.inputs, state, ignoreChanges: ignored.get(key) ?? [], dependencies: depends.get(key) ?? [], ...(kept.get(key) ?? {}) });
      return { id: `${a.name}-id`, state };
    },
    call(a: pulumi.runtime.MockCallArgs) {
      if (a.token === "aws:index/getCallerIdentity:getCallerIdentity") {
        return { accountId: ACCOUNT, arn: `arn:aws:iam::${ACCOUNT}:user/test`, userId: "test", id: ACCOUNT };
      }
      if (a.token === "aws:ec2/getManagedPrefixList:getManagedPrefixList") return { ...a.inputs, id: "pl-cloudfront" };
      return a.inputs;
    },
  },
  "mira",
  "test",
  false,
);

// The mock monitor hands newResource the inputs only: the options a test reads (ignoreChanges,
// the dependencies, protect and retainOnDelete) are taken from the registration request on the way in.
{
  const monitor = pulumi.runtime.getMonitor() as any;
  const register = monitor.registerResource.bind(monitor);
  monitor.registerResource = (req: any, callback: any) => {
    const key = `${req.getType()}::${req.getName()}`;
    ignored.set(key, req.getIgnorechangesList());
    depends.set(key, req.getDependenciesList());
    kept.set(key, { protect: req.getProtect() ?? false, retainOnDelete: req.getRetainondelete() ?? false });
    return register(req, callback);
  };
}

export function value<T>(o: pulumi.Output<T> | T): Promise<T> {
  return pulumi.Output.isInstance(o) ? new Promise((ok) => (o as pulumi.Output<T>).apply(ok)) : Promise.resolve(o as T);
}

/** The configuration the tests run the program with. */
export const CONFIG: ProgramConfig = {
  stack: "test",
  region: REGION,
  appOrigin: "https://mira.example.org",
  cognitoDomainPrefix: "mira-test",
  multiAz: true,
  deletionProtection: true,
  dbInstanceClass: "db.r7g.large",
  witnessRetentionDays: 2555,
  ecrKeepImages: 30,
  azs: [`${REGION}a`, `${REGION}b`],
  imageTag: "test",
  albCertificateArn: `arn:aws:acm:${REGION}:${ACCOUNT}:certificate/alb`,
  albDomain: "origin.mira.example.org",
  originVerifySecret: "origin-secret",
  cdnAliases: [],
  wafRateLimit: 20000,
  apiTasks: 2,
  handlerTasks: 2,
  taskCpu: 1024,
  taskMemory: 2048,
  kubernetesVersion: "1.34",
  eksPublicAccessCidrs: ["203.0.113.0/24"],
  gpuInstanceType: "g6.xlarge",
  gpuNodesMax: 4,
  systemInstanceType: "t3.large",
  workerMaxReplicas: 4,
  workerQueueLength: 1,
  workerLeaseSeconds: 60,
  workerDrainSeconds: 1800,
  kedaVersion: "2.20.2",
  verifierTaskCpu: 1024,
  verifierTaskMemory: 2048,
  verifierStorageGiB: 50,
  verifierMinTasks: 1,
  verifierMaxTasks: 4,
  noncurrentVersionDays: 90,
  logRetentionDays: 2192,
  sesIdentityArn: `arn:aws:ses:${REGION}:${ACCOUNT}:identity/mira.example.org`,
  mailFrom: "Mira <no-reply@mira.example.org>",
  githubRepository: "mira-lab/mira",
  pulumiStateBucket: "mira-pulumi-state-123456789012",
  pulumiSecretsKeyAlias: "alias/mira-pulumi",
  // Not Mira's defaults (2 and 0), so that a test sees these reach the tasks.
  jobsAdmissionWindow: 3,
  jobsMaxRunningPerTenant: 4,
};

/**
 * Runs the program once, with CONFIG or `cfg`; later calls return the same records. Once per
 * process (node --test runs each file in its own): a test of another configuration goes in a
 * file of its own, which passes that configuration to every run().
 */
let ran: Promise<{ out: any; resources: Recorded[] }> | null = null;
let ranWith: ProgramConfig | null = null;
export function run(cfg: ProgramConfig = CONFIG) {
  if (ranWith !== null && ranWith !== cfg) throw new Error("the program already ran with another configuration in this process: use a test file of its own");
  ranWith = cfg;
  ran ??= (async () => {
    const { program } = await import("../src/program");
    const out = program(cfg);
    const settings = {
      api: await resolveMap(out.settings.api),
      roles: await resolveMap(out.settings.roles),
      worker: await resolveMap(out.settings.worker),
    };
    // Let every resource registration finish.
    await new Promise((r) => setTimeout(r, 300));
    return { out: { ...out, settings, raw: out }, resources: recorded };
  })();
  return ran;
}

/** The stack's outputs as `pulumi stack output --json` would print them (every Output resolved). */
export async function stackOutputs(cfg: ProgramConfig = CONFIG): Promise<Record<string, any>> {
  const { out } = await run(cfg);
  return resolveDeep(out.raw);
}

async function resolveDeep(v: any): Promise<any> {
  if (pulumi.Output.isInstance(v)) return resolveDeep(await value(v));
  if (Array.isArray(v)) return Promise.all(v.map(resolveDeep));
  if (v && typeof v === "object") {
    const o: Record<string, any> = {};
    for (const [k, x] of Object.entries(v)) o[k] = await resolveDeep(x);
    return o;
  }
  return v;
}

async function resolveMap(m: Record<string, pulumi.Output<string>>): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(m)) out[k] = await value(v);
  return out;
}

export const ofType = (rs: Recorded[], type: string) => rs.filter((r) => r.type === type);
