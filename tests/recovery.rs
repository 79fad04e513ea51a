//! Postcopy recovery on a new connection: a link cut or stalled after the VM ran on the
//! destination pauses both sides (the destination VM runs on the pages it has), the source
//! reconnects by itself, the destination says which pages it holds, and the migration
//! completes with every page right, without restarting any VMM.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use umem_testkit::pair::{
    assert_completed, assert_guest_runs_on, assert_same_ram_outside_working_set,
    assert_wake_latency_request, MigrationSetup, Pair, MEMTOUCH_CMDLINE, MEMTOUCH_PAGES,
};
use umem_testkit::proxy::FaultProxy;
use umem_testkit::{require_kvm, secs, wait_until, TestEnv, Vmm};

const LINK_TIMEOUT_MS: u64 = 1000;

fn postcopy_stat(vm: &Vmm, key: &str) -> u64 {
    vm.query_migrate()["postcopy"][key].as_u64().unwrap_or(0)
}

/// A 256 MiB prefilled memtouch guest in postcopy through `proxy`, the background limited so
/// that the migration is still going when the test breaks the link.
fn postcopy_through_proxy(t: &TestEnv) -> (Pair, FaultProxy) {
    let mut pair = MigrationSetup::memtouch(t, "256M", MEMTOUCH_CMDLINE)
        .prefilled()
        .start();
    pair.src.wait_pass(secs(60), 2);
    let proxy = FaultProxy::in_front_of(&pair.dst.listen_uri());
    pair.src
        .migrate(
            &proxy.uri(),
            json!({"mode": "postcopy", "bandwidth_limit": 40_000_000,
                   "link_timeout_ms": LINK_TIMEOUT_MS}),
        )
        .expect("migrate");
    pair.dst.wait_phase(secs(60), &["postcopy"]);
    let last = pair.src.last_pass_number();
    pair.dst.wait_pass(secs(60), last + 1);
    (pair, proxy)
}

/// Both sides show `postcopy-paused` with a reason; the destination VM still runs.
fn assert_paused(pair: &Pair) {
    wait_until(secs(10), "both sides to pause", || {
        (pair.src.phase() == "postcopy-paused" && pair.dst.phase() == "postcopy-paused")
            .then_some(())
    });
    for vm in [&pair.src, &pair.dst] {
        let v = vm.query_migrate();
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{}: paused without a reason: {v}",
            vm.name
        );
    }
    assert_eq!(pair.dst.status(), "running", "the destination VM stopped");
    assert_eq!(pair.src.status(), "postmigrate");
}

/// After the link is back: pages flow again soon, the migration completes on both sides with
/// one recovery counted, and the guest's memory is right.
fn assert_recovers(pair: &mut Pair, back: Instant) -> Duration {
    wait_until(secs(30), "the source to resume", || {
        (pair.src.phase() != "postcopy-paused").then_some(())
    });
    let resumed = back.elapsed();
    let o = pair.src.wait_migration(secs(180));
    assert_completed("source", &o);
    pair.dst.wait_phase(secs(60), &["completed"]);
    for vm in [&pair.src, &pair.dst] {
        assert_eq!(postcopy_stat(vm, "recoveries"), 1, "{}", vm.query_migrate());
        assert!(postcopy_stat(vm, "paused_us") > 0, "{}", vm.query_migrate());
    }
    assert_guest_runs_on(&pair.src, &mut pair.dst, 3, secs(60));
    assert_same_ram_outside_working_set(&pair.src, &pair.dst, MEMTOUCH_PAGES);
    resumed
}

#[test]
fn postcopy_resumes_after_the_link_is_cut_and_back() {
    if !require_kvm("postcopy_resumes_after_the_link_is_cut_and_back") {
        return;
    }
    let t = TestEnv::new("recover-cut");
    let (mut pair, proxy) = postcopy_through_proxy(&t);
    let before = postcopy_stat(&pair.dst, "remaining_pages");
    proxy.cut();
    assert_paused(&pair);
    // Down for a while: the source keeps trying, the destination VM keeps running.
    let passes = pair.dst.last_pass_number();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(pair.src.phase(), "postcopy-paused");
    assert!(
        postcopy_stat(&pair.dst, "remaining_pages") > 0,
        "nothing was left to recover (remaining before the cut: {before})"
    );
    eprintln!(
        "while paused the destination went from pass {passes} to {}",
        pair.dst.last_pass_number()
    );
    let e = pair
        .dst
        .ctl("query-ram-digest", Value::Null)
        .expect_err("a RAM digest while pages are out of reach");
    assert!(e.contains("missing"), "{e}");
    // Nothing flows while paused: idle CPUs go back to the host's policy until the link is back.
    assert_wake_latency_request(&pair, false);

    proxy.restore();
    let took = assert_recovers(&mut pair, Instant::now());
    eprintln!("pages flowed again {took:?} after the link was back");
}

#[test]
fn postcopy_resumes_after_a_stall_of_twice_the_link_timeout() {
    if !require_kvm("postcopy_resumes_after_a_stall_of_twice_the_link_timeout") {
        return;
    }
    let t = TestEnv::new("recover-stall");
    let (mut pair, proxy) = postcopy_through_proxy(&t);
    proxy.stall();
    std::thread::sleep(Duration::from_millis(2 * LINK_TIMEOUT_MS));
    assert_paused(&pair);
    proxy.restore();
    let took = assert_recovers(&mut pair, Instant::now());
    eprintln!("pages flowed again {took:?} after the stall ended");
}

#[test]
fn migrate_pause_then_recover_and_resume_on_a_new_address() {
    if !require_kvm("migrate_pause_then_recover_and_resume_on_a_new_address") {
        return;
    }
    let t = TestEnv::new("recover-new-address");
    let (mut pair, proxy) = postcopy_through_proxy(&t);
    // Only a running postcopy can be paused, only a paused one resumed or recovered.
    assert!(pair
        .dst
        .ctl("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}))
        .is_err());
    assert!(pair
        .src
        .ctl("migrate-resume", json!({"uri": proxy.uri()}))
        .is_err());

    pair.src
        .ctl("migrate-pause", json!({}))
        .expect("migrate-pause");
    assert_paused(&pair);
    // Paused on purpose: the source does not reconnect by itself, though the old path works.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(pair.src.phase(), "postcopy-paused");

    // The destination listens somewhere else, and the source is told to go there.
    let old = pair.dst.listen_uri();
    pair.dst
        .ctl("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}))
        .expect("migrate-recover");
    let new = wait_until(secs(10), "a new listen_uri", || {
        pair.dst.query_migrate()["listen_uri"]
            .as_str()
            .filter(|u| *u != old)
            .map(str::to_string)
    });
    let back = Instant::now();
    pair.src
        .ctl("migrate-resume", json!({"uri": new}))
        .expect("migrate-resume");
    let took = assert_recovers(&mut pair, back);
    eprintln!("pages flowed again {took:?} after migrate-resume");
}
