// The GPU fleet on EKS (issue 20): a cluster with a small system node group and a tainted GPU
// node group (NVIDIA AMI) that scales from zero, the worker as a Deployment of the
// `mira-wsi-worker` image under a service account bound to the worker's role (IRSA), KEDA
// scaling it on the sum of the two GPU queues (gpu-jobs-stat and gpu-jobs) and the jobs waiting
// for the handlers to admit them (mira_jobs_waiting_admission, from CloudWatch), the cluster
// autoscaler adding GPU nodes for pending pods, and NVIDIA's device plugin advertising
// `nvidia.com/gpu`. Each worker pod carries the ADOT collector (telemetry.ts), which scrapes the
// worker's /metrics into CloudWatch and sends its traces to X-Ray.
//
// What the cluster runs is written here as plain objects wherever its placement matters (the
// device plugin's DaemonSet, the worker's pod), so that the tests can evaluate it against the
// node groups' labels and taints (tests/cluster.ts, ADR 0034). KEDA and the cluster autoscaler
// stay Helm releases, and the CloudWatch agent an EKS add-on: no chart repository is reachable
// from the tests, so what those render is not checked (UNRENDERED).

import * as aws from "@pulumi/aws";
import * as k8s from "@pulumi/kubernetes";
import * as pulumi from "@pulumi/pulumi";
import { type foundations, GPU_QUEUES, ingressFrom, logGroup, role, tags } from "./foundations";
import {
  ADOT_IMAGE,
  JOBS_WAITING_METRIC,
  JOBS_WAITING_PRIORITIES,
  METRICS_LISTEN,
  POD_NAME_ENV,
  POD_OTLP_HTTP,
  type Telemetry,
  WORKER_METRICS_ENV,
} from "./telemetry";

type Found = ReturnType<typeof foundations>;

export type FleetConfig = {
  stack: string;
  region: string;
  imageTag: string;
  /** EKS's Kubernetes version, x.y: 1.29 or later, for the collector's native sidecar (checkKubernetesVersion). */
  kubernetesVersion: string;
  /** Addresses allowed to reach the cluster's API endpoint (the deploy runners, operators). */
  eksPublicAccessCidrs: string[];
  gpuInstanceType: string;
  gpuNodesMax: number;
  systemInstanceType: string;
  workerMaxReplicas: number;
  /** Jobs waiting per worker before KEDA adds one. */
  workerQueueLength: number;
  /** Equal to the worker's Worker__LeaseSeconds; the grace period outlasts it. */
  workerLeaseSeconds: number;
  /**
   * How long a worker told to stop (a scale-in, a deploy, a node drain) may take to finish the
   * job in hand before it is killed: longer than the lease, and than a long slide's job.
   */
  workerDrainSeconds: number;
  /** KEDA's chart version: 2.12 or later, for the ScaledObject's scalingModifiers (checkKedaVersion). */
  kedaVersion: string;
};

/**
 * `mira:kedaVersion`, checked: a pinned x.y.z, 2.12 or later. KEDA gained scalingModifiers (the
 * sum of the GPU queues, below) in 2.12; an older KEDA's CRD would drop the field, and scale on
 * the larger of the two queues without a word.
 */
export function checkKedaVersion(v: string) {
  const m = /^(\d+)\.(\d+)\.(\d+)$/.exec(v);
  if (!m || Number(m[1]) < 2 || (Number(m[1]) === 2 && Number(m[2]) < 12)) {
    throw new Error(`mira:kedaVersion ${JSON.stringify(v)}: need a chart version x.y.z, 2.12.0 or later (scalingModifiers)`);
  }
}

/**
 * `mira:kubernetesVersion`, checked: x.y, 1.29 or later. The worker pod's collector is a native
 * sidecar (an init container with `restartPolicy: Always`), on by default from 1.29: an older
 * cluster would run it as a plain init container, which never ends, and no worker would start.
 */
export function checkKubernetesVersion(v: string) {
  const m = /^(\d+)\.(\d+)$/.exec(v);
  if (!m || Number(m[1]) < 1 || (Number(m[1]) === 1 && Number(m[2]) < 29)) {
    throw new Error(`mira:kubernetesVersion ${JSON.stringify(v)}: need x.y, 1.29 or later (the worker's collector is a native sidecar)`);
  }
}

export const CHARTS = {
  keda: { repo: "https://kedacore.github.io/charts", chart: "keda" },
  autoscaler: { repo: "https://kubernetes.github.io/autoscaler", chart: "cluster-autoscaler", version: "9.46.6" },
};
/**
 * What the program installs whose Kubernetes objects it does not write itself, and the tests
 * therefore cannot see: the two Helm releases (by chart) and the EKS add-on (by name).
 */
