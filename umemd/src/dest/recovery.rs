//! Postcopy recovery, destination side: when the link to the source fails while the VM runs
//! here, the VM keeps running on the pages it has (a vCPU that touches a missing page waits,
//! its fault recorded as a request), and the destination waits on its listener for the source
//! of the same session. It tells the source which pages it holds, and once the source says it
//! knows (`Resumed`), requests again every page still waited for.

use std::net::Shutdown;
use std::time::Instant;

use log::{info, warn};
use proto::local::LocalMessage;
use proto::peer::MAX_RUN_PAGES;
use proto::peer::{PageRun, PeerMessage, CAP_RECOVERY, MAX_RECEIVED_WORDS, VERSION};

use super::error::DestError;
use super::handshake::{read_frame_by, unexpected};
use super::pages::PageState;
use super::phase::DestPhase;
use super::{write_peer, Dest, PeerWriter, HANDSHAKE_TIMEOUT};
use crate::link::{send_local, send_peer};
use crate::stream::PeerStream;

impl Dest {
    /// Pauses on `cause` and waits, for as long as it takes, for the source of `session_id` to
    /// connect again; returns the new main stream once the resume handshake is done. The
    /// connection of anybody else is refused and the wait goes on.
    pub(super) fn pause_until_resumed(
        &mut self,
        cause: DestError,
        writer: &PeerWriter,
        session_id: u64,
    ) -> Result<PeerStream, DestError> {
        warn!(
            "{}: postcopy paused: {cause}; the VM runs on the pages it has, waiting for the source",
            self.vm
        );
        // Both old connections end here, so their threads do.
        let _ = writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown(Shutdown::Both);
        if let Some(u) = self.urgent_stream.take() {
            let _ = u.shutdown(Shutdown::Both);
        }
        self.set_phase(DestPhase::PostcopyPaused)?;
        self.paused_since = Some(Instant::now());
        let _ = send_local(
            &mut self.vmm,
            &LocalMessage::PostcopyPaused {
                reason: cause.to_string(),
            },
        );
        self.progress(true);
        self.wait_for_source(session_id)
    }

    /// Accepts connections until the source of `session_id` is back; returns its main stream.
    fn wait_for_source(&mut self, session_id: u64) -> Result<PeerStream, DestError> {
        loop {
            self.check_threads()?;
            let (s, _) = self.accept(None, "the source back", |m| match m {
                PeerMessage::Hello {
                    version,
                    capabilities,
                    session_id: id,
                    ..
                } if *version == VERSION
                    && *id == session_id
                    && capabilities & CAP_RECOVERY != 0 =>
                {
                    Ok(())
                }
                other => Err(unexpected(
                    &format!("the hello of session {session_id:#x} with recovery"),
                    other,
                )
                .to_string()),
            })?;
            match self.resume_handshake(s, session_id) {
                Ok(s) => return Ok(s),
                Err(e) => warn!("{}: refusing a connection while paused: {e}", self.vm),
            }
        }
    }

    /// A umemd started again, taking over postcopy session `session_id` from one that died:
    /// what the memfd holds is what arrived; every thread that waited on a fault the dead
    /// umemd had read faults again; then the source is waited for as after a lost link.
    pub(super) fn receive_after_restart(
        &mut self,
        writer_slot: &mut Option<PeerWriter>,
        session_id: u64,
    ) -> Result<(), DestError> {
        let uri = self.listen_uri.clone();
        send_local(&mut self.vmm, &LocalMessage::Listening { uri }).map_err(DestError::Vmm)?;
        let _ = send_local(&mut self.vmm, &LocalMessage::Session(session_id));
        self.started = Instant::now();
        let mut present = 0;
        // On huge pages `lseek` takes all of the memfd for data, so nothing can be told from
        // it: every page counts as still to come. The source then sends them all again, and
        // a huge page that is here already is found so when it is placed (`EEXIST`), and
        // left as it is.
        let blocks = if self.mem.hugetlb() {
            &[][..]
        } else {
            self.mem.blocks()
        };
        for (block, b) in blocks.iter().enumerate() {
            for (off, len, data) in self
                .mem
                .segments(b.memfd_offset, b.memfd_offset + b.desc.size)
            {
                if data {
                    let first = (off - b.memfd_offset) / proto::PAGE_SIZE;
                    let count = len / proto::PAGE_SIZE;
                    self.pages
                        .set_range(block as u32, first, count, PageState::Present);
                    present += count;
                }
            }
        }
        self.switching_to_postcopy = true;
        self.source_recovery = true;
        self.set_phase(DestPhase::PostcopyPaused)?;
        self.paused_since = Some(Instant::now());
        // Until the source is back, requests go nowhere (the pages stay requested).
        let (nowhere, _) = std::os::unix::net::UnixStream::pair().map_err(DestError::Peer)?;
        let writer: PeerWriter =
            std::sync::Arc::new(std::sync::Mutex::new(PeerStream::Unix(nowhere)));
        *writer_slot = Some(writer.clone());
        self.start_fault_thread(writer.clone())?;
        if let Some(pc) = &self.postcopy {
            pc.fault.wake_all();
        }
        self.start_heartbeats(writer.clone())?;
        info!(
            "{}: took over postcopy session {session_id:#x}: {present} pages present, {} to come; waiting for the source",
            self.vm,
            self.pages.unresolved()
        );
        self.progress(true);
        let peer = self.wait_for_source(session_id)?;
        self.stream_until_done(peer, &writer, session_id)
    }

