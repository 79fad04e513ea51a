//! The VMM's side of a migration: the glue between [`Machine`] (KVM, run status, control API)
//! and `umem_client`, which speaks to the host's umemd. The VM hands over its guest-RAM memfd
//! and then answers umemd through [`MigrationSource`] (dirty bitmaps and machine state on the
//! source) and [`MigrationTarget`] (loading and running on the destination); the events update
//! the status and migration info the control API reports. It never talks to another host.

use std::sync::Arc;

use log::{error, info};
use proto::local::PeerAuth;
use proto::{MigrationParams, Phase};
use umem_client::{
    BoxError, ClientError, Event, IncomingSession, MigrationSource, MigrationTarget,
    OutgoingSession, UmemdClient,
};

use crate::machine::{Machine, Status, Switchover};
use crate::state::MachineState;
use crate::uffd::{RamUffd, UffdError};

/// Errors of a migration, as the control API reports them.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The connection to umemd, or umemd itself.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The VM could not do what was asked.
    #[error("{0}")]
    Vm(#[from] crate::vm::VmError),
    /// A request made no sense in the current state.
    #[error("{0}")]
    Refused(String),
    /// The userfaultfd could not be set up.
    #[error("{0}")]
    Uffd(#[from] UffdError),
    /// Guest RAM could not be reset for the next incoming migration.
    #[error("{0}")]
    Memory(#[from] crate::memory::MemoryError),
    /// The migration thread could not be started.
    #[error("starting the migration thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// The source VM as the client sees it.
struct Source<'a>(&'a Machine);

impl MigrationSource for Source<'_> {
    fn stop_vcpus(&self) -> Result<(), BoxError> {
        {
            let mut s = self.0.state();
            s.status = Status::FinishMigrate;
            s.migration.phase = Phase::Switchover;
        }
        self.0.vm.pause();
        Ok(())
    }

    fn dirty_bitmap(&self, block: usize) -> Result<Vec<u64>, BoxError> {
        Ok(self.0.vm.dirty_log(block)?)
    }

    fn save_state(&self) -> Result<Vec<u8>, BoxError> {
        Ok(self.0.vm.save_state()?.to_bytes()?)
    }
}

/// The destination VM as the client sees it.
struct Target<'a> {
    m: &'a Machine,
    /// Resume the vCPUs on `Run` (else the VM waits, paused, for `cont`).
    autostart: bool,
}

impl MigrationTarget for Target<'_> {
    fn load_state(&self, blob: &[u8]) -> Result<(), BoxError> {
        let st = MachineState::from_bytes(blob)?;
        self.m.vm.restore_state(&st)?;
        Ok(())
    }

    fn run(&self, postcopy: bool) {
        let mut s = self.m.state();
        if postcopy {
            s.migration.phase = Phase::Postcopy;
        } else if let Some(u) = s.uffd.take() {
            // Every page is here already: the VM runs as an ordinary VM.
            u.release();
        }
        if self.autostart {
            s.status = Status::Running;
            self.m.vm.resume();
        } else {
            s.status = Status::Paused;
        }
    }
}

/// A connection to umemd whose next request authenticates its peers as `auth` says.
fn connect(m: &Machine, auth: &PeerAuth) -> Result<UmemdClient, MigrationError> {
    Ok(UmemdClient::connect(&m.umemd_socket)?.with_auth(auth.clone()))
}

/// Starts an outgoing migration to `uri` in the background. At most one runs at a time: the
/// check and the reservation happen under one lock, so two racing `migrate` commands cannot
/// both proceed.
pub fn start_outgoing(m: &Arc<Machine>, uri: String, auth: PeerAuth) -> Result<(), MigrationError> {
    let (params, previous) = {
        let mut s = m.state();
        if s.migration.phase.is_active() || s.umemd.is_some() {
            return Err(MigrationError::Refused(
                "a migration is already running".into(),
            ));
        }
        if !matches!(s.status, Status::Running | Status::Paused) {
            return Err(MigrationError::Refused(format!(
                "cannot migrate a VM in status {}",
                serde_json::to_string(&s.status).unwrap_or_default()
            )));
        }
        let reserved = crate::machine::MigrationInfo {
            phase: Phase::Setup,
            uri: Some(uri.clone()),
            ..Default::default()
        };
        s.peer_auth = auth.clone();
        (s.params, std::mem::replace(&mut s.migration, reserved))
    };
    match connect_outgoing(m, &uri, params, &auth) {
        Ok(session) => spawn_outgoing_thread(m, session),
        Err(e) => {
            m.state().migration = previous;
            Err(e)
        }
    }
}

