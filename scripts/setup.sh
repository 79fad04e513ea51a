#!/usr/bin/env bash
# Makes this machine able to build and run umem; the demo, the tests and CI all run it first.
#
#   scripts/setup.sh            # install what is missing (as root), or say what to run
#   scripts/setup.sh --check    # only report; exit 1 if anything is missing
#   scripts/setup.sh --package  # also what building the Debian package needs
#
# Idempotent: on a machine that has everything it installs nothing and says so. As root it
# installs missing Debian packages with apt-get, the rustfmt/clippy components with rustup and
# cargo-deb with cargo install;
# as another user it prints the exact command to run and exits 1. It names each package it
# installs on a line of its own ("setup: installing PACKAGE"), and ends with one line:
# "setup: nothing to install" or "setup: installed: PKG...".
#
# What the build needs:
#   - cargo (a Rust toolchain, 1.87 or newer): not installed here; https://rustup.rs
#   - gcc and binutils able to build freestanding 32-bit code (the built-in guests): gcc, and
#     gcc-multilib only when plain gcc cannot (checked by compiling a real guest);
#   - libclang: the userfaultfd crate generates its kernel bindings with bindgen (libclang-dev);
#   - python3: the scripts.
# Optional: rustfmt and clippy (CI's checks; installed with --dev), qemu-system-x86 (the
# baseline of umem-bench; installed with --qemu), cargo-deb and dpkg-dev (dpkg-shlibdeps, for
# the package's dependencies) to build the Debian package (scripts/package.sh; installed with
# --package, and with --dev since CI builds and tests the package).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CHECK=0 DEV=0 QEMU=0 PACKAGE=0
# The cargo-deb that scripts/package.sh is tested with; its rust-version (1.85) is below ours.
CARGO_DEB_VERSION=3.8.0
for a in "$@"; do
    case "$a" in
        --check) CHECK=1 ;;
        --dev) DEV=1 PACKAGE=1 ;;
        --package) PACKAGE=1 ;;
        --qemu) QEMU=1 ;;
        -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "setup: unknown argument $a" >&2; exit 2 ;;
    esac
done

say() { echo "setup: $*" >&2; }

# The built-in guests are freestanding 32-bit code (vmm/build.rs): compile one the same way.
guest_toolchain_works() {
    local d rc=0
    command -v cc >/dev/null || return 1
    d=$(mktemp -d)
    cc -m32 -ffreestanding -fno-pic -fno-pie -fno-stack-protector \
        -fno-asynchronous-unwind-tables -nostdlib -O2 -static -Wall -I vmm/guests \
        -Wl,-m,elf_i386 -no-pie -Wl,--build-id=none -Wl,-z,max-page-size=0x1000 \
        -T vmm/guests/link.ld -o "$d/memtouch.elf" \
        vmm/guests/entry.S vmm/guests/lib.c vmm/guests/memtouch.c >"$d/log" 2>&1 || rc=$?
    rm -rf "$d"
    return "$rc"
}

# bindgen loads libclang.so or libclang-VERSION.so; libclang-cpp (present on many machines
# that lack libclang) does not do.
have_libclang() {
    ldconfig -p 2>/dev/null | grep -qE '[[:space:]]libclang(-[0-9.]+)?\.so' ||
        ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1
}

# Debian packages this machine lacks.
missing_packages() {
    local m=()
    command -v cc >/dev/null || m+=(gcc)
    command -v ld >/dev/null || m+=(binutils)
    command -v python3 >/dev/null || m+=(python3)
    have_libclang || m+=(libclang-dev)
    # gcc-multilib only when gcc is there and still cannot build a guest.
    if command -v cc >/dev/null && ! guest_toolchain_works; then m+=(gcc-multilib); fi
    if [ "$QEMU" = 1 ] && ! command -v qemu-system-x86_64 >/dev/null; then m+=(qemu-system-x86); fi
    if [ "$PACKAGE" = 1 ] && ! command -v dpkg-shlibdeps >/dev/null; then m+=(dpkg-dev); fi
    echo "${m[@]}"
}

missing_components() {
    local m=()
    if [ "$DEV" = 1 ]; then
        cargo fmt --version >/dev/null 2>&1 || m+=(rustfmt)
        cargo clippy --version >/dev/null 2>&1 || m+=(clippy)
    fi
    echo "${m[@]}"
}

# Cargo subcommands installed with cargo install.
missing_cargo_tools() {
    local m=()
    if [ "$PACKAGE" = 1 ]; then
        cargo deb --version >/dev/null 2>&1 || m+=(cargo-deb)
    fi
    echo "${m[@]}"
}

apt_install() {
    # apt may be slow or locked by an unattended upgrade: wait for the lock and retry.
    local i
    for i in 1 2 3; do
        if DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -o DPkg::Lock::Timeout=300 -q update >&2 &&
            DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -o DPkg::Lock::Timeout=300 -q \
                install -y --no-install-recommends "$@" >&2; then
            return 0
        fi
        say "apt-get failed (attempt $i), retrying"
        sleep $((i * 10))
    done
    return 1
}

if ! command -v cargo >/dev/null; then
    say "cargo is missing: install a Rust toolchain (1.87 or newer), e.g."
    say "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y && . ~/.cargo/env"
    exit 1
fi

read -r -a pkgs <<<"$(missing_packages)"
read -r -a comps <<<"$(missing_components)"
read -r -a tools <<<"$(missing_cargo_tools)"
if [ ${#pkgs[@]} -eq 0 ] && [ ${#comps[@]} -eq 0 ] && [ ${#tools[@]} -eq 0 ]; then
    say "nothing to install"
    exit 0
fi
if [ "$CHECK" = 1 ]; then
    all=("${pkgs[@]}" "${comps[@]}" "${tools[@]}")
    say "missing: ${all[*]}"
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    [ ${#pkgs[@]} -gt 0 ] && say "missing packages; run as root: apt-get install -y --no-install-recommends ${pkgs[*]}"
    [ ${#comps[@]} -gt 0 ] && say "missing components; run: rustup component add ${comps[*]}"
    [ ${#tools[@]} -gt 0 ] && say "missing cargo-deb; run: cargo install cargo-deb --version $CARGO_DEB_VERSION --locked"
    exit 1
fi
if [ ${#pkgs[@]} -gt 0 ]; then
    for p in "${pkgs[@]}"; do say "installing $p"; done
    apt_install "${pkgs[@]}" || { say "apt-get install ${pkgs[*]} failed"; exit 1; }
fi
if [ ${#comps[@]} -gt 0 ]; then
    for c in "${comps[@]}"; do say "installing $c"; done
    rustup component add "${comps[@]}" >&2 || { say "rustup component add ${comps[*]} failed"; exit 1; }
fi
if [ ${#tools[@]} -gt 0 ]; then
    # Only cargo-deb is ever listed here.
    say "installing cargo-deb"
    timeout 1800 cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked >&2 ||
        { say "cargo install cargo-deb failed"; exit 1; }
fi
# What was installed must now be found: a second look finds nothing left.
read -r -a still <<<"$(missing_packages) $(missing_components) $(missing_cargo_tools)"
if [ ${#still[@]} -gt 0 ]; then
    say "still missing after installing: ${still[*]}"
    exit 1
fi
all=("${pkgs[@]}" "${comps[@]}" "${tools[@]}")
say "installed: ${all[*]}"
