//! Other users on this machine: whether the kit may act as one (only as root), processes run
//! as one, and a raw local client of another user, to see what umem's sockets do with it.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::process::Proc;
use crate::timing::{poll_every, secs};

/// `nobody`: a user and group that own nothing (uid and gid 65534).
pub const NOBODY: u32 = 65534;

/// Whether this process runs as root (and so may start others as any user).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Returns true when this process is root. Otherwise prints `SKIP <test>: needs root (to run
/// processes as another user)` and returns false.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        true
    } else {
        println!("SKIP {test}: needs root (to run processes as another user)");
        false
    }
}

/// The ids on the `field` line ("Uid:" or "Gid:") of `/proc/<pid>/status`: real, effective,
/// saved, filesystem. Empty when the process is gone.
pub fn proc_ids(pid: u32, field: &str) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `cmd` as `uid`:`gid` (no supplementary groups), its output going to
/// `<dir>/<name>.log`, and waits up to `timeout` (scale it with [`secs`]) for it to exit; it is killed by its PID if it
/// has not. Returns whether it exited successfully and its output.
pub fn run_as(
    dir: &Path,
    name: &str,
    uid: u32,
    gid: u32,
    mut cmd: Command,
    timeout: Duration,
) -> (bool, String) {
    cmd.uid(uid).gid(gid);
    let mut p = Proc::spawn(name, cmd, &dir.join(format!("{name}.log")));
    let status = poll_every(timeout, Duration::from_millis(20), || p.exit_status());
    p.kill();
    (status.is_some_and(|s| s.success()), p.log())
}

/// Connects to `socket` as `uid`:`gid`, sends `bytes`, reads until the other end closes (10 s
/// at most) and returns what happened, one line each: `connect: <error>` when it could not
/// connect, `send: <error>`, `recv: <error>`, and `reply: <bytes as a Python literal>`.
pub fn raw_client_as(dir: &Path, uid: u32, gid: u32, socket: &Path, bytes: &[u8]) -> String {
    const SCRIPT: &str = "import socket,sys\n\
        s=socket.socket(socket.AF_UNIX)\n\
        s.settimeout(10)\n\
        try:\n  s.connect(sys.argv[1])\nexcept Exception as e:\n  print('connect:', e); sys.exit(0)\n\
        try:\n  s.sendall(bytes.fromhex(sys.argv[2]))\nexcept Exception as e:\n  print('send:', e)\n\
        data=b''\n\
        try:\n  while True:\n    b=s.recv(4096)\n    if not b: break\n    data+=b\nexcept Exception as e:\n  print('recv:', e)\n\
        print('reply:', data)\n";
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut cmd = Command::new("python3");
    cmd.args(["-c", SCRIPT]).arg(socket).arg(hex);
    let (_, out) = run_as(dir, &format!("client-{uid}"), uid, gid, cmd, secs(20));
    out
}
