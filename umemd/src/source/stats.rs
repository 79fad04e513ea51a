//! The source's statistics and progress reports.

use std::sync::atomic::Ordering;
use std::time::Instant;

use proto::local::LocalMessage;
use proto::PostcopyStats;

use super::phase::SourcePhase;
use super::sender::Counters;
use super::{Source, PROGRESS_EVERY};
use crate::stats::rate;

impl Source {
    pub(super) fn bandwidth(&self) -> u64 {
        rate(self.send_bytes, self.send_time)
    }

    pub(super) fn update_stats(&mut self) {
        let c = &self.counters;
        self.stats.pages_sent = Counters::get(&c.pages);
        self.stats.zero_pages = Counters::get(&c.zero_pages);
        self.stats.holes_skipped = Counters::get(&c.holes);
        self.stats.bytes_sent = Counters::get(&c.bytes);
        self.stats.total_us = self.started.elapsed().as_micros() as u64;
        if self.phase == SourcePhase::Postcopy {
            self.stats.remaining_pages = self.sent.remaining();
            let secs = self.started.elapsed().as_secs_f64().max(1e-6);
            self.stats.throughput_bps = (self.stats.bytes_sent as f64 / secs) as u64;
        }
    }

    pub(super) fn postcopy_stats(&self) -> PostcopyStats {
        PostcopyStats {
            pages_requested: self.pc.requested.load(Ordering::Relaxed),
            pages_urgent: self.pc.urgent.load(Ordering::Relaxed),
            pages_pushed: self.pc.pushed.load(Ordering::Relaxed),
            remaining_pages: self.sent.remaining(),
            recoveries: self.recoveries,
            paused_us: self.paused.as_micros() as u64,
            ..Default::default()
        }
    }

    pub(super) fn progress(&mut self, force: bool) {
        if force || self.last_progress.elapsed() >= PROGRESS_EVERY {
            self.last_progress = Instant::now();
            self.update_stats();
            if self.phase == SourcePhase::Postcopy {
                self.report(&LocalMessage::PostcopyProgress(self.postcopy_stats()));
            }
            self.report(&LocalMessage::Progress(self.stats));
        }
    }
}
