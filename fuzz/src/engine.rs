//! The fuzzing loop: targets in rotation until the time is up, each with a corpus that starts
//! from encoded valid messages and grows with every input that shows an outcome not seen
//! before. A panic or a broken invariant stops the run with the (minimized) input.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arbitrary::Unstructured;
use fastrand::Rng;

use crate::mutate::{frame_starts, mutate};

/// Something to fuzz: a function of a byte stream with invariants of its own.
pub trait Target {
    /// Short name, as `--target` takes it.
    fn name(&self) -> &'static str;

    /// Inputs made by encoding valid messages, where mutation starts.
    fn seeds(&mut self, rng: &mut Rng) -> Vec<Vec<u8>>;

    /// A fresh structure-aware input built from `u`.
    fn generate(&mut self, u: &mut Unstructured) -> arbitrary::Result<Vec<u8>>;

    /// Runs one input. Each thing that happened (a frame decoded as kind K, refused for field
    /// F, ...) goes into `outcomes` as a [`signature`]; `Err` says which invariant broke.
    fn run(&mut self, input: &[u8], outcomes: &mut Vec<u64>) -> Result<(), String>;

    /// Largest input kept in the corpus or made by mutation.
    fn max_len(&self) -> usize {
        64 << 10
    }
}

/// A stable hash of an outcome's parts, the same in every run.
pub fn signature(parts: impl Hash) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// How long and how to fuzz.
#[derive(Debug, Clone)]
pub struct Options {
    /// Total time over all targets.
    pub duration: Duration,
    /// Seed of every random choice.
    pub seed: u64,
    /// Time a target runs before the next one's turn.
    pub slice: Duration,
    /// Each target stops after this many executions, if given (the run ends sooner then).
    pub max_execs: Option<u64>,
    /// Time allowed to shrink a failing input before it is reported.
    pub minimize_for: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            duration: Duration::from_secs(60),
            seed: 0,
            slice: Duration::from_millis(250),
            max_execs: None,
            minimize_for: Duration::from_secs(10),
        }
    }
}

/// What one target did in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The target's name.
    pub target: &'static str,
    /// Inputs run.
    pub execs: u64,
    /// Distinct outcome signatures seen.
    pub outcomes: usize,
    /// Inputs kept: the seeds and every input that showed a new outcome.
    pub corpus: usize,
}

/// A panic or a broken invariant, with the input that shows it.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The target's name.
    pub target: &'static str,
    /// The panic message, or the invariant that broke.
    pub message: String,
    /// The smallest input found that still fails the same way.
    pub input: Vec<u8>,
    /// The input as the fuzzer first ran it.
    pub original: Vec<u8>,
    /// Reports of every target up to the failure.
    pub reports: Vec<Report>,
}

/// Most inputs kept per target; past it a new one replaces a random old one.
const MAX_CORPUS: usize = 4096;

struct State {
    corpus: Vec<Vec<u8>>,
    seen: HashSet<u64>,
    execs: u64,
}

/// The message of the last panic, which the hook keeps instead of printing it.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Runs `input` through `target`, turning a panic into an error.
pub fn execute(
    target: &mut dyn Target,
    input: &[u8],
    outcomes: &mut Vec<u64>,
) -> Result<(), String> {
    outcomes.clear();
    match panic::catch_unwind(AssertUnwindSafe(|| target.run(input, outcomes))) {
        Ok(r) => r,
        Err(payload) => {
            let message = LAST_PANIC
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Err(format!("panicked: {message}"))
        }
    }
}

/// Keeps panic messages for [`execute`] instead of printing them while `f` runs; the hook that
/// was there before is put back afterwards.
pub fn with_quiet_panics<T>(f: impl FnOnce() -> T) -> T {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(|info| {
        let mut text = info.to_string();
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            text.push_str(&format!("\n{backtrace}"));
        }
        *LAST_PANIC.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
    }));
    let out = f();
    panic::set_hook(previous);
    out
}

/// Fuzzes `targets` in rotation as `options` say.
pub fn fuzz(targets: &mut [Box<dyn Target>], options: &Options) -> Result<Vec<Report>, Failure> {
    with_quiet_panics(|| fuzz_loop(targets, options))
}

fn fuzz_loop(targets: &mut [Box<dyn Target>], options: &Options) -> Result<Vec<Report>, Failure> {
    let start = Instant::now();
    let deadline = start + options.duration;
    let mut rng = Rng::with_seed(options.seed);
    let mut outcomes = Vec::new();
    let names: Vec<&'static str> = targets.iter().map(|t| t.name()).collect();
    let mut states = Vec::with_capacity(targets.len());
    for t in targets.iter_mut() {
        let mut state = State {
            corpus: Vec::new(),
            seen: HashSet::new(),
            execs: 0,
        };
        for seed in t.seeds(&mut rng) {
            state.execs += 1;
            if let Err(message) = execute(t.as_mut(), &seed, &mut outcomes) {
                return Err(failure(t.as_mut(), message, seed, options, &names, &states));
            }
            state.seen.extend(outcomes.iter().copied());
            state.corpus.push(seed);
        }
        states.push(state);
    }
    let done = |s: &State| options.max_execs.is_some_and(|m| s.execs >= m);
    while Instant::now() < deadline && !states.iter().all(done) {
        for (i, t) in targets.iter_mut().enumerate() {
            let slice_end = (Instant::now() + options.slice).min(deadline);
            while !done(&states[i]) {
                let input = next_input(&mut rng, t.as_mut(), &states[i]);
                states[i].execs += 1;
                if let Err(message) = execute(t.as_mut(), &input, &mut outcomes) {
                    return Err(failure(
                        t.as_mut(),
                        message,
                        input,
                        options,
                        &names,
                        &states,
                    ));
                }
                let s = &mut states[i];
                let mut new = false;
                for o in &outcomes {
                    new |= s.seen.insert(*o);
                }
                if new && input.len() <= t.max_len() {
                    if s.corpus.len() < MAX_CORPUS {
                        s.corpus.push(input);
                    } else {
                        let at = rng.usize(..s.corpus.len());
                        s.corpus[at] = input;
                    }
                }
                // A clock read costs little next to a target, but need not come every time.
                if s.execs.is_multiple_of(8) && Instant::now() >= slice_end {
                    break;
                }
            }
        }
    }
    Ok(reports(&names, &states))
}

