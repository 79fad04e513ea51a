//! Source role: reads the VM's pages through umemd's own mapping of the memfd and streams them
//! to the destination umemd: precopy rounds while the guest runs, then the switchover, then (for
//! postcopy) requested pages on the urgent channel and every other page in the background.

use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use proto::local::{LocalBlock, LocalMessage};
use proto::peer::{PeerMessage, CAP_POSTCOPY, MAX_DISCARD_RANGES, MAX_RUN_PAGES, VERSION};
use proto::{MigrationMode, MigrationParams, MigrationStats, Phase, PostcopyStats, PAGE_SIZE};

use crate::bitmap::DirtyBitmap;
use crate::link::{self, send_local, send_peer, Delivery};
use crate::mapping::GuestMapping;
use crate::pages::SentMap;
use crate::sender::{Counters, Holes, PageSender};
use crate::stream::PeerStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// How long the destination may take to load the state and report that it runs.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the destination may take to confirm every page once all were sent.
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(120);
/// Pages per background chunk: one bitmap word, 256 KiB, large enough for cheap placement.
const CHUNK_PAGES: u64 = 64;
/// Send buffer of the main stream once postcopy runs. A requested page that the background had
/// already claimed waits behind what is queued there, so the queue is kept short; loopback
/// still streams at full speed with it.
pub const POSTCOPY_SNDBUF: usize = 256 << 10;

/// Postcopy counters shared by the background sender and the request server.
#[derive(Debug, Default)]
struct PostcopyCounters {
    requested: AtomicU64,
    urgent: AtomicU64,
    pushed: AtomicU64,
    /// Page after the last requested one, as `block << 48 | page`; `u64::MAX` before any.
    hint: AtomicU64,
}

/// An outgoing migration.
pub struct Source {
    vmm: UnixStream,
    vmm_rx: Receiver<Delivery<LocalMessage>>,
    /// The VMM may exit once the VM moved; from then on it gets no more reports.
    vmm_gone: bool,
    vm: String,
    uri: String,
    params: MigrationParams,
    mem: Arc<GuestMapping>,
    sent: Arc<SentMap>,
    counters: Arc<Counters>,
    pc: Arc<PostcopyCounters>,
    stats: MigrationStats,
    started: Instant,
    last_progress: Instant,
    /// Time spent streaming pages and the bytes streamed in it, for the bandwidth estimate.
    send_time: Duration,
    send_bytes: u64,
    /// Duration of the last round's streaming.
    round_elapsed: Duration,
    sender: PageSender,
    /// The destination can run postcopy (its VMM passed a userfaultfd).
    dest_postcopy: bool,
    /// `migrate-start-postcopy` was asked for.
    start_postcopy: bool,
    /// The migration went through a postcopy phase.
    postcopy_ran: bool,
    /// The VMM handed over the final machine state: from then on the migration goes on even if
    /// the source VMM exits, since umemd holds everything the destination needs.
    state_taken: bool,
    /// The switchover is committed: the destination may run the VM, so the source must never
    /// resume it, and a cancel is refused.
    committed: bool,
}

/// The migration streams towards the destination.
struct Peer {
    stream: PeerStream,
    rx: Receiver<Delivery<PeerMessage>>,
    /// Where page requests are served in postcopy: in the thread that reads them.
    intercept: link::Intercept<PeerMessage>,
    /// Second connection for requested pages (postcopy-capable destinations only).
    urgent: Option<PeerStream>,
}

