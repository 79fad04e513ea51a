//! Where each destination page stands ([`PageTable`]), shared lock-free by the fault reader,
//! the page receivers and the main stream.

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
}
