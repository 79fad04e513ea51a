//! Multiboot (v1) kernel loading: places the image, the multiboot information structure and the
//! command line in guest RAM, as a multiboot boot loader (GRUB, QEMU's `-kernel`) would.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestRam;

/// Value in EAX that tells the kernel a multiboot loader started it.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
const HEADER_MAGIC: u32 = 0x1BAD_B002;
const HEADER_SEARCH: usize = 8192;
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Where the multiboot information structure goes (conventional memory, below the kernel).
pub const MBI_ADDR: u64 = 0x9000;
const MMAP_ADDR: u64 = 0x9400;
const CMDLINE_ADDR: u64 = 0x9800;
const CMDLINE_MAX: usize = 2047;

/// Errors of kernel loading.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// No multiboot header in the first 8 KiB.
    #[error("no multiboot v1 header in the first {HEADER_SEARCH} bytes of the kernel")]
    NoHeader,
    /// The header's address fields are inconsistent with the file.
    #[error("multiboot header: {0}")]
    BadHeader(String),
    /// The ELF file is malformed.
    #[error("kernel ELF: {0}")]
    BadElf(String),
    /// The kernel would be placed outside RAM.
    #[error("kernel does not fit in guest RAM: {0}")]
    OutOfRam(#[from] crate::memory::MemoryError),
    /// Writing guest memory failed.
    #[error("writing guest memory: {0}")]
    Write(String),
    /// The command line is too long.
    #[error("kernel command line longer than {CMDLINE_MAX} bytes")]
    CmdlineTooLong,
}

/// Where the loaded kernel starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// Entry point (EIP).
    pub entry: u32,
    /// Address of the multiboot information structure (EBX).
    pub mbi: u32,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
}

fn write(ram: &GuestRam, addr: u64, data: &[u8]) -> Result<(), LoaderError> {
    ram.check_range(addr, data.len() as u64)?;
    ram.guest_memory()
        .write_slice(data, GuestAddress(addr))
        .map_err(|e| LoaderError::Write(e.to_string()))
}

/// Loads `image` and its command line; returns the entry state.
pub fn load(ram: &GuestRam, image: &[u8], cmdline: &str) -> Result<BootInfo, LoaderError> {
    let hdr_off = (0..HEADER_SEARCH.min(image.len().saturating_sub(12)))
        .step_by(4)
        .find(|&o| {
            let (Some(m), Some(f), Some(c)) =
                (u32_at(image, o), u32_at(image, o + 4), u32_at(image, o + 8))
            else {
                return false;
            };
            m == HEADER_MAGIC && m.wrapping_add(f).wrapping_add(c) == 0
        })
        .ok_or(LoaderError::NoHeader)?;
    let flags = u32_at(image, hdr_off + 4).unwrap_or(0);
    let entry = if flags & FLAG_AOUT_KLUDGE != 0 {
        load_aout_kludge(ram, image, hdr_off)?
    } else {
        load_elf32(ram, image)?
    };
    write_boot_info(ram, cmdline)?;
    Ok(BootInfo {
        entry,
        mbi: MBI_ADDR as u32,
    })
}

fn load_aout_kludge(ram: &GuestRam, image: &[u8], hdr_off: usize) -> Result<u32, LoaderError> {
    let field = |i: usize| {
        u32_at(image, hdr_off + 12 + 4 * i)
            .ok_or_else(|| LoaderError::BadHeader("truncated address fields".into()))
    };
    let (header_addr, load_addr, load_end, bss_end, entry) =
        (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    if header_addr < load_addr || (header_addr - load_addr) as usize > hdr_off {
        return Err(LoaderError::BadHeader(format!(
            "header_addr {header_addr:#x} inconsistent with load_addr {load_addr:#x}"
        )));
    }
    let file_start = hdr_off - (header_addr - load_addr) as usize;
    let file_len = if load_end == 0 {
        image.len() - file_start
    } else {
        load_end
            .checked_sub(load_addr)
            .ok_or_else(|| LoaderError::BadHeader("load_end_addr below load_addr".into()))?
            as usize
    };
    let data = image
        .get(file_start..file_start + file_len)
        .ok_or_else(|| LoaderError::BadHeader("load range beyond the end of the file".into()))?;
    write(ram, load_addr as u64, data)?;
    let loaded_end = load_addr as u64 + file_len as u64;
    if bss_end as u64 > loaded_end {
        write(
            ram,
            loaded_end,
            &vec![0; (bss_end as u64 - loaded_end) as usize],
        )?;
    }
    Ok(entry)
}

fn load_elf32(ram: &GuestRam, image: &[u8]) -> Result<u32, LoaderError> {
    let bad = |m: &str| LoaderError::BadElf(m.to_string());
    if image.get(0..4) != Some(b"\x7fELF".as_slice()) || image.get(4) != Some(&1) {
        return Err(bad("not a 32-bit ELF file"));
    }
    let entry = u32_at(image, 24).ok_or_else(|| bad("truncated header"))?;
    let phoff = u32_at(image, 28).ok_or_else(|| bad("truncated header"))? as usize;
    let phentsize = u16_at(image, 42).ok_or_else(|| bad("truncated header"))? as usize;
    let phnum = u16_at(image, 44).ok_or_else(|| bad("truncated header"))? as usize;
    if phentsize < 32 {
        return Err(bad("program header entries too small"));
    }
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let f = |o: usize| u32_at(image, ph + o).ok_or_else(|| bad("truncated program header"));
        if f(0)? != 1 {
            continue; // not PT_LOAD
        }
        let (offset, paddr, filesz, memsz) = (f(4)? as usize, f(12)?, f(16)? as usize, f(20)?);
        let data = image
            .get(offset..offset + filesz)
            .ok_or_else(|| bad("segment beyond the end of the file"))?;
        write(ram, paddr as u64, data)?;
        if memsz as usize > filesz {
            write(
                ram,
                paddr as u64 + filesz as u64,
                &vec![0; memsz as usize - filesz],
            )?;
        }
    }
    Ok(entry)
}

