//! End-to-end postcopy and hybrid migrations: real vmm and umemd processes, real KVM, loopback
//! TCP, the destination VM running while its pages still arrive.
//!
//! Run with `cargo test --release --test postcopy -- --test-threads=1` (see `testkit/src/lib.rs`).
//! Fault latency on a loaded machine is far from its goal, so no test asserts timing.

use serde_json::{json, Value};
use umem_testkit::pair::{
    assert_completed, assert_digest_guest_moved_mid_run, assert_digest_matches_reference,
    assert_every_round_once, assert_guest_continues, assert_guest_runs_on,
    assert_same_ram_outside_working_set, assert_umemds_rss_bounded, assert_wake_latency_request,
    combined_passes, memtouch_exclude, MigrationSetup, Pair, DIGEST_CMDLINE, MEMTOUCH_CMDLINE,
    MEMTOUCH_PAGES, PAGE_SIZE,
};
use umem_testkit::{
    assert_consecutive, assert_no_bad, read_process_memory, require_kvm, secs, wait_until,
    MigrationOutcome, TestEnv, Vmm,
};

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
    // Where a requested page's time went: [p50, p99] of each stage of its path. Every stage
    // takes some time once pages came on the urgent channel, and none is longer than the
    // longest fault.
    if pc(v, "pages_urgent") > 0 {
        for stage in ["stage_request_us", "stage_fetch_us", "stage_place_us"] {
            let q: Vec<u64> = v["postcopy"][stage]
                .as_array()
                .unwrap_or_else(|| panic!("{stage} missing: {v}"))
                .iter()
                .map(|x| x.as_u64().expect("stage figures are numbers"))
                .collect();
            assert!(q.len() == 2 && q[0] <= q[1] && q[1] <= max, "{stage}: {v}");
        }
        assert!(v["postcopy"]["stage_fetch_us"][0].as_u64() > Some(0), "{v}");
    }
    eprintln!(
        "destination postcopy: {} faults, {} pages requested, {} urgent, {} pushed, latency p50 {} us p99 {} us max {} us, vm blocked {} us, stages (request, fetch, place) {} {} {}",
        pc(v, "faults"),
        pc(v, "pages_requested"),
        pc(v, "pages_urgent"),
        pc(v, "pages_pushed"),
        p50,
        p99,
        max,
        pc(v, "vm_blocked_us"),
        v["postcopy"]["stage_request_us"],
        v["postcopy"]["stage_fetch_us"],
        v["postcopy"]["stage_place_us"],
    );
}

/// A prefilled memtouch source and a destination that runs as soon as it has the guest,
/// listening already.
fn memtouch_pair(t: &TestEnv, mem: &str, vcpus: u32, cmdline: &str) -> Pair {
    let mut pair = MigrationSetup::memtouch(t, mem, cmdline)
        .vcpus(vcpus)
        .prefilled()
        .start();
    assert_eq!(pair.dst.status(), "inmigrate");
    let _ = pair.dst.listen_uri();
    pair
}

/// Waits until the source VM stopped for the switchover; returns its last pass there.
fn source_stopped_after(pair: &Pair) -> u64 {
    wait_until(secs(60), "source to stop", || {
        (pair.src.status() == "postmigrate").then(|| pair.src.last_pass().map_or(0, |p| p.pass))
    })
}

/// Starts a postcopy that moves only the pages the destination asks for, and waits until the
/// destination runs the guest.
fn start_postcopy_without_background(pair: &mut Pair) {
    pair.start_migration(json!({"mode": "postcopy", "no_background": true}));
    pair.dst.wait_phase(secs(120), &["postcopy"]);
}

