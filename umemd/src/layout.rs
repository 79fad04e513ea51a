//! The RAM layout a VMM declares (`LocalBlock`s) checked against the memfd it hands over,
//! before umemd maps anything or sizes anything from it.
//!
//! Everything umemd keeps per guest page (the destination's page table, the source's sent
//! map and dirty bitmaps) is sized from the blocks. Blocks that lie in the memfd, page-aligned
//! and apart from each other, hold at most one page each per page of the memfd: a session's
//! bookkeeping is then bounded by the memfd's size, which is memory the client itself made.
//! Blocks that overlap in guest address space would make the destination place one page at two
//! guest addresses.

use proto::local::LocalBlock;
use proto::PAGE_SIZE;

/// A layout umemd refuses; each names the block at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// No block at all.
    #[error("the RAM layout has no block")]
    NoBlocks,
    /// A block of no pages.
    #[error("RAM block {name}: size 0")]
    Empty {
        /// The block.
        name: String,
    },
    /// A field that is not a multiple of the page size.
    #[error("RAM block {name}: {field} {value:#x} is not a multiple of the page size")]
    Unaligned {
        /// The block.
        name: String,
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The block does not lie inside the memfd.
    #[error(
        "RAM block {name}: offset {offset:#x} size {size:#x} outside the {memfd_len:#x}-byte memfd"
    )]
    OutsideMemfd {
        /// The block.
        name: String,
        /// Its offset in the memfd.
        offset: u64,
        /// Its size.
        size: u64,
        /// The memfd's size.
        memfd_len: u64,
    },
    /// The block's guest range wraps around the address space.
    #[error("RAM block {name}: guest address {addr:#x} size {size:#x} wraps the address space")]
    GuestWraps {
        /// The block.
        name: String,
        /// Its guest address.
        addr: u64,
        /// Its size.
        size: u64,
    },
    /// Two blocks share bytes of the memfd or guest addresses.
    #[error("RAM block {name} overlaps block {other} in {space} ({start:#x}..{end:#x} and {other_start:#x}..{other_end:#x})")]
    Overlap {
        /// The later block.
        name: String,
        /// The block it overlaps.
        other: String,
        /// "the memfd" or "guest address space".
        space: &'static str,
        /// The block's range.
        start: u64,
        /// End of the block's range.
        end: u64,
        /// The other block's range.
        other_start: u64,
        /// End of the other block's range.
        other_end: u64,
    },
    /// Two blocks of one name (blocks are matched by name between the hosts).
    #[error("RAM block {name} is declared twice")]
    DuplicateName {
        /// The name.
        name: String,
    },
}

/// What a valid layout makes a session hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Blocks.
    pub blocks: usize,
    /// Guest pages over all blocks (at most the memfd's pages).
    pub pages: u64,
    /// The memfd's size.
    pub memfd_bytes: u64,
    /// Bytes umemd allocates for the session's per-page bookkeeping, in either role: one byte
    /// per page (the destination's page table) and three bits per page (the sent map and two
    /// dirty bitmaps on the source, a bitmap during a recovery on the destination).
    pub bookkeeping_bytes: u64,
}

impl std::fmt::Display for Footprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} blocks, {} pages in a {} MiB memfd; per-page bookkeeping {} KiB",
            self.blocks,
            self.pages,
            self.memfd_bytes >> 20,
            self.bookkeeping_bytes.div_ceil(1024)
        )
    }
}

