#!/usr/bin/env bash
# What running each attempt in a child process costs (ADR 0022): starts
# `mira-worker process --report` on the CMU test slide RUNS times, as `mira-worker run` does,
# and prints the median time from the spawn to the child's first report line (its start-up:
# exec, loading, settings), the median whole attempt, and the share the start-up is of it.
#
#   benches/attempt-process.sh [RUNS]        (default 15)
#
# Uses the debug `mira-worker` unless MIRA_WORKER names one (a release build starts faster).
# MIRA_TESTDATA names the test slides (scripts/bootstrap fetches them; .mira-test.env says
# where).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-15}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/mira-target}
WORKER=${MIRA_WORKER:-$CARGO_TARGET_DIR/debug/mira-worker}
if [ -z "${MIRA_TESTDATA:-}" ] && [ -e .mira-test.env ]; then
  MIRA_TESTDATA=$(sed -n 's/^MIRA_TESTDATA=//p' .mira-test.env)
fi
SLIDE=${MIRA_TESTDATA:?MIRA_TESTDATA is not set: run scripts/bootstrap}/CMU-1-Small-Region.svs
work=$(mktemp -d /tmp/mira-attempt.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 - "$WORKER" "$SLIDE" "$work" "$RUNS" <<'PY'
import os, statistics, subprocess, sys, time
worker, slide, work, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
env = {"PATH": os.environ.get("PATH", ""), "MIRA_GPU": "off"}
first, whole = [], []
for i in range(runs):
    out = os.path.join(work, f"out-{i}")
    t0 = time.perf_counter()
    p = subprocess.Popen([worker, "process", slide, "--out", out, "--report"],
                         stdout=subprocess.PIPE, env=env, text=True)
    line = p.stdout.readline()
    t1 = time.perf_counter()
    rest = p.stdout.read()
    assert p.wait() == 0 and '"summary"' in rest, (line, rest[-300:])
    t2 = time.perf_counter()
    first.append((t1 - t0) * 1000)
    whole.append((t2 - t0) * 1000)
s, w = statistics.median(first), statistics.median(whole)
print(f"{worker}: {runs} attempts of {os.path.basename(slide)}")
print(f"start-up to the first report line: median {s:.1f} ms (min {min(first):.1f}, max {max(first):.1f})")
print(f"whole attempt: median {w:.0f} ms; the start-up is {100 * s / w:.1f} % of it")
PY
