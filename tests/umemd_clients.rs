//! umemd against clients that misbehave on its local socket: it must refuse them with a reason,
//! leak nothing and go on serving real migrations.
//!
//! Run with `cargo test --release --workspace -- --test-threads=1` (see `testkit/src/lib.rs`).

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use memfd::{FileSeal, MemfdOptions};
use proto::local::{kind, LocalBlock, LocalMessage};
use proto::{BlockDesc, MigrationParams};
use sendfd::SendWithFd;
use serde_json::json;
use sha2::{Digest, Sha256};
use umem_testkit::pair::{
    assert_completed, assert_destination_failed_without_running, assert_guest_runs_on,
    assert_same_ram, AfterFailure, MigrationSetup, MEMTOUCH_CMDLINE,
};
use umem_testkit::{require_kvm, secs, try_wait_until, TestEnv, Umemd};

fn ram_low(size: u64) -> Vec<LocalBlock> {
    vec![LocalBlock {
        desc: BlockDesc {
            name: "ram-low".into(),
            guest_addr: 0,
            size,
        },
        memfd_offset: 0,
        host_addr: 0x7f00_0000_0000,
    }]
}

fn incoming(blocks: Vec<LocalBlock>, has_uffd: bool) -> Vec<u8> {
    let mut buf = Vec::new();
    LocalMessage::Incoming {
        vm: "fake".into(),
        uri: "tcp:127.0.0.1:0".into(),
        blocks,
        has_uffd,
        auth: Default::default(),
    }
    .encode(&mut buf);
    buf
}

fn outgoing(blocks: Vec<LocalBlock>) -> Vec<u8> {
    let mut buf = Vec::new();
    LocalMessage::Outgoing {
        vm: "fake".into(),
        uri: "tcp:127.0.0.1:9".into(),
        params: MigrationParams::default(),
        blocks,
        auth: Default::default(),
    }
    .encode(&mut buf);
    buf
}

/// Guest RAM as the VMM makes it (`vmm/src/memory.rs`): a memfd of `size` bytes sealed against
/// shrinking, growing and further sealing. umemd maps only a memfd sealed against shrinking.
fn sealed_memfd(size: u64) -> File {
    let m = MemfdOptions::default()
        .allow_sealing(true)
        .create("fake-guest-ram")
        .expect("memfd");
    m.as_file().set_len(size).expect("set_len");
    m.add_seals(&[FileSeal::SealShrink, FileSeal::SealGrow, FileSeal::SealSeal])
        .expect("sealing the memfd");
    m.into_file()
}

/// A memfd of `size` bytes that may still shrink: with `allow_sealing` but no seal, or without
/// (then the kernel seals it with `F_SEAL_SEAL` only, and no seal can ever be added).
fn unsealed_memfd(size: u64, allow_sealing: bool) -> File {
    let f = MemfdOptions::default()
        .allow_sealing(allow_sealing)
        .create("fake-guest-ram")
        .expect("memfd")
        .into_file();
    f.set_len(size).expect("set_len");
    f
}

/// Asserts that `ram` cannot shrink, its seal holding (`ftruncate` fails with `EPERM`), and
/// still has `size` bytes.
fn assert_shrink_refused(ram: &File, size: u64) {
    match ram.set_len(0) {
        Ok(()) => panic!("a memfd sealed with F_SEAL_SHRINK shrank to 0 bytes"),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EPERM),
            "shrinking the sealed memfd failed, but not because of its seal: {e}"
        ),
    }
    assert_eq!(ram.metadata().expect("fstat").len(), size);
}

/// SHA-256 of the first `len` bytes of `f`, hex-encoded as in `query-ram-digest`.
fn sha256_hex(f: &File, len: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], off)
            .expect("reading the memfd");
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends the opening message `msg` with `fds`, as a VMM does.
fn send_opening(conn: &UnixStream, msg: &[u8], fds: &[RawFd]) {
    let n = conn.send_with_fd(msg, fds).expect("sendmsg");
    let mut w = conn;
    w.write_all(&msg[n..]).expect("write");
}

