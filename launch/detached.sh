#!/usr/bin/env bash
# Runs a command on this host in its own session, so that it outlives the ssh connection
# that started it, and keeps its log, pid and exit status in ~/cfgdiff_jobs/NAME/.
#
#   launch/detached.sh start NAME COMMAND [ARGS...]   refuses if NAME is still running
#   launch/detached.sh status NAME                    prints 'running' or 'exited N'
#   launch/detached.sh wait NAME                      waits; exits with the job's status
#   launch/detached.sh signal NAME [SIGNAL]           sends SIGTERM (default) to the job
set -euo pipefail
ACTION=$1 NAME=$2
shift 2
DIR="$HOME/cfgdiff_jobs/$NAME"

running() {
  [[ -f "$DIR/pid" && ! -f "$DIR/exit_code" ]] && kill -0 "$(cat "$DIR/pid")" 2>/dev/null
}

case "$ACTION" in
  start)
    if running; then
      echo "detached: job $NAME is still running (pid $(cat "$DIR/pid")); not starting" \
           "another. Stop it with: launch/detached.sh signal $NAME" >&2
      exit 2
    fi
    mkdir -p "$DIR"
    rm -f "$DIR/exit_code" "$DIR/pid"
    # setsid + nohup: a dropped ssh session neither hangs up nor kills the job. The job
    # gets SIGTERM itself (exec), and the wrapper records its exit status when it ends.
    setsid nohup bash -c '"$@" & child=$!
      echo $child > "$0/pid"
      trap "kill -TERM $child 2>/dev/null" TERM
      while true; do
        wait $child; code=$?
        kill -0 $child 2>/dev/null || break  # interrupted by a signal: wait again
      done
      echo $code > "$0/exit_code"' "$DIR" "$@" > "$DIR/log" 2>&1 < /dev/null &
    for _ in $(seq 50); do [[ -f "$DIR/pid" ]] && break; sleep 0.1; done
    echo "detached: started $NAME on $(hostname) (pid $(cat "$DIR/pid")); log: $DIR/log"
    ;;
  status)
    if [[ -f "$DIR/exit_code" ]]; then echo "exited $(cat "$DIR/exit_code")"
    elif running; then echo running
    else echo "unknown (no job $NAME here)"; fi
    ;;
  wait)
    while [[ ! -f "$DIR/exit_code" ]]; do
      running || { sleep 1; [[ -f "$DIR/exit_code" ]] || { echo "detached: $NAME died" \
        "without an exit status" >&2; exit 1; }; }
      sleep 2
    done
    exit "$(cat "$DIR/exit_code")"
    ;;
  signal)
    running && kill "-${1:-TERM}" "$(cat "$DIR/pid")"
    ;;
  *)
    echo "detached: unknown action $ACTION (start, status, wait, signal)" >&2
    exit 2
    ;;
esac
