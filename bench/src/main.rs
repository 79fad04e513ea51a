//! `umem-bench`: runs migrations of the built-in guests on loopback, one after another in the
//! same run, and prints their figures side by side: precopy against postcopy against hybrid on
//! the same guest, dense (prefilled) against sparse RAM.
//!
//! ```text
//! cargo run --release --bin umem-bench              # every scenario
//! cargo run --release --bin umem-bench -- postcopy  # scenarios whose name contains "postcopy"
//! cargo run --release --bin umem-bench -- --plot charts guest  # and SVG charts into charts/
//! cargo run --release --bin umem-bench -- --runs 3 guest  # medians of 3 runs in a row
//! ```
//!
//! The `*-tls` scenarios run every connection over TLS 1.3 (certificates made for the run),
//! next to the same scenario in plain TCP.
//!
//! The `qemu-*` scenarios are the baseline: QEMU's own migration of the same guest (the ELF
//! `vmm --export-guest` writes), in the same run, next to the umem scenario of the same name
//! without the prefix (see `qemu.rs`). Without `qemu-system-x86_64` (or `UMEM_BENCH_QEMU`) they
//! print as skipped.
//!
//! The `machine-*` rows migrate nothing: they time the machine filling a fresh memfd of the
//! size of the scenarios below them, the floor under any destination's placing of pages.
//!
//! Each scenario prints one JSON line on stdout; a table follows at the end. Guests use one
//! vCPU: the guest CPU is emulated here, and every busy vCPU takes a core away from umemd.
//! While a migration runs the source's byte counter is sampled; `--plot DIR` draws those
//! samples and the fault latencies as SVG charts (see `charts.rs`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use umem_testkit::{require_kvm, secs, ControlConnection, TestEnv, Vmm};

mod charts;
mod floor;
mod latency;
mod machine;
mod medians;
mod progress;
mod qemu;

use progress::Progress;

/// Migrations of the built-in guests on loopback: umem's modes side by side and against QEMU.
#[derive(Parser)]
#[command(name = "umem-bench", version)]
struct Args {
    /// Write SVG charts of the run into this directory: fault-service latency and
    /// throughput over time
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Run the selection this many times in a row, then print each scenario's median over the
    /// runs and the spread of its main figures (the charts show the last run)
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Run only the scenarios whose name contains one of these (all when none is given); one
    /// that ends in `$` must match a whole name
    filters: Vec<String>,
}

/// One scenario's outcome: its result row and the source's progress while it ran.
pub struct Run {
    pub row: Value,
    pub progress: Progress,
}

impl Run {
    pub fn name(&self) -> &str {
        self.row["scenario"].as_str().unwrap_or_default()
    }
}

/// Who migrates the VM.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Engine {
    /// `vmm` and two umemds.
    Umem,
    /// Two `qemu-system-x86_64` processes, for comparison (see `qemu.rs`).
    Qemu,
    /// No VM: the machine filling a fresh memfd of the scenario's size (see `machine.rs`).
    Machine,
}

/// What the source VMM writes into guest RAM before the guest starts.
#[derive(Clone, Copy)]
enum Prefill {
    /// Nothing: RAM is one hole but for what the guest itself writes (sparse).
    None,
    /// Every page (dense).
    All,
    /// The lowest SIZE (`--prefill-size`), the rest left a hole.
    First(&'static str),
}

/// One migration to measure.
pub struct Scenario {
    engine: Engine,
    name: &'static str,
    mode: &'static str,
    mem: &'static str,
    prefill: Prefill,
    /// memtouch parameters; a guest with `passes` set is idle (halted) when migrated.
    cmdline: &'static str,
    /// Wait for this serial line before migrating.
    ready: &'static str,
    extra: Value,
}

impl Scenario {
    /// Guest RAM on 2 MiB huge pages on both sides.
    pub fn hugepages(&self) -> bool {
        self.extra["hugepages"] == json!(true)
    }

