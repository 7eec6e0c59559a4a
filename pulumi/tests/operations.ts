// What issue 20 requires of the compute, fleet, edge and observability parts, as functions over
// the recorded resources that return the problems found (as in checks.ts): each test runs them
// on the program and on a broken copy.

import * as fs from "node:fs";
import * as path from "node:path";
import { ofType, type Recorded } from "./harness";

export const K = {
  deployment: "kubernetes:apps/v1:Deployment",
  scaledObject: "kubernetes:keda.sh/v1alpha1:ScaledObject",
  triggerAuth: "kubernetes:keda.sh/v1alpha1:TriggerAuthentication",
  serviceAccount: "kubernetes:core/v1:ServiceAccount",
  pdb: "kubernetes:policy/v1:PodDisruptionBudget",
  release: "kubernetes:helm.sh/v3:Release",
  service: "aws:ecs/service:Service",
  taskDef: "aws:ecs/taskDefinition:TaskDefinition",
  alarm: "aws:cloudwatch/metricAlarm:MetricAlarm",
  distribution: "aws:cloudfront/distribution:Distribution",
  role: "aws:iam/role:Role",
  listenerRule: "aws:lb/listenerRule:ListenerRule",
  listener: "aws:lb/listener:Listener",
  nodeGroup: "aws:eks/nodeGroup:NodeGroup",
};

/** The Kubernetes objects the program would apply: every `kubernetes:*` resource but Helm releases and providers. */
export function kubernetesObjects(rs: Recorded[]): any[] {
  return rs
    .filter((r) => r.type.startsWith("kubernetes:") && r.type !== K.release)
    .map((r) => ({ ...r.inputs }));
}

const containersOf = (td: Recorded): any[] => JSON.parse(td.inputs.containerDefinitions);
const envOf = (c: any): Record<string, string> => Object.fromEntries((c.env ?? c.environment ?? []).map((e: any) => [e.name, e.value]));

/** KEDA scales the worker on the gpu-jobs queue, from zero, with AWS pod identity, installed as a Helm release. */
export function scalerProblems(rs: Recorded[], gpuJobsUrl: string, maxReplicas: number): string[] {
  const p: string[] = [];
  const sos = ofType(rs, K.scaledObject);
  if (sos.length !== 1) return [`${sos.length} ScaledObjects`];
  const so = sos[0].inputs;
  const dep = ofType(rs, K.deployment)[0]?.inputs;
  if (so.spec.scaleTargetRef?.name !== dep?.metadata?.name) p.push(`scales ${so.spec.scaleTargetRef?.name}, not the worker Deployment`);
  if (so.metadata.namespace !== dep?.metadata?.namespace) p.push("the ScaledObject is not in the worker's namespace");
  if (so.spec.minReplicaCount !== 0) p.push(`minReplicaCount ${so.spec.minReplicaCount}`);
  if (so.spec.maxReplicaCount !== maxReplicas) p.push(`maxReplicaCount ${so.spec.maxReplicaCount}, config says ${maxReplicas}`);
  const triggers = so.spec.triggers ?? [];
  const sqs = triggers.filter((t: any) => t.type === "aws-sqs-queue");
  if (sqs.length !== 1 || triggers.length !== 1) p.push(`triggers: ${triggers.map((t: any) => t.type)}`);
  for (const t of sqs) {
    if (t.metadata.queueURL !== gpuJobsUrl) p.push(`queueURL ${t.metadata.queueURL} is not the gpu-jobs queue ${gpuJobsUrl}`);
    const auth = ofType(rs, K.triggerAuth).find((a) => a.inputs.metadata.name === t.authenticationRef?.name);
    if (!auth) p.push(`no TriggerAuthentication ${t.authenticationRef?.name}`);
    else if (auth.inputs.spec?.podIdentity?.provider !== "aws") p.push(`podIdentity ${JSON.stringify(auth.inputs.spec?.podIdentity)}`);
    if ("identityOwner" in t.metadata) p.push("the deprecated identityOwner metadata");
  }
  const keda = ofType(rs, K.release).find((r) => r.inputs.chart === "keda");
  if (!keda) p.push("KEDA is not installed as a helm.v3.Release");
  else if (!/^\d+\.\d+\.\d+$/.test(keda.inputs.version ?? "")) p.push(`KEDA's chart version is not pinned: ${keda.inputs.version}`);
  return p;
}

