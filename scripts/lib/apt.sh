# shellcheck shell=bash
# Installing Debian packages without giving up when another apt or dpkg holds its lock, as on a
# fresh VM where unattended upgrades run at boot. Sourced by scripts/bootstrap and scripts/dev.
#
#   apt_install PREFIX PACKAGE...
#
# `apt-get install` waits for the dpkg lock itself (DPkg::Lock::Timeout), but `apt-get update`
# does not wait for the lists lock: that one is waited for here, saying so, for at most
# MIRA_APT_WAIT_SECONDS (default 600). apt takes its locks with fcntl, so they are tested with
# fcntl too (flock(1) would neither see nor block them).

MIRA_APT_WAIT_SECONDS=${MIRA_APT_WAIT_SECONDS:-600}
MIRA_APT_LISTS_LOCK=${MIRA_APT_LISTS_LOCK:-/var/lib/apt/lists/lock}

# Exit 0 when `$1` is locked by another process (fcntl), 1 when it is free or missing.
apt_lock_held() {
  python3 - "$1" <<'PY'
import fcntl, os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDWR)
except OSError:
    sys.exit(1)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    sys.exit(0)
fcntl.lockf(fd, fcntl.LOCK_UN)
sys.exit(1)
PY
}

# Waits until `$2` (a lock file) is free; `$1` prefixes the messages.
apt_wait_for_lock() {
  local prefix=$1 lock=$2 waited=0
  while apt_lock_held "$lock"; do
    if [ "$waited" -eq 0 ]; then
      printf '%s: waiting for another apt or dpkg to finish (it holds %s); giving up after %s s\n' \
        "$prefix" "$lock" "$MIRA_APT_WAIT_SECONDS" >&2
    elif [ $((waited % 30)) -eq 0 ]; then
      printf '%s: still waiting for %s (%s s)\n' "$prefix" "$lock" "$waited" >&2
    fi
    if [ "$waited" -ge "$MIRA_APT_WAIT_SECONDS" ]; then
      printf '%s: %s is still held after %s s; run the command again once the other apt is done\n' \
        "$prefix" "$lock" "$waited" >&2
      return 1
    fi
    sleep 2
    waited=$((waited + 2))
  done
  if [ "$waited" -gt 0 ]; then
    printf '%s: %s is free after %s s; going on\n' "$prefix" "$lock" "$waited" >&2
  fi
}

# `apt-get update`, waiting for the lists lock first. Where the lock cannot be tested (not
# root), or another apt takes it in between, a refusal for the lock is waited out the same way.
apt_update() {
  local prefix=$1 sudo=${SUDO:-} waited=0 out
  apt_wait_for_lock "$prefix" "$MIRA_APT_LISTS_LOCK" || return 1
  while ! out=$($sudo apt-get update -qq 2>&1); do
    if ! grep -q 'Could not get lock' <<<"$out"; then
      printf '%s\n' "$out" >&2
      return 1
    fi
    if [ "$waited" -ge "$MIRA_APT_WAIT_SECONDS" ]; then
      printf '%s: apt-get update could not get its lock for %s s; run the command again once the other apt is done\n' \
        "$prefix" "$waited" >&2
      return 1
    fi
    [ "$waited" -eq 0 ] && printf '%s: waiting for another apt or dpkg to finish (apt-get update: %s)\n' \
      "$prefix" "$(grep -m1 'Could not get lock' <<<"$out")" >&2
    sleep 2
    waited=$((waited + 2))
  done
}

apt_install() {
  local prefix=$1 sudo=${SUDO:-}
  shift
  printf '%s: installing Debian packages: %s\n' "$prefix" "$*" >&2
  apt_update "$prefix" || return 1
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout="$MIRA_APT_WAIT_SECONDS" "$@" >/dev/null
}
