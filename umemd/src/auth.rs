//! Authenticating peer connections (the exchange is described in [`proto::auth`]): which
//! secret a session uses, whether it may go without one, and the two halves of the exchange.
//! Both run on the bare connection before any other frame, with a deadline for the whole
//! exchange, so a peer that trickles bytes cannot hold it open.

use std::net::ToSocketAddrs;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use proto::auth::{AuthMethod, Role, Secret, NONCE_LEN};
use proto::local::PeerAuth;
use proto::peer::PeerMessage;

use crate::link::{self, send_peer, ReadByError};
use crate::stream::{Endpoint, PeerStream};

/// Why a connection did not authenticate, or a session may not run as asked.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The destination refused, with its reason.
    #[error("refused by the destination: {0}")]
    Refused(String),
    /// The destination's proof is wrong.
    #[error("the destination could not prove it knows the migration's secret (the two hosts were given different secrets, or this is not the intended destination)")]
    DestinationProof,
    /// The source's proof is wrong.
    #[error("authentication failed: the peer could not prove it knows the migration's secret")]
    SourceProof,
    /// The source came without a secret to a destination that has one.
    #[error("authentication required: this destination has a secret and the peer offered none")]
    SecretRequired,
    /// The source came with a secret to a destination that has none.
    #[error("the peer authenticates with a secret but this destination was given none")]
    NoSecretHere,
    /// Another message came where the exchange expected `expected`.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What the exchange expected.
        expected: &'static str,
        /// What came, shortened.
        got: String,
    },
    /// A frame did not decode.
    #[error("malformed {context}: {err}")]
    Malformed {
        /// What was being read.
        context: &'static str,
        /// Why it does not decode.
        err: proto::DecodeError,
    },
    /// Reading the next frame failed or timed out.
    #[error("waiting for {context}: {err}")]
    Read {
        /// What was being read.
        context: &'static str,
        /// Why.
        err: ReadByError,
    },
    /// Writing failed.
    #[error("sending {context}: {err}")]
    Write {
        /// What was being sent.
        context: &'static str,
        /// Why.
        err: std::io::Error,
    },
    /// The TLS layer failed, or one side uses TLS and the other does not.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The system gave no random bytes.
    #[error("drawing a nonce: {0}")]
    Random(String),
    /// A TCP address beyond loopback, and neither a secret nor TLS.
    #[error("{uri} is not a loopback address and this migration has no secret and no TLS credentials: anybody who reaches it could {what}. Give both sides the same secret (secret-file=, or umemd --secret-file) or TLS certificates of one CA (tls_creds=, or umemd --tls-creds), or say insecure=true")]
    Exposed {
        /// The URI.
        uri: String,
        /// What an impostor could do there.
        what: &'static str,
    },
}

/// The secret every session uses when its VMM gave none (`umemd --secret-file`).
static HOST_SECRET: OnceLock<Secret> = OnceLock::new();

/// Sets the host-wide secret, once, at start-up.
pub fn set_host_secret(secret: Secret) {
    let _ = HOST_SECRET.set(secret);
}

/// How a session's peer connections are authenticated: what its VMM asked for, completed with
/// the host's defaults (`umemd --secret-file`, `--tls-creds`). `T` is the TLS configuration of
/// the session's role.
#[derive(Debug)]
pub struct PeerTrust<T> {
    /// Every connection proves both sides know it.
    pub secret: Option<Secret>,
    /// Every TCP connection runs TLS with certificates on both sides.
    pub tls: Option<Arc<T>>,
    /// The operator allowed a non-loopback address with neither.
    pub insecure: bool,
}

impl<T> PeerTrust<T> {
    /// The session's own secret and credentials, else the host's; `tls_config` loads a
    /// credentials directory for this role.
    pub fn resolve(
        auth: &PeerAuth,
        tls_config: impl FnOnce(&Path) -> Result<Arc<T>, crate::tls::TlsError>,
    ) -> Result<Self, AuthError> {
        let tls = crate::tls::session_creds(auth.tls_creds.as_deref())
            .map(|dir| tls_config(&dir))
            .transpose()?;
        Ok(PeerTrust {
            secret: auth.secret.clone().or_else(|| HOST_SECRET.get().cloned()),
            tls,
            insecure: auth.insecure,
        })
    }

    /// Whether a peer must prove who it is: by the secret, or by a certificate.
    pub fn authenticates(&self) -> bool {
        self.secret.is_some() || self.tls.is_some()
    }

    /// [`check_exposure`] of `uri` for this session.
    pub fn check_exposure(&self, uri: &str, side: Side) -> Result<(), AuthError> {
        check_exposure(uri, self.authenticates(), self.insecure, side)
    }
}

/// Which side of a migration checks an address, for the wording of [`AuthError::Exposed`].
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// The destination listens there.
    Listen,
    /// The source connects there.
    Connect,
}

