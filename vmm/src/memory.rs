//! Guest RAM: one memfd holding every RAM block, mapped `MAP_SHARED` so that umemd can be
//! handed the very same memory by file descriptor.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use proto::local::LocalBlock;
use proto::{BlockDesc, HUGE_PAGE_SIZE, PAGE_SIZE};
use sha2::{Digest, Sha256};
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, VolatileSlice,
};

/// Guest physical address where the 32-bit PCI hole starts; RAM above it moves past 4 GiB.
pub const LOW_RAM_END: u64 = 3 << 30;
/// Guest physical address where high RAM starts.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// The host's pool of 2 MiB huge pages: `free_hugepages`, `resv_hugepages`, `nr_hugepages`.
pub const HUGE_PAGES_2M_SYSFS: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// What the guest RAM memfd is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RamBacking {
    /// Ordinary shared memory in 4 KiB pages, allocated as the guest touches it.
    #[default]
    Pages4K,
    /// 2 MiB huge pages from the host's hugetlb pool (a hugetlbfs memfd), reserved up front.
    HugePages2M,
}

impl RamBacking {
    /// Bytes of one page of this backing.
    pub const fn page_size(self) -> u64 {
        match self {
            RamBacking::Pages4K => PAGE_SIZE,
            RamBacking::HugePages2M => HUGE_PAGE_SIZE,
        }
    }
}

/// Errors of guest RAM handling.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is not usable.
    #[error("guest RAM size {0:#x} must be a non-zero multiple of 2 MiB")]
    BadSize(u64),
    /// memfd creation or sizing failed.
    #[error("creating the guest RAM memfd: {0}")]
    Memfd(String),
    /// Mapping failed.
    #[error("mapping guest RAM: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    /// A guest range is outside RAM.
    #[error("guest range {addr:#x}+{len:#x} is outside guest RAM")]
    OutOfRange {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// Dropping the pages of guest RAM failed.
    #[error("dropping the pages of guest RAM: {0}")]
    Discard(String),
    /// The host's pool of 2 MiB huge pages could not be read.
    #[error("reading the 2 MiB huge page pool {path}: {err} (the host needs hugetlbfs with 2 MiB pages for --hugepages)")]
    HugePagesUnavailable {
        /// The sysfs file.
        path: String,
        /// Why.
        err: String,
    },
    /// The host's pool of 2 MiB huge pages has too few free pages for guest RAM.
    #[error("guest RAM needs {needed} free 2 MiB huge pages but only {free} are free (and unreserved) in the host's pool: raise {HUGE_PAGES_2M_SYSFS}/nr_hugepages by at least {}", needed.saturating_sub(*free))]
    HugePagesShort {
        /// Pages guest RAM needs.
        needed: u64,
        /// Pages free and not reserved by anybody else.
        free: u64,
    },
    /// The hugetlbfs memfd could not be created, sized or sealed.
    #[error("creating the guest RAM memfd of 2 MiB huge pages: {0}")]
    HugeMemfd(String),
    /// The kernel refused to reserve the huge pages of guest RAM.
    #[error("reserving {pages} 2 MiB huge pages for guest RAM: {err} (is {HUGE_PAGES_2M_SYSFS}/free_hugepages large enough?)")]
    HugeReserve {
        /// Pages guest RAM needs.
        pages: u64,
        /// Why.
        err: String,
    },
}

/// One named RAM block and where it lives.
#[derive(Debug, Clone)]
pub struct RamBlock {
    /// Name, guest address, size.
    pub desc: BlockDesc,
    /// Offset in the memfd.
    pub memfd_offset: u64,
}

/// All guest RAM of a VM.
#[derive(Debug)]
pub struct GuestRam {
    memfd: File,
    backing: RamBacking,
    blocks: Vec<RamBlock>,
    mem: GuestMemoryMmap,
}

