//! The connection to the destination: connecting, the handshake (version, capabilities,
//! layout), and waiting for its replies.

use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::peer::{PeerMessage, CAP_DRAIN, CAP_HUGE_PAGES, CAP_POSTCOPY, CAP_RECOVERY, VERSION};

use super::error::SourceError;
use super::{Peer, Source, CONNECT_TIMEOUT, HEARTBEATS_PER_TIMEOUT};
use crate::auth::{self, AuthError};
use crate::link::{self, send_peer};
use crate::stream::PeerStream;
use crate::tls;

impl Source {
    /// Connects to the destination, runs TLS over TCP when the session has TLS credentials,
    /// and authenticates, within one link timeout. Every connection of the session comes from
    /// here: the main stream, the urgent channel and those of a recovery.
    pub(super) fn open_stream(&self) -> Result<PeerStream, SourceError> {
        let stream = PeerStream::connect(&self.uri, CONNECT_TIMEOUT)?;
        stream
            .set_link_timeout(self.link_timeout())
            .map_err(SourceError::Peer)?;
        let deadline = Instant::now() + self.link_timeout();
        let mut stream = match &self.trust.tls {
            Some(config) => {
                // Only a TCP connection is upgraded: `unix:` stays plain.
                let s = stream
                    .upgrade(|tcp| {
                        let name = tls::server_name(&self.uri)?;
                        tls::connect(tcp, config.clone(), name, deadline)
                    })
                    .map_err(AuthError::from)?;
                // The link timeout bounds the TLS connection's writes as a plain one's.
                s.set_link_timeout(self.link_timeout())
                    .map_err(SourceError::Peer)?;
                s
            }
            None => stream,
        };
        auth::authenticate_to_destination(&mut stream, self.trust.secret.as_ref(), deadline)?;
        Ok(stream)
    }

    pub(super) fn connect(&mut self) -> Result<Peer, SourceError> {
        let stream = self.open_stream()?;
        let reader = stream.try_clone().map_err(SourceError::Peer)?;
        let intercept: link::Intercept<PeerMessage> = Arc::new(std::sync::Mutex::new(None));
        Ok(Peer {
            stream,
            rx: link::peer_reader(reader, intercept.clone(), self.link_timeout())
                .map_err(SourceError::Peer)?,
            intercept,
            urgent: None,
        })
    }

    /// The page size the destination drops pages in, from the capabilities of its hello.
    pub(super) fn learn_page_size(&mut self, capabilities: u64) {
        self.dest_page_size = if capabilities & CAP_HUGE_PAGES != 0 {
            proto::HUGE_PAGE_SIZE
        } else {
            proto::PAGE_SIZE
        };
    }

    /// The hellos (version, capabilities) and the RAM layout, within one link timeout.
    pub(super) fn handshake(
        &mut self,
        peer: &mut Peer,
        session_id: u64,
    ) -> Result<(), SourceError> {
        // The whole handshake is bounded, not each step: a destination that answers slowly
        // must not hold the migration longer than one link timeout.
        let deadline = Instant::now() + self.link_timeout();
        let hello = PeerMessage::Hello {
            version: VERSION,
            capabilities: CAP_POSTCOPY | CAP_RECOVERY,
            session_id,
            link_timeout_ms: self.link_timeout().as_millis() as u32,
        };
        send_peer(&mut peer.stream, &hello).map_err(SourceError::Peer)?;
        match self.wait_peer_until(peer, "Hello", deadline)? {
            PeerMessage::Hello {
                version,
                capabilities,
                ..
            } if version == VERSION => {
                self.dest_postcopy = capabilities & CAP_POSTCOPY != 0;
                self.dest_recovery = capabilities & CAP_RECOVERY != 0;
                self.dest_drain = capabilities & CAP_DRAIN != 0;
                self.learn_page_size(capabilities);
            }
            PeerMessage::Hello { version, .. } => {
                return Err(SourceError::Version {
                    theirs: version,
                    ours: VERSION,
                })
            }
            PeerMessage::Error(m) => return Err(SourceError::PeerRefused(m)),
            other => return Err(SourceError::unexpected("Hello", other)),
        }
        let blocks = self.mem.blocks().iter().map(|b| b.desc.clone()).collect();
        send_peer(&mut peer.stream, &PeerMessage::Layout { blocks }).map_err(SourceError::Peer)?;
        match self.wait_peer_until(peer, "LayoutAccepted", deadline) {
            Ok(PeerMessage::LayoutAccepted) => Ok(()),
            Ok(PeerMessage::Error(m)) => Err(SourceError::PeerRefused(m)),
            Ok(other) => Err(SourceError::unexpected("LayoutAccepted", other)),
            Err(e) => Err(e),
        }
    }

    /// Waits up to `timeout` for the destination's next message, handling the VMM's control
    /// messages meanwhile (a cancel before the commit still counts). An `Error` from the
    /// destination is returned as a message, for the caller to word; `waiting_for` names the
    /// message expected, for the timeout's error.
    pub(super) fn wait_peer(
        &mut self,
        peer: &mut Peer,
        waiting_for: &'static str,
        timeout: Duration,
    ) -> Result<PeerMessage, SourceError> {
        self.wait_peer_until(peer, waiting_for, Instant::now() + timeout)
    }

    /// [`Self::wait_peer`] until `deadline`. The main stream carries heartbeats meanwhile, so
    /// that the destination sees a live source while it waits too.
    pub(super) fn wait_peer_until(
        &mut self,
        peer: &mut Peer,
        waiting_for: &'static str,
        deadline: Instant,
    ) -> Result<PeerMessage, SourceError> {
        let start = Instant::now();
        loop {
            self.poll_vmm()?;
            self.heartbeat(peer)?;
            match peer.rx.recv_timeout(Duration::from_millis(20)) {
                Ok(Ok(m)) => return Ok(m),
                Ok(Err(e)) => return Err(SourceError::PeerLink(e)),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(SourceError::Timeout {
                        waiting_for,
                        secs: start.elapsed().as_secs(),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => return Err(SourceError::PeerClosed),
            }
        }
    }

    /// Sends a heartbeat on the main stream if none went for a fifth of the link timeout. Only
    /// the main thread writes the main stream, and only between frames.
    pub(super) fn heartbeat(&mut self, peer: &mut Peer) -> Result<(), SourceError> {
        if self.last_heartbeat.elapsed() >= self.link_timeout() / HEARTBEATS_PER_TIMEOUT {
            self.last_heartbeat = Instant::now();
            send_peer(&mut peer.stream, &PeerMessage::Heartbeat)
                .map_err(|e| self.peer_error(peer, e))?;
        }
        Ok(())
    }

    /// Turns a write error into its cause: the destination's own reason when it sent one, or
    /// the silence that made the reader shut the link.
    pub(super) fn peer_error(&self, peer: &Peer, e: std::io::Error) -> SourceError {
        match peer.rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(PeerMessage::Error(m))) => SourceError::PeerFailed(m),
            // The reader found the link silent and shut it, which is what failed the write.
            Ok(Err(silent @ link::LinkError::Silent(_))) => SourceError::PeerLink(silent),
            _ => SourceError::Peer(e),
        }
    }
}

/// A migration's identifier: unique enough to tell resumptions apart.
pub(super) fn session_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}
