// What issue 20 requires of the compute, fleet, edge and observability parts, as functions over
// the recorded resources that return the problems found (as in checks.ts): each test runs them
// on the program and on a broken copy.

import * as fs from "node:fs";
import * as path from "node:path";
import { VERIFY_LOGIN } from "../src/compute";
import { ingressRules } from "./checks";
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
  schedule: "aws:scheduler/schedule:Schedule",
  metricFilter: "aws:cloudwatch/logMetricFilter:LogMetricFilter",
  rolePolicy: "aws:iam/rolePolicy:RolePolicy",
  topic: "aws:sns/topic:Topic",
  bucket: "aws:s3/bucket:Bucket",
  sg: "aws:ec2/securityGroup:SecurityGroup",
  sgRule: "aws:ec2/securityGroupRule:SecurityGroupRule",
  sgIngress: "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
  sgEgress: "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule",
  daemonSet: "kubernetes:apps/v1:DaemonSet",
  addon: "aws:eks/addon:Addon",
  eksCluster: "aws:eks/cluster:Cluster",
  ecsCluster: "aws:ecs/cluster:Cluster",
  rdsEvents: "aws:rds/eventSubscription:EventSubscription",
  db: "aws:rds/instance:Instance",
  targetGroup: "aws:lb/targetGroup:TargetGroup",
  subnet: "aws:ec2/subnet:Subnet",
  secret: "aws:secretsmanager/secret:Secret",
  repo: "aws:ecr/repository:Repository",
  cluster: "aws:ecs/cluster:Cluster",
  queue: "aws:sqs/queue:Queue",
  subscription: "aws:sns/topicSubscription:TopicSubscription",
  scalingTarget: "aws:appautoscaling/target:Target",
  scalingPolicy: "aws:appautoscaling/policy:Policy",
  dashboard: "aws:cloudwatch/dashboard:Dashboard",
};

/** The Kubernetes objects the program would apply: every `kubernetes:*` resource but Helm releases and providers. */
export function kubernetesObjects(rs: Recorded[]): any[] {
  return rs
    .filter((r) => r.type.startsWith("kubernetes:") && r.type !== K.release)
    .map((r) => ({ ...r.inputs }));
}

export const containersOf = (td: Recorded): any[] => JSON.parse(td.inputs.containerDefinitions);
export const envOf = (c: any): Record<string, string> => Object.fromEntries((c.env ?? c.environment ?? []).map((e: any) => [e.name, e.value]));

/**
 * KEDA scales the worker on the GPU queues (`queueUrls`, by group: gpu-jobs and gpu-jobs-stat),
 * from zero, with AWS pod identity, installed as a Helm release: one aws-sqs-queue trigger per
 * queue, each with `queueLength` and the jobs in flight counted, and the replica count from
 * the sum of every trigger, the queues' and the aws-cloudwatch ones (waitingScalerProblems)
 * (advanced.scalingModifiers: the formula adds every trigger, by names KEDA can tell apart,
 * against a target of `queueLength`), not from the largest of them.
 */
export function scalerProblems(rs: Recorded[], queueUrls: Record<string, string>, maxReplicas: number, queueLength: number): string[] {
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
  const want = Object.entries(queueUrls);
  const known = triggers.every((t: any) => t.type === "aws-sqs-queue" || t.type === "aws-cloudwatch");
  if (sqs.length !== want.length || !known) p.push(`triggers: ${triggers.map((t: any) => t.type)}`);
  for (const [group, url] of want) {
    const n = sqs.filter((t: any) => t.metadata.queueURL === url).length;
    if (n !== 1) p.push(`${n} triggers on the ${group} queue ${url}`);
  }
  const urls = new Set(Object.values(queueUrls));
  for (const t of sqs) {
    if (!urls.has(t.metadata.queueURL)) p.push(`queueURL ${t.metadata.queueURL} is not one of the ${Object.keys(queueUrls).join(", ")} queues`);
    if (t.metadata.queueLength !== String(queueLength)) p.push(`trigger ${t.name}: queueLength ${t.metadata.queueLength}, config says ${queueLength}`);
    if (t.metadata.scaleOnInFlight !== "true") p.push(`trigger ${t.name}: the jobs in flight do not count`);
    if ("identityOwner" in t.metadata) p.push("the deprecated identityOwner metadata");
  }
  for (const ref of new Set<string | undefined>(triggers.map((t: any) => t.authenticationRef?.name))) {
    const auth = ofType(rs, K.triggerAuth).find((a) => a.inputs.metadata.name === ref);
    if (!auth) p.push(`no TriggerAuthentication ${ref}`);
    else if (auth.inputs.spec?.podIdentity?.provider !== "aws") p.push(`podIdentity ${JSON.stringify(auth.inputs.spec?.podIdentity)}`);
  }
  if (triggers.length > 1) {
    // KEDA pairs a metric with its trigger by name prefix (pkg/scaling/modifiers), so no name
    // may begin another.
    const names: string[] = triggers.map((t: any) => t.name ?? "");
    for (const a of names) {
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(a)) p.push(`trigger name ${JSON.stringify(a)} is no identifier a formula can read`);
      for (const b of names) if (a !== b && b.startsWith(a)) p.push(`trigger name ${a} begins ${b}: KEDA would pair their metrics wrongly`);
    }
    const sm = so.spec.advanced?.scalingModifiers;
    if (!sm) p.push("no scalingModifiers: KEDA scales on the larger of the triggers, not their sum");
    else {
      const terms = String(sm.formula).split("+").map((x) => x.trim());
      if (JSON.stringify([...terms].sort()) !== JSON.stringify([...names].sort())) p.push(`formula ${sm.formula} is not the sum of the triggers ${names.join(", ")}`);
      if (sm.target !== String(queueLength)) p.push(`scalingModifiers target ${sm.target}, config says ${queueLength}`);
      if ((sm.metricType ?? "AverageValue") !== "AverageValue") p.push(`scalingModifiers metricType ${sm.metricType}: not per worker`);
      if (sm.activationTarget !== undefined && sm.activationTarget !== "0") p.push(`scalingModifiers activationTarget ${sm.activationTarget}: a single job would not wake the fleet`);
    }
  }
  const keda = ofType(rs, K.release).find((r) => r.inputs.chart === "keda");
  if (!keda) p.push("KEDA is not installed as a helm.v3.Release");
  else if (!/^\d+\.\d+\.\d+$/.test(keda.inputs.version ?? "")) p.push(`KEDA's chart version is not pinned: ${keda.inputs.version}`);
  return p;
}

/** Mira's gauge of the jobs waiting for admission (gateway/src/api/metrics.rs), by label `priority`. */
export const WAITING = { metric: "mira_jobs_waiting_admission", priorities: ["routine", "stat"] };

/** Whether KEDA's aws-cloudwatch scaler takes this period (1, 5, 10, 30, or a multiple of 60 seconds). */
const validPeriod = (n: number) => [1, 5, 10, 30].includes(n) || (n > 0 && n % 60 === 0);

/**
 * KEDA counts the jobs waiting for admission beside the queues: the collectors write Mira's
 * gauge to CloudWatch with its `priority` dimension; the ScaledObject has one aws-cloudwatch
 * trigger per priority on that namespace, metric and dimension, with a statistic that does not
 * add up the tasks' identical datapoints (Maximum or Average), `queueLength` as its target, 0
 * when CloudWatch answers nothing, and a period and window KEDA takes (the formula that adds
 * them is scalerProblems'); every aws-cloudwatch trigger reads a metric the collectors write,
 * with the dimensions they write it with; KEDA's role may GetMetricData (on `*`: no metric has
 * an ARN) and nothing else of CloudWatch.
 */
