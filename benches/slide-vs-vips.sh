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
# shellcheck source=benches/lib/slide-bench.sh
. benches/lib/slide-bench.sh
BIG="$TESTDATA/bench-12000x12000.tif"
make_slide "$BIG" 12000 6 30
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
mm=$(median "${mira[@]}"); vm=$(median "${vips[@]}"); om=$(median "${osr[@]}")
echo "| slide | runs | mira-worker median s | megapixels/s | vips dzsave median s | vips / mira |"
echo "|---|---|---|---|---|---|"
echo "| 12000×12000 JPEG TIFF | $RUNS | $mm | $(awk "BEGIN { printf \"%.1f\", 144 / $mm }") | $vm | $(awk "BEGIN { printf \"%.2f\", $vm / $mm }") |"
echo "| 12000×12000 JPEG TIFF, read through OpenSlide | $RUNS | $om | $(awk "BEGIN { printf \"%.1f\", 144 / $om }") | $vm | $(awk "BEGIN { printf \"%.2f\", $vm / $om }") |"
