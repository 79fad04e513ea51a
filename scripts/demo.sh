#!/usr/bin/env bash
# umem demo: live-migrate a running VM between two umemds on this machine.
#
#   scripts/demo.sh [--mode precopy|postcopy|hybrid] [--mem 1G] [--vcpus 2]
#                   [--guest memtouch|digest] [--hugepages] [--keep]
#
# What it does, in a private temporary directory:
#   1. installs what the build needs (scripts/setup.sh, as root) and builds the binaries
#      (cargo build --release; a no-op when they are current),
#   2. starts two umemds, one per "host", each on its own Unix socket,
#   3. starts a source vmm running a built-in guest on prefilled RAM, and a destination vmm
#      with --incoming tcp:127.0.0.1:0 (umemd picks the port),
#   4. migrates, showing progress on stderr,
#   5. checks the result: the RAM digests of both sides, and that the guest keeps running
#      correctly on the destination (memtouch: no bad pages and passes keep coming;
#      digest: the final value equals a reference computed here),
#   6. prints ONE JSON line on stdout:
#      {"result":"ok"|"<error>","mode":...,"switchover":"precopy"|"postcopy","ram_bytes":...,
#       "transferred_bytes":...,
#       "total_ms":...,"downtime_ms":...,"guest_bad_pages":...,"digest_match":...}
#   and exits non-zero unless result is "ok". Every process it started is stopped by PID on
#   exit, on failure and on Ctrl-C.
#
# Needs root (KVM, and a userfaultfd for the destination), cargo and python3; scripts/setup.sh
# installs the rest (gcc for the 32-bit guests, libclang for the build).
#
# Precopy: the destination is started with -S, so right after the switchover both sides hold
# the same RAM and the full SHA-256 of every block must match. Postcopy and hybrid: the
# destination runs while pages still arrive, so the digests are compared once the migration
# has completed, excluding what the guest may have written since the switchover (the first
# 2 MiB: image, stack, boot info; and the guest's working set).

set -uo pipefail

usage() {
    sed -n '2,/^$/p' "$0" | sed -e '/^$/d' -e 's/^# \{0,1\}//'
    cat <<'EOF'

Options:
  --mode MODE          precopy (default), postcopy or hybrid
  --mem SIZE           guest RAM (default 1G)
  --vcpus N            vCPUs (default 2)
  --guest NAME         memtouch (default) or digest
  --pages N            guest working set in 4 KiB pages (memtouch 4096, digest 256)
  --downtime-ms MS     downtime limit passed to migrate (default 50)
  --param KEY=VALUE    extra migration parameter (repeatable), e.g. --param bandwidth_limit=0
  --passes N           memtouch passes the destination must complete after the switchover (3)
  --hugepages          guest RAM on 2 MiB huge pages on both sides (vmm --hugepages); the host's
                       pool is raised to hold them if it has too few free (as root)
  --timeout SECONDS    give up on any single wait after this long (default 300)
  --keep               keep the temporary directory (logs, serial output, sockets)
  --no-build           do not run cargo build
  -h, --help           this text
EOF
}

MODE=precopy
MEM=1G
VCPUS=2
GUEST=memtouch
PAGES=
DOWNTIME_MS=50
EXTRA_PARAMS=()
PASSES_AFTER=3
TIMEOUT=300
KEEP=0
BUILD=1
HUGE=()

