//! The switchover is a commit: the VM never runs on two hosts. A fault proxy between the
//! umemds drops one message of the switchover exchange (the destination's `Drained` or
//! `Ready`, the source's `Commit`, the destination's `Started`) and cuts the link; then exactly
//! one side may run the guest, or neither until the operator decides. Two racing `migrate`
//! commands on one source are the other way a VM could run twice: only one may proceed.

use std::time::Duration;

use proto::peer::kind;
use serde_json::json;
use umem_testkit::pair::{
    assert_completed, assert_destination_failed_without_running, assert_guest_runs_on,
    assert_keeps_running, AfterFailure, MigrationSetup, Pair, MEMTOUCH_CMDLINE,
};
use umem_testkit::proxy::{Direction, FaultProxy};
use umem_testkit::{require_kvm, secs, wait_until, TestEnv, Vmm};

/// A memtouch pair on 64 MiB, source running a few passes.
fn memtouch_pair(t: &TestEnv) -> Pair {
    let mut pair = MigrationSetup::memtouch(t, "64M", MEMTOUCH_CMDLINE).start();
    pair.src.wait_pass(secs(60), 2);
    pair
}

/// Migrates `pair` in `mode` through a proxy that drops the first frame of `frame` travelling
/// in `dir` and cuts the link; returns the proxy once the source's migration ended.
fn migrate_dropping(pair: &mut Pair, mode: &str, dir: Direction, frame: u8) -> FaultProxy {
    let proxy = FaultProxy::in_front_of(&pair.dst.listen_uri());
    proxy.cut_at_frame(dir, frame);
    pair.src
        .migrate(&proxy.uri(), json!({ "mode": mode }))
        .expect("migrate");
    let o = pair.src.wait_migration(secs(90));
    assert!(proxy.fired(), "the proxy never saw the frame {frame:#x}");
    assert_eq!(o.phase, "failed", "source: {}", o.raw);
    proxy
}

/// `vm` does not run the guest: its status says so and its serial output stays the same for a
/// while (memtouch prints a few passes per second when it runs).
fn assert_stays_stopped(who: &str, vm: &Vmm, status: &str) {
    let before = vm.serial();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(vm.status(), status, "{who} status");
    assert_eq!(vm.serial(), before, "{who} ran the guest");
}

/// After a switchover that failed before the commit: the source runs the guest, and the
/// destination failed without running it and listens again.
fn assert_only_the_source_runs(pair: &mut Pair) {
    assert_keeps_running("source", &mut pair.src);
    assert_destination_failed_without_running(&mut pair.dst, secs(30), AfterFailure::ListensAgain);
    assert_stays_stopped("destination", &pair.dst, "inmigrate");
}

#[test]
fn lost_ready_precopy_source_resumes_destination_never_runs() {
    if !require_kvm("lost_ready_precopy_source_resumes_destination_never_runs") {
        return;
    }
    let t = TestEnv::new("lost-ready-precopy");
    let mut pair = memtouch_pair(&t);
    let _proxy = migrate_dropping(&mut pair, "precopy", Direction::ToSource, kind::READY);
    // The source never committed: it takes its guest back.
    assert_only_the_source_runs(&mut pair);

    // The link is back (here: no proxy): the same two VMMs try again, and the VM moves.
    let o = pair.migrate_and_wait(json!({}), secs(120));
    assert_completed("source (retry)", &o);
    pair.dst.wait_phase(secs(30), &["completed"]);
    assert_guest_runs_on(&pair.src, &mut pair.dst, 3, secs(60));
}

#[test]
fn lost_drained_the_source_never_stops_and_the_destination_never_runs() {
    if !require_kvm("lost_drained_the_source_never_stops_and_the_destination_never_runs") {
        return;
    }
    let t = TestEnv::new("lost-drained");
    let mut pair = memtouch_pair(&t);
    // The destination's answer to the drain before the stop is lost with the link: the source
    // had not stopped the VM yet, and keeps running it.
    let _proxy = migrate_dropping(&mut pair, "precopy", Direction::ToSource, kind::DRAINED);
    assert_only_the_source_runs(&mut pair);
}

