//! Property tests of every wire format in `proto`.
//!
//! - Round trip: every valid `PeerMessage` and `LocalMessage` survives `encode`, `frame::split`
//!   (and `frame::read`) and `decode`, and exactly its own frame is consumed.
//! - Robustness: arbitrary or mutated bytes never make `frame::split`, `frame::read`, either
//!   `decode` or `PageRun::decode_pages_header` panic, and whatever decodes re-encodes to the
//!   very same bytes.
//! - Truncation: no strict prefix of a valid body decodes, nor does a body with a byte appended.
//! - Allocation: a forged count or length never makes a decoder allocate more than the body can
//!   hold; a counting global allocator measures what each decode asks for.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

use proto::auth::{AuthMethod, Secret, MAX_SECRET_LEN, MIN_SECRET_LEN, NONCE_LEN, PROOF_LEN};
use proto::frame::{self, FrameError, FramePrefix, MAX_FRAME, PREFIX_LEN};
use proto::local::{self, LocalBlock, LocalMessage, PeerAuth, MAX_BITMAP_WORDS};
use proto::peer::{
    self, PageRun, PeerMessage, MAX_DISCARD_RANGES, MAX_ERROR_LEN, MAX_RUN_PAGES, RUN_HEADER_LEN,
};
use proto::types::{MAX_BLOCKS, MAX_NAME_LEN};
use proto::wire::Writer;
use proto::PAGE_SIZE;
use proto::{
    BlockDesc, DecodeError, MigrationMode, MigrationParams, MigrationStats, Phase, TimeoutAction,
};

// ---------------------------------------------------------------------------------------------
// Allocation accounting.

/// Forwards to `System`, adding up what the current thread asks for while [`measure`] runs.
struct Counting;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static REQUESTED: Cell<usize> = const { Cell::new(0) };
}

fn note(bytes: usize) {
    // `try_with`: the allocator may run while this thread's locals are being torn down.
    let _ = MEASURING.try_with(|m| {
        if m.get() {
            let _ = REQUESTED.try_with(|r| r.set(r.get().saturating_add(bytes)));
        }
    });
}

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the bookkeeping only touches const-initialised `Cell`s, which neither
// allocate nor register destructors.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract, which is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size.saturating_sub(layout.size()));
        // SAFETY: `ptr` and `layout` come from this allocator, that is from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` come from this allocator, that is from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the bytes it allocated on this thread.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    REQUESTED.with(|r| r.set(0));
    MEASURING.with(|m| m.set(true));
    let out = f();
    MEASURING.with(|m| m.set(false));
    (out, REQUESTED.with(|r| r.get()))
}

/// Most a successful or failed decode of `body_len` bytes may allocate: the decoded value holds
/// at most the body's bytes, widened by in-memory padding (a `(u64, u32)` discard range takes
/// 16 bytes for 12 on the wire), plus a constant for the at most 64 blocks and error texts.
fn alloc_bound(body_len: usize) -> usize {
    body_len + body_len / 3 + 8192
}

// ---------------------------------------------------------------------------------------------
// Strategies for valid values.

const MAX_PAGES: u64 = u64::MAX / PAGE_SIZE;
const MAX_STR: usize = u16::MAX as usize;
/// Largest `MachineState` payload whose frame body (u32 length + payload) fits `MAX_FRAME`.
const MAX_STATE: usize = MAX_FRAME as usize - 4;

const PHASES: [Phase; 9] = [
    Phase::None,
    Phase::Setup,
    Phase::Precopy,
    Phase::Switchover,
    Phase::Postcopy,
    Phase::Completed,
    Phase::Failed,
    Phase::Cancelled,
    Phase::PostcopyPaused,
];

const PEER_KINDS: [u8; 28] = [
    peer::kind::HELLO,
    peer::kind::LAYOUT,
    peer::kind::LAYOUT_ACCEPTED,
    peer::kind::PAGES,
    peer::kind::ZERO_PAGES,
    peer::kind::ROUND_END,
    peer::kind::DISCARD,
    peer::kind::MACHINE_STATE,
    peer::kind::ALL_SENT,
    peer::kind::STARTED,
    peer::kind::PAGE_REQUEST,
    peer::kind::ALL_RECEIVED,
    peer::kind::ERROR,
    peer::kind::SWITCHOVER,
    peer::kind::HOLES,
    peer::kind::URGENT_CHANNEL,
    peer::kind::READY,
    peer::kind::COMMIT,
    peer::kind::HEARTBEAT,
    peer::kind::RESUME,
    peer::kind::RECEIVED,
    peer::kind::RECEIVED_END,
    peer::kind::RESUMED,
    peer::kind::AUTH_HELLO,
    peer::kind::AUTH_CHALLENGE,
    peer::kind::AUTH_PROOF,
    peer::kind::DRAIN,
    peer::kind::DRAINED,
];

const LOCAL_KINDS: [u8; 26] = [
    local::kind::OUTGOING,
    local::kind::INCOMING,
    local::kind::DIRTY_BITMAP,
    local::kind::BITMAP_END,
    local::kind::MACHINE_STATE,
    local::kind::STATE_LOADED,
    local::kind::SET_PARAMS,
    local::kind::CANCEL,
    local::kind::START_POSTCOPY,
    local::kind::LISTENING,
    local::kind::HARVEST,
    local::kind::PROGRESS,
    local::kind::COMPLETED,
    local::kind::FAILED,
    local::kind::VCPU_THREADS,
    local::kind::POSTCOPY_BEGIN,
    local::kind::POSTCOPY_PROGRESS,
    local::kind::COMMITTED,
    local::kind::RUN,
    local::kind::POSTCOPY_PAUSED,
    local::kind::PAUSE,
    local::kind::RESUME,
    local::kind::RECOVER,
    local::kind::RESUME_INCOMING,
    local::kind::RESUME_OUTGOING,
    local::kind::SESSION,
];

/// The longest prefix of `chars` that fits in `max` bytes of UTF-8.
fn fit(chars: Vec<char>, max: usize) -> String {
    let mut s = String::new();
    for c in chars {
        if s.len() + c.len_utf8() > max {
            break;
        }
        s.push(c);
    }
    s
}

/// Exactly `len` bytes (for `len >= 4`): ASCII filler ending with `last`, so a multi-byte
/// character sits right at the limit.
fn filled(len: usize, last: char) -> String {
    let mut s = "x".repeat(len - last.len_utf8());
    s.push(last);
    s
}

