// Policy as code (ADR 0037): checkov (tools/infra-requirements.txt) on Mira's Dockerfiles and on
// the Kubernetes objects the program applies, written out as YAML; every finding it reports is
// either fixed or listed with its reason in pulumi/checkov-skips.txt, and every listed skip still
// hides a finding. Then checkov on a broken copy: a Dockerfile that runs as root.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { describe, it } from "node:test";
import { promisify } from "node:util";
import YAML from "yaml";
import { run } from "./harness";
import { kubernetesObjects } from "./operations";

const ROOT = path.resolve(__dirname, "../../..");
const SKIPS = path.join(ROOT, "pulumi/checkov-skips.txt");
const DOCKERFILES = ["images/mira-api/Dockerfile", "images/mira-wsi-worker/Dockerfile"];

type Skip = { check: string; where: string; reason: string };
type Finding = { check: string; resource: string; file: string };

function checkov(): string {
  const python = process.env.MIRA_INFRA_PYTHON;
  if (!python) throw new Error("MIRA_INFRA_PYTHON is not set: it must name the Python of the infrastructure checks' virtualenv (tools/infra-requirements.txt)");
  const bin = path.join(path.dirname(python), "checkov");
  if (!fs.existsSync(bin)) throw new Error(`${bin} is missing: run scripts/bootstrap (tools/infra-requirements.txt names checkov)`);
  return bin;
}

export function readSkips(text: string): Skip[] {
  return text
    .split("\n")
    .filter((l) => l.trim() && !l.startsWith("#"))
    .map((l) => {
      const m = /^(CKV2?_[A-Z0-9]+_\d+)\s+(\S+)\s+(.+)$/.exec(l.trim());
      if (!m) throw new Error(`checkov-skips.txt: "${l}" is not "CHECK WHERE REASON"`);
      return { check: m[1], where: m[2], reason: m[3] };
    });
}

const covers = (s: Skip, f: Finding) => s.check === f.check && (s.where === "*" || s.where === f.file || f.resource === s.where || f.resource.startsWith(`${s.where}.`));

/** checkov's failed checks on `targets` (files or directories), every framework's report. */
async function failed(frameworks: string[], targets: string[], cwd: string): Promise<Finding[]> {
  const args = ["--skip-download", "--soft-fail", "--quiet", "-o", "json", "--framework", ...frameworks];
  for (const t of targets) args.push(fs.statSync(path.resolve(cwd, t)).isDirectory() ? "-d" : "-f", t);
  const { stdout } = await promisify(execFile)(checkov(), args, { cwd, maxBuffer: 64 << 20, env: { ...process.env, LOG_LEVEL: "ERROR" } });
  const text = stdout.trim();
  // Nothing to report prints an empty list or a summary without results.
  if (!text.startsWith("{") && !text.startsWith("[")) return [];
  const reports = [JSON.parse(text)].flat();
  return reports.flatMap((r: any) =>
    (r.results?.failed_checks ?? []).map((c: any) => ({ check: c.check_id, resource: c.resource, file: String(c.file_path).replace(/^\//, "") })),
  );
}

/** The findings no skip covers, and the skips that cover no finding. */
export function policyProblems(findings: Finding[], skips: Skip[]): string[] {
  const p: string[] = [];
  for (const f of findings) if (!skips.some((s) => covers(s, f))) p.push(`${f.check} on ${f.resource}`);
  for (const s of skips) if (!findings.some((f) => covers(s, f))) p.push(`skip ${s.check} ${s.where}: hides nothing`);
  return p;
}

describe("checkov", () => {
  it("passes on the Dockerfiles and the Kubernetes objects with the listed skips, and fails on a Dockerfile that runs as root", async () => {
    const skips = readSkips(fs.readFileSync(SKIPS, "utf8"));
    assert.ok(skips.every((s) => s.reason.length > 20), "every skip gives its reason");
    const { resources } = await run();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mira-checkov-"));
    try {
      const k8s = path.join(dir, "k8s");
      fs.mkdirSync(k8s);
      const objects = kubernetesObjects(resources);
      assert.ok(objects.some((o) => o.kind === "Deployment") && objects.some((o) => o.kind === "DaemonSet"));
      objects.forEach((o, i) => fs.writeFileSync(path.join(k8s, `${String(i).padStart(2, "0")}-${o.kind}-${o.metadata?.name}.yaml`), YAML.stringify(o)));
      // Broken: the API's Dockerfile without its USER line (it runs as root).
      const rootDir = path.join(dir, "root");
      fs.mkdirSync(rootDir);
      const api = fs.readFileSync(path.join(ROOT, "images/mira-api/Dockerfile"), "utf8");
      assert.match(api, /^USER 10001:10001$/m);
      fs.writeFileSync(path.join(rootDir, "Dockerfile"), api.replace(/^USER .*\n/m, ""));

      const [ours, k8sFound, root] = await Promise.all([
        failed(["dockerfile"], DOCKERFILES, ROOT),
        failed(["kubernetes"], [k8s], k8s),
        failed(["dockerfile"], ["Dockerfile"], rootDir),
      ]);
      assert.deepEqual(policyProblems([...ours, ...k8sFound], skips), []);
      // The Dockerfile that runs as root: the user check fails, beside the API's listed findings.
      const rootFound = root.map((f) => f.check).sort();
      assert.deepEqual(rootFound, ["CKV_DOCKER_2", "CKV_DOCKER_3", "CKV_DOCKER_4", "CKV_DOCKER_9"]);
      const asApi = root.map((f) => ({ ...f, file: "images/mira-api/Dockerfile" }));
      assert.deepEqual(policyProblems(asApi, skips.filter((s) => s.where === "images/mira-api/Dockerfile")), ["CKV_DOCKER_3 on Dockerfile."]);
      // Broken: a skip that hides nothing.
      assert.deepEqual(policyProblems(ours, [...skips.filter((s) => s.where.startsWith("images/")), { check: "CKV_DOCKER_7", where: "*", reason: "x" }]), [
        "skip CKV_DOCKER_7 *: hides nothing",
      ]);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
