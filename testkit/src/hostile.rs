//! A hostile source: a peer built on umem-proto that connects to a real destination umemd and
//! sends what no real source would: runs outside the layout, frames out of order or beyond the
//! limits, bytes that are no frame at all, a handshake too slow to finish. The tests built on it
//! check that the destination refuses such a peer, keeps its VM and guest RAM as they were, and
//! serves on.
//!
//! Every way into the destination goes through [`HostileSource::open`], which performs the
//! opening exchange as far as a test asks ([`Opening`]); a test that misbehaves before or
//! during the opening stops it early and sends its own bytes.

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use proto::auth::{AuthMethod, NONCE_LEN};
use proto::peer::{kind, PageRun, PeerMessage, CAP_POSTCOPY, VERSION};
use proto::{frame, BlockDesc, FrameError};
use serde_json::json;

use crate::pair::MEMTOUCH_CMDLINE;
use crate::proxy::{Direction, FaultProxy};
use crate::{secs, TestEnv, Umemd};

/// The link timeout a hostile source announces: long enough that a test's own pauses between
/// frames never make the destination give up on a silent link instead of on what was sent.
pub const LINK_TIMEOUT_MS: u32 = 10_000;

/// The session id a hostile source announces.
pub const SESSION_ID: u64 = 0x4057_11e5;

/// How far [`HostileSource::open`] goes through the opening exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Opening {
    /// Connected; nothing sent yet, not even the authentication exchange.
    Connected,
    /// Authenticated (loopback, no secret: the `AuthHello` alone); no `Hello` yet.
    Authenticated,
    /// `Hello` sent and the destination's `Hello` read; no layout yet.
    Hello,
    /// The whole opening: the layout accepted, and the urgent channel opened when the
    /// destination offers postcopy (a vmm with a userfaultfd, as every real one, does).
    Complete,
}

/// What the destination sent back.
#[derive(Debug)]
pub enum Reply {
    /// A message other than a heartbeat.
    Message(PeerMessage),
    /// The connection ended (closed or reset) with no other message; the reason.
    Closed(String),
    /// Nothing but heartbeats until the deadline.
    Silent,
}

/// A source that misbehaves on purpose, talking to a real destination umemd over TCP.
pub struct HostileSource {
    main: TcpStream,
    /// Kept open so that the destination, which waits for it, gets past its handshake.
    urgent: Option<TcpStream>,
}

impl HostileSource {
    /// Connects to the destination listening on `uri` (`tcp:HOST:PORT`) and performs the
    /// opening exchange up to `upto`, with `blocks` as the source's layout: `Hello`, the
    /// destination's `Hello`, `Layout`, `LayoutAccepted`, then the urgent channel. Any check
    /// a destination makes of a new peer belongs here, so that every hostile source, and
    /// each test that stops before it, goes through it alike.
    pub fn open(uri: &str, blocks: &[BlockDesc], upto: Opening) -> Result<Self, String> {
        let addr = uri
            .strip_prefix("tcp:")
            .ok_or_else(|| format!("not a tcp: uri: {uri}"))?;
        let connect = || -> Result<TcpStream, String> {
            let s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
            // Bounded both ways: a destination that stops reading must not hang a test.
            s.set_nodelay(true)
                .and_then(|()| s.set_write_timeout(Some(secs(20))))
                .map_err(|e| e.to_string())?;
            Ok(s)
        };
        let mut peer = HostileSource {
            main: connect()?,
            urgent: None,
        };
        if upto == Opening::Connected {
            return Ok(peer);
        }
        let step = |what: &str, e: io::Error| format!("{what}: {e}");
        // Loopback, no secret: the authentication exchange is the source's announcement alone.
        let no_secret = PeerMessage::AuthHello {
            method: AuthMethod::None,
            nonce: [7; NONCE_LEN],
        };
        peer.send(&no_secret)
            .map_err(|e| step("sending AuthHello", e))?;
        if upto == Opening::Authenticated {
            return Ok(peer);
        }
        peer.send(&PeerMessage::Hello {
            version: VERSION,
            // No CAP_RECOVERY: a failed link must end the session, never pause it.
            capabilities: CAP_POSTCOPY,
            session_id: SESSION_ID,
            link_timeout_ms: LINK_TIMEOUT_MS,
        })
        .map_err(|e| step("sending Hello", e))?;
        let capabilities = match peer.next_reply(secs(10)) {
            Reply::Message(PeerMessage::Hello { capabilities, .. }) => capabilities,
            other => return Err(format!("expected the destination's Hello, got {other:?}")),
        };
        if upto == Opening::Hello {
            return Ok(peer);
        }
        peer.send(&PeerMessage::Layout {
            blocks: blocks.to_vec(),
        })
        .map_err(|e| step("sending Layout", e))?;
        match peer.next_reply(secs(10)) {
            Reply::Message(PeerMessage::LayoutAccepted) => {}
            other => return Err(format!("expected LayoutAccepted, got {other:?}")),
        }
        if capabilities & CAP_POSTCOPY != 0 {
            let mut urgent = connect()?;
            let mut buf = Vec::new();
            no_secret.encode(&mut buf);
            PeerMessage::UrgentChannel {
                session_id: SESSION_ID,
            }
            .encode(&mut buf);
            urgent
                .write_all(&buf)
                .map_err(|e| step("opening the urgent channel", e))?;
            peer.urgent = Some(urgent);
        }
        Ok(peer)
    }

