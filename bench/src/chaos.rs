//! umem-chaos: migrations with a random fault injected at a random moment of a random mode, and
//! a check that nothing was lost.
//!
//! ```text
//! umem-chaos [--runs N] [--seed S]
//! ```
//!
//! Each run starts two umemds and two VMMs (as the end-to-end tests do: real processes, real
//! KVM, loopback TCP through the kit's fault proxy), runs memtouch on 64 MiB of prefilled RAM,
//! migrates it in precopy, postcopy or hybrid, and injects one fault after 0-1500 ms: the link
//! cut for 1.5 s, the link stalled for twice the link timeout, the source or the destination
//! umemd killed with SIGKILL and started again, or 20 ms of latency. Then it waits for the
//! migration to end; one that failed before the switchover was committed is retried once, as an
//! operator would (to a new destination VMM if the old one could not listen again). A run
//! loses the VM when, at the end, the guest does not run on exactly one host, or a page read
//! wrong. Prints one line per run and a summary; exits 0 only when no VM was lost.

use std::time::Duration;

use serde_json::{json, Value};
use umem_testkit::pair::{MigrationSetup, Pair, MEMTOUCH_CMDLINE};
use umem_testkit::proxy::FaultProxy;
use umem_testkit::{parse_passes, require_kvm, secs, try_wait_until, TestEnv, Vmm};

const MODES: [&str; 3] = ["precopy", "postcopy", "hybrid"];
const FAULTS: [&str; 5] = [
    "cut-link",
    "stall-link",
    "kill-source-umemd",
    "kill-destination-umemd",
    "latency",
];
const LINK_TIMEOUT_MS: u64 = 1000;

/// splitmix64: reproducible from the seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// What one run did and found.
#[derive(Default)]
struct Outcome {
    end: String,
    recoveries: u64,
    retried: bool,
    lost: Option<String>,
    bad: u64,
    /// The destination completed; the source never heard it.
    unfinished: bool,
}

/// Waits until the source's migration has ended; returns its `query-migrate`.
fn wait_end(src: &Vmm, timeout: Duration) -> Option<Value> {
    try_wait_until(timeout, || {
        let v = src.query_migrate();
        matches!(
            v["phase"].as_str(),
            Some("completed" | "failed" | "cancelled")
        )
        .then_some(v)
    })
}

