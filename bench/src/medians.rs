//! `--runs N`: the selection run N times in a row, each scenario's rows folded into one row of
//! medians with the spread beside it. Scenarios run in the order of the list in every round, so
//! a umem scenario and its QEMU twin alternate, and neither gets all the machine's good (or bad)
//! minutes.

use serde_json::{Map, Value};

/// The figures printed as `min-max` in the spread table, with their column headings.
pub const SPREAD: &[(&str, &str)] = &[
    ("throughput_gbps", "GB/s"),
    ("total_ms", "total ms"),
    ("downtime_ms", "down ms"),
    ("fault_p50_us", "p50 us"),
    ("fault_p99_us", "p99 us"),
    ("vcpu_blocked_ms", "vCPU blocked ms"),
];

/// The median of `v` (the mean of the middle two for an even count); `None` when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// One row per scenario, in the order of their first run, each field the median of its runs:
/// numbers, and arrays of numbers element by element (`cpu_ms_per_gib`, `stage_*_us`). Other
/// fields come from the first run. `runs` counts the rows folded; a scenario whose every run
/// was skipped or failed keeps its first row.
pub fn fold(rows: &[Value]) -> Vec<Value> {
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        let n = r["scenario"].as_str().unwrap_or_default();
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let all: Vec<&Value> = rows.iter().filter(|r| r["scenario"] == name).collect();
            let ok: Vec<&Value> = all
                .iter()
                .copied()
                .filter(|r| r.get("skipped").is_none() && r.get("error").is_none())
                .collect();
            let Some(first) = ok.first() else {
                return all[0].clone();
            };
            let mut out = Map::new();
            if let Some(fields) = first.as_object() {
                // Which run a row came from means nothing once folded.
                for (k, v) in fields.iter().filter(|(k, _)| *k != "run") {
                    let values: Vec<&Value> = ok.iter().map(|r| &r[k]).collect();
                    out.insert(k.clone(), fold_field(v, &values));
                }
            }
            out.insert("runs".into(), Value::from(ok.len()));
            Value::Object(out)
        })
        .collect()
}

/// The median of one field over the runs, or the first run's value where it is not a number.
fn fold_field(first: &Value, values: &[&Value]) -> Value {
    match first {
        Value::Number(n) => {
            let xs: Vec<f64> = values.iter().filter_map(|v| v.as_f64()).collect();
            match median(&xs) {
                Some(m) if n.is_f64() => Value::from(m),
                // Counts stay whole numbers, as in a single run's row.
                Some(m) => Value::from(m.round() as u64),
                None => first.clone(),
            }
        }
        Value::Array(a) if a.iter().all(Value::is_number) => {
            let elems = (0..a.len()).map(|i| {
                let column: Vec<&Value> = values.iter().map(|v| &v[i]).collect();
                fold_field(&a[i], &column)
            });
            Value::Array(elems.collect())
        }
        _ => first.clone(),
    }
}

/// The smallest and largest value of a figure over a scenario's runs, as `min-max`; a figure
/// that is a list (`vcpu_blocked_ms`, one per vCPU) counts by its first element.
pub fn spread(rows: &[Value], name: &str, key: &str) -> String {
    let xs: Vec<f64> = rows
        .iter()
        .filter(|r| r["scenario"] == name)
        .filter_map(|r| match &r[key] {
            Value::Array(a) => a.first().and_then(Value::as_f64),
            v => v.as_f64(),
        })
        .collect();
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if xs.is_empty() {
        "-".into()
    } else if hi < 10.0 {
        format!("{lo:.2}-{hi:.2}")
    } else {
        format!("{lo:.0}-{hi:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_median_of_an_odd_count_is_the_middle_one_and_of_an_even_count_the_mean_of_two() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn each_scenarios_runs_fold_into_one_row_of_medians_in_the_order_they_first_ran() {
        let rows = [
            json!({"scenario": "b", "engine": "umem", "throughput_gbps": 0.5, "faults": 10, "run": 1,
                   "cpu_ms_per_gib": [300, 900], "vcpu_blocked_ms": [20.0]}),
            json!({"scenario": "a", "engine": "qemu", "throughput_gbps": 1.0}),
            json!({"scenario": "b", "engine": "umem", "throughput_gbps": 0.9, "faults": 13,
                   "cpu_ms_per_gib": [100, 1100], "vcpu_blocked_ms": [40.0]}),
            json!({"scenario": "b", "engine": "umem", "throughput_gbps": 0.7, "faults": 11,
                   "cpu_ms_per_gib": [200, 1000], "vcpu_blocked_ms": [30.0]}),
            json!({"scenario": "a", "engine": "qemu", "throughput_gbps": 3.0}),
        ];
        let folded = fold(&rows);
        assert_eq!(folded.len(), 2);
        let b = &folded[0];
        assert_eq!(b["scenario"], "b");
        assert_eq!(b["engine"], "umem");
        assert_eq!(b["runs"], 3);
        assert_eq!(b["throughput_gbps"], json!(0.7));
        assert_eq!(b["faults"], json!(11));
        assert_eq!(b["cpu_ms_per_gib"], json!([200, 1000]));
        assert_eq!(b["vcpu_blocked_ms"], json!([30.0]));
        assert!(b.get("run").is_none());
        let a = &folded[1];
        assert_eq!(
            (a["runs"].clone(), a["throughput_gbps"].clone()),
            (json!(2), json!(2.0))
        );
    }

    #[test]
    fn runs_that_were_skipped_or_failed_are_left_out_of_the_medians() {
        let rows = [
            json!({"scenario": "q", "engine": "qemu", "skipped": "no qemu"}),
            json!({"scenario": "u", "engine": "umem", "error": "boom"}),
            json!({"scenario": "u", "engine": "umem", "total_ms": 400.0}),
        ];
        let folded = fold(&rows);
        assert_eq!(folded[0]["skipped"], "no qemu");
        assert!(folded[0].get("runs").is_none());
        assert_eq!(folded[1]["runs"], 1);
        assert_eq!(folded[1]["total_ms"], json!(400.0));
        assert!(folded[1].get("error").is_none());
    }

    #[test]
    fn the_spread_is_the_lowest_and_highest_run() {
        let rows = [
            json!({"scenario": "s", "fault_p99_us": 430, "throughput_gbps": 0.81, "vcpu_blocked_ms": [194.2]}),
            json!({"scenario": "s", "fault_p99_us": 701, "throughput_gbps": 0.74, "vcpu_blocked_ms": [266.0]}),
            json!({"scenario": "t", "fault_p99_us": 5}),
        ];
        assert_eq!(spread(&rows, "s", "fault_p99_us"), "430-701");
        assert_eq!(spread(&rows, "s", "throughput_gbps"), "0.74-0.81");
        assert_eq!(spread(&rows, "s", "vcpu_blocked_ms"), "194-266");
        assert_eq!(spread(&rows, "s", "downtime_ms"), "-");
    }
}
