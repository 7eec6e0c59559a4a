// The ADOT collector that runs beside Mira's container in each ECS task (issue 20): it scrapes
// Mira's Prometheus gauges from /metrics on the task's loopback and writes them to CloudWatch as
// EMF, under the stack's metrics namespace, and sends traces on to X-Ray. The same collector runs
// in each GPU worker's pod on EKS (issue 36), where it scrapes the worker's /metrics and takes its
// OTLP traces on the pod's loopback, through the same exporters. Its image, the ports of Mira's
// task, its configurations, its log group and what the roles it runs under may do. What runs it
// (compute.ts, fleet.ts) and what reads its metrics (fleet.ts, the alarms in observability.ts)
// import this; it imports none of them.

import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";
import { logGroup } from "./foundations";

export const ADOT_IMAGE = "public.ecr.aws/aws-observability/aws-otel-collector:v0.43.3";
/** Where Mira's process listens in its task (the ALB's target port). */
export const APP_PORT = 8080;
/**
 * Where Mira serves /metrics in its task, and what ADOT scrapes: a listener of its own on
 * loopback (`Api__MetricsListen`). With it set, /metrics answers 404 on APP_PORT, so nothing
 * the ALB reaches serves it. The collector shares the task's network namespace (awsvpc), so
 * 127.0.0.1 reaches it; no security group or load balancer opens this port. The worker serves
 * its /metrics at the same address in its pod (WORKER_METRICS_ENV), where the collector beside it
 * shares the pod's loopback; no Service or container port names it.
 */
export const METRICS_PORT = 9464;
/**
 * The value of `Api__MetricsListen` in every task the collector scrapes, and of the worker's
 * WORKER_METRICS_ENV in its pod (and in the slide verifier's task, which runs no collector).
 */
export const METRICS_LISTEN = `127.0.0.1:${METRICS_PORT}`;
/**
 * The variable `mira-worker run` and `mira-worker verify` read their metrics listener from
 * (`--metrics-listen`): unset, the worker serves no /metrics.
 */
export const WORKER_METRICS_ENV = "MIRA_METRICS_LISTEN";

/**
 * Jobs ready to run (slide verified, retry due) that the handlers have not admitted to a GPU
 * queue yet, by label `priority` (`routine`, `stat`): a count every task reads from the database
 * at each scrape. The GPU queues hold only the admission window (`Jobs__AdmissionWindow` routine
 * jobs queued and not started), so KEDA reads this beside their depths (fleet.ts).
 */
export const JOBS_WAITING_METRIC = "mira_jobs_waiting_admission";
/** The values of its `priority` label, which the collector keeps as a dimension. */
export const JOBS_WAITING_PRIORITIES = ["routine", "stat"] as const;

/**
 * A worker's attempts ended, by labels `kind` (the job's kind, `unknown` for one this build
 * cannot read) and `outcome` (`succeeded`, `failed`, `retry`, `cancelled`, `stalled`,
 * `superseded`): a counter each worker serves from its own /metrics, which the collector in
 * its pod keeps with both labels as dimensions.
 */
export const JOBS_FINISHED_METRIC = "mira_jobs_finished_total";

/**
 * Where the collector takes OTLP over HTTP in a GPU worker's pod: the pod's loopback, which the
 * worker and the collector share (one network namespace per pod) and nothing outside the pod
 * reaches. The worker sends its traces here (`OTEL_EXPORTER_OTLP_ENDPOINT`, fleet.ts).
 */
export const POD_OTLP_HTTP = "127.0.0.1:4318";
/**
 * The environment variable the collector in a worker's pod reads its pod's name from (the
 * downward API, fleet.ts): each pod writes its EMF to a log stream of that name.
 */
export const POD_NAME_ENV = "POD_NAME";

/**
 * Where a collector runs, and so what it takes in: the /metrics listeners it scrapes (with none,
 * its metrics pipeline takes OTLP), where it listens for OTLP, and the EMF log stream each
 * collector writes to (one per task or pod).
 */
export type CollectorSite = {
  scrape: string[];
  otlp: { grpc?: { endpoint: string }; http: { endpoint: string } };
  logStream: string;
};

/**
 * Beside Mira's container in an ECS task: Mira's /metrics on METRICS_LISTEN, OTLP over gRPC and
 * HTTP on the task's loopback, a log stream per task (ECS's task id).
 */
export const TASK_SITE: CollectorSite = {
  scrape: [METRICS_LISTEN],
  otlp: { grpc: { endpoint: "127.0.0.1:4317" }, http: { endpoint: "127.0.0.1:4318" } },
  logStream: "{TaskId}",
};

/**
 * Beside the GPU worker in its pod: the worker's /metrics on METRICS_LISTEN (its
 * WORKER_METRICS_ENV, fleet.ts), the pod's loopback; OTLP over HTTP on the same loopback
 * (POD_OTLP_HTTP), the one protocol the worker speaks, for its traces; a log stream per pod,
 * named by the collector's POD_NAME_ENV at its start.
 */
export const POD_SITE: CollectorSite = {
  scrape: [METRICS_LISTEN],
  otlp: { http: { endpoint: POD_OTLP_HTTP } },
  logStream: `\${env:${POD_NAME_ENV}}`,
};