/// Reads one message from umemd; panics naming `who` when there is none.
fn read_local(who: &str, conn: &UnixStream) -> LocalMessage {
    let mut body = Vec::new();
    let mut r = conn;
    let p = proto::frame::read(&mut r, &mut body)
        .unwrap_or_else(|e| panic!("{who}: reading from umemd: {e}"));
    LocalMessage::decode(p.kind, &body)
        .unwrap_or_else(|e| panic!("{who}: umemd sent a malformed message: {e}"))
}

/// Connects, sends `bytes` with `fds` (as far as umemd takes them), closes the write side, and
/// returns umemd's first reply:
/// `Some(message)` for a decoded frame, `None` when it closed without one.
fn exchange(u: &Umemd, bytes: &[u8], fds: &[RawFd]) -> Option<LocalMessage> {
    let s = UnixStream::connect(u.socket()).expect("connect to umemd");
    s.set_read_timeout(Some(secs(20))).unwrap();
    if !bytes.is_empty() || !fds.is_empty() {
        // A client umemd refuses as it connects (over a session cap) may find the connection
        // closed before it sends: the reply waiting says why.
        if let Ok(n) = s.send_with_fd(bytes, fds) {
            let _ = (&s).write_all(&bytes[n..]);
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    let mut reply = Vec::new();
    let _ = (&s).read_to_end(&mut reply);
    let (p, body, _) = proto::frame::split(&reply).ok()??;
    Some(LocalMessage::decode(p.kind, body).expect("umemd sent a malformed reply"))
}

/// Expects a `Failed` reply whose message contains one of `words`.
fn expect_refusal(what: &str, reply: Option<LocalMessage>, words: &[&str]) {
    match reply {
        Some(LocalMessage::Failed { message, .. }) => {
            let m = message.to_lowercase();
            assert!(
                words.iter().any(|w| m.contains(w)),
                "{what}: refusal {message:?} names none of {words:?}"
            );
        }
        other => panic!("{what}: expected a Failed reply, got {other:?}"),
    }
}

#[test]
fn umemd_survives_malformed_clients_then_migrates() {
    if !require_kvm("umemd_survives_malformed_clients_then_migrates") {
        return;
    }
    let t = TestEnv::new("umemd-malformed");
    let mut u = t.umemd("umemd");
    let fds0 = u.fd_count();
    let threads0 = u.thread_count();

    // Plain garbage: its first 4 bytes make a frame length far beyond the limit.
    expect_refusal(
        "garbage",
        exchange(&u, b"hello, this is not a frame\n\x00\xff\xfe", &[]),
        &["opening", "frame", "malformed", "exceeds"],
    );
    // A frame header announcing more body than ever arrives.
    expect_refusal(
        "truncated frame",
        exchange(&u, &[100, 0, 0, 0, kind::INCOMING, 1, 2, 3], &[]),
        &["closed", "opening"],
    );
    // A well-framed body of an unknown kind, and one of a known kind that does not decode.
    expect_refusal(
        "unknown kind",
        exchange(&u, &[3, 0, 0, 0, 0xee, 1, 2, 3], &[]),
        &["malformed", "unknown"],
    );
    expect_refusal(
        "bad body",
        exchange(&u, &[3, 0, 0, 0, kind::OUTGOING, 1, 2, 3], &[]),
        &["malformed"],
    );
    // A valid message that may not open a session.
    let mut cancel = Vec::new();
    LocalMessage::Cancel.encode(&mut cancel);
    expect_refusal("cancel first", exchange(&u, &cancel, &[]), &["expected"]);
    // Wrong fd counts.
    let ram = sealed_memfd(64 << 20);
    let devnull = std::fs::File::open("/dev/null").unwrap();
    expect_refusal(
        "incoming without fd",
        exchange(&u, &incoming(ram_low(64 << 20), false), &[]),
        &["needs"],
    );
    expect_refusal(
        "incoming with 2 fds but no uffd",
        exchange(
            &u,
            &incoming(ram_low(64 << 20), false),
            &[ram.as_raw_fd(), devnull.as_raw_fd()],
        ),
        &["needs"],
    );
    expect_refusal(
        "outgoing without fd",
        exchange(&u, &outgoing(ram_low(64 << 20)), &[]),
        &["needs"],
    );
    let many: Vec<RawFd> = std::iter::repeat_n(devnull.as_raw_fd(), 8).collect();
    expect_refusal(
        "outgoing with 8 fds",
        exchange(&u, &outgoing(ram_low(64 << 20)), &many),
        &["needs"],
    );
    // Right count, wrong things: not a memfd, and a memfd smaller than the layout.
    expect_refusal(
        "incoming with /dev/null as RAM",
        exchange(
            &u,
            &incoming(ram_low(64 << 20), false),
            &[devnull.as_raw_fd()],
        ),
        &["not a memfd"],
    );
    let small = sealed_memfd(1 << 20);
    expect_refusal(
        "incoming with a memfd smaller than its layout",
        exchange(
            &u,
            &incoming(ram_low(64 << 20), false),
            &[small.as_raw_fd()],
        ),
        &["outside"],
    );
    // Connect and leave at once.
    drop(UnixStream::connect(u.socket()).unwrap());

    u.proc.assert_alive();
    assert!(u.is_serving(), "umemd stopped accepting connections");
    // Every refused session gave back its descriptors and its thread.
    let settled = try_wait_until(secs(20), || {
        (u.fd_count() <= fds0 && u.thread_count() <= threads0).then_some(())
    });
    assert!(
        settled.is_some(),
        "umemd leaks: {} fds (was {fds0}), {} threads (was {threads0})",
        u.fd_count(),
        u.thread_count()
    );

    // The same daemon now serves a real migration, in both roles at once.
    let setup = MigrationSetup::memtouch(&t, "256M", MEMTOUCH_CMDLINE).paused_destination();
    let mut src = setup.source(&u);
    let mut dst = setup.destination("dst", &u);
    src.wait_pass(secs(60), 2);
    let o = src.migrate_to(&mut dst, json!({}), secs(120));
    assert_completed("source", &o);
    assert_eq!(src.status(), "postmigrate");
    assert_same_ram(&src, &dst);
    dst.resume();
    assert_guest_runs_on(&src, &mut dst, 2, secs(60));
    u.proc.assert_alive();
}

/// RAM that may shrink is refused in both roles, before umemd maps it: a truncation behind a
/// mapping would turn umemd's next access to it into SIGBUS, killing every migration it serves.
#[test]
fn umemd_refuses_memfd_not_sealed_against_shrinking() {
    let t = TestEnv::new("umemd-unsealed-memfd");
    let mut u = t.umemd("umemd");
    for allow_sealing in [true, false] {
        let ram = unsealed_memfd(64 << 20, allow_sealing);
        let what =
            |role: &str| format!("{role} with an unsealed memfd (allow_sealing {allow_sealing})");
        expect_refusal(
            &what("incoming"),
            exchange(&u, &incoming(ram_low(64 << 20), false), &[ram.as_raw_fd()]),
            &["f_seal_shrink"],
        );
        expect_refusal(
            &what("outgoing"),
            exchange(&u, &outgoing(ram_low(64 << 20)), &[ram.as_raw_fd()]),
            &["f_seal_shrink"],
        );
    }
    u.proc.assert_alive();
    assert!(u.is_serving(), "umemd stopped accepting connections");
}

/// A destination VMM cannot shrink its guest RAM behind umemd's back: the memfd is sealed as the
/// VMM seals it, so the attempt fails with EPERM, and the migration into that memfd completes
/// with every page while umemd serves on.
#[test]
fn destination_memfd_cannot_shrink_after_handover() {
    if !require_kvm("destination_memfd_cannot_shrink_after_handover") {
        return;
    }
    let t = TestEnv::new("umemd-shrink-dst-memfd");
    let su = t.umemd("umemd-src");
    let mut du = t.umemd("umemd-dst");

    // A fake destination VMM with the layout of a 256M guest, no userfaultfd (precopy only).
    const SIZE: u64 = 256 << 20;
    let ram = sealed_memfd(SIZE);
    let conn = UnixStream::connect(du.socket()).unwrap();
    send_opening(&conn, &incoming(ram_low(SIZE), false), &[ram.as_raw_fd()]);
    conn.set_read_timeout(Some(secs(20))).unwrap();
    let uri = match read_local("fake destination", &conn) {
        LocalMessage::Listening { uri } => uri,
        other => panic!("expected Listening, got {other:?}"),
    };
    // umemd has mapped it: the VMM tries to take the RAM away.
    assert_shrink_refused(&ram, SIZE);

    let mut src = MigrationSetup::memtouch(&t, "256M", MEMTOUCH_CMDLINE).source(&su);
    src.wait_pass(secs(60), 2);
    src.migrate(&uri, json!({})).expect("migrate");
    // Play the destination VMM: load the machine state (not run it), run once told to, then
    // wait for the end.
    conn.set_read_timeout(Some(secs(120))).unwrap();
    let mut state_loaded = false;
    loop {
        match read_local("fake destination", &conn) {
            LocalMessage::Progress(_) | LocalMessage::Session(_) => {}
            LocalMessage::Run => assert!(state_loaded, "Run before the machine state"),
            LocalMessage::MachineState(_) => {
                let mut out = Vec::new();
                LocalMessage::StateLoaded.encode(&mut out);
                (&conn).write_all(&out).expect("StateLoaded");
                state_loaded = true;
            }
            LocalMessage::Completed(_) => break,
            other => panic!("destination umemd: expected the migration to go on, got {other:?}"),
        }
    }
    assert!(state_loaded, "completed without sending the machine state");
    let o = src.wait_migration(secs(60));
    assert_completed("source", &o);
    assert_eq!(src.status(), "postmigrate");
    // Every page of the stopped source is in the memfd that could not shrink.
    assert_eq!(
        src.digest(),
        vec![("ram-low".to_string(), sha256_hex(&ram, SIZE))],
        "the destination memfd does not hold the source's RAM"
    );
    du.proc.assert_alive();
    assert!(du.is_serving(), "destination umemd stopped serving");
}

/// The same on the source side: umemd reads guest pages through its own mapping of the memfd,
/// which a truncation would turn into SIGBUS. The memfd is sealed as the VMM seals it, so the
/// shrink fails with EPERM, and umemd streams the VM's pages to the destination all the same.
#[test]
fn source_memfd_cannot_shrink_after_handover() {
    if !require_kvm("source_memfd_cannot_shrink_after_handover") {
        return;
    }
    let t = TestEnv::new("umemd-shrink-src-memfd");
    let mut su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    let mut dst = MigrationSetup::memtouch(&t, "256M", MEMTOUCH_CMDLINE)
        .paused_destination()
        .destination("dst", &du);
    let uri = dst.listen_uri();

    // A fake source VMM with a populated first page.
    const SIZE: u64 = 256 << 20;
    const PAGE: [u8; 4096] = [0x5a; 4096];
    let ram = sealed_memfd(SIZE);
    ram.write_all_at(&PAGE, 0).unwrap();
    let mut conn = UnixStream::connect(su.socket()).unwrap();
    let mut msg = Vec::new();
    LocalMessage::Outgoing {
        vm: "fake".into(),
        uri,
        params: MigrationParams::default(),
        blocks: ram_low(SIZE),
        auth: Default::default(),
    }
    .encode(&mut msg);
    send_opening(&conn, &msg, &[ram.as_raw_fd()]);

    // Try to shrink the memfd once umemd has mapped it (the first harvest comes after that),
    // and answer every harvest with page 0 dirty, as a VMM whose guest keeps writing it would.
    // The machine state is not one a vmm can load: the destination ends the migration there.
    conn.set_read_timeout(Some(secs(30))).unwrap();
    let mut harvests = 0;
    let end = loop {
        match read_local("fake source", &conn) {
            LocalMessage::Harvest { stop } => {
                if harvests == 0 {
                    assert_shrink_refused(&ram, SIZE);
                }
                harvests += 1;
                let mut out = Vec::new();
                LocalMessage::DirtyBitmap {
                    block: 0,
                    first_page: 0,
                    words: vec![1],
                }
                .encode(&mut out);
                LocalMessage::BitmapEnd { stopped: stop }.encode(&mut out);
                if stop {
                    LocalMessage::MachineState(vec![0; 64]).encode(&mut out);
                }
                conn.write_all(&out).expect("answering a harvest");
            }
            LocalMessage::Progress(_) | LocalMessage::Session(_) => {}
            other => break other,
        }
    };
    assert!(harvests > 0, "umemd never harvested: {end:?}");
    su.proc.assert_alive();
    assert!(su.is_serving(), "source umemd stopped serving");

    // Every page and the state crossed: the destination failed on the state, nothing earlier.
    match &end {
        LocalMessage::Failed { message, .. } => assert!(
            message.contains("machine state"),
            "the migration failed before the machine state was loaded: {message}"
        ),
        other => panic!("expected the destination to refuse the fake machine state, got {other:?}"),
    }
    let reply =
        assert_destination_failed_without_running(&mut dst, secs(30), AfterFailure::ListensAgain);
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|e| e.contains("machine state")),
        "destination: {reply}"
    );
    // Page 0 crossed before the state failed (the failed attempt's pages are dropped since,
    // for the next attempt).
    assert!(
        reply["stats"]["pages_sent"].as_u64().unwrap_or(0) >= 1,
        "page 0 did not arrive at the destination: {reply}"
    );
    dst.proc.assert_alive();
}

