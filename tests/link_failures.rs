//! A dead or silent link is noticed within `link_timeout_ms` (heartbeats on idle links, read
//! deadlines, TCP keepalive and `TCP_USER_TIMEOUT`), a slow link still migrates, and a peer
//! that goes silent, or trickles its handshake, holds nothing for long.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use proto::peer::{PeerMessage, VERSION};
use proto::BlockDesc;
use serde_json::json;
use umem_testkit::pair::{
    assert_completed, assert_destination_failed_without_running, assert_guest_runs_on,
    AfterFailure, MigrationSetup, Pair, MEMTOUCH_CMDLINE,
};
use umem_testkit::peer::RawSource;
use umem_testkit::proxy::FaultProxy;
use umem_testkit::{
    assert_consecutive, assert_no_bad, parse_passes, poll_every, require_kvm, secs, wait_until,
    TestEnv,
};

/// The link timeout these tests use.
const LINK_TIMEOUT_MS: u64 = 1000;
/// What the issue allows on top of it to notice a silent peer.
const DETECTION_SLACK: Duration = Duration::from_millis(1000);

fn pair_with_guest(t: &TestEnv, mem: &str) -> Pair {
    let mut pair = MigrationSetup::memtouch(t, mem, MEMTOUCH_CMDLINE)
        .prefilled()
        .start();
    pair.src.wait_pass(secs(60), 2);
    pair
}

/// Polls `f` every 20 ms until it is true; returns how long that took (panics after `limit`).
fn time_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    poll_every(limit, Duration::from_millis(20), || f().then_some(()))
        .unwrap_or_else(|| panic!("{what} did not happen within {limit:?}"));
    t0.elapsed()
}

#[test]
fn a_stalled_link_in_precopy_is_noticed_by_both_sides_within_the_link_timeout() {
    if !require_kvm("a_stalled_link_in_precopy_is_noticed_by_both_sides_within_the_link_timeout") {
        return;
    }
    let t = TestEnv::new("stall-precopy");
    let mut pair = pair_with_guest(&t, "256M");
    let proxy = FaultProxy::in_front_of(&pair.dst.listen_uri());
    pair.src
        .migrate(
            &proxy.uri(),
            json!({"bandwidth_limit": 20_000_000, "link_timeout_ms": LINK_TIMEOUT_MS}),
        )
        .expect("migrate");
    wait_until(secs(60), "pages to flow", || {
        (pair.src.query_migrate()["stats"]["pages_sent"].as_u64() > Some(1000)).then_some(())
    });

    // Nothing moves any more, and nothing is closed either.
    proxy.stall();
    let limit = Duration::from_millis(LINK_TIMEOUT_MS) + DETECTION_SLACK;
    let (src_took, dst_took) = std::thread::scope(|s| {
        let src = s.spawn(|| {
            time_until(secs(30), "the source noticing", || {
                pair.src.phase() == "failed"
            })
        });
        let dst = s.spawn(|| {
            time_until(secs(30), "the destination noticing", || {
                pair.dst.query_migrate()["failed_attempts"].as_u64() >= Some(1)
            })
        });
        (src.join().unwrap(), dst.join().unwrap())
    });
    eprintln!("silence noticed after {src_took:?} (source), {dst_took:?} (destination)");
    assert!(src_took <= limit, "the source took {src_took:?}");
    assert!(dst_took <= limit, "the destination took {dst_took:?}");
    let e = pair.src.query_migrate()["error"].to_string();
    assert!(
        e.contains("link timeout") || e.contains("timed out") || e.contains("temporarily"),
        "source error: {e}"
    );

    // The source keeps its guest; the destination never ran it and listens again.
    assert_eq!(pair.src.status(), "running");
    assert_destination_failed_without_running(&mut pair.dst, secs(30), AfterFailure::ListensAgain);
    // The link comes back (here: the direct path): the retry moves the VM.
    drop(proxy);
    let o = pair.migrate_and_wait(json!({"bandwidth_limit": 0}), secs(120));
    assert_completed("source (retry)", &o);
    pair.dst.wait_phase(secs(30), &["completed"]);
    assert_guest_runs_on(&pair.src, &mut pair.dst, 3, secs(60));
}

