//! Destination role: listens where the VMM asked, checks the source's RAM layout against the
//! VMM's, writes precopy pages straight into the memfd (no vCPU runs yet), hands the machine
//! state to the VMM and, for postcopy, resolves the running VM's page faults through the
//! [`FaultHandler`] until every page is present.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use proto::frame::{FramePrefix, PREFIX_LEN};
use proto::local::{LocalBlock, LocalMessage};
use proto::peer::{
    kind, PageRun, PeerMessage, CAP_POSTCOPY, MAX_RUN_PAGES, RUN_HEADER_LEN, VERSION,
};
use proto::{BlockDesc, MigrationStats, Phase, PostcopyStats, PAGE_SIZE};

use crate::fault::FaultHandler;
use crate::link::{self, send_local, send_peer, Delivery};
use crate::mapping::GuestMapping;
use crate::pages::{PageState, PageTable};
use crate::stream::{PeerListener, PeerStream};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a loaded machine state waits for the source's commit before the migration fails
/// (without the VM having run here).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// How long the VMM may take to let go of its userfaultfd once told every page is here.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// The write side of the migration stream, shared with the fault thread's requests.
type PeerWriter = Arc<Mutex<PeerStream>>;

fn write_peer(w: &PeerWriter, msg: &PeerMessage) -> Result<(), String> {
    let mut buf = Vec::new();
    msg.encode(&mut buf);
    w.lock()
        .unwrap_or_else(|p| p.into_inner())
        .write_all(&buf)
        .map_err(|e| format!("source connection: {e}"))
}

/// Postcopy machinery of an incoming migration whose VMM passed a userfaultfd.
struct Postcopy {
    fault: Arc<FaultHandler>,
    /// What came on the urgent channel.
    urgent: Arc<UrgentCounters>,
    pushed: u64,
    /// Failures of the fault and urgent-channel threads, which each hold a sender.
    errors: Receiver<String>,
    report_error: mpsc::Sender<String>,
    threads: Vec<JoinHandle<()>>,
}

/// An incoming migration.
pub struct Dest {
    vmm: UnixStream,
    vmm_rx: Receiver<Delivery<LocalMessage>>,
    vm: String,
    listener: PeerListener,
    mem: Arc<GuestMapping>,
    pages: Arc<PageTable>,
    postcopy: Option<Postcopy>,
    /// The source announced a postcopy switchover.
    switching_to_postcopy: bool,
    /// The VMM loaded the machine state; the VM runs once the source commits.
    state_loaded: bool,
    /// The VM runs: pages may be placed only with `UFFDIO_COPY` from now on.
    running: bool,
    stats: MigrationStats,
    started: Instant,
    last_progress: Instant,
    buf: Vec<u8>,
}

impl Dest {
    /// Maps the VM's memory and binds the listening socket.
    pub fn new(
        vmm: UnixStream,
        vm: String,
        uri: &str,
        memfd: OwnedFd,
        uffd: Option<OwnedFd>,
        blocks: Vec<LocalBlock>,
    ) -> Result<Self, (UnixStream, String)> {
        let setup = || -> Result<(GuestMapping, PeerListener, UnixStream), String> {
            let mem = GuestMapping::new(memfd, blocks).map_err(|e| e.to_string())?;
            let listener = PeerListener::bind(uri)?;
            let reader = vmm.try_clone().map_err(|e| e.to_string())?;
            Ok((mem, listener, reader))
        };
        match setup() {
            Ok((mem, listener, reader)) => {
                let pages = Arc::new(PageTable::new(mem.blocks()));
                let postcopy = uffd.map(|fd| {
                    let (report_error, errors) = mpsc::channel();
                    Postcopy {
                        fault: Arc::new(FaultHandler::new(
                            fd,
                            mem.blocks().to_vec(),
                            pages.clone(),
                        )),
                        urgent: Arc::new(UrgentCounters::default()),
                        pushed: 0,
                        errors,
                        report_error,
                        threads: Vec::new(),
                    }
                });
                Ok(Dest {
                    stats: MigrationStats {
                        phase: Phase::Setup,
                        total_pages: mem.total_pages(),
                        remaining_pages: mem.total_pages(),
                        ..Default::default()
                    },
                    vmm_rx: link::local_reader(reader),
                    vmm,
                    vm,
                    listener,
                    mem: Arc::new(mem),
                    pages,
                    postcopy,
                    switching_to_postcopy: false,
                    state_loaded: false,
                    running: false,
                    started: Instant::now(),
                    last_progress: Instant::now(),
                    buf: vec![0; MAX_RUN_PAGES as usize * PAGE_SIZE as usize],
                })
            }
            Err(e) => Err((vmm, e)),
        }
    }

