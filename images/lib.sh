# shellcheck shell=bash
# What the images' step scripts share (sourced by images/*/steps.sh). The same functions run
# inside `docker build` and, through images/check.sh, on the CI host against the binaries the
# test suite built, so a step that breaks fails CI before it breaks an image build.
#
# Each image keeps its Debian/Ubuntu packages in one file, `images/<image>/packages`:
#
#   <stage>  <package>  [<soname> ...]
#
# `stage` is `build` (the builder stage) or `runtime` (the final image); the sonames after a
# runtime package are the libraries the image's binary links that this package provides. The
# Dockerfile installs each stage's list with `steps.sh apt <stage>`, nothing else.

set -euo pipefail

die() {
  echo "${STEP:-images}: $*" >&2
  exit 1
}

say() { echo "${STEP:-images}: $*"; }

# The packages of one stage (`build` or `runtime`) in a packages file.
packages_of() {
  local file=$1 stage=$2
  [ -f "$file" ] || die "no packages file $file"
  awk -v s="$stage" '$1 !~ /^#/ && NF >= 2 && $1 == s { print $2 }' "$file"
}

# The sonames the runtime packages of a packages file provide.
provided_sonames() {
  awk '$1 !~ /^#/ && $1 == "runtime" { for (i = 3; i <= NF; i++) print $i }' "$1"
}

# apt FILE STAGE: installs the stage's packages, without recommends, and leaves no lists behind.
# Versions are not pinned: the base image's tag is the pin, and its security updates apply
# when the image is rebuilt.
apt_install() {
  local file=$1 stage=$2 pkgs
  mapfile -t pkgs < <(packages_of "$file" "$stage")
  [ ${#pkgs[@]} -gt 0 ] || die "$file lists no $stage packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${pkgs[@]}"
  apt-get clean
  rm -rf /var/lib/apt/lists/*
}

# Libraries every glibc base image has (libc6, libgcc-s1): a binary may link these without
# declaring a package for them.
BASE_SONAMES=(linux-vdso.so.1 libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1
  libutil.so.1 libgcc_s.so.1 ld-linux-x86-64.so.2 ld-linux-aarch64.so.1)

# check_libraries BIN: every library BIN needs resolves here (run in the final image, and on
# the host or the builder stage).
check_libraries() {
  local bin=$1 out
  out=$(ldd "$bin" 2>&1) || die "ldd $bin failed: $out"
  if grep -q 'not found' <<<"$out"; then
    die "$bin needs libraries this system lacks: $(grep 'not found' <<<"$out" | awk '{print $1}' | tr '\n' ' ')"
  fi
}

# check_declared BIN PACKAGES: every library BIN links directly (its ELF NEEDED entries) is a
# base library or one a runtime package of PACKAGES provides, so the final image installs it.
# Needs readelf (binutils): the host and the builder stage have it, the final images do not.
check_declared() {
  local bin=$1 file=$2 needed lib missing=()
  command -v readelf >/dev/null || die "readelf (binutils) is needed to read $bin's libraries"
  needed=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
  [ -n "$needed" ] || die "$bin links no libraries at all: not a dynamically linked binary?"
  local declared
  declared=" ${BASE_SONAMES[*]} $(provided_sonames "$file" | tr '\n' ' ') "
  for lib in $needed; do
    [[ $declared == *" $lib "* ]] || missing+=("$lib")
  done
  [ ${#missing[@]} -eq 0 ] || die "$bin links ${missing[*]}, which no runtime package in $file provides (add the package and the soname there)"
}

# check_runs BIN ARGS...: BIN ARGS --help exits 0 (the subcommand and its flags exist).
check_runs() {
  local bin=$1 out
  shift
  out=$("$bin" "$@" --help 2>&1) || die "$(basename "$bin") $* --help failed: $out"
}

# check_not_root: the final image's user is not root.
check_not_root() {
  [ "$(id -u)" != 0 ] || die "the image runs as root: its USER must be a non-root user"
}

# check_no_compiler: nothing in the final image compiles code.
check_no_compiler() {
  local c
  for c in cc gcc g++ c++ clang ld rustc cargo; do
    if command -v "$c" >/dev/null; then die "the final image has a compiler or linker: $(command -v "$c")"; fi
  done
}

# check_ca_bundle: TLS to AWS verifies against the system's roots (rustls-native-certs).
check_ca_bundle() {
  [ -s /etc/ssl/certs/ca-certificates.crt ] || die "no CA bundle at /etc/ssl/certs/ca-certificates.crt (ca-certificates)"
}

# build_bin PACKAGE BIN OUT: BIN of the workspace's PACKAGE, a release build from the lockfile,
# installed as OUT/BIN (inside the image's builder stage only: CI never builds a release).
build_bin() {
  local repo
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  (cd "$repo" && cargo build --release --locked -p "$1" --bin "$2")
  install -D -m 0755 "${CARGO_TARGET_DIR:-$repo/target}/release/$2" "$3/$2"
}
