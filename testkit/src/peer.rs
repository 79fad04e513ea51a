//! A source driven by hand on the migration protocol, for tests that play a peer the real
//! umemd never is: one that stops, lies, or sends what it should not. It opens every
//! connection the way a real source does, authentication included, so a test reaches exactly
//! the step it means to test.

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::Duration;

use proto::auth::{AuthMethod, Role, Secret, NONCE_LEN};
use proto::peer::PeerMessage;

/// One connection of a hand-driven source.
pub struct RawSource {
    /// The connection, for tests that write bytes of their own.
    pub stream: TcpStream,
    /// Every byte [`RawSource::send`] wrote, for tests that replay a conversation.
    pub sent: Vec<u8>,
}

impl RawSource {
    /// Connects to a destination listening on `uri` (`tcp:HOST:PORT`) without authenticating:
    /// nothing has been sent yet.
    pub fn connect_bare(uri: &str) -> io::Result<Self> {
        let addr = uri
            .strip_prefix("tcp:")
            .ok_or_else(|| io::Error::other(format!("{uri} is not a tcp: uri")))?;
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        Ok(RawSource {
            stream,
            sent: Vec::new(),
        })
    }

    /// Connects and authenticates as a source with `secret` (or announces none).
    pub fn connect(uri: &str, secret: Option<&Secret>) -> io::Result<Self> {
        let mut s = Self::connect_bare(uri)?;
        s.authenticate(secret)?;
        Ok(s)
    }

    /// The source's half of the authentication exchange.
    pub fn authenticate(&mut self, secret: Option<&Secret>) -> io::Result<()> {
        let source_nonce = nonce();
        self.send(&PeerMessage::AuthHello {
            method: match secret {
                Some(_) => AuthMethod::HmacSha256,
                None => AuthMethod::None,
            },
            nonce: source_nonce,
        })?;
        let Some(secret) = secret else {
            return Ok(());
        };
        let dest_nonce = match self.read()? {
            PeerMessage::AuthChallenge { nonce, proof }
                if secret.verify(Role::Destination, &source_nonce, &nonce, &proof) =>
            {
                nonce
            }
            other => {
                return Err(io::Error::other(format!(
                    "expected a valid AuthChallenge, got {other:?}"
                )))
            }
        };
        let proof = secret.proof(Role::Source, &source_nonce, &dest_nonce);
        self.send(&PeerMessage::AuthProof { proof })
    }

    /// Sends one message.
    pub fn send(&mut self, m: &PeerMessage) -> io::Result<()> {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        self.sent.extend_from_slice(&buf);
        self.stream.write_all(&buf)
    }

    /// Reads the next message, heartbeats skipped.
    pub fn read(&mut self) -> io::Result<PeerMessage> {
        let mut body = Vec::new();
        loop {
            let p = proto::frame::read(&mut self.stream, &mut body)
                .map_err(|e| io::Error::other(e.to_string()))?;
            let m =
                PeerMessage::decode(p.kind, &body).map_err(|e| io::Error::other(e.to_string()))?;
            if m != PeerMessage::Heartbeat {
                return Ok(m);
            }
        }
    }
}

/// Bytes that differ from one call to the next; a test peer needs no stronger nonce.
fn nonce() -> [u8; NONCE_LEN] {
    use std::hash::{BuildHasher, Hasher};
    let mut n = [0u8; NONCE_LEN];
    for chunk in n.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    n
}
