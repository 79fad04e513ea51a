//! umemd's Prometheus endpoint (`--metrics`): scraped on both hosts during a postcopy
//! migration and after it, and pressed by hostile HTTP clients while scrapes go on.
//!
//! Run with `cargo test --release --test metrics -- --test-threads=1` (see `testkit/src/lib.rs`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use umem_testkit::pair::{assert_completed, MigrationSetup, Pair};
use umem_testkit::{binary, require_kvm, secs, try_wait_until, wait_until, Proc, TestEnv};

/// The exposition format the endpoint must announce.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A memtouch guest small enough that a postcopy of it ends within seconds.
const SMALL_MEMTOUCH: &str = "pages=1024 pause=1000";

/// One HTTP reply: status code, headers (names in lower case) and body.
#[derive(Debug)]
struct Reply {
    code: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// Sends `request` as it is and reads the reply until the server closes the connection.
fn exchange(addr: SocketAddr, request: &[u8]) -> Result<Reply, String> {
    let mut c = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    c.set_read_timeout(Some(secs(20)))
        .and_then(|_| c.set_write_timeout(Some(secs(20))))
        .map_err(|e| e.to_string())?;
    c.write_all(request).map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Result<Reply, String> {
    let text = String::from_utf8(raw.to_vec()).map_err(|e| format!("reply not UTF-8: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let code = status
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    Ok(Reply {
        code,
        headers,
        body: body.to_string(),
    })
}

/// `GET /metrics`: checks the status, content type and length, and parses the exposition.
fn scrape(addr: SocketAddr) -> Exposition {
    let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: umemd\r\n\r\n")
        .unwrap_or_else(|e| panic!("scraping {addr}: {e}"));
    assert_eq!(r.code, 200, "scrape of {addr}: {r:?}");
    assert_eq!(
        r.headers.get("content-type").map(String::as_str),
        Some(CONTENT_TYPE),
        "{r:?}"
    );
    assert_eq!(
        r.headers.get("content-length"),
        Some(&r.body.len().to_string()),
        "{r:?}"
    );
    Exposition::parse(&r.body)
}

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed text exposition, checked against the format as it is parsed: every sample of a
/// family that `# HELP` and `# TYPE` announced once, before it.
#[derive(Debug)]
struct Exposition {
    text: String,
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut types = BTreeMap::new();
        let mut helped = std::collections::BTreeSet::new();
        let mut samples = Vec::new();
        let mut family = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or_default().to_string();
                assert!(helped.insert(name), "HELP twice: {line}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(helped.contains(name), "TYPE before HELP: {line}");
                assert!(
                    ["counter", "gauge", "histogram"].contains(&kind),
                    "unknown type: {line}"
                );
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "TYPE twice: {line}"
                );
                family = name.to_string();
            } else {
                assert!(!line.starts_with('#'), "unexpected comment {line:?}");
                let s = parse_sample(line);
                let suffixed = ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|sfx| s.name.strip_suffix(sfx) == Some(family.as_str()));
                assert!(
                    s.name == family || (types[&family] == "histogram" && suffixed),
                    "sample {line:?} outside its family {family}"
                );
                samples.push(s);
            }
        }
        Exposition {
            text: text.into(),
            types,
            samples,
        }
    }

    /// The samples named `name` whose labels include `labels`.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The value of the one sample named `name` with `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.find(name, labels);
        assert_eq!(
            found.len(),
            1,
            "expected one {name} {labels:?}, found {found:?} in\n{}",
            self.text
        );
        found[0].value
    }

    /// The `session` label of the one session of `role` for VM `vm`.
    fn session(&self, vm: &str, role: &str) -> String {
        let found = self.find("umemd_session_bytes_total", &[("vm", vm), ("role", role)]);
        assert_eq!(found.len(), 1, "sessions of {vm} as {role}:\n{}", self.text);
        found[0].labels["session"].clone()
    }

    /// Every sample of a counter or histogram family: those must never go down.
    fn monotonic(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(|s| {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|sfx| s.name.strip_suffix(sfx))
                .filter(|f| self.types.get(*f).is_some_and(|t| t == "histogram"))
                .unwrap_or(&s.name);
            matches!(
                self.types.get(family).map(String::as_str),
                Some("counter" | "histogram")
            )
        })
    }
}