while [ $# -gt 0 ]; do
    case "$1" in
        --mode) MODE=${2:?--mode needs a value}; shift 2 ;;
        --mode=*) MODE=${1#*=}; shift ;;
        --mem) MEM=${2:?--mem needs a value}; shift 2 ;;
        --mem=*) MEM=${1#*=}; shift ;;
        --vcpus) VCPUS=${2:?--vcpus needs a value}; shift 2 ;;
        --vcpus=*) VCPUS=${1#*=}; shift ;;
        --guest) GUEST=${2:?--guest needs a value}; shift 2 ;;
        --guest=*) GUEST=${1#*=}; shift ;;
        --pages) PAGES=${2:?--pages needs a value}; shift 2 ;;
        --pages=*) PAGES=${1#*=}; shift ;;
        --downtime-ms) DOWNTIME_MS=${2:?--downtime-ms needs a value}; shift 2 ;;
        --param) EXTRA_PARAMS+=("${2:?--param needs KEY=VALUE}"); shift 2 ;;
        --hugepages) HUGE=(--hugepages); shift ;;
        --passes) PASSES_AFTER=${2:?--passes needs a value}; shift 2 ;;
        --timeout) TIMEOUT=${2:?--timeout needs a value}; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "demo.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

case "$MODE" in precopy|postcopy|hybrid) ;; *) echo "demo.sh: --mode must be precopy, postcopy or hybrid" >&2; exit 2 ;; esac
case "$GUEST" in memtouch|digest) ;; *) echo "demo.sh: --guest must be memtouch or digest" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${UMEM_BIN:-$ROOT/target/release}
GUEST_BASE=$((0x1000000))
if [ -z "$PAGES" ]; then
    if [ "$GUEST" = memtouch ]; then PAGES=4096; else PAGES=256; fi
fi
# digest: enough rounds (~0.2 s each when emulated) that the guest is still computing when
# the switchover happens, so part of the computation runs on each side.
DIGEST_ROUNDS=${UMEM_DEMO_DIGEST_ROUNDS:-64}

# ---------------------------------------------------------------------------------------------
# Result bookkeeping: whatever happens, one JSON line goes to stdout.

# The result goes to the original stdout even if a signal arrives while it is redirected.
exec 3>&1
ERROR=
RAM_BYTES=null
TRANSFERRED=null
TOTAL_MS=null
DOWNTIME_MS_OUT=null
SWITCHOVER=
BAD_PAGES=null
DIGEST_MATCH=false
EMITTED=0

emit() {
    [ "$EMITTED" = 1 ] && return
    EMITTED=1
    local result=${ERROR:-ok}
    RESULT="$result" MODE="$MODE" GUEST="$GUEST" RAM_BYTES="$RAM_BYTES" TRANSFERRED="$TRANSFERRED" \
    TOTAL_MS="$TOTAL_MS" DOWNTIME="$DOWNTIME_MS_OUT" BAD="$BAD_PAGES" MATCH="$DIGEST_MATCH" \
    SWITCHOVER="$SWITCHOVER" \
    python3 - >&3 <<'EOF'
import json, os
def num(k):
    v = os.environ[k]
    if v in ("", "null"):
        return None
    return json.loads(v)
print(json.dumps({
    "result": os.environ["RESULT"],
    "mode": os.environ["MODE"],
    "switchover": os.environ["SWITCHOVER"] or None,
    "guest": os.environ["GUEST"],
    "ram_bytes": num("RAM_BYTES"),
    "transferred_bytes": num("TRANSFERRED"),
    "total_ms": num("TOTAL_MS"),
    "downtime_ms": num("DOWNTIME"),
    "guest_bad_pages": num("BAD"),
    "digest_match": os.environ["MATCH"] == "true",
}))
EOF
}

say() { echo "demo: $*" >&2; }

fail() {
    ERROR="$*"
    say "FAILED: $ERROR"
    show_logs
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Processes and cleanup: start, alive, wait_socket, stop_pids, show_logs, remove_workdir, json
# and last_pass come from scripts/lib/processes.sh (shared with scripts/package-test.sh).

# shellcheck source-path=SCRIPTDIR source=lib/processes.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/processes.sh" ||
    { ERROR="scripts/lib/processes.sh could not be read"; emit; exit 1; }

T=
PIDS=()
CHILD=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$CHILD" ]; then
        kill -TERM "$CHILD" 2>/dev/null
        wait "$CHILD" 2>/dev/null
    fi
    stop_pids
    remove_workdir
    [ "$rc" = 0 ] || [ -n "$ERROR" ] || ERROR="interrupted (exit status $rc)"
    emit
    [ -z "$ERROR" ] || { [ "$rc" != 0 ] || rc=1; }
    exit "$rc"
}
trap cleanup EXIT
trap 'ERROR="interrupted"; exit 130' INT
trap 'ERROR="terminated"; exit 143' TERM

