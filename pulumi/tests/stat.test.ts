// Issue 33: STAT jobs. The relay publishes `priority` on every JobQueued; a STAT job goes to
// gpu-jobs-stat, which the GPU worker polls before gpu-jobs (no preemption), KEDA counts beside
// gpu-jobs, and an alarm watches more closely.

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { checkKedaVersion } from "../src/fleet";
import { OLDEST_MESSAGE_SECONDS } from "../src/observability";
import { filterPolicy, loadTopology, type QueueSpec } from "../src/topology";
import { messagingProblems, statementsOf, workerProblems } from "./checks";
import { ofType, type Recorded, run } from "./harness";
import { K } from "./operations";
import { gpuAccessProblems, priorityRoutingProblems, statWatchProblems } from "./stat";
import { verifierRoleProblems } from "./verifier";

const clone = (rs: Recorded[]): Recorded[] => JSON.parse(JSON.stringify(rs));
const byName = (rs: Recorded[], type: string, name: string) => ofType(rs, type).find((r) => r.name === name)!;
const editStatements = (rs: Recorded[], policy: string, f: (st: any[]) => any[]) => {
  const pol = byName(rs, K.rolePolicy, policy);
  pol.inputs.policy = JSON.stringify({ Statement: f(JSON.parse(pol.inputs.policy).Statement) });
};
const consume = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"];

