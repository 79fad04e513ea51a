//! End-to-end postcopy and hybrid migrations: real vmm and umemd processes, real KVM, loopback
//! TCP, the destination VM running while its pages still arrive.
//!
//! Run with `cargo test --release --test postcopy -- --test-threads=1` (see `src/lib.rs`).
//! Fault latency on a loaded machine is far from its goal, so no test asserts timing.

use serde_json::{json, Value};
use umem::{
    assert_consecutive, assert_no_bad, parse_passes, read_process_memory, require_kvm, secs,
    wait_until, MigrationOutcome, Pass, TestEnv, Vmm,
};

const PAGE: u64 = 4096;

/// Where memtouch's working set begins (its default `base`).
const MEMTOUCH_BASE: u64 = 0x100_0000;

/// memtouch with a short pause between passes: a few passes per second here.
const MEMTOUCH: &str = "pages=4096 pause=1000";

/// Guest ranges a running memtouch guest may still write: its image, bss and stack (first
/// 2 MiB) and its working set of `pages` pages. Everything else keeps the source's bytes.
fn memtouch_exclude(pages: u64) -> Vec<(u64, u64)> {
    vec![(0, 2 << 20), (MEMTOUCH_BASE, pages * PAGE)]
}

/// The source's serial output followed by the destination's: the guest's whole output stream.
fn combined_passes(src: &Vmm, dst: &Vmm) -> Vec<Pass> {
    parse_passes(&(src.serial() + &dst.serial()))
}

fn assert_completed(who: &str, o: &MigrationOutcome) {
    assert_eq!(
        o.phase, "completed",
        "{who}: migration did not complete: {}",
        o.raw
    );
    assert!(
        o.error.is_none(),
        "{who}: completed with an error: {}",
        o.raw
    );
}

/// A numeric field of a `query-migrate` reply's `postcopy` object; panics when there is none.
fn pc(reply: &Value, key: &str) -> u64 {
    let p = &reply["postcopy"];
    assert!(
        p.is_object(),
        "no postcopy statistics in the reply: {reply}"
    );
    p[key]
        .as_u64()
        .unwrap_or_else(|| panic!("postcopy.{key} missing or not a number: {reply}"))
}

/// Waits for the destination's side of the migration to end and checks that it completed.
fn wait_dest_completed(dst: &mut Vmm, timeout: std::time::Duration) -> Value {
    let v = dst.wait_phase(timeout, &["completed", "failed", "cancelled"]);
    assert_eq!(
        v["phase"], "completed",
        "destination: incoming migration did not complete: {v}"
    );
    assert!(
        v["error"].is_null(),
        "destination: completed with an error: {v}"
    );
    v
}

/// Checks the postcopy statistics a completed migration left on the destination.
fn assert_dest_postcopy_stats(v: &Value, vcpus: usize) {
    assert!(pc(v, "faults") > 0, "the running guest never faulted: {v}");
    assert!(pc(v, "pages_requested") > 0, "no page was requested: {v}");
    assert_eq!(pc(v, "remaining_pages"), 0, "{v}");
    assert_eq!(v["stats"]["remaining_pages"], 0, "{v}");
    let hist: Vec<u64> = v["postcopy"]["latency_hist"]
        .as_array()
        .unwrap_or_else(|| panic!("latency_hist missing: {v}"))
        .iter()
        .map(|x| x.as_u64().expect("latency_hist entries are numbers"))
        .collect();
    assert_eq!(hist.len(), 24, "{v}");
    assert!(
        hist.iter().sum::<u64>() > 0,
        "faults were served but no latency was recorded: {v}"
    );
    let (p50, p99, max) = (
        pc(v, "latency_p50_us"),
        pc(v, "latency_p99_us"),
        pc(v, "latency_max_us"),
    );
    assert!(
        p50 <= p99 && p99 <= max,
        "latency percentiles out of order: {v}"
    );
    let blocked = v["postcopy"]["vcpu_blocked_us"]
        .as_array()
        .unwrap_or_else(|| panic!("vcpu_blocked_us missing: {v}"));
    assert_eq!(blocked.len(), vcpus, "one blocked time per vCPU: {v}");
    eprintln!(
        "destination postcopy: {} faults, {} pages requested, {} urgent, {} pushed, latency p50 {} us p99 {} us max {} us, vm blocked {} us",
        pc(v, "faults"),
        pc(v, "pages_requested"),
        pc(v, "pages_urgent"),
        pc(v, "pages_pushed"),
        p50,
        p99,
        max,
        pc(v, "vm_blocked_us")
    );
}

