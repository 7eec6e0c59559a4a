// The API and the roles on ECS Fargate (issue 20), from the `mira-api` image: the gateway behind
// an ALB that only CloudFront reaches, the relay (exactly one task), the projector and the
// handlers as roles of the same image chosen by `Roles__Enabled`, a one-off task that runs
// `mira migrate`, and `mira audit verify` every day (EventBridge Scheduler). Each service's task
// carries the ADOT collector beside Mira's container, which scrapes Mira's /metrics on the
// task's loopback (Api__MetricsListen, METRICS_LISTEN): never on the API's port.

import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";
import { DB_LOGINS, DB_TLS, type DbLogin, egressTo, type foundations, ingressFrom, loginSetting, logGroup, role, tags } from "./foundations";
import { ADOT_IMAGE, APP_PORT, METRICS_LISTEN, type Telemetry } from "./telemetry";

type Found = ReturnType<typeof foundations>;

export type ComputeConfig = {
  stack: string;
  region: string;
  /** The image tag the task definitions start from; deploys move it (docs/runbooks/deploy.md). */
  imageTag: string;
  /** ACM certificate (in the stack's region) for the ALB's HTTPS listener. */
  albCertificateArn: string;
  /** The header value CloudFront sends to the ALB; the ALB answers 403 without it. A secret. */
  originVerifySecret: pulumi.Input<string>;
  apiTasks: number;
  handlerTasks: number;
  taskCpu: number;
  taskMemory: number;
  /** When `mira audit verify` runs (EventBridge Scheduler, UTC). Default: every day at 03:30. */
  auditVerifySchedule?: string;
};

/** The full verification's default schedule: daily, at a quiet hour (UTC). */
export const AUDIT_VERIFY_SCHEDULE = "cron(30 3 * * ? *)";

/** The header CloudFront adds to every request it sends to the ALB. */
export const ORIGIN_HEADER = "X-Mira-Origin-Verify";
/** The paths the ALB forwards to Mira (CloudFront sends it exactly these). */
export const API_PATHS = ["/api/*", "/ws"];

/**
 * The ECS services: which roles each runs (`Roles__Enabled`), how many tasks, and the database
 * login it connects as (DATABASE_URL, from that login's secret).
 */
export function serviceSpecs(cfg: ComputeConfig) {
  return {
    api: { roles: "", tasks: cfg.apiTasks, taskRole: "api" as const, login: "api" as DbLogin },
    // Exactly one relay: it publishes the log's events in order, and two would race.
    relay: { roles: "relay", tasks: 1, taskRole: "roles" as const, login: "relay" as DbLogin },
    projector: { roles: "projector", tasks: 1, taskRole: "roles" as const, login: "projector" as DbLogin },
    handlers: { roles: "handlers", tasks: cfg.handlerTasks, taskRole: "roles" as const, login: "handlers" as DbLogin },
  };
}

/**
 * The login the daily `mira audit verify` connects as. It is no process of its own among the
 * logins `mira migrate` makes (DB_LOGINS): it reads what the relay reads and writes (the whole
 * log, its checkpoints and epochs), so it connects as the relay.
 */
export const VERIFY_LOGIN: DbLogin = "relay";

