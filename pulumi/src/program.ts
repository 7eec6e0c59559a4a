// The whole stack: the foundations, then what runs on them (ECS for the API and the roles, EKS
// for the GPU fleet, CloudFront in front, the alarms), then what delivery needs. index.ts reads
// the stack's configuration into a ProgramConfig; the tests pass one directly.

import * as pulumi from "@pulumi/pulumi";
import { compute } from "./compute";
import { delivery } from "./delivery";
import { edge } from "./edge";
import { fleet } from "./fleet";
import { type FoundationsConfig, foundations } from "./foundations";
import { observability } from "./observability";

export type ProgramConfig = FoundationsConfig & {
  /** The image tag the task definitions and the worker Deployment start from; deploys move it (docs/runbooks/deploy.md). */
  imageTag: string;
  /** ACM certificate (in the stack's region) for the ALB's HTTPS listener, and the name on it that resolves to the ALB. */
  albCertificateArn: string;
  albDomain: string;
  /** The header value CloudFront sends to the ALB; the ALB answers 403 without it. A secret. */
  originVerifySecret: pulumi.Input<string>;
  /** CloudFront's own names and certificate (ACM in us-east-1); without them, the default *.cloudfront.net name. */
  cdnAliases: string[];
  cdnCertificateArn?: string;
  apiTasks: number;
  handlerTasks: number;
  taskCpu: number;
  taskMemory: number;
  kubernetesVersion: string;
  /** Addresses allowed to reach the cluster's API endpoint (the deploy runners, operators). */
  eksPublicAccessCidrs: string[];
  gpuInstanceType: string;
  gpuNodesMax: number;
  systemInstanceType: string;
  workerMaxReplicas: number;
  /** Jobs waiting per worker before KEDA adds one. */
  workerQueueLength: number;
  workerLeaseSeconds: number;
  kedaVersion: string;
  /** Where the alarms go (an e-mail address confirms its subscription); none: only the topic. */
  alarmEmail?: string;
  /** `owner/name` of the repository whose workflows deploy (GitHub OIDC). */
  githubRepository: string;
  /** An existing GitHub OIDC provider in the account; without it, one is made. */
  githubOidcProviderArn?: string;
  pulumiStateBucket?: string;
  pulumiSecretsKeyAlias?: string;
};

export function program(cfg: ProgramConfig) {
  const f = foundations(cfg);
  const obs = observability(cfg, f);
  const c = compute(cfg, f, obs);
  const k = fleet(cfg, f);
  const e = edge(cfg, f, c);
  obs.alarms(c, k);
  const d = delivery(cfg, f, c, k, e);
  return {
    network: f.network,
    database: f.database,
    messaging: f.messaging,
    buckets: f.buckets,
    identity: f.identity,
    registries: f.registries,
    roles: { ...f.roles, worker: k.workerRole.arn },
    /** One settings map per service, every value from a resource. */
    settings: { ...f.settings, worker: k.workerSettings },
    compute: c.outputs,
    fleet: k.outputs,
    edge: e.outputs,
    observability: obs.outputs,
    /** Everything .github/workflows/deploy.yml reads (docs/runbooks/deploy.md). */
    deploy: {
      region: pulumi.output(cfg.region),
      githubRoleArn: d.deployRole.arn,
      infraRoleArn: d.infraRole.arn,
      infraPreviewRoleArn: d.previewRole.arn,
      ecsCluster: c.cluster.name,
      ecsServices: c.serviceNames,
      migrationTaskFamily: c.migrationTask.family,
      taskSubnetIds: f.network.computeSubnetIds,
      taskSecurityGroupId: f.network.computeSecurityGroupId,
      eksCluster: k.cluster.name,
      workerNamespace: pulumi.output(k.namespace),
      workerDeployment: pulumi.output(k.deploymentName),
      workerContainer: pulumi.output(k.containerName),
      distributionId: e.distribution.id,
      publicUrl: e.publicUrl,
    },
  };
}
