// The stack's program: `Pulumi.<stack>.yaml` configures it (see Pulumi.dev.yaml, Pulumi.prod.yaml).

import * as pulumi from "@pulumi/pulumi";
import { JOBS_DEFAULTS } from "./foundations";
import { program } from "./program";

const config = new pulumi.Config("mira");
const aws = new pulumi.Config("aws");
const region = aws.require("region");

const out = program({
  stack: pulumi.getStack(),
  region,
  appOrigin: config.require("appOrigin"),
  cognitoDomainPrefix: config.require("cognitoDomainPrefix"),
  multiAz: config.getBoolean("multiAz") ?? true,
  deletionProtection: config.getBoolean("deletionProtection") ?? true,
  dbInstanceClass: config.get("dbInstanceClass") ?? "db.r7g.large",
  witnessRetentionDays: config.getNumber("witnessRetentionDays") ?? 2555,
  ecrKeepImages: config.getNumber("ecrKeepImages") ?? 30,
  azs: config.getObject<string[]>("azs") ?? [`${region}a`, `${region}b`],
  imageTag: config.get("imageTag") ?? "bootstrap",
  albCertificateArn: config.require("albCertificateArn"),
  albDomain: config.require("albDomain"),
  originVerifySecret: config.requireSecret("originVerifySecret"),
  cdnAliases: config.getObject<string[]>("cdnAliases") ?? [],
  cdnCertificateArn: config.get("cdnCertificateArn"),
  wafRateLimit: config.getNumber("wafRateLimit") ?? 20000,
  apiTasks: config.getNumber("apiTasks") ?? 2,
  handlerTasks: config.getNumber("handlerTasks") ?? 2,
  taskCpu: config.getNumber("taskCpu") ?? 1024,
  taskMemory: config.getNumber("taskMemory") ?? 2048,
  kubernetesVersion: config.get("kubernetesVersion") ?? "1.34",
  eksPublicAccessCidrs: config.getObject<string[]>("eksPublicAccessCidrs") ?? [],
  gpuInstanceType: config.get("gpuInstanceType") ?? "g6.xlarge",
  gpuNodesMax: config.getNumber("gpuNodesMax") ?? 4,
  systemInstanceType: config.get("systemInstanceType") ?? "t3.large",
  workerMaxReplicas: config.getNumber("workerMaxReplicas") ?? 4,
  workerQueueLength: config.getNumber("workerQueueLength") ?? 1,
  workerLeaseSeconds: config.getNumber("workerLeaseSeconds") ?? 60,
  workerDrainSeconds: config.getNumber("workerDrainSeconds") ?? 1800,
  kedaVersion: config.get("kedaVersion") ?? "2.20.2",
  verifierTaskCpu: config.getNumber("verifierTaskCpu") ?? 1024,
  verifierTaskMemory: config.getNumber("verifierTaskMemory") ?? 2048,
  verifierStorageGiB: config.getNumber("verifierStorageGiB") ?? 50,
  verifierMinTasks: config.getNumber("verifierMinTasks") ?? 1,
  verifierMaxTasks: config.getNumber("verifierMaxTasks") ?? 4,
  alarmEmail: config.get("alarmEmail"),
  witnessStaleSeconds: config.getNumber("witnessStaleSeconds"),
  auditVerifySchedule: config.get("auditVerifySchedule"),
  // Optional: the public audit key `mira keys init` printed (64 hex digits; the program checks).
  auditPublicKey: config.get("auditPublicKey"),
  jobsAdmissionWindow: config.getNumber("jobsAdmissionWindow") ?? JOBS_DEFAULTS.jobsAdmissionWindow,
  jobsMaxRunningPerTenant: config.getNumber("jobsMaxRunningPerTenant") ?? JOBS_DEFAULTS.jobsMaxRunningPerTenant,
  logRetentionDays: config.getNumber("logRetentionDays") ?? 2192,
  noncurrentVersionDays: config.getNumber("noncurrentVersionDays") ?? 90,
  sesIdentityArn: config.require("sesIdentityArn"),
  mailFrom: config.require("mailFrom"),
  githubRepository: config.require("githubRepository"),
  githubOidcProviderArn: config.get("githubOidcProviderArn"),
  pulumiStateBucket: config.get("pulumiStateBucket"),
  pulumiSecretsKeyAlias: config.get("pulumiSecretsKeyAlias"),
});

export const network = out.network;
export const database = out.database;
export const messaging = out.messaging;
export const buckets = out.buckets;
export const identity = out.identity;
export const registries = out.registries;
export const roles = out.roles;
/** One settings map per service, every value from a resource. */
export const settings = out.settings;
export const compute = out.compute;
export const fleet = out.fleet;
export const edge = out.edge;
export const observability = out.observability;
/** What .github/workflows/deploy.yml reads (docs/runbooks/deploy.md). */
export const deploy = out.deploy;
