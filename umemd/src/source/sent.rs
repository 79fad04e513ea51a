//! Which pages the source has sent: one bit per page, lock-free, so that the background pusher
//! and the request server never send a page twice nor wait on each other.

use std::sync::atomic::{AtomicU64, Ordering};

use proto::local::LocalBlock;

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
mod tests {
    use super::*;
    use crate::testutil::blocks;

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
}
