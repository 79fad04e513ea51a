//! The request server: answers the destination's page requests on the urgent channel, in
//! the thread that reads them, so that a requested page never waits behind background pages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::error::SourceError;
use super::sender::{Counters, Holes, PageSender};
use super::sent::SentMap;
use crate::mapping::GuestMapping;
use crate::stream::PeerStream;

/// Postcopy counters shared by the background sender and the request server.
#[derive(Debug, Default)]
pub(super) struct PostcopyCounters {
    pub(super) requested: AtomicU64,
    pub(super) urgent: AtomicU64,
    pub(super) pushed: AtomicU64,
    /// Requested pages the background had sent already, sent again on the urgent channel.
    pub(super) resent: AtomicU64,
    /// Page after the last requested one, as `block << 48 | page`; `u64::MAX` before any.
    pub(super) hint: AtomicU64,
}

/// Serves the destination's page requests on the urgent channel, so that a requested page
/// never waits behind background pages.
pub(super) struct RequestServer {
    pub(super) mem: Arc<GuestMapping>,
    pub(super) sent: Arc<SentMap>,
    pub(super) counters: Arc<Counters>,
    pub(super) pc: Arc<PostcopyCounters>,
    pub(super) stream: PeerStream,
    pub(super) sender: PageSender,
    /// What pages sent a second time add to the counters (only their bytes are passed on).
    pub(super) resend: Counters,
}

impl RequestServer {
    pub(super) fn serve(&mut self, run: proto::peer::PageRun) -> Result<(), SourceError> {
        let count = run.count as u64;
        self.mem
            .offset_of(run.block, run.first, count)
            .map_err(SourceError::BadRequest)?;
        self.pc.requested.fetch_add(count, Ordering::Relaxed);
        // Pages the background claimed already go too: they may still wait in the main
        // stream's queues, behind up to a socket buffer and a batch of other pages. The memfd
        // no longer changes, so the second copy is the same page, and the destination keeps
        // whichever arrives first. They are counted apart, so that the counters of pages sent
        // still count each page once.
        let claimed = self.sent.claim(run.block, run.first, count);
        for (first, n, new) in split_run(run.first, count, &claimed) {
            let off = self
                .mem
                .offset_of(run.block, first, n)
                .map_err(SourceError::Mapping)?;
            let counters = if new { &*self.counters } else { &self.resend };
            self.sender
                .send(
                    &mut self.stream,
                    &self.mem,
                    run.block,
                    first,
                    n,
                    off,
                    Holes::AsZero,
                    counters,
                )
                .map_err(SourceError::Urgent)?;
            if new {
                self.pc.urgent.fetch_add(n, Ordering::Relaxed);
            } else {
                self.pc.resent.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.sender
            .flush(&mut self.stream, &self.counters)
            .map_err(SourceError::Urgent)?;
        // Bytes are bytes on the wire, sent again or not.
        let again = self.resend.bytes.swap(0, Ordering::Relaxed);
        self.counters.bytes.fetch_add(again, Ordering::Relaxed);
        self.pc.hint.store(
            (run.block as u64) << 48 | (run.first + count),
            Ordering::Release,
        );
        Ok(())
    }
}

/// Splits `[first, first+count)` into `(first, count, newly_claimed)` runs, in order, given the
/// runs of it that `claimed` (sorted, inside the range) marks newly claimed.
fn split_run(first: u64, count: u64, claimed: &[(u64, u64)]) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut pos = first;
    for &(f, n) in claimed {
        if f > pos {
            out.push((pos, f - pos, false));
        }
        out.push((f, n, true));
        pos = f + n;
    }
    if pos < first + count {
        out.push((pos, first + count - pos, false));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::split_run;

    #[test]
    fn runs_split_into_newly_claimed_and_sent_before() {
        assert_eq!(split_run(10, 5, &[(10, 5)]), vec![(10, 5, true)]);
        assert_eq!(split_run(10, 5, &[]), vec![(10, 5, false)]);
        assert_eq!(
            split_run(10, 10, &[(12, 2), (16, 1)]),
            vec![
                (10, 2, false),
                (12, 2, true),
                (14, 2, false),
                (16, 1, true),
                (17, 3, false)
            ]
        );
        assert_eq!(
            split_run(0, 4, &[(0, 1), (3, 1)]),
            vec![(0, 1, true), (1, 2, false), (3, 1, true)]
        );
    }
}