/// One migration at a time per VM: while a session holds a VM's RAM, umemd refuses a second
/// `Outgoing` or `Incoming` with the same memfd (a second source session would send the VM to
/// a second destination), and takes it again once the first session ended.
#[test]
fn umemd_refuses_a_second_session_over_the_same_ram() {
    let t = TestEnv::new("umemd-second-session");
    let mut u = t.umemd("umemd");
    const SIZE: u64 = 16 << 20;
    let ram = sealed_memfd(SIZE);
    let outgoing_to = |uri: &str| {
        let mut buf = Vec::new();
        LocalMessage::Outgoing {
            vm: "fake".into(),
            uri: uri.into(),
            params: MigrationParams::default(),
            blocks: ram_low(SIZE),
            auth: Default::default(),
        }
        .encode(&mut buf);
        buf
    };
    // A "destination" that accepts and never answers keeps the first session in its handshake.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_uri = format!("tcp:{}", silent.local_addr().unwrap());
    let first = UnixStream::connect(u.socket()).unwrap();
    send_opening(&first, &outgoing_to(&silent_uri), &[ram.as_raw_fd()]);
    let (_held, _) = silent.accept().expect("the first session connects");

    expect_refusal(
        "a second outgoing session of the same RAM",
        exchange(&u, &outgoing_to(&silent_uri), &[ram.as_raw_fd()]),
        &["already in a migration"],
    );
    expect_refusal(
        "an incoming session over the same RAM",
        exchange(&u, &incoming(ram_low(SIZE), false), &[ram.as_raw_fd()]),
        &["already in a migration"],
    );
    // Another VM's RAM is not held by the first session.
    let other = sealed_memfd(SIZE);
    let reply = exchange(&u, &incoming(ram_low(SIZE), false), &[other.as_raw_fd()]);
    assert!(
        matches!(reply, Some(LocalMessage::Listening { .. })),
        "another VM's incoming session: {reply:?}"
    );

    // The first VMM goes away: its session ends and gives the RAM back.
    drop(first);
    let closed = format!("tcp:127.0.0.1:{}", umem_testkit::closed_port());
    let again = try_wait_until(secs(20), || {
        match exchange(&u, &outgoing_to(&closed), &[ram.as_raw_fd()]) {
            Some(LocalMessage::Failed { message, .. }) if message.contains("already") => None,
            other => Some(other),
        }
    });
    match again {
        Some(Some(LocalMessage::Failed { message, .. })) => assert!(
            !message.contains("already"),
            "the RAM is still held: {message}"
        ),
        other => panic!("expected the session to fail on the closed port, got {other:?}"),
    }
    u.proc.assert_alive();
    assert!(u.is_serving(), "umemd stopped accepting connections");
}

