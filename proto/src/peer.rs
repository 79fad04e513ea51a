//! Messages of the TCP migration stream between the source and the destination `umemd`.
//!
//! Every connection opens with the authentication exchange of [`crate::auth`]
//! ([`PeerMessage::AuthHello`], [`PeerMessage::AuthChallenge`], [`PeerMessage::AuthProof`]).
//! Then the source sends [`PeerMessage::Hello`]; the destination answers
//! with its own `Hello` or an `Error`. Then the source sends its [`PeerMessage::Layout`], which
//! the destination checks against its VMM's before any page moves. Page runs name a block by its
//! index in that layout: the name crosses the wire once per migration instead of once per run.
//!
//! The switchover is a commit, not a message: after the machine state the destination loads it
//! and answers [`PeerMessage::Ready`] without running the VM; the source then commits (from then
//! on it never resumes the VM by itself) and sends [`PeerMessage::Commit`]; only then does the
//! destination run the VM and answer [`PeerMessage::Started`]. A message lost anywhere in that
//! exchange leaves the VM stopped on both sides, never running on both.

use crate::auth::{AuthMethod, NONCE_LEN, PROOF_LEN};
use crate::frame::{self, FramePrefix, PREFIX_LEN};
use crate::types::{decode_blocks, encode_blocks, BlockDesc, PAGE_SIZE};
use crate::wire::{DecodeError, Reader, Writer};

/// First bytes of every `Hello`.
pub const MAGIC: [u8; 4] = *b"UMEM";
/// Protocol version spoken by this build.
pub const VERSION: u16 = 3;
/// Capability: the peer can run postcopy.
pub const CAP_POSTCOPY: u64 = 1 << 0;
/// Capability: the peer can resume an interrupted migration on a new connection.
pub const CAP_RECOVERY: u64 = 1 << 1;
/// Capability (of a destination): its guest RAM is on 2 MiB huge pages, which it can only drop
/// whole, so a source discards whole huge pages (512 pages, aligned) and sends them again.
pub const CAP_HUGE_PAGES: u64 = 1 << 2;
/// Capability (of a destination): it answers [`PeerMessage::Drain`], so that a source can stop
/// the VM only once what it queued before is in guest RAM.
pub const CAP_DRAIN: u64 = 1 << 3;
/// Most pages in one run (1 MiB of data per frame).
pub const MAX_RUN_PAGES: u32 = 256;
/// Bytes of a run header inside a frame body.
pub const RUN_HEADER_LEN: usize = 16;
/// Longest error text carried.
pub const MAX_ERROR_LEN: usize = 4096;
/// Most ranges in one `Discard`.
pub const MAX_DISCARD_RANGES: usize = 65536;

/// Frame kinds of the peer stream.
pub mod kind {
    #![allow(missing_docs)]
    pub const HELLO: u8 = 0x01;
    pub const LAYOUT: u8 = 0x02;
    pub const LAYOUT_ACCEPTED: u8 = 0x03;
    pub const PAGES: u8 = 0x04;
    pub const ZERO_PAGES: u8 = 0x05;
    pub const ROUND_END: u8 = 0x06;
    pub const DISCARD: u8 = 0x07;
    pub const MACHINE_STATE: u8 = 0x08;
    pub const ALL_SENT: u8 = 0x09;
    pub const STARTED: u8 = 0x0a;
    pub const PAGE_REQUEST: u8 = 0x0b;
    pub const ALL_RECEIVED: u8 = 0x0c;
    pub const ERROR: u8 = 0x0d;
    pub const SWITCHOVER: u8 = 0x0e;
    pub const HOLES: u8 = 0x0f;
    pub const URGENT_CHANNEL: u8 = 0x10;
    pub const READY: u8 = 0x11;
    pub const COMMIT: u8 = 0x12;
    pub const HEARTBEAT: u8 = 0x13;
    pub const RESUME: u8 = 0x14;
    pub const RECEIVED: u8 = 0x15;
    pub const RECEIVED_END: u8 = 0x16;
    pub const RESUMED: u8 = 0x17;
    pub const AUTH_HELLO: u8 = 0x18;
    pub const AUTH_CHALLENGE: u8 = 0x19;
    pub const AUTH_PROOF: u8 = 0x1a;
    pub const DRAIN: u8 = 0x1b;
    pub const DRAINED: u8 = 0x1c;
}

