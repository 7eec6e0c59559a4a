#!/usr/bin/env bash
# The README's walk-through, run as it stands: a fresh `mira dev` in a directory outside the
# clone, then the README's "Trying the API" block, unmodified, from another directory outside
# it, to a succeeded job and a fetched tile: twice on the CMU slide, then on a generated slide
# over 64 MiB (the multipart path). Needs the debug `mira` and `mira-worker` (scripts/test runs
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

# The block, as the README has it, unmodified: the address and the slide come in through the
# variables it reads (API, SLIDE).
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
block=$(awk '/^## Trying the API/{on=1} on && /^```sh/{inblock=1; next} inblock && /^```/{exit} inblock{print}' "$repo/README.md")
[ -n "$block" ] || fail "no sh block under '## Trying the API' in the README"
if printf '%s\n' "$block" | grep -Eq '(^|[^A-Za-z_])exit([^A-Za-z_]|$)'; then
  fail "the README's block calls exit, which closes the shell of a reader who pastes it"
fi

mira_dev_start "$work" "$port"
export API=http://127.0.0.1:$port

# run NAME SLIDE WIDTH: the block from $work/user, to a succeeded job, its .dzi and a tile.
run() {
  local name=$1 width=$3
  export SLIDE=$2
  echo "readme-walkthrough: $name: running the README's block from $work/user"
  if ! (cd "$work/user" && rm -f tile.jpeg && timeout 600 bash -euo pipefail ${WALKTHROUGH_TRACE:+-x} -c "$block") > "$work/transcript" 2>&1; then
    cat "$work/transcript" >&2
    echo "--- mira dev:" >&2; tail -n 30 "$work/dev.log" >&2
    fail "$name: the README's block failed"
  fi
  sed 's/^/  | /' "$work/transcript" | grep -v '^  | job .*: running$' | tail -n 12
  grep -q ": succeeded$" "$work/transcript" || fail "$name: the job did not succeed"
  grep -q "Width=\"$width\"" "$work/transcript" || fail "$name: no .dzi $width pixels wide in the transcript"
  [ "$(head -c 2 "$work/user/tile.jpeg" | od -An -tx1 | tr -d ' ')" = ffd8 ] || fail "$name: tile.jpeg is not a JPEG"
}

cmu=${MIRA_TESTDATA:-$HOME/.cache/mira-testdata}/CMU-1-Small-Region.svs
run "CMU slide" "$cmu" 2220
# Twice in a row: a second run makes its own slide and job (no fixed Idempotency-Key).
run "CMU slide, again" "$cmu" 2220
# Over the 64 MiB multipart threshold: an uncompressed tiled pyramid, made here.
big=$work/big.tif
vips black "$work/big.v" 5000 5000 --bands 3
vips linear "$work/big.v" "$work/pink.v" "0.9 0.6 0.8" "200 120 190" --uchar
vips tiffsave "$work/pink.v" "$big" --tile --tile-width 256 --tile-height 256 --pyramid --compression none
rm -f "$work/big.v" "$work/pink.v"
[ "$(stat -c %s "$big")" -gt $((64 * 1024 * 1024)) ] || fail "the generated slide is not over 64 MiB"
run "a $(( $(stat -c %s "$big") / 1024 / 1024 )) MiB slide (multipart)" "$big" 5000
mira_dev_stop || fail "mira dev did not stop cleanly on Ctrl-C"
if [ -n "${WALKTHROUGH_SHOW_DEV:-}" ]; then
  echo "--- what mira dev printed:"
  sed 's/^/  | /' "$work/dev.log"
fi
echo "readme-walkthrough: ok (twice on the CMU slide, once multipart; each job succeeded, .dzi and a tile fetched)"
