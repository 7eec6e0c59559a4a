// What the cluster would run, evaluated (issue 38): the Kubernetes objects the program applies
// (the inputs of its `kubernetes:*` resources, as the mocks record them) against the EKS node
// groups it makes, as the scheduler and the kubelet would take them. Each check returns the
// problems it finds (as checks.ts does), so that a test runs it on the program and on broken
// copies.
//
// What the scheduler does, in the part that matters here: a pod fits a node when the node has
// every label of the pod's nodeSelector, matches one term of its required node affinity (every
// expression of the term), and the pod tolerates every NoSchedule and NoExecute taint of the
// node. An extended resource (`nvidia.com/gpu`) exists on a node only once a device plugin runs
// there and advertises it.

import { AWS_CLI_IMAGE, DEVICE_PLUGIN_IMAGE, UNRENDERED } from "../src/fleet";
import { ofType, type Recorded } from "./harness";
import { K } from "./operations";

export type Taint = { key: string; value?: string; effect: "NoSchedule" | "PreferNoSchedule" | "NoExecute" };
/** A node of a node group as the scheduler sees it: its labels and taints. */
export type Node = { group: string; labels: Record<string, string>; taints: Taint[] };

const EFFECTS: Record<string, Taint["effect"]> = { NO_SCHEDULE: "NoSchedule", PREFER_NO_SCHEDULE: "PreferNoSchedule", NO_EXECUTE: "NoExecute" };

/**
 * A node of each EKS managed node group: the group's own labels and taints, and the labels EKS
 * and the kubelet put on every node (no others: node feature discovery and NVIDIA's GPU feature
 * discovery do not run here, so no `feature.node.kubernetes.io/*` or `nvidia.com/gpu.*` label).
 */
export function nodesOf(rs: Recorded[]): Node[] {
  return ofType(rs, K.nodeGroup).map((g) => {
    const i = g.inputs;
    const arch = String(i.amiType ?? "").includes("ARM") ? "arm64" : "amd64";
    return {
      group: i.nodeGroupName ?? g.name,
      labels: {
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": arch,
        "node.kubernetes.io/instance-type": (i.instanceTypes ?? [])[0] ?? "",
        "eks.amazonaws.com/nodegroup": i.nodeGroupName ?? g.name,
        "eks.amazonaws.com/capacityType": i.capacityType ?? "ON_DEMAND",
        ...(i.labels ?? {}),
      },
      taints: (i.taints ?? []).map((t: any) => ({ key: t.key, value: t.value, effect: EFFECTS[t.effect] ?? t.effect })),
    };
  });
}

/** Whether a node-selector requirement (In, NotIn, Exists, DoesNotExist, Gt, Lt) holds for the labels. */
function holds(e: { key: string; operator: string; values?: string[] }, labels: Record<string, string>): boolean {
  const v = labels[e.key];
  switch (e.operator) {
    case "In":
      return v !== undefined && (e.values ?? []).includes(v);
    case "NotIn":
      return v === undefined || !(e.values ?? []).includes(v);
    case "Exists":
      return v !== undefined;
    case "DoesNotExist":
      return v === undefined;
    case "Gt":
      return v !== undefined && Number(v) > Number((e.values ?? [])[0]);
    case "Lt":
      return v !== undefined && Number(v) < Number((e.values ?? [])[0]);
    default:
      return false;
  }
}

/** Whether a toleration tolerates a taint (Kubernetes' rules: an empty key with Exists tolerates everything). */
export function tolerates(t: any, taint: Taint): boolean {
  if (t.effect && t.effect !== taint.effect) return false;
  const op = t.operator ?? "Equal";
  if (!t.key) return op === "Exists";
  if (t.key !== taint.key) return false;
  return op === "Exists" || (t.value ?? "") === (taint.value ?? "");
}

/** Why a pod (its spec) cannot be scheduled on the node: nothing when it can. */
export function unschedulable(pod: any, node: Node): string[] {
  const why: string[] = [];
  for (const [k, v] of Object.entries<string>(pod.nodeSelector ?? {})) {
    if (node.labels[k] !== v) why.push(`nodeSelector ${k}=${v}`);
  }
  const terms: any[] = pod.affinity?.nodeAffinity?.requiredDuringSchedulingIgnoredDuringExecution?.nodeSelectorTerms ?? [];
  if (terms.length > 0) {
    const fits = terms.some((term) =>
      [...(term.matchExpressions ?? [])].every((e: any) => holds(e, node.labels)) &&
      // matchFields select by the node's name, which no template can know: a term with one never
      // matches a node group as a whole.
      (term.matchFields ?? []).length === 0,
    );
    if (!fits) {
      const shown = terms.map((term) => (term.matchExpressions ?? []).map((e: any) => `${e.key} ${e.operator} ${(e.values ?? []).join(",")}`.trim()).join(" and ")).join(" or ");
      why.push(`required node affinity (${shown})`);
    }
  }
  for (const taint of node.taints.filter((x) => x.effect !== "PreferNoSchedule")) {
    if (!(pod.tolerations ?? []).some((t: any) => tolerates(t, taint))) why.push(`taint ${taint.key}${taint.value ? `=${taint.value}` : ""}:${taint.effect} not tolerated`);
  }
  return why;
}

