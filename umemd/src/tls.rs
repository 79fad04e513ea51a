//! TLS 1.3 on the TCP connections between two umemds, with x509 certificates on both sides: the
//! destination requires a client certificate signed by the CA, the source checks the
//! destination's certificate against the CA and the host of its `tcp:HOST:PORT` address.
//!
//! The rest of umemd treats a connection as a plain socket: it clones it for a reader and a
//! writer thread, sets socket timeouts, shuts it down, and writes guest pages with `writev` on
//! its descriptor. Kernel TLS would keep all of that working but is not available everywhere,
//! so each TLS connection gets a *pump*: once the handshake is over, umemd holds one end of a
//! Unix socket pair ([`TlsStream`]), and a thread of the connection's own moves bytes between
//! the other end and the TCP socket, encrypting what umemd writes and decrypting what arrives.
//! A closed, reset or timed-out TCP connection closes umemd's end; umemd closing or shutting
//! down its end ends the TLS session (`close_notify`) and the TCP connection.
//!
//! `unix:` addresses stay plain: both ends are on one host, guarded by file permissions.
//!
//! Credentials come from a directory laid out like QEMU's `tls-creds-x509`: `ca-cert.pem`,
//! `server-cert.pem` and `server-key.pem` (destination), `client-cert.pem` and
//! `client-key.pem` (source).

use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use log::{debug, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use proto::peer::PeerMessage;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};

use crate::stream::Endpoint;

/// The CA that signs both sides' certificates.
pub const CA_CERT: &str = "ca-cert.pem";
/// The destination's certificate (chain), and its key.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The destination's private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The source's certificate (chain).
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The source's private key.
pub const CLIENT_KEY: &str = "client-key.pem";

/// Socket buffers of the pair between umemd and a pump, both ways: deep enough that the pump
/// never waits for umemd nor umemd for the pump while pages stream.
const PAIR_BUFFER: usize = 4 << 20;
/// Bytes moved per read, each way.
const CHUNK: usize = 64 << 10;
/// How long a pump whose umemd end is gone still tries to deliver what umemd wrote last (an
/// error message, say) before it drops the connection.
const LINGER: Duration = Duration::from_secs(2);

/// Why TLS credentials cannot be used, or a TLS connection did not come up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file is missing or unreadable.
    #[error("TLS credentials: {path}: {err}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        err: io::Error,
    },
    /// A private key that others may read.
    #[error("TLS credentials: {path} is readable by group or others (mode {mode:03o}): a private key must be readable by its owner only (chmod 600)")]
    KeyExposed {
        /// The key file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// A file holds no usable certificate or key.
    #[error("TLS credentials: {path}: {what}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong with it.
        what: String,
    },
    /// The certificates and keys do not make a configuration (a key that is not the
    /// certificate's, say).
    #[error("TLS credentials in {dir}: {err}")]
    Config {
        /// The credentials directory.
        dir: String,
        /// rustls's reason.
        err: String,
    },
    /// The address has no host to check the destination's certificate against.
    #[error("TLS: \"{0}\" is not a host name or IP address to check the destination's certificate against")]
    ServerName(String),
    /// The handshake took longer than its deadline.
    #[error("TLS handshake: no answer within the deadline")]
    Timeout,
    /// The peer closed the connection during the handshake.
    #[error("TLS handshake: the peer closed the connection")]
    Closed,
    /// The handshake failed: a certificate that does not verify, an alert from the peer.
    #[error("TLS handshake: {0}")]
    Handshake(#[source] rustls::Error),
    /// Reading or writing the TCP connection failed.
    #[error("TLS handshake: {0}")]
    Io(#[source] io::Error),
    /// The destination answered in plain umem protocol: it was given no TLS credentials.
    #[error("the destination does not use TLS (it has no TLS credentials) but this migration does: {said}")]
    PlainDestination {
        /// What the destination said, or that it said nothing of use.
        said: String,
    },
    /// A TLS source at a destination without TLS.
    #[error("the peer uses TLS and this destination has no TLS credentials")]
    TlsPeer,
    /// The source did not start a TLS handshake.
    #[error("this destination requires TLS (it has TLS credentials) and the peer does not use it")]
    PlainPeer,
    /// The socket pair or the pump thread could not be made.
    #[error("starting the TLS pump: {0}")]
    Pump(#[source] io::Error),
}

/// The credentials directory every session uses when its VMM gave none (`umemd --tls-creds`).
static HOST_CREDS: OnceLock<PathBuf> = OnceLock::new();

/// Sets the host-wide credentials directory, once, at start-up.
pub fn set_host_creds(dir: PathBuf) {
    let _ = HOST_CREDS.set(dir);
}

/// The credentials directory a session uses: its own, else the host's.
pub fn session_creds(own: Option<&str>) -> Option<PathBuf> {
    own.map(PathBuf::from).or_else(|| HOST_CREDS.get().cloned())
}

fn read_file(dir: &Path, name: &str, private: bool) -> Result<Vec<u8>, TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    let shown = path.display().to_string();
    let read_err = |err| TlsError::Read {
        path: shown.clone(),
        err,
    };
    if private {
        let mode = std::fs::metadata(&path)
            .map_err(read_err)?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsError::KeyExposed { path: shown, mode });
        }
    }
    std::fs::read(&path).map_err(read_err)
}

