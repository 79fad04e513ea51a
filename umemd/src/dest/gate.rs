//! The destination's door: a thread of its own accepts every connection to the listener, and
//! each connection authenticates ([`crate::auth::authenticate_source`]) and sends its first
//! frame in a thread of its own, under a deadline, before the session looks at it. A port
//! scan, garbage, a peer that trickles bytes or one without the secret is dropped, logged with
//! its address and counted, and the destination goes on listening for its source: no such peer
//! can spoil the migration or hold up the real source. Connections are admitted whatever the
//! session is doing meanwhile: a source authenticating its urgent channel gets its challenge
//! while the session still reads the main stream.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::warn;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use proto::auth::Secret;
use proto::peer::PeerMessage;

use crate::auth::{self, AuthError, PeerTrust};
use crate::link::{self, send_peer};
use crate::stream::{PeerListener, PeerStream};

/// How long a new connection has to authenticate and send its first frame.
pub(super) const ADMISSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections authenticating, or admitted and not yet taken, at once; more are dropped at
/// once, so that a flood costs at most this many threads and sockets.
pub(super) const MAX_PENDING: usize = 16;

/// A connection that authenticated, with its first frame.
pub(super) struct Admitted {
    pub(super) stream: PeerStream,
    /// The peer's address, for logs.
    pub(super) from: String,
    pub(super) first: PeerMessage,
}

/// What the acceptor and the admission threads share.
struct Door {
    vm: String,
    /// The secret to prove, and the TLS configuration every TCP connection must run (a client
    /// certificate of its CA).
    trust: PeerTrust<rustls::ServerConfig>,
    admitted: SyncSender<Admitted>,
    /// Connections between accept and being taken by the session.
    pending: AtomicUsize,
    /// Connections dropped so far.
    rejected: AtomicU64,
}

impl Door {
    fn reject(&self, from: &str, why: &str) {
        warn!("{}: dropped a connection from {from}: {why}", self.vm);
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Starts admitting `stream`, unless too many are pending already.
    fn admit(self: &Arc<Self>, stream: PeerStream, from: String) {
        if self.pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return self.reject(
                &from,
                &format!("{MAX_PENDING} connections are pending already"),
            );
        }
        let door = self.clone();
        let spawned = std::thread::Builder::new()
            .name("admission".into())
            .spawn(move || {
                let deadline = Instant::now() + ADMISSION_TIMEOUT;
                match admit(stream, &door.trust, deadline) {
                    Ok((stream, first)) => {
                        // Still pending until the session takes it; the channel holds at most
                        // MAX_PENDING, as `pending` does.
                        let _ = door.admitted.send(Admitted {
                            stream,
                            from,
                            first,
                        });
                    }
                    Err((stream, e)) => {
                        // The peer learns why: a source given the wrong secret says so to its
                        // operator. One that failed the TLS handshake got an alert instead, or,
                        // without TLS, a message in the plain protocol.
                        if let Some(stream) = stream {
                            turn_away(stream, &e.to_string());
                        }
                        door.reject(&from, &e.to_string());
                        door.pending.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            });
        if let Err(e) = spawned {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            self.reject("?", &format!("starting an admission thread: {e}"));
        }
    }
}

/// The door of one incoming migration.
pub(super) struct Gate {
    door: Arc<Door>,
    rx: Receiver<Admitted>,
    /// The thread accepting on the current listener, the listener, and the thread's stop flag.
    acceptor: Option<(Arc<PeerListener>, Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Gate {
    pub(super) fn new(vm: String, trust: PeerTrust<rustls::ServerConfig>) -> Self {
        let (admitted, rx) = mpsc::sync_channel(MAX_PENDING);
        Gate {
            door: Arc::new(Door {
                vm,
                trust,
                admitted,
                pending: AtomicUsize::new(0),
                rejected: AtomicU64::new(0),
            }),
            rx,
            acceptor: None,
        }
    }

    /// Accepts on `listener` from now on, instead of the previous one (which closes).
    pub(super) fn open(&mut self, listener: PeerListener) -> std::io::Result<()> {
        self.close();
        let stop = Arc::new(AtomicBool::new(false));
        let listener = Arc::new(listener);
        let (door, flag, l) = (self.door.clone(), stop.clone(), listener.clone());
        let handle = std::thread::Builder::new()
            .name("acceptor".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, from)) => door.admit(s, from),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            let mut fds = [PollFd::new(l.as_fd(), PollFlags::POLLIN)];
                            let _ = poll(&mut fds, PollTimeout::from(50u16));
                        }
                        Err(_) if flag.load(Ordering::Relaxed) => break,
                        Err(e) => {
                            // Out of fds, say: the listener itself is fine; try again soon.
                            warn!("{}: accepting: {e}", door.vm);
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })?;
        self.acceptor = Some((listener, stop, handle));
        Ok(())
    }

    /// Stops accepting; the listener closes. Shutting the listening socket down wakes the
    /// acceptor's `poll` at once, so that the address is free when this returns.
    fn close(&mut self) {
        if let Some((listener, stop, handle)) = self.acceptor.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = nix::sys::socket::shutdown(
                listener.as_fd().as_raw_fd(),
                nix::sys::socket::Shutdown::Both,
            );
            let _ = handle.join();
        }
    }