/// Splits `size` bytes of RAM into named blocks: below the PCI hole, then above 4 GiB.
pub fn layout(size: u64) -> Result<Vec<RamBlock>, MemoryError> {
    if size == 0 || !size.is_multiple_of(2 << 20) {
        return Err(MemoryError::BadSize(size));
    }
    let low = size.min(LOW_RAM_END);
    let mut blocks = vec![RamBlock {
        desc: BlockDesc {
            name: "ram-low".into(),
            guest_addr: 0,
            size: low,
        },
        memfd_offset: 0,
    }];
    if size > low {
        blocks.push(RamBlock {
            desc: BlockDesc {
                name: "ram-high".into(),
                guest_addr: HIGH_RAM_START,
                size: size - low,
            },
            memfd_offset: low,
        });
    }
    Ok(blocks)
}

impl GuestRam {
    /// Creates `size` bytes of sparse memfd-backed guest RAM in 4 KiB pages.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        Self::with_backing(size, RamBacking::Pages4K)
    }

    /// Creates `size` bytes of memfd-backed guest RAM made of `backing`. Huge pages are
    /// reserved in the host's pool here, so that a shortage fails now rather than as a SIGBUS
    /// when the guest (or umemd) first touches a page; they are still allocated only then.
    pub fn with_backing(size: u64, backing: RamBacking) -> Result<Self, MemoryError> {
        let blocks = layout(size)?;
        let huge = backing == RamBacking::HugePages2M;
        let pages = size / HUGE_PAGE_SIZE;
        if huge {
            let free = free_huge_pages()?;
            if free < pages {
                return Err(MemoryError::HugePagesShort {
                    needed: pages,
                    free,
                });
            }
        }
        let memfd_err = |e: String| {
            if huge {
                MemoryError::HugeMemfd(e)
            } else {
                MemoryError::Memfd(e)
            }
        };
        let memfd = memfd::MemfdOptions::default()
            .close_on_exec(true)
            .allow_sealing(true)
            .hugetlb(huge.then_some(memfd::HugetlbSize::Huge2MB))
            .create("guest-ram")
            .map_err(|e| memfd_err(e.to_string()))?;
        memfd
            .as_file()
            .set_len(size)
            .map_err(|e| memfd_err(e.to_string()))?;
        // Sealed so that nobody holding the fd (umemd maps it too) can be made to fault with
        // SIGBUS by a truncation behind its back; umemd refuses unsealed RAM.
        memfd
            .add_seals(&[
                memfd::FileSeal::SealShrink,
                memfd::FileSeal::SealGrow,
                memfd::FileSeal::SealSeal,
            ])
            .map_err(|e| memfd_err(e.to_string()))?;
        let memfd = memfd.into_file();
        if huge {
            reserve_huge_pages(&memfd, size).map_err(|e| MemoryError::HugeReserve {
                pages,
                err: e.to_string(),
            })?;
        }
        let ranges = blocks
            .iter()
            .map(|b| {
                let fo = memfd
                    .try_clone()
                    .map(|f| FileOffset::new(f, b.memfd_offset))
                    .map_err(|e| MemoryError::Memfd(e.to_string()))?;
                Ok((
                    GuestAddress(b.desc.guest_addr),
                    b.desc.size as usize,
                    Some(fo),
                ))
            })
            .collect::<Result<Vec<_>, MemoryError>>()?;
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges)?;
        Ok(GuestRam {
            memfd,
            backing,
            blocks,
            mem,
        })
    }

    /// What the RAM is made of.
    pub fn backing(&self) -> RamBacking {
        self.backing
    }

    /// Bytes of one page of the RAM's backing: 4096, or 2 MiB with huge pages.
    pub fn page_size(&self) -> u64 {
        self.backing.page_size()
    }

    /// The memfd holding every block.
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// The blocks, in guest address order.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// The vm-memory view, for reads and writes by guest address.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Total bytes of RAM.
    pub fn size(&self) -> u64 {
        self.blocks.iter().map(|b| b.desc.size).sum()
    }

    /// The mapping of block `i`.
    fn region(&self, i: usize) -> &GuestRegionMmap {
        // Blocks were created from these very ranges, so the lookup cannot fail.
        self.mem
            .find_region(GuestAddress(self.blocks[i].desc.guest_addr))
            .expect("block has a region")
    }

    /// Host address and length of block `i`'s mapping.
    pub fn host_range(&self, i: usize) -> (*mut u8, usize) {
        let region = self.region(i);
        (region.as_ptr(), region.len() as usize)
    }

    /// The block layout as umemd needs it.
    pub fn local_blocks(&self) -> Vec<LocalBlock> {
        (0..self.blocks.len())
            .map(|i| LocalBlock {
                desc: self.blocks[i].desc.clone(),
                memfd_offset: self.blocks[i].memfd_offset,
                host_addr: self.host_range(i).0 as u64,
            })
            .collect()
    }

    /// Volatile access to all of block `i` (the shared mapping). Guest RAM is never seen as
    /// `&[u8]`: the guest, or umemd through the memfd, may write it while the VMM reads it.
    pub fn block_volatile(&self, i: usize) -> VolatileSlice<'_> {
        // An mmap-backed region always has host memory, so this cannot fail.
        self.region(i)
            .as_volatile_slice()
            .expect("an mmap region has host memory")
    }

    /// Fills the first `size` bytes of RAM (every block when `size` covers them), lowest guest
    /// address first, with deterministic pseudo-random bytes from `seed`, in parallel, one
    /// chunk at a time generated in a buffer and copied into guest RAM.
    pub fn prefill(&self, seed: u64, size: u64) {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut left = size;
        let mut blocks: Vec<_> = self.blocks.iter().enumerate().collect();
        blocks.sort_by_key(|(_, b)| b.desc.guest_addr);
        for (i, b) in blocks {
            let len = b.desc.size.min(left) as usize;
            left -= len as u64;
            let share = (len / threads).next_multiple_of(PAGE_SIZE as usize);
            let block_seed = seed ^ b.desc.guest_addr;
            std::thread::scope(|s| {
                for t in 0..threads {
                    let start = (t * share).min(len);
                    let end = ((t + 1) * share).min(len);
                    s.spawn(move || {
                        let ram = self.block_volatile(i);
                        let mut buf = vec![0u8; COPY_CHUNK.min(end - start)];
                        let mut pos = start;
                        while pos < end {
                            let n = (end - pos).min(buf.len());
                            fill_pseudo_random(&mut buf[..n], block_seed, pos as u64 / 8);
                            let dst = ram.subslice(pos, n).expect("inside the block");
                            dst.copy_from(&buf[..n]);
                            pos += n;
                        }
                    });
                }
            });
        }
    }

    /// SHA-256 of each block, hex-encoded, computed in parallel.
    pub fn digests(&self) -> Vec<(String, String)> {
        self.digests_excluding(&[], true)
    }

    /// SHA-256 of each block with the bytes of the guest ranges `exclude` (`(address, length)`)
    /// left out, so that memory a guest rewrote can be told from memory that must be unchanged.
    ///
    /// With `skip_holes`, pages that are holes in the memfd are hashed as the zeros they read
    /// as, without touching them (a read through the mapping would allocate them). Without it,
    /// every byte is read through the mapping, which is what a VMM must do while a userfaultfd
    /// still covers RAM: there a hole is a page yet to arrive, and the read waits for it.
    ///
    /// A block whose memfd cannot be read gets an empty digest (and an error in the log), which
    /// matches no real one.
    pub fn digests_excluding(
        &self,
        exclude: &[(u64, u64)],
        skip_holes: bool,
    ) -> Vec<(String, String)> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        // hugetlbfs tells no hole from data (SEEK_DATA sees data everywhere), and a read
        // through the mapping allocates a huge page for every hole it touches; pread reads
        // holes as zeros without allocating.
        let pread = skip_holes && self.backing == RamBacking::HugePages2M;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.blocks.len())
                .map(|i| {
                    let start = self.blocks[i].desc.guest_addr;
                    let fd_off = self.blocks[i].memfd_offset;
                    let kept = kept_ranges(start, self.blocks[i].desc.size, exclude);
                    let memfd = &self.memfd;
                    s.spawn(move || -> std::io::Result<String> {
                        let ram = self.block_volatile(i);
                        let mut buf = vec![0u8; COPY_CHUNK];
                        let mut h = Sha256::new();
                        for (from, to) in kept {
                            if pread {
                                let mut pos = fd_off + from;
                                while pos < fd_off + to {
                                    let n = (fd_off + to - pos).min(COPY_CHUNK as u64) as usize;
                                    memfd.read_exact_at(&mut buf[..n], pos)?;
                                    h.update(&buf[..n]);
                                    pos += n as u64;
                                }
                                continue;
                            }
                            let segs = if skip_holes {
                                data_segments(memfd.as_fd(), fd_off + from, fd_off + to)
                            } else {
                                vec![(fd_off + from, fd_off + to, true)]
                            };
                            for (a, b, data) in segs {
                                let (a, b) = ((a - fd_off) as usize, (b - fd_off) as usize);
                                if data {
                                    // Copied out a chunk at a time: the guest may be writing.
                                    let mut pos = a;
                                    while pos < b {
                                        let n = (b - pos).min(buf.len());
                                        let src = ram.subslice(pos, n).expect("inside the block");
                                        let got = src.copy_to(&mut buf[..n]);
                                        h.update(&buf[..got]);
                                        pos += n;
                                    }
                                } else {
                                    let mut left = b - a;
                                    while left > 0 {
                                        let n = left.min(ZEROS.len());
                                        h.update(&ZEROS[..n]);
                                        left -= n;
                                    }
                                }
                            }
                        }
                        Ok(hex(&h.finalize()))
                    })
                })
                .collect();
            self.blocks
                .iter()
                .zip(handles)
                .map(|(b, h)| {
                    let digest = match h.join() {
                        Ok(Ok(d)) => d,
                        Ok(Err(e)) => {
                            log::error!("reading {} for its digest: {e}", b.desc.name);
                            String::new()
                        }
                        Err(_) => String::new(),
                    };
                    (b.desc.name.clone(), digest)
                })
                .collect()
        })
    }

    /// Checks that `[addr, addr+len)` lies in one block.
    pub fn check_range(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        let ok = self
            .blocks
            .iter()
            .any(|b| addr >= b.desc.guest_addr && addr + len <= b.desc.guest_addr + b.desc.size);
        if ok && GuestAddress(addr).checked_add(len).is_some() {
            Ok(())
        } else {
            Err(MemoryError::OutOfRange { addr, len })
        }
    }

    /// Drops every page: the memfd becomes one hole, which reads as zeros. For RAM that an
    /// incoming migration wrote before it failed, so that the next one starts from nothing.
    pub fn discard_all(&self) -> Result<(), MemoryError> {
        nix::fcntl::fallocate(
            self.memfd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            self.size() as i64,
        )
        .map_err(|e| MemoryError::Discard(e.to_string()))?;
        if self.backing == RamBacking::HugePages2M {
            // Punching a huge page that was allocated gives its reservation back to the pool;
            // taken again, so that the next migration cannot run out of pages halfway.
            reserve_huge_pages(&self.memfd, self.size()).map_err(|e| {
                MemoryError::Discard(format!(
                    "reserving the 2 MiB huge pages again: {e} (is {HUGE_PAGES_2M_SYSFS}/free_hugepages large enough?)"
                ))
            })?;
        }
        Ok(())
    }

    /// Borrowed fd, for passing to umemd.
    pub fn memfd_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.memfd.as_fd()
    }
}