/// Hands the memfd to umemd with the `Outgoing` request, dirty logging on.
fn connect_outgoing(
    m: &Machine,
    uri: &str,
    params: MigrationParams,
    auth: &PeerAuth,
) -> Result<OutgoingSession, MigrationError> {
    let client = connect(m, auth)?;
    // Log from now on, so every page written after the first full pass is seen dirty.
    m.vm.set_dirty_logging(true)?;
    let opened = (0..m.vm.ram().blocks().len())
        .try_for_each(|slot| m.vm.dirty_log(slot).map(|_| ()))
        .map_err(MigrationError::from)
        .and_then(|()| {
            let ram = m.vm.ram();
            Ok(client.outgoing(&m.name, uri, params, ram.local_blocks(), ram.memfd_fd())?)
        });
    let session = match opened {
        Ok(session) => session,
        Err(e) => {
            let _ = m.vm.set_dirty_logging(false);
            return Err(e);
        }
    };
    let mut s = m.state();
    s.umemd = Some(session.control());
    s.was_running = s.status == Status::Running;
    Ok(session)
}

fn outgoing_loop(m: &Machine, mut session: OutgoingSession) -> Result<(), MigrationError> {
    session.run(&Source(m), |event| {
        let mut s = m.state();
        match event {
            Event::Progress(stats) => progress(&mut s.migration, stats),
            Event::PostcopyPaused(reason) => paused(&mut s.migration, reason),
            Event::Session(id) => s.migration.session_id = Some(id),
            // The destination may run the VM from now on: this copy never runs again by
            // itself, whatever happens to the migration (`cont force=true` is the operator's
            // way out when it is known not to run there).
            Event::Committed => s.status = Status::Postmigrate,
            Event::PostcopyProgress(p) => s.migration.postcopy = Some(*p),
            Event::Completed(stats) => {
                completed(&mut s.migration, stats);
                s.status = Status::Postmigrate;
            }
            Event::Failed { stats, .. } => s.migration.stats = stats,
            _ => {}
        }
    })?;
    Ok(())
}

fn finish_outgoing(m: &Arc<Machine>, result: Result<(), MigrationError>) {
    let _ = m.vm.set_dirty_logging(false);
    let mut s = m.state();
    s.umemd = None;
    let umemd_lost = matches!(
        result,
        Err(MigrationError::Client(
            ClientError::UmemdLost | ClientError::Io(_)
        ))
    );
    if umemd_lost
        && matches!(s.migration.phase, Phase::Postcopy | Phase::PostcopyPaused)
        && s.migration.session_id.is_some()
    {
        // The VM runs on the destination and waits for pages that only this memfd holds: the
        // next umemd that answers takes the migration over.
        s.migration.phase = Phase::PostcopyPaused;
        s.migration.error =
            Some("umemd lost; the migration waits for umemd to be started again".into());
        drop(s);
        let m = m.clone();
        let spawned = std::thread::Builder::new()
            .name("umemd-handover".into())
            .spawn(move || hand_outgoing_to_next_umemd(&m));
        if let Err(e) = spawned {
            error!("starting the hand-over thread: {e}");
        }
        return;
    }
    if let Err(e) = result {
        error!("outgoing migration failed: {e}");
        if s.migration.phase != Phase::Cancelled {
            s.migration.phase = Phase::Failed;
        }
        s.migration.error = Some(e.to_string());
        // The guest keeps running here: the destination never started it. After `Committed`
        // the status is `postmigrate`, never `finish-migrate`, so this copy stays stopped.
        if s.status == Status::FinishMigrate {
            s.status = if s.was_running {
                m.vm.resume();
                Status::Running
            } else {
                Status::Paused
            };
        }
    }
}

/// Postcopy lost the source's umemd: hands the migration (memfd, session id, destination) to
/// the next umemd that answers on the socket, for as long as it takes.
fn hand_outgoing_to_next_umemd(m: &Arc<Machine>) {
    let taken = until_a_umemd_takes_it("the outgoing migration", || {
        let s = m.state();
        let (Some(id), Some(uri)) = (s.migration.session_id, s.migration.uri.clone()) else {
            return Ok(None);
        };
        if s.migration.phase != Phase::PostcopyPaused {
            // Cancelled meanwhile.
            return Ok(None);
        }
        let (params, auth) = (s.params, s.peer_auth.clone());
        drop(s);
        let ram = m.vm.ram();
        let session = connect(m, &auth)?.resume_outgoing(
            &m.name,
            &uri,
            params,
            ram.local_blocks(),
            ram.memfd_fd(),
            id,
        )?;
        Ok(Some(session))
    });
    if let Some(session) = taken {
        m.state().umemd = Some(session.control());
        if let Err(e) = spawn_outgoing_thread(m, session) {
            error!("{e}");
        }
    }
}

