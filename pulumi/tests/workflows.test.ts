import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { CONFIG, ofType, type Recorded, run, stackOutputs } from "./harness";

const clone = (rs: Recorded[]): Recorded[] => JSON.parse(JSON.stringify(rs));
import {
  bucketProblems,
  runnerProblems,
  workerRolloutProblems,
  imageProblems,
  loadWorkflows,
  registrationProblems,
  rolloutProblems,
  runbook,
  runbookOutputProblems,
  stackReadProblems,
  stackReads,
  variableProblems,
  type Workflow,
  workflow,
} from "./workflows";

const ECR = "aws:ecr/repository:Repository";

/** A copy of a workflow with its text edited, parsed again. */
function edited(w: Workflow, ...edits: [string, string][]): Workflow {
  let text = w.text;
  for (const [from, to] of edits) {
    assert.ok(text.includes(from), `${w.file} has no ${from}`);
    text = text.split(from).join(to);
  }
  return workflow(w.file, text);
}

const deployOf = (ws: Workflow[]) => ws.find((w) => w.file === "deploy.yml")!;
/** The slide verifier's step, and the image it registers. */
const VERIFIER_STEP = "Roll the slide verifier onto the new worker image";
const VERIFIER_IMAGE = "SERVICE: ${{ steps.stack.outputs.verifierService }}\n          IMAGE: ${{ steps.stack.outputs.workerRepository }}";
const verifierStep = (w: Workflow) => w.steps.find((s) => s.name === VERIFIER_STEP)!;

