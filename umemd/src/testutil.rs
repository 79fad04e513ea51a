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

/// A sealed memfd of `len` bytes on 2 MiB huge pages, or `None` (with a skip line) when the
/// host cannot give that many: the pool is raised if it has too few free
/// ([`umem_testkit::require_huge_pages`]). Where the environment says the host must
/// (`UMEM_REQUIRE_KVM`, set on the machines that run CI), a missing pool fails the test
/// instead.
pub(crate) fn sealed_huge_memfd(len: u64) -> Option<std::fs::File> {
    if !umem_testkit::require_huge_pages("a memfd on huge pages", len.div_ceil(2 << 20) + 2) {
        return None;
    }
    let made = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .hugetlb(Some(memfd::HugetlbSize::Huge2MB))
        .create("ram")
        .map_err(|e| e.to_string())
        .and_then(|f| {
            f.as_file().set_len(len).map_err(|e| e.to_string())?;
            f.add_seal(memfd::FileSeal::SealShrink)
                .map_err(|e| e.to_string())?;
            Ok(f.into_file())
        });
    match made {
        Ok(f) => Some(f),
        Err(why) => {
            assert!(
                std::env::var_os("UMEM_REQUIRE_KVM").is_none(),
                "no 2 MiB huge pages on this host ({why}); UMEM_REQUIRE_KVM says it must have them"
            );
            eprintln!("SKIP: no 2 MiB huge pages on this host: {why}");
            None
        }
    }
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
