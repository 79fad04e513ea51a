//! Every target runs for a moment without finding anything: the harness itself works, and the
//! code under it holds at least against the first inputs of a fixed seed.

use std::time::Duration;

use umem_fuzz::engine::{self, Options};
use umem_fuzz::targets;

#[test]
fn every_target_runs_clean_for_a_moment() {
    for name in targets::NAMES {
        let mut chosen = vec![targets::by_name(name).unwrap()];
        let options = Options {
            duration: Duration::from_secs(2),
            seed: 0x5eed,
            max_execs: Some(20_000),
            ..Options::default()
        };
        match engine::fuzz(&mut chosen, &options) {
            Ok(reports) => {
                let r = &reports[0];
                println!("{name}: {} executions, {} outcomes", r.execs, r.outcomes);
                assert!(r.execs > 0 && r.outcomes > 0, "{r:?}");
            }
            Err(f) => panic!(
                "target {} failed: {}\ninput:\n{}",
                f.target,
                f.message,
                engine::hex(&f.input)
            ),
        }
    }
}