impl Source {
    /// Maps the VM's memory; on failure hands the connection back with the reason.
    pub fn new(
        vmm: UnixStream,
        vm: String,
        uri: String,
        params: MigrationParams,
        memfd: OwnedFd,
        blocks: Vec<LocalBlock>,
    ) -> Result<Self, (UnixStream, String)> {
        let mem = match GuestMapping::new(memfd, blocks) {
            Ok(m) => m,
            Err(e) => return Err((vmm, e.to_string())),
        };
        let reader = match vmm.try_clone() {
            Ok(r) => r,
            Err(e) => return Err((vmm, format!("cloning the VMM connection: {e}"))),
        };
        let stats = MigrationStats {
            phase: Phase::Setup,
            total_pages: mem.total_pages(),
            remaining_pages: mem.total_pages(),
            ..Default::default()
        };
        let pc = PostcopyCounters {
            hint: AtomicU64::new(u64::MAX),
            ..Default::default()
        };
        Ok(Source {
            vmm_rx: link::local_reader(reader),
            vmm,
            vmm_gone: false,
            vm,
            uri,
            params,
            sent: Arc::new(SentMap::new(mem.blocks())),
            mem: Arc::new(mem),
            counters: Arc::new(Counters::default()),
            pc: Arc::new(pc),
            stats,
            started: Instant::now(),
            last_progress: Instant::now(),
            send_time: Duration::ZERO,
            send_bytes: 0,
            round_elapsed: Duration::ZERO,
            sender: PageSender::default(),
            dest_postcopy: false,
            start_postcopy: false,
            postcopy_ran: false,
            state_taken: false,
            committed: false,
        })
    }

    /// Runs the migration to its end and reports the outcome to the VMM.
    pub fn run(mut self) {
        let mut peer = None;
        let result = self.migrate(&mut peer);
        self.update_stats();
        match result {
            Ok(()) => {
                self.stats.phase = Phase::Completed;
                self.stats.remaining_pages = 0;
                info!(
                    "{}: migration to {} completed: {} pages, {} zero, {} holes, {} MB in {} ms, downtime {} us",
                    self.vm,
                    self.uri,
                    self.stats.pages_sent,
                    self.stats.zero_pages,
                    self.stats.holes_skipped,
                    self.stats.bytes_sent >> 20,
                    self.stats.total_us / 1000,
                    self.stats.downtime_us
                );
                if self.postcopy_ran {
                    self.report(&LocalMessage::PostcopyProgress(self.postcopy_stats()));
                }
                self.report(&LocalMessage::Completed(self.stats));
            }
            Err(message) => {
                warn!("{}: migration to {} failed: {message}", self.vm, self.uri);
                if let Some(p) = peer.as_mut() {
                    let _ = send_peer(&mut p.stream, &PeerMessage::Error(message.clone()));
                    let _ = p.stream.shutdown(Shutdown::Both);
                    if let Some(u) = &p.urgent {
                        let _ = u.shutdown(Shutdown::Both);
                    }
                }
                self.stats.phase = Phase::Failed;
                self.report(&LocalMessage::Failed {
                    message,
                    stats: self.stats,
                });
            }
        }
    }

    fn report(&mut self, msg: &LocalMessage) {
        if !self.vmm_gone && send_local(&mut self.vmm, msg).is_err() {
            self.vmm_gone = true;
        }
    }

