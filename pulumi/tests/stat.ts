// What issue 33 requires of the program for STAT jobs (the `priority` attribute, the
// gpu-jobs-stat queue), as functions over the recorded resources that return the problems found
// (as in checks.ts, operations.ts and verifier.ts): each test runs them on the program and on a
// broken copy.

import { loadTopology, type Topology } from "../src/topology";
import { ofType, type Recorded } from "./harness";
import { alarmTopicArn, K, list, mayDo, metricsOf, policyOf, type Stmt } from "./operations";
import { admits, JOB, OLD_JOB, STAT_JOB, UPLOAD, verifierServices } from "./verifier";

/** The GPU worker's queues, each with the job it must take. */
export const GPU_GROUPS = ["gpu-jobs", "gpu-jobs-stat"] as const;
const MESSAGES: [string, Record<string, string>, string | null][] = [
  ["a routine JobQueued", JOB, "gpu-jobs"],
  ["a STAT JobQueued", STAT_JOB, "gpu-jobs-stat"],
  ["a JobQueued without priority (a relay of the release before)", OLD_JOB, "gpu-jobs"],
  ["a SlideUploaded", UPLOAD, null],
];

const byName = (rs: Recorded[], type: string, name: string) => ofType(rs, type).find((r) => r.name === name);
const roleNamed = (rs: Recorded[], name: string) => byName(rs, K.role, name);

/**
 * Each JobQueued reaches exactly one GPU queue, by its priority: routine and none (a relay of the
 * release before publishes no `priority`) to gpu-jobs, `stat` to gpu-jobs-stat; an upload to
 * neither. Both in bus/topology.json and in the subscriptions the program made from it (their
 * filter policies parsed back, so an operator written as a string instead of an object shows).
 * One queue only: a job in both would be run twice, by two workers.
 */
export function priorityRoutingProblems(rs: Recorded[], topology: Topology = loadTopology()): string[] {
  const p: string[] = [];
  if (!topology.message_attributes.includes("priority")) p.push("bus/topology.json: the relay publishes no priority (message_attributes)");
  const fromFile = new Map(topology.queues.map((q) => [q.group, q.filter_policy]));
  const fromSubs = new Map(
    GPU_GROUPS.map((g) => {
      const q = byName(rs, K.queue, g);
      const sub = q && ofType(rs, K.subscription).find((s) => s.inputs.endpoint === q.state.arn);
      return [g, sub ? (sub.inputs.filterPolicy ? JSON.parse(sub.inputs.filterPolicy) : null) : undefined] as const;
    }),
  );
  for (const [where, policies] of [
    ["bus/topology.json", fromFile],
    ["the subscriptions", fromSubs],
  ] as const) {
    for (const g of GPU_GROUPS) if (policies.get(g) === undefined) p.push(`${where}: no ${g}`);
    for (const [what, attrs, want] of MESSAGES) {
      const got = GPU_GROUPS.filter((g) => policies.get(g) !== undefined && admits(policies.get(g), attrs));
      const expected = want ? [want] : [];
      if (JSON.stringify(got) !== JSON.stringify(expected)) p.push(`${where}: ${what} reaches [${got.join(", ")}], not [${expected.join(", ")}]`);
    }
  }
  return p;
}

/**
 * Who reaches the GPU queues: the GPU worker's role takes messages from both (receive, delete,
 * change visibility, read attributes) and finds them by name; KEDA's operator role reads both
 * queues' attributes and nothing else of SQS; the slide verifier's role takes from neither.
 */
