//! Where each destination page stands ([`PageTable`]), shared lock-free by the fault reader,
//! the page receivers and the main stream.

use std::sync::atomic::{AtomicU64, Ordering};

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

/// Pages per word of a [`PageTable`]: two bits each.
const PER_WORD: u64 = 32;
const LANE: u64 = 0b11;

/// The state of every page of a VM on the destination, two bits a page, 32 pages to an atomic
/// word: a range of pages (a run placed, a hole of gigabytes) changes a word at a time.
#[derive(Debug)]
pub struct PageTable {
    blocks: Vec<Block>,
    unresolved: AtomicU64,
}

#[derive(Debug)]
struct Block {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl PageTable {
    /// Every page of `blocks` missing.
    pub fn new(blocks: &[LocalBlock]) -> Self {
        let blocks: Vec<Block> = blocks
            .iter()
            .map(|b| Block {
                words: (0..b.desc.pages().div_ceil(PER_WORD))
                    .map(|_| AtomicU64::new(0))
                    .collect(),
                pages: b.desc.pages(),
            })
            .collect();
        let total = blocks.iter().map(|b| b.pages).sum();
        PageTable {
            blocks,
            unresolved: AtomicU64::new(total),
        }
    }

    fn word(&self, block: u32, page: u64) -> &AtomicU64 {
        &self.blocks[block as usize].words[(page / PER_WORD) as usize]
    }

    /// The state of a page; the caller has bounds-checked `block` and `page`.
    pub fn get(&self, block: u32, page: u64) -> PageState {
        let w = self.word(block, page).load(Ordering::Acquire);
        PageState::from_u8(((w >> shift(page)) & LANE) as u8)
    }

    /// Sets a page's state, returning the previous one and keeping the unresolved count.
    pub fn set(&self, block: u32, page: u64, to: PageState) -> PageState {
        let mut prev = to;
        self.update_range(block, page, 1, |_| Some(to), |_, p| prev = p);
        prev
    }

    /// Moves a page from `from` to `to` if it is in `from`; returns the state it was in.
    pub fn transition(&self, block: u32, page: u64, from: PageState, to: PageState) -> PageState {
        let was = self.get(block, page);
        if was != from {
            return was;
        }
        let mut prev = from;
        self.update_range(
            block,
            page,
            1,
            |s| (s == from).then_some(to),
            |_, p| prev = p,
        );
        prev
    }

    /// Sets every page of `[first, first+count)` of `block` to `to`.
    pub fn set_range(&self, block: u32, first: u64, count: u64, to: PageState) {
        self.update_range(block, first, count, |_| Some(to), |_, _| {});
    }

    /// Changes each page of `[first, first+count)` of `block` to `change(state)` where that is
    /// `Some`, one atomic word of 32 pages at a time, keeping the unresolved count; then calls
    /// `seen(page, previous state)` for every page of the range (changed or not). The caller
    /// has bounds-checked the range.
    pub fn update_range(
        &self,
        block: u32,
        first: u64,
        count: u64,
        change: impl Fn(PageState) -> Option<PageState>,
        mut seen: impl FnMut(u64, PageState),
    ) {
        let mut resolved = 0i64;
        let mut page = first;
        let end = first + count;
        while page < end {
            let in_word = (PER_WORD - page % PER_WORD).min(end - page);
            let word = self.word(block, page);
            let mut old = word.load(Ordering::Acquire);
            let new = loop {
                let new = apply(old, page, in_word, &change);
                if new == old {
                    break new;
                }
                match word.compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break new,
                    Err(now) => old = now,
                }
            };
            for p in page..page + in_word {
                let (was, is) = (lane(old, p), lane(new, p));
                resolved += was.is_unresolved() as i64 - is.is_unresolved() as i64;
                seen(p, was);
            }
            page += in_word;
        }
        if resolved > 0 {
            self.unresolved.fetch_sub(resolved as u64, Ordering::AcqRel);
        } else if resolved < 0 {
            self.unresolved
                .fetch_add((-resolved) as u64, Ordering::AcqRel);
        }
    }