/** The device plugin: the DaemonSet that runs NVIDIA's k8s-device-plugin image. */
const devicePlugins = (rs: Recorded[]) =>
  ofType(rs, K.daemonSet).filter((d) => (d.inputs.spec?.template?.spec?.containers ?? []).some((c: any) => String(c.image).startsWith(DEVICE_PLUGIN_IMAGE.split(":")[0])));

/** The node groups whose nodes offer `nvidia.com/gpu`: a GPU AMI, and the device plugin schedulable there. */
export function gpuGroups(rs: Recorded[]): string[] {
  const gpuAmi = new Set(ofType(rs, K.nodeGroup).filter((g) => String(g.inputs.amiType ?? "").includes("NVIDIA")).map((g) => g.inputs.nodeGroupName ?? g.name));
  const plugins = devicePlugins(rs);
  return nodesOf(rs)
    .filter((n) => gpuAmi.has(n.group) && plugins.some((d) => unschedulable(d.inputs.spec.template.spec, n).length === 0))
    .map((n) => n.group);
}

/**
 * The GPUs are advertised and asked for where they are: NVIDIA's device plugin is one plain
 * DaemonSet (no chart: the tests could not see what a chart renders), schedulable on every node
 * group with an NVIDIA AMI (its labels, its taints); the worker's pod asks for exactly one
 * `nvidia.com/gpu` (a limit, and a request if any equal to it) and is schedulable on some node
 * group, and only on node groups that offer GPUs; the autoscaler's template of the GPU group
 * (the tags it scales up from zero by) names the group's labels and taints and one GPU.
 */
export function gpuSchedulingProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const nodes = nodesOf(rs);
  const plugins = devicePlugins(rs);
  if (plugins.length !== 1) p.push(`${plugins.length} DaemonSets run ${DEVICE_PLUGIN_IMAGE.split(":")[0]}`);
  if (ofType(rs, K.release).some((r) => /device-plugin/.test(String(r.inputs.chart)))) p.push("the device plugin is a Helm release, whose objects no test sees");
  const gpuAmi = ofType(rs, K.nodeGroup).filter((g) => String(g.inputs.amiType ?? "").includes("NVIDIA"));
  if (gpuAmi.length === 0) p.push("no node group with an NVIDIA AMI");
  for (const d of plugins) {
    for (const g of gpuAmi) {
      const node = nodes.find((n) => n.group === (g.inputs.nodeGroupName ?? g.name))!;
      for (const why of unschedulable(d.inputs.spec.template.spec, node)) p.push(`the device plugin cannot run on the ${node.group} nodes: ${why}`);
    }
  }
  const dep = ofType(rs, K.deployment)[0];
  if (!dep) return [...p, "no worker Deployment"];
  const pod = dep.inputs.spec.template.spec;
  const worker = pod.containers?.[0] ?? {};
  const limit = worker.resources?.limits?.["nvidia.com/gpu"];
  const request = worker.resources?.requests?.["nvidia.com/gpu"];
  if (String(limit) !== "1") p.push(`the worker's nvidia.com/gpu limit is ${limit ?? "not set"}, not 1`);
  if (request !== undefined && String(request) !== String(limit)) p.push(`the worker's nvidia.com/gpu request ${request} is not its limit ${limit}`);
  const offering = new Set(gpuGroups(rs));
  const fits = nodes.filter((n) => unschedulable(pod, n).length === 0);
  if (fits.length === 0) {
    for (const n of nodes) p.push(`the worker cannot run on the ${n.group} nodes: ${unschedulable(pod, n).join("; ")}`);
  }
  for (const n of fits) if (!offering.has(n.group)) p.push(`the worker may be placed on the ${n.group} nodes, which offer no nvidia.com/gpu`);
  // Scaling up from zero: the autoscaler knows a group's nodes only by its template.
  for (const g of gpuAmi) {
    const tags: Record<string, string> = g.inputs.tags ?? {};
    const node = nodes.find((n) => n.group === (g.inputs.nodeGroupName ?? g.name))!;
    const prefix = "k8s.io/cluster-autoscaler/node-template/";
    for (const [k, v] of Object.entries(g.inputs.labels ?? {})) if (tags[`${prefix}label/${k}`] !== v) p.push(`the ${node.group} group's autoscaler template lacks the label ${k}=${v}`);
    for (const t of node.taints) if (tags[`${prefix}taint/${t.key}`] !== `${t.value ?? ""}:${t.effect}`) p.push(`the ${node.group} group's autoscaler template lacks the taint ${t.key}=${t.value}:${t.effect}`);
    if (tags[`${prefix}resources/nvidia.com/gpu`] !== "1") p.push(`the ${node.group} group's autoscaler template offers no nvidia.com/gpu`);
  }
  return p;
}

