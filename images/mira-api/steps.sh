#!/usr/bin/env bash
# The mira-api image's steps, run by its Dockerfile and, for those that do not compile, by
# images/check.sh on the CI host against the debug `mira` and `web/dist` the suite built.
#
#   apt STAGE              install the `build` or `runtime` packages of images/mira-api/packages
#   web-deps WEBDIR        npm ci (the browser app's locked dependencies)
#   web-build WEBDIR       the browser app's production build, into WEBDIR/dist
#   build-bin OUT          the release `mira` from the lockfile, copied to OUT/mira
#   stage BIN WEBDIST ROOT lay out the final image's files under ROOT and check them
#   runtime                check the final image from inside it (run as its user)
#   layout                 print where the image keeps the binary and the app
#   commands               print these subcommands
set -euo pipefail
STEP=mira-api
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=images/lib.sh
. "$HERE/../lib.sh"
PACKAGES=$HERE/packages

# Where the final image keeps things; the Dockerfile's ENTRYPOINT and Web__Dir name the same
# paths (images/check.sh compares them).
BIN_PATH=/usr/local/bin/mira
WEB_PATH=/usr/share/mira/web
# The processes the image runs (DESIGN §2): the API with `serve`, the other roles alone, and
# the migration task. Each must exist in the binary.
COMMANDS=(serve relay projector handlers migrate)

# check_web DIR: the built app is whole: index.html, and every asset it loads is there.
check_web() {
  local dir=$1 ref missing=()
  [ -f "$dir/index.html" ] || die "no index.html in $dir (the browser app's build, web/dist)"
  compgen -G "$dir/assets/*.js" >/dev/null || die "no JavaScript in $dir/assets"
  while read -r ref; do
    [ -f "$dir/$ref" ] || missing+=("$ref")
  done < <(grep -o '\(src\|href\)="/assets/[^"]*"' "$dir/index.html" | sed 's/.*="\/\(.*\)"/\1/')
  [ ${#missing[@]} -eq 0 ] || die "index.html loads files the build lacks: ${missing[*]}"
}

# check_migrations_embedded BIN REPO: `mira migrate` carries every migration in the binary
# (eventlog/build.rs embeds them), so the image needs no migrations/ directory.
check_migrations_embedded() {
  local bin=$1 repo=$2 f patterns found
  patterns=$(mktemp)
  for f in "$repo"/migrations/*.sql; do head -n 1 "$f"; done | sort -u > "$patterns"
  found=$(grep -aoF -f "$patterns" "$bin" | sort -u | wc -l)
  local want
  want=$(wc -l < "$patterns")
  rm -f "$patterns"
  [ "$found" -eq "$want" ] || die "$bin carries $found of the $want migrations in $repo/migrations"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  apt)
    [ $# -eq 1 ] || die "usage: steps.sh apt build|runtime"
    apt_install "$PACKAGES" "$1"
    ;;
  web-deps)
    [ $# -eq 1 ] || die "usage: steps.sh web-deps WEBDIR"
    (cd "$1" && npm ci --no-audit --no-fund --loglevel=error)
    ;;
  web-build)
    [ $# -eq 1 ] || die "usage: steps.sh web-build WEBDIR"
    (cd "$1" && npm run --silent build)
    check_web "$1/dist"
    ;;
  build-bin)
    [ $# -eq 1 ] || die "usage: steps.sh build-bin OUT"
    build_bin mira-cli mira "$1"
    ;;
  stage)
    [ $# -eq 3 ] || die "usage: steps.sh stage BIN WEBDIST ROOT"
    bin=$1 web=$2 root=$3
    repo=$(cd "$HERE/../.." && pwd)
    if [ ! -f "$bin" ] || [ ! -x "$bin" ]; then die "no executable $bin (build mira first)"; fi
    [ -d "$web" ] || die "no browser app at $web (build web/ first: npm run build)"
    check_web "$web"
    rm -rf "${root:?}$WEB_PATH"
    install -D -m 0755 "$bin" "$root$BIN_PATH"
    mkdir -p "$root$WEB_PATH"
    cp -R "$web/." "$root$WEB_PATH/"
    chmod -R a+rX,go-w "$root$WEB_PATH"
    check_web "$root$WEB_PATH"
    check_libraries "$root$BIN_PATH"
    check_declared "$root$BIN_PATH" "$PACKAGES"
    version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml")
    got=$("$root$BIN_PATH" --version)
    [ "$got" = "mira $version" ] || die "mira --version says \"$got\", the workspace is $version"
    for c in "${COMMANDS[@]}"; do check_runs "$root$BIN_PATH" "$c"; done
    check_migrations_embedded "$root$BIN_PATH" "$repo"
    say "staged $(basename "$bin") and $(find "$root$WEB_PATH" -type f | wc -l) files of the app under $root"
    ;;
  runtime)
    [ $# -eq 0 ] || die "usage: steps.sh runtime"
    check_not_root
    check_no_compiler
    check_ca_bundle
    check_libraries "$BIN_PATH"
    "$BIN_PATH" --version >/dev/null || die "$BIN_PATH --version failed"
    for c in "${COMMANDS[@]}"; do check_runs "$BIN_PATH" "$c"; done
    [ "${Web__Dir:-}" = "$WEB_PATH" ] || die "Web__Dir is \"${Web__Dir:-}\", the app is at $WEB_PATH"
    check_web "$WEB_PATH"
    say "the final image checks out: $("$BIN_PATH" --version), user $(id -un)"
    ;;
  layout)
    printf 'bin=%s\nweb=%s\n' "$BIN_PATH" "$WEB_PATH"
    ;;
  commands)
    echo apt web-deps web-build build-bin stage runtime layout commands
    ;;
  *)
    die "unknown step \"$cmd\" (steps: $("$0" commands))"
    ;;
esac
