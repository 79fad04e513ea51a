//! umemd's own view of a VM's guest RAM: the memfd the VMM handed over, mapped `MAP_SHARED`,
//! plus the layout that says which part of it is which block.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use nix::sys::mman::{madvise, mmap, munmap, MapFlags, MmapAdvise, ProtFlags};
use nix::unistd::{lseek, Whence};
use proto::local::LocalBlock;
use proto::{HUGE_PAGE_SIZE, PAGE_SIZE};
use vm_memory::{VolatileMemory, VolatileSlice};

/// Errors of mapping a VMM's memory.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// The fd is not a usable memfd.
    #[error("guest RAM fd: {0}")]
    BadFd(String),
    /// The layout does not fit the memfd, or its blocks overlap (boxed: it names two blocks,
    /// and every session error carries a `MappingError`).
    #[error(transparent)]
    Layout(Box<crate::layout::LayoutError>),
    /// `mmap` failed.
    #[error("mapping guest RAM: {0}")]
    Map(nix::Error),
    /// A block index outside the layout.
    #[error("block index {block} out of range ({blocks} blocks)")]
    NoBlock {
        /// Index asked for.
        block: u32,
        /// Blocks in the layout.
        blocks: usize,
    },
    /// Pages outside their block.
    #[error("pages {page}..+{count} outside block {name} of {pages} pages")]
    OutsideBlock {
        /// First page asked for.
        page: u64,
        /// Pages asked for.
        count: u64,
        /// Block name.
        name: String,
        /// Pages of the block.
        pages: u64,
    },
    /// Dropping pages from the memfd failed.
    #[error("punching a hole at {off:#x}+{len:#x}: {err}")]
    PunchHole {
        /// Offset in the memfd.
        off: u64,
        /// Bytes.
        len: u64,
        /// Why.
        err: nix::Error,
    },
    /// A range asked of the mapping lies (partly) outside it.
    #[error("bytes {off:#x}+{len:#x} are outside the {size:#x}-byte guest RAM mapping")]
    OutOfRange {
        /// Offset asked for.
        off: u64,
        /// Length asked for.
        len: usize,
        /// Size of the mapping.
        size: usize,
    },
}

impl From<crate::layout::LayoutError> for MappingError {
    fn from(e: crate::layout::LayoutError) -> Self {
        MappingError::Layout(Box::new(e))
    }
}

/// Extents of the memfd found by earlier `lseek` calls: `[from, to)` of data and of hole.
/// Data stays data on a source memfd; a hole can fill while the guest runs, so a cache lives
/// for one pass over memory at most (a page written meanwhile is dirty and sent later).
#[derive(Debug, Default, Clone, Copy)]
pub struct SegmentCache {
    data: (u64, u64),
    hole: (u64, u64),
}

/// Where a memfd that no longer changes (its guest stopped for good) holds data, found in one
/// walk with `lseek`: after that, any range asked for in any order is a binary search, where
/// asking the kernel page by page would cost a system call a page, and `SEEK_HOLE` from each
/// place asked would scan on to the next hole every time.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DataExtents {
    /// `[from, to)` memfd offsets holding data, in order, apart from each other.
    data: Vec<(u64, u64)>,
}

impl DataExtents {
    /// Splits `[start, end)` into `(offset, len, has_data)` segments, as
    /// [`GuestMapping::segments`] does.
    pub fn segments(&self, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        let mut pos = start;
        let mut i = self.data.partition_point(|&(_, to)| to <= start);
        while pos < end {
            let (to, data) = match self.data.get(i) {
                Some(&(from, to)) if from <= pos => (to.min(end), true),
                Some(&(from, _)) => (from.min(end), false),
                None => (end, false),
            };
            push_segment(&mut out, pos, to, data);
            pos = to;
            i += data as usize;
        }
        out
    }

    /// Where the hole that `off` lies in ends (the next data, or the end of the memfd), or
    /// `None` when `off` holds data.
    pub fn hole_end(&self, off: u64, memfd_len: u64) -> Option<u64> {
        let i = self.data.partition_point(|&(_, to)| to <= off);
        match self.data.get(i) {
            Some(&(from, _)) if from <= off => None,
            Some(&(from, _)) => Some(from),
            None => Some(memfd_len),
        }
    }
}

