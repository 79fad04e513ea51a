#!/usr/bin/env bash
# package-test.sh: builds the Debian package, installs it, checks what it installed, migrates a
# VM with the installed binaries alone, purges the package and checks that nothing is left.
#
#   scripts/package-test.sh [--deb FILE] [--mem 128M] [--timeout 120] [--keep]
#
# Steps (every wait has a timeout; any failed check stops the test with exit status 1):
#   1. scripts/package.sh builds target/debian/umem_*.deb (or --deb FILE is used as it is);
#   2. dpkg -i; the binaries are on PATH and run, the man pages render (man -l) and document
#      every flag of the installed binary's --help, the bash completions load, the systemd
#      units are installed and enabled, their ExecStart= and Documentation= point at installed
#      files, /etc/default/umemd is a conffile; nothing was started (no systemd here);
#   3. two umemds, one per "host", each on its own socket, started by hand from /usr/bin with
#      the options of /etc/default/umemd; a source vmm running the built-in memtouch guest and
#      a destination vmm (--incoming tcp:127.0.0.1:0 -S); a precopy migration driven by the
#      installed umem-ctl; both sides must report "completed", the RAM digests must match, and
#      the guest must go on with no bad page once the destination is continued;
#   4. dpkg --purge; every installed file and the units' enablement symlinks are gone.
#
# Needs root (dpkg, KVM, userfaultfd), /dev/kvm, python3 and cargo-deb (scripts/setup.sh
# --package). It refuses to run when the umem package is already installed, since it purges
# it at the end. Every process it started is stopped by PID on exit, failure or Ctrl-C, and the
# package is purged if the test installed it. The last line is "package-test: N passed, 0 failed".

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# start, alive, wait_socket, stop_pids, show_logs, remove_workdir, json, last_pass.
# shellcheck source-path=SCRIPTDIR source=lib/processes.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/processes.sh" || exit 1
DEB=
MEM=128M
TIMEOUT=120
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --deb) DEB=${2:?--deb needs a file}; shift 2 ;;
        --mem) MEM=${2:?--mem needs a size}; shift 2 ;;
        --timeout) TIMEOUT=${2:?--timeout needs seconds}; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h | --help) sed -n '2,/^$/p' "$0" | sed -e '/^$/d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "package-test: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

PKG=umem
BINS=(vmm umemd umem-ctl)
MANPAGES=(/usr/share/man/man1/vmm.1.gz /usr/share/man/man1/umem-ctl.1.gz /usr/share/man/man8/umemd.8.gz)
UNITS=(/usr/lib/systemd/system/umemd.service /usr/lib/systemd/system/umemd.socket)
DEFAULTS=/etc/default/umemd
# Every file the package installs (besides the binaries), checked present then gone.
FILES=("${MANPAGES[@]}" "${UNITS[@]}" "$DEFAULTS" /usr/share/doc/umem/README.md)
for b in "${BINS[@]}"; do
    FILES+=("/usr/share/bash-completion/completions/$b" "/usr/share/zsh/vendor-completions/_$b"
        "/usr/share/fish/vendor_completions.d/$b.fish")
done
# What enabling the units makes (deb-systemd-helper, also without systemd running).
ENABLED=(/etc/systemd/system/multi-user.target.wants/umemd.service
    /etc/systemd/system/sockets.target.wants/umemd.socket)

PASSED=0
T=
PIDS=()
INSTALLED_BY_US=0

say() { echo "package-test: $*" >&2; }

fail() {
    say "FAILED: $*"
    show_logs
    exit 1
}

# ok WHAT: one more check passed.
ok() {
    PASSED=$((PASSED + 1))
    say "ok: $*"
}

purge() {
    timeout 300 dpkg --purge "$PKG" >"${T:-/tmp}/purge.log" 2>&1
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pids
    if [ "$INSTALLED_BY_US" = 1 ] && installed; then
        say "purging $PKG after a failure"
        purge || say "dpkg --purge $PKG failed"
    fi
    remove_workdir
    if [ "$rc" = 0 ]; then
        echo "package-test: $PASSED passed, 0 failed"
    else
        echo "package-test: $PASSED passed, 1 failed"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'say interrupted; exit 130' INT
trap 'say terminated; exit 143' TERM

installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$PKG" 2>/dev/null)" = installed ]
}

