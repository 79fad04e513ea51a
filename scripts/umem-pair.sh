#!/usr/bin/env bash
# umem-pair.sh: drive a source/destination pair of VMs through umemd and umem-ctl.
#
# Each step is a subcommand, so the same script works on one machine or on two hosts:
#
#   umem-pair.sh secret /etc/umem/vm0.key    # once; copy the file to the other host (scp)
#
#   destination host                          source host
#   ----------------                          -----------
#   umem-pair.sh umemd                        umem-pair.sh umemd
#   SECRET_FILE=/etc/umem/vm0.key \
#   DEST_LISTEN=tcp:0.0.0.0:4444 \
#     umem-pair.sh dest                       umem-pair.sh source
#                                             SECRET_FILE=/etc/umem/vm0.key \
#                                             DEST_URI=tcp:DEST_HOST:4444 umem-pair.sh migrate
#   umem-pair.sh cont    (if started paused)
#   umem-pair.sh stop                         umem-pair.sh stop
#
#   umem-pair.sh local     # all of the above on this machine, over loopback, then a check
#
# Subcommands:
#   secret FILE write a new random secret to FILE (mode 0600) for SECRET_FILE
#   umemd       start umemd on $UMEMD_SOCK unless one already answers there (e.g. the systemd
#               unit, whose socket is /run/umem/umemd.sock, the default)
#   source      start a VM running a built-in guest; control socket $VM_SOCK
#   dest        start a VM waiting for an incoming migration on $DEST_LISTEN; prints the
#               address umemd actually listens on (useful with port 0)
#   migrate [URI]
#               migrate the VM at $VM_SOCK to URI (default $DEST_URI), print progress on stderr
#               and the final query-migrate JSON on stdout; exit status 0 only if it completed
#   status      print query-status and query-migrate of $VM_SOCK
#   cont        resume the VM at $VM_SOCK (a destination started with DEST_PAUSED=1)
#   digest      print the RAM digest of the VM at $VM_SOCK
#   stop        stop the VM and the umemd this script started (by their recorded PIDs)
#   local       run umemd x2, source, dest, migrate on this machine under $UMEM_DIR/{src,dst},
#               compare RAM digests, stop everything; prints the final migration JSON
#               (UMEM_DIR defaults to a new temporary directory here; KEEP=1 keeps it)
#
# Environment (defaults in brackets):
#   UMEM_BIN        directory holding vmm, umemd, umem-ctl [target/release of this checkout if
#                   built, else found in PATH]
#   UMEM_DIR        sockets, logs, serial output and PID files [/run/umem]
#   UMEMD_SOCK      umemd's socket [$UMEM_DIR/umemd.sock]
#   VM_NAME         VM name [vm0]; VM_SOCK control socket [$UMEM_DIR/$VM_NAME.sock]
#   VM_MEM [1G]  VM_VCPUS [2]  VM_GUEST [memtouch]  VM_CMDLINE [pages=4096 pause=1000]
#   VM_PREFILL      seed for filling RAM before boot, empty for none [1]
#   VM_HUGEPAGES    1: guest RAM on 2 MiB huge pages (vmm --hugepages); the host's pool must
#                   hold them (/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages) [0]
#   DEST_LISTEN     where the destination umemd listens [tcp:0.0.0.0:4444]
#   SECRET_FILE     the migration's secret, the same file on both hosts, readable only by its
#                   owner; every connection of the migration proves both sides know it. umemd
#                   refuses a TCP address beyond loopback without one [none]
#   TLS_CREDS       a TLS credentials directory (see "Encryption" in the README): every TCP
#                   connection runs TLS 1.3, both umemds presenting a certificate of its CA [none]
#   INSECURE        1: allow a non-loopback address without SECRET_FILE or TLS_CREDS [0]
#   DEST_PAUSED     1: the destination stays paused after the switchover until "cont" [0]
#   DEST_URI        where the source's umemd connects [tcp:127.0.0.1:4444]
#   MODE            precopy, postcopy or hybrid [precopy]
#   MIGRATE_PARAMS  extra migrate arguments, key=value separated by spaces [downtime_limit_ms=50]
#   TIMEOUT         seconds to wait for a migration [600]
#
# Between two hosts the migration stream is TCP from the source umemd to DEST_LISTEN on the
# destination: open that port in the firewall to the source host only. With SECRET_FILE both
# umemds prove they know the secret on every connection; the stream itself is encrypted only
# with TLS_CREDS (see "Security model" in the README).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/scripts/$(basename "${BASH_SOURCE[0]}")"

