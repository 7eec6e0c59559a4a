import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { CONFIG, ofType, type Recorded, run, urnOf } from "./harness";
import { validateK8s } from "./k8s/validate";
import * as fs from "node:fs";
import * as path from "node:path";
import { checkJobsSettings, JOBS_DEFAULTS } from "../src/foundations";
import { WITNESS_STALE_SECONDS } from "../src/observability";
import {
  adotConfigs,
  adotProduces,
  alarmProblems,
  cdnProblems,
  exportedMetrics,
  healthAlarmProblems,
  K,
  listenerOrderProblems,
  kubernetesObjects,
  METRICS_LISTEN,
  metricsListenProblems,
  relayProblems,
  scalerProblems,
  trustedKeyProblems,
  verifyProblems,
  WAITING,
  waitingScalerProblems,
  WITNESS_METRICS,
  witnessAlarmProblems,
  workerProblems,
} from "./operations";

const clone = (rs: Recorded[]): Recorded[] => JSON.parse(JSON.stringify(rs));
const find = (rs: Recorded[], type: string) => ofType(rs, type)[0];

describe("compute and operations", () => {
  it("make Kubernetes objects valid against Kubernetes' and KEDA's schemas", async () => {
    const { resources } = await run();
    const objects = kubernetesObjects(resources);
    assert.deepEqual(
      objects.map((o) => o.kind).sort(),
      ["DaemonSet", "Deployment", "Namespace", "PodDisruptionBudget", "ScaledObject", "ServiceAccount", "TriggerAuthentication"],
    );
    assert.deepEqual(validateK8s(objects, CONFIG.kubernetesVersion), []);
    // Broken: a misspelt field on the Deployment, the ScaledObject without its queue.
    const broken = clone(resources);
    const dep = find(broken, K.deployment).inputs;
    dep.spec.template.spec.terminationGracePeriodSecond = dep.spec.template.spec.terminationGracePeriodSeconds;
    delete dep.spec.template.spec.terminationGracePeriodSeconds;
    delete find(broken, K.scaledObject).inputs.spec.triggers[0].metadata.queueURL;
    const found = validateK8s(kubernetesObjects(broken), CONFIG.kubernetesVersion);
    assert.equal(found.length, 2, String(found));
    assert.ok(found.some((x) => x.startsWith("Deployment/") && x.includes("terminationGracePeriodSecond")), String(found));
    assert.ok(found.some((x) => x.startsWith("ScaledObject/") && x.includes("queueURL")), String(found));
  });

  it("scale the worker on the gpu-jobs and gpu-jobs-stat queues of the foundations and the jobs waiting for admission, from zero, on their sum", async () => {
    const { out, resources } = await run();
    const urls: Record<string, string> = {};
    for (const g of ["gpu-jobs", "gpu-jobs-stat"]) urls[g] = await new Promise<string>((ok) => out.messaging.queueUrls[g].apply(ok));
    assert.match(urls["gpu-jobs"], /gpu-jobs\.fifo$/);
    assert.match(urls["gpu-jobs-stat"], /gpu-jobs-stat\.fifo$/);
    const q = CONFIG.workerQueueLength;
    assert.deepEqual(scalerProblems(resources, urls, CONFIG.workerMaxReplicas, q), []);
    assert.deepEqual(find(resources, K.scaledObject).inputs.spec.advanced.scalingModifiers, {
      formula: "stat + routine + backlog + urgent",
      target: String(q),
      metricType: "AverageValue",
    });
    const broken = clone(resources);
    const so = find(broken, K.scaledObject).inputs.spec;
    so.minReplicaCount = 1;
    so.triggers.find((t: any) => t.metadata.queueURL === urls["gpu-jobs"]).metadata.queueURL = urls["gpu-jobs"].replace("gpu-jobs", "handlers");
    find(broken, K.triggerAuth).inputs.spec.podIdentity = { provider: "aws-eks" };
    const found = scalerProblems(broken, urls, CONFIG.workerMaxReplicas, q);
    assert.equal(found.length, 4, String(found));
    assert.ok(
      found[0].startsWith("minReplicaCount") && found[1].startsWith("0 triggers on the gpu-jobs queue") && found[2].includes("handlers.fifo is not one of") && found[3].includes("aws-eks"),
      String(found),
    );
    // Broken: the STAT queue's trigger dropped (KEDA would not count a STAT job), and the sum
    // gone (KEDA would scale on the larger of the two).
    const onlyRoutine = clone(resources);
    const spec = find(onlyRoutine, K.scaledObject).inputs.spec;
    spec.triggers = spec.triggers.filter((t: any) => t.metadata.queueURL !== urls["gpu-jobs-stat"]);
    assert.deepEqual(scalerProblems(onlyRoutine, urls, CONFIG.workerMaxReplicas, q), [
      "triggers: aws-sqs-queue,aws-cloudwatch,aws-cloudwatch",
      `0 triggers on the gpu-jobs-stat queue ${urls["gpu-jobs-stat"]}`,
      "formula stat + routine + backlog + urgent is not the sum of the triggers routine, backlog, urgent",
    ]);
    const maxOf = clone(resources);
    delete find(maxOf, K.scaledObject).inputs.spec.advanced;
    assert.deepEqual(scalerProblems(maxOf, urls, CONFIG.workerMaxReplicas, q), ["no scalingModifiers: KEDA scales on the larger of the triggers, not their sum"]);
    // Broken: names KEDA would confuse (one begins the other), a formula of one queue, the STAT
    // trigger's own queue length, and its jobs in flight not counted.
    const confused = clone(resources);
    const c = find(confused, K.scaledObject).inputs.spec;
    const stat = c.triggers.find((t: any) => t.metadata.queueURL === urls["gpu-jobs-stat"]);
    const routine = c.triggers.find((t: any) => t.metadata.queueURL === urls["gpu-jobs"]);
    [stat.name, routine.name] = ["gpu_jobs_stat", "gpu_jobs"];
    c.advanced.scalingModifiers.formula = "gpu_jobs";
    stat.metadata.queueLength = "5";
    delete stat.metadata.scaleOnInFlight;
    assert.deepEqual(scalerProblems(confused, urls, CONFIG.workerMaxReplicas, q), [
      "trigger gpu_jobs_stat: queueLength 5, config says 1",
      "trigger gpu_jobs_stat: the jobs in flight do not count",
      "trigger name gpu_jobs begins gpu_jobs_stat: KEDA would pair their metrics wrongly",
      "formula gpu_jobs is not the sum of the triggers gpu_jobs_stat, gpu_jobs, backlog, urgent",
    ]);
    // Broken: the formula of the queues alone (a backlog waiting for admission would add no
    // worker), and the routine backlog's trigger named after its queue's.
    const queuesOnly = clone(resources);
    const w = find(queuesOnly, K.scaledObject).inputs.spec;
    w.advanced.scalingModifiers.formula = "stat + routine";
    assert.deepEqual(scalerProblems(queuesOnly, urls, CONFIG.workerMaxReplicas, q), ["formula stat + routine is not the sum of the triggers stat, routine, backlog, urgent"]);
    w.triggers.find((t: any) => t.name === "backlog").name = "routine_waiting";
    w.advanced.scalingModifiers.formula = "stat + routine + routine_waiting + urgent";
    assert.deepEqual(scalerProblems(queuesOnly, urls, CONFIG.workerMaxReplicas, q), ["trigger name routine begins routine_waiting: KEDA would pair their metrics wrongly"]);
  });

  it("count the jobs waiting for admission: the collectors write them by priority, KEDA reads each series and may read CloudWatch", async () => {
    const { resources } = await run();
    const exported = exportedMetrics();
    const q = CONFIG.workerQueueLength;
    assert.ok(exported.includes(WAITING.metric), String(exported));
    assert.deepEqual(waitingScalerProblems(resources, exported, q), []);
    // Every collector (the API, the relay, the projector, the handlers: each serves the count
    // from the database) writes it with the priority dimension.
    for (const c of adotConfigs(resources)) assert.ok(adotProduces(c, exported).has(`Mira/test/${WAITING.metric}`));
    const so = find(resources, K.scaledObject).inputs.spec;
    const cw = so.triggers.filter((t: any) => t.type === "aws-cloudwatch");
    assert.deepEqual(
      cw.map((t: any) => [t.name, t.authenticationRef.name, t.useCachedMetrics, t.metadata]),
      [
        ["backlog", "keda-aws"],
        ["urgent", "keda-aws"],
      ].map(([name, auth], i) => [
        name,
        auth,
        true,
        {
          namespace: "Mira/test",
          metricName: WAITING.metric,
          dimensionName: "priority",
          dimensionValue: WAITING.priorities[i],
          metricStat: "Maximum",
          metricStatPeriod: "60",
          metricCollectionTime: "300",
          targetMetricValue: String(q),
          minMetricValue: "0",
          awsRegion: CONFIG.region,
        },
      ]),
    );
    // Broken: the collectors without the metric (KEDA would read nothing, as 0, for ever).
    const unwritten = clone(resources);
    for (const td of ofType(unwritten, K.taskDef)) td.inputs.containerDefinitions = td.inputs.containerDefinitions.replaceAll(`^${WAITING.metric}$`, "^mira_jobs_waiting$");
    assert.deepEqual(waitingScalerProblems(unwritten, exported, q), [
      ...Array(4).fill(`a collector does not write ${WAITING.metric}`),
      `trigger backlog: Mira/test/${WAITING.metric} is written by no collector`,
      `trigger urgent: Mira/test/${WAITING.metric} is written by no collector`,
    ]);
    // Broken: the collectors write it without the dimension (one series for both priorities).
    const merged = clone(resources);
    for (const td of ofType(merged, K.taskDef)) {
      const containers = JSON.parse(td.inputs.containerDefinitions);
      const adot = containers.find((c: any) => c.name === "adot");
      if (!adot) continue;
      const env = adot.environment.find((e: any) => e.name === "AOT_CONFIG_CONTENT");
      const config = JSON.parse(env.value);
      for (const d of config.exporters.awsemf.metric_declarations) if (d.metric_name_selectors.includes(`^${WAITING.metric}$`)) d.dimensions = [[]];
      env.value = JSON.stringify(config);
      td.inputs.containerDefinitions = JSON.stringify(containers);
    }
    assert.deepEqual(waitingScalerProblems(merged, exported, q), [
      ...Array(4).fill(`a collector writes ${WAITING.metric} with dimensions [[]], not [priority]`),
      `trigger backlog: Mira/test/${WAITING.metric} with dimensions [priority] is not what the collectors write`,
      `trigger urgent: Mira/test/${WAITING.metric} with dimensions [priority] is not what the collectors write`,
    ]);
    // Broken: the routine backlog summed over every task's datapoints, in 5-minute periods, a
    // silent CloudWatch read as a job waiting, its own target; the STAT backlog not counted.
    const wrong = clone(resources);
    const spec = find(wrong, K.scaledObject).inputs.spec;
    Object.assign(spec.triggers.find((t: any) => t.name === "backlog").metadata, { metricStat: "Sum", metricStatPeriod: "300", minMetricValue: "1", targetMetricValue: "2" });
    spec.triggers = spec.triggers.filter((t: any) => t.name !== "urgent");
    assert.deepEqual(waitingScalerProblems(wrong, exported, q), [
      "trigger backlog: metricStat Sum adds up every task's datapoints (Maximum or Average reads the count)",
      "trigger backlog: targetMetricValue 2, config says 1",
      "trigger backlog: minMetricValue 1: no datapoint would read as jobs waiting",
      "trigger backlog: metricStatPeriod 300: a backlog seen 5 minutes late",
      `0 triggers on Mira/test/${WAITING.metric} priority=stat`,
    ]);
    const odd = clone(resources);
    Object.assign(find(odd, K.scaledObject).inputs.spec.triggers.find((t: any) => t.name === "urgent").metadata, { metricStatPeriod: "90" });
    Object.assign(find(odd, K.scaledObject).inputs.spec.triggers.find((t: any) => t.name === "backlog").metadata, { metricCollectionTime: "90" });
    assert.deepEqual(waitingScalerProblems(odd, exported, q), [
      "trigger backlog: metricCollectionTime 90 is not a multiple of the period 60",
      "trigger urgent: metricStatPeriod 90, which KEDA refuses",
    ]);
    // Broken: KEDA's role without the read, or with more of CloudWatch than the read.
    const blind = clone(resources);
    const pol = ofType(blind, K.rolePolicy).find((x) => x.name === "keda-operator-policy")!;
    const st = JSON.parse(pol.inputs.policy).Statement;
    pol.inputs.policy = JSON.stringify({ Statement: st.filter((x: any) => !x.Action.includes("cloudwatch:GetMetricData")) });
    assert.deepEqual(waitingScalerProblems(blind, exported, q), ["KEDA cannot cloudwatch:GetMetricData"]);
    pol.inputs.policy = JSON.stringify({ Statement: [...st, { Effect: "Allow", Action: ["cloudwatch:PutMetricData", "cloudwatch:*"], Resource: ["*"] }] });
    assert.deepEqual(waitingScalerProblems(blind, exported, q), ["KEDA may cloudwatch:PutMetricData", "KEDA may cloudwatch:*"]);
  });

  it("give the handlers the admission settings of the stack's config, whose defaults are Mira's", async () => {
    const { out, resources } = await run();
    const env = (family: string) => {
      const td = ofType(resources, K.taskDef).find((t) => t.inputs.family === family)!;
      return Object.fromEntries(JSON.parse(td.inputs.containerDefinitions)[0].environment.map((e: any) => [e.name, e.value]));
    };
    const admission = (e: Record<string, string>) => [e.Roles__Enabled, e.Jobs__AdmissionWindow, e.Jobs__MaxRunningPerTenant];
    // CONFIG is not the defaults (3 and 4): the values come from the config.
    assert.deepEqual(admission(env("mira-test-handlers")), ["handlers", "3", "4"]);
    assert.deepEqual([out.settings.roles.Jobs__AdmissionWindow, out.settings.roles.Jobs__MaxRunningPerTenant], ["3", "4"]);
    // The API runs no role (no Roles__Enabled), and reads neither.
    assert.deepEqual(admission(env("mira-test-api")), [undefined, undefined, undefined]);
    // The program's defaults (index.ts) are Mira's own (config/src/lib.rs, JobsSettings).
    const lib = fs.readFileSync(path.resolve(__dirname, "../../../config/src/lib.rs"), "utf8");
    const rustDefault = (field: string) => Number(new RegExp(`\\n\\s*${field}: (\\d+),`).exec(lib)?.[1]);
    assert.deepEqual(JOBS_DEFAULTS, { jobsAdmissionWindow: rustDefault("admission_window"), jobsMaxRunningPerTenant: rustDefault("max_running_per_tenant") });
    assert.deepEqual(JOBS_DEFAULTS, { jobsAdmissionWindow: 2, jobsMaxRunningPerTenant: 0 });
    // What Mira refuses at start stops the program.
    for (const [w, m] of [
      [0, 0],
      [10_001, 0],
      [1.5, 0],
      [2, -1],
      [2, 0.5],
      [2, 2 ** 32],
    ]) {
      assert.throws(() => checkJobsSettings(w, m), /mira:jobs(AdmissionWindow|MaxRunningPerTenant)/, `${w} ${m}`);
    }
    assert.deepEqual(checkJobsSettings(10_000, 2 ** 32 - 1), { Jobs__AdmissionWindow: "10000", Jobs__MaxRunningPerTenant: "4294967295" });
  });

  it("let the worker finish its job on a scale-in, on a GPU, as its own role", async () => {
    const { resources } = await run();
    assert.deepEqual(workerProblems(resources), []);
    const broken = clone(resources);
    const spec = find(broken, K.deployment).inputs.spec.template.spec;
    spec.terminationGracePeriodSeconds = 30;
    const role = ofType(broken, K.role).find((r) => r.name === "worker")!;
    role.inputs.assumeRolePolicy = role.inputs.assumeRolePolicy.replace("system:serviceaccount:mira:mira-wsi-worker", "system:serviceaccount:mira:default");
    const found = workerProblems(broken);
    assert.equal(found.length, 2, String(found));
    assert.ok(found[0].includes("not longer than the lease 60") && found[1].includes("system:serviceaccount:mira:default"), String(found));
  });

  it("run exactly one relay task", async () => {
    const { resources } = await run();
    assert.deepEqual(relayProblems(resources), []);
    const broken = clone(resources);
    const relay = ofType(broken, K.service).find((s) => s.name === "relay")!;
    relay.inputs.desiredCount = 2;
    relay.inputs.deploymentMaximumPercent = 200;
    assert.deepEqual(relayProblems(broken), ["the relay service wants 2 tasks", "the relay's deploys may run 200% of its tasks at once"]);
    // Broken otherwise: the handlers' service also running the relay role.
    const twice = clone(resources);
    const handlers = ofType(twice, K.taskDef).find((t) => t.inputs.family.endsWith("-handlers"))!;
    handlers.inputs.containerDefinitions = handlers.inputs.containerDefinitions.replace('"value":"handlers"', '"value":"handlers,relay"');
    assert.match(relayProblems(twice)[0], /^2 services run the relay/);
  });

  it("alarm only on metrics the ADOT collector writes from what Mira exports", async () => {
    const { resources } = await run();
    const exported = exportedMetrics();
    assert.ok(exported.includes("mira_projection_lag_seconds") && exported.includes("mira_log_watermark_lag_seconds"), String(exported));
    const produced = adotProduces(adotConfigs(resources)[0], exported);
    assert.ok(produced.has("Mira/test/mira_projection_lag_seconds"), String([...produced]));
    assert.deepEqual(alarmProblems(resources, exported), []);
    // Broken: an alarm on a name Mira does not export, and a collector that drops the watermark.
    const broken = clone(resources);
    ofType(broken, K.alarm).find((a) => a.name === "projection-lag")!.inputs.metricName = "mira_projection_lag_secs";
    for (const td of ofType(broken, K.taskDef)) td.inputs.containerDefinitions = td.inputs.containerDefinitions.replaceAll("^mira_log_watermark_lag_seconds$", "^mira_log_watermark_lag_events$");
    const found = alarmProblems(broken, exported).sort();
    assert.deepEqual(found, [
      "alarm projection-lag: Mira/test/mira_projection_lag_secs is produced by no ADOT configuration",
      "alarm watermark-lag: Mira/test/mira_log_watermark_lag_seconds is produced by no ADOT configuration",
      "no alarm on mira_projection_lag_seconds",
    ]);
    // Broken: a DLQ alarm dropped.
    const noDlq = clone(resources).filter((r) => r.name !== "gpu-jobs-dlq-not-empty");
    assert.deepEqual(alarmProblems(noDlq, exported), ["no alarm on mira-test-gpu-jobs-dlq.fifo not being empty"]);
  });

  it("serve /metrics only on each task's loopback, where its collector scrapes it", async () => {
    const { resources } = await run();
    assert.equal(METRICS_LISTEN, "127.0.0.1:9464");
    assert.deepEqual(metricsListenProblems(resources), []);
    // Every collector scrapes 127.0.0.1:9464, and each task it runs in is a `mira` service.
    const scraped = ofType(resources, K.taskDef).filter((td) => JSON.parse(td.inputs.containerDefinitions).some((c: any) => c.name === "adot"));
    assert.deepEqual(scraped.map((td) => td.inputs.family).sort(), ["mira-test-api", "mira-test-handlers", "mira-test-projector", "mira-test-relay"]);
    for (const td of scraped) {
      const containers = JSON.parse(td.inputs.containerDefinitions);
      const mira = containers.find((c: any) => c.name === "mira");
      assert.deepEqual(mira.command, ["serve", "--listen", "0.0.0.0:8080"], td.inputs.family);
      assert.equal(mira.environment.find((e: any) => e.name === "Api__MetricsListen")?.value, "127.0.0.1:9464", td.inputs.family);
      // Behind CloudFront and the ALB, the API counts requests per viewer (two hops from the
      // right of X-Forwarded-For), not per CloudFront edge.
      const hops = mira.environment.find((e: any) => e.name === "Api__ForwardedForHops")?.value;
      assert.equal(hops, td.inputs.family === "mira-test-api" ? "2" : undefined, td.inputs.family);
      // Kept-alive connections from the ALB outlive its idle timeout (the task never closes one
      // first).
      const alb = ofType(resources, "aws:lb/loadBalancer:LoadBalancer")[0];
      for (const setting of ["Api__HeaderReadTimeoutSeconds", "Api__IdleTimeoutSeconds"]) {
        const v = mira.environment.find((e: any) => e.name === setting)?.value;
        if (td.inputs.family === "mira-test-api") {
          assert.ok(Number(v) > alb.inputs.idleTimeout, `${setting} ${v} must exceed the ALB's ${alb.inputs.idleTimeout}`);
        } else {
          assert.equal(v, undefined, `${td.inputs.family} ${setting}`);
        }
      }
    }
    for (const c of adotConfigs(resources)) {
      assert.deepEqual(
        c.receivers.prometheus.config.scrape_configs.map((x: any) => [x.metrics_path, x.static_configs.flatMap((sc: any) => sc.targets)]),
        [["/metrics", ["127.0.0.1:9464"]]],
      );
    }
    // Broken: the collectors back on the API's port, the relay without Api__MetricsListen (its
    // /metrics on the API's port again) and the handlers' pointing elsewhere.
    const broken = clone(resources);
    for (const td of ofType(broken, K.taskDef)) td.inputs.containerDefinitions = td.inputs.containerDefinitions.replaceAll("127.0.0.1:9464", "127.0.0.1:8080");
    assert.deepEqual(metricsListenProblems(broken), [
      "mira-test-api: the collector's job mira scrapes 127.0.0.1:8080, not 127.0.0.1:9464",
      "mira-test-api: Api__MetricsListen is 127.0.0.1:8080, not 127.0.0.1:9464",
      "mira-test-relay: the collector's job mira scrapes 127.0.0.1:8080, not 127.0.0.1:9464",
      "mira-test-relay: Api__MetricsListen is 127.0.0.1:8080, not 127.0.0.1:9464",
      "mira-test-projector: the collector's job mira scrapes 127.0.0.1:8080, not 127.0.0.1:9464",
      "mira-test-projector: Api__MetricsListen is 127.0.0.1:8080, not 127.0.0.1:9464",
      "mira-test-handlers: the collector's job mira scrapes 127.0.0.1:8080, not 127.0.0.1:9464",
      "mira-test-handlers: Api__MetricsListen is 127.0.0.1:8080, not 127.0.0.1:9464",
    ]);
    // The alarms see it too: a collector scraping the API's port produces nothing.
    assert.ok(alarmProblems(broken, exportedMetrics()).length > 0);
    const unset = clone(resources);
    const byFamily = (rs: Recorded[], f: string) => ofType(rs, K.taskDef).find((t) => t.inputs.family === f)!;
    for (const [family, edit] of [
      ["mira-test-relay", (e: any[]) => e.filter((x) => x.name !== "Api__MetricsListen")],
      ["mira-test-handlers", (e: any[]) => e.map((x) => (x.name === "Api__MetricsListen" ? { ...x, value: "0.0.0.0:9464" } : x))],
    ] as const) {
      const td = byFamily(unset, family);
      const containers = JSON.parse(td.inputs.containerDefinitions);
      containers[0].environment = edit(containers[0].environment);
      td.inputs.containerDefinitions = JSON.stringify(containers);
    }
    assert.deepEqual(metricsListenProblems(unset), [
      "mira-test-relay: Api__MetricsListen is not set, not 127.0.0.1:9464",
      "mira-test-handlers: Api__MetricsListen is 0.0.0.0:9464, not 127.0.0.1:9464",
    ]);
    // Broken: the metrics port opened to the VPC, in a group's rules, as a rule of its own, to
    // all traffic, and as a port mapping and a target group's health check.
    const open = clone(resources);
    const computeSg = ofType(open, K.sg).find((g) => g.name === "compute-sg")!;
    computeSg.inputs.ingress = [{ protocol: "tcp", fromPort: 9464, toPort: 9464, cidrBlocks: ["10.0.0.0/16"] }];
    ofType(open, K.sgIngress).find((r) => r.name === "compute-from-alb")!.inputs.toPort = 9500;
    ofType(open, K.sg).find((g) => g.name === "alb-sg")!.inputs.ingress = [{ protocol: "-1", fromPort: 0, toPort: 0, cidrBlocks: ["0.0.0.0/0"] }];
    open.push({ type: K.sgRule, name: "compute-metrics", inputs: { type: "ingress", securityGroupId: "compute-sg-id", protocol: "tcp", fromPort: 9400, toPort: 9500, cidrBlocks: ["10.40.0.0/16"] }, state: {} });
    const api = byFamily(open, "mira-test-api");
    const containers = JSON.parse(api.inputs.containerDefinitions);
    containers[0].portMappings.push({ containerPort: 9464, protocol: "tcp" });
    api.inputs.containerDefinitions = JSON.stringify(containers);
    find(open, K.targetGroup).inputs.healthCheck.path = "/metrics";
    assert.deepEqual(metricsListenProblems(open), [
      "mira-test-api: container mira maps port 9464",
      "security group compute-sg: ingress tcp 9464-9464 admits 9464",
      "security group alb-sg: ingress -1 0-0 admits 9464",
      "security group rule compute-metrics: ingress tcp 9400-9500 admits 9464",
      "ingress rule compute-from-alb: tcp 8080-9500 admits 9464",
      "target group api-targets: health check on /metrics",
    ]);
  });

  it("alarm on a witness conflict at once, and on a witness silent for too long", async () => {
    const { resources } = await run();
    const exported = exportedMetrics();
    assert.ok(exported.includes(WITNESS_METRICS.conflicts) && exported.includes(WITNESS_METRICS.lastSuccess), String(exported));
    const relay = ofType(resources, K.taskDef).filter((t) => t.inputs.family.endsWith("-relay"));
    const produced = adotProduces(adotConfigs(resources, relay)[0], exported);
    assert.ok(produced.has(`Mira/test/${WITNESS_METRICS.conflicts}`) && produced.has(`Mira/test/${WITNESS_METRICS.lastSuccess}`), String([...produced]));
    assert.deepEqual(witnessAlarmProblems(resources, exported, WITNESS_STALE_SECONDS), []);
    assert.deepEqual(alarmProblems(resources, exported), []);
    // Broken: the relay's collector without the witness's metrics, the conflict alarm on a
    // count over 1, the stale alarm quiet when the relay is gone.
    const broken = clone(resources);
    for (const td of ofType(broken, K.taskDef)) {
      td.inputs.containerDefinitions = td.inputs.containerDefinitions
        .replaceAll(`^${WITNESS_METRICS.conflicts}$`, "^mira_witness_conflicts$")
        .replaceAll(`^${WITNESS_METRICS.lastSuccess}$`, "^mira_witness_last_success$");
    }
    ofType(broken, K.alarm).find((a) => a.name === "witness-conflict")!.inputs.threshold = 1;
    ofType(broken, K.alarm).find((a) => a.name === "witness-stale")!.inputs.treatMissingData = "notBreaching";
    assert.deepEqual(witnessAlarmProblems(broken, exported, WITNESS_STALE_SECONDS), [
      `the relay's collector does not write ${WITNESS_METRICS.conflicts}`,
      `the relay's collector does not write ${WITNESS_METRICS.lastSuccess}`,
      "alarm witness-conflict: not on any value above 0 (GreaterThanThreshold 1)",
      "alarm witness-stale: missing data is notBreaching, not breaching (no metric means no relay)",
    ]);
    // Broken: the stale alarm on the timestamp itself, not its age, and with a dimension the
    // collector does not publish (the generic check sees the dimension too).
    const timestamp = clone(resources);
    const stale = ofType(timestamp, K.alarm).find((a) => a.name === "witness-stale")!.inputs;
    stale.metricQueries = stale.metricQueries.map((q: any) =>
      q.metric ? { ...q, returnData: true, metric: { ...q.metric, dimensions: { service: "relay" } } } : { ...q, returnData: false },
    );
    assert.deepEqual(witnessAlarmProblems(timestamp, exported, WITNESS_STALE_SECONDS), [
      'alarm witness-stale: dimensions {"service":"relay"}',
      "alarm witness-stale: does not alarm on the age EPOCH(m1) - m1 (m1)",
    ]);
    assert.deepEqual(alarmProblems(timestamp, exported), [
      `alarm witness-stale: Mira/test/${WITNESS_METRICS.lastSuccess} with dimensions [service] is not what the collector publishes`,
    ]);
  });

  it("verify the whole log every day, read-only, and alarm when it fails or does not run", async () => {
    const { resources } = await run();
    assert.deepEqual(verifyProblems(resources), []);
    const td = ofType(resources, K.taskDef).find((t) => t.inputs.family === "mira-test-audit-verify")!;
    assert.deepEqual(JSON.parse(td.inputs.containerDefinitions)[0].command, ["audit", "verify"]);
    // Broken: the task running `audit checkpoint`, its role without ListBucketVersions and
    // writing to the witness, the schedule in no security group.
    const broken = clone(resources);
    const btd = ofType(broken, K.taskDef).find((t) => t.inputs.family === "mira-test-audit-verify")!;
    btd.inputs.containerDefinitions = btd.inputs.containerDefinitions.replace('"command":["audit","verify"]', '"command":["audit","checkpoint"]');
    const pol = ofType(broken, K.rolePolicy).find((x) => x.name === "audit-verify-policy")!;
    const st = JSON.parse(pol.inputs.policy).Statement.map((x: any) => ({ ...x, Action: x.Action.map((a: string) => (a === "s3:ListBucketVersions" ? "s3:PutObject" : a)) }));
    pol.inputs.policy = JSON.stringify({ Statement: st });
    ofType(broken, K.schedule)[0].inputs.target.ecsParameters.networkConfiguration.securityGroups = [];
    assert.deepEqual(verifyProblems(broken), [
      "security groups  do not reach the database",
      'the task runs ["audit","checkpoint"], not ["audit","verify"]',
      "the task cannot list the witness's versions",
      "the verifier's role may s3:PutObject",
    ]);
    // Broken: the overdue alarm quiet on missing data, over a day only; the failure not counted.
    const alarms = clone(resources);
    const overdue = ofType(alarms, K.alarm).find((a) => a.name === "audit-verify-overdue")!.inputs;
    overdue.treatMissingData = "notBreaching";
    overdue.evaluationPeriods = overdue.datapointsToAlarm = 24;
    const noFailed = alarms.filter((r) => !(r.type === K.metricFilter && String(r.inputs.pattern).includes("FAILED")));
    assert.deepEqual(verifyProblems(noFailed), [
      'no metric filter counts "log verification FAILED" in /mira/test/audit-verify',
      "alarm audit-verify-overdue: rings after 86400 s without a run, not 26 hours",
      "alarm audit-verify-overdue: missing data is notBreaching, not breaching",
    ]);
  });

  it("without mira:auditPublicKey, let the verification derive its key from the secret, and give the API none", async () => {
    const { resources } = await run();
    assert.equal(CONFIG.auditPublicKey, undefined);
    assert.deepEqual(trustedKeyProblems(resources, undefined), []);
    // Broken: the verification without the secret's grant, the API given the secret's id.
    const broken = clone(resources);
    const pol = ofType(broken, K.rolePolicy).find((x) => x.name === "audit-verify-policy")!;
    const st = JSON.parse(pol.inputs.policy).Statement.filter((x: any) => !x.Action.includes("secretsmanager:GetSecretValue"));
    pol.inputs.policy = JSON.stringify({ Statement: st });
    const api = ofType(broken, K.taskDef).find((t) => t.inputs.family === "mira-test-api")!;
    const containers = JSON.parse(api.inputs.containerDefinitions);
    containers[0].environment.push({ name: "Audit__SigningKeySecretId", value: "arn:aws:secretsmanager:eu-west-1:123456789012:mira-test/audit/signing-key" });
    api.inputs.containerDefinitions = JSON.stringify(containers);
    assert.deepEqual(trustedKeyProblems(broken, undefined), [
      "the verification's role cannot read the signing key's secret",
      "the API is given Audit__SigningKeySecretId",
    ]);
  });

  it("make the API's service only after the listener rule that attaches its target group", async () => {
    const { resources } = await run();
    assert.deepEqual(listenerOrderProblems(resources, urnOf), []);
    const api = ofType(resources, K.service).find((x) => x.name === "api")!;
    assert.ok(api.dependencies!.includes(urnOf(K.listenerRule, "api-from-cloudfront")), String(api.dependencies));
    // Broken: the service depending on the listener alone (as before), so a first `up` may make
    // it before the rule, and ECS refuses it; then the rule forwarding elsewhere.
    const early = clone(resources);
    const svc = ofType(early, K.service).find((x) => x.name === "api")!;
    svc.dependencies = svc.dependencies!.filter((u) => u !== urnOf(K.listenerRule, "api-from-cloudfront"));
    assert.deepEqual(listenerOrderProblems(early, urnOf), ["service mira-test-api: made without waiting for api-from-cloudfront, which attaches its target group"]);
    find(early, K.listenerRule).inputs.actions[0].targetGroupArn = "arn:aws:lb:eu-west-1:123456789012:other";
    assert.deepEqual(listenerOrderProblems(early, urnOf), ["service mira-test-api: no listener forwards to its target group"]);
  });

  it("alarm when the relay does not run exactly once, on the database's health, and on the worker's pods Pending", async () => {
    const { resources } = await run();
    assert.deepEqual(healthAlarmProblems(resources), []);
    assert.deepEqual(alarmProblems(resources, exportedMetrics()), []);
    const alarm = (rs: Recorded[], name: string) => ofType(rs, K.alarm).find((a) => a.name === name)!;
    assert.deepEqual(alarm(resources, "relay-not-one").inputs.metricQueries[1].expression, "ABS(relay - 1)");
    // The Pending window outlasts a rollout's drain and start: 1800 + 900 s.
    const pending = alarm(resources, "gpu-pods-pending").inputs;
    assert.deepEqual([pending.period * pending.datapointsToAlarm, pending.dimensions], [2700, { ClusterName: "mira-test", Namespace: "mira", PodName: "mira-wsi-worker" }]);

    // Broken: the relay's alarm on too few tasks only, and quiet when there is no datapoint.
    const fewer = clone(resources);
    const relay = alarm(fewer, "relay-not-one").inputs;
    relay.metricQueries = [{ ...relay.metricQueries[0], returnData: true }];
    Object.assign(relay, { comparisonOperator: "LessThanThreshold", threshold: 1, treatMissingData: "notBreaching" });
    assert.deepEqual(healthAlarmProblems(fewer), ["no alarm rings when the relay runs no task (or reports nothing)", "no alarm rings when the relay runs two tasks"]);
    relay.treatMissingData = "breaching";
    assert.deepEqual(healthAlarmProblems(fewer), ["no alarm rings when the relay runs two tasks"]);
    // Broken: the relay's alarm on another service, an alarm that rings on one relay.
    const elsewhere = clone(resources);
    alarm(elsewhere, "relay-not-one").inputs.metricQueries[0].metric.dimensions.ServiceName = "mira-test-projector";
    Object.assign(alarm(elsewhere, "projection-lag").inputs, {
      namespace: "ECS/ContainerInsights",
      metricName: "RunningTaskCount",
      dimensions: { ClusterName: "mira-test", ServiceName: "mira-test-relay" },
      comparisonOperator: "GreaterThanOrEqualToThreshold",
      threshold: 1,
      treatMissingData: "breaching",
    });
    assert.deepEqual(healthAlarmProblems(elsewhere), ["no alarm rings when the relay runs no task (or reports nothing)", "alarm projection-lag rings on one relay"]);
    // Broken: no CPU alarm, the database's events gone, the pending alarm within a drain and on
    // no pod at all.
    const quiet = clone(resources).filter((r) => r.name !== "database-cpu" && r.type !== K.rdsEvents);
    Object.assign(alarm(quiet, "gpu-pods-pending").inputs, { evaluationPeriods: 10, datapointsToAlarm: 10 });
    assert.deepEqual(healthAlarmProblems(quiet), [
      "no alarm on the database's CPUUtilization",
      "RDS's availability events reach no alarm topic",
      "RDS's failover events reach no alarm topic",
      "RDS's failure events reach no alarm topic",
      "RDS's low storage events reach no alarm topic",
      "alarm gpu-pods-pending: rings after 600 s of Pending, within a rollout's drain and start (2700 s)",
    ]);
    alarm(quiet, "gpu-pods-pending").inputs.dimensions.PodName = "worker";
    assert.deepEqual(healthAlarmProblems(quiet).slice(-1), ["no alarm on the worker's pods Pending"]);
    // Broken: RDS's events into the encrypted topic, whose key does not let them in.
    const locked = clone(resources);
    const key = ofType(locked, "aws:kms/key:Key").find((k) => k.name === "messaging-key")!;
    const policy = JSON.parse(key.inputs.policy);
    policy.Statement = policy.Statement.filter((st: any) => st.Sid !== "RdsEventsToEncryptedAlarmTopic");
    key.inputs.policy = JSON.stringify(policy);
    assert.deepEqual(healthAlarmProblems(locked), ["the alarm topic's key does not let RDS's events in"]);
    // Broken: Container Insights' metrics with neither the ECS setting nor the EKS add-on that
    // make them.
    const blind = clone(resources).filter((r) => r.type !== K.addon);
    find(blind, K.ecsCluster).inputs.settings = [{ name: "containerInsights", value: "disabled" }];
    assert.deepEqual(alarmProblems(blind, exportedMetrics()).sort(), [
      "alarm gpu-pods-pending: ContainerInsights: the cluster mira-test has no amazon-cloudwatch-observability add-on",
      "alarm relay-not-one: ECS/ContainerInsights: the cluster mira-test has Container Insights off",
    ]);
  });

  it("send /api/* and /ws to the ALB and the rest to the bucket", async () => {
    const { resources } = await run();
    assert.deepEqual(cdnProblems(resources, CONFIG.albDomain), []);
    const broken = clone(resources);
    const d = find(broken, K.distribution).inputs;
    d.orderedCacheBehaviors.find((b: any) => b.pathPattern === "/ws").targetOriginId = "spa";
    d.orderedCacheBehaviors.find((b: any) => b.pathPattern === "/api/*").cachePolicyId = "658327ea-f89d-4fab-a63d-7e88639e58f6";
    const found = cdnProblems(broken, CONFIG.albDomain).sort();
    const frontend = ofType(resources, "aws:s3/bucket:Bucket").find((b) => b.name === "frontend")!.state.bucketRegionalDomainName;
    assert.match(frontend, /^mira-test-frontend-\d{26}\.s3\.eu-west-1\.amazonaws\.com$/);
    assert.deepEqual(found, ["/api/* is cached", `/ws goes to ${frontend}, not the ALB over HTTPS`]);
  });
});