/// Bytes copied between guest RAM and a buffer at a time by `prefill` and the digests.
const COPY_CHUNK: usize = 256 << 10;

/// One counter of the host's 2 MiB huge page pool.
fn huge_pool_counter(name: &str) -> Result<u64, MemoryError> {
    let path = format!("{HUGE_PAGES_2M_SYSFS}/{name}");
    let err = |err: String| MemoryError::HugePagesUnavailable {
        path: path.clone(),
        err,
    };
    std::fs::read_to_string(&path)
        .map_err(|e| err(e.to_string()))?
        .trim()
        .parse()
        .map_err(|e: std::num::ParseIntError| err(e.to_string()))
}

/// 2 MiB huge pages free in the host's pool and not promised to a mapping already: free
/// pages include reserved ones, which a new reservation cannot have.
fn free_huge_pages() -> Result<u64, MemoryError> {
    Ok(huge_pool_counter("free_hugepages")?.saturating_sub(huge_pool_counter("resv_hugepages")?))
}

/// Reserves huge pages for the first `len` bytes of the hugetlbfs file `file` without
/// allocating them. vm-memory maps with `MAP_NORESERVE`, which on hugetlbfs reserves nothing,
/// so a page the pool cannot supply would be a SIGBUS on first touch. A shared mapping without
/// it reserves the range in the file itself, where the reservation outlives the mapping and
/// serves every later mapping of the file (umemd's too) until the file is gone or punched.
fn reserve_huge_pages(file: &File, len: u64) -> std::io::Result<()> {
    use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
    let len = usize::try_from(len)
        .ok()
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a new mapping at an address the kernel picks, so no existing memory is affected;
    // PROT_NONE, and unmapped below before anything could use it.
    let addr = unsafe {
        mmap(
            None,
            len,
            ProtFlags::PROT_NONE,
            MapFlags::MAP_SHARED,
            file,
            0,
        )
    }?;
    // SAFETY: `addr` and `len` are exactly the mapping made above, which nothing else knows.
    unsafe { munmap(addr, len.get()) }?;
    Ok(())
}

