// What issue 32 requires of the slide verifier (`mira-worker verify` on ECS) and of the GPU
// fleet's wake-up, as functions over the recorded resources that return the problems found (as
// in checks.ts and operations.ts): each test runs them on the program and on a broken copy.

import { loadTopology, type Topology } from "../src/topology";
import { ofType, type Recorded } from "./harness";
import { alarmTopicArn, containersOf, databaseAdmits, envOf, K, list, METRICS_LISTEN, METRICS_PORT, mayDo, metricsOf, policyOf, type Stmt } from "./operations";

/**
 * The message attributes the relay publishes for an upload and for a queued job (DESIGN §5.1):
 * a routine job, a STAT one, and a job queued by a relay of the release before `priority`
 * (which publishes none).
 */
export const UPLOAD = { event_type: "SlideUploaded", aggregate_type: "Slide" };
export const JOB = { event_type: "JobQueued", aggregate_type: "Job", priority: "routine" };
export const STAT_JOB = { event_type: "JobQueued", aggregate_type: "Job", priority: "stat" };
export const OLD_JOB = { event_type: "JobQueued", aggregate_type: "Job" };

/**
 * Whether an SNS filter policy admits a message with these attributes: every key of the policy
 * matched by one of its values (null: no policy, everything). A value is an exact string, which
 * needs the attribute present and equal, or `{"exists": b}`, which matches when the attribute's
 * presence is b: the kinds bus/topology.json uses. Any other value is an error here, not a guess.
 */
export function admits(policy: Record<string, unknown[]> | null | undefined, attrs: Record<string, string>): boolean {
  if (!policy) return true;
  return Object.entries(policy).every(([key, values]) =>
    values.some((v) => {
      if (typeof v === "string") return attrs[key] === v;
      const keys = v !== null && typeof v === "object" ? Object.keys(v) : [];
      if (keys.length === 1 && keys[0] === "exists" && typeof (v as any).exists === "boolean") return (key in attrs) === (v as any).exists;
      throw new Error(`filter policy ${JSON.stringify(policy)}: ${JSON.stringify(v)} is not understood here (exact strings and exists only)`);
    }),
  );
}

const byName = (rs: Recorded[], type: string, name: string) => ofType(rs, type).find((r) => r.name === name);
const queueNamed = (rs: Recorded[], group: string) => byName(rs, K.queue, group);
const roleByArn = (rs: Recorded[], arn: string) => ofType(rs, K.role).find((r) => r.state.arn === arn);
const workerRepo = (rs: Recorded[]) => byName(rs, K.repo, "mira-wsi-worker")?.state.repositoryUrl as string | undefined;
/** The recorded subscription of a queue, and its filter policy. */
const filterOf = (rs: Recorded[], queue: Recorded) => {
  const sub = ofType(rs, K.subscription).find((x) => x.inputs.endpoint === queue.state.arn);
  return sub ? { policy: sub.inputs.filterPolicy ? JSON.parse(sub.inputs.filterPolicy) : null } : undefined;
};
/** The queues (not dead-letter queues) a role may take messages from. */
const consumed = (rs: Recorded[], st: Stmt[]) =>
  ofType(rs, K.queue).filter((q) => !String(q.inputs.name).includes("-dlq") && mayDo(st, "sqs:ReceiveMessage", q.state.arn));

/** The ECS services that run the worker's image, each with its task definition and `mira` container. */
export function verifierServices(rs: Recorded[]) {
  const repo = workerRepo(rs);
  return ofType(rs, K.service).flatMap((svc) => {
    const td = ofType(rs, K.taskDef).find((t) => t.state.arn === svc.inputs.taskDefinition);
    const mira = td && containersOf(td).find((c) => c.name === "mira");
    return td && mira && repo && String(mira.image).startsWith(`${repo}:`) ? [{ svc, td, mira }] : [];
  });
}

/**
 * The verifier: one ECS Fargate service in the program's cluster, in the private subnets and the
 * group the database admits, no load balancer; its task runs the worker's image at `imageTag`
 * as `mira-worker verify`, on CPUs of the configured size (no GPU, no collector), with exactly
 * the worker Deployment's settings and DATABASE_URL from the worker's login; deploys and scaling
 * are not undone by `pulumi up` (ignoreChanges). The worker's `OTEL_*` variables are not
 * settings: they send its traces to the collector in its pod, and the verifier's task has none,
 * so it gets none of them. Its /metrics is where the worker's is in its pod, on the task's
 * loopback (MIRA_METRICS_LISTEN=METRICS_LISTEN), and no port mapping names it.
 */