fn write_boot_info(ram: &GuestRam, cmdline: &str) -> Result<(), LoaderError> {
    if cmdline.len() > CMDLINE_MAX {
        return Err(LoaderError::CmdlineTooLong);
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    write(ram, CMDLINE_ADDR, &c)?;

    // E820-style map: conventional memory, then RAM from 1 MiB, then each further block.
    let mut ranges = vec![(0u64, 0x9_fc00u64)];
    for b in ram.blocks() {
        let start = b.desc.guest_addr.max(0x10_0000);
        let end = b.desc.guest_addr + b.desc.size;
        if end > start {
            ranges.push((start, end - start));
        }
    }
    let mut mmap = Vec::new();
    for (base, len) in &ranges {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&1u32.to_le_bytes());
    }
    write(ram, MMAP_ADDR, &mmap)?;

    let low_end = ram.blocks()[0].desc.size;
    let mem_upper_kb = (low_end.saturating_sub(0x10_0000) / 1024).min(u32::MAX as u64) as u32;
    let mut mbi = [0u8; 52];
    let mut put = |off: usize, v: u32| mbi[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(0, 1 | (1 << 2) | (1 << 6)); // mem_*, cmdline, mmap
    put(4, 639);
    put(8, mem_upper_kb);
    put(16, CMDLINE_ADDR as u32);
    put(44, mmap.len() as u32);
    put(48, MMAP_ADDR as u32);
    write(ram, MBI_ADDR, &mbi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kludge_image(entry: u32) -> Vec<u8> {
        // Header at offset 0, image loaded at 1 MiB, 4 KiB of file, 4 KiB of bss.
        let mut img = vec![0u8; 4096];
        let flags = FLAG_AOUT_KLUDGE | 3;
        let fields = [
            HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags),
            0x10_0000,
            0x10_0000,
            0x10_1000,
            0x10_2000,
            entry,
        ];
        for (i, f) in fields.iter().enumerate() {
            img[i * 4..i * 4 + 4].copy_from_slice(&f.to_le_bytes());
        }
        img[100] = 0xf4;
        img
    }

    #[test]
    fn loads_kludge_image_and_boot_info() {
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.prefill(1, u64::MAX);
        let info = load(&ram, &kludge_image(0x10_0040), "pages=16").unwrap();
        assert_eq!(info.entry, 0x10_0040);
        let m = ram.guest_memory();
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x10_0000 + 100)).unwrap(),
            0xf4
        );
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(0x10_1800)).unwrap(),
            0,
            "bss zeroed"
        );
        let cmd: u32 = m.read_obj(GuestAddress(MBI_ADDR + 16)).unwrap();
        let mut buf = [0u8; 9];
        m.read_slice(&mut buf, GuestAddress(cmd as u64)).unwrap();
        assert_eq!(&buf, b"pages=16\0");
    }

    #[test]
    fn missing_header_is_an_error() {
        let ram = GuestRam::new(4 << 20).unwrap();
        assert!(matches!(
            load(&ram, &[0u8; 100], ""),
            Err(LoaderError::NoHeader)
        ));
    }

    #[test]
    fn image_beyond_ram_is_an_error() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let mut img = kludge_image(0);
        // Move the load address past the end of the 2 MiB of RAM.
        for (i, v) in [
            (12, 0x40_0000u32),
            (16, 0x40_0000),
            (20, 0x40_1000),
            (24, 0),
        ] {
            img[i..i + 4].copy_from_slice(&v.to_le_bytes());
        }
        assert!(matches!(
            load(&ram, &img, ""),
            Err(LoaderError::OutOfRam(_))
        ));
    }
}
