// What the workflows under .github/workflows take from the stack, compared with what the
// program exports. As in checks.ts, each property is a function that returns the problems it
// finds, so that a test can run it on the real files and on a broken copy.
//
// The convention the workflows keep (deploy.yml says it too): the stack's outputs are read in
// one step, `id: stack`, one `output NAME 'JQ PATH'` line per value, and every later step takes
// them as `${{ steps.stack.outputs.NAME }}` through its `env:`.

import { existsSync, readdirSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { parse } from "yaml";
import type { Recorded } from "./harness";

export type Step = { id?: string; name?: string; uses?: string; run?: string; env?: Record<string, string>; with?: Record<string, string> };
/** A job: where it runs (`runs-on`, as written), its timeout, and its steps. */
export type Job = { name: string; runsOn: unknown; timeoutMinutes?: number; steps: Step[] };
export type Workflow = { file: string; text: string; env: Record<string, string>; steps: Step[]; jobs: Job[] };
/** One value the stack step reads: its output name, the jq expression, and the path it starts with. */
export type Read = { name: string; expr: string; path: string[] | null };

/** The repository's root, found from this file (tests/ or bin/tests/). */
export function repoRoot(): string {
  for (let d = __dirname; d !== dirname(d); d = dirname(d)) if (existsSync(join(d, ".github", "workflows"))) return d;
  throw new Error(".github/workflows not found above pulumi/");
}

export function workflow(file: string, text: string): Workflow {
  const doc = parse(text);
  const steps: Step[] = [];
  const jobs: Job[] = [];
  let env: Record<string, string> = { ...(doc.env ?? {}) };
  for (const [name, job] of Object.entries<any>(doc.jobs ?? {})) {
    env = { ...env, ...(job.env ?? {}) };
    steps.push(...(job.steps ?? []));
    jobs.push({ name, runsOn: job["runs-on"], timeoutMinutes: job["timeout-minutes"], steps: job.steps ?? [] });
  }
  return { file, text, env, steps, jobs };
}

export function loadWorkflows(root = repoRoot()): Workflow[] {
  const dir = join(root, ".github", "workflows");
  return readdirSync(dir)
    .filter((f) => /\.ya?ml$/.test(f))
    .sort()
    .map((f) => workflow(f, readFileSync(join(dir, f), "utf8")));
}

export const runbook = (root = repoRoot()) => readFileSync(join(root, "docs", "runbooks", "deploy.md"), "utf8");

/** `.a.b["c-d"]` → ["a", "b", "c-d"]; null when the expression does not start with such a path. */
export function jqPath(expr: string): string[] | null {
  const head = expr.split("|")[0].trim();
  const path: string[] = [];
  const token = /\.([A-Za-z_][A-Za-z0-9_]*)|\.?\[\s*"([^"]+)"\s*\]/y;
  let at = 0;
  while (at < head.length) {
    token.lastIndex = at;
    const m = token.exec(head);
    if (!m) return null;
    path.push(m[1] ?? m[2]);
    at = token.lastIndex;
  }
  return path.length ? path : null;
}

export const show = (path: string[]) => path.map((p) => (/^[A-Za-z_]\w*$/.test(p) ? `.${p}` : `["${p}"]`)).join("");

export function lookup(obj: any, path: string[]): any {
  return path.reduce((o, k) => (o != null && typeof o === "object" ? o[k] : undefined), obj);
}

const isEmpty = (v: any) =>
  v === undefined || v === null || v === "" || (Array.isArray(v) && v.length === 0) || (typeof v === "object" && !Array.isArray(v) && Object.keys(v).length === 0);

/** The `output NAME 'PATH'` lines of the step `stack`. */
export function stackReads(w: Workflow): Read[] {
  const step = w.steps.find((s) => s.id === "stack");
  const reads: Read[] = [];
  for (const line of (step?.run ?? "").split("\n")) {
    const m = /^\s*output\s+(\w+)\s+'([^']+)'\s*$/.exec(line);
    if (m) reads.push({ name: m[1], expr: m[2], path: jqPath(m[2]) });
  }
  return reads;
}

/** `${{ steps.stack.outputs.NAME }}` → NAME, wherever it stands in a value. */
const stackRefs = (s: string) => [...s.matchAll(/\$\{\{\s*steps\.stack\.outputs\.([\w-]+)\s*\}\}/g)].map((m) => m[1]);

