//! The destination umemd placing what the source sends before the VM runs: a real
//! `umemd::dest::Dest` over a real sealed memfd of 2.5 MiB (three blocks with gaps between
//! them), fed arbitrary sequences of page runs, zero runs, holes and discards the way its frame
//! loop feeds them (`receive_pages` reads a `PAGES` frame from a socket, the others are decoded
//! first). A model of the memfd, kept beside it, says what each frame must do:
//! - a frame inside the layout is accepted and writes exactly its pages (data, or zeros);
//! - a frame that reaches outside its block, names no block, or is malformed is refused, and
//!   no byte of the memfd changes;
//! - nothing panics.
//!
//! The whole memfd is compared with the model after every refused frame and after each input;
//! the pages an accepted frame wrote (and their neighbours) right after it.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;

use arbitrary::Unstructured;
use fastrand::Rng;
use proto::frame::{self, FramePrefix, PREFIX_LEN};
use proto::local::LocalBlock;
use proto::peer::{kind, PageRun, PeerMessage, MAX_RUN_PAGES, RUN_HEADER_LEN};
use proto::{BlockDesc, PAGE_SIZE};
use umemd::dest::{Dest, DestError};
use umemd::stream::PeerStream;

use crate::engine::{signature, Target};
use crate::generate::{append_page_data, edgy_u32, edgy_u64};

const PAGE: usize = PAGE_SIZE as usize;

/// The layout: name, first page in the memfd, pages, guest address. The gaps between blocks
/// and after the last one belong to no block, so a write that strays there shows.
const BLOCKS: [(&str, u64, u64, u64); 3] = [
    ("ram-low", 0, 256, 0),
    ("rom", 272, 1, 0xffff_f000),
    ("ram-high", 288, 320, 1 << 32),
];
const MEMFD_PAGES: u64 = 640;

