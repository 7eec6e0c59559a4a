// The ADOT collector that runs beside Mira's container in each ECS task (issue 20): it scrapes
// Mira's Prometheus gauges from /metrics on the task's loopback and writes them to CloudWatch as
// EMF, under the stack's metrics namespace, and sends traces on to X-Ray. Its image, the ports of
// Mira's task, its configuration, its log group and what its task role may do. What runs it
// (compute.ts) and what reads its metrics (fleet.ts, the alarms in observability.ts) import this;
// it imports none of them.

import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";
import { tags } from "./foundations";

export const ADOT_IMAGE = "public.ecr.aws/aws-observability/aws-otel-collector:v0.43.3";
/** Where Mira's process listens in its task (the ALB's target port). */
export const APP_PORT = 8080;
/**
 * Where Mira serves /metrics in its task, and what ADOT scrapes: a listener of its own on
 * loopback (`Api__MetricsListen`). With it set, /metrics answers 404 on APP_PORT, so nothing
 * the ALB reaches serves it. The collector shares the task's network namespace (awsvpc), so
 * 127.0.0.1 reaches it; no security group or load balancer opens this port.
 */
export const METRICS_PORT = 9464;
/** The value of `Api__MetricsListen` in every task the collector scrapes. */
export const METRICS_LISTEN = `127.0.0.1:${METRICS_PORT}`;

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
 * The collector's configuration (JSON, which the collector reads as YAML): scrape Mira's
 * /metrics on its loopback metrics listener (METRICS_LISTEN) every 30 s and write the gauges
 * listed here to CloudWatch as EMF, under `namespace`; receive OTLP traces on loopback and
 * send them to X-Ray.
 */
export function adotConfig(namespace: string, logGroup: string, region: string) {
  return {
    receivers: {
      prometheus: {
        config: {
          scrape_configs: [
            {
              job_name: "mira",
              scrape_interval: "30s",
              metrics_path: "/metrics",
              static_configs: [{ targets: [METRICS_LISTEN] }],
            },
          ],
        },
      },
      otlp: { protocols: { grpc: { endpoint: "127.0.0.1:4317" }, http: { endpoint: "127.0.0.1:4318" } } },
    },
    processors: { batch: { timeout: "30s" } },
    exporters: {
      awsemf: {
        namespace,
        region,
        log_group_name: logGroup,
        log_stream_name: "{TaskId}",
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
        ],
        // The exporter turns a counter into the increase since its previous scrape. Kept, the
        // first scrape counts too: a conflict before the collector's first scrape (a relay that
        // starts into a tampered witness) is not swallowed as the baseline.
        retain_initial_value_of_delta_metric: true,
      },
      awsxray: { region, indexed_attributes: ["tenant", "job_id"] },
    },
    service: {
      pipelines: {
        metrics: { receivers: ["prometheus"], processors: ["batch"], exporters: ["awsemf"] },
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
 * read), its configuration, its log group, and the statements for the task roles it runs under.
 */
export function telemetry(cfg: TelemetryConfig) {
  const s = cfg.stack;
  const namespace = `Mira/${s}`;
  const metricsLogGroup = new aws.cloudwatch.LogGroup("metrics-logs", {
    name: `/mira/${s}/metrics`,
    retentionInDays: 30,
    tags: tags(s, "observability"),
  });
  const collector = metricsLogGroup.name.apply((lg) => JSON.stringify(adotConfig(namespace, lg, cfg.region)));

  /** What the collector's task role may do: EMF into its log group, traces into X-Ray. */
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

  return { namespace, collector, metricsLogGroup, telemetryStatements };
}

export type Telemetry = ReturnType<typeof telemetry>;
