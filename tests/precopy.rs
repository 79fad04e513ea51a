//! End-to-end precopy migrations: real vmm and umemd processes, real KVM, loopback TCP.
//!
//! Run with `cargo test --release --workspace -- --test-threads=1` (see `src/lib.rs`).

use serde_json::json;
use umem::{
    assert_consecutive, assert_no_bad, closed_port, parse_passes, require_kvm, secs, wait_until,
    MigrationOutcome, Pass, TestEnv, Vmm,
};

const PAGE: u64 = 4096;

/// memtouch with a short pause between passes: a few passes per second here.
const MEMTOUCH: &str = "pages=4096 pause=1000";

/// The source's serial output followed by the destination's: the guest's whole output stream,
/// since the serial port moves with the machine state at switchover.
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

fn assert_failed_with(who: &str, o: &MigrationOutcome, any_of: &[&str]) -> String {
    assert_eq!(
        o.phase, "failed",
        "{who}: expected a failed migration: {}",
        o.raw
    );
    let e = o
        .error
        .clone()
        .unwrap_or_else(|| panic!("{who}: failed without an error: {}", o.raw));
    let lower = e.to_lowercase();
    assert!(
        any_of.iter().any(|w| lower.contains(w)),
        "{who}: error {e:?} names none of {any_of:?}"
    );
    e
}

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

/// Runs a migration from `src` to `dst` (already listening) and waits for its end.
fn migrate(src: &mut Vmm, dst: &mut Vmm, params: serde_json::Value) -> MigrationOutcome {
    let uri = dst.listen_uri();
    src.migrate(&uri, params).expect("migrate command refused");
    src.wait_migration(secs(240))
}

