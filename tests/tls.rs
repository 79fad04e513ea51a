//! TLS end to end: with TLS credentials on both sides every connection of a migration (main
//! stream, urgent channel, recovery) runs TLS 1.3 with a certificate on each side; a postcopy
//! recovers over it; a source whose certificate another CA signed, or that speaks no TLS, is
//! turned away while the destination keeps listening; a TLS source at a plain destination
//! fails clearly; TLS and a secret work together.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use umem_testkit::pair::{
    assert_completed, assert_guest_runs_on, assert_same_ram_outside_working_set, memtouch_source,
    migrate_and_run_on, MEMTOUCH_PAGES,
};
use umem_testkit::proxy::FaultProxy;
use umem_testkit::tls::make_creds;
use umem_testkit::{require_kvm, secs, wait_until, TestEnv, Umemd, Vmm};

const SECRET: &str = "correct horse battery staple";
const LINK_TIMEOUT_MS: u64 = 1000;
/// What a silent link may take beyond the link timeout to be noticed.
const DETECTION_SLACK: Duration = Duration::from_millis(1000);

/// Credentials for a destination reached at 127.0.0.1.
fn creds(t: &TestEnv, name: &str) -> PathBuf {
    make_creds(&t.dir().join(name), &["127.0.0.1", "localhost"])
}

fn arg(dir: &Path) -> &str {
    dir.to_str().expect("a UTF-8 path")
}

/// A destination that requires TLS with the credentials in `dir`.
fn destination(t: &TestEnv, du: &Umemd, dir: &Path) -> Vmm {
    t.vmm("dst", du)
        .mem("128M")
        .incoming_any()
        .arg("--incoming-tls-creds")
        .arg(dir)
        .start()
}

fn postcopy_stat(vm: &Vmm, key: &str) -> u64 {
    vm.query_migrate()["postcopy"][key].as_u64().unwrap_or(0)
}

/// The source's migration fails with an error that contains every one of `words`; its VM
/// keeps running.
fn assert_fails_with(src: &mut Vmm, words: &[&str]) -> String {
    let o = src.wait_migration(secs(60));
    assert_eq!(o.phase, "failed", "{:?}", o.raw);
    let e = o.error.unwrap_or_default();
    for w in words {
        assert!(e.contains(w), "{w:?} not in: {e}");
    }
    assert_eq!(src.status(), "running", "the source VM must keep running");
    e
}

/// The destination turned `n` peers away at the gate and still waits, untouched.
fn assert_still_waiting(dst: &Vmm, n: u64, before: &[(String, String)]) {
    dst.wait_rejected_peers(n, secs(10));
    let v = dst.query_migrate();
    assert_eq!(v["phase"], "setup", "{v}");
    assert_eq!(v["failed_attempts"], 0, "{v}");
    assert_eq!(dst.status(), "inmigrate");
    assert_eq!(
        dst.digest(),
        before,
        "a refused peer changed the destination's RAM"
    );
}

#[test]
fn postcopy_over_tls_completes_with_the_same_ram_and_the_guest_running() {
    if !require_kvm("postcopy_over_tls_completes_with_the_same_ram_and_the_guest_running") {
        return;
    }
    let t = TestEnv::new("tls-postcopy");
    let (su, du) = (t.umemd("umemd-src"), t.umemd("umemd-dst"));
    let dir = creds(&t, "tls");
    let mut src = memtouch_source(&t, &su, "src", "128M");
    // TLS authenticates both sides: every address, and no secret, is allowed.
    let mut dst = t
        .vmm("dst", &du)
        .mem("128M")
        .incoming("tcp:0.0.0.0:0")
        .arg("--incoming-tls-creds")
        .arg(&dir)
        .start();
    let port = dst.listen_uri().rsplit(':').next().unwrap().to_string();
    src.migrate(
        &format!("tcp:127.0.0.1:{port}"),
        json!({"mode": "postcopy", "tls_creds": arg(&dir)}),
    )
    .expect("migrate");
    assert_completed("source", &src.wait_migration(secs(120)));
    dst.wait_phase(secs(60), &["completed"]);
    // The urgent channel went through the same door: nothing was turned away.
    assert_eq!(dst.rejected_peers(), 0, "{}", dst.query_migrate());
    assert!(
        postcopy_stat(&dst, "pages_urgent") > 0,
        "{}",
        dst.query_migrate()
    );
    assert_guest_runs_on(&src, &mut dst, 2, secs(60));
    assert_same_ram_outside_working_set(&src, &dst, MEMTOUCH_PAGES);
}