# run CMD...: runs a long command in the background and waits for it, so that a signal reaches
# the traps at once instead of after the command (bash defers traps during foreground commands).
run() {
    "$@" &
    CHILD=$!
    local rc=0
    wait "$CHILD" || rc=$?
    CHILD=
    return "$rc"
}

ctl() { "$BIN/umem-ctl" --timeout 30 "$@"; }

# ---------------------------------------------------------------------------------------------

if [ "$BUILD" = 1 ]; then
    "$ROOT/scripts/setup.sh" || { ERROR="scripts/setup.sh: this machine lacks what the build needs (see above)"; exit 1; }
fi
command -v python3 >/dev/null || { ERROR="python3 is required"; exit 1; }

if [ "$BUILD" = 1 ]; then
    say "building (cargo build --release)"
    run cargo build --manifest-path "$ROOT/Cargo.toml" --release --bins -q >&2 || fail "cargo build --release failed"
fi
for b in vmm umemd umem-ctl; do
    [ -x "$BIN/$b" ] || fail "$BIN/$b is missing (run cargo build --release)"
done
[ -r /dev/kvm ] && [ -w /dev/kvm ] || fail "/dev/kvm is not accessible (KVM is required; run as root)"

T=$(mktemp -d "${TMPDIR:-/tmp}/umem-demo.XXXXXX") || fail "mktemp failed"
say "working directory $T"
export RUST_LOG=${RUST_LOG:-info}

if [ "$GUEST" = memtouch ]; then
    CMDLINE="pages=$PAGES pause=1000"
else
    CMDLINE="pages=$PAGES rounds=$DIGEST_ROUNDS"
fi
EXCLUDE="[[0,$((2 << 20))],[$GUEST_BASE,$((PAGES * 4096))]]"

# Huge pages for both VMs, with a few to spare: the pool is raised if it has too few free.
if [ ${#HUGE[@]} -gt 0 ]; then
    pool=/sys/kernel/mm/hugepages/hugepages-2048kB
    case "$MEM" in
        *G) mib=$(( ${MEM%G} * 1024 )) ;;
        *M) mib=${MEM%M} ;;
        *) fail "--hugepages needs --mem in M or G, not $MEM" ;;
    esac
    need=$(( 2 * mib / 2 + 8 ))
    free=$(cat "$pool/free_hugepages" 2>/dev/null || echo 0)
    if [ "$free" -lt "$need" ]; then
        say "raising the pool of 2 MiB huge pages by $((need - free)) ($pool/nr_hugepages)"
        echo $(( $(cat "$pool/nr_hugepages") + need - free )) >"$pool/nr_hugepages" 2>/dev/null ||
            fail "cannot raise $pool/nr_hugepages (not root?)"
        [ "$(cat "$pool/free_hugepages")" -ge "$need" ] ||
            fail "the host gave only $(cat "$pool/free_hugepages") free huge pages of the $need needed"
    fi
fi

start umemd-src "$BIN/umemd" --socket "$T/src.sock"
start umemd-dst "$BIN/umemd" --socket "$T/dst.sock"
wait_socket "$T/src.sock" "$PID_umemd_src" "source umemd"
wait_socket "$T/dst.sock" "$PID_umemd_dst" "destination umemd"

say "source VM: $MEM, $VCPUS vCPUs, guest $GUEST ($CMDLINE), prefilled RAM"
start vmm-src "$BIN/vmm" --name src --mem "$MEM" --vcpus "$VCPUS" --guest "$GUEST" \
    --cmdline "$CMDLINE" --prefill 1 "${HUGE[@]}" --control "$T/vs.sock" \
    --serial "$T/src.serial" --umemd "$T/src.sock"

