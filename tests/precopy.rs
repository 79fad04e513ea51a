//! End-to-end precopy migrations: real vmm and umemd processes, real KVM, loopback TCP.
//!
//! Run with `cargo test --release --workspace -- --test-threads=1` (see `testkit/src/lib.rs`).

use serde_json::json;
use umem_testkit::pair::{
    assert_completed, assert_destination_failed_without_running, assert_digest_guest_moved_mid_run,
    assert_digest_matches_reference, assert_every_round_once, assert_failed_with,
    assert_guest_continues, assert_guest_runs_on, assert_same_ram, AfterFailure, MigrationSetup,
    Pair, DIGEST_CMDLINE, DIGEST_ROUNDS, MEMTOUCH_CMDLINE, MEMTOUCH_PAGES, PAGE_SIZE,
};
use umem_testkit::{
    assert_consecutive, assert_no_bad, closed_port, require_kvm, secs, wait_until, TestEnv, Vmm,
};

/// The source must keep running its guest after a failed migration: status "running", more
/// memtouch passes, none bad.
fn assert_source_keeps_running(src: &mut Vmm) {
    assert_eq!(
        src.status(),
        "running",
        "source status after a failed migration"
    );
    let last = src.last_pass().map_or(0, |p| p.pass);
    src.wait_pass(secs(60), last + 3);
    let passes = src.passes();
    assert_no_bad("source", &passes);
    assert_consecutive("source", &passes);
}

/// Starts a precopy limited to 40 MB/s (1 GiB needs ~25 s, so whatever the test does next
/// lands in the first round) and waits until pages flow.
fn start_slow_precopy(pair: &mut Pair) {
    pair.start_migration(json!({"bandwidth_limit": 40_000_000}));
    wait_until(secs(60), "pages to flow", || {
        let v = pair.src.query_migrate();
        (v["phase"] == "precopy" && v["stats"]["pages_sent"].as_u64().unwrap_or(0) > 2000)
            .then_some(())
    });
}

#[test]
fn precopy_memtouch_1g_prefilled_two_vcpus() {
    if !require_kvm("precopy_memtouch_1g_prefilled_two_vcpus") {
        return;
    }
    let t = TestEnv::new("precopy-1g");
    let mut pair = MigrationSetup::memtouch(&t, "1G", MEMTOUCH_CMDLINE)
        .vcpus(2)
        .prefilled()
        .paused_destination()
        .start();
    assert_eq!(pair.dst.status(), "inmigrate");
    pair.src.wait_pass(secs(60), 3);

    let o = pair.migrate_and_wait(json!({"downtime_limit_ms": 50}), secs(240));
    assert_completed("source", &o);
    assert_eq!(o.raw["switchover"], "precopy", "{}", o.raw);

    // Source stopped for good, destination holds the same memory and has not run yet.
    assert_eq!(pair.src.status(), "postmigrate");
    pair.dst.wait_phase(secs(30), &["completed"]);
    assert_eq!(
        pair.dst.status(),
        "paused",
        "-S destination must stay paused"
    );
    assert_eq!(
        pair.dst.serial(),
        "",
        "the paused destination printed something"
    );
    let sd = assert_same_ram(&pair.src, &pair.dst);
    assert_eq!(sd.len(), 1, "1 GiB is one RAM block: {sd:?}");

    // Everything was populated (prefill), so every page crossed once, as data or zero record.
    let total = o.stat("total_pages");
    assert_eq!(total, (1 << 30) / PAGE_SIZE);
    let (sent, zero) = (o.stat("pages_sent"), o.stat("zero_pages"));
    assert!(sent > 0, "{}", o.stats);
    assert!(sent + zero >= total, "not every page was sent: {}", o.stats);
    assert_eq!(
        o.stat("holes_skipped"),
        0,
        "prefilled RAM has no holes: {}",
        o.stats
    );
    assert!(
        o.stat("bytes_sent") >= (total - zero) * PAGE_SIZE,
        "bytes_sent below the populated non-zero bytes: {}",
        o.stats
    );
    assert!(o.stat("bytes_sent") >= sent * PAGE_SIZE, "{}", o.stats);
    assert!(o.stat("rounds") >= 1, "{}", o.stats);
    assert!(o.stat("downtime_us") > 0, "{}", o.stats);
    assert!(o.stat("total_us") >= o.stat("downtime_us"), "{}", o.stats);

    // The destination continues the guest where the source stopped it.
    pair.dst.resume();
    assert_guest_continues(&pair.src, &mut pair.dst, 5, secs(60));
}

