//! Structure-aware inputs: messages built field by field from an [`Unstructured`], mostly
//! valid and biased towards the values decoders check (limits, limits ± 1, wrapping sums), then
//! encoded. Byte-level mutation ([`crate::mutate`]) takes them apart from there.

use arbitrary::{Result, Unstructured};
use proto::auth::{AuthMethod, Secret, MAX_SECRET_LEN, MIN_SECRET_LEN};
use proto::local::{LocalBlock, LocalMessage, PeerAuth, MAX_BITMAP_WORDS};
use proto::peer::{
    PageRun, PeerMessage, MAX_DISCARD_RANGES, MAX_ERROR_LEN, MAX_RECEIVED_WORDS, MAX_RUN_PAGES,
};
use proto::types::{PostcopyStats, LATENCY_BUCKETS, MAX_BLOCKS, MAX_NAME_LEN, MAX_VCPUS};
use proto::{
    BlockDesc, MigrationMode, MigrationParams, MigrationStats, Phase, TimeoutAction, PAGE_SIZE,
};

/// Number of `PeerMessage` variants [`peer_message_of`] builds.
pub const PEER_VARIANTS: u32 = 28;
/// Number of `LocalMessage` variants [`local_message_of`] builds.
pub const LOCAL_VARIANTS: u32 = 26;

/// A `u64` that is either one of the edges decoders and layouts check or arbitrary.
pub fn edgy_u64(u: &mut Unstructured) -> Result<u64> {
    const EDGES: [u64; 14] = [
        0,
        1,
        2,
        63,
        64,
        255,
        256,
        257,
        4096,
        1 << 32,
        u32::MAX as u64,
        u64::MAX / PAGE_SIZE,
        u64::MAX - 1,
        u64::MAX,
    ];
    if u.ratio(1, 2)? {
        Ok(*u.choose(&EDGES)?)
    } else {
        u.arbitrary()
    }
}

/// A `u32` that is either an edge or arbitrary.
pub fn edgy_u32(u: &mut Unstructured) -> Result<u32> {
    const EDGES: [u32; 10] = [0, 1, 2, 64, 255, 256, 257, 4096, u32::MAX - 1, u32::MAX];
    if u.ratio(1, 2)? {
        Ok(*u.choose(&EDGES)?)
    } else {
        u.arbitrary()
    }
}

/// Text of at most `max` bytes, mixing ASCII and multi-byte characters.
pub fn text(u: &mut Unstructured, max: usize) -> Result<String> {
    // Usually short; now and then right at the limit, where truncation on encode would bite.
    let target = if u.ratio(1, 16)? {
        max
    } else {
        u.int_in_range(0..=max.min(48))?
    };
    let mut s = String::with_capacity(target);
    while s.len() < target {
        let c = match u.int_in_range(0u8..=9)? {
            0 => char::from_u32(u.int_in_range(0x80..=0x7ff)?).unwrap_or('é'),
            1 => char::from_u32(u.int_in_range(0x800..=0xd7ff)?).unwrap_or('€'),
            2 => char::from_u32(u.int_in_range(0x10000..=0x10ffff)?).unwrap_or('😀'),
            _ => char::from(u.int_in_range(0x20u8..=0x7e)?),
        };
        if s.len() + c.len_utf8() > target {
            // Fill the last bytes with ASCII so the length is exactly the target.
            s.push('x');
        } else {
            s.push(c);
        }
        if u.is_empty() {
            // Out of entropy: fill the rest at once rather than loop on zeros.
            s.extend(std::iter::repeat_n('y', target - s.len()));
        }
    }
    Ok(s)
}

fn bytes(u: &mut Unstructured, max: usize) -> Result<Vec<u8>> {
    let n = u.int_in_range(0..=max)?;
    let fill: u8 = u.arbitrary()?;
    Ok((0..n).map(|i| fill.wrapping_add(i as u8)).collect())
}

/// Up to `max` elements, usually few.
fn len(u: &mut Unstructured, max: usize) -> Result<usize> {
    if u.ratio(1, 32)? {
        Ok(max)
    } else {
        u.int_in_range(0..=max.min(8))
    }
}

