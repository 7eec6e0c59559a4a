import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { checkKubernetesVersion } from "../src/fleet";
import { ADOT_IMAGE } from "../src/telemetry";
import { collectorConfig, fleetCollectorProblems, workerMetrics, workerPod } from "./fleet-collector";
import { CONFIG, ofType, type Recorded, run } from "./harness";
import { envOf, K } from "./operations";

const clone = (rs: Recorded[]): Recorded[] => JSON.parse(JSON.stringify(rs));
const find = (rs: Recorded[]) => ofType(rs, K.deployment)[0].inputs;
/** Edits the configuration of the collector in the worker's pod, in place. */
const editConfig = (rs: Recorded[], f: (config: any) => void) => {
  const c = workerPod(rs).collectors[0];
  const config = collectorConfig(c);
  f(config);
  c.env.find((e: any) => e.name === "AOT_CONFIG_CONTENT").value = JSON.stringify(config);
};
const setWorkerEnv = (rs: Recorded[], name: string, value: string) => {
  workerPod(rs).worker.env.find((e: any) => e.name === name).value = value;
};

describe("the GPU fleet's collector", () => {
  it("runs beside the worker in its pod, scrapes its /metrics into CloudWatch and sends its traces to X-Ray, as the ECS collectors do", async () => {
    const { resources } = await run();
    assert.deepEqual(fleetCollectorProblems(resources, CONFIG.region), []);
    const { collectors, worker } = workerPod(resources);
    assert.equal(collectors.length, 1);
    assert.equal(collectors[0].image, ADOT_IMAGE);
    const config = collectorConfig(collectors[0]);
    assert.deepEqual(config.receivers, {
      prometheus: {
        config: {
          scrape_configs: [{ job_name: "mira", scrape_interval: "30s", metrics_path: "/metrics", static_configs: [{ targets: ["127.0.0.1:9464"] }] }],
        },
      },
      otlp: { protocols: { http: { endpoint: "127.0.0.1:4318" } } },
    });
    assert.deepEqual(config.service.pipelines, {
      metrics: { receivers: ["prometheus"], processors: ["batch"], exporters: ["awsemf"] },
      traces: { receivers: ["otlp"], processors: ["batch"], exporters: ["awsxray"] },
    });
    // Of the worker's series, its attempts ended reach CloudWatch, by kind and outcome; its
    // durations and pixels do not.
    const served = workerMetrics();
    assert.ok(served.includes("mira_jobs_finished_total") && served.includes("mira_job_seconds"), served.join(", "));
    assert.deepEqual(
      config.exporters.awsemf.metric_declarations.filter((d: any) => d.metric_name_selectors.some((x: string) => served.some((m) => new RegExp(x).test(m)))),
      [{ dimensions: [["kind", "outcome"]], metric_name_selectors: ["^mira_jobs_finished_total$"] }],
    );
    assert.equal(config.exporters.awsemf.log_group_name, "/mira/test/metrics");
    assert.equal(config.exporters.awsemf.log_stream_name, "${env:POD_NAME}");
    assert.deepEqual(
      collectors[0].env.find((e: any) => e.name === "POD_NAME").valueFrom,
      { fieldRef: { fieldPath: "metadata.name" } },
    );
    const env = envOf(worker);
    assert.equal(env.MIRA_METRICS_LISTEN, "127.0.0.1:9464");
    assert.equal(env.OTEL_EXPORTER_OTLP_ENDPOINT, "http://127.0.0.1:4318");
    assert.equal(env.OTEL_EXPORTER_OTLP_PROTOCOL, "http/protobuf");
    assert.equal(env.OTEL_SERVICE_NAME, "mira-worker");

    // Broken: no collector in the pod; then one as a plain init container (it would never end,
    // and the worker never start), with a writable root and no resources.
    const none = clone(resources);
    const pod = find(none).spec.template.spec;
    pod.initContainers = pod.initContainers.filter((c: any) => c.image !== ADOT_IMAGE);
    assert.deepEqual(fleetCollectorProblems(none, CONFIG.region), [`0 ADOT collectors (${ADOT_IMAGE}) in the worker's pod`]);
    const plain = clone(resources);
    const c = workerPod(plain).collectors[0];
    delete c.restartPolicy;
    delete c.resources;
    c.securityContext = { ...c.securityContext, readOnlyRootFilesystem: false };
    assert.deepEqual(fleetCollectorProblems(plain, CONFIG.region), [
      "the collector adot is not a native sidecar (an init container with restartPolicy Always)",
      "the collector's resources {}: no cpu and memory requests, or no memory limit",
      "the collector's root filesystem is writable",
    ]);

    // Broken: traces to nowhere but a debug exporter, no metrics pipeline, the EMF into another
    // log group and region than the ECS collectors'.
    const lost = clone(resources);
    editConfig(lost, (cfg) => {
      cfg.service.pipelines.traces.exporters = ["debug"];
      delete cfg.service.pipelines.metrics;
      cfg.exporters.awsemf.log_group_name = "/mira/test/elsewhere";
      cfg.exporters.awsemf.region = "us-east-1";
    });
    assert.deepEqual(fleetCollectorProblems(lost, CONFIG.region), [
      "pipeline traces: exporter debug is not configured",
      "no traces pipeline from the otlp receiver to awsxray",
      "no metrics pipeline from the prometheus receiver to awsemf",
      "awsemf's region us-east-1, not eu-west-1",
      'awsemf\'s region "us-east-1" is not the ECS collectors\' "eu-west-1"',
      'awsemf\'s log_group_name "/mira/test/elsewhere" is not the ECS collectors\' "/mira/test/metrics"',
      "the collector does not write mira_jobs_finished_total",
      "awsemf's log group /mira/test/elsewhere is no log group of the program",
    ]);

    // Broken: the worker sends to the gRPC port, then over gRPC, then nowhere.
    const wrongPort = clone(resources);
    setWorkerEnv(wrongPort, "OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317");
    assert.deepEqual(fleetCollectorProblems(wrongPort, CONFIG.region), [
      "the worker's OTEL_EXPORTER_OTLP_ENDPOINT http://127.0.0.1:4317 is not the collector's OTLP/HTTP receiver 127.0.0.1:4318",
    ]);
    const grpc = clone(resources);
    setWorkerEnv(grpc, "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
    assert.deepEqual(fleetCollectorProblems(grpc, CONFIG.region), ["the worker's OTEL_EXPORTER_OTLP_PROTOCOL grpc: the worker sends http/protobuf or http/json"]);
    const silent = clone(resources);
    const w = workerPod(silent).worker;
    w.env = w.env.filter((e: any) => e.name !== "OTEL_EXPORTER_OTLP_ENDPOINT");
    assert.deepEqual(fleetCollectorProblems(silent, CONFIG.region), ["the worker's OTEL_EXPORTER_OTLP_ENDPOINT is not set"]);

    // Broken: the worker serves no /metrics; then on every address of the pod, named as a port.
    const unserved = clone(resources);
    const u = workerPod(unserved).worker;
    u.env = u.env.filter((e: any) => e.name !== "MIRA_METRICS_LISTEN");
    assert.deepEqual(fleetCollectorProblems(unserved, CONFIG.region), ["the worker's MIRA_METRICS_LISTEN is not set: it serves no /metrics"]);
    const exposed = clone(resources);
    setWorkerEnv(exposed, "MIRA_METRICS_LISTEN", "0.0.0.0:9464");
    workerPod(exposed).worker.ports = [{ name: "metrics", containerPort: 9464 }];
    assert.deepEqual(fleetCollectorProblems(exposed, CONFIG.region), [
      "the worker's MIRA_METRICS_LISTEN is 0.0.0.0:9464, not the pod's loopback 127.0.0.1:9464",
      "container worker names port 9464",
    ]);

    // Broken: the collector scrapes another port, then nothing (its metrics pipeline on OTLP, as
    // before the worker served /metrics); then the job counter without its dimensions, in the
    // pod's collector alone.
    const elsewhere = clone(resources);
    editConfig(elsewhere, (cfg) => (cfg.receivers.prometheus.config.scrape_configs[0].static_configs = [{ targets: ["127.0.0.1:8080"] }]));
    assert.deepEqual(fleetCollectorProblems(elsewhere, CONFIG.region), [
      "the collector scrapes /metrics on [127.0.0.1:8080], not the worker's 127.0.0.1:9464",
      "the collector does not write mira_jobs_finished_total",
    ]);
    const unscraped = clone(resources);
    editConfig(unscraped, (cfg) => {
      delete cfg.receivers.prometheus;
      cfg.service.pipelines.metrics.receivers = ["otlp"];
    });
    assert.deepEqual(fleetCollectorProblems(unscraped, CONFIG.region), [
      "no metrics pipeline from the prometheus receiver to awsemf",
      "the collector scrapes /metrics on [], not the worker's 127.0.0.1:9464",
      "the collector does not write mira_jobs_finished_total",
    ]);
    const flat = clone(resources);
    editConfig(flat, (cfg) => {
      for (const d of cfg.exporters.awsemf.metric_declarations) if (d.metric_name_selectors.includes("^mira_jobs_finished_total$")) d.dimensions = [[]];
    });
    const problems = fleetCollectorProblems(flat, CONFIG.region);
    assert.equal(problems.length, 2, problems.join("\n"));
    assert.match(problems[0], /^awsemf's metric_declarations .* is not the ECS collectors' /);
    assert.equal(problems[1], 'the collector writes mira_jobs_finished_total with dimensions [[]], not [kind,outcome]');

    // Broken: the worker pods' role without the collector's statements (X-Ray and the log group).
    const mute = clone(resources);
    const telemetry = ofType(mute, K.rolePolicy).find((x) => x.name === "worker-telemetry")!;
    telemetry.inputs.policy = JSON.stringify({ Statement: [] });
    assert.deepEqual(fleetCollectorProblems(mute, CONFIG.region), [
      "the worker pods' role cannot xray:PutTraceSegments",
      "the worker pods' role cannot xray:PutTelemetryRecords",
      "the worker pods' role cannot xray:GetSamplingRules",
      "the worker pods' role cannot xray:GetSamplingTargets",
      "the worker pods' role cannot logs:PutLogEvents in /mira/test/metrics",
      "the worker pods' role cannot logs:CreateLogStream in /mira/test/metrics",
      "the worker pods' role cannot logs:DescribeLogStreams in /mira/test/metrics",
    ]);
  });

  it("needs a cluster that runs native sidecars (Kubernetes 1.29 or later)", () => {
    for (const v of ["1.29", "1.34", "2.0"]) assert.doesNotThrow(() => checkKubernetesVersion(v), v);
    for (const v of ["1.28", "1.9", "1.34.1", "v1.34", ""]) assert.throws(() => checkKubernetesVersion(v), /mira:kubernetesVersion/, v);
  });
});