fn certs(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(dir, name, false)?;
    let bad = |what: String| TlsError::Pem {
        path: dir.join(name).display().to_string(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            "no certificate in it (expected PEM \"BEGIN CERTIFICATE\")".into(),
        ));
    }
    Ok(certs)
}

fn key(dir: &Path, name: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(dir, name, true)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: dir.join(name).display().to_string(),
        what: format!("no private key in it (expected PEM PKCS#8, PKCS#1 or SEC1): {e}"),
    })
}

fn roots(dir: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(dir, CA_CERT)? {
        roots.add(c).map_err(|e| TlsError::Pem {
            path: dir.join(CA_CERT).display().to_string(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_error(dir: &Path, err: impl std::fmt::Display) -> TlsError {
    TlsError::Config {
        dir: dir.display().to_string(),
        err: err.to_string(),
    }
}

/// The source's side: the CA and `client-cert.pem`/`client-key.pem` of `dir`.
pub fn client_config(dir: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = roots(dir)?;
    let (certs, key) = (certs(dir, CLIENT_CERT)?, key(dir, CLIENT_KEY)?);
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config_error(dir, e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| config_error(dir, e))?;
    // Every connection proves its certificates anew: connections are few and long-lived.
    c.resumption = Resumption::disabled();
    Ok(Arc::new(c))
}

/// The destination's side: the CA (which must have signed every client certificate) and
/// `server-cert.pem`/`server-key.pem` of `dir`.
pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(dir)?), provider())
        .build()
        .map_err(|e| config_error(dir, e))?;
    let (certs, key) = (certs(dir, SERVER_CERT)?, key(dir, SERVER_KEY)?);
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config_error(dir, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| config_error(dir, e))?;
    c.send_tls13_tickets = 0;
    Ok(Arc::new(c))
}

/// The name the destination's certificate must carry: the host of `tcp:HOST:PORT`.
pub fn server_name(uri: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match Endpoint::parse(uri) {
        Ok(Endpoint::Tcp(addr)) => addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string()),
        _ => None,
    };
    host.and_then(|h| ServerName::try_from(h).ok())
        .ok_or_else(|| TlsError::ServerName(uri.to_string()))
}

/// One end of a TLS connection as umemd uses it: a Unix socket whose other end the pump
/// serves, and the TCP socket beneath, for its options.
#[derive(Debug)]
pub struct TlsStream {
    /// umemd's end of the pair.
    pub(crate) local: UnixStream,
    /// The pump's end (owned by the pump; here for its buffer size).
    pump_end: Arc<UnixStream>,
    /// The TCP connection (owned by the pump; here for its options).
    pub(crate) tcp: Arc<TcpStream>,
}

impl TlsStream {
    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(TlsStream {
            local: self.local.try_clone()?,
            pump_end: self.pump_end.clone(),
            tcp: self.tcp.clone(),
        })
    }

    /// Bytes umemd may have written that the pump has not taken: its end's send buffer, and the
    /// TCP send buffer beneath.
    pub fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        use nix::sys::socket::{setsockopt, sockopt};
        setsockopt(&self.local, sockopt::SndBuf, &bytes)
            .and_then(|()| setsockopt(&*self.tcp, sockopt::SndBuf, &bytes))
            .map_err(io::Error::from)
    }

    /// Bytes that may wait for umemd to read them: the TCP receive buffer, and what the pump
    /// may have decrypted ahead (its end's send buffer).
    pub fn set_recv_buffer(&self, bytes: usize) -> io::Result<()> {
        use nix::sys::socket::{setsockopt, sockopt};
        setsockopt(&*self.pump_end, sockopt::SndBuf, &bytes)
            .and_then(|()| setsockopt(&*self.tcp, sockopt::RcvBuf, &bytes))
            .map_err(io::Error::from)
    }
}

