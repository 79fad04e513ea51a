//! The VMM's side of a migration: it opens a connection to its host's umemd, hands over its
//! guest-RAM memfd, and then answers umemd: dirty bitmaps and machine state on the source,
//! machine state loading on the destination. It never talks to another host itself.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use log::{error, info, warn};
use proto::local::{LocalMessage, MAX_BITMAP_WORDS};
use proto::{frame, MigrationParams, Phase};
use sendfd::SendWithFd;

use crate::machine::{Machine, Status};
use crate::state::MachineState;
use crate::uffd::{RamUffd, UffdError};

/// Errors of the VMM-to-umemd connection.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// umemd could not be reached.
    #[error("connecting to umemd at {path}: {err}")]
    Connect {
        /// Socket path.
        path: String,
        /// The error.
        err: std::io::Error,
    },
    /// The connection failed.
    #[error("umemd connection: {0}")]
    Io(#[from] std::io::Error),
    /// A frame could not be read.
    #[error("umemd connection: {0}")]
    Frame(#[from] frame::FrameError),
    /// umemd sent something out of place.
    #[error("unexpected message from umemd: {0}")]
    Unexpected(String),
    /// The VM could not do what was asked.
    #[error("{0}")]
    Vm(#[from] crate::vm::VmError),
    /// The machine state blob was bad.
    #[error("{0}")]
    State(#[from] crate::state::StateError),
    /// A request made no sense in the current state.
    #[error("{0}")]
    Refused(String),
    /// The userfaultfd could not be set up.
    #[error("{0}")]
    Uffd(#[from] UffdError),
}

fn send(conn: &mut UnixStream, msg: &LocalMessage) -> Result<(), MigrationError> {
    let mut buf = Vec::new();
    msg.encode(&mut buf);
    conn.write_all(&buf)?;
    Ok(())
}

fn recv(conn: &mut UnixStream, body: &mut Vec<u8>) -> Result<LocalMessage, MigrationError> {
    let p = frame::read(conn, body).map_err(|e| {
        if e.is_eof() {
            MigrationError::Refused("umemd closed the connection (did it exit?)".into())
        } else {
            e.into()
        }
    })?;
    LocalMessage::decode(p.kind, body).map_err(|e| MigrationError::Frame(e.into()))
}

/// Sends the opening frame with file descriptors attached in the same `sendmsg`.
fn send_with_fds(
    conn: &UnixStream,
    msg: &LocalMessage,
    fds: &[RawFd],
) -> Result<(), MigrationError> {
    let mut buf = Vec::new();
    msg.encode(&mut buf);
    let n = conn.send_with_fd(&buf, fds)?;
    if n < buf.len() {
        (&*conn).write_all(&buf[n..])?;
    }
    Ok(())
}

fn connect(m: &Machine) -> Result<UnixStream, MigrationError> {
    UnixStream::connect(&m.umemd_socket).map_err(|err| MigrationError::Connect {
        path: m.umemd_socket.display().to_string(),
        err,
    })
}

/// Starts an outgoing migration to `uri` in the background. At most one runs at a time: the
/// check and the reservation happen under one lock, so two racing `migrate` commands cannot
/// both proceed.
pub fn start_outgoing(m: &Arc<Machine>, uri: String) -> Result<(), MigrationError> {
    let (params, previous) = {
        let mut s = m.state();
        if s.migration.phase.is_active() || s.umemd_conn.is_some() {
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
        (s.params, std::mem::replace(&mut s.migration, reserved))
    };
    match connect_outgoing(m, &uri, params) {
        Ok(conn) => {
            let m2 = m.clone();
            std::thread::Builder::new()
                .name("migration".into())
                .spawn(move || {
                    let result = outgoing_loop(&m2, conn);
                    finish_outgoing(&m2, result);
                })?;
            Ok(())
        }
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
) -> Result<UnixStream, MigrationError> {
    let conn = connect(m)?;
    // Log from now on, so every page written after the first full pass is seen dirty.
    m.vm.set_dirty_logging(true)?;
    let sent = (0..m.vm.ram().blocks().len())
        .try_for_each(|slot| m.vm.dirty_log(slot).map(|_| ()))
        .map_err(MigrationError::from)
        .and_then(|()| {
            let msg = LocalMessage::Outgoing {
                vm: m.name.clone(),
                uri: uri.to_string(),
                params,
                blocks: m.vm.ram().local_blocks(),
            };
            send_with_fds(&conn, &msg, &[m.vm.ram().memfd().as_raw_fd()])
        });
    if let Err(e) = sent {
        let _ = m.vm.set_dirty_logging(false);
        return Err(e);
    }
    let mut s = m.state();
    s.umemd_conn = Some(conn.try_clone()?);
    s.was_running = s.status == Status::Running;
    Ok(conn)
}

fn outgoing_loop(m: &Machine, mut conn: UnixStream) -> Result<(), MigrationError> {
    let mut body = Vec::new();
    let mut first_harvest = true;
    loop {
        match recv(&mut conn, &mut body)? {
            LocalMessage::Harvest { stop } => {
                let t0 = std::time::Instant::now();
                if stop {
                    {
                        let mut s = m.state();
                        s.status = Status::FinishMigrate;
                        s.migration.phase = Phase::Switchover;
                    }
                    m.vm.pause();
                }
                let paused = t0.elapsed();
                send_dirty_bitmaps(m, &mut conn, first_harvest)?;
                first_harvest = false;
                send(&mut conn, &LocalMessage::BitmapEnd { stopped: stop })?;
                let harvested = t0.elapsed();
                if stop {
                    let state = m.vm.save_state()?.to_bytes()?;
                    info!(
                        "switchover: vCPUs stopped in {} us, dirty log after {} us, machine state ({} bytes) after {} us",
                        paused.as_micros(),
                        harvested.as_micros(),
                        state.len(),
                        t0.elapsed().as_micros()
                    );
                    send(&mut conn, &LocalMessage::MachineState(state))?;
                }
            }
            LocalMessage::Progress(stats) => {
                let mut s = m.state();
                s.migration.phase = stats.phase;
                s.migration.stats = stats;
            }
            LocalMessage::Committed => {
                // The destination may run the VM from now on: this copy never runs again by
                // itself, whatever happens to the migration (`cont force=true` is the
                // operator's way out when it is known not to run there).
                let mut s = m.state();
                s.status = Status::Postmigrate;
                info!("switchover committed: the VM moves to the destination");
            }
            LocalMessage::PostcopyProgress(p) => m.state().migration.postcopy = Some(p),
            LocalMessage::Completed(stats) => {
                let mut s = m.state();
                s.migration.phase = Phase::Completed;
                s.migration.stats = stats;
                s.status = Status::Postmigrate;
                info!(
                    "migration completed: {} pages sent, downtime {} us",
                    stats.pages_sent, stats.downtime_us
                );
                return Ok(());
            }
            LocalMessage::Failed { message, stats } => {
                let mut s = m.state();
                s.migration.stats = stats;
                return Err(MigrationError::Refused(message));
            }
            other => return Err(MigrationError::Unexpected(format!("{other:?}"))),
        }
    }
}

fn send_dirty_bitmaps(m: &Machine, conn: &mut UnixStream, all: bool) -> Result<(), MigrationError> {
    for (slot, b) in m.vm.ram().blocks().iter().enumerate() {
        let pages = b.desc.pages();
        let words = if all {
            let mut w = vec![u64::MAX; pages.div_ceil(64) as usize];
            if pages % 64 != 0 {
                if let Some(last) = w.last_mut() {
                    *last = (1u64 << (pages % 64)) - 1;
                }
            }
            w
        } else {
            m.vm.dirty_log(slot)?
        };
        for (i, chunk) in words.chunks(MAX_BITMAP_WORDS).enumerate() {
            if chunk.iter().all(|&w| w == 0) {
                continue;
            }
            send(
                conn,
                &LocalMessage::DirtyBitmap {
                    block: slot as u32,
                    first_page: (i * MAX_BITMAP_WORDS * 64) as u64,
                    words: chunk.to_vec(),
                },
            )?;
        }
    }
    Ok(())
}

fn finish_outgoing(m: &Machine, result: Result<(), MigrationError>) {
    let _ = m.vm.set_dirty_logging(false);
    let mut s = m.state();
    s.umemd_conn = None;
    if let Err(e) = result {
        error!("outgoing migration failed: {e}");
        if s.migration.phase != Phase::Cancelled {
            s.migration.phase = Phase::Failed;
        }
        s.migration.error = Some(e.to_string());
        // The guest keeps running here: the destination never started it.
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

/// Asks umemd to cancel the running outgoing migration.
pub fn cancel(m: &Machine) -> Result<(), MigrationError> {
    let mut s = m.state();
    if s.status == Status::Postmigrate {
        return Err(MigrationError::Refused(
            "the switchover is committed: the VM runs on the destination; it cannot be cancelled"
                .into(),
        ));
    }
    let Some(conn) = s.umemd_conn.as_mut() else {
        return Err(MigrationError::Refused("no migration is running".into()));
    };
    send(conn, &LocalMessage::Cancel)?;
    s.migration.phase = Phase::Cancelled;
    Ok(())
}

/// Asks umemd to switch the running precopy migration to postcopy.
pub fn start_postcopy(m: &Machine) -> Result<(), MigrationError> {
    let mut s = m.state();
    let Some(conn) = s.umemd_conn.as_mut() else {
        return Err(MigrationError::Refused("no migration is running".into()));
    };
    send(conn, &LocalMessage::StartPostcopy)
}

/// Updates the tunables, and the running migration's too.
pub fn set_params(m: &Machine, p: MigrationParams) -> Result<(), MigrationError> {
    let mut s = m.state();
    s.params = p;
    if let Some(conn) = s.umemd_conn.as_mut() {
        send(conn, &LocalMessage::SetParams(p))?;
    }
    Ok(())
}

/// Registers this (not yet started) VM with umemd to receive a migration on `uri`, and starts
/// the thread that loads the machine state when it arrives. `autostart` resumes the vCPUs then.
pub fn start_incoming(
    m: &Arc<Machine>,
    uri: String,
    autostart: bool,
) -> Result<(), MigrationError> {
    let conn = connect(m)?;
    // Registered before any state can be loaded: loading may touch guest RAM.
    let uffd = RamUffd::new(m.vm.ram())?;
    let msg = LocalMessage::Incoming {
        vm: m.name.clone(),
        uri,
        blocks: m.vm.ram().local_blocks(),
        has_uffd: true,
    };
    send_with_fds(&conn, &msg, &[m.vm.ram().memfd().as_raw_fd(), uffd.fd()])?;
    send(
        &mut conn.try_clone()?,
        &LocalMessage::VcpuThreads(m.vm.vcpu_control().thread_ids()),
    )?;
    {
        let mut s = m.state();
        s.migration.phase = Phase::Setup;
        s.uffd = Some(uffd);
    }
    let m2 = m.clone();
    std::thread::Builder::new()
        .name("incoming".into())
        .spawn(move || {
            if let Err(e) = incoming_loop(&m2, conn, autostart) {
                error!("incoming migration failed: {e}");
                let mut s = m2.state();
                if s.migration.phase == Phase::Postcopy {
                    // Pages are still missing: stop rather than run on with holes. The
                    // userfaultfd stays registered, so no missing page reads as zeros.
                    m2.vm.fail(format!("postcopy: {e}"));
                    s.status = Status::PostcopyPaused;
                } else if s.status == Status::Inmigrate {
                    s.status = Status::MigrateFailed;
                }
                s.migration.phase = Phase::Failed;
                s.migration.error = Some(e.to_string());
            }
        })?;
    Ok(())
}

fn incoming_loop(m: &Machine, mut conn: UnixStream, autostart: bool) -> Result<(), MigrationError> {
    let mut body = Vec::new();
    let mut postcopy = false;
    let mut state_loaded = false;
    loop {
        match recv(&mut conn, &mut body)? {
            LocalMessage::PostcopyBegin => postcopy = true,
            LocalMessage::PostcopyProgress(p) => m.state().migration.postcopy = Some(p),
            LocalMessage::Listening { uri } => {
                info!("waiting for the migration on {uri}");
                m.state().migration.listen_uri = Some(uri);
            }
            LocalMessage::Progress(stats) => {
                let mut s = m.state();
                s.migration.phase = stats.phase;
                s.migration.stats = stats;
            }
            LocalMessage::MachineState(blob) => {
                let loaded = MachineState::from_bytes(&blob)
                    .map_err(MigrationError::from)
                    .and_then(|st| Ok(m.vm.restore_state(&st)?));
                if let Err(e) = loaded {
                    let _ = send(
                        &mut conn,
                        &LocalMessage::Failed {
                            message: e.to_string(),
                            stats: Default::default(),
                        },
                    );
                    return Err(e);
                }
                // Loaded, not run: the VM runs only once the source has committed (`Run`).
                state_loaded = true;
                send(&mut conn, &LocalMessage::StateLoaded)?;
            }
            LocalMessage::Run if state_loaded => {
                let mut s = m.state();
                if postcopy {
                    s.migration.phase = Phase::Postcopy;
                } else if let Some(u) = s.uffd.take() {
                    // Every page is here already: the VM runs as an ordinary VM.
                    u.release();
                }
                if autostart {
                    s.status = Status::Running;
                    m.vm.resume();
                } else {
                    s.status = Status::Paused;
                }
            }
            LocalMessage::Completed(stats) => {
                let mut s = m.state();
                if let Some(u) = s.uffd.take() {
                    u.release();
                }
                s.migration.phase = Phase::Completed;
                s.migration.stats = stats;
                info!("incoming migration completed");
                return Ok(());
            }
            LocalMessage::Failed { message, stats } => {
                m.state().migration.stats = stats;
                return Err(MigrationError::Refused(message));
            }
            other => {
                warn!("unexpected message from umemd: {other:?}");
                return Err(MigrationError::Unexpected(format!("{other:?}")));
            }
        }
    }
}
