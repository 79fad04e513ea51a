#!/usr/bin/env bash
# Random faults at random moments of random migrations, and a check that nothing was lost.
#
#   scripts/chaos.sh [--runs N] [--seed S]
#
# Each run migrates a memtouch guest (precopy, postcopy or hybrid) between two VMMs and two
# umemds on this machine, through a fault-injecting proxy, and injects one fault 0-1500 ms in:
# the link cut or stalled, a umemd killed and started again, or latency. A migration that failed
# before its switchover was committed is retried once, as an operator would. Prints one line per
# run and a summary (runs, faults injected, recoveries, retries, VMs lost, bad pages); exits 0
# only when no VM was lost and no page read wrong. Needs root and /dev/kvm (scripts/setup.sh
# installs the rest). The same seed gives the same faults.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo build --release --workspace --bins -q
exec target/release/umem-chaos "$@"
