#!/usr/bin/env python3
"""The longest Rust functions in Mira's sources, by lines from `fn` to its closing brace.

    python3 tools/longest_fns.py [N]     # the N longest (default 10), tests excluded

Counts braces outside strings, chars and comments, which is enough for rustfmt'd code. Test
modules (`#[cfg(test)]`, `tests/` directories, `tests.rs`) and `target/` are skipped: the figure
is about the code that runs.
"""

import os
import re
import sys

FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"C\"\s+)?fn\s+(\w+)")


def strip(line, state):
    """The line without strings, chars and comments; `state` carries a block comment over."""
    out, i, n = [], 0, len(line)
    while i < n:
        if state["block"]:
            j = line.find("*/", i)
            if j < 0:
                return "".join(out)
            state["block"] = False
            i = j + 2
            continue
        c = line[i]
        if line.startswith("//", i):
            break
        if line.startswith("/*", i):
            state["block"] = True
            i += 2
            continue
        if c == '"':
            j = i + 1
            while j < n and line[j] != '"':
                j += 2 if line[j] == "\\" else 1
            i = j + 1
            continue
        if c == "'" and re.match(r"'(\\.|[^\\'])'", line[i:]):
            i += len(re.match(r"'(\\.|[^\\'])'", line[i:]).group(0))
            continue
        out.append(c)
        i += 1
    return "".join(out)


def functions(path):
    lines = open(path, encoding="utf-8").read().split("\n")
    state = {"block": False}
    clean = [strip(l, state) for l in lines]
    # Test modules (`#[cfg(test)] mod …`) are skipped, wherever they stand.
    skip = set()
    for i, l in enumerate(lines):
        if l.strip() == "#[cfg(test)]" and i + 1 < len(lines) and re.match(r"\s*mod\s+\w+\s*\{", lines[i + 1]):
            depth = 0
            for j in range(i + 1, len(lines)):
                depth += clean[j].count("{") - clean[j].count("}")
                skip.add(j)
                if depth == 0:
                    break
    end = len(lines)
    for i in range(end):
        m = FN.match(lines[i])
        if not m or i in skip:
            continue
        depth, opened = 0, False
        for j in range(i, end):
            for c in clean[j]:
                if c == "{":
                    depth += 1
                    opened = True
                elif c == "}":
                    depth -= 1
            if opened and depth == 0:
                yield (j - i + 1, path, i + 1, m.group(7))
                break
            if not opened and clean[j].rstrip().endswith(";"):
                break  # a declaration without a body


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    found = []
    for root, dirs, files in os.walk("."):
        dirs[:] = [d for d in dirs if d not in ("target", "node_modules", ".git", "tests")]
        for f in files:
            if f.endswith(".rs") and f != "tests.rs":
                found.extend(functions(os.path.join(root, f)[2:]))
    found.sort(key=lambda t: (-t[0], t[1], t[2]))
    for lines, path, line, name in found[:n]:
        print(f"{lines:5}  {name}  {path}:{line}")


if __name__ == "__main__":
    main()