describe("the workflows", () => {
  it("read only stack outputs that the program exports", async () => {
    const out = await stackOutputs();
    const ws = loadWorkflows();
    const deploy = deployOf(ws);
    assert.ok(stackReads(deploy).length >= 20, "deploy.yml reads its names in the stack step");
    assert.deepEqual(stackReadProblems(ws, out), []);
    // Broken: a renamed cluster output and a truncated bucket, a reference to an output the
    // stack step does not read, and a second place that reads the outputs.
    const broken = edited(
      deploy,
      [".deploy.ecsCluster'", ".deploy.ecsClusterName'"],
      ["'.buckets.frontend'", "'.buckets.front'"],
      ["steps.stack.outputs.publicUrl }}", "steps.stack.outputs.publicURL }}"],
      ["npm run build\n", 'npm run build\n          jq -r .deploy.publicUrl "$RUNNER_TEMP/stack.json"\n'],
    );
    assert.deepEqual(stackReadProblems([broken], out).sort(), [
      "deploy.yml: ecsCluster reads .deploy.ecsClusterName, which the program does not export",
      "deploy.yml: frontendBucket reads .buckets.front, which the program does not export",
      "deploy.yml: step \"Build the browser app\" reads the stack's outputs outside the stack step",
      "deploy.yml: steps.stack.outputs.publicURL is read by no line of the stack step",
    ]);
  });

  it("push both images, tagged with the commit, to exactly the program's ECR repositories", async () => {
    const out = await stackOutputs();
    const { resources } = await run();
    const ecr = ofType(resources, ECR).map((r) => r.state.repositoryUrl);
    assert.deepEqual(ecr.sort(), Object.values(out.registries).sort());
    const deploy = deployOf(loadWorkflows());
    assert.deepEqual(imageProblems(deploy, out, ecr), []);
    // Broken: the worker's image read from a repository the program does not have, and the
    // API's tagged `latest`.
    const wrongRepo = edited(deploy, ['registries["mira-wsi-worker"]', 'registries["mira-worker"]']);
    const found = imageProblems(wrongRepo, out, ecr);
    assert.ok(found.some((x) => x.includes("docker build $WORKER_REPOSITORY:$GITHUB_SHA: not a repository")), String(found));
    assert.ok(found.some((x) => x.includes("the program's ECR repositories are")), String(found));
    const latest = edited(deploy, ['-t "$API_REPOSITORY:$GITHUB_SHA"', '-t "$API_REPOSITORY:latest"']);
    assert.deepEqual(imageProblems(latest, out, ecr), ["deploy.yml: docker build $API_REPOSITORY:latest: the tag is not the commit"]);
    // Broken: the worker Deployment given the API's image, and the API image pushed to the
    // worker's repository.
    const swapped = edited(
      deploy,
      ["IMAGE: ${{ steps.stack.outputs.workerRepository }}", "IMAGE: ${{ steps.stack.outputs.apiRepository }}"],
      ['-f images/mira-api/Dockerfile --build-arg MIRA_COMMIT="$GITHUB_SHA" -t "$API_REPOSITORY', '-f images/mira-api/Dockerfile --build-arg MIRA_COMMIT="$GITHUB_SHA" -t "$WORKER_REPOSITORY'],
    );
    const s = imageProblems(swapped, out, ecr);
    assert.ok(s.some((x) => x.includes('step "Roll the worker Deployment onto the new image" deploys') && x.includes("not the mira-wsi-worker image")), String(s));
    assert.ok(s.some((x) => x.includes("the image of images/mira-api goes to .registries[\"mira-wsi-worker\"]")), String(s));
  });

  it("register every task definition of the program's images with its repository's new image, as a role that may pass its roles", async () => {
    const out = await stackOutputs();
    const { resources } = await run();
    const deploy = deployOf(loadWorkflows());
    const role = out.deploy.githubRoleArn;
    assert.deepEqual(registrationProblems(deploy, out, resources, role), []);
    // Broken: the daily verification's step dropped, or given the migration's family.
    const dropped = { ...deploy, steps: deploy.steps.filter((s) => s.name !== "Point the daily verification at the new image") };
    assert.equal(dropped.steps.length, deploy.steps.length - 1);
    const stale = ["deploy.yml: mira-test-audit-verify runs the mira-api image, and no step registers a revision of it with the new one"];
    assert.deepEqual(registrationProblems(dropped, out, resources, role), stale);
    const wrong = edited(deploy, ["FAMILY: ${{ steps.stack.outputs.auditVerifyFamily }}", "FAMILY: ${{ steps.stack.outputs.migrationFamily }}"]);
    assert.deepEqual(registrationProblems(wrong, out, resources, role), stale);
    // Broken: the slide verifier's step dropped, or given the API's image; the verifier rolled
    // with the API's services (their image).
    const noVerifier = { ...deploy, steps: deploy.steps.filter((s) => s.name !== VERIFIER_STEP) };
    assert.equal(noVerifier.steps.length, deploy.steps.length - 1);
    assert.deepEqual(registrationProblems(noVerifier, out, resources, role), [
      "deploy.yml: mira-test-verifier runs the mira-wsi-worker image, and no step registers a revision of it with the new one",
    ]);
    const apiImage = edited(deploy, [VERIFIER_IMAGE, VERIFIER_IMAGE.replace("workerRepository", "apiRepository")]);
    assert.deepEqual(registrationProblems(apiImage, out, resources, role), [
      `deploy.yml: step "${VERIFIER_STEP}" registers mira-test-verifier with the mira-api image, not the mira-wsi-worker image it runs`,
    ]);
    const listed = edited(deploy, [
      "${{ steps.stack.outputs.handlersService }}\n",
      "${{ steps.stack.outputs.handlersService }}\n            ${{ steps.stack.outputs.verifierService }}\n",
    ]);
    const withApi = { ...listed, steps: listed.steps.filter((s) => s.name !== VERIFIER_STEP) };
    assert.deepEqual(registrationProblems(withApi, out, resources, role), [
      'deploy.yml: step "Roll the ECS services onto the new image" registers mira-test-verifier with the mira-api image, not the mira-wsi-worker image it runs',
    ]);
    // Broken: the deploy role without iam:PassRole on the verification's task role.
    const broken: Recorded[] = JSON.parse(JSON.stringify(resources));
    const verifyRole = ofType(broken, "aws:iam/role:Role").find((r) => r.name === "audit-verify")!.state.arn;
    const pol = ofType(broken, "aws:iam/rolePolicy:RolePolicy").find((x) => x.name === "deploy-policy")!;
    const st = JSON.parse(pol.inputs.policy).Statement.map((x: any) =>
      x.Action.includes("iam:PassRole") ? { ...x, Resource: x.Resource.filter((r: string) => r !== verifyRole) } : x,
    );
    pol.inputs.policy = JSON.stringify({ Statement: st });
    assert.deepEqual(registrationProblems(deploy, out, broken, role), [
      `deploy.yml: the deploy role cannot pass ${verifyRole}, so it cannot register mira-test-audit-verify`,
    ]);
  });

  it("roll every ECS service, the slide verifier too, onto its new revision and wait until it runs it", async () => {
    const out = await stackOutputs();
    const { resources } = await run();
    const deploy = deployOf(loadWorkflows());
    assert.deepEqual(rolloutProblems(deploy, out, resources), []);
    assert.deepEqual(ofType(resources, "aws:ecs/service:Service").map((x) => x.inputs.name).sort(), [
      "mira-test-api",
      "mira-test-handlers",
      "mira-test-projector",
      "mira-test-relay",
      "mira-test-verifier",
    ]);
    const where = `deploy.yml: step "${VERIFIER_STEP}" rolls mira-test-verifier`;
    // Broken: the verifier's step dropped; the handlers left out of the API's services.
    const noVerifier = { ...deploy, steps: deploy.steps.filter((s) => s.name !== VERIFIER_STEP) };
    assert.deepEqual(rolloutProblems(noVerifier, out, resources), ["deploy.yml: no step rolls mira-test-verifier (names it from the stack's outputs)"]);
    const noHandlers = edited(deploy, ["            ${{ steps.stack.outputs.handlersService }}\n", ""]);
    assert.deepEqual(rolloutProblems(noHandlers, out, resources), ["deploy.yml: no step rolls mira-test-handlers (names it from the stack's outputs)"]);
    // Broken: the verifier moved onto no new revision, its revision registered and never
    // deployed, not waited for, not checked after the wait, moved in a cluster named by another
    // output, or rolled before the migrations.
    const lines = (verifierStep(deploy).run ?? "").split("\n");
    const line = (start: string) => `${lines.find((l) => l.startsWith(start))!}\n`;
    const noRevision = edited(deploy, [line('revision=$(.github/scripts/register-revision.sh "$family" "$IMAGE")'), ""]);
    assert.deepEqual(rolloutProblems(noRevision, out, resources), [`${where}, and registers no revision`]);
    const noUpdate = edited(deploy, [line("aws ecs update-service"), ""]);
    assert.deepEqual(rolloutProblems(noUpdate, out, resources), [`${where}, and does not move it to a revision (aws ecs update-service --task-definition)`]);
    const noWait = edited(deploy, [line("for _ in 1 2; do aws ecs wait services-stable --cluster \"$CLUSTER\" --services \"$SERVICE\""), ""]);
    assert.deepEqual(rolloutProblems(noWait, out, resources), [`${where}, and does not wait for it (aws ecs wait services-stable)`]);
    const noCheck = edited(deploy, [line('now=$(aws ecs describe-services --cluster "$CLUSTER" --services "$SERVICE"'), ""]);
    assert.deepEqual(rolloutProblems(noCheck, out, resources), [`${where}, and does not check after the wait that it runs the new revision (aws ecs describe-services)`]);
    const elsewhere = edited(deploy, [
      "CLUSTER: ${{ steps.stack.outputs.ecsCluster }}\n          SERVICE: ${{ steps.stack.outputs.verifierService }}",
      "CLUSTER: ${{ steps.stack.outputs.workerNamespace }}\n          SERVICE: ${{ steps.stack.outputs.verifierService }}",
    ]);
    assert.deepEqual(rolloutProblems(elsewhere, out, resources), [`${where}, in the cluster ${out.deploy.workerNamespace}, not its own ${out.deploy.ecsCluster}`]);
    const migrate = deploy.steps.findIndex((s) => s.name === "Run the migrations");
    const early = { ...deploy, steps: [...deploy.steps.slice(0, migrate), verifierStep(deploy), ...noVerifier.steps.slice(migrate)] };
    assert.deepEqual(rolloutProblems(early, out, resources), [`${where} before the migrations run`]);
  });

  it("upload the browser app to the frontend bucket only", async () => {
    const out = await stackOutputs();
    const deploy = deployOf(loadWorkflows());
    assert.deepEqual(bucketProblems(deploy, out), []);
    // Broken: the app synced to the uploads bucket.
    const broken = edited(deploy, ["output frontendBucket '.buckets.frontend'", "output frontendBucket '.buckets.uploads'"]);
    const found = bucketProblems(broken, out);
    assert.equal(found.length, 2, String(found));
    assert.ok(found.every((x) => x.includes("which is .buckets.uploads, not .buckets.frontend")), String(found));
  });

  it("assume roles given by variables that the runbook documents from the stack's outputs", async () => {
    const out = await stackOutputs();
    const ws = loadWorkflows();
    const book = runbook();
    assert.deepEqual(variableProblems(ws, book, out), []);
    // Broken: an undocumented role variable, a documented role from an output that does not
    // exist, and long-lived keys.
    const infra = ws.find((w) => w.file === "deploy-infra.yml")!;
    const undocumented = edited(infra, ["vars.AWS_INFRA_ROLE_ARN", "vars.AWS_ADMIN_ROLE_ARN"]);
    assert.deepEqual(variableProblems([undocumented], book, out), ["deploy-infra.yml: vars.AWS_ADMIN_ROLE_ARN has no row in docs/runbooks/deploy.md"]);
    assert.ok(book.includes("`.deploy.githubRoleArn`"));
    const wrongBook = book.split("`.deploy.githubRoleArn`").join("`.deploy.githubRole`");
    assert.deepEqual(variableProblems(ws, wrongBook, out), ["docs/runbooks/deploy.md: AWS_DEPLOY_ROLE_ARN is .deploy.githubRole, which the program does not export"]);
    const keys = edited(deployOf(ws), ["role-to-assume: ${{ vars.AWS_DEPLOY_ROLE_ARN }}", "aws-access-key-id: ${{ secrets.AWS_ACCESS_KEY_ID }}"]);
    assert.deepEqual(variableProblems([keys], book, out).sort(), [
      "deploy.yml: aws-access-key-id: long-lived keys",
      "deploy.yml: role-to-assume (none) is not a variable",
      "deploy.yml: secrets.AWS_ACCESS_KEY_ID has no row in docs/runbooks/deploy.md",
    ]);
  });

  it("name in the runbook only stack outputs that the program exports", async () => {
    const out = await stackOutputs();
    const book = runbook();
    assert.deepEqual(runbookOutputProblems(book, out), []);
    // What it reads: the login secrets by a variable, and the owner's.
    assert.ok(book.includes(`jq -r --arg l "$login" '.database.loginSecretArns[$l]'`), "the runbook fills the login secrets by their outputs");
    assert.ok(book.includes("`database.masterSecretArn`"));
    // Broken: the one shared secret named again, in the text and in a jq read; a login read
    // from an output that does not exist; the migration's copy of the master password, which
    // the program no longer makes.
    const broken = book
      .replace("`database.loginSecretArns`", "`database.appSecretArn`")
      .replace(`'.database.loginSecretArns[$l]'`, `'.database.loginSecrets[$l]'`)
      .replace("`database.masterSecretArn`", "`database.masterSecretArn` (copied into `compute.migrationSecretArn`)");
    assert.deepEqual(runbookOutputProblems(broken, out).sort(), [
      "docs/runbooks/deploy.md: names .compute.migrationSecretArn, which the program does not export",
      "docs/runbooks/deploy.md: names .database.appSecretArn, which the program does not export",
      "docs/runbooks/deploy.md: names .database.loginSecrets, which the program does not export",
    ]);
  });

  it("reach the EKS API from the deploy runners inside the VPC, which the cluster admits", async () => {
    const { resources } = await run();
    const ws = loadWorkflows();
    assert.deepEqual(runnerProblems(ws, resources), []);
    // Both deploying workflows talk to the cluster, and run where DEPLOY_RUNS_ON says.
    for (const w of ws.filter((x) => x.file !== "ci.yml")) {
      assert.deepEqual(w.jobs.map((j) => j.runsOn), ["${{ fromJSON(vars.DEPLOY_RUNS_ON) }}"], w.file);
    }
    // Broken: deploy.yml back on GitHub's hosted runner (issue 38), deploy-infra.yml on a
    // literal label.
    const RUNS_ON = "runs-on: ${{ fromJSON(vars.DEPLOY_RUNS_ON) }}";
    const hosted = ws.map((w) =>
      w.file === "deploy.yml" ? edited(w, [RUNS_ON, "runs-on: ubuntu-24.04"]) : w.file === "deploy-infra.yml" ? edited(w, [RUNS_ON, "runs-on: [self-hosted, linux]"]) : w,
    );
    assert.deepEqual(runnerProblems(hosted, resources), [
      "deploy-infra.yml: job infra runs on self-hosted,linux, not the deploy runners a variable names",
      "deploy.yml: job deploy reaches the EKS API from GitHub's hosted runner ubuntu-24.04",
    ]);
    // Broken: the cluster as it was (no group of it admits the runners), its private endpoint
    // off and its public one open to all, and the VPC endpoints closed to the runners.
    const closed = clone(resources).filter((r) => !["eks-api-from-deploy-runners", "endpoints-from-deploy-runners"].includes(r.name));
    Object.assign(ofType(closed, "aws:eks/cluster:Cluster")[0].inputs.vpcConfig, { endpointPrivateAccess: false, endpointPublicAccess: true, publicAccessCidrs: ["0.0.0.0/0"] });
    assert.deepEqual(runnerProblems(ws, closed), [
      "the cluster's private endpoint is off",
      "no security group of the cluster admits the deploy runners on 443",
      "the VPC endpoints do not admit the deploy runners on 443",
      "the cluster's public endpoint admits 0.0.0.0/0",
    ]);
  });

  it("wait for the worker's rollout as long as it may take: a drain and a start for every replica", async () => {
    const out = await stackOutputs();
    const { resources } = await run();
    const deploy = deployOf(loadWorkflows());
    // A start (a GPU node from zero, the image, the kernels) and the steps before the rollout,
    // written out here rather than taken from the program.
    const START = 900;
    const BEFORE = 90 * 60;
    assert.deepEqual(workerRolloutProblems(deploy, out, resources, START, BEFORE), []);
    assert.equal(out.deploy.workerRolloutTimeoutSeconds, CONFIG.workerMaxReplicas * (CONFIG.workerDrainSeconds + START));
    // Broken: as it was (issue 38): 25 minutes for the rollout, 90 for the job, the Deployment's
    // default progress deadline (600 s, under one drain).
    const before = edited(deploy, ['--timeout="${ROLLOUT_TIMEOUT}s"', "--timeout=25m"], ["timeout-minutes: 300", "timeout-minutes: 90"]);
    const dep = clone(resources);
    delete ofType(dep, "kubernetes:apps/v1:Deployment")[0].inputs.spec.progressDeadlineSeconds;
    assert.deepEqual(workerRolloutProblems(before, out, dep, START, BEFORE), [
      "progressDeadlineSeconds 600 is under a drain and a start (1800 + 900 s): the rollout is declared failed while a pod drains",
      'deploy.yml: step "Roll the worker Deployment onto the new image" waits 25m (1500 s) for the worker, under 4 × (1800 + 900) = 10800 s',
      "deploy.yml: job deploy's timeout-minutes 90 is under the worker's rollout (10800 s) and the steps before it (5400 s)",
    ]);
    // Broken: the stack's output too short for the fleet (two more replicas than it counts).
    const more = clone(resources);
    ofType(more, "kubernetes:keda.sh/v1alpha1:ScaledObject")[0].inputs.spec.maxReplicaCount = 6;
    assert.deepEqual(workerRolloutProblems(deploy, out, more, START, BEFORE), [
      'deploy.yml: step "Roll the worker Deployment onto the new image" waits .deploy.workerRolloutTimeoutSeconds (10800 s) for the worker, under 6 × (1800 + 900) = 16200 s',
      "deploy.yml: job deploy's timeout-minutes 300 is under the worker's rollout (16200 s) and the steps before it (5400 s)",
    ]);
  });
});
