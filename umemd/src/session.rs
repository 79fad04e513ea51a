//! One VMM connection = one migration session. The first frame says which role umemd plays
//! (`Outgoing`: source, `Incoming`: destination) and carries the VMM's file descriptors.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use proto::frame;
use proto::local::LocalMessage;
use sendfd::RecvWithFd;

use crate::link::send_local;
use crate::metrics::{self, Role, SessionMetrics};
use crate::{dest, source};

/// Why a VMM connection is refused before any migration starts.
#[derive(Debug, thiserror::Error)]
pub enum OpeningError {
    /// Reading the opening message failed.
    #[error("reading the opening message: {0}")]
    Read(#[source] std::io::Error),
    /// The whole opening message did not arrive in time.
    #[error("no complete opening message within {} ms (--opening-timeout-ms)", .0.as_millis())]
    Timeout(Duration),
    /// The VMM closed the connection first.
    #[error("VMM closed the connection before its opening message")]
    Closed,
    /// More bytes came than the opening message.
    #[error("data after the opening message before any reply")]
    TrailingData,
    /// The opening frame is malformed.
    #[error("opening message: {0}")]
    Frame(#[source] proto::frame::FrameError),
    /// The opening message does not decode.
    #[error("malformed opening message: {0}")]
    Malformed(#[source] proto::DecodeError),
    /// Neither `Outgoing` nor `Incoming`.
    #[error("expected Outgoing or Incoming as the first message, got {0}")]
    Unexpected(String),
    /// The wrong number of file descriptors came with the opening message.
    #[error("{message} needs {want}, got {got}")]
    FdCount {
        /// `Outgoing` or `Incoming`.
        message: &'static str,
        /// What it needs.
        want: &'static str,
        /// How many came.
        got: usize,
    },
    /// The memfd cannot be inspected.
    #[error("fstat of the memfd: {0}")]
    Fstat(#[source] nix::Error),
    /// The VM's RAM is in another migration of this daemon.
    #[error("this VM's RAM is already in a migration on this host; one migration at a time")]
    AlreadyMigrating,
    /// The fd cannot be inspected.
    #[error("inspecting the userfaultfd: {0}")]
    Inspect(#[source] std::io::Error),
    /// The second fd of `Incoming` is something else.
    #[error("the second fd of Incoming must be a userfaultfd, got {0}")]
    NotUserfaultfd(String),
    /// The memfd cannot be mapped.
    #[error(transparent)]
    Memfd(#[from] crate::mapping::MappingError),
    /// The declared blocks do not fit the memfd or overlap.
    #[error(transparent)]
    Layout(#[from] crate::layout::LayoutError),
}

/// Most file descriptors a VMM may pass (memfd and userfaultfd).
const MAX_FDS: usize = 2;

/// The guest-RAM memfds (by device and inode) that a session of this daemon holds. A VM's RAM
/// is in at most one migration at a time: a second `Outgoing` of the same VM while one runs
/// would send it to two destinations, and both could end up running it.
static SESSIONS: Mutex<BTreeSet<(u64, u64)>> = Mutex::new(BTreeSet::new());

/// A memfd's place in [`SESSIONS`], given back when the session ends.
struct MemfdClaim((u64, u64));

impl MemfdClaim {
    fn new(memfd: &OwnedFd) -> Result<Self, OpeningError> {
        let st = nix::sys::stat::fstat(memfd).map_err(OpeningError::Fstat)?;
        let key = (st.st_dev, st.st_ino);
        let mut set = SESSIONS.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(key) {
            return Err(OpeningError::AlreadyMigrating);
        }
        Ok(MemfdClaim(key))
    }
}

impl Drop for MemfdClaim {
    fn drop(&mut self) {
        SESSIONS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

/// Reads the opening frame and its fds, all of it within `timeout`: a client that sends
/// nothing, or a byte now and then, holds a thread and a session slot only that long.
fn read_opening(
    conn: &UnixStream,
    timeout: Duration,
) -> Result<(LocalMessage, Vec<OwnedFd>), OpeningError> {
    let deadline = Instant::now() + timeout;
    // Each read may wait only for what is left of the whole deadline.
    let arm = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(OpeningError::Timeout(timeout));
        }
        conn.set_read_timeout(Some(left))
            .map_err(OpeningError::Read)
    };
    let read_error = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            OpeningError::Timeout(timeout)
        }
        _ => OpeningError::Read(e),
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut raw: [RawFd; MAX_FDS + 2] = [-1; MAX_FDS + 2];
    arm()?;
    let (mut n, nfds) = conn.recv_with_fd(&mut buf, &mut raw).map_err(read_error)?;
    let fds: Vec<OwnedFd> = raw[..nfds]
        .iter()
        // SAFETY: these descriptors were just received with SCM_RIGHTS; nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    loop {
        match frame::split(&buf[..n]) {
            Ok(Some((p, body, rest))) => {
                if !rest.is_empty() {
                    return Err(OpeningError::TrailingData);
                }
                let msg = LocalMessage::decode(p.kind, body).map_err(OpeningError::Malformed)?;
                // The session's own reads have deadlines of their own, or none.
                conn.set_read_timeout(None).map_err(OpeningError::Read)?;
                return Ok((msg, fds));
            }
            Ok(None) => {
                if n == buf.len() {
                    buf.resize(buf.len() * 2, 0);
                }
                arm()?;
                let m = (&*conn).read(&mut buf[n..]).map_err(read_error)?;
                if m == 0 {
                    return Err(OpeningError::Closed);
                }
                n += m;
            }
            Err(e) => return Err(OpeningError::Frame(e)),
        }
    }
}

/// Answers a VMM connection with `Failed`, whose message is `why`.
fn refuse(conn: &mut UnixStream, why: impl std::fmt::Display) {
    metrics::registry().client_refused();
    let message = why.to_string();
    warn!("refusing a VMM connection: {message}");
    let _ = send_local(
        conn,
        &LocalMessage::Failed {
            message,
            stats: Default::default(),
        },
    );
}

/// Serves one VMM connection to its end. Never panics on input; errors go back to the VMM.
/// `client` names it in the log; its opening message must arrive within `opening_timeout`.
pub fn run(mut conn: UnixStream, opening_timeout: Duration, client: &str) {
    let (msg, mut fds) = match read_opening(&conn, opening_timeout) {
        Ok(x) => x,
        Err(e) => {
            if matches!(e, OpeningError::Timeout(_)) {
                warn!("dropping {client}: {e}");
            }
            return refuse(&mut conn, e);
        }
    };
    match msg {
        LocalMessage::Outgoing {
            vm,
            uri,
            params,
            blocks,
            auth,
        } => outgoing(conn, fds, vm, uri, params, blocks, auth, None),
        LocalMessage::Incoming {
            vm,
            uri,
            blocks,
            has_uffd,
            auth,
        } => {
            if fds.len() != 1 + has_uffd as usize {
                return refuse(
                    &mut conn,
                    OpeningError::FdCount {
                        message: "Incoming",
                        want: if has_uffd {
                            "2 fds (the guest RAM memfd and the userfaultfd)"
                        } else {
                            "1 fd (the guest RAM memfd)"
                        },
                        got: fds.len(),
                    },
                );
            }
            let memfd = fds.remove(0);
            let _claim = match MemfdClaim::new(&memfd) {
                Ok(c) => c,
                Err(e) => return refuse(&mut conn, e),
            };
            let uffd = fds.pop();
            if let Some(fd) = &uffd {
                if let Err(e) = check_userfaultfd(fd) {
                    return refuse(&mut conn, e);
                }
            }
            if let Err(e) = check_layout(&vm, &memfd, &blocks) {
                return refuse(&mut conn, e);
            }
            info!(
                "{vm}: incoming migration on {uri}{}",
                if has_uffd { " (postcopy capable)" } else { "" }
            );
            match dest::Dest::new(conn, vm.clone(), &uri, memfd, uffd, blocks, auth) {
                Ok(d) => d
                    .with_metrics(session_metrics(&vm, Role::Destination))
                    .run(),
                Err((mut c, e)) => {
                    error!("{vm}: {e}");
                    refuse(&mut c, e)
                }
            }
        }
        LocalMessage::ResumeOutgoing {
            vm,
            uri,
            params,
            blocks,
            session_id,
            auth,
        } => outgoing(conn, fds, vm, uri, params, blocks, auth, Some(session_id)),
        LocalMessage::ResumeIncoming {
            vm,
            uri,
            blocks,
            session_id,
            auth,
        } => {
            if fds.len() != 2 {
                return refuse(
                    &mut conn,
                    OpeningError::FdCount {
                        message: "ResumeIncoming",
                        want: "2 fds (the guest RAM memfd and the userfaultfd)",
                        got: fds.len(),
                    },
                );
            }
            let memfd = fds.remove(0);
            let _claim = match MemfdClaim::new(&memfd) {
                Ok(c) => c,
                Err(e) => return refuse(&mut conn, e),
            };
            let uffd = fds.remove(0);
            if let Err(e) = check_userfaultfd(&uffd) {
                return refuse(&mut conn, e);
            }
            if let Err(e) = check_layout(&vm, &memfd, &blocks) {
                return refuse(&mut conn, e);
            }
            info!("{vm}: postcopy session {session_id:#x} taken over on {uri}");
            match dest::Dest::new(conn, vm.clone(), &uri, memfd, Some(uffd), blocks, auth) {
                Ok(d) => d
                    .with_metrics(session_metrics(&vm, Role::Destination))
                    .run_resumed(session_id),
                Err((mut c, e)) => {
                    error!("{vm}: {e}");
                    refuse(&mut c, e)
                }
            }
        }
        other => refuse(&mut conn, OpeningError::Unexpected(format!("{other:?}"))),
    }
}

/// A migration of `vm` in `role` begins: its figures go to the daemon's metrics.
fn session_metrics(vm: &str, role: Role) -> SessionMetrics {
    metrics::registry().open(vm, role)
}

/// The source role: a new migration, or (`resume`) a postcopy session taken over from a umemd
/// that died.
#[allow(clippy::too_many_arguments)]
fn outgoing(
    mut conn: UnixStream,
    mut fds: Vec<OwnedFd>,
    vm: String,
    uri: String,
    params: proto::MigrationParams,
    blocks: Vec<proto::local::LocalBlock>,
    auth: proto::local::PeerAuth,
    resume: Option<u64>,
) {
    if fds.len() != 1 {
        return refuse(
            &mut conn,
            OpeningError::FdCount {
                message: if resume.is_some() {
                    "ResumeOutgoing"
                } else {
                    "Outgoing"
                },
                want: "exactly 1 fd (the guest RAM memfd)",
                got: fds.len(),
            },
        );
    }
    let memfd = fds.remove(0);
    let _claim = match MemfdClaim::new(&memfd) {
        Ok(c) => c,
        Err(e) => return refuse(&mut conn, e),
    };
    if let Err(e) = check_layout(&vm, &memfd, &blocks) {
        return refuse(&mut conn, e);
    }
    match resume {
        None => info!("{vm}: outgoing migration to {uri} ({:?})", params.mode),
        Some(id) => info!("{vm}: postcopy session {id:#x} to {uri} taken over"),
    }
    let metrics = || session_metrics(&vm, Role::Source);
    match source::Source::new(conn, vm.clone(), uri, params, memfd, blocks, auth) {
        Ok(s) => match resume {
            None => s.with_metrics(metrics()).run(),
            Some(id) => s.with_metrics(metrics()).run_resumed(id),
        },
        Err((mut c, e)) => refuse(&mut c, e),
    }
}

/// Checks the declared blocks against the memfd before anything is sized from them, and logs
/// what the session will hold per page (bounded by the memfd's size once the blocks pass).
fn check_layout(
    vm: &str,
    memfd: &OwnedFd,
    blocks: &[proto::local::LocalBlock],
) -> Result<(), OpeningError> {
    use std::os::fd::AsFd;
    let len = crate::mapping::check_memfd(memfd.as_fd())?;
    let footprint = crate::layout::validate(blocks, len)?;
    info!("{vm}: RAM layout {footprint}");
    Ok(())
}

/// The second fd of an `Incoming` must be a userfaultfd: anything else would make every fault
/// handling call fail later, with a less helpful error.
fn check_userfaultfd(fd: &OwnedFd) -> Result<(), OpeningError> {
    use std::os::fd::AsRawFd;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(OpeningError::Inspect)?;
    if link.to_string_lossy() == "anon_inode:[userfaultfd]" {
        Ok(())
    } else {
        Err(OpeningError::NotUserfaultfd(link.display().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sendfd::SendWithFd;
    use std::os::fd::AsRawFd;

    #[test]
    fn opening_frame_and_fd_arrive_together() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut buf = Vec::new();
        LocalMessage::Cancel.encode(&mut buf);
        let f = std::fs::File::open("/dev/null").unwrap();
        a.send_with_fd(&buf, &[f.as_raw_fd()]).unwrap();
        let (msg, fds) = read_opening(&b, Duration::from_secs(5)).unwrap();
        assert_eq!(msg, LocalMessage::Cancel);
        assert_eq!(fds.len(), 1);
    }

    #[test]
    fn one_session_per_memfd() {
        let a = OwnedFd::from(
            memfd::MemfdOptions::new()
                .create("ram")
                .unwrap()
                .into_file(),
        );
        let b = OwnedFd::from(
            memfd::MemfdOptions::new()
                .create("ram")
                .unwrap()
                .into_file(),
        );
        let first = MemfdClaim::new(&a).unwrap();
        let e = MemfdClaim::new(&a.try_clone().unwrap()).err().unwrap();
        assert!(matches!(e, OpeningError::AlreadyMigrating), "{e}");
        assert!(e.to_string().contains("already in a migration"), "{e}");
        // Another VM's RAM is independent.
        let other = MemfdClaim::new(&b).unwrap();
        drop(first);
        let again = MemfdClaim::new(&a);
        assert!(
            again.is_ok(),
            "the claim is given back when the session ends"
        );
        drop(other);
    }

    #[test]
    fn a_file_posing_as_userfaultfd_is_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = check_userfaultfd(&OwnedFd::from(f)).unwrap_err();
        assert!(matches!(e, OpeningError::NotUserfaultfd(_)), "{e}");
    }

    #[test]
    fn garbage_opening_is_refused_with_a_reason() {
        let (mut a, b) = UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut a, &[3, 0, 0, 0, 0x41, 1, 2, 3]).unwrap();
        let e = read_opening(&b, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, OpeningError::Malformed(_)), "{e}");
        assert!(e.to_string().contains("malformed"), "{e}");
    }

    #[test]
    fn a_silent_client_is_dropped_at_the_deadline() {
        let (_a, b) = UnixStream::pair().unwrap();
        let t0 = Instant::now();
        let e = read_opening(&b, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, OpeningError::Timeout(_)), "{e}");
        assert!(e.to_string().contains("300 ms"), "{e}");
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }

    #[test]
    fn a_trickling_client_is_dropped_at_the_whole_deadline() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut msg = Vec::new();
        LocalMessage::Cancel.encode(&mut msg);
        // A byte every 100 ms: each read is quick, the whole message never comes in time.
        let trickle = std::thread::spawn(move || {
            for byte in msg.iter().take(msg.len() - 1) {
                if std::io::Write::write_all(&mut a, &[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_secs(1));
        });
        let t0 = Instant::now();
        let e = read_opening(&b, Duration::from_millis(400)).unwrap_err();
        let waited = t0.elapsed();
        assert!(matches!(e, OpeningError::Timeout(_)), "{e}");
        assert!(waited < Duration::from_millis(1400), "{waited:?}");
        drop(b);
        let _ = trickle.join();
    }

    #[test]
    fn the_deadline_is_lifted_once_the_opening_arrived() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut buf = Vec::new();
        LocalMessage::Cancel.encode(&mut buf);
        std::io::Write::write_all(&mut &a, &buf).unwrap();
        read_opening(&b, Duration::from_millis(200)).unwrap();
        assert_eq!(b.read_timeout().unwrap(), None);
    }

    #[test]
    fn wrong_first_message_gets_failed_reply() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut buf = Vec::new();
        LocalMessage::Cancel.encode(&mut buf);
        std::io::Write::write_all(&mut a, &buf).unwrap();
        run(b, Duration::from_secs(5), "a test client");
        let mut body = Vec::new();
        let p = frame::read(&mut a, &mut body).unwrap();
        match LocalMessage::decode(p.kind, &body).unwrap() {
            LocalMessage::Failed { message, .. } => assert!(message.contains("expected Outgoing")),
            other => panic!("unexpected {other:?}"),
        }
    }
}
