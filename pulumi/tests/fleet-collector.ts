// What issue 36 requires of the GPU fleet's collector, as a function over the recorded resources
// that returns the problems found (as in checks.ts and operations.ts): the test runs it on the
// program and on broken copies.

import * as fs from "node:fs";
import * as path from "node:path";
import { ADOT_IMAGE } from "../src/telemetry";
import { ofType, type Recorded } from "./harness";
import { adotConfigs, adotDimensions, envOf, K, METRICS_LISTEN, METRICS_PORT, mayDo, miraScrapes, policyOf } from "./operations";

/** The actions the collector's exporters call: awsxray's, and awsemf's on its log group. */
export const XRAY_ACTIONS = ["xray:PutTraceSegments", "xray:PutTelemetryRecords", "xray:GetSamplingRules", "xray:GetSamplingTargets"];
export const EMF_ACTIONS = ["logs:PutLogEvents", "logs:CreateLogStream", "logs:DescribeLogStreams"];

const LOOPBACK = new Set(["127.0.0.1", "localhost", "[::1]"]);

/**
 * The worker's count of attempts ended, by labels `kind` and `outcome` (gpu-worker/src/run.rs),
 * which CloudWatch gets from the collector in its pod with both as dimensions.
 */
export const JOBS_FINISHED = { metric: "mira_jobs_finished_total", dimensions: ["kind", "outcome"] };

/**
 * The series `mira-worker` serves (gpu-worker/src/): the names its `metrics` macros record
 * (`counter!`, `histogram!`, `gauge!`), read from the sources as exportedMetrics reads the
 * gateway's.
 */