/// After the migration: the destination runs the guest on from where the source stopped it,
/// without a bad page and without a gap or a repeat in the pass numbers.
fn assert_guest_continues(src: &Vmm, dst: &mut Vmm, more: u64) {
    let src_last = src.last_pass().expect("source printed passes").pass;
    assert_eq!(dst.status(), "running", "destination status");
    wait_until(secs(120), "destination passes", || {
        combined_passes(src, dst)
            .last()
            .filter(|p| p.pass >= src_last + more)
            .map(|_| ())
    });
    let dst_passes = dst.passes();
    assert!(
        !dst_passes.is_empty(),
        "destination printed no complete pass line"
    );
    assert!(
        dst_passes[0].pass > src_last && dst_passes[0].pass <= src_last + 2,
        "destination restarted instead of continuing: source ended at pass {src_last}, destination began at {:?}",
        dst_passes[0]
    );
    let all = combined_passes(src, dst);
    assert_eq!(all[0].pass, 1);
    assert_consecutive("source+destination", &all);
    assert_no_bad("source+destination", &all);
    // The source really is stopped.
    assert_eq!(src.last_pass().map(|p| p.pass), Some(src_last));
    assert_eq!(src.status(), "postmigrate");
}

/// A memtouch source and a (running, not `-S`) destination.
fn memtouch_pair(
    t: &TestEnv,
    su: &umem::Umemd,
    du: &umem::Umemd,
    mem: &str,
    vcpus: u32,
    cmdline: &str,
) -> (Vmm, Vmm) {
    let src = t
        .vmm("src", su)
        .mem(mem)
        .vcpus(vcpus)
        .guest("memtouch")
        .cmdline(cmdline)
        .prefill(1)
        .start();
    let mut dst = t
        .vmm("dst", du)
        .mem(mem)
        .vcpus(vcpus)
        .incoming_any()
        .start();
    assert_eq!(dst.status(), "inmigrate");
    let _ = dst.listen_uri();
    (src, dst)
}

#[test]
fn postcopy_memtouch_1g_prefilled_two_vcpus() {
    if !require_kvm("postcopy_memtouch_1g_prefilled_two_vcpus") {
        return;
    }
    let t = TestEnv::new("postcopy-1g");
    let mut su = t.umemd("umemd-src");
    let mut du = t.umemd("umemd-dst");
    let (mut src, mut dst) = memtouch_pair(&t, &su, &du, "1G", 2, MEMTOUCH);
    src.wait_pass(secs(60), 3);

    let uri = dst.listen_uri();
    src.migrate(&uri, json!({"mode": "postcopy"}))
        .expect("migrate");
    let o = src.wait_migration(secs(300));
    assert_completed("source", &o);
    let dv = wait_dest_completed(&mut dst, secs(60));
    assert_eq!(src.status(), "postmigrate");

    // Pure postcopy: no precopy round, every page crossed exactly once after the switchover,
    // either requested or pushed.
    let total = o.stat("total_pages");
    assert_eq!(total, (1 << 30) / PAGE);
    assert_eq!(
        o.stat("rounds"),
        0,
        "pure postcopy ran precopy rounds: {}",
        o.raw
    );
    assert_eq!(
        pc(&o.raw, "pages_urgent") + pc(&o.raw, "pages_pushed"),
        total,
        "requested and pushed pages do not add up to RAM: {}",
        o.raw
    );
    assert_eq!(pc(&o.raw, "remaining_pages"), 0, "{}", o.raw);
    assert_eq!(
        o.stat("holes_skipped"),
        0,
        "prefilled RAM has no holes: {}",
        o.raw
    );
    assert_eq!(
        o.stat("pages_sent") + o.stat("zero_pages"),
        total,
        "not every page was sent exactly once: {}",
        o.raw
    );
    assert!(
        o.stat("bytes_sent") >= o.stat("pages_sent") * PAGE,
        "{}",
        o.raw
    );
    assert!(o.stat("downtime_us") > 0, "{}", o.raw);
    assert_dest_postcopy_stats(&dv, 2);
    // The destination counts zero records among urgent pages but not among pushed ones.
    let dest_zero = dv["stats"]["zero_pages"].as_u64().unwrap_or(0)
        + dv["stats"]["holes_skipped"].as_u64().unwrap_or(0);
    assert!(
        pc(&dv, "pages_urgent") + pc(&dv, "pages_pushed") + dest_zero >= total
            && pc(&dv, "pages_urgent") + pc(&dv, "pages_pushed") <= total,
        "the destination did not receive every page exactly once: {dv}"
    );

    assert_guest_continues(&src, &mut dst, 5);

    // Outside what the guest still writes, the destination holds the source's final bytes.
    let ex = memtouch_exclude(4096);
    let sd = src.digest_excluding(&ex);
    assert_eq!(sd.len(), 1, "1 GiB is one RAM block: {sd:?}");
    assert_eq!(
        sd,
        dst.digest_excluding(&ex),
        "RAM differs between source and destination"
    );
    assert_ne!(
        sd,
        src.digest(),
        "the exclusions changed nothing: the digest ignores them"
    );
    assert!(su.is_serving() && du.is_serving(), "a umemd died");
}

