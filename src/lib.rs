//! Support for the end-to-end tests under `tests/`: real `vmm` and `umemd` processes, real KVM,
//! real TCP on loopback.
//!
//! # Running
//!
//! ```text
//! cargo test --release --workspace -- --test-threads=1
//! ```
//!
//! The tests start the `vmm` and `umemd` binaries of the same build profile as the test
//! executable (`target/<profile>/`, found from `std::env::current_exe()`). A dependency on a
//! library crate does not make cargo build that package's binaries, so the first test of a
//! test process runs `cargo build [--release] -p vmm -p umemd` once (cargo makes this a no-op
//! when they are fresh). This keeps the tests correct after any edit of `vmm/`, `umemd/` or
//! `proto/` without an extra manual step. Set `UMEM_E2E_NO_BUILD=1` to skip that step (the
//! binaries must then exist), or `UMEM_E2E_BIN_DIR=/path` to use binaries from elsewhere.
//!
//! Tests run one at a time: [`TestEnv::new`] takes a process-wide lock, so
//! `--test-threads=1` is not required (but keeps the output readable). Every wait has a
//! deadline; `UMEM_E2E_TIMEOUT_SCALE=N` multiplies all of them on a slow machine.
//!
//! Every child process is killed (`SIGKILL`) and reaped when its handle is dropped, also when a
//! test panics. Children additionally get `PR_SET_PDEATHSIG(SIGKILL)`, so they die with the test
//! process even if it is itself killed. A failing test keeps its temporary directory (logs,
//! serial output) and prints where it is; `UMEM_E2E_KEEP=1` keeps it always.
//!
//! `/dev/kvm` is required; without it [`require_kvm`] makes each test print
//! `SKIP <test>: /dev/kvm not available` and return early, unless `UMEM_REQUIRE_KVM=1` is set
//! (as in CI), in which case it fails.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod pair;
pub mod proxy;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long one control request may take (a RAM digest of several GiB takes seconds).
const CTL_TIMEOUT: Duration = Duration::from_secs(120);

/// Multiplier for every timeout, from `UMEM_E2E_TIMEOUT_SCALE` (default 1).
pub fn timeout_scale() -> f64 {
    std::env::var("UMEM_E2E_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|&f| f > 0.0)
        .unwrap_or(1.0)
}

/// `secs` seconds, scaled by [`timeout_scale`].
pub fn secs(secs: u64) -> Duration {
    Duration::from_secs_f64(secs as f64 * timeout_scale())
}

/// Polls `f` every 50 ms until it returns `Some`, or returns `None` once `timeout` has passed.
pub fn try_wait_until<T>(timeout: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    poll_every(timeout, Duration::from_millis(50), f)
}

/// Polls `f` every `interval` until it returns `Some`, or returns `None` once `timeout` has
/// passed.
pub fn poll_every<T>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(interval);
    }
}

/// Polls `f` until it returns `Some`; panics naming `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    match try_wait_until(timeout, f) {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Returns true when `/dev/kvm` can be opened. Otherwise prints `SKIP <test>: /dev/kvm not
/// available` and returns false, or panics when `UMEM_REQUIRE_KVM=1`.
pub fn require_kvm(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("UMEM_REQUIRE_KVM").is_ok_and(|v| v == "1") {
                panic!("{test}: /dev/kvm not available ({e}) and UMEM_REQUIRE_KVM=1");
            }
            println!("SKIP {test}: /dev/kvm not available");
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Binaries

/// The directory holding `vmm` and `umemd`, building them first (once per process).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("UMEM_E2E_BIN_DIR") {
            return PathBuf::from(d);
        }
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test>-<hash>, or target/<profile>/<bin> for a binary.
        let parent = exe.parent().expect("executable has a directory");
        let dir = if parent.file_name().is_some_and(|n| n == "deps") {
            parent.parent().expect("target/<profile>/deps has a parent")
        } else {
            parent
        }
        .to_path_buf();
        if !std::env::var("UMEM_E2E_NO_BUILD").is_ok_and(|v| v == "1") {
            build_binaries(&dir);
        }
        for b in ["vmm", "umemd"] {
            assert!(
                dir.join(b).is_file(),
                "{} is missing; build it with `cargo build -p vmm -p umemd` for this profile",
                dir.join(b).display()
            );
        }
        dir
    })
}

