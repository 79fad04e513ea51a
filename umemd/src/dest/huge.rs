//! Huge pages assembled whole on the destination. Pages travel 4 KiB at a time, but once the
//! VM runs here a huge page of guest RAM can only be placed whole (`UFFDIO_COPY` of 2 MiB):
//! half of one placed would map all of it into the VM, the other half reading as zeros. So
//! the 4 KiB pages of a huge page not yet placed wait here, in a buffer of its size, until
//! every one of them has arrived or is known to read as zero.
//!
//! The source sends the pages of a huge page together (a pass over memory goes in order, a
//! request asks for a huge page's missing pages at once), so few are ever half here; a source
//! that leaves more than [`MAX_ASSEMBLING`] so is refused.

use std::collections::HashMap;
use std::sync::Mutex;

use proto::PAGE_SIZE;

use super::pages::{PageState, PageTable};

/// Most huge pages half received at once: 64 MiB of buffers.
pub const MAX_ASSEMBLING: usize = 32;

/// Errors of assembling huge pages.
#[derive(Debug, thiserror::Error)]
pub enum AssemblyError {
    /// The source left too many huge pages half sent.
    #[error("the source left more than {MAX_ASSEMBLING} huge pages partly sent")]
    TooMany,
}

/// A huge page whose every 4 KiB page is here, to be placed whole.
#[derive(Debug)]
pub struct Assembled {
    /// Block of the huge page.
    pub block: u32,
    /// Its first 4 KiB page in the block.
    pub first: u64,
    /// Its bytes.
    pub data: Vec<u8>,
}

#[derive(Debug)]
struct Entry {
    /// `None` while the huge page is being placed.
    data: Option<Vec<u8>>,
    /// One bit per 4 KiB page received.
    received: Vec<u64>,
}

/// The huge pages being assembled, shared by every thread that receives pages.
#[derive(Debug)]
pub struct HugePageAssembly {
    /// 4 KiB pages per huge page.
    per: u64,
    entries: Mutex<HashMap<(u32, u64), Entry>>,
    /// Buffers of placed huge pages, for the next ones.
    spare: Mutex<Vec<Vec<u8>>>,
}

impl HugePageAssembly {
    /// Assembly of huge pages of `huge_page_size` bytes.
    pub fn new(huge_page_size: u64) -> Self {
        HugePageAssembly {
            per: huge_page_size / PAGE_SIZE,
            entries: Mutex::new(HashMap::new()),
            spare: Mutex::new(Vec::new()),
        }
    }

    /// 4 KiB pages per huge page.
    pub fn per(&self) -> u64 {
        self.per
    }