#[test]
fn postcopy_digest_guest_matches_unmigrated_run() {
    if !require_kvm("postcopy_digest_guest_matches_unmigrated_run") {
        return;
    }
    const CMD: &str = "pages=256 rounds=32";
    let t = TestEnv::new("postcopy-digest");
    let su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    let mut reference = t
        .vmm("reference", &su)
        .mem("64M")
        .guest("digest")
        .cmdline(CMD)
        .start();
    let mut src = t
        .vmm("src", &su)
        .mem("64M")
        .guest("digest")
        .cmdline(CMD)
        .start();
    let mut dst = t.vmm("dst", &du).mem("64M").incoming_any().start();

    src.wait_serial(secs(120), "round=3", |l| l == "round=3");
    let uri = dst.listen_uri();
    src.migrate(&uri, json!({"mode": "postcopy"}))
        .expect("migrate");
    let o = src.wait_migration(secs(240));
    assert_completed("source", &o);
    assert!(
        o.raw["postcopy"].is_object(),
        "no postcopy phase: {}",
        o.raw
    );
    assert_eq!(o.stat("rounds"), 0, "{}", o.raw);
    assert_eq!(src.status(), "postmigrate");
    assert!(
        !src.serial().contains("digest="),
        "the guest finished on the source before switchover; the test did not migrate mid-run"
    );
    let dv = wait_dest_completed(&mut dst, secs(60));
    assert_dest_postcopy_stats(&dv, 1);

    let expected = reference.wait_serial_prefix(secs(180), "digest=");
    let got = dst.wait_serial_prefix(secs(180), "digest=");
    assert_eq!(got, expected, "migrated run computed a different digest");

    let all = src.serial() + &dst.serial();
    for r in 1..=32 {
        let n = all.lines().filter(|l| *l == format!("round={r}")).count();
        assert_eq!(
            n, 1,
            "round={r} appears {n} times in the combined output:\n{all}"
        );
    }
}

/// A guest that rewrites its 64 MiB working set as fast as it can: about 1 GiB/s of dirtying
/// where guest code is emulated.
const FAST_DIRTIER: &str = "pages=16384 pause=0";
const FAST_DIRTIER_MEM: &str = "96M";
/// Background bandwidth well below the fast dirtier's dirty rate (even on a loaded machine),
/// so precopy cannot converge: each round leaves the whole working set dirty again.
const SLOW_LINK: u64 = 16_000_000;

