//! Plain data carried inside messages.

use serde::{Deserialize, Serialize};

use crate::wire::{DecodeError, Reader, Writer};

/// Size of a guest page: the unit pages travel in, and are counted in, whatever backs RAM.
pub const PAGE_SIZE: u64 = 4096;

/// Size of a huge page of guest RAM (`vmm --hugepages`, 2 MiB): the only huge page size umem
/// migrates. A destination assembles each one whole before it places it, so a larger one
/// would cost that much memory per page in flight.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Longest RAM block name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Most RAM blocks one VM may have.
pub const MAX_BLOCKS: usize = 64;

/// One named RAM block as both hosts see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDesc {
    /// Stable name ("ram-low", "ram-high"): blocks are matched by name, never by position.
    pub name: String,
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes, a multiple of [`PAGE_SIZE`].
    pub size: u64,
}

impl BlockDesc {
    /// Number of pages in the block.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    pub(crate) fn encode(&self, w: &mut Writer) {
        w.str(&self.name);
        w.u64(self.guest_addr);
        w.u64(self.size);
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let name = r.str("block name")?;
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(DecodeError::invalid(
                "block name",
                format!("length {} not in 1..={MAX_NAME_LEN}", name.len()),
            ));
        }
        let guest_addr = r.u64("block guest_addr")?;
        let size = r.u64("block size")?;
        if size == 0 || size % PAGE_SIZE != 0 || guest_addr % PAGE_SIZE != 0 {
            return Err(DecodeError::invalid(
                "block size",
                format!("block {name}: address {guest_addr:#x} and size {size:#x} must be non-zero page multiples"),
            ));
        }
        if guest_addr.checked_add(size).is_none() {
            return Err(DecodeError::invalid(
                "block size",
                "block wraps the address space",
            ));
        }
        Ok(BlockDesc {
            name: name.to_owned(),
            guest_addr,
            size,
        })
    }
}

pub(crate) fn encode_blocks(w: &mut Writer, blocks: &[BlockDesc]) {
    w.u32(blocks.len() as u32);
    for b in blocks {
        b.encode(w);
    }
}

pub(crate) fn decode_blocks(r: &mut Reader) -> Result<Vec<BlockDesc>, DecodeError> {
    let n = r.count("block count", 18)?;
    if n == 0 || n > MAX_BLOCKS {
        return Err(DecodeError::invalid(
            "block count",
            format!("{n} not in 1..={MAX_BLOCKS}"),
        ));
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(BlockDesc::decode(r)?);
    }
    Ok(v)
}

/// How a migration moves memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MigrationMode {
    /// Rounds of dirty pages while the guest runs, then a short stop for the rest.
    #[default]
    Precopy,
    /// Switch over at once; pages follow on demand and in the background.
    Postcopy,
    /// Precopy rounds, then postcopy.
    Hybrid,
}

impl MigrationMode {
    fn to_u8(self) -> u8 {
        match self {
            MigrationMode::Precopy => 0,
            MigrationMode::Postcopy => 1,
            MigrationMode::Hybrid => 2,
        }
    }

    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            0 => MigrationMode::Precopy,
            1 => MigrationMode::Postcopy,
            2 => MigrationMode::Hybrid,
            _ => return Err(DecodeError::invalid("mode", format!("unknown mode {v}"))),
        })
    }
}

/// What a precopy that runs past `precopy_timeout_ms` does (virsh's `--timeout-suspend` and
/// `--timeout-postcopy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutAction {
    /// Stop the guest and send the rest: a precopy switchover, whatever the downtime.
    #[default]
    Suspend,
    /// Switch to postcopy (when the destination can run it; else as `Suspend`).
    Postcopy,
}

impl TimeoutAction {
    fn to_u8(self) -> u8 {
        match self {
            TimeoutAction::Suspend => 0,
            TimeoutAction::Postcopy => 1,
        }
    }

    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            0 => TimeoutAction::Suspend,
            1 => TimeoutAction::Postcopy,
            _ => {
                return Err(DecodeError::invalid(
                    "precopy_timeout_action",
                    format!("unknown action {v}"),
                ))
            }
        })
    }
}

