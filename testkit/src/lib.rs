//! The end-to-end kit of the umem workspace: real `vmm` and `umemd` processes, real KVM, real
//! TCP on loopback. The end-to-end tests under `tests/` and `umem-bench` (`bench/`) use it.
//!
//! # Running
//!
//! ```text
//! cargo test --release --workspace -- --test-threads=1
//! ```
//!
//! The tests start the `vmm` and `umemd` binaries of the same build profile as the test
//! executable (`target/<profile>/`, found from `std::env::current_exe()`). A dependency on a
//! library crate does not make cargo build that package's binaries, so the first test of a
//! test process runs `cargo build [--release] -p vmm -p umemd` once (cargo makes this a no-op
//! when they are fresh). This keeps the tests correct after any edit of `vmm/`, `umemd/` or
//! `proto/` without an extra manual step. Set `UMEM_E2E_NO_BUILD=1` to skip that step (the
//! binaries must then exist), or `UMEM_E2E_BIN_DIR=/path` to use binaries from elsewhere.
//!
//! Tests run one at a time: [`TestEnv::new`] takes a process-wide lock, so
//! `--test-threads=1` is not required (but keeps the output readable). Every wait has a
//! deadline; `UMEM_E2E_TIMEOUT_SCALE=N` multiplies all of them on a slow machine.
//!
//! Every child process is killed (`SIGKILL`) and reaped when its handle is dropped, also when a
//! test panics. Children additionally get `PR_SET_PDEATHSIG(SIGKILL)`, so they die with the test
//! process even if it is itself killed. A failing test keeps its temporary directory (logs,
//! serial output) and prints where it is; `UMEM_E2E_KEEP=1` keeps it always.
//!
//! `/dev/kvm` is required; without it [`require_kvm`] makes each test print
//! `SKIP <test>: /dev/kvm not available` and return early, unless `UMEM_REQUIRE_KVM=1` is set
//! (as in CI), in which case it fails.
//!
//! # Modules
//!
//! | module | its job |
//! | --- | --- |
//! | `timing` | deadlines scaled for slow machines, and polling until something happens |
//! | `binaries` | finding the `vmm` and `umemd` binaries, building them first |
//! | `process` | a child process killed by PID and reaped when dropped, with its log |
//! | `env` | one test's lock and temporary directory; whether KVM is there |
//! | `umemd` | a running umemd, and its options (arguments, another user) |
//! | [`users`] | whether the kit may act as another user, and processes and raw clients run as one |
//! | `vmm` | a running vmm: its control socket, migration phases, serial output |
//! | `serial` | memtouch's pass lines and the checks made on them |
//! | `guest_ram` | where guest RAM lies in a vmm process, and reading it from outside |
//! | [`pair`] | the two sides of a migration and the checks every migration test makes |
//! | [`proxy`] | a TCP proxy between the umemds that drops a chosen frame and cuts or restores the link (or, for TLS, forwards bytes) |
//! | [`peer`] | a source driven by hand, authentication included, for tests of hostile or broken peers |
//! | [`hostile`] | a source that misbehaves on purpose against a real destination umemd |
//! | [`tls`] | a CA and certificates of the test's own, laid out as umemd reads them |

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod binaries;
mod env;
mod guest_ram;
pub mod hostile;
pub mod pair;
pub mod peer;
mod process;
pub mod proxy;
mod serial;
mod timing;
pub mod tls;
mod umemd;
pub mod users;
mod vmm;

pub use binaries::{bin_dir, binary};
pub use env::{closed_port, require_huge_pages, require_kvm, TestEnv};
pub use guest_ram::{read_process_memory, RamFileDigest, RamMapping};
pub use process::Proc;
pub use serial::{assert_consecutive, assert_no_bad, complete_lines, parse_passes, Pass};
pub use timing::{poll_every, secs, timeout_scale, try_wait_until, wait_until};
pub use umemd::{Umemd, UmemdBuilder};
pub use vmm::{ControlConnection, MigrationOutcome, Vmm, VmmBuilder};