/// Source side: runs the TLS handshake on `tcp` before `deadline`, checking the destination's
/// certificate against `name`, and starts the pump.
pub fn connect(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    deadline: Instant,
) -> Result<TlsStream, TlsError> {
    let conn = ClientConnection::new(config, name).map_err(TlsError::Handshake)?;
    start(tcp, Connection::Client(conn), deadline)
}

/// Destination side: runs the TLS handshake on an accepted `tcp` before `deadline`, requiring a
/// client certificate of the CA, and starts the pump. A peer that speaks no TLS is told so in
/// plain umem protocol, which is what it understands.
pub fn accept(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    deadline: Instant,
) -> Result<TlsStream, TlsError> {
    let conn = rustls::ServerConnection::new(config).map_err(TlsError::Handshake)?;
    let told = tcp.try_clone();
    match start(tcp, Connection::Server(conn), deadline) {
        Err(e @ TlsError::PlainPeer) => {
            if let Ok(mut t) = told {
                let _ = t.set_nonblocking(false);
                let _ = t.set_write_timeout(Some(Duration::from_millis(200)));
                let mut buf = Vec::new();
                PeerMessage::Error(e.to_string()).encode(&mut buf);
                let _ = t.write_all(&buf);
            }
            Err(e)
        }
        other => other,
    }
}

fn start(tcp: TcpStream, mut conn: Connection, deadline: Instant) -> Result<TlsStream, TlsError> {
    tcp.set_nonblocking(true).map_err(TlsError::Io)?;
    let early = handshake(&mut conn, &tcp, deadline)?;
    let (local, pump_end) = UnixStream::pair().map_err(TlsError::Pump)?;
    for s in [&local, &pump_end] {
        use nix::sys::socket::{setsockopt, sockopt};
        // Best effort: the system's maximum may be lower.
        let _ = setsockopt(s, sockopt::SndBuf, &PAIR_BUFFER);
        let _ = setsockopt(s, sockopt::RcvBuf, &PAIR_BUFFER);
    }
    pump_end.set_nonblocking(true).map_err(TlsError::Pump)?;
    let tcp = Arc::new(tcp);
    let pump_end = Arc::new(pump_end);
    let mut pump = Pump::new(conn, tcp.clone(), pump_end.clone(), early);
    std::thread::Builder::new()
        .name("tls-pump".into())
        .spawn(move || pump.run())
        .map_err(TlsError::Pump)?;
    Ok(TlsStream {
        local,
        pump_end,
        tcp,
    })
}

/// Whether `b` can start a TLS record (change_cipher_spec, alert, handshake, application data).
fn is_tls_record_type(b: u8) -> bool {
    (0x14..=0x17).contains(&b)
}

/// Waits until `fd` is ready for `events`, or fails with [`TlsError::Timeout`] at `deadline`.
fn wait(fd: &impl AsFd, events: PollFlags, deadline: Instant) -> Result<(), TlsError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(TlsError::Timeout);
    }
    let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd.as_fd(), events)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(TlsError::Io(e.into())),
    }
}

/// Writes everything rustls has queued, before `deadline`.
fn flush_tls(conn: &mut Connection, tcp: &TcpStream, deadline: Instant) -> Result<(), TlsError> {
    while conn.wants_write() {
        match conn.write_tls(&mut &*tcp) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(tcp, PollFlags::POLLOUT, deadline)?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TlsError::Io(e)),
        }
    }
    Ok(())
}

