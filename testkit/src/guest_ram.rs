//! Guest RAM seen from outside a vmm: where the `guest-ram` memfd is mapped in the process
//! (`/proc/PID/maps`), reading it through `/proc/PID/mem`, and a digest of the memfd itself
//! (`/proc/PID/fd`).

use std::time::Duration;

use crate::vmm::Vmm;

/// One mapping of guest RAM in a VMM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamMapping {
    /// First address.
    pub start: u64,
    /// Address after the last byte.
    pub end: u64,
    /// Offset in the memfd of the first byte.
    pub memfd_offset: u64,
}

/// Reads `len` bytes at `addr` of process `pid` through `/proc/<pid>/mem`, in a thread of its
/// own. Returns `None` when the read has not finished after `timeout` (the thread is left
/// behind, blocked, and its result is dropped whenever it ends).
pub fn read_process_memory(
    pid: u32,
    addr: u64,
    len: usize,
    timeout: Duration,
) -> Option<std::io::Result<Vec<u8>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("read-mem-{pid}"))
        .spawn(move || {
            use std::os::unix::fs::FileExt;
            let r = std::fs::File::open(format!("/proc/{pid}/mem")).and_then(|f| {
                let mut buf = vec![0u8; len];
                f.read_exact_at(&mut buf, addr)?;
                Ok(buf)
            });
            let _ = tx.send(r);
        })
        .expect("starting a reader thread");
    rx.recv_timeout(timeout).ok()
}

/// What the guest-RAM memfd of a vmm holds, read through the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamFileDigest {
    /// Bytes in the memfd.
    pub len: u64,
    /// SHA-256 of all of them, hex-encoded.
    pub sha256: String,
    /// Pages that are not all zero.
    pub nonzero_pages: u64,
}

impl Vmm {
    /// A digest of the whole guest-RAM memfd, read through the file rather than the vmm's
    /// mapping: an incoming vmm's userfaultfd covers the mapping, and `query-ram-digest` would
    /// wait there for ever on a missing page, while a read of the file sees a missing page as
    /// the zeros it holds.
    pub fn ram_file_digest(&self) -> RamFileDigest {
        use sha2::{Digest, Sha256};
        use std::os::unix::fs::FileExt;
        let pid = self.proc.pid();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap_or_else(|e| panic!("vmm {}: listing its fds: {e}", self.name));
        let path = fds
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                std::fs::read_link(p)
                    .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:guest-ram"))
            })
            .unwrap_or_else(|| panic!("vmm {}: no guest-ram memfd among its fds", self.name));
        let f = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("vmm {}: opening {}: {e}", self.name, path.display()));
        let len = f.metadata().map_or(0, |m| m.len());
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let (mut off, mut nonzero_pages) = (0u64, 0u64);
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], off)
                .unwrap_or_else(|e| panic!("vmm {}: reading guest RAM: {e}", self.name));
            h.update(&buf[..n]);
            nonzero_pages += buf[..n]
                .chunks(4096)
                .filter(|p| p.iter().any(|&b| b != 0))
                .count() as u64;
            off += n as u64;
        }
        RamFileDigest {
            len,
            sha256: h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
            nonzero_pages,
        }
    }

    /// The mappings of guest RAM (the memfd `guest-ram`) in the process, from
    /// `/proc/<pid>/maps`, in address order.
    pub fn ram_mappings(&self) -> Vec<RamMapping> {
        let maps =
            std::fs::read_to_string(format!("/proc/{}/maps", self.proc.pid())).unwrap_or_default();
        parse_ram_mappings(&maps)
    }

    /// The address in the process of the byte at memfd offset `offset` (guest address, for
    /// RAM below the PCI hole).
    pub fn ram_host_addr(&self, offset: u64) -> u64 {
        let maps = self.ram_mappings();
        maps.iter()
            .find(|m| offset >= m.memfd_offset && offset - m.memfd_offset < m.end - m.start)
            .map(|m| m.start + (offset - m.memfd_offset))
            .unwrap_or_else(|| {
                panic!(
                    "vmm {}: no guest-ram mapping covers memfd offset {offset:#x}: {maps:?}",
                    self.name
                )
            })
    }
}

/// The mappings of the memfd `guest-ram` in the text of a `/proc/<pid>/maps`.
fn parse_ram_mappings(maps: &str) -> Vec<RamMapping> {
    maps.lines()
        .filter(|l| l.contains("/memfd:guest-ram"))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (start, end) = it.next()?.split_once('-')?;
            let _perms = it.next()?;
            let offset = it.next()?;
            Some(RamMapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                memfd_offset: u64::from_str_radix(offset, 16).ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_mappings_are_found_among_the_others() {
        let maps = "\
55d0c0a00000-55d0c0a80000 r-xp 00000000 fd:01 1234 /usr/local/bin/vmm
7f1200000000-7f1210000000 rw-s 00000000 00:01 77 /memfd:guest-ram (deleted)
7f1300000000-7f1308000000 rw-s 10000000 00:01 77 /memfd:guest-ram (deleted)
7f1400000000-7f1400001000 rw-s 00000000 00:01 78 /memfd:other (deleted)
";
        assert_eq!(
            parse_ram_mappings(maps),
            vec![
                RamMapping {
                    start: 0x7f12_0000_0000,
                    end: 0x7f12_1000_0000,
                    memfd_offset: 0,
                },
                RamMapping {
                    start: 0x7f13_0000_0000,
                    end: 0x7f13_0800_0000,
                    memfd_offset: 0x1000_0000,
                },
            ]
        );
    }
}
