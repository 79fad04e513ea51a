//! Progress of one migration over time: the source's byte counter sampled while it runs, and
//! the throughput those samples show.

use std::time::Duration;

/// The source's byte counter at one moment of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Since the migration started.
    pub at: Duration,
    /// Bytes the source had sent by then.
    pub bytes: u64,
}

/// The average throughput over one stretch of a migration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// Start, seconds since the migration started.
    pub from_s: f64,
    /// End, seconds since the migration started.
    pub to_s: f64,
    /// Megabytes (10^6 bytes) per second between the two.
    pub mbps: f64,
}

/// The samples of one run, in the order they were taken.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    samples: Vec<Sample>,
}

impl Progress {
    /// A record that starts with nothing sent at time zero.
    pub fn new() -> Progress {
        Progress {
            samples: vec![Sample {
                at: Duration::ZERO,
                bytes: 0,
            }],
        }
    }

    /// Records one reading. A reading that is not newer than the last one kept (the same
    /// report read twice) is dropped, and so is one whose counter went backwards.
    pub fn record(&mut self, at: Duration, bytes: u64) {
        if let Some(last) = self.samples.last() {
            if at <= last.at || bytes < last.bytes {
                return;
            }
        }
        self.samples.push(Sample { at, bytes });
    }

    /// True when nothing was read beyond the start (a run that never got going).
    pub fn is_empty(&self) -> bool {
        self.samples.len() < 2
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The throughput between samples at least `window` apart (samples closer than that are
    /// merged into one stretch, so that a counter read every few milliseconds does not draw
    /// its own jitter); the last stretch may be shorter.
    pub fn throughput(&self, window: Duration) -> Vec<Interval> {
        let mut out = Vec::new();
        let Some(first) = self.samples.first() else {
            return out;
        };
        let mut start = *first;
        let n = self.samples.len();
        for (i, s) in self.samples.iter().enumerate().skip(1) {
            let last = i + 1 == n;
            if s.at - start.at < window && !last {
                continue;
            }
            let secs = (s.at - start.at).as_secs_f64();
            out.push(Interval {
                from_s: start.at.as_secs_f64(),
                to_s: s.at.as_secs_f64(),
                mbps: (s.bytes - start.bytes) as f64 / secs / 1e6,
            });
            start = *s;
        }
        out
    }
}

/// The points of a step line drawing `intervals`: flat over each stretch.
pub fn steps(intervals: &[Interval]) -> Vec<(f64, f64)> {
    intervals
        .iter()
        .flat_map(|i| [(i.from_s, i.mbps), (i.to_s, i.mbps)])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn throughput_is_bytes_over_time_between_samples_a_window_apart() {
        let mut p = Progress::new();
        // 10 MB in the first 100 ms, then 30 MB in the next 200 ms (read twice at 200 ms).
        p.record(ms(50), 4_000_000);
        p.record(ms(100), 10_000_000);
        p.record(ms(200), 25_000_000);
        p.record(ms(200), 25_000_000);
        p.record(ms(300), 40_000_000);
        let t = p.throughput(ms(100));
        assert_eq!(t.len(), 3, "{t:?}");
        assert_eq!((t[0].from_s, t[0].to_s), (0.0, 0.1));
        assert!((t[0].mbps - 100.0).abs() < 1e-9, "{t:?}");
        assert!((t[1].mbps - 150.0).abs() < 1e-9, "{t:?}");
        assert!((t[2].mbps - 150.0).abs() < 1e-9, "{t:?}");
        assert_eq!(t[2].to_s, 0.3);
    }

    #[test]
    fn the_last_stretch_is_kept_even_when_shorter_than_the_window() {
        let mut p = Progress::new();
        p.record(ms(200), 20_000_000);
        p.record(ms(250), 30_000_000);
        let t = p.throughput(ms(200));
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!((t[1].from_s, t[1].to_s), (0.2, 0.25));
        assert!((t[1].mbps - 200.0).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn stale_or_backwards_readings_are_dropped() {
        let mut p = Progress::new();
        p.record(ms(100), 5);
        p.record(ms(90), 6);
        p.record(ms(120), 4);
        p.record(ms(100), 5);
        assert_eq!(p.samples().len(), 2, "{:?}", p.samples());
        assert!(!p.is_empty());
        assert!(Progress::default().throughput(ms(1)).is_empty());
        assert!(Progress::new().throughput(ms(1)).is_empty());
        assert!(Progress::new().is_empty() && Progress::default().is_empty());
    }

    #[test]
    fn steps_are_flat_over_each_interval() {
        let i = [
            Interval {
                from_s: 0.0,
                to_s: 1.0,
                mbps: 5.0,
            },
            Interval {
                from_s: 1.0,
                to_s: 1.5,
                mbps: 7.0,
            },
        ];
        assert_eq!(
            steps(&i),
            vec![(0.0, 5.0), (1.0, 5.0), (1.0, 7.0), (1.5, 7.0)]
        );
    }
}