DEST_FLAGS=()
[ "$MODE" = precopy ] && DEST_FLAGS=(-S)
start vmm-dst "$BIN/vmm" --name dst --mem "$MEM" --vcpus "$VCPUS" "${HUGE[@]}" \
    --incoming tcp:127.0.0.1:0 "${DEST_FLAGS[@]}" --control "$T/vd.sock" \
    --serial "$T/dst.serial" --umemd "$T/dst.sock"
wait_socket "$T/vs.sock" "$PID_vmm_src" "source vmm"
wait_socket "$T/vd.sock" "$PID_vmm_dst" "destination vmm"

# Where the destination umemd listens.
URI=
deadline=$((SECONDS + 30))
while :; do
    alive "$PID_vmm_dst" || fail "destination vmm exited"
    URI=$(ctl -s "$T/vd.sock" --json query-migrate 2>/dev/null | json 'j.get("listen_uri")') || URI=
    [ -n "$URI" ] && [ "$URI" != null ] && break
    [ "$SECONDS" -lt "$deadline" ] || fail "destination umemd did not report a listening address"
    sleep 0.1
done
say "destination listens on $URI"

# Let the guest get going before migrating it.
if [ "$GUEST" = memtouch ]; then
    deadline=$((SECONDS + TIMEOUT))
    until [ "$(last_pass "$T/src.serial")" -ge 2 ]; do
        alive "$PID_vmm_src" || fail "source vmm exited"
        [ "$SECONDS" -lt "$deadline" ] || fail "source guest printed no pass within ${TIMEOUT}s"
        sleep 0.1
    done
else
    deadline=$((SECONDS + TIMEOUT))
    until grep -aq '^round=1$' "$T/src.serial" 2>/dev/null; do
        alive "$PID_vmm_src" || fail "source vmm exited"
        [ "$SECONDS" -lt "$deadline" ] || fail "source guest printed no round within ${TIMEOUT}s"
        sleep 0.1
    done
fi

say "migrating ($MODE, downtime limit ${DOWNTIME_MS} ms)"
ctl -s "$T/vs.sock" migrate "uri=$URI" "mode=$MODE" "downtime_limit_ms=$DOWNTIME_MS" \
    "${EXTRA_PARAMS[@]}" >/dev/null || fail "migrate command refused"

# Progress lines go to stderr; the final human summary is not needed.
run "$BIN/umem-ctl" --timeout "$TIMEOUT" -s "$T/vs.sock" wait-migrate >/dev/null
FINAL=$(ctl -s "$T/vs.sock" --json query-migrate) || fail "query-migrate failed on the source"
PHASE=$(json 'j["phase"]' <<<"$FINAL")
STATS_OK=1
RAM_BYTES=$(json 'j["stats"]["total_pages"] * 4096' <<<"$FINAL") || STATS_OK=0
TRANSFERRED=$(json 'j["stats"]["bytes_sent"]' <<<"$FINAL") || STATS_OK=0
TOTAL_MS=$(json 'round(j["stats"]["total_us"] / 1000, 3)' <<<"$FINAL") || STATS_OK=0
DOWNTIME_MS_OUT=$(json 'round(j["stats"]["downtime_us"] / 1000, 3)' <<<"$FINAL") || STATS_OK=0
SWITCHOVER=$(json 'j.get("switchover") or ""' <<<"$FINAL") || STATS_OK=0
[ "$STATS_OK" = 1 ] || fail "could not read the migration statistics: $FINAL"
if [ "$PHASE" != completed ]; then
    fail "migration $PHASE: $(json 'j.get("error") or "no reason given"' <<<"$FINAL")"
fi
say "migration completed: $TRANSFERRED bytes in $TOTAL_MS ms, downtime $DOWNTIME_MS_OUT ms"