/// A hybrid migration of [`FAST_DIRTIER`] over [`SLOW_LINK`].
fn hybrid_fast_dirtier(name: &str, postcopy_after_rounds: u32) -> MigrationOutcome {
    let t = TestEnv::new(name);
    let su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    let (mut src, mut dst) = memtouch_pair(&t, &su, &du, FAST_DIRTIER_MEM, 1, FAST_DIRTIER);
    src.wait_pass(secs(60), 2);
    let uri = dst.listen_uri();
    src.migrate(
        &uri,
        json!({
            "mode": "hybrid",
            "downtime_limit_ms": 1,
            "postcopy_after_rounds": postcopy_after_rounds,
            "max_rounds": 30,
            "bandwidth_limit": SLOW_LINK,
        }),
    )
    .expect("migrate");
    let o = src.wait_migration(secs(300));
    assert_completed("source", &o);
    eprintln!("{name}: source {}", o.raw);
    assert!(
        o.stat("rounds") >= 1,
        "hybrid ran no precopy round: {}",
        o.raw
    );
    assert!(
        o.raw["postcopy"].is_object(),
        "hybrid never switched to postcopy: {}",
        o.raw
    );
    assert_eq!(pc(&o.raw, "remaining_pages"), 0, "{}", o.raw);
    // Every page went once in the first round; what the guest dirtied since went again, in
    // later rounds or after the switchover.
    assert!(
        o.stat("pages_sent") + o.stat("zero_pages") >= o.stat("total_pages"),
        "{}",
        o.raw
    );
    let dv = wait_dest_completed(&mut dst, secs(60));
    assert_eq!(dv["stats"]["rounds"], o.raw["stats"]["rounds"], "{dv}");
    assert!(dv["postcopy"].is_object(), "destination: {dv}");
    assert_eq!(pc(&dv, "remaining_pages"), 0, "{dv}");
    assert_guest_continues(&src, &mut dst, 3);
    let ex = memtouch_exclude(16384);
    assert_eq!(
        src.digest_excluding(&ex),
        dst.digest_excluding(&ex),
        "RAM differs between source and destination"
    );
    o
}

#[test]
fn hybrid_switches_to_postcopy_when_precopy_does_not_converge() {
    if !require_kvm("hybrid_switches_to_postcopy_when_precopy_does_not_converge") {
        return;
    }
    // With the round limit far away, only the dirty set failing to shrink can end precopy.
    let o = hybrid_fast_dirtier("hybrid-stuck", 20);
    let rounds = o.stat("rounds");
    assert!(
        (2..20).contains(&rounds),
        "expected the switch on non-convergence (round 2 to 19), got {rounds} rounds: {}",
        o.raw
    );
}

#[test]
fn hybrid_switches_to_postcopy_after_the_configured_rounds() {
    if !require_kvm("hybrid_switches_to_postcopy_after_the_configured_rounds") {
        return;
    }
    let o = hybrid_fast_dirtier("hybrid-after-2", 2);
    assert_eq!(o.stat("rounds"), 2, "{}", o.raw);
}