/**
 * Every stack output a workflow reads exists (and is not empty) in the program's exports; every
 * `steps.stack.outputs.X` it uses is read by the stack step; nothing else reads the outputs.
 */
export function stackReadProblems(workflows: Workflow[], outputs: Record<string, any>): string[] {
  const p: string[] = [];
  for (const w of workflows) {
    const reads = stackReads(w);
    for (const r of reads) {
      if (!r.path) p.push(`${w.file}: ${r.name} reads ${r.expr}, which does not start with a path`);
      else if (isEmpty(lookup(outputs, r.path))) p.push(`${w.file}: ${r.name} reads ${show(r.path)}, which the program does not export`);
    }
    const names = new Set(reads.map((r) => r.name));
    for (const ref of new Set(stackRefs(w.text))) if (!names.has(ref)) p.push(`${w.file}: steps.stack.outputs.${ref} is read by no line of the stack step`);
    for (const s of w.steps) {
      if (s.id !== "stack" && /pulumi\s+stack\s+output|stack\.json/.test(s.run ?? "")) p.push(`${w.file}: step "${s.name}" reads the stack's outputs outside the stack step`);
    }
  }
  return p;
}

/** A run block's commands: continuation lines joined, each line cut into shell words at ;, &&, || and |. */
function commands(run: string): string[][] {
  const out: string[][] = [];
  for (const line of run.replace(/\\\n/g, " ").split("\n")) {
    let words: string[] = [];
    for (const m of line.matchAll(/"([^"]*)"|'([^']*)'|(;|&&|\|\||\|)|([^\s"';|&]+)/g)) {
      if (m[3] !== undefined) {
        out.push(words);
        words = [];
      } else words.push(m[1] ?? m[2] ?? m[4]);
    }
    out.push(words);
  }
  return out.filter((c) => c.length);
}

/** `$VAR…` (or `${VAR}…`) at the start of a word → VAR. */
const leadingVar = (word: string) => /^\$\{?(\w+)\}?/.exec(word)?.[1];

/** What a shell variable of a step holds, when it is a stack output: the read behind it. */
function readOf(w: Workflow, reads: Read[], step: Step, variable: string | undefined): Read | undefined {
  const value = variable === undefined ? undefined : (step.env?.[variable] ?? w.env[variable]);
  const name = value === undefined ? undefined : stackRefs(value)[0];
  return reads.find((r) => r.name === name);
}

const same = (a: string[] | null | undefined, b: string[]) => !!a && a.length === b.length && a.every((x, i) => x === b[i]);
const COMMIT = /^\$\{?GITHUB_SHA\}?$|^\$\{\{\s*github\.sha\s*\}\}$/;

/**
 * The images: each of the program's repositories gets the image built from
 * images/<repository>/Dockerfile, tagged with the commit, and pushed; nothing else is pushed;
 * every image a step deploys is one of them, and the worker Deployment gets the worker's. (Which
 * image each task definition family gets is registrationProblems': the API's for most, the
 * worker's for the slide verifier.)
 */