/// The thread that answers umemd for an outgoing migration, then settles its outcome.
fn spawn_outgoing_thread(m: &Arc<Machine>, session: OutgoingSession) -> Result<(), MigrationError> {
    let m2 = m.clone();
    std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let result = outgoing_loop(&m2, session);
            finish_outgoing(&m2, result);
        })?;
    Ok(())
}

/// Offers a migration whose umemd died to the next umemd that answers on the socket, every
/// [`UMEMD_RETRY`], for as long as it takes (systemd's `Restart=` brings one back): `offer`
/// returns the new session once one took it, or `None` when there is nothing left to offer.
fn until_a_umemd_takes_it<S>(
    what: &str,
    mut offer: impl FnMut() -> Result<Option<S>, MigrationError>,
) -> Option<S> {
    loop {
        std::thread::sleep(UMEMD_RETRY);
        match offer() {
            Ok(Some(session)) => {
                info!("a new umemd took {what} over");
                return Some(session);
            }
            Ok(None) => return None,
            Err(e) => log::debug!("no umemd to take {what} over yet: {e}"),
        }
    }
}

/// Asks umemd to cancel the running outgoing migration.
pub fn cancel(m: &Machine) -> Result<(), MigrationError> {
    let mut s = m.state();
    if s.status == Status::Postmigrate && s.migration.phase != Phase::PostcopyPaused {
        return Err(MigrationError::Refused(
            "the switchover is committed: the VM runs on the destination; it cannot be cancelled"
                .into(),
        ));
    }
    if s.status == Status::Inmigrate {
        // Destination: end this incoming attempt (a stuck or unwanted source); the VM never
        // ran, so it listens again for the next one.
        let Some(control) = s.incoming.as_ref() else {
            return Err(MigrationError::Refused("no migration is running".into()));
        };
        return Ok(control.cancel()?);
    }
    let Some(control) = s.umemd.as_ref() else {
        if s.migration.phase == Phase::PostcopyPaused {
            // Waiting for a umemd to take the migration over: stop waiting.
            s.migration.phase = Phase::Cancelled;
            return Ok(());
        }
        return Err(MigrationError::Refused("no migration is running".into()));
    };
    control.cancel()?;
    s.migration.phase = Phase::Cancelled;
    Ok(())
}

/// `migrate-pause`: cuts the running postcopy's link on purpose; umemd connects again only on
/// `migrate-resume`.
pub fn pause(m: &Machine) -> Result<(), MigrationError> {
    let s = m.state();
    if s.migration.phase != Phase::Postcopy {
        return Err(MigrationError::Refused(
            "migrate-pause applies to an outgoing migration in postcopy".into(),
        ));
    }
    let Some(control) = s.umemd.as_ref() else {
        return Err(MigrationError::Refused(
            "no outgoing migration is running".into(),
        ));
    };
    Ok(control.pause()?)
}

/// `migrate-resume`: a paused postcopy connects again, to `uri`.
pub fn resume(m: &Machine, uri: &str) -> Result<(), MigrationError> {
    let s = m.state();
    if s.migration.phase != Phase::PostcopyPaused {
        return Err(MigrationError::Refused(
            "migrate-resume applies to an outgoing migration in postcopy-paused".into(),
        ));
    }
    let Some(control) = s.umemd.as_ref() else {
        return Err(MigrationError::Refused(
            "no outgoing migration is running".into(),
        ));
    };
    Ok(control.resume(uri)?)
}

/// `migrate-recover`: a paused incoming postcopy listens for its source on `uri` instead.
pub fn recover(m: &Machine, uri: &str) -> Result<(), MigrationError> {
    let s = m.state();
    if s.migration.phase != Phase::PostcopyPaused {
        return Err(MigrationError::Refused(
            "migrate-recover applies to an incoming migration in postcopy-paused".into(),
        ));
    }
    let Some(control) = s.incoming.as_ref() else {
        return Err(MigrationError::Refused(
            "no incoming migration is running".into(),
        ));
    };
    Ok(control.recover(uri)?)
}

/// Asks umemd to switch the running precopy migration to postcopy.
pub fn start_postcopy(m: &Machine) -> Result<(), MigrationError> {
    let s = m.state();
    let Some(control) = s.umemd.as_ref() else {
        return Err(MigrationError::Refused("no migration is running".into()));
    };
    Ok(control.start_postcopy()?)
}