/// Splits memfd offsets `[start, end)` into `(from, to, has_data)` pieces with `lseek`.
fn data_segments(fd: std::os::fd::BorrowedFd<'_>, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
    use nix::unistd::{lseek, Whence};
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // ENXIO: hole up to the end of the file.
        let d = lseek(fd, pos as i64, Whence::SeekData).map_or(end, |d| (d as u64).min(end));
        if d > pos {
            out.push((pos, d, false));
            pos = d;
            continue;
        }
        let h = lseek(fd, pos as i64, Whence::SeekHole).map_or(end, |h| (h as u64).min(end));
        let h = h.max(pos + 1).min(end);
        out.push((pos, h, true));
        pos = h;
    }
    out
}

/// The byte ranges (offsets into a block at guest address `start` of `len` bytes) that none of
/// `exclude` covers, in order.
fn kept_ranges(start: u64, len: u64, exclude: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut cut: Vec<(u64, u64)> = exclude
        .iter()
        .filter_map(|&(a, l)| {
            let from = a.max(start);
            let to = a.saturating_add(l).min(start + len);
            // Not `then_some`: its argument is evaluated first, and `to - start` underflows
            // for a range wholly below the block.
            if from < to {
                Some((from - start, to - start))
            } else {
                None
            }
        })
        .collect();
    cut.sort_unstable();
    let mut kept = Vec::new();
    let mut pos = 0;
    for (from, to) in cut {
        if from > pos {
            kept.push((pos, from));
        }
        pos = pos.max(to);
    }
    if pos < len {
        kept.push((pos, len));
    }
    kept
}

