//! umemd against clients that misbehave on its local socket: it must refuse them with a reason,
//! leak nothing and go on serving real migrations.
//!
//! Run with `cargo test --release --workspace -- --test-threads=1` (see `testkit/src/lib.rs`).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use proto::local::{kind, LocalBlock, LocalMessage};
use proto::{BlockDesc, MigrationParams};
use sendfd::SendWithFd;
use serde_json::json;
use umem_testkit::pair::{
    assert_completed, assert_guest_runs_on, assert_same_ram, MigrationSetup, MEMTOUCH_CMDLINE,
};
use umem_testkit::{require_kvm, secs, try_wait_until, wait_until, TestEnv, Umemd};

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
    }
    .encode(&mut buf);
    buf
}

fn memfd(size: u64) -> std::fs::File {
    let f = memfd::MemfdOptions::default()
        .create("fake-guest-ram")
        .expect("memfd")
        .into_file();
    f.set_len(size).expect("set_len");
    f
}

/// Connects, sends `bytes` with `fds`, closes the write side, and returns umemd's first reply:
/// `Some(message)` for a decoded frame, `None` when it closed without one.
fn exchange(u: &Umemd, bytes: &[u8], fds: &[RawFd]) -> Option<LocalMessage> {
    let s = UnixStream::connect(u.socket()).expect("connect to umemd");
    s.set_read_timeout(Some(secs(20))).unwrap();
    if !bytes.is_empty() || !fds.is_empty() {
        let n = s.send_with_fd(bytes, fds).expect("sendmsg");
        (&s).write_all(&bytes[n..]).expect("write");
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
    let ram = memfd(64 << 20);
    let devnull = std::fs::File::open("/dev/null").unwrap();
    expect_refusal(
        "incoming without fd",
        exchange(&u, &incoming(ram_low(64 << 20), false), &[]),
        &["fd"],
    );
    expect_refusal(
        "incoming with 2 fds but no uffd",
        exchange(
            &u,
            &incoming(ram_low(64 << 20), false),
            &[ram.as_raw_fd(), devnull.as_raw_fd()],
        ),
        &["fd"],
    );
    expect_refusal(
        "outgoing without fd",
        exchange(&u, &outgoing(ram_low(64 << 20)), &[]),
        &["fd"],
    );
    let many: Vec<RawFd> = std::iter::repeat_n(devnull.as_raw_fd(), 8).collect();
    expect_refusal(
        "outgoing with 8 fds",
        exchange(&u, &outgoing(ram_low(64 << 20)), &many),
        &["fd"],
    );
    // Right count, wrong things: not a memfd, and a memfd smaller than the layout.
    expect_refusal(
        "incoming with /dev/null as RAM",
        exchange(
            &u,
            &incoming(ram_low(64 << 20), false),
            &[devnull.as_raw_fd()],
        ),
        &["memfd", "fd"],
    );
    let small = memfd(1 << 20);
    expect_refusal(
        "incoming with a memfd smaller than its layout",
        exchange(
            &u,
            &incoming(ram_low(64 << 20), false),
            &[small.as_raw_fd()],
        ),
        &["outside", "memfd"],
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

/// A destination VMM that shrinks its guest-RAM memfd after handing it to umemd must cost that
/// VMM its migration, not the whole daemon (and every other migration it serves).
#[test]
fn umemd_survives_destination_memfd_shrunk_after_handover() {
    if !require_kvm("umemd_survives_destination_memfd_shrunk_after_handover") {
        return;
    }
    let t = TestEnv::new("umemd-shrunk-memfd");
    let su = t.umemd("umemd-src");
    let mut du = t.umemd("umemd-dst");

    // A fake destination VMM: the right layout for a 256M guest, then the memfd shrinks.
    let ram = memfd(256 << 20);
    let conn = UnixStream::connect(du.socket()).unwrap();
    let msg = incoming(ram_low(256 << 20), false);
    let n = conn.send_with_fd(&msg, &[ram.as_raw_fd()]).unwrap();
    (&conn).write_all(&msg[n..]).unwrap();
    conn.set_read_timeout(Some(secs(20))).unwrap();
    let mut body = Vec::new();
    let p = proto::frame::read(&mut (&conn), &mut body).expect("Listening from umemd");
    let uri = match LocalMessage::decode(p.kind, &body) {
        Ok(LocalMessage::Listening { uri }) => uri,
        // umemd refuses RAM that is not sealed against shrinking, before mapping it.
        Ok(LocalMessage::Failed { message, .. }) if message.contains("F_SEAL_SHRINK") => {
            assert!(du.is_serving(), "destination umemd stopped serving");

            return;
        }
        other => panic!("expected Listening or a refusal of unsealed RAM, got {other:?}"),
    };
    ram.set_len(0).expect("shrinking the memfd");

    let mut src = MigrationSetup::memtouch(&t, "256M", MEMTOUCH_CMDLINE).source(&su);
    src.wait_pass(secs(60), 2);
    src.migrate(&uri, json!({})).expect("migrate");
    let o = src.wait_migration(secs(120));
    eprintln!("migration into the shrunk memfd: {} {:?}", o.phase, o.error);
    assert_ne!(o.phase, "completed", "pages went into a memfd of size 0");
    wait_until(secs(10), "source to resume", || {
        (src.status() == "running").then_some(())
    });
    if let Some(st) = du.proc.exit_status() {
        panic!(
            "the destination umemd died ({st:?}) because one VMM shrank its memfd; log:\n{}",
            du.proc.log()
        );
    }
    assert!(du.is_serving(), "destination umemd stopped serving");
    drop(conn);
}

/// The same on the source side: umemd reads guest pages from its own mapping of the memfd, and
/// a VMM that shrinks the memfd after handing it over must not be able to kill umemd (and every
/// other migration it serves) with SIGBUS.
/// umemd now refuses RAM that is not sealed with `F_SEAL_SHRINK` (before, the source umemd died
/// with SIGBUS reading the truncated mapping).
#[test]
fn umemd_survives_source_memfd_shrunk_after_handover() {
    if !require_kvm("umemd_survives_source_memfd_shrunk_after_handover") {
        return;
    }
    let t = TestEnv::new("umemd-shrunk-src-memfd");
    let mut su = t.umemd("umemd-src");
    let du = t.umemd("umemd-dst");
    let mut dst = MigrationSetup::memtouch(&t, "256M", MEMTOUCH_CMDLINE)
        .paused_destination()
        .destination("dst", &du);
    let uri = dst.listen_uri();

    // A fake source VMM with a populated first page.
    let ram = memfd(256 << 20);
    std::os::unix::fs::FileExt::write_all_at(&ram, &[0x5a; 4096], 0).unwrap();
    let mut conn = UnixStream::connect(su.socket()).unwrap();
    let mut msg = Vec::new();
    LocalMessage::Outgoing {
        vm: "fake".into(),
        uri,
        params: MigrationParams::default(),
        blocks: ram_low(256 << 20),
    }
    .encode(&mut msg);
    let n = conn.send_with_fd(&msg, &[ram.as_raw_fd()]).unwrap();
    conn.write_all(&msg[n..]).unwrap();

    // Shrink the memfd once umemd has mapped it (the first harvest comes after that), then
    // answer every harvest with page 0 dirty, as a VMM whose guest keeps writing it would.
    conn.set_read_timeout(Some(secs(30))).unwrap();
    let mut body = Vec::new();
    let mut end = None;
    for _ in 0..1000 {
        let p = match proto::frame::read(&mut conn, &mut body) {
            Ok(p) => p,
            Err(e) => {
                end = Some(format!("connection ended: {e}"));
                break;
            }
        };
        match LocalMessage::decode(p.kind, &body) {
            Ok(LocalMessage::Harvest { stop }) => {
                ram.set_len(0).expect("shrinking the memfd");
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
                if conn.write_all(&out).is_err() {
                    end = Some("umemd closed the connection".into());
                    break;
                }
            }
            Ok(LocalMessage::Progress(_)) => {}
            Ok(other) => {
                end = Some(format!("{other:?}"));
                break;
            }
            Err(e) => panic!("umemd sent a malformed message: {e}"),
        }
    }
    eprintln!("fake source session ended with: {end:?}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    if let Some(st) = su.proc.exit_status() {
        panic!(
            "the source umemd died ({st:?}) because one VMM shrank its memfd; log:\n{}",
            su.proc.log()
        );
    }
    assert!(su.is_serving(), "source umemd stopped serving");
    let _ = dst.proc.is_alive();
}