if [ -z "${UMEM_BIN:-}" ]; then
    if [ -x "$ROOT/target/release/vmm" ]; then
        UMEM_BIN="$ROOT/target/release"
    else
        UMEM_BIN=$(dirname "$(command -v vmm 2>/dev/null || echo /usr/local/bin/vmm)")
    fi
fi
UMEM_DIR=${UMEM_DIR:-/run/umem}
UMEMD_SOCK=${UMEMD_SOCK:-$UMEM_DIR/umemd.sock}
VM_NAME=${VM_NAME:-vm0}
VM_SOCK=${VM_SOCK:-$UMEM_DIR/$VM_NAME.sock}
VM_MEM=${VM_MEM:-1G}
VM_VCPUS=${VM_VCPUS:-2}
VM_GUEST=${VM_GUEST:-memtouch}
VM_CMDLINE=${VM_CMDLINE:-pages=4096 pause=1000}
VM_PREFILL=${VM_PREFILL-1}
VM_HUGEPAGES=${VM_HUGEPAGES:-0}
DEST_LISTEN=${DEST_LISTEN:-tcp:0.0.0.0:4444}
DEST_PAUSED=${DEST_PAUSED:-0}
DEST_URI=${DEST_URI:-tcp:127.0.0.1:4444}
MODE=${MODE:-precopy}
MIGRATE_PARAMS=${MIGRATE_PARAMS:-downtime_limit_ms=50}
TIMEOUT=${TIMEOUT:-600}
SECRET_FILE=${SECRET_FILE:-}
TLS_CREDS=${TLS_CREDS:-}
INSECURE=${INSECURE:-0}

log() { echo "umem-pair: $*" >&2; }
die() { log "error: $*"; exit 1; }

ctl() { "$UMEM_BIN/umem-ctl" --timeout 30 -s "$VM_SOCK" "$@"; }

need() {
    local b
    for b in "$@"; do
        [ -x "$UMEM_BIN/$b" ] || die "$UMEM_BIN/$b not found (cargo build --release, or set UMEM_BIN)"
    done
}

# json EXPR: evaluates a Python expression over the JSON on stdin (bound to j), prints it.
json() { python3 -c "import json,sys; j=json.load(sys.stdin); v=($1); print('' if v is None else v)"; }

# spawn NAME BINARY ARGS...: starts a daemon-like child, records its PID in $UMEM_DIR/NAME.pid.
spawn() {
    local name=$1
    shift
    mkdir -p "$UMEM_DIR"
    nohup "$@" >"$UMEM_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$UMEM_DIR/$name.pid"
    log "started $name (pid $!), log $UMEM_DIR/$name.log"
}