export const UNRENDERED = {
  helm: [CHARTS.keda.chart, CHARTS.autoscaler.chart],
  eksAddons: ["amazon-cloudwatch-observability"],
};
/**
 * NVIDIA's device plugin, as its static manifest (deployments/static/nvidia-device-plugin.yml of
 * k8s-device-plugin v0.17.1) with our node selector: the chart's default affinity requires node
 * feature discovery's labels, which no node here carries.
 */
export const DEVICE_PLUGIN_IMAGE = "nvcr.io/nvidia/k8s-device-plugin:v0.17.1";
export const GPU_TAINT = { key: "nvidia.com/gpu", value: "true", effect: "NO_SCHEDULE" };
export const GPU_LABEL = { "mira.io/pool": "gpu" };
export const AWS_CLI_IMAGE = "public.ecr.aws/aws-cli/aws-cli:2.27.50";
/**
 * How long a worker pod may take from being created to running, beside a drain: a GPU node
 * started from zero and joined (3 to 5 minutes), the worker's image pulled (CUDA's runtime, a
 * few GB) and its kernels compiled. The rollout's waits and the pending-pods alarm allow it.
 */
export const WORKER_START_SECONDS = 900;
/** The home directory of a container whose image has no user 10001 of its own (the AWS CLI's, the collector's). */
export const POD_HOME = "/home/mira";
/** The worker image's user 10001's home and working directory (images/mira-wsi-worker/Dockerfile). */
export const WORKER_HOME = "/var/lib/mira";

/**
 * Each GPU queue's trigger name in the ScaledObject, which its formula reads it by: an
 * identifier of KEDA's formula language (no `-`), and neither a prefix of the other: KEDA counts
 * a trigger's metrics by name prefix, so after `gpu_jobs_stat` it would name `gpu_jobs`'s metric
 * `gpu_jobs01`, and the formula would find no `gpu_jobs`.
 */
export const KEDA_TRIGGERS: Record<(typeof GPU_QUEUES)[number], string> = { "gpu-jobs-stat": "stat", "gpu-jobs": "routine" };
/**
 * The trigger names of the jobs waiting for admission, by priority (the metric's `priority`
 * dimension), by the same rule: no name begins another of the ScaledObject's (so not
 * `routine_waiting` beside `routine`, nor `stat_waiting` beside `stat`).
 */
export const KEDA_WAITING_TRIGGERS: Record<(typeof JOBS_WAITING_PRIORITIES)[number], string> = { routine: "backlog", stat: "urgent" };

const managed = (name: string) => `arn:aws:iam::aws:policy/${name}`;