/// Updates the tunables, and the running migration's too.
pub fn set_params(m: &Machine, p: MigrationParams) -> Result<(), MigrationError> {
    let mut s = m.state();
    s.params = p;
    if let Some(control) = s.umemd.as_ref() {
        control.set_params(p)?;
    }
    Ok(())
}

/// Registers this (not yet started) VM with umemd to receive a migration on `uri`, and starts
/// the thread that loads the machine state when it arrives. `autostart` resumes the vCPUs once
/// the source has committed.
pub fn start_incoming(
    m: &Arc<Machine>,
    uri: String,
    auth: PeerAuth,
    autostart: bool,
) -> Result<(), MigrationError> {
    let client = connect(m, &auth)?;
    // Registered before any state can be loaded: loading may touch guest RAM.
    let uffd = RamUffd::new(m.vm.ram())?;
    let ram = m.vm.ram();
    let mut session = client.incoming(
        &m.name,
        &uri,
        ram.local_blocks(),
        ram.memfd_fd(),
        Some(uffd.as_fd()),
    )?;
    let listen_uri = session.wait_listening(std::time::Duration::from_secs(30))?;
    session.vcpu_threads(m.vm.vcpu_control().thread_ids())?;
    {
        let mut s = m.state();
        s.migration.phase = Phase::Setup;
        s.migration.listen_uri = Some(listen_uri);
        s.uffd = Some(uffd);
        s.incoming = Some(session.control());
        s.peer_auth = auth;
    }
    spawn_incoming_thread(m, session, uri, autostart)
}

/// The thread that answers umemd for an incoming migration, and decides what a failure
/// means: before the VM ran, listen again; in postcopy after losing umemd itself, wait for
/// the next umemd and hand it the migration; otherwise stop the VM (postcopy-paused).
fn spawn_incoming_thread(
    m: &Arc<Machine>,
    session: IncomingSession,
    uri: String,
    autostart: bool,
) -> Result<(), MigrationError> {
    let m2 = m.clone();
    std::thread::Builder::new()
        .name("incoming".into())
        .spawn(move || {
            let result = incoming_loop(&m2, session, autostart);
            m2.state().incoming = None;
            let Err(e) = result else {
                return;
            };
            error!("incoming migration failed: {e}");
            let next = {
                let mut s = m2.state();
                let ran = matches!(s.migration.phase, Phase::Postcopy | Phase::PostcopyPaused);
                let umemd_lost = matches!(
                    e,
                    MigrationError::Client(ClientError::UmemdLost | ClientError::Io(_))
                );
                if ran && umemd_lost && s.migration.session_id.is_some() {
                    // Everything the migration needs lives in the memfd and the userfaultfd,
                    // which this VMM holds: the next umemd takes it over. Meanwhile the vCPUs
                    // run on the pages present; one that needs a missing page waits.
                    s.migration.phase = Phase::PostcopyPaused;
                    s.migration.error = Some(format!(
                        "{e}; the VM runs on the pages it has until umemd is back"
                    ));
                    AfterIncoming::WaitForUmemd
                } else {
                    s.migration.phase = Phase::Failed;
                    s.migration.error = Some(e.to_string());
                    if ran {
                        // Pages are still missing: stop rather than run on with holes. The
                        // userfaultfd stays registered, so no missing page reads as zeros.
                        m2.vm.fail(format!("postcopy: {e}"));
                        s.status = Status::PostcopyPaused;
                        AfterIncoming::Stop
                    } else if s.status == Status::Inmigrate {
                        s.migration.failed_attempts += 1;
                        s.status = Status::MigrateFailed;
                        AfterIncoming::ListenAgain
                    } else {
                        AfterIncoming::Stop
                    }
                }
            };
            match next {
                AfterIncoming::ListenAgain => listen_again_after_failure(&m2, &uri, autostart),
                AfterIncoming::WaitForUmemd => hand_over_to_next_umemd(&m2, uri, autostart),
                AfterIncoming::Stop => {}
            }
        })?;
    Ok(())
}

/// What an incoming migration's failure leads to.
enum AfterIncoming {
    ListenAgain,
    WaitForUmemd,
    Stop,
}