/// What a frame must do to the memfd.
#[derive(Debug)]
enum Expect<'a> {
    /// The destination does not place it (not a page message, or malformed).
    Ignored,
    /// Refused, memfd untouched.
    Refused,
    /// Accepted, with these effects at these memfd offsets.
    Accepted(Vec<(usize, Effect<'a>)>),
}

#[derive(Debug)]
enum Effect<'a> {
    Data(&'a [u8]),
    Zero(usize),
}

/// The destination's precopy placement against a memfd and its model.
pub struct DestPlacement {
    memfd: File,
    layout: Vec<LocalBlock>,
    /// What the memfd holds before each input: every page, gaps included, distinct and non-zero.
    template: Vec<u8>,
    /// What the memfd must hold now.
    model: Vec<u8>,
    /// What it holds, read back.
    seen: Vec<u8>,
    /// Byte ranges where the model left the template, to restore before the next input.
    touched: Vec<(usize, usize)>,
    /// The last input failed: the memfd may differ from the template anywhere.
    dirty: bool,
}

impl DestPlacement {
    /// A sealed memfd laid out as [`BLOCKS`].
    pub fn new() -> io::Result<Self> {
        let fd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .create("umem-fuzz")
            .map_err(io::Error::other)?;
        fd.as_file().set_len(MEMFD_PAGES * PAGE_SIZE)?;
        fd.add_seal(memfd::FileSeal::SealShrink)
            .map_err(io::Error::other)?;
        let layout = BLOCKS
            .iter()
            .map(|&(name, first, pages, guest_addr)| LocalBlock {
                desc: BlockDesc {
                    name: name.into(),
                    guest_addr,
                    size: pages * PAGE_SIZE,
                },
                memfd_offset: first * PAGE_SIZE,
                host_addr: 0,
            })
            .collect();
        let mut template = vec![0u8; MEMFD_PAGES as usize * PAGE];
        for (i, page) in template.chunks_mut(PAGE).enumerate() {
            page.fill(i as u8 | 0x80);
            page[..8].copy_from_slice(&(0xfeed_0000_0000 + i as u64).to_le_bytes());
        }
        let memfd = fd.into_file();
        memfd.write_all_at(&template, 0)?;
        Ok(DestPlacement {
            memfd,
            layout,
            model: template.clone(),
            seen: template.clone(),
            template,
            touched: Vec::new(),
            dirty: false,
        })
    }

    /// The memfd offset of `count` pages from `first` of `block`, if they lie inside it.
    fn inside(block: u32, first: u64, count: u64) -> Option<usize> {
        let &(_, start, pages, _) = BLOCKS.get(block as usize)?;
        let end = first.checked_add(count)?;
        (end <= pages).then(|| ((start + first) * PAGE_SIZE) as usize)
    }

    fn expect<'a>(prefix: FramePrefix, body: &'a [u8]) -> Expect<'a> {
        if prefix.kind == kind::PAGES {
            // Judged from the bytes, not by the decoder under test.
            let Some(h) = body.first_chunk::<RUN_HEADER_LEN>() else {
                return Expect::Refused;
            };
            let block = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
            let first = u64::from_le_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
            let count = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
            let data = &body[RUN_HEADER_LEN..];
            if count == 0 || count > MAX_RUN_PAGES || data.len() != count as usize * PAGE {
                return Expect::Refused;
            }
            return match Self::inside(block, first, count as u64) {
                Some(off) => Expect::Accepted(vec![(off, Effect::Data(data))]),
                None => Expect::Refused,
            };
        }
        let zero = |block, first, count: u64| match Self::inside(block, first, count) {
            Some(off) => Expect::Accepted(vec![(off, Effect::Zero(count as usize * PAGE))]),
            None => Expect::Refused,
        };
        match PeerMessage::decode(prefix.kind, body) {
            Ok(PeerMessage::ZeroPages(run)) => zero(run.block, run.first, run.count as u64),
            Ok(PeerMessage::Holes {
                block,
                first,
                count,
            }) => zero(block, first, count),
            Ok(PeerMessage::Discard { block, ranges }) => {
                let mut effects = Vec::with_capacity(ranges.len());
                for (first, count) in ranges {
                    if count == 0 {
                        return Expect::Refused;
                    }
                    match Self::inside(block, first, count as u64) {
                        Some(off) => effects.push((off, Effect::Zero(count as usize * PAGE))),
                        None => return Expect::Refused,
                    }
                }
                Expect::Accepted(effects)
            }
            _ => Expect::Ignored,
        }
    }

    /// Hands the frame to `dest` as its frame loop would; `None` if the loop would not place
    /// it.
    fn apply(
        dest: &mut Dest,
        prefix: FramePrefix,
        body: &[u8],
    ) -> io::Result<Option<Result<(), DestError>>> {
        if prefix.kind == kind::PAGES {
            return receive_pages(dest, prefix, body).map(Some);
        }
        Ok(match PeerMessage::decode(prefix.kind, body) {
            Ok(PeerMessage::ZeroPages(run)) => {
                Some(dest.zero(run.block, run.first, run.count as u64))
            }
            Ok(PeerMessage::Holes {
                block,
                first,
                count,
            }) => Some(dest.zero(block, first, count)),
            Ok(PeerMessage::Discard { block, ranges }) => Some(dest.discard(block, &ranges)),
            _ => None,
        })
    }

    /// Compares bytes `[from, to)` of the memfd with the model; `what` says what came last.
    fn compare(&mut self, from: usize, to: usize, what: &str) -> Result<(), String> {
        let (from, to) = (from.min(self.model.len()), to.min(self.model.len()));
        self.memfd
            .read_exact_at(&mut self.seen[from..to], from as u64)
            .map_err(|e| format!("reading the memfd back: {e}"))?;
        if self.seen[from..to] == self.model[from..to] {
            return Ok(());
        }
        let at = from
            + self.seen[from..to]
                .iter()
                .zip(&self.model[from..to])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
        let page = (at / PAGE) as u64;
        let place = BLOCKS
            .iter()
            .find(|b| (b.1..b.1 + b.2).contains(&page))
            .map_or_else(
                || "a gap between blocks".to_string(),
                |b| format!("page {} of {}", page - b.1, b.0),
            );
        Err(format!(
            "{what}: memfd byte {at:#x} ({place}) is {:#04x}, expected {:#04x}",
            self.seen[at], self.model[at]
        ))
    }
}

