//! Per-block dirty page bitmaps as the source umemd receives them from its VMM.

use proto::local::LocalBlock;

/// A dirty bitmap from the VMM that does not fit the layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// A block index outside the layout.
    #[error("bitmap for block index {block}, the VM has {blocks} blocks")]
    NoBlock {
        /// Index given.
        block: u32,
        /// Blocks of the VM.
        blocks: usize,
    },
    /// Words start mid-word.
    #[error("bitmap starts at page {first_page}, not a multiple of 64")]
    Unaligned {
        /// First page given.
        first_page: u64,
    },
    /// More words than the block has.
    #[error("bitmap of {words} words at page {first_page} exceeds block {block} ({pages} pages)")]
    Exceeds {
        /// Words given.
        words: usize,
        /// First page given.
        first_page: u64,
        /// Block index.
        block: u32,
        /// Pages of the block.
        pages: u64,
    },
    /// Bits set past the block's last page.
    #[error("bitmap marks pages past the end of block {block}")]
    PastEnd {
        /// Block index.
        block: u32,
    },
}

/// One bit per page for every block of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    blocks: Vec<(u64, Vec<u64>)>, // (pages, words)
}

impl DirtyBitmap {
    /// An empty bitmap shaped like `blocks`.
    pub fn new(blocks: &[LocalBlock]) -> Self {
        DirtyBitmap {
            blocks: blocks
                .iter()
                .map(|b| {
                    let pages = b.desc.pages();
                    (pages, vec![0; pages.div_ceil(64) as usize])
                })
                .collect(),
        }
    }

    /// ORs in `words` describing pages from `first_page` of `block`, refusing anything outside
    /// the block (bits past its last page included).
    pub fn or_words(
        &mut self,
        block: u32,
        first_page: u64,
        words: &[u64],
    ) -> Result<(), BitmapError> {
        let n = self.blocks.len();
        let (pages, bits) = self
            .blocks
            .get_mut(block as usize)
            .ok_or(BitmapError::NoBlock { block, blocks: n })?;
        if !first_page.is_multiple_of(64) {
            return Err(BitmapError::Unaligned { first_page });
        }
        let start = (first_page / 64) as usize;
        if start
            .checked_add(words.len())
            .is_none_or(|end| end > bits.len())
        {
            return Err(BitmapError::Exceeds {
                words: words.len(),
                first_page,
                block,
                pages: *pages,
            });
        }
        // Check before applying, so a refused bitmap leaves no bits behind.
        if *pages % 64 != 0 && start + words.len() == bits.len() {
            if let Some(last) = words.last() {
                if *last >> (*pages % 64) != 0 {
                    return Err(BitmapError::PastEnd { block });
                }
            }
        }
        for (i, w) in words.iter().enumerate() {
            bits[start + i] |= w;
        }
        Ok(())
    }

    /// Adds every page of `other`.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for ((_, a), (_, b)) in self.blocks.iter_mut().zip(&other.blocks) {
            for (x, y) in a.iter_mut().zip(b) {
                *x |= y;
            }
        }
    }

    /// Sets `count` pages from `first` of `block`, as a run of a bitmap of the same shape gave
    /// them; pages outside the block are ignored.
    pub fn set_run(&mut self, block: u32, first: u64, count: u64) {
        let Some((pages, bits)) = self.blocks.get_mut(block as usize) else {
            return;
        };
        for p in first..first.saturating_add(count).min(*pages) {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.blocks
            .iter()
            .flat_map(|(_, w)| w.iter())
            .map(|w| w.count_ones() as u64)
            .sum()
    }

    /// Runs of consecutive dirty pages as `(block, first page, count)`, at most `max` pages each.
    pub fn runs(&self, max: u64) -> impl Iterator<Item = (u32, u64, u64)> + '_ {
        self.blocks
            .iter()
            .enumerate()
            .flat_map(move |(b, (pages, words))| {
                Runs {
                    words,
                    pages: *pages,
                    pos: 0,
                    max,
                }
                .map(move |(f, c)| (b as u32, f, c))
            })
    }
}