/// Refuses a TCP address that is not loopback when there is neither a secret nor TLS (whose
/// certificates authenticate both sides), unless `insecure`: without either, whoever reaches a
/// listening destination can write the VM's memory and set its registers, and whoever answers
/// at a source's address receives the VM's memory. `unix:` addresses are guarded by file
/// permissions.
pub fn check_exposure(
    uri: &str,
    authenticated: bool,
    insecure: bool,
    side: Side,
) -> Result<(), AuthError> {
    if authenticated || insecure {
        return Ok(());
    }
    let Ok(Endpoint::Tcp(addr)) = Endpoint::parse(uri) else {
        // A malformed URI is refused where it is bound or connected, with its own error.
        return Ok(());
    };
    let loopback = addr
        .to_socket_addrs()
        .map(|mut addrs| addrs.all(|a| a.ip().is_loopback()))
        .unwrap_or(false);
    if loopback {
        return Ok(());
    }
    Err(AuthError::Exposed {
        uri: uri.to_string(),
        what: match side {
            Side::Listen => "send this VM its memory and registers",
            Side::Connect => "receive this VM's memory",
        },
    })
}

fn nonce() -> Result<[u8; NONCE_LEN], AuthError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(n)
}

fn send(peer: &mut PeerStream, msg: &PeerMessage, context: &'static str) -> Result<(), AuthError> {
    send_peer(peer, msg).map_err(|err| AuthError::Write { context, err })
}

fn read(
    peer: &mut PeerStream,
    deadline: Instant,
    context: &'static str,
) -> Result<PeerMessage, AuthError> {
    let mut body = Vec::new();
    let p = link::read_frame_by(peer, &mut body, deadline, link::MAX_OPENING_FRAME)
        .map_err(|err| AuthError::Read { context, err })?;
    PeerMessage::decode(p.kind, &body).map_err(|err| AuthError::Malformed { context, err })
}

fn unexpected(expected: &'static str, got: &PeerMessage) -> AuthError {
    let mut got = format!("{got:?}");
    got.truncate(120);
    AuthError::Unexpected { expected, got }
}

/// Source side, on a new connection: proves the source knows `secret` and checks that the
/// destination does, all before `deadline`. Without a secret, only announces that.
pub fn authenticate_to_destination(
    peer: &mut PeerStream,
    secret: Option<&Secret>,
    deadline: Instant,
) -> Result<(), AuthError> {
    let source_nonce = nonce()?;
    let method = match secret {
        Some(_) => AuthMethod::HmacSha256,
        None => AuthMethod::None,
    };
    send(
        peer,
        &PeerMessage::AuthHello {
            method,
            nonce: source_nonce,
        },
        "AuthHello",
    )?;
    let Some(secret) = secret else {
        return Ok(());
    };
    let (dest_nonce, proof) = match read(peer, deadline, "the destination's AuthChallenge")? {
        PeerMessage::AuthChallenge { nonce, proof } => (nonce, proof),
        PeerMessage::Error(m) => return Err(AuthError::Refused(m)),
        other => return Err(unexpected("AuthChallenge", &other)),
    };
    if !secret.verify(Role::Destination, &source_nonce, &dest_nonce, &proof) {
        return Err(AuthError::DestinationProof);
    }
    let proof = secret.proof(Role::Source, &source_nonce, &dest_nonce);
    send(peer, &PeerMessage::AuthProof { proof }, "AuthProof")
}