/// One new input: mostly a mutation of a kept one, sometimes a freshly generated one.
fn next_input(rng: &mut Rng, target: &mut dyn Target, state: &State) -> Vec<u8> {
    if state.corpus.is_empty() || rng.u8(..4) == 0 {
        let len = rng.usize(..=4096);
        let raw: Vec<u8> = std::iter::repeat_with(|| rng.u8(..)).take(len).collect();
        match target.generate(&mut Unstructured::new(&raw)) {
            Ok(input) => input,
            // Random bytes are an input too.
            Err(_) => raw,
        }
    } else {
        let a = &state.corpus[rng.usize(..state.corpus.len())];
        let b = &state.corpus[rng.usize(..state.corpus.len())];
        mutate(rng, a, b, target.max_len())
    }
}

fn reports(names: &[&'static str], states: &[State]) -> Vec<Report> {
    names
        .iter()
        .zip(states)
        .map(|(&target, s)| Report {
            target,
            execs: s.execs,
            outcomes: s.seen.len(),
            corpus: s.corpus.len(),
        })
        .collect()
}

fn failure(
    target: &mut dyn Target,
    message: String,
    input: Vec<u8>,
    options: &Options,
    names: &[&'static str],
    states: &[State],
) -> Failure {
    let small = minimize(target, &input, &message, options.minimize_for);
    Failure {
        target: target.name(),
        message,
        input: small,
        original: input,
        reports: reports(names, states),
    }
}

/// The class of a failure, which a smaller input must keep: panics are alike, and a broken
/// invariant is named by its message up to the first colon.
fn class(message: &str) -> &str {
    message.split(':').next().unwrap_or(message)
}

/// Shrinks `input` while it fails in the same class as `message`: whole frames first, then
/// chunks of bytes of halving size, for at most `budget`.
pub fn minimize(target: &mut dyn Target, input: &[u8], message: &str, budget: Duration) -> Vec<u8> {
    let deadline = Instant::now() + budget;
    let mut outcomes = Vec::new();
    let mut fails = |candidate: &[u8]| {
        matches!(execute(target, candidate, &mut outcomes),
            Err(m) if class(&m) == class(message))
    };
    let mut best = input.to_vec();
    // Whole frames, last first so that earlier offsets stay valid.
    let starts = frame_starts(&best);
    for (i, &at) in starts.iter().enumerate().rev() {
        if Instant::now() >= deadline {
            return best;
        }
        let end = starts.get(i + 1).copied().unwrap_or(best.len());
        let mut candidate = best.clone();
        candidate.drain(at..end);
        if fails(&candidate) {
            best = candidate;
        }
    }
    let mut chunk = best.len() / 2;
    while chunk >= 1 {
        let mut at = 0;
        while at < best.len() {
            if Instant::now() >= deadline {
                return best;
            }
            let end = (at + chunk).min(best.len());
            let mut candidate = best.clone();
            candidate.drain(at..end);
            if fails(&candidate) {
                best = candidate;
            } else {
                at += chunk;
            }
        }
        chunk /= 2;
    }
    best
}

/// `bytes` in lowercase hex, 32 bytes a line.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2 + bytes.len() / 32 + 1);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 && i.is_multiple_of(32) {
            s.push('\n');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Reads what [`hex`] wrote (whitespace ignored).
pub fn from_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return Err("an odd number of hex digits".into());
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("not hex: {:?}", String::from_utf8_lossy(pair)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails on any input holding the byte 0xee, panics on 0xdd.
    struct Picky;

    impl Target for Picky {
        fn name(&self) -> &'static str {
            "picky"
        }
        fn seeds(&mut self, _: &mut Rng) -> Vec<Vec<u8>> {
            vec![vec![1, 2, 3]]
        }
        fn generate(&mut self, u: &mut Unstructured) -> arbitrary::Result<Vec<u8>> {
            u.arbitrary()
        }
        fn run(&mut self, input: &[u8], outcomes: &mut Vec<u64>) -> Result<(), String> {
            outcomes.push(signature(input.len().min(4)));
            if input.contains(&0xdd) {
                panic!("0xdd seen");
            }
            if input.contains(&0xee) {
                return Err(format!(
                    "0xee: at {:?}",
                    input.iter().position(|&b| b == 0xee)
                ));
            }
            Ok(())
        }
    }

    #[test]
    fn failures_are_found_and_minimized() {
        let mut targets: Vec<Box<dyn Target>> = vec![Box::new(Picky)];
        let options = Options {
            duration: Duration::from_secs(20),
            seed: 1,
            ..Options::default()
        };
        let f = fuzz(&mut targets, &options).unwrap_err();
        assert_eq!(f.target, "picky");
        assert_eq!(f.input.len(), 1, "{f:?}");
        if f.input == [0xdd] {
            assert!(f.message.contains("0xdd seen"), "{}", f.message);
        } else {
            assert_eq!(f.input, [0xee]);
        }
    }

    #[test]
    fn hex_round_trips() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&hex(&bytes)).unwrap(), bytes);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
    }
}
