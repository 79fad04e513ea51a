//! What the daemon tells Prometheus: per session its phase, what crossed, the destination's
//! fault latency histogram, the stages of its requested pages' waits and blocked time,
//! recoveries; daemon-wide the sessions open and the
//! clients and peers turned away.
//!
//! Sessions publish their figures at the moments they report them to their VMM (a few times a
//! second) into the [`Registry`]; a scrape copies them and writes the exposition
//! ([`encode`]) without ever waiting on a session. [`http`] serves it when `--metrics` asks.

pub mod encode;
pub mod http;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use proto::local::LocalMessage;
use proto::types::LATENCY_BUCKETS;
use proto::{MigrationStats, Phase, PostcopyStats};

use encode::{Encoder, Histogram, Kind, Value};

/// Finished sessions whose last figures stay on show, the oldest dropped first: a scrape
/// after a migration still sees how it ended, and memory stays bounded.
pub const MAX_FINISHED: usize = 16;
/// The `vm` label keeps this many characters of the name the VMM gave.
const MAX_VM_LABEL: usize = 128;

/// Which end of a migration a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends the VM's pages.
    Source,
    /// Receives them.
    Destination,
}

impl Role {
    /// The `role` label.
    pub fn label(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Destination => "destination",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Every phase, in the order of [`Phase`], and its `phase` label (as `query-migrate` spells
/// it).
const PHASES: [(Phase, &str); 9] = [
    (Phase::None, "none"),
    (Phase::Setup, "setup"),
    (Phase::Precopy, "precopy"),
    (Phase::Switchover, "switchover"),
    (Phase::Postcopy, "postcopy"),
    (Phase::Completed, "completed"),
    (Phase::Failed, "failed"),
    (Phase::Cancelled, "cancelled"),
    (Phase::PostcopyPaused, "postcopy-paused"),
];

/// The last figures of one session.
#[derive(Debug, Clone)]
struct SessionState {
    id: u64,
    vm: String,
    role: Role,
    stats: MigrationStats,
    postcopy: PostcopyStats,
    /// Fault-service latencies per bucket of [`LATENCY_BUCKETS`] and their sum, taken together.
    latency: [u64; LATENCY_BUCKETS],
    latency_sum_us: u64,
}

#[derive(Debug)]
struct Sessions {
    next_id: u64,
    live: BTreeMap<u64, Arc<Mutex<SessionState>>>,
    finished: VecDeque<SessionState>,
    started: [u64; 2],
}

/// The figures of every session of the daemon, and the daemon's own counters.
#[derive(Debug)]
pub struct Registry {
    sessions: Mutex<Sessions>,
    refused_clients: AtomicU64,
    rejected_peers: AtomicU64,
}

static REGISTRY: Registry = Registry::new();

/// The daemon's registry.
pub fn registry() -> &'static Registry {
    &REGISTRY
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// An empty registry.
    pub const fn new() -> Self {
        Registry {
            sessions: Mutex::new(Sessions {
                next_id: 1,
                live: BTreeMap::new(),
                finished: VecDeque::new(),
                started: [0; 2],
            }),
            refused_clients: AtomicU64::new(0),
            rejected_peers: AtomicU64::new(0),
        }
    }

    /// A new session of VM `vm` in `role`: on show from now on, numbered in the daemon
    /// (label `session`), until [`MAX_FINISHED`] later sessions have ended after it.
    pub fn open(&'static self, vm: &str, role: Role) -> SessionMetrics {
        let mut s = lock(&self.sessions);
        let id = s.next_id;
        s.next_id += 1;
        s.started[role.index()] += 1;
        let state = Arc::new(Mutex::new(SessionState {
            id,
            vm: vm.chars().take(MAX_VM_LABEL).collect(),
            role,
            stats: MigrationStats::default(),
            postcopy: PostcopyStats::default(),
            latency: [0; LATENCY_BUCKETS],
            latency_sum_us: 0,
        }));
        s.live.insert(id, state.clone());
        SessionMetrics {
            entry: Some((self, state)),
        }
    }

    /// A local client was answered `Failed` before any migration began.
    pub fn client_refused(&self) {
        self.refused_clients.fetch_add(1, Ordering::Relaxed);
    }

    fn close(&self, state: &Arc<Mutex<SessionState>>) {
        let mut s = lock(&self.sessions);
        let mut last = lock(state).clone();
        s.live.remove(&last.id);
        if last.stats.phase.is_active() || last.stats.phase == Phase::None {
            // The session ended without an outcome reported (it was refused at its start, or
            // its thread panicked): it did not complete.
            last.stats.phase = Phase::Failed;
        }
        s.finished.push_back(last);
        while s.finished.len() > MAX_FINISHED {
            s.finished.pop_front();
        }
    }

    /// Writes every family of the registry into `e`.
    pub fn render(&self, e: &mut Encoder) {
        let (sessions, open, started) = {
            let s = lock(&self.sessions);
            let mut all: Vec<SessionState> = s.finished.iter().cloned().collect();
            let mut open = [0u64; 2];
            for st in s.live.values() {
                let st = lock(st).clone();
                open[st.role.index()] += 1;
                all.push(st);
            }
            (all, open, s.started)
        };
        render_daemon(
            e,
            open,
            started,
            self.refused_clients.load(Ordering::Relaxed),
            self.rejected_peers.load(Ordering::Relaxed),
        );
        render_sessions(e, &sessions);
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

/// A session's way into the [`Registry`]: it publishes what it reports to its VMM, and moves
/// to the finished sessions when dropped. A detached one publishes nowhere.
#[derive(Debug, Default)]
pub struct SessionMetrics {
    entry: Option<(&'static Registry, Arc<Mutex<SessionState>>)>,
}

impl SessionMetrics {
    /// Publishes nowhere.
    pub fn detached() -> Self {
        Self::default()
    }

    /// Takes the figures of a report to the VMM: progress, postcopy progress, the outcome.
    pub fn observe(&self, msg: &LocalMessage) {
        let Some((registry, state)) = &self.entry else {
            return;
        };
        let mut st = lock(state);
        let stats = |st: &mut SessionState, s: &MigrationStats, phase: Option<Phase>| {
            let more = s.rejected_peers.saturating_sub(st.stats.rejected_peers);
            registry.rejected_peers.fetch_add(more, Ordering::Relaxed);
            st.stats = *s;
            if let Some(p) = phase {
                st.stats.phase = p;
            }
        };
        match msg {
            LocalMessage::Progress(s) => stats(&mut st, s, None),
            LocalMessage::Completed(s) => stats(&mut st, s, Some(Phase::Completed)),
            LocalMessage::Failed { stats: s, .. } => stats(&mut st, s, Some(Phase::Failed)),
            LocalMessage::PostcopyProgress(p) => st.postcopy = p.clone(),
            LocalMessage::PostcopyPaused { .. } => st.stats.phase = Phase::PostcopyPaused,
            _ => {}
        }
    }

    /// Takes the fault-service latency histogram (counts per bucket of [`LATENCY_BUCKETS`])
    /// and the sum of its latencies, read together.
    pub fn fault_latency(&self, hist: [u64; LATENCY_BUCKETS], sum_us: u64) {
        if let Some((_, state)) = &self.entry {
            let mut st = lock(state);
            st.latency = hist;
            st.latency_sum_us = sum_us;
        }
    }
}

impl Drop for SessionMetrics {
    fn drop(&mut self) {
        if let Some((registry, state)) = self.entry.take() {
            registry.close(&state);
        }
    }
}

/// Upper bounds of the latency buckets but the last, in seconds: bucket `i` holds
/// latencies below `2^(i+1)` microseconds (see [`LATENCY_BUCKETS`]).
fn latency_bounds() -> [f64; LATENCY_BUCKETS - 1] {
    std::array::from_fn(|i| (1u64 << (i + 1)) as f64 / 1e6)
}

fn us(v: u64) -> Value {
    Value::Float(v as f64 / 1e6)
}

fn render_daemon(e: &mut Encoder, open: [u64; 2], started: [u64; 2], refused: u64, rejected: u64) {
    e.family(
        "umemd_build_info",
        "The umemd that serves these metrics; always 1.",
        Kind::Gauge,
    );
    e.sample(
        "umemd_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        Value::Int(1),
    );
    let roles = [Role::Source, Role::Destination];
    e.family(
        "umemd_sessions_open",
        "Migration sessions under way.",
        Kind::Gauge,
    );
    for r in roles {
        e.sample(
            "umemd_sessions_open",
            &[("role", r.label())],
            Value::Int(open[r.index()]),
        );
    }
    e.family(
        "umemd_sessions_started_total",
        "Migration sessions begun since umemd started.",
        Kind::Counter,
    );
    for r in roles {
        e.sample(
            "umemd_sessions_started_total",
            &[("role", r.label())],
            Value::Int(started[r.index()]),
        );
    }
    e.family(
        "umemd_local_clients_refused_total",
        "Local clients answered Failed before any migration began (not allowed, over a cap, a malformed or late opening message, wrong descriptors or layout).",
        Kind::Counter,
    );
    e.sample(
        "umemd_local_clients_refused_total",
        &[],
        Value::Int(refused),
    );
    e.family(
        "umemd_rejected_peers_total",
        "Connections that destinations dropped before they proved to be their migration's source, all sessions together.",
        Kind::Counter,
    );
    e.sample("umemd_rejected_peers_total", &[], Value::Int(rejected));
}

/// One family with one sample per session that `value` gives one for.
fn per_session(
    e: &mut Encoder,
    sessions: &[SessionState],
    name: &str,
    help: &str,
    kind: Kind,
    value: impl Fn(&SessionState) -> Option<Value>,
) {
    e.family(name, help, kind);
    for s in sessions {
        if let Some(v) = value(s) {
            let id = s.id.to_string();
            e.sample(name, &labels(s, &id), v);
        }
    }
}

fn labels<'a>(s: &'a SessionState, id: &'a str) -> [encode::Label<'a>; 3] {
    [("session", id), ("vm", &s.vm), ("role", s.role.label())]
}

fn render_sessions(e: &mut Encoder, sessions: &[SessionState]) {
    let dest = |s: &SessionState| s.role == Role::Destination;
    let phase = "umemd_session_phase";
    e.family(
        phase,
        "1 for the phase the session is in (as query-migrate names it), 0 for the others.",
        Kind::Gauge,
    );
    for s in sessions {
        let id = s.id.to_string();
        let [a, b, c] = labels(s, &id);
        for (p, name) in PHASES {
            let v = Value::Int((s.stats.phase == p) as u64);
            e.sample(phase, &[a, b, c, ("phase", name)], v);
        }
    }
    per_session(
        e,
        sessions,
        "umemd_session_bytes_total",
        "Bytes of the migration streams: sent (source) or received (destination).",
        Kind::Counter,
        |s| Some(Value::Int(s.stats.bytes_sent)),
    );
    per_session(
        e,
        sessions,
        "umemd_session_pages_total",
        "Pages that crossed with their contents.",
        Kind::Counter,
        |s| Some(Value::Int(s.stats.pages_sent)),
    );
    per_session(
        e,
        sessions,
        "umemd_session_zero_pages_total",
        "Pages that crossed as a zero record.",
        Kind::Counter,
        |s| Some(Value::Int(s.stats.zero_pages)),
    );
    per_session(
        e,
        sessions,
        "umemd_session_remaining_pages",
        "Pages still to cross.",
        Kind::Gauge,
        |s| Some(Value::Int(s.stats.remaining_pages)),
    );
    per_session(
        e,
        sessions,
        "umemd_session_guest_pages",
        "Pages of the VM's RAM.",
        Kind::Gauge,
        |s| Some(Value::Int(s.stats.total_pages)),
    );
    per_session(
        e,
        sessions,
        "umemd_session_pages_requested_total",
        "Postcopy pages requested on demand: requests sent (destination) or served (source).",
        Kind::Counter,
        |s| Some(Value::Int(s.postcopy.pages_requested)),
    );
    per_session(
        e,
        sessions,
        "umemd_session_recoveries_total",
        "Times the postcopy migration resumed on a new connection after losing its link.",
        Kind::Counter,
        |s| Some(Value::Int(s.postcopy.recoveries)),
    );
    per_session(
        e,
        sessions,
        "umemd_session_faults_total",
        "Destination: page faults of the running VM read from its userfaultfd.",
        Kind::Counter,
        |s| dest(s).then_some(Value::Int(s.postcopy.faults)),
    );
    per_session(
        e,
        sessions,
        "umemd_session_vm_blocked_seconds_total",
        "Destination: time during which every vCPU waited for a page.",
        Kind::Counter,
        |s| dest(s).then(|| us(s.postcopy.vm_blocked_us)),
    );
    per_session(
        e,
        sessions,
        "umemd_session_rejected_peers_total",
        "Destination: connections dropped before they proved to be this migration's source.",
        Kind::Counter,
        |s| dest(s).then_some(Value::Int(s.stats.rejected_peers)),
    );
    let blocked = "umemd_session_vcpu_blocked_seconds_total";
    e.family(
        blocked,
        "Destination: time each vCPU waited for pages.",
        Kind::Counter,
    );
    for s in sessions.iter().filter(|s| dest(s)) {
        let id = s.id.to_string();
        let [a, b, c] = labels(s, &id);
        for (i, t) in s.postcopy.vcpu_blocked_us.iter().enumerate() {
            let vcpu = i.to_string();
            e.sample(blocked, &[a, b, c, ("vcpu", &vcpu)], us(*t));
        }
    }
    let stage = "umemd_session_fault_stage_seconds";
    e.family(
        stage,
        "Destination: where requested pages waited, by stage of their path (request: the fault read to the request sent; fetch: to the page read off the urgent channel; place: to the page placed), median and 99th percentile.",
        Kind::Gauge,
    );
    for s in sessions.iter().filter(|s| dest(s)) {
        let id = s.id.to_string();
        let [a, b, c] = labels(s, &id);
        let p = &s.postcopy;
        for (name, q) in [
            ("request", p.stage_request_us),
            ("fetch", p.stage_fetch_us),
            ("place", p.stage_place_us),
        ] {
            for (quantile, v) in [("0.5", q[0]), ("0.99", q[1])] {
                let l = [a, b, c, ("stage", name), ("quantile", quantile)];
                e.sample(stage, &l, us(v));
            }
        }
    }
    let latency = "umemd_session_fault_latency_seconds";
    e.family(
        latency,
        "Destination: time from a page fault to its page placed.",
        Kind::Histogram,
    );
    let bounds = latency_bounds();
    for s in sessions.iter().filter(|s| dest(s)) {
        let id = s.id.to_string();
        let h = Histogram {
            bounds: &bounds,
            counts: &s.latency,
            sum: s.latency_sum_us as f64 / 1e6,
        };
        e.histogram(latency, &labels(s, &id), &h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaked() -> &'static Registry {
        Box::leak(Box::new(Registry::new()))
    }

    fn render(r: &Registry) -> String {
        let mut e = Encoder::new();
        r.render(&mut e);
        e.finish()
    }

    /// The value of the sample whose name and labels are exactly `series`.
    fn value(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_owned)
    }

    #[test]
    fn phase_labels_are_those_of_query_migrate() {
        for (p, name) in PHASES {
            let json = format!("{:?}", p);
            assert!(!json.is_empty());
            assert_eq!(
                name,
                match p {
                    Phase::PostcopyPaused => "postcopy-paused".to_string(),
                    _ => json.to_lowercase(),
                }
            );
        }
        assert_eq!(PHASES.iter().filter(|(p, _)| p.is_active()).count(), 5);
    }

    #[test]
    fn a_session_shows_what_it_reported() {
        let r = leaked();
        let m = r.open("vm\"1", Role::Destination);
        let stats = MigrationStats {
            phase: Phase::Postcopy,
            bytes_sent: 4096 * 3,
            pages_sent: 3,
            total_pages: 10,
            remaining_pages: 7,
            rejected_peers: 2,
            ..Default::default()
        };
        m.observe(&LocalMessage::Progress(stats));
        m.observe(&LocalMessage::PostcopyProgress(PostcopyStats {
            faults: 5,
            vcpu_blocked_us: vec![1_500_000, 0],
            recoveries: 1,
            stage_fetch_us: [40, 900],
            ..Default::default()
        }));
        let mut hist = [0; LATENCY_BUCKETS];
        hist[0] = 1;
        hist[3] = 2;
        hist[LATENCY_BUCKETS - 1] = 1;
        m.fault_latency(hist, 20_000_000);
        let t = render(r);
        let l = r#"session="1",vm="vm\"1",role="destination""#;
        let v = |s: &str| value(&t, s).unwrap_or_else(|| panic!("no {s} in\n{t}"));
        assert_eq!(v(&format!("umemd_session_bytes_total{{{l}}}")), "12288");
        assert_eq!(
            v(&format!("umemd_session_phase{{{l},phase=\"postcopy\"}}")),
            "1"
        );
        assert_eq!(
            v(&format!("umemd_session_phase{{{l},phase=\"precopy\"}}")),
            "0"
        );
        assert_eq!(v(&format!("umemd_session_faults_total{{{l}}}")), "5");
        assert_eq!(
            v(&format!(
                "umemd_session_vcpu_blocked_seconds_total{{{l},vcpu=\"0\"}}"
            )),
            "1.5"
        );
        assert_eq!(v(&format!("umemd_session_recoveries_total{{{l}}}")), "1");
        assert_eq!(
            v(&format!(
                "umemd_session_fault_stage_seconds{{{l},stage=\"fetch\",quantile=\"0.99\"}}"
            )),
            "0.0009"
        );
        assert_eq!(
            v(&format!(
                "umemd_session_fault_latency_seconds_bucket{{{l},le=\"0.000002\"}}"
            )),
            "1"
        );
        assert_eq!(
            v(&format!(
                "umemd_session_fault_latency_seconds_bucket{{{l},le=\"0.000016\"}}"
            )),
            "3"
        );
        assert_eq!(
            v(&format!(
                "umemd_session_fault_latency_seconds_bucket{{{l},le=\"8.388608\"}}"
            )),
            "3"
        );
        assert_eq!(
            v(&format!(
                "umemd_session_fault_latency_seconds_bucket{{{l},le=\"+Inf\"}}"
            )),
            "4"
        );
        assert_eq!(
            v(&format!("umemd_session_fault_latency_seconds_count{{{l}}}")),
            "4"
        );
        assert_eq!(
            v(&format!("umemd_session_fault_latency_seconds_sum{{{l}}}")),
            "20"
        );
        assert_eq!(v("umemd_rejected_peers_total"), "2");
        assert_eq!(v(r#"umemd_sessions_open{role="destination"}"#), "1");
        // Counted once, however often the session reports the same figure.
        m.observe(&LocalMessage::Progress(stats));
        assert_eq!(
            value(&render(r), "umemd_rejected_peers_total").unwrap(),
            "2"
        );
    }

    #[test]
    fn a_source_has_no_destination_families() {
        let r = leaked();
        let _m = r.open("a", Role::Source);
        let t = render(r);
        assert!(t.contains(r#"umemd_session_bytes_total{session="1",vm="a",role="source"} 0"#));
        for f in [
            "umemd_session_faults_total{",
            "umemd_session_fault_latency_seconds_bucket{",
            "umemd_session_vm_blocked_seconds_total{",
        ] {
            assert!(!t.contains(f), "{f} for a source:\n{t}");
        }
        assert_eq!(
            value(&t, r#"umemd_sessions_open{role="source"}"#).unwrap(),
            "1"
        );
    }

    #[test]
    fn every_family_is_announced_once_before_its_samples() {
        let r = leaked();
        let _a = r.open("a", Role::Source);
        let _b = r.open("b", Role::Destination);
        let t = render(r);
        let mut announced = std::collections::HashSet::new();
        let mut current = String::new();
        for l in t.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(announced.insert(name.clone()), "{name} announced twice");
                current = name;
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(
                    name.starts_with(&current),
                    "{name} outside its family ({current})"
                );
            }
        }
        assert!(announced.len() > 15, "{t}");
    }

    #[test]
    fn an_ended_session_stays_on_show_with_its_outcome_and_finished_ones_are_bounded() {
        let r = leaked();
        let m = r.open("a", Role::Source);
        m.observe(&LocalMessage::Completed(MigrationStats {
            bytes_sent: 99,
            ..Default::default()
        }));
        drop(m);
        // Ended without an outcome: shown as failed.
        drop(r.open("b", Role::Destination));
        let t = render(r);
        assert_eq!(
            value(
                &t,
                r#"umemd_session_phase{session="1",vm="a",role="source",phase="completed"}"#
            )
            .unwrap(),
            "1"
        );
        assert_eq!(
            value(
                &t,
                r#"umemd_session_bytes_total{session="1",vm="a",role="source"}"#
            )
            .unwrap(),
            "99"
        );
        assert_eq!(
            value(
                &t,
                r#"umemd_session_phase{session="2",vm="b",role="destination",phase="failed"}"#
            )
            .unwrap(),
            "1"
        );
        assert_eq!(
            value(&t, r#"umemd_sessions_open{role="source"}"#).unwrap(),
            "0"
        );
        for _ in 0..MAX_FINISHED {
            drop(r.open("later", Role::Source));
        }
        let t = render(r);
        assert!(!t.contains(r#"session="1""#), "{t}");
        assert!(!t.contains(r#"session="2""#), "{t}");
        assert_eq!(
            value(&t, r#"umemd_sessions_started_total{role="source"}"#).unwrap(),
            (MAX_FINISHED + 1).to_string()
        );
    }

    #[test]
    fn a_long_vm_name_is_cut() {
        let r = leaked();
        let _m = r.open(&"x".repeat(10_000), Role::Source);
        let t = render(r);
        assert!(t.contains(&format!("vm=\"{}\"", "x".repeat(MAX_VM_LABEL))));
        assert!(!t.contains(&"x".repeat(MAX_VM_LABEL + 1)));
    }

    #[test]
    fn latency_bounds_are_the_buckets_powers_of_two() {
        let b = latency_bounds();
        assert_eq!(b[0], 0.000002);
        assert_eq!(b[LATENCY_BUCKETS - 2], 8.388608);
        assert!(b.windows(2).all(|w| w[1] == 2.0 * w[0]));
    }
}
