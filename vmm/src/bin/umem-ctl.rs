//! `umem-ctl`: the command line for a VMM's control socket, for people and scripts.
//!
//! ```text
//! umem-ctl -s /run/umem/vm0.sock query-status
//! umem-ctl -s /run/umem/vm0.sock migrate uri=tcp:10.0.0.2:4444 mode=precopy
//! umem-ctl -s /run/umem/vm0.sock --json wait-migrate
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Map, Value};
use vmm::cli::umem_ctl::Args;

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
        writeln!(self.writer, "{req}").map_err(|e| format!("sending: {e}"))?;
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

fn parse_args(args: &[String]) -> Result<Value, String> {
    let mut m = Map::new();
    for a in args {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| format!("argument \"{a}\" is not key=value"))?;
        let val = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        m.insert(k.to_string(), val);
    }
    Ok(Value::Object(m))
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

fn run(a: Args) -> Result<i32, String> {
    let timeout = Duration::from_secs_f64(a.timeout);
    let mut c = Client::connect(&a.socket, timeout)?;
    let deadline = Instant::now() + timeout;
    match a.command.as_str() {
        "wait-migrate" => loop {
            let m = c.call("query-migrate", json!({}))?;
            let phase = m["phase"].as_str().unwrap_or("").to_string();
            if !a.json {
                eprintln!("{}", progress_line(&m));
            }
            if matches!(
                phase.as_str(),
                "completed" | "failed" | "cancelled" | "none"
            ) {
                if a.json {
                    println!("{m}");
                } else {
                    print_human(&m, "");
                }
                return Ok(if phase == "completed" { 0 } else { 1 });
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "migration still in phase {phase} after {:?}",
                    timeout
                ));
            }
            std::thread::sleep(Duration::from_millis(if a.json { 20 } else { 250 }));
        },
        "wait-status" => {
            let want = a.args.first().ok_or("wait-status needs a STATUS")?;
            loop {
                let s = c.call("query-status", json!({}))?;
                if s["status"].as_str() == Some(want.as_str()) {
                    return Ok(0);
                }
                if Instant::now() >= deadline {
                    return Err(format!("status is {} after {:?}", s["status"], timeout));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        cmd => {
            let r = c.call(cmd, parse_args(&a.args)?)?;
            if a.json {
                println!("{r}");
            } else {
                print_human(&r, "");
            }
            Ok(0)
        }
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