export function imageProblems(w: Workflow, outputs: Record<string, any>, ecrUrls: string[]): string[] {
  const p: string[] = [];
  const reads = stackReads(w);
  const registries: Record<string, string> = outputs.registries ?? {};
  const built = new Map<string, string>(); // image directory → repository URL
  const pushed = new Set<string>();
  for (const step of w.steps) {
    for (const c of commands(step.run ?? "")) {
      if (c[0] !== "docker" || (c[1] !== "build" && c[1] !== "push")) continue;
      const ref = c[1] === "push" ? c[2] : c[c.indexOf("-t") + 1];
      const [, tag] = (ref ?? "").split(":");
      const read = readOf(w, reads, step, leadingVar(ref ?? ""));
      const url = read?.path ? lookup(outputs, read.path) : undefined;
      if (!read || !url) {
        p.push(`${w.file}: docker ${c[1]} ${ref}: not a repository from the stack's outputs`);
        continue;
      }
      if (!COMMIT.test(tag ?? "")) p.push(`${w.file}: docker ${c[1]} ${ref}: the tag is not the commit`);
      if (c[1] === "push") {
        pushed.add(url);
        continue;
      }
      const image = /^images\/([\w-]+)\/Dockerfile$/.exec(c[c.indexOf("-f") + 1] ?? "")?.[1];
      if (!image) {
        p.push(`${w.file}: docker build ${ref}: not from images/<name>/Dockerfile`);
        continue;
      }
      if (!same(read.path, ["registries", image])) p.push(`${w.file}: the image of images/${image} goes to ${show(read.path!)}, not ${show(["registries", image])}`);
      built.set(image, url);
    }
  }
  const sorted = (xs: Iterable<string>) => [...xs].sort().join(", ");
  if (sorted(built.keys()) !== sorted(Object.keys(registries))) p.push(`${w.file}: builds ${sorted(built.keys())}; the program's repositories are ${sorted(Object.keys(registries))}`);
  if (sorted(pushed) !== sorted(ecrUrls)) p.push(`${w.file}: pushes to ${sorted(pushed)}; the program's ECR repositories are ${sorted(ecrUrls)}`);
  for (const url of pushed) if (![...built.values()].includes(url)) p.push(`${w.file}: pushes to ${url}, which it builds no image for`);
  // What each step deploys: `${{ steps.stack.outputs.X }}:${{ github.sha }}`.
  for (const step of w.steps) {
    for (const value of Object.values(step.env ?? {})) {
      const m = /^\$\{\{\s*steps\.stack\.outputs\.(\w+)\s*\}\}:(.*)$/.exec(value);
      if (!m) continue;
      const read = reads.find((r) => r.name === m[1]);
      const url = read?.path ? lookup(outputs, read.path) : undefined;
      if (!COMMIT.test(m[2])) p.push(`${w.file}: step "${step.name}" deploys ${value}: the tag is not the commit`);
      if (!url || !pushed.has(url)) p.push(`${w.file}: step "${step.name}" deploys ${value}, which this workflow does not push`);
      if (/kubectl\b[^\n]*\bset\s+image/.test(step.run ?? "") && url !== registries["mira-wsi-worker"]) {
        p.push(`${w.file}: step "${step.name}" deploys ${value}, not the mira-wsi-worker image`);
      }
    }
  }
  return p;
}

/** The browser app goes to the program's frontend bucket, and to no other. */
export function bucketProblems(w: Workflow, outputs: Record<string, any>): string[] {
  const p: string[] = [];
  const reads = stackReads(w);
  let synced = false;
  for (const step of w.steps) {
    for (const c of commands(step.run ?? "")) {
      for (const word of c.filter((x) => x.startsWith("s3://"))) {
        const read = readOf(w, reads, step, leadingVar(word.slice("s3://".length)));
        if (!read?.path || !same(read.path, ["buckets", "frontend"])) {
          p.push(`${w.file}: step "${step.name}" writes to ${word}, which is ${read?.path ? show(read.path) : "no stack output"}, not .buckets.frontend`);
        } else if (isEmpty(lookup(outputs, read.path))) p.push(`${w.file}: .buckets.frontend is not exported`);
        if (c[0] === "aws" && c[1] === "s3" && c[2] === "sync") synced = true;
      }
    }
  }
  if (!synced) p.push(`${w.file}: syncs nothing to the frontend bucket`);
  return p;
}

/**
 * The roles and the rest: every role a workflow assumes is a variable (no key, no literal ARN);
 * every variable and secret a workflow uses has its row in the runbook's table; a role's row
 * names the stack output that gives it, and the program exports it.
 */
export function variableProblems(workflows: Workflow[], book: string, outputs: Record<string, any>): string[] {
  const p: string[] = [];
  const rows = new Map<string, string>();
  for (const line of book.split("\n")) {
    const m = /^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|/.exec(line);
    if (m) rows.set(m[1], line);
  }
  for (const w of workflows) {
    const roles = new Set<string>();
    for (const s of w.steps) {
      if (!s.uses?.startsWith("aws-actions/configure-aws-credentials@")) continue;
      for (const k of ["aws-access-key-id", "aws-secret-access-key"]) if (s.with?.[k]) p.push(`${w.file}: ${k}: long-lived keys`);
      const role = String(s.with?.["role-to-assume"] ?? "");
      const named = [...role.matchAll(/\bvars\.(\w+)/g)].map((m) => m[1]);
      if (!named.length || /arn:aws/.test(role)) p.push(`${w.file}: role-to-assume ${role || "(none)"} is not a variable`);
      for (const n of named) roles.add(n);
    }
    for (const m of w.text.matchAll(/\b(vars|secrets)\.(\w+)/g)) {
      const [, kind, name] = m;
      if (kind === "secrets" && name === "GITHUB_TOKEN") continue;
      if (!rows.has(name)) p.push(`${w.file}: ${kind}.${name} has no row in docs/runbooks/deploy.md`);
    }
    for (const name of roles) {
      const row = rows.get(name);
      if (!row) continue;
      const paths = [...row.matchAll(/`(\.[^`]+)`/g)].map((m) => jqPath(m[1])).filter((x): x is string[] => !!x);
      if (!paths.length) p.push(`docs/runbooks/deploy.md: ${name}'s row names no stack output`);
      for (const path of paths) if (isEmpty(lookup(outputs, path))) p.push(`docs/runbooks/deploy.md: ${name} is ${show(path)}, which the program does not export`);
    }
  }
  return [...new Set(p)];
}

