//! Per-page bookkeeping shared by the threads of one migration: which pages the source has sent
//! ([`SentMap`]) and where each destination page stands ([`PageTable`]). Both are lock-free so
//! the fault reader, the page receivers and the background sender never wait on each other.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use proto::local::LocalBlock;

/// State of one destination page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageState {
    /// Not here; nobody asked for it yet.
    Missing = 0,
    /// A vCPU faulted on it and it was requested from the source.
    Requested = 1,
    /// Its contents are in guest RAM.
    Present = 2,
    /// The source says it reads as zero: it is placed only if touched, and left to the kernel's
    /// zero fill once the userfaultfd is gone.
    Zero = 3,
}

impl PageState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => PageState::Missing,
            1 => PageState::Requested,
            2 => PageState::Present,
            _ => PageState::Zero,
        }
    }

    /// True if the page still has to arrive.
    pub fn is_unresolved(self) -> bool {
        matches!(self, PageState::Missing | PageState::Requested)
    }
}

/// The state of every page of a VM on the destination.
#[derive(Debug)]
pub struct PageTable {
    blocks: Vec<Vec<AtomicU8>>,
    unresolved: AtomicU64,
}

impl PageTable {
    /// Every page of `blocks` missing.
    pub fn new(blocks: &[LocalBlock]) -> Self {
        let blocks: Vec<Vec<AtomicU8>> = blocks
            .iter()
            .map(|b| (0..b.desc.pages()).map(|_| AtomicU8::new(0)).collect())
            .collect();
        let total = blocks.iter().map(|b| b.len() as u64).sum();
        PageTable {
            blocks,
            unresolved: AtomicU64::new(total),
        }
    }

    fn cell(&self, block: u32, page: u64) -> &AtomicU8 {
        &self.blocks[block as usize][page as usize]
    }

    /// The state of a page; the caller has bounds-checked `block` and `page`.
    pub fn get(&self, block: u32, page: u64) -> PageState {
        PageState::from_u8(self.cell(block, page).load(Ordering::Acquire))
    }

    /// Sets a page's state, returning the previous one and keeping the unresolved count.
    pub fn set(&self, block: u32, page: u64, to: PageState) -> PageState {
        let prev = PageState::from_u8(self.cell(block, page).swap(to as u8, Ordering::AcqRel));
        self.account(prev, to);
        prev
    }

    /// Sets every page of `[first, first+count)` of `block` to `to`.
    pub fn set_range(&self, block: u32, first: u64, count: u64, to: PageState) {
        let mut resolved = 0i64;
        for cell in &self.blocks[block as usize][first as usize..(first + count) as usize] {
            let prev = PageState::from_u8(cell.swap(to as u8, Ordering::AcqRel));
            resolved += prev.is_unresolved() as i64 - to.is_unresolved() as i64;
        }
        if resolved > 0 {
            self.unresolved.fetch_sub(resolved as u64, Ordering::AcqRel);
        } else {
            self.unresolved
                .fetch_add((-resolved) as u64, Ordering::AcqRel);
        }
    }

    /// Moves a page from `from` to `to` if it is in `from`; returns the state it was in.
    pub fn transition(&self, block: u32, page: u64, from: PageState, to: PageState) -> PageState {
        match self.cell(block, page).compare_exchange(
            from as u8,
            to as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                self.account(from, to);
                from
            }
            Err(v) => PageState::from_u8(v),
        }
    }

    fn account(&self, from: PageState, to: PageState) {
        match (from.is_unresolved(), to.is_unresolved()) {
            (true, false) => {
                self.unresolved.fetch_sub(1, Ordering::AcqRel);
            }
            (false, true) => {
                self.unresolved.fetch_add(1, Ordering::AcqRel);
            }
            _ => {}
        }
    }

    /// Pages still to arrive.
    pub fn unresolved(&self) -> u64 {
        self.unresolved.load(Ordering::Acquire)
    }

    /// Number of pages in a block.
    pub fn block_pages(&self, block: u32) -> u64 {
        self.blocks
            .get(block as usize)
            .map_or(0, |b| b.len() as u64)
    }
}

/// One bit per page: set once the source has sent the page (or declared it zero).
#[derive(Debug)]
pub struct SentMap {
    blocks: Vec<(u64, Vec<AtomicU64>)>,
    sent: AtomicU64,
    total: u64,
}

