//! Peer authentication end to end: only a source that proves it knows the migration's secret
//! can migrate into a VM, on every connection (main stream, urgent channel, recovery); a peer
//! that fails is dropped, counted, and the destination keeps waiting for its source; without a
//! secret, only loopback is allowed unless the operator says `insecure`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use proto::auth::Secret;
use proto::peer::{PeerMessage, VERSION};
use serde_json::json;
use umem_testkit::pair::{
    assert_completed, assert_guest_runs_on, assert_same_ram_outside_working_set, memtouch_source,
    migrate_and_run_on, MEMTOUCH_PAGES,
};
use umem_testkit::peer::RawSource;
use umem_testkit::proxy::FaultProxy;
use umem_testkit::{binary, require_kvm, secs, wait_until, TestEnv, Umemd, Vmm};

const SECRET: &str = "correct horse battery staple";

/// A destination whose incoming migration requires the secret in `key`.
fn destination(t: &TestEnv, du: &Umemd, key: &PathBuf) -> Vmm {
    t.vmm("dst", du)
        .mem("128M")
        .incoming_any()
        .arg("--incoming-secret-file")
        .arg(key)
        .start()
}

#[test]
fn the_same_secret_migrates_in_postcopy_with_every_connection_authenticated() {
    if !require_kvm("the_same_secret_migrates_in_postcopy_with_every_connection_authenticated") {
        return;
    }
    let t = TestEnv::new("auth-postcopy");
    let (su, du) = (t.umemd("umemd-src"), t.umemd("umemd-dst"));
    let key = t.secret_file("vm.key", &format!("{SECRET}\n"));
    let mut src = memtouch_source(&t, &su, "src", "128M");
    let mut dst = destination(&t, &du, &key);
    let uri = dst.listen_uri();
    src.migrate(
        &uri,
        json!({"mode": "postcopy", "secret_file": key.to_str().unwrap()}),
    )
    .expect("migrate");
    assert_completed("source", &src.wait_migration(secs(120)));
    dst.wait_phase(secs(60), &["completed"]);
    // The urgent channel went through the same door: nothing was turned away.
    assert_eq!(dst.rejected_peers(), 0, "{}", dst.query_migrate());
    assert_guest_runs_on(&src, &mut dst, 2, secs(60));
    assert_same_ram_outside_working_set(&src, &dst, MEMTOUCH_PAGES);
}

#[test]
fn a_wrong_or_missing_secret_is_refused_and_the_destination_keeps_listening() {
    if !require_kvm("a_wrong_or_missing_secret_is_refused_and_the_destination_keeps_listening") {
        return;
    }
    let t = TestEnv::new("auth-wrong-secret");
    let (su, du) = (t.umemd("umemd-src"), t.umemd("umemd-dst"));
    let key = t.secret_file("vm.key", SECRET);
    let mut src = memtouch_source(&t, &su, "src", "128M");
    let mut dst = destination(&t, &du, &key);
    let uri = dst.listen_uri();
    let before = dst.digest();

    // Another secret: the source finds the destination cannot prove it knows the source's.
    src.migrate(&uri, json!({"secret": "a different secret value"}))
        .expect("migrate");
    let o = src.wait_migration(secs(60));
    assert_eq!(o.phase, "failed", "{:?}", o.raw);
    let e = o.error.unwrap_or_default();
    assert!(e.contains("could not prove"), "{e}");
    assert_eq!(src.status(), "running", "the source VM must keep running");

    // No secret at all: the destination says it requires one.
    src.migrate(&uri, json!({})).expect("migrate");
    let o = src.wait_migration(secs(60));
    assert_eq!(o.phase, "failed", "{:?}", o.raw);
    let e = o.error.unwrap_or_default();
    assert!(e.contains("authentication required"), "{e}");

    // Both were dropped at the door; the destination never left setup, nothing was written,
    // and it still waits: the real source then migrates.
    dst.wait_rejected_peers(2, secs(10));
    let v = dst.query_migrate();
    assert_eq!(v["phase"], "setup", "{v}");
    assert_eq!(v["failed_attempts"], 0, "{v}");
    assert_eq!(
        dst.digest(),
        before,
        "a refused peer changed the destination's RAM"
    );
    migrate_and_run_on(&mut src, &mut dst, &uri, json!({"secret": SECRET}));
}

