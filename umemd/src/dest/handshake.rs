//! Accepting the source: its connections, its hello and its RAM layout.

use std::os::fd::AsFd;
use std::time::Instant;

use log::info;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use proto::peer::{PeerMessage, CAP_POSTCOPY, VERSION};
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

    /// Checks the source's hello and layout; returns the session id.
    pub(super) fn handshake(&mut self, peer: &mut PeerStream) -> Result<u64, DestError> {
        const CONTEXT: &str = "source handshake";
        let frame = |err| DestError::Frame {
            context: CONTEXT,
            err,
        };
        peer.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(DestError::Peer)?;
        let mut body = Vec::new();
        let p = proto::frame::read(peer, &mut body).map_err(frame)?;
        let session_id = match PeerMessage::decode(p.kind, &body) {
            Ok(PeerMessage::Hello {
                version,
                session_id,
                ..
            }) if version == VERSION => session_id,
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
                    CAP_POSTCOPY
                } else {
                    0
                },
                session_id,
            },
        )
        .map_err(DestError::Peer)?;
        let p = proto::frame::read(peer, &mut body).map_err(frame)?;
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
        peer.set_read_timeout(None).map_err(DestError::Peer)?;
        Ok(session_id)
    }

    /// Accepts the source's second connection, which carries only requested pages.
    pub(super) fn accept_urgent(&mut self, session_id: u64) -> Result<(), DestError> {
        const CONTEXT: &str = "urgent channel handshake";
        // The source opens it right after the handshake.
        let mut s = self.accept(Some(Instant::now() + HANDSHAKE_TIMEOUT))?;
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(DestError::Peer)?;
        let mut body = Vec::new();
        let p = proto::frame::read(&mut s, &mut body).map_err(|err| DestError::Frame {
            context: CONTEXT,
            err,
        })?;
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
        s.set_read_timeout(None).map_err(DestError::Peer)?;
        self.start_urgent_thread(s)
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
