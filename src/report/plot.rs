//! PNG line charts of a run's metrics (names: docs/metrics.md): one set of charts per run,
//! read from `metrics.jsonl` into `plots/`, and one chart comparing a metric across runs.
//! Text is drawn with an embedded DejaVu Sans through plotters' `ab_glyph` backend, so no
//! system font library (fontconfig, freetype) is needed.
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle, RGBColor};

/// Size of every chart, in pixels. Font sizes below are even: plotters' ab_glyph backend
/// truncates half the size when placing glyphs, which at odd sizes lifts "." a pixel.
const WIDTH: u32 = 800;
const HEIGHT: u32 = 500;

/// Family name the embedded font is registered under; every text style below names it.
const FONT_FAMILY: &str = "sans-serif";
static DEJAVU_SANS: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/fonts/DejaVuSans.ttf"
));

/// Series with at most this many points also get a dot per point, so sparse metrics
/// (held-out accuracy every few steps, a single step) stay visible.
const MAX_POINTS_WITH_MARKERS: usize = 60;

/// Line colours, in series order (the "tab10" palette, readable on white).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}, line {line}: {msg}", .path.display())]
    BadLine {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{}: drawing the chart failed: {msg}", .path.display())]
    Draw { path: PathBuf, msg: String },
    #[error("the embedded DejaVu Sans font could not be loaded")]
    Font,
    #[error("{}: no run has a finite value of metric `{metric}`", .path.display())]
    NoData { path: PathBuf, metric: String },
}

/// One labelled line: (x, y) points, typically (step, value).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart of `plot_run`: the file it is written to and the metrics drawn in it.
struct ChartSpec {
    file: &'static str,
    title: &'static str,
    y_label: &'static str,
    metrics: &'static [&'static str],
}

/// The per-run charts (`plots/*.png`); names are those of docs/metrics.md.
const RUN_CHARTS: [ChartSpec; 6] = [
    ChartSpec {
        file: "reward.png",
        title: "reward",
        y_label: "value",
        metrics: &["reward/mean", "acc/train"],
    },
    ChartSpec {
        file: "accuracy.png",
        title: "held-out accuracy",
        y_label: "accuracy",
        metrics: &["acc/eval"],
    },
    ChartSpec {
        file: "kl.png",
        title: "KL",
        y_label: "value",
        metrics: &["kl/k3", "loss/kl"],
    },
    ChartSpec {
        file: "clipfrac.png",
        title: "clipped and masked tokens",
        y_label: "fraction of tokens",
        metrics: &["loss/clipfrac", "loss/masked_frac"],
    },
    ChartSpec {
        file: "lengths.png",
        title: "response length",
        y_label: "tokens / fraction",
        metrics: &["len/mean", "len/truncated_frac"],
    },
    ChartSpec {
        file: "timings.png",
        title: "timings",
        y_label: "seconds",
        metrics: &["timing/generate_s", "timing/train_s"],
    },
];

/// One parsed line of metrics.jsonl, remembered with its 1-based line number for errors.
struct MetricsRow {
    line: usize,
    step: u64,
    phase: String,
    values: serde_json::Map<String, serde_json::Value>,
}

/// Registers the embedded font once per process; later calls only report the outcome.
impl From<PlotError> for crate::error::Error {
    fn from(e: PlotError) -> Self {
        crate::error::Error::Plot(Box::new(e))
    }
}

fn ensure_font() -> Result<(), PlotError> {
    static REGISTER: Once = Once::new();
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    REGISTER.call_once(|| {
        let ok = register_font(FONT_FAMILY, FontStyle::Normal, DEJAVU_SANS).is_ok();
        REGISTERED.store(ok, Ordering::Release);
    });
    if REGISTERED.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(PlotError::Font)
    }
}

/// Draws `series` as labelled lines with a legend into an 800×500 PNG at `path`.
/// Non-finite points are skipped; a flat or single-point series gets a padded range.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), PlotError> {
    ensure_font()?;
    let clean: Vec<Series> = series
        .iter()
        .map(|s| Series {
            label: s.label.clone(),
            points: finite_points(&s.points),
        })
        .collect();
    let draw_err = |msg: String| PlotError::Draw {
        path: path.to_path_buf(),
        msg,
    };
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    draw_chart(&root, title, x_label, y_label, &clean).map_err(draw_err)?;
    root.present().map_err(|e| draw_err(e.to_string()))
}

