//! The main stream's frame loop: pages, zero runs, discards, the switchover, the machine
//! state and the commit, in the order the protocol allows.

use std::io::BufReader;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{info, warn};
use proto::frame::{FramePrefix, PREFIX_LEN};
use proto::local::LocalMessage;
use proto::peer::{kind, PeerMessage};

use super::error::DestError;
use super::phase::DestPhase;
use super::place::read_exact;
use super::placer::{Job, Placer};
use super::{write_peer, Dest, PeerWriter, COMMIT_TIMEOUT, HANDSHAKE_TIMEOUT};
use crate::link::send_local;
use crate::priority::lower_priority;
use crate::stream::{PeerStream, POSTCOPY_SOCKET_BUFFER};

/// Bytes of the main stream read ahead of the frame being handled.
const READ_AHEAD: usize = 32 << 10;
/// The main stream's receive buffer before the switchover (see [`Dest::receive`]).
const MAIN_STREAM_RECV_BUFFER: usize = 2 << 20;

impl Dest {
    pub(super) fn receive(
        &mut self,
        writer_slot: &mut Option<PeerWriter>,
    ) -> Result<(), DestError> {
        let uri = self.listen_uri.clone();
        send_local(&mut self.vmm, &LocalMessage::Listening { uri }).map_err(DestError::Vmm)?;
        let (mut peer, hello) = self.accept_source()?;
        // What is queued on the main stream when the switchover comes must be read before the
        // machine state: left to autotuning, the receive buffer grows to tens of MiB, tens of
        // ms of downtime.
        if let Err(e) = peer.set_recv_buffer(MAIN_STREAM_RECV_BUFFER) {
            warn!("{}: bounding the receive buffer: {e}", self.vm);
        }
        // The migration's time counts from the source's arrival, as on the source.
        self.started = Instant::now();
        // Set before the handshake, so that a refusal (a layout mismatch) reaches the source.
        let writer: PeerWriter = Arc::new(Mutex::new(peer.try_clone().map_err(DestError::Peer)?));
        *writer_slot = Some(writer.clone());
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let session_id = self.handshake(&mut peer, hello, deadline)?;
        if self.postcopy.is_some() {
            self.accept_urgent(session_id, deadline)?;
        }
        self.start_heartbeats(writer.clone())?;
        let _ = send_local(&mut self.vmm, &LocalMessage::Session(session_id));
        self.set_phase(DestPhase::Precopy)?;
        self.progress(true);
        self.stream_until_done(peer, &writer, session_id)
    }

