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
}

impl RequestServer {
    pub(super) fn serve(&mut self, run: proto::peer::PageRun) -> Result<(), SourceError> {
        let count = run.count as u64;
        self.mem
            .offset_of(run.block, run.first, count)
            .map_err(SourceError::BadRequest)?;
        self.pc.requested.fetch_add(count, Ordering::Relaxed);
        for (first, n) in self.sent.claim(run.block, run.first, count) {
            let off = self
                .mem
                .offset_of(run.block, first, n)
                .map_err(SourceError::Mapping)?;
            self.sender
                .send(
                    &mut self.stream,
                    &self.mem,
                    run.block,
                    first,
                    n,
                    off,
                    Holes::AsZero,
                    &self.counters,
                )
                .map_err(SourceError::Urgent)?;
            self.pc.urgent.fetch_add(n, Ordering::Relaxed);
        }
        self.sender
            .flush(&mut self.stream, &self.counters)
            .map_err(SourceError::Urgent)?;
        self.pc.hint.store(
            (run.block as u64) << 48 | (run.first + count),
            Ordering::Release,
        );
        Ok(())
    }
}
