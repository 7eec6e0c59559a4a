// The slide verifier (issue 32): `mira-worker verify`, from the worker's image, as a small
// Fargate service in the API's ECS cluster. It consumes the verify queue (SlideUploaded only,
// bus/topology.json), reads each slide's immutable copy, hashes and opens it on the CPU, and
// appends SlideVerified or SlideRejected. An upload no longer wakes the GPU fleet, which now
// scales on JobQueued alone (fleet.ts).
//
// It runs with the worker's settings and the worker's database login (`mira_svc_worker`: the
// same binary, the same grants), under a role of its own that reaches nothing of the GPU queues
// (gpu-jobs, gpu-jobs-stat) and writes to no bucket. It serves /metrics on its task's loopback,
// as the worker does in its pod (MIRA_METRICS_LISTEN), but no collector runs beside it: nothing
// scrapes that listener, and none of its series reaches CloudWatch.

import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";
import type { Compute } from "./compute";
import type { Fleet } from "./fleet";
import { WORKER_HOME } from "./fleet";
import { type foundations, role, tags } from "./foundations";
import { METRICS_LISTEN, WORKER_METRICS_ENV } from "./telemetry";

type Found = ReturnType<typeof foundations>;

export type VerifierConfig = {
  stack: string;
  region: string;
  imageTag: string;
  /** Fargate CPU units and memory (MiB) of a verifier task. Hashing a multi-GB slide is CPU and network bound. */
  verifierTaskCpu: number;
  verifierTaskMemory: number;
  /**
   * A task's ephemeral storage (GiB, 21 to 200; 20 or less: Fargate's default 20): the image's
   * layers and the slide, which is downloaded whole before it is hashed and opened.
   */
  verifierStorageGiB: number;
  /**
   * Tasks kept running (1: a job waits for its slide's verification, and a verifier scaled from
   * zero would add CloudWatch's minutes and a task's start to the first job after a quiet spell).
   */
  verifierMinTasks: number;
  /** The most tasks a backlog on the verify queue scales the service to. */
  verifierMaxTasks: number;
};

/** How long the verify queue keeps a backlog before a task is added (minutes, one datapoint each). */
export const SCALE_OUT_MINUTES = 2;
/** How long the verify queue stays empty, nothing in flight either, before a task is removed (minutes). */
export const SCALE_IN_MINUTES = 15;

/** The sizes and counts, checked before anything is made. */
export function checkVerifierConfig(cfg: VerifierConfig) {
  const whole = (n: number) => Number.isInteger(n);
  if (!whole(cfg.verifierMinTasks) || !whole(cfg.verifierMaxTasks) || cfg.verifierMinTasks < 0 || cfg.verifierMaxTasks < Math.max(1, cfg.verifierMinTasks)) {
    throw new Error(`mira:verifierMinTasks ${cfg.verifierMinTasks} and mira:verifierMaxTasks ${cfg.verifierMaxTasks}: need 0 <= min <= max, max >= 1`);
  }
  if (!whole(cfg.verifierStorageGiB) || cfg.verifierStorageGiB > 200) {
    throw new Error(`mira:verifierStorageGiB ${cfg.verifierStorageGiB}: Fargate gives a task at most 200 GiB`);
  }
}

