//! TLS 1.3 on the TCP connections between two umemds, with x509 certificates on both sides: the
//! destination requires a client certificate signed by the CA, the source checks the
//! destination's certificate against the CA and the host of its `tcp:HOST:PORT` address.
//!
//! rustls runs the handshake (its unbuffered API, so that the bytes that follow the handshake
//! stay in umemd's hands) and hands over the traffic keys; from then on the threads that read
//! and write a connection seal and open its records themselves ([`records`]), each direction
//! under its own lock. The rest of umemd keeps treating a connection as a socket it can clone
//! for a reader and a writer thread, time out, and shut down.
//!
//! `unix:` addresses stay plain: both ends are on one host, guarded by file permissions.
//!
//! Credentials come from a directory laid out like QEMU's `tls-creds-x509`: `ca-cert.pem`,
//! `server-cert.pem` and `server-key.pem` (destination), `client-cert.pem` and
//! `client-key.pem` (source).

mod records;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use log::warn;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use proto::peer::PeerMessage;
use rustls::client::{Resumption, UnbufferedClientConnection};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{UnbufferedServerConnection, WebPkiClientVerifier};
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub(crate) use records::Plain;
use records::{NextKeys, Opened, Opener, Sealer};

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

/// ring, with AES-128-GCM first: the cheapest of the TLS 1.3 suites per byte where the CPU
/// has AES instructions, and as strong as the link needs.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
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
    // The record layer is umemd's own once the handshake is done (see `records`).
    c.enable_secret_extraction = true;
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
    c.enable_secret_extraction = true;
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

/// One end of a TLS connection as umemd uses it: the TCP socket, and the record layer of each
/// direction ([`records`]), shared by every handle [`TlsStream::try_clone`] makes.
#[derive(Debug)]
pub struct TlsStream {
    /// This handle's TCP socket (its options, and the bytes of records).
    pub(crate) tcp: TcpStream,
    link: Arc<TlsLink>,
}

/// The state of a TLS connection that its handles share. Each direction has its own lock;
/// `keys` is taken only for a key update, inside either.
struct TlsLink {
    tx: Mutex<Sealer>,
    rx: Mutex<Opener>,
    keys: Mutex<Box<dyn NextKeys>>,
}

impl std::fmt::Debug for TlsLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsLink")
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TlsStream {
    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(TlsStream {
            tcp: self.tcp.try_clone()?,
            link: self.link.clone(),
        })
    }

    /// Reads plaintext; `Ok(0)` is the end of the stream. The socket's read timeout applies.
    pub(crate) fn read(&self, out: &mut [u8]) -> io::Result<usize> {
        let mut opened = Opened::default();
        let r = {
            let mut rx = lock(&self.link.rx);
            let keys = &self.link.keys;
            rx.read(&self.tcp, out, &mut || lock(keys).next_rx(), &mut opened)
        };
        if opened.update_requested {
            lock(&self.link.tx).update_requested = true;
        }
        r
    }

    /// Sends `pieces` as one run of bytes: umemd's own, and guest RAM. A failure part way
    /// leaves the stream unusable for writing (the peer may hold part of a record).
    pub(crate) fn write_all(&self, pieces: &[Plain<'_>]) -> io::Result<()> {
        let r = {
            let mut tx = lock(&self.link.tx);
            let keys = &self.link.keys;
            tx.write_all(&self.tcp, pieces, &mut || lock(keys).next_tx())
        };
        // A peer that refused the connection (this side's certificate, say) said why in an
        // alert before it closed: that is the error to report, not the broken pipe.
        r.map_err(|e| {
            let refusal = self
                .link
                .rx
                .try_lock()
                .ok()
                .and_then(|mut rx| rx.refusal(&self.tcp));
            refusal.unwrap_or(e)
        })
    }

    /// Makes each direction replace its key after `records` records (tests of key updates).
    #[cfg(test)]
    fn rekey_after(&self, records: u64) {
        lock(&self.link.tx).rekey_after(records);
    }

    /// Whether a read would find plaintext (or the stream's end) without waiting.
    pub fn readable_now(&self) -> bool {
        lock(&self.link.rx).ready()
    }

    /// Shuts the connection down: writing ends with `close_notify`, so the peer reads the end
    /// of the stream after everything written before.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            // A writer blocked on a dead link holds the lock: do not wait for it.
            if let Ok(mut tx) = self.link.tx.try_lock() {
                let _ = tx.close(&self.tcp);
            }
        }
        self.tcp.shutdown(how)
    }
}

