//! Accepting the source: its connections, its hello and its RAM layout.

use std::io::Read;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use log::info;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use proto::peer::{PeerMessage, CAP_POSTCOPY, CAP_RECOVERY, VERSION};
use proto::types::{MAX_LINK_TIMEOUT_MS, MIN_LINK_TIMEOUT_MS};
use proto::BlockDesc;

use super::error::{DestError, LayoutMismatch};
use super::{Dest, HANDSHAKE_TIMEOUT};
use crate::link::send_peer;
use crate::stream::PeerStream;

impl Dest {
    /// Waits for the source (until `deadline`, if any), giving up if the VMM goes away
    /// meanwhile.
    pub(super) fn accept(&mut self, deadline: Option<Instant>) -> Result<PeerStream, DestError> {
        loop {
            self.poll_vmm()?;
            match self.listener.accept() {
                Ok((s, from)) => {
                    info!("{}: migration stream from {from}", self.vm);
                    return Ok(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if deadline.is_some_and(|d| Instant::now() > d) {
                        return Err(DestError::Timeout {
                            waiting_for: "the source's second connection",
                            secs: HANDSHAKE_TIMEOUT.as_secs(),
                        });
                    }
                    let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(100u16));
                }
                Err(e) => return Err(DestError::Accept(e)),
            }
        }
    }

    /// Checks the source's hello and layout, all before `deadline`; returns the session id.
    /// Adopts the source's link timeout (within bounds) for the rest of the session.
    pub(super) fn handshake(
        &mut self,
        peer: &mut PeerStream,
        deadline: Instant,
    ) -> Result<u64, DestError> {
        const CONTEXT: &str = "source handshake";
        let mut body = Vec::new();
        let p = read_frame_by(peer, &mut body, deadline, CONTEXT)?;
        let session_id = match PeerMessage::decode(p.kind, &body) {
            Ok(PeerMessage::Hello {
                version,
                session_id,
                link_timeout_ms,
                capabilities,
            }) if version == VERSION => {
                self.source_recovery = capabilities & CAP_RECOVERY != 0;
                self.link_timeout = Duration::from_millis(
                    link_timeout_ms.clamp(MIN_LINK_TIMEOUT_MS, MAX_LINK_TIMEOUT_MS) as u64,
                );
                session_id
            }
            Ok(PeerMessage::Hello { version, .. }) => {
                return Err(DestError::Version {
                    theirs: version,
                    ours: VERSION,
                })
            }
            Ok(other) => return Err(unexpected("Hello", &other)),
            Err(err) => {
                return Err(DestError::Malformed {
                    context: CONTEXT,
                    err,
                })
            }
        };
        send_peer(
            peer,
            &PeerMessage::Hello {
                version: VERSION,
                capabilities: if self.postcopy.is_some() {
                    CAP_POSTCOPY | CAP_RECOVERY
                } else {
                    0
                },
                session_id,
                link_timeout_ms: self.link_timeout.as_millis() as u32,
            },
        )
        .map_err(DestError::Peer)?;
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
        const CONTEXT: &str = "urgent channel handshake";
        // The source opens it right after the handshake.
        let mut s = self.accept(Some(deadline))?;
        let mut body = Vec::new();
        let p = read_frame_by(&mut s, &mut body, deadline, CONTEXT)?;
        match PeerMessage::decode(p.kind, &body) {
            Ok(PeerMessage::UrgentChannel { session_id: id }) if id == session_id => {}
            Ok(other) => {
                return Err(unexpected(
                    &format!("the urgent channel of session {session_id:#x}"),
                    &other,
                ))
            }
            Err(err) => {
                return Err(DestError::Malformed {
                    context: CONTEXT,
                    err,
                })
            }
        }
        // Requested pages come when they come: no read timeout here; the main stream tells
        // whether the source lives, and the session shuts this one down when it ends.
        s.set_read_timeout(None)
            .and_then(|()| s.set_link_timeout(self.link_timeout))
            .map_err(DestError::Peer)?;
        self.urgent_stream = Some(s.try_clone().map_err(DestError::Peer)?);
        self.start_urgent_thread(s)
    }
}

/// Reads one frame into `body`, all of it before `deadline`: a peer that trickles bytes cannot
/// stretch the wait, as a timeout per read would let it.
pub(super) fn read_frame_by(
    peer: &mut PeerStream,
    body: &mut Vec<u8>,
    deadline: Instant,
    context: &'static str,
) -> Result<proto::FramePrefix, DestError> {
    let timeout = || DestError::Timeout {
        waiting_for: context,
        secs: HANDSHAKE_TIMEOUT.as_secs(),
    };
    let mut read_by = |buf: &mut [u8]| -> Result<(), DestError> {
        let mut done = 0;
        while done < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timeout());
            }
            peer.set_read_timeout(Some(left)).map_err(DestError::Peer)?;
            match peer.read(&mut buf[done..]) {
                Ok(0) => return Err(DestError::PeerClosed),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if crate::link::is_timeout(&e) => return Err(timeout()),
                Err(e) => return Err(DestError::Peer(e)),
            }
        }
        Ok(())
    };
    loop {
        let mut prefix = [0u8; proto::PREFIX_LEN];
        read_by(&mut prefix)?;
        let p =
            proto::FramePrefix::parse(&prefix).map_err(|err| DestError::Frame { context, err })?;
        body.resize(p.len as usize, 0);
        read_by(body)?;
        // A source waiting for an answer keeps the link alive meanwhile.
        if p.kind != proto::peer::kind::HEARTBEAT {
            return Ok(p);
        }
    }
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
