import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { CONFIG, ofType, type Recorded, run } from "./harness";
import { validateK8s } from "./k8s/validate";
import { adotConfigs, adotProduces, alarmProblems, cdnProblems, exportedMetrics, K, kubernetesObjects, relayProblems, scalerProblems, workerProblems } from "./operations";

const clone = (rs: Recorded[]): Recorded[] => JSON.parse(JSON.stringify(rs));
const find = (rs: Recorded[], type: string) => ofType(rs, type)[0];

describe("compute and operations", () => {
  it("make Kubernetes objects valid against Kubernetes' and KEDA's schemas", async () => {
    const { resources } = await run();
    const objects = kubernetesObjects(resources);
    assert.deepEqual(
      objects.map((o) => o.kind).sort(),
      ["Deployment", "Namespace", "PodDisruptionBudget", "ScaledObject", "ServiceAccount", "TriggerAuthentication"],
    );
    assert.deepEqual(validateK8s(objects, CONFIG.kubernetesVersion), []);
    // Broken: a misspelt field on the Deployment, the ScaledObject without its queue.
    const broken = clone(resources);
    const dep = find(broken, K.deployment).inputs;
    dep.spec.template.spec.terminationGracePeriodSecond = dep.spec.template.spec.terminationGracePeriodSeconds;
    delete dep.spec.template.spec.terminationGracePeriodSeconds;
    delete find(broken, K.scaledObject).inputs.spec.triggers[0].metadata.queueURL;
    const found = validateK8s(kubernetesObjects(broken), CONFIG.kubernetesVersion);
    assert.equal(found.length, 2, String(found));
    assert.ok(found.some((x) => x.startsWith("Deployment/") && x.includes("terminationGracePeriodSecond")), String(found));
    assert.ok(found.some((x) => x.startsWith("ScaledObject/") && x.includes("queueURL")), String(found));
  });

  it("scale the worker on the gpu-jobs queue of the foundations, from zero", async () => {
    const { out, resources } = await run();
    const url = await new Promise<string>((ok) => out.messaging.queueUrls["gpu-jobs"].apply(ok));
    assert.match(url, /gpu-jobs\.fifo$/);
    assert.deepEqual(scalerProblems(resources, url, CONFIG.workerMaxReplicas), []);
    const broken = clone(resources);
    const so = find(broken, K.scaledObject).inputs.spec;
    so.minReplicaCount = 1;
    so.triggers[0].metadata.queueURL = url.replace("gpu-jobs", "handlers");
    find(broken, K.triggerAuth).inputs.spec.podIdentity = { provider: "aws-eks" };
    const found = scalerProblems(broken, url, CONFIG.workerMaxReplicas);
    assert.equal(found.length, 3, String(found));
    assert.ok(found[0].startsWith("minReplicaCount") && found[1].includes("not the gpu-jobs queue") && found[2].includes("aws-eks"), String(found));
  });

  it("let the worker finish its job on a scale-in, on a GPU, as its own role", async () => {
    const { resources } = await run();
    assert.deepEqual(workerProblems(resources), []);
    const broken = clone(resources);
    const spec = find(broken, K.deployment).inputs.spec.template.spec;
    spec.terminationGracePeriodSeconds = 30;
    const role = ofType(broken, K.role).find((r) => r.name === "worker")!;
    role.inputs.assumeRolePolicy = role.inputs.assumeRolePolicy.replace("system:serviceaccount:mira:mira-wsi-worker", "system:serviceaccount:mira:default");
    const found = workerProblems(broken);
    assert.equal(found.length, 2, String(found));
    assert.ok(found[0].includes("not longer than the lease 60") && found[1].includes("system:serviceaccount:mira:default"), String(found));
  });

  it("run exactly one relay task", async () => {
    const { resources } = await run();
    assert.deepEqual(relayProblems(resources), []);
    const broken = clone(resources);
    const relay = ofType(broken, K.service).find((s) => s.name === "relay")!;
    relay.inputs.desiredCount = 2;
    relay.inputs.deploymentMaximumPercent = 200;
    assert.deepEqual(relayProblems(broken), ["the relay service wants 2 tasks", "the relay's deploys may run 200% of its tasks at once"]);
    // Broken otherwise: the handlers' service also running the relay role.
    const twice = clone(resources);
    const handlers = ofType(twice, K.taskDef).find((t) => t.inputs.family.endsWith("-handlers"))!;
    handlers.inputs.containerDefinitions = handlers.inputs.containerDefinitions.replace('"value":"handlers"', '"value":"handlers,relay"');
    assert.match(relayProblems(twice)[0], /^2 services run the relay/);
  });

  it("alarm only on metrics the ADOT collector writes from what Mira exports", async () => {
    const { resources } = await run();
    const exported = exportedMetrics();
    assert.ok(exported.includes("mira_projection_lag_seconds") && exported.includes("mira_log_watermark_lag_seconds"), String(exported));
    const produced = adotProduces(adotConfigs(resources)[0], exported);
    assert.ok(produced.has("Mira/test/mira_projection_lag_seconds"), String([...produced]));
    assert.deepEqual(alarmProblems(resources, exported), []);
    // Broken: an alarm on a name Mira does not export, and a collector that drops the watermark.
    const broken = clone(resources);
    ofType(broken, K.alarm).find((a) => a.name === "projection-lag")!.inputs.metricName = "mira_projection_lag_secs";
    for (const td of ofType(broken, K.taskDef)) td.inputs.containerDefinitions = td.inputs.containerDefinitions.replaceAll("^mira_log_watermark_lag_seconds$", "^mira_log_watermark_lag_events$");
    const found = alarmProblems(broken, exported).sort();
    assert.deepEqual(found, [
      "alarm projection-lag: Mira/test/mira_projection_lag_secs is produced by no ADOT configuration",
      "alarm watermark-lag: Mira/test/mira_log_watermark_lag_seconds is produced by no ADOT configuration",
      "no alarm on mira_projection_lag_seconds",
    ]);
    // Broken: a DLQ alarm dropped.
    const noDlq = clone(resources).filter((r) => r.name !== "gpu-jobs-dlq-not-empty");
    assert.deepEqual(alarmProblems(noDlq, exported), ["no alarm on mira-test-gpu-jobs-dlq.fifo not being empty"]);
  });

  it("send /api/* and /ws to the ALB and the rest to the bucket", async () => {
    const { resources } = await run();
    assert.deepEqual(cdnProblems(resources, CONFIG.albDomain), []);
    const broken = clone(resources);
    const d = find(broken, K.distribution).inputs;
    d.orderedCacheBehaviors.find((b: any) => b.pathPattern === "/ws").targetOriginId = "spa";
    d.orderedCacheBehaviors.find((b: any) => b.pathPattern === "/api/*").cachePolicyId = "658327ea-f89d-4fab-a63d-7e88639e58f6";
    const found = cdnProblems(broken, CONFIG.albDomain).sort();
    assert.deepEqual(found, ["/api/* is cached", `/ws goes to mira-test-frontend.s3.eu-west-1.amazonaws.com, not the ALB over HTTPS`]);
  });
});
