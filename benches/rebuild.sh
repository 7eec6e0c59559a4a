#!/usr/bin/env bash
# The rebuild benchmark (DESIGN §12): generates N job events (default 1,000,000: submit, queue,
# start, progress, succeed for N/5 jobs) in a scratch database, then runs
# `mira bench rebuild`, which measures a plain sequential read of the same events (the
# ceiling) and a full `projections rebuild`, and prints both and their ratio.
#
#   benches/rebuild.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
ADMIN=${MIRA_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/mira-target}
if [ -z "${MIRA_BIN:-}" ]; then
  cargo build --release --locked -q -p mira-cli
  MIRA_BIN=$CARGO_TARGET_DIR/release/mira
fi
DB=mira_rebuild_bench_$$
psql "$ADMIN" -qc "CREATE DATABASE $DB"
trap 'psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null' EXIT
export DATABASE_URL=${ADMIN%/*}/$DB
"$MIRA_BIN" migrate >/dev/null
t0=$(date +%s)
psql "$DATABASE_URL" -q <<SQL
BEGIN;
INSERT INTO events (event_id, tenant_id, aggregate_type, aggregate_id, sequence, event_type, event_version,
                    recorded_at, payload, metadata, prev_hash, hash)
SELECT gen_random_uuid(), 'bench', 'Job', j.id::text, s.seq, s.typ, s.ver, now(),
  CASE s.seq
    WHEN 1 THEN '{"type":"JobSubmitted","slide_id":"' || j.slide || '","kind":"bench.noop","params":{},"max_attempts":1}'
    WHEN 2 THEN '{"type":"JobQueued","attempt":1}'
    WHEN 3 THEN '{"type":"JobStarted","attempt":1,"worker_id":"w","lease_until":"2030-01-01T00:00:00Z"}'
    WHEN 4 THEN '{"type":"JobProgressed","attempt":1,"done":1,"total":2}'
    ELSE '{"type":"JobSucceeded","attempt":1,"manifest_key":"m","manifest_sha256":"' || repeat('0', 64)
         || '","usage":{"device":"cpu","device_seconds":0.5,"bytes_written":10}}'
  END,
  '{"actor":{"kind":"system","id":"bench"},"correlation_id":"' || j.id || '","causation_id":"' || j.id
    || '","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}',
  sha256('a'), sha256('b')
FROM (SELECT gen_random_uuid() AS id, gen_random_uuid() AS slide FROM generate_series(1, $N / 5)) j
CROSS JOIN (VALUES (1, 'JobSubmitted', '2'), (2, 'JobQueued', '1'), (3, 'JobStarted', '1'),
                   (4, 'JobProgressed', '1'), (5, 'JobSucceeded', '1')) s(seq, typ, ver)
ORDER BY j.id, s.seq;
COMMIT;
VACUUM ANALYZE events;
SQL
echo "generated $N events in $(( $(date +%s) - t0 )) s"
"$MIRA_BIN" bench rebuild
