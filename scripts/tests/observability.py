#!/usr/bin/env python3
"""Checks the operators' observability files against Mira's metric catalogue.

docs/observability/metrics.md's table is the contract (series and type). The Prometheus alert
rules (alerts.yml) and the Grafana dashboard (grafana-dashboard.json) beside it must have the
expected structure, and every `mira_*` series their expressions name must be in the table: a
histogram only through its `_bucket`, `_sum` or `_count` series, any other type only by its own
name.

Usage: observability.py [DIR]  (DIR holds the three files; default docs/observability of this
repository). Exits 1, listing every problem, or prints `observability: ok`. Needs PyYAML (the
infrastructure checks' virtualenv has it: tools/infra-requirements.txt).
"""

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
SERIES = re.compile(r"mira_[a-z0-9_]+")
# A catalogue row: | `mira_…` | type … | …
ROW = re.compile(r"^\|\s*`(mira_[a-z0-9_]+)`\s*\|\s*([a-z]+)")
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
SEVERITIES = {"critical", "warning", "info"}
# Fewer rows than this means the table was not parsed, not that it is small.
MIN_CATALOGUE = 10


def catalogue(path: Path) -> dict[str, str]:
    series: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = ROW.match(line)
        if m:
            name, kind = m.groups()
            if name in series:
                raise SystemExit(f"observability: {path}: {name} is in the table twice")
            series[name] = kind
    if len(series) < MIN_CATALOGUE:
        raise SystemExit(f"observability: {path}: found only {len(series)} series in the table")
    return series


def check_series(where: str, expr: str, known: dict[str, str], problems: list[str]) -> int:
    """Checks every `mira_*` name in `expr`; returns how many it found."""
    names = SERIES.findall(expr)
    for name in names:
        kind = known.get(name)
        if kind == "histogram":
            problems.append(f"{where}: {name} is a histogram: read it through _bucket, _sum or _count")
            continue
        if kind is not None:
            continue
        base, suffix = next(((name[: -len(s)], s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)), (None, None))
        if base is not None and base in known:
            if known[base] != "histogram":
                problems.append(f"{where}: {name}: {base} is a {known[base]}, not a histogram, so it has no {suffix}")
            continue
        problems.append(f"{where}: {name} is not in metrics.md")
    if any(n.endswith("_bucket") for n in names) and not ("histogram_quantile" in expr and re.search(r"\ble\b", expr)):
        problems.append(f"{where}: reads a _bucket series outside histogram_quantile(…) by `le`")
    return len(names)


def check_alerts(path: Path, known: dict[str, str], problems: list[str]) -> int:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list) or not groups:
        problems.append(f"{path.name}: no `groups:` list")
        return 0
    rules = 0
    alerts: set[str] = set()
    group_names: set[str] = set()
    for g in groups:
        gname = g.get("name")
        if not gname or gname in group_names:
            problems.append(f"{path.name}: a group without a name, or a name used twice: {gname!r}")
        group_names.add(gname)
        for i, r in enumerate(g.get("rules") or []):
            rules += 1
            name = r.get("alert")
            where = f"{path.name}: {gname}[{i}] {name or '(no alert)'}"
            if not name:
                problems.append(f"{where}: no `alert`")
            elif name in alerts:
                problems.append(f"{where}: alert name used twice")
            alerts.add(name)
            expr = r.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                problems.append(f"{where}: no `expr`")
                expr = ""
            elif check_series(where, expr, known, problems) == 0:
                problems.append(f"{where}: its expr names no mira_* series")
            if not DURATION.match(str(r.get("for", ""))):
                problems.append(f"{where}: `for` missing or not a duration: {r.get('for')!r}")
            severity = (r.get("labels") or {}).get("severity")
            if severity not in SEVERITIES:
                problems.append(f"{where}: labels.severity must be one of {sorted(SEVERITIES)}: {severity!r}")
            ann = r.get("annotations") or {}
            if not ann.get("summary"):
                problems.append(f"{where}: no annotations.summary")
            runbook = ann.get("runbook")
            if runbook and not (ROOT / runbook.split("#", 1)[0]).is_file():
                problems.append(f"{where}: runbook {runbook} is not a file of the repository")
    if rules == 0:
        problems.append(f"{path.name}: no rules")
    return rules


def check_dashboard(path: Path, known: dict[str, str], problems: list[str]) -> int:
    d = json.loads(path.read_text(encoding="utf-8"))
    if d.get("uid") != "mira-overview" or d.get("title") != "Mira":
        problems.append(f"{path.name}: uid must be mira-overview and title Mira")
    if d.get("schemaVersion") != 39:
        problems.append(f"{path.name}: schemaVersion must be 39")
    variables = {v.get("name"): v for v in (d.get("templating") or {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append(f"{path.name}: no `datasource` templating variable of type datasource for prometheus")

    # Every panel, rows' collapsed panels included.
    def walk(panels):
        for p in panels or []:
            yield p
            yield from walk(p.get("panels"))

    ids: set[int] = set()
    uids: set[str] = {d.get("uid")}
    panels = 0
    for p in walk(d.get("panels")):
        panels += 1
        title = p.get("title")
        where = f"{path.name}: panel {p.get('id')} {title!r}"
        if not title:
            problems.append(f"{where}: no title")
        pid = p.get("id")
        if not isinstance(pid, int) or pid in ids:
            problems.append(f"{where}: id missing or used twice")
        ids.add(pid)
        if p.get("uid"):
            if p["uid"] in uids:
                problems.append(f"{where}: uid {p['uid']} used twice")
            uids.add(p["uid"])
        if p.get("type") == "row":
            continue
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append(f"{where}: its datasource is not ${{datasource}}")
        targets = [t for t in p.get("targets") or [] if isinstance(t.get("expr"), str) and t["expr"].strip()]
        if not targets:
            problems.append(f"{where}: no target with an expr")
        refs = [t.get("refId") for t in p.get("targets") or []]
        if len(set(refs)) != len(refs) or None in refs:
            problems.append(f"{where}: refIds missing or used twice: {refs}")
        if sum(check_series(f"{where} {t.get('refId')}", t["expr"], known, problems) for t in targets) == 0:
            problems.append(f"{where}: names no mira_* series")
    if panels == 0:
        problems.append(f"{path.name}: no panels")
    return panels


def main() -> int:
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "observability"
    known = catalogue(base / "metrics.md")
    problems: list[str] = []
    rules = check_alerts(base / "alerts.yml", known, problems)
    panels = check_dashboard(base / "grafana-dashboard.json", known, problems)
    if problems:
        print(f"observability: {len(problems)} problem(s) in {base}:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"observability: {len(known)} series in metrics.md, {rules} alert rules, {panels} dashboard panels")
    print("observability: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
