// The whole stack: the foundations and the metrics collector, then what runs on them (ECS for the
// API and the roles, EKS for the GPU fleet, the slide verifier on ECS with the worker's settings,
// CloudFront in front), the alarms on all of it, then what delivery needs. index.ts reads the
// stack's configuration into a ProgramConfig; the tests pass one directly.

import * as pulumi from "@pulumi/pulumi";
import { type ComputeConfig, compute } from "./compute";
import { type DeliveryConfig, delivery } from "./delivery";
import { type EdgeConfig, edge } from "./edge";
import { type FleetConfig, fleet } from "./fleet";
import { type FoundationsConfig, foundations } from "./foundations";
import { observability } from "./observability";
import { telemetry } from "./telemetry";
import { type VerifierConfig, verifier } from "./verifier";

/** Each part's settings (documented where the part reads them), and the few only the program joins. */
export type ProgramConfig = FoundationsConfig &
  ComputeConfig &
  FleetConfig &
  EdgeConfig &
  VerifierConfig &
  DeliveryConfig & {
    /** Where the alarms go (an e-mail address confirms its subscription); none: only the topic. */
    alarmEmail?: string;
    /** How long the witness may not answer the relay before `witness-stale` rings (observability.ts). */
    witnessStaleSeconds?: number;
  };

export function program(cfg: ProgramConfig) {
  const f = foundations(cfg);
  const t = telemetry(cfg, f.parts.logs);
  const c = compute(cfg, f, t);
  const k = fleet(cfg, f, t);
  const v = verifier(cfg, f, c, k);
  const e = edge(cfg, f);
  const obs = observability(cfg, f, t, c, k, v);
  const d = delivery(cfg, f, c, k, e, v);
  return {
    network: f.network,
    database: f.database,
    messaging: f.messaging,
    buckets: f.buckets,
    identity: f.identity,
    registries: f.registries,
    roles: { ...f.roles, worker: k.workerRole.arn, verifier: v.role.arn },
    /** One settings map per service, every value from a resource. */
    settings: { ...f.settings, worker: k.workerSettings },
    compute: { ...c.outputs, verifier: v.outputs },
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
      auditVerifyTaskFamily: c.verify.task.family,
      /** The slide verifier: the worker's image, rolled like the ECS services (its own family). */
      verifierService: v.service.name,
      taskSubnetIds: f.network.computeSubnetIds,
      taskSecurityGroupId: f.network.computeSecurityGroupId,
      eksCluster: k.cluster.name,
      workerNamespace: pulumi.output(k.namespace),
      workerDeployment: pulumi.output(k.deploymentName),
      workerContainer: pulumi.output(k.containerName),
      /** `kubectl rollout status --timeout` for the worker, in seconds (fleet.ts). */
      workerRolloutTimeoutSeconds: pulumi.output(k.workerRolloutTimeoutSeconds),
      /** Where the deploy runners start (ADR 0035): the compute subnets, in this group. */
      runnerSubnetIds: f.network.computeSubnetIds,
      runnerSecurityGroupId: f.network.runnerSecurityGroupId,
      distributionId: e.distribution.id,
      publicUrl: e.publicUrl,
    },
  };
}