/// A `MAP_SHARED` mapping of a whole guest-RAM memfd.
#[derive(Debug)]
pub struct GuestMapping {
    file: File,
    ptr: NonNull<u8>,
    len: usize,
    blocks: Vec<LocalBlock>,
    /// The memfd's page size: [`PAGE_SIZE`], or [`HUGE_PAGE_SIZE`] for hugetlbfs.
    page_size: u64,
}

// SAFETY: the mapping is plain read-only shared memory, owned by this value and unmapped only
// by its drop; nothing in it is tied to the thread that made it.
unsafe impl Send for GuestMapping {}
// SAFETY: `&GuestMapping` reads guest RAM only through `VolatileSlice`s, whose accesses are
// volatile: another thread, the guest or a `pwrite` writing the same bytes meanwhile can tear
// what is read, and no Rust reference to guest RAM is ever formed.
unsafe impl Sync for GuestMapping {}

impl GuestMapping {
    /// Maps `fd` read-only, checking that it is a sealed memfd that holds every block, apart
    /// from each other ([`crate::layout::validate`]). umemd only reads guest RAM through it;
    /// pages are written with `pwrite` or `UFFDIO_COPY`.
    pub fn new(fd: OwnedFd, blocks: Vec<LocalBlock>) -> Result<Self, MappingError> {
        let file = File::from(fd);
        let len = check_memfd(file.as_fd())? as usize;
        crate::layout::validate(&blocks, len as u64)?;
        let page_size = memfd_page_size(file.as_fd())?;
        check_huge_alignment(&blocks, page_size)?;
        let size = std::num::NonZeroUsize::new(len)
            .ok_or_else(|| MappingError::BadFd("the memfd is empty".into()))?;
        // SAFETY: a fresh mapping at a kernel-chosen address; it aliases no Rust object.
        let ptr = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED | MapFlags::MAP_NORESERVE,
                file.as_fd(),
                0,
            )
        }
        .map_err(MappingError::Map)?;
        // umemd reads each page to send it and drops its entry again
        // ([`GuestMapping::unmap_resident`]): no page of it should count as recently used for
        // the host's reclaim when it is unmapped, which also spares the drop that work.
        // SAFETY: the whole of the mapping just made; advice changes no byte of it.
        let _ = unsafe { madvise(ptr, len, MmapAdvise::MADV_SEQUENTIAL) };
        Ok(GuestMapping {
            file,
            ptr: ptr.cast(),
            len,
            blocks,
            page_size,
        })
    }

    /// The memfd's page size: [`PAGE_SIZE`], or [`HUGE_PAGE_SIZE`] for RAM on hugetlbfs. Pages
    /// still travel [`PAGE_SIZE`] at a time; a huge page is what the kernel allocates, places
    /// with `UFFDIO_COPY` and drops, whole.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// True for RAM on hugetlbfs. There `pwrite` and `sendfile` are refused, `lseek` takes the
    /// whole file for data, and a read through a mapping allocates the page it reads: umemd
    /// reads such RAM with `pread` (a hole reads as zeros, allocating nothing) and writes it
    /// through a mapping of the huge pages written ([`GuestMapping::write_at`]).
    pub fn hugetlb(&self) -> bool {
        self.page_size > PAGE_SIZE
    }

    /// `[first, first+count)` of `block` widened to whole pages of `page_size` bytes, within
    /// the block (which the caller checked the range against).
    pub fn widen_to_pages_of(
        &self,
        page_size: u64,
        block: u32,
        first: u64,
        count: u64,
    ) -> (u64, u64) {
        let per = (page_size / PAGE_SIZE).max(1);
        let pages = self
            .blocks
            .get(block as usize)
            .map_or(0, |b| b.desc.pages());
        let start = first - first % per;
        let end = (first + count).next_multiple_of(per).min(pages);
        (start, end - start)
    }

    /// Writes `data` into the memfd at `off`: with `pwrite`, or on hugetlbfs (which refuses
    /// it) through a shared mapping of the huge pages it covers, made for this write. Only
    /// while no vCPU runs on this RAM: a huge page written in part would read as zeros
    /// elsewhere.
    pub fn write_at(&self, off: u64, data: &[u8]) -> std::io::Result<()> {
        if !self.hugetlb() {
            return std::os::unix::fs::FileExt::write_all_at(&self.file, data, off);
        }
        let end = off
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.len as u64)
            .ok_or_else(|| {
                std::io::Error::other(MappingError::OutOfRange {
                    off,
                    len: data.len(),
                    size: self.len,
                })
            })?;
        let start = off - off % self.page_size;
        let window = (end.next_multiple_of(self.page_size) - start) as usize;
        write_through_window(
            self.file.as_fd(),
            start,
            window,
            (off - start) as usize,
            data,
        )
        .map_err(std::io::Error::from)
    }

    /// The layout.
    pub fn blocks(&self) -> &[LocalBlock] {
        &self.blocks
    }

    /// The memfd.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Total pages over all blocks.
    pub fn total_pages(&self) -> u64 {
        self.blocks.iter().map(|b| b.desc.pages()).sum()
    }

    /// Byte offset in the memfd of `page` of `block`, after checking that `count` pages from
    /// there lie inside the block.
    pub fn offset_of(&self, block: u32, page: u64, count: u64) -> Result<u64, MappingError> {
        let b = self
            .blocks
            .get(block as usize)
            .ok_or(MappingError::NoBlock {
                block,
                blocks: self.blocks.len(),
            })?;
        match page.checked_add(count) {
            Some(end) if end <= b.desc.pages() => Ok(b.memfd_offset + page * PAGE_SIZE),
            _ => Err(MappingError::OutsideBlock {
                page,
                count,
                name: b.desc.name.clone(),
                pages: b.desc.pages(),
            }),
        }
    }

    /// Volatile access to the `len` bytes at memfd offset `off`, bounds-checked against the
    /// mapping (a caller checks its pages against the layout with `offset_of` first).
    ///
    /// Guest RAM changes under umemd's feet (the guest runs, the destination writes pages with
    /// `pwrite` and `UFFDIO_COPY`), so it is never seen as `&[u8]`: reads through the slice are
    /// volatile and may be torn by a concurrent write, which callers tolerate (a page written
    /// while it is sent is dirty and is sent again). The mapping is read-only: a write through
    /// the slice would fault, so umemd never writes through it.
    pub fn volatile(&self, off: u64, len: usize) -> Result<VolatileSlice<'_>, MappingError> {
        let out_of_range = || MappingError::OutOfRange {
            off,
            len,
            size: self.len,
        };
        let off = usize::try_from(off).map_err(|_| out_of_range())?;
        self.whole().subslice(off, len).map_err(|_| out_of_range())
    }

    /// Page-aligned `[off, off+len)` clamped to the mapping, as a pointer and length; `None`
    /// when nothing of it lies inside.
    fn range(&self, off: u64, len: u64) -> Option<(NonNull<libc::c_void>, usize)> {
        let start = usize::try_from(off).ok()? & !(PAGE_SIZE as usize - 1);
        let end = usize::try_from(off.saturating_add(len)).ok()?.min(self.len);
        if start >= end {
            return None;
        }
        // SAFETY: `start < end <= self.len`, so the pointer stays inside the mapping.
        let ptr = unsafe { self.ptr.as_ptr().add(start) };
        NonNull::new(ptr.cast()).map(|p| (p, end - start))
    }

    /// Drops umemd's page-table entries for `[off, off+len)` (`MADV_DONTNEED`), so that pages
    /// read once do not stay in umemd's resident set: they are the VM's memory, and without
    /// this the source umemd's RSS grows to the guest RAM it sent. The memfd keeps every page
    /// (the mapping is shared); a later read faults it in again.
    pub fn unmap_resident(&self, off: u64, len: u64) {
        if let Some((ptr, len)) = self.range(off, len) {
            // SAFETY: `ptr..ptr+len` lies inside this value's own read-only shared mapping, and
            // no Rust reference points into it (all access is through volatile slices, which
            // fault pages back in); dropping its entries changes no byte of the memfd.
            let _ = unsafe { madvise(ptr, len, MmapAdvise::MADV_DONTNEED) };
        }
    }

    /// Bytes of the mapping mapped into umemd now, from `/proc/self/smaps`.
    #[cfg(test)]
    pub(crate) fn resident(&self) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        let head = format!("{:x}-", self.ptr.as_ptr() as usize);
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
        lines.next().expect("the mapping is listed");
        let rss = lines.find(|l| l.starts_with("Rss:")).expect("an Rss line");
        let kib: u64 = rss
            .split_whitespace()
            .nth(1)
            .and_then(|k| k.parse().ok())
            .unwrap_or(0);
        kib * 1024
    }

    /// The whole mapping as one volatile slice.
    fn whole(&self) -> VolatileSlice<'_> {
        // SAFETY: `ptr` and `len` are exactly the live mapping made in `new`, which lasts until
        // `self` drops, so for the slice's lifetime; every access through a `VolatileSlice` is
        // volatile (or a copy by the kernel or by vm-memory's copy routines), and umemd reads
        // guest RAM in no other way.
        unsafe { VolatileSlice::new(self.ptr.as_ptr(), self.len) }
    }

    /// Splits `[start, end)` of the memfd into `(offset, len, has_data)` segments: holes (never
    /// written pages) cost nothing to skip.
    pub fn segments(&self, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        self.segments_cached(start, end, &mut SegmentCache::default())
    }

    /// As [`GuestMapping::segments`], remembering the extents found in `cache`. `SEEK_HOLE`
    /// scans to the next hole, which in populated RAM is the end of the memfd: without the
    /// cache a walk over RAM in runs would cost time quadratic in its size.
    pub fn segments_cached(
        &self,
        start: u64,
        end: u64,
        cache: &mut SegmentCache,
    ) -> Vec<(u64, u64, bool)> {
        self.find_segments(start, end, cache, false)
    }

    /// As [`GuestMapping::segments_cached`] for a memfd whose guest is stopped for good, asked
    /// in any order (requested pages jump around): data is found page by page with `SEEK_DATA`,
    /// which answers at once on data, and `SEEK_HOLE`, which scans on to the next hole (the end
    /// of the memfd, when RAM is populated) every time it is asked, is never used.
    pub fn segments_frozen(
        &self,
        start: u64,
        end: u64,
        cache: &mut SegmentCache,
    ) -> Vec<(u64, u64, bool)> {
        self.find_segments(start, end, cache, true)
    }

    fn find_segments(
        &self,
        start: u64,
        end: u64,
        cache: &mut SegmentCache,
        page_by_page: bool,
    ) -> Vec<(u64, u64, bool)> {
        let fd = self.file.as_fd();
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = start;
        while pos < end {
            let (to, data) = if (cache.data.0..cache.data.1).contains(&pos) {
                (cache.data.1.min(end), true)
            } else if (cache.hole.0..cache.hole.1).contains(&pos) {
                (cache.hole.1.min(end), false)
            } else {
                // ENXIO: nothing but hole to the end of the file.
                let d =
                    lseek(fd, pos as i64, Whence::SeekData).map_or(self.len as u64, |d| d as u64);
                if d > pos {
                    cache.hole = (pos, d);
                    continue;
                }
                if page_by_page {
                    ((pos + PAGE_SIZE).min(end), true)
                } else {
                    let h = lseek(fd, pos as i64, Whence::SeekHole)
                        .map_or(self.len as u64, |h| h as u64);
                    cache.data = (pos, h.max(pos + PAGE_SIZE));
                    continue;
                }
            };
            push_segment(&mut out, pos, to, data);
            pos = to;
        }
        out
    }

    /// The data extents of the whole memfd, for a guest stopped for good ([`DataExtents`]).
    /// A failed `lseek` other than "no more data" counts the rest as data: sending a hole as
    /// zeros costs a page, taking data for a hole would lose it.
    pub fn data_extents(&self) -> DataExtents {
        let fd = self.file.as_fd();
        let len = self.len as u64;
        let mut data = Vec::new();
        let mut pos = 0;
        while pos < len {
            let from = match lseek(fd, pos as i64, Whence::SeekData) {
                Ok(d) => d as u64,
                Err(nix::errno::Errno::ENXIO) => break,
                Err(_) => pos,
            };
            let to = lseek(fd, from as i64, Whence::SeekHole)
                .map_or(len, |h| h as u64)
                .clamp(from + PAGE_SIZE, len);
            data.push((from, to));
            pos = to;
        }
        DataExtents { data }
    }

    /// The length of the memfd.
    pub fn memfd_len(&self) -> u64 {
        self.len as u64
    }

    /// True if any page of `[off, off+len)` holds data (is not a hole).
    pub fn has_data(&self, off: u64, len: u64) -> bool {
        lseek(self.file.as_fd(), off as i64, Whence::SeekData).is_ok_and(|d| (d as u64) < off + len)
    }

    /// Drops `[off, off+len)` from the memfd: it reads as zeros and is a hole again.
    pub fn punch_hole(&self, off: u64, len: u64) -> Result<(), MappingError> {
        nix::fcntl::fallocate(
            self.file.as_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off as i64,
            len as i64,
        )
        .map_err(|err| MappingError::PunchHole { off, len, err })
    }
}

