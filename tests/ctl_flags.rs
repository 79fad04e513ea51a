//! `umem-ctl migrate`'s virsh-style flags, end to end: each is given to the real `umem-ctl`
//! binary, and the test watches the migration do what the flag says (the switchover's kind, its
//! time, the rate on the wire, the cancel). `wait-migrate`'s progress shows as plain lines on a
//! pipe and as a bar on a pseudo-terminal (`script`).
//!
//! Every source is memtouch on 64 MiB of prefilled RAM, its 16 MiB working set rewritten a few
//! times per second: a round of all 64 MiB at 8 MiB/s takes 8 s, and at those rates a precopy
//! never converges by itself.
//!
//! Run with `cargo test --release --test ctl_flags -- --test-threads=1`.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use umem_testkit::pair::{
    assert_completed, assert_guest_continues, assert_keeps_running, MigrationSetup, Pair,
    MEMTOUCH_CMDLINE,
};
use umem_testkit::{binary, require_kvm, secs, wait_until, TestEnv, Vmm};

const MIB: f64 = 1048576.0;

/// A memtouch pair on 64 MiB, the source's RAM prefilled and its guest a few passes in.
fn memtouch_pair(t: &TestEnv) -> Pair {
    let mut pair = MigrationSetup::memtouch(t, "64M", MEMTOUCH_CMDLINE)
        .prefilled()
        .start();
    pair.src.wait_pass(secs(60), 2);
    pair
}

/// `umem-ctl -s <vm's socket> ARGS...`, run to its end.
fn umem_ctl(vm: &Vmm, args: &[&str]) -> Output {
    Command::new(binary("umem-ctl"))
        .arg("--timeout")
        .arg("120")
        .arg("-s")
        .arg(vm.control_path())
        .args(args)
        .output()
        .expect("running umem-ctl")
}

