#!/usr/bin/env bash
# Results as layers against results as a DeepZoom tree (issue 40, ADR 0036), on the CPU, on a
# 24000×24000 pyramidal JPEG TIFF made once from CMU-1-Small-Region with vips (as
# benches/slide-vs-vips.sh makes its 12k slide), interleaved runs:
#   * `mira-worker process --layers` (what a job stores: one pyramidal BigTIFF, 256-pixel JPEG
#     tiles at quality 80) against `vips tiffsave --tile --pyramid --compression jpeg` on the
#     same slide (the writing part; above 1.0 in the last column: mira is faster);
#   * `mira-worker process` writing today's tree (254/1, JPEG 80) against the same;
#   * the objects each leaves (what a job stores: one S3 request per object for a tree, one per
#     part for a layer), its bytes, and the peak resident memory of the layers' run.
# Prints each run, then the medians and ratios.
#
#   benches/layers-vs-tree.sh [RUNS]     (default 3; needs scripts/bootstrap's test data)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
[ -x /usr/bin/time ] || { echo "layers-vs-tree: needs /usr/bin/time for the peak memory (apt-get install time)" >&2; exit 1; }
# shellcheck source=benches/lib/slide-bench.sh
. benches/lib/slide-bench.sh
BIG="$TESTDATA/bench-24000x24000.tif"
make_slide "$BIG" 24000 11 99
layers=(); tree=(); vips=(); rss=()
for i in $(seq "$RUNS"); do
  rm -rf "${out:?}"/*
  l=$(secs /usr/bin/time -f %M -o "$out/rss" "$WORKER" process "$BIG" --out "$out/layers" --layers --quality 80 --no-tissue)
  r=$(cat "$out/rss")
  lobjects=$(find "$out/layers" -type f | wc -l); lbytes=$(du -sb "$out/layers" | cut -f1)
  rm -rf "$out/layers"
  t=$(secs "$WORKER" process "$BIG" --out "$out/tree" --format jpeg --tile-size 254 --overlap 1 --quality 80 --no-tissue)
  tobjects=$(find "$out/tree" -type f | wc -l); tbytes=$(du -sb "$out/tree" | cut -f1)
  rm -rf "$out/tree"
  v=$(secs vips tiffsave "$BIG" "$out/vips.tif" --tile --tile-width 256 --tile-height 256 --pyramid --compression jpeg --Q 80 --bigtiff)
  rm -f "$out/vips.tif"
  echo "run $i: layers ${l} s (${lobjects} objects, ${lbytes} bytes, peak ${r} KiB), tree ${t} s (${tobjects} objects, ${tbytes} bytes), vips tiffsave ${v} s"
  layers+=("$l"); tree+=("$t"); vips+=("$v"); rss+=("$r")
done
lm=$(median "${layers[@]}"); tm=$(median "${tree[@]}"); vm=$(median "${vips[@]}"); rm_=$(median "${rss[@]}")
echo "| 24000×24000, $RUNS runs | median s | objects | vips tiffsave / this |"
echo "|---|---|---|---|"
echo "| mira-worker, layers | $lm | $lobjects (peak RSS $((rm_ / 1024)) MiB) | $(awk "BEGIN { printf \"%.2f\", $vm / $lm }") |"
echo "| mira-worker, tree (254/1) | $tm | $tobjects | $(awk "BEGIN { printf \"%.2f\", $vm / $tm }") |"
echo "| vips tiffsave --pyramid (JPEG 80) | $vm | 1 | 1.00 |"