#[test]
fn postcopy_memtouch_1g_prefilled_two_vcpus() {
    if !require_kvm("postcopy_memtouch_1g_prefilled_two_vcpus") {
        return;
    }
    let t = TestEnv::new("postcopy-1g");
    let mut pair = memtouch_pair(&t, "1G", 2, MEMTOUCH_CMDLINE);
    pair.src.wait_pass(secs(60), 3);

    let o = pair.migrate_and_wait(json!({"mode": "postcopy"}), secs(300));
    assert_completed("source", &o);
    let dv = wait_dest_completed(&mut pair.dst, secs(60));
    assert_eq!(pair.src.status(), "postmigrate");

    // Pure postcopy: no precopy round, every page crossed exactly once after the switchover,
    // either requested or pushed.
    let total = o.stat("total_pages");
    assert_eq!(total, (1 << 30) / PAGE_SIZE);
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
        o.stat("bytes_sent") >= o.stat("pages_sent") * PAGE_SIZE,
        "{}",
        o.raw
    );
    assert!(o.stat("downtime_us") > 0, "{}", o.raw);
    // The destination reports its side too: the time from the source's switchover to the VM
    // running here (at most the source's whole downtime, plus its own clock's slack), and the
    // bytes per second it received.
    let (dst_downtime, dst_rate) = (
        dv["stats"]["downtime_us"].as_u64().unwrap_or(0),
        dv["stats"]["throughput_bps"].as_u64().unwrap_or(0),
    );
    assert!(dst_downtime > 0 && dst_rate > 0, "{dv}");
    assert_dest_postcopy_stats(&dv, 2);
    // The destination counts zero records among urgent pages but not among pushed ones.
    let dest_zero = dv["stats"]["zero_pages"].as_u64().unwrap_or(0)
        + dv["stats"]["holes_skipped"].as_u64().unwrap_or(0);
    assert!(
        pc(&dv, "pages_urgent") + pc(&dv, "pages_pushed") + dest_zero >= total
            && pc(&dv, "pages_urgent") + pc(&dv, "pages_pushed") <= total,
        "the destination did not receive every page exactly once: {dv}"
    );

    assert_umemds_rss_bounded(&pair, 1 << 30);

    assert_guest_continues(&pair.src, &mut pair.dst, 5, secs(120));

    // Outside what the guest still writes, the destination holds the source's final bytes.
    let sd = assert_same_ram_outside_working_set(&pair.src, &pair.dst, MEMTOUCH_PAGES);
    assert_eq!(sd.len(), 1, "1 GiB is one RAM block: {sd:?}");
    assert_ne!(
        sd,
        pair.src.digest(),
        "the exclusions changed nothing: the digest ignores them"
    );
    assert!(pair.umemds_serving(), "a umemd died");
}

#[test]
fn postcopy_digest_guest_matches_unmigrated_run() {
    if !require_kvm("postcopy_digest_guest_matches_unmigrated_run") {
        return;
    }
    let t = TestEnv::new("postcopy-digest");
    let setup = MigrationSetup::new(&t, "64M", "digest", DIGEST_CMDLINE);
    let mut pair = setup.start();
    let mut reference = setup.guest_vm("reference", &pair.src_umemd);

    pair.src
        .wait_serial(secs(120), "round=3", |l| l == "round=3");
    // The guest's RAM is small and mostly holes: unthrottled, the background could deliver
    // every page before the guest touches one, and this test is about the fault path too.
    let o = pair.migrate_and_wait(
        json!({"mode": "postcopy", "bandwidth_limit": 1_000_000}),
        secs(240),
    );
    assert_completed("source", &o);
    assert!(
        o.raw["postcopy"].is_object(),
        "no postcopy phase: {}",
        o.raw
    );
    assert_eq!(o.stat("rounds"), 0, "{}", o.raw);
    assert_eq!(pair.src.status(), "postmigrate");
    assert_digest_guest_moved_mid_run(&pair.src);
    let dv = wait_dest_completed(&mut pair.dst, secs(60));
    assert_dest_postcopy_stats(&dv, 1);

    assert_digest_matches_reference(&mut reference, &mut pair.dst);
    assert_every_round_once(&pair.src, &pair.dst);
}

/// A guest that rewrites its 64 MiB working set as fast as it can: about 1 GiB/s of dirtying
/// where guest code is emulated.
const FAST_DIRTIER: &str = "pages=16384 pause=0";
/// The working set of [`FAST_DIRTIER`], in pages.
const FAST_DIRTIER_PAGES: u64 = 16384;
const FAST_DIRTIER_MEM: &str = "96M";
/// Background bandwidth well below the fast dirtier's dirty rate (even on a loaded machine),
/// so precopy cannot converge: each round leaves the whole working set dirty again.
const SLOW_LINK: u64 = 16_000_000;

/// A [`FAST_DIRTIER`] source that has made two passes, and its destination.
fn fast_dirtier_pair(t: &TestEnv) -> Pair {
    let mut pair = memtouch_pair(t, FAST_DIRTIER_MEM, 1, FAST_DIRTIER);
    pair.src.wait_pass(secs(60), 2);
    pair
}

