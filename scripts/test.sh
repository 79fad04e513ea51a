#!/usr/bin/env bash
# Runs every test of the workspace:
#   - unit tests of proto, vmm, umemd and the end-to-end kit (testkit/), the protocol property
#     tests, doc tests;
#   - the end-to-end tests under tests/ (real VMMs and umemds on this machine). They need
#     /dev/kvm: without it they print a line saying they were skipped, unless UMEM_REQUIRE_KVM=1,
#     which turns that skip into a failure;
#   - a syntax check of the scripts and a self-check of the digest reference.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh NAME            # only tests whose name contains NAME
#
# Tests run one at a time (--test-threads=1): the end-to-end tests start VMs that each want a
# CPU, and the machines this runs on may have only two.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { echo "==> $*" >&2; }

step "set-up (scripts/setup.sh)"
scripts/setup.sh

step "script syntax"
for f in scripts/*.sh .ci/run; do
    [ -f "$f" ] && bash -n "$f"
done
got=$(python3 scripts/digest-ref.py 256 16)
[ "$got" = 30b195e7b3c73956 ] || { echo "scripts/digest-ref.py gives $got, expected 30b195e7b3c73956" >&2; exit 1; }

if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    step "/dev/kvm is usable: end-to-end tests will run"
elif [ "${UMEM_REQUIRE_KVM:-0}" = 1 ]; then
    echo "/dev/kvm is not usable and UMEM_REQUIRE_KVM=1" >&2
    exit 1
else
    step "/dev/kvm is not usable: end-to-end tests will be skipped (UMEM_REQUIRE_KVM=1 makes this fail)"
fi

# The end-to-end tests run the release binaries of every package.
step "cargo build --release --workspace --bins"
cargo build --release --workspace --bins

step "cargo test --release --workspace --no-fail-fast -- --test-threads=1 $*"
cargo test --release --workspace --no-fail-fast -- --test-threads=1 "$@"
