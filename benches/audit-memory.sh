#!/usr/bin/env bash
# Memory that must not grow with the log (issue 13, point 4): peak resident memory and
# events/s of `mira audit verify` and of `mira projections rebuild read_models --verify`, at two
# log sizes (default 1,000,000 and 3,000,000 events) in a scratch database. The log is written
# by `mira bench seed` (real job events with valid hashes), checkpointed by `mira audit
# checkpoint`, and projected once by a plain rebuild before the measured `--verify` rebuild.
#
#   benches/audit-memory.sh [SMALL] [LARGE]
#   e.g. MIRA_BIN=/var/tmp/mira-target/debug/mira benches/audit-memory.sh 100000 300000
#
# Needs a PostgreSQL server (MIRA_BENCH_ADMIN_URL, default the local one as postgres) and
# builds `mira` in release mode unless MIRA_BIN names a binary. Prints a Markdown table; the
# last column is what the issue bounds: large minus small peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=${1:-1000000}
LARGE=${2:-3000000}
ADMIN=${MIRA_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/mira-target}
if [ -z "${MIRA_BIN:-}" ]; then
  cargo build --release --locked -q -p mira-cli
  MIRA_BIN=$CARGO_TARGET_DIR/release/mira
fi
DB=mira_audit_mem_$$
WORK=$(mktemp -d)
psql "$ADMIN" -qc "CREATE DATABASE $DB"
trap 'psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null; rm -rf "$WORK"' EXIT
export DATABASE_URL=${ADMIN%/*}/$DB
export Keyring__LocalDir=$WORK/keyring Audit__SigningKeyFile=$WORK/audit.key Audit__WitnessDir=$WORK/witness
"$MIRA_BIN" migrate >/dev/null
"$MIRA_BIN" keys init >/dev/null

# Runs a command alone in a fresh Python process; prints "<peak RSS MiB> <seconds>".
measure() {
  python3 - "$@" <<'PY'
import resource, subprocess, sys, time
t = time.monotonic()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
secs = time.monotonic() - t
if r.returncode != 0:
    sys.stderr.write(r.stderr.decode())
    sys.exit(r.returncode)
print(f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.1f} {secs:.2f}")
PY
}

events() { psql "$DATABASE_URL" -qAtc "SELECT count(*) FROM events"; }

declare -A RSS SECS N
have=0
for size in "$SMALL" "$LARGE"; do
  jobs=$(( (size - have) / 5 ))
  "$MIRA_BIN" bench seed --jobs "$jobs" >&2
  have=$(events)
  "$MIRA_BIN" audit checkpoint >/dev/null
  "$MIRA_BIN" projections rebuild read_models >/dev/null 2>&1
  read -r "RSS[verify,$size]" "SECS[verify,$size]" < <(measure "$MIRA_BIN" audit verify)
  read -r "RSS[rebuild,$size]" "SECS[rebuild,$size]" < <(measure "$MIRA_BIN" projections rebuild read_models --verify)
  N[$size]=$have
done
echo "| command | events (small) | peak MiB | events/s | events (large) | peak MiB | events/s | large − small MiB |"
echo "|---|---|---|---|---|---|---|---|"
for cmd in verify rebuild; do
  s=$SMALL; l=$LARGE
  python3 - "$cmd" "${N[$s]}" "${RSS[$cmd,$s]}" "${SECS[$cmd,$s]}" "${N[$l]}" "${RSS[$cmd,$l]}" "${SECS[$cmd,$l]}" <<'PY'
import sys
cmd, ns, rs, ss, nl, rl, sl = sys.argv[1:]
name = {"verify": "`mira audit verify`", "rebuild": "`mira projections rebuild --verify`"}[cmd]
ns, nl = int(ns), int(nl)
print(f"| {name} | {ns} | {float(rs):.1f} | {ns/float(ss):.0f} | {nl} | {float(rl):.1f} | {nl/float(sl):.0f} | {float(rl)-float(rs):+.1f} |")
PY
done
