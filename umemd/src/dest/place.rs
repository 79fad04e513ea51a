//! Where a page goes on the destination, in one place: before the VM runs, into the memfd with
//! `pwrite` (or a punched hole for zero pages); once it runs, only with `UFFDIO_COPY`. The
//! checks of each frame are [`Dest`]'s; the writing is [`Placement`]'s, which the placing
//! thread ([`super::placer`]) holds.

use std::io::Read;
use std::sync::Arc;

use proto::frame::{FramePrefix, PREFIX_LEN};
use proto::peer::{PageRun, RUN_HEADER_LEN};
use proto::PAGE_SIZE;

use super::error::DestError;
use super::fault::FaultHandler;
use super::pages::{PageState, PageTable};
use super::phase::DestPhase;
use super::Dest;
use crate::mapping::GuestMapping;

impl Dest {
    /// Pages flow before the machine state (precopy) and after the commit (postcopy), never
    /// in between: a loaded state waits for its commit with RAM as the source left it.
    pub(super) fn check_pages_allowed(&self) -> Result<(), DestError> {
        if self.phase == DestPhase::Loaded {
            return Err(DestError::Protocol(
                "the source sent pages after the machine state",
            ));
        }
        Ok(())
    }

    /// Pages are dropped only before the machine state: a dropped page reads as zeros, so once
    /// the state is loaded a discard would change RAM under it (the commit would then run the
    /// VM over the hole), and once the VM runs it would lose a page the VM wrote. The ranges
    /// are checked too: an empty one is no page the source ever sent.
    pub(super) fn check_discard(&self, ranges: &[(u64, u32)]) -> Result<(), DestError> {
        check_discard(self.phase, ranges)
    }

    /// The memfd offset of pages the source sent, checked against the layout.
    pub(super) fn checked_offset(
        &self,
        block: u32,
        first: u64,
        count: u64,
    ) -> Result<u64, DestError> {
        self.mem
            .offset_of(block, first, count)
            .map_err(DestError::BadPages)
    }

    /// Where this session's pages go, for the placing thread or for a caller that places
    /// them itself.
    pub(super) fn placement(&self) -> Placement {
        Placement::new(
            self.mem.clone(),
            self.pages.clone(),
            self.postcopy.as_ref().map(|pc| pc.fault.clone()),
        )
    }

    /// Checks a zero run or hole of the stream, and counts it as pushed once the VM runs.
    pub(super) fn check_zero(
        &mut self,
        block: u32,
        first: u64,
        count: u64,
    ) -> Result<(), DestError> {
        self.check_pages_allowed()?;
        self.checked_offset(block, first, count)?;
        if self.phase.running() {
            if let Some(pc) = self.postcopy.as_mut() {
                pc.pushed += count;
            }
        }
        Ok(())
    }

    /// Pages that read as zero: before the VM runs they become holes; afterwards they are
    /// placed only if a vCPU touches them. Public, like [`Dest::receive_pages`] and
    /// [`Dest::discard`], so that the stable fuzzer (`fuzz/`) can drive it.
    pub fn zero(&mut self, block: u32, first: u64, count: u64) -> Result<(), DestError> {
        self.check_zero(block, first, count)?;
        self.placement()
            .zero(block, first, count, self.phase.running())
    }

    /// Reads the header of a `PAGES` frame whose prefix `p` was read, checks the run against
    /// the phase and the layout, and counts it: the run and its memfd offset. Its data follows.
    pub(super) fn run_header(
        &mut self,
        peer: &mut impl Read,
        p: FramePrefix,
    ) -> Result<(PageRun, u64), DestError> {
        let mut hdr = [0u8; RUN_HEADER_LEN];
        read_exact(peer, &mut hdr)?;
        let run = PageRun::decode_pages_header(p, &hdr).map_err(|err| DestError::Malformed {
            context: "source stream",
            err,
        })?;
        self.check_pages_allowed()?;
        let off = self.checked_offset(run.block, run.first, run.count as u64)?;
        // Pages for a running VM without a userfaultfd are refused where they are placed
        // ([`Placement::pages`]).
        if let (true, Some(pc)) = (self.phase.running(), self.postcopy.as_mut()) {
            pc.pushed += run.count as u64;
        }
        self.stats.pages_sent += run.count as u64;
        self.stats.bytes_sent += (PREFIX_LEN + RUN_HEADER_LEN + run.data_len()) as u64;
        Ok((run, off))
    }