/// Source side: runs the TLS handshake on `tcp` before `deadline`, checking the destination's
/// certificate against `name`.
pub fn connect(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    deadline: Instant,
) -> Result<TlsStream, TlsError> {
    let mut conn = UnbufferedClientConnection::new(config, name).map_err(TlsError::Handshake)?;
    tcp.set_nonblocking(true).map_err(TlsError::Io)?;
    let early = handshake(&mut conn, &tcp, deadline, Side::Client)?;
    let (secrets, kernel) = conn
        .dangerous_into_kernel_connection()
        .map_err(TlsError::Handshake)?;
    established(tcp, secrets, Box::new(kernel), &early, "the destination")
}

/// Destination side: runs the TLS handshake on an accepted `tcp` before `deadline`, requiring a
/// client certificate of the CA. A peer that speaks no TLS is told so in plain umem protocol,
/// which is what it understands.
pub fn accept(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    deadline: Instant,
) -> Result<TlsStream, TlsError> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(TlsError::Handshake)?;
    tcp.set_nonblocking(true).map_err(TlsError::Io)?;
    let early = match handshake(&mut conn, &tcp, deadline, Side::Server) {
        Ok(early) => early,
        Err(e @ TlsError::PlainPeer) => {
            let _ = tcp.set_nonblocking(false);
            let _ = tcp.set_write_timeout(Some(Duration::from_millis(200)));
            let mut buf = Vec::new();
            PeerMessage::Error(e.to_string()).encode(&mut buf);
            let _ = (&tcp).write_all(&buf);
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let (secrets, kernel) = conn
        .dangerous_into_kernel_connection()
        .map_err(TlsError::Handshake)?;
    established(tcp, secrets, Box::new(kernel), &early, "the source")
}

/// The record layer over `tcp` once the handshake is done; `early` holds what arrived after it.
fn established(
    tcp: TcpStream,
    secrets: rustls::ExtractedSecrets,
    keys: Box<dyn NextKeys>,
    early: &Early,
    peer: &'static str,
) -> Result<TlsStream, TlsError> {
    tcp.set_nonblocking(false).map_err(TlsError::Io)?;
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    let link = TlsLink {
        tx: Mutex::new(Sealer::new(tx_seq, tx).map_err(TlsError::Io)?),
        rx: Mutex::new(
            Opener::new(rx_seq, rx, &early.plain, &early.records, peer).map_err(TlsError::Io)?,
        ),
        keys: Mutex::new(keys),
    };
    Ok(TlsStream {
        tcp,
        link: Arc::new(link),
    })
}

/// Which end of the handshake this is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
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

/// Writes all of `data` to the non-blocking `tcp` before `deadline`.
fn send_by(tcp: &TcpStream, mut data: &[u8], deadline: Instant) -> Result<(), TlsError> {
    while !data.is_empty() {
        match (&*tcp).write(data) {
            Ok(0) => return Err(TlsError::Closed),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(tcp, PollFlags::POLLOUT, deadline)?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TlsError::Io(e)),
        }
    }
    Ok(())
}

/// rustls's unbuffered connection of either role, as the handshake loop drives it.
trait Handshake {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn is_handshaking(&self) -> bool;
}

/// The two roles' connections are distinct types with the same methods.
macro_rules! impl_handshake {
    ($conn:ty, $data:ty) => {
        impl Handshake for $conn {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn is_handshaking(&self) -> bool {
                (**self).is_handshaking()
            }
        }
    };
}
impl_handshake!(
    UnbufferedClientConnection,
    rustls::client::ClientConnectionData
);
impl_handshake!(
    UnbufferedServerConnection,
    rustls::server::ServerConnectionData
);

/// What arrived after the handshake, in the same reads: plaintext rustls decrypted, then
/// records it left alone.
struct Early {
    plain: Vec<u8>,
    records: Vec<u8>,
}

/// What the handshake loop does after rustls looked at the bytes it has.
enum Step {
    /// Send what was encoded.
    Send,
    /// Read more from the peer.
    Read,
    /// The handshake is over.
    Done,
}

