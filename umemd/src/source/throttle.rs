//! The bandwidth limit.

use std::time::{Duration, Instant};

use super::sender::Counters;
use super::Source;

impl Source {
    /// How long to wait before sending more, when the bytes sent since `t0` (counted from
    /// `bytes0`) exceed the bandwidth limit.
    pub(super) fn over_bandwidth(&self, t0: Instant, bytes0: u64) -> Option<Duration> {
        if self.params.bandwidth_limit == 0 {
            return None;
        }
        let sent = Counters::get(&self.counters.bytes) - bytes0;
        let due = Duration::from_secs_f64(sent as f64 / self.params.bandwidth_limit as f64);
        due.checked_sub(t0.elapsed())
    }
}