/** A volume's mount in a container that can be written: not read-only, of a volume the pod writes to. */
const writableMounts = (pod: any, c: any): string[] => {
  const volumes = new Map<string, any>((pod.volumes ?? []).map((v: any) => [v.name, v]));
  return (c.volumeMounts ?? [])
    .filter((m: any) => m.readOnly !== true)
    .filter((m: any) => {
      const v = volumes.get(m.name);
      return v && (v.emptyDir !== undefined || v.ephemeral !== undefined);
    })
    .map((m: any) => String(m.mountPath).replace(/\/+$/, ""));
};
const under = (path: string, mounts: string[]) => mounts.some((m) => path === m || path.startsWith(`${m}/`));

/**
 * Every container of the worker's pod (its init containers, the collector, the worker) runs as
 * a user other than root (runAsNonRoot, and no runAsUser 0, in the container's or the pod's
 * security context) and, where its root filesystem is read-only, can write where it must: its
 * HOME is set (a user without a home gets `/`) and lies on a writable volume (an emptyDir, not
 * mounted read-only), and so does its temporary directory (TMPDIR, or /tmp). The AWS CLI also
 * writes under ~/.aws (its web-identity credentials' cache, aws-cli 7376), and reads
 * AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE: those under HOME, on the same volume.
 */
export function writableProblems(rs: Recorded[]): string[] {
  const p: string[] = [];
  const dep = ofType(rs, K.deployment)[0];
  if (!dep) return ["no worker Deployment"];
  const pod = dep.inputs.spec.template.spec;
  const containers = [...(pod.initContainers ?? []), ...(pod.containers ?? [])];
  for (const c of containers) {
    const sc = { ...(pod.securityContext ?? {}), ...(c.securityContext ?? {}) };
    if (sc.runAsNonRoot !== true) p.push(`container ${c.name}: may run as root (runAsNonRoot is not true)`);
    if (sc.runAsUser === 0 || sc.runAsUser === "0") p.push(`container ${c.name}: runs as root (runAsUser 0)`);
    if (c.securityContext?.readOnlyRootFilesystem !== true) {
      p.push(`container ${c.name}: its root filesystem is writable`);
      continue;
    }
    const env: Record<string, string> = Object.fromEntries((c.env ?? []).filter((e: any) => e.value !== undefined).map((e: any) => [e.name, e.value]));
    const mounts = writableMounts(pod, c);
    const home = env.HOME;
    if (!home) p.push(`container ${c.name}: no HOME (a user without one gets /, on the read-only root)`);
    else if (!under(home, mounts)) p.push(`container ${c.name}: HOME ${home} is on the read-only root`);
    const tmp = env.TMPDIR ?? "/tmp";
    if (!under(tmp, mounts)) p.push(`container ${c.name}: its temporary directory ${tmp} is on the read-only root`);
    if (String(c.image).startsWith(AWS_CLI_IMAGE.split(":")[0])) {
      for (const v of ["AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"]) {
        if (env[v] !== undefined && !under(env[v], mounts)) p.push(`container ${c.name}: ${v} ${env[v]} is on the read-only root`);
      }
    }
  }
  return p;
}

/**
 * What the tests cannot render is listed, and nothing else is left unrendered: the program's
 * Helm releases are exactly the charts UNRENDERED names (KEDA, the cluster autoscaler), its EKS
 * add-ons exactly the add-ons it names (the CloudWatch agent), every chart version pinned.
 */
export function unrenderedProblems(rs: Recorded[], listed: { helm: string[]; eksAddons: string[] } = UNRENDERED): string[] {
  const p: string[] = [];
  const charts = ofType(rs, K.release).map((r) => String(r.inputs.chart));
  const addons = ofType(rs, K.addon).map((a) => String(a.inputs.addonName));
  for (const c of charts) if (!listed.helm.includes(c)) p.push(`the Helm release of ${c} is not listed as unrendered: write its objects, or list it`);
  for (const c of listed.helm) if (!charts.includes(c)) p.push(`${c} is listed as unrendered and is no Helm release of the program`);
  for (const a of addons) if (!listed.eksAddons.includes(a)) p.push(`the EKS add-on ${a} is not listed as unrendered`);
  for (const a of listed.eksAddons) if (!addons.includes(a)) p.push(`${a} is listed as unrendered and is no EKS add-on of the program`);
  for (const r of ofType(rs, K.release)) if (!/^\d+\.\d+\.\d+$/.test(String(r.inputs.version ?? ""))) p.push(`the Helm release of ${r.inputs.chart} has no pinned version`);
  return p;
}
