//! The daemon's event loop: accepts VMM connections on the control socket and gives each its
//! own session thread, so one failing migration never stops another or the daemon.

use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::Path;
use std::sync::Arc;

use log::{debug, error, info, warn};
use mio::net::UnixListener;
use mio::{Events, Interest, Poll, Token};
use proto::peercred;

use crate::admission::{self, Limits, SessionSlots};
use crate::session;

const LISTENER: Token = Token(0);

/// Binds the control socket: the one systemd passed (socket activation) or a new one at `path`.
pub fn bind(path: &Path) -> io::Result<StdUnixListener> {
    bind_for_group(path, None)
}

/// As [`bind`], the new socket file `0660` and owned by group `group` when one is given,
/// `0600` otherwise.
pub fn bind_for_group(path: &Path, group: Option<u32>) -> io::Result<StdUnixListener> {
    if let Some(fd) = activated_fd() {
        info!("using the control socket passed by systemd (its unit sets the mode and group)");
        // SAFETY: LISTEN_FDS/LISTEN_PID said this fd is ours and is a listening socket.
        return Ok(unsafe { StdUnixListener::from_raw_fd(fd) });
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // A socket file nobody answers on is stale; one that answers belongs to a live umemd.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another umemd serves {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = StdUnixListener::bind(path)?;
    // Only its owner (and the group given) may hand umemd a VM, whatever the umask (systemd's
    // socket unit says SocketMode itself); a client that got in anyway is checked by its
    // credentials.
    peercred::restrict_socket(path, group).map_err(io::Error::other)?;
    Ok(l)
}

fn activated_fd() -> Option<RawFd> {
    let fds = sd_notify::listen_fds().ok()?;
    let mut it = fds.into_iter();
    let fd = it.next()?;
    Some(fd)
}

/// Serves until the listener fails, with the default [`Limits`].
pub fn serve(listener: StdUnixListener) -> io::Result<()> {
    serve_with(listener, Limits::default())
}

/// Serves until the listener fails; `limits` say which clients get a session and how many.
pub fn serve_with(listener: StdUnixListener, limits: Limits) -> io::Result<()> {
    info!(
        "serving {}; at most {} sessions, {} per uid; {} ms for an opening message",
        limits.allow.describe(),
        limits.max_sessions,
        limits.max_sessions_per_uid,
        limits.opening_timeout.as_millis()
    );
    let slots = SessionSlots::new(limits.max_sessions, limits.max_sessions_per_uid);
    listener.set_nonblocking(true)?;
    // SAFETY: ownership of the fd moves from the std listener to the mio one.
    let mut listener = unsafe { UnixListener::from_raw_fd(listener.into_raw_fd()) };
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut events = Events::with_capacity(64);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in events.iter() {
            if ev.token() != LISTENER {
                continue;
            }
            loop {
                match listener.accept() {
                    Ok((conn, _)) => spawn_session(conn, &limits, &slots),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn!("accept: {e}");
                        break;
                    }
                }
            }
        }
    }
}

fn spawn_session(conn: mio::net::UnixStream, limits: &Limits, slots: &Arc<SessionSlots>) {
    // SAFETY: ownership of the fd moves from the mio stream to a std one.
    let conn = unsafe { std::os::unix::net::UnixStream::from_raw_fd(conn.into_raw_fd()) };
    if let Err(e) = conn.set_nonblocking(false) {
        warn!("session socket: {e}");
        return;
    }
    // Decided here, before any thread is started for the client: a flood of connections costs
    // no more than the caps allow.
    let admitted = peercred::peer_of(&conn)
        .map_err(admission::AdmissionError::from)
        .and_then(|peer| Ok((peer, admission::admit(&peer, limits, slots)?)));
    let (peer, slot) = match admitted {
        Ok(x) => x,
        Err(e) => return refuse_client(conn, e),
    };
    let opening_timeout = limits.opening_timeout;
    let r = std::thread::Builder::new()
        .name("session".into())
        .spawn(move || {
            // Given back when the session ends, whichever way it ends.
            let _slot = slot;
            let client = format!("local client {peer}");
            debug!("{client}: session starts");
            // A bug in one session must not take the daemon or other sessions down.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                session::run(conn, opening_timeout, &client)
            }))
            .is_err()
            {
                error!("a migration session panicked; other sessions continue");
            }
        });
    if let Err(e) = r {
        error!("starting a session thread: {e}");
    }
}

/// Answers a client that gets no session with `Failed` saying why, and logs it.
fn refuse_client(mut conn: std::os::unix::net::UnixStream, why: admission::AdmissionError) {
    warn!("refusing a local client: {why}");
    crate::metrics::registry().client_refused();
    // The reply is small and the connection new: it fits the socket buffer, unless the client
    // is gone already; the accepting thread never waits on a client.
    let _ = conn.set_write_timeout(Some(std::time::Duration::from_millis(100)));
    let _ = crate::link::send_local(
        &mut conn,
        &proto::local::LocalMessage::Failed {
            message: why.to_string(),
            stats: Default::default(),
        },
    );
}