    fn migrate(&mut self, peer_slot: &mut Option<Peer>) -> Result<(), String> {
        let peer = peer_slot.insert(self.connect()?);
        let session_id = session_id();
        self.handshake(peer, session_id)?;
        if self.params.mode != MigrationMode::Precopy && !self.dest_postcopy {
            return Err(
                "the destination cannot run postcopy (its VMM passed no userfaultfd)".into(),
            );
        }
        if self.dest_postcopy {
            let mut urgent = self.open_stream()?;
            send_peer(&mut urgent, &PeerMessage::UrgentChannel { session_id })
                .map_err(|e| format!("destination urgent channel: {e}"))?;
            peer.urgent = Some(urgent);
        }

        // The first harvest covers every page; holes in the memfd cost nothing.
        let mut dirty = self.harvest(false)?.0;
        if self.params.mode == MigrationMode::Postcopy {
            return self.postcopy(peer, dirty);
        }
        self.stats.phase = Phase::Precopy;
        self.progress(true);
        let mut round = 0;
        let mut last_pending = u64::MAX;
        loop {
            round += 1;
            self.send_pages(peer, &dirty, round == 1)?;
            send_peer(&mut peer.stream, &PeerMessage::RoundEnd { round })
                .map_err(|e| self.peer_error(peer, e))?;
            self.stats.rounds = round;
            dirty = self.harvest(false)?.0;
            let pending = dirty.count();
            let bw = self.bandwidth();
            self.stats.remaining_pages = pending;
            // Pages dirtied while the last round streamed, per second of it.
            self.stats.dirty_rate_pps = rate(pending, self.round_elapsed);
            self.stats.expected_downtime_us = (pending * PAGE_SIZE * 1_000_000) / bw.max(1);
            self.progress(true);
            let fits =
                self.stats.expected_downtime_us <= self.params.downtime_limit_ms as u64 * 1000;
            if fits {
                info!(
                    "{}: switchover after {round} rounds: {pending} dirty pages, expected downtime {} us at {} MB/s",
                    self.vm,
                    self.stats.expected_downtime_us,
                    bw >> 20
                );
                break;
            }
            let hybrid = self.params.mode == MigrationMode::Hybrid;
            // Not converging: a round did not shrink what is left to send.
            let stuck = round >= 2 && pending >= last_pending;
            last_pending = pending;
            if self.start_postcopy
                || (hybrid && (round >= self.params.postcopy_after_rounds.max(1) || stuck))
            {
                info!(
                    "{}: switching to postcopy after {round} rounds ({pending} dirty pages{})",
                    self.vm,
                    if stuck { ", not converging" } else { "" }
                );
                return self.postcopy(peer, dirty);
            }
            if round >= self.params.max_rounds.max(1) {
                if hybrid {
                    return self.postcopy(peer, dirty);
                }
                info!("{}: switchover after the round limit ({round})", self.vm);
                break;
            }
        }

        // Switchover: the VMM stops its vCPUs, sends what they dirtied since, and its state.
        self.stats.phase = Phase::Switchover;
        let stopped_at = Instant::now();
        let (last, state) = self.harvest(true)?;
        dirty.merge(&last);
        let state = state.ok_or("the VMM sent no machine state at switchover")?;
        let harvested = stopped_at.elapsed();
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

    /// Stops the VM, tells the destination which pages it holds are stale, sends the machine
    /// state, and then serves requested pages and pushes the rest until the destination has
    /// every page. `dirty` holds the pages dirtied since they were last sent.
    fn postcopy(&mut self, peer: &mut Peer, mut dirty: DirtyBitmap) -> Result<(), String> {
        self.stats.phase = Phase::Switchover;
        self.progress(true);
        let stopped_at = Instant::now();
        let (last, state) = self.harvest(true)?;
        dirty.merge(&last);
        let state = state.ok_or("the VMM sent no machine state at switchover")?;
        let harvested = stopped_at.elapsed();

        // The VM is stopped: the memfd no longer changes, and pages go in any order.
        self.sender.freeze();
        // Everything dirtied since it was sent is dropped on the destination, to fault again.
        let mut discard: Vec<Vec<(u64, u32)>> = vec![Vec::new(); self.sent.block_count()];
        for (block, first, count) in dirty.runs(u32::MAX as u64) {
            if self.sent.unsend(block, first, count) > 0 {
                discard[block as usize].push((first, count as u32));
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
        self.sender
            .push(&PeerMessage::Switchover { postcopy: true });
        self.sender.push(&PeerMessage::MachineState(state));

        let urgent = match &peer.urgent {
            Some(u) => u.try_clone(),
            None => peer.stream.try_clone(),
        }
        .map_err(|e| format!("urgent channel: {e}"))?;
        let mut sender = PageSender::default();
        sender.freeze();
        let mut server = RequestServer {
            mem: self.mem.clone(),
            sent: self.sent.clone(),
            counters: self.counters.clone(),
            pc: self.pc.clone(),
            stream: urgent,
            sender,
        };
        // Requests are served by the thread that reads them, with no hand-over to another
        // thread; they may come as soon as the destination's vCPUs run, even before `Started`.
        *peer.intercept.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Box::new(move |m| match m {
                PeerMessage::PageRequest(run) => server.serve(run).map(|()| None),
                other => Ok(Some(other)),
            }));
        self.sender
            .flush(&mut peer.stream, &self.counters)
            .map_err(|e| self.peer_error(peer, e))?;

        self.commit(peer)?;
        self.stats.phase = Phase::Postcopy;
        self.stats.downtime_us = stopped_at.elapsed().as_micros() as u64;
        self.postcopy_ran = true;
        if let Err(e) = nix::sys::socket::setsockopt(
            &peer.stream,
            nix::sys::socket::sockopt::SndBuf,
            &POSTCOPY_SNDBUF,
        ) {
            warn!("{}: shrinking the send buffer: {e}", self.vm);
        }
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
        self.background(peer)
    }

    /// The switchover's commit: waits until the destination has loaded the machine state, then
    /// tells the VMM that the VM has moved (it must never resume it by itself from now on),
    /// then lets the destination run it, and waits until it says it does.
    ///
    /// A failure before the commit leaves the destination unable to run the VM, so the source
    /// resumes it. A failure after it leaves the VM stopped here for good: the destination may
    /// run it, and only an operator who knows it does not may resume this copy.
    fn commit(&mut self, peer: &mut Peer) -> Result<(), String> {
        match self.wait_peer(peer, START_TIMEOUT)? {
            PeerMessage::Ready => {}
            other => return Err(unexpected_reply("Ready", other)),
        }
        self.committed = true;
        self.report(&LocalMessage::Committed);
        info!(
            "{}: switchover committed; the VM runs on the destination from now on",
            self.vm
        );
        send_peer(&mut peer.stream, &PeerMessage::Commit).map_err(|e| {
            format!(
                "{}; the switchover was committed, so the VM may run on the destination",
                self.peer_error(peer, e)
            )
        })?;
        match self.wait_peer(peer, START_TIMEOUT) {
            Ok(PeerMessage::Started) => Ok(()),
            Ok(other) => Err(unexpected_reply("Started", other)),
            Err(e) => Err(format!(
                "{e}; the switchover was committed, so the VM may run on the destination"
            )),
        }
    }

    /// Waits up to `timeout` for the destination's next message, handling the VMM's control
    /// messages meanwhile (a cancel before the commit still counts). An `Error` from the
    /// destination is returned as a message, for the caller to word.
    fn wait_peer(&mut self, peer: &Peer, timeout: Duration) -> Result<PeerMessage, String> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll_vmm()?;
            match peer.rx.recv_timeout(Duration::from_millis(20)) {
                Ok(Ok(m)) => return Ok(m),
                Ok(Err(e)) => return Err(format!("destination connection: {e}")),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "the destination did not answer within {} s",
                        timeout.as_secs()
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("destination connection lost".into())
                }
            }
        }
    }

    /// Pushes every page not yet sent, continuing near the last requested page, until the
    /// destination confirms that it holds them all.
    fn background(&mut self, peer: &mut Peer) -> Result<(), String> {
        let mut block = 0u32;
        let mut page = 0u64;
        let mut last_hint = u64::MAX;
        let mut all_sent_at: Option<Instant> = None;
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
                        return Err("the destination never confirmed every page".into())
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
            let end = (p - p % CHUNK_PAGES + CHUNK_PAGES).min(self.sent.block_pages(b));
            for (first, count) in self.sent.claim(b, p, end - p) {
                let off = self
                    .mem
                    .offset_of(b, first, count)
                    .map_err(|e| e.to_string())?;
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
            if let Some(wait) = self.over_bandwidth(t0, bytes0) {
                self.sender
                    .flush(&mut peer.stream, &self.counters)
                    .map_err(|e| self.peer_error(peer, e))?;
                std::thread::sleep(wait.min(Duration::from_millis(50)));
            }
        }
    }

    /// Flushes, then waits briefly for a message from the destination; true once it has
    /// every page.
    fn wait_dest(&mut self, peer: &mut Peer) -> Result<bool, String> {
        self.sender
            .flush(&mut peer.stream, &self.counters)
            .map_err(|e| self.peer_error(peer, e))?;
        dest_has_all(peer, Duration::from_millis(20))
    }

    /// How long to wait before sending more, when the bytes sent since `t0` (counted from
    /// `bytes0`) exceed the bandwidth limit.
    fn over_bandwidth(&self, t0: Instant, bytes0: u64) -> Option<Duration> {
        if self.params.bandwidth_limit == 0 {
            return None;
        }
        let sent = Counters::get(&self.counters.bytes) - bytes0;
        let due = Duration::from_secs_f64(sent as f64 / self.params.bandwidth_limit as f64);
        due.checked_sub(t0.elapsed())
    }

    /// The first unsent page at or after `(block, page)`, wrapping around the blocks.
    fn next_unsent(&self, block: u32, page: u64) -> Option<(u32, u64)> {
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

    fn open_stream(&self) -> Result<PeerStream, String> {
        let stream = PeerStream::connect(&self.uri, CONNECT_TIMEOUT)?;
        stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(|e| e.to_string())?;
        Ok(stream)
    }

    fn connect(&mut self) -> Result<Peer, String> {
        let stream = self.open_stream()?;
        let reader = stream.try_clone().map_err(|e| e.to_string())?;
        let intercept: link::Intercept<PeerMessage> = Arc::new(std::sync::Mutex::new(None));
        Ok(Peer {
            stream,
            rx: link::peer_reader(reader, intercept.clone()),
            intercept,
            urgent: None,
        })
    }

    fn handshake(&mut self, peer: &mut Peer, session_id: u64) -> Result<(), String> {
        let hello = PeerMessage::Hello {
            version: VERSION,
            capabilities: CAP_POSTCOPY,
            session_id,
        };
        send_peer(&mut peer.stream, &hello).map_err(|e| format!("destination connection: {e}"))?;
        match self.wait_peer(peer, HANDSHAKE_TIMEOUT)? {
            PeerMessage::Hello {
                version,
                capabilities,
                ..
            } if version == VERSION => self.dest_postcopy = capabilities & CAP_POSTCOPY != 0,
            PeerMessage::Hello { version, .. } => {
                return Err(format!(
                    "destination speaks protocol version {version}, this umemd {VERSION}"
                ))
            }
            PeerMessage::Error(m) => return Err(format!("destination refused: {m}")),
            other => return Err(format!("unexpected handshake reply: {other:?}")),
        }
        let blocks = self.mem.blocks().iter().map(|b| b.desc.clone()).collect();
        send_peer(&mut peer.stream, &PeerMessage::Layout { blocks })
            .map_err(|e| format!("destination connection: {e}"))?;
        match self.wait_peer(peer, HANDSHAKE_TIMEOUT) {
            Ok(PeerMessage::LayoutAccepted) => Ok(()),
            Ok(PeerMessage::Error(m)) => Err(format!("destination refused: {m}")),
            Ok(other) => Err(format!("unexpected layout reply: {other:?}")),
            Err(e) => Err(e),
        }
    }

    /// Handles control messages from the VMM that may arrive at any time. Once the VM runs on
    /// the destination, the source VMM may exit: that ends only the reports.
    fn poll_vmm(&mut self) -> Result<(), String> {
        loop {
            let lost = match self.vmm_rx.try_recv() {
                Ok(Ok(m)) => {
                    self.control(m)?;
                    continue;
                }
                Ok(Err(e)) => format!("VMM connection: {e}"),
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => "VMM connection lost".to_string(),
            };
            if self.state_taken {
                if !self.vmm_gone {
                    info!(
                        "{}: the source VMM left after the switchover; umemd goes on",
                        self.vm
                    );
                }
                self.vmm_gone = true;
                self.vmm_rx = mpsc::channel().1;
                return Ok(());
            }
            return Err(lost);
        }
    }

    fn control(&mut self, m: LocalMessage) -> Result<(), String> {
        match m {
            LocalMessage::Cancel if self.committed => {
                warn!(
                    "{}: cancel refused: the switchover is committed, the VM runs on the destination",
                    self.vm
                );
                Ok(())
            }
            LocalMessage::Cancel => Err("migration cancelled".into()),
            LocalMessage::SetParams(p) => {
                info!("{}: new parameters {p:?}", self.vm);
                self.params = p;
                Ok(())
            }
            LocalMessage::StartPostcopy if self.dest_postcopy => {
                info!("{}: postcopy requested", self.vm);
                self.start_postcopy = true;
                Ok(())
            }
            LocalMessage::StartPostcopy => {
                warn!(
                    "{}: postcopy requested, but the destination cannot run it",
                    self.vm
                );
                Ok(())
            }
            other => Err(format!("unexpected message from the VMM: {other:?}")),
        }
    }

    /// Asks the VMM for its dirty bitmap (stopping the vCPUs first if `stop`); with `stop`,
    /// also returns the machine state that follows.
    fn harvest(&mut self, stop: bool) -> Result<(DirtyBitmap, Option<Vec<u8>>), String> {
        send_local(&mut self.vmm, &LocalMessage::Harvest { stop })
            .map_err(|e| format!("VMM connection: {e}"))?;
        let mut bm = DirtyBitmap::new(self.mem.blocks());
        let mut ended = false;
        loop {
            let m = match self.vmm_rx.recv() {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => return Err(format!("VMM connection: {e}")),
                Err(_) => return Err("VMM connection lost".into()),
            };
            match m {
                LocalMessage::DirtyBitmap {
                    block,
                    first_page,
                    words,
                } if !ended => bm.or_words(block, first_page, &words)?,
                LocalMessage::BitmapEnd { stopped } if !ended => {
                    if stopped != stop {
                        return Err(format!(
                            "VMM reported vCPUs {}stopped, expected {}stopped",
                            if stopped { "" } else { "not " },
                            if stop { "" } else { "not " }
                        ));
                    }
                    if !stop {
                        return Ok((bm, None));
                    }
                    ended = true;
                }
                LocalMessage::MachineState(s) if ended => {
                    self.state_taken = true;
                    return Ok((bm, Some(s)));
                }
                other => self.control(other)?,
            }
        }
    }

    /// Streams every page set in `dirty` (a precopy round, or the last pages at a precopy
    /// switchover). In the first round holes in the memfd are skipped, or announced to a
    /// postcopy-capable destination. The bandwidth limit applies while the guest runs.
    fn send_pages(
        &mut self,
        peer: &mut Peer,
        dirty: &DirtyBitmap,
        first_round: bool,
    ) -> Result<(), String> {
        let limited = self.stats.phase == Phase::Precopy;
        let holes = match (first_round, self.dest_postcopy) {
            (true, false) => Holes::Skip,
            (true, true) => Holes::Announce,
            (false, _) => Holes::AsZero,
        };
        let t0 = Instant::now();
        let bytes0 = Counters::get(&self.counters.bytes);
        self.sender.new_pass();
        for (block, first, count) in dirty.runs(MAX_RUN_PAGES as u64) {
            let off = self
                .mem
                .offset_of(block, first, count)
                .map_err(|e| format!("dirty bitmap: {e}"))?;
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
            if let Ok(Ok(PeerMessage::Error(m)) | Err(m)) = peer.rx.try_recv() {
                return Err(format!("destination failed: {m}"));
            }
            if let Some(wait) = self.over_bandwidth(t0, bytes0).filter(|_| limited) {
                std::thread::sleep(wait);
            }
            // Throughput so far, including this round, so progress shows it while it runs.
            self.stats.throughput_bps = rate(
                self.send_bytes + Counters::get(&self.counters.bytes) - bytes0,
                self.send_time + t0.elapsed(),
            );
            self.progress(false);
        }
        self.sender
            .flush(&mut peer.stream, &self.counters)
            .map_err(|e| self.peer_error(peer, e))?;
        self.round_elapsed = t0.elapsed();
        self.send_time += self.round_elapsed;
        self.send_bytes += Counters::get(&self.counters.bytes) - bytes0;
        self.stats.throughput_bps = self.bandwidth();
        Ok(())
    }

    /// Turns a write error into the destination's own reason when it sent one.
    fn peer_error(&self, peer: &Peer, e: std::io::Error) -> String {
        match peer.rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(PeerMessage::Error(m))) => format!("destination failed: {m}"),
            _ => format!("destination connection: {e}"),
        }
    }

    fn bandwidth(&self) -> u64 {
        rate(self.send_bytes, self.send_time)
    }

    fn update_stats(&mut self) {
        let c = &self.counters;
        self.stats.pages_sent = Counters::get(&c.pages);
        self.stats.zero_pages = Counters::get(&c.zero_pages);
        self.stats.holes_skipped = Counters::get(&c.holes);
        self.stats.bytes_sent = Counters::get(&c.bytes);
        self.stats.total_us = self.started.elapsed().as_micros() as u64;
        if self.stats.phase == Phase::Postcopy {
            self.stats.remaining_pages = self.sent.remaining();
            let secs = self.started.elapsed().as_secs_f64().max(1e-6);
            self.stats.throughput_bps = (self.stats.bytes_sent as f64 / secs) as u64;
        }
    }

    fn postcopy_stats(&self) -> PostcopyStats {
        PostcopyStats {
            pages_requested: self.pc.requested.load(Ordering::Relaxed),
            pages_urgent: self.pc.urgent.load(Ordering::Relaxed),
            pages_pushed: self.pc.pushed.load(Ordering::Relaxed),
            remaining_pages: self.sent.remaining(),
            ..Default::default()
        }
    }

    fn progress(&mut self, force: bool) {
        if force || self.last_progress.elapsed() >= PROGRESS_EVERY {
            self.last_progress = Instant::now();
            self.update_stats();
            if self.stats.phase == Phase::Postcopy {
                self.report(&LocalMessage::PostcopyProgress(self.postcopy_stats()));
            }
            self.report(&LocalMessage::Progress(self.stats));
        }
    }
}

