//! `umem-ctl`: the command line for a VMM's control socket, for people and scripts.
//!
//! ```text
//! umem-ctl -s /run/umem/vm0.sock query-status
//! umem-ctl -s /run/umem/vm0.sock migrate uri=tcp:10.0.0.2:4444 mode=precopy
//! umem-ctl -s /run/umem/vm0.sock migrate --postcopy --bandwidth 100 tcp:10.0.0.2:4444
//! umem-ctl -s /run/umem/vm0.sock --json wait-migrate
//! ```

use std::io::{BufRead, BufReader, IsTerminal};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use vmm::cli::umem_ctl::{parse_args, Args, Command};

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn connect(path: &PathBuf, timeout: Duration) -> Result<Self, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    let writer = s.try_clone().map_err(|e| e.to_string())?;
                    return Ok(Client {
                        reader: BufReader::new(s),
                        writer,
                    });
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("connecting to {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn call(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let req = json!({"execute": cmd, "arguments": args});
        vmm::control::send_line(&mut self.writer, &req).map_err(|e| format!("sending: {e}"))?;
        let mut line = String::new();
        loop {
            line.clear();
            if self
                .reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err("the VMM closed the control connection".into());
            }
            let v: Value =
                serde_json::from_str(&line).map_err(|e| format!("bad reply {line:?}: {e}"))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let desc = e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(desc.to_string());
            }
            // Anything else is an event; keep reading for the reply.
        }
    }
}

fn print_human(v: &Value, prefix: &str) {
    match v {
        Value::Object(m) if m.is_empty() && prefix.is_empty() => println!("ok"),
        Value::Object(m) => {
            for (k, x) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                print_human(x, &p);
            }
        }
        // A list of plain values (a histogram, per-vCPU times) reads best on one line.
        Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
            let items: Vec<String> = a.iter().map(Value::to_string).collect();
            println!("{prefix}: [{}]", items.join(", "));
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                print_human(x, &format!("{prefix}[{i}]"));
            }
        }
        Value::String(s) => println!("{prefix}: {s}"),
        other => println!("{prefix}: {other}"),
    }
}

fn progress_line(m: &Value) -> String {
    let s = &m["stats"];
    let total = s["total_pages"].as_u64().unwrap_or(0);
    let remaining = s["remaining_pages"].as_u64().unwrap_or(0);
    let done = total.saturating_sub(remaining);
    let pct = (done * 100).checked_div(total).unwrap_or(0);
    format!(
        "{:<11} {:>3}%  round {:>2}  sent {:>6} MiB  {:>6} MB/s  zero {:>8}  holes {:>8}",
        m["phase"].as_str().unwrap_or("?"),
        pct,
        s["rounds"],
        s["bytes_sent"].as_u64().unwrap_or(0) >> 20,
        s["throughput_bps"].as_u64().unwrap_or(0) / 1_000_000,
        s["zero_pages"],
        s["holes_skipped"],
    )
}

/// Successive `query-migrate` samples, for the rates a single one does not give.
#[derive(Default)]
struct Rates {
    last: Option<(Instant, u64, u64)>,
    /// Bytes per second on the migration stream, smoothed.
    bytes_per_s: f64,
    /// Page faults (destination) or page requests served (source) per second, smoothed.
    faults_per_s: f64,
}

impl Rates {
    /// Adds sample `m` taken now.
    fn sample(&mut self, m: &Value) {
        let now = Instant::now();
        let bytes = m["stats"]["bytes_sent"].as_u64().unwrap_or(0);
        let pc = &m["postcopy"];
        let faults = pc["faults"]
            .as_u64()
            .unwrap_or(0)
            .max(pc["pages_requested"].as_u64().unwrap_or(0));
        if let Some((t, b, f)) = self.last {
            let dt = now.duration_since(t).as_secs_f64();
            if dt > 0.0 {
                let smooth = |old: f64, new: f64| {
                    if old == 0.0 {
                        new
                    } else {
                        0.6 * old + 0.4 * new
                    }
                };
                self.bytes_per_s = smooth(self.bytes_per_s, bytes.saturating_sub(b) as f64 / dt);
                self.faults_per_s = smooth(self.faults_per_s, faults.saturating_sub(f) as f64 / dt);
            }
        } else {
            self.bytes_per_s = m["stats"]["throughput_bps"].as_u64().unwrap_or(0) as f64;
        }
        self.last = Some((now, bytes, faults));
    }
}

/// A progress bar on stderr: phase, percent, rate, what is left, ETA, and the dirty rate in
/// precopy or the fault rate in postcopy.
struct Bar {
    bar: ProgressBar,
    rates: Rates,
}

