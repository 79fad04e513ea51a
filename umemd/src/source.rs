//! Source role: reads the VM's pages through umemd's own mapping of the memfd and streams them
//! to the destination umemd, round after round, then stops the VM and sends the rest with the
//! machine state.

use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use log::{info, warn};
use proto::local::{LocalBlock, LocalMessage};
use proto::peer::{PageRun, PeerMessage, MAX_RUN_PAGES, VERSION};
use proto::{MigrationParams, MigrationStats, Phase, PAGE_SIZE};

use crate::bitmap::DirtyBitmap;
use crate::link::{self, send_local, send_peer, Delivery};
use crate::mapping::{is_zero, GuestMapping};
use crate::session::tcp_addr;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// How long the destination may take to load the state and report that it runs.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// An outgoing migration.
pub struct Source {
    vmm: UnixStream,
    vmm_rx: Receiver<Delivery<LocalMessage>>,
    vm: String,
    uri: String,
    params: MigrationParams,
    mem: GuestMapping,
    stats: MigrationStats,
    started: Instant,
    last_progress: Instant,
    /// Time spent streaming pages and the bytes streamed in it, for the bandwidth estimate.
    send_time: Duration,
    send_bytes: u64,
    /// Duration of the last round's streaming.
    round_elapsed: Duration,
    out: Vec<u8>,
}

/// The migration stream towards the destination.
struct Peer {
    stream: TcpStream,
    rx: Receiver<Delivery<PeerMessage>>,
}

impl Source {
    /// Maps the VM's memory; on failure hands the connection back with the reason.
    pub fn new(
        vmm: UnixStream,
        vm: String,
        uri: String,
        params: MigrationParams,
        memfd: OwnedFd,
        blocks: Vec<LocalBlock>,
    ) -> Result<Self, (UnixStream, String)> {
        let mem = match GuestMapping::new(memfd, blocks, false) {
            Ok(m) => m,
            Err(e) => return Err((vmm, e.to_string())),
        };
        let reader = match vmm.try_clone() {
            Ok(r) => r,
            Err(e) => return Err((vmm, format!("cloning the VMM connection: {e}"))),
        };
        let stats = MigrationStats {
            phase: Phase::Setup,
            total_pages: mem.total_pages(),
            remaining_pages: mem.total_pages(),
            ..Default::default()
        };
        Ok(Source {
            vmm_rx: link::local_reader(reader),
            vmm,
            vm,
            uri,
            params,
            mem,
            stats,
            started: Instant::now(),
            last_progress: Instant::now(),
            send_time: Duration::ZERO,
            send_bytes: 0,
            round_elapsed: Duration::ZERO,
            out: Vec::with_capacity(64 * 1024),
        })
    }