/// Runs the handshake on the non-blocking `tcp`, all of it before `deadline`. Returns the
/// application data that came in the same reads as the handshake's end.
fn handshake(
    conn: &mut Connection,
    tcp: &TcpStream,
    deadline: Instant,
) -> Result<Vec<u8>, TlsError> {
    let mut buf = vec![0u8; 16 << 10];
    // The peer's first bytes, to tell a peer that speaks no TLS.
    let mut first = Vec::new();
    let mut early = Vec::new();
    loop {
        flush_tls(conn, tcp, deadline)?;
        if !conn.is_handshaking() {
            return Ok(early);
        }
        let n = match (&*tcp).read(&mut buf) {
            Ok(0) if first.is_empty() => return Err(TlsError::Closed),
            Ok(0) => return Err(not_tls(conn, &first, tcp, deadline).unwrap_or(TlsError::Closed)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(tcp, PollFlags::POLLIN, deadline)?;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(TlsError::Io(e)),
        };
        if first.len() < 512 {
            first.extend_from_slice(&buf[..n.min(512 - first.len())]);
        }
        let mut data = &buf[..n];
        while !data.is_empty() {
            let fed = conn.read_tls(&mut data);
            let processed = fed
                .map_err(|e| rustls::Error::General(e.to_string()))
                .and_then(|_| conn.process_new_packets());
            if let Err(e) = processed {
                if let Some(plain) = not_tls(conn, &first, tcp, deadline) {
                    return Err(plain);
                }
                // The alert that says why, if rustls queued one.
                let _ = flush_tls(conn, tcp, deadline);
                return Err(TlsError::Handshake(e));
            }
            drain_plaintext(conn, &mut early);
        }
    }
}

/// When the peer's first bytes are no TLS record: the error that says the peer speaks plain
/// umem protocol, with what a destination said (it turns away a TLS source with an `Error`
/// frame, which is read to its end here).
fn not_tls(
    conn: &Connection,
    first: &[u8],
    tcp: &TcpStream,
    deadline: Instant,
) -> Option<TlsError> {
    if first.first().is_none_or(|b| is_tls_record_type(*b)) {
        return None;
    }
    if matches!(conn, Connection::Server(_)) {
        return Some(TlsError::PlainPeer);
    }
    let mut got = first.to_vec();
    let mut buf = [0u8; 1024];
    let said = loop {
        if let Ok(Some((p, body, _))) = proto::frame::split(&got) {
            break match PeerMessage::decode(p.kind, body) {
                Ok(PeerMessage::Error(m)) => m,
                _ => "it answered in plain umem protocol".to_string(),
            };
        }
        if got.len() > 4096 || wait(tcp, PollFlags::POLLIN, deadline).is_err() {
            break "it answered with no TLS record".to_string();
        }
        match (&*tcp).read(&mut buf) {
            Ok(0) => break "it answered with no TLS record and closed the connection".to_string(),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break format!("it answered with no TLS record ({e})"),
        }
    };
    Some(TlsError::PlainDestination { said })
}

/// Moves whatever rustls decrypted into `out`.
fn drain_plaintext(conn: &mut Connection, out: &mut Vec<u8>) {
    let mut r = conn.reader();
    let mut buf = [0u8; 16 << 10];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// The thread between umemd's end of the pair and the TCP connection.
struct Pump {
    conn: Connection,
    tcp: Arc<TcpStream>,
    local: Arc<UnixStream>,
    /// Ciphertext read from TCP: buffer, and the part rustls has not taken yet.
    tls_in: Vec<u8>,
    tls_in_at: (usize, usize),
    /// Plaintext for umemd, and how much of it went.
    plain_in: Vec<u8>,
    plain_in_at: usize,
    /// Plaintext from umemd.
    plain_out: Vec<u8>,
    /// umemd will write no more.
    local_eof: bool,
    /// The peer will send no more (close_notify, or the TCP connection closed).
    tcp_eof: bool,
    /// The TCP write side is shut.
    tcp_shut: bool,
    /// Something reached umemd already: a failure from now on cannot be told as a message.
    delivered: bool,
}

/// How a pump ends.
enum PumpEnd {
    /// Both ways are done.
    Done,
    /// The connection failed; umemd sees its end close.
    Failed(String),
}

impl Pump {
    fn new(conn: Connection, tcp: Arc<TcpStream>, local: Arc<UnixStream>, early: Vec<u8>) -> Self {
        let mut conn = conn;
        // The pump bounds what waits in each direction itself.
        conn.set_buffer_limit(None);
        Pump {
            conn,
            tcp,
            local,
            tls_in: vec![0u8; CHUNK],
            tls_in_at: (0, 0),
            plain_in: early,
            plain_in_at: 0,
            plain_out: vec![0u8; CHUNK],
            local_eof: false,
            tcp_eof: false,
            tcp_shut: false,
            delivered: false,
        }
    }

    fn run(&mut self) {
        let end = self.pump();
        if let PumpEnd::Failed(why) = &end {
            debug!("TLS connection ends: {why}");
            // A refusal before anything reached umemd (the destination rejected this host's
            // certificate, say) goes to umemd as the destination's error, which it reports.
            if !self.delivered {
                let mut buf = Vec::new();
                PeerMessage::Error(format!("TLS: {why}")).encode(&mut buf);
                let _ = self.local.set_nonblocking(false);
                let _ = self
                    .local
                    .set_write_timeout(Some(Duration::from_millis(200)));
                let _ = (&*self.local).write_all(&buf);
            }
        }
        let _ = self.tcp.shutdown(Shutdown::Both);
        let _ = self.local.shutdown(Shutdown::Both);
    }

    fn pump(&mut self) -> PumpEnd {
        let mut linger_until: Option<Instant> = None;
        loop {
            let mut progress = false;
            // Out: what rustls holds goes first, then more from umemd.
            let out_blocked = match self.flush_out() {
                Ok(blocked) => blocked,
                Err(e) => return PumpEnd::Failed(format!("sending: {e}")),
            };
            if !out_blocked && !self.local_eof {
                match (&*self.local).read(&mut self.plain_out) {
                    Ok(0) => {
                        self.local_eof = true;
                        self.conn.send_close_notify();
                        progress = true;
                    }
                    Ok(n) => {
                        if let Err(e) = self.conn.writer().write_all(&self.plain_out[..n]) {
                            return PumpEnd::Failed(format!("encrypting: {e}"));
                        }
                        progress = true;
                    }
                    Err(e) if retry(&e) => {}
                    Err(e) => return PumpEnd::Failed(format!("reading from umemd: {e}")),
                }
            }
            if self.local_eof && !out_blocked && !self.conn.wants_write() && !self.tcp_shut {
                let _ = self.tcp.shutdown(Shutdown::Write);
                self.tcp_shut = true;
            }
            // In: plaintext waiting for umemd first, then more from the peer.
            let in_drained = match self.receive() {
                Ok((p, drained)) => {
                    progress |= p;
                    drained
                }
                Err(e) => return PumpEnd::Failed(e),
            };
            if self.tcp_eof && in_drained {
                // The peer is done: umemd reads the end of the stream.
                let _ = self.local.shutdown(Shutdown::Write);
            }
            if self.local_eof && self.tcp_shut && self.tcp_eof && in_drained {
                return PumpEnd::Done;
            }
            if progress {
                continue;
            }
            // Nothing moved: wait for either socket.
            let local_gone = self.local_eof && self.local_hung_up();
            if local_gone {
                // umemd neither reads nor writes any more: deliver what it wrote last, briefly.
                let until = *linger_until.get_or_insert_with(|| Instant::now() + LINGER);
                if self.tcp_shut || Instant::now() >= until {
                    return PumpEnd::Done;
                }
            }
            let mut local_ev = PollFlags::empty();
            if !out_blocked && !self.local_eof {
                local_ev |= PollFlags::POLLIN;
            }
            if !in_drained {
                local_ev |= PollFlags::POLLOUT;
            }
            let mut tcp_ev = PollFlags::empty();
            if out_blocked {
                tcp_ev |= PollFlags::POLLOUT;
            }
            if in_drained && !self.tcp_eof {
                tcp_ev |= PollFlags::POLLIN;
            }
            let mut fds = [
                PollFd::new(self.local.as_fd(), local_ev),
                PollFd::new(self.tcp.as_fd(), tcp_ev),
            ];
            let timeout = if local_gone { 50u16 } else { 1000u16 };
            match poll(&mut fds, PollTimeout::from(timeout)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return PumpEnd::Failed(format!("poll: {e}")),
            }
            let tcp_rev = fds[1].revents().unwrap_or(PollFlags::empty());
            if tcp_rev.contains(PollFlags::POLLERR) {
                // A reset or TCP_USER_TIMEOUT: the next read or write says which.
                if let Some(e) = self.tcp.take_error().ok().flatten() {
                    return PumpEnd::Failed(format!("TCP connection: {e}"));
                }
            }
        }
    }

    /// Whether umemd's end has shut down both ways (or is closed).
    fn local_hung_up(&self) -> bool {
        let mut fds = [PollFd::new(self.local.as_fd(), PollFlags::empty())];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
            && fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLHUP))
    }

    /// Writes queued ciphertext to TCP; true when TCP would block with some still queued.
    fn flush_out(&mut self) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut &*self.tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Writes decrypted plaintext to umemd's end: what came with the handshake, then what
    /// rustls holds, straight from its buffer. Returns whether some went, and whether all did.
    fn deliver_in(&mut self) -> Result<(bool, bool), String> {
        let mut progress = false;
        while self.plain_in_at < self.plain_in.len() {
            match (&*self.local).write(&self.plain_in[self.plain_in_at..]) {
                Ok(n) => {
                    self.plain_in_at += n;
                    self.delivered = true;
                    progress = true;
                }
                Err(e) if retry(&e) => return Ok((progress, false)),
                Err(e) => return Err(format!("writing to umemd: {e}")),
            }
        }
        loop {
            let mut r = self.conn.reader();
            let chunk = match r.fill_buf() {
                Ok(c) if !c.is_empty() => c,
                // Nothing decrypted is waiting (or the peer closed, which `receive` notes).
                _ => return Ok((progress, true)),
            };
            match (&*self.local).write(chunk) {
                Ok(n) => {
                    r.consume(n);
                    self.delivered = true;
                    progress = true;
                }
                Err(e) if retry(&e) => return Ok((progress, false)),
                Err(e) => return Err(format!("writing to umemd: {e}")),
            }
        }
    }

    /// Delivers decrypted plaintext, then decrypts more, a record at a time, reading TCP once
    /// when everything read so far went. Returns whether anything moved, and whether nothing
    /// waits for umemd any more.
    fn receive(&mut self) -> Result<(bool, bool), String> {
        let mut progress = false;
        let mut read_tcp = false;
        loop {
            let (p, drained) = self.deliver_in()?;
            progress |= p;
            if !drained || self.tcp_eof {
                return Ok((progress, drained));
            }
            if self.tls_in_at.0 == self.tls_in_at.1 {
                if read_tcp {
                    // Give the other direction a turn.
                    return Ok((progress, true));
                }
                read_tcp = true;
                match (&*self.tcp).read(&mut self.tls_in) {
                    Ok(0) => {
                        self.tcp_eof = true;
                        return Ok((true, true));
                    }
                    Ok(n) => self.tls_in_at = (0, n),
                    Err(e) if retry(&e) => return Ok((progress, true)),
                    Err(e) => return Err(format!("TCP connection: {e}")),
                }
            }
            // rustls takes at most a few KiB per call and decrypts every whole record it holds;
            // its plaintext is delivered before it takes more.
            let (from, to) = self.tls_in_at;
            let mut data = &self.tls_in[from..to];
            let taken = match self.conn.read_tls(&mut data) {
                Ok(n) => n,
                Err(e) => return Err(format!("receiving: {e}")),
            };
            self.tls_in_at.0 += taken;
            progress = true;
            match self.conn.process_new_packets() {
                Ok(state) if state.peer_has_closed() => self.tcp_eof = true,
                Ok(_) => {}
                Err(e) => {
                    // Tell the peer why (an alert), as far as it still listens.
                    let _ = self.flush_out();
                    let peer = match self.conn {
                        Connection::Client(_) => "the destination",
                        Connection::Server(_) => "the source",
                    };
                    return Err(match e {
                        rustls::Error::AlertReceived(a) => {
                            format!("{peer} refused the connection (alert {a:?})")
                        }
                        e => format!("from {peer}: {e}"),
                    });
                }
            }
        }
    }
}

