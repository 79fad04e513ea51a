//! umemd needs no privilege: run as `nobody` (uid and gid 65534, no supplementary group) on
//! both hosts, with root VMMs, it migrates a VM in postcopy and in precopy. The VMM makes the
//! memfd and the userfaultfd (so `vm.unprivileged_userfaultfd` does not matter) and hands
//! them over; mapping the memfd, `pwrite`, `fallocate` and `UFFDIO_COPY` on them need only the
//! descriptors.
//!
//! Run with `cargo test --release --test unprivileged -- --test-threads=1` (see
//! `testkit/src/lib.rs`). Needs root (to start umemd as another user) and /dev/kvm.

use serde_json::json;
use umem_testkit::pair::{
    assert_completed, assert_guest_continues, assert_guest_runs_on, assert_same_ram,
    assert_same_ram_outside_working_set, MigrationSetup, MEMTOUCH_CMDLINE, MEMTOUCH_PAGES,
};
use umem_testkit::users::{require_root, NOBODY};
use umem_testkit::{require_kvm, secs, TestEnv, Umemd};

/// A umemd running as `nobody`, checked to really run as it.
fn nobody_umemd(t: &TestEnv, name: &str) -> Umemd {
    let u = t.umemd_builder(name).user(NOBODY, NOBODY).start();
    assert_eq!(
        u.uids(),
        vec![NOBODY; 4],
        "{name} does not run as uid {NOBODY}"
    );
    u
}

#[test]
fn postcopy_with_umemds_running_as_nobody() {
    if !require_root("postcopy_with_umemds_running_as_nobody")
        || !require_kvm("postcopy_with_umemds_running_as_nobody")
    {
        return;
    }
    let t = TestEnv::new("unprivileged-postcopy");
    let mut su = nobody_umemd(&t, "umemd-src");
    let mut du = nobody_umemd(&t, "umemd-dst");
    let setup = MigrationSetup::memtouch(&t, "256M", MEMTOUCH_CMDLINE).prefilled();
    let mut src = setup.source(&su);
    let mut dst = setup.destination("dst", &du);
    src.wait_pass(secs(60), 2);

    // Throttled, so that the destination runs while most pages are still missing and its
    // faults are resolved by umemd's UFFDIO_COPY through the root VMM's userfaultfd.
    let o = src.migrate_to(
        &mut dst,
        json!({"mode": "postcopy", "bandwidth_limit": 64_000_000}),
        secs(180),
    );
    assert_completed("source", &o);
    assert_eq!(o.stat("rounds"), 0, "pure postcopy: {}", o.raw);
    let d = dst.wait_migration(secs(60));
    assert_completed("destination", &d);
    assert!(
        d.raw["postcopy"]["faults"].as_u64().unwrap_or(0) > 0,
        "no page fault was resolved by the unprivileged umemd: {}",
        d.raw
    );
    assert_eq!(d.raw["postcopy"]["remaining_pages"].as_u64(), Some(0));

    assert_guest_continues(&src, &mut dst, 3, secs(120));
    assert_same_ram_outside_working_set(&src, &dst, MEMTOUCH_PAGES);
    assert!(
        su.is_serving() && du.is_serving(),
        "a umemd stopped serving"
    );
}

#[test]
fn precopy_with_umemds_running_as_nobody() {
    if !require_root("precopy_with_umemds_running_as_nobody")
        || !require_kvm("precopy_with_umemds_running_as_nobody")
    {
        return;
    }
    let t = TestEnv::new("unprivileged-precopy");
    let mut su = nobody_umemd(&t, "umemd-src");
    let mut du = nobody_umemd(&t, "umemd-dst");
    let setup = MigrationSetup::memtouch(&t, "256M", MEMTOUCH_CMDLINE)
        .prefilled()
        .paused_destination();
    let mut src = setup.source(&su);
    let mut dst = setup.destination("dst", &du);
    src.wait_pass(secs(60), 2);
    let o = src.migrate_to(&mut dst, json!({}), secs(180));
    assert_completed("source", &o);
    assert_same_ram(&src, &dst);
    dst.resume();
    assert_guest_runs_on(&src, &mut dst, 2, secs(60));
    assert!(
        su.is_serving() && du.is_serving(),
        "a umemd stopped serving"
    );
}
