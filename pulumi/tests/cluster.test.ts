// What the GPU fleet's cluster would run (issue 38), evaluated from the objects the program
// applies and the node groups it makes: the device plugin runs where the GPUs are, the worker
// asks for one where they are advertised, and every container of its pod can write its home and
// its temporary files as a user other than root. Each check runs on the program and on broken
// copies, with the exact problems they must show.

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { AWS_CLI_IMAGE, DEVICE_PLUGIN_IMAGE, UNRENDERED } from "../src/fleet";
import { gpuGroups, gpuSchedulingProblems, nodesOf, unrenderedProblems, unschedulable, writableProblems } from "./cluster";
import { ofType, type Recorded, run } from "./harness";
import { K } from "./operations";

const clone = (rs: Recorded[]): Recorded[] => JSON.parse(JSON.stringify(rs));
const plugin = (rs: Recorded[]) => ofType(rs, K.daemonSet).find((d) => d.name === "nvidia-device-plugin")!.inputs.spec.template.spec;
const pod = (rs: Recorded[]) => ofType(rs, K.deployment)[0].inputs.spec.template.spec;
const container = (rs: Recorded[], name: string) => [...(pod(rs).initContainers ?? []), ...pod(rs).containers].find((c: any) => c.name === name);

/**
 * The device plugin chart's default affinity (nvidia-device-plugin 0.17's values.yaml): node
 * feature discovery's labels, or `nvidia.com/gpu.present`, none of which a node here carries.
 */
const CHART_AFFINITY = {
  nodeAffinity: {
    requiredDuringSchedulingIgnoredDuringExecution: {
      nodeSelectorTerms: [
        { matchExpressions: [{ key: "feature.node.kubernetes.io/pci-10de.present", operator: "In", values: ["true"] }] },
        { matchExpressions: [{ key: "feature.node.kubernetes.io/cpu-model.vendor_id", operator: "In", values: ["NVIDIA"] }] },
        { matchExpressions: [{ key: "nvidia.com/gpu.present", operator: "In", values: ["true"] }] },
      ],
    },
  },
};