#[test]
fn a_stalled_link_in_postcopy_pauses_both_sides_within_the_link_timeout() {
    if !require_kvm("a_stalled_link_in_postcopy_pauses_both_sides_within_the_link_timeout") {
        return;
    }
    let t = TestEnv::new("stall-postcopy");
    let mut pair = pair_with_guest(&t, "256M");
    let proxy = FaultProxy::in_front_of(&pair.dst.listen_uri());
    pair.src
        .migrate(
            &proxy.uri(),
            json!({"mode": "postcopy", "no_background": true, "link_timeout_ms": LINK_TIMEOUT_MS}),
        )
        .expect("migrate");
    pair.dst.wait_phase(secs(60), &["postcopy"]);
    let src_last = pair.src.last_pass_number();
    pair.dst.wait_pass(secs(60), src_last + 1);

    proxy.stall();
    let limit = Duration::from_millis(LINK_TIMEOUT_MS) + DETECTION_SLACK;
    let (src_took, dst_took) = std::thread::scope(|s| {
        let src = s.spawn(|| {
            time_until(secs(30), "the source pausing", || {
                pair.src.phase() == "postcopy-paused"
            })
        });
        let dst = s.spawn(|| {
            time_until(secs(30), "the destination pausing", || {
                pair.dst.phase() == "postcopy-paused"
            })
        });
        (src.join().unwrap(), dst.join().unwrap())
    });
    eprintln!("silence noticed after {src_took:?} (source), {dst_took:?} (destination)");
    assert!(src_took <= limit, "the source took {src_took:?}");
    assert!(dst_took <= limit, "the destination took {dst_took:?}");
    // The VM ran on the destination: it keeps running there on the pages it has, and the
    // source never takes it back by itself.
    assert_eq!(pair.dst.status(), "running");
    assert_eq!(pair.src.status(), "postmigrate");
    assert!(pair.src.ctl("cont", json!({})).is_err());
    let all = parse_passes(&(pair.src.serial() + &pair.dst.serial()));
    assert_consecutive("source+destination", &all);
    assert_no_bad("source+destination", &all);
}

#[test]
fn twenty_ms_of_latency_each_way_still_migrates_in_every_mode() {
    if !require_kvm("twenty_ms_of_latency_each_way_still_migrates_in_every_mode") {
        return;
    }
    for mode in ["precopy", "postcopy"] {
        let t = TestEnv::new(&format!("latency-{mode}"));
        let mut pair = pair_with_guest(&t, "64M");
        let proxy = FaultProxy::in_front_of(&pair.dst.listen_uri());
        proxy.set_latency(Duration::from_millis(20));
        pair.src
            .migrate(&proxy.uri(), json!({"mode": mode, "link_timeout_ms": 2000}))
            .expect("migrate");
        let o = pair.src.wait_migration(secs(180));
        assert_completed(mode, &o);
        pair.dst.wait_phase(secs(60), &["completed"]);
        assert_guest_runs_on(&pair.src, &mut pair.dst, 3, secs(60));
    }
}

/// A fake source: the handshake of a real one (on both connections), then silence.
fn handshake_then_silence(uri: &str, mem: u64, link_timeout_ms: u32) -> (TcpStream, TcpStream) {
    let mut main = RawSource::connect(uri, None).expect("connect");
    main.send(&PeerMessage::Hello {
        version: VERSION,
        capabilities: proto::peer::CAP_POSTCOPY,
        session_id: 7,
        link_timeout_ms,
    })
    .unwrap();
    assert!(matches!(main.read(), Ok(PeerMessage::Hello { .. })));
    main.send(&PeerMessage::Layout {
        blocks: vec![BlockDesc {
            name: "ram-low".into(),
            guest_addr: 0,
            size: mem,
        }],
    })
    .unwrap();
    match main.read() {
        Ok(PeerMessage::LayoutAccepted) => {}
        other => panic!("expected LayoutAccepted, got {other:?}"),
    }
    let mut urgent = RawSource::connect(uri, None).expect("connect the urgent channel");
    urgent
        .send(&PeerMessage::UrgentChannel { session_id: 7 })
        .unwrap();
    (main.stream, urgent.stream)
}

#[test]
fn a_source_silent_after_the_handshake_is_dropped_within_the_link_timeout() {
    if !require_kvm("a_source_silent_after_the_handshake_is_dropped_within_the_link_timeout") {
        return;
    }
    let t = TestEnv::new("silent-source");
    let du = t.umemd("umemd-dst");
    let mut dst = t.vmm("dst", &du).mem("64M").incoming_any().start();
    let uri = dst.listen_uri();
    let (mut main, _urgent) = handshake_then_silence(&uri, 64 << 20, LINK_TIMEOUT_MS as u32);
    let t0 = Instant::now();
    // The destination sends heartbeats meanwhile, then gives up and closes.
    let mut got = Vec::new();
    main.set_read_timeout(Some(secs(30))).unwrap();
    let _ = main.read_to_end(&mut got);
    let took = t0.elapsed();
    eprintln!("the destination dropped the silent source after {took:?}");
    assert!(
        took <= Duration::from_millis(LINK_TIMEOUT_MS) + DETECTION_SLACK,
        "took {took:?}"
    );
    assert!(
        got.len() >= 5,
        "the destination sent no heartbeat while it waited ({} bytes)",
        got.len()
    );
    let v =
        assert_destination_failed_without_running(&mut dst, secs(10), AfterFailure::ListensAgain);
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("link timeout")),
        "{v}"
    );
}

