#!/usr/bin/env bash
# The slide benchmark (DESIGN §12): `mira-worker process` on the CPU against `vips dzsave` on
# the same 12000×12000 pyramidal JPEG TIFF (made once from CMU-1-Small-Region with vips), the
# same tile size, overlap and JPEG quality, interleaved; prints each run, the medians and the
# ratio vips/mira (above 1: mira is faster). Each run also times mira-worker with
# Worker__SlideReader=OpenSlide (every pixel through OpenSlide's read_region, ADR 0009).
#
#   benches/slide-vs-vips.sh [RUNS]        (default 3; needs scripts/bootstrap's test data)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
command -v vips >/dev/null || { $SUDO apt-get update -qq; DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends libvips-tools >/dev/null; }
TESTDATA=${MIRA_TESTDATA:-${XDG_CACHE_HOME:-$HOME/.cache}/mira-testdata}
SRC="$TESTDATA/CMU-1-Small-Region.svs"
BIG="$TESTDATA/bench-12000x12000.tif"
[ -f "$SRC" ] || scripts/bootstrap
if [ ! -f "$BIG" ]; then
  tmp=$(mktemp -d)
  vips openslideload "$SRC" "$tmp/rgba.v"
  vips flatten "$tmp/rgba.v" "$tmp/cmu.v" --background 255
  vips arrayjoin "$(for _ in $(seq 30); do printf '%s ' "$tmp/cmu.v"; done)" "$tmp/joined.v" --across 6
  vips crop "$tmp/joined.v" "$tmp/crop.v" 0 0 12000 12000
  vips tiffsave "$tmp/crop.v" "$BIG" --tile --pyramid --compression jpeg --Q 90 --tile-width 256 --tile-height 256
  rm -rf "$tmp"
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/mira-target}
cargo build --quiet --release --locked -p mira-gpu-worker --bin mira-worker
WORKER="$CARGO_TARGET_DIR/release/mira-worker"
# Output goes to a tmpfs where there is one (BENCH_OUT overrides): both tools create ~3,000
# files per run, and on ext4 creating files where thousands were just deleted costs more with
# every run (inode allocation scans recently deleted inodes), which times the file system
# rather than the tools.
BENCH_OUT=${BENCH_OUT:-$( [ -d /dev/shm ] && [ -w /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")}
out=$(mktemp -d -p "$BENCH_OUT")
trap 'rm -rf "$out"' EXIT
secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); awk "BEGIN { printf \"%.2f\", $e - $s }"; }
mira=(); vips=(); osr=()
for i in $(seq "$RUNS"); do
  rm -rf "${out:?}"/*
  m=$(secs "$WORKER" process "$BIG" --out "$out/mira" --format jpeg --tile-size 254 --overlap 1 --quality 80)
  v=$(secs vips dzsave "$BIG" "$out/vips" --tile-size 254 --overlap 1 --suffix .jpeg[Q=80])
  rm -rf "${out:?}"/*
  o=$(secs env Worker__SlideReader=OpenSlide "$WORKER" process "$BIG" --out "$out/mira" --format jpeg --tile-size 254 --overlap 1 --quality 80)
  echo "run $i: mira-worker ${m} s, vips dzsave ${v} s, mira-worker reading through OpenSlide ${o} s"
  mira+=("$m"); vips+=("$v"); osr+=("$o")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
mm=$(median "${mira[@]}"); vm=$(median "${vips[@]}"); om=$(median "${osr[@]}")
echo "| slide | runs | mira-worker median s | megapixels/s | vips dzsave median s | vips / mira |"
echo "|---|---|---|---|---|---|"
echo "| 12000×12000 JPEG TIFF | $RUNS | $mm | $(awk "BEGIN { printf \"%.1f\", 144 / $mm }") | $vm | $(awk "BEGIN { printf \"%.2f\", $vm / $mm }") |"
echo "| 12000×12000 JPEG TIFF, read through OpenSlide | $RUNS | $om | $(awk "BEGIN { printf \"%.1f\", 144 / $om }") | $vm | $(awk "BEGIN { printf \"%.2f\", $vm / $om }") |"
