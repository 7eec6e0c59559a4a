import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { it } from "node:test";
import { resourceTable } from "./graph";
import { run } from "./harness";

const README = path.resolve(__dirname, "../../README.md");
const BEGIN = "<!-- resources:begin (generated: MIRA_UPDATE_README=1 npm test) -->";
const END = "<!-- resources:end -->";

it("README.md's resource table is what the program creates", async () => {
  const { resources } = await run();
  const table = resourceTable(resources);
  const text = fs.readFileSync(README, "utf8");
  const [head, rest] = text.split(BEGIN);
  assert.ok(rest !== undefined && rest.includes(END), `README.md lacks the markers ${BEGIN} … ${END}`);
  const now = rest.slice(0, rest.indexOf(END)).trim();
  if (process.env.MIRA_UPDATE_README === "1" && now !== table) {
    fs.writeFileSync(README, `${head}${BEGIN}\n${table}\n${END}${rest.slice(rest.indexOf(END) + END.length)}`);
    return;
  }
  assert.equal(now, table, "the resource table is stale: run MIRA_UPDATE_README=1 npm test in pulumi/");
});