export function waitingScalerProblems(rs: Recorded[], exported: string[], queueLength: number): string[] {
  const p: string[] = [];
  if (!exported.includes(WAITING.metric)) p.push(`Mira's /metrics does not serve ${WAITING.metric}`);
  const configs = adotConfigs(rs);
  if (configs.length === 0) return [...p, "no ADOT collector in any task"];
  const dims = new Map<string, string[][]>();
  for (const c of configs) for (const [k, v] of adotDimensions(c, exported)) dims.set(k, [...(dims.get(k) ?? []), ...v]);
  const namespace = configs[0].exporters?.awsemf?.namespace;
  for (const c of configs) {
    const sets = adotDimensions(c, exported).get(`${namespace}/${WAITING.metric}`);
    if (!sets) p.push(`a collector does not write ${WAITING.metric}`);
    else if (!sets.some((set) => set.length === 1 && set[0] === "priority")) p.push(`a collector writes ${WAITING.metric} with dimensions ${JSON.stringify(sets)}, not [priority]`);
  }
  const triggers: any[] = ofType(rs, K.scaledObject).flatMap((so) => so.inputs.spec.triggers ?? []);
  const cw = triggers.filter((t) => t.type === "aws-cloudwatch");
  for (const t of cw) {
    const m = t.metadata ?? {};
    const key = `${m.namespace}/${m.metricName}`;
    const names = String(m.dimensionName ?? "").split(";").filter((x) => x).sort().join(",");
    if (!dims.has(key)) p.push(`trigger ${t.name}: ${key} is written by no collector`);
    else if (!dims.get(key)!.some((set) => [...set].sort().join(",") === names)) p.push(`trigger ${t.name}: ${key} with dimensions [${names}] is not what the collectors write`);
  }
  for (const priority of WAITING.priorities) {
    const on = cw.filter((t) => t.metadata?.namespace === namespace && t.metadata?.metricName === WAITING.metric && t.metadata?.dimensionName === "priority" && t.metadata?.dimensionValue === priority);
    if (on.length !== 1) {
      p.push(`${on.length} triggers on ${namespace}/${WAITING.metric} priority=${priority}`);
      continue;
    }
    const t = on[0];
    const m = t.metadata;
    if (!["Maximum", "Average"].includes(m.metricStat)) p.push(`trigger ${t.name}: metricStat ${m.metricStat} adds up every task's datapoints (Maximum or Average reads the count)`);
    if (m.targetMetricValue !== String(queueLength)) p.push(`trigger ${t.name}: targetMetricValue ${m.targetMetricValue}, config says ${queueLength}`);
    if (m.minMetricValue !== "0") p.push(`trigger ${t.name}: minMetricValue ${m.minMetricValue}: no datapoint would read as jobs waiting`);
    const period = Number(m.metricStatPeriod ?? 300);
    const window = Number(m.metricCollectionTime ?? 300);
    if (!validPeriod(period)) p.push(`trigger ${t.name}: metricStatPeriod ${m.metricStatPeriod}, which KEDA refuses`);
    else if (period > 60) p.push(`trigger ${t.name}: metricStatPeriod ${period}: a backlog seen ${period / 60} minutes late`);
    else if (!(window >= period && window % period === 0)) p.push(`trigger ${t.name}: metricCollectionTime ${m.metricCollectionTime} is not a multiple of the period ${period}`);
  }
  const keda = policyOf(rs, ofType(rs, K.role).find((r) => r.name === "keda-operator"));
  if (cw.length > 0 && !allows(keda, "cloudwatch:GetMetricData", "*")) p.push("KEDA cannot cloudwatch:GetMetricData");
  for (const s of keda.filter((x) => x.Effect === "Allow")) {
    for (const a of list(s.Action)) if (/^cloudwatch:/.test(a) && a !== "cloudwatch:GetMetricData") p.push(`KEDA may ${a}`);
  }
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

/**
 * The metric names Mira's /metrics serves (gateway/src/api/metrics.rs): the gauges' names as
 * string literals, and the names its own `# TYPE` lines declare (the witness's, the requests').
 */
export function exportedMetrics(): string[] {
  const src = fs.readFileSync(path.resolve(__dirname, "../../../gateway/src/api/metrics.rs"), "utf8");
  const literal = [...src.matchAll(/"(mira_[a-z_]+)"/g)].map((m) => m[1]);
  const typed = [...src.matchAll(/# TYPE (mira_[a-z_]+) (?:counter|gauge)/g)].map((m) => m[1]);
  return [...new Set([...literal, ...typed])].sort();
}

/**
 * Where Mira serves /metrics in its task (`Api__MetricsListen`), and where the collector
 * scrapes it: loopback, a port of its own. Written out here, not imported from the program, so
 * that a change of either side shows.
 */
export const METRICS_LISTEN = "127.0.0.1:9464";
export const METRICS_PORT = 9464;

/** The collector's scrape configs that read Mira's /metrics, and their targets. */
export const miraScrapes = (config: any): { job: string; targets: string[] }[] =>
  (config.receivers?.prometheus?.config?.scrape_configs ?? [])
    .filter((s: any) => (s.metrics_path ?? "/metrics") === "/metrics")
    .map((s: any) => ({ job: s.job_name, targets: (s.static_configs ?? []).flatMap((c: any) => c.targets ?? []) }));

/** (namespace, metric) pairs the ADOT collector's config writes to CloudWatch from `exported`. */
export function adotProduces(config: any, exported: string[]): Set<string> {
  const out = new Set<string>();
  const pipelines = Object.values(config.service?.pipelines ?? {}) as any[];
  const scrapesMira = miraScrapes(config).some((s) => s.targets.includes(METRICS_LISTEN));
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

/** For each (namespace, metric) the collector writes from `exported`: the dimension sets it publishes it with. */
export function adotDimensions(config: any, exported: string[]): Map<string, string[][]> {
  const out = new Map<string, string[][]>();
  if (adotProduces(config, exported).size === 0) return out;
  const emf = config.exporters.awsemf;
  for (const decl of emf.metric_declarations ?? []) {
    for (const sel of decl.metric_name_selectors ?? []) {
      for (const m of exported) {
        if (!new RegExp(sel).test(m)) continue;
        const key = `${emf.namespace}/${m}`;
        out.set(key, [...(out.get(key) ?? []), ...(decl.dimensions ?? [[]])]);
      }
    }
  }
  return out;
}

/** The collector configurations in the task definitions (AOT_CONFIG_CONTENT of each `adot` container). */
export function adotConfigs(rs: Recorded[], taskDefs: Recorded[] = ofType(rs, K.taskDef)): any[] {
  return taskDefs
    .flatMap(containersOf)
    .filter((c) => c.name === "adot")
    .map((c) => JSON.parse(envOf(c).AOT_CONFIG_CONTENT));
}

/** Whether a security group rule's protocol and port range admit TCP `port`. */
const admitsPort = (r: any, port: number) => {
  const proto = String(r.protocol ?? r.ipProtocol ?? "").toLowerCase();
  if (proto === "-1" || proto === "all") return true;
  if (proto !== "tcp" && proto !== "6") return false;
  return Number(r.fromPort) <= port && port <= Number(r.toPort);
};

/**
 * /metrics only on the task's loopback: every collector scrapes exactly METRICS_LISTEN at
 * /metrics (not the API's port); every `mira` container in a task with a collector sets
 * `Api__MetricsListen` to it (so that /metrics answers 404 on the API's port) and maps no
 * container port to it; no security group ingress rule, load balancer, target group, health
 * check or service's load-balancer mapping opens the metrics port or /metrics.
 */
export function metricsListenProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const scraped = ofType(rs, K.taskDef).filter((td) => containersOf(td).some((c) => c.name === "adot"));
  if (scraped.length === 0) p.push("no task definition has a collector");
  for (const td of scraped) {
    const family = td.inputs.family;
    const containers = containersOf(td);
    if (td.inputs.networkMode !== "awsvpc") p.push(`${family}: network mode ${td.inputs.networkMode}, the collector does not share Mira's loopback`);
    for (const c of containers.filter((x) => x.name === "adot")) {
      const scrapes = miraScrapes(JSON.parse(envOf(c).AOT_CONFIG_CONTENT));
      if (scrapes.length === 0) p.push(`${family}: the collector scrapes no /metrics`);
      for (const s of scrapes) {
        if (JSON.stringify(s.targets) !== JSON.stringify([METRICS_LISTEN])) p.push(`${family}: the collector's job ${s.job} scrapes ${s.targets.join(",")}, not ${METRICS_LISTEN}`);
      }
    }
    const miras = containers.filter((x) => x.name === "mira");
    if (miras.length === 0) p.push(`${family}: a collector and no mira container`);
    for (const m of miras) {
      const listen = envOf(m).Api__MetricsListen;
      if (listen !== METRICS_LISTEN) p.push(`${family}: Api__MetricsListen is ${listen ?? "not set"}, not ${METRICS_LISTEN}`);
    }
    for (const c of containers) {
      for (const pm of c.portMappings ?? []) {
        if (pm.containerPort === METRICS_PORT || pm.hostPort === METRICS_PORT) p.push(`${family}: container ${c.name} maps port ${METRICS_PORT}`);
      }
    }
  }
  for (const g of ofType(rs, K.sg)) {
    for (const r of g.inputs.ingress ?? []) if (admitsPort(r, METRICS_PORT)) p.push(`security group ${g.name}: ingress ${r.protocol} ${r.fromPort}-${r.toPort} admits ${METRICS_PORT}`);
  }
  for (const r of ofType(rs, K.sgRule)) {
    if (r.inputs.type === "ingress" && admitsPort(r.inputs, METRICS_PORT)) p.push(`security group rule ${r.name}: ingress ${r.inputs.protocol} ${r.inputs.fromPort}-${r.inputs.toPort} admits ${METRICS_PORT}`);
  }
  for (const r of ofType(rs, K.sgIngress)) {
    if (admitsPort(r.inputs, METRICS_PORT)) p.push(`ingress rule ${r.name}: ${r.inputs.ipProtocol} ${r.inputs.fromPort}-${r.inputs.toPort} admits ${METRICS_PORT}`);
  }
  for (const l of ofType(rs, K.listener)) if (Number(l.inputs.port) === METRICS_PORT) p.push(`listener ${l.name} on ${METRICS_PORT}`);
  for (const t of ofType(rs, K.targetGroup)) {
    const hc = t.inputs.healthCheck ?? {};
    if (Number(t.inputs.port) === METRICS_PORT || String(hc.port) === String(METRICS_PORT)) p.push(`target group ${t.name} on ${METRICS_PORT}`);
    if (String(hc.path ?? "").startsWith("/metrics")) p.push(`target group ${t.name}: health check on ${hc.path}`);
  }
  for (const svc of ofType(rs, K.service)) {
    for (const lb of svc.inputs.loadBalancers ?? []) if (lb.containerPort === METRICS_PORT) p.push(`service ${svc.name}: the load balancer reaches port ${METRICS_PORT}`);
  }
  for (const rule of ofType(rs, K.listenerRule)) {
    const paths = (rule.inputs.conditions ?? []).flatMap((c: any) => c.pathPattern?.values ?? []);
    if (paths.some((x: string) => x === "*" || x === "/*" || x.startsWith("/metrics"))) p.push(`listener rule ${rule.name} forwards ${paths.join(",")}`);
  }
  return p;
}

/** The groups the database's security groups admit, by any rule (inline or standalone). */
export function databaseAdmits(rs: Recorded[]): string[] {
  const groups: string[] = ofType(rs, K.db)[0]?.inputs.vpcSecurityGroupIds ?? [];
  return ingressRules(rs)
    .filter((r) => groups.includes(r.group))
    .flatMap((r) => r.groups);
}

/**
 * The CloudWatch namespaces AWS itself writes for what the program makes, and whether it does:
 * `AWS/*` always; `ECS/ContainerInsights` for an ECS cluster with Container Insights on;
 * `ContainerInsights` for an EKS cluster with the CloudWatch Observability add-on. Returns why
 * not, or nothing.
 */
function awsPublishes(rs: Recorded[], namespace: string, dims: Record<string, string>): string | undefined {
  if (namespace.startsWith("AWS/")) return undefined;
  if (namespace === "ECS/ContainerInsights") {
    const c = ofType(rs, K.ecsCluster).find((x) => x.state.name === dims.ClusterName);
    if (!c) return `ECS/ContainerInsights: ${dims.ClusterName} is no ECS cluster of the program`;
    const on = (c.inputs.settings ?? []).some((x: any) => x.name === "containerInsights" && ["enabled", "enhanced"].includes(x.value));
    return on ? undefined : `ECS/ContainerInsights: the cluster ${dims.ClusterName} has Container Insights off`;
  }
  if (namespace === "ContainerInsights") {
    const c = ofType(rs, K.eksCluster).find((x) => x.state.name === dims.ClusterName);
    if (!c) return `ContainerInsights: ${dims.ClusterName} is no EKS cluster of the program`;
    const addon = ofType(rs, K.addon).some((a) => a.inputs.addonName === "amazon-cloudwatch-observability" && a.inputs.clusterName === c.state.name);
    return addon ? undefined : `ContainerInsights: the cluster ${dims.ClusterName} has no amazon-cloudwatch-observability add-on`;
  }
  return `${namespace} is written by no collector or AWS service here`;
}

/** (namespace, metric) pairs the log metric filters write to CloudWatch. */
export function filterProduces(rs: Recorded[]): Set<string> {
  return new Set(ofType(rs, K.metricFilter).map((f) => `${f.inputs.metricTransformation.namespace}/${f.inputs.metricTransformation.name}`));
}

/** The metrics an alarm reads: its own, or those of its metric queries (each with its dimensions). */
export const metricsOf = (a: Recorded): { id?: string; namespace: string; metricName: string; dims: Record<string, string>; stat?: string }[] =>
  a.inputs.metricName
    ? [{ namespace: a.inputs.namespace, metricName: a.inputs.metricName, dims: a.inputs.dimensions ?? {}, stat: a.inputs.statistic }]
    : (a.inputs.metricQueries ?? []).filter((q: any) => q.metric).map((q: any) => ({ id: q.id, ...q.metric, dims: q.metric.dimensions ?? {} }));

/** Every alarm on a metric of Mira's own is one the collector produces; the required alarms exist. */
export function alarmProblems(rs: Recorded[], exported: string[]): string[] {
  const p: string[] = [];
  const configs = adotConfigs(rs);
  if (configs.length === 0) return ["no ADOT collector in any task"];
  const produced = new Set(configs.flatMap((c) => [...adotProduces(c, exported)]));
  const fromLogs = filterProduces(rs);
  const dimensions = new Map<string, string[][]>();
  for (const c of configs) for (const [k, v] of adotDimensions(c, exported)) dimensions.set(k, [...(dimensions.get(k) ?? []), ...v]);
  const alarms = ofType(rs, K.alarm);
  const ours = configs[0]?.exporters?.awsemf?.namespace;
  for (const a of alarms) {
    for (const m of metricsOf(a)) {
      const key = `${m.namespace}/${m.metricName}`;
      if (fromLogs.has(key)) continue;
      if (m.namespace !== ours) {
        const why = awsPublishes(rs, m.namespace, m.dims);
        if (why) p.push(`alarm ${a.name}: ${why}`);
        continue;
      }
      if (!produced.has(key)) {
        p.push(`alarm ${a.name}: ${key} is produced by no ADOT configuration`);
        continue;
      }
      // CloudWatch matches a metric by its dimensions, all of them: an alarm naming others
      // than the collector publishes watches a metric nobody writes.
      const want = Object.keys(m.dims).sort().join(",");
      if (!(dimensions.get(key) ?? []).some((set) => [...set].sort().join(",") === want)) {
        p.push(`alarm ${a.name}: ${key} with dimensions [${want}] is not what the collector publishes`);
      }
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

/** The names of the witness's metrics on the relay's /metrics (gateway/src/api/metrics.rs). */
export const WITNESS_METRICS = { conflicts: "mira_witness_conflicts_total", lastSuccess: "mira_witness_last_success_timestamp_seconds" };

export const alarmTopicArn = (rs: Recorded[]) => ofType(rs, K.topic).find((t) => t.name === "alarms")?.state.arn;

/**
 * The witness's alarms: the relay's collector writes both witness metrics (without dimensions,
 * as the alarms read them); `witness-conflict` rings on any datapoint above 0, `witness-stale`
 * on the age `EPOCH(m) - m` of the last success above `staleSeconds`, no data breaching; both
 * into the alarm topic.
 */
export function witnessAlarmProblems(rs: Recorded[], exported: string[], staleSeconds: number): string[] {
  const p: string[] = [];
  for (const m of Object.values(WITNESS_METRICS)) if (!exported.includes(m)) p.push(`Mira's /metrics does not serve ${m}`);
  const relay = ofType(rs, K.taskDef).filter((td) => envOf(containersOf(td).find((c) => c.name === "mira") ?? {}).Roles__Enabled === "relay");
  const configs = adotConfigs(rs, relay);
  if (configs.length === 0) return [...p, "no collector beside the relay"];
  const namespace = configs[0].exporters?.awsemf?.namespace;
  const dims = new Map<string, string[][]>();
  for (const c of configs) for (const [k, v] of adotDimensions(c, exported)) dims.set(k, v);
  for (const m of Object.values(WITNESS_METRICS)) {
    const sets = dims.get(`${namespace}/${m}`);
    if (!sets) p.push(`the relay's collector does not write ${m}`);
    else if (!sets.some((s) => s.length === 0)) p.push(`the relay's collector writes ${m} only with dimensions ${JSON.stringify(sets)}`);
  }
  if (configs.some((c) => c.exporters?.awsemf?.retain_initial_value_of_delta_metric !== true)) {
    p.push("the collector drops a counter's first value: a conflict before its first scrape would not count");
  }
  const alarms = ofType(rs, K.alarm);
  const topic = alarmTopicArn(rs);
  const reads = (a: Recorded, metric: string) => metricsOf(a).filter((m) => m.metricName === metric && m.namespace === namespace);

  const conflict = alarms.find((a) => reads(a, WITNESS_METRICS.conflicts).length > 0);
  if (!conflict) p.push(`no alarm on ${WITNESS_METRICS.conflicts}`);
  else {
    const a = conflict.inputs;
    const m = reads(conflict, WITNESS_METRICS.conflicts)[0];
    if (Object.keys(m.dims).length) p.push(`alarm ${conflict.name}: dimensions ${JSON.stringify(m.dims)}`);
    if (a.comparisonOperator !== "GreaterThanThreshold" || a.threshold !== 0) p.push(`alarm ${conflict.name}: not on any value above 0 (${a.comparisonOperator} ${a.threshold})`);
    if (!["Maximum", "Sum"].includes(a.statistic)) p.push(`alarm ${conflict.name}: statistic ${a.statistic} can hide one conflict`);
    if ((a.datapointsToAlarm ?? a.evaluationPeriods) !== 1) p.push(`alarm ${conflict.name}: needs ${a.datapointsToAlarm ?? a.evaluationPeriods} datapoints, not any one`);
    if (a.treatMissingData === "breaching") p.push(`alarm ${conflict.name}: rings on missing data (that is witness-stale's business)`);
    if (!/runbooks\/verify\.md/.test(a.alarmDescription ?? "")) p.push(`alarm ${conflict.name}: its description does not point to docs/runbooks/verify.md`);
    if (!(a.alarmActions ?? []).includes(topic)) p.push(`alarm ${conflict.name}: not into the alarm topic`);
  }

  const stale = alarms.find((a) => reads(a, WITNESS_METRICS.lastSuccess).length > 0);
  if (!stale) p.push(`no alarm on ${WITNESS_METRICS.lastSuccess}`);
  else {
    const a = stale.inputs;
    const m = reads(stale, WITNESS_METRICS.lastSuccess)[0];
    if (Object.keys(m.dims).length) p.push(`alarm ${stale.name}: dimensions ${JSON.stringify(m.dims)}`);
    const out = (a.metricQueries ?? []).filter((q: any) => q.returnData);
    const age = new RegExp(`^\\s*EPOCH\\(\\s*${m.id}\\s*\\)\\s*-\\s*${m.id}\\s*$`);
    if (out.length !== 1 || !age.test(out[0].expression ?? "")) p.push(`alarm ${stale.name}: does not alarm on the age EPOCH(${m.id}) - ${m.id} (${out.map((q: any) => q.expression ?? q.id)})`);
    if (m.stat !== "Maximum") p.push(`alarm ${stale.name}: reads the last success with ${m.stat}, not Maximum`);
    if (a.comparisonOperator !== "GreaterThanThreshold" || a.threshold !== staleSeconds) p.push(`alarm ${stale.name}: not on an age above ${staleSeconds} s (${a.comparisonOperator} ${a.threshold})`);
    if (a.treatMissingData !== "breaching") p.push(`alarm ${stale.name}: missing data is ${a.treatMissingData ?? "missing"}, not breaching (no metric means no relay)`);
    if (!(a.alarmActions ?? []).includes(topic)) p.push(`alarm ${stale.name}: not into the alarm topic`);
  }
  return p;
}

export type Stmt = { Effect: string; Action: string | string[]; Resource: string | string[]; Condition?: any };
export const list = <T>(x: T | T[] | undefined): T[] => (x === undefined ? [] : Array.isArray(x) ? x : [x]);
export const policyOf = (rs: Recorded[], role: Recorded | undefined): Stmt[] =>
  role ? ofType(rs, K.rolePolicy).filter((x) => x.inputs.role === `${role.name}-id`).flatMap((pol) => JSON.parse(pol.inputs.policy).Statement) : [];
const allows = (st: Stmt[], action: string, resource: string) =>
  st.some((s) => s.Effect === "Allow" && list(s.Action).includes(action) && list(s.Resource).some((r) => r === "*" || r === resource));

/**
 * The daily `mira audit verify`: a schedule runs, in the private subnets and the group the
 * database admits, the latest revision of a task definition whose container runs
 * `audit verify` with the witness, a trusted key and DATABASE_URL (VERIFY_LOGIN's secret); its task role reads the witness's
 * every version and writes nothing; its log group's verdict lines are counted, and an alarm
 * rings when `log intact` is missing for 26 hours (missing data breaching) and when
 * `log verification FAILED` appears.
 */
export function verifyProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const schedules = ofType(rs, K.schedule);
  if (schedules.length !== 1) return [`${schedules.length} schedules`];
  const sch = schedules[0].inputs;
  const cluster = ofType(rs, "aws:ecs/cluster:Cluster")[0];
  if (sch.target.arn !== cluster?.state.arn) p.push(`the schedule targets ${sch.target.arn}, not the cluster`);
  if (!/^(cron|rate)\(/.test(sch.scheduleExpression ?? "")) p.push(`schedule expression ${sch.scheduleExpression}`);
  const ecs = sch.target.ecsParameters ?? {};
  if (ecs.launchType !== "FARGATE") p.push(`launch type ${ecs.launchType}`);
  const net = ecs.networkConfiguration ?? {};
  if (net.assignPublicIp !== false) p.push("the task gets a public address");
  const compute = ofType(rs, K.subnet).filter((sn) => sn.inputs.tags?.tier === "compute").map((sn) => `${sn.name}-id`);
  if (!(net.subnets?.length > 0) || !net.subnets.every((x: string) => compute.includes(x))) p.push(`subnets ${net.subnets} are not the private compute subnets`);
  const admitted = databaseAdmits(rs);
  if (!(net.securityGroups ?? []).some((g: string) => admitted.includes(g))) p.push(`security groups ${net.securityGroups} do not reach the database`);

  const td = ofType(rs, K.taskDef).find((t) => t.state.arn === ecs.taskDefinitionArn || t.state.arn.replace(/:\d+$/, "") === ecs.taskDefinitionArn);
  if (!td) return [...p, `the schedule runs ${ecs.taskDefinitionArn}, no task definition of the program`];
  const mira = containersOf(td).find((c) => c.name === "mira");
  if (JSON.stringify(mira?.command) !== JSON.stringify(["audit", "verify"])) p.push(`the task runs ${JSON.stringify(mira?.command)}, not ["audit","verify"]`);
  const env = envOf(mira ?? {});
  const witness = ofType(rs, K.bucket).find((b) => b.name === "witness")!;
  const signingKey = ofType(rs, K.secret).find((x) => x.name === "audit-signing-key")!;
  const login = ofType(rs, K.secret).find((x) => x.name === `db-login-${VERIFY_LOGIN}`);
  if (env.Audit__WitnessBucket !== witness.state.bucket) p.push(`Audit__WitnessBucket is ${env.Audit__WitnessBucket}`);
  if (!env.Audit__PublicKey && env.Audit__SigningKeySecretId !== signingKey.state.arn && !env.Audit__PublicKeyFile) {
    p.push("no trusted key: neither Audit__PublicKey, Audit__SigningKeySecretId nor Audit__PublicKeyFile");
  }
  const dbUrl = (mira?.secrets ?? []).find((x: any) => x.name === "DATABASE_URL");
  if (!login || dbUrl?.valueFrom !== login.state.arn) p.push(`DATABASE_URL is not the ${VERIFY_LOGIN} login's secret`);
  const roleByArn = (arn: string) => ofType(rs, K.role).find((r) => r.state.arn === arn);
  if (dbUrl && !allows(policyOf(rs, roleByArn(td.inputs.executionRoleArn)), "secretsmanager:GetSecretValue", dbUrl.valueFrom)) p.push("ECS cannot read DATABASE_URL's secret");

  const role = roleByArn(td.inputs.taskRoleArn);
  const st = policyOf(rs, role);
  if (!role) p.push("the task has no role of the program");
  if (!allows(st, "s3:ListBucketVersions", witness.state.arn)) p.push("the task cannot list the witness's versions");
  if (!allows(st, "s3:ListBucket", witness.state.arn)) p.push("the task cannot list the witness");
  for (const a of ["s3:GetObject", "s3:GetObjectVersion"]) if (!allows(st, a, `${witness.state.arn}/*`)) p.push(`the task cannot ${a} in the witness`);
  if (env.Audit__SigningKeySecretId && !allows(st, "secretsmanager:GetSecretValue", signingKey.state.arn)) p.push("the task cannot read the signing key's secret");
  for (const s of st) {
    for (const a of list(s.Action)) {
      if (a === "*" || a.endsWith(":*") || /^s3:(Put|Delete|Abort|Restore|Replicate|Bypass)/.test(a) || /^(sns|sqs):/.test(a) || /^kms:(Encrypt|GenerateDataKey)/.test(a)) {
        p.push(`the verifier's role may ${a}`);
      }
    }
  }
  const scheduler = roleByArn(sch.target.roleArn);
  const sst = policyOf(rs, scheduler);
  if (!allows(sst, "ecs:RunTask", ecs.taskDefinitionArn)) p.push("the scheduler cannot run the task");
  for (const arn of [td.inputs.taskRoleArn, td.inputs.executionRoleArn]) if (!allows(sst, "iam:PassRole", arn)) p.push(`the scheduler cannot pass ${arn}`);

  const group = mira?.logConfiguration?.options?.["awslogs-group"];
  const filters = ofType(rs, K.metricFilter).filter((f) => f.inputs.logGroupName === group);
  const topic = alarmTopicArn(rs);
  const counted = (phrase: string) => filters.find((f) => String(f.inputs.pattern).includes(`"${phrase}"`))?.inputs.metricTransformation;
  const alarmOn = (mt: any) => ofType(rs, K.alarm).find((a) => a.inputs.namespace === mt?.namespace && a.inputs.metricName === mt?.name);
  const intact = counted("log intact");
  const failed = counted("log verification FAILED");
  if (!intact) p.push(`no metric filter counts "log intact" in ${group}`);
  if (!failed) p.push(`no metric filter counts "log verification FAILED" in ${group}`);
  const overdue = intact && alarmOn(intact);
  if (intact && !overdue) p.push(`no alarm on ${intact.name}`);
  if (overdue) {
    const a = overdue.inputs;
    const window = a.period * (a.datapointsToAlarm ?? a.evaluationPeriods);
    if (a.comparisonOperator !== "LessThanThreshold" || a.threshold !== 1 || a.statistic !== "Sum") p.push(`alarm ${overdue.name}: not on fewer than 1 (${a.statistic} ${a.comparisonOperator} ${a.threshold})`);
    if (window !== 26 * 3600 || (a.datapointsToAlarm ?? a.evaluationPeriods) !== a.evaluationPeriods) p.push(`alarm ${overdue.name}: rings after ${window} s without a run, not 26 hours`);
    if (a.treatMissingData !== "breaching") p.push(`alarm ${overdue.name}: missing data is ${a.treatMissingData}, not breaching`);
    if (!(a.alarmActions ?? []).includes(topic)) p.push(`alarm ${overdue.name}: not into the alarm topic`);
  }
  const bad = failed && alarmOn(failed);
  if (failed && !bad) p.push(`no alarm on ${failed.name}`);
  if (bad) {
    const a = bad.inputs;
    if (a.comparisonOperator !== "GreaterThanThreshold" || a.threshold !== 0) p.push(`alarm ${bad.name}: not on any failure (${a.comparisonOperator} ${a.threshold})`);
    if ((a.datapointsToAlarm ?? a.evaluationPeriods) !== 1) p.push(`alarm ${bad.name}: needs more than one failure`);
    if (!(a.alarmActions ?? []).includes(topic)) p.push(`alarm ${bad.name}: not into the alarm topic`);
  }
  return p;
}

// ---- the database logins ------------------------------------------------------------------------

/**
 * The processes that connect to the database, each as its own login, and the setting `mira
 * migrate` reads each login's URL from (written out here, not taken from the program).
 */
export const LOGINS: Record<string, string> = {
  api: "Database__Logins__Api",
  relay: "Database__Logins__Relay",
  projector: "Database__Logins__Projector",
  handlers: "Database__Logins__Handlers",
  worker: "Database__Logins__Worker",
};

const escapeRe = (x: string) => x.replace(/[.+^${}()|[\]\\]/g, "\\$&");
/** An IAM pattern (`*`, `?`) against a value; actions match without regard to case. */
const glob = (pattern: string, value: string, caseless = false) =>
  new RegExp(`^${pattern.split("*").map((part) => part.split("?").map(escapeRe).join(".")).join(".*")}$`, caseless ? "i" : "").test(value);
/** Whether the statements allow `action` on `resource`, wildcards in either included. */
export const mayDo = (st: Stmt[], action: string, resource: string) =>
  st.some((x) => x.Effect === "Allow" && list(x.Action).some((a) => glob(a, action, true)) && list(x.Resource).some((r) => glob(r, resource)));

/** The database's secrets the program makes: every secret under `mira-<stack>/database/` (the logins', any other). */
const databaseSecrets = (rs: Recorded[]) => ofType(rs, K.secret).filter((x) => /\/database\//.test(String(x.state.name)));
/** The master secret RDS keeps for the instance (manageMasterUserPassword), which RDS rotates. */
export const masterSecretArn = (rs: Recorded[]): string | undefined => ofType(rs, K.db)[0]?.state.masterUserSecrets?.[0]?.secretArn;
/** Every secret that holds a database credential: the program's, and RDS's master secret. */
const databaseSecretArns = (rs: Recorded[]) => [...databaseSecrets(rs).map((x) => x.state.arn), ...(masterSecretArn(rs) ? [masterSecretArn(rs)!] : [])];
/**
 * A container secret's `valueFrom` as the secret it reads, and the JSON key, if any: ECS takes
 * `<secret ARN>:<json key>:<version stage>:<version id>` (Secrets Manager's own ARNs end in
 * `secret:<name>`, so the part after the seventh colon is ECS's).
 */
export function secretRef(valueFrom: string): { arn: string; key?: string } {
  const parts = String(valueFrom).split(":");
  if (parts[2] !== "secretsmanager" || parts.length <= 7) return { arn: valueFrom };
  return { arn: parts.slice(0, 7).join(":"), key: parts[7] || undefined };
}
const loginSecret = (rs: Recorded[], login: string) => ofType(rs, K.secret).find((x) => x.name === `db-login-${login}`);
/** A secret's ARN as the problems name it: the login's, or its name. */
const named = (rs: Recorded[], arn: string | undefined) => {
  if (arn === undefined) return "not set";
  if (arn === masterSecretArn(rs)) return "RDS's master secret";
  const login = Object.keys(LOGINS).find((l) => loginSecret(rs, l)?.state.arn === arn);
  return login ? `the ${login} login's secret` : (ofType(rs, K.secret).find((x) => x.state.arn === arn)?.state.name ?? arn);
};
const secretsOf = (c: any): Record<string, string> => Object.fromEntries((c?.secrets ?? []).map((x: any) => [x.name, x.valueFrom]));
const miraOf = (td: Recorded) => containersOf(td).find((c) => c.name === "mira");

/**
 * One login per process, each in a Secrets Manager secret of its own under the RDS key; no other
 * secret under `database/`: the owner's credentials are RDS's own master secret, never a copy.
 */
export function loginSecretProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const rdsKey = ofType(rs, "aws:kms/key:Key").find((k) => k.name === "rds-key")?.state.arn;
  for (const login of Object.keys(LOGINS)) {
    const x = loginSecret(rs, login);
    if (!x) p.push(`no secret for the ${login} login`);
    else if (x.inputs.kmsKeyId !== rdsKey) p.push(`the ${login} login's secret is not under the RDS key`);
  }
  for (const x of databaseSecrets(rs)) {
    if (!Object.keys(LOGINS).some((l) => x.name === `db-login-${l}`)) p.push(`secret ${x.state.name} is no process's login: a copy of a credential?`);
  }
  return p;
}

/**
 * Each ECS service takes DATABASE_URL from its own process's login: the process is the worker
 * where the service runs the worker's image (`mira-worker`, the slide verifier), else what its
 * Roles__Enabled names (the API where it names none). Every service process has its service.
 */
export function serviceLoginProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const byArn = new Map(ofType(rs, K.taskDef).map((td) => [td.state.arn, td]));
  const workerRepo = ofType(rs, K.repo).find((r) => r.name === "mira-wsi-worker")?.state.repositoryUrl;
  const served = new Set<string>();
  for (const svc of ofType(rs, K.service)) {
    const td = byArn.get(svc.inputs.taskDefinition);
    if (!td) {
      p.push(`service ${svc.inputs.name}: runs no task definition of the program`);
      continue;
    }
    const mira = miraOf(td);
    const worker = workerRepo !== undefined && String(mira?.image ?? "").startsWith(`${workerRepo}:`);
    const roles = (envOf(mira ?? {}).Roles__Enabled ?? "").split(",").map((x) => x.trim()).filter(Boolean);
    if (roles.length > 1 || (worker && roles.length > 0)) {
      p.push(`service ${svc.inputs.name}: runs ${[...(worker ? ["worker"] : []), ...roles].join(", ")}, more than one process's login`);
      continue;
    }
    const process = worker ? "worker" : (roles[0] ?? "api");
    served.add(process);
    const want = loginSecret(rs, process)?.state.arn;
    const got = secretsOf(mira).DATABASE_URL ?? envOf(mira ?? {}).DATABASE_URL;
    if (!want || got !== want) p.push(`service ${svc.inputs.name}: DATABASE_URL is ${named(rs, got)}, not the ${process} login's secret`);
  }
  for (const process of Object.keys(LOGINS).filter((l) => l !== "worker")) if (!served.has(process)) p.push(`no service runs the ${process}`);
  return p;
}

/**
 * `mira migrate` (the one task definition that runs it) connects as the owner with the
 * credentials of RDS's master secret, which RDS rotates: PGUSER and PGPASSWORD are that secret's
 * `username` and `password` keys, read by ECS when the task starts, and Database__MigrationUrl
 * names the instance's endpoint with no credentials in it (in the environment: it is no secret).
 * It gets every process's login as Database__Logins__<Process>, each from its secret, and no
 * DATABASE_URL.
 */
export function migrationLoginProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const tds = ofType(rs, K.taskDef).filter((td) => JSON.stringify(miraOf(td)?.command) === JSON.stringify(["migrate"]));
  if (tds.length !== 1) return [`${tds.length} task definitions run mira migrate`];
  const mira = miraOf(tds[0]);
  const got = secretsOf(mira);
  const env = envOf(mira ?? {});
  const master = masterSecretArn(rs);
  const db = ofType(rs, K.db)[0];
  for (const [name, key] of [
    ["PGUSER", "username"],
    ["PGPASSWORD", "password"],
  ]) {
    const ref = got[name] === undefined ? undefined : secretRef(got[name]);
    if (!master || ref?.arn !== master || ref.key !== key) p.push(`${name} is ${ref ? `${named(rs, ref.arn)}${ref.key ? ` (${ref.key})` : ""}` : "not set"}, not the ${key} of RDS's master secret`);
  }
  const url = env.Database__MigrationUrl ?? got.Database__MigrationUrl;
  if ("Database__MigrationUrl" in got) p.push(`Database__MigrationUrl is a secret (${named(rs, secretRef(got.Database__MigrationUrl).arn)}): a copy of the owner's password`);
  else if (!url) p.push("Database__MigrationUrl is not set");
  else {
    const u = new URL(url);
    if (u.username || u.password) p.push(`Database__MigrationUrl names a user or a password (${u.username}): they come from RDS's master secret`);
    if (`${u.hostname}:${u.port}` !== db?.state.endpoint) p.push(`Database__MigrationUrl is ${u.hostname}:${u.port}, not the instance's endpoint ${db?.state.endpoint}`);
    if (u.searchParams.get("sslmode") !== "verify-full") p.push(`Database__MigrationUrl's sslmode is ${u.searchParams.get("sslmode")}, not verify-full`);
  }
  for (const [login, setting] of Object.entries(LOGINS)) {
    const want = loginSecret(rs, login)?.state.arn;
    if (!want || got[setting] !== want) p.push(`${setting} is ${named(rs, got[setting])}, not the ${login} login's secret`);
  }
  for (const name of Object.keys(got)) if (name.startsWith("Database__Logins__") && !Object.values(LOGINS).includes(name)) p.push(`${name} is no process's login`);
  if ("DATABASE_URL" in got || "DATABASE_URL" in env) p.push(`mira migrate is given DATABASE_URL (${named(rs, got.DATABASE_URL ?? env.DATABASE_URL)})`);
  return p;
}

/**
 * What reads the database's secrets: a task's execution role (ECS, which injects them) reads
 * exactly the ones its task injects, so no task starts with another process's login; a task's
 * own role reads none; neither has a managed policy this check cannot read. The worker's pods
 * read the worker's login, with their role (IRSA), which reads no other.
 */
export function secretAccessProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const dbSecrets = databaseSecretArns(rs);
  const roleByArn = (arn: string) => ofType(rs, K.role).find((r) => r.state.arn === arn);
  const attached = (r: Recorded) =>
    ofType(rs, "aws:iam/rolePolicyAttachment:RolePolicyAttachment").filter((a) => a.inputs.role === r.state.name || a.inputs.role === `${r.name}-id`);
  const readable = (r: Recorded) => dbSecrets.filter((arn) => mayDo(policyOf(rs, r), "secretsmanager:GetSecretValue", arn));
  for (const td of ofType(rs, K.taskDef)) {
    const family = td.inputs.family;
    const injected = new Set(containersOf(td).flatMap((c) => (c.secrets ?? []).map((x: any) => secretRef(x.valueFrom).arn)));
    const exec = roleByArn(td.inputs.executionRoleArn);
    if (!exec) p.push(`${family}: its execution role is no role of the program`);
    else {
      if (attached(exec).length) p.push(`${family}: its execution role ${exec.name} has managed policies attached`);
      const can = readable(exec);
      for (const arn of injected) if (!can.includes(arn)) p.push(`${family}: its execution role ${exec.name} cannot read ${named(rs, arn)}, which the task injects`);
      for (const arn of can) if (!injected.has(arn)) p.push(`${family}: its execution role ${exec.name} may read ${named(rs, arn)}`);
    }
    const task = roleByArn(td.inputs.taskRoleArn);
    if (task) {
      if (attached(task).length) p.push(`${family}: its task role ${task.name} has managed policies attached`);
      for (const arn of readable(task)) p.push(`${family}: its task role ${task.name} may read ${named(rs, arn)}`);
    }
  }
  const worker = loginSecret(rs, "worker")?.state.arn;
  const dep = ofType(rs, K.deployment)[0];
  if (!dep) return [...p, "no worker Deployment"];
  const pod = dep.inputs.spec.template.spec;
  const dbArns = new Set(dbSecrets);
  const read = [...(pod.initContainers ?? []), ...(pod.containers ?? [])].flatMap((c: any) => (c.env ?? []).map((e: any) => e.value)).filter((v: string) => dbArns.has(v));
  if (!worker || !read.includes(worker)) p.push("the worker's pods do not read the worker login's secret");
  for (const arn of read) if (arn !== worker) p.push(`the worker's pods read ${named(rs, arn)}`);
  const role = ofType(rs, K.role).find((r) => r.name === "worker");
  if (!role) p.push("no worker role");
  else {
    const can = readable(role);
    if (!worker || !can.includes(worker)) p.push("the worker's role cannot read the worker login's secret");
    for (const arn of can) if (arn !== worker) p.push(`the worker's role may read ${named(rs, arn)}`);
  }
  return p;
}

/**
 * The trusted public key, as `mira:auditPublicKey` (`key`) says. With a key, the daily
 * verification and the API are given it as `Audit__PublicKey`, neither gets
 * `Audit__SigningKeySecretId`, and neither role can read the signing key's secret (nor decrypt
 * with the patient-data key it is under, which the verification needs for nothing else).
 * Without one, the verification derives the key from the secret (`Audit__SigningKeySecretId`,
 * which its role reads) and the API has no key at all; the API never reads the secret.
 */
export function trustedKeyProblems(rs: Recorded[], key: string | undefined): string[] {
  const p: string[] = [];
  const secret = ofType(rs, K.secret).find((x) => x.name === "audit-signing-key")!.state.arn;
  const phiKey = ofType(rs, "aws:kms/key:Key").find((x) => x.name === "phi-key")!.state.arn;
  const roleByArn = (arn: string) => ofType(rs, K.role).find((r) => r.state.arn === arn);
  for (const [who, family] of [
    ["the verification", "-audit-verify"],
    ["the API", "-api"],
  ] as const) {
    const td = ofType(rs, K.taskDef).find((t) => String(t.inputs.family).endsWith(family));
    if (!td) {
      p.push(`${who}: no task definition *${family}`);
      continue;
    }
    const env = envOf(containersOf(td).find((c) => c.name === "mira") ?? {});
    const st = policyOf(rs, roleByArn(td.inputs.taskRoleArn));
    const readsSecret = allows(st, "secretsmanager:GetSecretValue", secret);
    if (env.Audit__PublicKey !== key) p.push(`${who}: Audit__PublicKey is ${env.Audit__PublicKey ?? "not set"}, not ${key ?? "unset"}`);
    if (key || who === "the API") {
      if ("Audit__SigningKeySecretId" in env) p.push(`${who} is given Audit__SigningKeySecretId`);
      if (readsSecret) p.push(`${who}'s role can read the signing key's secret`);
      if (who === "the verification" && allows(st, "kms:Decrypt", phiKey)) p.push(`${who}'s role can decrypt with the patient-data key`);
    } else {
      if (env.Audit__SigningKeySecretId !== secret) p.push(`${who}: Audit__SigningKeySecretId is ${env.Audit__SigningKeySecretId ?? "not set"}, not the signing key's secret`);
      if (!readsSecret) p.push(`${who}'s role cannot read the signing key's secret`);
    }
  }
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

// ---- what a first `up` makes first, and the alarms on the fleet's health (issue 38) ------------

/**
 * A first `up` makes every ECS service behind a load balancer after the listener rule (or the
 * listener) that forwards to its target group, which it depends on: ECS refuses a service whose
 * target group no load balancer uses yet, and without the dependency the two are made side by
 * side.
 */
export function listenerOrderProblems(rs: Recorded[], urnOf: (type: string, name: string) => string): string[] {
  const p: string[] = [];
  const forwarders = [...ofType(rs, K.listenerRule), ...ofType(rs, K.listener)];
  const forwardsTo = (r: Recorded, tg: string) =>
    [...(r.inputs.actions ?? []), ...(r.inputs.defaultActions ?? [])].some(
      (a: any) => a.type === "forward" && (a.targetGroupArn === tg || (a.forward?.targetGroups ?? []).some((t: any) => t.arn === tg)),
    );
  for (const svc of ofType(rs, K.service)) {
    for (const lb of svc.inputs.loadBalancers ?? []) {
      const attach = forwarders.filter((r) => forwardsTo(r, lb.targetGroupArn));
      if (attach.length === 0) p.push(`service ${svc.inputs.name}: no listener forwards to its target group`);
      else if (!attach.some((r) => (svc.dependencies ?? []).includes(urnOf(r.type, r.name)))) {
        p.push(`service ${svc.inputs.name}: made without waiting for ${attach.map((r) => r.name).join(", ")}, which attaches its target group`);
      }
    }
  }
  return p;
}

/** An alarm's verdict on one value of the metric it reads: its `ABS(id - 1)` expression, if any, then its comparison. */
function rings(a: Recorded, value: number): boolean {
  const out = (a.inputs.metricQueries ?? []).find((q: any) => q.returnData && q.expression);
  let v = value;
  if (out) {
    const m = /^\s*ABS\(\s*\w+\s*-\s*(\d+)\s*\)\s*$/.exec(out.expression);
    if (!m) return false;
    v = Math.abs(value - Number(m[1]));
  }
  const t = Number(a.inputs.threshold);
  switch (a.inputs.comparisonOperator) {
    case "GreaterThanThreshold":
      return v > t;
    case "GreaterThanOrEqualToThreshold":
      return v >= t;
    case "LessThanThreshold":
      return v < t;
    case "LessThanOrEqualToThreshold":
      return v <= t;
    default:
      return false;
  }
}

/**
 * The fleet's health, alarmed into the alarm topic:
 * - the relay's running task count (Container Insights, its ECS service) is exactly 1: some
 *   alarm rings on 0 and on 2, none on 1, and no datapoint (no service) breaches;
 * - the database: CPU high, free storage low, freeable memory low (AWS/RDS, the instance), and
 *   RDS's own events (availability, failover, failure, low storage) into the alarm topic, whose
 *   key lets RDS's events service encrypt for it;
 * - the worker's pods Pending (Container Insights, the worker Deployment's pods), for longer
 *   than a rollout lets one wait (its progress deadline: a drain and a start).
 */
export function healthAlarmProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const topic = alarmTopicArn(rs);
  const alarms = ofType(rs, K.alarm).filter((a) => (a.inputs.alarmActions ?? []).includes(topic));
  const on = (namespace: string, metric: string, dims: Record<string, string>) =>
    alarms.filter((a) => metricsOf(a).some((m) => m.namespace === namespace && m.metricName === metric && JSON.stringify(m.dims) === JSON.stringify(dims)));

  const ecs = ofType(rs, K.ecsCluster)[0]?.state.name;
  const relay = ofType(rs, K.service).find((svc) => {
    const td = ofType(rs, K.taskDef).find((t) => t.state.arn === svc.inputs.taskDefinition);
    return td && envOf(containersOf(td).find((c) => c.name === "mira") ?? {}).Roles__Enabled === "relay";
  });
  if (!relay) p.push("no relay service");
  else {
    const count = on("ECS/ContainerInsights", "RunningTaskCount", { ClusterName: ecs, ServiceName: relay.inputs.name });
    if (!count.some((a) => rings(a, 0) && a.inputs.treatMissingData === "breaching")) p.push("no alarm rings when the relay runs no task (or reports nothing)");
    if (!count.some((a) => rings(a, 2))) p.push("no alarm rings when the relay runs two tasks");
    for (const a of count.filter((x) => rings(x, 1))) p.push(`alarm ${a.name} rings on one relay`);
  }

  const db = ofType(rs, K.db)[0];
  const dims = { DBInstanceIdentifier: db?.inputs.identifier };
  for (const [metric, op] of [
    ["CPUUtilization", "GreaterThanThreshold"],
    ["FreeStorageSpace", "LessThanThreshold"],
    ["FreeableMemory", "LessThanThreshold"],
  ]) {
    if (!on("AWS/RDS", metric, dims).some((a) => a.inputs.comparisonOperator === op)) p.push(`no alarm on the database's ${metric}`);
  }
  const events = ofType(rs, K.rdsEvents).filter((e) => e.inputs.snsTopic === topic && (e.inputs.sourceIds ?? []).includes(db?.inputs.identifier));
  const categories = new Set(events.flatMap((e) => e.inputs.eventCategories ?? []));
  for (const c of ["availability", "failover", "failure", "low storage"]) if (!categories.has(c)) p.push(`RDS's ${c} events reach no alarm topic`);
  const alarmTopic = ofType(rs, K.topic).find((t) => t.state.arn === topic);
  const keyRef = alarmTopic?.inputs.kmsMasterKeyId;
  const key = ofType(rs, "aws:kms/key:Key").find((k) => [`${k.name}-id`, k.state.keyId, k.state.arn].includes(keyRef));
  const keyStatements: any[] = key?.inputs.policy ? JSON.parse(key.inputs.policy).Statement : [];
  const rdsMayEncrypt = keyStatements.some(
    (st) => st.Effect === "Allow" && list(st.Principal?.Service).includes("events.rds.amazonaws.com") && list(st.Action).some((a: string) => a.startsWith("kms:GenerateDataKey")),
  );
  if (events.length && alarmTopic?.inputs.kmsMasterKeyId && !rdsMayEncrypt) p.push("the alarm topic's key does not let RDS's events in");

  const eks = ofType(rs, K.eksCluster)[0]?.state.name;
  const dep = ofType(rs, K.deployment)[0]?.inputs;
  const pending = on("ContainerInsights", "pod_status_pending", { ClusterName: eks, Namespace: dep?.metadata.namespace, PodName: dep?.metadata.name });
  if (pending.length === 0) p.push("no alarm on the worker's pods Pending");
  const deadline = Number(dep?.spec.progressDeadlineSeconds ?? 600);
  for (const a of pending) {
    const window = Number(a.inputs.period) * Number(a.inputs.datapointsToAlarm ?? a.inputs.evaluationPeriods);
    if (!rings(a, 1) || rings(a, 0)) p.push(`alarm ${a.name}: does not ring on one Pending pod alone`);
    if (window < deadline) p.push(`alarm ${a.name}: rings after ${window} s of Pending, within a rollout's drain and start (${deadline} s)`);
  }
  return p;
}
