// Validates Kubernetes objects offline with validate.py (beside this file's source): KEDA's
// keda.sh objects against Mira's schema written from KEDA's docs, every other object against the
// Kubernetes schemas kubernetes-validate bundles, in strict mode. Returns the problems found.

import { spawnSync } from "node:child_process";
import * as path from "node:path";

/** tests/k8s in the source tree: tsc puts this file in bin/tests/k8s, and the .py and .json stay. */
export const K8S_DIR = path.resolve(__dirname, "../../../tests/k8s");

/** Each problem reads "Kind/name: path: message"; none means every object is valid. */
export function validateK8s(objects: object[], kubernetesVersion?: string): string[] {
  const python = process.env.MIRA_INFRA_PYTHON;
  if (!python) {
    throw new Error(
      "MIRA_INFRA_PYTHON is not set: it must name the Python of the infrastructure checks' virtualenv " +
        "(tools/infra-requirements.txt; scripts/bootstrap writes it to .mira-test.env)",
    );
  }
  const args = [path.join(K8S_DIR, "validate.py"), "-"];
  if (kubernetesVersion) args.push("--kubernetes-version", kubernetesVersion);
  const run = spawnSync(python, args, { input: JSON.stringify(objects), encoding: "utf8" });
  if (run.error) throw new Error(`MIRA_INFRA_PYTHON=${python} could not be run: ${run.error.message}`);
  if (run.status !== 0) throw new Error(`validate.py failed (exit ${run.status}): ${run.stderr.trim()}`);
  const problems: unknown = JSON.parse(run.stdout);
  if (!Array.isArray(problems) || !problems.every((p) => typeof p === "string")) {
    throw new Error(`validate.py printed something other than a list of problems: ${run.stdout}`);
  }
  return problems;
}