#[test]
fn precopy_digest_guest_matches_unmigrated_run() {
    if !require_kvm("precopy_digest_guest_matches_unmigrated_run") {
        return;
    }
    let t = TestEnv::new("precopy-digest");
    let setup = MigrationSetup::new(&t, "64M", "digest", DIGEST_CMDLINE);
    let mut pair = setup.start();
    // The reference run and the migrated run go side by side.
    let mut reference = setup.guest_vm("reference", &pair.src_umemd);

    pair.src
        .wait_serial(secs(120), "round=3", |l| l == "round=3");
    let o = pair.migrate_and_wait(json!({}), secs(240));
    assert_completed("source", &o);
    assert_eq!(pair.src.status(), "postmigrate");
    assert_digest_guest_moved_mid_run(&pair.src);

    assert_digest_matches_reference(&mut reference, &mut pair.dst);
    assert_eq!(
        pair.dst.status(),
        "running",
        "destination without -S runs by itself"
    );

    assert_every_round_once(&pair.src, &pair.dst);
    assert!(pair
        .dst
        .serial()
        .contains(&format!("round={DIGEST_ROUNDS}")));
}

#[test]
fn precopy_above_4g_sparse() {
    if !require_kvm("precopy_above_4g_sparse") {
        return;
    }
    let t = TestEnv::new("precopy-5g");
    let mut pair = MigrationSetup::memtouch(&t, "5G", MEMTOUCH_CMDLINE)
        .paused_destination()
        .start();
    pair.src.wait_pass(secs(60), 3);
    let o = pair.migrate_and_wait(json!({"downtime_limit_ms": 50}), secs(240));
    assert_completed("source", &o);
    assert_eq!(pair.src.status(), "postmigrate");

    let total = o.stat("total_pages");
    assert_eq!(total, (5 << 30) / PAGE_SIZE);
    assert!(
        o.stat("bytes_sent") < 64 << 20,
        "sparse 5 GiB guest sent {} bytes: {}",
        o.stat("bytes_sent"),
        o.stats
    );
    assert!(
        o.stat("pages_sent") >= MEMTOUCH_PAGES,
        "the working set was not sent: {}",
        o.stats
    );
    assert!(
        o.stat("holes_skipped") >= total - (64 << 20) / PAGE_SIZE,
        "holes were not skipped: {}",
        o.stats
    );

    // Digests read all 5 GiB; take the source's, then free its memory before the destination's.
    let sd = pair.src.digest();
    let names: Vec<&str> = sd.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ram-low", "ram-high"]);
    pair.src.proc.kill();
    pair.dst.wait_phase(secs(30), &["completed"]);
    assert_eq!(
        sd,
        pair.dst.digest(),
        "RAM differs between source and destination"
    );

    pair.dst.resume();
    assert_guest_runs_on(&pair.src, &mut pair.dst, 3, secs(60));
}