impl Bar {
    fn new() -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{prefix:<11} [{bar:30}] {percent:>3}%  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        Bar {
            bar,
            rates: Rates::default(),
        }
    }

    fn update(&mut self, m: &Value) {
        self.rates.sample(m);
        let s = &m["stats"];
        let phase = m["phase"].as_str().unwrap_or("?");
        let total = s["total_pages"].as_u64().unwrap_or(0);
        let remaining_pages = match m["postcopy"]["remaining_pages"].as_u64() {
            Some(r) if phase.starts_with("postcopy") => r,
            _ => s["remaining_pages"].as_u64().unwrap_or(0),
        };
        let left = remaining_pages * 4096;
        let rate = self.rates.bytes_per_s;
        let eta = if rate >= 1.0 {
            format!("{}s", (left as f64 / rate).ceil() as u64)
        } else {
            "--".into()
        };
        let tail = if phase.starts_with("postcopy") {
            format!("faults {:.0}/s", self.rates.faults_per_s)
        } else {
            format!(
                "dirty {} pages/s",
                s["dirty_rate_pps"].as_u64().unwrap_or(0)
            )
        };
        self.bar.set_prefix(phase.to_string());
        self.bar.set_length(total.max(1));
        self.bar.set_position(total.saturating_sub(remaining_pages));
        self.bar.set_message(format!(
            "{}/s  {} left  ETA {eta}  {tail}",
            HumanBytes(rate as u64),
            HumanBytes(left)
        ));
    }
}

fn run(a: Args) -> Result<i32, String> {
    let timeout = Duration::from_secs_f64(a.timeout);
    // Arguments are checked before anything is sent.
    let request = match &a.command {
        Command::Migrate(m) => Some(("migrate", m.arguments()?)),
        Command::MigrateSetParameters(p) => Some((
            "migrate-set-parameters",
            Value::Object(p.tuning.parameters(&p.args)?),
        )),
        Command::Other(words) => {
            let (cmd, rest) = words.split_first().ok_or("no command")?;
            Some((cmd.as_str(), Value::Object(parse_args(rest)?)))
        }
        Command::WaitMigrate | Command::WaitStatus { .. } => None,
    };
    let mut c = Client::connect(&a.socket, timeout)?;
    let deadline = Instant::now() + timeout;
    let (cmd, args) = match (&a.command, request) {
        (_, Some(request)) => request,
        (Command::WaitMigrate, None) => return wait_migrate(&mut c, a.json, timeout, deadline),
        (Command::WaitStatus { status }, None) => loop {
            let s = c.call("query-status", json!({}))?;
            if s["status"].as_str() == Some(status.as_str()) {
                return Ok(0);
            }
            if Instant::now() >= deadline {
                return Err(format!("status is {} after {:?}", s["status"], timeout));
            }
            std::thread::sleep(Duration::from_millis(20));
        },
        (_, None) => return Err("no request for this command".into()),
    };
    let r = c.call(cmd, args)?;
    if a.json {
        println!("{r}");
    } else {
        print_human(&r, "");
    }
    Ok(0)
}

/// Polls `query-migrate` until the migration ends; progress goes to stderr, as a bar when it
/// is a terminal and as plain lines when not (none with `--json`).
fn wait_migrate(
    c: &mut Client,
    json_out: bool,
    timeout: Duration,
    deadline: Instant,
) -> Result<i32, String> {
    let mut bar = (!json_out && std::io::stderr().is_terminal()).then(Bar::new);
    loop {
        let m = c.call("query-migrate", json!({}))?;
        let phase = m["phase"].as_str().unwrap_or("").to_string();
        match bar.as_mut() {
            Some(b) => b.update(&m),
            None if !json_out => eprintln!("{}", progress_line(&m)),
            None => {}
        }
        if matches!(
            phase.as_str(),
            "completed" | "failed" | "cancelled" | "none"
        ) {
            if let Some(b) = &bar {
                b.bar.finish();
            }
            if json_out {
                println!("{m}");
            } else {
                print_human(&m, "");
            }
            return Ok(if phase == "completed" { 0 } else { 1 });
        }
        if Instant::now() >= deadline {
            if let Some(b) = &bar {
                b.bar.abandon();
            }
            return Err(format!(
                "migration still in phase {phase} after {:?}",
                timeout
            ));
        }
        std::thread::sleep(Duration::from_millis(if json_out { 20 } else { 250 }));
    }
}

