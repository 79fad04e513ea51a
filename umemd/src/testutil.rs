//! Helpers shared by the unit tests.

use proto::local::LocalBlock;
use proto::BlockDesc;

/// A memfd of `len` bytes sealed against shrinking, as a VMM hands over guest RAM.
pub(crate) fn sealed_memfd(len: u64) -> std::fs::File {
    let f = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create("ram")
        .unwrap();
    f.as_file().set_len(len).unwrap();
    f.add_seal(memfd::FileSeal::SealShrink).unwrap();
    f.into_file()
}

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