/// Tunables of one migration, settable before and during it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MigrationParams {
    /// Precopy, postcopy or hybrid.
    pub mode: MigrationMode,
    /// Background bandwidth limit in bytes per second; 0 means unlimited.
    pub bandwidth_limit: u64,
    /// Postcopy background bandwidth limit in bytes per second; 0 means `bandwidth_limit`
    /// applies in postcopy too.
    pub postcopy_bandwidth_limit: u64,
    /// Largest acceptable stop time in milliseconds; precopy switches over once the remaining
    /// dirty memory fits in it at the measured bandwidth.
    pub downtime_limit_ms: u32,
    /// Most precopy rounds before switching over regardless.
    pub max_rounds: u32,
    /// Hybrid: rounds of precopy before switching to postcopy.
    pub postcopy_after_rounds: u32,
    /// Postcopy: send only requested pages, no background push.
    pub no_background: bool,
    /// A peer silent for this long is dead: idle links carry heartbeats, and every wait on the
    /// other umemd ends after it. At least [`MIN_LINK_TIMEOUT_MS`].
    pub link_timeout_ms: u32,
    /// Longest precopy, in milliseconds from the start of the migration; 0 means none. Past
    /// it the migration does `precopy_timeout_action`.
    pub precopy_timeout_ms: u32,
    /// What a precopy past `precopy_timeout_ms` does.
    pub precopy_timeout_action: TimeoutAction,
    /// Longest migration, in seconds per GiB of guest RAM (in proportion: 512 MiB get half);
    /// 0 means none. Past it a precopy moves to postcopy when its mode is hybrid, else it is
    /// cancelled and the VM runs on here.
    pub completion_timeout_per_gib_s: u32,
}

/// The shortest `link_timeout_ms` honoured: heartbeats go out five times per timeout.
pub const MIN_LINK_TIMEOUT_MS: u32 = 200;
/// The longest `link_timeout_ms` a destination accepts from a source's `Hello`.
pub const MAX_LINK_TIMEOUT_MS: u32 = 600_000;

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            mode: MigrationMode::Precopy,
            bandwidth_limit: 0,
            downtime_limit_ms: 300,
            max_rounds: 30,
            postcopy_after_rounds: 2,
            no_background: false,
            link_timeout_ms: 5000,
            postcopy_bandwidth_limit: 0,
            precopy_timeout_ms: 0,
            precopy_timeout_action: TimeoutAction::Suspend,
            completion_timeout_per_gib_s: 0,
        }
    }
}

impl MigrationParams {
    pub(crate) fn encode(&self, w: &mut Writer) {
        w.u8(self.mode.to_u8());
        w.u64(self.bandwidth_limit);
        w.u32(self.downtime_limit_ms);
        w.u32(self.max_rounds);
        w.u32(self.postcopy_after_rounds);
        w.bool(self.no_background);
        w.u32(self.link_timeout_ms);
        w.u64(self.postcopy_bandwidth_limit);
        w.u32(self.precopy_timeout_ms);
        w.u8(self.precopy_timeout_action.to_u8());
        w.u32(self.completion_timeout_per_gib_s);
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(MigrationParams {
            mode: MigrationMode::from_u8(r.u8("mode")?)?,
            bandwidth_limit: r.u64("bandwidth_limit")?,
            downtime_limit_ms: r.u32("downtime_limit_ms")?,
            max_rounds: r.u32("max_rounds")?,
            postcopy_after_rounds: r.u32("postcopy_after_rounds")?,
            no_background: r.bool("no_background")?,
            link_timeout_ms: r.u32("link_timeout_ms")?,
            postcopy_bandwidth_limit: r.u64("postcopy_bandwidth_limit")?,
            precopy_timeout_ms: r.u32("precopy_timeout_ms")?,
            precopy_timeout_action: TimeoutAction::from_u8(r.u8("precopy_timeout_action")?)?,
            completion_timeout_per_gib_s: r.u32("completion_timeout_per_gib_s")?,
        })
    }
}

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// No migration has run.
    #[default]
    None,
    /// Connecting, handshake, layout check.
    Setup,
    /// Rounds of pages while the guest runs on the source.
    Precopy,
    /// Guest stopped on the source; the last pages and the machine state are moving.
    Switchover,
    /// Guest runs on the destination; missing pages are fetched on demand.
    Postcopy,
    /// Every page and the machine state arrived; the destination runs on its own.
    Completed,
    /// The migration failed. Before the switchover's commit the source guest keeps running;
    /// after it the source stays stopped (the destination may run it).
    Failed,
    /// Cancelled by request; the source guest keeps running.
    Cancelled,
    /// Postcopy lost its link: the destination VM runs on the pages it has (a vCPU that needs
    /// a missing one waits), the source keeps every page, and both wait for a new connection.
    PostcopyPaused,
}