    /// Reads the header and data of a `PAGES` frame whose prefix `p` was read, then places
    /// the run.
    pub fn receive_pages(&mut self, peer: &mut impl Read, p: FramePrefix) -> Result<(), DestError> {
        let (run, off) = self.run_header(peer, p)?;
        let len = run.data_len();
        read_exact(peer, &mut self.buf[..len])?;
        self.placement()
            .pages(run, off, &self.buf[..len], self.phase.running())
    }

    /// Checks a discard frame whole (see [`Dest::check_discard`]) before any page is dropped.
    pub(super) fn checked_discard(
        &self,
        block: u32,
        ranges: &[(u64, u32)],
    ) -> Result<(), DestError> {
        self.check_discard(ranges)?;
        for &(first, count) in ranges {
            self.mem
                .offset_of(block, first, count as u64)
                .map_err(DestError::BadDiscard)?;
            // Huge pages are dropped whole or not at all (a hole punched in part of one is
            // written with zeros): the source was told so in the handshake.
            let whole =
                self.mem
                    .widen_to_pages_of(self.mem.page_size(), block, first, count as u64);
            if whole != (first, count as u64) {
                return Err(DestError::Protocol(
                    "the source discarded part of a huge page",
                ));
            }
        }
        Ok(())
    }

    /// Drops pages the source sent earlier and dirtied since: they are holes and missing
    /// again. Only before the machine state (see [`Dest::check_discard`]). A frame with an
    /// empty range or one outside the layout is refused whole, before any page is dropped.
    pub fn discard(&mut self, block: u32, ranges: &[(u64, u32)]) -> Result<(), DestError> {
        self.checked_discard(block, ranges)?;
        self.placement().discard(block, ranges)
    }
}

/// Where a page goes, as plain shared parts: the placing thread holds one, and so does a
/// caller that places pages itself. The frame was checked against the phase and the layout.
#[derive(Clone)]
pub(super) struct Placement {
    mem: Arc<GuestMapping>,
    pages: Arc<PageTable>,
    fault: Option<Arc<FaultHandler>>,
}

impl Placement {
    /// Pages go into `mem`, their state into `pages`, and once the VM runs through `fault`.
    pub(super) fn new(
        mem: Arc<GuestMapping>,
        pages: Arc<PageTable>,
        fault: Option<Arc<FaultHandler>>,
    ) -> Self {
        Placement { mem, pages, fault }
    }

    /// Writes a run's `data` into guest RAM at memfd offset `off`: with `pwrite` into the
    /// memfd before the VM runs (nothing else touches it then), with `UFFDIO_COPY` once it
    /// runs.
    pub(super) fn pages(
        &self,
        run: PageRun,
        off: u64,
        data: &[u8],
        running: bool,
    ) -> Result<(), DestError> {
        if running {
            let Some(fault) = self.fault.as_ref() else {
                return Err(DestError::Protocol(
                    "pages after the switchover without a userfaultfd",
                ));
            };
            fault.place(run.block, run.first, data)?;
        } else {
            // Written with pwrite rather than through the mapping: a whole-page write into the
            // memfd allocates the page without zeroing it first and without a page fault per
            // page (on huge pages, which refuse pwrite, through a mapping of those written).
            // No vCPU runs yet, so nothing else writes guest RAM now.
            self.mem.write_at(off, data).map_err(DestError::Write)?;
            self.pages
                .set_range(run.block, run.first, run.count as u64, PageState::Present);
        }
        Ok(())
    }

    /// Pages that read as zero: before the VM runs they become holes; afterwards they are
    /// placed only if a vCPU waits for them.
    pub(super) fn zero(
        &self,
        block: u32,
        first: u64,
        count: u64,
        running: bool,
    ) -> Result<(), DestError> {
        if running {
            if let Some(fault) = self.fault.as_ref() {
                fault.zero(block, first, count)?;
            }
            return Ok(());
        }
        let off = self
            .mem
            .offset_of(block, first, count)
            .map_err(DestError::BadPages)?;
        // Usually a hole already (fresh memory); only pages written earlier need dropping.
        if self.mem.has_data(off, count * PAGE_SIZE) {
            self.mem.punch_hole(off, count * PAGE_SIZE)?;
        }
        self.pages.set_range(block, first, count, PageState::Zero);
        Ok(())
    }

