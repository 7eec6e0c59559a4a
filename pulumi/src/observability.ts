// Operations (issue 20): Mira's Prometheus gauges reach CloudWatch through the ADOT collector
// running beside each ECS task (scraping /metrics, writing EMF), traces go to X-Ray through
// the same collector, and the alarms and the dashboard read both those metrics and the ones
// AWS publishes itself (SQS, the ALB).

import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";
import type { Compute } from "./compute";
import type { Fleet } from "./fleet";
import { type foundations, tags } from "./foundations";

export const ADOT_IMAGE = "public.ecr.aws/aws-observability/aws-otel-collector:v0.43.3";
/** Where Mira's process listens in its task (the ALB's target port, and what ADOT scrapes). */
export const APP_PORT = 8080;

/**
 * The collector's configuration (JSON, which the collector reads as YAML): scrape Mira's
 * /metrics every 30 s and write the gauges listed here to CloudWatch as EMF, under
 * `namespace`; receive OTLP traces on loopback and send them to X-Ray.
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
              static_configs: [{ targets: [`127.0.0.1:${APP_PORT}`] }],
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
          // The log's follow watermark: appenders holding it back.
          { dimensions: [[]], metric_name_selectors: ["^mira_log_watermark_lag_seconds$", "^mira_log_watermark_lag_events$"] },
        ],
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

type Found = ReturnType<typeof foundations>;

export function observability(cfg: { stack: string; region: string; alarmEmail?: string }, f: Found) {
  const s = cfg.stack;
  const namespace = `Mira/${s}`;
  const metricsLogGroup = new aws.cloudwatch.LogGroup("metrics-logs", {
    name: `/mira/${s}/metrics`,
    retentionInDays: 30,
    tags: tags(s, "observability"),
  });
  const alarmTopic = new aws.sns.Topic("alarms", {
    name: `mira-${s}-alarms`,
    kmsMasterKeyId: f.parts.keys.messagingKey.id,
    tags: tags(s, "observability"),
  });
  if (cfg.alarmEmail) {
    new aws.sns.TopicSubscription("alarms-email", { topic: alarmTopic.arn, protocol: "email", endpoint: cfg.alarmEmail });
  }
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

  const alarm = (name: string, args: Omit<aws.cloudwatch.MetricAlarmArgs, "alarmActions" | "okActions" | "name">) =>
    new aws.cloudwatch.MetricAlarm(name, {
      name: `mira-${s}-${name}`,
      alarmActions: [alarmTopic.arn],
      okActions: [alarmTopic.arn],
      treatMissingData: args.treatMissingData ?? "notBreaching",
      tags: tags(s, "observability"),
      ...args,
    });

  function alarms(c: Compute, k: Fleet) {
    const made: aws.cloudwatch.MetricAlarm[] = [];
    // Every dead-letter queue holds nothing: one message there is a job or an event nobody handled.
    for (const [group, q] of Object.entries(f.parts.queues)) {
      made.push(
        alarm(`${group}-dlq-not-empty`, {
          alarmDescription: `A message reached ${group}'s dead-letter queue: see docs/runbooks/redrive.md.`,
          namespace: "AWS/SQS",
          metricName: "ApproximateNumberOfMessagesVisible",
          dimensions: { QueueName: q.dlq.name },
          statistic: "Maximum",
          period: 60,
          evaluationPeriods: 1,
          threshold: 0,
          comparisonOperator: "GreaterThanThreshold",
        }),
      );
      // The oldest message waits too long: the consumers are down, stuck or too few.
      made.push(
        alarm(`${group}-oldest-message`, {
          alarmDescription: `${group}'s oldest message is older than expected: its consumers are down, stuck or too few.`,
          namespace: "AWS/SQS",
          metricName: "ApproximateAgeOfOldestMessage",
          dimensions: { QueueName: q.queue.name },
          statistic: "Maximum",
          period: 60,
          evaluationPeriods: 5,
          threshold: group === "gpu-jobs" ? 1800 : 300,
          comparisonOperator: "GreaterThanThreshold",
        }),
      );
    }
    // Mira's own gauges, through the collector.
    made.push(
      alarm("projection-lag", {
        alarmDescription: "The read models are more than a minute behind the log: see docs/runbooks/rebuild.md.",
        namespace,
        metricName: "mira_projection_lag_seconds",
        dimensions: { projection: "read_models" },
        statistic: "Maximum",
        period: 60,
        evaluationPeriods: 5,
        threshold: 60,
        comparisonOperator: "GreaterThanThreshold",
        treatMissingData: "breaching",
      }),
      alarm("watermark-lag", {
        alarmDescription: "An appender has held the log's follow watermark back for over 30 s: followers cannot see newer events.",
        namespace,
        metricName: "mira_log_watermark_lag_seconds",
        statistic: "Maximum",
        period: 60,
        evaluationPeriods: 3,
        threshold: 30,
        comparisonOperator: "GreaterThanThreshold",
        treatMissingData: "breaching",
      }),
    );
    // The ALB's 5xx rate: over 5 % of requests in 5 minutes, answered by Mira or by the ALB itself.
    const lb = { LoadBalancer: c.alb.arnSuffix };
    const albMetric = (id: string, metricName: string) => ({
      id,
      metric: { namespace: "AWS/ApplicationELB", metricName, dimensions: lb, stat: "Sum", period: 300 },
    });
    made.push(
      alarm("alb-5xx-rate", {
        alarmDescription: "Over 5 % of the API's requests failed with a 5xx in 5 minutes.",
        metricQueries: [
          albMetric("target", "HTTPCode_Target_5XX_Count"),
          albMetric("elb", "HTTPCode_ELB_5XX_Count"),
          albMetric("requests", "RequestCount"),
          { id: "rate", expression: "IF(requests > 0, 100 * (FILL(target, 0) + FILL(elb, 0)) / requests, 0)", label: "5xx %", returnData: true },
        ],
        evaluationPeriods: 1,
        threshold: 5,
        comparisonOperator: "GreaterThanThreshold",
      }),
    );

    const queueNames = Object.values(f.parts.queues).map((q) => q.queue.name);
    const dlqNames = Object.values(f.parts.queues).map((q) => q.dlq.name);
    new aws.cloudwatch.Dashboard("dashboard", {
      dashboardName: `mira-${s}`,
      dashboardBody: pulumi
        .all([queueNames, dlqNames, c.alb.arnSuffix, k.cluster.name])
        .apply(([qs, dlqs, albSuffix, cluster]) => JSON.stringify(dashboard(namespace, cfg.region, qs, dlqs, albSuffix, cluster))),
    });
    return made;
  }

  return {
    namespace,
    collector,
    metricsLogGroup,
    telemetryStatements,
    alarms,
    outputs: { namespace: pulumi.output(namespace), alarmTopicArn: alarmTopic.arn, dashboard: pulumi.output(`mira-${s}`) },
  };
}

export type Observability = ReturnType<typeof observability>;

function dashboard(namespace: string, region: string, queues: string[], dlqs: string[], alb: string, cluster: string) {
  const widget = (title: string, metrics: unknown[][], x: number, y: number, stat = "Maximum") => ({
    type: "metric",
    x,
    y,
    width: 12,
    height: 6,
    properties: { title, region, stat, period: 60, view: "timeSeries", metrics },
  });
  return {
    widgets: [
      widget("Projection lag (s)", [[namespace, "mira_projection_lag_seconds", "projection", "read_models"]], 0, 0),
      widget("Log watermark lag (s)", [[namespace, "mira_log_watermark_lag_seconds"]], 12, 0),
      widget("Oldest message (s)", queues.map((q) => ["AWS/SQS", "ApproximateAgeOfOldestMessage", "QueueName", q]), 0, 6),
      widget("Dead-letter queues (messages)", dlqs.map((q) => ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", q]), 12, 6),
      widget(
        "API requests and 5xx",
        [
          ["AWS/ApplicationELB", "RequestCount", "LoadBalancer", alb],
          ["AWS/ApplicationELB", "HTTPCode_Target_5XX_Count", "LoadBalancer", alb],
          ["AWS/ApplicationELB", "HTTPCode_ELB_5XX_Count", "LoadBalancer", alb],
        ],
        0,
        12,
        "Sum",
      ),
      widget("GPU jobs waiting", [["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", queues.find((q) => q.includes("gpu-jobs")) ?? queues[0]]], 12, 12),
      {
        type: "text",
        x: 0,
        y: 18,
        width: 24,
        height: 2,
        properties: { markdown: `Mira on EKS cluster \`${cluster}\`: the worker fleet scales on the gpu-jobs queue (KEDA). Runbooks: docs/runbooks/.` },
      },
    ],
  };
}