impl Phase {
    /// A migration in this phase is still under way.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Phase::Setup
                | Phase::Precopy
                | Phase::Switchover
                | Phase::Postcopy
                | Phase::PostcopyPaused
        )
    }

    fn to_u8(self) -> u8 {
        self as u8
    }

    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        const ALL: [Phase; 9] = [
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
        ALL.get(v as usize)
            .copied()
            .ok_or_else(|| DecodeError::invalid("phase", format!("unknown phase {v}")))
    }
}

/// Counters of one migration; fresh for every migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MigrationStats {
    /// Current phase.
    pub phase: Phase,
    /// Precopy rounds done.
    pub rounds: u32,
    /// Pages of RAM in the VM.
    pub total_pages: u64,
    /// Pages sent with their contents.
    pub pages_sent: u64,
    /// Pages sent as a zero record.
    pub zero_pages: u64,
    /// Pages skipped because they were holes in the memfd (never touched).
    pub holes_skipped: u64,
    /// Bytes written to the migration stream.
    pub bytes_sent: u64,
    /// Pages still to send (dirty or not yet sent).
    pub remaining_pages: u64,
    /// Last measured throughput, bytes per second.
    pub throughput_bps: u64,
    /// Last measured dirty rate, pages per second.
    pub dirty_rate_pps: u64,
    /// Downtime expected for the remaining pages, microseconds.
    pub expected_downtime_us: u64,
    /// Measured downtime (source stop to destination ready), microseconds.
    pub downtime_us: u64,
    /// Time since the migration started, microseconds.
    pub total_us: u64,
    /// Destination: connections dropped before they proved to be this migration's source
    /// (failed authentication, garbage, another session's connection).
    pub rejected_peers: u64,
}

impl MigrationStats {
    pub(crate) fn encode(&self, w: &mut Writer) {
        w.u8(self.phase.to_u8());
        w.u32(self.rounds);
        for v in [
            self.total_pages,
            self.pages_sent,
            self.zero_pages,
            self.holes_skipped,
            self.bytes_sent,
            self.remaining_pages,
            self.throughput_bps,
            self.dirty_rate_pps,
            self.expected_downtime_us,
            self.downtime_us,
            self.total_us,
            self.rejected_peers,
        ] {
            w.u64(v);
        }
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(MigrationStats {
            phase: Phase::from_u8(r.u8("phase")?)?,
            rounds: r.u32("rounds")?,
            total_pages: r.u64("total_pages")?,
            pages_sent: r.u64("pages_sent")?,
            zero_pages: r.u64("zero_pages")?,
            holes_skipped: r.u64("holes_skipped")?,
            bytes_sent: r.u64("bytes_sent")?,
            remaining_pages: r.u64("remaining_pages")?,
            throughput_bps: r.u64("throughput_bps")?,
            dirty_rate_pps: r.u64("dirty_rate_pps")?,
            expected_downtime_us: r.u64("expected_downtime_us")?,
            downtime_us: r.u64("downtime_us")?,
            total_us: r.u64("total_us")?,
            rejected_peers: r.u64("rejected_peers")?,
        })
    }
}

/// Buckets of the fault-service latency histogram: bucket `i` counts latencies in
/// `[2^i, 2^(i+1))` microseconds (bucket 0 also holds 0), the last one everything above.
pub const LATENCY_BUCKETS: usize = 24;

/// Most vCPUs whose blocked time is reported.
pub const MAX_VCPUS: usize = 256;

