# shellcheck shell=bash
# Processes of a migration run on this machine (umemds, VMMs), shared by scripts/demo.sh and
# scripts/package-test.sh, which source this file: starting them in the background, waiting for
# their sockets, stopping them by PID, and reading what they print. It defines functions only.
#
# Globals the sourcing script provides:
#   T        working directory: each process's output goes to $T/NAME.log, serial output to
#            $T/*.serial (empty until it exists)
#   PIDS     array of the PIDs started so far, oldest first (start appends, stop_pids empties)
#   TIMEOUT  seconds a single wait may last
#   KEEP     1 keeps $T on removal
#   fail     function: fail MESSAGE... reports MESSAGE and exits non-zero
#   say      function: say MESSAGE... prints a progress line on stderr
#
# Functions:
#   start NAME CMD...          runs CMD in the background, output in $T/NAME.log; appends its
#                              PID to PIDS and sets PID_NAME (dashes become underscores)
#   alive PID                  true while PID runs
#   wait_socket PATH PID WHAT  waits until PATH is a socket; fails (fail) if PID exits first or
#                              after TIMEOUT seconds, naming WHAT
#   stop_pids                  SIGTERM to every PID in PIDS, newest first (VMMs before the
#                              umemds that serve them); SIGKILL to any still running 5 s later;
#                              reaps them and empties PIDS
#   show_logs                  the last 15 lines of each non-empty $T/*.log and $T/*.serial, on
#                              stderr
#   remove_workdir             removes $T, or says where it is kept when KEEP=1
#   json EXPR                  prints a Python expression over the JSON document on stdin,
#                              bound to `j` (strings bare, None as null, the rest as JSON)
#   last_pass FILE             number of the last complete memtouch "pass=N ..." line of FILE,
#                              or -1

start() {
    local name=$1
    shift
    "$@" >"$T/$name.log" 2>&1 &
    PIDS+=("$!")
    eval "PID_${name//-/_}=$!"
}

alive() { kill -0 "$1" 2>/dev/null; }

wait_socket() {
    local path=$1 pid=$2 what=$3 deadline=$((SECONDS + TIMEOUT))
    until [ -S "$path" ]; do
        alive "$pid" || fail "$what exited during startup (see its log)"
        [ "$SECONDS" -lt "$deadline" ] || fail "$what did not create $path within ${TIMEOUT}s"
        sleep 0.05
    done
}

stop_pids() {
    local pid i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[i]}" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 50); do
            alive "$pid" || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    PIDS=()
}

show_logs() {
    [ -n "$T" ] && [ -d "$T" ] || return 0
    local f
    for f in "$T"/*.log "$T"/*.serial; do
        [ -s "$f" ] || continue
        echo "---- tail of $(basename "$f") ----" >&2
        tail -n 15 "$f" >&2
    done
}

remove_workdir() {
    [ -n "$T" ] && [ -d "$T" ] || return 0
    if [ "$KEEP" = 1 ]; then
        say "kept $T"
    else
        rm -rf "$T"
    fi
}

json() { python3 -c "import json,sys; j=json.load(sys.stdin); v=($1); print('null' if v is None else (json.dumps(v) if not isinstance(v,str) else v))"; }

last_pass() {
    local n
    n=$(grep -aoE '^pass=[0-9]+ bad=[0-9]+ total_bad=[0-9]+$' "$1" 2>/dev/null | tail -n 1 | sed -E 's/^pass=([0-9]+).*/\1/')
    echo "${n:--1}"
}
