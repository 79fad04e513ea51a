//! Built-in bare-metal test guests.
//!
//! Each guest is a multiboot v1 ELF32 image compiled from `guests/` by
//! `build.rs`. The multiboot header sets the address fields (flag bit 16), so
//! a loader can place the image without parsing ELF. Guest parameters are
//! `key=value` tokens on the multiboot command line; `guests/README.md`
//! describes the parameters and the exact serial output of each guest.

/// `(name, ELF image)` for every built-in guest.
pub const BUILTIN: &[(&str, &[u8])] = &[
    (
        "memtouch",
        include_bytes!(concat!(env!("OUT_DIR"), "/memtouch.elf")),
    ),
    (
        "digest",
        include_bytes!(concat!(env!("OUT_DIR"), "/digest.elf")),
    ),
];

/// Returns the ELF image of the built-in guest called `name`.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    BUILTIN
        .iter()
        .find(|(guest, _)| *guest == name)
        .map(|(_, image)| *image)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB_MAGIC: u32 = 0x1BAD_B002;
    const MB_FLAG_ADDRS: u32 = 1 << 16;
    /// The multiboot spec only searches this far into the file.
    const MB_SEARCH: usize = 8192;
    const PT_LOAD: u32 = 1;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// The multiboot header fields, and the header's file offset.
    struct MbHeader {
        offset: usize,
        flags: u32,
        header_addr: u32,
        load_addr: u32,
        load_end_addr: u32,
        bss_end_addr: u32,
        entry_addr: u32,
    }

    fn find_mb_header(elf: &[u8]) -> Option<MbHeader> {
        let end = elf.len().min(MB_SEARCH);
        (0..end.saturating_sub(12))
            .step_by(4)
            .find(|&off| {
                let magic = u32_at(elf, off);
                let flags = u32_at(elf, off + 4);
                let sum = u32_at(elf, off + 8);
                magic == MB_MAGIC && magic.wrapping_add(flags).wrapping_add(sum) == 0
            })
            .map(|off| MbHeader {
                offset: off,
                flags: u32_at(elf, off + 4),
                header_addr: u32_at(elf, off + 12),
                load_addr: u32_at(elf, off + 16),
                load_end_addr: u32_at(elf, off + 20),
                bss_end_addr: u32_at(elf, off + 24),
                entry_addr: u32_at(elf, off + 28),
            })
    }

    #[test]
    fn lookup_by_name() {
        assert!(builtin("memtouch").is_some());
        assert!(builtin("digest").is_some());
        assert!(builtin("no-such-guest").is_none());
    }

    #[test]
    fn builtins_are_multiboot_elf32() {
        for (name, elf) in BUILTIN {
            // ELF32, little endian, executable, i386.
            assert!(elf.len() > 52, "{name}: too short");
            assert_eq!(&elf[..4], b"\x7fELF", "{name}: not ELF");
            assert_eq!(elf[4], 1, "{name}: not ELFCLASS32");
            assert_eq!(elf[5], 1, "{name}: not little endian");
            assert_eq!(u16_at(elf, 16), 2, "{name}: not ET_EXEC");
            assert_eq!(u16_at(elf, 18), 3, "{name}: not EM_386");
            let e_entry = u32_at(elf, 24);

            let mb = find_mb_header(elf).unwrap_or_else(|| panic!("{name}: no multiboot header"));
            assert_eq!(mb.flags & 0b11, 0b11, "{name}: flags bits 0 and 1");
            assert_ne!(mb.flags & MB_FLAG_ADDRS, 0, "{name}: flag bit 16");
            assert!(mb.load_addr >= 0x10_0000, "{name}: loads below 1 MiB");
            assert!(
                mb.load_addr <= mb.header_addr,
                "{name}: header before image"
            );
            assert!(
                mb.header_addr < mb.load_end_addr,
                "{name}: header outside image"
            );
            assert!(
                mb.load_end_addr <= mb.bss_end_addr,
                "{name}: bss ends early"
            );
            assert!(
                (mb.load_addr..mb.load_end_addr).contains(&mb.entry_addr),
                "{name}: entry outside image"
            );
            assert_eq!(mb.entry_addr, e_entry, "{name}: entry differs from ELF");

            // The image the address fields describe must lie within the file.
            let delta = (mb.header_addr - mb.load_addr) as usize;
            let start = mb
                .offset
                .checked_sub(delta)
                .expect("image starts before file");
            let image_len = (mb.load_end_addr - mb.load_addr) as usize;
            assert!(
                start + image_len <= elf.len(),
                "{name}: image past end of file"
            );
            let image = &elf[start..start + image_len];

            // Every ELF load segment must agree with that image, so loading via
            // the address fields or via ELF gives the same memory.
            let phoff = u32_at(elf, 28) as usize;
            let phentsize = u16_at(elf, 42) as usize;
            let phnum = u16_at(elf, 44) as usize;
            let mut loads = 0;
            for i in 0..phnum {
                let ph = phoff + i * phentsize;
                if u32_at(elf, ph) != PT_LOAD {
                    continue;
                }
                loads += 1;
                let offset = u32_at(elf, ph + 4) as usize;
                let vaddr = u32_at(elf, ph + 8);
                let filesz = u32_at(elf, ph + 16);
                let memsz = u32_at(elf, ph + 20);
                assert!(vaddr >= mb.load_addr, "{name}: segment below image");
                assert!(
                    vaddr + memsz <= mb.bss_end_addr,
                    "{name}: segment past bss_end_addr"
                );
                // A segment with no file data (bss only) loads nothing.
                if filesz == 0 {
                    continue;
                }
                assert!(
                    vaddr + filesz <= mb.load_end_addr,
                    "{name}: file data past load_end_addr"
                );
                let at = (vaddr - mb.load_addr) as usize;
                let len = filesz as usize;
                assert_eq!(
                    &image[at..at + len],
                    &elf[offset..offset + len],
                    "{name}: segment bytes differ from image"
                );
            }
            assert!(loads > 0, "{name}: no load segments");
        }
    }
}