/// Most bitmap words in one `Received` (4 GiB of guest RAM).
pub const MAX_RECEIVED_WORDS: usize = 1 << 14;

/// A run of contiguous pages of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// Index of the block in the layout.
    pub block: u32,
    /// First page, counted from the block's start.
    pub first: u64,
    /// Number of pages, `1..=MAX_RUN_PAGES`.
    pub count: u32,
}

impl PageRun {
    /// Bytes of page data this run carries.
    pub fn data_len(&self) -> usize {
        self.count as usize * PAGE_SIZE as usize
    }

    fn encode(&self, w: &mut Writer) {
        w.u32(self.block);
        w.u64(self.first);
        w.u32(self.count);
    }

    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let run = PageRun {
            block: r.u32("run block")?,
            first: r.u64("run first page")?,
            count: r.u32("run page count")?,
        };
        if run.count == 0 || run.count > MAX_RUN_PAGES {
            return Err(DecodeError::invalid(
                "run page count",
                format!("{} not in 1..={MAX_RUN_PAGES}", run.count),
            ));
        }
        if run.first.checked_add(run.count as u64).is_none() {
            return Err(DecodeError::invalid("run first page", "run wraps"));
        }
        Ok(run)
    }

    /// Decodes the header of a `PAGES` frame whose prefix is `prefix`, checking that the body
    /// holds exactly the page data the header announces. The data follows in the stream.
    pub fn decode_pages_header(
        prefix: FramePrefix,
        header: &[u8; RUN_HEADER_LEN],
    ) -> Result<Self, DecodeError> {
        if prefix.kind != kind::PAGES {
            return Err(DecodeError::UnknownKind(prefix.kind));
        }
        let run = PageRun::decode(&mut Reader::new(header))?;
        let expect = RUN_HEADER_LEN + run.data_len();
        if prefix.len as usize != expect {
            return Err(DecodeError::invalid(
                "pages frame length",
                format!(
                    "{} bytes for {} pages, expected {expect}",
                    prefix.len, run.count
                ),
            ));
        }
        Ok(run)
    }

    /// Appends the prefix and header of a `PAGES` frame; the caller sends `data_len()` bytes of
    /// page contents right after it.
    pub fn encode_pages_header(&self, buf: &mut Vec<u8>) {
        let len = (RUN_HEADER_LEN + self.data_len()) as u32;
        buf.extend_from_slice(&len.to_le_bytes());
        buf.push(kind::PAGES);
        self.encode(&mut Writer::new(buf));
    }
}

/// Bytes of a `PAGES` frame before its data.
pub const PAGES_HEADER_LEN: usize = PREFIX_LEN + RUN_HEADER_LEN;