#[test]
fn postcopy_no_background_sends_only_requested_pages() {
    if !require_kvm("postcopy_no_background_sends_only_requested_pages") {
        return;
    }
    const PAGES: u64 = 1024;
    let t = TestEnv::new("postcopy-no-background");
    let su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    let (mut src, mut dst) = memtouch_pair(&t, &su, &du, "32M", 1, "pages=1024 pause=1000");
    let total = (32 << 20) / PAGE;
    src.wait_pass(secs(60), 3);
    let uri = dst.listen_uri();
    src.migrate(&uri, json!({"mode": "postcopy", "no_background": true}))
        .expect("migrate");
    dst.wait_phase(secs(120), &["postcopy"]);
    let src_last = wait_until(secs(60), "source to stop", || {
        (src.status() == "postmigrate").then(|| src.last_pass().map_or(0, |p| p.pass))
    });
    dst.wait_pass(secs(120), src_last + 3);

    // Only the working set (and the guest's image and stack) was fetched; nothing else moves.
    std::thread::sleep(secs(1));
    for (who, vm) in [("source", &src), ("destination", &dst)] {
        let v = vm.query_migrate();
        assert_eq!(v["phase"], "postcopy", "{who}: {v}");
        assert_eq!(pc(&v, "pages_pushed"), 0, "{who} pushed pages: {v}");
    }
    let v = dst.query_migrate();
    let fetched = total - pc(&v, "remaining_pages");
    assert!(
        (PAGES..PAGES + 1024).contains(&fetched),
        "destination holds {fetched} pages; expected the working set ({PAGES}) plus a few: {v}"
    );
    let sv = src.query_migrate();
    assert!(
        sv["stats"]["bytes_sent"].as_u64().unwrap_or(0) < (PAGES + 1024) * PAGE * 11 / 10,
        "the source sent more than the requested pages: {sv}"
    );

    // The VMM's own reads of guest RAM fault too and are served: reading all of it fetches
    // every remaining page and so ends the migration.
    let _ = dst.digest();
    let o = src.wait_migration(secs(120));
    assert_completed("source", &o);
    let dv = wait_dest_completed(&mut dst, secs(60));
    eprintln!("source {}\ndestination {dv}", o.raw);
    assert_eq!(pc(&o.raw, "pages_pushed"), 0, "{}", o.raw);
    assert_eq!(pc(&dv, "pages_pushed"), 0, "{dv}");
    assert_eq!(
        pc(&o.raw, "pages_urgent"),
        total,
        "every page is sent exactly once, on request: {}",
        o.raw
    );
    assert_eq!(pc(&dv, "pages_urgent"), total, "{dv}");
    assert_eq!(
        o.stat("pages_sent") + o.stat("zero_pages"),
        total,
        "{}",
        o.raw
    );
    // Page data plus small per-request framing, and nothing twice.
    let bytes = o.stat("bytes_sent");
    assert!(
        bytes >= total * PAGE && bytes < total * PAGE * 21 / 20,
        "source sent {bytes} bytes for {} bytes of RAM: {}",
        total * PAGE,
        o.raw
    );
    assert_dest_postcopy_stats(&dv, 1);
    assert!(
        pc(&dv, "faults") >= total - fetched,
        "every page read by the digest faulted: {dv}"
    );

    assert_guest_continues(&src, &mut dst, 3);
    let ex = memtouch_exclude(PAGES);
    assert_eq!(
        src.digest_excluding(&ex),
        dst.digest_excluding(&ex),
        "RAM differs between source and destination"
    );
}

#[test]
fn postcopy_survives_source_vmm_exit_after_switchover() {
    if !require_kvm("postcopy_survives_source_vmm_exit_after_switchover") {
        return;
    }
    let t = TestEnv::new("postcopy-src-vmm-exit");
    let mut su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    let (mut src, mut dst) = memtouch_pair(&t, &su, &du, "1G", 2, MEMTOUCH);
    src.wait_pass(secs(60), 3);
    let uri = dst.listen_uri();
    // 100 MB/s in the background: 1 GiB takes about 10 s, so pages are still missing when
    // the source VMM goes.
    src.migrate(
        &uri,
        json!({"mode": "postcopy", "bandwidth_limit": 100_000_000}),
    )
    .expect("migrate");
    wait_until(secs(120), "source to hand the VM over", || {
        (src.status() == "postmigrate").then_some(())
    });
    let ex = memtouch_exclude(4096);
    let sd = src.digest_excluding(&ex);
    let src_passes = src.passes();
    let v = dst.query_migrate();
    assert_eq!(v["phase"], "postcopy", "destination: {v}");
    let missing = pc(&v, "remaining_pages");
    assert!(missing > 0, "nothing left to fetch: {v}");
    src.proc.kill();
    eprintln!("source VMM killed with {missing} pages still missing on the destination");

    let dv = wait_dest_completed(&mut dst, secs(180));
    assert_dest_postcopy_stats(&dv, 2);
    assert!(su.is_serving(), "the source umemd died with its VMM");
    assert_eq!(
        sd,
        dst.digest_excluding(&ex),
        "RAM differs between source and destination"
    );

    let src_last = src_passes.last().expect("source passes").pass;
    dst.wait_pass(secs(120), src_last + 3);
    let all = parse_passes(&(src.serial() + &dst.serial()));
    assert_consecutive("source+destination", &all);
    assert_no_bad("source+destination", &all);
    assert_eq!(dst.status(), "running");
}