    /// Runs the migration to its end and reports the outcome to the VMM.
    pub fn run(mut self) {
        let mut peer = None;
        let result = self.migrate(&mut peer);
        self.stats.total_us = self.started.elapsed().as_micros() as u64;
        match result {
            Ok(()) => {
                self.stats.phase = Phase::Completed;
                self.stats.remaining_pages = 0;
                info!(
                    "{}: migration to {} completed: {} pages, {} zero, {} holes skipped, {} MB in {} ms, downtime {} us",
                    self.vm,
                    self.uri,
                    self.stats.pages_sent,
                    self.stats.zero_pages,
                    self.stats.holes_skipped,
                    self.stats.bytes_sent >> 20,
                    self.stats.total_us / 1000,
                    self.stats.downtime_us
                );
                let _ = send_local(&mut self.vmm, &LocalMessage::Completed(self.stats));
            }
            Err(message) => {
                warn!("{}: migration to {} failed: {message}", self.vm, self.uri);
                if let Some(p) = peer.as_mut() {
                    let _ = send_peer(&mut p.stream, &PeerMessage::Error(message.clone()));
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

    fn migrate(&mut self, peer_slot: &mut Option<Peer>) -> Result<(), String> {
        let peer = peer_slot.insert(self.connect()?);
        self.handshake(peer)?;
        self.stats.phase = Phase::Precopy;
        self.progress(true);

        // Round 1 covers every page; holes in the memfd cost nothing.
        let mut dirty = self.harvest(false)?.0;
        let mut round = 0;
        loop {
            round += 1;
            self.send_pages(peer, &dirty, round == 1, true)?;
            send_peer(&mut peer.stream, &PeerMessage::RoundEnd { round })
                .map_err(|e| self.peer_error(peer, e))?;
            self.stats.rounds = round;
            dirty = self.harvest(false)?.0;
            let pending = dirty.count();
            let bw = self.bandwidth();
            self.stats.remaining_pages = pending;
            // Pages dirtied while the last round streamed, per second of it.
            self.stats.dirty_rate_pps = rate(pending, self.round_elapsed);
            self.stats.expected_downtime_us = (pending * PAGE_SIZE * 1_000_000) / bw.max(1);
            self.progress(true);
            let fits =
                self.stats.expected_downtime_us <= self.params.downtime_limit_ms as u64 * 1000;
            if fits || round >= self.params.max_rounds.max(1) {
                info!(
                    "{}: switchover after {round} rounds: {pending} dirty pages, expected downtime {} us at {} MB/s",
                    self.vm,
                    self.stats.expected_downtime_us,
                    bw >> 20
                );
                break;
            }
        }

        // Switchover: the VMM stops its vCPUs, sends what they dirtied since, and its state.
        self.stats.phase = Phase::Switchover;
        let stopped_at = Instant::now();
        let (last, state) = self.harvest(true)?;
        dirty.merge(&last);
        let state = state.ok_or("the VMM sent no machine state at switchover")?;
        self.send_pages(peer, &dirty, false, false)?;
        send_peer(&mut peer.stream, &PeerMessage::MachineState(state))
            .and_then(|_| send_peer(&mut peer.stream, &PeerMessage::AllSent))
            .map_err(|e| self.peer_error(peer, e))?;
        match peer.rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(PeerMessage::Started)) => {}
            Ok(Ok(PeerMessage::Error(m))) => return Err(format!("destination failed: {m}")),
            Ok(Ok(other)) => return Err(format!("unexpected message from destination: {other:?}")),
            Ok(Err(e)) => return Err(format!("destination connection: {e}")),
            Err(_) => return Err("destination did not start the VM in time".into()),
        }
        self.stats.downtime_us = stopped_at.elapsed().as_micros() as u64;
        Ok(())
    }

    fn connect(&mut self) -> Result<Peer, String> {
        let addr = tcp_addr(&self.uri)?;
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .map_err(|e| format!("resolving {addr}: {e}"))?
            .collect();
        let mut last = format!("no address for {addr}");
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    stream
                        .set_write_timeout(Some(WRITE_TIMEOUT))
                        .map_err(|e| e.to_string())?;
                    let reader = stream.try_clone().map_err(|e| e.to_string())?;
                    return Ok(Peer {
                        stream,
                        rx: link::peer_reader(reader),
                    });
                }
                Err(e) => last = format!("connecting to destination {a}: {e}"),
            }
        }
        Err(last)
    }

    fn handshake(&mut self, peer: &mut Peer) -> Result<(), String> {
        let session_id = session_id();
        let hello = PeerMessage::Hello {
            version: VERSION,
            capabilities: 0,
            session_id,
        };
        send_peer(&mut peer.stream, &hello).map_err(|e| format!("destination connection: {e}"))?;
        match self.peer_wait(peer)? {
            PeerMessage::Hello { version, .. } if version == VERSION => {}
            PeerMessage::Hello { version, .. } => {
                return Err(format!(
                    "destination speaks protocol version {version}, this umemd {VERSION}"
                ))
            }
            PeerMessage::Error(m) => return Err(format!("destination refused: {m}")),
            other => return Err(format!("unexpected handshake reply: {other:?}")),
        }
        let blocks = self.mem.blocks().iter().map(|b| b.desc.clone()).collect();
        send_peer(&mut peer.stream, &PeerMessage::Layout { blocks })
            .map_err(|e| format!("destination connection: {e}"))?;
        match self.peer_wait(peer)? {
            PeerMessage::LayoutAccepted => Ok(()),
            PeerMessage::Error(m) => Err(format!("destination refused: {m}")),
            other => Err(format!("unexpected layout reply: {other:?}")),
        }
    }

    fn peer_wait(&mut self, peer: &Peer) -> Result<PeerMessage, String> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        loop {
            self.poll_vmm()?;
            match peer.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(m)) => return Ok(m),
                Ok(Err(e)) => return Err(format!("destination connection: {e}")),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => return Err("destination did not answer the handshake".into()),
            }
        }
    }

    /// Handles control messages from the VMM that may arrive at any time.
    fn poll_vmm(&mut self) -> Result<(), String> {
        loop {
            match self.vmm_rx.try_recv() {
                Ok(Ok(m)) => self.control(m)?,
                Ok(Err(e)) => return Err(format!("VMM connection: {e}")),
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => return Err("VMM connection lost".into()),
            }
        }
    }

    fn control(&mut self, m: LocalMessage) -> Result<(), String> {
        match m {
            LocalMessage::Cancel => Err("migration cancelled".into()),
            LocalMessage::SetParams(p) => {
                info!("{}: new parameters {p:?}", self.vm);
                self.params = p;
                Ok(())
            }
            LocalMessage::StartPostcopy => Err("postcopy is not supported yet".into()),
            other => Err(format!("unexpected message from the VMM: {other:?}")),
        }
    }

    /// Asks the VMM for its dirty bitmap (stopping the vCPUs first if `stop`); with `stop`,
    /// also returns the machine state that follows.
    fn harvest(&mut self, stop: bool) -> Result<(DirtyBitmap, Option<Vec<u8>>), String> {
        send_local(&mut self.vmm, &LocalMessage::Harvest { stop })
            .map_err(|e| format!("VMM connection: {e}"))?;
        let mut bm = DirtyBitmap::new(self.mem.blocks());
        let mut ended = false;
        loop {
            let m = match self.vmm_rx.recv() {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => return Err(format!("VMM connection: {e}")),
                Err(_) => return Err("VMM connection lost".into()),
            };
            match m {
                LocalMessage::DirtyBitmap {
                    block,
                    first_page,
                    words,
                } if !ended => bm.or_words(block, first_page, &words)?,
                LocalMessage::BitmapEnd { stopped } if !ended => {
                    if stopped != stop {
                        return Err(format!(
                            "VMM reported vCPUs {}stopped, expected {}stopped",
                            if stopped { "" } else { "not " },
                            if stop { "" } else { "not " }
                        ));
                    }
                    if !stop {
                        return Ok((bm, None));
                    }
                    ended = true;
                }
                LocalMessage::MachineState(s) if ended => return Ok((bm, Some(s))),
                other => self.control(other)?,
            }
        }
    }

    /// Streams every page set in `dirty`. `first_round` skips memfd holes (the destination's
    /// memfd is fresh); `limited` applies the bandwidth limit.
    fn send_pages(
        &mut self,
        peer: &mut Peer,
        dirty: &DirtyBitmap,
        first_round: bool,
        limited: bool,
    ) -> Result<(), String> {
        let t0 = Instant::now();
        let bytes0 = self.stats.bytes_sent;
        for (block, first, count) in dirty.runs(MAX_RUN_PAGES as u64) {
            let off = self
                .mem
                .offset_of(block, first, count)
                .map_err(|e| format!("dirty bitmap: {e}"))?;
            let segments = if first_round {
                self.mem.segments(off, off + count * PAGE_SIZE)
            } else {
                vec![(off, count * PAGE_SIZE, true)]
            };
            for (seg_off, seg_len, data) in segments {
                let seg_first = first + (seg_off - off) / PAGE_SIZE;
                let seg_pages = seg_len / PAGE_SIZE;
                if data {
                    self.send_segment(peer, block, seg_first, seg_pages, seg_off)?;
                } else {
                    self.stats.holes_skipped += seg_pages;
                }
                self.stats.remaining_pages = self.stats.remaining_pages.saturating_sub(seg_pages);
            }
            self.poll_vmm()?;
            if let Ok(Ok(PeerMessage::Error(m)) | Err(m)) = peer.rx.try_recv() {
                return Err(format!("destination failed: {m}"));
            }
            if limited && self.params.bandwidth_limit > 0 {
                let sent = self.stats.bytes_sent - bytes0;
                let due = Duration::from_secs_f64(sent as f64 / self.params.bandwidth_limit as f64);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            self.progress(false);
        }
        self.flush(peer)?;
        self.round_elapsed = t0.elapsed();
        self.send_time += self.round_elapsed;
        self.send_bytes += self.stats.bytes_sent - bytes0;
        self.stats.throughput_bps = self.bandwidth();
        Ok(())
    }

    /// Sends `pages` populated pages starting at memfd offset `off`: runs of non-zero pages with
    /// their data straight from the mapping, runs of zero pages as short records.
    fn send_segment(
        &mut self,
        peer: &mut Peer,
        block: u32,
        first: u64,
        pages: u64,
        off: u64,
    ) -> Result<(), String> {
        let mut i = 0;
        while i < pages {
            // SAFETY: `offset_of` checked the whole run against the block and the mapping.
            let zero = is_zero(unsafe { self.mem.slice(off + i * PAGE_SIZE, PAGE_SIZE as usize) });
            let mut j = i + 1;
            while j < pages {
                // SAFETY: as above, `j < pages` stays inside the checked run.
                let z = is_zero(unsafe { self.mem.slice(off + j * PAGE_SIZE, PAGE_SIZE as usize) });
                if z != zero {
                    break;
                }
                j += 1;
            }
            let run = PageRun {
                block,
                first: first + i,
                count: (j - i) as u32,
            };
            if zero {
                PeerMessage::ZeroPages(run).encode(&mut self.out);
                self.stats.zero_pages += run.count as u64;
            } else {
                run.encode_pages_header(&mut self.out);
                // SAFETY: as above.
                let data = unsafe { self.mem.slice(off + i * PAGE_SIZE, run.data_len()) };
                link::write_all_vectored(&mut peer.stream, &self.out, data)
                    .map_err(|e| self.peer_error(peer, e))?;
                self.stats.bytes_sent += (self.out.len() + data.len()) as u64;
                self.stats.pages_sent += run.count as u64;
                self.out.clear();
            }
            i = j;
        }
        if self.out.len() > 32 * 1024 {
            self.flush(peer)?;
        }
        Ok(())
    }

    fn flush(&mut self, peer: &mut Peer) -> Result<(), String> {
        if !self.out.is_empty() {
            std::io::Write::write_all(&mut peer.stream, &self.out)
                .map_err(|e| self.peer_error(peer, e))?;
            self.stats.bytes_sent += self.out.len() as u64;
            self.out.clear();
        }
        Ok(())
    }

    /// Turns a write error into the destination's own reason when it sent one.
    fn peer_error(&self, peer: &Peer, e: std::io::Error) -> String {
        match peer.rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(PeerMessage::Error(m))) => format!("destination failed: {m}"),
            _ => format!("destination connection: {e}"),
        }
    }

    fn bandwidth(&self) -> u64 {
        rate(self.send_bytes, self.send_time)
    }

    fn progress(&mut self, force: bool) {
        if force || self.last_progress.elapsed() >= PROGRESS_EVERY {
            self.last_progress = Instant::now();
            self.stats.total_us = self.started.elapsed().as_micros() as u64;
            let _ = send_local(&mut self.vmm, &LocalMessage::Progress(self.stats));
        }
    }
}

fn rate(amount: u64, over: Duration) -> u64 {
    let us = over.as_micros() as u64;
    if us == 0 {
        0
    } else {
        ((amount as u128 * 1_000_000) / us as u128) as u64
    }
}

/// A migration's identifier: unique enough to tell resumptions apart.
fn session_id() -> u64 {
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
