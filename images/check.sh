#!/usr/bin/env bash
# The container images (images/*/Dockerfile), checked on a host with no Docker daemon and
# without a second release build:
#
#  1. Each Dockerfile agrees with what it runs and what CI uses: every script it runs exists
#     and is executable, every step it names is one its steps.sh has, it installs packages only
#     through `steps.sh apt <stage>` and every stage of its packages file; it runs as a
#     non-root user, its ENTRYPOINT, Web__Dir and CMD are what the binary and steps.sh say,
#     it takes MIRA_COMMIT; its Rust is CI's, the worker's builder packages are
#     scripts/bootstrap's, its CUDA is the one gpu-worker's cudarc is built for, its NVRTC is
#     tools/requirements.txt's pin, its Node is what web/package.json asks for. .dockerignore
#     keeps the build outputs out and nothing a build reads.
#  2. The steps that do not compile run here, as in the image builds, against the debug
#     binaries the test suite built in $CARGO_TARGET_DIR and the app scripts/tests/web.sh built
#     in web/dist: the images' file layout, their libraries (each one the binary links is
#     provided by a package the image installs), the commands the images run, the embedded
#     migrations, and NVRTC compiling every kernel.
#  3. The checks catch what they are there for: a missing binary, a broken app build and an
#     undeclared library each fail.
#
# Run it after the Rust suite and scripts/tests/web.sh (it reads what they built). About five
# seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
T=${CARGO_TARGET_DIR:-/var/tmp/mira-target}
fail() {
  echo "images: $*" >&2
  exit 1
}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mira-images.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# The Dockerfile's last stage (after its last FROM).
final_stage() { awk '/^FROM /{buf=""} {buf = buf $0 "\n"} END{printf "%s", buf}' "$1"; }
# The values a `key=value` layout line of `steps.sh layout` gives.
layout() { "images/$1/steps.sh" layout | sed -n "s/^$2=//p"; }
# major.minor of a version.
minor() { sed -n 's/^\([0-9]*\.[0-9]*\).*/\1/p' <<<"$1"; }
# Whether version $1 (major.minor) is at least $2 (major.minor).
at_least() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]; }
# The JSON-array arguments of a Dockerfile instruction (ENTRYPOINT, CMD) in the final stage,
# one per line.
exec_form() {
  final_stage "$1" | sed -n "s/^$2 \(\[.*\]\)$/\1/p" | tail -n 1 |
    python3 -c 'import json, sys; [print(a) for a in json.loads(sys.stdin.read() or "[]")]'
}

# --- 1. The Dockerfiles agree with their scripts and with CI --------------------------------
host_rust=$(rustc --version | awk '{print $2}')
bootstrap_packages=" $(sed -n 's/^for p in \(.*\); do$/\1/p' scripts/bootstrap | head -n 1) "
[ "$bootstrap_packages" != "  " ] || fail "cannot find scripts/bootstrap's Debian package list (the 'for p in …; do' line)"

for image in mira-api mira-wsi-worker; do
  dir=images/$image df=images/$image/Dockerfile
  [ -f "$df" ] || fail "$df is missing"
  # Every script it runs exists and is executable (in the final stage through a bind mount of
  # images/ at /run/images).
  while read -r s; do
    [ -x "$s" ] || fail "$df runs $s, which is missing or not executable"
  done < <(grep -o '\(/run/\)\?images/[A-Za-z0-9_./-]*\.sh' "$df" | sed 's|^/run/||' | sort -u)
  # Every step it names is one of its steps.sh.
  steps=" $("$dir/steps.sh" commands) "
  while read -r step; do
    [[ $steps == *" $step "* ]] || fail "$df runs '$image/steps.sh $step', a step steps.sh does not have ($steps)"
  done < <(grep -o "$image/steps\.sh [a-z-]*" "$df" | awk '{print $2}' | sort -u)
  grep -q "$image/steps\.sh" "$df" || fail "$df runs none of $dir/steps.sh"
  # Packages only through `steps.sh apt <stage>`, and every stage of the packages file.
  if grep -Eq '(apt-get|apt|apk|dnf|yum)[[:space:]]+(-[^[:space:]]+[[:space:]]+)*install' "$df"; then
    fail "$df installs packages itself: list them in $dir/packages and run 'steps.sh apt <stage>'"
  fi
  installed=$(grep -o "$image/steps\.sh apt [a-z]*" "$df" | awk '{print $3}' | sort | tr '\n' ' ')
  listed=$(awk '$1 !~ /^#/ && NF >= 2 {print $1}' "$dir/packages" | sort -u | tr '\n' ' ')
  [ "$installed" = "$listed" ] || fail "$df installs the package stages '$installed', $dir/packages lists '$listed'"
  # Cargo runs only inside steps.sh, from the lockfile.
  if grep -Eq '^[^#]*\bcargo[[:space:]]+(build|install)' "$df"; then fail "$df runs cargo itself: build in steps.sh build-bin"; fi
  grep -q '^    build_bin ' "$dir/steps.sh" || fail "$dir/steps.sh build-bin does not build with build_bin"
  grep -q 'cargo build --release --locked' images/lib.sh || fail "images/lib.sh build_bin does not build --release --locked"
  # The final stage: a numeric non-root user, the binary as ENTRYPOINT, MIRA_COMMIT.
  final=$(final_stage "$df")
  user=$(grep '^USER ' <<<"$final" | tail -n 1 | awk '{print $2}')
  [[ $user =~ ^[0-9]+(:[0-9]+)?$ && ${user%%:*} != 0 ]] || \
    fail "$df's final stage runs as '${user:-root}': it must end with a numeric non-root USER (Kubernetes' runAsNonRoot checks the number)"
  entry=$(exec_form "$df" ENTRYPOINT | paste -sd " " -)
  [ "$entry" = "$(layout "$image" bin)" ] || fail "$df's ENTRYPOINT is '$entry', steps.sh stages the binary at $(layout "$image" bin)"
  [[ $final == *$'\nARG MIRA_COMMIT'* && $final == *$'\nENV MIRA_COMMIT=${MIRA_COMMIT}\n'* ]] || \
    fail "$df's final stage must take ARG MIRA_COMMIT and set ENV MIRA_COMMIT=\${MIRA_COMMIT} (GET /api/version answers it)"
  # Rust: the toolchain CI builds and tests with.
  rust_tags=$(sed -n 's/^FROM rust:\([0-9][0-9.]*\)[-@ ].*/\1/p' "$df")
  [ -n "$rust_tags" ] || fail "$df builds with no rust:<version> image"
  for v in $rust_tags; do
    [ "$(minor "$v")" = "$(minor "$host_rust")" ] || fail "$df builds with Rust $v, CI with $host_rust: move the image's rust tag"
  done
