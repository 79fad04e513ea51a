//! Accepting the source: its connections (each through the [`super::gate`]), its hello and its RAM
//! layout.

use std::time::{Duration, Instant};

use log::info;
use proto::peer::{PeerMessage, CAP_DRAIN, CAP_HUGE_PAGES, CAP_POSTCOPY, CAP_RECOVERY, VERSION};
use proto::types::{MAX_LINK_TIMEOUT_MS, MIN_LINK_TIMEOUT_MS};
use proto::BlockDesc;

use super::error::{DestError, LayoutMismatch};

use super::{Dest, HANDSHAKE_TIMEOUT};
use crate::link::{self, send_peer, ReadByError};
use crate::stream::PeerStream;

impl Dest {
    /// What this destination tells the source in its hello: postcopy and recovery with a
    /// userfaultfd, whether its RAM is on huge pages, and that it answers a drain.
    pub(super) fn capabilities(&self) -> u64 {
        let postcopy = if self.postcopy.is_some() {
            CAP_POSTCOPY | CAP_RECOVERY
        } else {
            0
        };
        let huge = if self.mem.hugetlb() {
            CAP_HUGE_PAGES
        } else {
            0
        };
        postcopy | huge | CAP_DRAIN
    }

    /// Waits (until `deadline`, if any) for a connection that authenticates and whose first
    /// message `expect` accepts, giving up if the VMM goes away meanwhile. Every other
    /// connection is told why, dropped, logged and counted, and the wait goes on: no stranger
    /// can end it. `waiting_for` names the connection, for logs and the timeout's error.
    pub(super) fn accept(
        &mut self,
        deadline: Option<Instant>,
        waiting_for: &'static str,
        expect: impl Fn(&PeerMessage) -> Result<(), String>,
    ) -> Result<(PeerStream, PeerMessage), DestError> {
        loop {
            self.poll_vmm()?;
            let admitted = self.gate.next(Duration::from_millis(10));
            if let Some(a) = admitted {
                match expect(&a.first) {
                    Ok(()) => {
                        info!("{}: {waiting_for} from {}", self.vm, a.from);
                        self.count_rejected();
                        return Ok((a.stream, a.first));
                    }
                    Err(why) => self.gate.reject(a, &why),
                }
            }
            self.count_rejected();
            if deadline.is_some_and(|d| Instant::now() > d) {
                return Err(DestError::Timeout {
                    waiting_for,
                    secs: HANDSHAKE_TIMEOUT.as_secs(),
                });
            }
        }
    }

    /// Connections dropped at the door are counted in the statistics the VMM reports
    /// (`rejected_peers`), at once.
    fn count_rejected(&mut self) {
        let n = self.gate.rejected();
        if n != self.stats.rejected_peers {
            self.stats.rejected_peers = n;
            self.progress(true);
        }
    }

    /// Waits for the source's main stream: a connection that authenticates and says `Hello`
    /// in this protocol version.
    pub(super) fn accept_source(&mut self) -> Result<(PeerStream, SourceHello), DestError> {
        let (s, first) = self.accept(None, "migration stream", |m| match m {
            PeerMessage::Hello { version, .. } if *version == VERSION => Ok(()),
            PeerMessage::Hello { version, .. } => Err(DestError::Version {
                theirs: *version,
                ours: VERSION,
            }
            .to_string()),
            other => Err(unexpected("Hello", other).to_string()),
        })?;
        match first {
            PeerMessage::Hello {
                session_id,
                link_timeout_ms,
                capabilities,
                ..
            } => Ok((
                s,
                SourceHello {
                    session_id,
                    link_timeout_ms,
                    capabilities,
                },
            )),
            other => Err(unexpected("Hello", &other)),
        }
    }

