//! The switchover: the VMM stops its vCPUs and hands over its state; for precopy the last
//! pages follow, for postcopy the list of stale pages to discard; then the commit with the
//! destination.

use std::time::Instant;

use log::{info, warn};
use proto::local::LocalMessage;
use proto::peer::{PeerMessage, MAX_DISCARD_RANGES};

use super::error::SourceError;
use super::phase::SourcePhase;
use super::requests::RequestServer;
use super::sender::PageSender;
use super::{Peer, Source, START_TIMEOUT};
use crate::bitmap::DirtyBitmap;
use crate::link::send_peer;
use crate::priority::lower_priority;

impl Source {
    /// Before the VM stops: waits until the destination has put in guest RAM every page sent
    /// so far. Without it, what the sockets' buffers and the destination's placing queue hold
    /// (a few MiB) would be written while the VM is stopped: 15-25 ms of an idle 1 GiB guest's
    /// downtime on a host whose fresh memory is slow. Pages the guest dirties meanwhile go in
    /// the last pass, as they would have. A destination that does not answer within the link
    /// timeout fails the migration before the VM stops. `Drain` goes through the page sender,
    /// after whatever it still holds (the discards of a postcopy switchover).
    pub(super) fn drain(&mut self, peer: &mut Peer, round: u32) -> Result<(), SourceError> {
        // The switchover's messages and page requests follow: CPUs that wake at once from here.
        self.wake_latency.hold(&self.vm);
        if !self.dest_drain {
            return Ok(());
        }
        let t = Instant::now();
        self.sender.push(&PeerMessage::Drain { round });
        self.sender
            .flush(&mut peer.stream, &self.counters)
            .map_err(|e| self.peer_error(peer, e))?;
        let timeout = self.link_timeout();
        match self.wait_peer(peer, "Drained", timeout)? {
            PeerMessage::Drained { round: r } if r == round => {}
            other => return Err(SourceError::unexpected("Drained", other)),
        }
        info!(
            "{}: the destination placed what was queued before the stop in {} us",
            self.vm,
            t.elapsed().as_micros()
        );
        Ok(())
    }

    /// The precopy switchover: stops the VM, sends the pages it dirtied since the last round,
    /// the machine state, and commits.
    pub(super) fn switchover(
        &mut self,
        peer: &mut Peer,
        mut dirty: DirtyBitmap,
    ) -> Result<(), SourceError> {
        // Switchover: the VMM stops its vCPUs, sends what they dirtied since, and its state.
        self.set_phase(SourcePhase::Switchover)?;
        let stopped_at = Instant::now();
        let (last, state) = self.harvest(true)?;
        dirty.merge(&last);
        let state = state.ok_or(SourceError::NoMachineState)?;
        let harvested = stopped_at.elapsed();
        // The guest is stopped: no time limit ends this pass early.
        self.send_pages(peer, &dirty, false)?;
        send_peer(
            &mut peer.stream,
            &PeerMessage::Switchover { postcopy: false },
        )
        .and_then(|_| send_peer(&mut peer.stream, &PeerMessage::MachineState(state)))
        .and_then(|_| send_peer(&mut peer.stream, &PeerMessage::AllSent))
        .map_err(|e| self.peer_error(peer, e))?;
        let sent = stopped_at.elapsed();
        self.commit(peer)?;
        self.stats.downtime_us = stopped_at.elapsed().as_micros() as u64;
        info!(
            "{}: switchover: stop, dirty log and state took {} us, the last pages and the state were sent after {} us, the destination ran after {} us",
            self.vm,
            harvested.as_micros(),
            sent.as_micros(),
            self.stats.downtime_us
        );
        Ok(())
    }
}

impl Source {
    /// Stops the VM, tells the destination which pages it holds are stale, sends the machine
    /// state, and then serves requested pages and pushes the rest until the destination has
    /// every page. `dirty` holds the pages dirtied since they were last sent.
    pub(super) fn postcopy(
        &mut self,
        peer: &mut Peer,
        mut dirty: DirtyBitmap,
    ) -> Result<(), SourceError> {
        self.switching_to_postcopy = true;
        self.set_phase(SourcePhase::Switchover)?;
        self.progress(true);
        let stopped_at = Instant::now();
        let (last, state) = self.harvest(true)?;
        dirty.merge(&last);
        let state = state.ok_or(SourceError::NoMachineState)?;
        let harvested = stopped_at.elapsed();

        // The VM is stopped: the memfd no longer changes, and pages go in any order.
        self.sender.freeze();
        self.discard_sent(&dirty);
        self.sender
            .push(&PeerMessage::Switchover { postcopy: true });
        self.sender.push(&PeerMessage::MachineState(state));

        self.serve_requests(peer)?;
        self.sender
            .flush(&mut peer.stream, &self.counters)
            .map_err(|e| self.peer_error(peer, e))?;

        self.commit(peer)?;
        self.set_phase(SourcePhase::Postcopy)?;
        self.stats.downtime_us = stopped_at.elapsed().as_micros() as u64;
        self.postcopy_ran = true;
        self.shorten_send_queue(peer);
        info!(
            "{}: postcopy: stop, dirty log and state took {} us, the VM ran on the destination after {} us; {} pages to go",
            self.vm,
            harvested.as_micros(),
            self.stats.downtime_us,
            self.sent.remaining()
        );
        self.progress(true);
        // Background pages yield the CPU to requested ones: on a busy host the threads that
        // serve faults must not wait for a time slice behind the bulk copy.
        lower_priority();
        self.postcopy_until_done(peer)
    }