# The processes running a given executable (by /proc/PID/exe).
running() {
    local exe=$1 p
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = "$exe" ] && echo "${p#/proc/}"
    done
    return 0
}

# ---------------------------------------------------------------------------------------------
# 0. This machine.

[ "$(id -u)" = 0 ] || fail "must run as root (dpkg, KVM, userfaultfd)"
[ -r /dev/kvm ] && [ -w /dev/kvm ] || fail "/dev/kvm is not accessible"
command -v python3 >/dev/null || fail "python3 is required"
installed && fail "the $PKG package is already installed; this test installs and purges it (dpkg --purge $PKG first)"
T=$(mktemp -d "${TMPDIR:-/tmp}/umem-package-test.XXXXXX") || fail "mktemp failed"

# ---------------------------------------------------------------------------------------------
# 1. Build.

if [ -z "$DEB" ]; then
    t=$SECONDS
    DEB=$(timeout 1800 "$ROOT/scripts/package.sh") || fail "scripts/package.sh failed"
    say "built $DEB in $((SECONDS - t))s"
fi
[ -f "$DEB" ] || fail "no package at $DEB"
[ "$(dpkg-deb -f "$DEB" Package)" = "$PKG" ] || fail "$DEB is not the $PKG package"
ok "package $(basename "$DEB"), $(($(stat -c %s "$DEB") / 1024)) KiB"

# ---------------------------------------------------------------------------------------------
# 2. Install and look at what landed.

INSTALLED_BY_US=1
timeout 300 dpkg -i "$DEB" >"$T/install.log" 2>&1 || { cat "$T/install.log" >&2; fail "dpkg -i $DEB failed"; }
installed || fail "dpkg does not list $PKG as installed after dpkg -i"
ok "dpkg -i"

# Without systemd the maintainer scripts must start nothing: no process runs the installed umemd.
[ -d /run/systemd/system ] && say "note: systemd runs here; the package may have started umemd.socket"
if [ ! -d /run/systemd/system ]; then
    [ -z "$(running /usr/bin/umemd)" ] || fail "installing started /usr/bin/umemd (PIDs $(running /usr/bin/umemd | tr '\n' ' '))"
    ok "installing started nothing"
fi

version=$(dpkg-deb -f "$DEB" Version)
for b in "${BINS[@]}"; do
    [ "$(command -v "$b")" = "/usr/bin/$b" ] || fail "$b resolves to '$(command -v "$b")', not /usr/bin/$b"
    out=$("/usr/bin/$b" --version 2>&1) || fail "/usr/bin/$b --version failed: $out"
    [[ "$version" == "${out##* }"* ]] || fail "/usr/bin/$b --version says '$out', the package is $version"
done
ok "vmm, umemd, umem-ctl on PATH in /usr/bin, their version that of the package ($version)"

for f in "${FILES[@]}"; do
    [ -s "$f" ] || fail "$f is missing or empty"
done
ok "${#FILES[@]} files: man pages, completions, units, $DEFAULTS, README"

# Each man page documents every flag its binary's --help shows.
for page in "${MANPAGES[@]}"; do
    name=$(basename "$page" .gz)
    name=${name%.*}
    if command -v man >/dev/null; then
        text=$(MANWIDTH=200 man -l "$page" 2>"$T/man.err" | col -b) || fail "man -l $page failed: $(cat "$T/man.err")"
    else
        text=$(zcat "$page") || fail "zcat $page failed"
    fi
    flags=$("/usr/bin/$name" --help | grep -oE -- '--[a-z][a-z0-9-]+' | sort -u)
    [ -n "$flags" ] || fail "/usr/bin/$name --help shows no flag"
    for fl in $flags; do
        grep -qF -- "$fl" <<<"$text" || grep -qF -- "${fl//-/\\-}" <<<"$text" ||
            fail "$page does not mention $fl (from $name --help)"
    done
done
ok "man pages render$(command -v man >/dev/null && echo " with man -l") and document every flag of --help"