#[test]
fn precopy_layout_mismatch_fails_and_source_keeps_running() {
    if !require_kvm("precopy_layout_mismatch_fails_and_source_keeps_running") {
        return;
    }
    let t = TestEnv::new("precopy-layout");
    let mut pair = MigrationSetup::memtouch(&t, "256M", MEMTOUCH_CMDLINE)
        .destination_mem("512M")
        .start();
    pair.src.wait_pass(secs(60), 2);
    let o = pair.migrate_and_wait(json!({}), secs(240));
    assert_failed_with("source", &o, &["layout", "mismatch"]);
    assert_source_keeps_running(&mut pair.src);

    // The destination never ran, says why, and listens again.
    let v = assert_destination_failed_without_running(
        &mut pair.dst,
        secs(30),
        AfterFailure::ListensAgain,
    );
    let derr = v["error"].as_str().unwrap_or("").to_lowercase();
    assert!(derr.contains("layout"), "destination error: {derr:?}");
    assert!(pair.umemds_serving(), "a umemd died");
}

#[test]
fn precopy_refused_connection_fails_then_retry_succeeds() {
    if !require_kvm("precopy_refused_connection_fails_then_retry_succeeds") {
        return;
    }
    let t = TestEnv::new("precopy-refused");
    let setup = MigrationSetup::memtouch(&t, "256M", MEMTOUCH_CMDLINE).paused_destination();
    let (mut su, du) = setup.start_umemds();
    let mut src = setup.source(&su);
    src.wait_pass(secs(60), 2);
    src.migrate(&format!("tcp:127.0.0.1:{}", closed_port()), json!({}))
        .expect("migrate command refused");
    let o = src.wait_migration(secs(60));
    assert_failed_with("source", &o, &["refused", "connect"]);
    assert_source_keeps_running(&mut src);
    assert!(su.is_serving(), "source umemd died");

    // A failed attempt leaves nothing behind: the next migration works, with fresh counters.
    let mut dst = setup.destination("dst", &du);
    let o = src.migrate_to(&mut dst, json!({}), secs(240));
    assert_completed("source (retry)", &o);
    assert_eq!(src.status(), "postmigrate");
    assert_same_ram(&src, &dst);
    assert!(o.stat("pages_sent") >= MEMTOUCH_PAGES, "{}", o.stats);
    assert!(
        o.stat("pages_sent") + o.stat("zero_pages") + o.stat("holes_skipped")
            >= o.stat("total_pages"),
        "the first round did not cover all of RAM: {}",
        o.stats
    );
}

/// Starts a slow (bandwidth-limited) precopy of a 1 GiB prefilled guest and kills `victim`
/// ("vmm" or "umemd") of the destination once pages flow.
fn kill_destination_mid_precopy(victim: &str) {
    let t = TestEnv::new(&format!("precopy-kill-dst-{victim}"));
    let setup = MigrationSetup::memtouch(&t, "1G", MEMTOUCH_CMDLINE)
        .vcpus(2)
        .prefilled()
        .paused_destination();
    let mut pair = setup.start();
    pair.src.wait_pass(secs(60), 2);
    start_slow_precopy(&mut pair);
    match victim {
        "vmm" => pair.dst.proc.kill(),
        _ => pair.dst_umemd.proc.kill(),
    }
    let o = pair.src.wait_migration(secs(120));
    let e = assert_failed_with(
        "source",
        &o,
        &[
            "destination",
            "connection",
            "reset",
            "broken pipe",
            "closed",
        ],
    );
    eprintln!("source error after killing the destination {victim}: {e}");
    assert!(
        o.stat("pages_sent") < (1 << 30) / PAGE_SIZE,
        "the migration got through before the kill: {}",
        o.stats
    );
    assert_source_keeps_running(&mut pair.src);
    assert!(pair.src_umemd.is_serving(), "source umemd died");

    if victim == "vmm" {
        // The destination umemd lost its VMM, not its wits: it serves the next migration.
        assert!(
            pair.dst_umemd.is_serving(),
            "destination umemd died with its VMM"
        );
        pair.dst = setup.destination("dst2", &pair.dst_umemd);
        let o = pair.migrate_and_wait(json!({"downtime_limit_ms": 50}), secs(240));
        assert_completed("source (retry)", &o);
        assert_same_ram(&pair.src, &pair.dst);
        pair.dst.resume();
        assert_guest_runs_on(&pair.src, &mut pair.dst, 2, secs(60));
    } else {
        // The destination VMM lost its umemd: its incoming migration failed, it never ran,
        // and it cannot listen again.
        assert_destination_failed_without_running(
            &mut pair.dst,
            secs(30),
            AfterFailure::StaysFailed,
        );
    }
}

