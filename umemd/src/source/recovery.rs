//! Postcopy recovery, source side: when the link to the destination fails after the VM ran
//! there, the source keeps every page (umemd holds the memfd) and reconnects to the same
//! destination by itself, with backoff, under the same session id. The destination says which
//! pages it holds; every other page is sent again, requests that were in flight included.

use std::net::Shutdown;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use proto::local::LocalMessage;
use proto::peer::{PeerMessage, CAP_RECOVERY, VERSION};

use super::error::SourceError;
use super::phase::SourcePhase;
use super::{Peer, Source};
use crate::link::send_peer;

/// First wait between two connection attempts; it doubles up to [`MAX_BACKOFF`], which is
/// short: an attempt costs one connection, and pages should flow soon after the link is back.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(150);

impl Source {
    /// Serves requests and pushes pages until the destination has them all, resuming on a new
    /// connection each time the link fails (when the destination can).
    pub(super) fn postcopy_until_done(&mut self, peer: &mut Peer) -> Result<(), SourceError> {
        if let Some(e) = self.lost_link.take() {
            self.recover(peer, e)?;
        }
        loop {
            match self.background(peer) {
                Ok(()) => return Ok(()),
                Err(e) if e.is_link_failure() && self.dest_recovery => self.recover(peer, e)?,
                Err(e) => return Err(e),
            }
        }
    }

    /// Pauses on `cause`, then reconnects until a destination of this session answers, and
    /// replaces `peer` with the new connection.
    fn recover(&mut self, peer: &mut Peer, cause: SourceError) -> Result<(), SourceError> {
        warn!(
            "{}: postcopy paused: {cause}; reconnecting to {}",
            self.vm, self.uri
        );
        let _ = peer.stream.shutdown(Shutdown::Both);
        if let Some(u) = &peer.urgent {
            let _ = u.shutdown(Shutdown::Both);
        }
        // A frame may have been cut in the middle: the new stream starts clean.
        self.sender.reset();
        self.set_phase(SourcePhase::PostcopyPaused)?;
        self.report(&LocalMessage::PostcopyPaused {
            reason: cause.to_string(),
        });
        self.progress(true);
        let paused_at = Instant::now();
        *peer = self.reconnect_until_back()?;
        self.recoveries += 1;
        self.paused += paused_at.elapsed();
        self.set_phase(SourcePhase::Postcopy)?;
        info!(
            "{}: postcopy resumed after {} ms paused; {} pages to go",
            self.vm,
            paused_at.elapsed().as_millis(),
            self.sent.remaining()
        );
        self.progress(true);
        Ok(())
    }

    /// A umemd started again, taking over postcopy session `session_id` from one that died:
    /// the VM runs on the destination, which says which pages it holds; every other page is
    /// sent from the memfd the VMM handed over.
    pub(super) fn resume_after_restart(
        &mut self,
        peer_slot: &mut Option<Peer>,
        session_id: u64,
    ) -> Result<(), SourceError> {
        self.session_id = session_id;
        // Everything a postcopy needs is here: the machine state went long ago.
        self.state_taken = true;
        self.switching_to_postcopy = true;
        self.dest_postcopy = true;
        self.dest_recovery = true;
        self.postcopy_ran = true;
        self.sender.freeze();
        self.set_phase(SourcePhase::PostcopyPaused)?;
        self.report(&LocalMessage::Session(session_id));
        self.progress(true);
        info!(
            "{}: took over postcopy session {session_id:#x}; connecting to {}",
            self.vm, self.uri
        );
        let paused_at = Instant::now();
        let peer = peer_slot.insert(self.reconnect_until_back()?);
        self.recoveries += 1;
        self.paused += paused_at.elapsed();
        self.set_phase(SourcePhase::Postcopy)?;
        self.progress(true);
        crate::priority::lower_priority();
        self.postcopy_until_done(peer)
    }