#[test]
fn lost_ready_postcopy_source_resumes_destination_never_runs() {
    if !require_kvm("lost_ready_postcopy_source_resumes_destination_never_runs") {
        return;
    }
    let t = TestEnv::new("lost-ready-postcopy");
    let mut pair = memtouch_pair(&t);
    let _proxy = migrate_dropping(&mut pair, "postcopy", Direction::ToSource, kind::READY);
    assert_only_the_source_runs(&mut pair);
}

#[test]
fn lost_commit_neither_runs_until_the_operator_resumes_the_source() {
    if !require_kvm("lost_commit_neither_runs_until_the_operator_resumes_the_source") {
        return;
    }
    let t = TestEnv::new("lost-commit");
    let mut pair = memtouch_pair(&t);
    let _proxy = migrate_dropping(&mut pair, "precopy", Direction::ToDestination, kind::COMMIT);
    assert_destination_failed_without_running(&mut pair.dst, secs(30), AfterFailure::ListensAgain);
    // The source committed, the destination never heard it: neither runs.
    assert_stays_stopped("source", &pair.src, "postmigrate");
    assert_stays_stopped("destination", &pair.dst, "inmigrate");
    let e = pair
        .src
        .query_migrate()
        .get("error")
        .and_then(|e| e.as_str().map(str::to_string))
        .unwrap_or_default();
    assert!(e.contains("committed"), "source error: {e:?}");

    // A plain cont, and a new migrate, are refused; the operator's explicit choice is not.
    let e = pair.src.ctl("cont", json!({})).unwrap_err();
    assert!(e.contains("force"), "{e}");
    assert!(pair.src.migrate("tcp:127.0.0.1:1", json!({})).is_err());
    assert!(pair.src.ctl("migrate-cancel", json!({})).is_err());
    pair.src
        .ctl("cont", json!({"force": true}))
        .expect("cont force=true");
    assert_keeps_running("source", &mut pair.src);
}

#[test]
fn lost_started_precopy_source_never_resumes() {
    if !require_kvm("lost_started_precopy_source_never_resumes") {
        return;
    }
    let t = TestEnv::new("lost-started-precopy");
    let mut pair = memtouch_pair(&t);
    let _proxy = migrate_dropping(&mut pair, "precopy", Direction::ToSource, kind::STARTED);
    // The destination had every page and the commit: it runs the guest on, and the source
    // never takes it back by itself.
    pair.dst.wait_phase(secs(30), &["completed"]);
    assert_guest_runs_on(&pair.src, &mut pair.dst, 5, secs(60));
    assert_stays_stopped("source", &pair.src, "postmigrate");
    assert!(pair.src.ctl("cont", json!({})).is_err());
}

#[test]
fn lost_started_postcopy_pauses_both_sides_then_recovers() {
    if !require_kvm("lost_started_postcopy_pauses_both_sides_then_recovers") {
        return;
    }
    let t = TestEnv::new("lost-started-postcopy");
    let mut pair = memtouch_pair(&t);
    let proxy = FaultProxy::in_front_of(&pair.dst.listen_uri());
    proxy.cut_at_frame(Direction::ToSource, kind::STARTED);
    pair.src
        .migrate(
            &proxy.uri(),
            json!({"mode": "postcopy", "link_timeout_ms": 1000}),
        )
        .expect("migrate");
    // The destination ran the VM: both sides pause, and the source never takes it back.
    wait_until(secs(30), "both sides to pause", || {
        (pair.src.phase() == "postcopy-paused" && pair.dst.phase() == "postcopy-paused")
            .then_some(())
    });
    assert!(proxy.fired());
    assert_stays_stopped("source", &pair.src, "postmigrate");
    assert!(pair.src.ctl("cont", json!({})).is_err());
    // The link is back: the migration completes, every page right.
    proxy.restore();
    let o = pair.src.wait_migration(secs(120));
    assert_completed("source", &o);
    pair.dst.wait_phase(secs(60), &["completed"]);
    assert_guest_runs_on(&pair.src, &mut pair.dst, 3, secs(60));
}

