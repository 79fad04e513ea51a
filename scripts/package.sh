#!/usr/bin/env bash
# Builds the Debian package of umem from this checkout and prints the .deb's path on stdout.
#
#   dpkg -i "$(scripts/package.sh)"
#
# 1. builds the workspace's binaries (cargo build --release --workspace --bins, as
#    scripts/test.sh does, so that after it nothing is compiled again);
# 2. renders the man pages, shell completions and /etc/default/umemd from the binaries' clap
#    definitions (umem-packaging, packaging/) into packaging/generated/;
# 3. runs cargo-deb on packaging/Cargo.toml, whose [package.metadata.deb] lists what the
#    package holds; it takes vmm, umemd and umem-ctl from that build and strips them.
#
# Needs cargo-deb and python3 (scripts/setup.sh --package installs them; CI's --dev does too).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

say() { echo "package: $*" >&2; }

cargo deb --version >/dev/null 2>&1 ||
    { say "cargo-deb is missing: run scripts/setup.sh --package (or cargo install cargo-deb --locked)"; exit 1; }

# The whole workspace, as cargo deb builds it below: built for one package alone (cargo run
# -p), the libraries would resolve other features and be compiled a second time.
say "building the workspace's binaries (cargo build --release --workspace --bins)"
cargo build --release --workspace --bins >&2
target=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
rm -rf packaging/generated
say "rendering man pages, completions and /etc/default/umemd"
"$target/release/umem-packaging" --out packaging/generated >&2
say "building the package (cargo deb)"
# cargo-deb prints the path of the package on stdout, its progress on stderr.
deb=$(cargo deb -p umem-packaging --strip | tail -n 1)
[ -f "$deb" ] || { say "cargo deb did not report a package"; exit 1; }
echo "$deb"