describe("what the GPU fleet's cluster would run", () => {
  it("knows the node groups' nodes by their labels and taints, and places pods as the scheduler would", async () => {
    const { resources } = await run();
    const nodes = nodesOf(resources);
    assert.deepEqual(
      nodes.map((n) => [n.group, n.labels["mira.io/pool"], n.labels["node.kubernetes.io/instance-type"], n.taints]),
      [
        ["system", undefined, "t3.large", []],
        ["gpu", "gpu", "g6.xlarge", [{ key: "nvidia.com/gpu", value: "true", effect: "NoSchedule" }]],
      ],
    );
    // The evaluation itself, on pods written out here.
    const [system, gpu] = nodes;
    const anywhere = { containers: [] };
    assert.deepEqual(unschedulable(anywhere, system), []);
    assert.deepEqual(unschedulable(anywhere, gpu), ["taint nvidia.com/gpu=true:NoSchedule not tolerated"]);
    const everything = { tolerations: [{ operator: "Exists" }] };
    assert.deepEqual(unschedulable(everything, gpu), []);
    const wrongValue = { tolerations: [{ key: "nvidia.com/gpu", operator: "Equal", value: "present", effect: "NoSchedule" }] };
    assert.deepEqual(unschedulable(wrongValue, gpu), ["taint nvidia.com/gpu=true:NoSchedule not tolerated"]);
    const notOnGpus = { affinity: { nodeAffinity: { requiredDuringSchedulingIgnoredDuringExecution: { nodeSelectorTerms: [{ matchExpressions: [{ key: "mira.io/pool", operator: "NotIn", values: ["gpu"] }] }] } } } };
    assert.deepEqual(unschedulable(notOnGpus, system), []);
    assert.deepEqual(unschedulable({ ...notOnGpus, ...everything }, gpu), ["required node affinity (mira.io/pool NotIn gpu)"]);
    assert.deepEqual(unschedulable({ affinity: CHART_AFFINITY, ...everything }, gpu), [
      "required node affinity (feature.node.kubernetes.io/pci-10de.present In true or feature.node.kubernetes.io/cpu-model.vendor_id In NVIDIA or nvidia.com/gpu.present In true)",
    ]);
  });

  it("runs NVIDIA's device plugin on the GPU nodes, and the worker, asking for one GPU, only where it is advertised", async () => {
    const { resources } = await run();
    assert.deepEqual(gpuSchedulingProblems(resources), []);
    assert.deepEqual(gpuGroups(resources), ["gpu"]);
    const ds = plugin(resources);
    assert.equal(ds.containers[0].image, DEVICE_PLUGIN_IMAGE);
    assert.deepEqual(ds.nodeSelector, { "mira.io/pool": "gpu" });
    assert.deepEqual(pod(resources).containers[0].resources.limits["nvidia.com/gpu"], "1");

    // Broken: the device plugin placed as its chart places it by default (issue 38: no node
    // carries node feature discovery's labels), so no node offers a GPU.
    const chart = clone(resources);
    delete plugin(chart).nodeSelector;
    plugin(chart).affinity = CHART_AFFINITY;
    assert.deepEqual(gpuSchedulingProblems(chart), [
      "the device plugin cannot run on the gpu nodes: required node affinity (feature.node.kubernetes.io/pci-10de.present In true or feature.node.kubernetes.io/cpu-model.vendor_id In NVIDIA or nvidia.com/gpu.present In true)",
      "the worker may be placed on the gpu nodes, which offer no nvidia.com/gpu",
    ]);
    // Broken: the device plugin without the GPU taint's toleration, and with a selector the
    // nodes lack.
    const untolerated = clone(resources);
    plugin(untolerated).tolerations = [{ key: "CriticalAddonsOnly", operator: "Exists" }];
    plugin(untolerated).nodeSelector = { "mira.io/pool": "gpu", "nvidia.com/gpu.present": "true" };
    assert.deepEqual(gpuSchedulingProblems(untolerated), [
      "the device plugin cannot run on the gpu nodes: nodeSelector nvidia.com/gpu.present=true",
      "the device plugin cannot run on the gpu nodes: taint nvidia.com/gpu=true:NoSchedule not tolerated",
      "the worker may be placed on the gpu nodes, which offer no nvidia.com/gpu",
    ]);
    // Broken: the worker asking for no GPU and two, and placed anywhere that tolerates it (the
    // system nodes too); then placed nowhere (the taint not tolerated).
    const anywhere = clone(resources);
    delete pod(anywhere).nodeSelector;
    pod(anywhere).containers[0].resources.limits["nvidia.com/gpu"] = "2";
    pod(anywhere).containers[0].resources.requests["nvidia.com/gpu"] = "1";
    assert.deepEqual(gpuSchedulingProblems(anywhere), [
      "the worker's nvidia.com/gpu limit is 2, not 1",
      "the worker's nvidia.com/gpu request 1 is not its limit 2",
      "the worker may be placed on the system nodes, which offer no nvidia.com/gpu",
    ]);
    const nowhere = clone(resources);
    delete pod(nowhere).containers[0].resources.limits["nvidia.com/gpu"];
    pod(nowhere).tolerations = [];
    assert.deepEqual(gpuSchedulingProblems(nowhere), [
      "the worker's nvidia.com/gpu limit is not set, not 1",
      "the worker cannot run on the system nodes: nodeSelector mira.io/pool=gpu",
      "the worker cannot run on the gpu nodes: taint nvidia.com/gpu=true:NoSchedule not tolerated",
    ]);
    // Broken: the autoscaler's template of the GPU group without its label, its taint's value
    // wrong, and no GPU: from zero nodes, it would not know a GPU node fits the worker.
    const template = clone(resources);
    const tags = ofType(template, K.nodeGroup).find((g) => g.inputs.nodeGroupName === "gpu")!.inputs.tags;
    delete tags["k8s.io/cluster-autoscaler/node-template/label/mira.io/pool"];
    delete tags["k8s.io/cluster-autoscaler/node-template/resources/nvidia.com/gpu"];
    tags["k8s.io/cluster-autoscaler/node-template/taint/nvidia.com/gpu"] = "present:NoSchedule";
    assert.deepEqual(gpuSchedulingProblems(template), [
      "the gpu group's autoscaler template lacks the label mira.io/pool=gpu",
      "the gpu group's autoscaler template lacks the taint nvidia.com/gpu=true:NoSchedule",
      "the gpu group's autoscaler template offers no nvidia.com/gpu",
    ]);
    // Broken: the device plugin as the Helm release it was.
    const released = clone(resources).filter((r) => r.type !== K.daemonSet);
    released.push({ type: K.release, name: "nvidia-device-plugin", inputs: { chart: "nvidia-device-plugin", version: "0.17.1" }, state: {} });
    assert.deepEqual(gpuSchedulingProblems(released), [
      "0 DaemonSets run nvcr.io/nvidia/k8s-device-plugin",
      "the device plugin is a Helm release, whose objects no test sees",
      "the worker may be placed on the gpu nodes, which offer no nvidia.com/gpu",
    ]);
  });

  it("lets every container of the worker's pod write its home and temporary files, as a user other than root", async () => {
    const { resources } = await run();
    assert.deepEqual(writableProblems(resources), []);
    const all = [...pod(resources).initContainers, ...pod(resources).containers];
    assert.deepEqual(all.map((c: any) => c.name), ["database-url", "adot", "worker"]);
    const env = (c: any) => Object.fromEntries(c.env.filter((e: any) => e.value !== undefined).map((e: any) => [e.name, e.value]));
    assert.deepEqual(
      all.map((c: any) => [c.name, env(c).HOME, env(c).TMPDIR, c.securityContext.readOnlyRootFilesystem, c.securityContext.runAsUser]),
      [
        ["database-url", "/home/mira", "/tmp", true, 10001],
        ["adot", "/home/mira", "/tmp", true, 10001],
        ["worker", "/var/lib/mira", "/tmp", true, 10001],
      ],
    );
    const cli = container(resources, "database-url");
    assert.equal(cli.image, AWS_CLI_IMAGE);
    assert.deepEqual([env(cli).AWS_CONFIG_FILE, env(cli).AWS_SHARED_CREDENTIALS_FILE], ["/home/mira/.aws/config", "/home/mira/.aws/credentials"]);
    // The CLI's credentials' cache lives in memory.
    const volumes = Object.fromEntries(pod(resources).volumes.map((v: any) => [v.name, v]));
    assert.equal(volumes["database-url-home"].emptyDir.medium, "Memory");

    // Broken: the AWS CLI's container as it was (issue 38): no HOME, no temporary directory, a
    // read-only root; the CLI fails writing ~/.aws/cli/cache and the worker never starts.
    const before = clone(resources);
    const c = container(before, "database-url");
    c.env = c.env.filter((e: any) => !["HOME", "TMPDIR", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"].includes(e.name));
    c.volumeMounts = c.volumeMounts.filter((m: any) => m.name === "secrets");
    assert.deepEqual(writableProblems(before), [
      "container database-url: no HOME (a user without one gets /, on the read-only root)",
      "container database-url: its temporary directory /tmp is on the read-only root",
    ]);
    // Broken: the collector as root, the worker's home mounted read-only, the CLI's config file
    // outside its home.
    const root = clone(resources);
    Object.assign(container(root, "adot").securityContext, { runAsNonRoot: false, runAsUser: 0 });
    container(root, "worker").volumeMounts.find((m: any) => m.name === "worker-home").readOnly = true;
    container(root, "database-url").env.find((e: any) => e.name === "AWS_CONFIG_FILE").value = "/etc/aws/config";
    assert.deepEqual(writableProblems(root), [
      "container database-url: AWS_CONFIG_FILE /etc/aws/config is on the read-only root",
      "container adot: may run as root (runAsNonRoot is not true)",
      "container adot: runs as root (runAsUser 0)",
      "container worker: HOME /var/lib/mira is on the read-only root",
    ]);
    // Broken: a temporary directory on a volume of the node's paths (not the pod's own), and a
    // writable root, which the check refuses as it stands.
    const host = clone(resources);
    pod(host).volumes.find((v: any) => v.name === "adot-tmp").hostPath = { path: "/tmp" };
    delete pod(host).volumes.find((v: any) => v.name === "adot-tmp").emptyDir;
    container(host, "worker").securityContext.readOnlyRootFilesystem = false;
    assert.deepEqual(writableProblems(host), [
      "container adot: its temporary directory /tmp is on the read-only root",
      "container worker: its root filesystem is writable",
    ]);
  });

  it("lists what no test renders: KEDA and the autoscaler as Helm releases, the CloudWatch agent as an EKS add-on", async () => {
    const { resources } = await run();
    assert.deepEqual(unrenderedProblems(resources), []);
    assert.deepEqual(UNRENDERED, { helm: ["keda", "cluster-autoscaler"], eksAddons: ["amazon-cloudwatch-observability"] });
    // Broken: a chart added without listing it (the device plugin as it was), KEDA's version
    // unpinned, the add-on gone.
    const broken = clone(resources).filter((r) => r.type !== K.addon);
    broken.push({ type: K.release, name: "nvidia-device-plugin", inputs: { chart: "nvidia-device-plugin", version: "0.17.1" }, state: {} });
    ofType(broken, K.release).find((r) => r.inputs.chart === "keda")!.inputs.version = "2.x";
    assert.deepEqual(unrenderedProblems(broken), [
      "the Helm release of nvidia-device-plugin is not listed as unrendered: write its objects, or list it",
      "amazon-cloudwatch-observability is listed as unrendered and is no EKS add-on of the program",
      "the Helm release of keda has no pinned version",
    ]);
  });
});
