//! A child process of the kit: its output goes to a log file, and it is killed (`SIGKILL`, by
//! its PID) and reaped when its handle is dropped, or when the test process dies.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

/// A child process that is killed with `SIGKILL` and reaped when dropped.
pub struct Proc {
    name: String,
    child: Child,
    exited: Option<ExitStatus>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr going to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
        let out = std::fs::File::create(log).expect("creating a log file");
        let err = out.try_clone().expect("cloning a log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            );
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        Proc {
            name: name.into(),
            child,
            exited: None,
            log: log.into(),
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process still runs (reaps it if it exited).
    pub fn is_alive(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(st)) => {
                self.exited = Some(st);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// How it exited, if it did.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.is_alive();
        self.exited
    }

    /// Sends `SIGKILL` and reaps the process.
    pub fn kill(&mut self) {
        if self.exited.is_some() {
            return;
        }
        let _ = self.child.kill();
        if let Ok(st) = self.child.wait() {
            self.exited = Some(st);
        }
    }

    /// Panics with the log tail when the process has exited.
    pub fn assert_alive(&mut self) {
        if !self.is_alive() {
            panic!(
                "{} (pid {}) exited: {:?}\n{}",
                self.name,
                self.pid(),
                self.exited,
                tail(&self.log(), 30)
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of `s` (of a log, or of serial output).
pub(crate) fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