export function verifierProblems(rs: Recorded[], cfg: { imageTag: string; verifierTaskCpu: number; verifierTaskMemory: number }): string[] {
  const p: string[] = [];
  const found = verifierServices(rs);
  if (found.length !== 1) return [`${found.length} ECS services run the worker's image`];
  const { svc, td, mira } = found[0];
  const cluster = ofType(rs, K.cluster)[0];
  if (svc.inputs.cluster !== cluster?.state.arn) p.push(`the service is in ${svc.inputs.cluster}, not the cluster`);
  if (svc.inputs.launchType !== "FARGATE" || !(td.inputs.requiresCompatibilities ?? []).includes("FARGATE")) p.push("not on Fargate");
  if ((svc.inputs.loadBalancers ?? []).length > 0) p.push("behind a load balancer");
  const net = svc.inputs.networkConfiguration ?? {};
  if (net.assignPublicIp !== false) p.push("the tasks get public addresses");
  const compute = ofType(rs, K.subnet).filter((sn) => sn.inputs.tags?.tier === "compute").map((sn) => `${sn.name}-id`);
  if (!(net.subnets?.length > 0) || !net.subnets.every((x: string) => compute.includes(x))) p.push(`subnets ${net.subnets} are not the private compute subnets`);
  const admitted = databaseAdmits(rs);
  if (!(net.securityGroups ?? []).some((g: string) => admitted.includes(g))) p.push(`security groups ${net.securityGroups} do not reach the database`);

  const want = `${workerRepo(rs)}:${cfg.imageTag}`;
  if (mira.image !== want) p.push(`image ${mira.image}, not ${want}`);
  if (JSON.stringify(mira.command) !== JSON.stringify(["verify"])) p.push(`runs mira-worker ${(mira.command ?? []).join(" ")}, not mira-worker verify`);
  if (td.inputs.cpu !== String(cfg.verifierTaskCpu) || td.inputs.memory !== String(cfg.verifierTaskMemory)) {
    p.push(`task size ${td.inputs.cpu} CPU / ${td.inputs.memory} MiB, not ${cfg.verifierTaskCpu} / ${cfg.verifierTaskMemory}`);
  }
  const containers = containersOf(td);
  if (containers.length !== 1) p.push(`containers ${containers.map((c) => c.name)}: the verifier's task is its mira container alone`);
  for (const c of containers) if ((c.resourceRequirements ?? []).some((r: any) => r.type === "GPU")) p.push(`container ${c.name} asks for a GPU`);

  const dep = ofType(rs, K.deployment)[0];
  const workerEnv = Object.fromEntries(Object.entries(envOf(dep?.inputs.spec.template.spec.containers[0] ?? {})).filter(([k]) => !k.startsWith("OTEL_")));
  const env = envOf(mira);
  for (const [k, v] of Object.entries(workerEnv)) if (env[k] !== v) p.push(`${k} is ${env[k] ?? "not set"}, the worker's is ${v}`);
  for (const k of Object.keys(env)) {
    if (!(k in workerEnv)) p.push(k.startsWith("OTEL_") ? `${k} is set, and the verifier's task has no collector` : `${k} is set, and not for the worker`);
  }
  if (env.MIRA_METRICS_LISTEN !== METRICS_LISTEN) p.push(`its /metrics is on ${env.MIRA_METRICS_LISTEN ?? "no address"}, not the task's loopback ${METRICS_LISTEN}`);
  for (const c of containers) {
    for (const pm of c.portMappings ?? []) if (pm.containerPort === METRICS_PORT || pm.hostPort === METRICS_PORT) p.push(`container ${c.name} maps port ${METRICS_PORT}`);
  }
  const login = byName(rs, K.secret, "db-login-worker")?.state.arn;
  const url = (mira.secrets ?? []).find((x: any) => x.name === "DATABASE_URL")?.valueFrom;
  if (!login || url !== login) p.push(`DATABASE_URL is ${url ?? env.DATABASE_URL ?? "not set"}, not the worker login's secret`);

  for (const field of ["taskDefinition", "desiredCount"]) {
    if (!(svc.ignoreChanges ?? []).includes(field)) p.push(`pulumi up would reset the service's ${field} (ignoreChanges)`);
  }
  const group = mira.logConfiguration?.options?.["awslogs-group"];
  if (!ofType(rs, "aws:cloudwatch/logGroup:LogGroup").some((g) => g.state.name === group)) p.push(`logs to ${group}, no log group of the program`);
  return p;
}