#[test]
fn a_postcopy_link_cut_and_restored_recovers_over_tls() {
    if !require_kvm("a_postcopy_link_cut_and_restored_recovers_over_tls") {
        return;
    }
    let t = TestEnv::new("tls-recovery");
    let (su, du) = (t.umemd("umemd-src"), t.umemd("umemd-dst"));
    let dir = creds(&t, "tls");
    let mut src = memtouch_source(&t, &su, "src", "128M");
    let mut dst = destination(&t, &du, &dir);
    let proxy = FaultProxy::bytes_in_front_of(&dst.listen_uri());
    src.migrate(
        &proxy.uri(),
        json!({"mode": "postcopy", "bandwidth_limit": 20_000_000,
               "link_timeout_ms": LINK_TIMEOUT_MS, "tls_creds": arg(&dir)}),
    )
    .expect("migrate");
    dst.wait_phase(secs(60), &["postcopy"]);
    let last = src.last_pass().map_or(0, |p| p.pass);
    dst.wait_pass(secs(60), last + 1);

    // A silent link is noticed within the link timeout on both sides, through TLS.
    proxy.stall();
    let t0 = Instant::now();
    wait_until(secs(30), "both sides to pause", || {
        (src.phase() == "postcopy-paused" && dst.phase() == "postcopy-paused").then_some(())
    });
    let took = t0.elapsed();
    eprintln!("a stalled TLS link was noticed after {took:?}");
    assert!(
        took <= Duration::from_millis(LINK_TIMEOUT_MS) + DETECTION_SLACK,
        "{took:?}"
    );
    assert_eq!(dst.status(), "running", "the destination VM stopped");
    // Then cut outright while paused, and restored: the source reconnects over TLS.
    proxy.cut();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(src.phase(), "postcopy-paused");
    let back = Instant::now();
    proxy.restore();
    assert_completed("source", &src.wait_migration(secs(180)));
    dst.wait_phase(secs(60), &["completed"]);
    eprintln!(
        "recovered and completed {:?} after the link came back",
        back.elapsed()
    );
    for vm in [&src, &dst] {
        assert!(
            postcopy_stat(vm, "recoveries") >= 1,
            "{}",
            vm.query_migrate()
        );
    }
    assert_guest_runs_on(&src, &mut dst, 2, secs(60));
    assert_same_ram_outside_working_set(&src, &dst, MEMTOUCH_PAGES);
}

#[test]
fn a_client_certificate_of_another_ca_is_refused_and_the_destination_keeps_listening() {
    if !require_kvm(
        "a_client_certificate_of_another_ca_is_refused_and_the_destination_keeps_listening",
    ) {
        return;
    }
    let t = TestEnv::new("tls-foreign-ca");
    let (su, du) = (t.umemd("umemd-src"), t.umemd("umemd-dst"));
    let ours = creds(&t, "ours");
    let theirs = creds(&t, "theirs");
    // Trusts the destination's CA, but its own certificate comes from another CA.
    let foreign = t.dir().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    for (from, f) in [
        (&ours, "ca-cert.pem"),
        (&theirs, "client-cert.pem"),
        (&theirs, "client-key.pem"),
    ] {
        std::fs::copy(from.join(f), foreign.join(f)).unwrap();
    }
    let mut src = memtouch_source(&t, &su, "src", "128M");
    let mut dst = destination(&t, &du, &ours);
    let uri = dst.listen_uri();
    let before = dst.digest();

    src.migrate(&uri, json!({"tls_creds": arg(&foreign)}))
        .expect("migrate");
    let e = assert_fails_with(&mut src, &["TLS"]);
    eprintln!("a foreign certificate: {e}");
    // A destination whose certificate the source's CA did not sign is refused by the source.
    src.migrate(&uri, json!({"tls_creds": arg(&theirs)}))
        .expect("migrate");
    let e = assert_fails_with(&mut src, &["TLS handshake", "certificate"]);
    eprintln!("a foreign destination: {e}");
    assert_still_waiting(&dst, 2, &before);

    // The real source then migrates.
    let args = json!({"mode": "postcopy", "tls_creds": arg(&ours)});
    migrate_and_run_on(&mut src, &mut dst, &uri, args);
}