    /// Answers the source's hello (the same session, with recovery: [`Self::accept`] checked
    /// it), then its `Resume`, the pages held here, and its new urgent channel, all within the
    /// handshake deadline.
    fn resume_handshake(
        &mut self,
        mut s: PeerStream,
        session_id: u64,
    ) -> Result<PeerStream, DestError> {
        const CONTEXT: &str = "resume handshake";
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut body = Vec::new();
        send_peer(
            &mut s,
            &PeerMessage::Hello {
                version: VERSION,
                capabilities: self.capabilities(),
                session_id,
                link_timeout_ms: self.link_timeout.as_millis() as u32,
            },
        )
        .map_err(DestError::Peer)?;
        let p = read_frame_by(&mut s, &mut body, deadline, CONTEXT)?;
        match PeerMessage::decode(p.kind, &body) {
            Ok(PeerMessage::Resume { session_id: id }) if id == session_id => {}
            Ok(other) => return Err(unexpected("Resume", &other)),
            Err(err) => {
                return Err(DestError::Malformed {
                    context: CONTEXT,
                    err,
                })
            }
        }
        self.send_held_pages(&mut s)?;
        s.set_link_timeout(self.link_timeout)
            .and_then(|()| s.set_read_timeout(Some(self.link_timeout)))
            .map_err(DestError::Peer)?;
        self.accept_urgent(session_id, deadline)?;
        info!("{}: the source is back; resuming", self.vm);
        Ok(s)
    }

    /// `Received` for every page present or known to be zero, then `ReceivedEnd`.
    fn send_held_pages(&self, s: &mut PeerStream) -> Result<(), DestError> {
        for block in 0..self.mem.blocks().len() as u32 {
            let pages = self.pages.block_pages(block);
            let mut words = vec![0u64; pages.div_ceil(64) as usize];
            for page in 0..pages {
                if matches!(
                    self.pages.get(block, page),
                    PageState::Present | PageState::Zero
                ) {
                    words[(page / 64) as usize] |= 1 << (page % 64);
                }
            }
            for (i, chunk) in words.chunks(MAX_RECEIVED_WORDS).enumerate() {
                send_peer(
                    s,
                    &PeerMessage::Received {
                        block,
                        first_page: (i * MAX_RECEIVED_WORDS * 64) as u64,
                        words: chunk.to_vec(),
                    },
                )
                .map_err(DestError::Peer)?;
            }
        }
        send_peer(s, &PeerMessage::ReceivedEnd).map_err(DestError::Peer)
    }

    /// The source knows what is here: the new stream becomes the one requests go on, and every
    /// page a vCPU still waits for is requested again.
    pub(super) fn resumed(
        &mut self,
        peer: &PeerStream,
        writer: &PeerWriter,
    ) -> Result<(), DestError> {
        *writer.lock().unwrap_or_else(|p| p.into_inner()) =
            peer.try_clone().map_err(DestError::Peer)?;
        let mut again = 0u64;
        for block in 0..self.mem.blocks().len() as u32 {
            let pages = self.pages.block_pages(block);
            let mut page = 0;
            while page < pages {
                if self.pages.get(block, page) != PageState::Requested {
                    page += 1;
                    continue;
                }
                let first = page;
                while page < pages
                    && page - first < MAX_RUN_PAGES as u64
                    && self.pages.get(block, page) == PageState::Requested
                {
                    page += 1;
                }
                let run = PageRun {
                    block,
                    first,
                    count: (page - first) as u32,
                };
                write_peer(writer, &PeerMessage::PageRequest(run))?;
                again += run.count as u64;
            }
        }
        if let Some(t) = self.paused_since.take() {
            self.paused += t.elapsed();
        }
        self.recoveries += 1;
        self.set_phase(DestPhase::Postcopy)?;
        info!(
            "{}: postcopy resumed; {again} pages requested again, {} to come",
            self.vm,
            self.pages.unresolved()
        );
        self.progress(true);
        Ok(())
    }
}