/// Connects, sends `opening` with `fds` and returns the connection once umemd says
/// `Listening`: a session that holds its place in umemd until the connection is dropped. Any
/// other reply is the error, as text.
fn try_listening_session(u: &Umemd, opening: &[u8], fds: &[RawFd]) -> Result<UnixStream, String> {
    let conn = UnixStream::connect(u.socket()).expect("connect to umemd");
    conn.set_read_timeout(Some(secs(20))).unwrap();
    if let Ok(n) = conn.send_with_fd(opening, fds) {
        let _ = (&conn).write_all(&opening[n..]);
    }
    let mut body = Vec::new();
    let p = proto::frame::read(&mut &conn, &mut body).map_err(|e| e.to_string())?;
    match LocalMessage::decode(p.kind, &body) {
        Ok(LocalMessage::Listening { .. }) => Ok(conn),
        other => Err(format!("{other:?}")),
    }
}

/// As [`try_listening_session`], panicking on any other reply.
fn listening_session(u: &Umemd, opening: &[u8], fds: &[RawFd]) -> UnixStream {
    try_listening_session(u, opening, fds)
        .unwrap_or_else(|other| panic!("expected Listening, got {other:?}"))
}

/// Reads until umemd closes `conn`; returns how long that took from `since` and what came.
fn wait_closed(conn: &UnixStream, since: Instant) -> (Duration, Vec<u8>) {
    conn.set_read_timeout(Some(secs(20))).unwrap();
    let mut got = Vec::new();
    let _ = (&*conn).read_to_end(&mut got);
    (since.elapsed(), got)
}