/// A page run, valid or not: count 0 and counts over the limit come up too.
pub fn page_run(u: &mut Unstructured) -> Result<PageRun> {
    let count = match u.int_in_range(0u8..=9)? {
        0 => 0,
        1 => MAX_RUN_PAGES,
        2 => MAX_RUN_PAGES + 1,
        3 => edgy_u32(u)?,
        _ => u.int_in_range(1..=8)?,
    };
    let first = edgy_u64(u)?;
    Ok(PageRun {
        block: u.int_in_range(0..=3)?,
        first,
        count,
    })
}

fn block_desc(u: &mut Unstructured) -> Result<BlockDesc> {
    let mut name = text(u, MAX_NAME_LEN)?;
    if name.is_empty() {
        name.push('r');
    }
    Ok(BlockDesc {
        name,
        guest_addr: u.int_in_range(0..=1u64 << 40)? * PAGE_SIZE,
        size: u.int_in_range(1..=1u64 << 20)? * PAGE_SIZE,
    })
}

fn blocks(u: &mut Unstructured) -> Result<Vec<BlockDesc>> {
    let n = 1 + len(u, MAX_BLOCKS - 1)?;
    (0..n).map(|_| block_desc(u)).collect()
}

fn local_blocks(u: &mut Unstructured) -> Result<Vec<LocalBlock>> {
    let n = 1 + len(u, MAX_BLOCKS - 1)?;
    (0..n)
        .map(|_| {
            Ok(LocalBlock {
                desc: block_desc(u)?,
                memfd_offset: edgy_u64(u)?,
                host_addr: edgy_u64(u)?,
            })
        })
        .collect()
}

fn params(u: &mut Unstructured) -> Result<MigrationParams> {
    Ok(MigrationParams {
        mode: *u.choose(&[
            MigrationMode::Precopy,
            MigrationMode::Postcopy,
            MigrationMode::Hybrid,
        ])?,
        bandwidth_limit: edgy_u64(u)?,
        postcopy_bandwidth_limit: edgy_u64(u)?,
        downtime_limit_ms: edgy_u32(u)?,
        max_rounds: edgy_u32(u)?,
        postcopy_after_rounds: edgy_u32(u)?,
        no_background: u.arbitrary()?,
        link_timeout_ms: edgy_u32(u)?,
        precopy_timeout_ms: edgy_u32(u)?,
        precopy_timeout_action: *u.choose(&[TimeoutAction::Suspend, TimeoutAction::Postcopy])?,
        completion_timeout_per_gib_s: edgy_u32(u)?,
    })
}

/// No secret, or one of a valid length; no TLS directory, or one.
fn peer_auth(u: &mut Unstructured) -> Result<PeerAuth> {
    let secret = if u.arbitrary()? {
        let n = u.int_in_range(MIN_SECRET_LEN..=MAX_SECRET_LEN)?;
        let mut b = vec![0u8; n];
        u.fill_buffer(&mut b)?;
        Secret::new(b).ok()
    } else {
        None
    };
    let insecure = u.arbitrary()?;
    let tls_creds = if u.arbitrary()? {
        Some(format!("/etc/umem/tls-{}", u.int_in_range(0..=999u32)?))
    } else {
        None
    };
    Ok(PeerAuth {
        secret,
        insecure,
        tls_creds,
    })
}

fn stats(u: &mut Unstructured) -> Result<MigrationStats> {
    Ok(MigrationStats {
        phase: *u.choose(&[
            Phase::None,
            Phase::Setup,
            Phase::Precopy,
            Phase::Switchover,
            Phase::Postcopy,
            Phase::Completed,
            Phase::Failed,
            Phase::Cancelled,
            Phase::PostcopyPaused,
        ])?,
        rounds: u.arbitrary()?,
        total_pages: edgy_u64(u)?,
        pages_sent: u.arbitrary()?,
        zero_pages: u.arbitrary()?,
        holes_skipped: u.arbitrary()?,
        bytes_sent: u.arbitrary()?,
        remaining_pages: u.arbitrary()?,
        throughput_bps: u.arbitrary()?,
        dirty_rate_pps: u.arbitrary()?,
        expected_downtime_us: u.arbitrary()?,
        downtime_us: u.arbitrary()?,
        total_us: u.arbitrary()?,
        rejected_peers: u.arbitrary()?,
    })
}

