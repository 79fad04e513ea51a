//! How fast an idle CPU wakes while a migration's switchover and postcopy run.
//!
//! Every requested page crosses four wake-ups: the destination's fault thread, the source's
//! request server, the destination's urgent receiver, the vCPU. A thread woken on a CPU that
//! has gone into a deep idle state (or, inside a VM, halted its vCPU) starts only once the CPU
//! is back, tens of microseconds on some hosts. For the length of the switchover and the
//! postcopy, umemd asks the kernel, through PM QoS (`/dev/cpu_dma_latency`), for idle CPUs
//! that wake within a bound; 0 keeps them polling. The request ends when its holder is dropped
//! (the kernel drops it with the file), so a umemd that dies leaves the host's policy as it was.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use log::{debug, info};

/// The kernel's interface to CPU wake-up latency requests.
pub const CPU_LATENCY_QOS: &str = "/dev/cpu_dma_latency";

/// The bound umemd asks for unless told otherwise, in microseconds.
pub const DEFAULT_WAKE_LATENCY_US: u32 = 0;

/// The bound this umemd asks for; `None` leaves the host's idle policy alone.
static POLICY: OnceLock<Option<u32>> = OnceLock::new();

/// Whether a refused request was logged already.
static REFUSAL_LOGGED: AtomicBool = AtomicBool::new(false);

/// Sets, once at start, the bound asked for during a switchover and a postcopy (`None`: none).
pub fn set_policy(us: Option<u32>) {
    let _ = POLICY.set(us);
}

fn policy() -> Option<u32> {
    *POLICY.get_or_init(|| Some(DEFAULT_WAKE_LATENCY_US))
}

/// A request that idle CPUs wake within a bound, in force while it lives.
#[derive(Debug)]
pub struct WakeLatencyRequest {
    _qos: File,
}

impl WakeLatencyRequest {
    /// Asks `qos` (a PM QoS device) for a wake-up latency of at most `us` microseconds.
    pub fn open(qos: &Path, us: u32) -> io::Result<Self> {
        let mut file = OpenOptions::new().write(true).open(qos)?;
        // The device takes the bound as a 32-bit integer in the host's byte order.
        let value = i32::try_from(us).unwrap_or(i32::MAX);
        file.write_all(&value.to_ne_bytes())?;
        Ok(WakeLatencyRequest { _qos: file })
    }

    /// The request of this umemd's policy, for a migration of `vm` entering its switchover or
    /// its postcopy; `None` when the policy asks for none or the host refuses (not root, no
    /// PM QoS), which costs latency, never the migration.
    pub fn for_migration(vm: &str) -> Option<Self> {
        let us = policy()?;
        match Self::open(Path::new(CPU_LATENCY_QOS), us) {
            Ok(r) => {
                debug!(
                    "{vm}: idle CPUs wake within {us} us while the switchover and the postcopy run"
                );
                Some(r)
            }
            Err(e) => {
                // Said once: every migration of this umemd would meet the same refusal.
                if !REFUSAL_LOGGED.swap(true, Ordering::Relaxed) {
                    info!(
                        "{vm}: idle CPUs keep the host's wake-up latency ({CPU_LATENCY_QOS}: {e}); \
                         umemd needs write access to it, or --cpu-wake-latency-us off"
                    );
                } else {
                    debug!("{vm}: {CPU_LATENCY_QOS}: {e}");
                }
                None
            }
        }
    }
}

/// A migration's hold on this umemd's request: taken while its switchover or its postcopy
/// runs, given back in between and at the end.
#[derive(Debug, Default)]
pub struct WakeLatencyHold(Option<WakeLatencyRequest>);

impl WakeLatencyHold {
    /// Takes the request of this umemd's policy for the migration of `vm`, unless held already.
    pub fn hold(&mut self, vm: &str) {
        if self.0.is_none() {
            self.0 = WakeLatencyRequest::for_migration(vm);
        }
    }

    /// Gives the request back, if held.
    pub fn release(&mut self) {
        self.0 = None;
    }
}

/// The bound in force on the host now (the smallest of all requests), in microseconds.
pub fn current(qos: &Path) -> io::Result<i32> {
    let mut b = [0u8; 4];
    File::open(qos)?.read_exact(&mut b)?;
    Ok(i32::from_ne_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_holds_while_it_lives_and_ends_with_it() {
        let qos = Path::new(CPU_LATENCY_QOS);
        let Ok(before) = current(qos) else {
            eprintln!("skipped: {CPU_LATENCY_QOS} cannot be read here");
            return;
        };
        // Below anything a host sets by default, and above 0 in case another process holds 0.
        let us = 7;
        let r = WakeLatencyRequest::open(qos, us).expect("root may write PM QoS requests");
        // Other tests' migrations may hold lower requests meanwhile.
        assert!(current(qos).unwrap() <= us as i32);
        drop(r);
        let after = current(qos).unwrap();
        assert!(
            after != us as i32 || before == us as i32,
            "the request outlived its holder: {after}"
        );
    }

    #[test]
    fn a_device_that_is_not_there_is_an_error_not_a_panic() {
        let e = WakeLatencyRequest::open(Path::new("/nonexistent/cpu_dma_latency"), 0);
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
