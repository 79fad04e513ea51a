//! Destination role: listens where the VMM asked, checks the source's RAM layout against the
//! VMM's, writes arriving pages straight into the memfd (no vCPU runs yet), and hands the
//! machine state to the VMM.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use log::{info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use proto::frame::{FramePrefix, PREFIX_LEN};
use proto::local::{LocalBlock, LocalMessage};
use proto::peer::{kind, PageRun, PeerMessage, RUN_HEADER_LEN, VERSION};
use proto::{BlockDesc, MigrationStats, Phase, PAGE_SIZE};

use crate::link::{self, send_local, send_peer, Delivery};
use crate::mapping::GuestMapping;
use crate::session::tcp_addr;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// An incoming migration.
pub struct Dest {
    vmm: UnixStream,
    vmm_rx: Receiver<Delivery<LocalMessage>>,
    vm: String,
    listener: TcpListener,
    mem: GuestMapping,
    stats: MigrationStats,
    started: Instant,
    last_progress: Instant,
}

impl Dest {
    /// Maps the VM's memory and binds the listening socket.
    pub fn new(
        vmm: UnixStream,
        vm: String,
        uri: &str,
        memfd: OwnedFd,
        blocks: Vec<LocalBlock>,
    ) -> Result<Self, (UnixStream, String)> {
        let setup = || -> Result<(GuestMapping, TcpListener, UnixStream), String> {
            let mem = GuestMapping::new(memfd, blocks, true).map_err(|e| e.to_string())?;
            let addr = tcp_addr(uri)?;
            let listener =
                TcpListener::bind(addr).map_err(|e| format!("listening on {addr}: {e}"))?;
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let reader = vmm.try_clone().map_err(|e| e.to_string())?;
            Ok((mem, listener, reader))
        };
        match setup() {
            Ok((mem, listener, reader)) => Ok(Dest {
                stats: MigrationStats {
                    phase: Phase::Setup,
                    total_pages: mem.total_pages(),
                    ..Default::default()
                },
                vmm_rx: link::local_reader(reader),
                vmm,
                vm,
                listener,
                mem,
                started: Instant::now(),
                last_progress: Instant::now(),
            }),
            Err(e) => Err((vmm, e)),
        }
    }

    /// Runs the migration to its end and reports the outcome to the VMM.
    pub fn run(mut self) {
        let mut peer = None;
        let result = self.receive(&mut peer);
        self.stats.total_us = self.started.elapsed().as_micros() as u64;
        match result {
            Ok(()) => {
                self.stats.phase = Phase::Completed;
                info!(
                    "{}: incoming migration completed: {} pages, {} zero pages in {} ms",
                    self.vm,
                    self.stats.pages_sent,
                    self.stats.zero_pages,
                    self.stats.total_us / 1000
                );
                let _ = send_local(&mut self.vmm, &LocalMessage::Completed(self.stats));
            }
            Err(message) => {
                warn!("{}: incoming migration failed: {message}", self.vm);
                if let Some(p) = peer.as_mut() {
                    let _ = send_peer(p, &PeerMessage::Error(message.clone()));
                }
                self.stats.phase = Phase::Failed;
                let _ = send_local(
                    &mut self.vmm,
                    &LocalMessage::Failed {
                        message,
                        stats: self.stats,
                    },
                );
            }
        }
    }

    fn receive(&mut self, peer_slot: &mut Option<TcpStream>) -> Result<(), String> {
        let local = self.listener.local_addr().map_err(|e| e.to_string())?;
        send_local(
            &mut self.vmm,
            &LocalMessage::Listening {
                uri: format!("tcp:{local}"),
            },
        )
        .map_err(|e| format!("VMM connection: {e}"))?;
        let peer = peer_slot.insert(self.accept()?);
        self.handshake(peer)?;
        self.stats.phase = Phase::Precopy;
        self.progress(true);
        let mut prefix = [0u8; PREFIX_LEN];
        let mut body = Vec::new();
        loop {
            self.poll_vmm()?;
            read_exact(peer, &mut prefix)?;
            let p = FramePrefix::parse(&prefix).map_err(|e| format!("source stream: {e}"))?;
            if p.kind == kind::PAGES {
                self.receive_pages(peer, p)?;
                continue;
            }
            body.resize(p.len as usize, 0);
            read_exact(peer, &mut body)?;
            let msg =
                PeerMessage::decode(p.kind, &body).map_err(|e| format!("source stream: {e}"))?;
            match msg {
                PeerMessage::ZeroPages(run) => {
                    let off = self.checked_offset(run)?;
                    self.mem.punch_hole(off, run.count as u64 * PAGE_SIZE)?;
                    self.stats.zero_pages += run.count as u64;
                }
                PeerMessage::Discard { block, ranges } => {
                    for (first, count) in ranges {
                        let off = self
                            .mem
                            .offset_of(block, first, count as u64)
                            .map_err(|e| format!("source discarded {e}"))?;
                        self.mem.punch_hole(off, count as u64 * PAGE_SIZE)?;
                    }
                }
                PeerMessage::RoundEnd { round } => {
                    self.stats.rounds = round;
                    self.progress(true);
                }
                PeerMessage::MachineState(state) => {
                    self.stats.phase = Phase::Switchover;
                    self.load_state(peer, state)?;
                }
                PeerMessage::AllSent => {
                    if self.stats.phase != Phase::Switchover {
                        return Err("source finished without sending the machine state".into());
                    }
                    return Ok(());
                }
                PeerMessage::Error(m) => return Err(format!("source failed: {m}")),
                other => return Err(format!("unexpected message from the source: {other:?}")),
            }
            self.progress(false);
        }
    }