fn postcopy_stats(u: &mut Unstructured) -> Result<PostcopyStats> {
    let mut latency_hist = [0u64; LATENCY_BUCKETS];
    for b in &mut latency_hist {
        *b = u.arbitrary()?;
    }
    let n = len(u, MAX_VCPUS)?;
    Ok(PostcopyStats {
        pages_requested: u.arbitrary()?,
        pages_urgent: u.arbitrary()?,
        pages_pushed: u.arbitrary()?,
        faults: u.arbitrary()?,
        remaining_pages: u.arbitrary()?,
        latency_hist,
        latency_p50_us: u.arbitrary()?,
        latency_p99_us: u.arbitrary()?,
        latency_max_us: u.arbitrary()?,
        vm_blocked_us: u.arbitrary()?,
        vcpu_blocked_us: (0..n).map(|_| u.arbitrary()).collect::<Result<_>>()?,
        recoveries: u.arbitrary()?,
        paused_us: u.arbitrary()?,
        stage_request_us: u.arbitrary()?,
        stage_fetch_us: u.arbitrary()?,
        stage_place_us: u.arbitrary()?,
    })
}

fn words(u: &mut Unstructured, max: usize) -> Result<Vec<u64>> {
    let n = len(u, max)?;
    (0..n).map(|_| u.arbitrary()).collect()
}

/// A peer message of any variant.
pub fn peer_message(u: &mut Unstructured) -> Result<PeerMessage> {
    let variant = u.int_in_range(0..=PEER_VARIANTS - 1)?;
    peer_message_of(u, variant)
}

/// A peer message of variant number `variant` (`0..PEER_VARIANTS`).
pub fn peer_message_of(u: &mut Unstructured, variant: u32) -> Result<PeerMessage> {
    Ok(match variant {
        0 => PeerMessage::Hello {
            version: u.arbitrary()?,
            capabilities: u.arbitrary()?,
            session_id: u.arbitrary()?,
            link_timeout_ms: edgy_u32(u)?,
        },
        1 => PeerMessage::Layout { blocks: blocks(u)? },
        2 => PeerMessage::LayoutAccepted,
        3 => PeerMessage::Pages(page_run(u)?),
        4 => PeerMessage::ZeroPages(page_run(u)?),
        5 => PeerMessage::RoundEnd {
            round: u.arbitrary()?,
        },
        6 => PeerMessage::Discard {
            block: u.int_in_range(0..=3)?,
            ranges: {
                let n = len(u, MAX_DISCARD_RANGES.min(512))?;
                (0..n)
                    .map(|_| Ok((edgy_u64(u)?, edgy_u32(u)?)))
                    .collect::<Result<_>>()?
            },
        },
        7 => PeerMessage::MachineState(bytes(u, 8192)?),
        8 => PeerMessage::AllSent,
        9 => PeerMessage::Started,
        10 => PeerMessage::PageRequest(page_run(u)?),
        11 => PeerMessage::AllReceived,
        12 => PeerMessage::Error(text(u, MAX_ERROR_LEN)?),
        13 => PeerMessage::Switchover {
            postcopy: u.arbitrary()?,
        },
        14 => PeerMessage::Holes {
            block: u.int_in_range(0..=3)?,
            first: edgy_u64(u)?,
            count: edgy_u64(u)?,
        },
        15 => PeerMessage::UrgentChannel {
            session_id: u.arbitrary()?,
        },
        16 => PeerMessage::Ready,
        17 => PeerMessage::Commit,
        18 => PeerMessage::Heartbeat,
        19 => PeerMessage::Resume {
            session_id: u.arbitrary()?,
        },
        20 => PeerMessage::Received {
            block: u.int_in_range(0..=3)?,
            first_page: edgy_u64(u)?,
            words: words(u, MAX_RECEIVED_WORDS)?,
        },
        21 => PeerMessage::ReceivedEnd,
        22 => PeerMessage::AuthHello {
            method: if u.arbitrary()? {
                AuthMethod::HmacSha256
            } else {
                AuthMethod::None
            },
            nonce: u.arbitrary()?,
        },
        23 => PeerMessage::AuthChallenge {
            nonce: u.arbitrary()?,
            proof: u.arbitrary()?,
        },
        24 => PeerMessage::AuthProof {
            proof: u.arbitrary()?,
        },
        25 => PeerMessage::Drain {
            round: u.arbitrary()?,
        },
        26 => PeerMessage::Drained {
            round: u.arbitrary()?,
        },
        _ => PeerMessage::Resumed,
    })
}