#[test]
fn a_trickled_handshake_is_dropped_and_the_destination_keeps_listening() {
    if !require_kvm("a_trickled_handshake_is_dropped_and_the_destination_keeps_listening") {
        return;
    }
    let t = TestEnv::new("trickled-handshake");
    let (su, du) = (t.umemd("umemd-src"), t.umemd("umemd-dst"));
    let mut src = t
        .vmm("src", &su)
        .mem("64M")
        .guest("memtouch")
        .cmdline("pages=256")
        .start();
    let mut dst = t.vmm("dst", &du).mem("64M").incoming_any().start();
    let uri = dst.listen_uri();
    let mut hello = Vec::new();
    PeerMessage::AuthHello {
        method: proto::auth::AuthMethod::None,
        nonce: [0; proto::auth::NONCE_LEN],
    }
    .encode(&mut hello);
    let mut s = RawSource::connect_bare(&uri).unwrap();
    let t0 = Instant::now();
    // One byte every 400 ms: each read is quick, the whole would take 16 s; the destination
    // drops it at its admission deadline (10 s).
    let mut dropped = false;
    for b in &hello {
        if s.stream.write_all(&[*b]).is_err() {
            dropped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(400));
        if dst.query_migrate()["stats"]["rejected_peers"].as_u64() >= Some(1) {
            dropped = true;
            break;
        }
    }
    let took = t0.elapsed();
    eprintln!("the trickled handshake was dropped after {took:?}");
    assert!(dropped, "the trickling peer was never dropped");
    assert!(took < Duration::from_secs(12), "took {took:?}");
    // Nothing failed: the destination still waits for its source, which then migrates.
    let v = dst.query_migrate();
    assert_eq!(v["phase"], "setup", "{v}");
    assert_eq!(v["stats"]["rejected_peers"], 1, "{v}");
    src.migrate(&uri, json!({})).expect("migrate");
    assert_completed("precopy", &src.wait_migration(secs(120)));
    dst.wait_phase(secs(60), &["completed"]);
}

#[test]
fn the_source_vmm_killed_mid_precopy_fails_both_sides_cleanly() {
    if !require_kvm("the_source_vmm_killed_mid_precopy_fails_both_sides_cleanly") {
        return;
    }
    let t = TestEnv::new("kill-src-vmm-precopy");
    let mut pair = pair_with_guest(&t, "256M");
    pair.start_migration(json!({"bandwidth_limit": 20_000_000}));
    wait_until(secs(60), "pages to flow", || {
        (pair.src.query_migrate()["stats"]["pages_sent"].as_u64() > Some(1000)).then_some(())
    });
    pair.src.proc.kill();
    // The guest died with its VMM before the switchover: the destination never ran it,
    // says why, and listens again; both umemds serve on.
    let v = assert_destination_failed_without_running(
        &mut pair.dst,
        secs(30),
        AfterFailure::ListensAgain,
    );
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("source")),
        "{v}"
    );
    assert!(pair.umemds_serving(), "a umemd died with the source VMM");
}

#[test]
fn the_destination_vmm_killed_after_it_ran_never_resumes_the_source() {
    if !require_kvm("the_destination_vmm_killed_after_it_ran_never_resumes_the_source") {
        return;
    }
    let t = TestEnv::new("kill-dst-vmm-postcopy");
    let mut pair = pair_with_guest(&t, "256M");
    pair.start_migration(json!({"mode": "postcopy", "no_background": true}));
    pair.dst.wait_phase(secs(60), &["postcopy"]);
    let last = pair.src.last_pass_number();
    pair.dst.wait_pass(secs(60), last + 1);
    pair.dst.proc.kill();
    // The guest's newest state died with the destination: nothing brings it back, and the
    // source must not pretend otherwise by resuming an older copy.
    let o = pair.src.wait_migration(secs(60));
    assert_eq!(o.phase, "failed", "{}", o.raw);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(pair.src.status(), "postmigrate");
    assert_eq!(
        pair.src.last_pass_number(),
        last,
        "the source ran the guest again"
    );
    assert!(pair.src.ctl("cont", json!({})).is_err());
    assert!(
        pair.umemds_serving(),
        "a umemd died with the destination VMM"
    );
}

#[test]
fn migrate_cancel_on_the_destination_ends_a_stuck_incoming_attempt() {
    if !require_kvm("migrate_cancel_on_the_destination_ends_a_stuck_incoming_attempt") {
        return;
    }
    let t = TestEnv::new("cancel-incoming");
    let du = t.umemd("umemd-dst");
    let mut dst = t.vmm("dst", &du).mem("64M").incoming_any().start();
    let uri = dst.listen_uri();
    // A source that says hello, then nothing, with a minute of patience asked for.
    let (mut main, _urgent) = handshake_then_silence(&uri, 64 << 20, 60_000);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    dst.ctl("migrate-cancel", json!({}))
        .expect("migrate-cancel on the destination");
    let v =
        assert_destination_failed_without_running(&mut dst, secs(10), AfterFailure::ListensAgain);
    assert!(t0.elapsed() < secs(3), "the cancel took {:?}", t0.elapsed());
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("cancelled")),
        "{v}"
    );
    // The stuck source was let go.
    main.set_read_timeout(Some(secs(10))).unwrap();
    let mut rest = Vec::new();
    let _ = main.read_to_end(&mut rest);
    // The VM never ran, and waits for the next source.
    assert_eq!(dst.status(), "inmigrate");
}