    /// Runs the migration to its end and reports the outcome to the VMM.
    pub fn run(mut self) {
        let mut peer = None;
        let result = self.receive(&mut peer);
        self.stats.total_us = self.started.elapsed().as_micros() as u64;
        match result {
            Ok(()) => {
                self.stats.phase = Phase::Completed;
                self.stats.remaining_pages = 0;
                info!(
                    "{}: incoming migration completed: {} pages, {} zero pages in {} ms",
                    self.vm,
                    self.stats.pages_sent,
                    self.stats.zero_pages,
                    self.stats.total_us / 1000
                );
                if self.running {
                    let s = self.postcopy_stats();
                    let _ = send_local(&mut self.vmm, &LocalMessage::PostcopyProgress(s));
                }
                let s = self.reported_stats();
                let _ = send_local(&mut self.vmm, &LocalMessage::Completed(s));
                if self.running {
                    // Pages that read as zero are placed on touch until the VMM has dropped
                    // its userfaultfd; it closes the connection once it has.
                    let deadline = Instant::now() + RELEASE_TIMEOUT;
                    while Instant::now() < deadline {
                        match self.vmm_rx.recv_timeout(Duration::from_millis(50)) {
                            Ok(Ok(_)) | Err(RecvTimeoutError::Timeout) => {}
                            Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => break,
                        }
                    }
                }
            }
            Err(message) => {
                warn!("{}: incoming migration failed: {message}", self.vm);
                if let Some(p) = peer.as_ref() {
                    let _ = write_peer(p, &PeerMessage::Error(message.clone()));
                }
                self.stats.phase = Phase::Failed;
                let stats = self.reported_stats();
                let _ = send_local(&mut self.vmm, &LocalMessage::Failed { message, stats });
            }
        }
        if let Some(pc) = self.postcopy.take() {
            pc.fault.stop();
            if let Some(p) = peer.as_ref() {
                let _ = p
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .shutdown(std::net::Shutdown::Both);
            }
            for t in pc.threads {
                let _ = t.join();
            }
        }
    }

