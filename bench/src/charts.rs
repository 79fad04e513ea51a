//! `--plot DIR`: SVG charts of a bench run, drawn with plotters' SVG backend (text stays
//! `<text>` elements, so no font is read): the fault-service latency histogram of the postcopy
//! scenarios, and the throughput over time of each scenario, umem and QEMU on the same axes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use plotters::prelude::*;

use crate::latency::{self, Histogram};
use crate::progress::{steps, Interval};
use crate::Run;

/// Throughput is averaged over stretches of at least this long.
pub const WINDOW: Duration = Duration::from_millis(100);

const WIDTH: u32 = 900;
const CHART_HEIGHT: u32 = 420;
const NOTE_LINE: u32 = 17;
/// Notes are wrapped at this many characters (the backend cannot measure text).
const NOTE_CHARS: usize = 130;
const FONT: &str = "sans-serif";
/// The y axis goes this far above the highest value, so that the legend clears the data.
const HEADROOM: f64 = 1.35;

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot create {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("drawing {}: {reason}", path.display())]
    Draw { path: PathBuf, reason: String },
}

/// One line of a throughput chart.
pub struct ThroughputSeries {
    pub name: String,
    pub intervals: Vec<Interval>,
}

/// Writes every chart of `runs` into `dir` (created if missing); returns the files written.
pub fn write_all(dir: &Path, runs: &[Run]) -> Result<Vec<PathBuf>, PlotError> {
    std::fs::create_dir_all(dir).map_err(|source| PlotError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();

    let rows: Vec<_> = runs.iter().map(|r| r.row.clone()).collect();
    let (hists, qemu_notes) = latency::from_rows(&rows);
    if !hists.is_empty() || !qemu_notes.is_empty() {
        let path = dir.join("fault-latency.svg");
        let mut notes = vec![
            "Bars: each scenario's share of its faults served in [2^i, 2^(i+1)) us (the destination umemd's latency histogram), the bucket's lower bound on the axis.".to_string(),
        ];
        notes.extend(qemu_notes);
        latency_svg(&path, &hists, &notes)?;
        written.push(path);
    }

    // One chart per umem scenario, with its QEMU namesake ("qemu-" + its name) if it ran.
    let mut groups: Vec<(&str, Vec<&Run>)> = Vec::new();
    for r in runs.iter().filter(|r| !r.progress.is_empty()) {
        let key = r.name().strip_prefix("qemu-").unwrap_or(r.name());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    for (key, group) in groups {
        let path = dir.join(format!("throughput-{key}.svg"));
        let series: Vec<_> = group
            .iter()
            .map(|r| ThroughputSeries {
                name: format!(
                    "{} ({})",
                    r.name(),
                    r.row["switchover"].as_str().unwrap_or("?")
                ),
                intervals: r.progress.throughput(WINDOW),
            })
            .collect();
        let notes = [format!(
            "MB/s (10^6 bytes) the source sent, averaged over at least {} ms. umem: the source umemd's bytes_sent and total_us, which it reports every 200 ms; QEMU: the source's ram.transferred, read every 5 ms.",
            WINDOW.as_millis()
        )];
        throughput_svg(&path, &format!("throughput: {key}"), &series, &notes)?;
        written.push(path);
    }
    Ok(written)
}

fn draw_err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> PlotError + '_ {
    move |e| PlotError::Draw {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Words of `notes`, wrapped to lines of at most [`NOTE_CHARS`].
fn wrap(notes: &[String]) -> Vec<String> {
    let mut lines = Vec::new();
    for n in notes {
        let mut line = String::new();
        for w in n.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + w.len() > NOTE_CHARS {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(w);
        }
        lines.push(line);
    }
    lines
}

/// The drawing area of a chart with `notes` written under it.
fn canvas<'a>(
    path: &'a Path,
    notes: &[String],
) -> Result<DrawingArea<SVGBackend<'a>, plotters::coord::Shift>, PlotError> {
    let lines = wrap(notes);
    let height = CHART_HEIGHT + NOTE_LINE * lines.len() as u32 + 12;
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    let err = draw_err(path);
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (_, under) = root.split_vertically(CHART_HEIGHT);
    for (i, l) in lines.iter().enumerate() {
        under
            .draw_text(
                l,
                &(FONT, 13).into_font().color(&BLACK),
                (12, 4 + NOTE_LINE as i32 * i as i32),
            )
            .map_err(|e| err(&e))?;
    }
    Ok(root)
}

fn colour(i: usize, name: &str) -> RGBColor {
    match (i, name.starts_with("qemu-")) {
        (_, true) => RGBColor(0xd6, 0x27, 0x28),
        (0, false) => RGBColor(0x1f, 0x77, 0xb4),
        _ => {
            let c = Palette99::pick(i + 2).rgb();
            RGBColor(c.0, c.1, c.2)
        }
    }
}

/// Throughput over time, one step line per series.
pub fn throughput_svg(
    path: &Path,
    title: &str,
    series: &[ThroughputSeries],
    notes: &[String],
) -> Result<(), PlotError> {
    let err = draw_err(path);
    let root = canvas(path, notes)?;
    let (top, _) = root.split_vertically(CHART_HEIGHT);
    let all = || series.iter().flat_map(|s| s.intervals.iter());
    let max_s = all().map(|i| i.to_s).fold(0.0, f64::max).max(1e-3);
    let max_mbps = all().map(|i| i.mbps).fold(0.0, f64::max).max(1.0);
    let mut chart = ChartBuilder::on(&top)
        .caption(title, (FONT, 22))
        .margin(12)
        .margin_right(36)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_s * 1.05, 0.0..max_mbps * HEADROOM)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since migrate")
        .y_desc("MB/s")
        .label_style((FONT, 15))
        // No minor grid: half the file's size for little to read.
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let c = colour(i, &s.name);
        chart
            .draw_series(LineSeries::new(steps(&s.intervals), c.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// Fault-service latency: for each histogram, the share of its faults in each bucket, the
/// histograms' bars side by side.
pub fn latency_svg(path: &Path, hists: &[Histogram], notes: &[String]) -> Result<(), PlotError> {
    let err = draw_err(path);
    let root = canvas(path, notes)?;
    let (top, _) = root.split_vertically(CHART_HEIGHT);
    let (first, last) = latency::shown_buckets(hists).unwrap_or((0, 10));
    let max_pct = (0..hists.len())
        .flat_map(|h| (first..=last).map(move |b| (h, b)))
        .map(|(h, b)| hists[h].percent(b))
        .fold(0.0, f64::max)
        .max(1.0);
    let mut chart = ChartBuilder::on(&top)
        .caption("postcopy fault-service latency", (FONT, 22))
        .margin(12)
        .margin_right(36)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(first as f64..(last + 1) as f64, 0.0..max_pct * HEADROOM)
        .map_err(|e| err(&e))?;
    let label = |x: &f64| {
        if x.fract() == 0.0 {
            latency::bucket_label(*x as usize)
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(last + 2 - first)
        .x_label_formatter(&label)
        .x_desc("fault-service latency (log2 buckets)")
        .y_desc("% of the scenario's faults")
        .label_style((FONT, 15))
        // No minor grid: half the file's size for little to read.
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(|e| err(&e))?;
    if hists.is_empty() {
        top.draw_text(
            "no scenario of this run recorded a fault latency",
            &(FONT, 15).into_font().color(&BLACK),
            (WIDTH as i32 / 3, CHART_HEIGHT as i32 / 2),
        )
        .map_err(|e| err(&e))?;
    }
    let width = 0.8 / hists.len().max(1) as f64;
    for (k, h) in hists.iter().enumerate() {
        let c = colour(k, &h.name);
        let bars = (first..=last).filter(|&b| h.percent(b) > 0.0).map(|b| {
            let x0 = b as f64 + 0.1 + k as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width, h.percent(b))], c.filled())
        });
        chart
            .draw_series(bars)
            .map_err(|e| err(&e))?
            .label(format!("{} ({} faults)", h.name, h.faults()))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    if !hists.is_empty() {
        chart
            .configure_series_labels()
            .label_font((FONT, 16))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Progress;
    use serde_json::json;

    /// A fresh directory under the system's temporary one, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let d = std::env::temp_dir().join(format!("umem-bench-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn progress(points: &[(u64, u64)]) -> Progress {
        let mut p = Progress::new();
        for &(ms, bytes) in points {
            p.record(Duration::from_millis(ms), bytes);
        }
        p
    }

    #[test]
    fn every_chart_is_written_with_its_series_and_notes() {
        let dir = TempDir::new("charts");
        let mut hist = vec![0u64; 24];
        hist[5] = 30;
        hist[9] = 10;
        let runs = [
            Run {
                row: json!({"scenario": "postcopy-x", "engine": "umem", "switchover": "postcopy",
                            "fault_latency_hist": hist}),
                progress: progress(&[(200, 100_000_000), (400, 300_000_000)]),
            },
            Run {
                row: json!({"scenario": "qemu-postcopy-x", "engine": "qemu",
                            "switchover": "postcopy", "faults": 7,
                            "postcopy_blocktime_ms": 3, "vcpu_blocked_ms": [3]}),
                progress: progress(&[(100, 10_000_000), (300, 90_000_000)]),
            },
            Run {
                row: json!({"scenario": "precopy-y", "engine": "umem", "switchover": "precopy"}),
                progress: progress(&[(150, 1_000_000)]),
            },
            Run {
                row: json!({"scenario": "qemu-precopy-z", "engine": "qemu", "skipped": "none"}),
                progress: Progress::default(),
            },
        ];
        let written = write_all(&dir.0, &runs).expect("charts");
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "fault-latency.svg",
                "throughput-postcopy-x.svg",
                "throughput-precopy-y.svg"
            ]
        );
        let read = |n: &str| std::fs::read_to_string(dir.0.join(n)).expect(n);
        let lat = read("fault-latency.svg");
        assert!(lat.starts_with("<svg"), "{lat}");
        assert!(lat.contains("postcopy-x (40 faults)"), "{lat}");
        assert!(
            lat.contains("qemu-postcopy-x: QEMU gives no per-fault latencies"),
            "{lat}"
        );
        // The axis runs from the first bucket used to the end of the last one.
        let text = |t: &str| format!(">\n{t}\n</text>");
        assert!(
            lat.contains(&text("32us")) && lat.contains(&text("1.0ms")),
            "{lat}"
        );
        assert!(
            !lat.contains(&text("16us")) && !lat.contains(&text("2.0ms")),
            "{lat}"
        );
        let tp = read("throughput-postcopy-x.svg");
        assert!(tp.contains("throughput: postcopy-x"), "{tp}");
        assert!(tp.contains("postcopy-x (postcopy)"), "{tp}");
        assert!(tp.contains("qemu-postcopy-x (postcopy)"), "{tp}");
        // Each series: its step line and its legend mark, umem in blue, QEMU in red.
        for c in ["#1F77B4", "#D62728"] {
            let line = format!(r#"<polyline fill="none" opacity="1" stroke="{c}""#);
            assert_eq!(tp.matches(&line).count(), 2, "{c}: {tp}");
        }
        let tp = read("throughput-precopy-y.svg");
        assert!(
            tp.contains("precopy-y (precopy)") && !tp.contains("qemu-"),
            "{tp}"
        );
    }

    #[test]
    fn a_missing_directory_is_created_and_an_unwritable_one_named() {
        let dir = TempDir::new("nested");
        let nested = dir.0.join("a/b");
        let runs = [Run {
            row: json!({"scenario": "precopy-y", "engine": "umem", "switchover": "precopy"}),
            progress: progress(&[(150, 1_000_000)]),
        }];
        assert_eq!(write_all(&nested, &runs).expect("charts").len(), 1);
        let file = dir.0.join("file");
        std::fs::write(&file, "").unwrap();
        let e = write_all(&file.join("x"), &runs).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot create {}", file.join("x").display())),
            "{e}"
        );
    }

    #[test]
    fn notes_are_wrapped_at_word_boundaries() {
        let long = "word ".repeat(60);
        let lines = wrap(&[long.clone(), "short".into()]);
        assert!(lines.len() >= 3, "{lines:?}");
        assert!(lines.iter().all(|l| l.len() <= NOTE_CHARS), "{lines:?}");
        assert_eq!(lines.last().unwrap(), "short");
        assert_eq!(lines[..lines.len() - 1].join(" "), long.trim_end());
    }
}