/// Feeds `body` to `Dest::receive_pages` through a socket, as the main stream would after the
/// prefix; the writer closes its end after the body, so a short body reads as the source
/// closing.
fn receive_pages(
    dest: &mut Dest,
    prefix: FramePrefix,
    body: &[u8],
) -> io::Result<Result<(), DestError>> {
    let (reader, mut writer) = UnixStream::pair()?;
    Ok(std::thread::scope(|s| {
        // A refused run is not read to its end: dropping the reader then ends this write.
        let feeder = s.spawn(move || {
            let _ = writer.write_all(body);
        });
        let mut peer = PeerStream::Unix(reader);
        let placed = dest.receive_pages(&mut peer, prefix);
        drop(peer);
        let _ = feeder.join();
        placed
    }))
}

impl Target for DestPlacement {
    fn name(&self) -> &'static str {
        "dest"
    }

    fn seeds(&mut self, _: &mut Rng) -> Vec<Vec<u8>> {
        let mut every = Vec::new();
        let mut seeds = Vec::new();
        let mut one = |m: PeerMessage| {
            let mut buf = Vec::new();
            m.encode(&mut buf);
            if let PeerMessage::Pages(run) = &m {
                append_page_data(&mut buf, run, 0x11);
            }
            every.extend_from_slice(&buf);
            seeds.push(buf);
        };
        for (block, &(_, _, pages, _)) in BLOCKS.iter().enumerate() {
            let block = block as u32;
            let last = pages - 1;
            one(PeerMessage::Pages(PageRun {
                block,
                first: last,
                count: 1,
            }));
            one(PeerMessage::Pages(PageRun {
                block,
                first: 0,
                count: pages.min(MAX_RUN_PAGES as u64) as u32,
            }));
            one(PeerMessage::ZeroPages(PageRun {
                block,
                first: 0,
                count: 1,
            }));
            one(PeerMessage::Holes {
                block,
                first: last,
                count: 1,
            });
            one(PeerMessage::Discard {
                block,
                ranges: vec![(0, 1), (last, 1)],
            });
        }
        one(PeerMessage::Heartbeat);
        one(PeerMessage::Drain { round: 1 });
        seeds.push(every);
        seeds
    }

    fn generate(&mut self, u: &mut Unstructured) -> arbitrary::Result<Vec<u8>> {
        let mut stream = Vec::new();
        for _ in 0..u.int_in_range(1..=8)? {
            let m = match u.int_in_range(0u8..=10)? {
                0..=3 => PeerMessage::Pages(run(u)?),
                4 | 5 => PeerMessage::ZeroPages(run(u)?),
                6 => {
                    let (block, first, count) = range(u, true)?;
                    PeerMessage::Holes {
                        block,
                        first,
                        count,
                    }
                }
                7 | 8 => {
                    let mut ranges = Vec::new();
                    let (block, _, _) = range(u, false)?;
                    for _ in 0..u.int_in_range(0..=6)? {
                        let (_, first, count) = range(u, false)?;
                        ranges.push((first, count as u32));
                    }
                    PeerMessage::Discard { block, ranges }
                }
                9 => PeerMessage::Drain {
                    round: u.arbitrary()?,
                },
                _ => PeerMessage::RoundEnd {
                    round: u.arbitrary()?,
                },
            };
            m.encode(&mut stream);
            if let PeerMessage::Pages(run) = &m {
                if run.count <= MAX_RUN_PAGES {
                    append_page_data(&mut stream, run, u.arbitrary()?);
                }
            }
        }
        Ok(stream)
    }

    fn run(&mut self, input: &[u8], outcomes: &mut Vec<u64>) -> Result<(), String> {
        // After an input that passed, the memfd equals the model, which differs from the
        // template only where that input wrote: rewriting the whole memfd every time would cost
        // more than the frames. After a failure (the shrinking of its input runs on), anything
        // may differ.
        let touched = std::mem::take(&mut self.touched);
        let restore = if self.dirty {
            vec![(0, self.template.len())]
        } else {
            touched
        };
        for (from, to) in restore {
            self.memfd
                .write_all_at(&self.template[from..to], from as u64)
                .map_err(|e| format!("resetting the memfd: {e}"))?;
            self.model[from..to].copy_from_slice(&self.template[from..to]);
        }
        self.dirty = true;
        self.place_all(input, outcomes)?;
        self.dirty = false;
        Ok(())
    }

    fn max_len(&self) -> usize {
        4 << 20
    }
}

