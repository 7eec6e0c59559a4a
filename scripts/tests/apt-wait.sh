#!/usr/bin/env bash
# scripts/lib/apt.sh waits while another process holds apt's lock the way apt does (fcntl), says
# that it is waiting, and goes on once the lock is released.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/apt.sh
dir=$(mktemp -d)
trap 'kill "${holder:-}" 2>/dev/null || true; rm -rf "$dir"' EXIT
fail() { printf 'apt-wait: FAIL: %s\n' "$*" >&2; exit 1; }

# Holds an fcntl lock on $1 until $2 exists.
hold() {
  rm -f "$1.held"
  python3 - "$1" "$2" <<'PY' &
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o640)
fcntl.lockf(fd, fcntl.LOCK_EX)
open(sys.argv[1] + ".held", "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
PY
  holder=$!
  for _ in $(seq 1 100); do [ -e "$1.held" ] && return; sleep 0.05; done
  fail "the lock holder did not start"
}

# 1. Where we may, show that this holder blocks apt itself: apt-get update refuses at once.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -e /var/lib/apt/lists/lock ]; then
  hold /var/lib/apt/lists/lock "$dir/release-real"
  out=$(apt-get update -qq 2>&1 || true)
  touch "$dir/release-real"; wait "$holder" || true; rm -f /var/lib/apt/lists/lock.held
  grep -q 'Could not get lock' <<<"$out" || fail "apt-get update was not blocked by an fcntl lock: $out"
fi

# 2. The wait: held for about 3 s, then released.
lock="$dir/lock"
hold "$lock" "$dir/release"
MIRA_APT_WAIT_SECONDS=60 apt_wait_for_lock apt-wait-test "$lock" 2>"$dir/err" &
waiter=$!
sleep 3
kill -0 "$waiter" 2>/dev/null || fail "it did not wait for the lock: $(cat "$dir/err")"
grep -q "apt-wait-test: waiting for another apt or dpkg to finish (it holds $lock)" "$dir/err" \
  || fail "no wait message: $(cat "$dir/err")"
touch "$dir/release"
wait "$waiter" || fail "it gave up after the lock was released: $(cat "$dir/err")"
grep -q "is free after" "$dir/err" || fail "it did not say it went on: $(cat "$dir/err")"

# 3. A lock that stays held is given up on, with a message, after the bound.
wait "$holder" || true
rm -f "$dir/release"
hold "$lock" "$dir/release"
if MIRA_APT_WAIT_SECONDS=2 apt_wait_for_lock apt-wait-test "$lock" 2>"$dir/err"; then
  fail "it went on while the lock was held"
fi
grep -q "is still held after" "$dir/err" || fail "no give-up message: $(cat "$dir/err")"
touch "$dir/release"
echo "apt-wait: ok (waited while an fcntl lock was held, said so, went on after release; gave up on a bound)"