    /// Connects again and again until the destination of this session answers.
    fn reconnect_until_back(&mut self) -> Result<Peer, SourceError> {
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0u64;
        loop {
            // A cancel is refused now (the VM runs on the destination); a VMM that went away
            // changes nothing: umemd holds every page.
            self.poll_vmm()?;
            if self.paused_by_request {
                // Until migrate-resume says where to.
                std::thread::sleep(FIRST_BACKOFF);
                continue;
            }
            attempts += 1;
            match self.reconnect() {
                Ok(p) => {
                    debug!("{}: back after {attempts} attempts", self.vm);
                    return Ok(p);
                }
                Err(e @ SourceError::NotResumable(_)) => return Err(e),
                Err(e) => {
                    debug!("{}: reconnecting (attempt {attempts}): {e}", self.vm);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One attempt: a new main stream and urgent channel under the session id, then the
    /// destination's list of the pages it holds, which makes every other page unsent.
    fn reconnect(&mut self) -> Result<Peer, SourceError> {
        let mut peer = self.connect()?;
        let deadline = Instant::now() + self.link_timeout();
        let hello = PeerMessage::Hello {
            version: VERSION,
            capabilities: proto::peer::CAP_POSTCOPY | CAP_RECOVERY,
            session_id: self.session_id,
            link_timeout_ms: self.link_timeout().as_millis() as u32,
        };
        send_peer(&mut peer.stream, &hello).map_err(SourceError::Peer)?;
        match self.wait_peer_until(&mut peer, "Hello", deadline)? {
            PeerMessage::Hello {
                version,
                capabilities,
                ..
            } if version == VERSION && capabilities & CAP_RECOVERY != 0 => {
                self.learn_page_size(capabilities)
            }
            PeerMessage::Hello { version, .. } if version != VERSION => {
                return Err(SourceError::Version {
                    theirs: version,
                    ours: VERSION,
                })
            }
            PeerMessage::Hello { .. } => {
                return Err(SourceError::NotResumable(
                    "it does not offer recovery".into(),
                ))
            }
            PeerMessage::Error(m) => return Err(SourceError::NotResumable(m)),
            other => return Err(SourceError::unexpected("Hello with recovery", other)),
        }
        // The urgent channel first: requests may come as soon as the destination knows that
        // the source knows what it holds.
        let mut urgent = self.open_stream()?;
        send_peer(
            &mut urgent,
            &PeerMessage::UrgentChannel {
                session_id: self.session_id,
            },
        )
        .map_err(SourceError::Urgent)?;
        peer.urgent = Some(urgent);
        self.serve_requests(&peer)?;
        send_peer(
            &mut peer.stream,
            &PeerMessage::Resume {
                session_id: self.session_id,
            },
        )
        .map_err(SourceError::Peer)?;
        let mut held = HeldPages::new(self.sent.block_count(), |b| self.sent.block_pages(b));
        loop {
            match self.wait_peer_until(&mut peer, "ReceivedEnd", deadline)? {
                PeerMessage::Received {
                    block,
                    first_page,
                    words,
                } => held.add(block, first_page, &words)?,
                PeerMessage::ReceivedEnd => break,
                // A destination that listens for a new migration, not this one: it never ran
                // the VM (the commit did not reach it), or lost it.
                PeerMessage::Error(m) => return Err(SourceError::NotResumable(m)),
                other => return Err(SourceError::unexpected("Received", other)),
            }
        }
        // What the destination holds counts as sent (a umemd started again knows nothing
        // else); what it does not hold goes again, in flight when the link failed or not.
        let resent = held.apply(
            |b, first, count| {
                self.sent.claim(b, first, count);
            },
            |b, first, count| self.sent.unsend(b, first, count),
        );
        send_peer(&mut peer.stream, &PeerMessage::Resumed).map_err(SourceError::Peer)?;
        self.shorten_send_queue(&peer);
        info!(
            "{}: the destination holds all but {} pages; {resent} sent before the link failed go again",
            self.vm,
            self.sent.remaining()
        );
        Ok(peer)
    }
}

/// The pages the destination says it holds, one bit per page and block.
struct HeldPages {
    blocks: Vec<Vec<u64>>,
    pages: Vec<u64>,
}

impl HeldPages {
    fn new(count: usize, pages: impl Fn(u32) -> u64) -> Self {
        let pages: Vec<u64> = (0..count as u32).map(pages).collect();
        HeldPages {
            blocks: pages
                .iter()
                .map(|p| vec![0; p.div_ceil(64) as usize])
                .collect(),
            pages,
        }
    }

    /// Adds one `Received`; refuses bits outside the layout or not on a word boundary.
    fn add(&mut self, block: u32, first_page: u64, words: &[u64]) -> Result<(), SourceError> {
        let bad = || SourceError::Protocol {
            expected: "a Received within the layout",
            got: format!("block {block}, page {first_page}, {} words", words.len()),
        };
        let b = self.blocks.get_mut(block as usize).ok_or_else(bad)?;
        if !first_page.is_multiple_of(64) {
            return Err(bad());
        }
        let start = (first_page / 64) as usize;
        let end = start.checked_add(words.len()).ok_or_else(bad)?;
        let dst = b.get_mut(start..end).ok_or_else(bad)?;
        for (d, w) in dst.iter_mut().zip(words) {
            *d |= w;
        }
        Ok(())
    }

    /// Calls `held` for every run of pages the destination holds and `unsend` for every run
    /// it does not; returns the sum of what `unsend` returned (pages sent already that go
    /// again).
    fn apply(
        &self,
        mut held: impl FnMut(u32, u64, u64),
        mut unsend: impl FnMut(u32, u64, u64) -> u64,
    ) -> u64 {
        let mut resent = 0;
        for (b, words) in self.blocks.iter().enumerate() {
            let pages = self.pages[b];
            let bit = |page: u64| words[(page / 64) as usize] & (1 << (page % 64)) != 0;
            let mut page = 0;
            while page < pages {
                let first = page;
                let is_held = bit(page);
                while page < pages && bit(page) == is_held {
                    page += 1;
                }
                if is_held {
                    held(b as u32, first, page - first);
                } else {
                    resent += unsend(b as u32, first, page - first);
                }
            }
        }
        resent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_not_held_are_unsent_in_runs() {
        let mut h = HeldPages::new(2, |b| if b == 0 { 130 } else { 64 });
        // Block 0 holds pages 0..=63 and 65; block 1 holds nothing.
        h.add(0, 0, &[u64::MAX, 0b10]).unwrap();
        let (mut kept, mut runs) = (Vec::new(), Vec::new());
        let resent = h.apply(
            |b, first, count| kept.push((b, first, count)),
            |b, first, count| {
                runs.push((b, first, count));
                count
            },
        );
        assert_eq!(runs, vec![(0, 64, 1), (0, 66, 64), (1, 0, 64)]);
        assert_eq!(kept, vec![(0, 0, 64), (0, 65, 1)]);
        assert_eq!(resent, 129);
    }

    #[test]
    fn received_outside_the_layout_is_refused() {
        let mut h = HeldPages::new(1, |_| 128);
        assert!(h.add(1, 0, &[1]).is_err(), "no such block");
        assert!(h.add(0, 64, &[1, 1]).is_err(), "past the block");
        assert!(h.add(0, 3, &[1]).is_err(), "not word-aligned");
        assert!(h.add(0, 64, &[1]).is_ok());
    }
}
