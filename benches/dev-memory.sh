#!/usr/bin/env bash
# Resident memory of a long-running `mira dev` (issue 16): starts one on a fresh data
# directory, registers slides through the API in steps, and prints the resident memory of its
# processes (the gateway and the worker it spawned) after each step. Flat is the goal: nothing
# in the platform may hold on to every event.
#
#   benches/dev-memory.sh [STEPS]      e.g. benches/dev-memory.sh "1500 4500"
#
# Uses the debug `mira` and `mira-worker` unless MIRA_BIN names a `mira` (with `mira-worker`
# beside it).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-"1500 4500"}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/mira-target}
MIRA_BIN=${MIRA_BIN:-$CARGO_TARGET_DIR/debug/mira}
work=$(mktemp -d /tmp/mira-devmem.XXXXXX)
export XDG_RUNTIME_DIR=$work/run
mkdir -p "$XDG_RUNTIME_DIR" "$work/dev"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$work/dev" && exec "$MIRA_BIN" dev --listen "127.0.0.1:$port" > "$work/dev.log" 2>&1) &
dev=$!
trap 'kill -INT $dev 2>/dev/null; wait $dev 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 600); do grep -q "Ctrl-C" "$work/dev.log" 2>/dev/null && break; sleep 0.1; done
token=$("$MIRA_BIN" dev token --data-dir "$work/dev/.mira")
rss() { # kB of the gateway and of its worker child
  local g w
  g=$(awk '/VmRSS/{print $2}' /proc/$dev/status)
  # shellcheck disable=SC2013 # `children` is one line of space-separated PIDs: splitting it into words is the point.
  w=$(for c in $(cat /proc/$dev/task/*/children 2>/dev/null); do [ "$(cat "/proc/$c/comm")" = mira-worker ] && awk '/VmRSS/{print $2}' "/proc/$c/status"; done | head -n 1)
  echo "$g ${w:-0}"
}
echo "| slides registered | mira dev (gateway) MiB | mira-worker MiB | together MiB |"
echo "|---|---|---|---|"
done_n=0
for n in $STEPS; do
  python3 - "$port" "$token" $((n - done_n)) <<'PY'
import http.client, json, sys
port, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = http.client.HTTPConnection("127.0.0.1", int(port))
body = json.dumps({"name": "memory", "size_bytes": 10, "content_type": "image/tiff"})
for _ in range(n):
    c.request("POST", "/api/slides", body, {"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    r = c.getresponse(); r.read()
    assert r.status == 201, r.status
PY
  done_n=$n
  sleep 5 # let the relays and consumers catch up
  read -r g w < <(rss)
  awk -v n="$n" -v g="$g" -v w="$w" 'BEGIN { printf "| %s | %.1f | %.1f | %.1f |\n", n, g/1024, w/1024, (g+w)/1024 }'
done
