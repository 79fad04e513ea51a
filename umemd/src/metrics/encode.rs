//! The Prometheus text exposition format, version 0.0.4: `# HELP` and `# TYPE` once per metric
//! family, then its samples, label values and help text escaped as the format says.

use std::fmt::Write;

/// The `Content-Type` of a text exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The type of a metric family, as `# TYPE` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (restarts at 0 with a new series).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative `_bucket{le=...}` samples, `_sum` and `_count`.
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample's value: exact integers stay integers; floats follow the format's spelling of
/// infinities and NaN.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A count.
    Int(u64),
    /// A measure, such as seconds.
    Float(f64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) if v == f64::INFINITY => f.write_str("+Inf"),
            Value::Float(v) if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            Value::Float(v) if v.is_nan() => f.write_str("NaN"),
            // Rust prints the shortest decimal that reads back as the same f64, without an
            // exponent: what Go's ParseFloat (Prometheus) reads.
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

/// A label: name (one of ours, never escaped) and value (escaped).
pub type Label<'a> = (&'static str, &'a str);

/// A histogram's state: per bucket, its upper bound and how many observations fell in it (not
/// yet cumulative); the last bucket takes everything above the others and is written
/// `le="+Inf"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram<'a> {
    /// Upper bounds of all buckets but the last.
    pub bounds: &'a [f64],
    /// Observations per bucket, one more than `bounds`.
    pub counts: &'a [u64],
    /// Sum of all observations.
    pub sum: f64,
}

/// Builds one exposition.
#[derive(Debug, Default)]
pub struct Encoder {
    out: String,
}

impl Encoder {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts family `name`: its `# HELP` and `# TYPE` lines. Its samples follow, and no
    /// other family's in between.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.name());
    }

    /// One sample of a counter or gauge.
    pub fn sample(&mut self, name: &str, labels: &[Label<'_>], value: Value) {
        self.line(name, "", labels, None, value);
    }

    /// The samples of one histogram series: `_bucket` per bound and `+Inf`, cumulative, then
    /// `_sum` and `_count` (which equals the `+Inf` bucket).
    pub fn histogram(&mut self, name: &str, labels: &[Label<'_>], h: &Histogram<'_>) {
        let mut cumulative = 0u64;
        for (i, n) in h.counts.iter().enumerate() {
            cumulative = cumulative.saturating_add(*n);
            let le = match h.bounds.get(i) {
                Some(b) => Value::Float(*b).to_string(),
                None => "+Inf".to_string(),
            };
            self.line(name, "_bucket", labels, Some(&le), Value::Int(cumulative));
        }
        if h.counts.len() <= h.bounds.len() {
            // No overflow bucket given: every observation is still under +Inf.
            self.line(
                name,
                "_bucket",
                labels,
                Some("+Inf"),
                Value::Int(cumulative),
            );
        }
        self.line(name, "_sum", labels, None, Value::Float(h.sum));
        self.line(name, "_count", labels, None, Value::Int(cumulative));
    }

    fn line(
        &mut self,
        name: &str,
        suffix: &str,
        labels: &[Label<'_>],
        le: Option<&str>,
        value: Value,
    ) {
        self.out.push_str(name);
        self.out.push_str(suffix);
        let all = labels.iter().copied().chain(le.map(|v| ("le", v)));
        for (i, (k, v)) in all.enumerate() {
            self.out.push(if i == 0 { '{' } else { ',' });
            let _ = write!(self.out, "{k}=\"{}\"", escape_label_value(v));
        }
        if !labels.is_empty() || le.is_some() {
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// The exposition.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value as the format writes it between quotes: `\`, `"` and line feed escaped.
pub fn escape_label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Help text as the format writes it: `\` and line feed escaped (quotes are fine there).
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_has_help_and_type_then_its_samples() {
        let mut e = Encoder::new();
        e.family("umemd_x_total", "Things.", Kind::Counter);
        e.sample("umemd_x_total", &[("role", "source")], Value::Int(3));
        e.sample("umemd_x_total", &[], Value::Int(4));
        assert_eq!(
            e.finish(),
            "# HELP umemd_x_total Things.\n# TYPE umemd_x_total counter\n\
             umemd_x_total{role=\"source\"} 3\numemd_x_total 4\n"
        );
    }

    #[test]
    fn label_values_escape_backslash_quote_and_newline() {
        assert_eq!(escape_label_value(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label_value("two\nlines"), "two\\nlines");
        // Anything else, UTF-8 included, goes as it is.
        assert_eq!(escape_label_value("vm-ü {x}"), "vm-ü {x}");
        let mut e = Encoder::new();
        e.sample("m", &[("vm", "a\"}\n# TYPE evil counter")], Value::Int(1));
        let out = e.finish();
        assert_eq!(out, "m{vm=\"a\\\"}\\n# TYPE evil counter\"} 1\n");
        assert_eq!(out.lines().count(), 1, "a label value cannot add a line");
    }

    #[test]
    fn help_escapes_backslash_and_newline_only() {
        let mut e = Encoder::new();
        e.family("m", "a \"quoted\" \\ and\nmore", Kind::Gauge);
        assert_eq!(
            e.finish(),
            "# HELP m a \"quoted\" \\\\ and\\nmore\n# TYPE m gauge\n"
        );
    }

    #[test]
    fn values_use_the_formats_spelling() {
        assert_eq!(Value::Int(u64::MAX).to_string(), "18446744073709551615");
        assert_eq!(Value::Float(0.000002).to_string(), "0.000002");
        assert_eq!(Value::Float(8.388608).to_string(), "8.388608");
        assert_eq!(Value::Float(1.5).to_string(), "1.5");
        assert_eq!(Value::Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Value::Float(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(Value::Float(f64::NAN).to_string(), "NaN");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_is_the_inf_bucket() {
        let mut e = Encoder::new();
        let h = Histogram {
            bounds: &[0.5, 1.0],
            counts: &[2, 0, 3],
            sum: 7.25,
        };
        e.histogram("h_seconds", &[("role", "destination")], &h);
        assert_eq!(
            e.finish(),
            "h_seconds_bucket{role=\"destination\",le=\"0.5\"} 2\n\
             h_seconds_bucket{role=\"destination\",le=\"1\"} 2\n\
             h_seconds_bucket{role=\"destination\",le=\"+Inf\"} 5\n\
             h_seconds_sum{role=\"destination\"} 7.25\n\
             h_seconds_count{role=\"destination\"} 5\n"
        );
    }

    #[test]
    fn a_histogram_without_an_overflow_bucket_still_ends_at_inf() {
        let mut e = Encoder::new();
        let h = Histogram {
            bounds: &[1.0],
            counts: &[4],
            sum: 2.0,
        };
        e.histogram("h", &[], &h);
        assert_eq!(
            e.finish(),
            "h_bucket{le=\"1\"} 4\nh_bucket{le=\"+Inf\"} 4\nh_sum 2\nh_count 4\n"
        );
    }
}