/// Destination side, on an accepted connection: checks that the peer knows `secret` (or, with
/// no secret, that it speaks umem's protocol), all before `deadline`. Nothing the peer sends
/// is acted on before this returns `Ok`.
pub fn authenticate_source(
    peer: &mut PeerStream,
    secret: Option<&Secret>,
    deadline: Instant,
) -> Result<(), AuthError> {
    let (method, source_nonce) = match read(peer, deadline, "AuthHello")? {
        PeerMessage::AuthHello { method, nonce } => (method, nonce),
        other => return Err(unexpected("AuthHello", &other)),
    };
    let secret = match (method, secret) {
        (AuthMethod::None, None) => return Ok(()),
        (AuthMethod::None, Some(_)) => return Err(AuthError::SecretRequired),
        (AuthMethod::HmacSha256, None) => return Err(AuthError::NoSecretHere),
        (AuthMethod::HmacSha256, Some(s)) => s,
    };
    let dest_nonce = nonce()?;
    let proof = secret.proof(Role::Destination, &source_nonce, &dest_nonce);
    send(
        peer,
        &PeerMessage::AuthChallenge {
            nonce: dest_nonce,
            proof,
        },
        "AuthChallenge",
    )?;
    match read(peer, deadline, "the source's AuthProof")? {
        PeerMessage::AuthProof { proof }
            if secret.verify(Role::Source, &source_nonce, &dest_nonce, &proof) =>
        {
            Ok(())
        }
        PeerMessage::AuthProof { .. } => Err(AuthError::SourceProof),
        other => Err(unexpected("AuthProof", &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes().to_vec()).unwrap()
    }

    /// Runs both halves over a socket pair; returns (source result, destination result).
    fn exchange(
        source: Option<Secret>,
        dest: Option<Secret>,
    ) -> (Result<(), AuthError>, Result<(), AuthError>) {
        let (a, b) = UnixStream::pair().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let d = std::thread::spawn(move || {
            let mut b = PeerStream::Unix(b);
            let r = authenticate_source(&mut b, dest.as_ref(), deadline);
            if let Err(e) = &r {
                let _ = send_peer(&mut b, &PeerMessage::Error(e.to_string()));
            }
            r
        });
        let mut a = PeerStream::Unix(a);
        let s = authenticate_to_destination(&mut a, source.as_ref(), deadline);
        (s, d.join().unwrap())
    }

    #[test]
    fn the_same_secret_passes_both_ways() {
        let k = secret("same-secret-on-both-hosts");
        let (s, d) = exchange(Some(k.clone()), Some(k));
        assert!(s.is_ok() && d.is_ok(), "{s:?} {d:?}");
        let (s, d) = exchange(None, None);
        assert!(s.is_ok() && d.is_ok(), "{s:?} {d:?}");
    }

    #[test]
    fn a_different_secret_fails_on_both_sides() {
        let (s, _) = exchange(
            Some(secret("the-source-secret-1")),
            Some(secret("the-dest-secret-22")),
        );
        assert!(matches!(s, Err(AuthError::DestinationProof)), "{s:?}");
    }

    #[test]
    fn a_missing_secret_on_either_side_is_refused() {
        let (s, d) = exchange(None, Some(secret("only-the-dest-has-it")));
        // The source without a secret sends nothing more and waits for nothing: the refusal
        // reaches it at its next read.
        assert!(s.is_ok());
        assert!(matches!(d, Err(AuthError::SecretRequired)), "{d:?}");
        let (s, d) = exchange(Some(secret("only-the-source-has-it")), None);
        assert!(matches!(d, Err(AuthError::NoSecretHere)), "{d:?}");
        assert!(
            matches!(&s, Err(AuthError::Refused(m)) if m.contains("given none")),
            "{s:?}"
        );
    }

    #[test]
    fn a_forged_or_replayed_proof_fails() {
        let k = secret("the-migration-secret");
        let (a, b) = UnixStream::pair().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let dest = {
            let k = k.clone();
            std::thread::spawn(move || {
                authenticate_source(&mut PeerStream::Unix(b), Some(&k), deadline)
            })
        };
        let mut a = PeerStream::Unix(a);
        let ns = [7u8; NONCE_LEN];
        send_peer(
            &mut a,
            &PeerMessage::AuthHello {
                method: AuthMethod::HmacSha256,
                nonce: ns,
            },
        )
        .unwrap();
        let PeerMessage::AuthChallenge { proof, .. } = read(&mut a, deadline, "c").unwrap() else {
            panic!("no challenge");
        };
        // The destination's own proof reflected back is no source proof.
        send_peer(&mut a, &PeerMessage::AuthProof { proof }).unwrap();
        assert!(matches!(dest.join().unwrap(), Err(AuthError::SourceProof)));
    }

    #[test]
    fn garbage_and_silence_are_bounded() {
        use std::io::Write;
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let r = authenticate_source(
            &mut PeerStream::Unix(b),
            None,
            Instant::now() + Duration::from_secs(2),
        );
        assert!(r.is_err(), "{r:?}");
        let (_a, b) = UnixStream::pair().unwrap();
        let t = Instant::now();
        let r = authenticate_source(
            &mut PeerStream::Unix(b),
            None,
            Instant::now() + Duration::from_millis(300),
        );
        assert!(matches!(
            r,
            Err(AuthError::Read {
                err: ReadByError::Timeout,
                ..
            })
        ));
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn only_loopback_goes_without_a_secret() {
        let c = Side::Listen;
        assert!(check_exposure("tcp:127.0.0.1:0", false, false, c).is_ok());
        assert!(check_exposure("tcp:localhost:4444", false, false, c).is_ok());
        assert!(check_exposure("tcp:[::1]:4444", false, false, c).is_ok());
        assert!(check_exposure("unix:/tmp/x", false, false, c).is_ok());
        let e = check_exposure("tcp:0.0.0.0:4444", false, false, c).unwrap_err();
        assert!(e.to_string().contains("insecure=true"), "{e}");
        assert!(check_exposure("tcp:0.0.0.0:4444", true, false, c).is_ok());
        assert!(check_exposure("tcp:0.0.0.0:4444", false, true, c).is_ok());
        assert!(check_exposure("tcp:192.0.2.1:4444", false, false, Side::Connect).is_err());
    }
}
