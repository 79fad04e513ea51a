//! Turns a range of guest pages into migration-stream frames: holes in the memfd become one
//! short record (or nothing), runs of zero pages a `ZeroPages` record, everything else `Pages`
//! frames whose data goes to the socket straight from umemd's mapping. Guest RAM is read only
//! through volatile views of it: the guest may be writing it meanwhile.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use proto::peer::{PageRun, PeerMessage, MAX_RUN_PAGES};
use proto::PAGE_SIZE;

use crate::link;
use crate::mapping::{is_zero, GuestMapping, SegmentCache};
use crate::stream::PeerStream;

/// Byte and page counters of the sending side, shared by the threads that send.
#[derive(Debug, Default)]
pub struct Counters {
    /// Pages sent with their contents.
    pub pages: AtomicU64,
    /// Pages sent as zero records.
    pub zero_pages: AtomicU64,
    /// Pages that were holes in the memfd.
    pub holes: AtomicU64,
    /// Bytes written to the streams.
    pub bytes: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// What to do with pages that are holes in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holes {
    /// Nothing: the destination's memory is fresh and reads as zero there too (first precopy
    /// round).
    Skip,
    /// A `Holes` record, so a postcopy destination knows they need not be fetched.
    Announce,
    /// Their pages are dirty and must be sent like any other (later precopy rounds): zero.
    AsZero,
}

/// Writes page frames to one stream, batching small records.
#[derive(Debug, Default)]
pub struct PageSender {
    out: Vec<u8>,
    extents: SegmentCache,
    /// The guest is stopped for good: its memfd no longer changes.
    frozen: bool,
    /// Holes announced but not yet written, grown while the next hole continues them, so that
    /// a sparse block costs one record rather than one per run.
    pending_holes: Option<(u32, u64, u64)>,
}

impl PageSender {
    /// Forgets the memfd extents seen so far: call before each pass over memory while the guest
    /// may still fill holes.
    pub fn new_pass(&mut self) {
        self.extents = SegmentCache::default();
    }

    /// The guest is stopped for good: from now on pages may be asked for in any order.
    pub fn freeze(&mut self) {
        self.frozen = true;
        self.extents = SegmentCache::default();
    }

    /// Sends pages `[first, first+count)` of `block`, which the caller checked against the
    /// layout, from memfd offset `off`.
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &mut self,
        stream: &mut PeerStream,
        mem: &GuestMapping,
        block: u32,
        first: u64,
        count: u64,
        off: u64,
        holes: Holes,
        c: &Counters,
    ) -> io::Result<()> {
        let end = off + count * PAGE_SIZE;
        let segments = if self.frozen {
            mem.segments_frozen(off, end, &mut self.extents)
        } else {
            mem.segments_cached(off, end, &mut self.extents)
        };
        for (seg_off, seg_len, data) in segments {
            let seg_first = first + (seg_off - off) / PAGE_SIZE;
            let seg_pages = seg_len / PAGE_SIZE;
            if data {
                self.send_data(stream, mem, block, seg_first, seg_pages, seg_off, c)?;
                continue;
            }
            Counters::add(&c.holes, seg_pages);
            match holes {
                Holes::Skip => {}
                Holes::Announce => match &mut self.pending_holes {
                    Some((b, f, n)) if *b == block && *f + *n == seg_first => *n += seg_pages,
                    _ => {
                        self.write_pending_holes();
                        self.pending_holes = Some((block, seg_first, seg_pages));
                    }
                },
                Holes::AsZero => {
                    let mut p = seg_first;
                    while p < seg_first + seg_pages {
                        let n = (seg_first + seg_pages - p).min(MAX_RUN_PAGES as u64);
                        PeerMessage::ZeroPages(PageRun {
                            block,
                            first: p,
                            count: n as u32,
                        })
                        .encode(&mut self.out);
                        Counters::add(&c.zero_pages, n);
                        p += n;
                    }
                }
            }
        }
        if self.out.len() > 32 * 1024 {
            self.flush(stream, c)?;
        }
        Ok(())
    }

    /// Populated pages: runs of non-zero pages with their data, runs of zero pages as records.
    #[allow(clippy::too_many_arguments)]
    fn send_data(
        &mut self,
        stream: &mut PeerStream,
        mem: &GuestMapping,
        block: u32,
        first: u64,
        pages: u64,
        off: u64,
        c: &Counters,
    ) -> io::Result<()> {
        let run_bytes = mem
            .volatile(off, (pages * PAGE_SIZE) as usize)
            .map_err(io::Error::other)?;
        let at = |i: u64, n: u64| {
            run_bytes
                .subslice((i * PAGE_SIZE) as usize, (n * PAGE_SIZE) as usize)
                .map_err(io::Error::other)
        };
        self.write_pending_holes();
        let mut i = 0;
        while i < pages {
            let zero = is_zero(&at(i, 1)?);
            let mut j = i + 1;
            while j < pages && j - i < MAX_RUN_PAGES as u64 && is_zero(&at(j, 1)?) == zero {
                j += 1;
            }
            let run = PageRun {
                block,
                first: first + i,
                count: (j - i) as u32,
            };
            if zero {
                PeerMessage::ZeroPages(run).encode(&mut self.out);
                Counters::add(&c.zero_pages, run.count as u64);
            } else {
                run.encode_pages_header(&mut self.out);
                let data = at(i, j - i)?;
                link::write_all_vectored(stream.as_fd(), &self.out, &data)?;
                Counters::add(&c.bytes, (self.out.len() + data.len()) as u64);
                Counters::add(&c.pages, run.count as u64);
                self.out.clear();
            }
            i = j;
        }
        Ok(())
    }

    /// Queues one small message.
    pub fn push(&mut self, msg: &PeerMessage) {
        self.write_pending_holes();
        msg.encode(&mut self.out);
    }

    fn write_pending_holes(&mut self) {
        if let Some((block, first, count)) = self.pending_holes.take() {
            PeerMessage::Holes {
                block,
                first,
                count,
            }
            .encode(&mut self.out);
        }
    }

    /// Writes whatever is batched.
    pub fn flush(&mut self, stream: &mut PeerStream, c: &Counters) -> io::Result<()> {
        self.write_pending_holes();
        if !self.out.is_empty() {
            stream.write_all(&self.out)?;
            Counters::add(&c.bytes, self.out.len() as u64);
            self.out.clear();
        }
        Ok(())
    }
}