    /// Drops pages sent earlier: holes, and missing again. The ranges were checked.
    pub(super) fn discard(&self, block: u32, ranges: &[(u64, u32)]) -> Result<(), DestError> {
        for &(first, count) in ranges {
            let off = self
                .mem
                .offset_of(block, first, count as u64)
                .map_err(DestError::BadDiscard)?;
            self.mem.punch_hole(off, count as u64 * PAGE_SIZE)?;
            self.pages
                .set_range(block, first, count as u64, PageState::Missing);
        }
        Ok(())
    }
}

/// See [`Dest::check_discard`].
fn check_discard(phase: DestPhase, ranges: &[(u64, u32)]) -> Result<(), DestError> {
    if phase.running() {
        return Err(DestError::Protocol(
            "the source discarded pages after the VM started",
        ));
    }
    if phase.state_loaded() {
        return Err(DestError::Protocol(
            "the source discarded pages after the machine state",
        ));
    }
    if ranges.iter().any(|&(_, count)| count == 0) {
        return Err(DestError::Protocol(
            "the source discarded an empty range of pages",
        ));
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes from the source.
pub(super) fn read_exact(peer: &mut impl Read, buf: &mut [u8]) -> Result<(), DestError> {
    peer.read_exact(buf).map_err(DestError::read)
}

#[cfg(test)]
pub(super) mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::testutil::blocks;

    /// A destination over a fresh sealed memfd of `pages` pages, one block, every page
    /// written with its number + 1; the memfd is returned beside it to be read back.
    pub(in crate::dest) fn dest(pages: u64) -> (Dest, File, UnixStream) {
        let file = crate::testutil::sealed_memfd(pages * PAGE_SIZE);
        for p in 0..pages {
            file.write_all_at(&[p as u8 + 1; PAGE_SIZE as usize], p * PAGE_SIZE)
                .unwrap();
        }
        let (vmm, vmm_end) = UnixStream::pair().unwrap();
        let d = Dest::new(
            vmm_end,
            "t".into(),
            "tcp:127.0.0.1:0",
            file.try_clone().unwrap().into(),
            None,
            blocks(&[pages]),
            Default::default(),
        )
        .map_err(|(_, f)| f)
        .unwrap();
        (d, file, vmm)
    }

    pub(in crate::dest) fn first_bytes(file: &File, pages: u64) -> Vec<u8> {
        (0..pages)
            .map(|p| {
                let mut b = [0u8; 1];
                file.read_exact_at(&mut b, p * PAGE_SIZE).unwrap();
                b[0]
            })
            .collect()
    }

    #[test]
    fn a_discard_reaching_outside_the_block_drops_no_page() {
        let (mut d, file, _vmm) = dest(8);
        let e = d.discard(0, &[(0, 2), (7, 2)]).unwrap_err();
        assert!(matches!(e, DestError::BadDiscard(_)), "{e}");
        assert_eq!(first_bytes(&file, 8), [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn an_empty_discard_range_refuses_the_frame_and_drops_nothing() {
        let (mut d, file, _vmm) = dest(8);
        let e = d.discard(0, &[(5, 2), (3, 0)]).unwrap_err();
        assert!(e.to_string().contains("empty range"), "{e}");
        assert_eq!(first_bytes(&file, 8), [1, 2, 3, 4, 5, 6, 7, 8]);
        d.discard(0, &[(5, 2)]).unwrap();
        assert_eq!(first_bytes(&file, 8), [1, 2, 3, 4, 5, 0, 0, 8]);
    }

    #[test]
    fn on_huge_pages_pages_are_written_before_the_vm_runs_and_discarded_whole_huge_pages() {
        const PER: u64 = proto::HUGE_PAGE_SIZE / PAGE_SIZE;
        let Some(file) = crate::testutil::sealed_huge_memfd(2 * PER * PAGE_SIZE) else {
            return;
        };
        let mem = Arc::new(
            GuestMapping::new(file.try_clone().unwrap().into(), blocks(&[2 * PER])).unwrap(),
        );
        assert!(mem.hugetlb());
        let pages = Arc::new(PageTable::new(mem.blocks()));
        let placement = Placement::new(mem.clone(), pages.clone(), None);
        // Both huge pages written (hugetlbfs refuses pwrite), a few pages reading zero.
        let data: Vec<u8> = (0..2 * PER)
            .flat_map(|p| vec![(p % 13) as u8 + 1; PAGE_SIZE as usize])
            .collect();
        use proto::peer::MAX_RUN_PAGES;
        for first in (0..2 * PER).step_by(MAX_RUN_PAGES as usize) {
            let run = PageRun {
                block: 0,
                first,
                count: MAX_RUN_PAGES,
            };
            let at = (first * PAGE_SIZE) as usize;
            let len = run.data_len();
            placement
                .pages(run, first * PAGE_SIZE, &data[at..at + len], false)
                .unwrap();
        }
        placement.zero(0, PER + 5, 2, false).unwrap();
        let bytes = |p: u64| {
            let mut b = [0u8; 1];
            file.read_exact_at(&mut b, p * PAGE_SIZE).unwrap();
            b[0]
        };
        assert_eq!(
            (bytes(3), bytes(PER + 4), bytes(PER + 5)),
            (4, ((PER + 4) % 13) as u8 + 1, 0)
        );
        // Huge page 1 dropped whole: missing again, and a hole; huge page 0 stays.
        placement.discard(0, &[(PER, PER as u32)]).unwrap();
        assert_eq!(pages.get(0, PER + 100), PageState::Missing);
        assert_eq!(pages.get(0, PER - 1), PageState::Present);
        assert_eq!(
            (bytes(PER - 1), bytes(PER + 4)),
            (((PER - 1) % 13) as u8 + 1, 0)
        );
        assert_eq!(pages.unresolved(), PER);
    }

    #[test]
    fn a_discard_of_part_of_a_huge_page_is_refused_before_any_page_drops() {
        const PER: u64 = proto::HUGE_PAGE_SIZE / PAGE_SIZE;
        let Some(file) = crate::testutil::sealed_huge_memfd(2 * PER * PAGE_SIZE) else {
            return;
        };
        let (_vmm, vmm_end) = UnixStream::pair().unwrap();
        let mut d = Dest::new(
            vmm_end,
            "t".into(),
            "tcp:127.0.0.1:0",
            file.try_clone().unwrap().into(),
            None,
            blocks(&[2 * PER]),
            Default::default(),
        )
        .map_err(|(_, f)| f)
        .unwrap();
        let run = PageRun {
            block: 0,
            first: 0,
            count: 1,
        };
        d.placement()
            .pages(run, 0, &[7u8; PAGE_SIZE as usize], false)
            .unwrap();
        // The second range is whole; the first is not: nothing is dropped.
        let e = d.discard(0, &[(PER, PER as u32), (1, 1)]).unwrap_err();
        assert!(e.to_string().contains("part of a huge page"), "{e}");
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b[0], 7);
        d.discard(0, &[(0, PER as u32)]).unwrap();
        file.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b[0], 0, "dropped whole");
    }

    #[test]
    fn discards_stop_at_the_machine_state() {
        for phase in DestPhase::ALL {
            let r = check_discard(phase, &[(0, 1)]);
            match phase {
                DestPhase::Loaded => assert!(
                    r.as_ref()
                        .is_err_and(|e| e.to_string().contains("after the machine state")),
                    "{phase}: {r:?}"
                ),
                DestPhase::Postcopy | DestPhase::PostcopyPaused => assert!(
                    r.as_ref()
                        .is_err_and(|e| e.to_string().contains("after the VM started")),
                    "{phase}: {r:?}"
                ),
                _ => assert!(r.is_ok(), "{phase}: {r:?}"),
            }
        }
    }

    #[test]
    fn an_empty_discard_range_is_refused() {
        let e = check_discard(DestPhase::Precopy, &[(3, 1), (5, 0)]).unwrap_err();
        assert!(e.to_string().contains("empty range"), "{e}");
    }
}