for b in "${BINS[@]}"; do
    bash -c "source /usr/share/bash-completion/completions/$b && complete -p $b" >/dev/null 2>&1 ||
        fail "the bash completion of $b does not load"
    grep -q -- "--help" "/usr/share/zsh/vendor-completions/_$b" || fail "zsh completion of $b lacks --help"
    grep -q -- "-l help" "/usr/share/fish/vendor_completions.d/$b.fish" || fail "fish completion of $b lacks help"
done
ok "bash completions load; zsh and fish completions present"

for u in "${UNITS[@]}"; do
    for d in $(sed -n 's/^Documentation=//p' "$u"); do
        case "$d" in
            man:*) p=${d#man:}; sec=${p##*\(}; sec=${sec%\)}; p=${p%\(*}
                [ -f "/usr/share/man/man$sec/$p.$sec.gz" ] || fail "$u: Documentation=$d is not installed" ;;
            file://*) [ -f "${d#file://}" ] || fail "$u: Documentation=$d is not installed" ;;
            *) fail "$u: Documentation=$d is neither man: nor file://" ;;
        esac
    done
done
exec_start=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' /usr/lib/systemd/system/umemd.service)
[ "$exec_start" = /usr/bin/umemd ] || fail "umemd.service runs '$exec_start', not the installed /usr/bin/umemd"
grep -qx 'EnvironmentFile=-/etc/default/umemd' /usr/lib/systemd/system/umemd.service ||
    fail "umemd.service does not read $DEFAULTS"
for l in "${ENABLED[@]}"; do
    [ -L "$l" ] || fail "$l is missing: the units were not enabled"
done
ok "units: ExecStart=/usr/bin/umemd, Documentation= installed, $DEFAULTS read, enabled"

# systemd's own check of the installed units (it also runs man on each Documentation= page and
# looks for each command), where it works offline.
if command -v systemd-analyze >/dev/null && command -v man >/dev/null; then
    timeout 60 systemd-analyze verify "${UNITS[@]}" >"$T/verify.log" 2>&1 ||
        fail "systemd-analyze verify: $(cat "$T/verify.log")"
    ok "systemd-analyze verify accepts the installed units"
fi

dpkg-query -W -f='${Conffiles}\n' "$PKG" | grep -q "^ $DEFAULTS " || fail "$DEFAULTS is not a conffile"
opts=$(bash -c ". $DEFAULTS && echo \"\${UMEMD_OPTS-unset}\"") || fail "$DEFAULTS is not valid shell"
[ "$opts" != unset ] || fail "$DEFAULTS does not set UMEMD_OPTS"
ok "$DEFAULTS: a conffile that sets UMEMD_OPTS ('$opts')"

# ---------------------------------------------------------------------------------------------
# 3. A migration with the installed binaries: two umemds by hand, two VMMs, umem-ctl.

export RUST_LOG=${RUST_LOG:-info}
ctl() { timeout $((TIMEOUT + 30)) /usr/bin/umem-ctl --timeout 30 "$@"; }

# As umemd.service would run it: the options of /etc/default/umemd, another socket.
for side in src dst; do
    start "umemd-$side" bash -c ". $DEFAULTS && exec /usr/bin/umemd --socket $T/$side.sock \$UMEMD_OPTS"
done
wait_socket "$T/src.sock" "$PID_umemd_src" "source umemd"
wait_socket "$T/dst.sock" "$PID_umemd_dst" "destination umemd"
[ "$(running /usr/bin/umemd | wc -l)" -ge 2 ] || fail "the umemds do not run /usr/bin/umemd"
ok "two umemds from /usr/bin/umemd"

start vmm-src /usr/bin/vmm --name src --mem "$MEM" --guest memtouch --cmdline "pages=1024 pause=1000" \
    --prefill 1 --control "$T/vs.sock" --serial "$T/src.serial" --umemd "$T/src.sock"
start vmm-dst /usr/bin/vmm --name dst --mem "$MEM" --incoming tcp:127.0.0.1:0 -S \
    --control "$T/vd.sock" --serial "$T/dst.serial" --umemd "$T/dst.sock"
