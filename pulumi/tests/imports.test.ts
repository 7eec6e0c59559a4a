// The program's and the tests' modules are layered: none imports, through any chain of imports
// (type-only ones included), a module that imports it. The checker (imports.ts) is shown to find
// a cycle in a small graph first, then finds none in the sources.

import assert from "node:assert/strict";
import * as path from "node:path";
import { describe, it } from "node:test";
import { cycles, graphOf, shown, sourcesUnder } from "./imports";

/** pulumi/, from bin/tests/ where the compiled test runs. */
const ROOT = path.resolve(__dirname, "../..");

describe("the import graph", () => {
  it("is read from the import statements, and its cycles are found", () => {
    const g = graphOf(
      new Map([
        ["src/a.ts", 'import { b } from "./b";\n'],
        ["src/b.ts", 'import type { A } from "./a";\nexport * from "./c";\n'],
        ["src/c.ts", '// import { a } from "./a" is a comment\nexport const c = "import(\\"./a\\")";\n'],
        ["tests/d.ts", 'import { c } from "../src/c";\nimport data from "../src/data.json";\nimport * as ts from "typescript";\n'],
      ]),
    );
    assert.deepEqual(Object.fromEntries(g), {
      "src/a.ts": ["src/b.ts"],
      "src/b.ts": ["src/a.ts", "src/c.ts"],
      "src/c.ts": [],
      "tests/d.ts": ["src/c.ts"],
    });
    assert.deepEqual(cycles(g), [["src/a.ts", "src/b.ts", "src/a.ts"]]);
    assert.equal(shown(cycles(g)), "src/a.ts → src/b.ts → src/a.ts");
    // Without the type-only import back, it is layered.
    g.set("src/b.ts", ["src/c.ts"]);
    assert.deepEqual(cycles(g), []);

    // A longer one: a re-export, a dynamic import, a folder's index, an import for its effect.
    const longer = graphOf(
      new Map([
        ["x.ts", 'export { y } from "./y";\n'],
        ["y.ts", 'export const z = () => import("./z");\n'],
        ["z/index.ts", 'import "../x";\n'],
      ]),
    );
    assert.deepEqual(cycles(longer), [["x.ts", "y.ts", "z/index.ts", "x.ts"]]);
  });

  it("has no cycle among the program's and the tests' sources", () => {
    const g = graphOf(sourcesUnder(ROOT, ["src", "tests"]));
    // The sources were read: the program imports its parts.
    assert.ok(g.get("src/program.ts")?.includes("src/compute.ts"), `src/program.ts not read: ${[...g.keys()].join(", ")}`);
    const found = cycles(g);
    assert.equal(found.length, 0, `import cycles (move what both sides need into a module of its own):\n${shown(found)}`);
  });
});