    /// Pages still to arrive.
    pub fn unresolved(&self) -> u64 {
        self.unresolved.load(Ordering::Acquire)
    }

    /// Number of pages in a block.
    pub fn block_pages(&self, block: u32) -> u64 {
        self.blocks.get(block as usize).map_or(0, |b| b.pages)
    }
}

/// Where `page`'s two bits sit in its word.
fn shift(page: u64) -> u64 {
    (page % PER_WORD) * 2
}

fn lane(word: u64, page: u64) -> PageState {
    PageState::from_u8(((word >> shift(page)) & LANE) as u8)
}

/// `word` with `change` applied to pages `[page, page+n)`, all in this word. A word whose
/// lanes in the range all hold one state (a hole, a run) changes in one step.
fn apply(word: u64, page: u64, n: u64, change: &impl Fn(PageState) -> Option<PageState>) -> u64 {
    let mask = if n == PER_WORD {
        u64::MAX
    } else {
        ((1u64 << (2 * n)) - 1) << shift(page)
    };
    let first = lane(word, page);
    // The repeated pattern of a state over the whole word (Missing 00.., Zero 11..).
    let spread = |s: PageState| (s as u64) * 0x5555_5555_5555_5555;
    if word & mask == spread(first) & mask {
        return match change(first) {
            Some(to) => (word & !mask) | (spread(to) & mask),
            None => word,
        };
    }
    let mut out = word;
    for p in page..page + n {
        if let Some(to) = change(lane(word, p)) {
            out = (out & !(LANE << shift(p))) | ((to as u64) << shift(p));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::blocks;

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

    #[test]
    fn ranges_across_words_change_only_what_they_cover() {
        let t = PageTable::new(&blocks(&[100, 40]));
        t.set(0, 31, PageState::Requested);
        t.set(0, 32, PageState::Present);
        t.set(0, 70, PageState::Requested);
        // A hole from page 10 to 89: only missing pages become zero; the rest are reported.
        let mut requested = Vec::new();
        t.update_range(
            0,
            10,
            80,
            |s| (s == PageState::Missing).then_some(PageState::Zero),
            |p, was| {
                if was == PageState::Requested {
                    requested.push(p)
                }
            },
        );
        assert_eq!(requested, vec![31, 70]);
        for p in 0..100 {
            let want = match p {
                31 | 70 => PageState::Requested,
                32 => PageState::Present,
                10..=89 => PageState::Zero,
                _ => PageState::Missing,
            };
            assert_eq!(t.get(0, p), want, "page {p}");
        }
        // 10 + 10 missing and 2 requested in block 0, all 40 of block 1.
        assert_eq!(t.unresolved(), 62);
        t.set_range(1, 0, 40, PageState::Present);
        t.set_range(0, 0, 100, PageState::Present);
        assert_eq!(t.unresolved(), 0);
        assert!((0..40).all(|p| t.get(1, p) == PageState::Present));
    }

    #[test]
    fn threads_changing_pages_of_one_word_lose_no_change() {
        let t = std::sync::Arc::new(PageTable::new(&blocks(&[64])));
        let handles: Vec<_> = (0..4u64)
            .map(|k| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for round in 0..2000 {
                        for p in (k..64).step_by(4) {
                            let to = if round % 2 == 0 {
                                PageState::Requested
                            } else {
                                PageState::Missing
                            };
                            t.set(0, p, to);
                        }
                    }
                    for p in (k..64).step_by(4) {
                        assert_eq!(
                            t.transition(0, p, PageState::Missing, PageState::Present),
                            PageState::Missing
                        );
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!((0..64).all(|p| t.get(0, p) == PageState::Present));
        assert_eq!(t.unresolved(), 0);
    }
}