/**
 * The stack outputs the runbook names: what its shell reads with `jq` (the dotted path an
 * expression starts with: `.database.loginSecretArns[$l]` reads `.database.loginSecretArns`),
 * and the outputs its text names in backquotes (`.deploy.region`, `database.masterSecretArn`;
 * a name whose first part is no top-level output, or that ends like a file, is not one). Each
 * must be something the program exports.
 */
export function runbookOutputProblems(book: string, outputs: Record<string, any>): string[] {
  const names = new Set<string>();
  for (const m of book.matchAll(/\bjq\s+(?:-\w+\s+|--arg\s+\S+\s+\S+\s+)*'(\.[A-Za-z_][^']*)'/g)) names.add(/^(\.[A-Za-z_]\w*)+/.exec(m[1])![0]);
  for (const m of book.matchAll(/`(\.?)([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)`/g)) {
    const first = m[2].split(".")[0];
    if (!(first in outputs) || /\.(ya?ml|md|ts|sh|json)$/.test(m[2])) continue;
    names.add(`.${m[2]}`);
  }
  const p: string[] = [];
  for (const name of names) {
    const path = name.slice(1).split(".");
    if (isEmpty(lookup(outputs, path))) p.push(`docs/runbooks/deploy.md: names ${name}, which the program does not export`);
  }
  return p;
}

const ofType = (rs: Recorded[], type: string) => rs.filter((r) => r.type === type);
const list = <T>(x: T | T[] | undefined): T[] => (x === undefined ? [] : Array.isArray(x) ? x : [x]);

/** The repository (a key of `.registries`) whose image a URL or image reference is. */
const repositoryOf = (registries: Record<string, string>, image: string | undefined) =>
  image === undefined ? undefined : Object.keys(registries).find((name) => image === registries[name] || image.startsWith(`${registries[name]}:`));

/**
 * The task definitions follow the deploys: every family of the program whose container `mira`
 * runs one of the program's images (the API's: the four services', `migrate`, `audit-verify`;
 * the worker's: the slide verifier's) gets a new revision with that same repository's image,
 * from a step that runs register-revision.sh FAMILY IMAGE. Its FAMILY is either a stack output
 * that names the family, or a shell variable, taken from the services the step rolls (the family
 * each one runs); its IMAGE a stack output's repository. The deploy role (`deployRoleArn`) may
 * pass the roles of every family it registers (RegisterTaskDefinition passes the task role and
 * the execution role).
 */
