// Operations (issue 20): the alarms and the dashboard. They read Mira's own gauges, which the ADOT
// collector beside each ECS task writes to CloudWatch (telemetry.ts), the metrics AWS publishes
// itself (SQS, the ALB), and the metric filters here on the daily verification's verdicts. They
// watch what compute, the fleet and the verifier made, so they are made after those parts.

import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";
import type { Compute } from "./compute";
import type { Fleet } from "./fleet";
import { type foundations, tags } from "./foundations";
import { JOBS_WAITING_METRIC, JOBS_WAITING_PRIORITIES, type Telemetry } from "./telemetry";
import type { Verifier } from "./verifier";

type Found = ReturnType<typeof foundations>;

/**
 * How old a queue's oldest message may get before `<group>-oldest-message` rings (seconds; it
 * rings once the age has stayed over it for 5 minutes). A routine job waits for a GPU node to
 * start (the fleet scales from zero) and for the jobs before it. A STAT job (gpu-jobs-stat) is
 * taken before any routine one, and KEDA counts it at once (fleet.ts), so it waits only for a
 * worker to be free: after an idle spell, a GPU node to boot and join and the worker's image to
 * start (3 to 5 minutes, as for the first routine job); with the fleet at its maximum, a job in
 * hand to end, since none is preempted (minutes for a typical slide). 15 minutes is over both,
 * and half the routine queue's limit: a STAT job older than that means the workers are down or
 * stuck, no node can start, or the fleet sits at its maximum on long jobs (then raise
 * `workerMaxReplicas`). A slide's verification (the verify queue) starts within minutes, since a
 * verifier always runs; the other consumers within seconds.
 */
export const OLDEST_MESSAGE_SECONDS: Record<string, number> = { "gpu-jobs": 1800, "gpu-jobs-stat": 900, verify: 300 };
export const oldestMessageSeconds = (group: string) => OLDEST_MESSAGE_SECONDS[group] ?? 300;

/** How long the witness may go without answering the relay before `witness-stale` rings (seconds). */
export const WITNESS_STALE_SECONDS = 900;

/**
 * How long the relay's running task count may differ from 1 before `relay-not-one` rings
 * (minutes). A deploy stops the old relay before it starts the new one (compute.ts), which
 * leaves none for a few minutes; longer than that, events are not being published (none) or
 * are published twice, out of order (two).
 */
export const RELAY_NOT_ONE_MINUTES = 10;

/**
 * The database's health (alarms on what RDS publishes itself, and its own events): CPU above
 * 80 % for 15 minutes; free storage under 10 GiB (storage autoscaling grows it long before,
 * unless it is at maxAllocatedStorage); freeable memory under 256 MiB; no CPU datapoint at all
 * counts as breaching, since an instance that is down publishes nothing.
 */
export const RDS_LIMITS = { cpuPercent: 80, cpuMinutes: 15, freeStorageBytes: 10 * 1024 ** 3, freeableMemoryBytes: 256 * 1024 ** 2 };
/** The RDS event categories that page: the instance down, failed over, failing or short of storage. */
export const RDS_EVENT_CATEGORIES = ["availability", "failover", "failure", "low storage", "recovery"];

export type ObservabilityConfig = {
  stack: string;
  region: string;
  alarmEmail?: string;
  /**
   * `witness-stale` rings when the witness has not answered the relay for longer than this.
   * It must exceed the relay's checkpoint interval (Audit__CheckpointEverySeconds, 60 by
   * default): an idle relay asks the witness once an interval. Default 900.
   */
  witnessStaleSeconds?: number;
};

