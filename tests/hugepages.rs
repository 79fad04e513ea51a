//! End-to-end migrations of guest RAM on 2 MiB huge pages (`vmm --hugepages`): real vmm and
//! umemd processes, real KVM, loopback TCP. Pages still travel 4 KiB at a time; the
//! destination places each huge page whole once the VM runs there, so these tests check that
//! no page reads wrong and that every migration ends, whichever side has huge pages.
//!
//! Run with `cargo test --release --test hugepages -- --test-threads=1`. Each test needs free
//! huge pages and, run as root, raises the host's pool
//! (`/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages`) to have them; where it cannot,
//! it prints a skip line, or fails where `UMEM_REQUIRE_KVM=1`.

use serde_json::{json, Value};
use umem_testkit::pair::{
    assert_completed, assert_digest_guest_moved_mid_run, assert_digest_matches_reference,
    assert_guest_continues, assert_same_ram_outside_working_set, assert_umemds_rss_bounded,
    MigrationSetup, Pair, DIGEST_CMDLINE, MEMTOUCH_CMDLINE, MEMTOUCH_PAGES,
};
use umem_testkit::{require_huge_pages, require_kvm, secs, wait_until, TestEnv, Vmm};

/// A numeric field of a `query-migrate` reply's `postcopy` object.
fn pc(reply: &Value, key: &str) -> u64 {
    reply["postcopy"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no postcopy.{key} in {reply}"))
}

/// True if this test can run: KVM, and huge pages for `mib` MiB of RAM on each of two VMs
/// (and a third, a reference, where a test has one).
fn can_run(test: &str, mib: u64, vms: u64) -> bool {
    require_kvm(test) && require_huge_pages(test, vms * mib / 2 + 8)
}

/// Waits for the destination's side of the migration to complete; returns its reply.
fn wait_dest_completed(dst: &mut Vmm) -> Value {
    let v = dst.wait_phase(secs(120), &["completed", "failed", "cancelled"]);
    assert_eq!(v["phase"], "completed", "destination: {v}");
    assert!(v["error"].is_null(), "destination: {v}");
    v
}

/// A prefilled memtouch source and its destination, with huge pages on the sides asked for.
fn memtouch_pair(t: &TestEnv, mem: &str, cmdline: &str, huge: (bool, bool)) -> Pair {
    let mut pair = MigrationSetup::memtouch(t, mem, cmdline)
        .prefilled()
        .hugepages(huge.0, huge.1)
        .start();
    let _ = pair.dst.listen_uri();
    pair.src.wait_pass(secs(60), 2);
    pair
}

#[test]
fn postcopy_on_huge_pages_moves_every_page_once_and_the_guest_goes_on() {
    let test = "postcopy_on_huge_pages_moves_every_page_once_and_the_guest_goes_on";
    if !can_run(test, 256, 2) {
        return;
    }
    let t = TestEnv::new("huge-postcopy");
    let mut pair = memtouch_pair(&t, "256M", MEMTOUCH_CMDLINE, (true, true));
    let o = pair.migrate_and_wait(json!({"mode": "postcopy"}), secs(300));
    assert_completed("source", &o);
    let total = o.stat("total_pages");
    assert_eq!(total, (256 << 20) / 4096);
    // The source sent each page once: a huge page is assembled from 4 KiB pages, never
    // fetched whole twice.
    assert_eq!(
        o.stat("pages_sent") + o.stat("zero_pages"),
        total,
        "{}",
        o.raw
    );
    assert_eq!(pc(&o.raw, "remaining_pages"), 0, "{}", o.raw);
    let dv = wait_dest_completed(&mut pair.dst);
    assert_eq!(pc(&dv, "remaining_pages"), 0, "{dv}");
    // The huge pages assembled on the destination do not stay in umemd.
    assert_umemds_rss_bounded(&pair, 256 << 20);
    assert_guest_continues(&pair.src, &mut pair.dst, 3, secs(120));
    assert_same_ram_outside_working_set(&pair.src, &pair.dst, MEMTOUCH_PAGES);
    assert!(pair.umemds_serving(), "a umemd died");
}

#[test]
fn postcopy_on_huge_pages_serves_faults_of_a_guest_that_checks_its_memory() {
    let test = "postcopy_on_huge_pages_serves_faults_of_a_guest_that_checks_its_memory";
    if !can_run(test, 64, 3) {
        return;
    }
    let t = TestEnv::new("huge-postcopy-digest");
    let setup = MigrationSetup::new(&t, "64M", "digest", DIGEST_CMDLINE).hugepages(true, true);
    let mut pair = setup.start();
    let mut reference = setup.guest_vm("reference", &pair.src_umemd);
    pair.src
        .wait_serial(secs(120), "round=3", |l| l == "round=3");
    // A slow background: the guest faults on most huge pages before they are pushed.
    let o = pair.migrate_and_wait(
        json!({"mode": "postcopy", "bandwidth_limit": 1_000_000}),
        secs(240),
    );
    assert_completed("source", &o);
    assert_digest_guest_moved_mid_run(&pair.src);
    let dv = wait_dest_completed(&mut pair.dst);
    assert!(pc(&dv, "faults") > 0, "no fault served: {dv}");
    // A fault asks for the whole huge page it is in: 512 pages, less those already here.
    assert!(
        pc(&dv, "pages_requested") >= 256,
        "faults asked for single pages, not huge pages: {dv}"
    );
    assert_digest_matches_reference(&mut reference, &mut pair.dst);
}

#[test]
fn postcopy_on_huge_pages_over_tls() {
    let test = "postcopy_on_huge_pages_over_tls";
    if !can_run(test, 128, 2) {
        return;
    }
    let t = TestEnv::new("huge-postcopy-tls");
    let (su, du) = (t.umemd("umemd-src"), t.umemd("umemd-dst"));
    let dir = umem_testkit::tls::make_creds(&t.dir().join("tls"), &["127.0.0.1"]);
    let mut src = t
        .vmm("src", &su)
        .mem("128M")
        .guest("memtouch")
        .cmdline(MEMTOUCH_CMDLINE)
        .prefill(1)
        .hugepages(true)
        .start();
    src.wait_pass(secs(60), 2);
    let mut dst = t
        .vmm("dst", &du)
        .mem("128M")
        .incoming_any()
        .arg("--incoming-tls-creds")
        .arg(&dir)
        .hugepages(true)
        .start();
    // Pages read with pread leave through umemd's TLS records, as pages of 4 KiB RAM do
    // straight from the mapping.
    let creds = dir.to_str().expect("a UTF-8 path");
    src.migrate(
        &dst.listen_uri(),
        json!({"mode": "postcopy", "tls_creds": creds}),
    )
    .expect("migrate");
    assert_completed("source", &src.wait_migration(secs(120)));
    let dv = wait_dest_completed(&mut dst);
    assert_eq!(pc(&dv, "remaining_pages"), 0, "{dv}");
    assert_guest_continues(&src, &mut dst, 2, secs(120));
    assert_same_ram_outside_working_set(&src, &dst, MEMTOUCH_PAGES);
}

#[test]
fn precopy_on_huge_pages_keeps_every_page() {
    let test = "precopy_on_huge_pages_keeps_every_page";
    if !can_run(test, 256, 2) {
        return;
    }
    let t = TestEnv::new("huge-precopy");
    let mut pair = memtouch_pair(&t, "256M", MEMTOUCH_CMDLINE, (true, true));
    let o = pair.migrate_and_wait(json!({"mode": "precopy"}), secs(300));
    assert_completed("source", &o);
    assert!(o.raw["postcopy"].is_null(), "{}", o.raw);
    assert_guest_continues(&pair.src, &mut pair.dst, 3, secs(120));
    assert_same_ram_outside_working_set(&pair.src, &pair.dst, MEMTOUCH_PAGES);
}

/// A guest rewriting 64 MiB as fast as it can, over a link too slow for precopy to converge.
const FAST_DIRTIER: &str = "pages=16384 pause=0";
const FAST_DIRTIER_PAGES: u64 = 16384;

/// A hybrid migration of [`FAST_DIRTIER`] in 96 MiB, huge pages on the sides asked for: pages
/// dirtied since they were sent are dropped on the destination at the switchover, which on
/// huge pages drops the whole huge page each is in.
fn hybrid_fast_dirtier(name: &str, huge: (bool, bool)) {
    let t = TestEnv::new(name);
    let mut pair = memtouch_pair(&t, "96M", FAST_DIRTIER, huge);
    let o = pair.migrate_and_wait(
        json!({
            "mode": "hybrid",
            "downtime_limit_ms": 1,
            "postcopy_after_rounds": 2,
            "max_rounds": 30,
            "bandwidth_limit": 16_000_000,
        }),
        secs(300),
    );
    assert_completed("source", &o);
    assert_eq!(o.raw["switchover"], "postcopy", "{}", o.raw);
    assert_eq!(pc(&o.raw, "remaining_pages"), 0, "{}", o.raw);
    let dv = wait_dest_completed(&mut pair.dst);
    assert_eq!(pc(&dv, "remaining_pages"), 0, "{dv}");
    assert_guest_continues(&pair.src, &mut pair.dst, 3, secs(120));
    assert_same_ram_outside_working_set(&pair.src, &pair.dst, FAST_DIRTIER_PAGES);
}

#[test]
fn hybrid_on_huge_pages_drops_and_sends_again_whole_huge_pages() {
    let test = "hybrid_on_huge_pages_drops_and_sends_again_whole_huge_pages";
    if can_run(test, 96, 2) {
        hybrid_fast_dirtier("huge-hybrid", (true, true));
    }
}

#[test]
fn hybrid_from_small_pages_to_huge_pages_drops_whole_huge_pages_the_destination_asked_for() {
    // The destination says in its hello that it drops whole huge pages only; a source on
    // 4 KiB pages then discards and sends again whole huge pages too.
    let test =
        "hybrid_from_small_pages_to_huge_pages_drops_whole_huge_pages_the_destination_asked_for";
    if can_run(test, 96, 1) {
        hybrid_fast_dirtier("huge-hybrid-mixed", (false, true));
    }
}

#[test]
fn postcopy_from_huge_pages_to_small_pages() {
    let test = "postcopy_from_huge_pages_to_small_pages";
    if !can_run(test, 256, 1) {
        return;
    }
    let t = TestEnv::new("huge-to-small");
    let mut pair = memtouch_pair(&t, "256M", MEMTOUCH_CMDLINE, (true, false));
    let o = pair.migrate_and_wait(json!({"mode": "postcopy"}), secs(300));
    assert_completed("source", &o);
    wait_dest_completed(&mut pair.dst);
    assert_guest_continues(&pair.src, &mut pair.dst, 3, secs(120));
    assert_same_ram_outside_working_set(&pair.src, &pair.dst, MEMTOUCH_PAGES);
}

#[test]
fn postcopy_on_huge_pages_destination_umemd_killed_and_started_again_takes_over() {
    let test = "postcopy_on_huge_pages_destination_umemd_killed_and_started_again_takes_over";
    if !can_run(test, 256, 2) {
        return;
    }
    let t = TestEnv::new("huge-restart-dst-umemd");
    let mut pair = memtouch_pair(&t, "256M", "pages=1024 pause=1000", (true, true));
    pair.start_migration(json!({"mode": "postcopy", "no_background": true}));
    pair.dst.wait_phase(secs(120), &["postcopy"]);
    let src_last = pair.src.last_pass_number();
    pair.dst.wait_pass(secs(120), src_last + 2);
    assert!(pc(&pair.dst.query_migrate(), "remaining_pages") > 0);
    pair.dst_umemd.proc.kill();
    wait_until(secs(30), "both sides to pause", || {
        (pair.dst.phase() == "postcopy-paused" && pair.src.phase() == "postcopy-paused")
            .then_some(())
    });
    // A new umemd cannot tell from a memfd on huge pages which pages arrived: it takes every
    // one for missing, and a huge page found present when it is placed stays as it was.
    std::thread::sleep(secs(1));
    pair.dst_umemd = t.umemd("umemd-dst");
    wait_until(secs(30), "both sides to resume", || {
        (pair.dst.phase() == "postcopy" && pair.src.phase() == "postcopy").then_some(())
    });
    pair.src
        .ctl("migrate-set-parameters", json!({"no_background": false}))
        .expect("migrate-set-parameters");
    let o = pair.src.wait_migration(secs(180));
    assert_completed("source", &o);
    let dv = wait_dest_completed(&mut pair.dst);
    assert!(pc(&dv, "recoveries") >= 1, "{dv}");
    assert_guest_continues(&pair.src, &mut pair.dst, 2, secs(120));
    assert_same_ram_outside_working_set(&pair.src, &pair.dst, 1024);
}