    fn receive(&mut self, writer_slot: &mut Option<PeerWriter>) -> Result<(), String> {
        let uri = self.listener.uri()?;
        send_local(&mut self.vmm, &LocalMessage::Listening { uri })
            .map_err(|e| format!("VMM connection: {e}"))?;
        let mut peer = self.accept(None)?;
        // The migration's time counts from the source's arrival, as on the source.
        self.started = Instant::now();
        // Set before the handshake, so that a refusal (a layout mismatch) reaches the source.
        let writer: PeerWriter = Arc::new(Mutex::new(
            peer.try_clone()
                .map_err(|e| format!("source connection: {e}"))?,
        ));
        *writer_slot = Some(writer.clone());
        let session_id = self.handshake(&mut peer)?;
        if self.postcopy.is_some() {
            self.accept_urgent(session_id)?;
        }
        self.stats.phase = Phase::Precopy;
        self.progress(true);
        let mut prefix = [0u8; PREFIX_LEN];
        let mut body = Vec::new();
        loop {
            self.poll_vmm()?;
            if self.running {
                self.check_threads()?;
                if self.pages.unresolved() == 0 {
                    write_peer(&writer, &PeerMessage::AllReceived)?;
                    return Ok(());
                }
                // Keep reporting while the stream is quiet (no-background postcopy).
                let mut fds = [PollFd::new(peer.as_fd(), PollFlags::POLLIN)];
                if let Ok(0) = poll(&mut fds, PollTimeout::from(50u16)) {
                    self.progress(false);
                    continue;
                }
            }
            read_exact(&mut peer, &mut prefix)?;
            let p = FramePrefix::parse(&prefix).map_err(|e| format!("source stream: {e}"))?;
            if p.kind == kind::PAGES {
                self.receive_pages(&mut peer, p)?;
                self.progress(false);
                continue;
            }
            body.resize(p.len as usize, 0);
            read_exact(&mut peer, &mut body)?;
            self.stats.bytes_sent += (PREFIX_LEN + body.len()) as u64;
            let msg =
                PeerMessage::decode(p.kind, &body).map_err(|e| format!("source stream: {e}"))?;
            match msg {
                PeerMessage::ZeroPages(run) => {
                    self.zero(run.block, run.first, run.count as u64)?;
                    self.stats.zero_pages += run.count as u64;
                }
                PeerMessage::Holes {
                    block,
                    first,
                    count,
                } => {
                    self.zero(block, first, count)?;
                    self.stats.holes_skipped += count;
                }
                PeerMessage::Discard { block, ranges } => {
                    if self.running {
                        return Err("the source discarded pages after the VM started".into());
                    }
                    for (first, count) in ranges {
                        let off = self
                            .mem
                            .offset_of(block, first, count as u64)
                            .map_err(|e| format!("source discarded {e}"))?;
                        self.mem.punch_hole(off, count as u64 * PAGE_SIZE)?;
                        self.pages
                            .set_range(block, first, count as u64, PageState::Missing);
                    }
                }
                PeerMessage::RoundEnd { round } => {
                    self.stats.rounds = round;
                    self.progress(true);
                }
                PeerMessage::Switchover { .. } if self.stats.phase != Phase::Precopy => {
                    return Err("the source announced a second switchover".into());
                }
                PeerMessage::Switchover { postcopy } => {
                    if postcopy && self.postcopy.is_none() {
                        return Err(
                            "the source switched to postcopy, but this VMM passed no userfaultfd"
                                .into(),
                        );
                    }
                    self.switching_to_postcopy = postcopy;
                    self.stats.phase = Phase::Switchover;
                }
                PeerMessage::MachineState(_) if self.state_loaded => {
                    return Err("the source sent a second machine state".into());
                }
                PeerMessage::MachineState(_) if self.stats.phase != Phase::Switchover => {
                    return Err("the source sent the machine state without a switchover".into());
                }
                PeerMessage::MachineState(state) => {
                    let t = Instant::now();
                    if self.switching_to_postcopy {
                        // A short receive queue keeps requested pages from waiting long
                        // behind background pages the source had already queued.
                        if let Err(e) = nix::sys::socket::setsockopt(
                            &peer,
                            nix::sys::socket::sockopt::RcvBuf,
                            &crate::source::POSTCOPY_SNDBUF,
                        ) {
                            warn!("{}: shrinking the receive buffer: {e}", self.vm);
                        }
                        self.start_fault_thread(writer.clone())?;
                        send_local(&mut self.vmm, &LocalMessage::PostcopyBegin)
                            .map_err(|e| format!("VMM connection: {e}"))?;
                    }
                    self.load_state(state)?;
                    self.state_loaded = true;
                    info!(
                        "{}: machine state loaded in {} us; waiting for the source to commit",
                        self.vm,
                        t.elapsed().as_micros()
                    );
                    // The VM must not run before the source has committed: it would run on
                    // both hosts if the source never heard of this and resumed its copy.
                    write_peer(&writer, &PeerMessage::Ready)?;
                    peer.set_read_timeout(Some(COMMIT_TIMEOUT))
                        .map_err(|e| format!("source connection: {e}"))?;
                }
                PeerMessage::Commit if !self.state_loaded || self.running => {
                    return Err(format!(
                        "the source committed {}",
                        if self.running {
                            "a second time"
                        } else {
                            "before the machine state was loaded"
                        }
                    ));
                }
                PeerMessage::Commit => {
                    peer.set_read_timeout(None)
                        .map_err(|e| format!("source connection: {e}"))?;
                    send_local(&mut self.vmm, &LocalMessage::Run)
                        .map_err(|e| format!("VMM connection: {e}"))?;
                    write_peer(&writer, &PeerMessage::Started)?;
                    info!("{}: the source committed; the VM runs here", self.vm);
                    if !self.switching_to_postcopy {
                        return Ok(());
                    }
                    // This thread places background pages from now on; the fault and
                    // urgent-channel threads keep the normal priority.
                    crate::source::lower_priority();
                    self.running = true;
                    self.stats.phase = Phase::Postcopy;
                    info!(
                        "{}: postcopy: the VM runs; {} pages to come",
                        self.vm,
                        self.pages.unresolved()
                    );
                    self.progress(true);
                }
                PeerMessage::AllSent => {
                    if !self.state_loaded {
                        return Err("source finished without sending the machine state".into());
                    }
                }
                PeerMessage::Error(m) => return Err(format!("source failed: {m}")),
                other => return Err(format!("unexpected message from the source: {other:?}")),
            }
            self.progress(false);
        }
    }