/** The worker: a GPU each, its own service account bound to the worker role (IRSA), a grace period longer than the lease, a PDB. */
export function workerProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const dep = ofType(rs, K.deployment)[0];
  if (!dep) return ["no worker Deployment"];
  const spec = dep.inputs.spec.template.spec;
  const worker = spec.containers[0];
  const lease = Number(envOf(worker).Worker__LeaseSeconds);
  if (!(lease > 0)) p.push("the worker's Worker__LeaseSeconds is not set");
  if (!(spec.terminationGracePeriodSeconds > lease)) p.push(`terminationGracePeriodSeconds ${spec.terminationGracePeriodSeconds} is not longer than the lease ${lease}`);
  if (worker.resources?.limits?.["nvidia.com/gpu"] !== "1") p.push(`nvidia.com/gpu limit ${worker.resources?.limits?.["nvidia.com/gpu"]}`);
  if (!(spec.tolerations ?? []).some((t: any) => t.key === "nvidia.com/gpu")) p.push("no toleration for the GPU nodes' taint");
  const gpuGroup = ofType(rs, K.nodeGroup).find((g) => g.inputs.amiType?.includes("NVIDIA"));
  if (!gpuGroup) p.push("no node group with an NVIDIA AMI");
  else {
    if (!(gpuGroup.inputs.taints ?? []).some((t: any) => t.key === "nvidia.com/gpu")) p.push("the GPU node group has no taint");
    if (gpuGroup.inputs.scalingConfig.minSize !== 0) p.push("the GPU node group does not scale to zero");
  }
  const sa = ofType(rs, K.serviceAccount).find((x) => x.inputs.metadata.name === spec.serviceAccountName);
  const role = ofType(rs, K.role).find((r) => r.name === "worker");
  if (!sa) p.push(`no service account ${spec.serviceAccountName}`);
  else if (!role) p.push("no worker role");
  else {
    if (sa.inputs.metadata.annotations?.["eks.amazonaws.com/role-arn"] !== role.state.arn) p.push("the service account is not bound to the worker role");
    const trust = JSON.parse(role.inputs.assumeRolePolicy).Statement[0];
    const sub = Object.entries(trust.Condition?.StringEquals ?? {}).find(([k]) => k.endsWith(":sub"))?.[1];
    const want = `system:serviceaccount:${sa.inputs.metadata.namespace}:${sa.inputs.metadata.name}`;
    if (trust.Action !== "sts:AssumeRoleWithWebIdentity" || sub !== want) p.push(`the worker role trusts ${sub ?? JSON.stringify(trust.Principal)}, not ${want}`);
  }
  const pdb = ofType(rs, K.pdb).find((x) => JSON.stringify(x.inputs.spec.selector.matchLabels) === JSON.stringify(dep.inputs.spec.selector.matchLabels));
  if (!pdb) p.push("no PodDisruptionBudget selects the worker");
  return p;
}

/** Exactly one relay task, never two during a deploy; only the relay service runs the relay role. */
export function relayProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const byArn = new Map(ofType(rs, K.taskDef).map((td) => [td.state.arn, td]));
  const withRelay = ofType(rs, K.service).filter((svc) => {
    const td = byArn.get(svc.inputs.taskDefinition);
    const roles = td ? envOf(containersOf(td).find((c) => c.name === "mira")).Roles__Enabled ?? "" : "";
    return roles.split(",").map((x) => x.trim()).includes("relay");
  });
  if (withRelay.length !== 1) p.push(`${withRelay.length} services run the relay: ${withRelay.map((x) => x.name)}`);
  for (const svc of withRelay) {
    if (svc.inputs.desiredCount !== 1) p.push(`the relay service wants ${svc.inputs.desiredCount} tasks`);
    if (svc.inputs.deploymentMaximumPercent !== 100) p.push(`the relay's deploys may run ${svc.inputs.deploymentMaximumPercent}% of its tasks at once`);
  }
  return p;
}

/** The metric names Mira's /metrics serves (gateway/src/api/metrics.rs). */
export function exportedMetrics(): string[] {
  const src = fs.readFileSync(path.resolve(__dirname, "../../../gateway/src/api/metrics.rs"), "utf8");
  return [...new Set([...src.matchAll(/"(mira_[a-z_]+)"/g)].map((m) => m[1]))].sort();
}

/** (namespace, metric) pairs the ADOT collector's config writes to CloudWatch from `exported`. */
export function adotProduces(config: any, exported: string[]): Set<string> {
  const out = new Set<string>();
  const pipelines = Object.values(config.service?.pipelines ?? {}) as any[];
  const scrapesMira = (config.receivers?.prometheus?.config?.scrape_configs ?? []).some(
    (s: any) => s.metrics_path === "/metrics" && s.static_configs?.some((c: any) => c.targets?.some((t: string) => t.endsWith(":8080"))),
  );
  const wired = pipelines.some((pl) => pl.receivers?.includes("prometheus") && pl.exporters?.includes("awsemf"));
  const emf = config.exporters?.awsemf;
  if (!scrapesMira || !wired || !emf) return out;
  for (const decl of emf.metric_declarations ?? []) {
    for (const sel of decl.metric_name_selectors ?? []) {
      for (const m of exported) if (new RegExp(sel).test(m)) out.add(`${emf.namespace}/${m}`);
    }
  }
  return out;
}

/** The collector configurations in the task definitions (AOT_CONFIG_CONTENT of each `adot` container). */
export function adotConfigs(rs: Recorded[]): any[] {
  return ofType(rs, K.taskDef)
    .flatMap(containersOf)
    .filter((c) => c.name === "adot")
    .map((c) => JSON.parse(envOf(c).AOT_CONFIG_CONTENT));
}