#[test]
fn a_plain_source_at_a_tls_destination_and_the_reverse_fail_clearly() {
    if !require_kvm("a_plain_source_at_a_tls_destination_and_the_reverse_fail_clearly") {
        return;
    }
    let t = TestEnv::new("tls-mismatch");
    let (su, du) = (t.umemd("umemd-src"), t.umemd("umemd-dst"));
    let dir = creds(&t, "tls");
    let mut src = memtouch_source(&t, &su, "src", "128M");

    // A plain source at a TLS destination.
    let mut dst = destination(&t, &du, &dir);
    let uri = dst.listen_uri();
    let before = dst.digest();
    src.migrate(&uri, json!({})).expect("migrate");
    assert_fails_with(&mut src, &["requires TLS"]);
    src.migrate(&uri, json!({"secret": SECRET}))
        .expect("migrate");
    assert_fails_with(&mut src, &["requires TLS"]);
    assert_still_waiting(&dst, 2, &before);
    drop(dst);

    // A TLS source at a plain destination.
    let mut plain = t.vmm("plain", &du).mem("128M").incoming_any().start();
    let uri = plain.listen_uri();
    let before = plain.digest();
    src.migrate(&uri, json!({"tls_creds": arg(&dir)}))
        .expect("migrate");
    let e = assert_fails_with(&mut src, &["does not use TLS"]);
    eprintln!("a TLS source at a plain destination: {e}");
    assert_still_waiting(&plain, 1, &before);
    // Both plain: it migrates.
    migrate_and_run_on(&mut src, &mut plain, &uri, json!({}));
}

#[test]
fn tls_and_a_secret_together_and_the_hosts_tls_creds() {
    if !require_kvm("tls_and_a_secret_together_and_the_hosts_tls_creds") {
        return;
    }
    let t = TestEnv::new("tls-secret");
    let dir = creds(&t, "tls");
    // Both umemds have the host's credentials: migrations that name none use them.
    let with_creds = |name: &str| {
        t.umemd_builder(name)
            .arg("--tls-creds")
            .arg(dir.as_os_str())
            .start()
    };
    let (su, du) = (with_creds("umemd-src"), with_creds("umemd-dst"));
    let key = t.secret_file("vm.key", SECRET);
    let mut src = memtouch_source(&t, &su, "src", "128M");
    let mut dst = t
        .vmm("dst", &du)
        .mem("128M")
        .incoming_any()
        .arg("--incoming-secret-file")
        .arg(&key)
        .start();
    let uri = dst.listen_uri();
    let before = dst.digest();
    // TLS alone is not enough where a secret is required too.
    src.migrate(&uri, json!({"secret": "a different secret value"}))
        .expect("migrate");
    assert_fails_with(&mut src, &["could not prove"]);
    assert_still_waiting(&dst, 1, &before);
    src.migrate(
        &uri,
        json!({"mode": "postcopy", "secret_file": key.to_str().unwrap()}),
    )
    .expect("migrate");
    assert_completed("source", &src.wait_migration(secs(120)));
    dst.wait_phase(secs(60), &["completed"]);
    let v: Value = dst.query_migrate();
    assert_eq!(dst.rejected_peers(), 1, "{v}");
    assert_guest_runs_on(&src, &mut dst, 2, secs(60));
    assert_same_ram_outside_working_set(&src, &dst, MEMTOUCH_PAGES);
    // A source host without the credentials cannot reach a destination of this host.
    let plain = t.umemd("umemd-plain");
    let mut stranger = memtouch_source(&t, &plain, "stranger", "128M");
    let mut dst2 = t.vmm("dst2", &du).mem("128M").incoming_any().start();
    stranger
        .migrate(&dst2.listen_uri(), json!({}))
        .expect("migrate");
    assert_fails_with(&mut stranger, &["requires TLS"]);
    dst2.wait_rejected_peers(1, secs(10));
    // Within one host (`unix:`) the connections stay plain, host credentials or not.
    let sock = t.dir().join("local-migration.sock");
    let mut local = t
        .vmm("local", &du)
        .mem("128M")
        .incoming(&format!("unix:{}", sock.display()))
        .start();
    let mut src2 = memtouch_source(&t, &su, "src2", "128M");
    let uri = local.listen_uri();
    migrate_and_run_on(&mut src2, &mut local, &uri, json!({"mode": "postcopy"}));
}