export function workerMetrics(): string[] {
  const dir = path.resolve(__dirname, "../../../gpu-worker/src");
  const src = fs.readdirSync(dir).filter((f) => f.endsWith(".rs")).map((f) => fs.readFileSync(path.join(dir, f), "utf8")).join("\n");
  return [...new Set([...src.matchAll(/\b(?:counter|histogram|gauge)!\(\s*"(mira_[a-z_]+)"/g)].map((m) => m[1]))].sort();
}

/** The worker's pod: the Deployment's pod spec, its collector containers and the worker's container. */
export function workerPod(rs: Recorded[]) {
  const dep = ofType(rs, K.deployment)[0];
  const pod = dep?.inputs.spec.template.spec;
  const init: any[] = pod?.initContainers ?? [];
  const main: any[] = pod?.containers ?? [];
  const collectors = [...init, ...main].filter((c) => c.image === ADOT_IMAGE);
  return { pod, worker: main[0], collectors, isInit: (c: any) => init.includes(c) };
}

/** The configuration a collector container reads (`--config=env:VAR`), parsed; undefined if none. */
export function collectorConfig(c: any): any {
  const flag = [...(c.command ?? []), ...(c.args ?? [])].find((a: string) => /^--config=env:/.test(a));
  const text = flag && envOf(c)[flag.slice("--config=env:".length)];
  return text ? JSON.parse(text) : undefined;
}

/**
 * The fleet's collector: exactly one ADOT container (the program's image) in the worker's pod,
 * a native sidecar (an init container that restarts Always: it starts before the worker and
 * outlives its drain), with requests and a memory limit, a read-only root and no root user. Its
 * configuration receives OTLP over HTTP on the pod's loopback, sends traces (an otlp receiver)
 * to awsxray and metrics to awsemf, every pipeline's parts defined, with the same awsxray
 * exporter as the ECS collectors and the same awsemf one (namespace, region, log group,
 * declarations: all but its log stream, which names the pod from the collector's environment).
 * The worker's OTEL_EXPORTER_OTLP_ENDPOINT is that receiver (http, the same host and port, the
 * base of /v1/traces), over http/protobuf or http/json. The worker serves /metrics on the pod's
 * loopback (MIRA_METRICS_LISTEN=METRICS_LISTEN), which no container port names, and the
 * collector scrapes exactly that into a metrics pipeline from its prometheus receiver to awsemf,
 * which writes the worker's count of attempts ended with dimensions [kind, outcome]. The worker
 * pods' role may write X-Ray segments and EMF into the collectors' log group.
 */
export function fleetCollectorProblems(rs: Recorded[], region: string): string[] {
  const p: string[] = [];
  const { pod, worker, collectors, isInit } = workerPod(rs);
  if (!pod) return ["no worker Deployment"];
  if (collectors.length !== 1) return [`${collectors.length} ADOT collectors (${ADOT_IMAGE}) in the worker's pod`];
  const c = collectors[0];
  if (!isInit(c) || c.restartPolicy !== "Always") p.push(`the collector ${c.name} is not a native sidecar (an init container with restartPolicy Always)`);
  const r = c.resources ?? {};
  if (!r.requests?.cpu || !r.requests?.memory || !r.limits?.memory) p.push(`the collector's resources ${JSON.stringify(r)}: no cpu and memory requests, or no memory limit`);
  const sc = c.securityContext ?? {};
  if (sc.readOnlyRootFilesystem !== true) p.push("the collector's root filesystem is writable");
  if (sc.allowPrivilegeEscalation !== false) p.push("the collector may escalate its privileges");
  if ((sc.runAsNonRoot ?? pod.securityContext?.runAsNonRoot) !== true) p.push("the collector may run as root");

  const config = collectorConfig(c);
  if (!config) return [...p, "the collector reads no configuration from its environment"];
  const pipelines: [string, any][] = Object.entries(config.service?.pipelines ?? {});
  for (const [name, pl] of pipelines) {
    for (const kind of ["receivers", "processors", "exporters"]) {
      for (const part of pl[kind] ?? []) if (!(part in (config[kind] ?? {}))) p.push(`pipeline ${name}: ${kind.slice(0, -1)} ${part} is not configured`);
    }
  }
  const traces = pipelines.filter(([n, pl]) => n.split("/")[0] === "traces" && (pl.receivers ?? []).includes("otlp") && (pl.exporters ?? []).includes("awsxray"));
  if (traces.length === 0) p.push("no traces pipeline from the otlp receiver to awsxray");
  const metrics = pipelines.filter(([n, pl]) => n.split("/")[0] === "metrics" && (pl.receivers ?? []).includes("prometheus") && (pl.exporters ?? []).includes("awsemf"));
  if (metrics.length === 0) p.push("no metrics pipeline from the prometheus receiver to awsemf");

  const ecs = adotConfigs(rs)[0];
  if (!ecs) p.push("no ECS collector to compare with");
  const xray = config.exporters?.awsxray;
  const emf = config.exporters?.awsemf;
  if (xray && xray.region !== region) p.push(`awsxray's region ${xray.region}, not ${region}`);
  if (emf && emf.region !== region) p.push(`awsemf's region ${emf.region}, not ${region}`);
  if (ecs && xray && JSON.stringify(xray) !== JSON.stringify(ecs.exporters.awsxray)) p.push(`awsxray ${JSON.stringify(xray)} is not the ECS collectors' ${JSON.stringify(ecs.exporters.awsxray)}`);
  if (ecs && emf) {
    const { log_stream_name: _pod, ...mine } = emf;
    const { log_stream_name: _task, ...theirs } = ecs.exporters.awsemf;
    for (const k of new Set([...Object.keys(mine), ...Object.keys(theirs)])) {
      if (JSON.stringify(mine[k]) !== JSON.stringify(theirs[k])) p.push(`awsemf's ${k} ${JSON.stringify(mine[k])} is not the ECS collectors' ${JSON.stringify(theirs[k])}`);
    }
    const ref = /\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}/.exec(String(emf.log_stream_name ?? ""))?.[1];
    if (ref && !(c.env ?? []).some((e: any) => e.name === ref)) p.push(`awsemf's log stream ${emf.log_stream_name}: ${ref} is not set in the collector's environment`);
  }

  const listen = String(config.receivers?.otlp?.protocols?.http?.endpoint ?? "");
  if (!listen) p.push("the otlp receiver takes no OTLP over HTTP");
  const env = envOf(worker ?? {});
  const endpoint = env.OTEL_EXPORTER_OTLP_ENDPOINT;
  if (!endpoint) p.push("the worker's OTEL_EXPORTER_OTLP_ENDPOINT is not set");
  else if (listen) {
    const url = new URL(endpoint);
    const [host, port] = [listen.slice(0, listen.lastIndexOf(":")), listen.slice(listen.lastIndexOf(":") + 1)];
    const sameHost = url.hostname === host || (LOOPBACK.has(url.hostname) && (LOOPBACK.has(host) || host === "0.0.0.0"));
    if (url.protocol !== "http:" || !sameHost || url.port !== port || !["", "/"].includes(url.pathname)) {
      p.push(`the worker's OTEL_EXPORTER_OTLP_ENDPOINT ${endpoint} is not the collector's OTLP/HTTP receiver ${listen}`);
    }
  }
  const protocol = env.OTEL_EXPORTER_OTLP_PROTOCOL ?? "http/protobuf";
  if (!["http/protobuf", "http/json"].includes(protocol)) p.push(`the worker's OTEL_EXPORTER_OTLP_PROTOCOL ${protocol}: the worker sends http/protobuf or http/json`);

  // The worker's /metrics: on the pod's loopback only, and scraped there.
  const metricsAt = env.MIRA_METRICS_LISTEN;
  if (!metricsAt) p.push("the worker's MIRA_METRICS_LISTEN is not set: it serves no /metrics");
  else if (metricsAt !== METRICS_LISTEN) p.push(`the worker's MIRA_METRICS_LISTEN is ${metricsAt}, not the pod's loopback ${METRICS_LISTEN}`);
  const targets = miraScrapes(config).flatMap((s) => s.targets);
  if (JSON.stringify(targets) !== JSON.stringify([METRICS_LISTEN])) p.push(`the collector scrapes /metrics on [${targets.join(", ")}], not the worker's ${METRICS_LISTEN}`);
  for (const x of [...(pod.initContainers ?? []), ...(pod.containers ?? [])]) {
    for (const port of x.ports ?? []) if (Number(port.containerPort) === METRICS_PORT) p.push(`container ${x.name} names port ${METRICS_PORT}`);
  }
  if (!workerMetrics().includes(JOBS_FINISHED.metric)) p.push(`mira-worker does not serve ${JOBS_FINISHED.metric}`);
  const sets = adotDimensions(config, [JOBS_FINISHED.metric]).get(`${emf?.namespace}/${JOBS_FINISHED.metric}`);
  const want = [...JOBS_FINISHED.dimensions].sort().join(",");
  if (!sets) p.push(`the collector does not write ${JOBS_FINISHED.metric}`);
  else if (!sets.some((set) => [...set].sort().join(",") === want)) p.push(`the collector writes ${JOBS_FINISHED.metric} with dimensions ${JSON.stringify(sets)}, not [${want}]`);

  const role = ofType(rs, K.role).find((x) => x.name === "worker");
  const st = policyOf(rs, role);
  const logGroup = ofType(rs, "aws:cloudwatch/logGroup:LogGroup").find((g) => g.state.name === emf?.log_group_name);
  if (!logGroup) p.push(`awsemf's log group ${emf?.log_group_name} is no log group of the program`);
  for (const a of XRAY_ACTIONS) if (!mayDo(st, a, "*")) p.push(`the worker pods' role cannot ${a}`);
  if (logGroup) {
    const stream = `${logGroup.state.arn}:log-stream:mira-wsi-worker-0`;
    for (const a of EMF_ACTIONS) if (!mayDo(st, a, stream)) p.push(`the worker pods' role cannot ${a} in ${logGroup.state.name}`);
  }
  return p;
}
