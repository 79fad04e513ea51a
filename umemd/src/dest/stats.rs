//! The destination's statistics and progress reports.

use std::sync::atomic::Ordering;
use std::time::Instant;

use proto::local::LocalMessage;
use proto::{MigrationStats, PostcopyStats};

use super::{Dest, PROGRESS_EVERY};
use crate::link::send_local;
use crate::stats::rate;

impl Dest {
    pub(super) fn postcopy_stats(&self) -> PostcopyStats {
        let mut s = PostcopyStats::default();
        if let Some(pc) = &self.postcopy {
            pc.fault.stats(&mut s);
            s.pages_urgent = pc.urgent.pages.load(Ordering::Relaxed)
                + pc.urgent.zero_pages.load(Ordering::Relaxed);
            s.pages_pushed = pc.pushed;
        }
        s.recoveries = self.recoveries;
        s.paused_us = self.paused.as_micros() as u64;
        s
    }

    pub(super) fn progress(&mut self, force: bool) {
        if force || self.last_progress.elapsed() >= PROGRESS_EVERY {
            self.last_progress = Instant::now();
            self.stats.total_us = self.started.elapsed().as_micros() as u64;
            let bytes = self.reported_stats().bytes_sent;
            if self.rate_since.elapsed() >= PROGRESS_EVERY {
                self.stats.throughput_bps = rate(
                    bytes.saturating_sub(self.rate_bytes),
                    self.rate_since.elapsed(),
                );
                (self.rate_bytes, self.rate_since) = (bytes, Instant::now());
            }
            self.stats.remaining_pages = self.pages.unresolved();
            if self.phase.running() {
                self.report(&LocalMessage::PostcopyProgress(self.postcopy_stats()));
            }
            self.report(&LocalMessage::Progress(self.reported_stats()));
        }
    }

    /// Sends a report to the VMM (which may be gone: the migration goes on) and publishes its
    /// figures, with the fault latencies behind them, in the session's metrics.
    pub(super) fn report(&mut self, msg: &LocalMessage) {
        self.metrics.observe(msg);
        if let (LocalMessage::PostcopyProgress(_), Some(pc)) = (msg, &self.postcopy) {
            let (hist, sum_us) = pc.fault.latency_histogram();
            self.metrics.fault_latency(hist, sum_us);
        }
        let _ = send_local(&mut self.vmm, msg);
    }

    /// The main stream's counts plus what came on the urgent channel.
    pub(super) fn reported_stats(&self) -> MigrationStats {
        let mut s = self.stats;
        if let Some(pc) = &self.postcopy {
            let u = &pc.urgent;
            s.pages_sent += u.pages.load(Ordering::Relaxed);
            s.zero_pages += u.zero_pages.load(Ordering::Relaxed);
            s.bytes_sent += u.bytes.load(Ordering::Relaxed);
        }
        s
    }
}