/// Runs a no-background postcopy (so pages are surely missing) and kills the umemd of
/// `victim` ("destination" or "source") once the guest runs on the destination. The
/// destination must pause without losing or zeroing a page; the source must never resume.
fn umemd_killed_mid_postcopy(victim: &str) {
    let t = TestEnv::new(&format!("postcopy-kill-{victim}-umemd"));
    let mut su = t.umemd("umemd-src");
    let mut du = t.umemd("umemd-dst");
    let (mut src, mut dst) = memtouch_pair(&t, &su, &du, "256M", 1, "pages=1024 pause=1000");
    src.wait_pass(secs(60), 3);
    let uri = dst.listen_uri();
    src.migrate(&uri, json!({"mode": "postcopy", "no_background": true}))
        .expect("migrate");
    dst.wait_phase(secs(120), &["postcopy"]);
    wait_until(secs(60), "source to stop", || {
        (src.status() == "postmigrate").then_some(())
    });
    let src_last = src.last_pass().expect("source passes").pass;
    dst.wait_pass(secs(120), src_last + 2);
    let v = dst.query_migrate();
    assert!(pc(&v, "remaining_pages") > 0, "{v}");

    match victim {
        "destination" => du.proc.kill(),
        _ => su.proc.kill(),
    }
    wait_until(secs(60), "destination to pause", || {
        dst.proc.assert_alive();
        (dst.status() == "postcopy-paused").then_some(())
    });
    let st = dst.ctl("query-status", Value::Null).expect("query-status");
    assert_eq!(st["running"], false, "{st}");
    assert!(
        st["fault"].as_str().is_some_and(|f| !f.is_empty()),
        "postcopy-paused without a reason: {st}"
    );
    eprintln!("destination after losing the {victim} umemd: {st}");
    assert!(
        dst.ctl("cont", json!({})).is_err(),
        "cont resumed a VM whose pages are missing"
    );

    // The source's migration failed, but the VM ran on the destination: the source must not
    // run it again.
    let o = src.wait_migration(secs(120));
    assert_eq!(o.phase, "failed", "source: {}", o.raw);
    assert_eq!(
        src.status(),
        "postmigrate",
        "the source resumed a VM that moved"
    );
    assert!(
        src.ctl("cont", json!({})).is_err(),
        "cont resumed the source copy of a VM that ran on the destination"
    );

    // The guest makes no more progress on either side, and never saw a bad page.
    std::thread::sleep(secs(1));
    let before = (src.serial(), dst.serial());
    std::thread::sleep(secs(3));
    assert_eq!(
        before,
        (src.serial(), dst.serial()),
        "the guest ran on after postcopy paused"
    );
    let all = combined_passes(&src, &dst);
    assert_consecutive("source+destination", &all);
    assert_no_bad("source+destination", &all);

    // A page that never arrived is still missing, not zero: reading it waits (or, where the
    // kernel refuses a remote fault on a userfaultfd range, fails), and whatever it returns is
    // the source's bytes.
    let off = 128 << 20;
    let expected = read_process_memory(src.proc.pid(), src.ram_host_addr(off), 4096, secs(10))
        .expect("reading the stopped source's memory timed out")
        .expect("reading the source's memory");
    assert!(expected.iter().any(|&b| b != 0), "prefill left zeros");
    match read_process_memory(dst.proc.pid(), dst.ram_host_addr(off), 4096, secs(5)) {
        None => eprintln!("reading a missing page of the paused destination blocks"),
        Some(Ok(bytes)) => {
            assert!(
                bytes.iter().any(|&b| b != 0),
                "a missing page of the paused destination reads as zeros"
            );
            assert_eq!(bytes, expected, "a missing page reads as something else");
        }
        Some(Err(e)) => eprintln!("reading a missing page of the paused destination failed: {e}"),
    }
    dst.proc.assert_alive();
    assert_eq!(dst.status(), "postcopy-paused");
    match victim {
        "destination" => assert!(su.is_serving(), "source umemd died"),
        _ => assert!(du.is_serving(), "destination umemd died"),
    }
}

