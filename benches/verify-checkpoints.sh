#!/usr/bin/env bash
# `mira audit verify` against the number of checkpoints (ADR 0019): one log of EVENTS events
# (default 1,000,000, written by `mira bench seed`), copied once per checkpoint count (default
# 1,000 and 100,000), each copy checkpointed in equal spans by `mira bench seed --jobs 0
# --checkpoint-span` (every checkpoint witnessed, in a witness directory on /dev/shm), then
# verified REPEATS times (default 3), interleaved. Prints a Markdown table with the median
# seconds, events/s and peak resident memory of each, and the peer: raw SHA-256 over the same
# number of messages of the log's mean canonical size (Python's hashlib, one call each).
#
#   benches/verify-checkpoints.sh [EVENTS] ["COUNT COUNT …"] [REPEATS]
#   e.g. MIRA_BIN=/var/tmp/mira-target/debug/mira benches/verify-checkpoints.sh 100000 "1000 100000" 1
#
# Needs a PostgreSQL server (MIRA_BENCH_ADMIN_URL, default the local one as postgres) and
# builds `mira` in release mode unless MIRA_BIN names a binary.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${1:-1000000}
COUNTS=${2:-"1000 100000"}
REPEATS=${3:-3}
ADMIN=${MIRA_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/mira-target}
if [ -z "${MIRA_BIN:-}" ]; then
  cargo build --release --locked -q -p mira-cli
  MIRA_BIN=$CARGO_TARGET_DIR/release/mira
fi
BASE=mira_verify_ck_$$
SHM=/dev/shm
[ -d "$SHM" ] || SHM=${TMPDIR:-/tmp}
WORK=$(mktemp -d "$SHM/mira-verify-bench.XXXXXX")
dbs=("$BASE")
cleanup() {
  for d in "${dbs[@]}"; do psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $d WITH (FORCE)" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
psql "$ADMIN" -qc "CREATE DATABASE $BASE"
export Keyring__LocalDir=$WORK/keyring Audit__SigningKeyFile=$WORK/audit.key
DATABASE_URL=${ADMIN%/*}/$BASE Audit__WitnessDir=$WORK/witness-seed "$MIRA_BIN" migrate >/dev/null
DATABASE_URL=${ADMIN%/*}/$BASE Audit__WitnessDir=$WORK/witness-seed "$MIRA_BIN" keys init >/dev/null
DATABASE_URL=${ADMIN%/*}/$BASE Audit__WitnessDir=$WORK/witness-seed "$MIRA_BIN" bench seed --jobs $(( EVENTS / 5 )) >&2
n=$(psql "${ADMIN%/*}/$BASE" -qAtc "SELECT count(*) FROM events")
mean=$(psql "${ADMIN%/*}/$BASE" -qAtc "SELECT round(avg(length(payload) + length(metadata) + 200)) FROM events")

for c in $COUNTS; do
  db=${BASE}_$c
  dbs+=("$db")
  psql "$ADMIN" -qc "CREATE DATABASE $db TEMPLATE $BASE"
  mkdir -p "$WORK/witness-$c"
  span=$(( (n + c - 1) / c ))
  DATABASE_URL=${ADMIN%/*}/$db Audit__WitnessDir=$WORK/witness-$c \
    "$MIRA_BIN" bench seed --jobs 0 --checkpoint-span "$span" >&2
done

# Runs verify on one copy; prints "<peak RSS KiB> <seconds>".
run() {
  DATABASE_URL=${ADMIN%/*}/${BASE}_$1 Audit__WitnessDir=$WORK/witness-$1 \
    "$MIRA_BIN" audit verify --json | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["peak_rss_kib"], v["report"]["seconds"])'
}
declare -A RSS SECS
for _ in $(seq 1 "$REPEATS"); do
  for c in $COUNTS; do
    read -r r s < <(run "$c")
    RSS[$c]="${RSS[$c]:-} $r"
    SECS[$c]="${SECS[$c]:-} $s"
  done
done
sha=$(python3 - "$n" "$mean" <<'PY'
import hashlib, statistics, sys, time
n, size = int(sys.argv[1]), int(sys.argv[2])
msg = b"x" * size
runs = []
for _ in range(3):
    t = time.perf_counter()
    for _ in range(n):
        hashlib.sha256(msg).digest()
    runs.append(time.perf_counter() - t)
print(n / statistics.median(runs))
PY
)
echo "| checkpoints | events | median s | events/s | peak MiB (median) | raw SHA-256 msgs/s | verify / SHA-256 |"
echo "|---|---|---|---|---|---|---|"
for c in $COUNTS; do
  python3 - "$c" "$n" "${SECS[$c]}" "${RSS[$c]}" "$sha" <<'PY'
import statistics, sys
c, n, secs, rss, sha = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split(), float(sys.argv[5])
s = statistics.median(map(float, secs)); r = statistics.median(map(float, rss)) / 1024
print(f"| {int(c):,} | {n:,} | {s:.2f} | {n/s:,.0f} | {r:.1f} | {sha:,.0f} | {n/s/sha:.2f} |")
PY
done