/// How often a VMM whose umemd died looks for the next one.
const UMEMD_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// Postcopy lost its umemd: hands the migration (memfd, userfaultfd, session id, listen
/// address) to the next umemd that answers on the socket.
fn hand_over_to_next_umemd(m: &Arc<Machine>, requested: String, autostart: bool) {
    let taken = until_a_umemd_takes_it("the incoming migration", || {
        let s = m.state();
        let (Some(id), Some(uffd)) = (s.migration.session_id, s.uffd.as_ref()) else {
            return Ok(None);
        };
        let uri = s
            .migration
            .listen_uri
            .clone()
            .unwrap_or_else(|| requested.clone());
        let ram = m.vm.ram();
        let mut session = connect(m, &s.peer_auth)?.resume_incoming(
            &m.name,
            &uri,
            ram.local_blocks(),
            ram.memfd_fd(),
            uffd.as_fd(),
            id,
        )?;
        drop(s);
        session.wait_listening(std::time::Duration::from_secs(10))?;
        session.vcpu_threads(m.vm.vcpu_control().thread_ids())?;
        Ok(Some(session))
    });
    if let Some(session) = taken {
        m.state().incoming = Some(session.control());
        if let Err(e) = spawn_incoming_thread(m, session, requested, autostart) {
            error!("{e}");
        }
    }
}

/// An incoming migration failed before the VM ran: the VM drops whatever pages arrived and
/// listens again where it listened (the port umemd picked, if it picked one), so that the
/// source can simply retry. Stays `migrate-failed` when that is impossible (umemd is gone).
fn listen_again_after_failure(m: &Arc<Machine>, requested: &str, autostart: bool) {
    let (uri, auth) = {
        let mut s = m.state();
        // The new session registers a userfaultfd of its own; this one must let go first.
        if let Some(u) = s.uffd.take() {
            u.release();
        }
        let uri = s
            .migration
            .listen_uri
            .clone()
            .unwrap_or_else(|| requested.to_string());
        (uri, s.peer_auth.clone())
    };
    let reset = m.vm.ram().discard_all();
    // The failed session's umemd thread may still hold the address for a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let result = reset.map_err(MigrationError::from).and_then(|()| loop {
        match start_incoming(m, uri.clone(), auth.clone(), autostart) {
            // Until the failed session has ended in umemd, it holds the RAM and the address.
            Err(MigrationError::Client(ClientError::Refused(e)))
                if (e.contains("in use") || e.contains("already in a migration"))
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => break other,
        }
    });
    let mut s = m.state();
    match result {
        Ok(()) => {
            s.status = Status::Inmigrate;
            info!("listening again on {uri} after the failed incoming migration");
        }
        Err(e) => {
            error!("cannot listen again on {uri}: {e}");
            let last = s.migration.error.take().unwrap_or_default();
            s.migration.error = Some(format!("{last}; listening again failed: {e}"));
            s.migration.phase = Phase::Failed;
        }
    }
}

fn incoming_loop(
    m: &Machine,
    mut session: IncomingSession,
    autostart: bool,
) -> Result<(), MigrationError> {
    session.run(&Target { m, autostart }, |event| {
        let mut s = m.state();
        match event {
            Event::PostcopyProgress(p) => s.migration.postcopy = Some(*p),
            Event::Listening(uri) => s.migration.listen_uri = Some(uri),
            Event::Progress(stats) => progress(&mut s.migration, stats),
            Event::PostcopyPaused(reason) => paused(&mut s.migration, reason),
            Event::Session(id) => s.migration.session_id = Some(id),
            Event::Completed(stats) => {
                if let Some(u) = s.uffd.take() {
                    u.release();
                }
                completed(&mut s.migration, stats);
            }
            Event::Failed { stats, .. } => s.migration.stats = stats,
            _ => {}
        }
    })?;
    Ok(())
}

/// umemd's statistics; a postcopy that resumed after a pause no longer shows the pause's reason.
fn progress(info: &mut crate::machine::MigrationInfo, stats: proto::MigrationStats) {
    if info.phase == Phase::PostcopyPaused && stats.phase == Phase::Postcopy {
        log::info!("postcopy resumed");
        info.error = None;
    }
    if matches!(stats.phase, Phase::Postcopy | Phase::PostcopyPaused) {
        info.switchover = Some(Switchover::Postcopy);
    }
    info.phase = stats.phase;
    info.stats = stats;
}

/// The migration completed: without a postcopy phase, its switchover was a precopy one.
fn completed(info: &mut crate::machine::MigrationInfo, stats: proto::MigrationStats) {
    info.switchover.get_or_insert(Switchover::Precopy);
    info.phase = Phase::Completed;
    info.stats = stats;
}

/// Postcopy lost its link: the phase says so and `error` says why, until it resumes.
fn paused(info: &mut crate::machine::MigrationInfo, reason: String) {
    log::warn!("postcopy paused: {reason}");
    info.phase = Phase::PostcopyPaused;
    info.error = Some(reason);
}