/**
 * The collector's configuration (JSON, which the collector reads as YAML). In an ECS task (the
 * default site): scrape Mira's /metrics on its loopback metrics listener (METRICS_LISTEN) every
 * 30 s and write the series listed here to CloudWatch as EMF, under `namespace`; receive OTLP
 * traces on loopback and send them to X-Ray. In a worker's pod (POD_SITE): the same, from the
 * worker's /metrics and traces, into the same exporters, namespace and log group. The
 * declarations are the same in both: each picks out series that only some processes serve (the
 * gauges read from the database come from the API's processes, the jobs ended from the worker).
 */
export function adotConfig(namespace: string, logGroup: string, region: string, site: CollectorSite = TASK_SITE) {
  const scrapes = site.scrape.length > 0;
  return {
    receivers: {
      ...(scrapes
        ? {
            prometheus: {
              config: {
                scrape_configs: [
                  {
                    job_name: "mira",
                    scrape_interval: "30s",
                    metrics_path: "/metrics",
                    static_configs: [{ targets: site.scrape }],
                  },
                ],
              },
            },
          }
        : {}),
      otlp: { protocols: site.otlp },
    },
    processors: { batch: { timeout: "30s" } },
    exporters: {
      awsemf: {
        namespace,
        region,
        log_group_name: logGroup,
        log_stream_name: site.logStream,
        dimension_rollup_option: "NoDimensionRollup",
        resource_to_telemetry_conversion: { enabled: false },
        metric_declarations: [
          // Per projection (label `projection`): how far each read model is behind the log.
          { dimensions: [["projection"]], metric_name_selectors: ["^mira_projection_lag_seconds$", "^mira_projection_lag_events$", "^mira_projection_position$"] },
          // Jobs waiting for admission, per priority (label `priority`): one series each, what
          // KEDA sizes the GPU fleet on beside the queues (fleet.ts).
          { dimensions: [["priority"]], metric_name_selectors: [`^${JOBS_WAITING_METRIC}$`] },
          // The log's follow watermark: appenders holding it back.
          { dimensions: [[]], metric_name_selectors: ["^mira_log_watermark_lag_seconds$", "^mira_log_watermark_lag_events$"] },
          // The checkpoint witness, as the relay sees it (only the relay serves these): its
          // conflicts (the tamper signal) and when it last answered.
          { dimensions: [[]], metric_name_selectors: ["^mira_witness_conflicts_total$", "^mira_witness_last_success_timestamp_seconds$"] },
          // The workers' attempts ended, per kind and outcome (only the worker serves it): a
          // few series (one job kind today, six outcomes), each the attempts a pod ended since
          // its previous scrape, so a period's Sum is the fleet's. The job and stage durations
          // are not declared: a histogram reaches CloudWatch as a count and a sum, with no
          // minimum, maximum or buckets.
          { dimensions: [["kind", "outcome"]], metric_name_selectors: [`^${JOBS_FINISHED_METRIC}$`] },
        ],
        // The exporter turns a counter into the increase since its previous scrape. Kept, the
        // first scrape counts too: a conflict before the collector's first scrape (a relay that
        // starts into a tampered witness) is not swallowed as the baseline, nor a worker's
        // first attempts.
        retain_initial_value_of_delta_metric: true,
      },
      awsxray: { region, indexed_attributes: ["tenant", "job_id"] },
    },
    service: {
      pipelines: {
        metrics: { receivers: [scrapes ? "prometheus" : "otlp"], processors: ["batch"], exporters: ["awsemf"] },
        traces: { receivers: ["otlp"], processors: ["batch"], exporters: ["awsxray"] },
      },
    },
  };
}

export type TelemetryConfig = {
  stack: string;
  region: string;
};

/**
 * The collector's parts: the stack's metrics namespace (`Mira/<stack>`, which KEDA and the alarms
 * read), its configuration in an ECS task (`collector`) and in a worker's pod (`podCollector`),
 * its log group, and the statements for the roles it runs under (the tasks', the worker pods').
 */
export function telemetry(cfg: TelemetryConfig, logs: Parameters<typeof logGroup>[2]) {
  const s = cfg.stack;
  const namespace = `Mira/${s}`;
  const metricsLogGroup = logGroup("metrics-logs", `/mira/${s}/metrics`, logs, "observability");
  const collector = metricsLogGroup.name.apply((lg) => JSON.stringify(adotConfig(namespace, lg, cfg.region)));
  const podCollector = metricsLogGroup.name.apply((lg) => JSON.stringify(adotConfig(namespace, lg, cfg.region, POD_SITE)));

  /** What the role the collector runs under may do: EMF into its log group, traces into X-Ray. */
  const telemetryStatements = [
    {
      Effect: "Allow" as const,
      Action: ["logs:PutLogEvents", "logs:CreateLogStream", "logs:DescribeLogStreams"],
      Resource: [pulumi.interpolate`${metricsLogGroup.arn}:*`],
    },
    {
      Effect: "Allow" as const,
      Action: ["xray:PutTraceSegments", "xray:PutTelemetryRecords", "xray:GetSamplingRules", "xray:GetSamplingTargets"],
      Resource: ["*"],
    },
  ];

  return { namespace, collector, podCollector, metricsLogGroup, telemetryStatements };
}

export type Telemetry = ReturnType<typeof telemetry>;
