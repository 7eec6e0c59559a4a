// Issue 32: slides are verified by `mira-worker verify` on ECS Fargate, scaled on the verify
// queue, and an upload no longer wakes the GPU fleet.

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { loadTopology } from "../src/topology";
import { startupProblems } from "./checks";
import { CONFIG, ofType, type Recorded, run } from "./harness";
import { envOf, K, secretAccessProblems, serviceLoginProblems } from "./operations";
import {
  admits,
  gpuWakeProblems,
  JOB,
  STAT_JOB,
  UPLOAD,
  verifierDeployProblems,
  verifierProblems,
  verifierRoleProblems,
  verifierScalingProblems,
  verifierServices,
  verifyWatchProblems,
} from "./verifier";

const clone = (rs: Recorded[]): Recorded[] => JSON.parse(JSON.stringify(rs));
const byName = (rs: Recorded[], type: string, name: string) => ofType(rs, type).find((r) => r.name === name)!;
const arnOf = (rs: Recorded[], type: string, name: string): string => byName(rs, type, name).state.arn;
/** Edits the verifier's `mira` container in place. */
const editVerifier = (rs: Recorded[], f: (c: any) => void) => {
  const td = byName(rs, K.taskDef, "verifier-task");
  const cs = JSON.parse(td.inputs.containerDefinitions);
  f(cs.find((c: any) => c.name === "mira"));
  td.inputs.containerDefinitions = JSON.stringify(cs);
};
const addStatement = (rs: Recorded[], policy: string, statement: object) => {
  const pol = byName(rs, K.rolePolicy, policy);
  pol.inputs.policy = JSON.stringify({ Statement: [...JSON.parse(pol.inputs.policy).Statement, statement] });
};
const editStatements = (rs: Recorded[], policy: string, f: (st: any[]) => any[]) => {
  const pol = byName(rs, K.rolePolicy, policy);
  pol.inputs.policy = JSON.stringify({ Statement: f(JSON.parse(pol.inputs.policy).Statement) });
};
const consume = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"];

