//! The urgent receiver: reads the urgent channel, which carries only requested pages, and
//! places them as they come.

use std::io::{BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use proto::frame::{FramePrefix, PREFIX_LEN};
use proto::peer::{kind, PageRun, PeerMessage, MAX_RUN_PAGES, RUN_HEADER_LEN};
use proto::PAGE_SIZE;

use super::error::DestError;
use super::fault::FaultHandler;
use super::handshake::unexpected;
use crate::mapping::GuestMapping;
use crate::stream::PeerStream;

/// Counters of the urgent channel, read by the main thread for the statistics.
#[derive(Debug, Default)]
pub(super) struct UrgentCounters {
    pub(super) pages: AtomicU64,
    pub(super) zero_pages: AtomicU64,
    pub(super) bytes: AtomicU64,
}

/// Reads the urgent channel: requested pages, placed as they come.
pub(super) struct UrgentReceiver {
    pub(super) fault: Arc<FaultHandler>,
    pub(super) mem: Arc<GuestMapping>,
    pub(super) counters: Arc<UrgentCounters>,
    pub(super) stream: PeerStream,
}

impl UrgentReceiver {
    /// Places what comes until the source closes the channel.
    pub(super) fn run(mut self) -> Result<(), DestError> {
        // A burst of requested pages comes many to a read; a read of a whole run's pages
        // bypasses the buffer.
        let mut stream = BufReader::with_capacity(64 << 10, &mut self.stream);
        let (fault, counters) = (&self.fault, &self.counters);
        let check = |block, first, count| {
            self.mem
                .offset_of(block, first, count)
                .map(|_| ())
                .map_err(DestError::BadPages)
        };
        const CONTEXT: &str = "urgent channel";
        let malformed = |err| DestError::Malformed {
            context: CONTEXT,
            err,
        };
        let mut prefix = [0u8; PREFIX_LEN];
        let mut buf = vec![0u8; MAX_RUN_PAGES as usize * PAGE_SIZE as usize];
        let mut body = Vec::new();
        // The source closes it when the migration ends, successfully or not, and a lost link
        // cuts it anywhere, mid-frame too: the main stream tells which, and decides. A read
        // that fails ends this thread quietly (the pages of a cut frame stay requested).
        loop {
            if stream.read_exact(&mut prefix).is_err() {
                return Ok(());
            }
            let p = FramePrefix::parse(&prefix).map_err(|err| DestError::Frame {
                context: CONTEXT,
                err,
            })?;
            if p.kind == kind::PAGES {
                let mut hdr = [0u8; RUN_HEADER_LEN];
                if stream.read_exact(&mut hdr).is_err() {
                    return Ok(());
                }
                let run = PageRun::decode_pages_header(p, &hdr).map_err(malformed)?;
                check(run.block, run.first, run.count as u64)?;
                let len = run.data_len();
                if stream.read_exact(&mut buf[..len]).is_err() {
                    return Ok(());
                }
                let arrived = std::time::Instant::now();
                fault.place_arrived(run.block, run.first, &buf[..len], Some(arrived))?;
                counters
                    .pages
                    .fetch_add(run.count as u64, Ordering::Relaxed);
                counters.bytes.fetch_add(
                    (PREFIX_LEN + RUN_HEADER_LEN + len) as u64,
                    Ordering::Relaxed,
                );
                continue;
            }
            body.resize(p.len as usize, 0);
            if stream.read_exact(&mut body).is_err() {
                return Ok(());
            }
            match PeerMessage::decode(p.kind, &body).map_err(malformed)? {
                PeerMessage::ZeroPages(run) => {
                    check(run.block, run.first, run.count as u64)?;
                    fault.zero(run.block, run.first, run.count as u64)?;
                    counters
                        .zero_pages
                        .fetch_add(run.count as u64, Ordering::Relaxed);
                    counters
                        .bytes
                        .fetch_add((PREFIX_LEN + p.len as usize) as u64, Ordering::Relaxed);
                }
                other => return Err(unexpected("pages on the urgent channel", &other)),
            }
        }
    }
}