    /// Pages flow before the machine state (precopy) and after the commit (postcopy), never
    /// in between: a loaded state waits for its commit with RAM as the source left it.
    fn check_pages_allowed(&self) -> Result<(), String> {
        if self.state_loaded && !self.running {
            return Err("the source sent pages after the machine state".into());
        }
        Ok(())
    }

    fn checked_offset(&self, block: u32, first: u64, count: u64) -> Result<u64, String> {
        self.mem
            .offset_of(block, first, count)
            .map_err(|e| format!("source sent {e}"))
    }

    /// Pages that read as zero: before the VM runs they become holes; afterwards they are
    /// placed only if a vCPU touches them.
    fn zero(&mut self, block: u32, first: u64, count: u64) -> Result<(), String> {
        self.check_pages_allowed()?;
        let off = self.checked_offset(block, first, count)?;
        if self.running {
            if let Some(pc) = self.postcopy.as_mut() {
                pc.fault
                    .zero(block, first, count)
                    .map_err(|e| e.to_string())?;
                pc.pushed += count;
            }
            return Ok(());
        }
        // Usually a hole already (fresh memory); only pages written earlier need dropping.
        if self.mem.has_data(off, count * PAGE_SIZE) {
            self.mem.punch_hole(off, count * PAGE_SIZE)?;
        }
        self.pages.set_range(block, first, count, PageState::Zero);
        Ok(())
    }

    /// Reads a run's data into a buffer, then writes it into guest RAM: with `pwrite` into the
    /// memfd before the VM runs (nothing else touches it then), with `UFFDIO_COPY` afterwards.
    fn receive_pages(&mut self, peer: &mut PeerStream, p: FramePrefix) -> Result<(), String> {
        let mut hdr = [0u8; RUN_HEADER_LEN];
        read_exact(peer, &mut hdr)?;
        let run =
            PageRun::decode_pages_header(p, &hdr).map_err(|e| format!("source stream: {e}"))?;
        self.check_pages_allowed()?;
        let off = self.checked_offset(run.block, run.first, run.count as u64)?;
        let len = run.data_len();
        if self.running {
            let Some(pc) = self.postcopy.as_mut() else {
                return Err("pages after the switchover without a userfaultfd".into());
            };
            read_exact(peer, &mut self.buf[..len])?;
            pc.fault
                .place(run.block, run.first, &self.buf[..len])
                .map_err(|e| e.to_string())?;
            pc.pushed += run.count as u64;
        } else {
            // Written with pwrite rather than through the mapping: a whole-page write into the
            // memfd allocates the page without zeroing it first and without a page fault per
            // page. No vCPU runs yet, so nothing else writes guest RAM now.
            read_exact(peer, &mut self.buf[..len])?;
            std::os::unix::fs::FileExt::write_all_at(self.mem.file(), &self.buf[..len], off)
                .map_err(|e| format!("writing pages into guest RAM: {e}"))?;
            self.pages
                .set_range(run.block, run.first, run.count as u64, PageState::Present);
        }
        self.stats.pages_sent += run.count as u64;
        self.stats.bytes_sent += (PREFIX_LEN + RUN_HEADER_LEN + len) as u64;
        Ok(())
    }