/// splitmix64 from `seed`: cheap filler for long vectors. Drawing every element of a long vector
/// from proptest's ChaCha generator costs far more, in a debug build, than the code under test.
fn splitmix(seed: u64) -> impl Iterator<Item = u64> {
    let mut s = seed;
    std::iter::repeat_with(move || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A character of 1, 2, 3 or 4 UTF-8 bytes, picked by `x`.
fn char_from(x: u64) -> char {
    let r = (x >> 8) as u32;
    let c = match x % 4 {
        0 => r % 0x80,
        1 => 0x80 + r % 0x780,
        2 => 0x800 + r % 0xf800,
        _ => 0x1_0000 + r % 0x10_0000,
    };
    char::from_u32(c).unwrap_or('\u{fffd}')
}

/// UTF-8 text of `min..=max` bytes (`min` is 0 or 1), mostly short, sometimes at the limit.
fn text(min: usize, max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        5 => vec(any::<char>(), min..=40).prop_map(move |c| fit(c, max)),
        2 => "[a-z0-9:._-]{1,24}".prop_map(move |s: String| fit(s.chars().collect(), max)),
        1 => (0..=max, any::<u64>())
            .prop_map(|(n, seed)| fit(splitmix(seed).take(n).map(char_from).collect(), n)),
        1 => any::<char>().prop_map(move |c| filled(max, c)),
    ]
    .prop_filter("too short", move |s| s.len() >= min)
    .boxed()
}

/// Vectors of `min..=max` elements: mostly short, sometimes any length, sometimes exactly `max`.
fn sized_vec<T: std::fmt::Debug + 'static>(
    elem: BoxedStrategy<T>,
    min: usize,
    max: usize,
) -> BoxedStrategy<Vec<T>> {
    prop_oneof![
        8 => vec(elem.clone(), min..=max.min(8)),
        1 => vec(elem.clone(), min..=max),
        1 => vec(elem, max..=max),
    ]
    .boxed()
}

/// Like [`sized_vec`] for long vectors of plain values: the long ones are made by `make` from
/// [`splitmix`] (short ones still shrink element by element).
fn bulk_vec<T: std::fmt::Debug + 'static>(
    elem: BoxedStrategy<T>,
    make: fn(u64) -> T,
    max: usize,
) -> BoxedStrategy<Vec<T>> {
    prop_oneof![
        8 => vec(elem, 0..=8),
        1 => (0..=max, any::<u64>())
            .prop_map(move |(n, seed)| splitmix(seed).take(n).map(make).collect()),
        1 => any::<u64>().prop_map(move |seed| splitmix(seed).take(max).map(make).collect()),
    ]
    .boxed()
}

/// A valid block: name of 1..=64 bytes, page-aligned address, non-zero page-multiple size,
/// `guest_addr + size` without overflow.
fn block_desc() -> BoxedStrategy<BlockDesc> {
    let size_pages = prop_oneof![4 => 1..=1u64 << 20, 1 => 1..=MAX_PAGES, 1 => Just(MAX_PAGES)];
    (text(1, MAX_NAME_LEN), size_pages)
        .prop_flat_map(|(name, size_pages)| {
            let room = MAX_PAGES - size_pages;
            let addr_pages = prop_oneof![Just(0u64), 0..=room.min(1 << 20), 0..=room, Just(room)];
            (Just(name), addr_pages, Just(size_pages))
        })
        .prop_map(|(name, addr_pages, size_pages)| BlockDesc {
            name,
            guest_addr: addr_pages * PAGE_SIZE,
            size: size_pages * PAGE_SIZE,
        })
        .boxed()
}

fn local_block() -> BoxedStrategy<LocalBlock> {
    (block_desc(), any::<u64>(), any::<u64>())
        .prop_map(|(desc, memfd_offset, host_addr)| LocalBlock {
            desc,
            memfd_offset,
            host_addr,
        })
        .boxed()
}

/// A valid run: 1..=MAX_RUN_PAGES pages, `first + count` without overflow.
fn page_run() -> BoxedStrategy<PageRun> {
    (any::<u32>(), 1..=MAX_RUN_PAGES)
        .prop_flat_map(|(block, count)| {
            let room = u64::MAX - u64::from(count);
            let first = prop_oneof![0..=1u64 << 24, 0..=room, Just(room)];
            (Just(block), first, Just(count))
        })
        .prop_map(|(block, first, count)| PageRun {
            block,
            first,
            count,
        })
        .boxed()
}

fn machine_state() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        8 => vec(any::<u8>(), 0..=64),
        1 => bulk_vec(any::<u8>().boxed(), |x| x as u8, 1 << 16),
        // `vec![0; n]` is one zeroed allocation; any other fill loops byte by byte in debug.
        1 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| {
            let mut v = vec![0; MAX_STATE];
            v[0] = a;
            v[MAX_STATE - 1] = b;
            v
        }),
    ]
    .boxed()
}

fn params() -> BoxedStrategy<MigrationParams> {
    let mode = select(vec![
        MigrationMode::Precopy,
        MigrationMode::Postcopy,
        MigrationMode::Hybrid,
    ]);
    let action = select(vec![TimeoutAction::Suspend, TimeoutAction::Postcopy]);
    (
        (
            mode,
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
            any::<u32>(),
        ),
        (any::<u64>(), any::<u32>(), action, any::<u32>()),
    )
        .prop_map(
            |(
                (
                    mode,
                    bandwidth_limit,
                    downtime_limit_ms,
                    max_rounds,
                    postcopy_after_rounds,
                    nb,
                    lt,
                ),
                (postcopy_bandwidth_limit, precopy_timeout_ms, action, per_gib),
            )| {
                MigrationParams {
                    mode,
                    bandwidth_limit,
                    postcopy_bandwidth_limit,
                    downtime_limit_ms,
                    max_rounds,
                    postcopy_after_rounds,
                    no_background: nb,
                    link_timeout_ms: lt,
                    precopy_timeout_ms,
                    precopy_timeout_action: action,
                    completion_timeout_per_gib_s: per_gib,
                }
            },
        )
        .boxed()
}

fn stats() -> BoxedStrategy<MigrationStats> {
    (select(PHASES.to_vec()), any::<u32>(), any::<[u64; 12]>())
        .prop_map(|(phase, rounds, v)| MigrationStats {
            phase,
            rounds,
            total_pages: v[0],
            pages_sent: v[1],
            zero_pages: v[2],
            holes_skipped: v[3],
            bytes_sent: v[4],
            remaining_pages: v[5],
            throughput_bps: v[6],
            dirty_rate_pps: v[7],
            expected_downtime_us: v[8],
            downtime_us: v[9],
            total_us: v[10],
            rejected_peers: v[11],
        })
        .boxed()
}