    /// Queues a `Discard` for every page of `dirty` that was sent: it is dropped on the
    /// destination, to be sent (or fault) again. A destination on huge pages can only drop
    /// whole ones: it is told to drop those, and each is then sent again whole. A page already
    /// unsent is not named again.
    pub(super) fn discard_sent(&mut self, dirty: &DirtyBitmap) {
        let mut discard: Vec<Vec<(u64, u32)>> = vec![Vec::new(); self.sent.block_count()];
        for (block, first, count) in dirty.runs(u32::MAX as u64) {
            let (first, count) =
                self.mem
                    .widen_to_pages_of(self.dest_page_size, block, first, count);
            if self.sent.unsend(block, first, count) == 0 {
                continue;
            }
            // Widened runs may overlap in a huge page: one range for both.
            let ranges = &mut discard[block as usize];
            match ranges.last_mut() {
                Some((f, n)) if *f + *n as u64 >= first => {
                    *n = ((first + count).max(*f + *n as u64) - *f).min(u32::MAX as u64) as u32
                }
                _ => ranges.push((first, count.min(u32::MAX as u64) as u32)),
            }
        }
        for (block, ranges) in discard.into_iter().enumerate() {
            for chunk in ranges.chunks(MAX_DISCARD_RANGES) {
                self.sender.push(&PeerMessage::Discard {
                    block: block as u32,
                    ranges: chunk.to_vec(),
                });
            }
        }
    }

    /// From now on the destination's page requests are served by the thread that reads them,
    /// with no hand-over to another thread, on the urgent channel; they may come as soon as
    /// the destination's vCPUs run, even before `Started`.
    pub(super) fn serve_requests(&mut self, peer: &Peer) -> Result<(), SourceError> {
        let urgent = match &peer.urgent {
            Some(u) => u.try_clone(),
            None => peer.stream.try_clone(),
        }
        .map_err(SourceError::Urgent)?;
        let sender = PageSender::for_requests();
        let mut server = RequestServer {
            mem: self.mem.clone(),
            sent: self.sent.clone(),
            counters: self.counters.clone(),
            pc: self.pc.clone(),
            stream: urgent,
            sender,
        };
        *peer.intercept.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Box::new(move |m| match m {
                PeerMessage::PageRequest(run) => {
                    server.serve(run).map(|()| None).map_err(Into::into)
                }
                other => Ok(Some(other)),
            }));
        Ok(())
    }

    /// Keeps the main stream's send queue short once postcopy runs: a requested page that the
    /// background had already claimed waits behind what is queued there.
    pub(super) fn shorten_send_queue(&self, peer: &Peer) {
        if let Err(e) = peer
            .stream
            .set_send_buffer(crate::stream::POSTCOPY_SOCKET_BUFFER)
        {
            warn!("{}: shrinking the send buffer: {e}", self.vm);
        }
    }

    /// The switchover's commit: waits until the destination has loaded the machine state, then
    /// tells the VMM that the VM has moved (it must never resume it by itself from now on),
    /// then lets the destination run it, and waits until it says it does.
    ///
    /// A failure before the commit leaves the destination unable to run the VM, so the source
    /// resumes it. A failure after it leaves the VM stopped here for good: the destination may
    /// run it, and only an operator who knows it does not may resume this copy.
    pub(super) fn commit(&mut self, peer: &mut Peer) -> Result<(), SourceError> {
        match self.wait_peer(peer, "Ready", START_TIMEOUT)? {
            PeerMessage::Ready => {}
            other => return Err(SourceError::unexpected("Ready", other)),
        }
        self.set_phase(SourcePhase::Committed)?;
        self.report(&LocalMessage::Committed);
        info!(
            "{}: switchover committed; the VM runs on the destination from now on",
            self.vm
        );
        send_peer(&mut peer.stream, &PeerMessage::Commit)
            .map_err(|e| SourceError::AfterCommit(Box::new(self.peer_error(peer, e))))?;
        match self.wait_peer(peer, "Started", START_TIMEOUT) {
            Ok(PeerMessage::Started) => Ok(()),
            Ok(other) => Err(SourceError::unexpected("Started", other)),
            // In postcopy a lost link is recovered from like any later one: the destination
            // runs the VM (and pauses too), or never got the commit (and says so when the
            // source comes back).
            Err(e) if self.switching_to_postcopy && self.dest_recovery && e.is_link_failure() => {
                self.lost_link = Some(e);
                Ok(())
            }
            Err(e) => Err(SourceError::AfterCommit(Box::new(e))),
        }
    }
}