done

# mira-api: the app where Web__Dir says, Node as web/package.json asks.
web_env=$(final_stage images/mira-api/Dockerfile | sed -n 's/^ENV Web__Dir=//p')
[ "$web_env" = "$(layout mira-api web)" ] || fail "images/mira-api/Dockerfile sets Web__Dir=$web_env, steps.sh stages the app at $(layout mira-api web)"
node_tag=$(sed -n 's/^FROM node:\([0-9][0-9.]*\)-.*/\1/p' images/mira-api/Dockerfile)
node_wants=$(sed -n 's/.*"node": *">=\([0-9.]*\)".*/\1/p' web/package.json)
if [ -z "$node_tag" ] || [ -z "$node_wants" ] || ! at_least "$(minor "$node_tag")" "$(minor "$node_wants")"; then
  fail "images/mira-api/Dockerfile builds the app with node:${node_tag:-?}, web/package.json asks for >=$node_wants"
fi

# mira-wsi-worker: CUDA as cudarc is built for, NVRTC as CI pins it, the builder as CI builds.
wdf=images/mira-wsi-worker/Dockerfile
cuda_tag=$(sed -n 's|^FROM nvidia/cuda:\([0-9.]*\)-runtime-.*|\1|p' "$wdf")
cudarc_cuda=$(grep -o '"cuda-[0-9]\{5\}"' gpu-worker/Cargo.toml | tr -dc '0-9')
[ -n "$cuda_tag" ] || fail "$wdf's final stage is not an nvidia/cuda:<version>-runtime-… image"
[ "$(minor "$cuda_tag")" = "$((10#${cudarc_cuda:0:2})).$((10#${cudarc_cuda:2:2} / 10))" ] || \
  fail "$wdf runs on CUDA $cuda_tag, gpu-worker's cudarc is built for cuda-$cudarc_cuda"
nvrtc_arg=$(sed -n 's/^ARG NVRTC_VERSION=//p' "$wdf")
nvrtc_pin=$(sed -n 's/^nvidia-cuda-nvrtc==//p' tools/requirements.txt)
[[ -n $nvrtc_arg && $nvrtc_arg == "$nvrtc_pin" ]] || \
  fail "$wdf checks NVRTC ${nvrtc_arg:-(no ARG NVRTC_VERSION)}, CI compiles the kernels with nvidia-cuda-nvrtc==$nvrtc_pin (tools/requirements.txt)"
[ "$(minor "$nvrtc_arg")" = "$(minor "$cuda_tag")" ] || fail "$wdf: NVRTC $nvrtc_arg is not CUDA $cuda_tag's"
while read -r p; do
  [[ $bootstrap_packages == *" $p "* ]] || fail "images/mira-wsi-worker/packages builds with $p, which scripts/bootstrap does not install for CI"
done < <(awk '$1 == "build" {print $2}' images/mira-wsi-worker/packages)

