//! Accepting the source: its connections, its hello and its RAM layout.

use std::os::fd::AsFd;
use std::time::Instant;

use log::info;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use proto::peer::{PeerMessage, CAP_POSTCOPY, VERSION};
use proto::BlockDesc;

use super::{Dest, HANDSHAKE_TIMEOUT};
use crate::link::send_peer;
use crate::stream::PeerStream;

impl Dest {
    /// Waits for the source (until `deadline`, if any), giving up if the VMM goes away
    /// meanwhile.
    pub(super) fn accept(&mut self, deadline: Option<Instant>) -> Result<PeerStream, String> {
        loop {
            self.poll_vmm()?;
            match self.listener.accept() {
                Ok((s, from)) => {
                    info!("{}: migration stream from {from}", self.vm);
                    return Ok(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if deadline.is_some_and(|d| Instant::now() > d) {
                        return Err("the source did not open its second connection".into());
                    }
                    let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(100u16));
                }
                Err(e) => return Err(format!("accepting the source: {e}")),
            }
        }
    }

    /// Checks the source's hello and layout; returns the session id.
    pub(super) fn handshake(&mut self, peer: &mut PeerStream) -> Result<u64, String> {
        peer.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        let p =
            proto::frame::read(peer, &mut body).map_err(|e| format!("source handshake: {e}"))?;
        let session_id = match PeerMessage::decode(p.kind, &body) {
            Ok(PeerMessage::Hello {
                version,
                session_id,
                ..
            }) if version == VERSION => session_id,
            Ok(PeerMessage::Hello { version, .. }) => {
                return Err(format!(
                    "source speaks protocol version {version}, this umemd {VERSION}"
                ))
            }
            Ok(other) => return Err(format!("expected Hello from the source, got {other:?}")),
            Err(e) => return Err(format!("source handshake: {e}")),
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
        .map_err(|e| format!("source connection: {e}"))?;
        let p =
            proto::frame::read(peer, &mut body).map_err(|e| format!("source handshake: {e}"))?;
        let blocks = match PeerMessage::decode(p.kind, &body) {
            Ok(PeerMessage::Layout { blocks }) => blocks,
            Ok(other) => return Err(format!("expected the RAM layout, got {other:?}")),
            Err(e) => return Err(format!("source layout: {e}")),
        };
        let mine: Vec<BlockDesc> = self.mem.blocks().iter().map(|b| b.desc.clone()).collect();
        check_layout(&blocks, &mine)?;
        send_peer(peer, &PeerMessage::LayoutAccepted)
            .map_err(|e| format!("source connection: {e}"))?;
        peer.set_read_timeout(None).map_err(|e| e.to_string())?;
        Ok(session_id)
    }

    /// Accepts the source's second connection, which carries only requested pages.
    pub(super) fn accept_urgent(&mut self, session_id: u64) -> Result<(), String> {
        // The source opens it right after the handshake.
        let mut s = self.accept(Some(Instant::now() + HANDSHAKE_TIMEOUT))?;
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        let p = proto::frame::read(&mut s, &mut body)
            .map_err(|e| format!("urgent channel handshake: {e}"))?;
        match PeerMessage::decode(p.kind, &body) {
            Ok(PeerMessage::UrgentChannel { session_id: id }) if id == session_id => {}
            Ok(other) => {
                return Err(format!(
                    "expected the urgent channel of session {session_id:#x}, got {other:?}"
                ))
            }
            Err(e) => return Err(format!("urgent channel handshake: {e}")),
        }
        s.set_read_timeout(None).map_err(|e| e.to_string())?;
        self.start_urgent_thread(s)
    }
}

fn describe(b: &BlockDesc) -> String {
    format!("{} ({} MiB at {:#x})", b.name, b.size >> 20, b.guest_addr)
}

/// The source's blocks must be the destination's: same names, sizes and addresses, in order.
pub fn check_layout(source: &[BlockDesc], dest: &[BlockDesc]) -> Result<(), String> {
    let list = |v: &[BlockDesc]| v.iter().map(describe).collect::<Vec<_>>().join(", ");
    if source != dest {
        return Err(format!(
            "RAM layout mismatch: source has [{}], destination has [{}]",
            list(source),
            list(dest)
        ));
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
        let e = check_layout(&[b("ram-low", 1 << 30)], &[b("ram-low", 512 << 20)]).unwrap_err();
        assert!(e.contains("1024 MiB") && e.contains("512 MiB"), "{e}");
        assert!(check_layout(&[b("a", 4096)], &[b("b", 4096)]).is_err());
    }
}