    /// Starts reading faults before any vCPU can run: loading the state may touch RAM.
    fn start_fault_thread(&mut self, writer: PeerWriter) -> Result<(), String> {
        let Some(pc) = self.postcopy.as_mut() else {
            return Err("no userfaultfd".into());
        };
        let tx = pc.report_error.clone();
        let fault = pc.fault.clone();
        let t = std::thread::Builder::new()
            .name("faults".into())
            .spawn(move || {
                let mut buf = Vec::new();
                let r = fault.serve(|runs| {
                    buf.clear();
                    for r in runs {
                        PeerMessage::PageRequest(*r).encode(&mut buf);
                    }
                    writer
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .write_all(&buf)
                        .map_err(|e| e.to_string())
                });
                if let Err(e) = r {
                    let _ = tx.send(e.to_string());
                }
            })
            .map_err(|e| format!("starting the fault thread: {e}"))?;
        pc.threads.push(t);
        Ok(())
    }

    /// Accepts the source's second connection, which carries only requested pages.
    fn accept_urgent(&mut self, session_id: u64) -> Result<(), String> {
        // The source opens it right after the handshake.
        let mut s = self.accept(Some(Instant::now() + HANDSHAKE_TIMEOUT))?;
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        let p = proto::frame::read(&mut s, &mut body)
            .map_err(|e| format!("urgent channel handshake: {e}"))?;
        match PeerMessage::decode(p.kind, &body) {
            Ok(PeerMessage::UrgentChannel { session_id: id }) if id == session_id => {}
            Ok(other) => {
                return Err(format!(
                    "expected the urgent channel of session {session_id:#x}, got {other:?}"
                ))
            }
            Err(e) => return Err(format!("urgent channel handshake: {e}")),
        }
        s.set_read_timeout(None).map_err(|e| e.to_string())?;
        let Some(pc) = self.postcopy.as_mut() else {
            return Ok(());
        };
        let tx = pc.report_error.clone();
        let receiver = UrgentReceiver {
            fault: pc.fault.clone(),
            mem: self.mem.clone(),
            counters: pc.urgent.clone(),
            stream: s,
        };
        let t = std::thread::Builder::new()
            .name("urgent-pages".into())
            .spawn(move || {
                if let Err(e) = receiver.run() {
                    let _ = tx.send(e);
                }
            })
            .map_err(|e| format!("starting the urgent channel thread: {e}"))?;
        pc.threads.push(t);
        Ok(())
    }

    fn check_threads(&mut self) -> Result<(), String> {
        match self.postcopy.as_ref().map(|p| p.errors.try_recv()) {
            Some(Ok(e)) => Err(e),
            _ => Ok(()),
        }
    }