/// Runs the handshake with rustls's unbuffered API on the non-blocking `tcp`, all of it
/// before `deadline`. The bytes read stay in a buffer of ours, so whatever followed the
/// handshake (the peer's first records) is returned, for the record layer.
fn handshake<C: Handshake>(
    conn: &mut C,
    tcp: &TcpStream,
    deadline: Instant,
    side: Side,
) -> Result<Early, TlsError> {
    let mut incoming = vec![0u8; 32 << 10];
    let mut used = 0;
    let mut outgoing = vec![0u8; 16 << 10];
    let mut queued = 0;
    // The peer's first bytes, to tell a peer that speaks no TLS.
    let mut first = Vec::new();
    // Plaintext that came with the handshake's end, and bytes of it to drop from `incoming`.
    let mut early = Vec::new();
    let mut extra = 0;
    loop {
        let UnbufferedStatus { discard, state } = conn.process(&mut incoming[..used]);
        let step = match state {
            Ok(ConnectionState::EncodeTlsData(mut s)) => loop {
                match s.encode(&mut outgoing[queued..]) {
                    Ok(n) => {
                        queued += n;
                        break Step::Read;
                    }
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        outgoing.resize(queued + required_size, 0)
                    }
                    Err(_) => break Step::Read,
                }
            },
            Ok(ConnectionState::TransmitTlsData(t)) => {
                t.done();
                Step::Send
            }
            Ok(ConnectionState::BlockedHandshake) => Step::Read,
            // A server may write before the client's Finished came: the handshake still runs.
            Ok(ConnectionState::WriteTraffic(_)) => Step::Done,
            // Records after the handshake: rustls decrypted them already; their plaintext
            // goes to the record layer.
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                while let Some(rec) = r.next_record() {
                    match rec {
                        Ok(rec) => {
                            early.extend_from_slice(rec.payload);
                            extra += rec.discard;
                        }
                        Err(e) => return Err(TlsError::Handshake(e)),
                    }
                }
                Step::Done
            }
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                return Err(TlsError::Closed)
            }
            Ok(_) => Step::Read,
            Err(e) => {
                if let Some(plain) = not_tls(side, &first, tcp, deadline) {
                    return Err(plain);
                }
                // The alert that says why, if rustls has one to send.
                if let Ok(ConnectionState::EncodeTlsData(mut s)) = conn.process(&mut []).state {
                    let mut alert = vec![0u8; 1024];
                    if let Ok(n) = s.encode(&mut alert) {
                        let _ = send_by(tcp, &alert[..n], deadline);
                    }
                }
                return Err(TlsError::Handshake(e));
            }
        };
        let discard = discard + std::mem::take(&mut extra);
        incoming.copy_within(discard..used, 0);
        used -= discard;
        match step {
            Step::Send => {
                send_by(tcp, &outgoing[..queued], deadline)?;
                queued = 0;
                continue;
            }
            Step::Done if !conn.is_handshaking() => {
                send_by(tcp, &outgoing[..queued], deadline)?;
                incoming.truncate(used);
                return Ok(Early {
                    plain: early,
                    records: incoming,
                });
            }
            Step::Read if queued > 0 => continue,
            _ => {}
        }
        if used == incoming.len() {
            incoming.resize(used + (16 << 10), 0);
        }
        let n = match (&*tcp).read(&mut incoming[used..]) {
            Ok(0) if first.is_empty() => return Err(TlsError::Closed),
            Ok(0) => return Err(not_tls(side, &first, tcp, deadline).unwrap_or(TlsError::Closed)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(tcp, PollFlags::POLLIN, deadline)?;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(TlsError::Io(e)),
        };
        if first.len() < 512 {
            first.extend_from_slice(&incoming[used..used + n.min(512 - first.len())]);
        }
        used += n;
    }
}