/**
 * The verifier's task role: takes messages from the verify queue and from no other queue (finding
 * any queue's URL is what every bus client does at start), publishes nothing, reads the slides'
 * immutable copies at any version and nothing else of the uploads bucket, writes to no bucket
 * (the results least of all), decrypts with the keys it needs, makes data keys only under the
 * patient-data key, reads no secret (ECS injects its login), no wildcard action.
 */
export function verifierRoleProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const found = verifierServices(rs);
  if (found.length !== 1) return [`${found.length} ECS services run the worker's image`];
  const role = roleByArn(rs, found[0].td.inputs.taskRoleArn);
  if (!role) return ["the verifier's task has no role of the program"];
  const st = policyOf(rs, role);
  const verify = queueNamed(rs, "verify")!;
  const bucket = (name: string) => byName(rs, K.bucket, name)!.state.arn as string;
  const key = (name: string) => byName(rs, "aws:kms/key:Key", name)!.state.arn as string;
  const [uploads, results] = [bucket("uploads"), bucket("results")];
  const need: [string, string, string][] = [
    ...["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"].map((a): [string, string, string] => [a, verify.state.arn, "the verify queue"]),
    ["s3:GetObject", `${uploads}/immutable/slide.svs`, "a slide's immutable copy"],
    ["s3:GetObjectVersion", `${uploads}/immutable/slide.svs`, "a slide's immutable copy"],
    ["kms:Decrypt", key("s3-key"), "the buckets' key"],
    ["kms:Decrypt", key("messaging-key"), "the messaging key"],
    ["kms:Decrypt", key("phi-key"), "the patient-data key"],
    ["kms:GenerateDataKey", key("phi-key"), "the patient-data key"],
  ];
  for (const [a, r, what] of need) if (!mayDo(st, a, r)) p.push(`cannot ${a} on ${what}`);
  const queues = new Map(ofType(rs, K.queue).map((q) => [q.state.arn as string, String(q.inputs.name)]));
  for (const s of st) {
    if (s.Effect !== "Allow") continue;
    for (const a of list(s.Action)) {
      if (a === "*" || a.endsWith(":*")) p.push(`wildcard action ${a}`);
      for (const r of list(s.Resource)) {
        if (a.startsWith("sqs:") && a !== "sqs:GetQueueUrl" && r !== verify.state.arn) p.push(`${a} on ${queues.get(r) ?? r}`);
        if (a.startsWith("sns:") && a !== "sns:ListTopics") p.push(`${a} on ${r}`);
        if (/^s3:(Put|Delete|Abort|Restore|Replicate|Bypass)/.test(a)) p.push(`${a} on ${r.startsWith(results) ? "the results bucket" : r}`);
        if (a.startsWith("s3:Get") && r.startsWith(uploads) && !r.startsWith(`${uploads}/immutable/`)) p.push(`${a} on ${r}, beyond the immutable copies`);
        if (/^kms:(Encrypt|GenerateDataKey|ReEncrypt)/.test(a) && r !== key("phi-key")) p.push(`${a} on ${r}`);
        if (a.startsWith("secretsmanager:")) p.push(`${a} on ${r}: ECS injects its login`);
      }
    }
  }
  return p;
}

/**
 * Scaling on the verify queue (Application Auto Scaling): the service's desired count between
 * `min` (at least 1: a verifier always runs) and `max`; a step policy that adds tasks on an alarm
 * over the verify queue's waiting messages, and one that removes them on an alarm over its
 * waiting and in-flight messages both at zero; every scaling alarm reads the verify queue only.
 */
