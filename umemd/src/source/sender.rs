//! Turns a range of guest pages into migration-stream frames: holes in the memfd become one
//! short record (or nothing), runs of zero pages a `ZeroPages` record, everything else `Pages`
//! frames whose data goes to the socket straight from umemd's mapping. Guest RAM is read only
//! through volatile views of it: the guest may be writing it meanwhile.

use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use proto::peer::{PageRun, PeerMessage, MAX_RUN_PAGES};
use proto::PAGE_SIZE;
use vm_memory::VolatileSlice;

use crate::mapping::{is_zero, DataExtents, GuestMapping, SegmentCache};
use crate::stream::PeerStream;

/// Runs of fewer data pages than this are copied into the batch of frames; longer ones leave
/// on their own, straight from the memfd (`sendfile` over TCP).
const SMALL_RUN_PAGES: u64 = 16;
/// Frames batched before they are written.
const BATCH_BYTES: usize = 256 << 10;
/// Bytes of guest RAM read through umemd's mapping before its page-table entries for them are
/// dropped again: umemd's resident set stays within this much (per sending thread).
const RESIDENT_WINDOW: u64 = 16 << 20;
/// The kernel's fault-around window (`fault_around_bytes`, 64 KiB by default).
const FAULT_AROUND: u64 = 64 << 10;

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
    /// Where the frozen memfd holds data, once found ([`PageSender::map_frozen`]).
    frozen_data: Option<DataExtents>,
    /// Holes announced but not yet written, grown while the next hole continues them, so that
    /// a sparse block costs one record rather than one per run.
    pending_holes: Option<(u32, u64, u64)>,
    /// Memfd ranges `[start, end)` read through the mapping since their entries were last
    /// dropped, and their bytes ([`PageSender::note_resident`]).
    resident: Vec<(u64, u64)>,
    resident_bytes: u64,
    /// Short segments read with `pread`, reused.
    scratch: Vec<u8>,
    /// Every range is read with `pread`, holes included, and never looked up with `lseek`
    /// ([`PageSender::for_requests`]).
    pread_only: bool,
}

impl PageSender {
    /// Forgets the memfd extents seen so far: call before each pass over memory while the guest
    /// may still fill holes.
    pub fn new_pass(&mut self) {
        self.extents = SegmentCache::default();
    }

    /// A sender of requested pages, from a memfd whose guest is stopped for good: each run is
    /// read with one `pread` (a hole reads as zeros and allocates nothing) and its zero pages
    /// go out as `ZeroPages`, with no `lseek`. An `lseek` on the memfd waits for the inode's
    /// lock, which the background's walk of every data extent (`SEEK_HOLE` over the whole
    /// memfd, [`PageSender::map_frozen`]) holds for about 17 ms per GiB: the first page a vCPU
    /// asked for after the switchover waited for it.
    pub fn for_requests() -> Self {
        PageSender {
            frozen: true,
            pread_only: true,
            ..Default::default()
        }
    }

    /// The guest is stopped for good: from now on pages may be asked for in any order. Data is
    /// then found a page at a time (one `lseek` each), which suits a few requested pages.
    pub fn freeze(&mut self) {
        self.frozen = true;
        self.extents = SegmentCache::default();
    }

    /// For passes over the whole of a frozen memfd: finds where it holds data once, in one
    /// walk (about 17 ms per GiB of data here, a tenth of a system call a page), so that every
    /// later range costs a binary search. Does nothing before [`PageSender::freeze`] or twice.
    pub fn map_frozen(&mut self, mem: &GuestMapping) {
        if self.frozen && self.frozen_data.is_none() {
            self.frozen_data = Some(mem.data_extents());
        }
    }