/// A message of the migration stream. Page contents of a `Pages` frame are not part of the
/// value: they follow the header in the stream (see [`PageRun::encode_pages_header`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMessage {
    /// Source: the first frame of every connection: how it authenticates, and its nonce.
    AuthHello {
        /// `None` when the source has no secret.
        method: AuthMethod,
        /// Fresh random bytes.
        nonce: [u8; NONCE_LEN],
    },
    /// Destination, answering an `AuthHello` with a secret: its own nonce, and its proof that
    /// it knows the secret.
    AuthChallenge {
        /// Fresh random bytes.
        nonce: [u8; NONCE_LEN],
        /// The destination's proof over both nonces.
        proof: [u8; PROOF_LEN],
    },
    /// Source: its proof over both nonces. The destination acts on nothing before it checks.
    AuthProof {
        /// The source's proof.
        proof: [u8; PROOF_LEN],
    },
    /// After authentication, from the source; the destination answers with its own.
    Hello {
        /// Protocol version.
        version: u16,
        /// `CAP_*` bits the sender supports.
        capabilities: u64,
        /// Identifies the migration, so a later connection can resume it.
        session_id: u64,
        /// Source: how long either side may stay silent before the other gives the link up
        /// (the destination adopts it, within its bounds); destination: echoes what it uses.
        link_timeout_ms: u32,
    },
    /// The source's RAM blocks, checked by the destination.
    Layout {
        /// Blocks in order; runs refer to them by index.
        blocks: Vec<BlockDesc>,
    },
    /// The destination's layout matches; pages may flow.
    LayoutAccepted,
    /// A run of pages; `run.data_len()` bytes of contents follow.
    Pages(PageRun),
    /// A run of pages that are all zero.
    ZeroPages(PageRun),
    /// A precopy round is complete.
    RoundEnd {
        /// Round number, from 1.
        round: u32,
    },
    /// Source, before it stops the VM: answer with `Drained` once every page sent before this
    /// frame is in guest RAM. What is queued between the two (both sockets' buffers, the
    /// destination's placing queue) would otherwise be written while the VM is stopped.
    Drain {
        /// The round just ended; echoed.
        round: u32,
    },
    /// Destination, answering `Drain`.
    Drained {
        /// The `round` of the `Drain`.
        round: u32,
    },
    /// Pages the destination must drop (sent earlier, dirtied since).
    Discard {
        /// Block index.
        block: u32,
        /// `(first page, page count)` ranges.
        ranges: Vec<(u64, u32)>,
    },
    /// The VM's CPU and device state, opaque to umemd.
    MachineState(Vec<u8>),
    /// Source: every page and the machine state have been sent.
    AllSent,
    /// Destination: the machine state is loaded; the VM runs once the source commits.
    Ready,
    /// Source: committed to the switchover. The source never resumes the VM by itself from now
    /// on; the destination runs it.
    Commit,
    /// Destination: the VM runs.
    Started,
    /// Either side: the link is alive. Sent on an idle link; never acted on otherwise.
    Heartbeat,
    /// Source, on a new connection after a postcopy link failure, instead of `Layout`: go on
    /// with this migration (both sides advertised `CAP_RECOVERY`).
    Resume {
        /// The `session_id` of the migration to resume.
        session_id: u64,
    },
    /// Destination, answering `Resume`: the pages it holds (present or known zero), one bit
    /// per page from `first_page`. Every page not named must be sent again.
    Received {
        /// Block index.
        block: u32,
        /// Page of bit 0 of word 0.
        first_page: u64,
        /// Bits, little-endian within each word.
        words: Vec<u64>,
    },
    /// Destination: the last `Received`.
    ReceivedEnd,
    /// Source: it knows what the destination holds; requests may flow again.
    Resumed,
    /// Destination: please send these pages first.
    PageRequest(PageRun),
    /// Destination: every page is present.
    AllReceived,
    /// Either side: the migration failed for this reason.
    Error(String),
    /// Source: the VM is stopped; the machine state follows. With `postcopy`, the destination
    /// runs the VM as soon as the state is loaded and missing pages follow on demand; without,
    /// every page has been sent.
    Switchover {
        /// Pages still follow after the state.
        postcopy: bool,
    },
    /// Source: pages that are holes in the source's memory. They read as zero and are never sent.
    Holes {
        /// Block index.
        block: u32,
        /// First page.
        first: u64,
        /// Number of pages, at least 1.
        count: u64,
    },
    /// Source: opens the second connection of a session, which carries only requested pages so
    /// that they never queue behind background pages.
    UrgentChannel {
        /// The `session_id` of the session's `Hello`.
        session_id: u64,
    },
}

/// Reads exactly `N` bytes.
fn fixed<const N: usize>(r: &mut Reader, field: &'static str) -> Result<[u8; N], DecodeError> {
    let b = r.take(N, field)?;
    let mut a = [0u8; N];
    a.copy_from_slice(b);
    Ok(a)
}

