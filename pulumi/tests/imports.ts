// The import graph of a project's TypeScript sources, and the cycles in it: a module that,
// through a chain of imports, imports itself. imports.test.ts requires none, so that the modules
// stay layered. The same file is web/tests/imports.ts and pulumi/tests/imports.ts.

import ts from "typescript";

/** A module graph: each module (its path, with `/`), and the modules it imports. */
export type Graph = Map<string, string[]>;

/** The TypeScript sources under the folders `dirs` of `root`, by their path from `root`. */
export function sourcesUnder(root: string, dirs: string[]): Map<string, string> {
  const sources = new Map<string, string>();
  for (const dir of dirs) {
    for (const file of ts.sys.readDirectory(`${root}/${dir}`, [".ts", ".tsx"])) {
      sources.set(file.slice(root.length + 1), ts.sys.readFile(file) ?? "");
    }
  }
  return sources;
}

/**
 * The relative specifiers a source imports, as TypeScript's own pre-processor reads them (so
 * nothing in a comment or a string): `import`, `import type`, `export … from`, `import()`,
 * `require`. A type-only import is an edge like any other: the graph is to be layered.
 */
export function importsOf(text: string): string[] {
  return ts
    .preProcessFile(text, true, true)
    .importedFiles.map((f) => f.fileName)
    .filter((s) => /^\.\.?(\/|$)/.test(s));
}

/** `spec` from the folder `dir`, with `.` and `..` resolved. */
function join(dir: string, spec: string): string {
  const parts: string[] = [];
  for (const p of `${dir}/${spec}`.split("/")) {
    if (p === ".." && parts.length > 0 && parts[parts.length - 1] !== "..") parts.pop();
    else if (p !== "." && p !== "") parts.push(p);
  }
  return parts.join("/");
}

/**
 * The graph of `sources` (path → text): an edge for each relative import that names one of them,
 * with or without its extension, or a folder's index. Other files (JSON, CSS) are no modules here.
 */
export function graphOf(sources: Map<string, string>): Graph {
  const g: Graph = new Map();
  for (const [file, text] of sources) {
    const dir = file.includes("/") ? file.slice(0, file.lastIndexOf("/")) : ".";
    const to = importsOf(text).flatMap((spec) => {
      const p = join(dir, spec);
      const bare = p.replace(/\.jsx?$/, "");
      const named = [p, `${bare}.ts`, `${bare}.tsx`, `${p}/index.ts`, `${p}/index.tsx`];
      const found = named.find((c) => sources.has(c));
      return found === undefined ? [] : [found];
    });
    g.set(file, [...new Set(to)]);
  }
  return g;
}

/**
 * The import cycles of `g`, each as the modules around it, the first repeated at the end: one
 * for each import that leads back into the chain being followed, so at least one among any
 * modules that import each other. None in a layered graph.
 */
export function cycles(g: Graph): string[][] {
  const found: string[][] = [];
  const done = new Set<string>();
  const chain: string[] = [];
  const visit = (m: string) => {
    const at = chain.indexOf(m);
    if (at >= 0) {
      found.push([...chain.slice(at), m]);
      return;
    }
    if (done.has(m)) return;
    chain.push(m);
    for (const n of g.get(m) ?? []) visit(n);
    chain.pop();
    done.add(m);
  };
  for (const m of [...g.keys()].sort()) visit(m);
  return found;
}

/** Cycles as text, one a line: `a.ts → b.ts → a.ts`. */
export const shown = (cs: string[][]): string => cs.map((c) => c.join(" → ")).join("\n");