/// `umem-ctl migrate FLAGS... <destination's URI>` on the source; returns when the command
/// returned (the migration runs on).
fn migrate_with(pair: &mut Pair, flags: &[&str]) -> Instant {
    let uri = pair.dst.listen_uri();
    let mut args = vec!["migrate"];
    args.extend_from_slice(flags);
    args.push(&uri);
    let started = Instant::now();
    let out = umem_ctl(&pair.src, &args);
    assert!(
        out.status.success(),
        "umem-ctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    started
}

/// Polls the source until its precopy ends (any phase but setup and precopy); returns the time
/// since `started` and that reply.
fn precopy_end(src: &Vmm, started: Instant) -> (Duration, Value) {
    wait_until(secs(120), "the precopy to end", || {
        let v = src.query_migrate();
        (!matches!(v["phase"].as_str(), Some("setup" | "precopy"))).then(|| (started.elapsed(), v))
    })
}

/// `bytes_sent` of a `query-migrate` reply.
fn bytes_sent(v: &Value) -> u64 {
    v["stats"]["bytes_sent"].as_u64().unwrap_or(0)
}

/// Waits for the source to complete, asserts the switchover it reports, and that the guest
/// runs on at the destination; returns the final `query-migrate`.
fn assert_completes_with(pair: &mut Pair, switchover: &str) -> Value {
    let o = pair.src.wait_migration(secs(120));
    assert_completed("source", &o);
    assert_eq!(o.raw["switchover"], switchover, "{}", o.raw);
    pair.dst.wait_phase(secs(60), &["completed"]);
    assert_guest_continues(&pair.src, &mut pair.dst, 2, secs(60));
    o.raw
}

#[test]
fn postcopy_moves_a_precopy_that_cannot_converge_to_postcopy() {
    if !require_kvm("postcopy_moves_a_precopy_that_cannot_converge_to_postcopy") {
        return;
    }
    let t = TestEnv::new("ctl-postcopy");
    let mut pair = memtouch_pair(&t);
    migrate_with(&mut pair, &["--postcopy", "--bandwidth", "16"]);
    let v = assert_completes_with(&mut pair, "postcopy");
    // Precopy came first, and went on past its first round: only a round that did not shrink
    // what was left (or the round limit) moved it to postcopy.
    let rounds = v["stats"]["rounds"].as_u64().unwrap_or(0);
    assert!(rounds >= 2, "postcopy after {rounds} round(s): {v}");
}

#[test]
fn postcopy_after_precopy_switches_after_the_first_pass() {
    if !require_kvm("postcopy_after_precopy_switches_after_the_first_pass") {
        return;
    }
    let t = TestEnv::new("ctl-postcopy-after-precopy");
    let mut pair = memtouch_pair(&t);
    // The flags mix with key=value parameters.
    migrate_with(
        &mut pair,
        &[
            "--postcopy",
            "--postcopy-after-precopy",
            "--bandwidth",
            "32",
            "downtime_limit_ms=10",
        ],
    );
    let v = assert_completes_with(&mut pair, "postcopy");
    assert_eq!(v["stats"]["rounds"], 1, "{v}");
    let p = pair
        .src
        .ctl("query-migrate-parameters", Value::Null)
        .expect("query-migrate-parameters");
    assert_eq!(p["mode"], "hybrid", "{p}");
    assert_eq!(p["postcopy_after_rounds"], 1, "{p}");
    assert_eq!(p["bandwidth_limit"], 32 << 20, "{p}");
    assert_eq!(p["downtime_limit_ms"], 10, "{p}");
}

#[test]
fn bandwidth_caps_the_precopy_rate() {
    if !require_kvm("bandwidth_caps_the_precopy_rate") {
        return;
    }
    let t = TestEnv::new("ctl-bandwidth");
    let mut pair = memtouch_pair(&t);
    migrate_with(&mut pair, &["--bandwidth", "16"]);
    // The first round (64 MiB) takes about 4 s at the cap: measure 2 s of it, once pages flow.
    let (t1, b1) = wait_until(secs(60), "pages to flow", || {
        let v = pair.src.query_migrate();
        (v["phase"] == "precopy" && bytes_sent(&v) > 1 << 20)
            .then(|| (Instant::now(), bytes_sent(&v)))
    });
    std::thread::sleep(Duration::from_secs(2));
    let v = pair.src.query_migrate();
    let rate = (bytes_sent(&v) - b1) as f64 / t1.elapsed().as_secs_f64();
    eprintln!("precopy at {:.1} MiB/s under --bandwidth 16", rate / MIB);
    assert_eq!(v["phase"], "precopy", "the measure left the precopy: {v}");
    assert!(
        rate <= 16.0 * MIB * 1.1,
        "{:.1} MiB/s over a cap of 16",
        rate / MIB
    );
    assert!(
        rate >= 16.0 * MIB * 0.5,
        "{:.1} MiB/s: far below the cap of 16, the measure shows nothing",
        rate / MIB
    );
    let p = pair
        .src
        .ctl("query-migrate-parameters", Value::Null)
        .expect("query-migrate-parameters");
    assert_eq!(p["bandwidth_limit"], 16 << 20, "{p}");

    // Lifted while it runs, the rate goes far past the old cap (the rest goes at once).
    let out = umem_ctl(&pair.src, &["migrate-set-parameters", "--bandwidth", "0"]);
    assert!(out.status.success(), "{out:?}");
    let o = pair.src.wait_migration(secs(120));
    assert_completed("source", &o);
}

#[test]
fn timeout_alone_suspends_the_guest_after_about_n_seconds() {
    if !require_kvm("timeout_alone_suspends_the_guest_after_about_n_seconds") {
        return;
    }
    let t = TestEnv::new("ctl-timeout-suspend");
    let mut pair = memtouch_pair(&t);
    let started = migrate_with(&mut pair, &["--timeout", "2", "--bandwidth", "8"]);
    let (after, v) = precopy_end(&pair.src, started);
    eprintln!("precopy ended after {after:?} with --timeout 2");
    // Without the timeout the first round alone would take 8 s.
    assert!(
        after >= Duration::from_millis(1800) && after < Duration::from_secs(6),
        "precopy ended after {after:?}: {v}"
    );
    let v = assert_completes_with(&mut pair, "precopy");
    assert_eq!(v["stats"]["rounds"], 1, "{v}");
}

#[test]
fn timeout_postcopy_switches_to_postcopy_after_about_n_seconds() {
    if !require_kvm("timeout_postcopy_switches_to_postcopy_after_about_n_seconds") {
        return;
    }
    let t = TestEnv::new("ctl-timeout-postcopy");
    let mut pair = memtouch_pair(&t);
    let started = migrate_with(
        &mut pair,
        &[
            "--postcopy",
            "--timeout",
            "3",
            "--timeout-postcopy",
            "--bandwidth",
            "8",
            "--postcopy-bandwidth",
            "16",
        ],
    );
    let (after, v) = precopy_end(&pair.src, started);
    eprintln!("postcopy began after {after:?} with --timeout 3 --timeout-postcopy");
    assert!(
        after >= Duration::from_millis(2700) && after < Duration::from_secs(7),
        "precopy ended after {after:?}: {v}"
    );
    // Postcopy's background pages go at their own cap, twice the precopy's: measure from the
    // first postcopy sample to the end.
    let (t1, b1) = wait_until(secs(60), "postcopy", || {
        let v = pair.src.query_migrate();
        match v["phase"].as_str() {
            Some("postcopy") => Some((Instant::now(), bytes_sent(&v))),
            Some("completed" | "failed") => panic!("no postcopy phase seen: {v}"),
            _ => None,
        }
    });
    let o = pair.src.wait_migration(secs(120));
    let took = t1.elapsed().as_secs_f64();
    let rate = (o.stat("bytes_sent") - b1) as f64 / took;
    assert!(
        o.stat("bytes_sent") - b1 > 16 << 20,
        "too little went in postcopy to measure: {}",
        o.raw
    );
    eprintln!(
        "postcopy at {:.1} MiB/s under --postcopy-bandwidth 16",
        rate / MIB
    );
    assert!(
        rate <= 16.0 * MIB * 1.25 && rate > 8.0 * MIB * 1.2,
        "postcopy at {:.1} MiB/s with --postcopy-bandwidth 16 and --bandwidth 8",
        rate / MIB
    );
    let v = assert_completes_with(&mut pair, "postcopy");
    assert_eq!(v["stats"]["rounds"], 1, "{v}");
}

#[test]
fn completion_timeout_cancels_a_precopy_that_cannot_converge() {
    if !require_kvm("completion_timeout_cancels_a_precopy_that_cannot_converge") {
        return;
    }
    let t = TestEnv::new("ctl-completion-cancel");
    let mut pair = memtouch_pair(&t);
    // 32 s per GiB on 64 MiB: 2 s.
    let started = migrate_with(
        &mut pair,
        &["--completion-timeout-per-gib", "32", "--bandwidth", "8"],
    );
    // wait-migrate on a pipe: plain progress lines on stderr, the outcome on stdout.
    let out = umem_ctl(&pair.src, &["wait-migrate"]);
    let after = started.elapsed();
    eprintln!("wait-migrate returned after {after:?} with a 2 s completion timeout");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("precopy") && l.contains('%')),
        "no plain progress line: {stderr}"
    );
    assert!(
        !stderr.contains('\x1b') && !stderr.contains("ETA"),
        "a bar on a pipe: {stderr:?}"
    );
    assert!(stdout.contains("phase: failed"), "{stdout}");
    assert!(stdout.contains("completion timeout"), "{stdout}");
    assert!(
        after < Duration::from_secs(7),
        "cancelled after {after:?}, not about 2 s"
    );
    // The VM never left: it runs on here, and the destination listens again.
    assert_keeps_running("source", &mut pair.src);
    pair.dst.wait_incoming_failures(secs(30), 1);
    assert_eq!(pair.dst.status(), "inmigrate");
}

