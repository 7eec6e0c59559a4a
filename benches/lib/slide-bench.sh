# shellcheck shell=bash
# What the slide benchmarks share (sourced): a pyramidal JPEG TIFF made once from
# CMU-1-Small-Region by tiling it, the release mira-worker, an output directory on a tmpfs, a
# timer and a median.

TESTDATA=${MIRA_TESTDATA:-${XDG_CACHE_HOME:-$HOME/.cache}/mira-testdata}
SRC="$TESTDATA/CMU-1-Small-Region.svs"
[ -f "$SRC" ] || scripts/bootstrap
command -v vips >/dev/null || scripts/bootstrap

# make_slide PATH SIZE ACROSS COPIES: a SIZE×SIZE crop of COPIES copies of the CMU region,
# ACROSS to a row, saved as a tiled pyramidal JPEG TIFF (BigTIFF), unless PATH exists.
make_slide() {
  local path=$1 size=$2 across=$3 copies=$4 tmp
  [ -f "$path" ] && return
  tmp=$(mktemp -d)
  vips openslideload "$SRC" "$tmp/rgba.v"
  vips flatten "$tmp/rgba.v" "$tmp/cmu.v" --background 255
  vips arrayjoin "$(for _ in $(seq "$copies"); do printf '%s ' "$tmp/cmu.v"; done)" "$tmp/joined.v" --across "$across"
  vips crop "$tmp/joined.v" "$tmp/crop.v" 0 0 "$size" "$size"
  vips tiffsave "$tmp/crop.v" "$path" --tile --pyramid --compression jpeg --Q 90 --tile-width 256 --tile-height 256
  rm -rf "$tmp"
}

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/mira-target}
cargo build --quiet --release --locked -p mira-gpu-worker --bin mira-worker
# shellcheck disable=SC2034 # read by the scripts that source this
WORKER="$CARGO_TARGET_DIR/release/mira-worker"
# Output goes to a tmpfs where there is one (BENCH_OUT overrides): a tree is thousands of files,
# and on ext4 creating files where thousands were just deleted costs more with every run (inode
# allocation scans recently deleted inodes), which times the file system rather than the tools.
BENCH_OUT=${BENCH_OUT:-$( [ -d /dev/shm ] && [ -w /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")}
out=$(mktemp -d -p "$BENCH_OUT")
trap 'rm -rf "$out"' EXIT

secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); awk "BEGIN { printf \"%.2f\", $e - $s }"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