export function verifierScalingProblems(rs: Recorded[], min: number, max: number): string[] {
  const p: string[] = [];
  const found = verifierServices(rs);
  if (found.length !== 1) return [`${found.length} ECS services run the worker's image`];
  const { svc } = found[0];
  const cluster = ofType(rs, K.cluster)[0];
  const resourceId = `service/${cluster?.state.name}/${svc.state.name}`;
  const targets = ofType(rs, K.scalingTarget).filter((t) => t.inputs.resourceId === resourceId);
  if (targets.length !== 1) return [...p, `${targets.length} scalable targets for ${resourceId}`];
  const t = targets[0].inputs;
  if (t.serviceNamespace !== "ecs" || t.scalableDimension !== "ecs:service:DesiredCount") p.push(`scales ${t.serviceNamespace} ${t.scalableDimension}`);
  if (t.minCapacity !== min || t.maxCapacity !== max) p.push(`from ${t.minCapacity} to ${t.maxCapacity} tasks, not ${min} to ${max}`);
  if (!(t.minCapacity >= 1)) p.push(`scales to ${t.minCapacity}: every first job would wait for a verifier to start`);
  if (!(svc.inputs.desiredCount >= t.minCapacity && svc.inputs.desiredCount <= t.maxCapacity)) p.push(`the service starts with ${svc.inputs.desiredCount} tasks`);

  const policies = ofType(rs, K.scalingPolicy).filter((x) => x.inputs.resourceId === resourceId);
  const steps = (x: Recorded): any[] => x.inputs.stepScalingPolicyConfiguration?.stepAdjustments ?? [];
  const out = policies.filter((x) => steps(x).some((s) => s.scalingAdjustment > 0));
  const inn = policies.filter((x) => steps(x).some((s) => s.scalingAdjustment < 0));
  const verify = queueNamed(rs, "verify")!.state.name;
  const alarmsFor = (x: Recorded) => ofType(rs, K.alarm).filter((a) => (a.inputs.alarmActions ?? []).includes(x.state.arn));
  for (const [what, ps] of [
    ["out", out],
    ["in", inn],
  ] as const) {
    if (ps.length === 0) p.push(`no policy scales ${what}`);
    for (const x of ps) {
      if (steps(x).some((s) => Math.sign(s.scalingAdjustment) !== (what === "out" ? 1 : -1))) p.push(`policy ${x.name} scales both ways`);
      const alarms = alarmsFor(x);
      if (alarms.length === 0) p.push(`no alarm sets off ${x.name}`);
      for (const a of alarms) {
        const metrics = metricsOf(a);
        for (const m of metrics) if (m.namespace !== "AWS/SQS" || m.dims.QueueName !== verify) p.push(`alarm ${a.name} reads ${m.namespace} ${m.metricName} of ${m.dims.QueueName ?? JSON.stringify(m.dims)}`);
        const names = metrics.map((m) => m.metricName);
        const op = a.inputs.comparisonOperator;
        if (what === "out") {
          if (!names.includes("ApproximateNumberOfMessagesVisible")) p.push(`alarm ${a.name} does not read the waiting messages`);
          if (!/^Greater/.test(op)) p.push(`alarm ${a.name}: ${op}`);
        } else {
          for (const n of ["ApproximateNumberOfMessagesVisible", "ApproximateNumberOfMessagesNotVisible"]) if (!names.includes(n)) p.push(`alarm ${a.name} does not read ${n}`);
          const zero = (op === "LessThanOrEqualToThreshold" && a.inputs.threshold === 0) || (op === "LessThanThreshold" && a.inputs.threshold > 0 && a.inputs.threshold <= 1);
          if (!zero) p.push(`alarm ${a.name}: ${op} ${a.inputs.threshold}, not nothing waiting or in flight`);
        }
      }
    }
  }
  return p;
}

/**
 * An upload wakes no GPU node: the gpu-jobs and gpu-jobs-stat groups of bus/topology.json admit
 * JobQueued (routine, STAT) and not SlideUploaded; every queue KEDA scales the GPU worker on is subscribed with such a filter;
 * the GPU worker's role takes messages from exactly those queues (so never from verify); and
 * the ECS verifier takes them from a queue that admits uploads and no queued job.
 */