impl SentMap {
    /// Nothing sent yet.
    pub fn new(blocks: &[LocalBlock]) -> Self {
        let blocks: Vec<(u64, Vec<AtomicU64>)> = blocks
            .iter()
            .map(|b| {
                let pages = b.desc.pages();
                (
                    pages,
                    (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
                )
            })
            .collect();
        let total = blocks.iter().map(|b| b.0).sum();
        SentMap {
            blocks,
            sent: AtomicU64::new(0),
            total,
        }
    }

    /// Pages of block `block`.
    pub fn block_pages(&self, block: u32) -> u64 {
        self.blocks.get(block as usize).map_or(0, |b| b.0)
    }

    /// Number of blocks.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// Pages sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    /// Pages not sent yet.
    pub fn remaining(&self) -> u64 {
        self.total - self.sent()
    }

    /// True if page `page` of `block` was sent.
    pub fn is_sent(&self, block: u32, page: u64) -> bool {
        let w = &self.blocks[block as usize].1[(page / 64) as usize];
        w.load(Ordering::Acquire) >> (page % 64) & 1 == 1
    }

    /// Claims the unsent pages of `[first, first+count)` of `block` for sending: returns them as
    /// `(first, count)` runs, now marked sent, so that each page is sent by exactly one caller.
    /// The range must lie inside the block.
    pub fn claim(&self, block: u32, first: u64, count: u64) -> Vec<(u64, u64)> {
        let words = &self.blocks[block as usize].1;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (word, mask, base) in word_masks(first, count) {
            let prev = words[word].fetch_or(mask, Ordering::AcqRel);
            let mut new = mask & !prev;
            self.sent
                .fetch_add(new.count_ones() as u64, Ordering::AcqRel);
            while new != 0 {
                let s = new.trailing_zeros() as u64;
                let len = (!(new >> s)).trailing_zeros() as u64;
                let start = base + s;
                match runs.last_mut() {
                    Some((f, c)) if *f + *c == start => *c += len,
                    _ => runs.push((start, len)),
                }
                new &= if s + len >= 64 {
                    0
                } else {
                    !((1u64 << (s + len)) - 1)
                };
            }
        }
        runs
    }

    /// Marks pages unsent again (they were dirtied after being sent); returns how many were sent.
    pub fn unsend(&self, block: u32, first: u64, count: u64) -> u64 {
        let words = &self.blocks[block as usize].1;
        let mut cleared = 0;
        for (word, mask, _) in word_masks(first, count) {
            let prev = words[word].fetch_and(!mask, Ordering::AcqRel);
            cleared += (prev & mask).count_ones() as u64;
        }
        self.sent.fetch_sub(cleared, Ordering::AcqRel);
        cleared
    }

    /// First unsent page of `block` at or after `from`, if any.
    pub fn next_unsent(&self, block: u32, from: u64) -> Option<u64> {
        let (pages, words) = &self.blocks[block as usize];
        let mut p = from;
        while p < *pages {
            let w = !words[(p / 64) as usize].load(Ordering::Acquire) >> (p % 64);
            if w == 0 {
                p = (p / 64 + 1) * 64;
                continue;
            }
            let q = p + w.trailing_zeros() as u64;
            return (q < *pages).then_some(q);
        }
        None
    }
}

/// The bitmap words that pages `[first, first+count)` touch: `(word index, bits of the range in
/// it, page of its bit 0)`.
fn word_masks(first: u64, count: u64) -> impl Iterator<Item = (usize, u64, u64)> {
    let end = first + count;
    let mut p = first;
    std::iter::from_fn(move || {
        if p >= end {
            return None;
        }
        let bit = p % 64;
        let n = (64 - bit).min(end - p);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        let item = ((p / 64) as usize, mask, p - bit);
        p += n;
        Some(item)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proto::BlockDesc;

    /// Blocks of `pages[i]` pages each, for tests.
    pub(crate) fn blocks(pages: &[u64]) -> Vec<LocalBlock> {
        pages
            .iter()
            .enumerate()
            .map(|(i, &p)| LocalBlock {
                desc: BlockDesc {
                    name: format!("b{i}"),
                    guest_addr: (i as u64) << 32,
                    size: p * 4096,
                },
                memfd_offset: 0,
                host_addr: 0,
            })
            .collect()
    }

    #[test]
    fn each_page_is_claimed_once() {
        let m = SentMap::new(&blocks(&[200]));
        assert_eq!(m.claim(0, 10, 5), vec![(10, 5)]);
        assert_eq!(m.claim(0, 0, 200), vec![(0, 10), (15, 185)]);
        assert!(m.claim(0, 0, 200).is_empty());
        assert_eq!(m.sent(), 200);
        assert_eq!(m.unsend(0, 60, 10), 10);
        assert_eq!(m.remaining(), 10);
        assert_eq!(m.next_unsent(0, 0), Some(60));
        assert_eq!(m.next_unsent(0, 70), None);
        assert_eq!(m.claim(0, 0, 200), vec![(60, 10)]);
    }

    #[test]
    fn claims_across_word_edges_merge() {
        let m = SentMap::new(&blocks(&[300]));
        assert_eq!(m.claim(0, 63, 130), vec![(63, 130)]);
        assert!(m.is_sent(0, 63) && m.is_sent(0, 192) && !m.is_sent(0, 193));
    }

    #[test]
    fn page_table_counts_unresolved() {
        let t = PageTable::new(&blocks(&[4, 2]));
        assert_eq!(t.unresolved(), 6);
        assert_eq!(
            t.transition(0, 1, PageState::Missing, PageState::Requested),
            PageState::Missing
        );
        assert_eq!(t.unresolved(), 6);
        assert_eq!(t.set(0, 1, PageState::Present), PageState::Requested);
        assert_eq!(t.set(1, 0, PageState::Zero), PageState::Missing);
        assert_eq!(t.unresolved(), 4);
        assert_eq!(
            t.transition(0, 1, PageState::Missing, PageState::Requested),
            PageState::Present
        );
        assert_eq!(t.set(0, 1, PageState::Missing), PageState::Present);
        assert_eq!(t.unresolved(), 5);
    }
}