    /// The first 4 KiB page of the huge page holding `page`.
    pub fn head(&self, page: u64) -> u64 {
        page - page % self.per
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<(u32, u64), Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Which pages of the huge page at `head` are here, one flag each.
    pub fn received(&self, block: u32, head: u64) -> Vec<bool> {
        let entries = self.entries();
        let e = entries.get(&(block, head));
        (0..self.per)
            .map(|p| e.is_some_and(|e| bit(&e.received, p)))
            .collect()
    }

    /// True if some page of the huge page at `head` is here, or it is being placed.
    pub fn holds_any(&self, block: u32, head: u64) -> bool {
        self.entries().contains_key(&(block, head))
    }

    /// Takes in `data`, whole pages from `first` of `block`, for the huge pages not placed yet
    /// (their first page is not present in `pages`); returns those now complete, to be placed
    /// and then handed back with [`HugePageAssembly::placed`].
    pub fn receive(
        &self,
        pages: &PageTable,
        block: u32,
        first: u64,
        data: &[u8],
    ) -> Result<Vec<Assembled>, AssemblyError> {
        let count = data.len() as u64 / PAGE_SIZE;
        let mut done = Vec::new();
        let mut entries = self.entries();
        let mut page = first;
        while page < first + count {
            let head = self.head(page);
            let end = (head + self.per).min(first + count);
            let placed = pages.get(block, head) == PageState::Present;
            let placing = entries
                .get(&(block, head))
                .is_some_and(|e| e.data.is_none());
            if !placed && !placing {
                if !entries.contains_key(&(block, head)) && entries.len() >= MAX_ASSEMBLING {
                    return Err(AssemblyError::TooMany);
                }
                let e = entries
                    .entry((block, head))
                    .or_insert_with(|| self.new_entry());
                let from = ((page - first) * PAGE_SIZE) as usize;
                let to = ((end - first) * PAGE_SIZE) as usize;
                let at = ((page - head) * PAGE_SIZE) as usize;
                if let Some(buf) = e.data.as_mut() {
                    buf[at..at + to - from].copy_from_slice(&data[from..to]);
                }
                for p in page - head..end - head {
                    set_bit(&mut e.received, p);
                }
                if let Some(a) = self.take_if_complete(&mut entries, pages, block, head) {
                    done.push(a);
                }
            }
            page = end;
        }
        Ok(done)
    }

    /// The huge page holding `page`, if every 4 KiB page of it has arrived or reads as zero
    /// and nobody places it already: taken out to be placed (with
    /// [`HugePageAssembly::placed`] after). A huge page all of zeros need not have been
    /// received at all.
    pub fn complete(&self, pages: &PageTable, block: u32, page: u64) -> Option<Assembled> {
        let head = self.head(page);
        if pages.get(block, head) == PageState::Present {
            return None;
        }
        let mut entries = self.entries();
        if let std::collections::hash_map::Entry::Vacant(v) = entries.entry((block, head)) {
            if (0..self.per).any(|p| pages.get(block, head + p) != PageState::Zero) {
                return None;
            }
            v.insert(self.new_entry());
        }
        self.take_if_complete(&mut entries, pages, block, head)
    }

    /// The huge page at `head`, if every page of it is received or zero: its buffer taken out
    /// (the entry stays, marked as being placed), the zero pages cleared in it.
    fn take_if_complete(
        &self,
        entries: &mut HashMap<(u32, u64), Entry>,
        pages: &PageTable,
        block: u32,
        head: u64,
    ) -> Option<Assembled> {
        let e = entries.get_mut(&(block, head))?;
        // A page present already (written before the VM ran, in a huge page that a source on
        // 4 KiB pages did not send whole) counts as here: placing then finds the huge page in
        // the memfd (`EEXIST`) and leaves it as it is.
        let complete = (0..self.per).all(|p| {
            bit(&e.received, p)
                || matches!(
                    pages.get(block, head + p),
                    PageState::Zero | PageState::Present
                )
        });
        if !complete {
            return None;
        }
        let mut data = e.data.take()?;
        for p in (0..self.per).filter(|&p| !bit(&e.received, p)) {
            let at = (p * PAGE_SIZE) as usize;
            data[at..at + PAGE_SIZE as usize].fill(0);
        }
        Some(Assembled {
            block,
            first: head,
            data,
        })
    }

    /// `a` was placed (or found there already): its entry goes, its buffer is kept for the next.
    pub fn placed(&self, a: Assembled) {
        self.entries().remove(&(a.block, a.first));
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < 4 {
            spare.push(a.data);
        }
    }

    /// Huge pages half received now.
    #[cfg(test)]
    fn assembling(&self) -> usize {
        self.entries().len()
    }

    /// An entry for a huge page none of whose pages is here yet, its buffer a spare one.
    fn new_entry(&self) -> Entry {
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).pop();
        Entry {
            data: Some(spare.unwrap_or_else(|| vec![0; (self.per * PAGE_SIZE) as usize])),
            received: vec![0; self.per.div_ceil(64) as usize],
        }
    }
}

fn bit(bits: &[u64], i: u64) -> bool {
    bits[(i / 64) as usize] & (1 << (i % 64)) != 0
}