/** Every alarm on a metric of Mira's own is one the collector produces; the required alarms exist. */
export function alarmProblems(rs: Recorded[], exported: string[]): string[] {
  const p: string[] = [];
  const configs = adotConfigs(rs);
  if (configs.length === 0) return ["no ADOT collector in any task"];
  const produced = new Set(configs.flatMap((c) => [...adotProduces(c, exported)]));
  const alarms = ofType(rs, K.alarm);
  const metricsOf = (a: Recorded) =>
    a.inputs.metricName
      ? [{ namespace: a.inputs.namespace, metricName: a.inputs.metricName, dims: a.inputs.dimensions ?? {} }]
      : (a.inputs.metricQueries ?? []).filter((q: any) => q.metric).map((q: any) => ({ ...q.metric, dims: q.metric.dimensions ?? {} }));
  for (const a of alarms) {
    for (const m of metricsOf(a)) {
      if (m.namespace.startsWith("AWS/")) continue;
      if (!produced.has(`${m.namespace}/${m.metricName}`)) p.push(`alarm ${a.name}: ${m.namespace}/${m.metricName} is produced by no ADOT configuration`);
    }
  }
  const all = alarms.flatMap(metricsOf);
  const has = (metricName: string, pred: (m: any) => boolean = () => true) => all.some((m: any) => m.metricName === metricName && pred(m));
  for (const m of ["mira_projection_lag_seconds", "mira_log_watermark_lag_seconds"]) if (!has(m)) p.push(`no alarm on ${m}`);
  const dlqs = ofType(rs, "aws:sqs/queue:Queue").filter((q) => String(q.inputs.name).includes("-dlq"));
  const queues = ofType(rs, "aws:sqs/queue:Queue").filter((q) => !String(q.inputs.name).includes("-dlq"));
  for (const q of dlqs) if (!has("ApproximateNumberOfMessagesVisible", (m) => m.dims.QueueName === q.state.name)) p.push(`no alarm on ${q.inputs.name} not being empty`);
  for (const q of queues) if (!has("ApproximateAgeOfOldestMessage", (m) => m.dims.QueueName === q.state.name)) p.push(`no alarm on ${q.inputs.name}'s oldest message`);
  if (!has("HTTPCode_Target_5XX_Count") || !has("RequestCount")) p.push("no alarm on the ALB's 5xx rate");
  if (ofType(rs, "aws:cloudwatch/dashboard:Dashboard").length !== 1) p.push("no dashboard");
  return p;
}

/** CloudFront: `/api/*` and `/ws` to the ALB uncached, everything else from the frontend bucket through OAC. */
export function cdnProblems(rs: Recorded[], albDomain: string): string[] {
  const p: string[] = [];
  const d = ofType(rs, K.distribution)[0]?.inputs;
  if (!d) return ["no distribution"];
  const origin = (id: string) => d.origins.find((o: any) => o.originId === id);
  const frontend = ofType(rs, "aws:s3/bucket:Bucket").find((b) => b.name === "frontend");
  const def = origin(d.defaultCacheBehavior.targetOriginId);
  if (def?.domainName !== frontend?.state.bucketRegionalDomainName) p.push(`the default behaviour goes to ${def?.domainName}, not the frontend bucket`);
  if (!def?.originAccessControlId) p.push("the bucket origin has no origin access control");
  const behaviours = d.orderedCacheBehaviors ?? [];
  for (const path of ["/api/*", "/ws"]) {
    const b = behaviours.find((x: any) => x.pathPattern === path);
    if (!b) {
      p.push(`no behaviour for ${path}`);
      continue;
    }
    const o = origin(b.targetOriginId);
    if (o?.domainName !== albDomain || o?.customOriginConfig?.originProtocolPolicy !== "https-only") p.push(`${path} goes to ${o?.domainName}, not the ALB over HTTPS`);
    if (b.cachePolicyId !== "4135ea2d-6df8-44a3-9df3-4b5a84be39ad") p.push(`${path} is cached`);
    if (!b.allowedMethods.includes("POST")) p.push(`${path} refuses POST`);
    if (!b.originRequestPolicyId) p.push(`${path} forwards no viewer headers (WebSocket upgrade)`);
  }
  if (!d.defaultCacheBehavior.responseHeadersPolicyId) p.push("no security headers");
  // The ALB answers only what CloudFront sends it.
  const rule = ofType(rs, K.listenerRule)[0]?.inputs;
  const paths = rule?.conditions?.find((c: any) => c.pathPattern)?.pathPattern.values ?? [];
  if (JSON.stringify([...paths].sort()) !== JSON.stringify(["/api/*", "/ws"])) p.push(`the ALB forwards ${paths}`);
  if (!rule?.conditions?.some((c: any) => c.httpHeader)) p.push("the ALB forwards without CloudFront's header");
  const listener = ofType(rs, K.listener)[0]?.inputs;
  if (listener?.protocol !== "HTTPS" || !listener?.certificateArn) p.push("the ALB listener is not HTTPS with a certificate");
  return p;
}
