#!/usr/bin/env bash
# What exporting traces costs (DESIGN §12, issue 36): `mira bench e2e` (POST /api/jobs → first
# job.updated on the WebSocket, the whole gateway with its relay, projector and handlers) and
# `mira bench append` (commands/s through the command path), each run with traces off and with
# every span exported over OTLP/HTTP to a local receiver (tools/otlp_sink.py), interleaved,
# RUNS times; prints each run, then medians, spreads and the ratios.
#
#   benches/telemetry-overhead.sh [JOBS] [COMMANDS] [RUNS]
#   e.g. benches/telemetry-overhead.sh 500 5000 5
#
# Needs a PostgreSQL server (MIRA_BENCH_ADMIN_URL, default the local one as postgres) and
# builds `mira` in release mode unless MIRA_BIN names a binary.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-500}
COMMANDS=${2:-5000}
RUNS=${3:-5}
ADMIN=${MIRA_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/mira-target}
if [ -z "${MIRA_BIN:-}" ]; then
  cargo build --release --locked -q -p mira-cli
  MIRA_BIN=$CARGO_TARGET_DIR/release/mira
fi

DB=mira_bench_otel_$$
BASE=${ADMIN%/*}
URL=$BASE/$DB
WORK=$(mktemp -d)
SINK_PID=
cleanup() {
  if [ -n "$SINK_PID" ]; then kill "$SINK_PID" 2>/dev/null || true; fi
  psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
export DATABASE_URL=$URL Database__MaxConnections=32 RUST_LOG=error
export Keyring__LocalDir=$WORK/keyring Audit__SigningKeyFile=$WORK/audit.key
# Every run starts on an empty log: a gateway on the in-memory bus publishes the whole log again
# when it starts, so a log grown by earlier runs would be timed too.
fresh_db() {
  psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
  psql "$ADMIN" -qc "CREATE DATABASE $DB"
  "$MIRA_BIN" migrate >/dev/null
}
fresh_db
"$MIRA_BIN" keys init >/dev/null

python3 tools/otlp_sink.py "$WORK/port" > "$WORK/sink.json" &
SINK_PID=$!
for _ in $(seq 50); do [ -s "$WORK/port" ] && break; sleep 0.1; done
ENDPOINT=http://127.0.0.1:$(cat "$WORK/port")

# One run of `what` (e2e or append) with traces `mode` (off or on); prints its JSON.
run() {
  local what=$1 mode=$2
  fresh_db
  local -a env=(env -u OTEL_EXPORTER_OTLP_ENDPOINT -u OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
  if [ "$mode" = on ]; then env+=(OTEL_EXPORTER_OTLP_ENDPOINT="$ENDPOINT" OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf); fi
  case $what in
    e2e) "${env[@]}" "$MIRA_BIN" bench e2e --jobs "$JOBS" --json ;;
    append) "${env[@]}" "$MIRA_BIN" bench append --commands "$COMMANDS" --concurrency 4 --json ;;
  esac
}

# A warm-up of each, not counted.
run e2e off > /dev/null
run append off > /dev/null
: > "$WORK/runs.jsonl"
for i in $(seq "$RUNS"); do
  # Interleaved, and the order alternates, so drift on a shared machine falls on both.
  if [ $((i % 2)) = 1 ]; then order="off on"; else order="on off"; fi
  for what in e2e append; do
    for mode in $order; do
      out=$(run "$what" "$mode")
      echo "{\"run\": $i, \"what\": \"$what\", \"traces\": \"$mode\", \"result\": $out}" >> "$WORK/runs.jsonl"
      echo "run $i $what traces=$mode: $out" >&2
    done
  done
done
kill "$SINK_PID"
wait "$SINK_PID" 2>/dev/null || true
SINK_PID=

python3 - "$WORK/runs.jsonl" "$WORK/sink.json" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
sink = open(sys.argv[2]).read().strip() or "{}"
def series(what, mode, key):
    return [r["result"][key] for r in runs if r["what"] == what and r["traces"] == mode]
print("| benchmark | traces off: median (min–max) | traces on: median (min–max) | on / off |")
print("|---|---|---|---|")
for what, key, label, lower_is_better in [
    ("e2e", "p50_ms", "e2e POST → first job.updated p50, ms", True),
    ("e2e", "p99_ms", "e2e p99, ms", True),
    ("append", "commands_per_second", "append commands/s (concurrency 4)", False),
    ("append", "latency_p50_ms", "append command p50, ms", True),
]:
    off, on = series(what, "off", key), series(what, "on", key)
    m_off, m_on = statistics.median(off), statistics.median(on)
    print(f"| {label} | {m_off:.2f} ({min(off):.2f}–{max(off):.2f}) | {m_on:.2f} ({min(on):.2f}–{max(on):.2f}) | {m_on / m_off:.3f} |")
print(f"\nthe receiver was sent: {sink}")
PY