/// Checks `blocks` against a memfd of `memfd_len` bytes: every block non-empty, page-aligned
/// (memfd offset, guest and host address, size), inside the memfd, and apart from every other
/// block both in the memfd and in guest address space; names unique. Returns what the layout
/// costs a session.
pub fn validate(blocks: &[LocalBlock], memfd_len: u64) -> Result<Footprint, LayoutError> {
    if blocks.is_empty() {
        return Err(LayoutError::NoBlocks);
    }
    for b in blocks {
        let name = || b.desc.name.clone();
        if b.desc.size == 0 {
            return Err(LayoutError::Empty { name: name() });
        }
        for (field, value) in [
            ("memfd offset", b.memfd_offset),
            ("size", b.desc.size),
            ("guest address", b.desc.guest_addr),
            ("host address", b.host_addr),
        ] {
            if value % PAGE_SIZE != 0 {
                return Err(LayoutError::Unaligned {
                    name: name(),
                    field,
                    value,
                });
            }
        }
        if b.memfd_offset
            .checked_add(b.desc.size)
            .is_none_or(|end| end > memfd_len)
        {
            return Err(LayoutError::OutsideMemfd {
                name: name(),
                offset: b.memfd_offset,
                size: b.desc.size,
                memfd_len,
            });
        }
        if b.desc.guest_addr.checked_add(b.desc.size).is_none() {
            return Err(LayoutError::GuestWraps {
                name: name(),
                addr: b.desc.guest_addr,
                size: b.desc.size,
            });
        }
    }
    let mut names: Vec<&str> = blocks.iter().map(|b| b.desc.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(LayoutError::DuplicateName {
            name: w[0].to_string(),
        });
    }
    no_overlap(blocks, "the memfd", |b| b.memfd_offset)?;
    no_overlap(blocks, "guest address space", |b| b.desc.guest_addr)?;
    let pages: u64 = blocks.iter().map(|b| b.desc.pages()).sum();
    let words: u64 = blocks.iter().map(|b| b.desc.pages().div_ceil(64)).sum();
    Ok(Footprint {
        blocks: blocks.len(),
        pages,
        memfd_bytes: memfd_len,
        bookkeeping_bytes: pages + 3 * words * 8,
    })
}