describe("the slide verifier", () => {
  it("runs in the ECS cluster from the worker's image, as mira-worker verify, with the worker's settings and login", async () => {
    const { resources } = await run();
    assert.deepEqual(verifierProblems(resources, CONFIG), []);
    assert.deepEqual(serviceLoginProblems(resources), []);
    assert.deepEqual(secretAccessProblems(resources), []);
    const [v] = verifierServices(resources);
    assert.equal(v.svc.inputs.name, "mira-test-verifier");
    assert.equal(v.td.inputs.family, "mira-test-verifier");
    assert.equal(v.mira.image, "123456789012.dkr.ecr.eu-west-1.amazonaws.com/mira-wsi-worker:test");
    assert.deepEqual(v.mira.command, ["verify"]);
    // /metrics on the task's loopback, as the worker's in its pod; no collector scrapes it.
    assert.equal(envOf(v.mira).MIRA_METRICS_LISTEN, "127.0.0.1:9464");
    assert.deepEqual(JSON.parse(v.td.inputs.containerDefinitions).map((c: any) => c.name), ["mira"]);
    // Broken: the API's image, `run` (the GPU consumer), a size off the config, a collector
    // beside it, the API's login, a setting the worker does not get and one it does missing,
    // and the desired count managed by `pulumi up`.
    const broken = clone(resources);
    const api = arnOf(broken, K.secret, "db-login-api");
    editVerifier(broken, (c) => {
      c.command = ["run"];
      c.secrets = [{ name: "DATABASE_URL", valueFrom: api }];
      c.environment = [...c.environment.filter((e: any) => e.name !== "Worker__LeaseSeconds"), { name: "MIRA_GPU", value: "off" }];
    });
    const td = byName(broken, K.taskDef, "verifier-task");
    td.inputs.cpu = "512";
    td.inputs.containerDefinitions = JSON.stringify([...JSON.parse(td.inputs.containerDefinitions), { name: "adot", image: "adot" }]);
    byName(broken, K.service, "verifier").ignoreChanges = ["taskDefinition"];
    assert.deepEqual(verifierProblems(broken, CONFIG), [
      "runs mira-worker run, not mira-worker verify",
      "task size 512 CPU / 2048 MiB, not 1024 / 2048",
      "containers mira,adot: the verifier's task is its mira container alone",
      "Worker__LeaseSeconds is not set, the worker's is 60",
      "MIRA_GPU is set, and not for the worker",
      "DATABASE_URL is " + api + ", not the worker login's secret",
      "pulumi up would reset the service's desiredCount (ignoreChanges)",
    ]);
    // Broken: the worker pod's trace export given to the verifier, whose task has no collector.
    const traced = clone(resources);
    editVerifier(traced, (c) => c.environment.push({ name: "OTEL_EXPORTER_OTLP_ENDPOINT", value: "http://127.0.0.1:4318" }));
    assert.deepEqual(verifierProblems(traced, CONFIG), ["OTEL_EXPORTER_OTLP_ENDPOINT is set, and the verifier's task has no collector"]);
    // Broken: no metrics listener; then one on every address of the task, mapped as a port.
    const unserved = clone(resources);
    editVerifier(unserved, (c) => (c.environment = c.environment.filter((e: any) => e.name !== "MIRA_METRICS_LISTEN")));
    assert.deepEqual(verifierProblems(unserved, CONFIG), [
      "MIRA_METRICS_LISTEN is not set, the worker's is 127.0.0.1:9464",
      "its /metrics is on no address, not the task's loopback 127.0.0.1:9464",
    ]);
    const exposed = clone(resources);
    editVerifier(exposed, (c) => {
      c.environment.find((e: any) => e.name === "MIRA_METRICS_LISTEN").value = "0.0.0.0:9464";
      c.portMappings = [{ containerPort: 9464, protocol: "tcp" }];
    });
    assert.deepEqual(verifierProblems(exposed, CONFIG), [
      "MIRA_METRICS_LISTEN is 0.0.0.0:9464, the worker's is 127.0.0.1:9464",
      "its /metrics is on 0.0.0.0:9464, not the task's loopback 127.0.0.1:9464",
      "container mira maps port 9464",
    ]);
    // The logins' checks see the API's login too: the service and the execution role.
    assert.deepEqual(serviceLoginProblems(broken), ["service mira-test-verifier: DATABASE_URL is the api login's secret, not the worker login's secret"]);
    assert.deepEqual(secretAccessProblems(broken), [
      "mira-test-verifier: its execution role verifier-execution cannot read the api login's secret, which the task injects",
      "mira-test-verifier: its execution role verifier-execution may read the worker login's secret",
    ]);
    // Broken: the API's image; then no service of the worker's image at all.
    const apiImage = clone(resources);
    editVerifier(apiImage, (c) => (c.image = c.image.replace("mira-wsi-worker", "mira-api")));
    assert.deepEqual(verifierProblems(apiImage, CONFIG), ["0 ECS services run the worker's image"]);
  });

  it("consumes the verify queue and reads the slides' immutable copies, and nothing of gpu-jobs or the results bucket", async () => {
    const { resources } = await run();
    assert.deepEqual(verifierRoleProblems(resources), []);
    // What every bus client calls at start: the topic, and every queue's URL.
    assert.deepEqual(startupProblems(resources, "verifier", false), []);
    const gpuJobs = arnOf(resources, K.queue, "gpu-jobs");
    const results = arnOf(resources, K.bucket, "results");
    const uploads = arnOf(resources, K.bucket, "uploads");
    // Broken: gpu-jobs consumed, results written, the uploads read beyond the copies, the
    // login's secret read by the task itself, and the copies' versions not readable.
    const broken = clone(resources);
    addStatement(broken, "verifier-policy", { Effect: "Allow", Action: consume, Resource: [gpuJobs] });
    addStatement(broken, "verifier-policy", { Effect: "Allow", Action: ["s3:PutObject", "s3:GetObject"], Resource: [`${results}/*`, `${uploads}/*`] });
    addStatement(broken, "verifier-policy", { Effect: "Allow", Action: ["secretsmanager:GetSecretValue"], Resource: [arnOf(broken, K.secret, "db-login-worker")] });
    editStatements(broken, "verifier-policy", (st) => st.map((s) => ({ ...s, Action: s.Action.filter((a: string) => a !== "s3:GetObjectVersion") })));
    assert.deepEqual(verifierRoleProblems(broken), [
      "cannot s3:GetObjectVersion on a slide's immutable copy",
      "sqs:ReceiveMessage on mira-test-gpu-jobs.fifo",
      "sqs:DeleteMessage on mira-test-gpu-jobs.fifo",
      "sqs:ChangeMessageVisibility on mira-test-gpu-jobs.fifo",
      "s3:PutObject on the results bucket",
      `s3:PutObject on ${uploads}/*`,
      `s3:GetObject on ${uploads}/*, beyond the immutable copies`,
      `secretsmanager:GetSecretValue on ${arnOf(broken, K.secret, "db-login-worker")}: ECS injects its login`,
    ]);
    // Broken: the verify queue not consumed, and publishing to the topic.
    const noQueue = clone(resources);
    editStatements(noQueue, "verifier-policy", (st) => st.filter((s) => !s.Action.includes("sqs:ReceiveMessage")));
    addStatement(noQueue, "verifier-policy", { Effect: "Allow", Action: ["sns:Publish"], Resource: [arnOf(noQueue, K.topic, "events")] });
    assert.deepEqual(verifierRoleProblems(noQueue), [
      "cannot sqs:ReceiveMessage on the verify queue",
      "cannot sqs:DeleteMessage on the verify queue",
      "cannot sqs:ChangeMessageVisibility on the verify queue",
      `sns:Publish on ${arnOf(noQueue, K.topic, "events")}`,
    ]);
  });

  it("scales on the verify queue with Application Auto Scaling, from verifierMinTasks to verifierMaxTasks", async () => {
    const { resources } = await run();
    assert.equal(CONFIG.verifierMinTasks, 1);
    assert.deepEqual(verifierScalingProblems(resources, CONFIG.verifierMinTasks, CONFIG.verifierMaxTasks), []);
    const target = byName(resources, K.scalingTarget, "verifier-scaling").inputs;
    assert.deepEqual([target.resourceId, target.minCapacity, target.maxCapacity], ["service/mira-test/mira-test-verifier", 1, 4]);
    // Broken: from zero to 8, the scale-out alarm on gpu-jobs, the scale-in alarm blind to the
    // slides in flight.
    const broken = clone(resources);
    const t = byName(broken, K.scalingTarget, "verifier-scaling").inputs;
    t.minCapacity = 0;
    t.maxCapacity = 8;
    byName(broken, K.alarm, "verifier-backlog").inputs.dimensions.QueueName = "mira-test-gpu-jobs.fifo";
    const idle = byName(broken, K.alarm, "verifier-idle").inputs;
    idle.metricQueries = idle.metricQueries.filter((q: any) => q.id !== "inflight").map((q: any) => (q.expression ? { ...q, expression: "visible" } : q));
    assert.deepEqual(verifierScalingProblems(broken, 1, 4), [
      "from 0 to 8 tasks, not 1 to 4",
      "scales to 0: every first job would wait for a verifier to start",
      "alarm verifier-backlog reads AWS/SQS ApproximateNumberOfMessagesVisible of mira-test-gpu-jobs.fifo",
      "alarm verifier-idle does not read ApproximateNumberOfMessagesNotVisible",
    ]);
    // Broken: no scale-in policy, and the scale-out alarm wired to nothing.
    const none = clone(resources).filter((r) => r.name !== "verifier-scale-in");
    byName(none, K.alarm, "verifier-backlog").inputs.alarmActions = [];
    assert.deepEqual(verifierScalingProblems(none, 1, 4), ["no alarm sets off verifier-scale-out", "no policy scales in"]);
  });

  it("lets the deploy role roll it onto a new image", async () => {
    const { resources } = await run();
    assert.deepEqual(verifierDeployProblems(resources), []);
    const broken = clone(resources);
    const role = byName(broken, K.role, "verifier").state.arn;
    editStatements(broken, "deploy-policy", (st) =>
      st.map((s) => ({ ...s, Resource: s.Resource.filter((r: string) => r !== "verifier-id" && r !== role) })),
    );
    assert.deepEqual(verifierDeployProblems(broken), [
      "the deploy role cannot ecs:UpdateService the verifier",
      "the deploy role cannot ecs:DescribeServices the verifier",
      `the deploy role cannot pass ${role}`,
    ]);
  });

  it("is watched like the other consumers: the verify queue's age within 5 minutes, its depth on the dashboard", async () => {
    const { resources } = await run();
    assert.deepEqual(verifyWatchProblems(resources), []);
    assert.equal(byName(resources, K.alarm, "verify-oldest-message").inputs.threshold, 300);
    // Broken: the GPU jobs' half hour for a verification, and the dashboard without the queue.
    const broken = clone(resources);
    byName(broken, K.alarm, "verify-oldest-message").inputs.threshold = 1800;
    const dash = ofType(broken, K.dashboard)[0].inputs;
    const body = JSON.parse(dash.dashboardBody);
    body.widgets = body.widgets.filter((w: any) => !JSON.stringify(w.properties?.metrics ?? []).includes("verify.fifo"));
    dash.dashboardBody = JSON.stringify(body);
    assert.deepEqual(verifyWatchProblems(broken), [
      "alarm verify-oldest-message: a verification may wait 1800 s, over 300",
      "the dashboard does not show mira-test-verify.fifo's depth",
    ]);
  });
});