wait_socket "$T/vs.sock" "$PID_vmm_src" "source vmm"
wait_socket "$T/vd.sock" "$PID_vmm_dst" "destination vmm"

URI=
deadline=$((SECONDS + TIMEOUT))
while :; do
    alive "$PID_vmm_dst" || fail "destination vmm exited"
    URI=$(ctl -s "$T/vd.sock" --json query-migrate 2>/dev/null | json 'j.get("listen_uri")') || URI=
    [ -n "$URI" ] && [ "$URI" != null ] && break
    [ "$SECONDS" -lt "$deadline" ] || fail "destination umemd reported no listening address within ${TIMEOUT}s"
    sleep 0.1
done
deadline=$((SECONDS + TIMEOUT))
until [ "$(last_pass "$T/src.serial")" -ge 1 ]; do
    alive "$PID_vmm_src" || fail "source vmm exited"
    [ "$SECONDS" -lt "$deadline" ] || fail "the source guest printed no pass within ${TIMEOUT}s"
    sleep 0.1
done
ok "source VM runs the guest ($MEM), destination listens on $URI"

ctl -s "$T/vs.sock" migrate "uri=$URI" mode=precopy downtime_limit_ms=50 >/dev/null || fail "migrate refused"
for side in vs vd; do
    timeout $((TIMEOUT + 30)) /usr/bin/umem-ctl --timeout "$TIMEOUT" --json -s "$T/$side.sock" wait-migrate \
        >"$T/$side-final.json" 2>"$T/$side-wait.log"
    phase=$(json 'j["phase"]' <"$T/$side-final.json" 2>/dev/null) || phase="unknown"
    [ "$phase" = completed ] || fail "migration on $side: phase $phase ($(cat "$T/$side-final.json" "$T/$side-wait.log"))"
done
ok "umem-ctl: migration completed on the source and on the destination"

src_digest=$(ctl -s "$T/vs.sock" --json query-ram-digest | json 'j["blocks"]') || fail "query-ram-digest failed on the source"
dst_digest=$(ctl -s "$T/vd.sock" --json query-ram-digest | json 'j["blocks"]') || fail "query-ram-digest failed on the destination"
[ "$src_digest" = "$dst_digest" ] || fail "RAM digests differ: source $src_digest, destination $dst_digest"
ok "RAM digests of both sides match"

src_last=$(last_pass "$T/src.serial")
ctl -s "$T/vd.sock" cont >/dev/null || fail "cont failed on the destination"
want=$((src_last + 2))
deadline=$((SECONDS + TIMEOUT))
until [ "$(last_pass "$T/dst.serial")" -ge "$want" ]; do
    alive "$PID_vmm_dst" || fail "destination vmm exited"
    [ "$SECONDS" -lt "$deadline" ] || fail "the destination guest did not reach pass $want within ${TIMEOUT}s"
    sleep 0.1
done
line=$(grep -aoE '^pass=[0-9]+ bad=[0-9]+ total_bad=[0-9]+$' "$T/dst.serial" | tail -n 1)
[ "${line##*total_bad=}" = 0 ] || fail "the guest found bad pages on the destination: $line"
ok "the guest goes on on the destination: $line"

ctl -s "$T/vd.sock" quit >/dev/null 2>&1
ctl -s "$T/vs.sock" quit >/dev/null 2>&1
# Stop every process now, so that purging finds none.
stop_pids

# ---------------------------------------------------------------------------------------------
# 4. Purge.

purge || { cat "$T/purge.log" >&2; fail "dpkg --purge $PKG failed"; }
INSTALLED_BY_US=0
dpkg-query -W -f='${db:Status-Status}' "$PKG" 2>/dev/null | grep -qx installed && fail "$PKG still installed after purge"
for f in "${BINS[@]/#//usr/bin/}" "${FILES[@]}" "${ENABLED[@]}" /usr/share/doc/umem; do
    [ -e "$f" ] || [ -L "$f" ] && fail "$f is still there after dpkg --purge"
done
ok "dpkg --purge removed every file, $DEFAULTS and the enablement symlinks"
exit 0
