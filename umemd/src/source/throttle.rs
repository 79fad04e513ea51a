//! The bandwidth limits: `bandwidth_limit` in precopy, `postcopy_bandwidth_limit` (or else
//! `bandwidth_limit`) for postcopy's background pages.

use std::time::{Duration, Instant};

use proto::MigrationParams;

use super::sender::Counters;
use super::Source;

/// Which bandwidth limit applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Limit {
    /// Precopy rounds while the guest runs.
    Precopy,
    /// Postcopy's background pages.
    Postcopy,
}

/// The limit in bytes per second that applies; 0 means none.
pub(super) fn bytes_per_second(params: &MigrationParams, limit: Limit) -> u64 {
    match limit {
        Limit::Postcopy if params.postcopy_bandwidth_limit > 0 => params.postcopy_bandwidth_limit,
        Limit::Precopy | Limit::Postcopy => params.bandwidth_limit,
    }
}

impl Source {
    /// How long to wait before sending more, when the bytes sent since `t0` (counted from
    /// `bytes0`) exceed the bandwidth limit `limit`.
    pub(super) fn over_bandwidth(
        &self,
        limit: Limit,
        t0: Instant,
        bytes0: u64,
    ) -> Option<Duration> {
        let bps = bytes_per_second(&self.params, limit);
        if bps == 0 {
            return None;
        }
        let sent = Counters::get(&self.counters.bytes) - bytes0;
        let due = Duration::from_secs_f64(sent as f64 / bps as f64);
        due.checked_sub(t0.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postcopy_has_its_own_limit_or_else_the_precopy_one() {
        let mut p = MigrationParams {
            bandwidth_limit: 40 << 20,
            ..Default::default()
        };
        assert_eq!(bytes_per_second(&p, Limit::Precopy), 40 << 20);
        assert_eq!(bytes_per_second(&p, Limit::Postcopy), 40 << 20);
        p.postcopy_bandwidth_limit = 8 << 20;
        assert_eq!(bytes_per_second(&p, Limit::Precopy), 40 << 20);
        assert_eq!(bytes_per_second(&p, Limit::Postcopy), 8 << 20);
        p.bandwidth_limit = 0;
        assert_eq!(bytes_per_second(&p, Limit::Precopy), 0);
        assert_eq!(bytes_per_second(&p, Limit::Postcopy), 8 << 20);
    }
}