/// `name{k="v",...} value`, label values unescaped.
fn parse_sample(line: &str) -> Sample {
    let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
    let value = match value {
        "+Inf" => f64::INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|e| panic!("value of {line:?}: {e}")),
    };
    let Some((name, rest)) = series.split_once('{') else {
        return Sample {
            name: series.into(),
            labels: BTreeMap::new(),
            value,
        };
    };
    let mut labels = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "label {key} of {line:?}");
        let mut v = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => v.push('\n'),
                    Some(c @ ('\\' | '"')) => v.push(c),
                    other => panic!("bad escape {other:?} in {line:?}"),
                },
                Some('"') => break,
                Some(c) => v.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        }
        assert!(labels.insert(key, v).is_none(), "label twice in {line:?}");
        match chars.next() {
            Some(',') => continue,
            Some('}') if chars.peek().is_none() => break,
            other => panic!("{other:?} after a label in {line:?}"),
        }
    }
    Sample {
        name: name.into(),
        labels,
        value,
    }
}

/// Asserts that every counter and histogram sample of `before` is in `after` and not lower.
fn assert_monotonic(who: &str, before: &Exposition, after: &Exposition) {
    let mut checked = 0;
    for s in before.monotonic() {
        let labels: Vec<(&str, &str)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let now = after.value(&s.name, &labels);
        assert!(
            now >= s.value,
            "{who}: {} {labels:?} went down from {} to {now}",
            s.name,
            s.value
        );
        checked += 1;
    }
    assert!(checked > 10, "{who}: only {checked} counters compared");
}

/// The buckets of one histogram series by `le`, in order: checks that they are cumulative,
/// end at `+Inf`, and that `_count` is the `+Inf` bucket; returns them.
fn assert_histogram(e: &Exposition, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = e
        .find(&format!("{name}_bucket"), labels)
        .iter()
        .map(|s| {
            let le = &s.labels["le"];
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or_else(|err| panic!("le {le:?}: {err}"))
            };
            (bound, s.value)
        })
        .collect();
    assert!(buckets.len() > 2, "{name} {labels:?}: {buckets:?}");
    let in_order = buckets.windows(2).all(|w| w[0].0 < w[1].0);
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(in_order, "{name}: buckets not in order of le");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "{name} {labels:?}: buckets not cumulative: {buckets:?}"
    );
    let inf = buckets.last().expect("buckets");
    assert_eq!(inf.0, f64::INFINITY, "{name}: no +Inf bucket");
    assert_eq!(
        e.value(&format!("{name}_count"), labels),
        inf.1,
        "{name}: _count is not the +Inf bucket"
    );
    let sum = e.value(&format!("{name}_sum"), labels);
    assert!(sum >= 0.0, "{name}_sum {sum}");
    buckets
}

/// A numeric field of `v` at `path` (`stats.bytes_sent`).
fn num(v: &Value, path: &str) -> f64 {
    path.split('.')
        .fold(v, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("{path} missing in {v}")) as f64
}

/// A memtouch pair whose umemds serve metrics.
fn pair_with_metrics(t: &TestEnv) -> Pair {
    let setup = MigrationSetup::memtouch(t, "32M", SMALL_MEMTOUCH).prefilled();
    let src_umemd = t.umemd_builder("umemd-src").metrics().start();
    let dst_umemd = t.umemd_builder("umemd-dst").metrics().start();
    let src = setup.source(&src_umemd);
    let dst = setup.destination("dst", &dst_umemd);
    Pair {
        src,
        dst,
        src_umemd,
        dst_umemd,
    }
}

