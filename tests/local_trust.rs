//! Who may use umem's local sockets: umemd's and every VMM's control socket are made `0600`
//! (or `0660` for a group given), whatever the umask, and serve only root, their own user and
//! the users and primary groups on their allow list; anybody else is told who it is and how it
//! could be allowed, and the daemon or the VM carries on. Clients of another user are run as
//! `nobody` (uid and gid 65534), which needs root: without it these tests print a SKIP line.
//!
//! Run with `cargo test --release --test local_trust -- --test-threads=1` (see
//! `testkit/src/lib.rs`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use proto::local::LocalMessage;
use umem_testkit::pair::MEMTOUCH_CMDLINE;
use umem_testkit::users::{raw_client_as, require_root, run_as, NOBODY};
use umem_testkit::{binary, require_kvm, secs, try_wait_until, Proc, TestEnv, Umemd, Vmm};

/// A message that is well-formed but may not open a session: a client that gets the answer
/// "expected Outgoing or Incoming" was served, one that gets "not allowed" was not.
fn cancel() -> Vec<u8> {
    let mut b = Vec::new();
    LocalMessage::Cancel.encode(&mut b);
    b
}

/// `path`'s permission bits and group.
fn mode_and_group(path: &Path) -> (u32, u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.permissions().mode() & 0o777, m.gid())
}

/// Opens `path` to everybody, as a mistaken `chmod` would: only the credentials decide then.
fn open_to_all(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).unwrap();
}

/// Asserts that `nobody`, connecting to umemd `u`, is refused by its credentials, with a reply
/// and a log line that name it and say how to allow it.
fn assert_nobody_refused_by_umemd(t: &TestEnv, what: &str, u: &Umemd) {
    let got = raw_client_as(t.dir(), NOBODY, NOBODY, u.socket(), &cancel());
    for want in [
        "uid 65534",
        "not allowed to use umemd",
        "--allow-uid 65534",
        "--allow-gid 65534",
    ] {
        assert!(
            got.contains(want),
            "{what}: {want:?} not in the reply: {got}"
        );
    }
    let log = u.proc.log();
    assert!(
        log.contains("refusing a local client: uid 65534"),
        "{what}: the refusal is not logged:\n{log}"
    );
}

/// Asserts that `nobody`, connecting to umemd `u`, is served: its opening is read and judged.
fn assert_nobody_served_by_umemd(t: &TestEnv, what: &str, u: &Umemd) {
    let got = raw_client_as(t.dir(), NOBODY, NOBODY, u.socket(), &cancel());
    assert!(
        got.contains("expected Outgoing or Incoming") && !got.contains("not allowed"),
        "{what}: nobody was not served: {got}"
    );
}

#[test]
fn umemd_serves_only_clients_on_its_allow_list() {
    if !require_root("umemd_serves_only_clients_on_its_allow_list") {
        return;
    }
    let t = TestEnv::new("umemd-allow-list");

    // Nobody else by default, even through a socket opened by mistake.
    let mut u = t.umemd("default");
    open_to_all(u.socket());
    assert_nobody_refused_by_umemd(&t, "default", &u);
    u.proc.assert_alive();
    assert!(u.is_serving(), "umemd stopped serving after a refusal");

    // Listed by uid.
    let u = t
        .umemd_builder("by-uid")
        .arg("--allow-uid")
        .arg("65534")
        .start();
    open_to_all(u.socket());
    assert_nobody_served_by_umemd(&t, "--allow-uid 65534", &u);

    // Listed by primary group, through a socket shared with that group.
    let u = t
        .umemd_builder("by-gid")
        .arg("--socket-group")
        .arg("65534")
        .arg("--allow-gid")
        .arg("65534")
        .start();
    assert_eq!(mode_and_group(u.socket()), (0o660, NOBODY));
    assert_nobody_served_by_umemd(&t, "--allow-gid 65534", &u);

    // The socket's group lets it connect; the allow list still has the last word.
    let u = t
        .umemd_builder("group-only")
        .arg("--socket-group")
        .arg("65534")
        .start();
    assert_nobody_refused_by_umemd(&t, "--socket-group without --allow-gid", &u);
}

/// Runs `umem-ctl -s <socket> query-status` as `nobody`; returns whether it succeeded and its
/// output.
fn umem_ctl_as_nobody(t: &TestEnv, name: &str, socket: &Path) -> (bool, String) {
    let mut cmd = Command::new(binary("umem-ctl"));
    cmd.arg("--timeout")
        .arg("10")
        .arg("-s")
        .arg(socket)
        .arg("query-status");
    run_as(t.dir(), name, NOBODY, NOBODY, cmd, secs(30))
}

fn memtouch_vm(t: &TestEnv, name: &str, u: &Umemd, args: &[&str]) -> Vmm {
    let b = t
        .vmm(name, u)
        .mem("64M")
        .guest("memtouch")
        .cmdline(MEMTOUCH_CMDLINE);
    args.iter().fold(b, |b, a| b.arg(a)).start()
}

