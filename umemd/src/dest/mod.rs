//! Destination role: listens where the VMM asked, checks the source's RAM layout against the
//! VMM's, writes precopy pages straight into the memfd (no vCPU runs yet), hands the machine
//! state to the VMM and, for postcopy, resolves the running VM's page faults through the
//! [`FaultHandler`] until every page is present.
//!
//! This module drives one incoming migration ([`Dest::run`]); its parts live beside it:
//! [`gate`] (every connection authenticates before the session sees it), [`handshake`]
//! (accepting the source, version and layout), [`frames`] (the main stream's
//! frame loop), [`place`] (where a page goes: `pwrite` before the VM runs, `UFFDIO_COPY`
//! after), [`placer`] (the thread that writes the main stream's pages while the next ones are
//! read), [`threads`] (the fault and urgent-channel threads), [`urgent`] (the urgent
//! receiver), [`fault`] (the userfaultfd), [`vmm`] (the VMM link), [`stats`], and [`pages`]
//! (the state of every page).

pub mod error;
pub mod fault;
mod frames;
mod gate;
pub mod handshake;
pub mod huge;
pub mod pages;
pub mod phase;
mod place;
mod placer;
mod recovery;
mod stats;
mod threads;
mod urgent;
mod vmm;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};
use proto::local::{LocalBlock, LocalMessage, PeerAuth};
use proto::peer::{PeerMessage, MAX_RUN_PAGES};
use proto::{MigrationStats, Phase, PAGE_SIZE};

use crate::link::{self, Delivery};
use crate::mapping::GuestMapping;
use crate::metrics::SessionMetrics;
use crate::phase::Transitions;
use crate::stream::{PeerListener, PeerStream};
use crate::wake::WakeLatencyHold;
pub use error::{DestError, DestFailure};
use fault::FaultHandler;
use pages::PageTable;
use phase::DestPhase;
use urgent::UrgentCounters;

/// The whole handshake (both connections, hello, layout) must be over by then.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Until the source's `Hello` says otherwise.
const DEFAULT_LINK_TIMEOUT: Duration = Duration::from_secs(5);
/// Heartbeats on an idle link go out this many times per link timeout.
const HEARTBEATS_PER_TIMEOUT: u32 = 5;
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a loaded machine state waits for the source's commit before the migration fails
/// (without the VM having run here).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// How long the VMM may take to let go of its userfaultfd once told every page is here.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// The write side of the migration stream, shared with the fault thread's requests.
pub(super) type PeerWriter = Arc<Mutex<PeerStream>>;

pub(super) fn write_peer(w: &PeerWriter, msg: &PeerMessage) -> Result<(), DestError> {
    let mut buf = Vec::new();
    msg.encode(&mut buf);
    w.lock()
        .unwrap_or_else(|p| p.into_inner())
        .write_all(&buf)
        .map_err(DestError::Peer)
}

/// Postcopy machinery of an incoming migration whose VMM passed a userfaultfd.
struct Postcopy {
    fault: Arc<FaultHandler>,
    /// What came on the urgent channel.
    urgent: Arc<UrgentCounters>,
    pushed: u64,
    /// Failures of the fault and urgent-channel threads, which each hold a sender.
    errors: Receiver<DestError>,
    report_error: mpsc::Sender<DestError>,
    threads: Vec<JoinHandle<()>>,
}

