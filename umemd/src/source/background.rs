//! The postcopy background pusher: sends every page not yet sent, continuing near the last
//! requested page, until the destination confirms that it holds them all.

use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use proto::peer::PeerMessage;
use proto::PAGE_SIZE;

use super::error::SourceError;
use super::sender::{Counters, Holes};
use super::throttle::Limit;
use super::{Peer, Source, CHUNK_PAGES, COMPLETE_TIMEOUT};

impl Source {
    /// Pushes every page not yet sent, continuing near the last requested page, until the
    /// destination confirms that it holds them all.
    pub(super) fn background(&mut self, peer: &mut Peer) -> Result<(), SourceError> {
        let mut block = 0u32;
        let mut page = 0u64;
        let mut last_hint = u64::MAX;
        let mut all_sent_at: Option<Instant> = None;
        self.sender.map_frozen(&self.mem);
        // A destination on huge pages places each only once all of it is there: a jump to a
        // requested page never leaves one half sent behind it.
        let chunk = CHUNK_PAGES.max(self.dest_page_size / PAGE_SIZE);
        let t0 = Instant::now();
        let bytes0 = Counters::get(&self.counters.bytes);
        loop {
            if dest_has_all(peer, Duration::ZERO)? {
                return Ok(());
            }
            self.poll_vmm()?;
            self.progress(false);

            if self.sent.remaining() == 0 {
                match all_sent_at {
                    None => {
                        self.sender.push(&PeerMessage::AllSent);
                        self.sender
                            .flush(&mut peer.stream, &self.counters)
                            .map_err(|e| self.peer_error(peer, e))?;
                        all_sent_at = Some(Instant::now());
                    }
                    Some(t) if t.elapsed() > COMPLETE_TIMEOUT => {
                        return Err(SourceError::NeverConfirmed)
                    }
                    Some(_) => {}
                }
                if self.wait_dest(peer)? {
                    return Ok(());
                }
                continue;
            }
            if self.params.no_background {
                if self.wait_dest(peer)? {
                    return Ok(());
                }
                continue;
            }

            let hint = self.pc.hint.load(Ordering::Acquire);
            if hint != last_hint {
                last_hint = hint;
                block = (hint >> 48) as u32;
                page = hint & ((1 << 48) - 1);
            }
            let Some((b, p)) = self.next_unsent(block, page) else {
                continue;
            };
            let block_pages = self.sent.block_pages(b);
            let mut end = (p - p % chunk + chunk).min(block_pages);
            // A hole is announced whole, however large, rather than a chunk at a time.
            let at = self.mem.offset_of(b, p, 1).map_err(SourceError::Mapping)?;
            if let Some(h) = self.sender.hole_end(&self.mem, at) {
                end = end.max((p + (h - at) / PAGE_SIZE).min(block_pages));
            }
            for (first, count) in self.sent.claim(b, p, end - p) {
                let off = self
                    .mem
                    .offset_of(b, first, count)
                    .map_err(SourceError::Mapping)?;
                self.sender
                    .send(
                        &mut peer.stream,
                        &self.mem,
                        b,
                        first,
                        count,
                        off,
                        Holes::Announce,
                        &self.counters,
                    )
                    .map_err(|e| self.peer_error(peer, e))?;
                self.pc.pushed.fetch_add(count, Ordering::Relaxed);
            }
            block = b;
            page = end;
            if let Some(wait) = self.over_bandwidth(Limit::Postcopy, t0, bytes0) {
                self.sender
                    .flush(&mut peer.stream, &self.counters)
                    .map_err(|e| self.peer_error(peer, e))?;
                std::thread::sleep(wait.min(Duration::from_millis(50)));
            }
        }
    }

    /// Flushes, then waits briefly for a message from the destination; true once it has
    /// every page.
    pub(super) fn wait_dest(&mut self, peer: &mut Peer) -> Result<bool, SourceError> {
        self.sender
            .flush(&mut peer.stream, &self.counters)
            .map_err(|e| self.peer_error(peer, e))?;
        self.heartbeat(peer)?;
        dest_has_all(peer, Duration::from_millis(20))
    }

    /// The first unsent page at or after `(block, page)`, wrapping around the blocks.
    pub(super) fn next_unsent(&self, block: u32, page: u64) -> Option<(u32, u64)> {
        let n = self.sent.block_count() as u32;
        let block = if block < n { block } else { 0 };
        for i in 0..=n {
            let b = (block + i) % n;
            let from = if i == 0 { page } else { 0 };
            if let Some(p) = self.sent.next_unsent(b, from) {
                return Some((b, p));
            }
        }
        None
    }
}

/// Waits up to `timeout` for a message from the destination in postcopy: true once it says it
/// has every page; any other message ends the migration.
pub(super) fn dest_has_all(peer: &Peer, timeout: Duration) -> Result<bool, SourceError> {
    match peer.rx.recv_timeout(timeout) {
        Ok(Ok(PeerMessage::AllReceived)) => Ok(true),
        Ok(Ok(PeerMessage::Error(m))) => Err(SourceError::PeerFailed(m)),
        Ok(Ok(other)) => Err(SourceError::unexpected("AllReceived", other)),
        Ok(Err(e)) => Err(SourceError::PeerLink(e)),
        Err(RecvTimeoutError::Timeout) => Ok(false),
        Err(RecvTimeoutError::Disconnected) => Err(SourceError::PeerClosed),
    }
}
