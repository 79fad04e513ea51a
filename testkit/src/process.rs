//! A child process of the kit: its output goes to a log file, and it is killed (`SIGKILL`, by
//! its PID) and reaped when its handle is dropped, or when the test process dies.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

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

    /// CPU time (user and system) the process used so far, leaving out its threads whose name
    /// starts with `except` (a VMM's vCPU threads, say: the guest's time, not the VMM's);
    /// zero once it is gone.
    pub fn cpu_time(&self, except: Option<&str>) -> Duration {
        let pid = self.pid();
        let total = read_cpu_time(&format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some(prefix) = except else {
            return total;
        };
        let left_out: Duration = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
            })
            .filter_map(|t| read_cpu_time(&t.path().join("stat").to_string_lossy()))
            .sum();
        total.saturating_sub(left_out)
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

/// User plus system time from a `/proc/.../stat` file (fields 14 and 15, in clock ticks).
fn read_cpu_time(path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The name (field 2) may hold spaces and parentheses: count from its closing one.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a configuration value; it takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_counts_a_busy_process_and_leaves_out_named_threads() {
        let log = std::env::temp_dir().join(format!("umem-cpu-time-{}.log", std::process::id()));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "while :; do :; done"]);
        let p = Proc::spawn("busy", cmd, &log);
        std::thread::sleep(Duration::from_millis(600));
        let busy = p.cpu_time(None);
        assert!(busy >= Duration::from_millis(200), "{busy:?}");
        // Its only thread is named "sh": leaving it out leaves nothing.
        assert!(p.cpu_time(Some("sh")) < Duration::from_millis(50));
        // Leaving out threads of no such name leaves the whole, which only grows.
        assert!(p.cpu_time(Some("nothing-named-so")) >= busy);
        drop(p);
        let _ = std::fs::remove_file(log);
    }
}
