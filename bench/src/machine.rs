//! The machine alone, as a yardstick beside the migrations: the time to fill a fresh memfd of a
//! scenario's size with whole-page writes. Every page a destination places without
//! preallocation costs at least this (an allocation, its zeroing or charge, one copy), whoever
//! the engine; where the host backs guest memory lazily, it is also the figure that moves most
//! from one run to the next.

use std::os::unix::fs::FileExt;
use std::time::Instant;

use serde_json::json;

use crate::progress::Progress;
use crate::{Run, Scenario};

/// Bytes written by one `pwrite`.
const CHUNK: usize = 1 << 20;

/// Fills a memfd of `s.mem` and reports its rate as the scenario's throughput.
pub fn run(s: &Scenario) -> Result<Run, String> {
    let bytes = vmm::parse_size(s.mem)?;
    let file = memfd::MemfdOptions::default()
        .create("umem-bench-fill")
        .map_err(|e| format!("memfd: {e}"))?
        .into_file();
    file.set_len(bytes).map_err(|e| format!("ftruncate: {e}"))?;
    let buf = vec![0x5au8; CHUNK];
    let t = Instant::now();
    let mut off = 0;
    while off < bytes {
        let n = (bytes - off).min(CHUNK as u64) as usize;
        file.write_all_at(&buf[..n], off)
            .map_err(|e| format!("pwrite at {off:#x}: {e}"))?;
        off += n as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(Run {
        row: json!({
            "scenario": s.name,
            "engine": "machine",
            "mode": s.mode,
            "ram": s.mem,
            "bytes_sent": bytes,
            "total_ms": secs * 1e3,
            "throughput_gbps": bytes as f64 / secs / 1e9,
        }),
        progress: Progress::default(),
    })
}