/// Every `PeerMessage` variant with valid fields.
fn peer_message() -> BoxedStrategy<PeerMessage> {
    prop_oneof![
        (any::<bool>(), any::<[u8; NONCE_LEN]>()).prop_map(|(hmac, nonce)| {
            PeerMessage::AuthHello {
                method: if hmac {
                    AuthMethod::HmacSha256
                } else {
                    AuthMethod::None
                },
                nonce,
            }
        }),
        (any::<[u8; NONCE_LEN]>(), any::<[u8; PROOF_LEN]>())
            .prop_map(|(nonce, proof)| PeerMessage::AuthChallenge { nonce, proof }),
        any::<[u8; PROOF_LEN]>().prop_map(|proof| PeerMessage::AuthProof { proof }),
        (any::<u16>(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(
            |(version, capabilities, session_id, link_timeout_ms)| PeerMessage::Hello {
                version,
                capabilities,
                session_id,
                link_timeout_ms,
            }
        ),
        sized_vec(block_desc(), 1, MAX_BLOCKS).prop_map(|blocks| PeerMessage::Layout { blocks }),
        Just(PeerMessage::LayoutAccepted),
        page_run().prop_map(PeerMessage::Pages),
        page_run().prop_map(PeerMessage::ZeroPages),
        any::<u32>().prop_map(|round| PeerMessage::RoundEnd { round }),
        any::<u32>().prop_map(|round| PeerMessage::Drain { round }),
        any::<u32>().prop_map(|round| PeerMessage::Drained { round }),
        (
            any::<u32>(),
            bulk_vec(
                any::<(u64, u32)>().boxed(),
                |x| (x.rotate_left(17), x as u32),
                MAX_DISCARD_RANGES
            )
        )
            .prop_map(|(block, ranges)| PeerMessage::Discard { block, ranges }),
        machine_state().prop_map(PeerMessage::MachineState),
        Just(PeerMessage::AllSent),
        Just(PeerMessage::Started),
        Just(PeerMessage::Ready),
        Just(PeerMessage::Heartbeat),
        any::<u64>().prop_map(|session_id| PeerMessage::Resume { session_id }),
        (any::<u32>(), any::<u64>(), vec(any::<u64>(), 0..64)).prop_map(
            |(block, first_page, words)| PeerMessage::Received {
                block,
                first_page,
                words
            }
        ),
        Just(PeerMessage::ReceivedEnd),
        Just(PeerMessage::Resumed),
        Just(PeerMessage::Commit),
        page_run().prop_map(PeerMessage::PageRequest),
        Just(PeerMessage::AllReceived),
        text(0, MAX_ERROR_LEN).prop_map(PeerMessage::Error),
        any::<bool>().prop_map(|postcopy| PeerMessage::Switchover { postcopy }),
        (any::<u32>(), any::<u64>(), 1..=u64::MAX).prop_map(|(block, first, count)| {
            PeerMessage::Holes {
                block,
                first: first.min(u64::MAX - count),
                count,
            }
        }),
        any::<u64>().prop_map(|session_id| PeerMessage::UrgentChannel { session_id }),
    ]
    .boxed()
}

/// No secret, or one of any valid length; no TLS directory, or a path of any valid length.
fn peer_auth() -> BoxedStrategy<PeerAuth> {
    (
        proptest::option::of(vec(any::<u8>(), MIN_SECRET_LEN..=MAX_SECRET_LEN)),
        any::<bool>(),
        proptest::option::of(text(1, MAX_STR)),
    )
        .prop_map(|(secret, insecure, tls_creds)| PeerAuth {
            secret: secret.map(|b| Secret::new(b).expect("length within bounds")),
            insecure,
            tls_creds,
        })
        .boxed()
}

/// Every `LocalMessage` variant with valid fields.
fn local_message() -> BoxedStrategy<LocalMessage> {
    prop_oneof![
        (
            text(0, MAX_STR),
            text(0, MAX_STR),
            params(),
            sized_vec(local_block(), 1, MAX_BLOCKS),
            peer_auth()
        )
            .prop_map(|(vm, uri, params, blocks, auth)| LocalMessage::Outgoing {
                vm,
                uri,
                params,
                blocks,
                auth,
            }),
        (
            text(0, MAX_STR),
            text(0, MAX_STR),
            sized_vec(local_block(), 1, MAX_BLOCKS),
            any::<bool>(),
            peer_auth()
        )
            .prop_map(|(vm, uri, blocks, has_uffd, auth)| LocalMessage::Incoming {
                vm,
                uri,
                blocks,
                has_uffd,
                auth,
            }),
        (
            text(0, MAX_STR),
            text(0, MAX_STR),
            sized_vec(local_block(), 1, MAX_BLOCKS),
            any::<u64>(),
            peer_auth()
        )
            .prop_map(
                |(vm, uri, blocks, session_id, auth)| LocalMessage::ResumeOutgoing {
                    vm,
                    uri,
                    params: MigrationParams::default(),
                    blocks,
                    session_id,
                    auth,
                }
            ),
        (
            text(0, MAX_STR),
            text(0, MAX_STR),
            sized_vec(local_block(), 1, MAX_BLOCKS),
            any::<u64>(),
            peer_auth()
        )
            .prop_map(
                |(vm, uri, blocks, session_id, auth)| LocalMessage::ResumeIncoming {
                    vm,
                    uri,
                    blocks,
                    session_id,
                    auth,
                }
            ),
        (
            any::<u32>(),
            any::<u64>(),
            bulk_vec(any::<u64>().boxed(), |x| x, MAX_BITMAP_WORDS)
        )
            .prop_map(|(block, first_page, words)| LocalMessage::DirtyBitmap {
                block,
                first_page,
                words,
            }),
        any::<bool>().prop_map(|stopped| LocalMessage::BitmapEnd { stopped }),
        machine_state().prop_map(LocalMessage::MachineState),
        Just(LocalMessage::StateLoaded),
        params().prop_map(LocalMessage::SetParams),
        Just(LocalMessage::Cancel),
        Just(LocalMessage::StartPostcopy),
        text(0, MAX_STR).prop_map(|uri| LocalMessage::Listening { uri }),
        any::<bool>().prop_map(|stop| LocalMessage::Harvest { stop }),
        stats().prop_map(LocalMessage::Progress),
        stats().prop_map(LocalMessage::Completed),
        (text(0, MAX_STR), stats())
            .prop_map(|(message, stats)| LocalMessage::Failed { message, stats }),
        vec(any::<u32>(), 0..=proto::types::MAX_VCPUS).prop_map(LocalMessage::VcpuThreads),
        Just(LocalMessage::PostcopyBegin),
        Just(LocalMessage::Committed),
        Just(LocalMessage::Run),
        text(0, MAX_STR).prop_map(|reason| LocalMessage::PostcopyPaused { reason }),
        Just(LocalMessage::Pause),
        any::<u64>().prop_map(LocalMessage::Session),
        text(0, MAX_STR).prop_map(|uri| LocalMessage::Resume { uri }),
        text(0, MAX_STR).prop_map(|uri| LocalMessage::Recover { uri }),
        (
            vec(any::<u64>(), 9 + proto::types::LATENCY_BUCKETS),
            vec(any::<u64>(), 0..=proto::types::MAX_VCPUS)
        )
            .prop_map(|(v, vcpu_blocked_us)| {
                let mut latency_hist = [0; proto::types::LATENCY_BUCKETS];
                latency_hist.copy_from_slice(&v[9..]);
                LocalMessage::PostcopyProgress(proto::PostcopyStats {
                    pages_requested: v[0],
                    pages_urgent: v[1],
                    pages_pushed: v[2],
                    faults: v[3],
                    remaining_pages: v[4],
                    latency_hist,
                    latency_p50_us: v[5],
                    latency_p99_us: v[6],
                    latency_max_us: v[7],
                    vm_blocked_us: v[8],
                    vcpu_blocked_us,
                    recoveries: v[0] ^ v[1],
                    paused_us: v[2] ^ v[3],
                    stage_request_us: [v[4] ^ v[5], v[6] ^ v[7]],
                    stage_fetch_us: [v[8] ^ v[0], v[1] ^ v[2]],
                    stage_place_us: [v[3] ^ v[4], v[5] ^ v[6]],
                })
            }),
    ]
    .boxed()
}

/// A kind byte: any value, or one a decoder knows.
fn any_kind() -> BoxedStrategy<u8> {
    let known: Vec<u8> = PEER_KINDS.iter().chain(&LOCAL_KINDS).copied().collect();
    prop_oneof![any::<u8>(), select(known)].boxed()
}

/// Bytes for the framing layer: noise, or a plausible small prefix followed by noise.
fn stream_bytes() -> BoxedStrategy<Vec<u8>> {
    let framed = (0u32..96, any_kind(), vec(any::<u8>(), 0..128)).prop_map(|(len, kind, rest)| {
        let mut v = len.to_le_bytes().to_vec();
        v.push(kind);
        v.extend(rest);
        v
    });
    let near_limit =
        (MAX_FRAME - 2..=MAX_FRAME + 2, vec(any::<u8>(), 0..16)).prop_map(|(len, rest)| {
            let mut v = len.to_le_bytes().to_vec();
            v.extend(rest);
            v
        });
    prop_oneof![4 => vec(any::<u8>(), 0..256), 4 => framed, 1 => near_limit].boxed()
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn peer_kind(m: &PeerMessage) -> u8 {
    use peer::kind::*;
    match m {
        PeerMessage::AuthHello { .. } => AUTH_HELLO,
        PeerMessage::AuthChallenge { .. } => AUTH_CHALLENGE,
        PeerMessage::AuthProof { .. } => AUTH_PROOF,
        PeerMessage::Hello { .. } => HELLO,
        PeerMessage::Layout { .. } => LAYOUT,
        PeerMessage::LayoutAccepted => LAYOUT_ACCEPTED,
        PeerMessage::Pages(_) => PAGES,
        PeerMessage::ZeroPages(_) => ZERO_PAGES,
        PeerMessage::RoundEnd { .. } => ROUND_END,
        PeerMessage::Drain { .. } => DRAIN,
        PeerMessage::Drained { .. } => DRAINED,
        PeerMessage::Discard { .. } => DISCARD,
        PeerMessage::MachineState(_) => MACHINE_STATE,
        PeerMessage::AllSent => ALL_SENT,
        PeerMessage::Started => STARTED,
        PeerMessage::Ready => READY,
        PeerMessage::Commit => COMMIT,
        PeerMessage::Heartbeat => HEARTBEAT,
        PeerMessage::Resume { .. } => RESUME,
        PeerMessage::Received { .. } => RECEIVED,
        PeerMessage::ReceivedEnd => RECEIVED_END,
        PeerMessage::Resumed => RESUMED,
        PeerMessage::PageRequest(_) => PAGE_REQUEST,
        PeerMessage::AllReceived => ALL_RECEIVED,
        PeerMessage::Error(_) => ERROR,
        PeerMessage::Switchover { .. } => SWITCHOVER,
        PeerMessage::Holes { .. } => HOLES,
        PeerMessage::UrgentChannel { .. } => URGENT_CHANNEL,
    }
}

fn local_kind(m: &LocalMessage) -> u8 {
    use local::kind::*;
    match m {
        LocalMessage::Outgoing { .. } => OUTGOING,
        LocalMessage::Incoming { .. } => INCOMING,
        LocalMessage::DirtyBitmap { .. } => DIRTY_BITMAP,
        LocalMessage::BitmapEnd { .. } => BITMAP_END,
        LocalMessage::MachineState(_) => MACHINE_STATE,
        LocalMessage::StateLoaded => STATE_LOADED,
        LocalMessage::SetParams(_) => SET_PARAMS,
        LocalMessage::Cancel => CANCEL,
        LocalMessage::StartPostcopy => START_POSTCOPY,
        LocalMessage::Listening { .. } => LISTENING,
        LocalMessage::Harvest { .. } => HARVEST,
        LocalMessage::Progress(_) => PROGRESS,
        LocalMessage::Completed(_) => COMPLETED,
        LocalMessage::Failed { .. } => FAILED,
        LocalMessage::VcpuThreads(_) => VCPU_THREADS,
        LocalMessage::PostcopyBegin => POSTCOPY_BEGIN,
        LocalMessage::Committed => COMMITTED,
        LocalMessage::Run => RUN,
        LocalMessage::PostcopyPaused { .. } => POSTCOPY_PAUSED,
        LocalMessage::Pause => PAUSE,
        LocalMessage::Session(_) => SESSION,
        LocalMessage::ResumeIncoming { .. } => RESUME_INCOMING,
        LocalMessage::ResumeOutgoing { .. } => RESUME_OUTGOING,
        LocalMessage::Resume { .. } => RESUME,
        LocalMessage::Recover { .. } => RECOVER,
        LocalMessage::PostcopyProgress(_) => POSTCOPY_PROGRESS,
    }
}

/// Page contents to send after a `PAGES` header, and a little more.
static PAGE_DATA: [u8; MAX_RUN_PAGES as usize * PAGE_SIZE as usize + 4096] =
    [0; MAX_RUN_PAGES as usize * PAGE_SIZE as usize + 4096];

/// The whole frame of `m`; for `Pages`, with `run.data_len()` bytes of data after the header.
fn peer_frame(m: &PeerMessage) -> Vec<u8> {
    let mut buf = Vec::new();
    m.encode(&mut buf);
    if let PeerMessage::Pages(run) = m {
        buf.extend_from_slice(&PAGE_DATA[..run.data_len()]);
    }
    buf
}

fn local_frame(m: &LocalMessage) -> Vec<u8> {
    let mut buf = Vec::new();
    m.encode(&mut buf);
    buf
}

/// A body built with the crate's own field writer.
fn fields(f: impl FnOnce(&mut Writer)) -> Vec<u8> {
    let mut b = Vec::new();
    f(&mut Writer::new(&mut b));
    b
}

/// Checks that `m`, decoded from `body` of `kind`, encodes back to exactly that frame (for
/// `Pages`, the header; the data is not part of the value) and decodes again to itself.
fn check_peer_reencodes(kind: u8, body: &[u8], m: &PeerMessage) -> Result<(), TestCaseError> {
    let again = peer_frame(m);
    let (p, b, rest) = frame::split(&again)
        .map_err(|e| TestCaseError::fail(format!("re-encoding of {m:?} does not split: {e}")))?
        .ok_or_else(|| TestCaseError::fail("re-encoding is not a whole frame"))?;
    prop_assert!(rest.is_empty());
    prop_assert_eq!(p.kind, kind);
    prop_assert_eq!(b.len(), body.len());
    if kind == peer::kind::PAGES {
        prop_assert_eq!(&b[..RUN_HEADER_LEN], &body[..RUN_HEADER_LEN]);
    } else {
        prop_assert_eq!(b, body, "non-canonical encoding accepted for {:?}", m);
    }
    prop_assert_eq!(PeerMessage::decode(p.kind, b), Ok(m.clone()));
    Ok(())
}

fn check_local_reencodes(kind: u8, body: &[u8], m: &LocalMessage) -> Result<(), TestCaseError> {
    let again = local_frame(m);
    let (p, b, rest) = frame::split(&again)
        .map_err(|e| TestCaseError::fail(format!("re-encoding of {m:?} does not split: {e}")))?
        .ok_or_else(|| TestCaseError::fail("re-encoding is not a whole frame"))?;
    prop_assert!(rest.is_empty());
    prop_assert_eq!(p.kind, kind);
    prop_assert_eq!(b, body, "non-canonical encoding accepted for {:?}", m);
    prop_assert_eq!(LocalMessage::decode(p.kind, b), Ok(m.clone()));
    Ok(())
}

/// Decodes `body` of `kind` with both decoders, checking that neither panics nor allocates
/// beyond [`alloc_bound`], that a kind is only ever known to one of them, and that whatever
/// decodes re-encodes canonically.
fn decode_both(kind: u8, body: &[u8]) -> Result<(), TestCaseError> {
    let (peer, peer_bytes) = measure(|| PeerMessage::decode(kind, body));
    prop_assert!(
        peer_bytes <= alloc_bound(body.len()),
        "peer decode of kind {:#04x}, {} bytes allocated {}",
        kind,
        body.len(),
        peer_bytes
    );
    let (local, local_bytes) = measure(|| LocalMessage::decode(kind, body));
    prop_assert!(
        local_bytes <= alloc_bound(body.len()),
        "local decode of kind {:#04x}, {} bytes allocated {}",
        kind,
        body.len(),
        local_bytes
    );
    if PEER_KINDS.contains(&kind) {
        prop_assert_eq!(&local, &Err(DecodeError::UnknownKind(kind)));
    } else {
        prop_assert_eq!(&peer, &Err(DecodeError::UnknownKind(kind)));
    }
    if !PEER_KINDS.contains(&kind) && !LOCAL_KINDS.contains(&kind) {
        prop_assert_eq!(&local, &Err(DecodeError::UnknownKind(kind)));
    }
    if let Ok(m) = &peer {
        check_peer_reencodes(kind, body, m)?;
    }
    if let Ok(m) = &local {
        check_local_reencodes(kind, body, m)?;
    }
    Ok(())
}

/// Strict prefix lengths of a body of `len` bytes to try: all of them up to 16 KiB, otherwise
/// the first and last KiB and a thousand spread evenly between.
fn prefix_lengths(len: usize) -> Vec<usize> {
    if len <= 16 << 10 {
        return (0..len).collect();
    }
    (0..1024)
        .chain(len - 1024..len)
        .chain((0..1024).map(|i| i * len / 1024))
        .collect()
}

/// What decoding a strict prefix of a valid body must say: the body ended early, or, for a
/// `PAGES` frame whose header is complete, that the page data is short.
fn is_truncation(kind_is_pages: bool, e: &DecodeError) -> bool {
    match e {
        DecodeError::Truncated { .. } => true,
        DecodeError::Invalid { field, .. } => kind_is_pages && *field == "page data",
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Properties.

proptest! {
    /// encode, split, decode gives the value back and consumes exactly its frame; `read` and
    /// `decode_pages_header` agree with `split` and `decode`.
    #[test]
    fn peer_round_trip(m in peer_message(), trailing in vec(any::<u8>(), 0..16)) {
        let mut buf = peer_frame(&m);
        let frame_len = buf.len();
        buf.extend_from_slice(&trailing);

        let (prefix, body, rest) = frame::split(&buf).unwrap().expect("a whole frame");
        prop_assert_eq!(prefix.kind, peer_kind(&m));
        prop_assert!(prefix.len <= MAX_FRAME);
        prop_assert_eq!(prefix.len as usize, frame_len - PREFIX_LEN);
        prop_assert_eq!(body.len(), frame_len - PREFIX_LEN);
        prop_assert_eq!(rest, &trailing[..]);
        prop_assert_eq!(PeerMessage::decode(prefix.kind, body), Ok(m.clone()));

        let mut r: &[u8] = &buf;
        let mut read_body = Vec::new();
        prop_assert_eq!(frame::read(&mut r, &mut read_body).unwrap(), prefix);
        prop_assert_eq!(&read_body[..], body);
        prop_assert_eq!(r, &trailing[..]);

        if let PeerMessage::Pages(run) = m {
            prop_assert_eq!(buf[4], peer::kind::PAGES);
            let header: &[u8; RUN_HEADER_LEN] = body[..RUN_HEADER_LEN].try_into().unwrap();
            prop_assert_eq!(PageRun::decode_pages_header(prefix, header), Ok(run));
        }
    }

    #[test]
    fn local_round_trip(m in local_message(), trailing in vec(any::<u8>(), 0..16)) {
        let mut buf = local_frame(&m);
        let frame_len = buf.len();
        buf.extend_from_slice(&trailing);

        let (prefix, body, rest) = frame::split(&buf).unwrap().expect("a whole frame");
        prop_assert_eq!(prefix.kind, local_kind(&m));
        prop_assert!(prefix.len <= MAX_FRAME);
        prop_assert_eq!(prefix.len as usize, frame_len - PREFIX_LEN);
        prop_assert_eq!(body.len(), frame_len - PREFIX_LEN);
        prop_assert_eq!(rest, &trailing[..]);
        prop_assert_eq!(LocalMessage::decode(prefix.kind, body), Ok(m.clone()));

        let mut r: &[u8] = &buf;
        let mut read_body = Vec::new();
        prop_assert_eq!(frame::read(&mut r, &mut read_body).unwrap(), prefix);
        prop_assert_eq!(&read_body[..], body);
        prop_assert_eq!(r, &trailing[..]);
    }

    /// Several frames back to back come apart again, the same way through `split` and `read`.
    #[test]
    fn streams_split_back_into_their_messages(
        peers in vec(peer_message(), 1..5),
        locals in vec(local_message(), 1..5),
    ) {
        let mut buf = Vec::new();
        for m in &peers {
            buf.extend(peer_frame(m));
        }
        let mut rest = &buf[..];
        let mut r: &[u8] = &buf;
        let mut read_body = Vec::new();
        for m in &peers {
            let (p, body, tail) = frame::split(rest).unwrap().expect("a whole frame");
            prop_assert_eq!(PeerMessage::decode(p.kind, body), Ok(m.clone()));
            prop_assert_eq!(frame::read(&mut r, &mut read_body).unwrap(), p);
            prop_assert_eq!(&read_body[..], body);
            rest = tail;
        }
        prop_assert!(rest.is_empty() && r.is_empty());
        prop_assert!(frame::read(&mut r, &mut read_body).unwrap_err().is_eof());

        let mut buf = Vec::new();
        for m in &locals {
            m.encode(&mut buf);
        }
        let mut rest = &buf[..];
        for m in &locals {
            let (p, body, tail) = frame::split(rest).unwrap().expect("a whole frame");
            prop_assert_eq!(LocalMessage::decode(p.kind, body), Ok(m.clone()));
            rest = tail;
        }
        prop_assert!(rest.is_empty());
        prop_assert!(frame::split(rest).unwrap().is_none());
    }

    /// No strict prefix of a valid body decodes (the formats carry every length and count
    /// explicitly, so a shorter body is never another valid message), and neither does the body
    /// with one byte more.
    #[test]
    fn peer_truncated_or_extended_bodies_fail(m in peer_message()) {
        let buf = peer_frame(&m);
        let kind = buf[4];
        let is_pages = kind == peer::kind::PAGES;
        let body = &buf[PREFIX_LEN..];
        for n in prefix_lengths(body.len()) {
            match PeerMessage::decode(kind, &body[..n]) {
                Err(e) => prop_assert!(
                    is_truncation(is_pages, &e),
                    "prefix {} of {} bytes: {:?}", n, body.len(), e
                ),
                Ok(other) => prop_assert!(
                    false,
                    "prefix {} of {} bytes decoded as {:?}", n, body.len(), other
                ),
            }
        }
        let mut longer = body.to_vec();
        longer.push(0);
        let e = PeerMessage::decode(kind, &longer).unwrap_err();
        if is_pages {
            prop_assert!(
                matches!(e, DecodeError::Invalid { field: "page data", .. }),
                "{:?}", e
            );
        } else {
            prop_assert_eq!(e, DecodeError::TrailingBytes(1));
        }
    }

    #[test]
    fn local_truncated_or_extended_bodies_fail(m in local_message()) {
        let buf = local_frame(&m);
        let kind = buf[4];
        let body = &buf[PREFIX_LEN..];
        for n in prefix_lengths(body.len()) {
            match LocalMessage::decode(kind, &body[..n]) {
                Err(e) => prop_assert!(
                    is_truncation(false, &e),
                    "prefix {} of {} bytes: {:?}", n, body.len(), e
                ),
                Ok(other) => prop_assert!(
                    false,
                    "prefix {} of {} bytes decoded as {:?}", n, body.len(), other
                ),
            }
        }
        let mut longer = body.to_vec();
        longer.push(0);
        prop_assert_eq!(LocalMessage::decode(kind, &longer), Err(DecodeError::TrailingBytes(1)));
    }

    /// `split` never panics, and says exactly what the prefix says.
    #[test]
    fn split_never_panics(data in stream_bytes()) {
        match frame::split(&data) {
            Ok(Some((p, body, rest))) => {
                let len = u32::from_le_bytes(data[..4].try_into().unwrap());
                prop_assert_eq!(p, FramePrefix { len, kind: data[4] });
                prop_assert!(p.len <= MAX_FRAME);
                prop_assert_eq!(body, &data[PREFIX_LEN..PREFIX_LEN + body.len()]);
                prop_assert_eq!(body.len(), p.len as usize);
                prop_assert_eq!(PREFIX_LEN + body.len() + rest.len(), data.len());
            }
            Ok(None) => {
                if data.len() >= PREFIX_LEN {
                    let len = u32::from_le_bytes(data[..4].try_into().unwrap());
                    prop_assert!(len <= MAX_FRAME);
                    prop_assert!(data.len() < PREFIX_LEN + len as usize);
                }
            }
            Err(FrameError::TooLarge(n)) => {
                prop_assert_eq!(n, u32::from_le_bytes(data[..4].try_into().unwrap()));
                prop_assert!(n > MAX_FRAME);
            }
            Err(e) => prop_assert!(false, "unexpected {:?}", e),
        }
    }

    /// `read` never panics and sees the same frames as `split`, then the same end: a clean EOF
    /// where `split` wants more bytes, `TooLarge` where `split` refuses the prefix.
    #[test]
    fn read_never_panics_and_agrees_with_split(data in stream_bytes()) {
        let mut r: &[u8] = &data;
        let mut rest = &data[..];
        let mut body = Vec::new();
        loop {
            let (read, bytes) = measure(|| frame::read(&mut r, &mut body));
            prop_assert!(bytes <= MAX_FRAME as usize + 1024);
            match (frame::split(rest), read) {
                (Ok(Some((p, b, tail))), Ok(q)) => {
                    prop_assert_eq!(p, q);
                    prop_assert_eq!(b, &body[..]);
                    prop_assert_eq!(tail, r);
                    rest = tail;
                }
                (Ok(None), Err(e)) => {
                    prop_assert!(e.is_eof(), "{:?}", e);
                    break;
                }
                (Err(FrameError::TooLarge(n)), Err(FrameError::TooLarge(m))) => {
                    prop_assert_eq!(n, m);
                    break;
                }
                (s, q) => prop_assert!(false, "split {:?} but read {:?}", s, q),
            }
        }
    }

    /// Neither decoder panics on any kind and body; whatever decodes re-encodes canonically.
    #[test]
    fn decode_never_panics(kind in any_kind(), body in vec(any::<u8>(), 0..256)) {
        decode_both(kind, &body)?;
    }

    /// Valid frames with a few bytes overwritten, cut or extended, and maybe another kind: the
    /// decoders get deep into every format and must still never panic, and whatever they accept
    /// must re-encode to exactly the bytes they were given.
    #[test]
    fn mutated_frames_never_panic(
        m in prop_oneof![
            peer_message().prop_map(|m| peer_frame(&m)),
            local_message().prop_map(|m| local_frame(&m)),
        ],
        edits in prop_oneof![
            Just(Vec::new()),
            vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ],
        cut in prop::option::weighted(0.2, any::<prop::sample::Index>()),
        extra in prop_oneof![3 => Just(Vec::new()), 1 => vec(any::<u8>(), 1..3)],
        kind in prop::option::weighted(0.2, any_kind()),
    ) {
        let mut body = m[PREFIX_LEN..].to_vec();
        if !body.is_empty() {
            for (i, b) in edits {
                let i = i.index(body.len());
                body[i] = b;
            }
            if let Some(c) = cut {
                body.truncate(c.index(body.len()));
            }
        }
        body.extend(extra);
        decode_both(kind.unwrap_or(m[4]), &body)?;
    }

    /// `decode_pages_header` never panics, and accepts exactly the headers whose whole `PAGES`
    /// body `PeerMessage::decode` accepts.
    #[test]
    fn pages_header_agrees_with_decode(
        len in prop_oneof![
            any::<u32>(),
            0..=(RUN_HEADER_LEN as u32 + MAX_RUN_PAGES * PAGE_SIZE as u32 + 64),
            (0..=MAX_RUN_PAGES + 1).prop_map(|c| RUN_HEADER_LEN as u32 + c * PAGE_SIZE as u32),
        ],
        kind in prop_oneof![3 => Just(peer::kind::PAGES), 1 => any::<u8>()],
        header in prop_oneof![
            any::<[u8; RUN_HEADER_LEN]>(),
            (
                any::<u32>(),
                prop_oneof![any::<u64>(), u64::MAX - 300..=u64::MAX],
                prop_oneof![any::<u32>(), 0..=MAX_RUN_PAGES + 1],
            )
                .prop_map(|(block, first, count)| {
                    let b = fields(|w| {
                        w.u32(block);
                        w.u64(first);
                        w.u32(count);
                    });
                    <[u8; RUN_HEADER_LEN]>::try_from(b).unwrap()
                }),
        ],
    ) {
        let prefix = FramePrefix { len, kind };
        let res = PageRun::decode_pages_header(prefix, &header);
        if kind != peer::kind::PAGES {
            prop_assert_eq!(res, Err(DecodeError::UnknownKind(kind)));
        } else if (RUN_HEADER_LEN..=RUN_HEADER_LEN + MAX_RUN_PAGES as usize * 4096 + 64)
            .contains(&(len as usize))
        {
            let mut full = header.to_vec();
            full.extend_from_slice(&PAGE_DATA[..len as usize - RUN_HEADER_LEN]);
            match (res, PeerMessage::decode(kind, &full)) {
                (Ok(run), Ok(m)) => prop_assert_eq!(m, PeerMessage::Pages(run)),
                (Err(_), Err(_)) => {}
                (a, b) => prop_assert!(false, "header says {:?}, whole body {:?}", a, b),
            }
        } else {
            prop_assert!(res.is_err());
        }
    }

    /// A count or length claiming more elements than the body holds is refused at once,
    /// whatever its value, without allocating for it.
    #[test]
    fn forged_counts_are_refused_without_allocating(
        case in 0usize..FORGED_FIELDS,
        claim in prop_oneof![Just(u32::MAX), 1u32 << 20.., 65..1u32 << 20],
        filler in vec(any::<u8>(), 0..64),
    ) {
        let (is_peer, kind, body) = forged(case, claim, &filler);
        prop_assume!(claims_more_than_present(case, claim, filler.len()));
        let start = Instant::now();
        let (res, bytes) = if is_peer {
            measure(|| PeerMessage::decode(kind, &body).map(|_| ()))
        } else {
            measure(|| LocalMessage::decode(kind, &body).map(|_| ()))
        };
        prop_assert!(res.is_err(), "case {} claim {} decoded", case, claim);
        prop_assert!(bytes <= 1024, "case {}: {} bytes allocated", case, bytes);
        prop_assert!(start.elapsed() < Duration::from_secs(1));
    }
}

// ---------------------------------------------------------------------------------------------
// Forged counts and lengths.

/// Number of count or length fields [`forged`] knows how to forge.
const FORGED_FIELDS: usize = 11;

/// Minimum wire bytes per element of the field forged by `case`.
fn forged_elem(case: usize) -> usize {
    [18, 12, 1, 1, 34, 34, 8, 1, 1, 1, 1][case]
}

fn claims_more_than_present(case: usize, claim: u32, filler: usize) -> bool {
    claim as usize * forged_elem(case) > filler
}

/// A body whose count or length field (which one: `case`) claims `claim` elements, followed
/// only by `filler`. Returns whether it is a peer message, its kind and the body.
fn forged(case: usize, claim: u32, filler: &[u8]) -> (bool, u8, Vec<u8>) {
    let short = |claim: u32| claim.min(u32::from(u16::MAX)) as u16;
    let strs_and_params = |w: &mut Writer, params: bool| {
        w.str("vm0");
        w.str("tcp:127.0.0.1:4444");
        if params {
            w.u8(0);
            w.u64(0);
            w.u32(300);
            w.u32(30);
            w.u32(2);
            w.bool(false);
        }
    };
    let (is_peer, kind, mut b) = match case {
        0 => (true, peer::kind::LAYOUT, fields(|w| w.u32(claim))),
        1 => (
            true,
            peer::kind::DISCARD,
            fields(|w| {
                w.u32(0);
                w.u32(claim);
            }),
        ),
        2 => (true, peer::kind::MACHINE_STATE, fields(|w| w.u32(claim))),
        3 => (true, peer::kind::ERROR, fields(|w| w.u16(short(claim)))),
        4 => (
            false,
            local::kind::OUTGOING,
            fields(|w| {
                strs_and_params(w, true);
                w.u32(claim);
            }),
        ),
        5 => (
            false,
            local::kind::INCOMING,
            fields(|w| {
                strs_and_params(w, false);
                w.u32(claim);
            }),
        ),
        6 => (
            false,
            local::kind::DIRTY_BITMAP,
            fields(|w| {
                w.u32(0);
                w.u64(0);
                w.u32(claim);
            }),
        ),
        7 => (false, local::kind::MACHINE_STATE, fields(|w| w.u32(claim))),
        8 => (
            false,
            local::kind::LISTENING,
            fields(|w| w.u16(short(claim))),
        ),
        9 => (false, local::kind::FAILED, fields(|w| w.u16(short(claim)))),
        10 => (
            false,
            local::kind::OUTGOING,
            fields(|w| w.u16(short(claim))),
        ),
        _ => unreachable!(),
    };
    b.extend_from_slice(filler);
    (is_peer, kind, b)
}

#[test]
fn counts_of_u32_max_are_refused_at_once() {
    for case in 0..FORGED_FIELDS {
        for filler_len in [0, 7, 64, 1000] {
            let filler = vec![0x5a; filler_len];
            let (is_peer, kind, body) = forged(case, u32::MAX, &filler);
            let start = Instant::now();
            let (res, bytes) = if is_peer {
                measure(|| PeerMessage::decode(kind, &body).map(|_| ()))
            } else {
                measure(|| LocalMessage::decode(kind, &body).map(|_| ()))
            };
            let elapsed = start.elapsed();
            assert!(res.is_err(), "case {case} decoded");
            assert!(bytes <= 1024, "case {case}: {bytes} bytes allocated");
            assert!(
                elapsed < Duration::from_millis(500),
                "case {case}: {elapsed:?}"
            );
        }
    }
}

/// Counts that fit in the body but exceed the format's limit are refused before any allocation
/// sized by them.
#[test]
fn counts_over_the_limit_are_refused_even_when_the_bytes_are_there() {
    let cases: Vec<(bool, u8, Vec<u8>)> = vec![
        (
            true,
            peer::kind::LAYOUT,
            fields(|w| {
                w.u32(MAX_BLOCKS as u32 + 1);
                w.raw(&vec![0; 18 * (MAX_BLOCKS + 1)]);
            }),
        ),
        (
            true,
            peer::kind::DISCARD,
            fields(|w| {
                w.u32(0);
                w.u32(MAX_DISCARD_RANGES as u32 + 1);
                w.raw(&vec![0; 12 * (MAX_DISCARD_RANGES + 1)]);
            }),
        ),
        (
            false,
            local::kind::DIRTY_BITMAP,
            fields(|w| {
                w.u32(0);
                w.u64(0);
                w.u32(MAX_BITMAP_WORDS as u32 + 1);
                w.raw(&vec![0; 8 * (MAX_BITMAP_WORDS + 1)]);
            }),
        ),
    ];
    for (is_peer, kind, body) in cases {
        let (res, bytes) = if is_peer {
            measure(|| PeerMessage::decode(kind, &body).map(|_| ()))
        } else {
            measure(|| LocalMessage::decode(kind, &body).map(|_| ()))
        };
        assert!(
            matches!(res, Err(DecodeError::Invalid { .. })),
            "kind {kind:#04x}: {res:?}"
        );
        assert!(bytes <= 1024, "kind {kind:#04x}: {bytes} bytes allocated");
    }
}

/// `read` allocates the body its prefix announces, never more than `MAX_FRAME`, and refuses a
/// larger announcement before allocating anything.
#[test]
fn read_allocates_at_most_the_announced_frame() {
    for len in [0, 1, 4096, MAX_FRAME, MAX_FRAME + 1, u32::MAX] {
        let mut stream = len.to_le_bytes().to_vec();
        stream.push(peer::kind::MACHINE_STATE);
        let mut r: &[u8] = &stream;
        let mut body = Vec::new();
        let (res, bytes) = measure(|| frame::read(&mut r, &mut body));
        if len > MAX_FRAME {
            assert!(matches!(res, Err(FrameError::TooLarge(n)) if n == len));
            assert_eq!(bytes, 0);
        } else {
            assert_eq!(res.is_ok(), len == 0);
            assert!(bytes <= (len as usize).max(8), "{len}: {bytes}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Edges the strategies reach only by chance, pinned.

#[test]
fn largest_valid_frames_round_trip() {
    let big_run = PageRun {
        block: u32::MAX,
        first: u64::MAX - u64::from(MAX_RUN_PAGES),
        count: MAX_RUN_PAGES,
    };
    let block = BlockDesc {
        name: filled(MAX_NAME_LEN, 'é'),
        guest_addr: 0,
        size: MAX_PAGES * PAGE_SIZE,
    };
    let peers = [
        PeerMessage::MachineState(vec![0; MAX_STATE]),
        PeerMessage::Pages(big_run),
        PeerMessage::Layout {
            blocks: vec![block.clone(); MAX_BLOCKS],
        },
        PeerMessage::Discard {
            block: 3,
            ranges: vec![(u64::MAX, u32::MAX); MAX_DISCARD_RANGES],
        },
        PeerMessage::Error(filled(MAX_ERROR_LEN, '😀')),
    ];
    for m in peers {
        let buf = peer_frame(&m);
        let (p, body, rest) = frame::split(&buf).unwrap().unwrap();
        assert!(rest.is_empty());
        assert_eq!(PeerMessage::decode(p.kind, body), Ok(m));
    }
    let locals = [
        LocalMessage::MachineState(vec![0; MAX_STATE]),
        LocalMessage::DirtyBitmap {
            block: 0,
            first_page: u64::MAX,
            words: vec![u64::MAX; MAX_BITMAP_WORDS],
        },
        LocalMessage::Outgoing {
            vm: filled(MAX_STR, 'x'),
            uri: filled(MAX_STR, 'y'),
            params: MigrationParams::default(),
            blocks: vec![
                LocalBlock {
                    desc: block,
                    memfd_offset: u64::MAX,
                    host_addr: u64::MAX,
                };
                MAX_BLOCKS
            ],
            auth: PeerAuth {
                secret: Some(Secret::new(vec![0xa5; MAX_SECRET_LEN]).unwrap()),
                insecure: true,
                tls_creds: Some(filled(MAX_STR, 'w')),
            },
        },
        LocalMessage::Failed {
            message: filled(MAX_STR, 'z'),
            stats: MigrationStats::default(),
        },
    ];
    for m in locals {
        let buf = local_frame(&m);
        let (p, body, rest) = frame::split(&buf).unwrap().unwrap();
        assert!(rest.is_empty());
        assert_eq!(LocalMessage::decode(p.kind, body), Ok(m));
    }
    // One byte more than the largest machine state no longer fits a frame.
    let mut buf = Vec::new();
    PeerMessage::MachineState(vec![0; MAX_STATE + 1]).encode(&mut buf);
    assert!(matches!(frame::split(&buf), Err(FrameError::TooLarge(_))));
}

// ---------------------------------------------------------------------------------------------
// Fixed bugs, kept as regression tests.

/// `PeerMessage::decode` once accepted error texts up to `u16::MAX` bytes while `encode` cut
/// them to `MAX_ERROR_LEN`, so a decoded `Error` did not survive a re-encoding.
#[test]
fn decoded_error_text_survives_reencoding() {
    let text = "e".repeat(MAX_ERROR_LEN + 1);
    let b = fields(|w| w.str(&text));
    match PeerMessage::decode(peer::kind::ERROR, &b) {
        Err(_) => {}
        Ok(m) => {
            let buf = peer_frame(&m);
            let (p, again, _) = frame::split(&buf).unwrap().unwrap();
            assert_eq!(PeerMessage::decode(p.kind, again), Ok(m));
        }
    }
}

/// `Writer::str` once cut strings longer than `u16::MAX` bytes inside a character, so the frame
/// failed to decode ("not UTF-8") instead of carrying a shortened text.
#[test]
fn overlong_local_strings_still_decode() {
    let uri = filled(MAX_STR + 1, 'é');
    let m = LocalMessage::Listening { uri: uri.clone() };
    let buf = local_frame(&m);
    let (p, body, _) = frame::split(&buf).unwrap().unwrap();
    match LocalMessage::decode(p.kind, body) {
        Ok(LocalMessage::Listening { uri: got }) => assert!(uri.starts_with(&got)),
        other => panic!("encoding of a {}-byte uri decodes as {other:?}", uri.len()),
    }
}