# The destination finishes its side too (it reports completed once every page is present).
run "$BIN/umem-ctl" --json --timeout "$TIMEOUT" -s "$T/vd.sock" wait-migrate >"$T/dst-final.json" \
    || fail "destination migration did not complete: $(cat "$T/dst-final.json")"

SRC_LAST_PASS=$(last_pass "$T/src.serial")

# RAM digests.
if [ "$MODE" = precopy ]; then
    DIGEST_ARGS=()
else
    DIGEST_ARGS=("exclude=$EXCLUDE")
fi
SRC_DIGEST=$(ctl -s "$T/vs.sock" --json query-ram-digest "${DIGEST_ARGS[@]}") || fail "query-ram-digest failed on the source"
DST_DIGEST=$(ctl -s "$T/vd.sock" --json query-ram-digest "${DIGEST_ARGS[@]}") || fail "query-ram-digest failed on the destination"
if [ "$(json 'j["blocks"]' <<<"$SRC_DIGEST")" = "$(json 'j["blocks"]' <<<"$DST_DIGEST")" ]; then
    DIGEST_MATCH=true
    say "RAM digests match"
else
    say "RAM digests differ: source $SRC_DIGEST destination $DST_DIGEST"
fi

if [ "$MODE" = precopy ]; then
    ctl -s "$T/vd.sock" cont >/dev/null || fail "cont failed on the destination"
fi

# The guest must keep running correctly on the destination.
deadline=$((SECONDS + TIMEOUT))
if [ "$GUEST" = memtouch ]; then
    want=$((SRC_LAST_PASS + PASSES_AFTER))
    say "waiting for the destination guest to reach pass $want (source stopped after pass $SRC_LAST_PASS)"
    until [ "$(last_pass "$T/dst.serial")" -ge "$want" ]; do
        alive "$PID_vmm_dst" || fail "destination vmm exited"
        status=$(ctl -s "$T/vd.sock" --json query-status 2>/dev/null | json 'j["status"]')
        case "$status" in
            internal-error) fail "destination guest stopped: $(ctl -s "$T/vd.sock" --json query-status)" ;;
        esac
        [ "$SECONDS" -lt "$deadline" ] || fail "destination guest made no progress (last pass $(last_pass "$T/dst.serial"), wanted $want)"
        sleep 0.1
    done
    line=$(grep -aoE '^pass=[0-9]+ bad=[0-9]+ total_bad=[0-9]+$' "$T/dst.serial" | tail -n 1)
    BAD_PAGES=${line##*total_bad=}
    say "destination: $line"
else
    until grep -aq '^digest=' "$T/dst.serial" 2>/dev/null; do
        alive "$PID_vmm_dst" || fail "destination vmm exited"
        if grep -aq '^digest=' "$T/src.serial" 2>/dev/null; then
            fail "the digest guest finished before the switchover; raise UMEM_DEMO_DIGEST_ROUNDS"
        fi
        [ "$SECONDS" -lt "$deadline" ] || fail "destination guest printed no digest within ${TIMEOUT}s"
        sleep 0.2
    done
    got=$(grep -a '^digest=' "$T/dst.serial" | tail -n 1)
    got=${got#digest=}
    want=$(python3 "$ROOT/scripts/digest-ref.py" "$PAGES" "$DIGEST_ROUNDS")
    if [ "$got" = "$want" ]; then BAD_PAGES=0; else BAD_PAGES=null; fi
    say "destination guest digest $got, reference $want"
    [ "$got" = "$want" ] || fail "guest digest $got differs from the reference $want"
fi

[ "$BAD_PAGES" = 0 ] || fail "the guest found $BAD_PAGES bad pages after the migration"
[ "$DIGEST_MATCH" = true ] || fail "RAM digests of source and destination differ"

ctl -s "$T/vd.sock" quit >/dev/null 2>&1
ctl -s "$T/vs.sock" quit >/dev/null 2>&1
exit 0