/// A local message of any variant.
pub fn local_message(u: &mut Unstructured) -> Result<LocalMessage> {
    let variant = u.int_in_range(0..=LOCAL_VARIANTS - 1)?;
    local_message_of(u, variant)
}

/// A local message of variant number `variant` (`0..LOCAL_VARIANTS`).
pub fn local_message_of(u: &mut Unstructured, variant: u32) -> Result<LocalMessage> {
    const MAX_STR: usize = u16::MAX as usize;
    Ok(match variant {
        0 => LocalMessage::Outgoing {
            vm: text(u, MAX_STR)?,
            uri: text(u, MAX_STR)?,
            params: params(u)?,
            blocks: local_blocks(u)?,
            auth: peer_auth(u)?,
        },
        1 => LocalMessage::Incoming {
            vm: text(u, MAX_STR)?,
            uri: text(u, MAX_STR)?,
            blocks: local_blocks(u)?,
            has_uffd: u.arbitrary()?,
            auth: peer_auth(u)?,
        },
        2 => LocalMessage::ResumeIncoming {
            vm: text(u, MAX_STR)?,
            uri: text(u, MAX_STR)?,
            blocks: local_blocks(u)?,
            session_id: u.arbitrary()?,
            auth: peer_auth(u)?,
        },
        3 => LocalMessage::ResumeOutgoing {
            vm: text(u, MAX_STR)?,
            uri: text(u, MAX_STR)?,
            params: params(u)?,
            blocks: local_blocks(u)?,
            session_id: u.arbitrary()?,
            auth: peer_auth(u)?,
        },
        4 => LocalMessage::Session(u.arbitrary()?),
        5 => LocalMessage::DirtyBitmap {
            block: u.int_in_range(0..=3)?,
            first_page: edgy_u64(u)?,
            words: words(u, MAX_BITMAP_WORDS)?,
        },
        6 => LocalMessage::BitmapEnd {
            stopped: u.arbitrary()?,
        },
        7 => LocalMessage::MachineState(bytes(u, 8192)?),
        8 => LocalMessage::StateLoaded,
        9 => LocalMessage::SetParams(params(u)?),
        10 => LocalMessage::Cancel,
        11 => LocalMessage::StartPostcopy,
        12 => LocalMessage::VcpuThreads({
            let n = len(u, MAX_VCPUS)?;
            (0..n).map(|_| u.arbitrary()).collect::<Result<_>>()?
        }),
        13 => LocalMessage::PostcopyBegin,
        14 => LocalMessage::PostcopyProgress(postcopy_stats(u)?),
        15 => LocalMessage::Committed,
        16 => LocalMessage::Run,
        17 => LocalMessage::Pause,
        18 => LocalMessage::Resume {
            uri: text(u, MAX_STR)?,
        },
        19 => LocalMessage::Recover {
            uri: text(u, MAX_STR)?,
        },
        20 => LocalMessage::PostcopyPaused {
            reason: text(u, MAX_STR)?,
        },
        21 => LocalMessage::Listening {
            uri: text(u, MAX_STR)?,
        },
        22 => LocalMessage::Harvest {
            stop: u.arbitrary()?,
        },
        23 => LocalMessage::Progress(stats(u)?),
        24 => LocalMessage::Completed(stats(u)?),
        _ => LocalMessage::Failed {
            message: text(u, MAX_STR)?,
            stats: stats(u)?,
        },
    })
}

/// Appends `m` as a frame; a `Pages` frame gets `data_len()` bytes of data after its header,
/// each page distinct (its number in the run and `tag`), so that misplaced data shows.
pub fn encode_peer(buf: &mut Vec<u8>, m: &PeerMessage, tag: u8) {
    m.encode(buf);
    match m {
        // A run over the limit keeps its header alone: its data would not fit a frame.
        PeerMessage::Pages(run) if run.count <= MAX_RUN_PAGES => append_page_data(buf, run, tag),
        _ => {}
    }
}

/// Appends the data of `run`: page `k` is filled with `tag + k` and starts with the page's
/// number in its block.
pub fn append_page_data(buf: &mut Vec<u8>, run: &PageRun, tag: u8) {
    let page = PAGE_SIZE as usize;
    for k in 0..run.count as usize {
        let start = buf.len();
        buf.resize(start + page, tag.wrapping_add(k as u8));
        let number = run.first.wrapping_add(k as u64).to_le_bytes();
        buf[start..start + 8].copy_from_slice(&number);
    }
}