    /// Where the hole at memfd offset `off` ends, when it is known to be one (after
    /// [`PageSender::map_frozen`]).
    pub fn hole_end(&self, mem: &GuestMapping, off: u64) -> Option<u64> {
        self.frozen_data
            .as_ref()
            .and_then(|x| x.hole_end(off, mem.memfd_len()))
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
        let segments = match (&self.frozen_data, self.frozen) {
            _ if self.reads_with_pread(mem) => vec![(off, end - off, true)],
            (Some(x), _) => x.segments(off, end),
            (None, true) => mem.segments_frozen(off, end, &mut self.extents),
            (None, false) => mem.segments_cached(off, end, &mut self.extents),
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
        if self.out.len() >= BATCH_BYTES {
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
        let len = (pages * PAGE_SIZE) as usize;
        // A few pages (requested ones, or RAM a guest wrote here and there) are read with one
        // `pread`: they are copied into the batch anyway, and through the mapping each would
        // map (and later unmap) a 64 KiB fault-around window in umemd. Longer segments are read
        // through the mapping, which `sendfile` needs nothing of but the zero check.
        let mut scratch = std::mem::take(&mut self.scratch);
        let run_bytes = if pages < SMALL_RUN_PAGES || self.reads_with_pread(mem) {
            scratch.resize(len, 0);
            mem.file().read_exact_at(&mut scratch[..len], off)?;
            VolatileSlice::from(&mut scratch[..len])
        } else {
            self.note_resident(mem, off, len as u64);
            mem.volatile(off, len).map_err(io::Error::other)?
        };
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
                let len = ((j - i) * PAGE_SIZE) as usize;
                if j - i < SMALL_RUN_PAGES {
                    // Scattered pages (RAM a guest wrote here and there): frames batched with
                    // a copy, as one write, rather than three syscalls each on both sides.
                    let at_len = self.out.len();
                    self.out.resize(at_len + len, 0);
                    if at(i, j - i)?.copy_to(&mut self.out[at_len..]) != len {
                        return Err(io::Error::other("a short copy of guest RAM"));
                    }
                    if self.out.len() >= BATCH_BYTES {
                        self.flush(stream, c)?;
                    }
                } else if mem.hugetlb() {
                    stream.write_all_copied(&self.out, &at(i, j - i)?)?;
                    Counters::add(&c.bytes, (self.out.len() + len) as u64);
                    self.out.clear();
                } else {
                    stream.write_all_guest(&self.out, mem, off + i * PAGE_SIZE, len)?;
                    Counters::add(&c.bytes, (self.out.len() + len) as u64);
                    self.out.clear();
                }
                Counters::add(&c.pages, run.count as u64);
            }
            i = j;
        }
        self.scratch = scratch;
        Ok(())
    }

    /// True if every run is read with one `pread`: for requested pages
    /// ([`PageSender::for_requests`]), and on huge pages, where `lseek` finds no hole, a read
    /// through the mapping would allocate every hole it reads, and `sendfile` is refused (the
    /// data then leaves from the copy).
    fn reads_with_pread(&self, mem: &GuestMapping) -> bool {
        self.pread_only || mem.hugetlb()
    }

    /// Records that `[off, off+len)` is about to be read through the mapping, after dropping
    /// the entries of what was read before it once that reached [`RESIDENT_WINDOW`] bytes. A
    /// range continuing the last one extends it, so a pass over memory costs one drop a
    /// window. The drop comes after those pages were sent (`sendfile` holds the pages, not
    /// umemd's entries for them), and never covers the range about to be read, which would
    /// stay mapped until the next drop.
    fn note_resident(&mut self, mem: &GuestMapping, off: u64, len: u64) {
        if self.resident_bytes >= RESIDENT_WINDOW {
            for (start, end) in self.resident.drain(..) {
                mem.unmap_resident(start, end - start);
            }
            self.resident_bytes = 0;
        }
        // A read fault maps the pages around the one read too, up to 64 KiB aligned: note
        // what it may map.
        let start = off & !(FAULT_AROUND - 1);
        let end = (off + len).next_multiple_of(FAULT_AROUND);
        match self.resident.last_mut() {
            Some((s, e)) if (*s..=*e).contains(&start) => *e = (*e).max(end),
            _ => self.resident.push((start, end)),
        }
        self.resident_bytes += end - start;
    }

