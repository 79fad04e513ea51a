//! Where a page goes on the destination, in one place: before the VM runs, into the memfd with
//! `pwrite` (or a punched hole for zero pages); once it runs, only with `UFFDIO_COPY`.

use std::io::Read;

use proto::frame::{FramePrefix, PREFIX_LEN};
use proto::peer::{PageRun, RUN_HEADER_LEN};
use proto::PAGE_SIZE;

use super::error::DestError;
use super::pages::PageState;
use super::phase::DestPhase;
use super::Dest;
use crate::stream::PeerStream;

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

    /// Pages that read as zero: before the VM runs they become holes; afterwards they are
    /// placed only if a vCPU touches them. Public, like [`Dest::receive_pages`] and
    /// [`Dest::discard`], so that the stable fuzzer (`fuzz/`) can drive it.
    pub fn zero(&mut self, block: u32, first: u64, count: u64) -> Result<(), DestError> {
        self.check_pages_allowed()?;
        let off = self.checked_offset(block, first, count)?;
        if self.phase.running() {
            if let Some(pc) = self.postcopy.as_mut() {
                pc.fault.zero(block, first, count)?;
                pc.pushed += count;
            }
            return Ok(());
        }
        // Usually a hole already (fresh memory); only pages written earlier need dropping.
        if self.mem.has_data(off, count * PAGE_SIZE) {
            self.mem.punch_hole(off, count * PAGE_SIZE)?;
        }
        self.pages.set_range(block, first, count, PageState::Zero);
        Ok(())
    }

    /// Reads the header and data of a `PAGES` frame whose prefix `p` was read, then places
    /// the run.
    pub fn receive_pages(
        &mut self,
        peer: &mut PeerStream,
        p: FramePrefix,
    ) -> Result<(), DestError> {
        let mut hdr = [0u8; RUN_HEADER_LEN];
        read_exact(peer, &mut hdr)?;
        let run = PageRun::decode_pages_header(p, &hdr).map_err(|err| DestError::Malformed {
            context: "source stream",
            err,
        })?;
        self.check_pages_allowed()?;
        let off = self.checked_offset(run.block, run.first, run.count as u64)?;
        let len = run.data_len();
        read_exact(peer, &mut self.buf[..len])?;
        self.place(run, off, len)?;
        self.stats.pages_sent += run.count as u64;
        self.stats.bytes_sent += (PREFIX_LEN + RUN_HEADER_LEN + len) as u64;
        Ok(())
    }

    /// Drops pages the source sent earlier and dirtied since: they are holes and missing
    /// again. Only before the VM runs: afterwards a page once placed stays. A frame with a
    /// range outside the layout is refused whole, before any page is dropped; an empty range
    /// drops nothing.
    pub fn discard(&mut self, block: u32, ranges: &[(u64, u32)]) -> Result<(), DestError> {
        if self.phase.running() {
            return Err(DestError::Protocol(
                "the source discarded pages after the VM started",
            ));
        }
        for &(first, count) in ranges {
            self.mem
                .offset_of(block, first, count as u64)
                .map_err(DestError::BadDiscard)?;
        }
        for &(first, count) in ranges {
            if count == 0 {
                // fallocate refuses a length of 0 (EINVAL).
                continue;
            }
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

    /// Writes the run's data, in `self.buf[..len]`, into guest RAM at memfd offset `off`: with
    /// `pwrite` into the memfd before the VM runs (nothing else touches it then), with
    /// `UFFDIO_COPY` once it runs.
    fn place(&mut self, run: PageRun, off: u64, len: usize) -> Result<(), DestError> {
        let data = &self.buf[..len];
        if self.phase.running() {
            let Some(pc) = self.postcopy.as_mut() else {
                return Err(DestError::Protocol(
                    "pages after the switchover without a userfaultfd",
                ));
            };
            pc.fault.place(run.block, run.first, data)?;
            pc.pushed += run.count as u64;
        } else {
            // Written with pwrite rather than through the mapping: a whole-page write into the
            // memfd allocates the page without zeroing it first and without a page fault per
            // page. No vCPU runs yet, so nothing else writes guest RAM now.
            std::os::unix::fs::FileExt::write_all_at(self.mem.file(), data, off)
                .map_err(DestError::Write)?;
            self.pages
                .set_range(run.block, run.first, run.count as u64, PageState::Present);
        }
        Ok(())
    }
}

/// Reads exactly `buf.len()` bytes from the source.
pub(super) fn read_exact(peer: &mut PeerStream, buf: &mut [u8]) -> Result<(), DestError> {
    peer.read_exact(buf).map_err(DestError::read)
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::testutil::blocks;

    /// A destination over a fresh sealed memfd of `pages` pages, one block, every page
    /// written with its number + 1; the memfd is returned beside it to be read back.
    fn dest(pages: u64) -> (Dest, File, UnixStream) {
        let f = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .create("t")
            .unwrap();
        f.as_file().set_len(pages * PAGE_SIZE).unwrap();
        f.add_seal(memfd::FileSeal::SealShrink).unwrap();
        let file = f.into_file();
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

    fn first_bytes(file: &File, pages: u64) -> Vec<u8> {
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
    fn an_empty_discard_range_drops_nothing() {
        let (mut d, file, _vmm) = dest(8);
        d.discard(0, &[(3, 0), (8, 0), (5, 2)]).unwrap();
        assert_eq!(first_bytes(&file, 8), [1, 2, 3, 4, 5, 0, 0, 8]);
        assert_eq!(d.pages.unresolved(), 8);
        assert!(d.discard(0, &[(9, 0)]).is_err());
    }
}
