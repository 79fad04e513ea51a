//! `umem-fuzz`: fuzzes umem's decoders and the destination's page placement for a bounded time.
//!
//! ```text
//! umem-fuzz [--seconds N] [--seed S] [--crashes DIR] [--target NAME]...
//! umem-fuzz --target NAME --replay FILE | --replay-hex FILE
//! ```
//!
//! Prints, per target, the inputs run and the distinct outcomes seen. On a panic or a broken
//! invariant it prints the input (shrunk) in hex, saves it under `--crashes` if given, and
//! exits 1.
#![warn(clippy::undocumented_unsafe_blocks)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use umem_fuzz::engine::{self, Failure, Options, Report, Target};
use umem_fuzz::targets;

#[derive(Debug, Parser)]
#[command(
    name = "umem-fuzz",
    about = "Fuzzes umem's decoders and the destination's page placement for a bounded time."
)]
struct Args {
    /// Seconds to run, over all targets in turn.
    #[arg(long, value_name = "N", default_value_t = 60)]
    seconds: u64,
    /// Seed of every random choice; by default one from the clock, printed to run it again.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Directory to save a failing input in.
    #[arg(long, value_name = "DIR")]
    crashes: Option<PathBuf>,
    /// Run only this target (repeatable): frame, peer, local, dest.
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,
    /// Run this input (a file saved under --crashes) once on the one --target, and report.
    #[arg(long, value_name = "FILE", conflicts_with = "replay_hex")]
    replay: Option<PathBuf>,
    /// As --replay, for a file holding the input in hex as a failure prints it.
    #[arg(long, value_name = "FILE")]
    replay_hex: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let names: Vec<String> = if args.targets.is_empty() {
        targets::NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        args.targets.clone()
    };
    let mut chosen: Vec<Box<dyn Target>> = Vec::new();
    for name in &names {
        match targets::by_name(name) {
            Ok(t) => chosen.push(t),
            Err(e) => {
                eprintln!("umem-fuzz: target {name}: {e}");
                return ExitCode::from(2);
            }
        }
    }

    if args.replay.is_some() || args.replay_hex.is_some() {
        let [target] = chosen.as_mut_slice() else {
            eprintln!("umem-fuzz: --replay needs exactly one --target");
            return ExitCode::from(2);
        };
        let input = match read_input(args.replay.as_deref(), args.replay_hex.as_deref()) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("umem-fuzz: {e}");
                return ExitCode::from(2);
            }
        };
        return replay(target.as_mut(), &input);
    }

    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let options = Options {
        duration: Duration::from_secs(args.seconds),
        seed,
        ..Options::default()
    };
    println!(
        "umem-fuzz: {} s over {}, seed {seed} (--seed {seed} draws the same inputs)",
        args.seconds,
        names.join(", ")
    );
    match engine::fuzz(&mut chosen, &options) {
        Ok(reports) => {
            print_reports(&reports);
            ExitCode::SUCCESS
        }
        Err(f) => {
            print_reports(&f.reports);
            report_failure(&f, args.crashes.as_deref());
            ExitCode::FAILURE
        }
    }
}

fn print_reports(reports: &[Report]) {
    println!(
        "{:<8} {:>12} {:>9} {:>8}",
        "target", "executions", "outcomes", "corpus"
    );
    for r in reports {
        println!(
            "{:<8} {:>12} {:>9} {:>8}",
            r.target, r.execs, r.outcomes, r.corpus
        );
    }
}

fn report_failure(f: &Failure, crashes: Option<&Path>) {
    println!("umem-fuzz: target {} FAILED: {}", f.target, f.message);
    println!(
        "input, {} bytes (shrunk from {}), in hex:\n{}",
        f.input.len(),
        f.original.len(),
        engine::hex(&f.input)
    );
    let Some(dir) = crashes else { return };
    let name = format!("{}-{:016x}", f.target, engine::signature(&f.input));
    let save = || -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.bin"));
        std::fs::write(&path, &f.input)?;
        std::fs::write(dir.join(format!("{name}-original.bin")), &f.original)?;
        Ok(path)
    };
    match save() {
        Ok(path) => println!(
            "saved as {} (as first run: {name}-original.bin beside it); run it again with\n  \
             cargo run --release -p umem-fuzz -- --target {} --replay {}",
            path.display(),
            f.target,
            path.display()
        ),
        Err(e) => eprintln!("umem-fuzz: saving the input under {}: {e}", dir.display()),
    }
}

fn read_input(raw: Option<&Path>, hex: Option<&Path>) -> Result<Vec<u8>, String> {
    match (raw, hex) {
        (Some(p), _) => std::fs::read(p).map_err(|e| format!("{}: {e}", p.display())),
        (None, Some(p)) => std::fs::read_to_string(p)
            .map_err(|e| e.to_string())
            .and_then(|t| engine::from_hex(&t))
            .map_err(|e| format!("{}: {e}", p.display())),
        (None, None) => Err("no input".into()),
    }
}

fn replay(target: &mut dyn Target, input: &[u8]) -> ExitCode {
    let mut outcomes = Vec::new();
    match engine::with_quiet_panics(|| engine::execute(target, input, &mut outcomes)) {
        Ok(()) => {
            println!(
                "umem-fuzz: target {}: {} bytes ran clean ({} outcomes)",
                target.name(),
                input.len(),
                outcomes.len()
            );
            ExitCode::SUCCESS
        }
        Err(message) => {
            println!("umem-fuzz: target {} FAILED: {message}", target.name());
            ExitCode::FAILURE
        }
    }
}