export function gpuWakeProblems(rs: Recorded[], topology: Topology = loadTopology()): string[] {
  const p: string[] = [];
  for (const [group, job] of [
    ["gpu-jobs", JOB],
    ["gpu-jobs-stat", STAT_JOB],
  ] as const) {
    const spec = topology.queues.find((q) => q.group === group);
    if (!spec) p.push(`bus/topology.json has no ${group} group`);
    else {
      if (admits(spec.filter_policy, UPLOAD)) p.push(`bus/topology.json: ${group} admits SlideUploaded (${JSON.stringify(spec.filter_policy)})`);
      if (!admits(spec.filter_policy, job)) p.push(`bus/topology.json: ${group} does not admit ${JSON.stringify(job)} (${JSON.stringify(spec.filter_policy)})`);
    }
  }
  const urls = ofType(rs, K.scaledObject).flatMap((so) => (so.inputs.spec.triggers ?? []).filter((t: any) => t.type === "aws-sqs-queue").map((t: any) => t.metadata.queueURL));
  if (urls.length === 0) p.push("KEDA scales the GPU worker on no queue");
  const counted = urls.map((u: string) => ofType(rs, K.queue).find((q) => q.state.url === u));
  for (const [i, q] of counted.entries()) {
    if (!q) {
      p.push(`KEDA counts ${urls[i]}, no queue of the program`);
      continue;
    }
    const f = filterOf(rs, q);
    if (!f) p.push(`KEDA counts ${q.inputs.name}, which nothing feeds`);
    else if (admits(f.policy, UPLOAD)) p.push(`KEDA counts ${q.inputs.name}, which admits SlideUploaded`);
  }
  const worker = ofType(rs, K.role).find((r) => r.name === "worker");
  const taken = consumed(rs, policyOf(rs, worker)).map((q) => String(q.inputs.name));
  const scaled = counted.filter((q) => q).map((q) => String(q!.inputs.name));
  for (const q of taken) if (!scaled.includes(q)) p.push(`the GPU worker's role takes messages from ${q}, which KEDA does not count`);
  for (const q of scaled) if (!taken.includes(q)) p.push(`the GPU worker's role cannot take messages from ${q}`);
  const verifiers = verifierServices(rs);
  const verifierQueues = verifiers.flatMap(({ td }) => consumed(rs, policyOf(rs, roleByArn(rs, td.inputs.taskRoleArn))));
  const forUploads = verifierQueues.filter((q) => {
    const f = filterOf(rs, q);
    return f && admits(f.policy, UPLOAD) && !admits(f.policy, JOB);
  });
  if (forUploads.length === 0) p.push("no verifier on ECS takes uploads (a queue that admits SlideUploaded and no JobQueued)");
  return p;
}

/**
 * The verify queue watched like the others: its dead letters and its oldest message (within
 * `maxAgeSeconds`) alarm into the alarm topic, and the dashboard shows its depth beside the
 * GPU jobs'.
 */
export function verifyWatchProblems(rs: Recorded[], maxAgeSeconds = 300): string[] {
  const p: string[] = [];
  const topic = alarmTopicArn(rs);
  const [verify, dlq, gpuJobs] = ["verify", "verify-dlq", "gpu-jobs"].map((g) => queueNamed(rs, g)?.state.name);
  const alarmOn = (metric: string, queue: string | undefined) =>
    ofType(rs, K.alarm).filter((a) => metricsOf(a).some((m) => m.namespace === "AWS/SQS" && m.metricName === metric && m.dims.QueueName === queue) && (a.inputs.alarmActions ?? []).includes(topic));
  const age = alarmOn("ApproximateAgeOfOldestMessage", verify);
  if (age.length === 0) p.push(`no alarm into the alarm topic on ${verify}'s oldest message`);
  for (const a of age) if (!(a.inputs.threshold <= maxAgeSeconds)) p.push(`alarm ${a.name}: a verification may wait ${a.inputs.threshold} s, over ${maxAgeSeconds}`);
  if (alarmOn("ApproximateNumberOfMessagesVisible", dlq).length === 0) p.push(`no alarm into the alarm topic on ${dlq}`);
  const dash = ofType(rs, K.dashboard)[0];
  const metrics: unknown[][] = dash ? JSON.parse(dash.inputs.dashboardBody).widgets.flatMap((w: any) => w.properties?.metrics ?? []) : [];
  const shows = (q: string | undefined) => metrics.some((m) => m[0] === "AWS/SQS" && m[1] === "ApproximateNumberOfMessagesVisible" && m[2] === "QueueName" && m[3] === q);
  if (!shows(gpuJobs)) p.push(`the dashboard does not show ${gpuJobs}'s depth`);
  if (!shows(verify)) p.push(`the dashboard does not show ${verify}'s depth`);
  return p;
}

/** The deploy role rolls the verifier onto a new image: it may update the service and pass its two roles. */
export function verifierDeployProblems(rs: Recorded[]): string[] {
  const found = verifierServices(rs);
  if (found.length !== 1) return [`${found.length} ECS services run the worker's image`];
  const { svc, td } = found[0];
  const st = policyOf(rs, ofType(rs, K.role).find((r) => r.name === "deploy"));
  const p: string[] = [];
  for (const a of ["ecs:UpdateService", "ecs:DescribeServices"]) if (!mayDo(st, a, `${svc.name}-id`)) p.push(`the deploy role cannot ${a} the verifier`);
  for (const arn of [td.inputs.taskRoleArn, td.inputs.executionRoleArn]) if (!mayDo(st, "iam:PassRole", arn)) p.push(`the deploy role cannot pass ${arn}`);
  return p;
}