impl DestPlacement {
    /// Runs the frames of `input` through a fresh destination, checking each against the
    /// model.
    fn place_all(&mut self, input: &[u8], outcomes: &mut Vec<u64>) -> Result<(), String> {
        let (_vmm, vmm_end) =
            UnixStream::pair().map_err(|e| format!("socket pair for the VMM link: {e}"))?;
        let memfd: OwnedFd = self
            .memfd
            .try_clone()
            .map_err(|e| format!("duplicating the memfd: {e}"))?
            .into();
        let mut dest = Dest::new(
            vmm_end,
            "fuzz".into(),
            "tcp:127.0.0.1:0",
            memfd,
            None,
            self.layout.clone(),
            Default::default(),
        )
        .map_err(|(_, f)| format!("setting up the destination: {f}"))?;

        let mut rest = input;
        while let Ok(Some((prefix, body, tail))) = frame::split(rest) {
            rest = tail;
            let expect = Self::expect(prefix, body);
            let placed = Self::apply(&mut dest, prefix, body)
                .map_err(|e| format!("feeding a page run: {e}"))?;
            outcomes.push(signature((
                prefix.kind,
                matches!(expect, Expect::Accepted(_)),
                placed
                    .as_ref()
                    .map(|r| r.as_ref().map_err(std::mem::discriminant)),
            )));
            let frame = format!(
                "frame of kind {:#04x} ({} bytes) at input byte {:#x}",
                prefix.kind,
                body.len(),
                input.len() - rest.len() - body.len() - PREFIX_LEN
            );
            match (expect, placed) {
                (Expect::Ignored, None) => continue,
                (Expect::Refused, Some(Err(_))) => {
                    let what = format!("refused frame changed guest memory: {frame}");
                    self.compare(0, self.model.len(), &what)?;
                }
                (Expect::Accepted(effects), Some(Ok(()))) => {
                    let first = self.touched.len();
                    for (off, effect) in effects {
                        let len = match effect {
                            Effect::Data(d) => {
                                self.model[off..off + d.len()].copy_from_slice(d);
                                d.len()
                            }
                            Effect::Zero(n) => {
                                self.model[off..off + n].fill(0);
                                n
                            }
                        };
                        self.touched.push((off, off + len));
                    }
                    let what = format!("accepted frame wrote otherwise than it says: {frame}");
                    for i in first..self.touched.len() {
                        let (from, to) = self.touched[i];
                        // The pages written, and one either side: an edge off by one shows.
                        self.compare(from.saturating_sub(PAGE), to + PAGE, &what)?;
                    }
                }
                (Expect::Accepted(_), Some(Err(e))) => {
                    return Err(format!("valid frame refused: {frame}: {e}"));
                }
                (Expect::Refused, Some(Ok(()))) => {
                    return Err(format!("out-of-layout frame accepted: {frame}"));
                }
                (expect, placed) => {
                    return Err(format!(
                        "model and destination disagree: {frame}: expected {expect:?}, got {placed:?}"
                    ));
                }
            }
        }
        // A stray write anywhere, by any frame.
        self.compare(
            0,
            self.model.len(),
            "the input left guest memory otherwise: after its last frame",
        )
    }
}