#[test]
fn vmm_control_socket_serves_only_clients_on_its_allow_list() {
    if !require_root("vmm_control_socket_serves_only_clients_on_its_allow_list")
        || !require_kvm("vmm_control_socket_serves_only_clients_on_its_allow_list")
    {
        return;
    }
    let t = TestEnv::new("control-allow-list");
    let u = t.umemd("umemd");

    // The group may connect, the allow list refuses it.
    let shared = memtouch_vm(&t, "shared", &u, &["--control-group", "65534"]);
    assert_eq!(mode_and_group(shared.control_path()), (0o660, NOBODY));
    let (ok, out) = umem_ctl_as_nobody(&t, "ctl-shared", shared.control_path());
    assert!(!ok, "nobody controlled the VM: {out}");
    for want in [
        "uid 65534",
        "not allowed to use this VM's control socket",
        "--allow-uid 65534",
    ] {
        assert!(out.contains(want), "{want:?} not in: {out}");
    }
    assert!(
        shared
            .proc
            .log()
            .contains("refusing a control client: uid 65534"),
        "the refusal is not logged:\n{}",
        shared.proc.log()
    );
    assert_eq!(shared.status(), "running");

    // Allowed by primary group, and by uid.
    for (name, flag) in [("by-gid", "--allow-gid"), ("by-uid", "--allow-uid")] {
        let vm = memtouch_vm(&t, name, &u, &["--control-group", "65534", flag, "65534"]);
        let (ok, out) = umem_ctl_as_nobody(&t, &format!("ctl-{name}"), vm.control_path());
        assert!(ok && out.contains("status: running"), "{flag}: {out}");
    }
}

/// The umemd socket and a VMM's control socket are their owner's alone whatever the umask, or
/// their owner's and the group's with a group given; a client of another user that gets in
/// anyway is refused by its credentials.
#[test]
fn local_sockets_are_private_to_their_owner_or_group() {
    if !require_root("local_sockets_are_private_to_their_owner_or_group")
        || !require_kvm("local_sockets_are_private_to_their_owner_or_group")
    {
        return;
    }
    let t = TestEnv::new("private-sockets");
    // SAFETY: umask only changes this process's file creation mask; the children started
    // below inherit it, which is the point.
    let old = unsafe { libc::umask(0) };
    let mut u = t.umemd("umemd");
    let vm = memtouch_vm(&t, "vm", &u, &[]);
    let gu = t
        .umemd_builder("umemd-group")
        .arg("--socket-group")
        .arg("65534")
        .start();
    let gvm = memtouch_vm(&t, "vm-group", &u, &["--control-group", "65534"]);
    // SAFETY: as above.
    unsafe { libc::umask(old) };

    for (what, path) in [("umemd", u.socket()), ("control", vm.control_path())] {
        assert_eq!(mode_and_group(path), (0o600, 0), "{what} socket");
        let got = raw_client_as(t.dir(), NOBODY, NOBODY, path, b"{\"execute\": \"quit\"}\n");
        assert!(got.contains("connect:"), "{what}: nobody connected: {got}");
        // Opened up by mistake: the credentials still keep the stranger out.
        open_to_all(path);
        let got = raw_client_as(t.dir(), NOBODY, NOBODY, path, b"{\"execute\": \"quit\"}\n");
        assert!(got.contains("not allowed"), "{what}: {got}");
    }
    for (what, path) in [("umemd", gu.socket()), ("control", gvm.control_path())] {
        assert_eq!(mode_and_group(path), (0o660, NOBODY), "{what} socket");
    }
    // Neither the VM nor umemd went away because a stranger asked.
    assert_eq!(vm.status(), "running");
    assert!(u.is_serving());
}

/// Runs `program args` (which must exit at once) and returns its exit status's success and
/// its output.
fn run_briefly(t: &TestEnv, name: &str, program: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(binary(program));
    cmd.args(args);
    let mut p = Proc::spawn(name, cmd, &t.dir().join(format!("{name}.log")));
    let status = try_wait_until(secs(30), || p.exit_status());
    p.kill();
    (status.is_some_and(|s| s.success()), p.log())
}

#[test]
fn an_unknown_group_is_a_clear_error() {
    let t = TestEnv::new("unknown-group");
    let socket = t.dir().join("u.sock");
    let (ok, out) = run_briefly(
        &t,
        "umemd",
        "umemd",
        &[
            "--socket",
            &socket.to_string_lossy(),
            "--socket-group",
            "no-such-group-umem",
        ],
    );
    assert!(!ok, "umemd started with an unknown group: {out}");
    assert!(
        out.contains("--socket-group: group \"no-such-group-umem\" does not exist"),
        "{out}"
    );
    assert!(!socket.exists(), "umemd made its socket before failing");
    for flag in ["--control-group", "--allow-gid"] {
        let (ok, out) = run_briefly(
            &t,
            "vmm",
            "vmm",
            &[
                "--control",
                &t.dir().join("vm.ctl").to_string_lossy(),
                "--guest",
                "memtouch",
                flag,
                "no-such-group-umem",
            ],
        );
        assert!(!ok, "vmm started with an unknown group: {out}");
        assert!(
            out.contains(&format!(
                "{flag}: group \"no-such-group-umem\" does not exist"
            )),
            "{out}"
        );
    }
    let (ok, out) = run_briefly(
        &t,
        "umemd-gid",
        "umemd",
        &[
            "--socket",
            &socket.to_string_lossy(),
            "--allow-gid",
            "no-such-group-umem",
        ],
    );
    assert!(!ok && out.contains("--allow-gid: group"), "{out}");
}