    /// Answers the source's hello and checks its layout, all before `deadline`; returns the
    /// session id. Adopts the source's link timeout (within bounds) for the rest of the
    /// session.
    pub(super) fn handshake(
        &mut self,
        peer: &mut PeerStream,
        hello: SourceHello,
        deadline: Instant,
    ) -> Result<u64, DestError> {
        self.source_recovery = hello.capabilities & CAP_RECOVERY != 0;
        self.link_timeout = Duration::from_millis(
            hello
                .link_timeout_ms
                .clamp(MIN_LINK_TIMEOUT_MS, MAX_LINK_TIMEOUT_MS) as u64,
        );
        let session_id = hello.session_id;
        send_peer(
            peer,
            &PeerMessage::Hello {
                version: VERSION,
                capabilities: self.capabilities(),
                session_id,
                link_timeout_ms: self.link_timeout.as_millis() as u32,
            },
        )
        .map_err(DestError::Peer)?;
        let mut body = Vec::new();
        let p = read_frame_by(peer, &mut body, deadline, "source layout")?;
        let blocks = match PeerMessage::decode(p.kind, &body) {
            Ok(PeerMessage::Layout { blocks }) => blocks,
            Ok(other) => return Err(unexpected("the RAM layout", &other)),
            Err(err) => {
                return Err(DestError::Malformed {
                    context: "source layout",
                    err,
                })
            }
        };
        let mine: Vec<BlockDesc> = self.mem.blocks().iter().map(|b| b.desc.clone()).collect();
        check_layout(&blocks, &mine)?;
        send_peer(peer, &PeerMessage::LayoutAccepted).map_err(DestError::Peer)?;
        // From now on silence is bounded by the link timeout (the source sends heartbeats).
        peer.set_link_timeout(self.link_timeout)
            .and_then(|()| peer.set_read_timeout(Some(self.link_timeout)))
            .map_err(DestError::Peer)?;
        Ok(session_id)
    }

    /// Accepts the source's second connection, which carries only requested pages, before
    /// `deadline`.
    pub(super) fn accept_urgent(
        &mut self,
        session_id: u64,
        deadline: Instant,
    ) -> Result<(), DestError> {
        // The source opens it right after the handshake.
        let (s, _) = self.accept(Some(deadline), "urgent channel", |m| match m {
            PeerMessage::UrgentChannel { session_id: id } if *id == session_id => Ok(()),
            other => Err(unexpected(
                &format!("the urgent channel of session {session_id:#x}"),
                other,
            )
            .to_string()),
        })?;
        // Requested pages come when they come: no read timeout here; the main stream tells
        // whether the source lives, and the session shuts this one down when it ends.
        s.set_read_timeout(None)
            .and_then(|()| s.set_link_timeout(self.link_timeout))
            .map_err(DestError::Peer)?;
        self.urgent_stream = Some(s.try_clone().map_err(DestError::Peer)?);
        self.start_urgent_thread(s)
    }
}

/// What the source's `Hello` says.
pub(super) struct SourceHello {
    pub(super) session_id: u64,
    pub(super) link_timeout_ms: u32,
    pub(super) capabilities: u64,
}

/// Reads one frame into `body`, all of it before `deadline` (see [`link::read_frame_by`]).
pub(super) fn read_frame_by(
    peer: &mut PeerStream,
    body: &mut Vec<u8>,
    deadline: Instant,
    context: &'static str,
) -> Result<proto::FramePrefix, DestError> {
    link::read_frame_by(peer, body, deadline, proto::MAX_FRAME).map_err(|e| match e {
        ReadByError::Timeout => DestError::Timeout {
            waiting_for: context,
            secs: HANDSHAKE_TIMEOUT.as_secs(),
        },
        ReadByError::Closed => DestError::PeerClosed,
        ReadByError::Io(e) => DestError::Peer(e),
        ReadByError::Frame(err) => DestError::Frame { context, err },
        e @ ReadByError::TooLong { .. } => DestError::Peer(std::io::Error::other(e.to_string())),
    })
}

/// The error for `got` arriving where `expected` should.
pub(super) fn unexpected(expected: &str, got: &PeerMessage) -> DestError {
    DestError::Unexpected {
        expected: expected.to_string(),
        got: format!("{got:?}"),
    }
}

/// The source's blocks must be the destination's: same names, sizes and addresses, in order.
pub fn check_layout(source: &[BlockDesc], dest: &[BlockDesc]) -> Result<(), LayoutMismatch> {
    if source != dest {
        return Err(LayoutMismatch {
            source_blocks: source.to_vec(),
            dest_blocks: dest.to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str, size: u64) -> BlockDesc {
        BlockDesc {
            name: name.into(),
            guest_addr: 0,
            size,
        }
    }

    #[test]
    fn layout_mismatch_names_both_sides() {
        assert!(check_layout(&[b("ram-low", 1 << 30)], &[b("ram-low", 1 << 30)]).is_ok());
        let e = check_layout(&[b("ram-low", 1 << 30)], &[b("ram-low", 512 << 20)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("1024 MiB") && e.contains("512 MiB"), "{e}");
        assert!(check_layout(&[b("a", 4096)], &[b("b", 4096)]).is_err());
    }
}