#[test]
fn a_recorded_exchange_replayed_to_a_destination_is_refused() {
    if !require_kvm("a_recorded_exchange_replayed_to_a_destination_is_refused") {
        return;
    }
    let t = TestEnv::new("auth-replay");
    let du = t.umemd("umemd-dst");
    let key = t.secret_file("vm.key", SECRET);
    let mut dst = destination(&t, &du, &key);
    let uri = dst.listen_uri();
    let before = dst.digest();
    // A genuine exchange and hello, recorded...
    let secret = Secret::new(SECRET.as_bytes().to_vec()).unwrap();
    let mut real = RawSource::connect(&uri, Some(&secret)).expect("authenticate");
    real.send(&PeerMessage::Hello {
        version: VERSION,
        capabilities: 0,
        session_id: 1,
        link_timeout_ms: 5000,
    })
    .unwrap();
    assert!(matches!(real.read(), Ok(PeerMessage::Hello { .. })));
    let recorded = real.sent.clone();
    drop(real);
    // ...which fails the first migration (the peer went away), after which the destination
    // listens again; the same bytes replayed do not pass its fresh challenge.
    dst.wait_incoming_failures(secs(30), 1);
    wait_until(secs(30), "the destination to listen again", || {
        (dst.status() == "inmigrate").then_some(())
    });
    let uri = dst.listen_uri();
    let rejected_before = dst.rejected_peers();
    let mut replay = RawSource::connect_bare(&uri).unwrap();
    use std::io::{Read, Write};
    replay.stream.write_all(&recorded).unwrap();
    let mut answer = Vec::new();
    let _ = replay.stream.read_to_end(&mut answer);
    dst.wait_rejected_peers(rejected_before + 1, secs(10));
    let v = dst.query_migrate();
    assert_eq!(v["phase"], "setup", "{v}");
    assert_eq!(dst.status(), "inmigrate");
    assert_eq!(dst.digest(), before);
}

#[test]
fn recovery_connections_authenticate_too() {
    if !require_kvm("recovery_connections_authenticate_too") {
        return;
    }
    let t = TestEnv::new("auth-recovery");
    let (su, du) = (t.umemd("umemd-src"), t.umemd("umemd-dst"));
    let key = t.secret_file("vm.key", SECRET);
    let mut src = memtouch_source(&t, &su, "src", "128M");
    let mut dst = destination(&t, &du, &key);
    let proxy = FaultProxy::in_front_of(&dst.listen_uri());
    src.migrate(
        &proxy.uri(),
        json!({"mode": "postcopy", "bandwidth_limit": 20_000_000, "link_timeout_ms": 1000,
               "secret_file": key.to_str().unwrap()}),
    )
    .expect("migrate");
    dst.wait_phase(secs(60), &["postcopy"]);
    proxy.cut();
    wait_until(secs(10), "the destination to pause", || {
        (dst.phase() == "postcopy-paused").then_some(())
    });
    // While it waits, a stranger without the secret knocks, and is turned away.
    let uri = dst.listen_uri();
    let rejected_before = dst.rejected_peers();
    let mut stranger = RawSource::connect(&uri, None).expect("connect");
    assert!(
        matches!(stranger.read(), Ok(PeerMessage::Error(e)) if e.contains("authentication required"))
    );
    dst.wait_rejected_peers(rejected_before + 1, secs(10));
    assert_eq!(dst.phase(), "postcopy-paused");
    let back = Instant::now();
    proxy.restore();
    assert_completed("source", &src.wait_migration(secs(120)));
    dst.wait_phase(secs(60), &["completed"]);
    eprintln!(
        "recovered and completed {:?} after the link came back",
        back.elapsed()
    );
    assert!(dst.query_migrate()["postcopy"]["recoveries"].as_u64() >= Some(1));
    assert_guest_runs_on(&src, &mut dst, 2, secs(60));
    assert_same_ram_outside_working_set(&src, &dst, MEMTOUCH_PAGES);
}