/// A page run aimed at the layout's edges.
fn run(u: &mut Unstructured) -> arbitrary::Result<PageRun> {
    let (block, first, count) = range(u, false)?;
    Ok(PageRun {
        block,
        first,
        count: count as u32,
    })
}

/// A block, a first page and a count, mostly near the edges of a block of the layout.
fn range(u: &mut Unstructured, wide: bool) -> arbitrary::Result<(u32, u64, u64)> {
    let block = match u.int_in_range(0u8..=9)? {
        0 => BLOCKS.len() as u32,
        1 => edgy_u32(u)?,
        b => (b as u32) % BLOCKS.len() as u32,
    };
    let pages = BLOCKS.get(block as usize).map_or(16, |b| b.2);
    let count = match u.int_in_range(0u8..=9)? {
        0 => 0,
        1 => MAX_RUN_PAGES as u64,
        2 => MAX_RUN_PAGES as u64 + 1,
        3 => pages,
        4 if wide => edgy_u64(u)?,
        4 => edgy_u32(u)? as u64,
        _ => u.int_in_range(1..=8)?,
    };
    let first = match u.int_in_range(0u8..=7)? {
        0 => 0,
        1 => pages.saturating_sub(count),
        2 => pages.saturating_sub(count) + 1,
        3 => pages,
        4 => edgy_u64(u)?,
        _ => u.int_in_range(0..=pages)?,
    };
    Ok((block, first, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(messages: &[PeerMessage]) -> Vec<u8> {
        let mut buf = Vec::new();
        for m in messages {
            m.encode(&mut buf);
            if let PeerMessage::Pages(run) = m {
                append_page_data(&mut buf, run, 0x42);
            }
        }
        buf
    }

    fn run(input: &[u8]) -> Result<Vec<u64>, String> {
        let mut target = DestPlacement::new().map_err(|e| e.to_string())?;
        let mut outcomes = Vec::new();
        target.run(input, &mut outcomes).map(|()| outcomes)
    }

    #[test]
    fn runs_pages_zeros_and_refusals_against_the_model() {
        let input = stream(&[
            PeerMessage::Pages(PageRun {
                block: 2,
                first: 64,
                count: 256,
            }),
            PeerMessage::Pages(PageRun {
                block: 1,
                first: 0,
                count: 2,
            }),
            PeerMessage::ZeroPages(PageRun {
                block: 0,
                first: 255,
                count: 1,
            }),
            PeerMessage::Holes {
                block: 3,
                first: 0,
                count: 1,
            },
            PeerMessage::Heartbeat,
        ]);
        assert_eq!(run(&input).map(|o| o.len()), Ok(5));
    }

    /// Found by this target: a range outside the block was refused only after the ranges
    /// before it had been dropped, and an empty range failed in fallocate after them too. Both
    /// refuse the frame whole now, before any page is dropped.
    #[test]
    fn discards_are_refused_whole() {
        let input = stream(&[
            PeerMessage::Discard {
                block: 0,
                ranges: vec![(3, 0), (256, 0), (7, 2)],
            },
            PeerMessage::Discard {
                block: 2,
                ranges: vec![(0, 2), (319, 2)],
            },
        ]);
        run(&input).unwrap();
    }

    #[test]
    fn repeated_runs_start_from_the_same_memory() {
        let mut target = DestPlacement::new().unwrap();
        let input = stream(&[PeerMessage::ZeroPages(PageRun {
            block: 0,
            first: 0,
            count: 256,
        })]);
        for _ in 0..3 {
            target.run(&input, &mut Vec::new()).unwrap();
        }
    }
}