    /// 2 MiB huge pages both sides need, with some to spare.
    fn huge_pages_needed(&self) -> u64 {
        let mib: u64 = match self.mem {
            "1G" => 1024,
            "4G" => 4096,
            m => m.trim_end_matches('M').parse().unwrap_or(1024),
        };
        2 * mib / 2 + 8
    }
}

/// A row of the machine alone (`machine.rs`): no VM, no umemd.
fn machine(name: &'static str, mode: &'static str, mem: &'static str) -> Scenario {
    Scenario {
        engine: Engine::Machine,
        name,
        mode,
        mem,
        prefill: Prefill::None,
        cmdline: "",
        ready: "",
        extra: json!({}),
    }
}

const SCENARIOS: &[fn() -> Scenario] = &[
    // The machine's own cost of fresh guest RAM, the floor under every destination here.
    || machine("machine-fill-1g", "fill", "1G"),
    || machine("machine-fill-4g", "fill", "4G"),
    // How the destination places pages, without VM or network: UFFDIO_COPY into fresh memory
    // (what umemd does) against MINOR mode over a memfd preallocated beforehand.
    || machine("machine-place-copy-1g", "place-copy", "1G"),
    || machine("machine-place-minor-1g", "place-minor", "1G"),
    || machine("machine-receive-copy-1g", "receive-copy", "1G"),
    || machine("machine-receive-splice-1g", "receive-splice", "1G"),
    || {
        machine(
            "machine-receive-splice-minor-1g",
            "receive-splice-minor",
            "1G",
        )
    },
    // The floor under a requested page on this machine: a userfaultfd fault served from a
    // buffer, over loopback TCP, and over loopback TCP while a push runs (`floor.rs`).
    || machine("machine-fault-local-1g", "fault-local", "1G"),
    || machine("machine-fault-loopback-1g", "fault-loopback", "1G"),
    || Scenario {
        extra: json!({"hugepages": true}),
        ..machine(
            "machine-fault-loopback-hugepages-1g",
            "fault-loopback",
            "1G",
        )
    },
    || {
        machine(
            "machine-fault-loopback-push-1g",
            "fault-loopback-push",
            "1G",
        )
    },
    // The same push at the fault path's priority: what the push's nice value buys.
    || {
        machine(
            "machine-fault-loopback-push-unniced-1g",
            "fault-loopback-push-unniced",
            "1G",
        )
    },
    || machine("machine-place-copy-4g", "place-copy", "4G"),
    || machine("machine-place-minor-4g", "place-minor", "4G"),
    || Scenario {
        engine: Engine::Umem,
        name: "precopy-1g-prefilled-idle",
        mode: "precopy",
        mem: "1G",
        prefill: Prefill::All,
        cmdline: "pages=4096 passes=1",
        ready: "memtouch done",
        extra: json!({"downtime_limit_ms": 50}),
    },
    || Scenario {
        engine: Engine::Umem,
        name: "precopy-1g-prefilled-idle-hugepages",
        mode: "precopy",
        mem: "1G",
        prefill: Prefill::All,
        cmdline: "pages=4096 passes=1",
        ready: "memtouch done",
        extra: json!({"downtime_limit_ms": 50, "hugepages": true}),
    },
    || Scenario {
        engine: Engine::Umem,
        name: "precopy-1g-prefilled-idle-tls",
        mode: "precopy",
        mem: "1G",
        prefill: Prefill::All,
        cmdline: "pages=4096 passes=1",
        ready: "memtouch done",
        extra: json!({"downtime_limit_ms": 50, "tls": true}),
    },
    || Scenario {
        engine: Engine::Umem,
        name: "precopy-4g-sparse-idle",
        mode: "precopy",
        mem: "4G",
        prefill: Prefill::None,
        cmdline: "pages=4096 passes=1",
        ready: "memtouch done",
        extra: json!({"downtime_limit_ms": 50}),
    },
    // The data path alone: the guest is halted, so umemd has both cores.
    || Scenario {
        engine: Engine::Umem,
        name: "postcopy-1g-prefilled-idle",
        mode: "postcopy",
        mem: "1G",
        prefill: Prefill::All,
        cmdline: "pages=4096 passes=1",
        ready: "memtouch done",
        extra: json!({}),
    },
    || Scenario {
        engine: Engine::Umem,
        name: "postcopy-1g-prefilled-idle-hugepages",
        mode: "postcopy",
        mem: "1G",
        prefill: Prefill::All,
        cmdline: "pages=4096 passes=1",
        ready: "memtouch done",
        extra: json!({"hugepages": true}),
    },
    || Scenario {
        engine: Engine::Umem,
        name: "postcopy-1g-prefilled-idle-tls",
        mode: "postcopy",
        mem: "1G",
        prefill: Prefill::All,
        cmdline: "pages=4096 passes=1",
        ready: "memtouch done",
        extra: json!({"tls": true}),
    },
    || Scenario {
        engine: Engine::Umem,
        name: "postcopy-1g-prefilled-random-touch",
        mode: "postcopy",
        mem: "1G",
        prefill: Prefill::All,
        cmdline: "pages=65536 random=1",
        ready: "memtouch base",
        extra: json!({}),
    },
    || Scenario {
        engine: Engine::Umem,
        name: "postcopy-1g-prefilled-random-touch-hugepages",
        mode: "postcopy",
        mem: "1G",
        prefill: Prefill::All,
        cmdline: "pages=65536 random=1",
        ready: "memtouch base",
        extra: json!({"hugepages": true}),
    },
    || Scenario {
        engine: Engine::Umem,
        name: "postcopy-1g-prefilled-random-touch-tls",
        mode: "postcopy",
        mem: "1G",
        prefill: Prefill::All,
        cmdline: "pages=65536 random=1",
        ready: "memtouch base",
        extra: json!({"tls": true}),
    },
    || Scenario {
        engine: Engine::Umem,
        name: "postcopy-4g-prefilled-random-touch",
        mode: "postcopy",
        mem: "4G",
        prefill: Prefill::All,
        cmdline: "pages=65536 random=1",
        ready: "memtouch base",
        extra: json!({}),
    },
    || Scenario {
        engine: Engine::Umem,
        name: "postcopy-4g-prefilled-random-touch-hugepages",
        mode: "postcopy",
        mem: "4G",
        prefill: Prefill::All,
        cmdline: "pages=65536 random=1",
        ready: "memtouch base",
        extra: json!({"hugepages": true}),
    },
    || Scenario {
        engine: Engine::Umem,
        name: "postcopy-4g-sparse-idle",
        mode: "postcopy",
        mem: "4G",
        prefill: Prefill::None,
        cmdline: "pages=4096 passes=1",
        ready: "memtouch done",
        extra: json!({}),
    },
    // 64 GiB of RAM of which the lowest 1 GiB is populated: should cost about what 1 GiB
    // dense does (postcopy-1g-prefilled-idle).
    || Scenario {
        engine: Engine::Umem,
        name: "postcopy-64g-1g-populated-idle",
        mode: "postcopy",
        mem: "64G",
        prefill: Prefill::First("1G"),
        cmdline: "pages=4096 passes=1",
        ready: "memtouch done",
        extra: json!({}),
    },
    || Scenario {
        engine: Engine::Umem,
        name: "postcopy-1g-prefilled-random-touch-no-background",
        mode: "postcopy",
        mem: "1G",
        prefill: Prefill::All,
        cmdline: "pages=65536 random=1",
        ready: "memtouch base",
        extra: json!({"no_background": true, "stop_after_s": 5}),
    },
    || Scenario {
        engine: Engine::Umem,
        name: "postcopy-1g-random-touch-no-background-hugepages",
        mode: "postcopy",
        mem: "1G",
        prefill: Prefill::All,
        cmdline: "pages=65536 random=1",
        ready: "memtouch base",
        extra: json!({"no_background": true, "stop_after_s": 5, "hugepages": true}),
    },
    || Scenario {
        engine: Engine::Umem,
        name: "hybrid-1g-prefilled-random-touch",
        mode: "hybrid",
        mem: "1G",
        prefill: Prefill::All,
        cmdline: "pages=65536 random=1",
        ready: "memtouch base",
        extra: json!({"downtime_limit_ms": 5}),
    },
    // The same guest for umem and QEMU: QEMU cannot prefill RAM, so the guest itself writes
    // every page from 16 MiB to the end of its 1 GiB (one pass, then it halts), and the
    // migration starts once it is done.
    || Scenario {
        engine: Engine::Umem,
        name: "postcopy-1g-guest-written",
        mode: "postcopy",
        mem: "1G",
        prefill: Prefill::None,
        cmdline: GUEST_WRITTEN_1G,
        ready: "memtouch done",
        extra: json!({}),
    },
    || Scenario {
        engine: Engine::Qemu,
        name: "qemu-postcopy-1g-guest-written",
        mode: "postcopy",
        mem: "1G",
        prefill: Prefill::None,
        cmdline: GUEST_WRITTEN_1G,
        ready: "memtouch done",
        extra: json!({}),
    },
    // The guest writes 256 MiB of its 1 GiB, then touches them in random order without end:
    // after a postcopy switchover it faults on pages not yet there, under umem and QEMU alike.
    || Scenario {
        engine: Engine::Umem,
        name: "postcopy-1g-guest-random-touch",
        mode: "postcopy",
        mem: "1G",
        prefill: Prefill::None,
        cmdline: "pages=65536 random=1",
        ready: "pass=1 ",
        extra: json!({}),
    },
    || Scenario {
        engine: Engine::Qemu,
        name: "qemu-postcopy-1g-guest-random-touch",
        mode: "postcopy",
        mem: "1G",
        prefill: Prefill::None,
        cmdline: "pages=65536 random=1",
        ready: "pass=1 ",
        extra: json!({}),
    },
    // The busy-guest twin on 2 MiB huge pages, both engines.
    || Scenario {
        engine: Engine::Umem,
        name: "postcopy-1g-guest-random-touch-hugepages",
        mode: "postcopy",
        mem: "1G",
        prefill: Prefill::None,
        cmdline: "pages=65536 random=1",
        ready: "pass=1 ",
        extra: json!({"hugepages": true}),
    },
    || Scenario {
        engine: Engine::Qemu,
        name: "qemu-postcopy-1g-guest-random-touch-hugepages",
        mode: "postcopy",
        mem: "1G",
        prefill: Prefill::None,
        cmdline: "pages=65536 random=1",
        ready: "pass=1 ",
        extra: json!({"hugepages": true}),
    },
    || Scenario {
        engine: Engine::Umem,
        name: "precopy-1g-guest-written",
        mode: "precopy",
        mem: "1G",
        prefill: Prefill::None,
        cmdline: GUEST_WRITTEN_1G,
        ready: "memtouch done",
        extra: json!({"downtime_limit_ms": 50}),
    },
    || Scenario {
        engine: Engine::Qemu,
        name: "qemu-precopy-1g-guest-written",
        mode: "precopy",
        mem: "1G",
        prefill: Prefill::None,
        cmdline: GUEST_WRITTEN_1G,
        ready: "memtouch done",
        extra: json!({"downtime_limit_ms": 50}),
    },
];

/// memtouch writing every page of a 1 GiB VM above its 16 MiB base (258048 pages), once.
const GUEST_WRITTEN_1G: &str = "pages=258048 passes=1";

/// CPU milliseconds per GiB sent, of the source's and the destination's migration processes.
pub fn cpu_per_gib(cpu: [Duration; 2], bytes: u64) -> Value {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib == 0.0 {
        return Value::Null;
    }
    json!(cpu.map(|c| (c.as_secs_f64() * 1000.0 / gib).round() as u64))
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Reads the source's byte counter, with umemd's own timestamp of it (umemd reports both
/// every 200 ms, so most readings repeat the last one and are dropped).
fn sample(src: &mut ControlConnection, progress: &mut Progress) {
    let st = &src.query_migrate()["stats"];
    if let (Some(us), Some(bytes)) = (st["total_us"].as_u64(), st["bytes_sent"].as_u64()) {
        progress.record(Duration::from_micros(us), bytes);
    }
}

fn run(s: &Scenario) -> Run {
    let t = TestEnv::new(&format!("bench-{}", s.name));
    let su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    let mut b = t
        .vmm("src", &su)
        .mem(s.mem)
        .vcpus(1)
        .guest("memtouch")
        .cmdline(s.cmdline)
        .hugepages(s.hugepages());
    match s.prefill {
        Prefill::None => {}
        Prefill::All => b = b.prefill(1),
        Prefill::First(size) => b = b.prefill(1).prefill_size(size),
    }
    let mut src = b.start();
    let mut params = s.extra.clone();
    let stop_after = params
        .as_object_mut()
        .and_then(|o| o.remove("stop_after_s"))
        .and_then(|v| v.as_u64());
    params.as_object_mut().map(|o| o.remove("hugepages"));
    // TLS on every connection, with certificates made for this run.
    let tls = params
        .as_object_mut()
        .and_then(|o| o.remove("tls"))
        .is_some_and(|v| v == json!(true))
        .then(|| umem_testkit::tls::make_creds(&t.dir().join("tls"), &["127.0.0.1"]));
    let mut d = t
        .vmm("dst", &du)
        .mem(s.mem)
        .vcpus(1)
        .incoming_any()
        .hugepages(s.hugepages());
    if let Some(dir) = &tls {
        d = d.arg("--incoming-tls-creds").arg(dir);
        params["tls_creds"] = json!(dir.to_str().expect("a UTF-8 path"));
    }
    let mut dst = d.start();
    src.wait_serial_prefix(secs(120), s.ready);
    let uri = dst.listen_uri();
    params["mode"] = json!(s.mode);
    let mut progress = Progress::new();
    let cpu0 = [su.proc.cpu_time(None), du.proc.cpu_time(None)];
    let t0 = Instant::now();
    src.migrate(&uri, params).expect("migrate");
    // Polled on connections kept open, as QEMU's QMP is: a connection per request costs the
    // VMM a thread each, 400 a second, on the cores the migration uses.
    let connect = |vmm: &Vmm| {
        vmm.control_connection()
            .unwrap_or_else(|e| panic!("{}: control socket: {e}", vmm.name))
    };
    let (mut src_ctl, mut dst_ctl) = (connect(&src), connect(&dst));
    let (outcome, wall) = match stop_after {
        // No background: it completes only once every page was touched; measure the fault
        // path for a while instead.
        Some(n) => {
            while t0.elapsed() < Duration::from_secs(n) {
                sample(&mut src_ctl, &mut progress);
                std::thread::sleep(Duration::from_millis(5));
            }
            sample(&mut src_ctl, &mut progress);
            let v = dst_ctl.query_migrate();
            (v, t0.elapsed())
        }
        None => {
            // Polled every 5 ms (not the harness's 50 ms), as the QEMU runs are.
            let v = umem_testkit::poll_every(secs(600), Duration::from_millis(5), || {
                dst.proc.assert_alive();
                sample(&mut src_ctl, &mut progress);
                let v = dst_ctl.query_migrate();
                matches!(
                    v["phase"].as_str(),
                    Some("completed" | "failed" | "cancelled")
                )
                .then_some(v)
            })
            .unwrap_or_else(|| panic!("{}: migration not over after 600 s", s.name));
            let wall = t0.elapsed();
            assert_eq!(v["phase"], "completed", "{}: {}", s.name, v);
            let so = src.wait_migration(secs(60));
            assert_eq!(so.phase, "completed", "{}: {}", s.name, so.raw);
            let mut v = v;
            v["source"] = so.raw;
            (v, wall)
        }
    };
    let cpu = [
        su.proc.cpu_time(None).saturating_sub(cpu0[0]),
        du.proc.cpu_time(None).saturating_sub(cpu0[1]),
    ];
    let peak_rss_kib = [su.peak_rss_kib(), du.peak_rss_kib()];
    let src_stats = outcome["source"]["stats"].clone();
    let st = if src_stats.is_null() {
        src.query_migrate()["stats"].clone()
    } else {
        src_stats
    };
    if let (Some(us), Some(bytes)) = (st["total_us"].as_u64(), st["bytes_sent"].as_u64()) {
        progress.record(Duration::from_micros(us), bytes);
    }
    // The switchover that really happened, as the VMMs report it.
    let switchover = match &outcome["switchover"] {
        Value::Null => outcome["source"]["switchover"].clone(),
        v => v.clone(),
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
    let row = json!({
        "scenario": s.name,
        "engine": "umem",
        "mode": s.mode,
        "switchover": switchover,
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
        // Where a requested page's time goes, [p50, p99] each: fault read to request written,
        // to the page read off the urgent channel, to the page placed.
        "stage_request_us": pc["stage_request_us"],
        "stage_fetch_us": pc["stage_fetch_us"],
        "stage_place_us": pc["stage_place_us"],
        "fault_max_us": pc["latency_max_us"],
        "fault_latency_hist": pc["latency_hist"],
        "pages_requested": pc["pages_requested"],
        "pages_urgent": pc["pages_urgent"],
        "vcpu_blocked_ms": pc["vcpu_blocked_us"].as_array().map(|a| a.iter().map(|v| ms(v.as_u64().unwrap_or(0))).collect::<Vec<_>>()),
        "dst_status": dst.status(),
        "guest_bad_pages": bad,
        "cpu_ms_per_gib": cpu_per_gib(cpu, bytes),
        "peak_rss_mib": peak_rss_kib.map(|k| k / 1024),
    });
    Run { row, progress }
}

/// Whether the command-line filter `f` selects scenario `name`.
fn selects(f: &str, name: &str) -> bool {
    match f.strip_suffix('$') {
        Some(whole) => name == whole,
        None => name.contains(f),
    }
}

fn main() {
    let args = Args::parse();
    if !require_kvm("umem-bench") {
        return;
    }
    let mut rows = Vec::new();
    let mut last = Vec::new();
    for round in 1..=args.runs {
        if args.runs > 1 {
            eprintln!("umem-bench: run {round} of {}", args.runs);
        }
        last = run_selection(&args.filters, round, args.runs);
        rows.extend(last.iter().map(|r| r.row.clone()));
    }
    if args.runs == 1 {
        print_table(&rows);
    } else {
        let folded = medians::fold(&rows);
        for r in &folded {
            println!("{}", json!({"median_of": r}));
        }
        println!("\nmedian of {} runs:", args.runs);
        print_table(&folded);
        print_spread(&rows, &folded);
    }
    if let Some(dir) = &args.plot {
        match charts::write_all(dir, &last) {
            Ok(files) => {
                for f in files {
                    eprintln!("umem-bench: wrote {}", f.display());
                }
            }
            Err(e) => {
                eprintln!("umem-bench: --plot: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// Runs every scenario `filter` selects once, in the order of [`SCENARIOS`], printing each
/// one's JSON line as it ends (with `"run"` when the selection runs more than once).
fn run_selection(filter: &[String], round: u32, rounds: u32) -> Vec<Run> {
    let mut runs = Vec::new();
    for make in SCENARIOS {
        let s = make();
        if !filter.is_empty() && !filter.iter().any(|f| selects(f, s.name)) {
            continue;
        }
        eprintln!("umem-bench: {} ...", s.name);
        if s.hugepages() && !umem_testkit::require_huge_pages(s.name, s.huge_pages_needed()) {
            let row =
                json!({"scenario": s.name, "mode": s.mode, "skipped": "too few 2 MiB huge pages"});
            println!("{row}");
            runs.push(Run {
                row,
                progress: Progress::default(),
            });
            continue;
        }
        let mut r = match s.engine {
            Engine::Umem => run(&s),
            Engine::Machine => match match s.mode {
                "fault-local" => floor::faults(&s, floor::PageSource::Local),
                "fault-loopback" => floor::faults(&s, floor::PageSource::Loopback),
                "fault-loopback-push" => floor::faults(&s, floor::PageSource::LoopbackPush),
                "fault-loopback-push-unniced" => {
                    floor::faults(&s, floor::PageSource::LoopbackPushUnniced)
                }
                "place-copy" => machine::place(&s, machine::Placement::Copy),
                "place-minor" => machine::place(&s, machine::Placement::Minor),
                "receive-copy" => machine::place(&s, machine::Placement::ReceiveCopy),
                "receive-splice" => machine::place(&s, machine::Placement::ReceiveSplice),
                "receive-splice-minor" => {
                    machine::place(&s, machine::Placement::ReceiveSpliceMinor)
                }
                _ => machine::run(&s),
            } {
                Ok(r) => r,
                Err(e) => Run {
                    row: json!({"scenario": s.name, "engine": "machine", "error": e}),
                    progress: Progress::default(),
                },
            },
            // The baseline never fails the bench: its row says why it is missing.
            Engine::Qemu => match qemu::find_qemu().map(|q| qemu::run(&s, &q)) {
                Ok(Ok(r)) => r,
                Err(why) => {
                    eprintln!("umem-bench: {}: skipped: {why}", s.name);
                    Run {
                        row: json!({"scenario": s.name, "engine": "qemu", "mode": s.mode, "skipped": why}),
                        progress: Progress::default(),
                    }
                }
                Ok(Err(e)) => {
                    eprintln!("umem-bench: {}: failed: {e}", s.name);
                    Run {
                        row: json!({"scenario": s.name, "engine": "qemu", "mode": s.mode, "error": e}),
                        progress: Progress::default(),
                    }
                }
            },
        };
        if rounds > 1 {
            r.row["run"] = json!(round);
        }
        println!("{}", r.row);
        runs.push(r);
    }
    runs
}

/// The rows side by side, after the JSON lines.
fn print_table(rows: &[Value]) {
    let f = |v: &Value, k: &str| match &v[k] {
        Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mib = |v: &Value| match v["bytes_sent"].as_u64() {
        Some(b) => format!("{:.1}", b as f64 / (1u64 << 20) as f64),
        None => "-".into(),
    };
    println!();
    let pair = |v: &Value, k: &str| match v[k].as_array() {
        Some(a) if a.len() == 2 => format!("{}/{}", a[0], a[1]),
        _ => "-".into(),
    };
    println!(
        "{:<50} {:<10} {:>9} {:>9} {:>10} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>4} {:>11}",
        "scenario",
        "switchover",
        "MiB sent",
        "GB/s",
        "total ms",
        "wall ms",
        "down ms",
        "faults",
        "p50 us",
        "p99 us",
        "max us",
        "bad",
        "cpu ms/GiB"
    );
    for r in rows {
        let name = r["scenario"].as_str().unwrap_or("");
        if let Some(why) = r["skipped"].as_str() {
            println!("{name:<50} skipped: {why}");
            continue;
        }
        if let Some(e) = r["error"].as_str() {
            println!("{name:<50} failed: {e}");
            continue;
        }
        println!(
            "{:<50} {:<10} {:>9} {:>9} {:>10} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>4} {:>11}",
            name,
            f(r, "switchover"),
            mib(r),
            f(r, "throughput_gbps"),
            f(r, "total_ms"),
            f(r, "wall_ms"),
            f(r, "downtime_ms"),
            f(r, "faults"),
            f(r, "fault_p50_us"),
            f(r, "fault_p99_us"),
            f(r, "fault_max_us"),
            f(r, "guest_bad_pages"),
            pair(r, "cpu_ms_per_gib"),
        );
    }
    for r in rows {
        if let Some(p) = r["prealloc_ms"].as_f64().filter(|&p| p > 0.0) {
            println!(
                "{}: preallocated in {p:.0} ms beforehand; of its total, {:.0} ms brought the data in, the rest was UFFDIO_CONTINUE",
                r["scenario"].as_str().unwrap_or(""),
                r["write_ms"].as_f64().unwrap_or(0.0),
            );
        }
    }
}

/// Each scenario's lowest and highest run of its main figures, after the table of medians.
fn print_spread(rows: &[Value], folded: &[Value]) {
    println!("\nspread, lowest-highest run:");
    print!("{:<50} {:>4}", "scenario", "runs");
    for (_, heading) in medians::SPREAD {
        print!(" {heading:>15}");
    }
    println!();
    for r in folded.iter().filter(|r| r.get("runs").is_some()) {
        let name = r["scenario"].as_str().unwrap_or("");
        print!("{name:<50} {:>4}", r["runs"]);
        for (key, _) in medians::SPREAD {
            print!(" {:>15}", medians::spread(rows, name, key));
        }
        println!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_ending_in_a_dollar_sign_selects_one_whole_name() {
        assert!(selects(
            "random-touch",
            "postcopy-1g-prefilled-random-touch-tls"
        ));
        assert!(selects(
            "postcopy-1g-prefilled-random-touch$",
            "postcopy-1g-prefilled-random-touch"
        ));
        assert!(!selects(
            "postcopy-1g-prefilled-random-touch$",
            "postcopy-1g-prefilled-random-touch-tls"
        ));
        assert!(!selects("touch$", "postcopy-1g-prefilled-random-touch"));
    }

    #[test]
    fn cpu_is_counted_per_gib_sent() {
        let ms = Duration::from_millis;
        assert_eq!(cpu_per_gib([ms(500), ms(750)], 1 << 30), json!([500, 750]));
        assert_eq!(cpu_per_gib([ms(500), ms(750)], 2 << 30), json!([250, 375]));
        assert_eq!(cpu_per_gib([ms(1), ms(1)], 0), Value::Null);
    }
}
