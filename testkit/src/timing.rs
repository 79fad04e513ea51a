//! Deadlines and polling: every wait of the kit has a deadline, scaled by
//! `UMEM_E2E_TIMEOUT_SCALE` on a slow machine.

use std::time::{Duration, Instant};

/// Multiplier for every timeout, from `UMEM_E2E_TIMEOUT_SCALE` (default 1).
pub fn timeout_scale() -> f64 {
    std::env::var("UMEM_E2E_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|&f| f > 0.0)
        .unwrap_or(1.0)
}

/// `secs` seconds, scaled by [`timeout_scale`].
pub fn secs(secs: u64) -> Duration {
    Duration::from_secs_f64(secs as f64 * timeout_scale())
}

/// Polls `f` every 50 ms until it returns `Some`, or returns `None` once `timeout` has passed.
pub fn try_wait_until<T>(timeout: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    poll_every(timeout, Duration::from_millis(50), f)
}

/// Polls `f` every `interval` until it returns `Some`, or returns `None` once `timeout` has
/// passed.
pub fn poll_every<T>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(interval);
    }
}

/// Polls `f` until it returns `Some`; panics naming `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    match try_wait_until(timeout, f) {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}