#[test]
fn beyond_loopback_a_secret_or_insecure_is_required() {
    if !require_kvm("beyond_loopback_a_secret_or_insecure_is_required") {
        return;
    }
    let t = TestEnv::new("auth-exposure");
    let (su, du) = (t.umemd("umemd-src"), t.umemd("umemd-dst"));
    // A destination on every address without a secret does not start.
    let out = Command::new(binary("vmm"))
        .args(["--mem", "64M", "--incoming", "tcp:0.0.0.0:0", "--control"])
        .arg(t.dir().join("refused.ctl"))
        .arg("--umemd")
        .arg(du.socket())
        .output()
        .expect("running vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("not a loopback address") && stderr.contains("insecure"),
        "{stderr}"
    );
    // With insecure, or with a secret, it listens.
    let mut open = t
        .vmm("open", &du)
        .mem("64M")
        .incoming("tcp:0.0.0.0:0")
        .arg("--incoming-insecure")
        .start();
    assert!(open.listen_uri().starts_with("tcp:0.0.0.0:"));
    let key = t.secret_file("vm.key", SECRET);
    let mut guarded = t
        .vmm("guarded", &du)
        .mem("64M")
        .incoming("tcp:0.0.0.0:0")
        .arg("--incoming-secret-file")
        .arg(&key)
        .start();
    assert!(guarded.listen_uri().starts_with("tcp:0.0.0.0:"));
    // A source does not send its memory beyond loopback without a secret either.
    let src = t.vmm("src", &su).mem("64M").guest("memtouch").start();
    let port = guarded.listen_uri().rsplit(':').next().unwrap().to_string();
    src.migrate(&format!("tcp:0.0.0.0:{port}"), json!({}))
        .expect("migrate");
    let mut src = src;
    let o = src.wait_migration(secs(30));
    assert_eq!(o.phase, "failed");
    assert!(
        o.error
            .as_deref()
            .is_some_and(|e| e.contains("not a loopback address")),
        "{:?}",
        o.error
    );
    assert_eq!(src.status(), "running");
}

#[test]
fn a_deferred_incoming_takes_its_address_and_secret_from_migrate_incoming() {
    if !require_kvm("a_deferred_incoming_takes_its_address_and_secret_from_migrate_incoming") {
        return;
    }
    let t = TestEnv::new("auth-defer");
    let (su, du) = (t.umemd("umemd-src"), t.umemd("umemd-dst"));
    let mut src = memtouch_source(&t, &su, "src", "128M");
    let mut dst = t.vmm("dst", &du).mem("128M").incoming("defer").start();
    assert_eq!(dst.status(), "inmigrate");
    assert!(dst.query_migrate()["listen_uri"].is_null());
    let e = dst
        .ctl(
            "migrate-incoming",
            json!({"uri": "tcp:127.0.0.1:0", "secret": "short"}),
        )
        .unwrap_err();
    assert!(e.contains("at least 16 bytes"), "{e}");
    dst.ctl(
        "migrate-incoming",
        json!({"uri": "tcp:127.0.0.1:0", "secret": SECRET}),
    )
    .expect("migrate-incoming");
    let e = dst
        .ctl("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}))
        .unwrap_err();
    assert!(e.contains("once"), "{e}");
    let uri = dst.listen_uri();
    migrate_and_run_on(&mut src, &mut dst, &uri, json!({"secret": SECRET}));
}

#[test]
fn a_host_secret_file_of_umemd_serves_every_migration_without_one() {
    if !require_kvm("a_host_secret_file_of_umemd_serves_every_migration_without_one") {
        return;
    }
    let t = TestEnv::new("auth-host-key");
    let key = t.secret_file("host.key", SECRET);
    let keyed = |name: &str| {
        t.umemd_builder(name)
            .arg("--secret-file")
            .arg(key.as_os_str())
            .start()
    };
    let (su, du) = (keyed("umemd-src"), keyed("umemd-dst"));
    let plain = t.umemd("umemd-plain");
    let mut src = memtouch_source(&t, &su, "src", "128M");
    // Beyond loopback is allowed: the host's secret guards it.
    let mut dst = t
        .vmm("dst", &du)
        .mem("128M")
        .incoming("tcp:0.0.0.0:0")
        .start();
    let port = dst.listen_uri().rsplit(':').next().unwrap().to_string();
    let uri = format!("tcp:127.0.0.1:{port}");
    // A source host without the secret is turned away.
    let mut stranger = t
        .vmm("stranger", &plain)
        .mem("128M")
        .guest("memtouch")
        .start();
    stranger.migrate(&uri, json!({})).expect("migrate");
    let o = stranger.wait_migration(secs(60));
    assert!(
        o.error
            .as_deref()
            .is_some_and(|e| e.contains("authentication required")),
        "{:?}",
        o.raw
    );
    src.migrate(&uri, json!({"mode": "postcopy"}))
        .expect("migrate");
    assert_completed("source", &src.wait_migration(secs(120)));
    dst.wait_phase(secs(60), &["completed"]);
    assert!(dst.rejected_peers() >= 1);
    assert_guest_runs_on(&src, &mut dst, 2, secs(60));
}
