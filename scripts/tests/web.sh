#!/usr/bin/env bash
# The browser app's checks (web/): types and lint, unit tests, the production build and its
# size budget, then the end-to-end test in Debian's Chromium against a real `mira dev` (the
# suite has built `mira` and `mira-worker`). Screenshots go to web/test-results/screenshots.
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "web: $*" >&2; exit 1; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/mira-target}
cd web
npm run --silent check
npm run --silent test
npm run --silent build > /dev/null
# The app's budget: 300 kB gzip for its own JavaScript and CSS (OpenSeadragon, loaded by the
# viewer alone, is its own chunk and not counted).
app_bytes=0
for f in dist/assets/*.js dist/assets/*.css; do
  case "$(basename "$f")" in openseadragon-*) continue ;; esac
  app_bytes=$(( app_bytes + $(gzip -9c "$f" | wc -c) ))
done
osd_bytes=$(gzip -9c dist/assets/openseadragon-*.js | wc -c)
echo "web: bundle: the app $(( app_bytes / 1024 )) kB gzip (budget 300 kB), OpenSeadragon $(( osd_bytes / 1024 )) kB gzip"
[ "$app_bytes" -le $(( 300 * 1024 )) ] || fail "the app's bundle is over its 300 kB gzip budget"
{ [ -x "$CARGO_TARGET_DIR/debug/mira" ] && [ -x "$CARGO_TARGET_DIR/debug/mira-worker" ]; } || \
  fail "mira and mira-worker are not built in $CARGO_TARGET_DIR (the Rust suite builds them)"
MIRA_BIN="$CARGO_TARGET_DIR/debug/mira" MIRA_SCREENSHOTS="$PWD/test-results/screenshots" npm run --silent e2e
echo "web: ok (screenshots in web/test-results/screenshots)"