/// When the peer's first bytes are no TLS record: the error that says the peer speaks plain
/// umem protocol, with what a destination said (it turns away a TLS source with an `Error`
/// frame, which is read to its end here).
fn not_tls(side: Side, first: &[u8], tcp: &TcpStream, deadline: Instant) -> Option<TlsError> {
    if first.first().is_none_or(|b| is_tls_record_type(*b)) {
        return None;
    }
    if side == Side::Server {
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

    fn read_exact(s: &TlsStream, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match s.read(buf)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => buf = &mut buf[n..],
            }
        }
        Ok(())
    }

    /// Writes `data` on one handle and reads as much on a clone, in two threads.
    fn send_and_receive(
        w: TlsStream,
        r: TlsStream,
        data: Vec<u8>,
    ) -> (JoinHandle<()>, JoinHandle<Vec<u8>>) {
        let len = data.len();
        let writer = std::thread::spawn(move || {
            // Writes of every size, records cut anywhere.
            let mut at = 0;
            let mut n = 1;
            while at < data.len() {
                let end = (at + n).min(data.len());
                w.write_all(&[Plain::Bytes(&data[at..end])]).unwrap();
                at = end;
                n = n * 7 % 300_001 + 1;
            }
        });
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; len];
            read_exact(&r, &mut got).unwrap();
            got
        });
        (writer, reader)
    }

    /// `up` bytes from `c` to `s` and `down` bytes back, both ways at once, each checked.
    fn exchange(c: &TlsStream, s: &TlsStream, up: usize, down: usize, seed: u64) {
        let (up, down) = (pattern(up, seed), pattern(down, seed + 1));
        let (w1, r1) = send_and_receive(c.try_clone().unwrap(), s.try_clone().unwrap(), up.clone());
        let (w2, r2) =
            send_and_receive(s.try_clone().unwrap(), c.try_clone().unwrap(), down.clone());
        w1.join().unwrap();
        w2.join().unwrap();
        assert!(r1.join().unwrap() == up, "source to destination differs");
        assert!(r2.join().unwrap() == down, "destination to source differs");
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
    fn records_carry_megabytes_both_ways_at_once() {
        let dir = make_creds(&temp("echo"), &["127.0.0.1"]);
        let (c, s) = pair(&dir, &dir);
        exchange(&c, &s, 6 << 20, 5 << 20, 1);
        // Shutting one end down ends the stream on the other after what was written.
        c.write_all(&[Plain::Bytes(b"last words")]).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        s.tcp
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut rest = [0u8; 64];
        let n = s.read(&mut rest).unwrap();
        assert_eq!(&rest[..n], b"last words");
        assert_eq!(
            s.read(&mut rest).unwrap(),
            0,
            "close_notify reads as the end"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keys_are_replaced_mid_stream_and_data_survives() {
        let dir = make_creds(&temp("rekey"), &["127.0.0.1"]);
        let (c, s) = pair(&dir, &dir);
        // A key update every 5 records, both ways, while both ways carry data.
        c.rekey_after(5);
        s.rekey_after(5);
        exchange(&c, &s, 3 << 20, 2 << 20, 5);
        // The sequence numbers started again under each new key.
        assert!(lock(&c.link.tx).seq() <= 5, "{}", lock(&c.link.tx).seq());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_peer_gone_mid_stream_ends_the_stream_and_fails_writes() {
        let dir = make_creds(&temp("cut"), &["127.0.0.1"]);
        let (c, s) = pair(&dir, &dir);
        c.tcp
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        c.tcp
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        s.write_all(&[Plain::Bytes(&pattern(1 << 20, 3))]).unwrap();
        let mut got = vec![0u8; 100 << 10];
        read_exact(&c, &mut got).unwrap();
        // The destination's TCP connection goes away, mid-stream.
        s.tcp.shutdown(Shutdown::Both).unwrap();
        let t = Instant::now();
        let mut sink = vec![0u8; 1 << 20];
        loop {
            match c.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => panic!("expected the end of the stream, got {e}"),
            }
        }
        // And the source's writes fail rather than vanish.
        let chunk = pattern(1 << 20, 4);
        let failed = (0..64).any(|_| c.write_all(&[Plain::Bytes(&chunk)]).is_err());
        assert!(failed, "writes to a dead connection kept succeeding");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_forged_or_damaged_record_ends_the_stream_with_a_clear_error() {
        let dir = make_creds(&temp("forged"), &["127.0.0.1"]);
        let (c, s) = pair(&dir, &dir);
        c.tcp
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        s.write_all(&[Plain::Bytes(b"genuine")]).unwrap();
        let mut b = [0u8; 7];
        read_exact(&c, &mut b).unwrap();
        // A record-shaped run of bytes under no key of the connection.
        let mut forged = vec![23u8, 3, 3, 0, 40];
        forged.extend_from_slice(&[0x5a; 40]);
        (&s.tcp).write_all(&forged).unwrap();
        let e = c.read(&mut b).unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");
        // The stream stays failed.
        let e = c.read(&mut b).unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");
        // Bytes that are no record at all.
        let (c, s) = pair(&dir, &dir);
        c.tcp
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (&s.tcp).write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let e = c.read(&mut b).unwrap_err();
        assert!(e.to_string().contains("no valid record"), "{e}");
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
        let c = c.unwrap();
        c.tcp
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let e = c.read(&mut [0u8; 16]).unwrap_err();
        assert!(
            e.to_string().starts_with("TLS:") && e.to_string().contains("refused"),
            "{e}"
        );
        // A source that writes first, after the destination has closed, hears the same.
        let (c, s) = try_pair(&foreign, &ours, "127.0.0.1");
        assert!(s.is_err());
        let c = c.unwrap();
        c.tcp
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let chunk = pattern(64 << 10, 9);
        let e = (0..100)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(10));
                c.write_all(&[Plain::Bytes(&chunk)]).err()
            })
            .expect("writes to a closed connection kept succeeding");
        assert!(e.to_string().contains("refused"), "{e}");
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