describe("STAT jobs", () => {
  it("have a fifth queue, with its dead-letter queue and a subscription whose filter policy is the file's, operators intact", async () => {
    const { resources } = await run();
    const t = loadTopology();
    assert.deepEqual(
      t.queues.map((q) => q.group),
      ["projections", "gpu-jobs", "handlers", "verify", "gpu-jobs-stat"],
    );
    assert.deepEqual(messagingProblems(resources), []);
    for (const name of ["gpu-jobs-stat", "gpu-jobs-stat-dlq"]) assert.ok(byName(resources, K.queue, name), name);
    const policy = (rs: Recorded[], group: string) => JSON.parse(ofType(rs, K.subscription).find((s) => s.inputs.endpoint === byName(rs, K.queue, group).state.arn)!.inputs.filterPolicy);
    assert.deepEqual(policy(resources, "gpu-jobs-stat"), { event_type: ["JobQueued"], priority: ["stat"] });
    // The operator stays an object: SNS reads `{"exists": false}` as "no priority attribute".
    assert.deepEqual(policy(resources, "gpu-jobs"), { event_type: ["JobQueued"], priority: [{ exists: false }, "routine"] });
    assert.deepEqual(policy(resources, "gpu-jobs"), t.queues.find((q) => q.group === "gpu-jobs")!.filter_policy);
    // Broken: the operator written as a string (SNS would match the literal text), and the STAT
    // queue's subscription dropped.
    const broken = clone(resources);
    const sub = ofType(broken, K.subscription).find((s) => s.inputs.endpoint === byName(broken, K.queue, "gpu-jobs").state.arn)!;
    sub.inputs.filterPolicy = JSON.stringify({ event_type: ["JobQueued"], priority: [JSON.stringify({ exists: false }), "routine"] });
    const gone = broken.filter((r) => r.name !== "gpu-jobs-stat-subscription");
    assert.deepEqual(messagingProblems(gone), [
      "4 subscriptions",
      'mira-test-gpu-jobs.fifo: filter policy {"event_type":["JobQueued"],"priority":["{\\"exists\\":false}","routine"]}',
      "mira-test-gpu-jobs-stat.fifo: no subscription",
    ]);
  });

  it("reach exactly one GPU queue by priority: STAT to gpu-jobs-stat; routine, or none from an older relay, to gpu-jobs", async () => {
    const { resources } = await run();
    assert.deepEqual(priorityRoutingProblems(resources), []);
    // Broken: the file without the older relay's case, and a subscription that sends a STAT
    // job to both queues (two workers would run it).
    const older = loadTopology();
    older.queues = older.queues.map((q) => (q.group === "gpu-jobs" ? { ...q, filter_policy: { event_type: ["JobQueued"], priority: ["routine"] } } : q));
    const broken = clone(resources);
    const sub = ofType(broken, K.subscription).find((s) => s.inputs.endpoint === byName(broken, K.queue, "gpu-jobs").state.arn)!;
    sub.inputs.filterPolicy = JSON.stringify({ event_type: ["JobQueued"] });
    assert.deepEqual(priorityRoutingProblems(broken, older), [
      "bus/topology.json: a JobQueued without priority (a relay of the release before) reaches [], not [gpu-jobs]",
      "the subscriptions: a STAT JobQueued reaches [gpu-jobs, gpu-jobs-stat], not [gpu-jobs-stat]",
    ]);
    // Broken: the relay's attribute not in the file.
    const unpublished = loadTopology();
    unpublished.message_attributes = unpublished.message_attributes.filter((a) => a !== "priority");
    assert.deepEqual(priorityRoutingProblems(resources, unpublished), ["bus/topology.json: the relay publishes no priority (message_attributes)"]);
  });

  it("give SNS a filter policy checked against the file: operators as objects, attributes the relay publishes", () => {
    const t = loadTopology();
    const spec = t.queues.find((q) => q.group === "gpu-jobs")!;
    assert.deepEqual(JSON.parse(filterPolicy(spec, t)!), spec.filter_policy);
    assert.equal(filterPolicy(t.queues.find((q) => q.group === "projections")!, t), undefined);
    const bad = (filter_policy: QueueSpec["filter_policy"]) => () => filterPolicy({ group: "gpu-jobs", filter_policy }, t);
    assert.throws(bad({ urgency: ["stat"] }), /filter policy on urgency: the relay publishes no such attribute/);
    assert.throws(bad({ priority: [{ exists: false, prefix: "r" }] }), /is neither a string nor an SNS operator/);
    assert.throws(bad({ priority: [{ exist: false }] }), /is neither a string nor an SNS operator/);
    assert.throws(bad({ priority: [] }), /not a non-empty array/);
  });

  it("are taken by the GPU worker, counted by KEDA, and out of the verifier's reach", async () => {
    const { resources } = await run();
    assert.deepEqual(gpuAccessProblems(resources), []);
    assert.deepEqual(workerProblems(statementsOf(resources, "worker")), []);
    assert.deepEqual(verifierRoleProblems(resources), []);
    const stat = byName(resources, K.queue, "gpu-jobs-stat").state.arn;
    // Broken: the worker's role without gpu-jobs-stat, KEDA's reading gpu-jobs only, and the
    // verifier's taking STAT jobs.
    const broken = clone(resources);
    editStatements(broken, "worker-policy", (st) => st.filter((s) => !(s.Action.includes("sqs:ReceiveMessage") && s.Resource.includes(stat))));
    editStatements(broken, "keda-operator-policy", (st) => st.map((s) => ({ ...s, Resource: s.Resource.filter((r: string) => r !== stat) })));
    editStatements(broken, "verifier-policy", (st) => [...st, { Effect: "Allow", Action: consume, Resource: [stat] }]);
    assert.deepEqual(gpuAccessProblems(broken), [
      "the GPU worker cannot sqs:ReceiveMessage on gpu-jobs-stat",
      "the GPU worker cannot sqs:DeleteMessage on gpu-jobs-stat",
      "the GPU worker cannot sqs:ChangeMessageVisibility on gpu-jobs-stat",
      "the GPU worker cannot sqs:GetQueueAttributes on gpu-jobs-stat",
      "KEDA cannot read gpu-jobs-stat's depth",
      "the verifier may sqs:ReceiveMessage on gpu-jobs-stat",
      "the verifier may sqs:DeleteMessage on gpu-jobs-stat",
      "the verifier may sqs:ChangeMessageVisibility on gpu-jobs-stat",
    ]);
    assert.deepEqual(workerProblems(statementsOf(broken, "worker")), [
      "cannot sqs:ReceiveMessage on mira-test-gpu-jobs-stat.fifo",
      "cannot sqs:DeleteMessage on mira-test-gpu-jobs-stat.fifo",
      "cannot sqs:ChangeMessageVisibility on mira-test-gpu-jobs-stat.fifo",
      "cannot sqs:GetQueueAttributes on mira-test-gpu-jobs-stat.fifo",
    ]);
    assert.deepEqual(verifierRoleProblems(broken), consume.map((a) => `${a} on mira-test-gpu-jobs-stat.fifo`));
    // Broken: KEDA given more than queue depths.
    const greedy = clone(resources);
    editStatements(greedy, "keda-operator-policy", (st) => [...st, { Effect: "Allow", Action: ["sqs:ReceiveMessage"], Resource: [stat] }]);
    assert.deepEqual(gpuAccessProblems(greedy), [`KEDA may sqs:ReceiveMessage on ${stat}`]);
  });

  it("need a KEDA with scalingModifiers (2.12 or later), whose sum of the two queues an older one would drop", () => {
    for (const v of ["2.12.0", "2.20.2", "3.0.0"]) assert.doesNotThrow(() => checkKedaVersion(v), v);
    for (const v of ["2.11.2", "1.5.0", "2.20", "latest"]) assert.throws(() => checkKedaVersion(v), /mira:kedaVersion .* 2\.12\.0 or later/, v);
  });

  it("ring sooner than routine jobs when they wait: gpu-jobs-stat's oldest message at 900 s, its depth beside gpu-jobs's", async () => {
    const { resources } = await run();
    assert.equal(OLDEST_MESSAGE_SECONDS["gpu-jobs-stat"], 900);
    assert.deepEqual(statWatchProblems(resources, 900), []);
    const alarm = byName(resources, K.alarm, "gpu-jobs-stat-oldest-message").inputs;
    assert.deepEqual([alarm.metricName, alarm.dimensions.QueueName, alarm.threshold, alarm.evaluationPeriods], ["ApproximateAgeOfOldestMessage", "mira-test-gpu-jobs-stat.fifo", 900, 5]);
    // Broken: the routine half hour for a STAT job, no dead-letter alarm, and the STAT depth in
    // a widget of its own.
    const broken = clone(resources).filter((r) => r.name !== "gpu-jobs-stat-dlq-not-empty");
    byName(broken, K.alarm, "gpu-jobs-stat-oldest-message").inputs.threshold = 1800;
    const dash = ofType(broken, K.dashboard)[0].inputs;
    const body = JSON.parse(dash.dashboardBody);
    body.widgets = body.widgets.flatMap((w: any) => {
      const metrics: unknown[][] = w.properties?.metrics ?? [];
      const isStat = (m: unknown[]) => m[3] === "mira-test-gpu-jobs-stat.fifo";
      if (!metrics.some(isStat) || metrics.every(isStat)) return [w];
      return [
        { ...w, properties: { ...w.properties, metrics: metrics.filter((m) => !isStat(m)) } },
        { ...w, properties: { ...w.properties, title: "STAT", metrics: metrics.filter(isStat) } },
      ];
    });
    dash.dashboardBody = JSON.stringify(body);
    assert.deepEqual(statWatchProblems(broken, 900), [
      "alarm gpu-jobs-stat-oldest-message: a STAT job may wait 1800 s, over 900",
      "alarm gpu-jobs-stat-oldest-message: a STAT job may wait 1800 s, no sooner than a routine one (1800)",
      "no alarm into the alarm topic on mira-test-gpu-jobs-stat-dlq.fifo",
      "the dashboard does not show mira-test-gpu-jobs-stat.fifo's depth beside mira-test-gpu-jobs.fifo's",
    ]);
  });
});
