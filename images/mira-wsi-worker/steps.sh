#!/usr/bin/env bash
# The mira-wsi-worker image's steps, run by its Dockerfile and, for those that do not
# compile, by images/check.sh on the CI host against the debug `mira-worker` the suite built.
#
#   apt STAGE          install the `build` or `runtime` packages of images/mira-wsi-worker/packages
#   build-bin OUT      the release `mira-worker` from the lockfile, copied to OUT/mira-worker
#   stage BIN ROOT     lay out the final image's files under ROOT and check them
#   kernels BIN        compile every CUDA kernel with the NVRTC the loader finds (no GPU needed)
#   runtime NVRTC      check the final image from inside it (run as its user): NVRTC is the
#                      version NVRTC names (the one CI pins) and compiles every kernel
#   layout             print where the image keeps the binary
#   commands           print these subcommands
set -euo pipefail
STEP=mira-wsi-worker
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=images/lib.sh
. "$HERE/../lib.sh"
PACKAGES=$HERE/packages

# Where the final image keeps the binary; the Dockerfile's ENTRYPOINT names the same path.
BIN_PATH=/usr/local/bin/mira-worker
# The subcommands the image is run with: `run` is the queue consumer (DESIGN §2).
COMMANDS=(run process kernels inspect)

# kernels BIN: NVRTC compiles every kernel to PTX and CUBIN, on the CPU path (MIRA_GPU=off:
# no driver, no GPU; a GPU node checks them against the CPU at start).
kernels() {
  local out
  out=$(MIRA_GPU=off "$1" kernels 2>&1) || die "the kernels do not compile with this NVRTC: $out"
  say "$(head -n 1 <<<"$out"): $(grep -c ': \(ptx\|cubin\) for' <<<"$out") kernel images compiled"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  apt)
    [ $# -eq 1 ] || die "usage: steps.sh apt build|runtime"
    apt_install "$PACKAGES" "$1"
    ;;
  build-bin)
    [ $# -eq 1 ] || die "usage: steps.sh build-bin OUT"
    build_bin mira-gpu-worker mira-worker "$1"
    ;;
  stage)
    [ $# -eq 2 ] || die "usage: steps.sh stage BIN ROOT"
    bin=$1 root=$2
    repo=$(cd "$HERE/../.." && pwd)
    if [ ! -f "$bin" ] || [ ! -x "$bin" ]; then die "no executable $bin (build mira-worker first)"; fi
    install -D -m 0755 "$bin" "$root$BIN_PATH"
    check_libraries "$root$BIN_PATH"
    check_declared "$root$BIN_PATH" "$PACKAGES"
    version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml")
    got=$("$root$BIN_PATH" --version)
    [ "$got" = "mira-worker $version" ] || die "mira-worker --version says \"$got\", the workspace is $version"
    for c in "${COMMANDS[@]}"; do check_runs "$root$BIN_PATH" "$c"; done
    say "staged $(basename "$bin") under $root"
    ;;
  kernels)
    [ $# -eq 1 ] || die "usage: steps.sh kernels BIN"
    kernels "$1"
    ;;
  runtime)
    [ $# -eq 1 ] || die "usage: steps.sh runtime NVRTC_VERSION"
    want=$1
    check_not_root
    check_no_compiler
    check_ca_bundle
    check_libraries "$BIN_PATH"
    "$BIN_PATH" --version >/dev/null || die "$BIN_PATH --version failed"
    for c in "${COMMANDS[@]}"; do check_runs "$BIN_PATH" "$c"; done
    # The CUDA runtime image's NVRTC (cuda-nvrtc-<major>-<minor>) is the one CI compiles the
    # kernels with (tools/requirements.txt pins nvidia-cuda-nvrtc).
    have=$(dpkg-query -W -f '${Package} ${Version}\n' 'cuda-nvrtc-*' 2>/dev/null | grep -v -- '-dev ' || true)
    [[ $have == *" $want-"* || $have == *" $want" ]] || \
      die "the image's NVRTC is \"${have:-not installed}\", the kernels are checked with $want"
    kernels "$BIN_PATH"
    say "the final image checks out: $("$BIN_PATH" --version), NVRTC ${have#* }, user $(id -un)"
    ;;
  layout)
    printf 'bin=%s\n' "$BIN_PATH"
    ;;
  commands)
    echo apt build-bin stage kernels runtime layout commands
    ;;
  *)
    die "unknown step \"$cmd\" (steps: $("$0" commands))"
    ;;
esac