    fn load_state(&mut self, state: Vec<u8>) -> Result<(), String> {
        send_local(&mut self.vmm, &LocalMessage::MachineState(state))
            .map_err(|e| format!("VMM connection: {e}"))?;
        let deadline = Instant::now() + LOAD_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.vmm_rx.recv_timeout(left) {
                Ok(Ok(LocalMessage::StateLoaded)) => return Ok(()),
                Ok(Ok(LocalMessage::VcpuThreads(t))) => self.set_vcpu_threads(t),
                Ok(Ok(LocalMessage::Failed { message, .. })) => {
                    return Err(format!("VMM could not load the machine state: {message}"))
                }
                Ok(Ok(other)) => return Err(format!("unexpected message from the VMM: {other:?}")),
                Ok(Err(e)) => return Err(format!("VMM connection: {e}")),
                Err(RecvTimeoutError::Timeout) => {
                    return Err("VMM did not load the state in time".into())
                }
                Err(RecvTimeoutError::Disconnected) => return Err("VMM connection lost".into()),
            }
        }
    }

    fn set_vcpu_threads(&mut self, tids: Vec<u32>) {
        if let Some(pc) = &self.postcopy {
            pc.fault.set_vcpu_threads(&tids);
        }
    }

    /// Waits for the source (until `deadline`, if any), giving up if the VMM goes away
    /// meanwhile.
    fn accept(&mut self, deadline: Option<Instant>) -> Result<PeerStream, String> {
        loop {
            self.poll_vmm()?;
            match self.listener.accept() {
                Ok((s, from)) => {
                    info!("{}: migration stream from {from}", self.vm);
                    return Ok(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if deadline.is_some_and(|d| Instant::now() > d) {
                        return Err("the source did not open its second connection".into());
                    }
                    let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(100u16));
                }
                Err(e) => return Err(format!("accepting the source: {e}")),
            }
        }
    }

    /// Checks the source's hello and layout; returns the session id.
    fn handshake(&mut self, peer: &mut PeerStream) -> Result<u64, String> {
        peer.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        let p =
            proto::frame::read(peer, &mut body).map_err(|e| format!("source handshake: {e}"))?;
        let session_id = match PeerMessage::decode(p.kind, &body) {
            Ok(PeerMessage::Hello {
                version,
                session_id,
                ..
            }) if version == VERSION => session_id,
            Ok(PeerMessage::Hello { version, .. }) => {
                return Err(format!(
                    "source speaks protocol version {version}, this umemd {VERSION}"
                ))
            }
            Ok(other) => return Err(format!("expected Hello from the source, got {other:?}")),
            Err(e) => return Err(format!("source handshake: {e}")),
        };
        send_peer(
            peer,
            &PeerMessage::Hello {
                version: VERSION,
                capabilities: if self.postcopy.is_some() {
                    CAP_POSTCOPY
                } else {
                    0
                },
                session_id,
            },
        )
        .map_err(|e| format!("source connection: {e}"))?;
        let p =
            proto::frame::read(peer, &mut body).map_err(|e| format!("source handshake: {e}"))?;
        let blocks = match PeerMessage::decode(p.kind, &body) {
            Ok(PeerMessage::Layout { blocks }) => blocks,
            Ok(other) => return Err(format!("expected the RAM layout, got {other:?}")),
            Err(e) => return Err(format!("source layout: {e}")),
        };
        let mine: Vec<BlockDesc> = self.mem.blocks().iter().map(|b| b.desc.clone()).collect();
        check_layout(&blocks, &mine)?;
        send_peer(peer, &PeerMessage::LayoutAccepted)
            .map_err(|e| format!("source connection: {e}"))?;
        peer.set_read_timeout(None).map_err(|e| e.to_string())?;
        Ok(session_id)
    }

    fn poll_vmm(&mut self) -> Result<(), String> {
        loop {
            match self.vmm_rx.try_recv() {
                Ok(Ok(LocalMessage::VcpuThreads(t))) => self.set_vcpu_threads(t),
                Ok(Ok(LocalMessage::Cancel)) if !self.running => {
                    return Err("migration cancelled on the destination".into())
                }
                Ok(Ok(other)) => return Err(format!("unexpected message from the VMM: {other:?}")),
                Ok(Err(e)) => return Err(format!("destination VMM connection: {e}")),
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => {
                    return Err("destination VMM connection lost".into())
                }
            }
        }
    }

    fn postcopy_stats(&self) -> PostcopyStats {
        let mut s = PostcopyStats::default();
        if let Some(pc) = &self.postcopy {
            pc.fault.stats(&mut s);
            s.pages_urgent = pc.urgent.pages.load(Ordering::Relaxed)
                + pc.urgent.zero_pages.load(Ordering::Relaxed);
            s.pages_pushed = pc.pushed;
        }
        s
    }

    fn progress(&mut self, force: bool) {
        if force || self.last_progress.elapsed() >= PROGRESS_EVERY {
            self.last_progress = Instant::now();
            self.stats.total_us = self.started.elapsed().as_micros() as u64;
            self.stats.remaining_pages = self.pages.unresolved();
            if self.running {
                let s = self.postcopy_stats();
                let _ = send_local(&mut self.vmm, &LocalMessage::PostcopyProgress(s));
            }
            let s = self.reported_stats();
            let _ = send_local(&mut self.vmm, &LocalMessage::Progress(s));
        }
    }

    /// The main stream's counts plus what came on the urgent channel.
    fn reported_stats(&self) -> MigrationStats {
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

/// Counters of the urgent channel, read by the main thread for the statistics.
#[derive(Debug, Default)]
struct UrgentCounters {
    pages: AtomicU64,
    zero_pages: AtomicU64,
    bytes: AtomicU64,
}

/// Reads the urgent channel: requested pages, placed as they come.
struct UrgentReceiver {
    fault: Arc<FaultHandler>,
    mem: Arc<GuestMapping>,
    counters: Arc<UrgentCounters>,
    stream: PeerStream,
}

impl UrgentReceiver {
    fn run(mut self) -> Result<(), String> {
        let mut prefix = [0u8; PREFIX_LEN];
        let mut buf = vec![0u8; MAX_RUN_PAGES as usize * PAGE_SIZE as usize];
        let mut body = Vec::new();
        loop {
            match self.stream.read_exact(&mut prefix) {
                Ok(()) => {}
                // The source closes it when the migration ends, successfully or not; the main
                // stream tells which.
                Err(_) => return Ok(()),
            }
            let p = FramePrefix::parse(&prefix).map_err(|e| format!("urgent channel: {e}"))?;
            if p.kind == kind::PAGES {
                let mut hdr = [0u8; RUN_HEADER_LEN];
                read_exact(&mut self.stream, &mut hdr)?;
                let run = PageRun::decode_pages_header(p, &hdr)
                    .map_err(|e| format!("urgent channel: {e}"))?;
                self.check(run.block, run.first, run.count as u64)?;
                let len = run.data_len();
                read_exact(&mut self.stream, &mut buf[..len])?;
                self.fault
                    .place(run.block, run.first, &buf[..len])
                    .map_err(|e| e.to_string())?;
                let c = &self.counters;
                c.pages.fetch_add(run.count as u64, Ordering::Relaxed);
                c.bytes.fetch_add(
                    (PREFIX_LEN + RUN_HEADER_LEN + len) as u64,
                    Ordering::Relaxed,
                );
                continue;
            }
            body.resize(p.len as usize, 0);
            read_exact(&mut self.stream, &mut body)?;
            match PeerMessage::decode(p.kind, &body).map_err(|e| format!("urgent channel: {e}"))? {
                PeerMessage::ZeroPages(run) => {
                    self.check(run.block, run.first, run.count as u64)?;
                    self.fault
                        .zero(run.block, run.first, run.count as u64)
                        .map_err(|e| e.to_string())?;
                    let c = &self.counters;
                    c.zero_pages.fetch_add(run.count as u64, Ordering::Relaxed);
                    c.bytes
                        .fetch_add((PREFIX_LEN + p.len as usize) as u64, Ordering::Relaxed);
                }
                other => {
                    return Err(format!(
                        "unexpected message on the urgent channel: {other:?}"
                    ))
                }
            }
        }
    }

    fn check(&self, block: u32, first: u64, count: u64) -> Result<(), String> {
        self.mem
            .offset_of(block, first, count)
            .map(|_| ())
            .map_err(|e| format!("source sent {e}"))
    }
}

fn read_exact(peer: &mut PeerStream, buf: &mut [u8]) -> Result<(), String> {
    peer.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            "source closed the connection mid-migration".to_string()
        }
        _ => format!("source connection: {e}"),
    })
}

fn describe(b: &BlockDesc) -> String {
    format!("{} ({} MiB at {:#x})", b.name, b.size >> 20, b.guest_addr)
}

/// The source's blocks must be the destination's: same names, sizes and addresses, in order.
pub fn check_layout(source: &[BlockDesc], dest: &[BlockDesc]) -> Result<(), String> {
    let list = |v: &[BlockDesc]| v.iter().map(describe).collect::<Vec<_>>().join(", ");
    if source != dest {
        return Err(format!(
            "RAM layout mismatch: source has [{}], destination has [{}]",
            list(source),
            list(dest)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str, size: u64) -> BlockDesc {
        BlockDesc {
            name: name.into(),
            guest_addr: 0,
            size,
        }
    }

    #[test]
    fn layout_mismatch_names_both_sides() {
        assert!(check_layout(&[b("ram-low", 1 << 30)], &[b("ram-low", 1 << 30)]).is_ok());
        let e = check_layout(&[b("ram-low", 1 << 30)], &[b("ram-low", 512 << 20)]).unwrap_err();
        assert!(e.contains("1024 MiB") && e.contains("512 MiB"), "{e}");
        assert!(check_layout(&[b("a", 4096)], &[b("b", 4096)]).is_err());
    }
}