export function gpuAccessProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const worker = policyOf(rs, roleNamed(rs, "worker"));
  const keda = policyOf(rs, roleNamed(rs, "keda-operator"));
  const verifier = verifierServices(rs).flatMap(({ td }) => policyOf(rs, ofType(rs, K.role).find((r) => r.state.arn === td.inputs.taskRoleArn)));
  if (worker.length === 0) p.push("no worker role");
  if (keda.length === 0) p.push("no keda-operator role");
  if (verifier.length === 0) p.push("no verifier role");
  for (const g of GPU_GROUPS) {
    const q = byName(rs, K.queue, g);
    if (!q) {
      p.push(`no ${g} queue`);
      continue;
    }
    const arn = q.state.arn as string;
    for (const a of ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueAttributes", "sqs:GetQueueUrl"]) {
      if (!mayDo(worker, a, arn)) p.push(`the GPU worker cannot ${a} on ${g}`);
    }
    if (!mayDo(keda, "sqs:GetQueueAttributes", arn)) p.push(`KEDA cannot read ${g}'s depth`);
    for (const a of ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"]) {
      if (mayDo(verifier, a, arn)) p.push(`the verifier may ${a} on ${g}`);
    }
  }
  const sqs = (st: Stmt[]) => st.filter((s) => s.Effect === "Allow").flatMap((s) => list(s.Action).filter((a) => a.startsWith("sqs:")).flatMap((a) => list(s.Resource).map((r) => [a, r])));
  const gpuArns = GPU_GROUPS.map((g) => byName(rs, K.queue, g)?.state.arn);
  for (const [a, r] of sqs(keda)) if (a !== "sqs:GetQueueAttributes" || !gpuArns.includes(r)) p.push(`KEDA may ${a} on ${r}`);
  return p;
}

/**
 * gpu-jobs-stat watched like the other queues, more closely than gpu-jobs: its oldest message
 * alarms (into the alarm topic) at `maxAgeSeconds` or less, and sooner than gpu-jobs's; its
 * dead letters alarm; the dashboard shows its depth in the same widget as gpu-jobs's.
 */
export function statWatchProblems(rs: Recorded[], maxAgeSeconds: number): string[] {
  const p: string[] = [];
  const topic = alarmTopicArn(rs);
  const [routine, stat, statDlq] = ["gpu-jobs", "gpu-jobs-stat", "gpu-jobs-stat-dlq"].map((g) => byName(rs, K.queue, g)?.state.name as string | undefined);
  const alarmsOn = (metric: string, queue: string | undefined) =>
    ofType(rs, K.alarm).filter(
      (a) => metricsOf(a).some((m) => m.namespace === "AWS/SQS" && m.metricName === metric && m.dims.QueueName === queue) && (a.inputs.alarmActions ?? []).includes(topic),
    );
  const age = alarmsOn("ApproximateAgeOfOldestMessage", stat);
  const routineAge = Math.min(...alarmsOn("ApproximateAgeOfOldestMessage", routine).map((a) => a.inputs.threshold));
  if (age.length === 0) p.push(`no alarm into the alarm topic on ${stat}'s oldest message`);
  for (const a of age) {
    if (!(a.inputs.threshold <= maxAgeSeconds)) p.push(`alarm ${a.name}: a STAT job may wait ${a.inputs.threshold} s, over ${maxAgeSeconds}`);
    if (!(a.inputs.threshold < routineAge)) p.push(`alarm ${a.name}: a STAT job may wait ${a.inputs.threshold} s, no sooner than a routine one (${routineAge})`);
  }
  if (alarmsOn("ApproximateNumberOfMessagesVisible", statDlq).length === 0) p.push(`no alarm into the alarm topic on ${statDlq}`);
  const dash = ofType(rs, K.dashboard)[0];
  const widgets: any[] = dash ? JSON.parse(dash.inputs.dashboardBody).widgets : [];
  const shows = (w: any, q: string | undefined) =>
    (w.properties?.metrics ?? []).some((m: unknown[]) => m[0] === "AWS/SQS" && m[1] === "ApproximateNumberOfMessagesVisible" && m[2] === "QueueName" && m[3] === q);
  if (!widgets.some((w) => shows(w, stat))) p.push(`the dashboard does not show ${stat}'s depth`);
  else if (!widgets.some((w) => shows(w, stat) && shows(w, routine))) p.push(`the dashboard does not show ${stat}'s depth beside ${routine}'s`);
  return p;
}
