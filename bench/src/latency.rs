//! Fault-service latency histograms from the result rows: umemd's `latency_hist` (bucket `i`
//! counts faults served in `[2^i, 2^(i+1))` microseconds), and QEMU's `postcopy-latency-dist`
//! (the same buckets) where QEMU has one. QEMU 7.2 has none: it reports only how long the vCPUs
//! were blocked in all, which becomes a note under the chart rather than a made-up histogram.

use serde_json::Value;

/// The faults of one scenario, by latency bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub name: String,
    /// Faults in bucket `i`: `[2^i, 2^(i+1))` us (bucket 0 also holds 0).
    pub counts: Vec<u64>,
}

impl Histogram {
    pub fn faults(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Bucket `i`'s share of all faults, percent.
    pub fn percent(&self, i: usize) -> f64 {
        match (self.counts.get(i), self.faults()) {
            (Some(&c), total) if total > 0 => c as f64 * 100.0 / total as f64,
            _ => 0.0,
        }
    }
}

/// The lower bound of bucket `i`, readable: `1us`, `512us`, `1.0ms`, `33ms`, `1.1s`.
pub fn bucket_label(i: usize) -> String {
    let us = 1u64 << i.min(63);
    match us {
        0..1_000 => format!("{us}us"),
        1_000..10_000 => format!("{:.1}ms", us as f64 / 1e3),
        10_000..1_000_000 => format!("{}ms", us / 1_000),
        _ => format!("{:.1}s", us as f64 / 1e6),
    }
}

/// The buckets from the first to the last that holds a fault in any histogram; `None` when
/// none holds any.
pub fn shown_buckets(hists: &[Histogram]) -> Option<(usize, usize)> {
    let used = |i: &usize| {
        hists
            .iter()
            .any(|h| h.counts.get(*i).is_some_and(|&c| c > 0))
    };
    let len = hists.iter().map(|h| h.counts.len()).max()?;
    let first = (0..len).find(used)?;
    let last = (0..len).rev().find(used)?;
    Some((first, last))
}

fn counts(v: &Value) -> Option<Vec<u64>> {
    v.as_array()?.iter().map(Value::as_u64).collect()
}

/// What the rows say about fault latencies: a histogram for every row that has faults and a
/// latency distribution, and a note for every row of QEMU with faults but no distribution.
pub fn from_rows(rows: &[Value]) -> (Vec<Histogram>, Vec<String>) {
    let mut hists = Vec::new();
    let mut notes = Vec::new();
    for r in rows {
        let name = r["scenario"].as_str().unwrap_or_default().to_string();
        if r.get("skipped").is_some() || r.get("error").is_some() {
            continue;
        }
        if let Some(c) = counts(&r["fault_latency_hist"]).filter(|c| c.iter().any(|&n| n > 0)) {
            hists.push(Histogram { name, counts: c });
        } else if r["engine"] == "qemu" && r["faults"].as_u64().is_some_and(|n| n > 0) {
            notes.push(format!(
                "{name}: QEMU gives no per-fault latencies, only block times: postcopy-blocktime {} ms, vCPU blocktime {} ms, {} page requests",
                r["postcopy_blocktime_ms"], r["vcpu_blocked_ms"], r["faults"]
            ));
        }
    }
    (hists, notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bucket_labels_are_the_lower_bounds() {
        assert_eq!(bucket_label(0), "1us");
        assert_eq!(bucket_label(9), "512us");
        assert_eq!(bucket_label(10), "1.0ms");
        assert_eq!(bucket_label(15), "32ms");
        assert_eq!(bucket_label(20), "1.0s");
    }

    #[test]
    fn histograms_come_from_rows_with_faults_and_qemu_postcopy_gets_a_note() {
        let mut hist = vec![0u64; 24];
        hist[3] = 6;
        hist[7] = 2;
        let rows = [
            json!({"scenario": "postcopy-a", "engine": "umem", "switchover": "postcopy",
                   "fault_latency_hist": hist}),
            // Postcopy without a fault: nothing to draw.
            json!({"scenario": "postcopy-idle", "engine": "umem", "switchover": "postcopy",
                   "fault_latency_hist": vec![0u64; 24]}),
            json!({"scenario": "precopy-a", "engine": "umem", "switchover": "precopy",
                   "fault_latency_hist": null}),
            json!({"scenario": "qemu-postcopy-a", "engine": "qemu", "switchover": "postcopy",
                   "faults": 40, "postcopy_blocktime_ms": 12, "vcpu_blocked_ms": [12]}),
            json!({"scenario": "qemu-postcopy-b", "engine": "qemu", "skipped": "no qemu"}),
            // Postcopy without a page request: nothing to say.
            json!({"scenario": "qemu-postcopy-idle", "engine": "qemu", "switchover": "postcopy",
                   "faults": 0, "postcopy_blocktime_ms": 0, "vcpu_blocked_ms": [0]}),
        ];
        let (h, notes) = from_rows(&rows);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h[0].name, "postcopy-a");
        assert_eq!(h[0].faults(), 8);
        assert_eq!(h[0].percent(3), 75.0);
        assert_eq!(h[0].percent(7), 25.0);
        assert_eq!(h[0].percent(99), 0.0);
        assert_eq!(shown_buckets(&h), Some((3, 7)));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].starts_with("qemu-postcopy-a: QEMU gives no per-fault latencies"));
        assert!(notes[0].contains("postcopy-blocktime 12 ms, vCPU blocktime [12] ms, 40 page"));
    }

    #[test]
    fn the_shown_range_spans_every_histogram() {
        let h = |name: &str, at: usize| {
            let mut counts = vec![0; 24];
            counts[at] = 1;
            Histogram {
                name: name.into(),
                counts,
            }
        };
        assert_eq!(shown_buckets(&[h("a", 12), h("b", 4)]), Some((4, 12)));
        assert_eq!(
            shown_buckets(&[Histogram {
                name: "none".into(),
                counts: vec![0; 24]
            }]),
            None
        );
        assert_eq!(shown_buckets(&[]), None);
    }
}