/// Serves the destination's page requests on the urgent channel, so that a requested page
/// never waits behind background pages.
struct RequestServer {
    mem: Arc<GuestMapping>,
    sent: Arc<SentMap>,
    counters: Arc<Counters>,
    pc: Arc<PostcopyCounters>,
    stream: PeerStream,
    sender: PageSender,
}

impl RequestServer {
    fn serve(&mut self, run: proto::peer::PageRun) -> Result<(), String> {
        let count = run.count as u64;
        self.mem
            .offset_of(run.block, run.first, count)
            .map_err(|e| format!("destination requested {e}"))?;
        self.pc.requested.fetch_add(count, Ordering::Relaxed);
        for (first, n) in self.sent.claim(run.block, run.first, count) {
            let off = self
                .mem
                .offset_of(run.block, first, n)
                .map_err(|e| e.to_string())?;
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
                .map_err(|e| format!("urgent channel: {e}"))?;
            self.pc.urgent.fetch_add(n, Ordering::Relaxed);
        }
        self.sender
            .flush(&mut self.stream, &self.counters)
            .map_err(|e| format!("urgent channel: {e}"))?;
        self.pc.hint.store(
            (run.block as u64) << 48 | (run.first + count),
            Ordering::Release,
        );
        Ok(())
    }
}