describe("the GPU fleet", () => {
  it("wakes on JobQueued only: KEDA counts gpu-jobs and gpu-jobs-stat, which admit no SlideUploaded, and the GPU worker consumes nothing else", async () => {
    const { resources } = await run();
    assert.deepEqual(gpuWakeProblems(resources), []);
    // The routing itself, from the file: an upload goes to verify (and to the CPU consumers
    // that take every slide event), a queued job to gpu-jobs, or to gpu-jobs-stat if STAT.
    const groups = (attrs: Record<string, string>) => loadTopology().queues.filter((q) => admits(q.filter_policy, attrs)).map((q) => q.group);
    assert.deepEqual(groups(UPLOAD), ["projections", "handlers", "verify"]);
    assert.deepEqual(groups(JOB), ["projections", "gpu-jobs", "handlers"]);
    assert.deepEqual(groups(STAT_JOB), ["projections", "handlers", "gpu-jobs-stat"]);
    // KEDA counts both GPU queues (its other triggers read CloudWatch, no queue), and the
    // worker's role takes from both.
    const counted = ofType(resources, K.scaledObject)[0]
      .inputs.spec.triggers.filter((t: any) => t.type === "aws-sqs-queue")
      .map((t: any) => t.metadata.queueURL);
    assert.deepEqual(counted.sort(), ["gpu-jobs", "gpu-jobs-stat"].map((g) => byName(resources, K.queue, g).state.url).sort());
    // Broken: the topology as it was (gpu-jobs admitting uploads), in the file and in the
    // subscription the program made from it.
    const before = loadTopology();
    before.queues = before.queues.map((q) => (q.group === "gpu-jobs" ? { ...q, filter_policy: { event_type: ["JobQueued", "SlideUploaded"] } } : q));
    const broken = clone(resources);
    byName(broken, K.subscription, "gpu-jobs-subscription").inputs.filterPolicy = JSON.stringify({ event_type: ["JobQueued", "SlideUploaded"] });
    assert.deepEqual(gpuWakeProblems(broken, before), [
      'bus/topology.json: gpu-jobs admits SlideUploaded ({"event_type":["JobQueued","SlideUploaded"]})',
      "KEDA counts mira-test-gpu-jobs.fifo, which admits SlideUploaded",
    ]);
    // Broken: the GPU worker's role consuming the verify queue too.
    const greedy = clone(resources);
    addStatement(greedy, "worker-policy", { Effect: "Allow", Action: consume, Resource: [arnOf(greedy, K.queue, "verify")] });
    assert.deepEqual(gpuWakeProblems(greedy), ["the GPU worker's role takes messages from mira-test-verify.fifo, which KEDA does not count"]);
    // Broken: KEDA on the verify queue (which admits uploads) instead of gpu-jobs, and no
    // verifier service left.
    const wrong = clone(resources).filter((r) => !(r.type === K.service && r.name === "verifier"));
    const so = ofType(wrong, K.scaledObject)[0].inputs.spec;
    so.triggers.find((t: any) => t.metadata.queueURL === byName(wrong, K.queue, "gpu-jobs").state.url).metadata.queueURL = byName(wrong, K.queue, "verify").state.url;
    assert.deepEqual(gpuWakeProblems(wrong), [
      "KEDA counts mira-test-verify.fifo, which admits SlideUploaded",
      "the GPU worker's role takes messages from mira-test-gpu-jobs.fifo, which KEDA does not count",
      "the GPU worker's role cannot take messages from mira-test-verify.fifo",
      "no verifier on ECS takes uploads (a queue that admits SlideUploaded and no JobQueued)",
    ]);
  });
});