/// Fills `bytes` (whole 8-byte words) from a counter-based generator whose word number
/// `first_index` comes first, so any sub-range can be produced on its own.
pub fn fill_pseudo_random(bytes: &mut [u8], seed: u64, first_index: u64) {
    for (i, w) in bytes.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&splitmix64(seed.wrapping_add(first_index + i as u64)).to_ne_bytes());
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::Bytes;

    #[test]
    fn small_guest_has_one_block() {
        let l = layout(64 << 20).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].desc.size, 64 << 20);
    }

    #[test]
    fn large_guest_splits_around_the_pci_hole() {
        let l = layout(5 << 30).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].desc.size, 3 << 30);
        assert_eq!(l[1].desc.guest_addr, 4 << 30);
        assert_eq!(l[1].desc.size, 2 << 30);
        assert_eq!(l[1].memfd_offset, 3 << 30);
    }

    #[test]
    fn odd_sizes_are_refused() {
        assert!(layout(0).is_err());
        assert!(layout(4097).is_err());
    }

    #[test]
    fn prefill_is_deterministic_and_digests_see_it() {
        let a = GuestRam::new(4 << 20).unwrap();
        let b = GuestRam::new(4 << 20).unwrap();
        a.prefill(7, u64::MAX);
        b.prefill(7, u64::MAX);
        assert_eq!(a.digests(), b.digests());
        b.prefill(8, u64::MAX);
        assert_ne!(a.digests(), b.digests());
        let mut head = [0u8; 4096];
        a.block_volatile(0).copy_to(&mut head[..]);
        assert!(head.iter().any(|&x| x != 0));
        // The same bytes as a whole-word generator gives, at any offset.
        let mut word = [0u8; 8];
        let at = (3 << 20) + 8 * 1000;
        a.block_volatile(0)
            .subslice(at, 8)
            .unwrap()
            .copy_to(&mut word[..]);
        assert_eq!(u64::from_ne_bytes(word), splitmix64(7 + at as u64 / 8));
    }

    #[test]
    fn a_partial_prefill_leaves_the_rest_a_hole() {
        let full = GuestRam::new(4 << 20).unwrap();
        let part = GuestRam::new(4 << 20).unwrap();
        full.prefill(7, u64::MAX);
        part.prefill(7, 1 << 20);
        let segs = data_segments(part.memfd_fd(), 0, 4 << 20);
        assert_eq!(segs, vec![(0, 1 << 20, true), (1 << 20, 4 << 20, false)]);
        // The filled part holds the same bytes as a full prefill's.
        let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        full.block_volatile(0).copy_to(&mut a[..]);
        part.block_volatile(0).copy_to(&mut b[..]);
        assert!(a == b, "the first MiB differs");
    }

    #[test]
    fn excluded_ranges_are_left_out() {
        assert_eq!(kept_ranges(0, 100, &[]), vec![(0, 100)]);
        assert_eq!(
            kept_ranges(1000, 100, &[(1010, 10), (1005, 10), (1090, 50), (0, 5)]),
            vec![(0, 5), (20, 90)]
        );
        let a = GuestRam::new(4 << 20).unwrap();
        let b = GuestRam::new(4 << 20).unwrap();
        a.prefill(1, u64::MAX);
        b.prefill(1, u64::MAX);
        b.guest_memory()
            .write_obj(0xdead_u32, GuestAddress(0x2000))
            .unwrap();
        assert_ne!(a.digests(), b.digests());
        let ex = [(0x2000, 4096)];
        assert_eq!(
            a.digests_excluding(&ex, true),
            b.digests_excluding(&ex, false)
        );
        // Holes hash as zeros, and hashing them leaves them holes.
        let sparse = GuestRam::new(4 << 20).unwrap();
        sparse
            .guest_memory()
            .write_obj(7u64, GuestAddress(0x3000))
            .unwrap();
        let skipped = sparse.digests_excluding(&[], true);
        let fd = sparse.memfd_fd();
        assert_eq!(data_segments(fd, 0, 4 << 20).len(), 3, "still sparse");
        assert_eq!(skipped, sparse.digests_excluding(&[], false));
    }

    #[test]
    fn huge_pages_hold_the_same_bytes() {
        if !umem_testkit::require_huge_pages("huge_pages_hold_the_same_bytes", 4) {
            return;
        }
        let huge = GuestRam::with_backing(8 << 20, RamBacking::HugePages2M).unwrap();
        let small = GuestRam::new(8 << 20).unwrap();
        assert_eq!(huge.page_size(), 2 << 20);
        assert_eq!(small.page_size(), 4096);
        huge.prefill(7, u64::MAX);
        small.prefill(7, u64::MAX);
        assert_eq!(huge.digests(), small.digests());
        // Read through the mapping as well as with pread, and with a range left out.
        assert_eq!(huge.digests_excluding(&[], false), small.digests());
        let ex = [(0x2000, 4096), ((3 << 20) - 8, 16)];
        assert_eq!(
            huge.digests_excluding(&ex, true),
            small.digests_excluding(&ex, true)
        );
    }

    #[test]
    fn digests_of_untouched_huge_pages_allocate_none() {
        const SIZE: u64 = 64 << 20;
        let pages = SIZE / HUGE_PAGE_SIZE;
        if !umem_testkit::require_huge_pages("digests_of_untouched_huge_pages_allocate_none", pages)
        {
            return;
        }
        let huge = GuestRam::with_backing(SIZE, RamBacking::HugePages2M).unwrap();
        let before = huge_pool_counter("free_hugepages").unwrap();
        let digests = huge.digests();
        let after = huge_pool_counter("free_hugepages").unwrap();
        assert_eq!(digests, GuestRam::new(SIZE).unwrap().digests());
        // Exact for this file; the pool counter is shared with tests running beside.
        assert_eq!(huge.memfd().metadata().unwrap().blocks(), 0);
        assert!(
            before.saturating_sub(after) < pages,
            "free huge pages went from {before} to {after}"
        );
    }

    #[test]
    fn discarding_huge_pages_leaves_a_hole() {
        if !umem_testkit::require_huge_pages("discarding_huge_pages_leaves_a_hole", 4) {
            return;
        }
        let huge = GuestRam::with_backing(8 << 20, RamBacking::HugePages2M).unwrap();
        huge.prefill(3, 5 << 20);
        assert_eq!(huge.memfd().metadata().unwrap().blocks(), (6 << 20) / 512);
        huge.discard_all().unwrap();
        assert_eq!(huge.memfd().metadata().unwrap().blocks(), 0);
        assert_eq!(huge.digests(), GuestRam::new(8 << 20).unwrap().digests());
    }

    #[test]
    fn too_few_huge_pages_is_a_clear_error() {
        if !umem_testkit::require_huge_pages("too_few_huge_pages_is_a_clear_error", 0) {
            return;
        }
        // Far beyond what is free, so that tests raising the pool beside cannot close the gap;
        // refused before any memfd exists, so the size costs nothing.
        let needed = free_huge_pages().unwrap() + 1024;
        let err =
            GuestRam::with_backing(needed * HUGE_PAGE_SIZE, RamBacking::HugePages2M).unwrap_err();
        match err {
            MemoryError::HugePagesShort { needed: n, free } => {
                assert_eq!(n, needed);
                assert!(free < needed);
            }
            other => panic!("unexpected error: {other}"),
        }
        let text = err.to_string();
        assert!(text.contains(&format!("needs {needed} free 2 MiB huge pages")));
        assert!(text.contains("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"));
    }

    #[test]
    fn range_check() {
        let r = GuestRam::new(4 << 20).unwrap();
        assert!(r.check_range(0, 4096).is_ok());
        assert!(r.check_range((4 << 20) - 8, 16).is_err());
    }
}