/// A client that connects and sends nothing, or trickles its opening a byte at a time, is
/// dropped at `--opening-timeout-ms` (as a whole, not per read), with a log line, while umemd
/// serves others meanwhile.
#[test]
fn umemd_drops_silent_and_trickling_clients_at_the_deadline() {
    let t = TestEnv::new("umemd-opening-deadline");
    const DEADLINE: Duration = Duration::from_millis(1000);
    let mut u = t
        .umemd_builder("umemd")
        .arg("--opening-timeout-ms")
        .arg(DEADLINE.as_millis().to_string())
        .start();
    let late = DEADLINE + secs(1);

    let silent = UnixStream::connect(u.socket()).unwrap();
    let t0 = Instant::now();
    // Served at once while the silent client waits.
    let ram = sealed_memfd(16 << 20);
    let other = listening_session(&u, &incoming(ram_low(16 << 20), false), &[ram.as_raw_fd()]);
    let (waited, got) = wait_closed(&silent, t0);
    assert!(
        waited >= DEADLINE - Duration::from_millis(50) && waited <= late,
        "the silent client was dropped after {waited:?}, not at {DEADLINE:?}"
    );
    let reply = proto::frame::split(&got)
        .ok()
        .flatten()
        .map(|(p, body, _)| LocalMessage::decode(p.kind, body));
    match reply {
        Some(Ok(LocalMessage::Failed { message, .. })) => {
            assert!(message.contains("1000 ms"), "{message}")
        }
        other => panic!("the silent client got {other:?}"),
    }

    // One byte of a real opening every 200 ms: every read is quick, the whole is late.
    let trickler = UnixStream::connect(u.socket()).unwrap();
    let t0 = Instant::now();
    let writer = trickler.try_clone().unwrap();
    let bytes = incoming(ram_low(16 << 20), false);
    let trickle = std::thread::spawn(move || {
        for b in bytes {
            if (&writer).write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let (waited, _) = wait_closed(&trickler, t0);
    assert!(
        waited >= DEADLINE - Duration::from_millis(50) && waited <= late,
        "the trickling client was dropped after {waited:?}, not at {DEADLINE:?}"
    );
    let _ = trickler.shutdown(Shutdown::Both);
    trickle.join().unwrap();

    let log = u.proc.log();
    assert_eq!(
        log.matches("dropping local client uid").count(),
        2,
        "one log line per dropped client:\n{log}"
    );
    drop(other);
    u.proc.assert_alive();
    assert!(u.is_serving(), "umemd stopped accepting connections");
}

/// Sessions are capped per client uid and per daemon: over a cap the client gets `Failed`
/// naming it and nothing else happens; the place is free again once a session ends.
#[test]
fn umemd_caps_sessions_per_uid_and_per_daemon() {
    let t = TestEnv::new("umemd-session-caps");
    const SIZE: u64 = 16 << 20;
    for (name, flag, words) in [
        (
            "per-uid",
            "--max-sessions-per-uid",
            "already has 2 sessions",
        ),
        ("daemon", "--max-sessions", "already serves 2 sessions"),
    ] {
        let mut u = t.umemd_builder(name).arg(flag).arg("2").start();
        let rams: Vec<File> = (0..3).map(|_| sealed_memfd(SIZE)).collect();
        // A connection holds its place from the moment umemd accepts it: the kit's own
        // probes that umemd listens may still hold theirs for a moment.
        let mut held: Vec<UnixStream> = rams[..2]
            .iter()
            .map(|ram| {
                try_wait_until(secs(10), || {
                    try_listening_session(&u, &incoming(ram_low(SIZE), false), &[ram.as_raw_fd()])
                        .ok()
                })
                .unwrap_or_else(|| panic!("{name}: no session under the cap"))
            })
            .collect();
        let third = || exchange(&u, &incoming(ram_low(SIZE), false), &[rams[2].as_raw_fd()]);
        match third() {
            Some(LocalMessage::Failed { message, .. }) => assert!(
                message.contains(words) && message.contains(flag),
                "{name}: {message}"
            ),
            other => panic!("{name}: the third session got {other:?}"),
        }
        // Refused before its opening was read: no session started for it.
        let log = u.proc.log();
        assert_eq!(
            log.matches("incoming migration on").count(),
            2,
            "{name}: a session over the cap started:\n{log}"
        );
        assert!(
            log.contains(flag),
            "{name}: the refusal is not logged:\n{log}"
        );

        drop(held.pop());
        let again = try_wait_until(secs(20), || match third() {
            Some(LocalMessage::Listening { .. }) => Some(()),
            _ => None,
        });
        assert!(
            again.is_some(),
            "{name}: the ended session's place was not given back"
        );
        u.proc.assert_alive();
        assert!(
            u.is_serving(),
            "{name}: umemd stopped accepting connections"
        );
    }
}

/// Blocks that overlap in the memfd or in guest address space, lie beyond the memfd or are not
/// page-aligned are refused in both roles, with an error naming the block.
#[test]
fn umemd_refuses_overlapping_or_misplaced_blocks_by_name() {
    let t = TestEnv::new("umemd-bad-layout");
    let mut u = t.umemd("umemd");
    const SIZE: u64 = 16 << 20;
    const HALF: u64 = SIZE / 2;
    let ram = sealed_memfd(SIZE);
    let block = |name: &str, memfd_offset: u64, guest_addr: u64, size: u64| LocalBlock {
        desc: BlockDesc {
            name: name.into(),
            guest_addr,
            size,
        },
        memfd_offset,
        host_addr: 0x7f00_0000_0000 + memfd_offset,
    };
    let low = block("ram-low", 0, 0, HALF);
    let cases = [
        (
            "overlapping in the memfd",
            block("ram-high", HALF / 2, 4 << 30, HALF),
            "ram-high overlaps block ram-low in the memfd",
        ),
        (
            "overlapping in guest address space",
            block("ram-high", HALF, HALF / 2, HALF),
            "ram-high overlaps block ram-low in guest address space",
        ),
        (
            "beyond the memfd",
            block("ram-high", HALF, 4 << 30, SIZE),
            "ram block ram-high: offset",
        ),
        (
            "not page-aligned in the memfd",
            block("ram-high", HALF + 512, 4 << 30, 4096),
            "ram block ram-high: memfd offset",
        ),
    ];
    for (what, high, words) in cases {
        let blocks = vec![low.clone(), high];
        expect_refusal(
            &format!("incoming, {what}"),
            exchange(&u, &incoming(blocks.clone(), false), &[ram.as_raw_fd()]),
            &[&words.to_lowercase()],
        );
        expect_refusal(
            &format!("outgoing, {what}"),
            exchange(&u, &outgoing(blocks), &[ram.as_raw_fd()]),
            &[&words.to_lowercase()],
        );
    }
    // The same two blocks, apart: accepted.
    let reply = exchange(
        &u,
        &incoming(vec![low, block("ram-high", HALF, 4 << 30, HALF)], false),
        &[ram.as_raw_fd()],
    );
    assert!(
        matches!(reply, Some(LocalMessage::Listening { .. })),
        "a valid two-block layout: {reply:?}"
    );
    u.proc.assert_alive();
    assert!(u.is_serving(), "umemd stopped accepting connections");
}
