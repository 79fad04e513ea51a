//! A pass over dirty pages: the page path of the source in precopy and at a precopy
//! switchover.

use std::time::Instant;

use proto::peer::{PeerMessage, MAX_RUN_PAGES};

use super::error::SourceError;
use super::phase::SourcePhase;
use super::sender::{Counters, Holes};
use super::throttle::Limit;
use super::{Peer, Source};
use crate::bitmap::DirtyBitmap;
use crate::stats::rate;

impl Source {
    /// Streams every page set in `dirty` (a precopy round, or the last pages at a precopy
    /// switchover). In the first round holes in the memfd are skipped, or announced to a
    /// postcopy-capable destination. The bandwidth limit applies while the guest runs.
    ///
    /// A precopy round that runs past a time limit (see [`super::policy::overdue`]) ends early:
    /// then the pages it did not send come back, to be sent at the switchover or discarded for
    /// postcopy.
    pub(super) fn send_pages(
        &mut self,
        peer: &mut Peer,
        dirty: &DirtyBitmap,
        first_round: bool,
    ) -> Result<Option<DirtyBitmap>, SourceError> {
        let limited = self.phase == SourcePhase::Precopy;
        let holes = match (first_round, self.dest_postcopy) {
            (true, false) => Holes::Skip,
            (true, true) => Holes::Announce,
            (false, _) => Holes::AsZero,
        };
        let t0 = Instant::now();
        let bytes0 = Counters::get(&self.counters.bytes);
        self.sender.new_pass();
        let mut unsent = None;
        let mut runs = dirty.runs(MAX_RUN_PAGES as u64);
        while let Some((block, first, count)) = runs.next() {
            let off = self
                .mem
                .offset_of(block, first, count)
                .map_err(SourceError::DirtyPage)?;
            self.sender
                .send(
                    &mut peer.stream,
                    &self.mem,
                    block,
                    first,
                    count,
                    off,
                    holes,
                    &self.counters,
                )
                .map_err(|e| self.peer_error(peer, e))?;
            self.sent.claim(block, first, count);
            self.stats.remaining_pages = self.stats.remaining_pages.saturating_sub(count);
            self.poll_vmm()?;
            match peer.rx.try_recv() {
                Ok(Ok(PeerMessage::Error(m))) => return Err(SourceError::PeerFailed(m)),
                Ok(Err(e)) => return Err(SourceError::PeerLink(e)),
                _ => {}
            }
            if let Some(wait) = self
                .over_bandwidth(Limit::Precopy, t0, bytes0)
                .filter(|_| limited)
            {
                std::thread::sleep(wait);
            }
            // Throughput so far, including this round, so progress shows it while it runs.
            self.stats.throughput_bps = rate(
                self.send_bytes + Counters::get(&self.counters.bytes) - bytes0,
                self.send_time + t0.elapsed(),
            );
            self.progress(false);
            if limited && self.overdue().is_some() {
                let mut rest = DirtyBitmap::new(self.mem.blocks());
                for (b, f, c) in runs.by_ref() {
                    rest.set_run(b, f, c);
                }
                unsent = Some(rest);
                break;
            }
        }
        self.sender
            .flush(&mut peer.stream, &self.counters)
            .map_err(|e| self.peer_error(peer, e))?;
        self.round_elapsed = t0.elapsed();
        self.send_time += self.round_elapsed;
        self.send_bytes += Counters::get(&self.counters.bytes) - bytes0;
        self.stats.throughput_bps = self.bandwidth();
        Ok(unsent)
    }
}
