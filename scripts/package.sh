#!/usr/bin/env bash
# Builds the Debian package of umem from this checkout and prints the .deb's path on stdout.
#
#   scripts/package.sh          # then: dpkg -i target/debian/umem_*.deb
#
# 1. renders the man pages, shell completions and /etc/default/umemd from the binaries' clap
#    definitions (umem-packaging, packaging/) into packaging/generated/;
# 2. runs cargo-deb on packaging/Cargo.toml, whose [package.metadata.deb] lists what the
#    package holds; cargo-deb builds vmm, umemd and umem-ctl (release) and strips them.
#
# Needs cargo-deb (scripts/setup.sh --package installs it; CI's --dev does too).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

say() { echo "package: $*" >&2; }

cargo deb --version >/dev/null 2>&1 ||
    { say "cargo-deb is missing: run scripts/setup.sh --package (or cargo install cargo-deb --locked)"; exit 1; }

rm -rf packaging/generated
say "rendering man pages, completions and /etc/default/umemd"
cargo run --release -q -p umem-packaging -- --out packaging/generated >&2
say "building the package (cargo deb)"
# cargo-deb prints the path of the package on stdout, its progress on stderr.
deb=$(cargo deb -p umem-packaging --strip | tail -n 1)
[ -f "$deb" ] || { say "cargo deb did not report a package"; exit 1; }
echo "$deb"