/// The page size of the memfd `fd`: [`HUGE_PAGE_SIZE`] on hugetlbfs, else [`PAGE_SIZE`].
fn memfd_page_size(fd: BorrowedFd<'_>) -> Result<u64, MappingError> {
    use nix::sys::statfs::{fstatfs, HUGETLBFS_MAGIC};
    let fs = fstatfs(fd).map_err(|e| MappingError::BadFd(format!("fstatfs: {e}")))?;
    if fs.filesystem_type() != HUGETLBFS_MAGIC {
        return Ok(PAGE_SIZE);
    }
    let size = fs.block_size() as u64;
    if size != HUGE_PAGE_SIZE {
        return Err(MappingError::BadFd(format!(
            "guest RAM on {} KiB huge pages: umemd migrates 4 KiB and 2 MiB pages only",
            size >> 10
        )));
    }
    Ok(size)
}

/// On huge pages every block must start and end on a huge page, in the memfd and in the
/// VMM: the kernel places and drops them whole.
fn check_huge_alignment(blocks: &[LocalBlock], page_size: u64) -> Result<(), MappingError> {
    for b in blocks {
        if b.memfd_offset % page_size != 0
            || b.desc.size % page_size != 0
            || b.host_addr % page_size != 0
        {
            return Err(MappingError::BadFd(format!(
                "block {} (memfd offset {:#x}, {:#x} bytes, VMM address {:#x}) does not lie on whole {} KiB pages",
                b.desc.name,
                b.memfd_offset,
                b.desc.size,
                b.host_addr,
                page_size >> 10
            )));
        }
    }
    Ok(())
}