#[test]
fn precopy_memtouch_1g_prefilled_two_vcpus() {
    if !require_kvm("precopy_memtouch_1g_prefilled_two_vcpus") {
        return;
    }
    let t = TestEnv::new("precopy-1g");
    let su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    let mut src = t
        .vmm("src", &su)
        .mem("1G")
        .vcpus(2)
        .guest("memtouch")
        .cmdline(MEMTOUCH)
        .prefill(1)
        .start();
    let mut dst = t
        .vmm("dst", &du)
        .mem("1G")
        .vcpus(2)
        .incoming_any()
        .paused(true)
        .start();
    assert_eq!(dst.status(), "inmigrate");
    src.wait_pass(secs(60), 3);

    let o = migrate(&mut src, &mut dst, json!({"downtime_limit_ms": 50}));
    assert_completed("source", &o);

    // Source stopped for good, destination holds the same memory and has not run yet.
    assert_eq!(src.status(), "postmigrate");
    wait_until(secs(30), "destination to report completion", || {
        (dst.query_migrate()["phase"] == "completed").then_some(())
    });
    assert_eq!(dst.status(), "paused", "-S destination must stay paused");
    assert_eq!(dst.serial(), "", "the paused destination printed something");
    let sd = src.digest();
    assert_eq!(sd.len(), 1, "1 GiB is one RAM block: {sd:?}");
    assert_eq!(
        sd,
        dst.digest(),
        "RAM differs between source and destination"
    );

    // Everything was populated (prefill), so every page crossed once, as data or zero record.
    let total = o.stat("total_pages");
    assert_eq!(total, (1 << 30) / PAGE);
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
        o.stat("bytes_sent") >= (total - zero) * PAGE,
        "bytes_sent below the populated non-zero bytes: {}",
        o.stats
    );
    assert!(o.stat("bytes_sent") >= sent * PAGE, "{}", o.stats);
    assert!(o.stat("rounds") >= 1, "{}", o.stats);
    assert!(o.stat("downtime_us") > 0, "{}", o.stats);
    assert!(o.stat("total_us") >= o.stat("downtime_us"), "{}", o.stats);

    // The destination continues the guest where the source stopped it.
    let src_last = src.last_pass().expect("source printed passes").pass;
    dst.ctl("cont", json!({})).expect("cont");
    assert_eq!(dst.status(), "running");
    wait_until(secs(60), "destination passes", || {
        combined_passes(&src, &dst)
            .last()
            .filter(|p| p.pass >= src_last + 5)
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
    let all = combined_passes(&src, &dst);
    assert_eq!(all[0].pass, 1);
    assert_consecutive("source+destination", &all);
    assert_no_bad("source+destination", &all);
    // The source really is stopped.
    assert_eq!(src.last_pass().map(|p| p.pass), Some(src_last));
    assert_eq!(src.status(), "postmigrate");
}

#[test]
fn precopy_digest_guest_matches_unmigrated_run() {
    if !require_kvm("precopy_digest_guest_matches_unmigrated_run") {
        return;
    }
    // Enough rounds that the migration surely ends before the guest does (~8 s emulated).
    const CMD: &str = "pages=256 rounds=32";
    let t = TestEnv::new("precopy-digest");
    let su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    // The reference run and the migrated run go side by side.
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
    let o = migrate(&mut src, &mut dst, json!({}));
    assert_completed("source", &o);
    assert_eq!(src.status(), "postmigrate");
    assert!(
        !src.serial().contains("digest="),
        "the guest finished on the source before switchover; the test did not migrate mid-run"
    );

    let expected = reference.wait_serial_prefix(secs(180), "digest=");
    let got = dst.wait_serial_prefix(secs(180), "digest=");
    assert_eq!(got, expected, "migrated run computed a different digest");
    assert_eq!(
        dst.status(),
        "running",
        "destination without -S runs by itself"
    );

    // The guest's output stream, split across both hosts, has every round exactly once.
    let all = src.serial() + &dst.serial();
    for r in 1..=32 {
        let n = all.lines().filter(|l| *l == format!("round={r}")).count();
        assert_eq!(
            n, 1,
            "round={r} appears {n} times in the combined output:\n{all}"
        );
    }
    assert!(dst.serial().contains("round=32"));
}

#[test]
fn precopy_above_4g_sparse() {
    if !require_kvm("precopy_above_4g_sparse") {
        return;
    }
    let t = TestEnv::new("precopy-5g");
    let su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    let mut src = t
        .vmm("src", &su)
        .mem("5G")
        .guest("memtouch")
        .cmdline(MEMTOUCH)
        .start();
    let mut dst = t
        .vmm("dst", &du)
        .mem("5G")
        .incoming_any()
        .paused(true)
        .start();
    src.wait_pass(secs(60), 3);
    let o = migrate(&mut src, &mut dst, json!({"downtime_limit_ms": 50}));
    assert_completed("source", &o);
    assert_eq!(src.status(), "postmigrate");

    let total = o.stat("total_pages");
    assert_eq!(total, (5 << 30) / PAGE);
    assert!(
        o.stat("bytes_sent") < 64 << 20,
        "sparse 5 GiB guest sent {} bytes: {}",
        o.stat("bytes_sent"),
        o.stats
    );
    assert!(
        o.stat("pages_sent") >= 4096,
        "the working set was not sent: {}",
        o.stats
    );
    assert!(
        o.stat("holes_skipped") >= total - (64 << 20) / PAGE,
        "holes were not skipped: {}",
        o.stats
    );

    // Digests read all 5 GiB; take the source's, then free its memory before the destination's.
    let sd = src.digest();
    let names: Vec<&str> = sd.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ram-low", "ram-high"]);
    src.proc.kill();
    wait_until(secs(30), "destination to report completion", || {
        (dst.query_migrate()["phase"] == "completed").then_some(())
    });
    assert_eq!(
        sd,
        dst.digest(),
        "RAM differs between source and destination"
    );

    let src_last = src.last_pass().expect("source passes").pass;
    dst.ctl("cont", json!({})).expect("cont");
    dst.wait_pass(secs(60), src_last + 3);
    let all = combined_passes(&src, &dst);
    assert_consecutive("source+destination", &all);
    assert_no_bad("source+destination", &all);
}

#[test]
fn precopy_layout_mismatch_fails_and_source_keeps_running() {
    if !require_kvm("precopy_layout_mismatch_fails_and_source_keeps_running") {
        return;
    }
    let t = TestEnv::new("precopy-layout");
    let mut su = t.umemd("umemd-src");
    let mut du = t.umemd("umemd-dst");
    let mut src = t
        .vmm("src", &su)
        .mem("256M")
        .guest("memtouch")
        .cmdline(MEMTOUCH)
        .start();
    let mut dst = t.vmm("dst", &du).mem("512M").incoming_any().start();
    src.wait_pass(secs(60), 2);
    let o = migrate(&mut src, &mut dst, json!({}));
    assert_failed_with("source", &o, &["layout", "mismatch"]);
    assert_source_keeps_running(&mut src);

    // The destination never ran and says why.
    wait_until(secs(30), "destination to fail", || {
        (dst.query_migrate()["phase"] == "failed").then_some(())
    });
    assert_eq!(dst.status(), "migrate-failed");
    let derr = dst.query_migrate()["error"]
        .as_str()
        .unwrap_or("")
        .to_lowercase();
    assert!(derr.contains("layout"), "destination error: {derr:?}");
    assert_eq!(dst.serial(), "");
    assert!(su.is_serving() && du.is_serving(), "a umemd died");
}

#[test]
fn precopy_refused_connection_fails_then_retry_succeeds() {
    if !require_kvm("precopy_refused_connection_fails_then_retry_succeeds") {
        return;
    }
    let t = TestEnv::new("precopy-refused");
    let mut su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    let mut src = t
        .vmm("src", &su)
        .mem("256M")
        .guest("memtouch")
        .cmdline(MEMTOUCH)
        .start();
    src.wait_pass(secs(60), 2);
    src.migrate(&format!("tcp:127.0.0.1:{}", closed_port()), json!({}))
        .expect("migrate command refused");
    let o = src.wait_migration(secs(60));
    assert_failed_with("source", &o, &["refused", "connect"]);
    assert_source_keeps_running(&mut src);
    assert!(su.is_serving(), "source umemd died");

    // A failed attempt leaves nothing behind: the next migration works, with fresh counters.
    let mut dst = t
        .vmm("dst", &du)
        .mem("256M")
        .incoming_any()
        .paused(true)
        .start();
    let o = migrate(&mut src, &mut dst, json!({}));
    assert_completed("source (retry)", &o);
    assert_eq!(src.status(), "postmigrate");
    assert_eq!(src.digest(), dst.digest());
    assert!(o.stat("pages_sent") >= 4096, "{}", o.stats);
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
    let mut su = t.umemd("umemd-src");
    let mut du = t.umemd("umemd-dst");
    let mut src = t
        .vmm("src", &su)
        .mem("1G")
        .vcpus(2)
        .guest("memtouch")
        .cmdline(MEMTOUCH)
        .prefill(1)
        .start();
    let mut dst = t
        .vmm("dst", &du)
        .mem("1G")
        .vcpus(2)
        .incoming_any()
        .paused(true)
        .start();
    src.wait_pass(secs(60), 2);
    let uri = dst.listen_uri();
    // 40 MB/s: 1 GiB needs ~25 s, so the kill lands in the first round.
    src.migrate(&uri, json!({"bandwidth_limit": 40_000_000}))
        .expect("migrate");
    wait_until(secs(60), "pages to flow", || {
        let v = src.query_migrate();
        (v["phase"] == "precopy" && v["stats"]["pages_sent"].as_u64().unwrap_or(0) > 2000)
            .then_some(())
    });
    match victim {
        "vmm" => dst.proc.kill(),
        _ => du.proc.kill(),
    }
    let o = src.wait_migration(secs(120));
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
        o.stat("pages_sent") < (1 << 30) / PAGE,
        "the migration got through before the kill: {}",
        o.stats
    );
    assert_source_keeps_running(&mut src);
    assert!(su.is_serving(), "source umemd died");

    if victim == "vmm" {
        // The destination umemd lost its VMM, not its wits: it serves the next migration.
        assert!(du.is_serving(), "destination umemd died with its VMM");
        let mut dst2 = t
            .vmm("dst2", &du)
            .mem("1G")
            .vcpus(2)
            .incoming_any()
            .paused(true)
            .start();
        let o = migrate(&mut src, &mut dst2, json!({"downtime_limit_ms": 50}));
        assert_completed("source (retry)", &o);
        assert_eq!(src.digest(), dst2.digest());
        let src_last = src.last_pass().expect("passes").pass;
        dst2.ctl("cont", json!({})).expect("cont");
        dst2.wait_pass(secs(60), src_last + 2);
        let all = combined_passes(&src, &dst2);
        assert_consecutive("source+destination", &all);
        assert_no_bad("source+destination", &all);
    } else {
        // The destination VMM lost its umemd: its incoming migration failed, it never ran.
        wait_until(secs(30), "destination vmm to notice", || {
            (dst.query_migrate()["phase"] == "failed").then_some(())
        });
        assert_eq!(dst.status(), "migrate-failed");
        assert_eq!(dst.serial(), "");
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
    let mut su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    let mut src = t
        .vmm("src", &su)
        .mem("1G")
        .guest("memtouch")
        .cmdline(MEMTOUCH)
        .prefill(1)
        .start();
    let mut dst = t
        .vmm("dst", &du)
        .mem("1G")
        .incoming_any()
        .paused(true)
        .start();
    src.wait_pass(secs(60), 2);
    let uri = dst.listen_uri();
    src.migrate(&uri, json!({"bandwidth_limit": 40_000_000}))
        .expect("migrate");
    wait_until(secs(60), "pages to flow", || {
        let v = src.query_migrate();
        (v["phase"] == "precopy" && v["stats"]["pages_sent"].as_u64().unwrap_or(0) > 2000)
            .then_some(())
    });
    su.proc.kill();
    let o = src.wait_migration(secs(60));
    assert_failed_with("source", &o, &["umemd", "connection", "closed", "eof"]);
    assert_source_keeps_running(&mut src);
    // The destination saw its source vanish and did not start a half-copied VM.
    wait_until(secs(60), "destination to fail", || {
        (dst.query_migrate()["phase"] == "failed").then_some(())
    });
    assert_eq!(dst.status(), "migrate-failed");
    assert_eq!(dst.serial(), "");
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
    let su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    let mut src = t
        .vmm("src", &su)
        .mem("1G")
        .guest("memtouch")
        .cmdline(MEMTOUCH)
        .start();
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
    let mut dst = t
        .vmm("dst", &du)
        .mem("1G")
        .incoming_any()
        .paused(true)
        .start();
    let o = migrate(&mut src, &mut dst, json!({}));
    assert_completed("source", &o);
    assert!(
        o.stat("holes_skipped") >= o.stat("total_pages") - (64 << 20) / PAGE,
        "holes were lost to the digest: {}",
        o.stats
    );
}
