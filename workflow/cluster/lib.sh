# Shared by workflow/cluster/*-up.sh and down.sh (sourced, not run). Every process an up script starts is recorded in
# <state>/pids/<name>.pid (its pid) and <name>.start (its start time, field 22 of /proc/<pid>/stat), in start order in
# <state>/pids/order; down.sh stops exactly those, newest first, and only while pid and start time still match (a pid
# the kernel reused for another process is left alone). Nothing is ever looked up or killed by name.

die() { echo "$(basename "$0"): $*" >&2; exit 1; }
# Exit status 2 means "this machine cannot run it" (not root, no packages and no apt): tests skip on it.
cannot() { echo "$(basename "$0"): cannot run here: $*" >&2; exit 2; }

PYTHON=${PYTHON:-python3}

check_state_path() { # check_state_path DIR: refuse no argument and system directories
  [ -n "${1:-}" ] || die "usage: $(basename "$0") STATE_DIR"
  case "$(realpath -m "$1")" in
    / | /bin | /sbin | /lib* | /usr | /usr/* | /etc | /etc/* | /var | /proc* | /sys* | /dev* | /boot* | /root)
      die "$1: not a state directory (give a directory of its own, e.g. one from mktemp -d)" ;;
  esac
}

state_dir() {  # state_dir DIR: absolute path of an existing or new state directory
  check_state_path "${1:-}"
  mkdir -p "$1/pids" "$1/log"
  (cd "$1" && pwd -P)
}

start_time() { # start_time PID: the process's start time in clock ticks since boot (empty if it is gone)
  [ -r "/proc/$1/stat" ] || return 0
  # The command name (field 2) may hold spaces: take the fields after its closing parenthesis.
  sed -E 's/^.*\) //' "/proc/$1/stat" | cut -d' ' -f20
}

alive() { # alive STATE NAME: true while the recorded process is running (same pid, same start time)
  local pidfile="$1/pids/$2.pid" pid recorded
  [ -s "$pidfile" ] || return 1
  pid=$(tr -dc '0-9' <"$pidfile")
  [ -n "$pid" ] && [ -r "$1/pids/$2.start" ] || return 1
  recorded=$(cat "$1/pids/$2.start")
  [ -n "$recorded" ] && [ "$(start_time "$pid")" = "$recorded" ]
}

record() { # record STATE NAME PID: adopt a started process (its pid file may already exist: a daemon wrote it)
  local st
  st=$(start_time "$3")
  [ -n "$st" ] || die "$2 (pid $3) exited right after it started; see $1/log/$2.log"
  echo "$3" >"$1/pids/$2.pid"
  echo "$st" >"$1/pids/$2.start"
  grep -qx "$2" "$1/pids/order" 2>/dev/null || echo "$2" >>"$1/pids/order"
}

start_bg() { # start_bg STATE NAME CMD...: run CMD in its own session, output to <state>/log/NAME.log, and record it
  local state=$1 name=$2
  shift 2
  alive "$state" "$name" && die "$name is already running from $state (pid $(cat "$state/pids/$name.pid"))"
  # setsid: its own process group, so down.sh can stop the server with all the workers it forked.
  setsid "$@" </dev/null >"$state/log/$name.log" 2>&1 &
  local pid=$!
  sleep 0.2
  record "$state" "$name" "$pid"
}

wait_for_pidfile() { # wait_for_pidfile STATE NAME SECONDS: a self-daemonising program wrote its pid file
  local deadline=$((SECONDS + $3))
  until [ -s "$1/pids/$2.pid" ] && [ -d "/proc/$(tr -dc '0-9' <"$1/pids/$2.pid")" ]; do
    [ $SECONDS -lt $deadline ] || die "$2 wrote no pid file within $3 s; see $1/log/$2.log"
    sleep 0.2
  done
  record "$1" "$2" "$(tr -dc '0-9' <"$1/pids/$2.pid")"
}

free_port() { # free_port: a TCP port on 127.0.0.1 that nothing listens on now
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_http() { # wait_http URL SECONDS STATE NAME: until URL answers 200 (the recorded process must stay alive)
  local deadline=$((SECONDS + $2))
  until "$PYTHON" - "$1" <<'EOF' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
  do
    alive "$3" "$4" || die "$4 exited while starting; see $3/log/$4.log"
    [ $SECONDS -lt $deadline ] || die "$4 did not answer $1 within $2 s; see $3/log/$4.log"
    sleep 1
  done
}