/// Whether an I/O error on a non-blocking socket means "try again later".
fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Loads the credentials of `dir` for both roles, for `umemd --tls-creds` at start-up: an error
/// for a role is a warning (a host may only ever send or only receive), an error for both is
/// the first error.
pub fn check_host_creds(dir: &Path) -> Result<(), TlsError> {
    match (client_config(dir), server_config(dir)) {
        (Ok(_), Ok(_)) => Ok(()),
        (Err(e), Ok(_)) => {
            warn!("{e}: this host cannot send a migration over TLS");
            Ok(())
        }
        (Ok(_), Err(e)) => {
            warn!("{e}: this host cannot receive a migration over TLS");
            Ok(())
        }
        (Err(e), Err(_)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::fs::PermissionsExt;
    use std::thread::JoinHandle;

    use umem_testkit::tls::make_creds;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("umemd-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    /// A TLS pair over loopback TCP: (source end, destination end).
    fn pair(client_dir: &Path, server_dir: &Path) -> (TlsStream, TlsStream) {
        let (c, s) = try_pair(client_dir, server_dir, "127.0.0.1");
        (c.unwrap(), s.unwrap())
    }

    fn try_pair(
        client_dir: &Path,
        server_dir: &Path,
        name: &str,
    ) -> (Result<TlsStream, TlsError>, Result<TlsStream, TlsError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = server_config(server_dir).unwrap();
        let dest = std::thread::spawn(move || accept(l.accept().unwrap().0, server, deadline()));
        let name = ServerName::try_from(name.to_string()).unwrap();
        let c = connect(
            TcpStream::connect(addr).unwrap(),
            client_config(client_dir).unwrap(),
            name,
            deadline(),
        );
        (c, dest.join().unwrap())
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Writes `data` on one handle and reads as much on a clone, in two threads.
    fn send_and_receive(
        mut w: UnixStream,
        mut r: UnixStream,
        data: Vec<u8>,
    ) -> (JoinHandle<()>, JoinHandle<Vec<u8>>) {
        let len = data.len();
        let writer = std::thread::spawn(move || w.write_all(&data).unwrap());
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; len];
            r.read_exact(&mut got).unwrap();
            got
        });
        (writer, reader)
    }

    #[test]
    fn credentials_load_and_each_bad_file_is_named() {
        let dir = make_creds(&temp("creds"), &["127.0.0.1"]);
        assert!(client_config(&dir).is_ok());
        assert!(server_config(&dir).is_ok());
        assert!(check_host_creds(&dir).is_ok());

        // A key others can read.
        let key = dir.join(CLIENT_KEY);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = client_config(&dir).unwrap_err();
        assert!(matches!(e, TlsError::KeyExposed { .. }), "{e}");
        assert!(e.to_string().contains("client-key.pem"), "{e}");
        // The destination's side does not need the client's key.
        assert!(server_config(&dir).is_ok());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

        // A missing file, an unreadable one, and one that holds no certificate.
        std::fs::rename(dir.join(SERVER_CERT), dir.join("moved.pem")).unwrap();
        let e = server_config(&dir).unwrap_err();
        assert!(
            matches!(&e, TlsError::Read { path, .. } if path.ends_with("server-cert.pem")),
            "{e}"
        );
        std::fs::write(dir.join(SERVER_CERT), "not a certificate\n").unwrap();
        let e = server_config(&dir).unwrap_err();
        assert!(matches!(&e, TlsError::Pem { path, .. } if path.ends_with("server-cert.pem")));
        // A key that is not the certificate's.
        std::fs::rename(dir.join("moved.pem"), dir.join(SERVER_CERT)).unwrap();
        std::fs::copy(dir.join(CLIENT_KEY), dir.join(SERVER_KEY)).unwrap();
        let e = server_config(&dir).unwrap_err();
        assert!(matches!(e, TlsError::Config { .. }), "{e}");
        // Neither role loads: the host directory is refused.
        assert!(check_host_creds(&temp("nowhere")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn server_names_come_from_the_uri() {
        assert!(server_name("tcp:127.0.0.1:4444").is_ok());
        assert!(server_name("tcp:[::1]:4444").is_ok());
        assert!(server_name("tcp:dest.example:4444").is_ok());
        assert!(matches!(
            server_name("unix:/run/x.sock"),
            Err(TlsError::ServerName(_))
        ));
    }

    #[test]
    fn the_pump_carries_megabytes_both_ways_at_once() {
        let dir = make_creds(&temp("echo"), &["127.0.0.1"]);
        let (c, s) = pair(&dir, &dir);
        let up = pattern(6 << 20, 1);
        let down = pattern(5 << 20, 2);
        let (w1, r1) = send_and_receive(
            c.local.try_clone().unwrap(),
            s.local.try_clone().unwrap(),
            up.clone(),
        );
        let (w2, r2) = send_and_receive(
            s.local.try_clone().unwrap(),
            c.local.try_clone().unwrap(),
            down.clone(),
        );
        w1.join().unwrap();
        w2.join().unwrap();
        assert!(r1.join().unwrap() == up, "source to destination differs");
        assert!(r2.join().unwrap() == down, "destination to source differs");
        // Closing one end ends the stream on the other after what was written.
        let mut cl = c.local.try_clone().unwrap();
        cl.write_all(b"last words").unwrap();
        drop(cl);
        drop(c);
        let mut rest = Vec::new();
        let mut sl = s.local.try_clone().unwrap();
        sl.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        sl.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"last words");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_peer_gone_mid_stream_closes_the_local_end() {
        let dir = make_creds(&temp("cut"), &["127.0.0.1"]);
        let (c, s) = pair(&dir, &dir);
        let mut cl = c.local.try_clone().unwrap();
        cl.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        cl.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        (&s.local).write_all(&pattern(1 << 20, 3)[..]).unwrap();
        let mut got = vec![0u8; 100 << 10];
        cl.read_exact(&mut got).unwrap();
        // The destination's TCP connection goes away under its pump, mid-stream.
        s.tcp.shutdown(Shutdown::Both).unwrap();
        let t = Instant::now();
        let mut sink = vec![0u8; 1 << 20];
        loop {
            match cl.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => panic!("expected the end of the stream, got {e}"),
            }
        }
        // And the source's writes fail rather than vanish.
        let chunk = pattern(1 << 20, 4);
        let failed = (0..64).any(|_| cl.write_all(&chunk).is_err());
        assert!(failed, "writes to a dead connection kept succeeding");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_certificate_of_another_ca_or_name_is_refused() {
        let ours = make_creds(&temp("ours"), &["127.0.0.1"]);
        let theirs = make_creds(&temp("theirs"), &["127.0.0.1"]);
        // A source whose client certificate another CA signed.
        let foreign = temp("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::copy(ours.join(CA_CERT), foreign.join(CA_CERT)).unwrap();
        std::fs::copy(theirs.join(CLIENT_CERT), foreign.join(CLIENT_CERT)).unwrap();
        std::fs::copy(theirs.join(CLIENT_KEY), foreign.join(CLIENT_KEY)).unwrap();
        let (c, s) = try_pair(&foreign, &ours, "127.0.0.1");
        let e = s.unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
        // The source finished its half; its first read says the destination refused.
        let mut cl = c.unwrap().local;
        cl.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut body = Vec::new();
        let p = proto::frame::read(&mut cl, &mut body).unwrap();
        let m = PeerMessage::decode(p.kind, &body).unwrap();
        assert!(
            matches!(&m, PeerMessage::Error(e) if e.starts_with("TLS:")),
            "{m:?}"
        );
        // A destination whose certificate another CA signed, or for another name.
        let (c, _) = try_pair(&ours, &theirs, "127.0.0.1");
        assert!(matches!(c, Err(TlsError::Handshake(_))), "{c:?}");
        let (c, _) = try_pair(&ours, &ours, "elsewhere.example");
        let e = c.unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
        for d in [ours, theirs, foreign] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn a_plain_peer_on_either_side_is_told_apart() {
        let dir = make_creds(&temp("plain"), &["127.0.0.1"]);
        // A plain source at a TLS destination: refused, and told so in plain protocol.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = server_config(&dir).unwrap();
        let dest = std::thread::spawn(move || accept(l.accept().unwrap().0, server, deadline()));
        let mut plain = TcpStream::connect(addr).unwrap();
        plain
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut hello = Vec::new();
        PeerMessage::Heartbeat.encode(&mut hello);
        plain.write_all(&hello).unwrap();
        assert!(matches!(dest.join().unwrap(), Err(TlsError::PlainPeer)));
        let mut body = Vec::new();
        let p = proto::frame::read(&mut plain, &mut body).unwrap();
        let m = PeerMessage::decode(p.kind, &body).unwrap();
        assert!(
            matches!(&m, PeerMessage::Error(e) if e.contains("requires TLS")),
            "{m:?}"
        );
        // A TLS source at a plain destination, which answers in plain protocol.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let dest = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = Vec::new();
            PeerMessage::Error("no TLS here".into()).encode(&mut buf);
            s.write_all(&buf).unwrap();
        });
        let c = connect(
            TcpStream::connect(addr).unwrap(),
            client_config(&dir).unwrap(),
            ServerName::try_from("127.0.0.1").unwrap(),
            deadline(),
        );
        dest.join().unwrap();
        let e = c.unwrap_err();
        assert!(
            matches!(&e, TlsError::PlainDestination { said } if said == "no TLS here"),
            "{e}"
        );
        // Silence is bounded by the deadline.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let silent = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let t = Instant::now();
        let r = connect(
            silent,
            client_config(&dir).unwrap(),
            ServerName::try_from("127.0.0.1").unwrap(),
            Instant::now() + Duration::from_millis(300),
        );
        assert!(matches!(r, Err(TlsError::Timeout)), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(3));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
