#!/usr/bin/env bash
# The append benchmark (DESIGN §12): commands/s through Mira's command path into PostgreSQL,
# against pgbench inserting rows of the same size into a table of the same shape and indexes,
# with the same commit settings, at the same concurrency. Runs interleaved and reports medians.
#
#   benches/append-vs-pgbench.sh [COMMANDS_PER_RUN] [REPEATS] [CONCURRENCIES]
#   e.g. benches/append-vs-pgbench.sh 5000 3 "1 16"
#
# Needs a PostgreSQL server (MIRA_BENCH_ADMIN_URL, default the local one as postgres) and
# builds `mira` in release mode unless MIRA_BIN names a binary.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}
REPEATS=${2:-3}
CONCURRENCIES=${3:-"1 16"}
ADMIN=${MIRA_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
# shellcheck disable=SC2012 # PostgreSQL's directories are named by version numbers: nothing for ls to mangle.
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/mira-target}
if [ -z "${MIRA_BIN:-}" ]; then
  cargo build --release --locked -q -p mira-cli
  MIRA_BIN=$CARGO_TARGET_DIR/release/mira
fi

DB=mira_bench_$$
BASE=${ADMIN%/*}
URL=$BASE/$DB
psql "$ADMIN" -qc "CREATE DATABASE $DB"
trap 'psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null' EXIT
export DATABASE_URL=$URL Database__MaxConnections=32
WORK=$(mktemp -d)
export Keyring__LocalDir=$WORK/keyring Audit__SigningKeyFile=$WORK/audit.key
"$MIRA_BIN" migrate >/dev/null
"$MIRA_BIN" keys init >/dev/null

# Warm up and learn the stored row size.
"$MIRA_BIN" bench append --commands 500 --concurrency 4 --json > "$WORK/warm.json"
PAYLOAD=$(python3 -c "import json;print(round(json.load(open('$WORK/warm.json'))['avg_payload_bytes']))")
METADATA=$(python3 -c "import json;print(round(json.load(open('$WORK/warm.json'))['avg_metadata_bytes']))")
SYNC=$(psql "$URL" -qAtc "SHOW synchronous_commit")

psql "$URL" -q <<SQL
CREATE TABLE bench_rows (LIKE events INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING INDEXES);
-- The log's triggers assign these (migration 0013); the peer table takes them from defaults.
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'bench_rows'
                 AND column_name = 'global_position' AND is_identity = 'YES') THEN
    ALTER TABLE bench_rows ALTER COLUMN global_position ADD GENERATED ALWAYS AS IDENTITY;
  END IF;
END
\$\$;
ALTER TABLE bench_rows ALTER COLUMN tx_id SET DEFAULT pg_current_xact_id();
SQL
cat > "$WORK/insert.sql" <<SQL
INSERT INTO bench_rows (event_id, tenant_id, aggregate_type, aggregate_id, sequence, event_type,
  event_version, recorded_at, payload, metadata, prev_hash, hash)
VALUES (gen_random_uuid(), 'bench', 'Job', gen_random_uuid()::text, 1, 'JobProgressed', '1', now(),
  repeat('p', $PAYLOAD), repeat('m', $METADATA), sha256('a'), sha256('b'));
SQL

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

echo "row: payload ${PAYLOAD} B, metadata ${METADATA} B; synchronous_commit=${SYNC}; ${N} commands per run; ${REPEATS} interleaved repeats"
echo
echo "| concurrency | mira commands/s (median) | mira p50 ms | mira p99 ms | pgbench inserts/s (median) | ratio mira/pgbench |"
echo "|---|---|---|---|---|---|"
for C in $CONCURRENCIES; do
  : > "$WORK/mira.$C"; : > "$WORK/pg.$C"; : > "$WORK/p50.$C"; : > "$WORK/p99.$C"
  for _ in $(seq 1 "$REPEATS"); do
    "$MIRA_BIN" bench append --commands "$N" --concurrency "$C" --json > "$WORK/run.json"
    python3 -c "import json;r=json.load(open('$WORK/run.json'));print(r['commands_per_second'])" >> "$WORK/mira.$C"
    python3 -c "import json;r=json.load(open('$WORK/run.json'));print(r['latency_p50_ms'])" >> "$WORK/p50.$C"
    python3 -c "import json;r=json.load(open('$WORK/run.json'));print(r['latency_p99_ms'])" >> "$WORK/p99.$C"
    "$PGBIN/pgbench" -n -c "$C" -j "$C" -t $(( N / C )) -f "$WORK/insert.sql" "$URL" 2>/dev/null \
      | awk '/^tps = / {print $3}' >> "$WORK/pg.$C"
  done
  m=$(median < "$WORK/mira.$C"); p=$(median < "$WORK/pg.$C")
  printf '| %s | %.0f | %.2f | %.2f | %.0f | %.3f |\n' "$C" "$m" "$(median < "$WORK/p50.$C")" "$(median < "$WORK/p99.$C")" "$p" "$(python3 -c "print($m/$p)")"
done
rm -rf "$WORK"