/// Counters of the postcopy phase of one migration; fresh for every migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PostcopyStats {
    /// Pages requested on demand (destination: requests sent; source: requests served).
    pub pages_requested: u64,
    /// Pages that arrived or left on the urgent channel.
    pub pages_urgent: u64,
    /// Pages pushed in the background.
    pub pages_pushed: u64,
    /// Faults read from the userfaultfd.
    pub faults: u64,
    /// Pages not yet present (destination) or not yet sent (source).
    pub remaining_pages: u64,
    /// Fault-service latency histogram, see [`LATENCY_BUCKETS`].
    pub latency_hist: [u64; LATENCY_BUCKETS],
    /// Median fault-service latency, microseconds.
    pub latency_p50_us: u64,
    /// 99th percentile fault-service latency, microseconds.
    pub latency_p99_us: u64,
    /// Longest fault-service latency, microseconds.
    pub latency_max_us: u64,
    /// Time during which every vCPU waited for a page, microseconds.
    pub vm_blocked_us: u64,
    /// Time each vCPU waited for pages, microseconds, by vCPU index.
    pub vcpu_blocked_us: Vec<u64>,
    /// Times the migration resumed on a new connection after losing its link.
    pub recoveries: u64,
    /// Time spent in `postcopy-paused`, microseconds.
    pub paused_us: u64,
    /// Of the requested pages that came on the urgent channel, `[p50, p99]` in microseconds of
    /// the time from the fault read to the request handed to the socket (destination).
    pub stage_request_us: [u64; 2],
    /// The same, from the request handed to the socket to the page read off the urgent
    /// channel: the network and the source.
    pub stage_fetch_us: [u64; 2],
    /// The same, from the page read to the page placed and its fault woken.
    pub stage_place_us: [u64; 2],
}

impl PostcopyStats {
    pub(crate) fn encode(&self, w: &mut Writer) {
        for v in [
            self.pages_requested,
            self.pages_urgent,
            self.pages_pushed,
            self.faults,
            self.remaining_pages,
        ] {
            w.u64(v);
        }
        for v in self.latency_hist {
            w.u64(v);
        }
        for v in [
            self.latency_p50_us,
            self.latency_p99_us,
            self.latency_max_us,
            self.vm_blocked_us,
        ] {
            w.u64(v);
        }
        w.u32(self.vcpu_blocked_us.len() as u32);
        for v in &self.vcpu_blocked_us {
            w.u64(*v);
        }
        w.u64(self.recoveries);
        w.u64(self.paused_us);
        for v in [
            self.stage_request_us,
            self.stage_fetch_us,
            self.stage_place_us,
        ]
        .iter()
        .flatten()
        {
            w.u64(*v);
        }
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut s = PostcopyStats {
            pages_requested: r.u64("pages_requested")?,
            pages_urgent: r.u64("pages_urgent")?,
            pages_pushed: r.u64("pages_pushed")?,
            faults: r.u64("faults")?,
            remaining_pages: r.u64("remaining_pages")?,
            ..Default::default()
        };
        for b in s.latency_hist.iter_mut() {
            *b = r.u64("latency_hist")?;
        }
        s.latency_p50_us = r.u64("latency_p50_us")?;
        s.latency_p99_us = r.u64("latency_p99_us")?;
        s.latency_max_us = r.u64("latency_max_us")?;
        s.vm_blocked_us = r.u64("vm_blocked_us")?;
        let n = r.count("vcpu count", 8)?;
        if n > MAX_VCPUS {
            return Err(DecodeError::invalid(
                "vcpu count",
                format!("{n} exceeds {MAX_VCPUS}"),
            ));
        }
        s.vcpu_blocked_us = (0..n)
            .map(|_| r.u64("vcpu_blocked_us"))
            .collect::<Result<_, _>>()?;
        s.recoveries = r.u64("recoveries")?;
        s.paused_us = r.u64("paused_us")?;
        for (v, what) in [
            (&mut s.stage_request_us, "stage_request_us"),
            (&mut s.stage_fetch_us, "stage_fetch_us"),
            (&mut s.stage_place_us, "stage_place_us"),
        ] {
            *v = [r.u64(what)?, r.u64(what)?];
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(p: &MigrationParams) -> Vec<u8> {
        let mut buf = Vec::new();
        p.encode(&mut Writer::new(&mut buf));
        buf
    }

    #[test]
    fn params_round_trip_with_their_time_limits() {
        let p = MigrationParams {
            postcopy_bandwidth_limit: 8 << 20,
            precopy_timeout_ms: 3000,
            precopy_timeout_action: TimeoutAction::Postcopy,
            completion_timeout_per_gib_s: 150,
            ..Default::default()
        };
        let buf = encoded(&p);
        let mut r = Reader::new(&buf);
        assert_eq!(MigrationParams::decode(&mut r).unwrap(), p);
        r.finish().unwrap();
    }

    #[test]
    fn an_unknown_timeout_action_is_refused_by_name() {
        let mut buf = encoded(&MigrationParams::default());
        // The action is the byte before the last field (a u32).
        let at = buf.len() - 5;
        buf[at] = 2;
        let e = MigrationParams::decode(&mut Reader::new(&buf)).unwrap_err();
        assert!(e.to_string().contains("precopy_timeout_action"), "{e}");
    }
}