export function fleet(cfg: FleetConfig, f: Found, tel: Pick<Telemetry, "namespace" | "podCollector" | "telemetryStatements">) {
  checkKedaVersion(cfg.kedaVersion);
  checkKubernetesVersion(cfg.kubernetesVersion);
  const s = cfg.stack;
  const p = f.parts;
  const namespace = "mira";
  const deploymentName = "mira-wsi-worker";
  const containerName = "worker";

  // ---- the cluster ----------------------------------------------------------------------------
  const clusterRole = new aws.iam.Role("eks-cluster", {
    name: `mira-${s}-eks-cluster`,
    assumeRolePolicy: JSON.stringify({
      Version: "2012-10-17",
      Statement: [{ Effect: "Allow", Principal: { Service: "eks.amazonaws.com" }, Action: ["sts:AssumeRole", "sts:TagSession"] }],
    }),
    tags: tags(s, "fleet"),
  });
  new aws.iam.RolePolicyAttachment("eks-cluster-policy", { role: clusterRole.name, policyArn: managed("AmazonEKSClusterPolicy") });
  // The cluster API's private endpoint, from inside the VPC: EKS puts this group (and the
  // compute group) on the control plane's network interfaces. It admits the deploy runners
  // (ADR 0035), which run kubectl and `pulumi up`; the GitHub-hosted runners' addresses are
  // neither few nor ours, so the public endpoint (eksPublicAccessCidrs) is for operators only.
  const eksApiSg = new aws.ec2.SecurityGroup("eks-api-sg", {
    vpcId: p.vpc.id,
    description: "The EKS API's private endpoint: HTTPS from the deploy runners",
    tags: tags(s, "fleet"),
  });
  ingressFrom("eks-api-from-deploy-runners", eksApiSg, p.runnerSg, 443, "the deploy runners: kubectl, pulumi up");
  // The control plane's log group, made first under the logs key with the stack's retention
  // (ADR 0037): EKS would make it itself, never expiring, unencrypted.
  const controlPlaneLogs = logGroup("eks-control-plane-logs", `/aws/eks/mira-${s}/cluster`, p.logs, "fleet");
  const cluster = new aws.eks.Cluster("eks", {
    name: `mira-${s}`,
    version: cfg.kubernetesVersion,
    roleArn: clusterRole.arn,
    vpcConfig: {
      subnetIds: p.computeSubnets.map((x) => x.id),
      securityGroupIds: [p.computeSg.id, eksApiSg.id],
      endpointPrivateAccess: true,
      endpointPublicAccess: cfg.eksPublicAccessCidrs.length > 0,
      publicAccessCidrs: cfg.eksPublicAccessCidrs.length > 0 ? cfg.eksPublicAccessCidrs : undefined,
    },
    accessConfig: { authenticationMode: "API", bootstrapClusterCreatorAdminPermissions: true },
    encryptionConfig: { provider: { keyArn: p.keys.phiKey.arn }, resources: ["secrets"] },
    enabledClusterLogTypes: ["api", "audit", "authenticator"],
    tags: tags(s, "fleet"),
  }, { dependsOn: [controlPlaneLogs] });
  // Nodes and pods carry the cluster's security group: the database and the VPC endpoints admit
  // it as they admit the compute group.
  const clusterSg = { id: cluster.vpcConfig.apply((v) => v.clusterSecurityGroupId!) };
  ingressFrom("database-from-eks", p.databaseSg, clusterSg, 5432, "EKS nodes and pods (the cluster security group)");
  ingressFrom("endpoints-from-eks", p.endpointSg, clusterSg, 443, "EKS nodes and pods (the cluster security group)");
  const issuer = cluster.identities.apply((ids) => ids[0].oidcs![0].issuer!);
  const oidc = new aws.iam.OpenIdConnectProvider("eks-oidc", { url: issuer, clientIdLists: ["sts.amazonaws.com"], tags: tags(s, "fleet") });

  /** A trust policy for one Kubernetes service account of this cluster (IRSA). */
  const irsa = (ns: string, sa: string) =>
    pulumi.all([oidc.arn, issuer]).apply(([arn, url]) => {
      const host = url.replace(/^https:\/\//, "");
      return JSON.stringify({
        Version: "2012-10-17",
        Statement: [
          {
            Effect: "Allow",
            Principal: { Federated: arn },
            Action: "sts:AssumeRoleWithWebIdentity",
            Condition: { StringEquals: { [`${host}:sub`]: `system:serviceaccount:${ns}:${sa}`, [`${host}:aud`]: "sts.amazonaws.com" } },
          },
        ],
      });
    });

  // ---- nodes: a small system group, and GPUs from zero --------------------------------------
  const nodeRole = new aws.iam.Role("eks-nodes", {
    name: `mira-${s}-eks-nodes`,
    assumeRolePolicy: JSON.stringify({
      Version: "2012-10-17",
      Statement: [{ Effect: "Allow", Principal: { Service: "ec2.amazonaws.com" }, Action: "sts:AssumeRole" }],
    }),
    tags: tags(s, "fleet"),
  });
  ["AmazonEKSWorkerNodePolicy", "AmazonEC2ContainerRegistryReadOnly", "AmazonEKS_CNI_Policy"].forEach(
    (pol, i) => new aws.iam.RolePolicyAttachment(`eks-nodes-${i}`, { role: nodeRole.name, policyArn: managed(pol) }),
  );
  const system = new aws.eks.NodeGroup("system-nodes", {
    clusterName: cluster.name,
    nodeGroupName: "system",
    nodeRoleArn: nodeRole.arn,
    subnetIds: p.computeSubnets.map((x) => x.id),
    amiType: "AL2023_x86_64_STANDARD",
    instanceTypes: [cfg.systemInstanceType],
    scalingConfig: { minSize: 2, desiredSize: 2, maxSize: 3 },
    updateConfig: { maxUnavailable: 1 },
    tags: tags(s, "fleet"),
  });
  const gpuNodeGroupName = "gpu";
  const gpu = new aws.eks.NodeGroup(
    "gpu-nodes",
    {
      clusterName: cluster.name,
      nodeGroupName: gpuNodeGroupName,
      nodeRoleArn: nodeRole.arn,
      subnetIds: p.computeSubnets.map((x) => x.id),
      amiType: "AL2023_x86_64_NVIDIA",
      instanceTypes: [cfg.gpuInstanceType],
      diskSize: 200,
      scalingConfig: { minSize: 0, desiredSize: 0, maxSize: cfg.gpuNodesMax },
      labels: GPU_LABEL,
      taints: [GPU_TAINT],
      tags: {
        ...tags(s, "fleet"),
        // What the autoscaler needs to scale this group up from zero nodes.
        "k8s.io/cluster-autoscaler/enabled": "true",
        [`k8s.io/cluster-autoscaler/mira-${s}`]: "owned",
        "k8s.io/cluster-autoscaler/node-template/label/mira.io/pool": "gpu",
        "k8s.io/cluster-autoscaler/node-template/taint/nvidia.com/gpu": "true:NoSchedule",
        "k8s.io/cluster-autoscaler/node-template/resources/nvidia.com/gpu": "1",
      },
    },
    // The autoscaler owns the desired size.
    { ignoreChanges: ["scalingConfig.desiredSize"] },
  );

  // ---- Kubernetes ------------------------------------------------------------------------------
  const kubeconfig = pulumi.all([cluster.name, cluster.endpoint, cluster.certificateAuthority]).apply(([name, endpoint, ca]) =>
    JSON.stringify({
      apiVersion: "v1",
      kind: "Config",
      clusters: [{ name, cluster: { server: endpoint, "certificate-authority-data": ca.data } }],
      contexts: [{ name, context: { cluster: name, user: name } }],
      "current-context": name,
      users: [
        {
          name,
          user: { exec: { apiVersion: "client.authentication.k8s.io/v1beta1", command: "aws", args: ["eks", "get-token", "--cluster-name", name, "--region", cfg.region] } },
        },
      ],
    }),
  );
  const provider = new k8s.Provider("eks", { kubeconfig, enableServerSideApply: true }, { dependsOn: [system] });
  const k = { provider };

  const ns = new k8s.core.v1.Namespace("mira-namespace", { metadata: { name: namespace, labels: { "pod-security.kubernetes.io/enforce": "restricted" } } }, k);

  // NVIDIA's device plugin: one DaemonSet on the GPU nodes, which advertises each node's GPU as
  // `nvidia.com/gpu` (the NVIDIA AMI has the driver and the container toolkit, not the plugin).
  // Placed by the GPU node group's own label and tolerating its taint, nothing else: until it
  // runs on a node, that node offers no GPU, the worker's pods stay Pending, and the autoscaler
  // adds GPU nodes up to gpuNodesMax.
  const devicePluginLabels = { name: "nvidia-device-plugin-ds" };
  const devicePlugin = new k8s.apps.v1.DaemonSet(
    "nvidia-device-plugin",
    {
      metadata: { name: "nvidia-device-plugin-daemonset", namespace: "kube-system" },
      spec: {
        selector: { matchLabels: devicePluginLabels },
        updateStrategy: { type: "RollingUpdate" },
        template: {
          metadata: { labels: devicePluginLabels },
          spec: {
            nodeSelector: GPU_LABEL,
            tolerations: [{ key: GPU_TAINT.key, operator: "Exists", effect: "NoSchedule" }],
            // Reserved for, and rescheduled first among, the node's critical add-ons.
            priorityClassName: "system-node-critical",
            containers: [
              {
                name: "nvidia-device-plugin-ctr",
                image: DEVICE_PLUGIN_IMAGE,
                // A node whose GPU cannot be initialised runs on without advertising one.
                env: [{ name: "FAIL_ON_INIT_ERROR", value: "false" }],
                securityContext: { allowPrivilegeEscalation: false, capabilities: { drop: ["ALL"] } },
                resources: { requests: { cpu: "10m", memory: "32Mi" }, limits: { memory: "128Mi" } },
                volumeMounts: [{ name: "kubelet-device-plugins-dir", mountPath: "/var/lib/kubelet/device-plugins" }],
              },
            ],
            volumes: [{ name: "kubelet-device-plugins-dir", hostPath: { path: "/var/lib/kubelet/device-plugins", type: "Directory" } }],
          },
        },
      },
    },
    k,
  );

  // The CloudWatch agent (Container Insights, an EKS add-on): the cluster's pod states, among
  // them the worker's pods Pending (observability.ts, gpu-pods-pending). Its service account
  // writes with a role of its own (IRSA).
  const cloudwatchAgentRole = new aws.iam.Role("cloudwatch-agent", {
    name: `mira-${s}-cloudwatch-agent`,
    assumeRolePolicy: irsa("amazon-cloudwatch", "cloudwatch-agent"),
    tags: tags(s, "fleet"),
  });
  new aws.iam.RolePolicyAttachment("cloudwatch-agent-policy", { role: cloudwatchAgentRole.name, policyArn: managed("CloudWatchAgentServerPolicy") });
  const observabilityAddon = new aws.eks.Addon(
    "cloudwatch-observability",
    {
      clusterName: cluster.name,
      addonName: UNRENDERED.eksAddons[0],
      serviceAccountRoleArn: cloudwatchAgentRole.arn,
      tags: tags(s, "fleet"),
    },
    // Its pods need nodes to start on.
    { dependsOn: [system] },
  );

  const autoscalerRole = role(
    "cluster-autoscaler",
    s,
    irsa("kube-system", "cluster-autoscaler"),
    [
      {
        Effect: "Allow",
        Action: [
          "autoscaling:DescribeAutoScalingGroups",
          "autoscaling:DescribeAutoScalingInstances",
          "autoscaling:DescribeLaunchConfigurations",
          "autoscaling:DescribeScalingActivities",
          "autoscaling:DescribeTags",
          "ec2:DescribeImages",
          "ec2:DescribeInstanceTypes",
          "ec2:DescribeLaunchTemplateVersions",
          "ec2:GetInstanceTypesFromInstanceRequirements",
          "eks:DescribeNodegroup",
        ],
        Resource: ["*"],
      },
      {
        // Only this cluster's groups (the tag EKS puts on its node groups' Auto Scaling groups).
        Effect: "Allow",
        Action: ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"],
        Resource: ["*"],
        Condition: { StringEquals: { [`aws:ResourceTag/k8s.io/cluster-autoscaler/mira-${s}`]: "owned" } },
      },
    ],
  );
  new k8s.helm.v3.Release(
    "cluster-autoscaler",
    {
      name: "cluster-autoscaler",
      chart: CHARTS.autoscaler.chart,
      version: CHARTS.autoscaler.version,
      repositoryOpts: { repo: CHARTS.autoscaler.repo },
      namespace: "kube-system",
      values: {
        cloudProvider: "aws",
        awsRegion: cfg.region,
        autoDiscovery: { clusterName: cluster.name },
        rbac: { serviceAccount: { name: "cluster-autoscaler", annotations: { "eks.amazonaws.com/role-arn": autoscalerRole.arn } } },
        extraArgs: { "balance-similar-node-groups": true, "skip-nodes-with-system-pods": false, "scale-down-unneeded-time": "5m" },
      },
    },
    k,
  );

  // KEDA reads the GPU queues' depths and the jobs waiting for admission with its own identity
  // (IRSA on its operator).
  const gpuQueues = GPU_QUEUES.map((g) => ({ group: g, queue: p.queues[g].queue }));
  const kedaRole = role("keda-operator", s, irsa("keda", "keda-operator"), [
    { Effect: "Allow", Action: ["sqs:GetQueueAttributes"], Resource: gpuQueues.map((q) => q.queue.arn) },
    { Effect: "Allow", Action: ["kms:Decrypt"], Resource: [p.keys.messagingKey.arn] },
    // The aws-cloudwatch triggers' one call. CloudWatch's metric reads name no resource (IAM
    // knows no metric ARN, and its `cloudwatch:namespace` condition key applies to
    // PutMetricData only), so this is `*`: KEDA may read every metric of the account, and
    // writes none.
    { Effect: "Allow", Action: ["cloudwatch:GetMetricData"], Resource: ["*"] },
  ]);
  const keda = new k8s.helm.v3.Release(
    "keda",
    {
      name: "keda",
      chart: CHARTS.keda.chart,
      version: cfg.kedaVersion,
      repositoryOpts: { repo: CHARTS.keda.repo },
      namespace: "keda",
      createNamespace: true,
      values: {
        serviceAccount: { operator: { name: "keda-operator", annotations: { "eks.amazonaws.com/role-arn": kedaRole.arn } } },
        podIdentity: { aws: { irsa: { enabled: true, roleArn: kedaRole.arn } } },
      },
    },
    k,
  );

  // ---- the worker ------------------------------------------------------------------------------
  const workerRole = role("worker", s, irsa(namespace, deploymentName), p.workerStatements);
  // The collector in each worker pod runs under the pod's service account, so its writes (EMF
  // into the metrics log group, traces into X-Ray) go with the worker's role, as the ECS
  // collectors' go with their task roles (compute.ts).
  new aws.iam.RolePolicy("worker-telemetry", {
    role: workerRole.id,
    policy: pulumi.jsonStringify({ Version: "2012-10-17", Statement: tel.telemetryStatements }),
  });
  const workerSettings = {
    ...f.settings.worker,
    Worker__LeaseSeconds: pulumi.output(String(cfg.workerLeaseSeconds)),
    Logging__Format: pulumi.output("json"),
  };
  const sa = new k8s.core.v1.ServiceAccount(
    "worker-sa",
    { metadata: { name: deploymentName, namespace, annotations: { "eks.amazonaws.com/role-arn": workerRole.arn } } },
    { ...k, dependsOn: [ns] },
  );
  const labels = { app: deploymentName };
  // Every container of the pod has a read-only root. Each gets a home and a temporary directory
  // of its own, on emptyDir volumes, and is told of them (HOME, TMPDIR): the AWS CLI writes its
  // web-identity credentials under ~/.aws/cli/cache and fails where it cannot (aws-cli 7376,
  // 9075); CUDA keeps its JIT cache under ~/.nv; the worker writes its slides under /tmp.
  // Nothing in the image's root is written. (The worker reading its secret itself, through the
  // SDK, would need no CLI at all: ADR 0034.)
  const scratchFor = (container: string, home: string, medium?: "Memory") => ({
    env: [
      { name: "HOME", value: home },
      { name: "TMPDIR", value: "/tmp" },
    ],
    mounts: [
      { name: `${container}-home`, mountPath: home },
      { name: `${container}-tmp`, mountPath: "/tmp" },
    ],
    volumes: [
      { name: `${container}-home`, emptyDir: { ...(medium ? { medium } : {}), sizeLimit: medium ? "16Mi" : "2Gi" } },
      { name: `${container}-tmp`, emptyDir: { ...(medium ? { medium } : {}), sizeLimit: "64Mi" } },
    ],
  });
  // The CLI's home holds its cached credentials: in memory, never on the node's disk.
  const cliScratch = scratchFor("database-url", POD_HOME, "Memory");
  const adotScratch = scratchFor("adot", POD_HOME, "Memory");
  const workerScratch = scratchFor(containerName, WORKER_HOME);
  const restricted = {
    runAsNonRoot: true,
    runAsUser: 10001,
    allowPrivilegeEscalation: false,
    readOnlyRootFilesystem: true,
    capabilities: { drop: ["ALL"] },
    seccompProfile: { type: "RuntimeDefault" },
  };
  // The ADOT collector in each worker pod: it scrapes the worker's /metrics on the pod's loopback
  // (METRICS_LISTEN) every 30 s and writes them to CloudWatch as EMF; the worker sends its traces
  // over OTLP/HTTP to the same loopback (POD_OTLP_HTTP), and the collector sends them to X-Ray;
  // both with the ECS tasks' exporters (telemetry.ts). A sidecar rather than a DaemonSet: a GPU
  // node runs one worker pod at a time (a GPU each), so a collector per node would be no fewer;
  // the pod's loopback is an address nothing outside the pod reaches, where a collector per node
  // would need a host port (which the namespace's restricted Pod Security refuses) or a Service;
  // and it runs as the pod's service account, so the worker's role writes its metrics and
  // traces, and no other role is needed. It is a native sidecar (an init container that restarts
  // Always): it starts before the worker, and stops only after the worker has exited, so a job
  // drained on a scale-in still has its last spans sent (though not what the worker counted
  // after the collector's last scrape). It reads its configuration from the environment, as on
  // ECS: a new configuration rolls the pods.
  const collector = {
    name: "adot",
    image: ADOT_IMAGE,
    restartPolicy: "Always",
    // The image's entrypoint is the collector.
    args: ["--config=env:AOT_CONFIG_CONTENT"],
    env: [
      { name: "AOT_CONFIG_CONTENT", value: tel.podCollector },
      // Each pod's EMF goes to a log stream of its own name.
      { name: POD_NAME_ENV, valueFrom: { fieldRef: { fieldPath: "metadata.name" } } },
      // The Go runtime collects its garbage before the container's memory limit is reached.
      { name: "GOMEMLIMIT", value: "200MiB" },
      ...adotScratch.env,
    ],
    resources: { requests: { cpu: "50m", memory: "128Mi" }, limits: { memory: "256Mi" } },
    // It writes nothing to disk (its logs go to stderr), but a home and a temporary directory
    // are there if it does: a read-only root.
    securityContext: restricted,
    volumeMounts: adotScratch.mounts,
  };
  // A rollout replaces one pod at a time, and each old pod may drain a job for its whole grace
  // period before the new one can have its GPU (or a new node starts): the Deployment makes no
  // progress for up to grace + start, which its progress deadline must allow (or `kubectl
  // rollout status` gives up at 600 s), and a whole rollout may take that for every replica.
  const grace = Math.max(cfg.workerDrainSeconds, cfg.workerLeaseSeconds + 60);
  const progressDeadline = grace + WORKER_START_SECONDS;
  const rolloutTimeoutSeconds = cfg.workerMaxReplicas * progressDeadline;
  const deployment = new k8s.apps.v1.Deployment(
    "worker",
    {
      // KEDA owns the replica count (0 to workerMaxReplicas), so the program sets none; and the
      // program does not wait for pods, which exist only while there is work.
      metadata: { name: deploymentName, namespace, labels, annotations: { "pulumi.com/skipAwait": "true" } },
      spec: {
        selector: { matchLabels: labels },
        // One at a time and no surge: a full fleet has no spare GPU node for an extra pod.
        strategy: { type: "RollingUpdate", rollingUpdate: { maxSurge: 0, maxUnavailable: 1 } },
        progressDeadlineSeconds: progressDeadline,
        template: {
          metadata: { labels },
          spec: {
            serviceAccountName: sa.metadata.name,
            // The job in hand finishes on a scale-in or a deploy.
            terminationGracePeriodSeconds: grace,
            nodeSelector: GPU_LABEL,
            tolerations: [{ key: GPU_TAINT.key, operator: "Exists", effect: "NoSchedule" }],
            securityContext: { runAsNonRoot: true, runAsUser: 10001, fsGroup: 10001, seccompProfile: { type: "RuntimeDefault" } },
            // The worker's own login (mira_svc_worker), from Secrets Manager with the pod's own
            // role, into memory. A pod reads it when it starts: a new password needs new pods.
            initContainers: [
              {
                name: "database-url",
                image: AWS_CLI_IMAGE,
                command: ["/bin/sh", "-c", 'aws secretsmanager get-secret-value --secret-id "$SECRET" --query SecretString --output text > /run/mira/database-url'],
                env: [
                  { name: "SECRET", value: p.secrets.dbLogins.worker.arn },
                  { name: "AWS_REGION", value: cfg.region },
                  ...cliScratch.env,
                  // The CLI's files under its home, and no pager (there is no terminal).
                  { name: "AWS_CONFIG_FILE", value: `${POD_HOME}/.aws/config` },
                  { name: "AWS_SHARED_CREDENTIALS_FILE", value: `${POD_HOME}/.aws/credentials` },
                  { name: "AWS_PAGER", value: "" },
                ],
                securityContext: restricted,
                volumeMounts: [{ name: "secrets", mountPath: "/run/mira" }, ...cliScratch.mounts],
                resources: { requests: { cpu: "50m", memory: "64Mi" }, limits: { memory: "256Mi" } },
              },
              collector,
            ],
            containers: [
              {
                name: containerName,
                image: pulumi.interpolate`${p.repos["mira-wsi-worker"].repositoryUrl}:${cfg.imageTag}`,
                command: ["/bin/sh", "-c", 'DATABASE_URL="$(cat /run/mira/database-url)"; export DATABASE_URL; exec mira-worker run'],
                env: [
                  ...Object.entries(workerSettings)
                    .sort(([a], [b]) => a.localeCompare(b))
                    .map(([name, value]) => ({ name, value })),
                  // /metrics on the pod's loopback, where the collector beside it scrapes it; no
                  // container port or Service names it, so nothing outside the pod reaches it.
                  { name: WORKER_METRICS_ENV, value: METRICS_LISTEN },
                  // Traces over OTLP/HTTP to the collector beside it, on the pod's loopback.
                  { name: "OTEL_EXPORTER_OTLP_ENDPOINT", value: `http://${POD_OTLP_HTTP}` },
                  { name: "OTEL_EXPORTER_OTLP_PROTOCOL", value: "http/protobuf" },
                  { name: "OTEL_SERVICE_NAME", value: "mira-worker" },
                  ...workerScratch.env,
                ],
                resources: {
                  requests: { cpu: "3", memory: "12Gi", "ephemeral-storage": "50Gi" },
                  limits: { "nvidia.com/gpu": "1", memory: "14Gi", "ephemeral-storage": "150Gi" },
                },
                securityContext: restricted,
                volumeMounts: [{ name: "secrets", mountPath: "/run/mira", readOnly: true }, ...workerScratch.mounts],
              },
            ],
            volumes: [
              { name: "secrets", emptyDir: { medium: "Memory", sizeLimit: "1Mi" } },
              ...cliScratch.volumes,
              ...adotScratch.volumes,
              // The worker's slides and pyramids: its /tmp is the node's disk, as large as its
              // ephemeral-storage limit.
              ...workerScratch.volumes.map((v) => (v.name === `${containerName}-tmp` ? { ...v, emptyDir: { sizeLimit: "150Gi" } } : v)),
            ],
          },
        },
      },
    },
    // Deploys move the image (kubectl set image); deploy-infra.yml passes the running tag as
    // mira:imageTag, so a `pulumi up` applies the same one (docs/runbooks/deploy.md).
    { ...k, dependsOn: [ns, devicePlugin] },
  );
  new k8s.policy.v1.PodDisruptionBudget(
    "worker-pdb",
    { metadata: { name: deploymentName, namespace }, spec: { maxUnavailable: 1, selector: { matchLabels: labels } } },
    { ...k, dependsOn: [ns] },
  );
  const triggerAuth = new k8s.apiextensions.CustomResource(
    "keda-aws-auth",
    {
      apiVersion: "keda.sh/v1alpha1",
      kind: "TriggerAuthentication",
      metadata: { name: "keda-aws", namespace },
      spec: { podIdentity: { provider: "aws" } },
    },
    { ...k, dependsOn: [keda, ns] },
  );
  // The jobs waiting for admission, one trigger per priority. The collector publishes the gauge
  // with its `priority` dimension, so it is two CloudWatch series, and a trigger reads one
  // metric (namespace, name, dimensions): two triggers, added by the formula like the queues.
  // Without the dimension both priorities would fall into one series, whose Maximum is the
  // larger of the two counts, not their sum (and whose Sum adds every task's every scrape).
  // Every ECS task's collector writes the same count, read from the database, twice a minute:
  // the Maximum of a minute is that count. KEDA reads the newest minute that has a datapoint in
  // the last five (the collector's EMF lands a minute or so late). No datapoint in five minutes
  // means the collectors write nothing (the gauge is written at every scrape, 0 included); the
  // trigger then reads minMetricValue, 0, and the fleet scales on the queues alone, which the
  // handlers keep filling as workers take jobs, rather than stopping. The count includes the
  // jobs Jobs__MaxRunningPerTenant holds back: with one tenant's backlog alone, workers start
  // for jobs not admitted yet and wait idle (docs/runbooks/deploy.md, Scaling). Each trigger
  // costs a GetMetricData a poll: the HPA's own reads are answered from that poll
  // (useCachedMetrics), the count being a minute old anyway.
  const waiting = JOBS_WAITING_PRIORITIES.map((priority) => ({
    type: "aws-cloudwatch",
    name: KEDA_WAITING_TRIGGERS[priority],
    authenticationRef: { name: "keda-aws" },
    useCachedMetrics: true,
    metadata: {
      namespace: tel.namespace,
      metricName: JOBS_WAITING_METRIC,
      dimensionName: "priority",
      dimensionValue: priority,
      metricStat: "Maximum",
      metricStatPeriod: "60",
      metricCollectionTime: "300",
      targetMetricValue: String(cfg.workerQueueLength),
      minMetricValue: "0",
      awsRegion: cfg.region,
    },
  }));
  const queued = gpuQueues.map((q) => ({
    type: "aws-sqs-queue",
    // The name the formula reads it by.
    name: KEDA_TRIGGERS[q.group],
    authenticationRef: { name: "keda-aws" },
    metadata: {
      queueURL: q.queue.url,
      queueLength: String(cfg.workerQueueLength),
      awsRegion: cfg.region,
      // Jobs being worked on count too, so a busy worker is not scaled away.
      scaleOnInFlight: "true",
    },
  }));
  const triggers = [...queued, ...waiting];
  const scaledObject = new k8s.apiextensions.CustomResource(
    "worker-scaler",
    {
      apiVersion: "keda.sh/v1alpha1",
      kind: "ScaledObject",
      metadata: { name: deploymentName, namespace },
      spec: {
        scaleTargetRef: { name: deploymentName },
        minReplicaCount: 0,
        maxReplicaCount: cfg.workerMaxReplicas,
        pollingInterval: 15,
        // A job takes minutes: wait before scaling in to zero.
        cooldownPeriod: 600,
        // One pool of workers takes both GPU queues, so it is sized on all the work there is:
        // one worker per workerQueueLength jobs, STAT and routine, waiting or in hand. The
        // handlers admit STAT jobs at once and routine jobs a window at a time
        // (Jobs__AdmissionWindow), so the queues hold little of a backlog: the rest waits for
        // admission, and counts too. A job is counted once: waiting for admission until the
        // handlers queue it, then in its queue (visible or in flight). KEDA's default over
        // several triggers is the larger of their replica counts: with every worker busy on
        // routine jobs, a STAT job would add no worker and would wait for a routine job to end
        // (there is no preemption), though the fleet is below its maximum; and a backlog would
        // be sized apart from the jobs in hand. With scalingModifiers, KEDA puts each trigger's
        // raw value into the formula and gives the HPA one composite metric with this target
        // (each trigger keeps the same target, as it would have alone); it activates from zero
        // when the sum is above 0. The price: while KEDA cannot read one of them (its role,
        // above, reads them all), the formula has no value and the fleet stays as it is.
        advanced: {
          scalingModifiers: {
            formula: triggers.map((t) => t.name).join(" + "),
            target: String(cfg.workerQueueLength),
            metricType: "AverageValue",
          },
        },
        triggers,
      },
    },
    { ...k, dependsOn: [keda, deployment, triggerAuth] },
  );

  return {
    cluster,
    gpu,
    devicePlugin,
    observabilityAddon,
    eksApiSg,
    /** The worker pods' grace period (seconds), and how long one may wait to start beside it. */
    workerGraceSeconds: grace,
    workerProgressDeadlineSeconds: progressDeadline,
    /** How long `kubectl rollout status` waits for the worker (deploy.yml): every replica drained and started again, one at a time. */
    workerRolloutTimeoutSeconds: rolloutTimeoutSeconds,
    workerRole,
    workerSettings,
    namespace,
    deploymentName,
    containerName,
    scaledObject,
    outputs: {
      cluster: cluster.name,
      gpuNodeGroup: pulumi.output(gpuNodeGroupName),
      workerNamespace: pulumi.output(namespace),
      workerDeployment: pulumi.output(deploymentName),
    },
  };
}

export type Fleet = ReturnType<typeof fleet>;