#[test]
fn lost_commit_postcopy_neither_runs_until_the_operator_resumes_the_source() {
    if !require_kvm("lost_commit_postcopy_neither_runs_until_the_operator_resumes_the_source") {
        return;
    }
    let t = TestEnv::new("lost-commit-postcopy");
    let mut pair = memtouch_pair(&t);
    let proxy = FaultProxy::in_front_of(&pair.dst.listen_uri());
    proxy.cut_at_frame(Direction::ToDestination, kind::COMMIT);
    pair.src
        .migrate(
            &proxy.uri(),
            json!({"mode": "postcopy", "link_timeout_ms": 1000}),
        )
        .expect("migrate");
    // The destination never got the commit: it never ran, and listens again.
    assert_destination_failed_without_running(&mut pair.dst, secs(30), AfterFailure::ListensAgain);
    wait_until(secs(30), "the source to pause", || {
        (pair.src.phase() == "postcopy-paused").then_some(())
    });
    assert!(proxy.fired());
    // The link is back: the destination says it has no such migration, and the source gives
    // up; neither runs the VM.
    proxy.restore();
    let o = pair.src.wait_migration(secs(60));
    assert_eq!(o.phase, "failed", "{}", o.raw);
    assert!(
        o.error
            .as_deref()
            .is_some_and(|e| e.contains("cannot resume")),
        "{}",
        o.raw
    );
    assert_stays_stopped("source", &pair.src, "postmigrate");
    assert_stays_stopped("destination", &pair.dst, "inmigrate");
    pair.src
        .ctl("cont", json!({"force": true}))
        .expect("cont force=true");
    assert_keeps_running("source", &mut pair.src);
}

#[test]
fn racing_migrate_commands_only_one_proceeds() {
    if !require_kvm("racing_migrate_commands_only_one_proceeds") {
        return;
    }
    let t = TestEnv::new("racing-migrate");
    let setup = MigrationSetup::memtouch(&t, "256M", MEMTOUCH_CMDLINE).prefilled();
    let mut pair = setup.start();
    let mut dst2 = setup.destination("dst2", &pair.dst_umemd);
    pair.src.wait_pass(secs(60), 2);
    let uris = [pair.dst.listen_uri(), dst2.listen_uri()];

    // Both commands leave at the same moment from two connections.
    let barrier = std::sync::Barrier::new(2);
    let results: Vec<Result<serde_json::Value, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = uris
            .iter()
            .map(|uri| {
                let (src, barrier) = (&pair.src, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    src.migrate(uri, json!({"bandwidth_limit": 200_000_000}))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "exactly one migrate may proceed: {results:?}");
    let refused = results.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(refused.contains("already"), "{refused}");

    let o = pair.src.wait_migration(secs(120));
    assert_eq!(o.phase, "completed", "{}", o.raw);
    let (winner, loser) = if results[0].is_ok() {
        (&mut pair.dst, &mut dst2)
    } else {
        (&mut dst2, &mut pair.dst)
    };
    winner.wait_phase(secs(30), &["completed"]);
    assert_guest_runs_on(&pair.src, winner, 3, secs(60));
    assert_eq!(
        loser.status(),
        "inmigrate",
        "the other destination got a VM"
    );
    assert_eq!(loser.serial(), "");
    // The refused destination still waits, untouched, for a migration of its own.
    assert_eq!(loser.phase(), "setup");
}

#[test]
fn migrate_while_migrating_is_refused() {
    if !require_kvm("migrate_while_migrating_is_refused") {
        return;
    }
    // While a slow migration runs, a second one of the same VM is refused; the first goes on
    // untouched.
    let t = TestEnv::new("second-migrate");
    let setup = MigrationSetup::memtouch(&t, "256M", MEMTOUCH_CMDLINE).prefilled();
    let mut pair = setup.start();
    let mut dst2 = setup.destination("dst2", &pair.dst_umemd);
    pair.src.wait_pass(secs(60), 2);
    pair.start_migration(json!({"bandwidth_limit": 40_000_000}));
    wait_until(secs(60), "pages to flow", || {
        (pair.src.phase() == "precopy").then_some(())
    });
    let e = pair.src.migrate(&dst2.listen_uri(), json!({})).unwrap_err();
    assert!(e.contains("already"), "{e}");
    pair.src
        .ctl("migrate-set-parameters", json!({"bandwidth_limit": 0}))
        .unwrap();
    let o = pair.src.wait_migration(secs(120));
    assert_eq!(o.phase, "completed", "{}", o.raw);
    pair.dst.wait_phase(secs(30), &["completed"]);
    assert_guest_runs_on(&pair.src, &mut pair.dst, 3, secs(60));
    assert_eq!(dst2.status(), "inmigrate");
}
