#!/usr/bin/env bash
# The README's walk-through, run as it stands: a fresh `mira dev` in a directory outside the
# clone, then the README's "Trying the API" block, from another directory outside it, to a
# succeeded job and a fetched tile. Needs the debug `mira` and `mira-worker` (scripts/test runs
# it after the suite has built them).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-/var/tmp/mira-target}
mira=$target/debug/mira
fail() { printf 'readme-walkthrough: FAIL: %s\n' "$*" >&2; exit 1; }
{ [ -x "$mira" ] && [ -x "$target/debug/mira-worker" ]; } || fail "build mira and mira-worker first ($mira)"

. "$repo/scripts/lib/mira-dev.sh"
work=$(mktemp -d /tmp/mira-walkthrough.XXXXXX)
export HOME=${HOME:-/root}
mkdir -p "$work/user"
trap 'mira_dev_stop || true; rm -rf "$work"' EXIT

# The block, as the README has it; only the port (a free one) and the target directory differ.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
block=$(awk '/^## Trying the API/{on=1} on && /^```sh/{inblock=1; next} inblock && /^```/{exit} inblock{print}' "$repo/README.md")
[ -n "$block" ] || fail "no sh block under '## Trying the API' in the README"
readme_addr=127.0.0.1:8080 readme_target=/var/tmp/mira-target
block=${block//"$readme_addr"/127.0.0.1:$port}
block=${block//"$readme_target"/$target}

mira_dev_start "$work" "$port"

echo "readme-walkthrough: mira dev is up on 127.0.0.1:$port; running the README's block from $work/user"
export SLIDE=${MIRA_TESTDATA:-$HOME/.cache/mira-testdata}/CMU-1-Small-Region.svs
if ! (cd "$work/user" && timeout 300 bash -euo pipefail ${WALKTHROUGH_TRACE:+-x} -c "$block") > "$work/transcript" 2>&1; then
  cat "$work/transcript" >&2
  echo "--- mira dev:" >&2; tail -n 30 "$work/dev.log" >&2
  fail "the README's block failed"
fi
mira_dev_stop || fail "mira dev did not stop cleanly on Ctrl-C"
sed 's/^/  | /' "$work/transcript"
if [ -n "${WALKTHROUGH_SHOW_DEV:-}" ]; then
  echo "--- what mira dev printed:"
  sed 's/^/  | /' "$work/dev.log"
fi
grep -q "Width=\"2220\"" "$work/transcript" || fail "no .dzi of the CMU slide in the transcript"
[ "$(head -c 2 "$work/user/tile.jpeg" | od -An -tx1 | tr -d ' ')" = ffd8 ] || fail "tile.jpeg is not a JPEG"
echo "readme-walkthrough: ok (slide uploaded, job succeeded, .dzi and a tile fetched)"