impl PeerMessage {
    /// Appends this message as one frame. For `Pages` only the header is written.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        match self {
            PeerMessage::AuthHello { method, nonce } => frame::encode(buf, kind::AUTH_HELLO, |w| {
                w.raw(&MAGIC);
                w.u8(method.to_u8());
                w.raw(nonce);
            }),
            PeerMessage::AuthChallenge { nonce, proof } => {
                frame::encode(buf, kind::AUTH_CHALLENGE, |w| {
                    w.raw(nonce);
                    w.raw(proof);
                })
            }
            PeerMessage::AuthProof { proof } => {
                frame::encode(buf, kind::AUTH_PROOF, |w| w.raw(proof))
            }
            PeerMessage::Hello {
                version,
                capabilities,
                session_id,
                link_timeout_ms,
            } => frame::encode(buf, kind::HELLO, |w| {
                w.raw(&MAGIC);
                w.u16(*version);
                w.u64(*capabilities);
                w.u64(*session_id);
                w.u32(*link_timeout_ms);
            }),
            PeerMessage::Layout { blocks } => {
                frame::encode(buf, kind::LAYOUT, |w| encode_blocks(w, blocks))
            }
            PeerMessage::LayoutAccepted => frame::encode(buf, kind::LAYOUT_ACCEPTED, |_| {}),
            PeerMessage::Pages(run) => run.encode_pages_header(buf),
            PeerMessage::ZeroPages(run) => frame::encode(buf, kind::ZERO_PAGES, |w| run.encode(w)),
            PeerMessage::RoundEnd { round } => {
                frame::encode(buf, kind::ROUND_END, |w| w.u32(*round))
            }
            PeerMessage::Drain { round } => frame::encode(buf, kind::DRAIN, |w| w.u32(*round)),
            PeerMessage::Drained { round } => frame::encode(buf, kind::DRAINED, |w| w.u32(*round)),
            PeerMessage::Discard { block, ranges } => frame::encode(buf, kind::DISCARD, |w| {
                w.u32(*block);
                w.u32(ranges.len() as u32);
                for (first, count) in ranges {
                    w.u64(*first);
                    w.u32(*count);
                }
            }),
            PeerMessage::MachineState(b) => frame::encode(buf, kind::MACHINE_STATE, |w| w.bytes(b)),
            PeerMessage::AllSent => frame::encode(buf, kind::ALL_SENT, |_| {}),
            PeerMessage::Ready => frame::encode(buf, kind::READY, |_| {}),
            PeerMessage::Commit => frame::encode(buf, kind::COMMIT, |_| {}),
            PeerMessage::Started => frame::encode(buf, kind::STARTED, |_| {}),
            PeerMessage::Heartbeat => frame::encode(buf, kind::HEARTBEAT, |_| {}),
            PeerMessage::Resume { session_id } => {
                frame::encode(buf, kind::RESUME, |w| w.u64(*session_id))
            }
            PeerMessage::Received {
                block,
                first_page,
                words,
            } => frame::encode(buf, kind::RECEIVED, |w| {
                w.u32(*block);
                w.u64(*first_page);
                w.u32(words.len() as u32);
                for x in words {
                    w.u64(*x);
                }
            }),
            PeerMessage::ReceivedEnd => frame::encode(buf, kind::RECEIVED_END, |_| {}),
            PeerMessage::Resumed => frame::encode(buf, kind::RESUMED, |_| {}),
            PeerMessage::PageRequest(run) => {
                frame::encode(buf, kind::PAGE_REQUEST, |w| run.encode(w))
            }
            PeerMessage::AllReceived => frame::encode(buf, kind::ALL_RECEIVED, |_| {}),
            PeerMessage::Switchover { postcopy } => {
                frame::encode(buf, kind::SWITCHOVER, |w| w.bool(*postcopy))
            }
            PeerMessage::Holes {
                block,
                first,
                count,
            } => frame::encode(buf, kind::HOLES, |w| {
                w.u32(*block);
                w.u64(*first);
                w.u64(*count);
            }),
            PeerMessage::UrgentChannel { session_id } => {
                frame::encode(buf, kind::URGENT_CHANNEL, |w| w.u64(*session_id))
            }
            PeerMessage::Error(m) => frame::encode(buf, kind::ERROR, |w| {
                let mut end = m.len().min(MAX_ERROR_LEN);
                while !m.is_char_boundary(end) {
                    end -= 1;
                }
                w.str(&m[..end])
            }),
        }
    }

    /// Decodes a frame body of `kind`. For `PAGES` the body must be the run header followed by
    /// exactly the announced page data, which is not copied into the value.
    pub fn decode(kind: u8, body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let msg = match kind {
            kind::AUTH_HELLO => {
                if r.take(4, "magic")? != MAGIC {
                    return Err(DecodeError::invalid("magic", "not a umem peer"));
                }
                PeerMessage::AuthHello {
                    method: AuthMethod::from_u8(r.u8("auth method")?)?,
                    nonce: fixed(&mut r, "source nonce")?,
                }
            }
            kind::AUTH_CHALLENGE => PeerMessage::AuthChallenge {
                nonce: fixed(&mut r, "destination nonce")?,
                proof: fixed(&mut r, "destination proof")?,
            },
            kind::AUTH_PROOF => PeerMessage::AuthProof {
                proof: fixed(&mut r, "source proof")?,
            },
            kind::HELLO => {
                if r.take(4, "magic")? != MAGIC {
                    return Err(DecodeError::invalid("magic", "not a umem peer"));
                }
                PeerMessage::Hello {
                    version: r.u16("version")?,
                    capabilities: r.u64("capabilities")?,
                    session_id: r.u64("session_id")?,
                    link_timeout_ms: r.u32("link_timeout_ms")?,
                }
            }
            kind::LAYOUT => PeerMessage::Layout {
                blocks: decode_blocks(&mut r)?,
            },
            kind::LAYOUT_ACCEPTED => PeerMessage::LayoutAccepted,
            kind::PAGES => {
                let run = PageRun::decode(&mut r)?;
                let data = r.take(r.remaining(), "page data")?;
                if data.len() != run.data_len() {
                    return Err(DecodeError::invalid(
                        "page data",
                        format!("{} bytes for {} pages", data.len(), run.count),
                    ));
                }
                PeerMessage::Pages(run)
            }
            kind::ZERO_PAGES => PeerMessage::ZeroPages(PageRun::decode(&mut r)?),
            kind::ROUND_END => PeerMessage::RoundEnd {
                round: r.u32("round")?,
            },
            kind::DRAIN => PeerMessage::Drain {
                round: r.u32("drain round")?,
            },
            kind::DRAINED => PeerMessage::Drained {
                round: r.u32("drained round")?,
            },
            kind::DISCARD => {
                let block = r.u32("discard block")?;
                let n = r.count("discard ranges", 12)?;
                if n > MAX_DISCARD_RANGES {
                    return Err(DecodeError::invalid(
                        "discard ranges",
                        format!("{n} exceeds {MAX_DISCARD_RANGES}"),
                    ));
                }
                let mut ranges = Vec::with_capacity(n);
                for _ in 0..n {
                    ranges.push((r.u64("discard first")?, r.u32("discard count")?));
                }
                PeerMessage::Discard { block, ranges }
            }
            kind::MACHINE_STATE => PeerMessage::MachineState(r.bytes("machine state")?.to_vec()),
            kind::ALL_SENT => PeerMessage::AllSent,
            kind::READY => PeerMessage::Ready,
            kind::COMMIT => PeerMessage::Commit,
            kind::STARTED => PeerMessage::Started,
            kind::HEARTBEAT => PeerMessage::Heartbeat,
            kind::RESUME => PeerMessage::Resume {
                session_id: r.u64("session_id")?,
            },
            kind::RECEIVED => {
                let block = r.u32("received block")?;
                let first_page = r.u64("received first page")?;
                let n = r.count("received words", 8)?;
                if n > MAX_RECEIVED_WORDS {
                    return Err(DecodeError::invalid(
                        "received words",
                        format!("{n} exceeds {MAX_RECEIVED_WORDS}"),
                    ));
                }
                let mut words = Vec::with_capacity(n);
                for _ in 0..n {
                    words.push(r.u64("received word")?);
                }
                PeerMessage::Received {
                    block,
                    first_page,
                    words,
                }
            }
            kind::RECEIVED_END => PeerMessage::ReceivedEnd,
            kind::RESUMED => PeerMessage::Resumed,
            kind::PAGE_REQUEST => PeerMessage::PageRequest(PageRun::decode(&mut r)?),
            kind::ALL_RECEIVED => PeerMessage::AllReceived,
            kind::ERROR => {
                let text = r.str("error text")?;
                if text.len() > MAX_ERROR_LEN {
                    return Err(DecodeError::invalid(
                        "error text",
                        format!("{} bytes exceeds {MAX_ERROR_LEN}", text.len()),
                    ));
                }
                PeerMessage::Error(text.to_owned())
            }
            kind::SWITCHOVER => PeerMessage::Switchover {
                postcopy: r.bool("postcopy")?,
            },
            kind::HOLES => {
                let block = r.u32("holes block")?;
                let first = r.u64("holes first page")?;
                let count = r.u64("holes page count")?;
                if count == 0 || first.checked_add(count).is_none() {
                    return Err(DecodeError::invalid(
                        "holes page count",
                        format!("{count} pages from {first} is empty or wraps"),
                    ));
                }
                PeerMessage::Holes {
                    block,
                    first,
                    count,
                }
            }
            kind::URGENT_CHANNEL => PeerMessage::UrgentChannel {
                session_id: r.u64("session_id")?,
            },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: PeerMessage) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        if let PeerMessage::Pages(run) = &m {
            buf.resize(buf.len() + run.data_len(), 0xab);
        }
        let (p, body, rest) = frame::split(&buf).unwrap().unwrap();
        assert!(rest.is_empty());
        assert_eq!(PeerMessage::decode(p.kind, body).unwrap(), m);
    }

    #[test]
    fn every_kind_round_trips() {
        let run = PageRun {
            block: 1,
            first: 77,
            count: 3,
        };
        for m in [
            PeerMessage::Hello {
                version: VERSION,
                capabilities: CAP_POSTCOPY,
                session_id: 99,
                link_timeout_ms: 5000,
            },
            PeerMessage::Layout {
                blocks: vec![BlockDesc {
                    name: "ram-low".into(),
                    guest_addr: 0,
                    size: 1 << 30,
                }],
            },
            PeerMessage::LayoutAccepted,
            PeerMessage::Pages(run),
            PeerMessage::ZeroPages(run),
            PeerMessage::RoundEnd { round: 4 },
            PeerMessage::Drain { round: 4 },
            PeerMessage::Drained { round: 4 },
            PeerMessage::Discard {
                block: 0,
                ranges: vec![(1, 2), (10, 20)],
            },
            PeerMessage::MachineState(vec![1, 2, 3]),
            PeerMessage::AllSent,
            PeerMessage::Ready,
            PeerMessage::Commit,
            PeerMessage::Started,
            PeerMessage::Heartbeat,
            PeerMessage::Resume { session_id: 3 },
            PeerMessage::Received {
                block: 1,
                first_page: 128,
                words: vec![u64::MAX, 0, 7],
            },
            PeerMessage::ReceivedEnd,
            PeerMessage::Resumed,
            PeerMessage::PageRequest(run),
            PeerMessage::AllReceived,
            PeerMessage::Error("layout mismatch".into()),
            PeerMessage::Switchover { postcopy: true },
            PeerMessage::Holes {
                block: 1,
                first: 5,
                count: 1 << 30,
            },
            PeerMessage::UrgentChannel { session_id: 7 },
        ] {
            round_trip(m);
        }
    }

    #[test]
    fn pages_header_checks_length() {
        let run = PageRun {
            block: 0,
            first: 0,
            count: 2,
        };
        let mut buf = Vec::new();
        run.encode_pages_header(&mut buf);
        let prefix = FramePrefix::parse(buf[..PREFIX_LEN].try_into().unwrap()).unwrap();
        let hdr: [u8; RUN_HEADER_LEN] = buf[PREFIX_LEN..].try_into().unwrap();
        assert_eq!(PageRun::decode_pages_header(prefix, &hdr).unwrap(), run);
        let short = FramePrefix {
            len: prefix.len - 1,
            ..prefix
        };
        assert!(PageRun::decode_pages_header(short, &hdr).is_err());
    }

    #[test]
    fn zero_and_oversized_runs_are_refused() {
        for count in [0, MAX_RUN_PAGES + 1] {
            let mut buf = Vec::new();
            frame::encode(&mut buf, kind::PAGE_REQUEST, |w| {
                w.u32(0);
                w.u64(0);
                w.u32(count);
            });
            let (p, body, _) = frame::split(&buf).unwrap().unwrap();
            assert!(PeerMessage::decode(p.kind, body).is_err());
        }
    }

    #[test]
    fn empty_or_wrapping_holes_are_refused() {
        for (first, count) in [(0, 0), (u64::MAX, 2)] {
            let mut buf = Vec::new();
            frame::encode(&mut buf, kind::HOLES, |w| {
                w.u32(0);
                w.u64(first);
                w.u64(count);
            });
            let (p, body, _) = frame::split(&buf).unwrap().unwrap();
            assert!(PeerMessage::decode(p.kind, body).is_err());
        }
    }

    #[test]
    fn wrong_magic_is_refused() {
        let mut buf = Vec::new();
        frame::encode(&mut buf, kind::HELLO, |w| {
            w.raw(b"QEVM");
            w.u16(1);
            w.u64(0);
            w.u64(0);
        });
        let (p, body, _) = frame::split(&buf).unwrap().unwrap();
        let e = PeerMessage::decode(p.kind, body).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }
}
