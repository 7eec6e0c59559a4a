// The resource table in pulumi/README.md, generated from what the program creates under the
// mocks: one row per part and resource type, with the logical names.

import type { Recorded } from "./harness";

/** Resources without tags (policies, attachments, …) go with the part their service belongs to. */
const BY_SERVICE: Record<string, string> = {
  appautoscaling: "compute",
  cloudfront: "edge",
  cloudwatch: "observability",
  cognito: "identity",
  ec2: "network",
  ecr: "registry",
  eks: "fleet",
  iam: "iam",
  kms: "keys",
  lb: "compute",
  s3: "storage",
  scheduler: "compute",
  sns: "messaging",
  sqs: "messaging",
  vpc: "network",
};

const partOf = (r: Recorded): string => {
  if (r.type.startsWith("kubernetes:") || r.type === "pulumi:providers:kubernetes") return "kubernetes";
  const service = r.type.split(":")[1].split("/")[0];
  return r.inputs.tags?.part ?? BY_SERVICE[service] ?? service;
};

export function resourceTable(rs: Recorded[]): string {
  const rows = new Map<string, { part: string; type: string; names: string[] }>();
  for (const r of rs) {
    const part = partOf(r);
    const key = `${part}\u0000${r.type}`;
    const row = rows.get(key) ?? { part, type: r.type, names: [] };
    row.names.push(r.name);
    rows.set(key, row);
  }
  const sorted = [...rows.values()].sort((a, b) => a.part.localeCompare(b.part) || a.type.localeCompare(b.type));
  const lines = ["| part | type | n | logical names |", "| --- | --- | --- | --- |"];
  for (const r of sorted) {
    const names = r.names.sort();
    const shown = names.length > 6 ? `${names.slice(0, 6).join(", ")}, …` : names.join(", ");
    lines.push(`| ${r.part} | \`${r.type}\` | ${names.length} | ${shown} |`);
  }
  lines.push(`| **all** | | **${rs.length}** | |`);
  return lines.join("\n");
}
