#!/usr/bin/env bash
# An outside fuzzer against the API as a user meets it: schemathesis drives every operation of
# `/api/openapi.json` on a fresh `mira dev`, with a token holding every group (so no operation
# answers only 401/403) and some data in place (a slide and a job, so ids resolve). It fails on
# any of schemathesis's checks (`--checks all`): a server error, a status the document does not
# list, a response that breaks its schema, data the document refuses but the API takes, data it
# allows but the API refuses (the statuses state can explain are declared, with their reasons, in
# scripts/tests/schemathesis.toml), wrong Allow headers, missing authentication.
# A fixed seed, and a time budget of MIRA_FUZZ_SECONDS (120). Needs the debug `mira` and
# `mira-worker` and the test virtualenv (scripts/test runs it after the suite).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-/var/tmp/mira-target}
mira=$target/debug/mira
st=$(dirname "${MIRA_PYTHON:?run through scripts/test, which sets MIRA_PYTHON}")/st
fail() { printf 'api-fuzz: FAIL: %s\n' "$*" >&2; exit 1; }
[ -x "$mira" ] || fail "build mira first ($mira)"
[ -x "$st" ] || fail "no schemathesis in the test virtualenv ($st)"

. "$repo/scripts/lib/mira-dev.sh"
work=$(mktemp -d /tmp/mira-fuzz.XXXXXX)
trap 'mira_dev_stop || true; rm -rf "$work"' EXIT
port=$("$MIRA_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
# One client sending as fast as it can: unlimited, so that the rate limit (documented as 429 on
# every operation, tested in gateway/tests/api/limits.rs) does not hide the logic behind it.
export Api__RequestsPerSecond=0
mira_dev_start "$work" "$port"
token=$("$mira" dev token --data-dir "$work/dev/.mira" --groups pathologist,auditor,admin)

# Some data: a job, and the slide it is on, uploaded (the worker rejects it: not a slide, and
# the job fails with it).
slide=$(curl -fsS -H "Authorization: Bearer $token" -H 'content-type: application/json' \
  -d '{"name":"fuzz","size_bytes":3,"content_type":"image/tiff"}' "$base/api/slides")
url=$("$MIRA_PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["upload"]["url"])' <<<"$slide")
id=$("$MIRA_PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["slide_id"])' <<<"$slide")
# The job first: once the worker has rejected the slide, a job on it is refused (409).
curl -fsS -H "Authorization: Bearer $token" -H 'content-type: application/json' \
  -d "{\"slide_id\":\"$id\",\"kind\":\"wsi.preprocess\"}" "$base/api/jobs" >/dev/null
curl -fsS -X PUT -H 'content-type: image/tiff' --data-binary abc "$url" >/dev/null
curl -fsS -H "Authorization: Bearer $token" -H 'content-type: application/json' -d '{}' "$base/api/slides/$id/uploaded" >/dev/null

echo "api-fuzz: schemathesis on $base/api/openapi.json for ${MIRA_FUZZ_SECONDS:-120} s (seed ${MIRA_FUZZ_SEED:-1})"
set +e
(cd "$work" && "$st" --config-file "$repo/scripts/tests/schemathesis.toml" run "$base/api/openapi.json" \
  --checks "${MIRA_FUZZ_CHECKS:-all}" \
  --seed "${MIRA_FUZZ_SEED:-1}" --max-time "${MIRA_FUZZ_SECONDS:-120}" \
  --generation-allow-x00 true --generation-database none \
  -H "Authorization: Bearer $token" --no-color) > "$work/st.log" 2>&1
rc=$?
set -e
if [ -n "${MIRA_FUZZ_LOG:-}" ]; then cp "$work/st.log" "$MIRA_FUZZ_LOG"; fi
summary=$(grep -E '^=+ .* in [0-9.]+s =+$' "$work/st.log" | tail -n 1)
if [ "$rc" != 0 ]; then
  grep -v '^\s*$' "$work/st.log" | sed -n '/FAILURES/,/SUMMARY/p' | head -n 80 >&2
  echo "--- mira dev:" >&2; tail -n 20 "$work/dev.log" >&2
  fail "schemathesis: ${summary:-exit $rc}"
fi
echo "api-fuzz: ok: $(grep -E 'generated' "$work/st.log" | tail -n 1 | xargs) ${summary}"
