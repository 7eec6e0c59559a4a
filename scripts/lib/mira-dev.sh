# shellcheck shell=bash
# Starting and stopping a throwaway `mira dev` for the scripts' own tests. Source it; it
# needs $mira (the binary) and a fail function. `mira_dev_start WORK PORT` runs `mira dev` in
# WORK/dev with its runtime record under WORK/run, logs to WORK/dev.log, waits up to 60 s for
# its banner and sets $dev_pid; `mira_dev_stop` interrupts it as Ctrl-C would.

dev_pid=
mira_dev_start() {
  local work=$1 port=$2
  export XDG_RUNTIME_DIR=$work/run
  mkdir -p "$XDG_RUNTIME_DIR" "$work/dev"
  # shellcheck disable=SC2154 # $mira is set by the script that sources this file (see above).
  (cd "$work/dev" && exec "$mira" dev --listen "127.0.0.1:$port" > "$work/dev.log" 2>&1) &
  dev_pid=$!
  for _ in $(seq 1 600); do
    grep -q "Ctrl-C" "$work/dev.log" 2>/dev/null && return 0
    kill -0 "$dev_pid" 2>/dev/null || { cat "$work/dev.log" >&2; fail "mira dev exited"; }
    sleep 0.1
  done
  cat "$work/dev.log" >&2
  fail "mira dev did not come up within 60 s"
}

mira_dev_stop() {
  if [ -n "$dev_pid" ] && kill -0 "$dev_pid" 2>/dev/null; then
    kill -INT "$dev_pid"
    wait "$dev_pid" || return 1
  fi
  dev_pid=
}