export function verifier(cfg: VerifierConfig, f: Found, c: Compute, k: Fleet) {
  checkVerifierConfig(cfg);
  const s = cfg.stack;
  const p = f.parts;
  const verify = p.queues.verify.queue;
  const repo = p.repos["mira-wsi-worker"];
  const login = p.secrets.dbLogins.worker;

  // ECS pulls the worker's image, writes the service's logs and injects the worker's login; the
  // task's own role is the verifier's statements (foundations.ts), and reads no secret.
  const execution = c.executionRole("verifier", c.logs, [login.arn], repo);
  const taskRole = role("verifier", s, { Service: "ecs-tasks.amazonaws.com" }, p.verifierStatements);

  const env = [
    ...Object.entries(k.workerSettings)
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([name, value]) => ({ name, value })),
    // /metrics on the task's loopback, as in the worker's pod; no port mapping, security group
    // or load balancer opens it.
    { name: WORKER_METRICS_ENV, value: METRICS_LISTEN },
    // A writable home and temporary directory, as in the worker's pod (fleet.ts): the root is
    // read-only.
    { name: "HOME", value: WORKER_HOME },
    { name: "TMPDIR", value: "/tmp" },
  ];
  const task = new aws.ecs.TaskDefinition("verifier-task", {
    family: `mira-${s}-verifier`,
    requiresCompatibilities: ["FARGATE"],
    networkMode: "awsvpc",
    cpu: String(cfg.verifierTaskCpu),
    memory: String(cfg.verifierTaskMemory),
    ephemeralStorage: cfg.verifierStorageGiB > 20 ? { sizeInGib: cfg.verifierStorageGiB } : undefined,
    runtimePlatform: { operatingSystemFamily: "LINUX", cpuArchitecture: "X86_64" },
    executionRoleArn: execution.arn,
    taskRoleArn: taskRole.arn,
    volumes: [{ name: "tmp" }, { name: "home" }],
    containerDefinitions: pulumi.jsonStringify([
      {
        // `mira`, as in every Mira task definition: .github/scripts/register-revision.sh sets
        // the image of the container of that name.
        name: "mira",
        image: pulumi.interpolate`${repo.repositoryUrl}:${cfg.imageTag}`,
        essential: true,
        // The image's entrypoint is mira-worker.
        command: ["verify"],
        // The worker Deployment's settings, exactly (fleet.ts), and its metrics listener.
        environment: env,
        secrets: [{ name: "DATABASE_URL", valueFrom: login.arn }],
        readonlyRootFilesystem: true,
        // The slide is downloaded here: the task's ephemeral storage.
        mountPoints: [
          { sourceVolume: "tmp", containerPath: "/tmp" },
          { sourceVolume: "home", containerPath: WORKER_HOME },
        ],
        user: "10001",
        // SIGTERM drains the slide in hand; Fargate waits at most 120 s. A verification cut
        // short is redelivered once its visibility lapses, and is idempotent.
        stopTimeout: 120,
        logConfiguration: {
          logDriver: "awslogs",
          options: { "awslogs-group": c.logs.name, "awslogs-region": cfg.region, "awslogs-stream-prefix": "verifier" },
        },
      },
    ]),
    tags: tags(s, "compute"),
  });

  const service = new aws.ecs.Service(
    "verifier",
    {
      name: `mira-${s}-verifier`,
      cluster: c.cluster.arn,
      taskDefinition: task.arn,
      desiredCount: cfg.verifierMinTasks,
      launchType: "FARGATE",
      platformVersion: "LATEST",
      networkConfiguration: c.network,
      deploymentMaximumPercent: 200,
      deploymentMinimumHealthyPercent: 100,
      deploymentCircuitBreaker: { enable: true, rollback: true },
      enableExecuteCommand: false,
      propagateTags: "SERVICE",
      tags: tags(s, "compute"),
    },
    // Deploys move the image (a new task-definition revision); Application Auto Scaling owns
    // the task count. A later `pulumi up` moves neither back.
    { ignoreChanges: ["taskDefinition", "desiredCount"] },
  );

  // ---- scaling on the verify queue ------------------------------------------------------------
  // Step scaling on two alarms of our own, rather than target tracking:
  // * the queue's depth is no metric target tracking can hold at a value (it does not fall in
  //   proportion as tasks are added); backlog per task would be, but needs Container Insights'
  //   task count in metric math, and its alarms (3 minutes out, 15 in) are AWS's, not tunable;
  // * a verification takes seconds to a few minutes, so any backlog that lasts
  //   SCALE_OUT_MINUTES means too few tasks: add one, more for a deeper backlog;
  // * a task is removed only after SCALE_IN_MINUTES with nothing waiting and nothing in flight,
  //   so a scale-in finds the tasks idle (a slide that arrives just then is redelivered once its
  //   task stops).
  // While an alarm stays in ALARM, Application Auto Scaling applies its policy again after each
  // cooldown, up to verifierMaxTasks, down to verifierMinTasks.
  const target = new aws.appautoscaling.Target("verifier-scaling", {
    serviceNamespace: "ecs",
    scalableDimension: "ecs:service:DesiredCount",
    resourceId: pulumi.interpolate`service/${c.cluster.name}/${service.name}`,
    minCapacity: cfg.verifierMinTasks,
    maxCapacity: cfg.verifierMaxTasks,
    tags: tags(s, "compute"),
  });
  const on = { resourceId: target.resourceId, scalableDimension: target.scalableDimension, serviceNamespace: target.serviceNamespace };
  const scaleOut = new aws.appautoscaling.Policy("verifier-scale-out", {
    name: `mira-${s}-verifier-scale-out`,
    policyType: "StepScaling",
    ...on,
    stepScalingPolicyConfiguration: {
      adjustmentType: "ChangeInCapacity",
      // A new task pulls the worker's image (CUDA's runtime and all) before it takes work.
      cooldown: 120,
      metricAggregationType: "Maximum",
      // Bounds from the alarm's threshold (1 waiting): 1-4 waiting +1, 5-14 +2, 15 or more +3.
      stepAdjustments: [
        { metricIntervalLowerBound: "0", metricIntervalUpperBound: "4", scalingAdjustment: 1 },
        { metricIntervalLowerBound: "4", metricIntervalUpperBound: "14", scalingAdjustment: 2 },
        { metricIntervalLowerBound: "14", scalingAdjustment: 3 },
      ],
    },
  });
  const scaleIn = new aws.appautoscaling.Policy("verifier-scale-in", {
    name: `mira-${s}-verifier-scale-in`,
    policyType: "StepScaling",
    ...on,
    stepScalingPolicyConfiguration: {
      adjustmentType: "ChangeInCapacity",
      cooldown: 300,
      metricAggregationType: "Maximum",
      stepAdjustments: [{ metricIntervalUpperBound: "0", scalingAdjustment: -1 }],
    },
  });
  const queue = { QueueName: verify.name };
  // Into the scaling policies only: these are no page to anyone (the verify queue's own
  // alarms, observability.ts, are).
  const backlog = new aws.cloudwatch.MetricAlarm("verifier-backlog", {
    name: `mira-${s}-verifier-backlog`,
    alarmDescription: `Slides have waited ${SCALE_OUT_MINUTES} minutes on the verify queue: add verifier tasks (Application Auto Scaling).`,
    namespace: "AWS/SQS",
    metricName: "ApproximateNumberOfMessagesVisible",
    dimensions: queue,
    statistic: "Maximum",
    period: 60,
    evaluationPeriods: SCALE_OUT_MINUTES,
    datapointsToAlarm: SCALE_OUT_MINUTES,
    threshold: 1,
    comparisonOperator: "GreaterThanOrEqualToThreshold",
    treatMissingData: "notBreaching",
    alarmActions: [scaleOut.arn],
    tags: tags(s, "compute"),
  });
  const sqs = (id: string, metricName: string) => ({
    id,
    metric: { namespace: "AWS/SQS", metricName, dimensions: queue, stat: "Maximum", period: 60 },
    returnData: false,
  });
  const idle = new aws.cloudwatch.MetricAlarm("verifier-idle", {
    name: `mira-${s}-verifier-idle`,
    alarmDescription: `Nothing has waited on or been in flight from the verify queue for ${SCALE_IN_MINUTES} minutes: remove a verifier task (Application Auto Scaling).`,
    metricQueries: [
      sqs("visible", "ApproximateNumberOfMessagesVisible"),
      sqs("inflight", "ApproximateNumberOfMessagesNotVisible"),
      { id: "work", expression: "visible + inflight", label: "slides waiting or being verified", returnData: true },
    ],
    evaluationPeriods: SCALE_IN_MINUTES,
    datapointsToAlarm: SCALE_IN_MINUTES,
    threshold: 0,
    comparisonOperator: "LessThanOrEqualToThreshold",
    // The verifier polls the queue without pause, so SQS keeps publishing its metrics; no data
    // at all means no traffic either, and the count may go back to the minimum.
    treatMissingData: "breaching",
    alarmActions: [scaleIn.arn],
    tags: tags(s, "compute"),
  });

  return {
    service,
    task,
    role: taskRole,
    executionRole: execution,
    scaling: { target, scaleOut, scaleIn, backlog, idle },
    outputs: { service: service.name, taskFamily: task.family },
  };
}

export type Verifier = ReturnType<typeof verifier>;