/// Refuses two blocks whose `[start, start + size)` meet (sizes were checked not to wrap).
fn no_overlap(
    blocks: &[LocalBlock],
    space: &'static str,
    start: impl Fn(&LocalBlock) -> u64,
) -> Result<(), LayoutError> {
    let mut by_start: Vec<&LocalBlock> = blocks.iter().collect();
    by_start.sort_by_key(|b| start(b));
    // The block reaching furthest so far: any later block starting before its end overlaps it.
    let mut reach: Option<&LocalBlock> = None;
    for &b in &by_start {
        let (s, e) = (start(b), start(b) + b.desc.size);
        if let Some(r) = reach {
            let (rs, re) = (start(r), start(r) + r.desc.size);
            if s < re {
                return Err(LayoutError::Overlap {
                    name: b.desc.name.clone(),
                    other: r.desc.name.clone(),
                    space,
                    start: s,
                    end: e,
                    other_start: rs,
                    other_end: re,
                });
            }
            if e > re {
                reach = Some(b);
            }
        } else {
            reach = Some(b);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn block(name: &str, memfd_offset: u64, guest_addr: u64, size: u64) -> LocalBlock {
        LocalBlock {
            desc: proto::BlockDesc {
                name: name.into(),
                guest_addr,
                size,
            },
            memfd_offset,
            host_addr: 0x7f00_0000_0000u64.wrapping_add(memfd_offset),
        }
    }

    #[test]
    fn the_vmms_two_block_layout_is_accepted() {
        // 5 GiB: ram-low below 3 GiB, ram-high from 4 GiB, one after the other in the memfd.
        let low = 3u64 << 30;
        let high = 2u64 << 30;
        let f = validate(
            &[
                block("ram-low", 0, 0, low),
                block("ram-high", low, 4 << 30, high),
            ],
            low + high,
        )
        .unwrap();
        assert_eq!(f.blocks, 2);
        assert_eq!(f.pages, (low + high) / P);
        assert!(f.to_string().contains("5120 MiB"), "{f}");
    }

    #[test]
    fn blocks_overlapping_in_the_memfd_are_refused_by_name() {
        let e = validate(
            &[block("a", 0, 0, 8 * P), block("b", 4 * P, 1 << 30, 8 * P)],
            16 * P,
        )
        .unwrap_err();
        assert!(
            matches!(&e, LayoutError::Overlap { name, other, space: "the memfd", .. } if name == "b" && other == "a"),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("RAM block b overlaps block a"),
            "{e}"
        );
        // One block inside another, declared first: found all the same.
        let e = validate(
            &[
                block("inner", 2 * P, 1 << 30, P),
                block("outer", 0, 0, 8 * P),
                block("after", 8 * P, 2 << 30, P),
            ],
            16 * P,
        )
        .unwrap_err();
        assert!(e.to_string().contains("inner"), "{e}");
        // Touching is not overlapping.
        assert!(validate(
            &[block("a", 0, 0, 4 * P), block("b", 4 * P, 4 * P, 4 * P)],
            8 * P
        )
        .is_ok());
    }

    #[test]
    fn blocks_overlapping_in_guest_address_space_are_refused() {
        let e = validate(
            &[
                block("a", 0, 1 << 20, 8 * P),
                block("b", 8 * P, (1 << 20) + 7 * P, P),
            ],
            16 * P,
        )
        .unwrap_err();
        assert!(
            matches!(
                &e,
                LayoutError::Overlap {
                    space: "guest address space",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("block b") && e.to_string().contains("block a"),
            "{e}"
        );
    }

    #[test]
    fn a_block_beyond_the_memfd_is_refused() {
        for (off, size) in [(0, 5 * P), (4 * P, P), (u64::MAX - P + 1, 2 * P)] {
            let e = validate(&[block("big", off, 0, size)], 4 * P).unwrap_err();
            assert!(
                matches!(e, LayoutError::OutsideMemfd { .. }),
                "{off:#x}+{size:#x}: {e}"
            );
            assert!(
                e.to_string().contains("RAM block big") && e.to_string().contains("outside"),
                "{e}"
            );
        }
    }

    #[test]
    fn unaligned_or_empty_blocks_are_refused() {
        let mut b = block("odd", 0, 0, 4 * P);
        b.memfd_offset = 100;
        let e = validate(&[b], 8 * P).unwrap_err();
        assert!(
            matches!(
                &e,
                LayoutError::Unaligned {
                    field: "memfd offset",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("RAM block odd"), "{e}");
        for (field, b) in [
            ("size", block("odd", 0, 0, 4 * P + 1)),
            ("guest address", block("odd", 0, 12, 4 * P)),
            (
                "host address",
                LocalBlock {
                    host_addr: 1,
                    ..block("odd", 0, 0, 4 * P)
                },
            ),
        ] {
            let e = validate(&[b], 8 * P).unwrap_err();
            assert!(
                matches!(&e, LayoutError::Unaligned { field: f, .. } if *f == field),
                "{e:?}"
            );
        }
        let e = validate(&[block("none", 0, 0, 0)], 8 * P).unwrap_err();
        assert_eq!(
            e,
            LayoutError::Empty {
                name: "none".into()
            }
        );
        assert_eq!(validate(&[], 8 * P).unwrap_err(), LayoutError::NoBlocks);
    }

    #[test]
    fn guest_wrap_and_duplicate_names_are_refused() {
        let e = validate(&[block("top", 0, u64::MAX - P + 1, 2 * P)], 8 * P).unwrap_err();
        assert!(matches!(e, LayoutError::GuestWraps { .. }), "{e:?}");
        let e = validate(&[block("ram", 0, 0, P), block("ram", P, 1 << 30, P)], 8 * P).unwrap_err();
        assert_eq!(e, LayoutError::DuplicateName { name: "ram".into() });
    }

    #[test]
    fn bookkeeping_is_bounded_by_the_memfd() {
        // However the client cuts a memfd into valid blocks, what a session allocates per page
        // stays a small fraction of the memfd: at most one byte and three bits per 4 KiB page
        // (plus a partial bitmap word per block).
        let memfd = 64 * P;
        let layouts: Vec<Vec<LocalBlock>> = vec![
            vec![block("all", 0, 0, memfd)],
            (0..64)
                .map(|i| block(&format!("b{i}"), i * P, i << 30, P))
                .collect(),
            vec![block("half", 32 * P, 0, 32 * P)],
        ];
        for l in layouts {
            let f = validate(&l, memfd).unwrap();
            assert!(f.pages <= memfd / P);
            let bound = memfd / P + 3 * (memfd / P).div_ceil(64) * 8 + 3 * 8 * f.blocks as u64;
            assert!(f.bookkeeping_bytes <= bound, "{f:?}");
            assert!(f.bookkeeping_bytes <= memfd / 100, "{f:?}");
        }
        let f = validate(&[block("ram", 0, 0, 1 << 30)], 1 << 30).unwrap();
        assert_eq!(f.bookkeeping_bytes, (1 << 18) + 3 * (1 << 12) * 8);
    }
}