/// Maps `window` bytes of `fd` from `start` (whole huge pages) writable and shared, copies
/// `data` in at `at`, and unmaps them.
fn write_through_window(
    fd: BorrowedFd<'_>,
    start: u64,
    window: usize,
    at: usize,
    data: &[u8],
) -> Result<(), nix::Error> {
    let size = std::num::NonZeroUsize::new(window).ok_or(nix::errno::Errno::EINVAL)?;
    if at + data.len() > window {
        return Err(nix::errno::Errno::EINVAL);
    }
    let offset = i64::try_from(start).map_err(|_| nix::errno::Errno::EINVAL)?;
    // SAFETY: a fresh mapping at a kernel-chosen address; it aliases no Rust object.
    let ptr = unsafe {
        mmap(
            None,
            size,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd,
            offset,
        )
    }?;
    // SAFETY: `at + data.len() <= window` (checked above), so the copy stays inside the
    // mapping just made, which nothing else in umemd refers to; `data` is a live slice that
    // cannot overlap a mapping made after it.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr().cast::<u8>().add(at), data.len())
    };
    // SAFETY: exactly the mapping made above, no longer used.
    unsafe { munmap(ptr, window) }
}

/// The size of the guest-RAM memfd `fd`, after checking that umemd may map it: a regular file
/// (a memfd), not empty, and sealed against shrinking, since a memfd that can shrink would turn
/// umemd's reads of it into SIGBUS.
pub fn check_memfd(fd: BorrowedFd<'_>) -> Result<u64, MappingError> {
    let st = nix::sys::stat::fstat(fd).map_err(|e| MappingError::BadFd(format!("fstat: {e}")))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(MappingError::BadFd(
            "not a memfd or regular file (wrong fd passed?)".into(),
        ));
    }
    let len = u64::try_from(st.st_size).unwrap_or(0);
    if len == 0 {
        return Err(MappingError::BadFd("the memfd is empty".into()));
    }
    let seals = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GET_SEALS)
        .map_err(|e| MappingError::BadFd(format!("not a sealable memfd: {e}")))?;
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Err(MappingError::BadFd(
            "the memfd is not sealed against shrinking (F_SEAL_SHRINK)".into(),
        ));
    }
    Ok(len)
}