/// Runs `cargo build -p vmm -p umemd` for the profile `dir` belongs to.
fn build_binaries(dir: &Path) {
    let profile = dir
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("debug")
        .to_string();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "-p", "vmm", "-p", "umemd"]);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    // target/<profile> -> target; keeps a custom target directory.
    if let Some(target) = dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let t0 = Instant::now();
    let status = cmd.status().expect("running cargo build for vmm and umemd");
    assert!(
        status.success(),
        "cargo build -p vmm -p umemd ({profile}) failed: {status}"
    );
    eprintln!(
        "e2e: vmm and umemd ({profile}) up to date after {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

/// Full path of binary `name` in [`bin_dir`].
pub fn binary(name: &str) -> PathBuf {
    bin_dir().join(name)
}

// ---------------------------------------------------------------------------------------------
// Test environment

static SERIAL: Mutex<()> = Mutex::new(());

/// One test's context: holds the process-wide lock (tests run one at a time) and owns a fresh
/// temporary directory for sockets, logs and serial output.
pub struct TestEnv {
    name: String,
    dir: PathBuf,
    _lock: MutexGuard<'static, ()>,
}

impl TestEnv {
    /// Takes the lock, makes sure the binaries are built and creates the directory.
    pub fn new(name: &str) -> TestEnv {
        let lock = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        bin_dir();
        let dir = std::env::temp_dir().join(format!(
            "umem-e2e-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test directory");
        eprintln!("e2e {name}: directory {}", dir.display());
        TestEnv {
            name: name.into(),
            dir,
            _lock: lock,
        }
    }

    /// The temporary directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts a umemd named `name` (socket `<dir>/<name>.sock`).
    pub fn umemd(&self, name: &str) -> Umemd {
        Umemd::start(&self.dir, name)
    }

    /// A builder for a vmm named `name` that talks to `umemd`.
    pub fn vmm(&self, name: &str, umemd: &Umemd) -> VmmBuilder {
        VmmBuilder::new(&self.dir, name, umemd.socket())
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Processes are dropped before the environment (declared later), so logs are complete.
        if std::thread::panicking() {
            eprintln!(
                "e2e {}: FAILED; logs and serial output kept in {}",
                self.name,
                self.dir.display()
            );
            dump_logs(&self.dir);
        } else if std::env::var("UMEM_E2E_KEEP").is_ok_and(|v| v == "1") {
            eprintln!("e2e {}: kept {}", self.name, self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Prints the last lines of every `.log` file in `dir`.
fn dump_logs(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        if p.extension().is_some_and(|e| e == "log") {
            eprintln!("----- {} (last 30 lines)", p.display());
            eprintln!(
                "{}",
                tail(&std::fs::read_to_string(&p).unwrap_or_default(), 30)
            );
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Processes

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

/// A umemd process.
pub struct Umemd {
    /// The process.
    pub proc: Proc,
    socket: PathBuf,
}

impl Umemd {
    /// Starts `umemd --socket <dir>/<name>.sock` and waits until it accepts connections.
    pub fn start(dir: &Path, name: &str) -> Umemd {
        let socket = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new(binary("umemd"));
        cmd.arg("--socket").arg(&socket);
        let mut proc = Proc::spawn(name, cmd, &dir.join(format!("{name}.log")));
        wait_until(secs(30), &format!("umemd {name} to listen"), || {
            proc.assert_alive();
            UnixStream::connect(&socket).ok().map(|_| ())
        });
        Umemd { proc, socket }
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

    /// Threads of the process.
    pub fn thread_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.proc.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Options for a vmm; see [`TestEnv::vmm`].
pub struct VmmBuilder {
    dir: PathBuf,
    name: String,
    umemd: PathBuf,
    mem: String,
    vcpus: u32,
    guest: Option<String>,
    cmdline: String,
    prefill: Option<u64>,
    incoming: Option<String>,
    paused: bool,
}

impl VmmBuilder {
    /// Defaults: 256M, 1 vCPU, no guest, not paused.
    pub fn new(dir: &Path, name: &str, umemd: &Path) -> VmmBuilder {
        VmmBuilder {
            dir: dir.into(),
            name: name.into(),
            umemd: umemd.into(),
            mem: "256M".into(),
            vcpus: 1,
            guest: None,
            cmdline: String::new(),
            prefill: None,
            incoming: None,
            paused: false,
        }
    }
    /// `--mem` (e.g. "1G").
    pub fn mem(mut self, mem: &str) -> Self {
        self.mem = mem.into();
        self
    }
    /// `--vcpus`.
    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = n;
        self
    }
    /// `--guest` (built-in guest name).
    pub fn guest(mut self, g: &str) -> Self {
        self.guest = Some(g.into());
        self
    }
    /// `--cmdline`.
    pub fn cmdline(mut self, c: &str) -> Self {
        self.cmdline = c.into();
        self
    }
    /// `--prefill SEED`.
    pub fn prefill(mut self, seed: u64) -> Self {
        self.prefill = Some(seed);
        self
    }
    /// `--incoming URI`.
    pub fn incoming(mut self, uri: &str) -> Self {
        self.incoming = Some(uri.into());
        self
    }
    /// `--incoming tcp:127.0.0.1:0` (umemd picks the port; see [`Vmm::listen_uri`]).
    pub fn incoming_any(self) -> Self {
        self.incoming("tcp:127.0.0.1:0")
    }
    /// `-S`.
    pub fn paused(mut self, p: bool) -> Self {
        self.paused = p;
        self
    }

    /// Starts the vmm and waits until its control socket answers.
    pub fn start(self) -> Vmm {
        let control = self.dir.join(format!("{}.ctl", self.name));
        let serial = self.dir.join(format!("{}.serial", self.name));
        let mut cmd = Command::new(binary("vmm"));
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--mem")
            .arg(&self.mem)
            .arg("--vcpus")
            .arg(self.vcpus.to_string())
            .arg("--control")
            .arg(&control)
            .arg("--serial")
            .arg(&serial)
            .arg("--umemd")
            .arg(&self.umemd);
        if let Some(g) = &self.guest {
            cmd.arg("--guest").arg(g);
        }
        if !self.cmdline.is_empty() {
            cmd.arg("--cmdline").arg(&self.cmdline);
        }
        if let Some(s) = self.prefill {
            cmd.arg("--prefill").arg(s.to_string());
        }
        if let Some(u) = &self.incoming {
            cmd.arg("--incoming").arg(u);
        }
        if self.paused {
            cmd.arg("-S");
        }
        let log = self.dir.join(format!("{}.log", self.name));
        let proc = Proc::spawn(&self.name, cmd, &log);
        let mut vm = Vmm {
            name: self.name,
            proc,
            control,
            serial,
        };
        wait_until(secs(60), &format!("vmm {} control socket", vm.name), || {
            vm.proc.assert_alive();
            UnixStream::connect(&vm.control).ok().map(|_| ())
        });
        vm
    }
}

/// One memtouch `pass=N bad=B total_bad=T` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Pass number.
    pub pass: u64,
    /// Bad pages in this pass.
    pub bad: u64,
    /// Bad pages so far.
    pub total_bad: u64,
}

/// Parses the complete (newline-terminated) memtouch pass lines of `text`.
pub fn parse_passes(text: &str) -> Vec<Pass> {
    complete_lines(text)
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let num = |tok: Option<&str>, key: &str| -> Option<u64> {
                tok?.strip_prefix(key)?.strip_prefix('=')?.parse().ok()
            };
            let p = Pass {
                pass: num(it.next(), "pass")?,
                bad: num(it.next(), "bad")?,
                total_bad: num(it.next(), "total_bad")?,
            };
            it.next().is_none().then_some(p)
        })
        .collect()
}

/// The newline-terminated lines of `text` (a trailing partial line is left out).
pub fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text[..end].lines()
}

/// How a migration ended, from `query-migrate`.
#[derive(Debug, Clone)]
pub struct MigrationOutcome {
    /// "completed", "failed" or "cancelled".
    pub phase: String,
    /// The statistics object.
    pub stats: Value,
    /// The error, if any.
    pub error: Option<String>,
    /// The whole `query-migrate` reply.
    pub raw: Value,
}

impl MigrationOutcome {
    /// A numeric statistic (0 when missing).
    pub fn stat(&self, key: &str) -> u64 {
        self.stats.get(key).and_then(Value::as_u64).unwrap_or(0)
    }
}

/// A vmm process with its control socket and serial output.
pub struct Vmm {
    /// Its name (also of its files in the test directory).
    pub name: String,
    /// The process.
    pub proc: Proc,
    control: PathBuf,
    serial: PathBuf,
}

impl Vmm {
    /// Runs one control command; `Ok(return value)` or `Err(error description)`.
    /// Panics when the socket cannot be used at all (the vmm is gone or hangs).
    pub fn ctl(&self, cmd: &str, args: Value) -> Result<Value, String> {
        let req = if args.is_null() || args.as_object().is_some_and(|o| o.is_empty()) {
            json!({ "execute": cmd })
        } else {
            json!({ "execute": cmd, "arguments": args })
        };
        let reply = self
            .raw_request(&req.to_string())
            .unwrap_or_else(|e| panic!("vmm {}: control request {req}: {e}", self.name));
        if let Some(r) = reply.get("return") {
            Ok(r.clone())
        } else if let Some(e) = reply.get("error") {
            Err(e
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("error without a description")
                .to_string())
        } else {
            panic!(
                "vmm {}: reply to {req} has neither return nor error: {reply}",
                self.name
            )
        }
    }

    /// Sends one raw request line and reads one reply line.
    pub fn raw_request(&self, line: &str) -> Result<Value, String> {
        let mut s = UnixStream::connect(&self.control).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(CTL_TIMEOUT.mul_f64(timeout_scale())))
            .and_then(|_| s.set_write_timeout(Some(secs(30))))
            .map_err(|e| e.to_string())?;
        writeln!(s, "{line}").map_err(|e| format!("write: {e}"))?;
        let mut reply = String::new();
        BufReader::new(&s)
            .read_line(&mut reply)
            .map_err(|e| format!("read: {e}"))?;
        serde_json::from_str(&reply).map_err(|e| format!("bad reply {reply:?}: {e}"))
    }

    /// `query-status`'s `status` ("running", "paused", "postmigrate", ...).
    pub fn status(&self) -> String {
        let v = self.ctl("query-status", Value::Null).expect("query-status");
        v["status"].as_str().unwrap_or_default().to_string()
    }

    /// `query-ram-digest` as `(block name, sha256)` pairs.
    pub fn digest(&self) -> Vec<(String, String)> {
        let v = self
            .ctl("query-ram-digest", Value::Null)
            .expect("query-ram-digest");
        digest_blocks(&v)
    }

    /// `query-ram-digest` with the guest ranges `exclude` (`(address, length)`) left out.
    pub fn digest_excluding(&self, exclude: &[(u64, u64)]) -> Vec<(String, String)> {
        let list: Vec<Value> = exclude.iter().map(|&(a, l)| json!([a, l])).collect();
        let v = self
            .ctl("query-ram-digest", json!({ "exclude": list }))
            .expect("query-ram-digest with exclusions");
        digest_blocks(&v)
    }

    /// `query-migrate`'s `phase` ("setup", "precopy", ..., "completed", "failed").
    pub fn phase(&self) -> String {
        self.query_migrate()["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until `query-migrate`'s phase is one of `phases` and returns the whole reply.
    pub fn wait_phase(&mut self, timeout: Duration, phases: &[&str]) -> Value {
        let name = self.name.clone();
        wait_until(
            timeout,
            &format!("{name}: migration phase {phases:?}"),
            || {
                self.proc.assert_alive();
                let v = self.query_migrate();
                phases.iter().any(|p| v["phase"] == *p).then_some(v)
            },
        )
    }

    /// The mappings of guest RAM (the memfd `guest-ram`) in the process, from
    /// `/proc/<pid>/maps`, in address order.
    pub fn ram_mappings(&self) -> Vec<RamMapping> {
        let maps =
            std::fs::read_to_string(format!("/proc/{}/maps", self.proc.pid())).unwrap_or_default();
        maps.lines()
            .filter(|l| l.contains("/memfd:guest-ram"))
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let (start, end) = it.next()?.split_once('-')?;
                let _perms = it.next()?;
                let offset = it.next()?;
                Some(RamMapping {
                    start: u64::from_str_radix(start, 16).ok()?,
                    end: u64::from_str_radix(end, 16).ok()?,
                    memfd_offset: u64::from_str_radix(offset, 16).ok()?,
                })
            })
            .collect()
    }

    /// The address in the process of the byte at memfd offset `offset` (guest address, for
    /// RAM below the PCI hole).
    pub fn ram_host_addr(&self, offset: u64) -> u64 {
        let maps = self.ram_mappings();
        maps.iter()
            .find(|m| offset >= m.memfd_offset && offset - m.memfd_offset < m.end - m.start)
            .map(|m| m.start + (offset - m.memfd_offset))
            .unwrap_or_else(|| {
                panic!(
                    "vmm {}: no guest-ram mapping covers memfd offset {offset:#x}: {maps:?}",
                    self.name
                )
            })
    }

    /// `query-migrate`.
    pub fn query_migrate(&self) -> Value {
        self.ctl("query-migrate", Value::Null)
            .expect("query-migrate")
    }

    /// Destination: waits until umemd listens and returns `listen_uri`.
    pub fn listen_uri(&mut self) -> String {
        let name = self.name.clone();
        wait_until(secs(30), &format!("{name}: listen_uri"), || {
            self.proc.assert_alive();
            self.query_migrate()["listen_uri"]
                .as_str()
                .map(str::to_string)
        })
    }

    /// `migrate` to `uri` with extra parameters (an object, or null).
    pub fn migrate(&self, uri: &str, params: Value) -> Result<Value, String> {
        let mut args = if params.is_object() {
            params
        } else {
            json!({})
        };
        args["uri"] = json!(uri);
        self.ctl("migrate", args)
    }

    /// Waits until the migration is completed, failed or cancelled.
    pub fn wait_migration(&mut self, timeout: Duration) -> MigrationOutcome {
        let name = self.name.clone();
        let v = wait_until(timeout, &format!("{name}: migration to end"), || {
            self.proc.assert_alive();
            let v = self.query_migrate();
            matches!(
                v["phase"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
            .then_some(v)
        });
        MigrationOutcome {
            phase: v["phase"].as_str().unwrap_or_default().to_string(),
            stats: v["stats"].clone(),
            error: v["error"].as_str().map(str::to_string),
            raw: v,
        }
    }

    /// The serial output so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Path of the serial output file.
    pub fn serial_path(&self) -> &Path {
        &self.serial
    }

    /// Waits for a complete serial line for which `f` is true and returns it.
    pub fn wait_serial(
        &mut self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&str) -> bool,
    ) -> String {
        let name = self.name.clone();
        let r = try_wait_until(timeout, || {
            let s = self.serial();
            let found = complete_lines(&s).find(|l| f(l)).map(str::to_string);
            found
        });
        r.unwrap_or_else(|| {
            panic!(
                "{name}: timed out after {timeout:?} waiting for serial line {what}; last output:\n{}",
                tail(&self.serial(), 10)
            )
        })
    }

    /// Waits for a serial line starting with `prefix`.
    pub fn wait_serial_prefix(&mut self, timeout: Duration, prefix: &str) -> String {
        self.wait_serial(timeout, &format!("\"{prefix}...\""), |l| {
            l.starts_with(prefix)
        })
    }

    /// memtouch pass lines so far.
    pub fn passes(&self) -> Vec<Pass> {
        parse_passes(&self.serial())
    }

    /// The last memtouch pass so far.
    pub fn last_pass(&self) -> Option<Pass> {
        self.passes().last().copied()
    }

    /// Waits until memtouch prints a pass numbered at least `n`, and returns it.
    pub fn wait_pass(&mut self, timeout: Duration, n: u64) -> Pass {
        let name = self.name.clone();
        let r = try_wait_until(timeout, || self.passes().into_iter().find(|p| p.pass >= n));
        r.unwrap_or_else(|| {
            panic!(
                "{name}: timed out after {timeout:?} waiting for memtouch pass {n}; status {:?}; last output:\n{}",
                self.ctl("query-status", Value::Null),
                tail(&self.serial(), 5)
            )
        })
    }
}

/// The `(block name, sha256)` pairs of a `query-ram-digest` reply.
fn digest_blocks(reply: &Value) -> Vec<(String, String)> {
    reply["blocks"]
        .as_array()
        .expect("blocks array")
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap_or_default().to_string(),
                b["sha256"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Asserts that every memtouch pass in `passes` found no bad page.
pub fn assert_no_bad(who: &str, passes: &[Pass]) {
    if let Some(p) = passes.iter().find(|p| p.bad != 0 || p.total_bad != 0) {
        panic!("{who}: memtouch found corrupted pages: {p:?}");
    }
}

/// Asserts that pass numbers go up by exactly one from line to line.
pub fn assert_consecutive(who: &str, passes: &[Pass]) {
    for w in passes.windows(2) {
        assert_eq!(
            w[1].pass,
            w[0].pass + 1,
            "{who}: memtouch pass numbers jump from {} to {}",
            w[0].pass,
            w[1].pass
        );
    }
}

/// One mapping of guest RAM in a VMM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamMapping {
    /// First address.
    pub start: u64,
    /// Address after the last byte.
    pub end: u64,
    /// Offset in the memfd of the first byte.
    pub memfd_offset: u64,
}

/// Reads `len` bytes at `addr` of process `pid` through `/proc/<pid>/mem`, in a thread of its
/// own. Returns `None` when the read has not finished after `timeout` (the thread is left
/// behind, blocked, and its result is dropped whenever it ends).
pub fn read_process_memory(
    pid: u32,
    addr: u64,
    len: usize,
    timeout: Duration,
) -> Option<std::io::Result<Vec<u8>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("read-mem-{pid}"))
        .spawn(move || {
            use std::os::unix::fs::FileExt;
            let r = std::fs::File::open(format!("/proc/{pid}/mem")).and_then(|f| {
                let mut buf = vec![0u8; len];
                f.read_exact_at(&mut buf, addr)?;
                Ok(buf)
            });
            let _ = tx.send(r);
        })
        .expect("starting a reader thread");
    rx.recv_timeout(timeout).ok()
}

/// A TCP port on 127.0.0.1 that nothing listens on (bound and released again).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local_addr").port()
}