    /// How connections authenticate here.
    pub(super) fn trust(&self) -> &PeerTrust<rustls::ServerConfig> {
        &self.door.trust
    }

    /// Connections dropped so far.
    pub(super) fn rejected(&self) -> u64 {
        self.door.rejected.load(Ordering::Relaxed)
    }

    /// Drops an admitted connection that is not the one awaited, telling it why.
    pub(super) fn reject(&self, a: Admitted, why: &str) {
        turn_away(a.stream, why);
        self.door.reject(&a.from, why);
    }

    /// The next admitted connection, waiting up to `timeout`.
    pub(super) fn next(&self, timeout: Duration) -> Option<Admitted> {
        match self.rx.recv_timeout(timeout) {
            Ok(a) => {
                self.door.pending.fetch_sub(1, Ordering::SeqCst);
                Some(a)
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.close();
    }
}

/// Tells an authenticated peer why it is not the connection awaited, and drops it. A short
/// write timeout keeps a peer that reads nothing from holding the caller.
pub(super) fn turn_away(mut stream: PeerStream, why: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let _ = send_peer(&mut stream, &PeerMessage::Error(why.to_string()));
}

/// Runs TLS over a TCP connection when the destination has credentials, authenticates, then
/// reads the first frame, all before `deadline`. On failure, the stream to tell why, if there
/// is one to tell.
fn admit(
    stream: PeerStream,
    trust: &PeerTrust<rustls::ServerConfig>,
    deadline: Instant,
) -> Result<(PeerStream, PeerMessage), (Option<PeerStream>, AuthError)> {
    let mut stream = match &trust.tls {
        Some(config) => stream
            .upgrade(|tcp| crate::tls::accept(tcp, config.clone(), deadline))
            .map_err(|e| (None, e.into()))?,
        None => stream,
    };
    match opening(&mut stream, trust.secret.as_ref(), deadline) {
        Ok(first) => Ok((stream, first)),
        Err(e) if trust.tls.is_none() && speaks_tls(&e) => {
            Err((Some(stream), crate::tls::TlsError::TlsPeer.into()))
        }
        Err(e) => Err((Some(stream), e)),
    }
}

/// The authentication exchange and the first frame.
fn opening(
    stream: &mut PeerStream,
    secret: Option<&Secret>,
    deadline: Instant,
) -> Result<PeerMessage, AuthError> {
    auth::authenticate_source(stream, secret, deadline)?;
    let mut body = Vec::new();
    let p = link::read_frame_by(stream, &mut body, deadline, link::MAX_OPENING_FRAME).map_err(
        |err| AuthError::Read {
            context: "the first message",
            err,
        },
    )?;
    PeerMessage::decode(p.kind, &body).map_err(|err| AuthError::Malformed {
        context: "first message",
        err,
    })
}

/// Whether the first bytes a peer sent, read as a frame's length, start a TLS handshake
/// record (0x16 0x03): a TLS source at a destination without TLS.
fn speaks_tls(e: &AuthError) -> bool {
    let len = match e {
        AuthError::Read {
            err: link::ReadByError::TooLong { len, .. },
            ..
        }
        | AuthError::Read {
            err: link::ReadByError::Frame(proto::frame::FrameError::TooLarge(len)),
            ..
        } => *len,
        _ => return false,
    };
    len & 0xffff == 0x0316
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn trust(secret: Option<Secret>) -> PeerTrust<rustls::ServerConfig> {
        PeerTrust {
            secret,
            tls: None,
            insecure: false,
        }
    }

    fn gate(secret: Option<Secret>) -> (Gate, String) {
        let mut g = Gate::new("test".into(), trust(secret));
        let l = PeerListener::bind("tcp:127.0.0.1:0").unwrap();
        let uri = l.uri().unwrap();
        g.open(l).unwrap();
        (g, uri.trim_start_matches("tcp:").to_string())
    }

    fn connect(addr: &str) -> PeerStream {
        PeerStream::Tcp(std::net::TcpStream::connect(addr).unwrap())
    }

    fn wait_rejected(g: &Gate, n: u64) {
        let t = Instant::now();
        while g.rejected() < n {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{} rejected",
                g.rejected()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_peer_that_authenticates_is_admitted_with_its_first_frame() {
        let k = Secret::new(b"a-secret-of-this-migration".to_vec()).unwrap();
        let (g, addr) = gate(Some(k.clone()));
        let mut a = connect(&addr);
        auth::authenticate_to_destination(
            &mut a,
            Some(&k),
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        send_peer(&mut a, &PeerMessage::UrgentChannel { session_id: 7 }).unwrap();
        let adm = g.next(Duration::from_secs(5)).expect("admitted");
        assert_eq!(adm.first, PeerMessage::UrgentChannel { session_id: 7 });
        assert_eq!(g.rejected(), 0);
    }

    #[test]
    fn garbage_is_rejected_and_told_why() {
        let (g, addr) = gate(None);
        let mut a = std::net::TcpStream::connect(&addr).unwrap();
        a.write_all(&[0x10, 0, 0, 0, 0x04]).unwrap();
        a.write_all(&[0xee; 16]).unwrap();
        wait_rejected(&g, 1);
        assert!(g.next(Duration::from_millis(50)).is_none());
        let mut got = Vec::new();
        let _ = a.read_to_end(&mut got);
        assert!(!got.is_empty(), "the peer is told why");
    }

    #[test]
    fn closing_frees_the_address_at_once() {
        for uri in ["tcp:127.0.0.1:0", "unix:/tmp/umemd-gate-test.sock"] {
            let _ = std::fs::remove_file("/tmp/umemd-gate-test.sock");
            let mut g = Gate::new("test".into(), trust(None));
            let l = PeerListener::bind(uri).unwrap();
            let bound = l.uri().unwrap();
            g.open(l).unwrap();
            let t = Instant::now();
            drop(g);
            assert!(
                t.elapsed() < Duration::from_millis(40),
                "{uri}: {:?}",
                t.elapsed()
            );
            // The same address binds again.
            drop(PeerListener::bind(&bound).unwrap());
        }
    }

    #[test]
    fn a_flood_is_bounded_and_its_places_come_back() {
        let (g, addr) = gate(None);
        let keep: Vec<_> = (0..MAX_PENDING)
            .map(|_| std::net::TcpStream::connect(&addr).unwrap())
            .collect();
        // Wait until all are pending, then one more is turned away at once.
        let t = Instant::now();
        while g.door.pending.load(Ordering::SeqCst) < MAX_PENDING {
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
        let _extra = std::net::TcpStream::connect(&addr).unwrap();
        wait_rejected(&g, 1);
        // Closing the waiting peers frees their places.
        drop(keep);
        wait_rejected(&g, 1 + MAX_PENDING as u64);
        let mut a = connect(&addr);
        auth::authenticate_to_destination(&mut a, None, Instant::now() + Duration::from_secs(5))
            .unwrap();
        send_peer(&mut a, &PeerMessage::Resumed).unwrap();
        assert!(g.next(Duration::from_secs(5)).is_some());
    }
}
