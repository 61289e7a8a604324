#!/usr/bin/env bash
# Stop everything workflow/cluster/*-up.sh started from STATE_DIR, newest first: workflow/cluster/down.sh STATE_DIR
#
# Only processes recorded in STATE_DIR/pids are signalled (each by its pid, checked against its recorded start time,
# together with the process group it leads: a server's workers). Before the Slurm daemons stop, the jobs of this
# cluster are cancelled, and the processes of job steps still running on its node (`scontrol listpids`, Slurm's own
# record) are stopped. Safe to run twice, and on a half-started state. Exit status 1 when something would not stop.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

check_state_path "${1:-}"
[ -d "$1/pids" ] || { echo "nothing to stop in $1"; exit 0; }
STATE=$(cd "$1" && pwd -P)
GRACE=${DOWN_GRACE:-20}
export PATH="$PATH:/usr/sbin:/sbin"

signal() { # signal PID SIG: the process, and its process group when it leads one (pgid == pid)
  local pgid
  pgid=$(ps -o pgid= -p "$1" 2>/dev/null | tr -d ' ')
  if [ "$pgid" = "$1" ]; then kill "-$2" -- "-$1" 2>/dev/null; else kill "-$2" "$1" 2>/dev/null; fi
}

stop_pid() { # stop_pid PID START LABEL: TERM, wait GRACE seconds, KILL
  local pid=$1 start=$2 label=$3 deadline
  [ "$(start_time "$pid")" = "$start" ] || return 0
  signal "$pid" TERM
  deadline=$((SECONDS + GRACE))
  while [ "$(start_time "$pid")" = "$start" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  if [ "$(start_time "$pid")" = "$start" ]; then
    echo "$label (pid $pid) ignored SIGTERM for ${GRACE}s: SIGKILL" >&2
    signal "$pid" KILL
    sleep 0.5
  fi
  [ "$(start_time "$pid")" != "$start" ] || { echo "$label (pid $pid) is still running" >&2; return 1; }
}

failed=0
if [ -f "$STATE/slurm.conf" ] && alive "$STATE" slurmctld; then
  export SLURM_CONF="$STATE/slurm.conf"
  jobs=$(timeout 10 squeue -h -o %i --states=PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    echo "cancelling Slurm jobs: $jobs" >&2
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs || true
    deadline=$((SECONDS + GRACE))
    while [ -n "$(timeout 10 squeue -h -o %i --states=PENDING,RUNNING,CONFIGURING,COMPLETING 2>/dev/null)" ] &&
      [ $SECONDS -lt $deadline ]; do sleep 1; done
  fi
fi
if [ -f "$STATE/slurm.conf" ] && alive "$STATE" slurmd; then
  # Processes of job steps that outlived the cancellation (or a controller that was already gone).
  while read -r pid; do
    st=$(start_time "$pid")
    [ -z "$st" ] || stop_pid "$pid" "$st" "job step process" || failed=1
  done < <(SLURM_CONF="$STATE/slurm.conf" timeout 10 scontrol listpids 2>/dev/null |
    awk 'NR > 1 && $1 ~ /^[0-9]+$/ {print $1}')
fi

if [ -f "$STATE/pids/order" ]; then
  for name in $(tac "$STATE/pids/order"); do
    if alive "$STATE" "$name"; then
      stop_pid "$(tr -dc '0-9' <"$STATE/pids/$name.pid")" "$(cat "$STATE/pids/$name.start")" "$name" || failed=1
    fi
    # Daemons remove their own pid files; ours go too, so a second run has nothing to do.
    alive "$STATE" "$name" || rm -f "$STATE/pids/$name.pid" "$STATE/pids/$name.start"
  done
fi
[ $failed -eq 0 ] && echo "stopped everything started from $STATE" || exit 1