/// After the migration of a [`FAST_DIRTIER`]: the guest continues on the destination, whose
/// RAM outside the working set is the source's.
fn assert_fast_dirtier_continues(pair: &mut Pair) {
    assert_guest_continues(&pair.src, &mut pair.dst, 3, secs(120));
    assert_same_ram_outside_working_set(&pair.src, &pair.dst, FAST_DIRTIER_PAGES);
}

/// A hybrid migration of [`FAST_DIRTIER`] over [`SLOW_LINK`].
fn hybrid_fast_dirtier(name: &str, postcopy_after_rounds: u32) -> MigrationOutcome {
    let t = TestEnv::new(name);
    let mut pair = fast_dirtier_pair(&t);
    let o = pair.migrate_and_wait(
        json!({
            "mode": "hybrid",
            "downtime_limit_ms": 1,
            "postcopy_after_rounds": postcopy_after_rounds,
            "max_rounds": 30,
            "bandwidth_limit": SLOW_LINK,
        }),
        secs(300),
    );
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
    assert_eq!(o.raw["switchover"], "postcopy", "{}", o.raw);
    assert_eq!(pc(&o.raw, "remaining_pages"), 0, "{}", o.raw);
    // Every page went once in the first round; what the guest dirtied since went again, in
    // later rounds or after the switchover.
    assert!(
        o.stat("pages_sent") + o.stat("zero_pages") >= o.stat("total_pages"),
        "{}",
        o.raw
    );
    let dv = wait_dest_completed(&mut pair.dst, secs(60));
    assert_eq!(dv["stats"]["rounds"], o.raw["stats"]["rounds"], "{dv}");
    assert!(dv["postcopy"].is_object(), "destination: {dv}");
    assert_eq!(dv["switchover"], "postcopy", "{dv}");
    assert_eq!(pc(&dv, "remaining_pages"), 0, "{dv}");
    assert_fast_dirtier_continues(&mut pair);
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

/// memtouch with a working set of [`SMALL_PAGES`] pages.
const SMALL_MEMTOUCH: &str = "pages=1024 pause=1000";
/// The working set of [`SMALL_MEMTOUCH`], in pages.
const SMALL_PAGES: u64 = 1024;

#[test]
fn postcopy_no_background_sends_only_requested_pages() {
    if !require_kvm("postcopy_no_background_sends_only_requested_pages") {
        return;
    }
    let t = TestEnv::new("postcopy-no-background");
    let mut pair = memtouch_pair(&t, "32M", 1, SMALL_MEMTOUCH);
    let total = (32 << 20) / PAGE_SIZE;
    pair.src.wait_pass(secs(60), 3);
    start_postcopy_without_background(&mut pair);
    let src_last = source_stopped_after(&pair);
    pair.dst.wait_pass(secs(120), src_last + 3);

    // Only the working set (and the guest's image and stack) was fetched; nothing else moves.
    std::thread::sleep(secs(1));
    for (who, vm) in [("source", &pair.src), ("destination", &pair.dst)] {
        let v = vm.query_migrate();
        assert_eq!(v["phase"], "postcopy", "{who}: {v}");
        assert_eq!(pc(&v, "pages_pushed"), 0, "{who} pushed pages: {v}");
    }
    let v = pair.dst.query_migrate();
    let fetched = total - pc(&v, "remaining_pages");
    assert!(
        (SMALL_PAGES..SMALL_PAGES + 1024).contains(&fetched),
        "destination holds {fetched} pages; expected the working set ({SMALL_PAGES}) plus a few: {v}"
    );
    let sv = pair.src.query_migrate();
    assert!(
        sv["stats"]["bytes_sent"].as_u64().unwrap_or(0)
            < (SMALL_PAGES + 1024) * PAGE_SIZE * 11 / 10,
        "the source sent more than the requested pages: {sv}"
    );
    // While pages are missing, both umemds keep idle CPUs awake for the requests.
    assert_wake_latency_request(&pair, true);

    // The VMM's own reads of guest RAM fault too and are served: reading all of it fetches
    // every remaining page and so ends the migration.
    let _ = pair.dst.digest();
    let o = pair.src.wait_migration(secs(120));
    assert_completed("source", &o);
    let dv = wait_dest_completed(&mut pair.dst, secs(60));
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
    assert_wake_latency_request(&pair, false);
    assert_eq!(
        o.stat("pages_sent") + o.stat("zero_pages"),
        total,
        "{}",
        o.raw
    );
    // Page data plus small per-request framing, and nothing twice.
    let bytes = o.stat("bytes_sent");
    assert!(
        bytes >= total * PAGE_SIZE && bytes < total * PAGE_SIZE * 21 / 20,
        "source sent {bytes} bytes for {} bytes of RAM: {}",
        total * PAGE_SIZE,
        o.raw
    );
    assert_dest_postcopy_stats(&dv, 1);
    assert!(
        pc(&dv, "faults") >= total - fetched,
        "every page read by the digest faulted: {dv}"
    );

    assert_guest_continues(&pair.src, &mut pair.dst, 3, secs(120));
    assert_same_ram_outside_working_set(&pair.src, &pair.dst, SMALL_PAGES);
}

#[test]
fn postcopy_with_the_wake_latency_request_off_leaves_the_host_alone() {
    if !require_kvm("postcopy_with_the_wake_latency_request_off_leaves_the_host_alone") {
        return;
    }
    let t = TestEnv::new("postcopy-wake-latency-off");
    let mut pair = MigrationSetup::memtouch(&t, "32M", SMALL_MEMTOUCH)
        .prefilled()
        .umemd_arg("--cpu-wake-latency-us")
        .umemd_arg("off")
        .start();
    pair.src.wait_pass(secs(60), 2);
    start_postcopy_without_background(&mut pair);
    let src_last = source_stopped_after(&pair);
    pair.dst.wait_pass(secs(120), src_last + 2);
    assert_eq!(pair.dst.query_migrate()["phase"], "postcopy");
    assert_wake_latency_request(&pair, false);
    let _ = pair.dst.digest();
    assert_completed("source", &pair.src.wait_migration(secs(120)));
    wait_dest_completed(&mut pair.dst, secs(60));
}

#[test]
fn postcopy_survives_source_vmm_exit_after_switchover() {
    if !require_kvm("postcopy_survives_source_vmm_exit_after_switchover") {
        return;
    }
    let t = TestEnv::new("postcopy-src-vmm-exit");
    let mut pair = memtouch_pair(&t, "1G", 2, MEMTOUCH_CMDLINE);
    pair.src.wait_pass(secs(60), 3);
    // 100 MB/s in the background: 1 GiB takes about 10 s, so pages are still missing when
    // the source VMM goes.
    pair.start_migration(json!({"mode": "postcopy", "bandwidth_limit": 100_000_000}));
    wait_until(secs(120), "source to hand the VM over", || {
        (pair.src.status() == "postmigrate").then_some(())
    });
    let ex = memtouch_exclude(MEMTOUCH_PAGES);
    let sd = pair.src.digest_excluding(&ex);
    let v = pair.dst.query_migrate();
    assert_eq!(v["phase"], "postcopy", "destination: {v}");
    let missing = pc(&v, "remaining_pages");
    assert!(missing > 0, "nothing left to fetch: {v}");
    pair.src.proc.kill();
    eprintln!("source VMM killed with {missing} pages still missing on the destination");

    let dv = wait_dest_completed(&mut pair.dst, secs(180));
    assert_dest_postcopy_stats(&dv, 2);
    assert!(
        pair.src_umemd.is_serving(),
        "the source umemd died with its VMM"
    );
    assert_eq!(
        sd,
        pair.dst.digest_excluding(&ex),
        "RAM differs between source and destination"
    );

    // The source's serial output outlives it: the passes it printed before it stopped.
    assert_guest_runs_on(&pair.src, &mut pair.dst, 3, secs(120));
    assert_eq!(pair.dst.status(), "running");
}

/// A no-background postcopy (so pages are surely missing) of a small memtouch guest, running
/// on the destination.
fn postcopy_running_on_destination(t: &TestEnv) -> (Pair, u64) {
    let mut pair = memtouch_pair(t, "256M", 1, SMALL_MEMTOUCH);
    pair.src.wait_pass(secs(60), 3);
    pair.start_migration(json!({"mode": "postcopy", "no_background": true}));
    pair.dst.wait_phase(secs(120), &["postcopy"]);
    wait_until(secs(60), "source to stop", || {
        (pair.src.status() == "postmigrate").then_some(())
    });
    let src_last = pair.src.last_pass_number();
    pair.dst.wait_pass(secs(120), src_last + 2);
    let v = pair.dst.query_migrate();
    assert!(pc(&v, "remaining_pages") > 0, "{v}");
    (pair, src_last)
}

/// After a umemd was started again: both sides go back to postcopy, the rest of the pages
/// come (in the background too, so that the no-background migration ends), the migration
/// completes with a recovery counted, and the guest's memory is right.
fn assert_resumes_and_completes(pair: &mut Pair) {
    wait_until(secs(30), "both sides to resume", || {
        (pair.dst.phase() == "postcopy" && pair.src.phase() == "postcopy").then_some(())
    });
    pair.src
        .ctl("migrate-set-parameters", json!({"no_background": false}))
        .expect("migrate-set-parameters");
    let o = pair.src.wait_migration(secs(180));
    assert_completed("source", &o);
    let dv = wait_dest_completed(&mut pair.dst, secs(120));
    assert!(pc(&dv, "recoveries") >= 1, "{dv}");
    assert_guest_runs_on(&pair.src, &mut pair.dst, 2, secs(120));
    assert_same_ram_outside_working_set(&pair.src, &pair.dst, SMALL_PAGES);
}

#[test]
fn postcopy_destination_umemd_killed_and_started_again_takes_the_migration_over() {
    if !require_kvm("postcopy_destination_umemd_killed_and_started_again_takes_the_migration_over")
    {
        return;
    }
    let t = TestEnv::new("postcopy-restart-dst-umemd");
    let (mut pair, _) = postcopy_running_on_destination(&t);
    pair.dst_umemd.proc.kill();
    // The destination VMM holds the memfd and the userfaultfd: the VM runs on the pages it
    // has, and the migration waits for a umemd to take it over.
    wait_until(secs(30), "both sides to pause", || {
        (pair.dst.phase() == "postcopy-paused" && pair.src.phase() == "postcopy-paused")
            .then_some(())
    });
    assert_eq!(pair.dst.status(), "running");
    assert_eq!(pair.src.status(), "postmigrate");
    // The control socket answers at once, and says why a digest cannot be had.
    let t0 = std::time::Instant::now();
    let e = pair
        .dst
        .ctl("query-ram-digest", Value::Null)
        .expect_err("a RAM digest of a VM with missing pages");
    assert!(e.contains("missing"), "{e}");
    assert!(
        t0.elapsed() < secs(5),
        "query-ram-digest took {:?}",
        t0.elapsed()
    );

    // systemd's Restart= in a test: a new umemd on the same socket. The VMM hands it the
    // migration, the source comes back to it, and every page arrives.
    std::thread::sleep(secs(1));
    pair.dst_umemd = t.umemd("umemd-dst");
    assert_resumes_and_completes(&mut pair);
}

#[test]
fn postcopy_source_umemd_killed_and_started_again_takes_the_migration_over() {
    if !require_kvm("postcopy_source_umemd_killed_and_started_again_takes_the_migration_over") {
        return;
    }
    let t = TestEnv::new("postcopy-restart-src-umemd");
    let (mut pair, _) = postcopy_running_on_destination(&t);
    pair.src_umemd.proc.kill();
    // The destination lost its source: it pauses and waits for it, the VM running on the
    // pages it has; the source VMM keeps its memory and waits for a umemd.
    wait_until(secs(60), "both sides to pause", || {
        pair.dst.proc.assert_alive();
        (pair.dst.phase() == "postcopy-paused" && pair.src.phase() == "postcopy-paused")
            .then_some(())
    });
    assert_eq!(pair.dst.status(), "running");
    assert_eq!(
        pair.src.status(),
        "postmigrate",
        "the source resumed a VM that moved"
    );
    assert!(
        pair.src.ctl("cont", json!({})).is_err(),
        "cont resumed the source copy of a VM that ran on the destination"
    );
    let all = combined_passes(&pair.src, &pair.dst);
    assert_consecutive("source+destination", &all);
    assert_no_bad("source+destination", &all);

    // A page that never arrived is still missing, not zero: reading it waits (or, where the
    // kernel refuses a remote fault on a userfaultfd range, fails), and whatever it returns is
    // the source's bytes.
    let off = 128 << 20;
    let (src, dst) = (&pair.src, &pair.dst);
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

    // systemd's Restart= in a test: a new umemd on the source's socket takes the migration
    // over from the memfd the source VMM kept, and the destination gets every page.
    pair.src_umemd = t.umemd("umemd-src");
    assert_resumes_and_completes(&mut pair);
}

#[test]
fn start_postcopy_switches_a_precopy_that_cannot_converge() {
    if !require_kvm("start_postcopy_switches_a_precopy_that_cannot_converge") {
        return;
    }
    let t = TestEnv::new("postcopy-start");
    let mut pair = fast_dirtier_pair(&t);
    pair.start_migration(json!({
        "mode": "precopy",
        "downtime_limit_ms": 1,
        "max_rounds": 100_000,
        "bandwidth_limit": SLOW_LINK,
    }));
    let v = wait_until(secs(120), "two precopy rounds", || {
        let v = pair.src.query_migrate();
        assert_ne!(v["phase"], "completed", "precopy converged after all: {v}");
        (v["phase"] == "precopy" && v["stats"]["rounds"].as_u64().unwrap_or(0) >= 2).then_some(v)
    });
    assert!(v["postcopy"].is_null(), "{v}");
    pair.src
        .ctl("migrate-start-postcopy", json!({}))
        .expect("migrate-start-postcopy");
    let o = pair.src.wait_migration(secs(300));
    assert_completed("source", &o);
    eprintln!("source {}", o.raw);
    assert!(o.stat("rounds") >= 2, "{}", o.raw);
    assert!(
        o.raw["postcopy"].is_object(),
        "the migration never went through postcopy: {}",
        o.raw
    );
    let dv = wait_dest_completed(&mut pair.dst, secs(60));
    assert!(dv["postcopy"].is_object(), "destination: {dv}");
    assert_fast_dirtier_continues(&mut pair);
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
    let mut pair = memtouch_pair(&t, "32M", 1, SMALL_MEMTOUCH);
    let total = (32 << 20) / PAGE_SIZE;
    pair.src.wait_pass(secs(60), 2);
    start_postcopy_without_background(&mut pair);
    let _ = pair.dst.digest();
    let o = pair.src.wait_migration(secs(120));
    assert_completed("source", &o);
    let dv = wait_dest_completed(&mut pair.dst, secs(60));
    let d = |k: &str| dv["stats"][k].as_u64().unwrap_or(0);
    assert_eq!(
        d("pages_sent") + d("zero_pages"),
        o.stat("pages_sent") + o.stat("zero_pages"),
        "destination and source disagree on the pages that crossed: source {}\ndestination {dv}",
        o.raw
    );
    assert_eq!(d("pages_sent") + d("zero_pages"), total, "{dv}");
    assert!(d("bytes_sent") >= total * PAGE_SIZE * 9 / 10, "{dv}");
}

/// Within one host the migration stream may be a Unix socket (`--incoming unix:PATH`): a
/// postcopy over it uses both of its connections (background and requested pages) and ends as
/// over TCP, with the guest's memory intact.
#[test]
fn postcopy_over_a_unix_socket() {
    if !require_kvm("postcopy_over_a_unix_socket") {
        return;
    }
    let t = TestEnv::new("postcopy-unix");
    let setup = MigrationSetup::memtouch(&t, "256M", MEMTOUCH_CMDLINE).prefilled();
    let (su, du) = setup.start_umemds();
    let mut src = setup.source(&su);
    let path = t.dir().join("migration.sock");
    let mut dst = t
        .vmm("dst", &du)
        .mem("256M")
        .incoming(&format!("unix:{}", path.display()))
        .start();
    let uri = dst.listen_uri();
    assert_eq!(uri, format!("unix:{}", path.display()));
    src.wait_pass(secs(60), 2);
    src.migrate(&uri, json!({"mode": "postcopy"}))
        .expect("migrate over a unix socket");
    let o = src.wait_migration(secs(120));
    assert_completed("source", &o);
    let dv = wait_dest_completed(&mut dst, secs(60));
    assert_eq!(pc(&dv, "remaining_pages"), 0, "{dv}");
    assert_guest_continues(&src, &mut dst, 3, secs(60));
    assert_same_ram_outside_working_set(&src, &dst, MEMTOUCH_PAGES);
    drop(dst);
    drop(du);
    assert!(
        !path.exists(),
        "the destination left its socket file behind"
    );
}
