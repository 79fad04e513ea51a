//! A vmm of the kit: how it is started ([`VmmBuilder`]), and what a test does with it
//! ([`Vmm`]): control requests over its JSON socket, migration phases, its serial output.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::binaries::binary;
use crate::process::{tail, Proc};
use crate::serial::{complete_lines, parse_passes, Pass};
use crate::timing::{secs, timeout_scale, try_wait_until, wait_until};

/// How long one control request may take (a RAM digest of several GiB takes seconds).
const CTL_TIMEOUT: Duration = Duration::from_secs(120);

/// An open connection to a vmm's control socket; see [`Vmm::control_connection`].
pub struct ControlConnection {
    name: String,
    /// The socket, read through a buffer and written directly (`get_mut`).
    conn: BufReader<UnixStream>,
}

impl ControlConnection {
    /// Runs one control command; `Ok(return value)` or `Err(error description)`.
    /// Panics when the socket cannot be used at all (the vmm is gone or hangs).
    pub fn ctl(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
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

    /// `query-migrate`'s reply.
    pub fn query_migrate(&mut self) -> Value {
        self.ctl("query-migrate", Value::Null)
            .expect("query-migrate")
    }

    /// Sends one raw request line and reads one reply line.
    pub fn raw_request(&mut self, line: &str) -> Result<Value, String> {
        // One write: a request in pieces wakes the VMM's control thread for each.
        self.conn
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut reply = String::new();
        match self.conn.read_line(&mut reply) {
            Ok(0) => return Err("read: the vmm closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
        serde_json::from_str(&reply).map_err(|e| format!("bad reply {reply:?}: {e}"))
    }
}

/// Options for a vmm; see [`TestEnv::vmm`](crate::TestEnv::vmm).
pub struct VmmBuilder {
    dir: PathBuf,
    name: String,
    umemd: PathBuf,
    mem: String,
    vcpus: u32,
    guest: Option<String>,
    cmdline: String,
    prefill: Option<u64>,
    prefill_size: Option<String>,
    incoming: Option<String>,
    paused: bool,
    hugepages: bool,
    extra: Vec<String>,
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
            prefill_size: None,
            incoming: None,
            paused: false,
            hugepages: false,
            extra: Vec::new(),
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

    /// `--prefill-size SIZE`: prefill only the lowest `size` of RAM (e.g. "1G").
    pub fn prefill_size(mut self, size: &str) -> Self {
        self.prefill_size = Some(size.into());
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

    /// `--hugepages`: guest RAM on 2 MiB huge pages.
    pub fn hugepages(mut self, h: bool) -> Self {
        self.hugepages = h;
        self
    }

    /// One more command-line argument (e.g. `--incoming-secret-file`), after the others.
    pub fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Self {
        self.extra.push(a.as_ref().to_string_lossy().into_owned());
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
        if let Some(s) = &self.prefill_size {
            cmd.arg("--prefill-size").arg(s);
        }
        if let Some(u) = &self.incoming {
            cmd.arg("--incoming").arg(u);
        }
        if self.hugepages {
            cmd.arg("--hugepages");
        }
        if self.paused {
            cmd.arg("-S");
        }
        cmd.args(&self.extra);
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
        self.control_connection()
            .unwrap_or_else(|e| panic!("vmm {}: control socket: {e}", self.name))
            .ctl(cmd, args)
    }

    /// A connection to its control socket that stays open for many requests: a poller's
    /// requests then cost the VMM no new connection (and thread) each.
    pub fn control_connection(&self) -> Result<ControlConnection, String> {
        let s = UnixStream::connect(&self.control).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(CTL_TIMEOUT.mul_f64(timeout_scale())))
            .and_then(|_| s.set_write_timeout(Some(secs(30))))
            .map_err(|e| e.to_string())?;
        Ok(ControlConnection {
            name: self.name.clone(),
            conn: BufReader::new(s),
        })
    }

    /// Its control socket.
    pub fn control_path(&self) -> &Path {
        &self.control
    }

    /// Sends one raw request line and reads one reply line.
    pub fn raw_request(&self, line: &str) -> Result<Value, String> {
        self.control_connection()?.raw_request(line)
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

    /// Destination: waits until at least `n` incoming migrations failed before the VM ran
    /// (`failed_attempts`), and returns `query-migrate`.
    pub fn wait_incoming_failures(&mut self, timeout: Duration, n: u64) -> Value {
        let name = self.name.clone();
        wait_until(
            timeout,
            &format!("{name}: {n} failed incoming migration(s)"),
            || {
                self.proc.assert_alive();
                let v = self.query_migrate();
                (v["failed_attempts"].as_u64().unwrap_or(0) >= n).then_some(v)
            },
        )
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

    /// Destination: connections its umemd turned away before one proved to be the source.
    pub fn rejected_peers(&self) -> u64 {
        self.query_migrate()["stats"]["rejected_peers"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Destination: waits until its umemd has turned away at least `n` connections. The
    /// refused peer hears why before the count reaches this VMM, so a source that failed
    /// does not mean the count is in yet.
    pub fn wait_rejected_peers(&self, n: u64, timeout: Duration) -> u64 {
        let what = format!("{}: {n} rejected peer(s) counted", self.name);
        wait_until(timeout, &what, || {
            let r = self.rejected_peers();
            (r >= n).then_some(r)
        })
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
