// The app's API types, generated from the gateway's golden OpenAPI document
// (gateway/openapi.json, exactly what `GET /api/openapi.json` serves) with openapi-typescript.
//
//   node scripts/gen-api.mjs           writes src/api.gen.ts   (npm run gen:api)
//   node scripts/gen-api.mjs --check   regenerates into a temporary file and fails when it
//                                      differs from src/api.gen.ts (npm run check:api)
//
// The job form reads the kinds and their parameters' rules from the document itself at build
// time (src/jobkinds.ts imports it), so only the types are generated here.

import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import openapiTS, { astToString } from "openapi-typescript";

const DOCUMENT = new URL("../../gateway/openapi.json", import.meta.url);
const TARGET = new URL("../src/api.gen.ts", import.meta.url);
const { version } = JSON.parse(
  readFileSync(new URL("../node_modules/openapi-typescript/package.json", import.meta.url), "utf8"),
);

async function generate() {
  const ast = await openapiTS(DOCUMENT, {
    // `{"type": "object"}` (a job's params, a slide's metadata) is any object, not an empty one.
    emptyObjectsUnknown: true,
    // A default does not make a property present: a request may leave it out (NewJob.priority,
    // every parameter), and the API fills it in.
    defaultNonNullable: false,
  });
  return `// Generated from gateway/openapi.json by \`npm run gen:api\` (scripts/gen-api.mjs, openapi-typescript
// ${version}). Do not edit: change the API's description in the gateway, regenerate the golden
// document, then run \`npm run gen:api\`. \`npm run check\` fails when this file is out of date.

${astToString(ast)}`;
}

const text = await generate();
if (process.argv.includes("--check")) {
  const dir = mkdtempSync(join(tmpdir(), "mira-api-gen-"));
  try {
    const fresh = join(dir, "api.gen.ts");
    writeFileSync(fresh, text);
    let current = "";
    try {
      current = readFileSync(TARGET, "utf8");
    } catch {
      // Missing: it differs.
    }
    if (readFileSync(fresh, "utf8") !== current) {
      const a = current.split("\n");
      const b = text.split("\n");
      let line = 0;
      while (line < a.length && line < b.length && a[line] === b[line]) line++;
      console.error(
        `web: src/api.gen.ts is out of date with gateway/openapi.json (first difference at line ${line + 1}); ` +
          "run `npm run gen:api` in web/ and commit the result",
      );
      process.exit(1);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
} else {
  writeFileSync(TARGET, text);
}
