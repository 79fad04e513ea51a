//! umemd's own view of a VM's guest RAM: the memfd the VMM handed over, mapped `MAP_SHARED`,
//! plus the layout that says which part of it is which block.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::unistd::{lseek, Whence};
use proto::local::LocalBlock;
use proto::PAGE_SIZE;

/// Errors of mapping a VMM's memory.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// The fd is not a usable memfd.
    #[error("guest RAM fd: {0}")]
    BadFd(String),
    /// The layout does not fit the memfd.
    #[error("RAM block {name}: {reason}")]
    BadBlock {
        /// Block name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// `mmap` failed.
    #[error("mapping guest RAM: {0}")]
    Map(nix::Error),
}

/// Extents of the memfd found by earlier `lseek` calls: `[from, to)` of data and of hole.
/// Data stays data on a source memfd; a hole can fill while the guest runs, so a cache lives
/// for one pass over memory at most (a page written meanwhile is dirty and sent later).
#[derive(Debug, Default, Clone, Copy)]
pub struct SegmentCache {
    data: (u64, u64),
    hole: (u64, u64),
}

/// A `MAP_SHARED` mapping of a whole guest-RAM memfd.
#[derive(Debug)]
pub struct GuestMapping {
    file: File,
    ptr: NonNull<u8>,
    len: usize,
    blocks: Vec<LocalBlock>,
}

// SAFETY: the mapping is plain read-only shared memory; a write to the memfd by another path
// (the guest, pwrite) can only tear what a reader sees, which `u8` reads tolerate.
unsafe impl Send for GuestMapping {}
// SAFETY: as above; `&GuestMapping` hands out only raw views whose use is coordinated.
unsafe impl Sync for GuestMapping {}

impl GuestMapping {
    /// Maps `fd` read-only, checking that it is a sealed memfd that holds every block. umemd
    /// only reads guest RAM through it; pages are written with `pwrite` or `UFFDIO_COPY`.
    pub fn new(fd: OwnedFd, blocks: Vec<LocalBlock>) -> Result<Self, MappingError> {
        let file = File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| MappingError::BadFd(format!("fstat: {e}")))?;
        if !meta.file_type().is_file() {
            return Err(MappingError::BadFd(
                "not a memfd or regular file (wrong fd passed?)".into(),
            ));
        }
        let len = meta.len() as usize;
        if len == 0 {
            return Err(MappingError::BadFd("the memfd is empty".into()));
        }
        // A memfd that can shrink would turn umemd's reads of it into SIGBUS.
        let seals = nix::fcntl::fcntl(file.as_fd(), nix::fcntl::FcntlArg::F_GET_SEALS)
            .map_err(|e| MappingError::BadFd(format!("not a sealable memfd: {e}")))?;
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(MappingError::BadFd(
                "the memfd is not sealed against shrinking (F_SEAL_SHRINK)".into(),
            ));
        }
        for b in &blocks {
            let end = b.memfd_offset.checked_add(b.desc.size);
            if b.memfd_offset % PAGE_SIZE != 0 || end.is_none_or(|e| e > len as u64) {
                return Err(MappingError::BadBlock {
                    name: b.desc.name.clone(),
                    reason: format!(
                        "offset {:#x} size {:#x} outside the {len:#x}-byte memfd",
                        b.memfd_offset, b.desc.size
                    ),
                });
            }
        }
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
        Ok(GuestMapping {
            file,
            ptr: ptr.cast(),
            len,
            blocks,
        })
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
    pub fn offset_of(&self, block: u32, page: u64, count: u64) -> Result<u64, String> {
        let b = self.blocks.get(block as usize).ok_or_else(|| {
            format!(
                "block index {block} out of range ({} blocks)",
                self.blocks.len()
            )
        })?;
        match page.checked_add(count) {
            Some(end) if end <= b.desc.pages() => Ok(b.memfd_offset + page * PAGE_SIZE),
            _ => Err(format!(
                "pages {page}..+{count} outside block {} of {} pages",
                b.desc.name,
                b.desc.pages()
            )),
        }
    }

    /// The bytes at memfd offset `off`, `len` long (checked by the caller with `offset_of`).
    ///
    /// # Safety
    /// The range must be in bounds, and nothing may write it concurrently in a way the caller
    /// cannot tolerate (the guest may, which only makes the read torn, never unsound for `u8`).
    pub unsafe fn slice(&self, off: u64, len: usize) -> &[u8] {
        debug_assert!(off as usize + len <= self.len);
        std::slice::from_raw_parts(self.ptr.as_ptr().add(off as usize), len)
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

    /// True if any page of `[off, off+len)` holds data (is not a hole).
    pub fn has_data(&self, off: u64, len: u64) -> bool {
        lseek(self.file.as_fd(), off as i64, Whence::SeekData).is_ok_and(|d| (d as u64) < off + len)
    }

    /// Drops `[off, off+len)` from the memfd: it reads as zeros and is a hole again.
    pub fn punch_hole(&self, off: u64, len: u64) -> Result<(), String> {
        nix::fcntl::fallocate(
            self.file.as_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off as i64,
            len as i64,
        )
        .map_err(|e| format!("punching a hole at {off:#x}+{len:#x}: {e}"))
    }
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

/// True if every byte of `page` is zero.
pub fn is_zero(page: &[u8]) -> bool {
    // SAFETY: reinterpreting initialised bytes as u64 is valid for any bit pattern.
    let (head, mid, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && mid.chunks(8).all(|c| c.iter().fold(0, |a, &w| a | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    fn memfd(len: u64) -> File {
        let f = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .create("t")
            .unwrap();
        f.as_file().set_len(len).unwrap();
        f.add_seal(memfd::FileSeal::SealShrink).unwrap();
        f.into_file()
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
        assert_eq!(m.offset_of(0, 15, 1), Ok(15 * 4096));
        assert!(m.offset_of(0, 15, 2).is_err());
        assert!(m.offset_of(1, 0, 1).is_err());
        assert!(m.offset_of(0, u64::MAX, 2).is_err());
    }

    #[test]
    fn punch_hole_zeroes() {
        let f = memfd(4 * 4096);
        std::os::unix::fs::FileExt::write_all_at(&f, &[7; 4096], 4096).unwrap();
        let m = GuestMapping::new(f.into(), vec![block("ram", 0, 4 * 4096)]).unwrap();
        // SAFETY: in bounds, single-threaded test.
        assert!(!is_zero(unsafe { m.slice(4096, 4096) }));
        m.punch_hole(4096, 4096).unwrap();
        // Checked before reading: a read fault on a shmem hole allocates a page again.
        assert_eq!(m.segments(0, 4 * 4096), vec![(0, 4 * 4096, false)]);
        // SAFETY: in bounds, single-threaded test.
        assert!(is_zero(unsafe { m.slice(4096, 4096) }));
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[0] = 1;
        assert!(!is_zero(&p));
    }
}
