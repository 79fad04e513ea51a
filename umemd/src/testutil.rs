//! Helpers shared by the unit tests.

use proto::local::LocalBlock;
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