struct Runs<'a> {
    words: &'a [u64],
    pages: u64,
    pos: u64,
    max: u64,
}

impl Runs<'_> {
    fn bit(&self, p: u64) -> bool {
        self.words[(p / 64) as usize] >> (p % 64) & 1 == 1
    }

    /// First set bit at or after `p`, skipping whole zero words.
    fn next_set(&self, mut p: u64) -> Option<u64> {
        while p < self.pages {
            let w = self.words[(p / 64) as usize] >> (p % 64);
            if w == 0 {
                p = (p / 64 + 1) * 64;
                continue;
            }
            let q = p + w.trailing_zeros() as u64;
            return (q < self.pages).then_some(q);
        }
        None
    }
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);
    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.next_set(self.pos)?;
        let mut end = start + 1;
        while end < self.pages && end - start < self.max {
            let w = self.words[(end / 64) as usize];
            if end % 64 == 0 && w == u64::MAX && end + 64 - start <= self.max {
                end += 64;
                continue;
            }
            if !self.bit(end) {
                break;
            }
            end += 1;
        }
        self.pos = end;
        Some((start, end - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::blocks;

    #[test]
    fn runs_split_at_gaps_blocks_and_max() {
        let mut bm = DirtyBitmap::new(&blocks(&[200, 100]));
        bm.or_words(0, 0, &[0b1110, u64::MAX, 1]).unwrap();
        bm.or_words(1, 64, &[1 << 35]).unwrap();
        let runs: Vec<_> = bm.runs(50).collect();
        assert_eq!(runs, vec![(0, 1, 3), (0, 64, 50), (0, 114, 15), (1, 99, 1)]);
        assert_eq!(bm.count(), 3 + 65 + 1);
    }

    #[test]
    fn set_runs_rebuild_what_runs_gave() {
        let mut bm = DirtyBitmap::new(&blocks(&[200, 100]));
        bm.or_words(0, 0, &[0b1110, u64::MAX, 1]).unwrap();
        bm.or_words(1, 64, &[1 << 35]).unwrap();
        let mut copy = DirtyBitmap::new(&blocks(&[200, 100]));
        for (b, f, c) in bm.runs(50) {
            copy.set_run(b, f, c);
        }
        assert_eq!(copy, bm);
        // Past the block's end, or a block that is not there: nothing.
        copy.set_run(1, 99, 5);
        copy.set_run(7, 0, 1);
        assert_eq!(copy, bm);
    }

    #[test]
    fn out_of_range_bitmaps_are_refused() {
        let mut bm = DirtyBitmap::new(&blocks(&[100]));
        assert!(matches!(
            bm.or_words(1, 0, &[1]),
            Err(BitmapError::NoBlock { block: 1, .. })
        ));
        assert_eq!(
            bm.or_words(0, 3, &[1]),
            Err(BitmapError::Unaligned { first_page: 3 })
        );
        assert!(matches!(
            bm.or_words(0, 64, &[0, 0]),
            Err(BitmapError::Exceeds { .. })
        ));
        assert_eq!(
            bm.or_words(0, 64, &[1 << 40]),
            Err(BitmapError::PastEnd { block: 0 }),
            "bit for page 104"
        );
        assert!(bm.or_words(0, 64, &[1 << 35]).is_ok());
    }

    #[test]
    fn merge_unions() {
        let b = blocks(&[64]);
        let mut x = DirtyBitmap::new(&b);
        let mut y = DirtyBitmap::new(&b);
        x.or_words(0, 0, &[1]).unwrap();
        y.or_words(0, 0, &[2]).unwrap();
        x.merge(&y);
        assert_eq!(x.runs(256).collect::<Vec<_>>(), vec![(0, 0, 2)]);
    }
}
