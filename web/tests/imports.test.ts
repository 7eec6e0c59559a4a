// The app's modules are layered: none imports, through any chain of imports (type-only ones
// included), a module that imports it. The checker (imports.ts) is shown to find a cycle in a
// small graph first, then finds none in the sources.

import { describe, expect, it } from "vitest";
import { cycles, graphOf, shown, sourcesUnder } from "./imports";

/** web/, from this file. */
const ROOT = decodeURIComponent(new URL("..", import.meta.url).pathname).replace(/\/$/, "");

describe("the import graph", () => {
  it("is read from the import statements, and its cycles are found", () => {
    const g = graphOf(
      new Map([
        ["src/a.tsx", 'import { b } from "./b";\n'],
        ["src/b.ts", 'import type { A } from "./a";\nexport * from "./c";\n'],
        ["src/c.ts", '// import { a } from "./a" is a comment\nexport const c = "import(\\"./a\\")";\n'],
        [
          "tests/d.ts",
          'import { c } from "../src/c";\nimport "../src/styles.css";\nimport { h } from "preact";\n',
        ],
      ]),
    );
    expect(Object.fromEntries(g)).toEqual({
      "src/a.tsx": ["src/b.ts"],
      "src/b.ts": ["src/a.tsx", "src/c.ts"],
      "src/c.ts": [],
      "tests/d.ts": ["src/c.ts"],
    });
    expect(cycles(g)).toEqual([["src/a.tsx", "src/b.ts", "src/a.tsx"]]);
    expect(shown(cycles(g))).toBe("src/a.tsx → src/b.ts → src/a.tsx");
    // Without the type-only import back, it is layered.
    g.set("src/b.ts", ["src/c.ts"]);
    expect(cycles(g)).toEqual([]);

    // A longer one: a re-export, a dynamic import, a folder's index, an import for its effect.
    const longer = graphOf(
      new Map([
        ["x.ts", 'export { y } from "./y";\n'],
        ["y.ts", 'export const z = () => import("./z");\n'],
        ["z/index.ts", 'import "../x";\n'],
      ]),
    );
    expect(cycles(longer)).toEqual([["x.ts", "y.ts", "z/index.ts", "x.ts"]]);
  });

  it("has no cycle among the app's and the tests' sources", () => {
    const g = graphOf(sourcesUnder(ROOT, ["src", "tests"]));
    // The sources were read: the shell imports its pages.
    expect(g.get("src/app.tsx"), [...g.keys()].join(", ")).toContain("src/pages/jobs.tsx");
    const found = cycles(g);
    expect(
      found,
      `import cycles (move what both sides need into a module of its own):\n${shown(found)}`,
    ).toEqual([]);
  });
});