/// Waits up to `timeout` for a message from the destination in postcopy: true once it says it
/// has every page; any other message ends the migration.
fn dest_has_all(peer: &Peer, timeout: Duration) -> Result<bool, String> {
    match peer.rx.recv_timeout(timeout) {
        Ok(Ok(PeerMessage::AllReceived)) => Ok(true),
        Ok(Ok(PeerMessage::Error(m))) => Err(format!("destination failed: {m}")),
        Ok(Ok(other)) => Err(format!("unexpected message from destination: {other:?}")),
        Ok(Err(e)) => Err(format!("destination connection: {e}")),
        Err(RecvTimeoutError::Timeout) => Ok(false),
        Err(RecvTimeoutError::Disconnected) => Err("destination connection lost".into()),
    }
}

fn unexpected_reply(expected: &str, got: PeerMessage) -> String {
    match got {
        PeerMessage::Error(m) => format!("destination failed: {m}"),
        other => format!("expected {expected} from the destination, got {other:?}"),
    }
}

/// Lowers the calling thread's scheduling priority (nice 10); best effort.
pub fn lower_priority() {
    // SAFETY: setpriority on the calling thread (tid) changes only its nice value.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
    if r != 0 {
        log::debug!(
            "lowering the background thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn rate(amount: u64, over: Duration) -> u64 {
    let us = over.as_micros() as u64;
    if us == 0 {
        0
    } else {
        ((amount as u128 * 1_000_000) / us as u128) as u64
    }
}

/// A migration's identifier: unique enough to tell resumptions apart.
fn session_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}