    /// Sends `msg` as one frame (for `Pages`, use [`Self::send_pages`]: this writes only the
    /// header).
    pub fn send(&mut self, msg: &PeerMessage) -> io::Result<()> {
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        self.main.write_all(&buf)
    }

    /// Sends a `Pages` frame for `run` whose data is `run.data_len()` bytes of `fill`, whatever
    /// the run says (out of range, too long).
    pub fn send_pages(&mut self, run: PageRun, fill: u8) -> io::Result<()> {
        let mut buf = Vec::new();
        run.encode_pages_header(&mut buf);
        buf.resize(buf.len() + run.data_len(), fill);
        self.main.write_all(&buf)
    }

    /// Sends a frame of `kind` with exactly `body`, valid or not.
    pub fn send_frame(&mut self, kind: u8, body: &[u8]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(proto::PREFIX_LEN + body.len());
        buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buf.push(kind);
        buf.extend_from_slice(body);
        self.main.write_all(&buf)
    }

    /// Sends bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.main.write_all(bytes)
    }

    /// Ends the stream towards the destination (it still reads what the destination says).
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.main.shutdown(std::net::Shutdown::Write)
    }

    /// The next message from the destination that is not a heartbeat, waiting until
    /// `timeout`.
    pub fn next_reply(&mut self, timeout: Duration) -> Reply {
        let deadline = Instant::now() + timeout;
        let mut body = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.main.set_read_timeout(Some(left)).is_err() {
                return Reply::Silent;
            }
            match frame::read(&mut self.main, &mut body) {
                Ok(p) if p.kind == kind::HEARTBEAT => {}
                Ok(p) => {
                    return match PeerMessage::decode(p.kind, &body) {
                        Ok(m) => Reply::Message(m),
                        Err(e) => Reply::Closed(format!("the destination sent a bad frame: {e}")),
                    }
                }
                Err(FrameError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Reply::Silent
                }
                Err(e) => return Reply::Closed(e.to_string()),
            }
        }
    }

    /// Reads until the destination's `Ready`, skipping nothing else: what came instead.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), Reply> {
        match self.next_reply(timeout) {
            Reply::Message(PeerMessage::Ready) => Ok(()),
            other => Err(other),
        }
    }
}

/// The layout of a vmm of `mem` bytes below the PCI hole: one block, `ram-low`, at 0.
pub fn low_ram_layout(mem: u64) -> Vec<BlockDesc> {
    vec![BlockDesc {
        name: "ram-low".into(),
        guest_addr: 0,
        size: mem,
    }]
}

/// A real machine state, of a 1-vCPU VM with `mem` of RAM (a vmm `--mem` value), as a source
/// sends it: a memtouch VM migrates, both of its vmms on `umemd`, through a proxy that keeps a
/// copy of the `MachineState` frame. A destination of the same size loads it, so a hostile
/// source can take a destination as far as the commit.
pub fn capture_machine_state(env: &TestEnv, umemd: &Umemd, mem: &str) -> Vec<u8> {
    let mut src = env
        .vmm("state-src", umemd)
        .mem(mem)
        .guest("memtouch")
        .cmdline(MEMTOUCH_CMDLINE)
        .start();
    // Paused: the copy that arrives there has no use beyond its state.
    let mut dst = env
        .vmm("state-dst", umemd)
        .mem(mem)
        .incoming_any()
        .paused(true)
        .start();
    src.wait_pass(secs(60), 1);
    let proxy = FaultProxy::in_front_of(&dst.listen_uri());
    proxy.capture_frame(Direction::ToDestination, kind::MACHINE_STATE);
    src.migrate(&proxy.uri(), json!({}))
        .expect("migrating the VM whose state is kept");
    let o = src.wait_migration(secs(60));
    assert_eq!(o.phase, "completed", "capturing a machine state: {}", o.raw);
    let body = proxy
        .captured()
        .expect("the proxy saw no MachineState frame");
    match PeerMessage::decode(kind::MACHINE_STATE, &body) {
        Ok(PeerMessage::MachineState(state)) => state,
        other => panic!("the captured MachineState frame does not decode: {other:?}"),
    }
}