export function registrationProblems(w: Workflow, outputs: Record<string, any>, rs: Recorded[], deployRoleArn: string): string[] {
  const p: string[] = [];
  const reads = stackReads(w);
  const registries: Record<string, string> = outputs.registries ?? {};
  const taskDefs = ofType(rs, "aws:ecs/taskDefinition:TaskDefinition");
  const services = ofType(rs, "aws:ecs/service:Service");
  const families = new Map(taskDefs.map((td) => [String(td.inputs.family), td]));
  /** The repository a family's `mira` container runs the image of (undefined: none of the program's). */
  const runs = (family: string) => {
    const mira = JSON.parse(families.get(family)!.inputs.containerDefinitions).find((c: any) => c.name === "mira");
    return mira ? repositoryOf(registries, String(mira.image)) : undefined;
  };
  const registered = new Set<string>();
  for (const step of w.steps) {
    for (const c of commands(step.run ?? "")) {
      const at = c.findIndex((word) => word.endsWith("register-revision.sh"));
      if (at < 0) continue;
      const imageRead = readOf(w, reads, step, leadingVar(c[at + 2] ?? ""));
      const image = repositoryOf(registries, imageRead?.path ? lookup(outputs, imageRead.path) : undefined);
      const stepFamilies: string[] = [];
      const variable = leadingVar(c[at + 1] ?? "");
      const read = readOf(w, reads, step, variable);
      if (read) {
        const family = read.path ? lookup(outputs, read.path) : undefined;
        if (families.has(family)) stepFamilies.push(family);
        else p.push(`${w.file}: step "${step.name}" registers ${read.expr} (${family}), no task definition family of the program`);
      } else {
        // The families the step's services run.
        const names = Object.values(step.env ?? {}).flatMap((v) => stackRefs(String(v)));
        const rolled = names.map((n) => reads.find((r) => r.name === n)).map((r) => (r?.path ? lookup(outputs, r.path) : undefined));
        const own = services.filter((svc) => rolled.includes(svc.inputs.name));
        if (own.length === 0) p.push(`${w.file}: step "${step.name}" registers $${variable}, neither a stack output nor a service's family`);
        for (const svc of own) {
          const td = taskDefs.find((t) => t.state.arn === svc.inputs.taskDefinition);
          if (td) stepFamilies.push(String(td.inputs.family));
        }
      }
      for (const family of stepFamilies) {
        registered.add(family);
        const own = runs(family);
        if (own && image !== own) p.push(`${w.file}: step "${step.name}" registers ${family} with ${image ? `the ${image} image` : c[at + 2]}, not the ${own} image it runs`);
      }
    }
  }
  for (const family of families.keys()) {
    const own = runs(family);
    if (own && !registered.has(family)) p.push(`${w.file}: ${family} runs the ${own} image, and no step registers a revision of it with the new one`);
  }
  const role = ofType(rs, "aws:iam/role:Role").find((r) => r.state.arn === deployRoleArn);
  if (!role) return [...p, `${deployRoleArn} is no role of the program`];
  const statements: any[] = ofType(rs, "aws:iam/rolePolicy:RolePolicy")
    .filter((x) => x.inputs.role === `${role.name}-id`)
    .flatMap((pol) => JSON.parse(pol.inputs.policy).Statement);
  const passes = (arn: string) =>
    statements.some((st) => st.Effect === "Allow" && list(st.Action).includes("iam:PassRole") && list(st.Resource).some((r: string) => r === "*" || r === arn));
  for (const family of [...registered].sort()) {
    const td = families.get(family)!;
    for (const arn of [td.inputs.taskRoleArn, td.inputs.executionRoleArn]) {
      if (arn && !passes(arn)) p.push(`${w.file}: the deploy role cannot pass ${arn}, so it cannot register ${family}`);
    }
  }
  return p;
}

/**
 * Where `aws ecs VERB…` stands in a command, wherever it starts (`do aws ecs wait …`,
 * `now=$(aws ecs describe-services …`): the index of the word after the verb, or -1.
 */
function ecsCall(c: string[], ...verb: string[]): number {
  for (let i = 0; i + 2 + verb.length <= c.length; i++) {
    if ((c[i] === "aws" || c[i].endsWith("$(aws")) && c[i + 1] === "ecs" && verb.every((v, j) => c[i + 2 + j] === v)) return i + 2 + verb.length;
  }
  return -1;
}

/**
 * The services follow the deploys: every ECS service of the program (the API's four and the
 * slide verifier) is named, by a stack output, in the `env:` of a step that, as the API's
 * services' step does, registers a revision (register-revision.sh), moves the service onto it
 * (`aws ecs update-service --cluster C --task-definition`, C the stack output of the service's
 * cluster), waits for it (`aws ecs wait services-stable`), and then checks what it runs
 * (`aws ecs describe-services` after the wait: a circuit breaker's rollback is stable too). The
 * step comes after the migrations' (`aws ecs run-task`): a service never runs a schema it does
 * not have.
 */