export function compute(cfg: ComputeConfig, f: Found, tel: Telemetry) {
  const s = cfg.stack;
  const p = f.parts;
  const image = pulumi.interpolate`${p.repos["mira-api"].repositoryUrl}:${cfg.imageTag}`;

  const cluster = new aws.ecs.Cluster("cluster", {
    name: `mira-${s}`,
    settings: [{ name: "containerInsights", value: "enabled" }],
    tags: tags(s, "compute"),
  });
  const logs = logGroup("service-logs", `/mira/${s}/services`, p.logs, "compute");
  // The daily verification's own log group: its verdict lines are what the verification alarms
  // count (observability.ts), and its lines are the record that the log was verified, kept
  // mira:logRetentionDays like every group (ADR 0037).
  const verifyLogs = logGroup("audit-verify-logs", `/mira/${s}/audit-verify`, p.logs, "compute");

  // The owner's connection, for `mira migrate` only (DESIGN §2: Database__MigrationUrl): the
  // instance's address with no credentials in it, and the owner's user and password from the
  // master secret RDS keeps and rotates (every 7 days), as libpq's PGUSER and PGPASSWORD, which
  // sqlx reads where the URL names none. ECS reads the secret when the task starts, so each run
  // of the migration has the current password: nothing holds a copy of it (ADR 0035).
  const masterSecretArn = p.db.masterUserSecrets.apply((x) => {
    const arn = x?.[0]?.secretArn;
    if (!arn) throw new Error("the database has no master secret: manageMasterUserPassword must stay on");
    return arn;
  });
  const migrationUrl = pulumi.interpolate`postgres://${p.db.endpoint}/mira?${DB_TLS}`;
  const owner = [
    { name: "PGUSER", valueFrom: pulumi.interpolate`${masterSecretArn}:username::` },
    { name: "PGPASSWORD", valueFrom: pulumi.interpolate`${masterSecretArn}:password::` },
  ];

  // ECS itself (pulling the image, writing logs, reading the secrets it injects): one execution
  // role per task definition family, each reading only the secrets its family injects, so that
  // no task starts with another process's database login.
  const logins = p.secrets.dbLogins;
  // The image's repository: `mira-api`, but for the slide verifier (verifier.ts), which runs
  // the worker's.
  const executionRole = (
    family: string,
    group: aws.cloudwatch.LogGroup,
    secrets: pulumi.Input<string>[],
    repo: aws.ecr.Repository = p.repos["mira-api"],
  ) =>
    role(`${family}-execution`, s, { Service: "ecs-tasks.amazonaws.com" }, [
      { Effect: "Allow", Action: ["ecr:GetAuthorizationToken"], Resource: ["*"] },
      {
        Effect: "Allow",
        Action: ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
        Resource: [repo.arn],
      },
      { Effect: "Allow", Action: ["logs:CreateLogStream", "logs:PutLogEvents"], Resource: [pulumi.interpolate`${group.arn}:*`] },
      { Effect: "Allow", Action: ["secretsmanager:GetSecretValue"], Resource: secrets },
      // The secrets are under the RDS key, the image under the buckets' key.
      { Effect: "Allow", Action: ["kms:Decrypt"], Resource: [p.keys.rdsKey.arn, p.keys.s3Key.arn] },
    ]);
  // `mira migrate` makes every login from its URL (Database__Logins__<Process>): its task reads
  // them all, and the owner's from RDS's master secret.
  const migrateExecution = executionRole("migrate", logs, [masterSecretArn, ...DB_LOGINS.map((l) => logins[l].arn)]);
  const verifyExecution = executionRole("audit-verify", verifyLogs, [logins[VERIFY_LOGIN].arn]);
  // The collector's writes go with each task role (EMF log group, X-Ray).
  for (const [n, r] of [
    ["api", p.apiRole],
    ["roles", p.rolesRole],
  ] as const) {
    new aws.iam.RolePolicy(`${n}-telemetry`, { role: r.id, policy: pulumi.jsonStringify({ Version: "2012-10-17", Statement: tel.telemetryStatements }) });
  }
  // The task's own role reads no secret: the URLs `mira migrate` needs come from ECS (its
  // execution role).
  const migrateRole = role("migrate", s, { Service: "ecs-tasks.amazonaws.com" }, [
    { Effect: "Allow", Action: ["kms:Decrypt"], Resource: [p.keys.rdsKey.arn] },
  ]);

  const env = (m: Record<string, pulumi.Input<string>>) =>
    Object.entries(m)
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([name, value]) => ({ name, value }));
  const logConfig = (prefix: string, group: pulumi.Input<string> = logs.name) => ({
    logDriver: "awslogs",
    options: { "awslogs-group": group, "awslogs-region": cfg.region, "awslogs-stream-prefix": prefix },
  });

  const taskDefinition = (
    name: string,
    taskRole: aws.iam.Role,
    execution: aws.iam.Role,
    login: DbLogin,
    settings: Record<string, pulumi.Input<string>>,
    command: string[],
  ) =>
    new aws.ecs.TaskDefinition(`${name}-task`, {
      family: `mira-${s}-${name}`,
      requiresCompatibilities: ["FARGATE"],
      networkMode: "awsvpc",
      cpu: String(cfg.taskCpu),
      memory: String(cfg.taskMemory),
      runtimePlatform: { operatingSystemFamily: "LINUX", cpuArchitecture: "X86_64" },
      executionRoleArn: execution.arn,
      taskRoleArn: taskRole.arn,
      volumes: [{ name: "tmp" }],
      containerDefinitions: pulumi.jsonStringify([
        {
          name: "mira",
          image,
          essential: true,
          command,
          portMappings: [{ containerPort: APP_PORT, protocol: "tcp", name: "http" }],
          environment: env({
            ...settings,
            // /metrics on loopback only, where the collector below scrapes it (same network
            // namespace in awsvpc mode); on APP_PORT, which the ALB reaches, it answers 404.
            // No security group or target group opens this port.
            Api__MetricsListen: METRICS_LISTEN,
            // Requests per client (ADR 0020): the client is the address CloudFront saw, two
            // X-Forwarded-For entries from the right (CloudFront appends the viewer, the ALB
            // appends CloudFront); entries further left are the client's own to write.
            ...(name === "api" ? { Api__ForwardedForHops: "2" } : {}),
            // The header read timeout also bounds the wait between requests on a kept-alive
            // connection, as the idle timeout does: both above the ALB's idle timeout (3600 s,
            // for WebSockets), so the ALB closes first (never a 502 on a connection the task
            // just closed). The ALB forwards whole requests only: slow clients never reach here.
            ...(name === "api" ? { Api__HeaderReadTimeoutSeconds: "3660", Api__IdleTimeoutSeconds: "3660" } : {}),
            Logging__Format: "json",
            Tracing__XRay__Enabled: "true",
            Tracing__XRay__ServiceName: `mira-${name}`,
            OTEL_SERVICE_NAME: `mira-${name}`,
            OTEL_EXPORTER_OTLP_ENDPOINT: "http://127.0.0.1:4318",
            OTEL_EXPORTER_OTLP_PROTOCOL: "http/protobuf",
          }),
          // The service's own login.
          secrets: [{ name: "DATABASE_URL", valueFrom: logins[login].arn }],
          readonlyRootFilesystem: true,
          // The root is read-only; scratch space is the task's own ephemeral storage.
          mountPoints: [{ sourceVolume: "tmp", containerPath: "/tmp" }],
          user: "10001",
          stopTimeout: 120,
          logConfiguration: logConfig(name),
          dependsOn: [{ containerName: "adot", condition: "START" }],
        },
        {
          name: "adot",
          image: ADOT_IMAGE,
          essential: false,
          command: ["--config=env:AOT_CONFIG_CONTENT"],
          environment: [{ name: "AOT_CONFIG_CONTENT", value: tel.collector }],
          logConfiguration: logConfig(`${name}-adot`),
        },
      ]),
      tags: tags(s, "compute"),
    });

  // ---- the ALB: HTTPS only, idle timeout long enough for WebSockets, CloudFront's header required
  // Standalone rules only (foundations.ts, ingressFrom).
  const albSg = new aws.ec2.SecurityGroup("alb-sg", {
    vpcId: p.vpc.id,
    description: "Mira's ALB: HTTPS from CloudFront's origin-facing addresses only",
    tags: tags(s, "compute"),
  });
  const cloudfront = aws.ec2.getManagedPrefixListOutput({ name: "com.amazonaws.global.cloudfront.origin-facing" }).id;
  ingressFrom("alb-from-cloudfront", albSg, { prefixListId: cloudfront }, 443, "CloudFront's origin-facing addresses");
  egressTo("alb-to-compute", albSg, p.computeSg, APP_PORT, "Mira's API");
  ingressFrom("compute-from-alb", p.computeSg, albSg, APP_PORT, "the ALB to Mira's API");
  const alb = new aws.lb.LoadBalancer("alb", {
    name: `mira-${s}`,
    loadBalancerType: "application",
    internal: false,
    securityGroups: [albSg.id],
    subnets: p.publicSubnets.map((x) => x.id),
    idleTimeout: 3600,
    dropInvalidHeaderFields: true,
    // Every request, to the log bucket (ADR 0037).
    accessLogs: { bucket: p.logBucket.bucket, prefix: "alb", enabled: true },
    tags: tags(s, "compute"),
  });
  const target = new aws.lb.TargetGroup("api-targets", {
    name: `mira-${s}-api`,
    port: APP_PORT,
    protocol: "HTTP",
    targetType: "ip",
    vpcId: p.vpc.id,
    deregistrationDelay: 30,
    healthCheck: { path: "/readyz", matcher: "200", interval: 15, healthyThreshold: 2, unhealthyThreshold: 3, timeout: 5 },
    tags: tags(s, "compute"),
  });
  const https = new aws.lb.Listener("https", {
    loadBalancerArn: alb.arn,
    port: 443,
    protocol: "HTTPS",
    sslPolicy: "ELBSecurityPolicy-TLS13-1-2-2021-06",
    certificateArn: cfg.albCertificateArn,
    defaultActions: [{ type: "fixed-response", fixedResponse: { contentType: "text/plain", statusCode: "403", messageBody: "Forbidden" } }],
    tags: tags(s, "compute"),
  });
  const apiRule = new aws.lb.ListenerRule("api-from-cloudfront", {
    listenerArn: https.arn,
    priority: 10,
    conditions: [{ httpHeader: { httpHeaderName: ORIGIN_HEADER, values: [cfg.originVerifySecret] } }, { pathPattern: { values: API_PATHS } }],
    actions: [{ type: "forward", targetGroupArn: target.arn }],
    tags: tags(s, "compute"),
  });

  // ---- the services -------------------------------------------------------------------------
  const network = { subnets: p.computeSubnets.map((x) => x.id), securityGroups: [p.computeSg.id], assignPublicIp: false };
  const services: Record<string, aws.ecs.Service> = {};
  const taskDefinitions: Record<string, aws.ecs.TaskDefinition> = {};
  const executionRoles: Record<string, aws.iam.Role> = {};
  for (const [name, spec] of Object.entries(serviceSpecs(cfg))) {
    const settings = spec.taskRole === "api" ? f.settings.api : { ...f.settings.roles, Roles__Enabled: pulumi.output(spec.roles) };
    const execution = executionRole(name, logs, [logins[spec.login].arn]);
    executionRoles[name] = execution;
    const td = taskDefinition(name, spec.taskRole === "api" ? p.apiRole : p.rolesRole, execution, spec.login, settings, [
      "serve",
      "--listen",
      `0.0.0.0:${APP_PORT}`,
    ]);
    taskDefinitions[name] = td;
    const single = name === "relay";
    services[name] = new aws.ecs.Service(
      name,
      {
        name: `mira-${s}-${name}`,
        cluster: cluster.arn,
        taskDefinition: td.arn,
        desiredCount: spec.tasks,
        launchType: "FARGATE",
        platformVersion: "LATEST",
        networkConfiguration: network,
        // The relay stops before its successor starts: never two at once.
        deploymentMaximumPercent: single ? 100 : 200,
        deploymentMinimumHealthyPercent: single ? 0 : 100,
        deploymentCircuitBreaker: { enable: true, rollback: true },
        loadBalancers: name === "api" ? [{ targetGroupArn: target.arn, containerName: "mira", containerPort: APP_PORT }] : undefined,
        healthCheckGracePeriodSeconds: name === "api" ? 60 : undefined,
        enableExecuteCommand: false,
        propagateTags: "SERVICE",
        tags: tags(s, "compute"),
      },
      // Deploys move the image (a new task-definition revision, docs/runbooks/deploy.md); a
      // later `pulumi up` must not move it back. The API's service is made after the rule that
      // forwards to its target group: ECS refuses a service whose target group no load balancer
      // uses yet, and a first `up` could make them in either order.
      { dependsOn: name === "api" ? [https, apiRule] : [], ignoreChanges: ["taskDefinition"] },
    );
  }
  const migrationTask = new aws.ecs.TaskDefinition("migrate-task", {
    family: `mira-${s}-migrate`,
    requiresCompatibilities: ["FARGATE"],
    networkMode: "awsvpc",
    cpu: "512",
    memory: "1024",
    executionRoleArn: migrateExecution.arn,
    taskRoleArn: migrateRole.arn,
    containerDefinitions: pulumi.jsonStringify([
      {
        name: "mira",
        image,
        essential: true,
        command: ["migrate"],
        environment: env({ AWS__Region: cfg.region, Database__MigrationUrl: migrationUrl, Logging__Format: "json" }),
        // The owner (from RDS's master secret), and every process's login to make (no
        // DATABASE_URL: it connects as the owner).
        secrets: [...owner, ...DB_LOGINS.map((l) => ({ name: loginSetting(l), valueFrom: logins[l].arn }))],
        readonlyRootFilesystem: true,
        user: "10001",
        logConfiguration: logConfig("migrate"),
      },
    ]),
    tags: tags(s, "compute"),
  });

  // ---- the daily full verification (DESIGN §4.3, docs/runbooks/verify.md) ---------------------
  // `mira audit verify` re-derives every hash, checks every checkpoint's signature and compares
  // every witness record, every version, with the database. It exits 0 with `log intact: …`,
  // 1 with `log verification FAILED: …`; the alarms on both lines are in observability.ts.
  // Its role reads and never writes: the witness (every version; the objects are under the
  // buckets' key), and the trusted public key:
  // * with `mira:auditPublicKey` (what `mira keys init` printed), the task is given the key as
  //   Audit__PublicKey and its role cannot read the signing key's secret;
  // * without it, the task derives the key from Audit__SigningKeySecretId: its role reads the
  //   signing-key secret, the private half too. A stack made from nothing has no key to give
  //   until `mira keys init` ran (docs/runbooks/deploy.md, "First deploy"); set the config
  //   then, and the next `pulumi up` takes the secret away from this role.
  // DATABASE_URL comes from ECS (its execution role): VERIFY_LOGIN's.
  const publicKey = p.auditPublicKey;
  const verifyRole = role(
    "audit-verify",
    s,
    { Service: "ecs-tasks.amazonaws.com" },
    publicKey
      ? [p.witnessRead, { Effect: "Allow", Action: ["kms:Decrypt"], Resource: [p.keys.s3Key.arn] }]
      : [
          p.witnessRead,
          { Effect: "Allow", Action: ["secretsmanager:GetSecretValue"], Resource: [p.secrets.signingKeySecret.arn] },
          // The secret is under the patient-data key.
          { Effect: "Allow", Action: ["kms:Decrypt"], Resource: [p.keys.s3Key.arn, p.keys.phiKey.arn] },
        ],
  );
  const trustedKey: Record<string, pulumi.Input<string>> = publicKey
    ? { Audit__PublicKey: publicKey }
    : { Audit__SigningKeySecretId: f.settings.roles.Audit__SigningKeySecretId };
  const verifyTask = new aws.ecs.TaskDefinition("audit-verify-task", {
    family: `mira-${s}-audit-verify`,
    requiresCompatibilities: ["FARGATE"],
    networkMode: "awsvpc",
    cpu: String(cfg.taskCpu),
    memory: String(cfg.taskMemory),
    runtimePlatform: { operatingSystemFamily: "LINUX", cpuArchitecture: "X86_64" },
    executionRoleArn: verifyExecution.arn,
    taskRoleArn: verifyRole.arn,
    containerDefinitions: pulumi.jsonStringify([
      {
        name: "mira",
        image,
        essential: true,
        command: ["audit", "verify"],
        environment: env({
          AWS__Region: cfg.region,
          Audit__WitnessBucket: f.settings.roles.Audit__WitnessBucket,
          ...trustedKey,
          Logging__Format: "json",
        }),
        secrets: [{ name: "DATABASE_URL", valueFrom: logins[VERIFY_LOGIN].arn }],
        readonlyRootFilesystem: true,
        user: "10001",
        logConfiguration: logConfig("audit-verify", verifyLogs.name),
      },
    ]),
    tags: tags(s, "compute"),
  });
  // The schedule names the family, not a revision: RunTask takes its latest ACTIVE revision, so
  // the revision each deploy registers with its image (deploy.yml, as for `migrate`) is the one
  // that runs.
  const verifyFamilyArn = verifyTask.arn.apply((arn) => arn.replace(/:\d+$/, ""));
  const schedulerRole = role("audit-verify-scheduler", s, { Service: "scheduler.amazonaws.com" }, [
    {
      Effect: "Allow",
      Action: ["ecs:RunTask"],
      Resource: [verifyFamilyArn, pulumi.interpolate`${verifyFamilyArn}:*`],
      Condition: { ArnEquals: { "ecs:cluster": cluster.arn } },
    },
    { Effect: "Allow", Action: ["iam:PassRole"], Resource: [verifyExecution.arn, verifyRole.arn] },
  ]);
  const verifySchedule = new aws.scheduler.Schedule("audit-verify", {
    name: `mira-${s}-audit-verify`,
    description: "Mira: mira audit verify, the whole log against its hashes, signatures and the witness (docs/runbooks/verify.md)",
    scheduleExpression: cfg.auditVerifySchedule ?? AUDIT_VERIFY_SCHEDULE,
    scheduleExpressionTimezone: "UTC",
    flexibleTimeWindow: { mode: "OFF" },
    target: {
      arn: cluster.arn,
      roleArn: schedulerRole.arn,
      ecsParameters: {
        taskDefinitionArn: verifyFamilyArn,
        launchType: "FARGATE",
        platformVersion: "LATEST",
        taskCount: 1,
        // The private compute subnets, in the group the database admits.
        networkConfiguration: { subnets: p.computeSubnets.map((x) => x.id), securityGroups: [p.computeSg.id], assignPublicIp: false },
      },
      // A RunTask that fails (capacity, throttling) is tried again within the hour; a run that
      // starts and does not print `log intact` is the alarms' business.
      retryPolicy: { maximumRetryAttempts: 3, maximumEventAgeInSeconds: 3600 },
    },
  });

  const serviceNames = Object.fromEntries(Object.entries(services).map(([n, x]) => [n, x.name]));
  return {
    cluster,
    /** The services' log group (`/mira/<stack>/services`), one stream prefix per service. */
    logs,
    /** The private compute subnets, in the group the database and the endpoints admit. */
    network,
    /** An execution role for another task family in this cluster (verifier.ts). */
    executionRole,
    alb,
    services,
    serviceNames,
    taskDefinitions,
    migrationTask,
    /** One per task definition family: the four services', `migrate`, `audit-verify`. */
    executionRoles: { ...executionRoles, migrate: migrateExecution, "audit-verify": verifyExecution },
    migrateRole,
    verify: { task: verifyTask, role: verifyRole, logGroup: verifyLogs, schedule: verifySchedule, schedulerRole },
    outputs: {
      cluster: cluster.name,
      albDnsName: alb.dnsName,
      services: serviceNames,
      migrationTaskFamily: migrationTask.family,
      auditVerifyTaskFamily: verifyTask.family,
      auditVerifySchedule: verifySchedule.name,
      auditVerifyLogGroup: verifyLogs.name,
    },
  };
}

export type Compute = ReturnType<typeof compute>;