    /// Drops whatever is batched or half written: after the stream it was for failed, the
    /// next one must start on a frame boundary. (What was dropped was never received, so the
    /// destination's list of what it holds makes it go again.)
    pub fn reset(&mut self) {
        self.out.clear();
        self.pending_holes = None;
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

#[cfg(test)]
mod tests {
    use super::*;
    use proto::frame;
    use proto::local::LocalBlock;
    use proto::peer::{kind, RUN_HEADER_LEN};
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixStream;

    /// What a frame of the stream said: a message, or a `Pages` run with its first data byte.
    #[derive(Debug, PartialEq, Eq)]
    enum Frame {
        Msg(PeerMessage),
        Pages(PageRun, u8),
    }

    /// A 16-page block: pages 0-3 a hole, 4 zero, 5-6 data (5s and 6s), 7-15 a hole.
    fn guest() -> GuestMapping {
        let f = crate::testutil::sealed_memfd(16 * PAGE_SIZE);
        f.write_all_at(&[0u8; PAGE_SIZE as usize], 4 * PAGE_SIZE)
            .unwrap();
        f.write_all_at(&[5u8; PAGE_SIZE as usize], 5 * PAGE_SIZE)
            .unwrap();
        f.write_all_at(&[6u8; PAGE_SIZE as usize], 6 * PAGE_SIZE)
            .unwrap();
        let block = LocalBlock {
            desc: proto::BlockDesc {
                name: "ram".into(),
                guest_addr: 0,
                size: 16 * PAGE_SIZE,
            },
            memfd_offset: 0,
            host_addr: 0,
        };
        GuestMapping::new(f.into(), vec![block]).unwrap()
    }

    #[test]
    fn pages_sent_do_not_stay_mapped_beyond_the_window() {
        const CHUNK: u64 = 64;
        let pages = 3 * RESIDENT_WINDOW / PAGE_SIZE + 5 * CHUNK;
        let f = crate::testutil::sealed_memfd(pages * PAGE_SIZE);
        let data = vec![7u8; (CHUNK * PAGE_SIZE) as usize];
        for c in 0..pages / CHUNK {
            f.write_all_at(&data, c * CHUNK * PAGE_SIZE).unwrap();
        }
        let block = LocalBlock {
            desc: proto::BlockDesc {
                name: "ram".into(),
                guest_addr: 0,
                size: pages * PAGE_SIZE,
            },
            memfd_offset: 0,
            host_addr: 0,
        };
        let mem = GuestMapping::new(f.into(), vec![block]).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let drain = std::thread::spawn(move || std::io::copy(&mut b, &mut std::io::sink()));
        let mut stream = PeerStream::Unix(a);
        let c = Counters::default();
        let mut s = PageSender::default();
        s.freeze();
        s.map_frozen(&mem);
        let mut most = 0;
        for first in (0..pages).step_by(CHUNK as usize) {
            let off = first * PAGE_SIZE;
            s.send(&mut stream, &mem, 0, first, CHUNK, off, Holes::Announce, &c)
                .unwrap();
            most = most.max(mem.resident());
        }
        s.flush(&mut stream, &c).unwrap();
        drop(stream);
        drain.join().unwrap().unwrap();
        assert_eq!(Counters::get(&c.pages), pages);
        // The window and the run being read; nothing left behind by earlier windows.
        assert!(
            most <= RESIDENT_WINDOW + CHUNK * PAGE_SIZE,
            "{most} bytes mapped at most"
        );
        assert!(mem.resident() <= RESIDENT_WINDOW + CHUNK * PAGE_SIZE);
    }

    /// Sends the whole block with `holes`, then decodes what went on the wire.
    fn send(holes: Holes) -> (Vec<Frame>, Counters) {
        let mut s = PageSender::default();
        s.new_pass();
        send_with(s, &guest(), holes)
    }

    /// Sends the whole block of `mem` with `s` and `holes`, then decodes what went on the wire.
    fn send_with(mut s: PageSender, mem: &GuestMapping, holes: Holes) -> (Vec<Frame>, Counters) {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut stream = PeerStream::Unix(a);
        let c = Counters::default();
        s.send(&mut stream, mem, 0, 0, 16, 0, holes, &c).unwrap();
        s.flush(&mut stream, &c).unwrap();
        drop(stream);
        let mut wire = Vec::new();
        b.read_to_end(&mut wire).unwrap();
        assert_eq!(wire.len() as u64, Counters::get(&c.bytes));
        let mut frames = Vec::new();
        let mut rest = &wire[..];
        while let Some((p, body, more)) = frame::split(rest).unwrap() {
            if p.kind == kind::PAGES {
                let hdr: &[u8; RUN_HEADER_LEN] = body[..RUN_HEADER_LEN].try_into().unwrap();
                let run = PageRun::decode_pages_header(p, hdr).unwrap();
                let data = &body[RUN_HEADER_LEN..];
                assert_eq!(data.len(), run.data_len());
                for (i, page) in data.chunks(PAGE_SIZE as usize).enumerate() {
                    let want = (run.first + i as u64) as u8;
                    assert!(
                        page.iter().all(|&x| x == want),
                        "page {}",
                        run.first + i as u64
                    );
                }
                frames.push(Frame::Pages(run, data[0]));
            } else {
                frames.push(Frame::Msg(PeerMessage::decode(p.kind, body).unwrap()));
            }
            rest = more;
        }
        assert!(rest.is_empty());
        (frames, c)
    }

    fn run(first: u64, count: u32) -> PageRun {
        PageRun {
            block: 0,
            first,
            count,
        }
    }

    fn data_and_zero() -> [Frame; 2] {
        [
            Frame::Msg(PeerMessage::ZeroPages(run(4, 1))),
            Frame::Pages(run(5, 2), 5),
        ]
    }

    #[test]
    fn holes_skipped() {
        let (frames, c) = send(Holes::Skip);
        assert_eq!(frames, data_and_zero());
        assert_eq!(Counters::get(&c.holes), 13);
        assert_eq!(Counters::get(&c.zero_pages), 1);
        assert_eq!(Counters::get(&c.pages), 2);
    }

    #[test]
    fn holes_announced_in_one_record_each() {
        let (frames, c) = send(Holes::Announce);
        let holes = |first, count| {
            Frame::Msg(PeerMessage::Holes {
                block: 0,
                first,
                count,
            })
        };
        let [zero, data] = data_and_zero();
        assert_eq!(frames, vec![holes(0, 4), zero, data, holes(7, 9)]);
        assert_eq!(Counters::get(&c.holes), 13);
        assert_eq!(Counters::get(&c.zero_pages), 1);
        assert_eq!(Counters::get(&c.pages), 2);
    }

    #[test]
    fn holes_sent_as_zero_pages() {
        let (frames, c) = send(Holes::AsZero);
        let zero = |first, count| Frame::Msg(PeerMessage::ZeroPages(run(first, count)));
        let [z4, data] = data_and_zero();
        assert_eq!(frames, vec![zero(0, 4), z4, data, zero(7, 9)]);
        assert_eq!(Counters::get(&c.holes), 13);
        assert_eq!(Counters::get(&c.zero_pages), 14);
        assert_eq!(Counters::get(&c.pages), 2);
    }

    #[test]
    fn requested_pages_are_read_without_lseek_and_holes_stay_holes() {
        use std::io::Seek;
        let zero = |first, count| Frame::Msg(PeerMessage::ZeroPages(run(first, count)));
        let [_, data] = data_and_zero();
        let mem = guest();
        let (frames, c) = send_with(PageSender::for_requests(), &mem, Holes::AsZero);
        // The same pages as a frozen sender's, holes read as zero pages.
        assert_eq!(frames, vec![zero(0, 5), data, zero(7, 9)]);
        assert_eq!(Counters::get(&c.zero_pages), 14);
        assert_eq!(Counters::get(&c.pages), 2);
        // No lseek moved the memfd's offset (a `SEEK_DATA` would), and reading the holes
        // allocated nothing.
        assert_eq!(mem.file().stream_position().unwrap(), 0);
        assert!(!mem.has_data(0, 4 * PAGE_SIZE));
        assert!(!mem.has_data(7 * PAGE_SIZE, 9 * PAGE_SIZE));
        // The frozen sender, for comparison, looks data up with lseek.
        let mut frozen = PageSender::default();
        frozen.freeze();
        send_with(frozen, &mem, Holes::AsZero);
        assert_ne!(mem.file().stream_position().unwrap(), 0);
    }

    #[test]
    fn on_huge_pages_every_page_is_read_with_pread_and_no_hole_is_allocated() {
        use std::os::unix::fs::MetadataExt;
        let pages = 2 * proto::HUGE_PAGE_SIZE / PAGE_SIZE;
        let Some(f) = crate::testutil::sealed_huge_memfd(pages * PAGE_SIZE) else {
            return;
        };
        let mem = GuestMapping::new(f.into(), crate::testutil::blocks(&[pages])).unwrap();
        assert!(mem.hugetlb());
        // Data in the first huge page only: a long run (sent from the copy, as hugetlbfs
        // refuses sendfile) and a short one.
        let data: Vec<u8> = (100..140u64)
            .flat_map(|p| vec![p as u8; PAGE_SIZE as usize])
            .collect();
        mem.write_at(100 * PAGE_SIZE, &data).unwrap();
        mem.write_at(7 * PAGE_SIZE, &[7u8; PAGE_SIZE as usize])
            .unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut wire = Vec::new();
            b.read_to_end(&mut wire).unwrap();
            wire
        });
        let mut stream = PeerStream::Unix(a);
        let c = Counters::default();
        let mut s = PageSender::default();
        s.new_pass();
        s.send(&mut stream, &mem, 0, 0, pages, 0, Holes::Announce, &c)
            .unwrap();
        s.flush(&mut stream, &c).unwrap();
        drop(stream);
        let wire = reader.join().unwrap();
        let mut rest = &wire[..];
        let (mut data_pages, mut zero_pages) = (Vec::new(), 0);
        while let Some((p, body, more)) = frame::split(rest).unwrap() {
            match PeerMessage::decode(p.kind, body) {
                _ if p.kind == kind::PAGES => {
                    let hdr: &[u8; RUN_HEADER_LEN] = body[..RUN_HEADER_LEN].try_into().unwrap();
                    let run = PageRun::decode_pages_header(p, hdr).unwrap();
                    for (i, page) in body[RUN_HEADER_LEN..]
                        .chunks(PAGE_SIZE as usize)
                        .enumerate()
                    {
                        let at = run.first + i as u64;
                        assert!(page.iter().all(|&x| x == at as u8), "page {at}");
                        data_pages.push(at);
                    }
                }
                Ok(PeerMessage::ZeroPages(r)) => zero_pages += r.count as u64,
                other => panic!("unexpected {other:?}"),
            }
            rest = more;
        }
        let mut want: Vec<u64> = (100..140).collect();
        want.insert(0, 7);
        assert_eq!(data_pages, want);
        assert_eq!(zero_pages, pages - 41, "a hole reads as zero pages");
        // The second huge page, never written, was read as zeros without being allocated.
        assert_eq!(
            mem.file().metadata().unwrap().blocks() * 512,
            proto::HUGE_PAGE_SIZE
        );
    }

    #[test]
    fn announced_holes_merge_across_runs() {
        let mem = guest();
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut stream = PeerStream::Unix(a);
        let c = Counters::default();
        let mut s = PageSender::default();
        s.new_pass();
        // Pages 7-15 in three runs: one record.
        for (first, count) in [(7, 3), (10, 3), (13, 3)] {
            let off = mem.offset_of(0, first, count).unwrap();
            s.send(&mut stream, &mem, 0, first, count, off, Holes::Announce, &c)
                .unwrap();
        }
        s.flush(&mut stream, &c).unwrap();
        drop(stream);
        let mut wire = Vec::new();
        b.read_to_end(&mut wire).unwrap();
        let (p, body, rest) = frame::split(&wire).unwrap().unwrap();
        assert!(rest.is_empty());
        assert_eq!(
            PeerMessage::decode(p.kind, body).unwrap(),
            PeerMessage::Holes {
                block: 0,
                first: 7,
                count: 9
            }
        );
    }
}
