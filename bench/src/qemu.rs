//! The baseline: the same migration done by QEMU (`qemu-system-x86_64`, driven over QMP) on the
//! same guest, so that the table shows umem and QEMU side by side.
//!
//! Both QEMUs run the guest that `vmm --export-guest` writes (a multiboot ELF booted with
//! `-kernel`), with `-accel kvm -cpu qemu64`, one vCPU, on loopback TCP. Every process is a
//! [`Proc`]: killed and reaped when the scenario ends, whatever happened.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use umem_testkit::{binary, closed_port, complete_lines, parse_passes, secs, Proc, TestEnv};

use crate::progress::Progress;
use crate::{Run, Scenario};

/// Environment variable naming the QEMU binary (default `qemu-system-x86_64` from `PATH`).
const QEMU_ENV: &str = "UMEM_BENCH_QEMU";

/// How long one QMP request may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// The QEMU binary, or why there is none.
pub fn find_qemu() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(QEMU_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{QEMU_ENV}={} does not exist", p.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .ok_or_else(|| "qemu-system-x86_64 not found in PATH".to_string())
}

/// A QMP connection (one request at a time; asynchronous events are skipped).
struct Qmp {
    name: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `socket` (retrying while `proc` runs, for up to 30 s), reads the greeting
    /// and leaves capabilities negotiation mode.
    fn connect(name: &str, socket: &Path, proc: &mut Proc) -> Result<Qmp, String> {
        let deadline = Instant::now() + secs(30);
        let stream = loop {
            if !proc.is_alive() {
                return Err(format!("{name} exited: {}", log_tail(proc)));
            }
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("{name}: QMP socket {}: {e}", socket.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(QMP_TIMEOUT))
            .and_then(|_| stream.set_write_timeout(Some(QMP_TIMEOUT)))
            .map_err(|e| format!("{name}: {e}"))?;
        let writer = stream.try_clone().map_err(|e| format!("{name}: {e}"))?;
        let mut q = Qmp {
            name: name.into(),
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("{name}: unexpected QMP greeting {greeting}"));
        }
        q.cmd("qmp_capabilities", Value::Null)?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(format!("{}: QMP connection closed", self.name)),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| format!("{}: bad QMP line {line:?}: {e}", self.name)),
            Err(e) => Err(format!("{}: QMP read: {e}", self.name)),
        }
    }

    /// Runs `cmd` and returns its `return` value, or the error's description.
    fn cmd(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let req = if args.is_null() {
            json!({ "execute": cmd })
        } else {
            json!({ "execute": cmd, "arguments": args })
        };
        writeln!(self.writer, "{req}").map_err(|e| format!("{}: QMP write: {e}", self.name))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("{}: {req}: {}", self.name, e["desc"]));
            }
            // An event ({"event": ...}): not the reply.
        }
    }
}

fn log_tail(p: &Proc) -> String {
    let log = p.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// Starts one QEMU; `incoming` is the destination's `-incoming` URI.
fn start_qemu(
    qemu: &Path,
    dir: &Path,
    name: &str,
    s: &Scenario,
    kernel: &Path,
    incoming: Option<&str>,
) -> Result<(Proc, Qmp, PathBuf), String> {
    let qmp = dir.join(format!("{name}.qmp"));
    let serial = dir.join(format!("{name}.serial"));
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "kvm", "-cpu", "qemu64", "-smp", "1", "-m", s.mem])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", s.cmdline])
        .args(["-nographic", "-display", "none", "-monitor", "none"])
        .args(["-no-reboot", "-name", name])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if let Some(uri) = incoming {
        cmd.args(["-incoming", uri]);
    }
    // RAM on 2 MiB huge pages, as `vmm --hugepages` has it: a hugetlbfs memfd, shared.
    if s.hugepages() {
        cmd.arg("-object")
            .arg(format!(
                "memory-backend-memfd,id=ram0,size={},hugetlb=on,hugetlbsize=2M,share=on",
                s.mem
            ))
            .args(["-machine", "memory-backend=ram0"]);
    }
    let mut proc = Proc::spawn(name, cmd, &dir.join(format!("{name}.log")));
    let q = Qmp::connect(name, &qmp, &mut proc)?;
    Ok((proc, q, serial))
}