/// Draws the chart onto any backend (a file in `line_chart`, a buffer in the tests).
/// `series` must already be finite.
fn draw_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let all_points = || series.iter().flat_map(|s| s.points.iter());
    let (x_min, x_max) = padded_range(all_points().map(|p| p.0));
    let (y_min, y_max) = with_legend_room(padded_range(all_points().map(|p| p.1)));

    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT_FAMILY, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(x_min..x_max, y_min..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|x| x_tick_label(*x))
        .label_style((FONT_FAMILY, 14))
        .axis_desc_style((FONT_FAMILY, 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| e.to_string())?;

    for (i, s) in series.iter().enumerate() {
        // An empty series gets no legend entry; colours stay tied to position regardless.
        if s.points.is_empty() {
            continue;
        }
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(s.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        if s.points.len() <= MAX_POINTS_WITH_MARKERS {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT_FAMILY, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// x tick text: whole numbers (steps) without a decimal point, others with at most three
/// decimals, trailing zeros trimmed.
fn x_tick_label(x: f64) -> String {
    let text = format!("{x:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".to_string()
    } else {
        text.to_string()
    }
}

/// Keeps the points whose coordinates are both finite.
fn finite_points(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect()
}

/// Axis range covering `values` with a 5% margin. A flat range is widened by 10% of the
/// value (±1 around 0) so the line sits mid-chart; no values gives 0..1.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    if !span.is_finite() {
        // Extreme values whose difference overflows: draw them edge to edge.
        return (lo, hi);
    }
    if span == 0.0 {
        let pad = if lo == 0.0 { 1.0 } else { 0.1 * lo.abs() };
        return (lo - pad, hi + pad);
    }
    (lo - 0.05 * span, hi + 0.05 * span)
}

/// Raises the top of a y range by a fifth of its span, so the upper-left legend (about 50 px
/// of the ~400 px plot for two series) does not cover the highest values.
fn with_legend_room((lo, hi): (f64, f64)) -> (f64, f64) {
    let raised = hi + 0.2 * (hi - lo);
    if raised.is_finite() {
        (lo, raised)
    } else {
        (lo, hi)
    }
}

/// Writes the charts of `run_dir/metrics.jsonl` (its `rl` lines) into `run_dir/plots/` and
/// returns the files written; a chart none of whose metrics has a finite value is skipped.
pub fn plot_run(run_dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let metrics_path = run_dir.join("metrics.jsonl");
    let rows = read_rl_rows(&metrics_path)?;
    let plots_dir = run_dir.join("plots");
    let run_name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut written = Vec::new();
    for spec in &RUN_CHARTS {
        let series = spec
            .metrics
            .iter()
            .map(|m| {
                Ok(Series {
                    label: m.to_string(),
                    points: metric_points(&rows, m, &metrics_path)?,
                })
            })
            .collect::<Result<Vec<_>, PlotError>>()?;
        if series.iter().all(|s| s.points.is_empty()) {
            continue;
        }
        create_dir(&plots_dir)?;
        let out = plots_dir.join(spec.file);
        line_chart(
            &out,
            &chart_title(&run_name, spec.title),
            "step",
            spec.y_label,
            &series,
        )?;
        written.push(out);
    }
    Ok(written)
}

/// One chart of `metric` with one line per run, labelled by the run's name; `runs` pairs a
/// label with a run directory. Errors if no run has a finite value of the metric.
pub fn compare_runs(runs: &[(String, PathBuf)], metric: &str, out: &Path) -> Result<(), PlotError> {
    let series = runs
        .iter()
        .map(|(label, dir)| {
            Ok(Series {
                label: label.clone(),
                points: load_rl_metric(dir, metric)?,
            })
        })
        .collect::<Result<Vec<_>, PlotError>>()?;
    if series.iter().all(|s| s.points.is_empty()) {
        return Err(PlotError::NoData {
            path: out.to_path_buf(),
            metric: metric.to_string(),
        });
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir(parent)?;
    }
    line_chart(out, metric, "step", metric, &series)
}

/// The finite (step, value) points of `metric` on the `rl` lines of `run_dir/metrics.jsonl`,
/// in file order (for comparisons and means over seeds).
pub fn load_rl_metric(run_dir: &Path, metric: &str) -> Result<Vec<(f64, f64)>, PlotError> {
    let metrics_path = run_dir.join("metrics.jsonl");
    let rows = read_rl_rows(&metrics_path)?;
    metric_points(&rows, metric, &metrics_path)
}

fn chart_title(run_name: &str, what: &str) -> String {
    if run_name.is_empty() {
        what.to_string()
    } else {
        format!("{run_name}: {what}")
    }
}

fn create_dir(dir: &Path) -> Result<(), PlotError> {
    fs::create_dir_all(dir).map_err(|source| PlotError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Reads metrics.jsonl and keeps the lines of phase `rl`.
fn read_rl_rows(path: &Path) -> Result<Vec<MetricsRow>, PlotError> {
    let text = fs::read_to_string(path).map_err(|source| PlotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(row) = parse_metrics_line(line, i + 1).map_err(|msg| PlotError::BadLine {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        })? {
            if row.phase == "rl" {
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// Parses one line: blank → None; otherwise an object with integer `step` and string `phase`.
fn parse_metrics_line(line: &str, line_no: usize) -> Result<Option<MetricsRow>, String> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let serde_json::Value::Object(values) = value else {
        return Err(format!(
            "expected a JSON object, found {}",
            crate::error::json_kind(&value)
        ));
    };
    let step = match values.get("step") {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| format!("`step`: expected a non-negative integer, found {v}"))?,
        None => return Err("`step`: missing".to_string()),
    };
    let phase = match values.get("phase") {
        Some(serde_json::Value::String(p)) => p.clone(),
        Some(v) => return Err(format!("`phase`: expected a string, found {v}")),
        None => return Err("`phase`: missing".to_string()),
    };
    Ok(Some(MetricsRow {
        line: line_no,
        step,
        phase,
        values,
    }))
}

/// (step, value) of `metric` over `rows`; absent, null and non-finite values are left out,
/// any other non-number is an error naming the line.
fn metric_points(
    rows: &[MetricsRow],
    metric: &str,
    path: &Path,
) -> Result<Vec<(f64, f64)>, PlotError> {
    let mut points = Vec::new();
    for row in rows {
        match row.values.get(metric) {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Number(n)) => {
                if let Some(v) = n.as_f64().filter(|v| v.is_finite()) {
                    points.push((row.step as f64, v));
                }
            }
            Some(other) => {
                return Err(PlotError::BadLine {
                    path: path.to_path_buf(),
                    line: row.line,
                    msg: format!(
                        "`{metric}`: expected a number or null, found {}",
                        crate::error::json_kind(other)
                    ),
                })
            }
        }
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// A fresh directory under the system temp dir, unique per test and process.
    fn scratch_dir(name: &str) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("grove-plot-{name}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    }

    fn write_metrics(dir: &Path, text: &str) {
        fs::write(dir.join("metrics.jsonl"), text).expect("write metrics.jsonl");
    }

    /// Three rl steps with every charted metric (one null, one eval gap) plus warm-up lines.
    const FULL_METRICS: &str = r#"{"step": 0, "phase": "warmup", "loss/sft": 2.5, "acc/eval": 0.9}
{"step": 10, "phase": "warmup", "loss/sft": 1.5, "acc/eval": 0.95}
{"step": 0, "phase": "rl", "acc/eval": 0.2}
{"step": 1, "phase": "rl", "reward/mean": 0.25, "acc/train": 0.25, "kl/k3": 0.0, "loss/kl": 0.0, "loss/clipfrac": 0.0, "loss/masked_frac": 0.0, "len/mean": 12.0, "len/truncated_frac": 0.0, "timing/generate_s": 1.5, "timing/train_s": 0.5}

{"step": 2, "phase": "rl", "reward/mean": 0.5, "acc/train": null, "acc/eval": 0.5, "kl/k3": 0.01, "loss/kl": 0.001, "loss/clipfrac": 0.1, "loss/masked_frac": 0.05, "len/mean": 10.0, "len/truncated_frac": 0.25, "timing/generate_s": 1.25, "timing/train_s": 0.75}
{"step": 3, "phase": "rl", "reward/mean": 0.75, "acc/train": 0.75, "kl/k3": 0.02, "loss/kl": 0.002, "loss/clipfrac": 0.2, "loss/masked_frac": 0.0, "len/mean": 9.0, "len/truncated_frac": 0.0, "timing/generate_s": 1.0, "timing/train_s": 0.5}
"#;

    const PNG_MAGIC: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

    /// Asserts `path` is an 800×500 PNG of non-trivial size (a blank canvas compresses to
    /// a few hundred bytes; lines and text make it several kilobytes).
    fn assert_chart_png(path: &Path) {
        let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            bytes.len() > 5_000,
            "{}: only {} bytes",
            path.display(),
            bytes.len()
        );
        assert_eq!(bytes[..8], PNG_MAGIC, "{}: not a PNG", path.display());
        // IHDR follows the magic: 4-byte length, "IHDR", then big-endian width and height.
        assert_eq!(&bytes[12..16], b"IHDR");
        let width = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        let height = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        assert_eq!((width, height), (800, 500));
    }

    #[test]
    fn plot_run_writes_all_six_charts() {
        let dir = scratch_dir("full");
        write_metrics(&dir, FULL_METRICS);
        let written = plot_run(&dir).expect("plot_run");
        let names: Vec<String> = written
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "reward.png",
                "accuracy.png",
                "kl.png",
                "clipfrac.png",
                "lengths.png",
                "timings.png"
            ]
        );
        for path in &written {
            assert_eq!(path.parent(), Some(dir.join("plots").as_path()));
            assert_chart_png(path);
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn plot_run_skips_charts_without_data() {
        let dir = scratch_dir("partial");
        // Only reward/mean and a null timing: reward.png only; timings has no finite value.
        write_metrics(
            &dir,
            r#"{"step": 1, "phase": "rl", "reward/mean": 0.5, "timing/train_s": null}
{"step": 2, "phase": "rl", "reward/mean": 0.7}
"#,
        );
        let written = plot_run(&dir).expect("plot_run");
        assert_eq!(written, vec![dir.join("plots").join("reward.png")]);
        assert!(!dir.join("plots").join("timings.png").exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn plot_run_without_rl_lines_writes_nothing() {
        let dir = scratch_dir("warmup-only");
        write_metrics(
            &dir,
            "{\"step\": 0, \"phase\": \"warmup\", \"acc/eval\": 0.5}\n",
        );
        assert_eq!(plot_run(&dir).expect("plot_run"), Vec::<PathBuf>::new());
        assert!(!dir.join("plots").exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn load_rl_metric_keeps_rl_finite_values_only() {
        let dir = scratch_dir("load");
        write_metrics(&dir, FULL_METRICS);
        // acc/eval: warm-up 0.9 and 0.95 excluded; rl step 0 → 0.2, step 2 → 0.5; steps 1, 3 absent.
        assert_eq!(
            load_rl_metric(&dir, "acc/eval").expect("load"),
            vec![(0.0, 0.2), (2.0, 0.5)]
        );
        // acc/train: step 2 is null → left out.
        assert_eq!(
            load_rl_metric(&dir, "acc/train").expect("load"),
            vec![(1.0, 0.25), (3.0, 0.75)]
        );
        assert_eq!(load_rl_metric(&dir, "no/such").expect("load"), vec![]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn malformed_line_names_file_and_line() {
        let dir = scratch_dir("malformed");
        // Line 3 is cut short (a crash mid-write).
        write_metrics(
            &dir,
            "{\"step\": 1, \"phase\": \"rl\", \"reward/mean\": 0.5}\n\n{\"step\": 2, \"phase\": \"rl\", \"rew\n",
        );
        let err = plot_run(&dir).expect_err("malformed line must fail");
        assert!(matches!(err, PlotError::BadLine { line: 3, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("metrics.jsonl, line 3: not valid JSON"),
            "{msg}"
        );
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_fields_name_the_field_and_line() {
        let cases = [
            ("[1, 2]", "line 1: expected a JSON object, found an array"),
            ("{\"phase\": \"rl\"}", "line 1: `step`: missing"),
            (
                "{\"step\": -1, \"phase\": \"rl\"}",
                "line 1: `step`: expected a non-negative integer, found -1",
            ),
            ("{\"step\": 1}", "line 1: `phase`: missing"),
            (
                "{\"step\": 1, \"phase\": 3}",
                "line 1: `phase`: expected a string, found 3",
            ),
            (
                "{\"step\": 1, \"phase\": \"rl\", \"reward/mean\": \"high\"}",
                "line 1: `reward/mean`: expected a number or null, found a string",
            ),
        ];
        for (i, (text, expected)) in cases.iter().enumerate() {
            let dir = scratch_dir(&format!("field{i}"));
            write_metrics(&dir, &format!("{text}\n"));
            let msg = plot_run(&dir).expect_err(text).to_string();
            assert!(msg.contains(expected), "{text}: {msg}");
            let _ = fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn missing_metrics_file_is_an_io_error_naming_it() {
        let dir = scratch_dir("missing");
        let err = plot_run(&dir).expect_err("no metrics.jsonl");
        assert!(matches!(err, PlotError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("metrics.jsonl"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn flat_single_point_and_non_finite_series_do_not_panic() {
        let dir = scratch_dir("flat");
        let cases = [
            ("flat.png", vec![(0.0, 0.3), (1.0, 0.3), (2.0, 0.3)]),
            ("zero.png", vec![(0.0, 0.0), (5.0, 0.0)]),
            ("single.png", vec![(7.0, 1.0)]),
            (
                "nonfinite.png",
                vec![
                    (f64::NAN, 1.0),
                    (1.0, f64::INFINITY),
                    (2.0, f64::NEG_INFINITY),
                ],
            ),
            ("empty.png", vec![]),
        ];
        for (file, points) in cases {
            let out = dir.join(file);
            let series = [Series {
                label: "s".into(),
                points,
            }];
            line_chart(&out, file, "step", "value", &series)
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_chart_png(&out);
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn unwritable_path_is_a_draw_error_naming_it() {
        let dir = scratch_dir("unwritable");
        let out = dir.join("no-such-dir").join("x.png");
        let series = [Series {
            label: "s".into(),
            points: vec![(0.0, 1.0), (1.0, 2.0)],
        }];
        let err = line_chart(&out, "t", "x", "y", &series).expect_err("parent dir missing");
        assert!(matches!(err, PlotError::Draw { .. }), "{err:?}");
        assert!(err.to_string().contains("x.png"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn padded_range_cases() {
        // Flat 0.3: pad 0.1·0.3 = 0.03 → (0.27, 0.33).
        let (lo, hi) = padded_range([0.3, 0.3].into_iter());
        assert!(
            (lo - 0.27).abs() < 1e-12 && (hi - 0.33).abs() < 1e-12,
            "{lo} {hi}"
        );
        // Flat -2: pad 0.1·2 = 0.2 → (-2.2, -1.8).
        let (lo, hi) = padded_range([-2.0].into_iter());
        assert!(
            (lo + 2.2).abs() < 1e-12 && (hi + 1.8).abs() < 1e-12,
            "{lo} {hi}"
        );
        // Flat 0: pad 1 → (-1, 1).
        assert_eq!(padded_range([0.0, 0.0].into_iter()), (-1.0, 1.0));
        // 0..10: margin 0.05·10 = 0.5 → (-0.5, 10.5).
        assert_eq!(padded_range([3.0, 0.0, 10.0].into_iter()), (-0.5, 10.5));
        // Nothing → default (0, 1).
        assert_eq!(padded_range(std::iter::empty()), (0.0, 1.0));
        // Span overflows f64: drawn edge to edge.
        assert_eq!(
            padded_range([-f64::MAX, f64::MAX].into_iter()),
            (-f64::MAX, f64::MAX)
        );
    }

    #[test]
    fn legend_room_raises_the_top_only() {
        // (0, 10): top + 0.2·10 = 12.
        assert_eq!(with_legend_room((0.0, 10.0)), (0.0, 12.0));
        // (-1, 1): top + 0.2·2 = 1.4.
        assert_eq!(with_legend_room((-1.0, 1.0)), (-1.0, 1.4));
        // Overflow keeps the range as it was.
        assert_eq!(
            with_legend_room((-f64::MAX, f64::MAX)),
            (-f64::MAX, f64::MAX)
        );
    }

    #[test]
    fn x_tick_labels() {
        assert_eq!(x_tick_label(10.0), "10");
        assert_eq!(x_tick_label(0.0), "0");
        assert_eq!(x_tick_label(-0.0001), "0"); // "-0.000" trimmed to "-0", shown as "0"
        assert_eq!(x_tick_label(4.6000000000000005), "4.6");
        assert_eq!(x_tick_label(-2.25), "-2.25");
        assert_eq!(x_tick_label(1.23456), "1.235");
    }

    #[test]
    fn finite_points_drops_nan_and_infinities() {
        let pts = [
            (0.0, 1.0),
            (1.0, f64::NAN),
            (f64::INFINITY, 2.0),
            (3.0, f64::NEG_INFINITY),
            (4.0, 2.0),
        ];
        assert_eq!(finite_points(&pts), vec![(0.0, 1.0), (4.0, 2.0)]);
    }

    #[test]
    fn compare_runs_draws_one_line_per_run() {
        let root = scratch_dir("compare");
        let a = root.join("grpo");
        let b = root.join("ppo");
        for (dir, v) in [(&a, 0.25), (&b, 0.5)] {
            fs::create_dir_all(dir).expect("run dir");
            let text = format!(
                "{{\"step\": 1, \"phase\": \"rl\", \"reward/mean\": {v}}}\n{{\"step\": 2, \"phase\": \"rl\", \"reward/mean\": {}}}\n",
                v + 0.25
            );
            write_metrics(dir, &text);
        }
        let runs = [
            ("grpo".to_string(), a.clone()),
            ("ppo".to_string(), b.clone()),
        ];
        let out = root.join("cmp").join("reward.png");
        compare_runs(&runs, "reward/mean", &out).expect("compare");
        assert_chart_png(&out);

        let err = compare_runs(&runs, "no/such", &root.join("none.png"))
            .expect_err("metric absent everywhere");
        assert!(matches!(err, PlotError::NoData { .. }), "{err:?}");
        assert!(err.to_string().contains("`no/such`"), "{err}");
        assert!(!root.join("none.png").exists());
        let _ = fs::remove_dir_all(&root);
    }

    /// The embedded font really draws glyphs: a title alone darkens pixels in the caption
    /// band, and the same chart without a title leaves that band white.
    #[test]
    fn embedded_font_renders_text() {
        ensure_font().expect("font");
        let dark_pixels_in_caption_band = |title: &str| -> usize {
            let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
            {
                let root =
                    BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
                draw_chart(&root, title, "", "", &[]).expect("draw");
                root.present().expect("present");
            }
            // Caption band: rows 15..40 (below the 15 px margin), columns 200..600 (clear of
            // the y axis and its labels), as RGB triples.
            let pixel = |x: u32, y: u32| {
                buf.get(((y * WIDTH + x) * 3) as usize..((y * WIDTH + x) * 3 + 3) as usize)
            };
            (15..40)
                .flat_map(|y| (200..600).map(move |x| (x, y)))
                .filter_map(|(x, y)| pixel(x, y))
                .filter(|px| px.iter().all(|&c| c < 128))
                .count()
        };
        assert!(dark_pixels_in_caption_band("Reward over steps") > 100);
        assert_eq!(dark_pixels_in_caption_band(""), 0);
    }
}