#[test]
fn metrics_scraped_during_and_after_a_postcopy_migration() {
    if !require_kvm("metrics_scraped_during_and_after_a_postcopy_migration") {
        return;
    }
    let t = TestEnv::new("metrics-postcopy");
    let mut pair = pair_with_metrics(&t);
    let (sa, da) = (pair.src_umemd.metrics_addr(), pair.dst_umemd.metrics_addr());

    // Before any migration: the daemon's own families, no session.
    let idle = scrape(sa);
    assert_eq!(idle.find("umemd_build_info", &[]).len(), 1, "{}", idle.text);
    assert_eq!(
        idle.value("umemd_sessions_open", &[("role", "source")]),
        0.0
    );
    assert!(idle.find("umemd_session_bytes_total", &[]).is_empty());

    // A postcopy that moves only requested pages: it stays in postcopy while the guest runs
    // on the destination, so scrapes surely see it under way.
    let _ = pair.dst.listen_uri();
    pair.src.wait_pass(secs(60), 2);
    pair.start_migration(json!({"mode": "postcopy", "no_background": true}));
    pair.dst.wait_phase(secs(120), &["postcopy"]);
    let src_last = wait_until(secs(60), "source to stop", || {
        (pair.src.status() == "postmigrate").then(|| pair.src.last_pass_number())
    });
    pair.dst.wait_pass(secs(120), src_last + 1);

    // A client that sends nothing holds a connection meanwhile: scrapes go on.
    let silent = TcpStream::connect(da).expect("connect");
    let garbage = exchange(da, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n")
        .expect("a reply to garbage");
    assert_eq!(garbage.code, 400, "{garbage:?}");

    // Progress is published a few times a second: wait for served faults to show (a fault
    // counts when it is read, its latency once its page is placed).
    let during = wait_until(
        secs(60),
        "served faults in the destination's metrics",
        || {
            let e = scrape(da);
            let s = e.session("dst", "destination");
            let l = [("session", s.as_str())];
            (e.value("umemd_session_fault_latency_seconds_count", &l) > 0.0).then_some(e)
        },
    );
    let dst_session = during.session("dst", "destination");
    let dl = vec![
        ("session", dst_session.as_str()),
        ("vm", "dst"),
        ("role", "destination"),
    ];
    let with = |extra: (&'static str, &'static str)| -> Vec<(&str, &str)> {
        let mut l = dl.clone();
        l.push(extra);
        l
    };
    assert_eq!(
        during.value("umemd_session_phase", &with(("phase", "postcopy"))),
        1.0,
        "{}",
        during.text
    );
    for p in ["setup", "precopy", "completed", "failed", "postcopy-paused"] {
        assert_eq!(
            during.value("umemd_session_phase", &with(("phase", p))),
            0.0
        );
    }
    assert!(during.value("umemd_session_remaining_pages", &dl) > 0.0);
    assert!(during.value("umemd_session_pages_requested_total", &dl) > 0.0);
    assert_eq!(
        during.value("umemd_session_guest_pages", &dl),
        (32u64 << 20) as f64 / 4096.0
    );
    assert!(
        during.value(
            "umemd_session_vcpu_blocked_seconds_total",
            &with(("vcpu", "0"))
        ) >= 0.0
    );
    assert_eq!(during.value("umemd_session_recoveries_total", &dl), 0.0);
    assert_eq!(
        during.value("umemd_sessions_open", &[("role", "destination")]),
        1.0
    );
    let buckets = assert_histogram(&during, "umemd_session_fault_latency_seconds", &dl);
    assert!(
        buckets.last().unwrap().1 <= during.value("umemd_session_faults_total", &dl),
        "more latencies than faults: {buckets:?}"
    );
    let src_during = scrape(sa);
    let src_session = src_during.session("src", "source");
    let sl = [
        ("session", src_session.as_str()),
        ("vm", "src"),
        ("role", "source"),
    ];
    let src_phase = |e: &Exposition, p| {
        let mut l = sl.to_vec();
        l.push(("phase", p));
        e.value("umemd_session_phase", &l)
    };
    assert_eq!(
        src_phase(&src_during, "postcopy"),
        1.0,
        "{}",
        src_during.text
    );
    assert!(src_during.value("umemd_session_bytes_total", &sl) > 0.0);
    assert!(
        src_during
            .find("umemd_session_fault_latency_seconds_bucket", &[])
            .is_empty(),
        "a source has no fault latencies"
    );

    // The guest runs on and faults more: nothing that counts goes down.
    pair.dst.wait_pass(secs(120), src_last + 2);
    let later = scrape(da);
    assert_monotonic("destination", &during, &later);
    assert_monotonic("source", &src_during, &scrape(sa));
    drop(silent);

    // The rest of the pages, in the background too, and the end.
    pair.src
        .ctl("migrate-set-parameters", json!({"no_background": false}))
        .expect("migrate-set-parameters");
    let o = pair.src.wait_migration(secs(180));
    assert_completed("source", &o);
    let dv = pair
        .dst
        .wait_phase(secs(120), &["completed", "failed", "cancelled"]);
    assert_eq!(dv["phase"], "completed", "{dv}");

    // After: both sessions show how they ended, with the figures query-migrate gives.
    let (src_after, dst_after) = wait_until(secs(30), "both sessions to end", || {
        let (s, d) = (scrape(sa), scrape(da));
        (s.value("umemd_sessions_open", &[("role", "source")]) == 0.0
            && d.value("umemd_sessions_open", &[("role", "destination")]) == 0.0)
            .then_some((s, d))
    });
    assert_monotonic("destination", &later, &dst_after);
    assert_monotonic("source", &src_during, &src_after);
    assert_eq!(
        src_phase(&src_after, "completed"),
        1.0,
        "{}",
        src_after.text
    );
    assert_eq!(
        dst_after.value("umemd_session_phase", &with(("phase", "completed"))),
        1.0
    );
    for (who, e, l, q) in [
        ("source", &src_after, sl.to_vec(), &o.raw),
        ("destination", &dst_after, dl.clone(), &dv),
    ] {
        for (metric, field) in [
            ("umemd_session_bytes_total", "stats.bytes_sent"),
            ("umemd_session_pages_total", "stats.pages_sent"),
            ("umemd_session_zero_pages_total", "stats.zero_pages"),
            ("umemd_session_guest_pages", "stats.total_pages"),
            ("umemd_session_recoveries_total", "postcopy.recoveries"),
            (
                "umemd_session_pages_requested_total",
                "postcopy.pages_requested",
            ),
        ] {
            assert_eq!(
                e.value(metric, &l),
                num(q, field),
                "{who}: {metric} differs from query-migrate's {field}: {q}\n{}",
                e.text
            );
        }
        assert_eq!(e.value("umemd_session_remaining_pages", &l), 0.0);
        assert_eq!(
            e.value("umemd_sessions_started_total", &[("role", who)]),
            1.0
        );
    }
    assert!(num(&o.raw, "stats.bytes_sent") > 0.0);
    assert_eq!(
        dst_after.value("umemd_session_faults_total", &dl),
        num(&dv, "postcopy.faults")
    );
    // The histogram is the one query-migrate shows, bucket by bucket.
    let hist: Vec<f64> = dv["postcopy"]["latency_hist"]
        .as_array()
        .unwrap_or_else(|| panic!("latency_hist in {dv}"))
        .iter()
        .map(|v| v.as_u64().expect("a count") as f64)
        .collect();
    let buckets = assert_histogram(&dst_after, "umemd_session_fault_latency_seconds", &dl);
    assert_eq!(buckets.len(), hist.len(), "{buckets:?} vs {hist:?}");
    let mut cumulative = 0.0;
    for (i, (bucket, n)) in buckets.iter().zip(&hist).enumerate() {
        cumulative += n;
        assert_eq!(bucket.1, cumulative, "bucket {i} (le {})", bucket.0);
    }
    // The stages of requested pages' waits, as query-migrate has them.
    for stage in ["request", "fetch", "place"] {
        for (i, quantile) in ["0.5", "0.99"].into_iter().enumerate() {
            let want = dv["postcopy"][format!("stage_{stage}_us")][i]
                .as_u64()
                .unwrap_or_else(|| panic!("stage_{stage}_us in {dv}"))
                as f64
                / 1e6;
            let shown = dst_after.value(
                "umemd_session_fault_stage_seconds",
                &[
                    dl[0],
                    dl[1],
                    dl[2],
                    ("stage", stage),
                    ("quantile", quantile),
                ],
            );
            assert!(
                (shown - want).abs() < 1e-6,
                "{stage} {quantile}: {shown} s, query-migrate {want} s"
            );
        }
    }
    let vcpu_blocked = dv["postcopy"]["vcpu_blocked_us"][0]
        .as_u64()
        .unwrap_or_else(|| panic!("vcpu_blocked_us in {dv}")) as f64
        / 1e6;
    let shown = dst_after.value(
        "umemd_session_vcpu_blocked_seconds_total",
        &with(("vcpu", "0")),
    );
    assert!(
        (shown - vcpu_blocked).abs() < 1e-6,
        "vCPU blocked {shown} s, query-migrate {vcpu_blocked} s"
    );
    assert!(
        dst_after.value("umemd_metrics_requests_total", &[("code", "400")]) >= 1.0,
        "{}",
        dst_after.text
    );
    assert!(pair.umemds_serving());
}

/// Sends `request`, expects a reply with `code`.
fn assert_reply(addr: SocketAddr, what: &str, request: &[u8], code: u16) {
    let r = exchange(addr, request).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(r.code, code, "{what}: {r:?}");
}

#[test]
fn hostile_http_clients_are_turned_away_while_scrapes_go_on() {
    let t = TestEnv::new("metrics-hostile");
    let mut u = t.umemd_builder("umemd").metrics().start();
    let addr = u.metrics_addr();

    assert_reply(addr, "garbage", b"\x00\x01\x02garbage\xff\r\n\r\n", 400);
    assert_reply(addr, "no version", b"GET /metrics\r\n\r\n", 400);
    assert_reply(addr, "another path", b"GET / HTTP/1.1\r\n\r\n", 404);
    assert_reply(addr, "POST", b"POST /metrics HTTP/1.1\r\n\r\n", 405);
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    // A head far over the cap: a 431, or the connection cut before the client is through.
    match exchange(addr, huge.as_bytes()) {
        Ok(r) => assert_eq!(r.code, 431, "{r:?}"),
        Err(e) => assert!(
            e.contains("reset") || e.contains("Broken pipe"),
            "huge header: {e}"
        ),
    }

    // A client that sends nothing, and one that trickles a byte at a time: each gets 408 at
    // the request deadline, while scrapes from another client are served at once.
    let t0 = Instant::now();
    let mut silent = TcpStream::connect(addr).expect("connect");
    silent.set_read_timeout(Some(secs(30))).unwrap();
    let trickler = std::thread::spawn(move || {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut got = Vec::new();
        for b in b"GET /metrics HTTP/1.1\r\nHost: slow".iter().cycle() {
            if c.write_all(&[*b]).is_err() {
                break;
            }
            let mut buf = [0u8; 1024];
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
            if t0.elapsed() > secs(30) {
                break;
            }
        }
        (got, t0.elapsed())
    });
    for _ in 0..3 {
        let s0 = Instant::now();
        let e = scrape(addr);
        assert!(
            s0.elapsed() < Duration::from_secs(2),
            "a scrape waited {:?} behind slow clients",
            s0.elapsed()
        );
        assert_eq!(e.find("umemd_build_info", &[]).len(), 1);
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut raw = Vec::new();
    silent
        .read_to_end(&mut raw)
        .expect("the silent client's connection ends");
    let waited = t0.elapsed();
    let r = parse_reply(&raw).expect("a reply to the silent client");
    assert_eq!(r.code, 408, "{r:?}");
    assert!(
        waited >= Duration::from_secs(1) && waited < secs(15),
        "the silent client was dropped after {waited:?}"
    );
    let (got, trickled) = trickler.join().expect("trickler");
    let r = parse_reply(&got).expect("a reply to the trickling client");
    assert_eq!(r.code, 408, "{r:?}");
    assert!(
        trickled < secs(15),
        "the trickling client kept going {trickled:?}"
    );

    // A flood of silent connections: the endpoint takes a bounded number and turns the
    // rest away at once; once they are gone, scrapes are served again.
    let mut flood = Vec::new();
    let turned_away = (0..64).find_map(|_| {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut raw = Vec::new();
        let got = c.read_to_end(&mut raw).is_ok() && !raw.is_empty();
        flood.push(c);
        got.then(|| parse_reply(&raw).expect("the reply to a connection over the cap"))
    });
    let r = turned_away.expect("64 silent connections were all taken");
    assert_eq!(r.code, 503, "{r:?}");
    let held = flood.len() - 1;
    drop(flood);
    let after = try_wait_until(secs(10), || {
        exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n")
            .ok()
            .filter(|r| r.code == 200)
    })
    .expect("scrapes served again once the flood is gone");
    let e = Exposition::parse(&after.body);
    eprintln!("the endpoint held {held} silent connections and turned the next away");
    for (code, at_least) in [
        ("400", 2.0),
        ("404", 1.0),
        ("405", 1.0),
        ("408", 2.0),
        ("503", 1.0),
    ] {
        let n = e.value("umemd_metrics_requests_total", &[("code", code)]);
        assert!(n >= at_least, "{code} replies: {n}\n{}", e.text);
    }
    assert!(u.is_serving(), "umemd stopped serving its socket");
    u.proc.assert_alive();
}

#[test]
fn a_metrics_address_that_cannot_be_bound_stops_start_up_with_a_reason() {
    let t = TestEnv::new("metrics-bind");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("local_addr");
    for (args, want) in [
        (vec![format!("{addr}")], format!("--metrics {addr}")),
        (vec!["localhost".to_string()], "--metrics".to_string()),
    ] {
        let mut cmd = Command::new(binary("umemd"));
        cmd.arg("--socket")
            .arg(t.dir().join("umemd.sock"))
            .arg("--metrics")
            .args(&args);
        let log = t.dir().join("umemd.log");
        let mut p = Proc::spawn("umemd", cmd, &log);
        let status = wait_until(secs(20), "umemd to give up", || p.exit_status());
        assert!(!status.success(), "umemd --metrics {args:?} started");
        let out = p.log();
        assert!(out.contains(&want), "{args:?}: {out}");
    }
}