#[test]
fn postcopy_destination_umemd_killed_pauses_without_zero_pages() {
    if !require_kvm("postcopy_destination_umemd_killed_pauses_without_zero_pages") {
        return;
    }
    umemd_killed_mid_postcopy("destination");
}

#[test]
fn postcopy_source_umemd_killed_pauses_without_zero_pages() {
    if !require_kvm("postcopy_source_umemd_killed_pauses_without_zero_pages") {
        return;
    }
    umemd_killed_mid_postcopy("source");
}

#[test]
fn start_postcopy_switches_a_precopy_that_cannot_converge() {
    if !require_kvm("start_postcopy_switches_a_precopy_that_cannot_converge") {
        return;
    }
    let t = TestEnv::new("postcopy-start");
    let su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    let (mut src, mut dst) = memtouch_pair(&t, &su, &du, FAST_DIRTIER_MEM, 1, FAST_DIRTIER);
    src.wait_pass(secs(60), 2);
    let uri = dst.listen_uri();
    src.migrate(
        &uri,
        json!({
            "mode": "precopy",
            "downtime_limit_ms": 1,
            "max_rounds": 100_000,
            "bandwidth_limit": SLOW_LINK,
        }),
    )
    .expect("migrate");
    let v = wait_until(secs(120), "two precopy rounds", || {
        let v = src.query_migrate();
        assert_ne!(v["phase"], "completed", "precopy converged after all: {v}");
        (v["phase"] == "precopy" && v["stats"]["rounds"].as_u64().unwrap_or(0) >= 2).then_some(v)
    });
    assert!(v["postcopy"].is_null(), "{v}");
    src.ctl("migrate-start-postcopy", json!({}))
        .expect("migrate-start-postcopy");
    let o = src.wait_migration(secs(300));
    assert_completed("source", &o);
    eprintln!("source {}", o.raw);
    assert!(o.stat("rounds") >= 2, "{}", o.raw);
    assert!(
        o.raw["postcopy"].is_object(),
        "the migration never went through postcopy: {}",
        o.raw
    );
    let dv = wait_dest_completed(&mut dst, secs(60));
    assert!(dv["postcopy"].is_object(), "destination: {dv}");
    assert_guest_continues(&src, &mut dst, 3);
    let ex = memtouch_exclude(16384);
    assert_eq!(
        src.digest_excluding(&ex),
        dst.digest_excluding(&ex),
        "RAM differs between source and destination"
    );
}

/// The destination's `stats` count what arrived on the main stream only: pages and zero records
/// that came on the urgent channel (every page, with `no_background`) are left out of
/// `pages_sent`, `zero_pages` and `bytes_sent`, so its "received" figures read 0 for a
/// migration that moved all of RAM. `UrgentReceiver::run` in `umemd/src/dest.rs` adds them only
/// to the postcopy `pages_urgent` counter.
#[test]
fn postcopy_destination_stats_count_urgent_pages() {
    if !require_kvm("postcopy_destination_stats_count_urgent_pages") {
        return;
    }
    let t = TestEnv::new("postcopy-dest-stats");
    let su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    let (mut src, mut dst) = memtouch_pair(&t, &su, &du, "32M", 1, "pages=1024 pause=1000");
    let total = (32 << 20) / PAGE;
    src.wait_pass(secs(60), 2);
    let uri = dst.listen_uri();
    src.migrate(&uri, json!({"mode": "postcopy", "no_background": true}))
        .expect("migrate");
    dst.wait_phase(secs(120), &["postcopy"]);
    let _ = dst.digest();
    let o = src.wait_migration(secs(120));
    assert_completed("source", &o);
    let dv = wait_dest_completed(&mut dst, secs(60));
    let d = |k: &str| dv["stats"][k].as_u64().unwrap_or(0);
    assert_eq!(
        d("pages_sent") + d("zero_pages"),
        o.stat("pages_sent") + o.stat("zero_pages"),
        "destination and source disagree on the pages that crossed: source {}\ndestination {dv}",
        o.raw
    );
    assert_eq!(d("pages_sent") + d("zero_pages"), total, "{dv}");
    assert!(d("bytes_sent") >= total * PAGE * 9 / 10, "{dv}");
}