fn set_bit(bits: &mut [u64], i: u64) {
    bits[(i / 64) as usize] |= 1 << (i % 64);
}

#[cfg(test)]
mod tests {
    use super::*;

    const PER: u64 = 8;

    fn table(pages: u64) -> PageTable {
        PageTable::new(&crate::testutil::blocks(&[pages]))
    }

    fn pages_of(first: u64, count: u64) -> Vec<u8> {
        (first..first + count)
            .flat_map(|p| vec![p as u8 + 1; PAGE_SIZE as usize])
            .collect()
    }

    #[test]
    fn a_huge_page_is_handed_out_once_every_page_of_it_is_here() {
        let t = table(4 * PER);
        let a = HugePageAssembly::new(PER * PAGE_SIZE);
        // Pages 6..10 span the end of huge page 0 and the start of huge page 1.
        assert!(a.receive(&t, 0, 6, &pages_of(6, 4)).unwrap().is_empty());
        let (h0, h1) = (a.received(0, 0), a.received(0, PER));
        assert!(h0[7] && h1[1] && !h0[5]);
        assert_eq!(a.assembling(), 2);
        // Pages 2..4 of huge page 0 read as zero; 0, 1, 4, 5 arrive.
        t.set_range(0, 2, 2, PageState::Zero);
        assert!(a.receive(&t, 0, 0, &pages_of(0, 2)).unwrap().is_empty());
        let done = a.receive(&t, 0, 4, &pages_of(4, 2)).unwrap();
        assert_eq!(done.len(), 1);
        let h = &done[0];
        assert_eq!((h.block, h.first), (0, 0));
        for p in 0..PER {
            let want = if (2..4).contains(&p) { 0 } else { p as u8 + 1 };
            let at = (p * PAGE_SIZE) as usize;
            assert!(
                h.data[at..at + PAGE_SIZE as usize]
                    .iter()
                    .all(|&b| b == want),
                "page {p}"
            );
        }
        // Being placed: pages of it arriving again are not taken in a second time.
        assert!(a.receive(&t, 0, 0, &pages_of(0, 1)).unwrap().is_empty());
        let done = done.into_iter().next().unwrap();
        a.placed(done);
        t.set_range(0, 0, PER, PageState::Present);
        assert!(a.receive(&t, 0, 0, &pages_of(0, 8)).unwrap().is_empty());
        assert_eq!(a.assembling(), 1, "huge page 1 still waits for pages");
    }

    #[test]
    fn a_huge_page_of_zeros_needs_no_page_received() {
        let t = table(2 * PER);
        let a = HugePageAssembly::new(PER * PAGE_SIZE);
        t.set_range(0, PER, PER - 1, PageState::Zero);
        assert!(
            a.complete(&t, 0, PER + 3).is_none(),
            "one page still missing"
        );
        t.set_range(0, 2 * PER - 1, 1, PageState::Zero);
        // A reused buffer holds old bytes: the zeros are written.
        a.placed(Assembled {
            block: 0,
            first: 0,
            data: vec![0xff; (PER * PAGE_SIZE) as usize],
        });
        let h = a.complete(&t, 0, PER + 3).expect("all zero");
        assert_eq!(h.first, PER);
        assert!(h.data.iter().all(|&b| b == 0));
        assert!(a.complete(&t, 0, PER).is_none(), "handed out once");
    }

    #[test]
    fn a_source_leaving_too_many_huge_pages_half_sent_is_refused() {
        let t = table(PER * (MAX_ASSEMBLING as u64 + 1));
        let a = HugePageAssembly::new(PER * PAGE_SIZE);
        for h in 0..MAX_ASSEMBLING as u64 {
            a.receive(&t, 0, h * PER, &pages_of(0, 1)).unwrap();
        }
        let e = a.receive(&t, 0, MAX_ASSEMBLING as u64 * PER, &pages_of(0, 1));
        assert!(matches!(e, Err(AssemblyError::TooMany)));
    }
}
