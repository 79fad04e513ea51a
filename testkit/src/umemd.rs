//! A umemd of the kit: started on a socket in the test directory, ready once it accepts
//! connections, and watched from `/proc` for leaked descriptors and threads.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::binaries::binary;
use crate::process::Proc;
use crate::timing::{secs, wait_until};

/// Options for a umemd; see [`TestEnv::umemd_builder`](crate::TestEnv::umemd_builder).
pub struct UmemdBuilder {
    dir: PathBuf,
    name: String,
    args: Vec<OsString>,
    user: Option<(u32, u32)>,
    metrics: bool,
}

impl UmemdBuilder {
    /// A umemd named `name` with its socket, log and files in `dir`.
    pub fn new(dir: &Path, name: &str) -> UmemdBuilder {
        UmemdBuilder {
            dir: dir.into(),
            name: name.into(),
            args: Vec::new(),
            user: None,
            metrics: false,
        }
    }

    /// One more command-line argument (after `--socket`).
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Runs umemd as `uid`:`gid` with no supplementary groups (the test process must be root).
    /// Its socket is then in a directory of its own that this user owns, `<dir>/<name>.run/`.
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    /// Serves metrics (`--metrics 127.0.0.1:0`, a free port); [`Umemd::metrics_addr`] says
    /// where.
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Starts `umemd --socket <socket> ARGS...` and waits until it accepts connections.
    pub fn start(self) -> Umemd {
        let sock_dir = match self.user {
            None => self.dir.clone(),
            Some((uid, gid)) => {
                let d = self.dir.join(format!("{}.run", self.name));
                std::fs::create_dir_all(&d).expect("creating umemd's socket directory");
                std::os::unix::fs::chown(&d, Some(uid), Some(gid))
                    .unwrap_or_else(|e| panic!("chown {} to {uid}:{gid}: {e}", d.display()));
                d
            }
        };
        let socket = sock_dir.join(format!("{}.sock", self.name));
        let mut cmd = Command::new(binary("umemd"));
        cmd.arg("--socket").arg(&socket).args(&self.args);
        if self.metrics {
            cmd.arg("--metrics").arg("127.0.0.1:0");
        }
        if let Some((uid, gid)) = self.user {
            // std drops the supplementary groups too when it changes the uid as root.
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, gid);
        }
        let name = self.name;
        let mut proc = Proc::spawn(&name, cmd, &self.dir.join(format!("{name}.log")));
        wait_until(secs(30), &format!("umemd {name} to listen"), || {
            proc.assert_alive();
            UnixStream::connect(&socket).ok().map(|_| ())
        });
        // Bound before the control socket: the port is in the log by now.
        let metrics_addr = self.metrics.then(|| {
            metrics_addr_in(&proc.log())
                .unwrap_or_else(|| panic!("umemd {name} logged no metrics address"))
        });
        Umemd {
            proc,
            socket,
            metrics_addr,
        }
    }
}

/// A umemd process.
pub struct Umemd {
    /// The process.
    pub proc: Proc,
    socket: PathBuf,
    metrics_addr: Option<SocketAddr>,
}

impl Umemd {
    /// Starts `umemd --socket <dir>/<name>.sock` and waits until it accepts connections.
    pub fn start(dir: &Path, name: &str) -> Umemd {
        UmemdBuilder::new(dir, name).start()
    }

    /// Where it serves metrics; panics when it was not started with [`UmemdBuilder::metrics`].
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
            .expect("umemd started without UmemdBuilder::metrics")
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether it still runs and accepts connections.
    pub fn is_serving(&mut self) -> bool {
        self.proc.is_alive() && UnixStream::connect(&self.socket).is_ok()
    }

    /// Open file descriptors of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.proc.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Whether the process has `path` open (one of its descriptors links to it).
    pub fn has_open(&self, path: &Path) -> bool {
        std::fs::read_dir(format!("/proc/{}/fd", self.proc.pid()))
            .map(|d| {
                d.flatten()
                    .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
            })
            .unwrap_or(false)
    }

    /// Resident memory of the process in KiB (`VmRSS` of `/proc/PID/status`); 0 once it is gone.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The most resident memory the process ever had, in KiB (`VmHWM`); 0 once it is gone.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid()))
            .ok()
            .and_then(|s| status_kib(&s, field))
            .unwrap_or(0)
    }

    /// Threads of the process.
    pub fn thread_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.proc.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The process's real, effective, saved and filesystem uids (`/proc/PID/status`).
    pub fn uids(&self) -> Vec<u32> {
        crate::users::proc_ids(self.proc.pid(), "Uid:")
    }
}

/// The address of umemd's `serving metrics on http://ADDR/metrics` log line.
fn metrics_addr_in(log: &str) -> Option<SocketAddr> {
    log.lines().find_map(|l| {
        let rest = l.split("serving metrics on http://").nth(1)?;
        rest.strip_suffix("/metrics")?.parse().ok()
    })
}

/// The value of `field` (`VmRSS:`), in KiB, in a `/proc/PID/status` text.
fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_figures_are_read_from_the_status_text() {
        let status = "Name:\tumemd\nVmHWM:\t  9000 kB\nVmRSS:\t    5432 kB\nThreads:\t3\n";
        assert_eq!(super::status_kib(status, "VmRSS:"), Some(5432));
        assert_eq!(super::status_kib(status, "VmHWM:"), Some(9000));
        assert_eq!(super::status_kib("Name:\tzombie\n", "VmRSS:"), None);
    }

    #[test]
    fn the_metrics_address_is_read_from_the_log() {
        let log = "[t INFO umemd] serving metrics on http://127.0.0.1:40123/metrics\n[t INFO umemd] umemd listening on /x\n";
        assert_eq!(
            super::metrics_addr_in(log),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        assert_eq!(
            super::metrics_addr_in("[t INFO umemd] umemd listening\n"),
            None
        );
    }
}