/// Records the source's `ram.transferred` at its `total-time` (QEMU's own clock, as umem's
/// samples use umemd's); says whether the reply's status is `postcopy-active`.
fn sample(v: &Value, progress: &mut Progress) -> bool {
    if let (Some(ms), Some(bytes)) = (v["total-time"].as_u64(), v["ram"]["transferred"].as_u64()) {
        progress.record(Duration::from_millis(ms), bytes);
    }
    v["status"] == "postcopy-active"
}

/// Runs scenario `s` with QEMU on both sides. `Err` describes what went wrong; the processes
/// are killed and reaped either way.
/// The name QEMU gives its vCPU threads starts with this.
const VCPU: &str = "CPU ";

pub fn run(s: &Scenario, qemu: &Path) -> Result<Run, String> {
    let t = TestEnv::new(&format!("bench-{}", s.name));
    let dir = t.dir().to_path_buf();

    // The same guest image the umem scenarios boot from the vmm binary.
    let kernel = dir.join("memtouch.elf");
    let st = Command::new(binary("vmm"))
        .args(["--guest", "memtouch", "--export-guest"])
        .arg(&kernel)
        .status()
        .map_err(|e| format!("vmm --export-guest: {e}"))?;
    if !st.success() {
        return Err(format!("vmm --export-guest: {st}"));
    }

    let port = closed_port();
    let incoming = format!("tcp:127.0.0.1:{port}");
    let (mut dst_proc, mut dst, dst_serial) =
        start_qemu(qemu, &dir, "qemu-dst", s, &kernel, Some(&incoming))?;
    let (mut src_proc, mut src, src_serial) = start_qemu(qemu, &dir, "qemu-src", s, &kernel, None)?;

    // SeaBIOS output shares the first guest line, so match anywhere in a line.
    let ready = umem_testkit::poll_every(secs(120), Duration::from_millis(20), || {
        if !src_proc.is_alive() {
            return Some(false);
        }
        let text = std::fs::read_to_string(&src_serial).unwrap_or_default();
        let found = complete_lines(&text).any(|l| l.contains(s.ready));
        found.then_some(true)
    });
    match ready {
        Some(true) => {}
        Some(false) => return Err(format!("qemu-src exited: {}", log_tail(&src_proc))),
        None => return Err(format!("qemu-src: no serial line {:?} in 120 s", s.ready)),
    }

    let postcopy = s.mode == "postcopy";
    let mut caps = vec![json!({"capability": "events", "state": false})];
    if postcopy {
        caps.push(json!({"capability": "postcopy-ram", "state": true}));
        caps.push(json!({"capability": "postcopy-blocktime", "state": true}));
    }
    for q in [&mut src, &mut dst] {
        q.cmd("migrate-set-capabilities", json!({ "capabilities": caps }))?;
    }
    let mut params = json!({ "max-bandwidth": 64u64 << 30 });
    if let Some(ms) = s.extra["downtime_limit_ms"].as_u64() {
        params["downtime-limit"] = json!(ms);
    }
    src.cmd("migrate-set-parameters", params)?;

    // QEMU's vCPU threads ("CPU 0/KVM") run the guest: their time is left out.
    let cpu0 = [src_proc.cpu_time(Some(VCPU)), dst_proc.cpu_time(Some(VCPU))];
    let t0 = Instant::now();
    src.cmd("migrate", json!({ "uri": incoming }))?;
    if postcopy {
        src.cmd("migrate-start-postcopy", Value::Null)?;
    }

    // The destination has the whole VM once its own status says completed. The source is
    // sampled on the way; QEMU 7.2 has no field saying which switchover happened, so a
    // `postcopy-active` status on either side is what says it was a postcopy one.
    let mut progress = Progress::new();
    let mut saw_postcopy = false;
    let mut err = None;
    let dst_end = umem_testkit::poll_every(secs(600), Duration::from_millis(5), || {
        let r = src.cmd("query-migrate", Value::Null).and_then(|v| {
            saw_postcopy |= sample(&v, &mut progress);
            dst.cmd("query-migrate", Value::Null)
        });
        let r = r.and_then(|d| {
            if !dst_proc.is_alive() {
                return Err(format!("qemu-dst exited: {}", log_tail(&dst_proc)));
            }
            saw_postcopy |= d["status"] == "postcopy-active";
            match d["status"].as_str() {
                Some("completed") => Ok(Some(d)),
                Some("failed" | "cancelled") => Err(format!("qemu-dst: {d}")),
                _ => Ok(None),
            }
        });
        r.unwrap_or_else(|e| {
            err = Some(e);
            Some(Value::Null)
        })
    });
    let wall = t0.elapsed();
    if let Some(e) = err {
        return Err(e);
    }
    let dst_end = dst_end.ok_or("qemu-dst: migration not completed after 600 s")?;

    // QEMU 7.2 reports "completed" on the source before it fills in the timing fields.
    let mut err = None;
    let src_end = umem_testkit::poll_every(secs(30), Duration::from_millis(10), || {
        match src.cmd("query-migrate", Value::Null) {
            Ok(v) if v["status"] == "completed" && v.get("total-time").is_some() => Some(v),
            Ok(v) if matches!(v["status"].as_str(), Some("failed" | "cancelled")) => {
                err = Some(format!("qemu-src: {v}"));
                Some(Value::Null)
            }
            Ok(_) => None,
            Err(e) => {
                err = Some(e);
                Some(Value::Null)
            }
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    let src_end = src_end.ok_or("qemu-src: no completed status with total-time in 30 s")?;
    sample(&src_end, &mut progress);
    let dst_status = dst.cmd("query-status", Value::Null)?;
    let cpu = [
        src_proc.cpu_time(Some(VCPU)).saturating_sub(cpu0[0]),
        dst_proc.cpu_time(Some(VCPU)).saturating_sub(cpu0[1]),
    ];

    let ram = &src_end["ram"];
    let bytes = ram["transferred"].as_u64().unwrap_or(0);
    let total_ms = src_end["total-time"].as_u64().unwrap_or(0);
    let bad = parse_passes(&std::fs::read_to_string(&src_serial).unwrap_or_default())
        .iter()
        .chain(parse_passes(&std::fs::read_to_string(&dst_serial).unwrap_or_default()).iter())
        .map(|p| p.bad)
        .sum::<u64>();
    let r = json!({
        "scenario": s.name,
        "engine": "qemu",
        "mode": s.mode,
        "switchover": if saw_postcopy { "postcopy" } else { "precopy" },
        "ram": s.mem,
        "bytes_sent": bytes,
        "pages_sent": ram["normal"],
        "zero_pages": ram["duplicate"],
        "rounds": ram["dirty-sync-count"],
        "total_ms": total_ms,
        "wall_ms": wall.as_millis() as u64,
        "downtime_ms": src_end["downtime"],
        "throughput_gbps": bytes as f64 / total_ms.max(1) as f64 / 1e6,
        "cpu_ms_per_gib": crate::cpu_per_gib(cpu, bytes),
        "qemu_mbps": ram["mbps"],
        "faults": if postcopy { ram["postcopy-requests"].clone() } else { Value::Null },
        // QEMU 10 and later: faults by latency, in the same log2 buckets as umemd's.
        "fault_latency_hist": dst_end["postcopy-latency-dist"],
        "postcopy_blocktime_ms": dst_end["postcopy-blocktime"],
        "vcpu_blocked_ms": dst_end["postcopy-vcpu-blocktime"],
        "dst_status": dst_status["status"],
        "guest_bad_pages": bad,
    });
    src_proc.kill();
    dst_proc.kill();
    Ok(Run { row: r, progress })
}