impl Drop for GuestMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping created in `new`, unmapped only here.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// Appends `[from, to)` to `out`, merging it into the last segment of the same kind.
fn push_segment(out: &mut Vec<(u64, u64, bool)>, from: u64, to: u64, data: bool) {
    match out.last_mut() {
        Some(last) if last.2 == data && last.0 + last.1 == from => last.1 += to - from,
        _ => out.push((from, to - from, data)),
    }
}

/// True if every byte of `bytes` is zero. Aligned words are read with volatile loads, eight at a
/// time, stopping at the first eight that are not all zero: a page of data is told from a zero
/// page after its first 64 bytes, and a zero page costs 512 loads, never a byte-by-byte loop.
pub fn is_zero(bytes: &VolatileSlice<'_>) -> bool {
    const WORD: usize = std::mem::size_of::<u64>();
    let len = bytes.len();
    let head = (bytes.ptr_guard().as_ptr() as usize).wrapping_neg() % WORD;
    let head = head.min(len);
    let words = (len - head) / WORD;
    let edges_zero = |from: usize, n: usize| {
        let mut b = [0u8; WORD];
        bytes
            .subslice(from, n)
            .map(|s| s.copy_to(&mut b[..n]))
            .is_ok()
            && b == [0; WORD]
    };
    if !edges_zero(0, head) || !edges_zero(head + words * WORD, len - head - words * WORD) {
        return false;
    }
    let Ok(w) = bytes.get_array_ref::<u64>(head, words) else {
        return false;
    };
    let mut i = 0;
    while i + 8 <= words {
        let any = (i..i + 8).fold(0, |a, k| a | w.load(k));
        if any != 0 {
            return false;
        }
        i += 8;
    }
    (i..words).all(|k| w.load(k) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    use crate::testutil::sealed_memfd as memfd;

    #[test]
    fn read_pages_are_resident_until_unmapped_and_read_back_the_same() {
        let size = 4u64 << 20;
        let mut f = memfd(size);
        let data: Vec<u8> = (0..size).map(|i| (i / 4096) as u8 ^ 0x5a).collect();
        f.write_all(&data).unwrap();
        let m = GuestMapping::new(f.into(), vec![block("ram", 0, size)]).unwrap();
        assert_eq!(m.resident(), 0, "nothing read yet");
        let mut back = vec![0u8; size as usize];
        m.volatile(0, size as usize).unwrap().copy_to(&mut back[..]);
        assert!(back == data);
        assert_eq!(m.resident(), size, "every page read is mapped");
        m.unmap_resident(size / 2 + 4096, 8192);
        assert_eq!(m.resident(), size - 8192);
        m.unmap_resident(size, 4096);
        assert_eq!(m.resident(), size - 8192, "beyond the end: nothing");
        m.unmap_resident(0, u64::MAX);
        assert_eq!(m.resident(), 0, "dropped whole, clamped to the mapping");
        back.fill(0);
        m.volatile(0, size as usize).unwrap().copy_to(&mut back[..]);
        assert!(back == data, "the memfd kept every page");
    }

    #[test]
    fn unsealed_memfd_is_refused() {
        let f = memfd::MemfdOptions::default()
            .create("t")
            .unwrap()
            .into_file();
        f.set_len(4096).unwrap();
        let e = GuestMapping::new(f.into(), vec![block("ram", 0, 4096)]).unwrap_err();
        assert!(e.to_string().contains("F_SEAL_SHRINK"), "{e}");
    }

    #[test]
    fn ranges_widen_to_whole_pages_within_their_block() {
        let per = HUGE_PAGE_SIZE / PAGE_SIZE;
        let size = 3 * HUGE_PAGE_SIZE + 16 * PAGE_SIZE;
        let m = GuestMapping::new(memfd(size).into(), vec![block("ram", 0, size)]).unwrap();
        // 4 KiB pages: unchanged.
        assert_eq!(m.widen_to_pages_of(PAGE_SIZE, 0, 5, 3), (5, 3));
        // One page: its huge page; two pages across a boundary: both huge pages.
        assert_eq!(m.widen_to_pages_of(HUGE_PAGE_SIZE, 0, 5, 1), (0, per));
        assert_eq!(
            m.widen_to_pages_of(HUGE_PAGE_SIZE, 0, per - 1, 2),
            (0, 2 * per)
        );
        // Whole huge pages stay as they are; the last, short one ends with the block.
        assert_eq!(m.widen_to_pages_of(HUGE_PAGE_SIZE, 0, per, per), (per, per));
        assert_eq!(
            m.widen_to_pages_of(HUGE_PAGE_SIZE, 0, 3 * per + 2, 1),
            (3 * per, 16)
        );
    }

    fn block(name: &str, off: u64, size: u64) -> LocalBlock {
        LocalBlock {
            desc: proto::BlockDesc {
                name: name.into(),
                guest_addr: off,
                size,
            },
            memfd_offset: off,
            host_addr: 0,
        }
    }

    #[test]
    fn data_extents_split_ranges_as_lseek_does() {
        let pages = 256u64;
        let mut f = memfd(pages * 4096);
        // Data at pages 8-9, 100-199 and 255.
        for (first, n) in [(8u64, 2u64), (100, 100), (255, 1)] {
            f.seek(SeekFrom::Start(first * 4096)).unwrap();
            f.write_all(&vec![1u8; (n * 4096) as usize]).unwrap();
        }
        let m = GuestMapping::new(f.into(), vec![block("ram", 0, pages * 4096)]).unwrap();
        let x = m.data_extents();
        let p = |n: u64| n * 4096;
        for (a, b) in [
            (0, 256),
            (0, 8),
            (9, 10),
            (5, 150),
            (150, 256),
            (199, 255),
            (254, 256),
        ] {
            assert_eq!(
                x.segments(p(a), p(b)),
                m.segments(p(a), p(b)),
                "pages {a}..{b}"
            );
        }
        assert_eq!(x.hole_end(p(0), p(pages)), Some(p(8)));
        assert_eq!(x.hole_end(p(8), p(pages)), None);
        assert_eq!(x.hole_end(p(10), p(pages)), Some(p(100)));
        assert_eq!(x.hole_end(p(200), p(pages)), Some(p(255)));
        assert_eq!(x.hole_end(p(255), p(pages)), None);
        let empty = GuestMapping::new(memfd(p(4)).into(), vec![block("ram", 0, p(4))]).unwrap();
        assert_eq!(empty.data_extents().hole_end(0, p(4)), Some(p(4)));
        assert_eq!(
            empty.data_extents().segments(0, p(4)),
            vec![(0, p(4), false)]
        );
    }

    #[test]
    fn holes_and_data_are_told_apart() {
        let mut f = memfd(64 * 4096);
        f.seek(SeekFrom::Start(8 * 4096)).unwrap();
        f.write_all(&[1u8; 4096 * 2]).unwrap();
        let m = GuestMapping::new(f.into(), vec![block("ram", 0, 64 * 4096)]).unwrap();
        let segs = m.segments(0, 64 * 4096);
        assert_eq!(
            segs,
            vec![
                (0, 8 * 4096, false),
                (8 * 4096, 2 * 4096, true),
                (10 * 4096, 54 * 4096, false)
            ]
        );
        // Frozen, in any order: the same answer.
        let mut cache = SegmentCache::default();
        assert_eq!(
            m.segments_frozen(9 * 4096, 12 * 4096, &mut cache),
            vec![(9 * 4096, 4096, true), (10 * 4096, 2 * 4096, false)]
        );
        assert_eq!(m.segments_frozen(0, 64 * 4096, &mut cache), segs);
        assert_eq!(
            m.segments_frozen(0, 4096, &mut cache),
            vec![(0, 4096, false)]
        );
        // Piecewise with a cache: the same answer, run by run.
        let mut cache = SegmentCache::default();
        let mut pieces = Vec::new();
        for run in 0..16 {
            pieces.extend(m.segments_cached(run * 4 * 4096, (run + 1) * 4 * 4096, &mut cache));
        }
        assert_eq!(
            pieces,
            vec![
                (0, 4 * 4096, false),
                (4 * 4096, 4 * 4096, false),
                (8 * 4096, 2 * 4096, true),
                (10 * 4096, 2 * 4096, false),
            ]
            .into_iter()
            .chain((3..16).map(|r| (r * 4 * 4096, 4 * 4096, false)))
            .collect::<Vec<_>>()
        );
    }

    #[test]
    fn layout_beyond_the_memfd_is_refused() {
        let f = memfd(4096);
        let e = GuestMapping::new(f.into(), vec![block("ram", 0, 8192)]).unwrap_err();
        assert!(e.to_string().contains("ram"), "{e}");
    }

    #[test]
    fn non_file_fd_is_refused() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = GuestMapping::new(a.into(), vec![block("ram", 0, 4096)]).unwrap_err();
        assert!(e.to_string().contains("wrong fd"), "{e}");
    }

    #[test]
    fn offsets_are_bounds_checked() {
        let f = memfd(16 * 4096);
        let m = GuestMapping::new(f.into(), vec![block("ram", 0, 16 * 4096)]).unwrap();
        assert_eq!(m.offset_of(0, 15, 1).unwrap(), 15 * 4096);
        assert!(matches!(
            m.offset_of(0, 15, 2),
            Err(MappingError::OutsideBlock {
                page: 15,
                count: 2,
                ..
            })
        ));
        assert!(matches!(
            m.offset_of(1, 0, 1),
            Err(MappingError::NoBlock { block: 1, .. })
        ));
        assert!(matches!(
            m.offset_of(0, u64::MAX, 2),
            Err(MappingError::OutsideBlock { .. })
        ));
    }

    #[test]
    fn punch_hole_zeroes() {
        let f = memfd(4 * 4096);
        std::os::unix::fs::FileExt::write_all_at(&f, &[7; 4096], 4096).unwrap();
        let m = GuestMapping::new(f.into(), vec![block("ram", 0, 4 * 4096)]).unwrap();
        assert!(!is_zero(&m.volatile(4096, 4096).unwrap()));
        m.punch_hole(4096, 4096).unwrap();
        // Checked before reading: a read fault on a shmem hole allocates a page again.
        assert_eq!(m.segments(0, 4 * 4096), vec![(0, 4 * 4096, false)]);
        assert!(is_zero(&m.volatile(4096, 4096).unwrap()));
    }

    #[test]
    fn volatile_views_are_bounds_checked_and_read_the_memfd() {
        let f = memfd(4 * 4096);
        std::os::unix::fs::FileExt::write_all_at(&f, b"guest", 3 * 4096 + 100).unwrap();
        let m = GuestMapping::new(f.into(), vec![block("ram", 0, 4 * 4096)]).unwrap();
        let mut b = [0u8; 5];
        m.volatile(3 * 4096 + 100, 5).unwrap().copy_to(&mut b[..]);
        assert_eq!(&b, b"guest");
        assert_eq!(m.volatile(0, 4 * 4096).unwrap().len(), 4 * 4096);
        assert!(m.volatile(4 * 4096, 0).unwrap().is_empty());
        for (off, len) in [
            (0, 4 * 4096 + 1),
            (4 * 4096, 1),
            (u64::MAX, 2),
            (1, usize::MAX),
        ] {
            let e = m.volatile(off, len).unwrap_err();
            assert!(e.to_string().contains("outside"), "{off:#x}+{len:#x}: {e}");
        }
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096 + 16];
        // Every alignment and length of head and tail around the aligned words.
        for start in 0..9 {
            for len in [0, 1, 7, 8, 9, 63, 64, 65, 4096 - start] {
                let v = VolatileSlice::from(&mut p[start..start + len]);
                assert!(is_zero(&v), "{start}+{len}");
                for i in 0..len {
                    p[start + i] = 1;
                    let v = VolatileSlice::from(&mut p[start..start + len]);
                    assert!(!is_zero(&v), "{start}+{len}: byte {i}");
                    p[start + i] = 0;
                }
            }
        }
    }
}