# .dockerignore: the build outputs out, everything a build reads in. A pattern excludes a path
# when it matches the path or a directory above it (`*` and `**` as Docker reads them, near
# enough: neither has a `!` exception today).
[ -f .dockerignore ] || fail ".dockerignore is missing"
if grep -q '^!' .dockerignore; then fail ".dockerignore has '!' exceptions, which this check does not read"; fi
mapfile -t ignore < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e 's|^/||' -e 's|/$||' .dockerignore | grep -v '^$')
ignored() {
  local path=$1 p prefix
  for p in "${ignore[@]}"; do
    prefix=$path
    while :; do
      # shellcheck disable=SC2053 # the patterns are globs on purpose
      [[ $prefix == $p || ( $p == '**/'* && $prefix == ${p#'**/'} ) ]] && return 0
      [[ $prefix == */* ]] || break
      prefix=${prefix%/*}
    done
  done
  return 1
}
for out in .git target web/node_modules pulumi/node_modules web/dist .mira gateway/target; do
  ignored "$out" || fail ".dockerignore lets $out into the build context"
done
members=$(sed -n '/^members = \[/,/^\]/s/^ *"\([^"]*\)",*$/\1/p' Cargo.toml)
for need in Cargo.toml Cargo.lock images/lib.sh images/mira-api/steps.sh images/mira-wsi-worker/packages \
  web/package.json web/package-lock.json web/index.html web/src bus/topology.json \
  gpu-worker/kernels migrations/0001_event_log.sql $(for m in $members; do echo "$m/Cargo.toml" "$m/src"; done); do
  [ -e "$need" ] || fail "$need does not exist (update this list)"
  if ignored "$need"; then fail ".dockerignore keeps $need, which the image builds read, out of the build context"; fi
done
echo "images: the Dockerfiles agree with their scripts, packages and CI's toolchains"

# --- 2. The steps that do not compile, on the host -------------------------------------------
mira=$T/debug/mira
worker=$T/debug/mira-worker
[[ -x $mira && -x $worker ]] || fail "$mira and $worker are not built (run after the Rust suite)"
[ -f web/dist/index.html ] || fail "web/dist is not built (run after scripts/tests/web.sh)"
if [ -z "${MIRA_NVRTC_DIR:-}" ] && [ -f .mira-test.env ]; then
  set -a
  # shellcheck source=/dev/null # written by scripts/bootstrap
  . ./.mira-test.env
  set +a
fi
[ -n "${MIRA_NVRTC_DIR:-}" ] || fail "MIRA_NVRTC_DIR is not set (scripts/bootstrap writes it to .mira-test.env)"

images/mira-api/steps.sh stage "$mira" web/dist "$tmp/api"
images/mira-wsi-worker/steps.sh stage "$worker" "$tmp/worker"
LD_LIBRARY_PATH="$MIRA_NVRTC_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  images/mira-wsi-worker/steps.sh kernels "$tmp/worker$(layout mira-wsi-worker bin)"
# The default commands parse: the CMD's subcommand and flags exist.
for image in mira-api mira-wsi-worker; do
  case $image in mira-api) root=$tmp/api ;; *) root=$tmp/worker ;; esac
  mapfile -t cmd < <(exec_form "images/$image/Dockerfile" CMD)
  [ ${#cmd[@]} -gt 0 ] || fail "images/$image/Dockerfile has no CMD"
  out=$("$root$(layout "$image" bin)" "${cmd[@]}" --help 2>&1) || fail "$image's CMD (${cmd[*]}) does not parse: $out"
done
echo "images: the steps run on the host against the suite's binaries"

# --- 3. The checks catch what they are there for ---------------------------------------------
expect_fail() {
  local what=$1 out
  shift
  if out=$("$@" 2>&1); then fail "a check missed $what: '$*' passed"; fi
  grep -q . <<<"$out" || fail "a check failed on $what without saying why"
}
mkdir -p "$tmp/no-app" "$tmp/broken-app/assets"
echo 'console.log(1)' > "$tmp/broken-app/assets/app.js"
echo '<script type="module" src="/assets/gone-1a2b.js"></script>' > "$tmp/broken-app/index.html"
grep -v libopenslide images/mira-wsi-worker/packages > "$tmp/undeclared"
expect_fail "a missing binary" images/mira-api/steps.sh stage "$tmp/no-such-mira" web/dist "$tmp/x"
expect_fail "a missing worker binary" images/mira-wsi-worker/steps.sh stage "$tmp/no-such-worker" "$tmp/x"
expect_fail "an app without index.html" images/mira-api/steps.sh stage "$mira" "$tmp/no-app" "$tmp/x"
expect_fail "an app that loads a file it lacks" images/mira-api/steps.sh stage "$mira" "$tmp/broken-app" "$tmp/x"
# shellcheck disable=SC2016 # expanded by the inner shell
expect_fail "a library no package provides" bash -c '. images/lib.sh; check_declared "$1" "$2"' _ "$worker" "$tmp/undeclared"
expect_fail "a Dockerfile CMD that does not parse" "$mira" serve --no-such-flag --help
echo "images: a broken step fails"

echo "images: ok in $(( $(date +%s) - t0 )) s"