#[test]
fn completion_timeout_moves_to_postcopy_when_allowed_and_the_bar_shows_it() {
    if !require_kvm("completion_timeout_moves_to_postcopy_when_allowed_and_the_bar_shows_it") {
        return;
    }
    let t = TestEnv::new("ctl-completion-postcopy");
    let mut pair = memtouch_pair(&t);
    migrate_with(
        &mut pair,
        &[
            "--postcopy",
            "--completion-timeout-per-gib",
            "32",
            "--bandwidth",
            "8",
        ],
    );
    // wait-migrate on a pseudo-terminal, 160 columns wide, through script(1).
    let ctl = format!(
        "stty cols 160 rows 40; {} --timeout 120 -s {} wait-migrate",
        binary("umem-ctl").display(),
        pair.src.control_path().display()
    );
    let out = Command::new("script")
        .args(["-qefc", &ctl, "/dev/null"])
        .output()
        .expect("running script");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wait-migrate under a pty: {shown}");
    for text in [
        "precopy", "postcopy", "% ", "MiB/s", " left", "ETA ", "dirty ", "faults ", "[=",
    ] {
        assert!(shown.contains(text), "the bar lacks {text:?}:\n{shown}");
    }
    assert!(
        !shown.contains("round "),
        "plain lines on a terminal:\n{shown}"
    );
    let v = pair.src.query_migrate();
    assert_eq!(v["switchover"], "postcopy", "{v}");
    // The first round (8 s at 8 MiB/s) never ended: the 2 s limit cut it short.
    assert_eq!(v["stats"]["rounds"], 1, "{v}");
    pair.dst.wait_phase(secs(60), &["completed"]);
    assert_guest_continues(&pair.src, &mut pair.dst, 2, secs(60));
}
