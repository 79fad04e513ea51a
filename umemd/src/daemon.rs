//! The daemon's event loop: accepts VMM connections on the control socket and gives each its
//! own session thread, so one failing migration never stops another or the daemon.

use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::Path;

use log::{error, info, warn};
use mio::net::UnixListener;
use mio::{Events, Interest, Poll, Token};

use crate::session;

const LISTENER: Token = Token(0);

/// Binds the control socket: the one systemd passed (socket activation) or a new one at `path`.
pub fn bind(path: &Path) -> io::Result<StdUnixListener> {
    if let Some(fd) = activated_fd() {
        info!("using the control socket passed by systemd");
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
    // Only its owner may hand umemd a VM, whatever the umask (systemd's socket unit says
    // SocketMode itself); a client that got in anyway is checked by its credentials.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(l)
}

/// Root and umemd's own user may use it: the allow list of local clients.
pub fn client_allowed(conn: &std::os::unix::net::UnixStream) -> Result<(), String> {
    let cred = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("reading the client's credentials: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() == 0 || cred.uid() == me {
        Ok(())
    } else {
        Err(format!(
            "uid {} (pid {}) is not allowed to use umemd (only root and uid {me})",
            cred.uid(),
            cred.pid()
        ))
    }
}

fn activated_fd() -> Option<RawFd> {
    let fds = sd_notify::listen_fds().ok()?;
    let mut it = fds.into_iter();
    let fd = it.next()?;
    Some(fd)
}

/// Serves until the listener fails.
pub fn serve(listener: StdUnixListener) -> io::Result<()> {
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
                    Ok((conn, _)) => spawn_session(conn),
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

fn spawn_session(conn: mio::net::UnixStream) {
    // SAFETY: ownership of the fd moves from the mio stream to a std one.
    let conn = unsafe { std::os::unix::net::UnixStream::from_raw_fd(conn.into_raw_fd()) };
    if let Err(e) = conn.set_nonblocking(false) {
        warn!("session socket: {e}");
        return;
    }
    if let Err(e) = client_allowed(&conn) {
        warn!("refusing a local client: {e}");
        let mut conn = conn;
        let _ = crate::link::send_local(
            &mut conn,
            &proto::local::LocalMessage::Failed {
                message: e,
                stats: Default::default(),
            },
        );
        return;
    }
    let r = std::thread::Builder::new()
        .name("session".into())
        .spawn(move || {
            // A bug in one session must not take the daemon or other sessions down.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session::run(conn)))
                .is_err()
            {
                error!("a migration session panicked; other sessions continue");
            }
        });
    if let Err(e) = r {
        error!("starting a session thread: {e}");
    }
}
