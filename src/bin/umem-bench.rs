//! `umem-bench`: runs migrations of the built-in guests on loopback, one after another in the
//! same run, and prints their figures side by side: precopy against postcopy against hybrid on
//! the same guest, dense (prefilled) against sparse RAM.
//!
//! ```text
//! cargo run --release --bin umem-bench              # every scenario
//! cargo run --release --bin umem-bench -- postcopy  # scenarios whose name contains "postcopy"
//! ```
//!
//! Each scenario prints one JSON line on stdout; a table follows at the end. Guests use one
//! vCPU: the guest CPU is emulated here, and every busy vCPU takes a core away from umemd.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use umem::{require_kvm, secs, TestEnv};

/// One migration to measure.
struct Scenario {
    name: &'static str,
    mode: &'static str,
    mem: &'static str,
    prefill: bool,
    /// memtouch parameters; a guest with `passes` set is idle (halted) when migrated.
    cmdline: &'static str,
    /// Wait for this serial line before migrating.
    ready: &'static str,
    extra: Value,
}

const SCENARIOS: &[fn() -> Scenario] = &[
    || Scenario {
        name: "precopy-1g-prefilled-idle",
        mode: "precopy",
        mem: "1G",
        prefill: true,
        cmdline: "pages=4096 passes=1",
        ready: "memtouch done",
        extra: json!({"downtime_limit_ms": 50}),
    },
    || Scenario {
        name: "precopy-4g-sparse-idle",
        mode: "precopy",
        mem: "4G",
        prefill: false,
        cmdline: "pages=4096 passes=1",
        ready: "memtouch done",
        extra: json!({"downtime_limit_ms": 50}),
    },
    || Scenario {
        name: "postcopy-1g-prefilled-random-touch",
        mode: "postcopy",
        mem: "1G",
        prefill: true,
        cmdline: "pages=65536 random=1",
        ready: "memtouch base",
        extra: json!({}),
    },
    || Scenario {
        name: "postcopy-4g-prefilled-random-touch",
        mode: "postcopy",
        mem: "4G",
        prefill: true,
        cmdline: "pages=65536 random=1",
        ready: "memtouch base",
        extra: json!({}),
    },
    || Scenario {
        name: "postcopy-4g-sparse-idle",
        mode: "postcopy",
        mem: "4G",
        prefill: false,
        cmdline: "pages=4096 passes=1",
        ready: "memtouch done",
        extra: json!({}),
    },
    || Scenario {
        name: "postcopy-1g-prefilled-random-touch-no-background",
        mode: "postcopy",
        mem: "1G",
        prefill: true,
        cmdline: "pages=65536 random=1",
        ready: "memtouch base",
        extra: json!({"no_background": true, "stop_after_s": 5}),
    },
    || Scenario {
        name: "hybrid-1g-prefilled-random-touch",
        mode: "hybrid",
        mem: "1G",
        prefill: true,
        cmdline: "pages=65536 random=1",
        ready: "memtouch base",
        extra: json!({"downtime_limit_ms": 5}),
    },
];

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn run(s: &Scenario) -> Value {
    let t = TestEnv::new(&format!("bench-{}", s.name));
    let su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    let mut b = t
        .vmm("src", &su)
        .mem(s.mem)
        .vcpus(1)
        .guest("memtouch")
        .cmdline(s.cmdline);
    if s.prefill {
        b = b.prefill(1);
    }
    let mut src = b.start();
    let mut dst = t.vmm("dst", &du).mem(s.mem).vcpus(1).incoming_any().start();
    src.wait_serial_prefix(secs(120), s.ready);
    let uri = dst.listen_uri();
    let mut params = s.extra.clone();
    let stop_after = params
        .as_object_mut()
        .and_then(|o| o.remove("stop_after_s"))
        .and_then(|v| v.as_u64());
    params["mode"] = json!(s.mode);
    let t0 = Instant::now();
    src.migrate(&uri, params).expect("migrate");
    let (outcome, wall) = match stop_after {
        // No background: it completes only once every page was touched; measure the fault
        // path for a while instead.
        Some(n) => {
            std::thread::sleep(Duration::from_secs(n));
            let v = dst.query_migrate();
            (v, t0.elapsed())
        }
        None => {
            let o = dst.wait_migration(secs(600));
            let wall = t0.elapsed();
            assert_eq!(o.phase, "completed", "{}: {}", s.name, o.raw);
            let so = src.wait_migration(secs(60));
            assert_eq!(so.phase, "completed", "{}: {}", s.name, so.raw);
            let mut v = o.raw.clone();
            v["source"] = so.raw;
            (v, wall)
        }
    };
    let src_stats = outcome["source"]["stats"].clone();
    let st = if src_stats.is_null() {
        src.query_migrate()["stats"].clone()
    } else {
        src_stats
    };
    let pc = &outcome["postcopy"];
    let bytes = st["bytes_sent"].as_u64().unwrap_or(0);
    let total_us = st["total_us"].as_u64().unwrap_or(0).max(1);
    let downtime_us = st["downtime_us"].as_u64().unwrap_or(0);
    let bad = dst
        .passes()
        .iter()
        .chain(src.passes().iter())
        .map(|p| p.bad)
        .sum::<u64>();
    json!({
        "scenario": s.name,
        "mode": s.mode,
        "ram": s.mem,
        "bytes_sent": bytes,
        "pages_sent": st["pages_sent"],
        "zero_pages": st["zero_pages"],
        "holes": st["holes_skipped"],
        "rounds": st["rounds"],
        "total_ms": ms(total_us),
        "wall_ms": wall.as_millis() as u64,
        "downtime_ms": ms(downtime_us),
        "throughput_gbps": bytes as f64 / total_us as f64 / 1000.0,
        "faults": pc["faults"],
        "fault_p50_us": pc["latency_p50_us"],
        "fault_p99_us": pc["latency_p99_us"],
        "fault_max_us": pc["latency_max_us"],
        "pages_requested": pc["pages_requested"],
        "pages_urgent": pc["pages_urgent"],
        "vcpu_blocked_ms": pc["vcpu_blocked_us"].as_array().map(|a| a.iter().map(|v| ms(v.as_u64().unwrap_or(0))).collect::<Vec<_>>()),
        "guest_bad_pages": bad,
    })
}

fn main() {
    if !require_kvm("umem-bench") {
        return;
    }
    let filter: Vec<String> = std::env::args().skip(1).collect();
    let mut rows = Vec::new();
    for make in SCENARIOS {
        let s = make();
        if !filter.is_empty() && !filter.iter().any(|f| s.name.contains(f.as_str())) {
            continue;
        }
        eprintln!("umem-bench: {} ...", s.name);
        let r = run(&s);
        println!("{r}");
        rows.push(r);
    }
    let f = |v: &Value, k: &str| match &v[k] {
        Value::Number(n) => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    println!();
    println!(
        "{:<50} {:>9} {:>10} {:>9} {:>8} {:>8} {:>9} {:>9} {:>4}",
        "scenario", "GB/s", "total ms", "down ms", "faults", "p50 us", "p99 us", "max us", "bad"
    );
    for r in &rows {
        println!(
            "{:<50} {:>9} {:>10} {:>9} {:>8} {:>8} {:>9} {:>9} {:>4}",
            r["scenario"].as_str().unwrap_or(""),
            f(r, "throughput_gbps"),
            f(r, "total_ms"),
            f(r, "downtime_ms"),
            f(r, "faults"),
            f(r, "fault_p50_us"),
            f(r, "fault_p99_us"),
            f(r, "fault_max_us"),
            f(r, "guest_bad_pages"),
        );
    }
}