export function rolloutProblems(w: Workflow, outputs: Record<string, any>, rs: Recorded[]): string[] {
  const p: string[] = [];
  const reads = stackReads(w);
  const clusters = ofType(rs, "aws:ecs/cluster:Cluster");
  const valueOf = (name: string | undefined) => {
    const r = reads.find((x) => x.name === name);
    return r?.path ? lookup(outputs, r.path) : undefined;
  };
  const migrations = w.steps.findIndex((s) => commands(s.run ?? "").some((c) => ecsCall(c, "run-task") >= 0));
  for (const svc of ofType(rs, "aws:ecs/service:Service")) {
    const name = String(svc.inputs.name);
    const at = w.steps.findIndex((s) => Object.values(s.env ?? {}).some((v) => stackRefs(String(v)).some((n) => valueOf(n) === name)));
    if (at < 0) {
      p.push(`${w.file}: no step rolls ${name} (names it from the stack's outputs)`);
      continue;
    }
    const step = w.steps[at];
    const cs = commands(step.run ?? "");
    const ecs = (...verb: string[]) => cs.findIndex((c) => ecsCall(c, ...verb) >= 0);
    const where = `${w.file}: step "${step.name}" rolls ${name}`;
    if (!cs.some((c) => c.some((word) => word.endsWith("register-revision.sh")))) p.push(`${where}, and registers no revision`);
    const update = ecs("update-service");
    if (update < 0 || !cs[update].includes("--task-definition")) p.push(`${where}, and does not move it to a revision (aws ecs update-service --task-definition)`);
    else {
      const variable = leadingVar(cs[update][cs[update].indexOf("--cluster") + 1] ?? "");
      const cluster = valueOf(stackRefs(String((variable && step.env?.[variable]) ?? ""))[0]);
      const own = clusters.find((x) => x.state.arn === svc.inputs.cluster)?.state.name;
      if (cluster !== own) p.push(`${where}, in the cluster ${cluster ?? "(no stack output)"}, not its own ${own}`);
    }
    const wait = ecs("wait", "services-stable");
    if (wait < 0) p.push(`${where}, and does not wait for it (aws ecs wait services-stable)`);
    else if (!cs.slice(wait + 1).some((c) => ecsCall(c, "describe-services") >= 0)) {
      p.push(`${where}, and does not check after the wait that it runs the new revision (aws ecs describe-services)`);
    }
    if (migrations < 0 || at < migrations) p.push(`${where} before the migrations run`);
  }
  return p;
}

/** GitHub's hosted runners' labels: their addresses are GitHub's, many and changing. */
const HOSTED = /^(ubuntu|windows|macos)-/;

/** Whether a job's steps talk to the cluster's API: kubectl, `aws eks update-kubeconfig`, or Pulumi (the program's Kubernetes resources). */
const reachesCluster = (job: Job) =>
  job.steps.some((st) => /\bkubectl\b|\baws\s+eks\s+update-kubeconfig\b|\bpulumi\s+(up|preview|refresh|destroy)\b/.test(st.run ?? ""));

/**
 * The deploys reach EKS (ADR 0035): every job that talks to the cluster's API runs on runners a
 * repository variable names (`runs-on: ${{ fromJSON(vars.X) }}` or `${{ vars.X }}`), never on a
 * literal label, and never on GitHub's hosted runners; the cluster has its private endpoint on,
 * and one of its security groups admits the program's deploy-runner group on 443, as the VPC
 * endpoints' group does (the runners' AWS calls go there); its public endpoint, if on, admits
 * no `0.0.0.0/0`.
 */
export function runnerProblems(workflows: Workflow[], rs: Recorded[]): string[] {
  const p: string[] = [];
  for (const w of workflows) {
    for (const job of w.jobs.filter(reachesCluster)) {
      const labels = list(job.runsOn as any).map(String);
      const variable = labels.length === 1 && /^\$\{\{\s*(fromJSON\(\s*vars\.\w+\s*\)|vars\.\w+)\s*\}\}$/.test(labels[0]);
      if (labels.some((l) => HOSTED.test(l))) p.push(`${w.file}: job ${job.name} reaches the EKS API from GitHub's hosted runner ${labels.join(",")}`);
      else if (!variable) p.push(`${w.file}: job ${job.name} runs on ${labels.join(",") || "nothing"}, not the deploy runners a variable names`);
    }
  }
  const cluster = ofType(rs, "aws:eks/cluster:Cluster")[0];
  if (!cluster) return [...p, "no EKS cluster"];
  const vpc = cluster.inputs.vpcConfig ?? {};
  const runners = ofType(rs, "aws:ec2/securityGroup:SecurityGroup").find((g) => g.name === "deploy-runners-sg");
  if (!runners) return [...p, "no security group for the deploy runners"];
  const ingress = ofType(rs, "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule");
  const admits = (group: string) =>
    ingress.some((r) => r.inputs.securityGroupId === group && r.inputs.referencedSecurityGroupId === `${runners.name}-id` && r.inputs.fromPort <= 443 && 443 <= r.inputs.toPort);
  if (vpc.endpointPrivateAccess !== true) p.push("the cluster's private endpoint is off");
  if (!(vpc.securityGroupIds ?? []).some(admits)) p.push("no security group of the cluster admits the deploy runners on 443");
  if (!admits("endpoints-sg-id")) p.push("the VPC endpoints do not admit the deploy runners on 443");
  if (vpc.endpointPublicAccess && (vpc.publicAccessCidrs ?? ["0.0.0.0/0"]).includes("0.0.0.0/0")) p.push("the cluster's public endpoint admits 0.0.0.0/0");
  return p;
}

