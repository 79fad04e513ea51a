//! Source role: reads the VM's pages through umemd's own mapping of the memfd and streams them
//! to the destination umemd: precopy rounds while the guest runs, then the switchover, then (for
//! postcopy) requested pages on the urgent channel and every other page in the background.
//!
//! This module drives one outgoing migration ([`Source::run`]); its parts live beside it:
//! [`peer`] (connection and handshake), [`vmm`] (the VMM link: control messages and dirty-log
//! harvests), [`send`] (a precopy pass), [`switchover`] (the stop, the discard list and the
//! commit), [`background`] (the postcopy pusher), [`requests`] (the urgent request server),
//! [`throttle`] and [`stats`]; [`sender`] turns page ranges into frames and [`sent`] records
//! what went.

mod background;
pub mod error;
mod peer;
pub mod phase;
pub mod policy;
mod recovery;
mod requests;
mod send;
pub mod sender;
pub mod sent;
mod stats;
mod switchover;
mod throttle;
mod vmm;

use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use proto::local::{LocalBlock, LocalMessage, PeerAuth};
use proto::peer::PeerMessage;
use proto::{MigrationMode, MigrationParams, MigrationStats, Phase, PAGE_SIZE};

use crate::auth::{PeerTrust, Side};
use crate::link::{self, send_local, send_peer, Delivery};
use crate::mapping::GuestMapping;
use crate::metrics::SessionMetrics;
use crate::phase::Transitions;
use crate::stats::rate;
use crate::stream::PeerStream;
use crate::tls;
use crate::wake::WakeLatencyHold;
pub use error::{SourceError, SourceFailure};
use peer::session_id;
use phase::SourcePhase;
use policy::{
    expected_downtime_us, next_step, CancelReason, Overdue, RoundDecision, RoundEnd,
    SwitchoverReason,
};
use proto::types::MIN_LINK_TIMEOUT_MS;
use requests::PostcopyCounters;
use sender::{Counters, PageSender};
use sent::SentMap;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Heartbeats on an idle link go out this many times per link timeout.
const HEARTBEATS_PER_TIMEOUT: u32 = 5;
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// How long the destination may take to load the state and report that it runs.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the destination may take to confirm every page once all were sent.
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(120);
/// Pages per background chunk: one bitmap word, 256 KiB, large enough for cheap placement.
const CHUNK_PAGES: u64 = 64;

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
    /// Idle CPUs wake at once from the drain before the switchover until the migration ends,
    /// but while a postcopy is paused (see [`crate::wake`]).
    wake_latency: WakeLatencyHold,
    /// The VMM handed over the final machine state: from then on the migration goes on even if
    /// the source VMM exits, since umemd holds everything the destination needs.
    state_taken: bool,
    /// Where the migration stands. From `Committed` on the destination may run the VM, so the
    /// source must never resume it, and a cancel is refused.
    phase: SourcePhase,
    /// When the main thread last sent a heartbeat on an idle main stream.
    last_heartbeat: Instant,
    /// Names this migration to the destination, also on the connections of a recovery.
    session_id: u64,
    /// The destination can resume postcopy on a new connection.
    dest_recovery: bool,
    /// The destination answers a drain ([`proto::peer::CAP_DRAIN`]).
    dest_drain: bool,
    /// The page size the destination drops pages in ([`proto::peer::CAP_HUGE_PAGES`]).
    dest_page_size: u64,
    /// Recoveries so far, and the time spent paused.
    recoveries: u64,
    paused: Duration,
    /// The switchover going on is a postcopy one.
    switching_to_postcopy: bool,
    /// The link failed right after the commit, before postcopy began: recover first.
    lost_link: Option<SourceError>,
    /// `migrate-pause`: no reconnection before `migrate-resume`.
    paused_by_request: bool,
    /// How every connection to the destination authenticates: the secret both sides prove
    /// they know, and TLS with the CA and this host's client certificate.
    trust: PeerTrust<rustls::ClientConfig>,
    /// Where the reports to the VMM are published for scrapes too.
    metrics: SessionMetrics,
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
    /// Maps the VM's memory; on failure hands the connection back with the reason (a failure
    /// of the setup phase).
    pub fn new(
        vmm: UnixStream,
        vm: String,
        uri: String,
        params: MigrationParams,
        memfd: OwnedFd,
        blocks: Vec<LocalBlock>,
        auth: PeerAuth,
    ) -> Result<Self, (UnixStream, SourceFailure)> {
        let setup = |cause| SourceFailure {
            phase: SourcePhase::Setup,
            cause,
        };
        let trust = match PeerTrust::resolve(&auth, tls::client_config) {
            Ok(t) => t,
            Err(e) => return Err((vmm, setup(e.into()))),
        };
        if let Err(e) = trust.check_exposure(&uri, Side::Connect) {
            return Err((vmm, setup(e.into())));
        }
        let mem = match GuestMapping::new(memfd, blocks) {
            Ok(m) => m,
            Err(e) => return Err((vmm, setup(e.into()))),
        };
        let reader = match vmm.try_clone() {
            Ok(r) => r,
            Err(e) => return Err((vmm, setup(SourceError::Vmm(e)))),
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
            wake_latency: WakeLatencyHold::default(),
            state_taken: false,
            phase: SourcePhase::Setup,
            last_heartbeat: Instant::now(),
            session_id: session_id(),
            dest_recovery: false,
            dest_drain: false,
            dest_page_size: PAGE_SIZE,
            recoveries: 0,
            paused: Duration::ZERO,
            switching_to_postcopy: false,
            lost_link: None,
            paused_by_request: false,
            trust,
            metrics: SessionMetrics::detached(),
        })
    }

    /// How long the destination may stay silent (`link_timeout_ms`, at least the minimum).
    fn link_timeout(&self) -> Duration {
        Duration::from_millis(self.params.link_timeout_ms.max(MIN_LINK_TIMEOUT_MS) as u64)
    }

    /// Publishes this migration's figures in `metrics` as it reports them.
    pub fn with_metrics(mut self, metrics: SessionMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The time limit this migration has run past, if any.
    fn overdue(&self) -> Option<Overdue> {
        policy::overdue(
            self.started.elapsed(),
            self.mem.total_pages() * PAGE_SIZE,
            &self.params,
        )
    }

    /// Runs the migration to its end and reports the outcome to the VMM.
    pub fn run(self) {
        self.run_with(None)
    }

    /// Takes over postcopy session `session_id` from a umemd that died, for a VM that runs on
    /// the destination already, and runs it to its end.
    pub fn run_resumed(self, session_id: u64) {
        self.run_with(Some(session_id))
    }

    fn run_with(mut self, resume: Option<u64>) {
        let mut peer = None;
        let result = match resume {
            None => self.migrate(&mut peer),
            Some(id) => self.resume_after_restart(&mut peer, id),
        };
        self.wake_latency.release();
        self.update_stats();
        match result {
            Ok(()) => {
                self.end(SourcePhase::Completed);
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
            Err(cause) => {
                let failure = SourceFailure {
                    phase: self.phase,
                    cause,
                };
                let message = failure.to_string();
                warn!("{}: migration to {} failed: {message}", self.vm, self.uri);
                if let Some(p) = peer.as_mut() {
                    let _ = send_peer(&mut p.stream, &PeerMessage::Error(message.clone()));
                    let _ = p.stream.shutdown(Shutdown::Both);
                    if let Some(u) = &p.urgent {
                        let _ = u.shutdown(Shutdown::Both);
                    }
                }
                self.end(SourcePhase::Failed);
                self.report(&LocalMessage::Failed {
                    message,
                    stats: self.stats,
                });
            }
        }
    }

    fn report(&mut self, msg: &LocalMessage) {
        // Published whether or not the VMM is still there to read it.
        self.metrics.observe(msg);
        if !self.vmm_gone && send_local(&mut self.vmm, msg).is_err() {
            self.vmm_gone = true;
        }
    }

    /// Moves to phase `next`, refusing an illegal transition.
    fn set_phase(&mut self, next: SourcePhase) -> Result<(), SourceError> {
        self.phase = self.phase.advance(next)?;
        self.stats.phase = next.reported();
        self.wake_latency_for(next);
        Ok(())
    }

    /// Idle CPUs wake at once while the switchover and the postcopy run (see [`crate::wake`]);
    /// not while a postcopy waits for its link to come back, when nothing flows for as long as
    /// that takes, nor once the migration has ended.
    fn wake_latency_for(&mut self, phase: SourcePhase) {
        match phase {
            SourcePhase::Switchover | SourcePhase::Postcopy => self.wake_latency.hold(&self.vm),
            SourcePhase::PostcopyPaused | SourcePhase::Completed | SourcePhase::Failed => {
                self.wake_latency.release()
            }
            _ => {}
        }
    }

    /// Moves to a final phase.
    fn end(&mut self, last: SourcePhase) {
        if let Err(e) = self.set_phase(last) {
            warn!("{}: {e}", self.vm);
            self.phase = last;
            self.stats.phase = last.reported();
        }
    }

    fn migrate(&mut self, peer_slot: &mut Option<Peer>) -> Result<(), SourceError> {
        let peer = peer_slot.insert(self.connect()?);
        let session_id = self.session_id;
        self.handshake(peer, session_id)?;
        self.report(&LocalMessage::Session(session_id));
        if self.params.mode != MigrationMode::Precopy && !self.dest_postcopy {
            return Err(SourceError::NoPostcopy);
        }
        if self.dest_postcopy {
            let mut urgent = self.open_stream()?;
            send_peer(&mut urgent, &PeerMessage::UrgentChannel { session_id })
                .map_err(SourceError::Urgent)?;
            peer.urgent = Some(urgent);
        }

        // The first harvest covers every page; holes in the memfd cost nothing.
        let mut dirty = self.harvest(false)?.0;
        if self.params.mode == MigrationMode::Postcopy {
            return self.postcopy(peer, dirty);
        }
        self.set_phase(SourcePhase::Precopy)?;
        self.progress(true);
        let mut round = 0;
        let mut last_pending = u64::MAX;
        loop {
            round += 1;
            let unsent = self.send_pages(peer, &dirty, round == 1)?;
            send_peer(&mut peer.stream, &PeerMessage::RoundEnd { round })
                .map_err(|e| self.peer_error(peer, e))?;
            self.stats.rounds = round;
            dirty = self.harvest(false)?.0;
            if let Some(rest) = &unsent {
                dirty.merge(rest);
            }
            let pending = dirty.count();
            let bw = self.bandwidth();
            self.stats.remaining_pages = pending;
            // Pages dirtied while the last round streamed, per second of it.
            self.stats.dirty_rate_pps = rate(pending, self.round_elapsed);
            self.stats.expected_downtime_us = expected_downtime_us(pending, bw);
            self.progress(true);
            let end = RoundEnd {
                round,
                pending_pages: pending,
                last_pending,
                bandwidth_bps: bw,
                start_postcopy_requested: self.start_postcopy,
                dest_postcopy: self.dest_postcopy,
                overdue: self.overdue(),
            };
            let decision = next_step(&end, &self.params);
            last_pending = pending;
            match decision {
                RoundDecision::AnotherRound => {}
                RoundDecision::Switchover {
                    reason: SwitchoverReason::Fits,
                } => {
                    info!(
                        "{}: switchover after {round} rounds: {pending} dirty pages, expected downtime {} us at {} MB/s",
                        self.vm,
                        self.stats.expected_downtime_us,
                        bw >> 20
                    );
                    break;
                }
                RoundDecision::Switchover {
                    reason: SwitchoverReason::RoundLimit,
                } => {
                    info!("{}: switchover after the round limit ({round})", self.vm);
                    break;
                }
                RoundDecision::Switchover {
                    reason: SwitchoverReason::PrecopyTimeout,
                } => {
                    info!(
                        "{}: switchover after the precopy timeout ({} ms, round {round}): {pending} dirty pages",
                        self.vm, self.params.precopy_timeout_ms
                    );
                    break;
                }
                RoundDecision::Cancel {
                    reason: CancelReason::CompletionTimeout { limit },
                } => {
                    return Err(SourceError::CompletionTimeout {
                        limit_ms: limit.as_millis() as u64,
                        per_gib_s: self.params.completion_timeout_per_gib_s,
                    });
                }
                RoundDecision::Postcopy { reason } => {
                    info!(
                        "{}: switching to postcopy after {round} rounds ({pending} dirty pages, {reason:?})",
                        self.vm
                    );
                    // What the round left dirty is sent again after the switchover anyway: it
                    // is dropped on the destination now, while the VM runs, and the drain waits
                    // for that too. Only what the guest dirties from here on is dropped while
                    // it is stopped (a punched hole each: thousands of them were 10 ms of a
                    // busy guest's downtime).
                    self.discard_sent(&dirty);
                    self.drain(peer, round)?;
                    return self.postcopy(peer, dirty);
                }
            }
        }

        self.drain(peer, round)?;
        self.switchover(peer, dirty)
    }
}