fn main() {
    match run(Args::parse()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("umem-ctl: {e}");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request `umem-ctl -s S WORDS...` sends for a migrate command.
    fn migrate(words: &[&str]) -> Result<Value, String> {
        let argv = ["umem-ctl", "-s", "/s", "migrate"].iter().chain(words);
        let a = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        match a.command {
            Command::Migrate(m) => m.arguments(),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn the_key_value_form_still_works() {
        let v = migrate(&[
            "uri=tcp:10.0.0.2:4444",
            "mode=precopy",
            "downtime_limit_ms=50",
        ]);
        assert_eq!(
            v.unwrap(),
            json!({"uri": "tcp:10.0.0.2:4444", "mode": "precopy", "downtime_limit_ms": 50})
        );
    }

    #[test]
    fn virsh_flags_map_onto_parameters() {
        let v = migrate(&[
            "--postcopy",
            "--bandwidth",
            "100",
            "--postcopy-bandwidth",
            "8",
            "--timeout",
            "3",
            "--timeout-postcopy",
            "--completion-timeout-per-gib",
            "150",
            "tcp:h:1",
            "downtime_limit_ms=50",
        ])
        .unwrap();
        assert_eq!(
            v,
            json!({"uri": "tcp:h:1", "downtime_limit_ms": 50, "mode": "hybrid",
                   "postcopy_after_rounds": u32::MAX, "bandwidth_limit": 100u64 << 20,
                   "postcopy_bandwidth_limit": 8u64 << 20, "precopy_timeout_ms": 3000,
                   "precopy_timeout_action": "postcopy", "completion_timeout_per_gib_s": 150})
        );
        let v = migrate(&["--postcopy", "--postcopy-after-precopy", "unix:/p"]).unwrap();
        assert_eq!(v["postcopy_after_rounds"], 1);
        // --timeout alone suspends, as virsh's does.
        let v = migrate(&["--timeout", "5", "tcp:h:1"]).unwrap();
        assert_eq!(v["precopy_timeout_action"], "suspend");
        assert_eq!(v["precopy_timeout_ms"], 5000);
        assert!(v.get("mode").is_none());
    }

    #[test]
    fn contradictions_are_refused_by_name() {
        let e = migrate(&["--timeout", "3", "--timeout-postcopy", "tcp:h:1"]).unwrap_err();
        assert!(e.contains("--postcopy"), "{e}");
        let e = migrate(&["--postcopy-after-precopy", "tcp:h:1"]).unwrap_err();
        assert!(e.contains("--postcopy"), "{e}");
        let e = migrate(&["--timeout-postcopy", "--postcopy", "tcp:h:1"]).unwrap_err();
        assert!(e.contains("--timeout"), "{e}");
        let e = migrate(&["--postcopy", "mode=precopy", "tcp:h:1"]).unwrap_err();
        assert!(e.contains("mode"), "{e}");
        let e = migrate(&["--bandwidth", "1", "tcp:h:1", "tcp:h:2"]).unwrap_err();
        assert!(e.contains("more than one URI"), "{e}");
        let e = migrate(&["--bandwidth", "1"]).unwrap_err();
        assert!(e.contains("URI"), "{e}");
        let e = migrate(&["--bandwidth", "18446744073709551615", "tcp:h:1"]).unwrap_err();
        assert!(e.contains("too large"), "{e}");
    }

    #[test]
    fn other_commands_pass_through() {
        let a = Args::try_parse_from([
            "umem-ctl",
            "-s",
            "/s",
            "query-ram-digest",
            "exclude=[[0,4096]]",
        ])
        .unwrap();
        match a.command {
            Command::Other(w) => {
                assert_eq!(w[0], "query-ram-digest");
                assert_eq!(
                    Value::Object(parse_args(&w[1..]).unwrap()),
                    json!({"exclude": [[0, 4096]]})
                );
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn rates_come_from_successive_samples() {
        let mut r = Rates::default();
        let at = |bytes: u64, requested: u64| {
            json!({"stats": {"bytes_sent": bytes, "throughput_bps": 7},
                   "postcopy": {"pages_requested": requested, "faults": 0}})
        };
        r.sample(&at(0, 0));
        assert_eq!(r.bytes_per_s, 7.0, "the first sample takes umemd's figure");
        std::thread::sleep(Duration::from_millis(100));
        r.sample(&at(10 << 20, 50));
        assert!(
            r.bytes_per_s > 10.0 * 1048576.0 && r.bytes_per_s <= 100.0 * 1048576.0,
            "{}",
            r.bytes_per_s
        );
        assert!(
            r.faults_per_s > 50.0 && r.faults_per_s <= 500.0,
            "{}",
            r.faults_per_s
        );
    }
}