#[test]
fn precopy_destination_vmm_killed_mid_migration() {
    if !require_kvm("precopy_destination_vmm_killed_mid_migration") {
        return;
    }
    kill_destination_mid_precopy("vmm");
}

#[test]
fn precopy_destination_umemd_killed_mid_migration() {
    if !require_kvm("precopy_destination_umemd_killed_mid_migration") {
        return;
    }
    kill_destination_mid_precopy("umemd");
}

#[test]
fn precopy_source_umemd_killed_mid_migration() {
    if !require_kvm("precopy_source_umemd_killed_mid_migration") {
        return;
    }
    let t = TestEnv::new("precopy-kill-src-umemd");
    let mut pair = MigrationSetup::memtouch(&t, "1G", MEMTOUCH_CMDLINE)
        .prefilled()
        .paused_destination()
        .start();
    pair.src.wait_pass(secs(60), 2);
    start_slow_precopy(&mut pair);
    pair.src_umemd.proc.kill();
    let o = pair.src.wait_migration(secs(60));
    assert_failed_with("source", &o, &["umemd", "connection", "closed", "eof"]);
    assert_source_keeps_running(&mut pair.src);
    // The destination saw its source vanish, did not start a half-copied VM, and listens
    // again: a retry from a new source umemd to the same address gets the VM there.
    assert_destination_failed_without_running(&mut pair.dst, secs(60), AfterFailure::ListensAgain);
    // A umemd started again on the source's socket serves the same source VM.
    pair.src_umemd = t.umemd("umemd-src");
    let o = pair.migrate_and_wait(json!({}), secs(240));
    assert_completed("source (retry)", &o);
    assert_same_ram(&pair.src, &pair.dst);
    pair.dst.resume();
    assert_guest_runs_on(&pair.src, &mut pair.dst, 2, secs(60));
}

/// Shared-memory pages resident in process `pid` (`RssShmem`), in bytes.
fn rss_shmem(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// `query-ram-digest` is a diagnostic: on a sparse guest it must neither allocate the whole of
/// guest RAM nor make the next migration send every never-touched page.
///
/// Ignored until the vmm hashes holes without touching them (e.g. `pread`, which reads holes of
/// a memfd as zeros without allocating, or `SEEK_DATA`/`SEEK_HOLE`): today the digest reads
/// through the shared mapping and every read fault on a hole allocates a shmem page.
#[test]
fn ram_digest_keeps_sparse_guest_sparse() {
    if !require_kvm("ram_digest_keeps_sparse_guest_sparse") {
        return;
    }
    let t = TestEnv::new("digest-sparse");
    let setup = MigrationSetup::memtouch(&t, "1G", MEMTOUCH_CMDLINE).paused_destination();
    let (su, du) = setup.start_umemds();
    let mut src = setup.source(&su);
    src.wait_pass(secs(60), 2);
    let before = rss_shmem(src.proc.pid());
    let _ = src.digest();
    let after = rss_shmem(src.proc.pid());
    eprintln!(
        "source RssShmem: {} MiB before the digest, {} MiB after",
        before >> 20,
        after >> 20
    );
    assert!(
        after < before + (64 << 20),
        "query-ram-digest populated guest RAM: RssShmem {} MiB -> {} MiB",
        before >> 20,
        after >> 20
    );
    let mut dst = setup.destination("dst", &du);
    let o = src.migrate_to(&mut dst, json!({}), secs(240));
    assert_completed("source", &o);
    assert!(
        o.stat("holes_skipped") >= o.stat("total_pages") - (64 << 20) / PAGE_SIZE,
        "holes were lost to the digest: {}",
        o.stats
    );
}