    /// Reads the main stream until the migration is complete here, waiting for the source to
    /// come back each time the link fails while the VM runs.
    pub(super) fn stream_until_done(
        &mut self,
        mut peer: PeerStream,
        writer: &PeerWriter,
        session_id: u64,
    ) -> Result<(), DestError> {
        let mut placer = Placer::start(self.placement())?;
        self.choose_placing_thread(&mut placer);
        loop {
            let result = self.stream_loop(&mut peer, writer, &mut placer);
            // What was read before the stream ended is placed, and a failure to place it
            // counts before the stream's.
            placer.flush()?;
            match result {
                Ok(()) => return Ok(()),
                Err(e)
                    if self.phase == DestPhase::Postcopy
                        && self.source_recovery
                        && e.is_link_failure() =>
                {
                    peer = self.pause_until_resumed(e, writer, session_id)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the main stream's pages go through the placing thread: always before the VM
    /// runs here; once it runs, only if the host has a core for each vCPU, the reader and the
    /// placer (see [`Placer::place_inline`]).
    fn choose_placing_thread(&self, placer: &mut Placer) {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let inline = self.phase.running() && !placing_thread_pays(cpus, self.vcpus);
        placer.place_inline(inline.then(|| self.placement()));
    }

    /// The placing thread's job for a zero run or hole of the stream, checked.
    fn zero_job(&mut self, block: u32, first: u64, count: u64) -> Result<Job, DestError> {
        self.check_zero(block, first, count)?;
        Ok(Job::Zero {
            block,
            first,
            count,
            running: self.phase.running(),
        })
    }

    /// Reads the main stream frame by frame until the migration is complete here. Pages, zero
    /// runs and discards go to `placer` in order; every other frame waits until they are in.
    fn stream_loop(
        &mut self,
        peer: &mut PeerStream,
        writer: &PeerWriter,
        placer: &mut Placer,
    ) -> Result<(), DestError> {
        // Small frames (scattered pages, zero runs, holes) come many to a read, not three reads
        // each; a read as large as the buffer (a long run's pages) bypasses it.
        let mut peer = BufReader::with_capacity(READ_AHEAD, peer);
        let mut prefix = [0u8; PREFIX_LEN];
        let mut body = Vec::new();
        // When the last frame came (the source sends heartbeats on an idle link), and when the
        // destination said Ready.
        let mut last_rx = Instant::now();
        let mut ready_at: Option<Instant> = None;
        loop {
            self.poll_vmm()?;
            if ready_at.is_some_and(|t| t.elapsed() > COMMIT_TIMEOUT) {
                return Err(DestError::Timeout {
                    waiting_for: "the source's commit",
                    secs: COMMIT_TIMEOUT.as_secs(),
                });
            }
            if self.phase.running() {
                self.check_threads()?;
                if self.phase == DestPhase::Postcopy && self.pages.unresolved() == 0 {
                    write_peer(writer, &PeerMessage::AllReceived)?;
                    return Ok(());
                }
            }
            // While the stream is quiet the loop still reports, and still hears the VMM (a
            // cancel, the VMM going away) and notices a silent source.
            if peer.buffer().is_empty()
                && matches!(
                    peer.get_ref().wait_readable(Duration::from_millis(50)),
                    Ok(false)
                )
            {
                if last_rx.elapsed() > self.link_timeout {
                    return Err(DestError::Silent);
                }
                self.progress(false);
                continue;
            }
            read_exact(&mut peer, &mut prefix)?;
            last_rx = Instant::now();
            let p = FramePrefix::parse(&prefix).map_err(|err| DestError::Frame {
                context: "source stream",
                err,
            })?;
            if p.kind == kind::PAGES {
                let (run, off) = self.run_header(&mut peer, p)?;
                let buf = placer.read_run(run.data_len(), |b| read_exact(&mut peer, b))?;
                let running = self.phase.running();
                placer.submit(Job::Pages {
                    run,
                    off,
                    buf,
                    running,
                })?;
                self.progress(false);
                continue;
            }
            body.resize(p.len as usize, 0);
            read_exact(&mut peer, &mut body)?;
            self.stats.bytes_sent += (PREFIX_LEN + body.len()) as u64;
            let msg = PeerMessage::decode(p.kind, &body).map_err(|err| DestError::Malformed {
                context: "source stream",
                err,
            })?;
            if !matches!(
                msg,
                PeerMessage::ZeroPages(_)
                    | PeerMessage::Holes { .. }
                    | PeerMessage::Discard { .. }
                    | PeerMessage::RoundEnd { .. }
                    | PeerMessage::Heartbeat
            ) {
                // Guest RAM is as the source sent it before the switchover, the machine state,
                // the commit or the end of the stream is handled.
                placer.flush()?;
            }
            match msg {
                PeerMessage::ZeroPages(run) => {
                    let count = run.count as u64;
                    placer.submit(self.zero_job(run.block, run.first, count)?)?;
                    self.stats.zero_pages += count;
                }
                PeerMessage::Holes {
                    block,
                    first,
                    count,
                } => {
                    placer.submit(self.zero_job(block, first, count)?)?;
                    self.stats.holes_skipped += count;
                }
                PeerMessage::Discard { block, ranges } => {
                    self.checked_discard(block, &ranges)?;
                    placer.submit(Job::Discard { block, ranges })?;
                }
                PeerMessage::RoundEnd { round } => {
                    self.stats.rounds = round;
                    self.progress(true);
                }
                PeerMessage::Drain { .. } if self.phase != DestPhase::Precopy => {
                    return Err(DestError::Protocol(
                        "the source asked for a drain after the switchover",
                    ));
                }
                // The placer was flushed above: every page before this frame is in guest RAM.
                PeerMessage::Drain { round } => {
                    // The switchover follows: CPUs that wake at once from here.
                    self.wake_latency.hold(&self.vm);
                    write_peer(writer, &PeerMessage::Drained { round })?;
                }
                PeerMessage::Switchover { .. } if self.phase != DestPhase::Precopy => {
                    return Err(DestError::Protocol(
                        "the source announced a second switchover",
                    ));
                }
                PeerMessage::Switchover { postcopy } => {
                    if postcopy && self.postcopy.is_none() {
                        return Err(DestError::Protocol(
                            "the source switched to postcopy, but this VMM passed no userfaultfd",
                        ));
                    }
                    self.switching_to_postcopy = postcopy;
                    self.switchover_at = Some(Instant::now());
                    self.set_phase(DestPhase::Switchover)?;
                }
                PeerMessage::MachineState(_) if self.phase.state_loaded() => {
                    return Err(DestError::Protocol(
                        "the source sent a second machine state",
                    ));
                }
                PeerMessage::MachineState(_) if self.phase != DestPhase::Switchover => {
                    return Err(DestError::Protocol(
                        "the source sent the machine state without a switchover",
                    ));
                }
                PeerMessage::MachineState(state) => {
                    let t = Instant::now();
                    if self.switching_to_postcopy {
                        // A short receive queue keeps requested pages from waiting long
                        // behind background pages the source had already queued.
                        if let Err(e) = peer.get_ref().set_recv_buffer(POSTCOPY_SOCKET_BUFFER) {
                            warn!("{}: shrinking the receive buffer: {e}", self.vm);
                        }
                        self.start_fault_thread(writer.clone())?;
                        send_local(&mut self.vmm, &LocalMessage::PostcopyBegin)
                            .map_err(DestError::Vmm)?;
                    }
                    self.load_state(state)?;
                    self.set_phase(DestPhase::Loaded)?;
                    info!(
                        "{}: machine state loaded in {} us; waiting for the source to commit",
                        self.vm,
                        t.elapsed().as_micros()
                    );
                    // The VM must not run before the source has committed: it would run on
                    // both hosts if the source never heard of this and resumed its copy.
                    write_peer(writer, &PeerMessage::Ready)?;
                    ready_at = Some(Instant::now());
                }
                PeerMessage::Commit if self.phase != DestPhase::Loaded => {
                    return Err(DestError::Protocol(if self.phase.running() {
                        "the source committed a second time"
                    } else {
                        "the source committed before the machine state was loaded"
                    }));
                }
                PeerMessage::Commit => {
                    ready_at = None;
                    send_local(&mut self.vmm, &LocalMessage::Run).map_err(DestError::Vmm)?;
                    if let Some(t) = self.switchover_at {
                        self.stats.downtime_us = t.elapsed().as_micros() as u64;
                    }
                    write_peer(writer, &PeerMessage::Started)?;
                    info!("{}: the source committed; the VM runs here", self.vm);
                    if !self.switching_to_postcopy {
                        return Ok(());
                    }
                    // This thread reads background pages from now on; the fault and
                    // urgent-channel threads keep the normal priority.
                    lower_priority();
                    self.set_phase(DestPhase::Postcopy)?;
                    self.choose_placing_thread(placer);
                    info!(
                        "{}: postcopy: the VM runs; {} pages to come",
                        self.vm,
                        self.pages.unresolved()
                    );
                    self.progress(true);
                }
                PeerMessage::AllSent => {
                    if !self.phase.state_loaded() {
                        return Err(DestError::Protocol(
                            "source finished without sending the machine state",
                        ));
                    }
                }
                PeerMessage::Heartbeat => {}
                PeerMessage::Resumed if self.phase == DestPhase::PostcopyPaused => {
                    self.resumed(peer.get_ref(), writer)?;
                }
                PeerMessage::Error(m) => return Err(DestError::PeerFailed(m)),
                other => {
                    return Err(DestError::Unexpected {
                        expected: "a migration message".into(),
                        got: format!("{other:?}"),
                    })
                }
            }
            self.progress(false);
        }
    }
}

/// With the VM running here, a placing thread beside the reader pays when the host's `cpus`
/// leave one to each of the VM's `vcpus` (one if not known yet), the reader and the placer.
fn placing_thread_pays(cpus: usize, vcpus: usize) -> bool {
    cpus >= vcpus.max(1) + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_placing_thread_needs_a_core_beside_the_vcpus_and_the_reader() {
        assert!(!placing_thread_pays(2, 1));
        assert!(!placing_thread_pays(2, 0));
        assert!(placing_thread_pays(3, 1));
        assert!(placing_thread_pays(3, 0));
        assert!(!placing_thread_pays(4, 4));
        assert!(placing_thread_pays(6, 4));
    }
}