/** `25m`, `1h30m`, `600s`, `600` → seconds. */
export function duration(x: string): number {
  if (/^\d+$/.test(x)) return Number(x);
  let total = 0;
  for (const m of x.matchAll(/(\d+)(h|m|s)/g)) total += Number(m[1]) * { h: 3600, m: 60, s: 1 }[m[2] as "h" | "m" | "s"];
  return total;
}

/**
 * The worker's rollout can finish before anything gives up: the Deployment's progress deadline
 * allows one pod's drain (its grace period) and a new pod's start (`startSeconds`), since a
 * rollout makes no progress while an old pod drains; `kubectl rollout status` waits for that
 * for every replica the ScaledObject may run (its --timeout, a literal or a stack output); and
 * the job's `timeout-minutes` allows that wait and `otherSeconds` for the steps before it.
 */
export function workerRolloutProblems(w: Workflow, outputs: Record<string, any>, rs: Recorded[], startSeconds: number, otherSeconds: number): string[] {
  const p: string[] = [];
  const dep = ofType(rs, "kubernetes:apps/v1:Deployment")[0]?.inputs;
  const so = ofType(rs, "kubernetes:keda.sh/v1alpha1:ScaledObject")[0]?.inputs;
  if (!dep || !so) return ["no worker Deployment or ScaledObject"];
  const grace = Number(dep.spec.template.spec.terminationGracePeriodSeconds ?? 30);
  const deadline = Number(dep.spec.progressDeadlineSeconds ?? 600);
  const replicas = Number(so.spec.maxReplicaCount);
  if (deadline < grace + startSeconds) p.push(`progressDeadlineSeconds ${deadline} is under a drain and a start (${grace} + ${startSeconds} s): the rollout is declared failed while a pod drains`);
  const need = replicas * (grace + startSeconds);
  const reads = stackReads(w);
  for (const job of w.jobs) {
    for (const step of job.steps) {
      for (const c of commands(step.run ?? "")) {
        const at = c.findIndex((word, i) => word === "rollout" && c[i + 1] === "status");
        if (c[0] !== "kubectl" || at < 0) continue;
        const flag = c.find((word) => word.startsWith("--timeout"));
        let seconds = 0;
        let shown = "no --timeout (kubectl waits for ever)";
        if (flag) {
          // `--timeout=25m`, `--timeout 25m`, or `--timeout="${X}s"` (which the word splitter
          // cuts after the `=`).
          const inline = flag.includes("=") ? flag.slice(flag.indexOf("=") + 1) : "";
          const value = inline !== "" ? inline : c[c.indexOf(flag) + 1];
          const read = readOf(w, reads, step, leadingVar(value ?? ""));
          const raw = read?.path ? lookup(outputs, read.path) : undefined;
          seconds = read ? duration(`${raw}${value!.replace(/^\$\{?\w+\}?/, "")}`) : duration(value ?? "");
          shown = read ? `${show(read.path!)} (${seconds} s)` : `${value} (${seconds} s)`;
        }
        if (flag && seconds < need) p.push(`${w.file}: step "${step.name}" waits ${shown} for the worker, under ${replicas} × (${grace} + ${startSeconds}) = ${need} s`);
        const budget = Number(job.timeoutMinutes ?? 360) * 60;
        if (budget < Math.max(seconds, need) + otherSeconds) p.push(`${w.file}: job ${job.name}'s timeout-minutes ${job.timeoutMinutes} is under the worker's rollout (${Math.max(seconds, need)} s) and the steps before it (${otherSeconds} s)`);
      }
    }
  }
  return p;
}