    fn checked_offset(&self, run: PageRun) -> Result<u64, String> {
        self.mem
            .offset_of(run.block, run.first, run.count as u64)
            .map_err(|e| format!("source sent {e}"))
    }

    /// Reads a run's data straight into guest RAM through umemd's mapping. No vCPU of the
    /// destination runs before the machine state is loaded, so nothing else touches these pages.
    fn receive_pages(&mut self, peer: &mut TcpStream, p: FramePrefix) -> Result<(), String> {
        let mut hdr = [0u8; RUN_HEADER_LEN];
        read_exact(peer, &mut hdr)?;
        let run =
            PageRun::decode_pages_header(p, &hdr).map_err(|e| format!("source stream: {e}"))?;
        let off = self.checked_offset(run)?;
        // SAFETY: `checked_offset` bounds the run to a block inside the mapping, and this thread
        // is the only writer of guest RAM until the VM starts.
        let dst = unsafe { self.mem.slice_mut(off, run.data_len()) };
        read_exact(peer, dst)?;
        self.stats.pages_sent += run.count as u64;
        self.stats.bytes_sent += (PREFIX_LEN + RUN_HEADER_LEN + run.data_len()) as u64;
        Ok(())
    }

    fn load_state(&mut self, peer: &mut TcpStream, state: Vec<u8>) -> Result<(), String> {
        send_local(&mut self.vmm, &LocalMessage::MachineState(state))
            .map_err(|e| format!("VMM connection: {e}"))?;
        match self.vmm_rx.recv_timeout(LOAD_TIMEOUT) {
            Ok(Ok(LocalMessage::StateLoaded)) => {}
            Ok(Ok(LocalMessage::Failed { message, .. })) => {
                return Err(format!("VMM could not load the machine state: {message}"))
            }
            Ok(Ok(other)) => return Err(format!("unexpected message from the VMM: {other:?}")),
            Ok(Err(e)) => return Err(format!("VMM connection: {e}")),
            Err(RecvTimeoutError::Timeout) => {
                return Err("VMM did not load the state in time".into())
            }
            Err(RecvTimeoutError::Disconnected) => return Err("VMM connection lost".into()),
        }
        send_peer(peer, &PeerMessage::Started).map_err(|e| format!("source connection: {e}"))
    }

    /// Waits for the source, giving up if the VMM goes away meanwhile.
    fn accept(&mut self) -> Result<TcpStream, String> {
        loop {
            self.poll_vmm()?;
            match self.listener.accept() {
                Ok((s, from)) => {
                    info!("{}: migration stream from {from}", self.vm);
                    s.set_nonblocking(false).map_err(|e| e.to_string())?;
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(100u16));
                }
                Err(e) => return Err(format!("accepting the source: {e}")),
            }
        }
    }

    fn handshake(&mut self, peer: &mut TcpStream) -> Result<(), String> {
        peer.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        let p =
            proto::frame::read(peer, &mut body).map_err(|e| format!("source handshake: {e}"))?;
        match PeerMessage::decode(p.kind, &body) {
            Ok(PeerMessage::Hello { version, .. }) if version == VERSION => {}
            Ok(PeerMessage::Hello { version, .. }) => {
                return Err(format!(
                    "source speaks protocol version {version}, this umemd {VERSION}"
                ))
            }
            Ok(other) => return Err(format!("expected Hello from the source, got {other:?}")),
            Err(e) => return Err(format!("source handshake: {e}")),
        }
        send_peer(
            peer,
            &PeerMessage::Hello {
                version: VERSION,
                capabilities: 0,
                session_id: 0,
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
        peer.set_read_timeout(None).map_err(|e| e.to_string())
    }

    fn poll_vmm(&mut self) -> Result<(), String> {
        match self.vmm_rx.try_recv() {
            Ok(Ok(LocalMessage::Cancel)) => Err("migration cancelled on the destination".into()),
            Ok(Ok(other)) => Err(format!("unexpected message from the VMM: {other:?}")),
            Ok(Err(e)) => Err(format!("destination VMM connection: {e}")),
            Err(TryRecvError::Empty) => Ok(()),
            Err(TryRecvError::Disconnected) => Err("destination VMM connection lost".into()),
        }
    }

    fn progress(&mut self, force: bool) {
        if force || self.last_progress.elapsed() >= PROGRESS_EVERY {
            self.last_progress = Instant::now();
            self.stats.total_us = self.started.elapsed().as_micros() as u64;
            let _ = send_local(&mut self.vmm, &LocalMessage::Progress(self.stats));
        }
    }
}

fn read_exact(peer: &mut TcpStream, buf: &mut [u8]) -> Result<(), String> {
    peer.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            "source closed the connection mid-migration".to_string()
        }
        _ => format!("source connection: {e}"),
    })
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