# stop_pid NAME BINARY: stops the process recorded in NAME.pid if it still runs BINARY.
stop_pid() {
    local name=$1 bin=$2 f="$UMEM_DIR/$1.pid" pid exe
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
    if [ -n "$exe" ] && [ "$(basename "${exe% (deleted)}")" = "$bin" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        log "stopped $name (pid $pid)"
    fi
    rm -f "$f"
}

# wait_socket PATH PIDFILE: until PATH is a socket, failing if the recorded process exits.
wait_socket() {
    local path=$1 pid deadline=$((SECONDS + 120))
    pid=$(cat "$2")
    until [ -S "$path" ]; do
        kill -0 "$pid" 2>/dev/null || die "process $pid exited; see ${2%.pid}.log"
        [ "$SECONDS" -lt "$deadline" ] || die "$path did not appear"
        sleep 0.05
    done
}

umemd_answers() {
    python3 - "$UMEMD_SOCK" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
EOF
}

cmd_umemd() {
    need umemd
    if [ -S "$UMEMD_SOCK" ] && umemd_answers; then
        log "umemd already serves $UMEMD_SOCK"
        return 0
    fi
    spawn umemd "$UMEM_BIN/umemd" --socket "$UMEMD_SOCK"
    wait_socket "$UMEMD_SOCK" "$UMEM_DIR/umemd.pid"
}

cmd_source() {
    need vmm umem-ctl
    local prefill=()
    [ -n "$VM_PREFILL" ] && prefill=(--prefill "$VM_PREFILL")
    [ "$VM_HUGEPAGES" = 1 ] && prefill+=(--hugepages)
    spawn "$VM_NAME" "$UMEM_BIN/vmm" --name "$VM_NAME" --mem "$VM_MEM" --vcpus "$VM_VCPUS" \
        --guest "$VM_GUEST" --cmdline "$VM_CMDLINE" "${prefill[@]}" --control "$VM_SOCK" \
        --serial "$UMEM_DIR/$VM_NAME.serial" --umemd "$UMEMD_SOCK"
    wait_socket "$VM_SOCK" "$UMEM_DIR/$VM_NAME.pid"
    log "source VM $VM_NAME runs; serial output in $UMEM_DIR/$VM_NAME.serial"
}

cmd_secret() {
    local f=${1:?usage: umem-pair.sh secret FILE}
    [ -e "$f" ] && die "$f exists; remove it first"
    (umask 077 && head -c 32 /dev/urandom | base64 >"$f")
    log "wrote a new secret to $f (mode 0600); give both hosts the same file"
}

cmd_dest() {
    need vmm umem-ctl
    local paused=() auth=()
    [ "$DEST_PAUSED" = 1 ] && paused=(-S)
    [ -n "$SECRET_FILE" ] && auth+=(--incoming-secret-file "$SECRET_FILE")
    [ -n "$TLS_CREDS" ] && auth+=(--incoming-tls-creds "$TLS_CREDS")
    [ "$INSECURE" = 1 ] && auth+=(--incoming-insecure)
    [ "$VM_HUGEPAGES" = 1 ] && paused+=(--hugepages)
    spawn "$VM_NAME" "$UMEM_BIN/vmm" --name "$VM_NAME" --mem "$VM_MEM" --vcpus "$VM_VCPUS" \
        --incoming "$DEST_LISTEN" "${auth[@]}" "${paused[@]}" --control "$VM_SOCK" \
        --serial "$UMEM_DIR/$VM_NAME.serial" --umemd "$UMEMD_SOCK"
    wait_socket "$VM_SOCK" "$UMEM_DIR/$VM_NAME.pid"
    local uri="" deadline=$((SECONDS + 30)) m
    while [ -z "$uri" ]; do
        m=$(ctl --json query-migrate)
        uri=$(json 'j.get("listen_uri")' <<<"$m")
        if [ "$(json 'j["phase"]' <<<"$m")" = failed ]; then
            die "incoming migration failed: $(json 'j.get("error")' <<<"$m")"
        fi
        [ "$SECONDS" -lt "$deadline" ] || die "umemd did not start listening"
        [ -n "$uri" ] || sleep 0.1
    done
    log "destination VM $VM_NAME waits for the migration on $uri"
    echo "$uri"
}

cmd_migrate() {
    need umem-ctl
    local uri=${1:-$DEST_URI}
    local params auth=()
    read -r -a params <<<"$MIGRATE_PARAMS"
    [ -n "$SECRET_FILE" ] && auth+=("secret_file=$SECRET_FILE")
    [ -n "$TLS_CREDS" ] && auth+=("tls_creds=$TLS_CREDS")
    [ "$INSECURE" = 1 ] && auth+=(insecure=true)
    log "migrating $VM_NAME to $uri ($MODE ${MIGRATE_PARAMS}${SECRET_FILE:+, authenticated})"
    ctl migrate "uri=$uri" "mode=$MODE" "${params[@]}" "${auth[@]}" >/dev/null
    local rc=0
    "$UMEM_BIN/umem-ctl" --timeout "$TIMEOUT" -s "$VM_SOCK" wait-migrate >/dev/null || rc=$?
    local final
    final=$(ctl --json query-migrate)
    echo "$final"
    if [ "$rc" != 0 ]; then
        log "migration did not complete: $(json 'j["phase"] + ": " + str(j.get("error"))' <<<"$final")"
        return 1
    fi
    log "$(json '"completed: %d bytes in %.1f ms, downtime %.3f ms" % (j["stats"]["bytes_sent"], j["stats"]["total_us"] / 1e3, j["stats"]["downtime_us"] / 1e3)' <<<"$final")"
}

cmd_status() {
    need umem-ctl
    ctl query-status
    ctl query-migrate
}

cmd_cont() { need umem-ctl; ctl cont; }

cmd_digest() { need umem-ctl; ctl --json query-ram-digest "$@"; }

cmd_stop() {
    if [ -S "$VM_SOCK" ]; then
        "$UMEM_BIN/umem-ctl" --timeout 2 -s "$VM_SOCK" quit >/dev/null 2>&1 || true
    fi
    stop_pid "$VM_NAME" vmm
    stop_pid umemd umemd
    rm -f "$VM_SOCK"
}

cmd_local() {
    LOCAL_BASE=$UMEM_DIR
    [ "$LOCAL_BASE" = /run/umem ] && LOCAL_BASE=$(mktemp -d "${TMPDIR:-/tmp}/umem-pair.XXXXXX")
    LOCAL_SRC="$LOCAL_BASE/src"
    LOCAL_DST="$LOCAL_BASE/dst"
    mkdir -p "$LOCAL_SRC" "$LOCAL_DST"
    trap local_cleanup EXIT
    # Loopback needs no secret, but the pair runs as it would between hosts.
    export SECRET_FILE="$LOCAL_BASE/secret"
    rm -f "$SECRET_FILE"
    cmd_secret "$SECRET_FILE"
    src_env "$SELF" umemd
    dst_env "$SELF" umemd
    src_env "$SELF" source
    local uri
    uri=$(dst_env DEST_LISTEN=tcp:127.0.0.1:0 DEST_PAUSED=1 "$SELF" dest)
    sleep 1 # let the guest run a little before it moves
    src_env "$SELF" migrate "$uri"
    # With DEST_PAUSED=1 both sides hold the same RAM right after the switchover.
    local a b
    a=$(src_env "$SELF" digest)
    b=$(dst_env "$SELF" digest)
    dst_env "$SELF" cont >/dev/null
    sleep 1
    [ "$a" = "$b" ] || die "RAM digests differ: source $a, destination $b"
    log "RAM digests match; destination serial: $(tail -n 1 "$LOCAL_DST/dst.serial" 2>/dev/null)"
    LOCAL_OK=1
}

# Each side of "local" gets its own directory: umemd socket, VM socket, logs and PID files.
src_env() { env UMEM_DIR="$LOCAL_SRC" UMEMD_SOCK="$LOCAL_SRC/umemd.sock" VM_SOCK="$LOCAL_SRC/vm.sock" VM_NAME=src "$@"; }
dst_env() { env UMEM_DIR="$LOCAL_DST" UMEMD_SOCK="$LOCAL_DST/umemd.sock" VM_SOCK="$LOCAL_DST/vm.sock" VM_NAME=dst "$@"; }

LOCAL_OK=0
local_cleanup() {
    dst_env "$SELF" stop || true
    src_env "$SELF" stop || true
    if [ "$LOCAL_OK" = 1 ] && [ "${KEEP:-0}" != 1 ]; then
        rm -rf "$LOCAL_SRC" "$LOCAL_DST"
        rm -f "$LOCAL_BASE/secret"
        rmdir "$LOCAL_BASE" 2>/dev/null || true
    else
        log "logs and serial output are in $LOCAL_BASE"
    fi
}

case "${1:-}" in
    secret|umemd|source|dest|migrate|status|cont|digest|stop|local)
        c=$1
        shift
        "cmd_$c" "$@"
        ;;
    -h|--help|help|"")
        sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
        ;;
    *) die "unknown subcommand \"$1\" (try --help)" ;;
esac