export function observability(cfg: ObservabilityConfig, f: Found, t: Telemetry, c: Compute, k: Fleet, v: Verifier) {
  const s = cfg.stack;
  const namespace = t.namespace;
  const alarmTopic = new aws.sns.Topic("alarms", {
    name: `mira-${s}-alarms`,
    kmsMasterKeyId: f.parts.keys.messagingKey.id,
    tags: tags(s, "observability"),
  });
  if (cfg.alarmEmail) {
    new aws.sns.TopicSubscription("alarms-email", { topic: alarmTopic.arn, protocol: "email", endpoint: cfg.alarmEmail });
  }
  const alarm = (name: string, args: Omit<aws.cloudwatch.MetricAlarmArgs, "alarmActions" | "okActions" | "name">) =>
    new aws.cloudwatch.MetricAlarm(name, {
      name: `mira-${s}-${name}`,
      alarmActions: [alarmTopic.arn],
      okActions: [alarmTopic.arn],
      treatMissingData: args.treatMissingData ?? "notBreaching",
      tags: tags(s, "observability"),
      ...args,
    });

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
        threshold: oldestMessageSeconds(group),
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
  // The checkpoint witness (DESIGN §4.3), from the relay's /metrics. A conflict is the tamper
  // signal: the witness holds a record the database does not match; the relay has stopped
  // checkpointing and goes on publishing. The counter arrives as its increase per scrape, so
  // the alarm holds for a day after the increase (one datapoint in 288 five-minute periods).
  made.push(
    alarm("witness-conflict", {
      alarmDescription:
        "Witness conflict (mira_witness_conflicts_total > 0): the tamper signal: checkpointing stopped, publishing goes on. See docs/runbooks/verify.md.",
      namespace,
      metricName: "mira_witness_conflicts_total",
      statistic: "Maximum",
      period: 300,
      evaluationPeriods: 288,
      datapointsToAlarm: 1,
      threshold: 0,
      comparisonOperator: "GreaterThanThreshold",
      treatMissingData: "notBreaching",
    }),
  );
  // The witness has not answered the relay (a checkpoint written, or an idle relay's probe once
  // a checkpoint interval) for too long: checkpoints are not being witnessed, or checkpointing
  // stopped after a conflict, or there is no relay. The age is the minute's timestamp less the
  // newest success seen in it; 0 (no success since the relay started) reads as very old. Five
  // minutes in a row, so a relay's restart (0 until its first probe) does not ring it; no data
  // (no relay) counts as breaching.
  const staleSeconds = cfg.witnessStaleSeconds ?? WITNESS_STALE_SECONDS;
  made.push(
    alarm("witness-stale", {
      alarmDescription: `The checkpoint witness has not answered the relay for over ${staleSeconds} s (or no relay reports): checkpoints are not witnessed. See docs/runbooks/verify.md.`,
      metricQueries: [
        {
          id: "m1",
          metric: { namespace, metricName: "mira_witness_last_success_timestamp_seconds", stat: "Maximum", period: 60 },
          returnData: false,
        },
        { id: "age", expression: "EPOCH(m1) - m1", label: "seconds since the witness last answered", returnData: true },
      ],
      evaluationPeriods: 5,
      datapointsToAlarm: 5,
      threshold: staleSeconds,
      comparisonOperator: "GreaterThanThreshold",
      treatMissingData: "breaching",
    }),
  );

  // The daily `mira audit verify` (compute.ts): its verdict lines, counted from its log group.
  const verdict = (name: string, pattern: string, metricName: string) =>
    new aws.cloudwatch.LogMetricFilter(name, {
      name: `mira-${s}-${name}`,
      logGroupName: c.verify.logGroup.name,
      pattern,
      metricTransformation: { name: metricName, namespace, value: "1", unit: "Count" },
    });
  verdict("audit-verify-intact", '"log intact"', "mira_audit_verify_intact");
  verdict("audit-verify-failed", '"log verification FAILED"', "mira_audit_verify_failed");
  made.push(
    // No `log intact` in 26 hours: the daily run failed, could not run (exit 2), did not start,
    // or was never scheduled. Hours without a run are missing data, and breaching.
    alarm("audit-verify-overdue", {
      alarmDescription: "mira audit verify has not printed `log intact` for 26 hours: the log is not being verified. See docs/runbooks/verify.md.",
      namespace,
      metricName: "mira_audit_verify_intact",
      statistic: "Sum",
      period: 3600,
      evaluationPeriods: 26,
      datapointsToAlarm: 26,
      threshold: 1,
      comparisonOperator: "LessThanThreshold",
      treatMissingData: "breaching",
    }),
    // The verification found the log altered: held for a day (one datapoint in 24 hours).
    alarm("audit-verify-failed", {
      alarmDescription: "mira audit verify printed `log verification FAILED`: the log or its witness was altered. See docs/runbooks/verify.md.",
      namespace,
      metricName: "mira_audit_verify_failed",
      statistic: "Sum",
      period: 3600,
      evaluationPeriods: 24,
      datapointsToAlarm: 1,
      threshold: 0,
      comparisonOperator: "GreaterThanThreshold",
      treatMissingData: "notBreaching",
    }),
  );

  // Exactly one relay (compute.ts): Container Insights' running task count of its service (the
  // cluster has Container Insights on), |count - 1| above 0 for RELAY_NOT_ONE_MINUTES; no
  // datapoint (no service, no count) breaches too.
  made.push(
    alarm("relay-not-one", {
      alarmDescription: `The relay has not run exactly one task for ${RELAY_NOT_ONE_MINUTES} minutes: none publishes nothing, two publish out of order. See docs/runbooks/deploy.md.`,
      metricQueries: [
        {
          id: "relay",
          metric: {
            namespace: "ECS/ContainerInsights",
            metricName: "RunningTaskCount",
            dimensions: { ClusterName: c.cluster.name, ServiceName: c.serviceNames.relay },
            stat: "Average",
            period: 60,
          },
          returnData: false,
        },
        { id: "off", expression: "ABS(relay - 1)", label: "relay tasks away from one", returnData: true },
      ],
      evaluationPeriods: RELAY_NOT_ONE_MINUTES,
      datapointsToAlarm: RELAY_NOT_ONE_MINUTES,
      threshold: 0,
      comparisonOperator: "GreaterThanThreshold",
      treatMissingData: "breaching",
    }),
  );

  // The database's health (RDS_LIMITS), and RDS's own events about it into the same topic.
  const db = { DBInstanceIdentifier: f.parts.db.identifier };
  made.push(
    alarm("database-cpu", {
      alarmDescription: `The database's CPU has been above ${RDS_LIMITS.cpuPercent} % for ${RDS_LIMITS.cpuMinutes} minutes, or it publishes no CPU at all (down).`,
      namespace: "AWS/RDS",
      metricName: "CPUUtilization",
      dimensions: db,
      statistic: "Average",
      period: 60,
      evaluationPeriods: RDS_LIMITS.cpuMinutes,
      datapointsToAlarm: RDS_LIMITS.cpuMinutes,
      threshold: RDS_LIMITS.cpuPercent,
      comparisonOperator: "GreaterThanThreshold",
      treatMissingData: "breaching",
    }),
    alarm("database-free-storage", {
      alarmDescription: "The database has under 10 GiB of storage free: storage autoscaling is at mira's maxAllocatedStorage, or cannot keep up.",
      namespace: "AWS/RDS",
      metricName: "FreeStorageSpace",
      dimensions: db,
      statistic: "Minimum",
      period: 300,
      evaluationPeriods: 1,
      threshold: RDS_LIMITS.freeStorageBytes,
      comparisonOperator: "LessThanThreshold",
    }),
    alarm("database-freeable-memory", {
      alarmDescription: "The database has had under 256 MiB of freeable memory for 15 minutes: it swaps, or its instance class is too small.",
      namespace: "AWS/RDS",
      metricName: "FreeableMemory",
      dimensions: db,
      statistic: "Minimum",
      period: 300,
      evaluationPeriods: 3,
      threshold: RDS_LIMITS.freeableMemoryBytes,
      comparisonOperator: "LessThanThreshold",
    }),
  );
  new aws.rds.EventSubscription("database-events", {
    name: `mira-${s}-database-events`,
    snsTopic: alarmTopic.arn,
    sourceType: "db-instance",
    sourceIds: [f.parts.db.identifier],
    eventCategories: RDS_EVENT_CATEGORIES,
    tags: tags(s, "observability"),
  });

  // The worker's pods Pending (Container Insights, the EKS add-on in fleet.ts): longer than a
  // pod can wait for its GPU during a rollout (an old pod's drain, then a node's start), a pod
  // is not going to start: no node offers `nvidia.com/gpu` (the device plugin does not run
  // there), the fleet is at gpuNodesMax, or EC2 has no capacity. No worker pods, no datapoints:
  // not breaching.
  const pendingMinutes = Math.ceil(k.workerProgressDeadlineSeconds / 60);
  made.push(
    alarm("gpu-pods-pending", {
      alarmDescription: `A GPU worker pod has been Pending for ${pendingMinutes} minutes: no GPU node offers nvidia.com/gpu, the node group is at its maximum, or EC2 has no capacity.`,
      namespace: "ContainerInsights",
      metricName: "pod_status_pending",
      dimensions: { ClusterName: k.cluster.name, Namespace: k.namespace, PodName: k.deploymentName },
      statistic: "Maximum",
      period: 60,
      evaluationPeriods: pendingMinutes,
      datapointsToAlarm: pendingMinutes,
      threshold: 0,
      comparisonOperator: "GreaterThanThreshold",
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
  const names = {
    gpuJobs: f.parts.queues["gpu-jobs"].queue.name,
    statJobs: f.parts.queues["gpu-jobs-stat"].queue.name,
    verify: f.parts.queues.verify.queue.name,
    ecsCluster: c.cluster.name,
    verifier: v.service.name,
  };
  new aws.cloudwatch.Dashboard("dashboard", {
    dashboardName: `mira-${s}`,
    dashboardBody: pulumi
      .all([queueNames, dlqNames, c.alb.arnSuffix, k.cluster.name, pulumi.output(names)])
      .apply(([qs, dlqs, albSuffix, cluster, n]) => JSON.stringify(dashboard(namespace, cfg.region, qs, dlqs, albSuffix, cluster, n))),
  });

  return {
    alarms: made,
    outputs: { namespace: pulumi.output(namespace), alarmTopicArn: alarmTopic.arn, dashboard: pulumi.output(`mira-${s}`) },
  };
}

export type Observability = ReturnType<typeof observability>;

function dashboard(
  namespace: string,
  region: string,
  queues: string[],
  dlqs: string[],
  alb: string,
  cluster: string,
  n: { gpuJobs: string; statJobs: string; verify: string; ecsCluster: string; verifier: string },
) {
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
      // STAT jobs beside routine ones: the same workers take both, STAT first. The queues hold
      // the jobs the handlers admitted; the rest wait for admission (what KEDA adds to them).
      widget(
        "GPU jobs waiting: routine and STAT, queued and not yet admitted",
        [
          ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", n.gpuJobs, { label: "routine, queued" }],
          ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", n.statJobs, { label: "STAT, queued" }],
          ...JOBS_WAITING_PRIORITIES.map((p) => [namespace, JOBS_WAITING_METRIC, "priority", p, { label: `${p === "stat" ? "STAT" : p}, not yet admitted` }]),
        ],
        12,
        12,
      ),
      // The verifier's queue beside its task count (Container Insights): a backlog that does not
      // bring tasks up, or tasks that do not bring it down.
      widget(
        "Slides waiting for verification, and verifier tasks",
        [
          ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", n.verify],
          ["AWS/SQS", "ApproximateNumberOfMessagesNotVisible", "QueueName", n.verify],
          ["ECS/ContainerInsights", "RunningTaskCount", "ClusterName", n.ecsCluster, "ServiceName", n.verifier],
        ],
        0,
        18,
      ),
      {
        type: "text",
        x: 0,
        y: 24,
        width: 24,
        height: 2,
        properties: {
          markdown: `Mira on EKS cluster \`${cluster}\`: the worker fleet scales on the gpu-jobs and gpu-jobs-stat queues and the jobs waiting for admission together (KEDA, their sum; STAT jobs are admitted at once and taken first, none is preempted); the slide verifier \`${n.verifier}\` (ECS) on the verify queue (Application Auto Scaling). Runbooks: docs/runbooks/.`,
        },
      },
    ],
  };
}