/// An incoming migration.
pub struct Dest {
    vmm: UnixStream,
    vmm_rx: Receiver<Delivery<LocalMessage>>,
    vm: String,
    /// Where the source connects (the listener itself is the [`gate`]'s).
    listen_uri: String,
    mem: Arc<GuestMapping>,
    pages: Arc<PageTable>,
    postcopy: Option<Postcopy>,
    /// The source announced a postcopy switchover.
    switching_to_postcopy: bool,
    /// Idle CPUs wake at once from the drain before the switchover until the migration ends,
    /// but while a postcopy is paused (see [`crate::wake`]).
    wake_latency: WakeLatencyHold,
    /// Where the migration stands: from `Loaded` the VMM holds the machine state, and the VM
    /// runs once the source commits; in `Postcopy` pages may be placed only with
    /// `UFFDIO_COPY`.
    phase: DestPhase,
    stats: MigrationStats,
    started: Instant,
    last_progress: Instant,
    /// Bytes received by `rate_since`, for the throughput of the last interval.
    rate_bytes: u64,
    rate_since: Instant,
    /// When the source's switchover arrived: the VM stopped there; its downtime as seen here
    /// ends when it runs here.
    switchover_at: Option<Instant>,
    buf: Vec<u8>,
    /// How long the source may stay silent: its `Hello` says, within bounds.
    link_timeout: Duration,
    /// The urgent channel, kept to shut it down when the session ends (its reader would
    /// otherwise wait on a silent link for ever).
    urgent_stream: Option<PeerStream>,
    /// Tells the heartbeat thread to stop.
    heartbeats_stop: Arc<std::sync::atomic::AtomicBool>,
    /// The source can resume postcopy on a new connection.
    source_recovery: bool,
    /// Recoveries so far, the time spent paused, and since when it is paused now.
    recoveries: u64,
    paused: Duration,
    paused_since: Option<Instant>,
    /// Where every new connection authenticates.
    gate: gate::Gate,
    /// Where the reports to the VMM are published for scrapes too.
    metrics: SessionMetrics,
    /// The VM's vCPUs, once the VMM named their threads.
    vcpus: usize,
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
        auth: PeerAuth,
    ) -> Result<Self, (UnixStream, DestFailure)> {
        let setup = || -> Result<(GuestMapping, String, UnixStream, gate::Gate), DestError> {
            let trust = crate::auth::PeerTrust::resolve(&auth, crate::tls::server_config)?;
            trust.check_exposure(uri, crate::auth::Side::Listen)?;
            let mut gate = gate::Gate::new(vm.clone(), trust);
            let mem = GuestMapping::new(memfd, blocks)?;
            let listener = PeerListener::bind(uri)?;
            let listen_uri = listener.uri()?;
            gate.open(listener).map_err(DestError::Accept)?;
            let reader = vmm.try_clone().map_err(DestError::Vmm)?;
            Ok((mem, listen_uri, reader, gate))
        };
        match setup() {
            Ok((mem, listen_uri, reader, gate)) => {
                let pages = Arc::new(PageTable::new(mem.blocks()));
                let postcopy = uffd.map(|fd| {
                    let (report_error, errors) = mpsc::channel();
                    Postcopy {
                        fault: Arc::new(FaultHandler::new(
                            fd,
                            mem.blocks().to_vec(),
                            pages.clone(),
                            mem.page_size(),
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
                    listen_uri,
                    mem: Arc::new(mem),
                    pages,
                    postcopy,
                    switching_to_postcopy: false,
                    wake_latency: WakeLatencyHold::default(),
                    phase: DestPhase::Setup,
                    started: Instant::now(),
                    last_progress: Instant::now(),
                    rate_bytes: 0,
                    rate_since: Instant::now(),
                    switchover_at: None,
                    buf: vec![0; MAX_RUN_PAGES as usize * PAGE_SIZE as usize],
                    link_timeout: DEFAULT_LINK_TIMEOUT,
                    urgent_stream: None,
                    heartbeats_stop: Arc::default(),
                    source_recovery: false,
                    recoveries: 0,
                    paused: Duration::ZERO,
                    paused_since: None,
                    gate,
                    metrics: SessionMetrics::detached(),
                    vcpus: 0,
                })
            }
            Err(cause) => Err((
                vmm,
                DestFailure {
                    phase: DestPhase::Setup,
                    cause,
                },
            )),
        }
    }

    /// Publishes this migration's figures in `metrics` as it reports them.
    pub fn with_metrics(mut self, metrics: SessionMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Moves to phase `next`, refusing an illegal transition.
    fn set_phase(&mut self, next: DestPhase) -> Result<(), DestError> {
        self.phase = self.phase.advance(next)?;
        self.stats.phase = next.reported();
        self.wake_latency_for(next);
        Ok(())
    }

    /// Idle CPUs wake at once while the switchover and the postcopy run (see [`crate::wake`]);
    /// not while a postcopy waits for its link to come back, when nothing flows for as long as
    /// that takes, nor once the migration has ended.
    fn wake_latency_for(&mut self, phase: DestPhase) {
        match phase {
            DestPhase::Switchover | DestPhase::Postcopy => self.wake_latency.hold(&self.vm),
            DestPhase::PostcopyPaused | DestPhase::Completed | DestPhase::Failed => {
                self.wake_latency.release()
            }
            _ => {}
        }
    }

    /// Moves to a final phase.
    fn end(&mut self, last: DestPhase) {
        if let Err(e) = self.set_phase(last) {
            warn!("{}: {e}", self.vm);
            self.phase = last;
            self.stats.phase = last.reported();
        }
    }

    /// Runs the migration to its end and reports the outcome to the VMM.
    pub fn run(self) {
        self.run_with(None)
    }

    /// Takes over postcopy session `session_id` for a VM that runs here already (the umemd
    /// that served it died), and runs it to its end.
    pub fn run_resumed(self, session_id: u64) {
        self.run_with(Some(session_id))
    }

    fn run_with(mut self, resume: Option<u64>) {
        let mut peer = None;
        let result = match resume {
            None => self.receive(&mut peer),
            Some(id) => self.receive_after_restart(&mut peer, id),
        };
        self.wake_latency.release();
        self.stats.total_us = self.started.elapsed().as_micros() as u64;
        match result {
            Ok(()) => {
                let ran = self.phase.running();
                self.end(DestPhase::Completed);
                self.stats.remaining_pages = 0;
                // The whole migration's average, as the source reports it.
                self.stats.throughput_bps =
                    crate::stats::rate(self.reported_stats().bytes_sent, self.started.elapsed());
                info!(
                    "{}: incoming migration completed: {} pages, {} zero pages in {} ms",
                    self.vm,
                    self.stats.pages_sent,
                    self.stats.zero_pages,
                    self.stats.total_us / 1000
                );
                if ran {
                    self.report(&LocalMessage::PostcopyProgress(self.postcopy_stats()));
                }
                self.report(&LocalMessage::Completed(self.reported_stats()));
                if ran {
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
            Err(cause) => {
                let failure = DestFailure {
                    phase: self.phase,
                    cause,
                };
                let message = failure.to_string();
                warn!("{}: incoming migration failed: {message}", self.vm);
                if let Some(p) = peer.as_ref() {
                    let _ = write_peer(p, &PeerMessage::Error(message.clone()));
                }
                self.end(DestPhase::Failed);
                let stats = self.reported_stats();
                self.report(&LocalMessage::Failed { message, stats });
            }
        }
        self.heartbeats_stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // Nothing of this session may outlive it: a silent source must not keep a thread
        // waiting on either connection.
        if let Some(u) = self.urgent_stream.take() {
            let _ = u.shutdown(std::net::Shutdown::Both);
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
        } else if let Some(p) = peer.as_ref() {
            let _ = p
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .shutdown(std::net::Shutdown::Both);
        }
    }

    /// Sends a heartbeat every fifth of the link timeout until the session ends, so that the
    /// source sees a live destination while the main stream carries nothing back (precopy,
    /// loading the state, a postcopy without faults).
    fn start_heartbeats(&mut self, writer: PeerWriter) -> Result<(), DestError> {
        let stop = self.heartbeats_stop.clone();
        let every = self.link_timeout / HEARTBEATS_PER_TIMEOUT;
        std::thread::Builder::new()
            .name("heartbeats".into())
            .spawn(move || {
                let tick = Duration::from_millis(20).min(every);
                let mut last = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    if last.elapsed() >= every {
                        last = Instant::now();
                        // A dead link is noticed by the main thread, which may replace
                        // the connection under the same writer: keep beating.
                        let _ = write_peer(&writer, &PeerMessage::Heartbeat);
                    }
                }
            })
            .map(|_| ())
            .map_err(|err| DestError::Spawn {
                thread: "heartbeats",
                err,
            })
    }
}