fn run_once(t: &TestEnv, mode: &str, fault: &str, at: Duration) -> Outcome {
    let mut out = Outcome::default();
    let setup = MigrationSetup::memtouch(t, "64M", MEMTOUCH_CMDLINE).prefilled();
    let mut pair: Pair = setup.start();
    pair.src.wait_pass(secs(60), 2);
    let proxy = FaultProxy::in_front_of(&pair.dst.listen_uri());
    let params = json!({
        "mode": mode,
        "bandwidth_limit": 30_000_000,
        "link_timeout_ms": LINK_TIMEOUT_MS,
        "postcopy_after_rounds": 1,
    });
    pair.src.migrate(&proxy.uri(), params).expect("migrate");
    std::thread::sleep(at);
    match fault {
        "cut-link" => {
            proxy.cut();
            std::thread::sleep(Duration::from_millis(1500));
            proxy.restore();
        }
        "stall-link" => {
            proxy.stall();
            std::thread::sleep(Duration::from_millis(2 * LINK_TIMEOUT_MS));
            proxy.restore();
        }
        "kill-source-umemd" => {
            pair.src_umemd.proc.kill();
            std::thread::sleep(Duration::from_millis(500));
            pair.src_umemd = t.umemd("umemd-src");
        }
        "kill-destination-umemd" => {
            pair.dst_umemd.proc.kill();
            std::thread::sleep(Duration::from_millis(500));
            pair.dst_umemd = t.umemd("umemd-dst");
        }
        _ => proxy.set_latency(Duration::from_millis(20)),
    }
    // A postcopy may wait for pages only the guest would ask for: push them all.
    let _ = pair
        .src
        .ctl("migrate-set-parameters", json!({"bandwidth_limit": 0}));
    let Some(v) = wait_end(&pair.src, secs(120)) else {
        // A source still waiting is harmless if the destination completed (its answer was
        // lost with the link); anything else loses the VM.
        if pair.dst.phase() == "completed" && pair.src.status() == "postmigrate" {
            out.end = "completed, the source still waiting for the last answer".into();
            out.unfinished = true;
        } else {
            out.lost = Some(format!(
                "the migration never ended: {}",
                pair.src.query_migrate()
            ));
        }
        return out;
    };
    let mut end = v["phase"].as_str().unwrap_or_default().to_string();
    if end != "completed" && pair.src.status() == "running" {
        // Failed before the commit: the source runs on. Retry, as an operator would.
        out.retried = true;
        std::thread::sleep(Duration::from_millis(500));
        if pair.dst.status() != "inmigrate" {
            pair.dst = setup.destination("dst2", &pair.dst_umemd);
        }
        let uri = pair.dst.listen_uri();
        pair.src
            .migrate(
                &uri,
                json!({"mode": mode, "link_timeout_ms": LINK_TIMEOUT_MS}),
            )
            .expect("migrate again");
        end = wait_end(&pair.src, secs(120))
            .map(|v| v["phase"].as_str().unwrap_or_default().to_string())
            .unwrap_or_else(|| "never ended".into());
    }
    out.end = end.clone();
    if end != "completed" {
        out.lost = Some(format!(
            "source {end} ({}), destination {} ({})",
            pair.src.status(),
            pair.dst.phase(),
            pair.dst.status()
        ));
        return out;
    }
    // Exactly one host runs the guest, and its passes go on without a bad page.
    try_wait_until(secs(60), || (pair.dst.phase() == "completed").then_some(()));
    if pair.dst.status() == "paused" {
        let _ = pair.dst.ctl("cont", json!({}));
    }
    let src_status = pair.src.status();
    let last = pair.src.last_pass().map_or(0, |p| p.pass);
    try_wait_until(secs(60), || {
        pair.dst.last_pass().filter(|p| p.pass >= last + 2)
    });
    let passes = parse_passes(&(pair.src.serial() + &pair.dst.serial()));
    out.bad = passes.iter().map(|p| p.bad).sum();
    out.recoveries = pair.dst.query_migrate()["postcopy"]["recoveries"]
        .as_u64()
        .unwrap_or(0);
    let consecutive = passes.windows(2).all(|w| w[1].pass == w[0].pass + 1);
    if src_status != "postmigrate" {
        out.lost = Some(format!(
            "the source is {src_status} after a completed migration"
        ));
    } else if pair.dst.last_pass().is_none_or(|p| p.pass < last + 2) {
        out.lost = Some("the guest does not run on the destination".into());
    } else if !consecutive || out.bad > 0 {
        out.lost = Some(format!("passes not consecutive or {} bad pages", out.bad));
    }
    out
}

fn main() {
    let mut runs = 10u64;
    let mut seed = 1u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next().and_then(|v| v.parse().ok());
        match (a.as_str(), value) {
            ("--runs", Some(v)) => runs = v,
            ("--seed", Some(v)) => seed = v,
            _ => {
                eprintln!("usage: umem-chaos [--runs N] [--seed S]");
                std::process::exit(2);
            }
        }
    }
    if !require_kvm("umem-chaos") {
        return;
    }
    let mut rng = Rng(seed);
    let (mut lost, mut bad, mut recoveries, mut retries, mut unfinished) = (0, 0, 0, 0, 0);
    for i in 1..=runs {
        let mode = rng.pick(&MODES);
        let fault = rng.pick(&FAULTS);
        let at = Duration::from_millis(rng.next() % 1500);
        let t = TestEnv::new(&format!("chaos-{i}"));
        let o = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_once(&t, mode, fault, at)
        }))
        .unwrap_or_else(|p| Outcome {
            lost: Some(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the run panicked".into()),
            ),
            ..Default::default()
        });
        recoveries += o.recoveries;
        retries += o.retried as u64;
        bad += o.bad;
        lost += o.lost.is_some() as u64;
        unfinished += o.unfinished as u64;
        println!(
            "run {i}: mode={mode} fault={fault} at={}ms -> {}{}, recoveries {}, bad pages {}{}",
            at.as_millis(),
            o.end,
            if o.retried { " after a retry" } else { "" },
            o.recoveries,
            o.bad,
            o.lost
                .as_ref()
                .map(|l| format!(": VM LOST: {l}"))
                .unwrap_or_default()
        );
        drop(t);
    }
    println!(
        "runs {runs}, faults injected {runs}, recoveries {recoveries}, retries {retries}, sources left waiting {unfinished}, VMs lost {lost}, bad pages {bad} (seed {seed})"
    );
    if lost > 0 || bad > 0 {
        std::process::exit(1);
    }
}
