//! The sink list: trackers that mirror what a run writes to `metrics.jsonl` and
//! `samples.jsonl`. The JSON lines stay the record; the [`Reporter`] tails both files and hands
//! each new line to every sink (TensorBoard event files, an MLflow server), so no sink can
//! see something the files do not hold, and a sink's failure never loses a metric.
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::report::tensorboard::{EventWriter, Value};

/// `[report]`: where a run's metrics go besides metrics.jsonl.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportConfig {
    /// TensorBoard event files under `runs/<name>/tb/` (on by default: they cost a few KB and
    /// no service; `tensorboard --logdir runs` shows every run).
    pub tensorboard: bool,
    /// MLflow tracking server, e.g. "http://127.0.0.1:5000" (off when absent).
    pub mlflow: Option<String>,
    /// MLflow experiment the runs are logged under (created when missing).
    pub mlflow_experiment: String,
    /// Prompts per step (from samples.jsonl) written to TensorBoard's Text tab.
    pub text_samples: usize,
}

impl Default for ReportConfig {
    fn default() -> Self {
        ReportConfig {
            tensorboard: true,
            mlflow: None,
            mlflow_experiment: "grove".into(),
            text_samples: 2,
        }
    }
}

/// One metrics line as sinks see it: value `None` where metrics.jsonl holds `null`
/// (a non-finite value).
pub struct MetricsLine {
    pub phase: String,
    pub step: usize,
    pub values: Vec<(String, Option<f64>)>,
}

impl MetricsLine {
    /// Parses one metrics.jsonl object; `at` names the file and line for errors.
    pub fn parse(v: &serde_json::Value, at: &str) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| Error::RunDir {
            path: at.into(),
            msg: "a metrics line is not a JSON object".into(),
        })?;
        let step = obj
            .get("step")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| Error::RunDir {
                path: at.into(),
                msg: "field `step`: expected a non-negative integer".into(),
            })? as usize;
        let phase = obj
            .get("phase")
            .and_then(|p| p.as_str())
            .unwrap_or("rl")
            .to_string();
        let mut values = Vec::new();
        for (k, v) in obj {
            if k == "step" || k == "phase" {
                continue;
            }
            match v {
                serde_json::Value::Null => values.push((k.clone(), None)),
                serde_json::Value::Number(n) => values.push((k.clone(), n.as_f64())),
                other => {
                    return Err(Error::RunDir {
                        path: at.into(),
                        msg: format!("field `{k}`: expected a number or null, found {other}"),
                    })
                }
            }
        }
        Ok(MetricsLine {
            phase,
            step,
            values,
        })
    }

    /// The tracker name of metric `key`: RL metrics keep their name, other phases are
    /// prefixed (`warmup/loss/sft`) so the step axes of the phases do not mix.
    pub fn tag(&self, key: &str) -> String {
        if self.phase == "rl" {
            key.to_string()
        } else {
            format!("{}/{key}", self.phase)
        }
    }
}

/// A tracker that mirrors the run.
pub trait Sink {
    fn metrics(&mut self, line: &MetricsLine) -> Result<()>;
    /// The samples.jsonl lines of one step.
    fn samples(&mut self, step: usize, lines: &[serde_json::Value]) -> Result<()>;
    /// End of the run: last retries, plots as artifacts.
    fn finish(&mut self, run_dir: &Path) -> Result<()>;
}

/// Reads the complete lines appended to a JSONL file since the last call.
pub struct Tail {
    path: PathBuf,
    offset: u64,
    line_no: usize,
}

impl Tail {
    /// Starts at the file's current end (or at 0 when it does not exist yet).
    pub fn at_end(path: &Path) -> Self {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let line_no = if offset > 0 {
            std::fs::read(path)
                .map(|b| b.iter().filter(|&&c| c == b'\n').count())
                .unwrap_or(0)
        } else {
            0
        };
        Tail {
            path: path.to_path_buf(),
            offset,
            line_no,
        }
    }

    /// Starts at the beginning: every line of the file.
    pub fn at_start(path: &Path) -> Self {
        Tail {
            path: path.to_path_buf(),
            offset: 0,
            line_no: 0,
        }
    }

    pub fn read_new(&mut self) -> Result<Vec<(String, serde_json::Value)>> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(Error::io(&self.path, e)),
        };
        let mut buf = Vec::new();
        f.seek(SeekFrom::Start(self.offset))
            .and_then(|_| f.read_to_end(&mut buf))
            .map_err(|e| Error::io(&self.path, e))?;
        // Only whole lines: a line being written is picked up next time.
        let Some(end) = buf.iter().rposition(|&c| c == b'\n') else {
            return Ok(vec![]);
        };
        self.offset += end as u64 + 1;
        let mut out = Vec::new();
        for line in buf[..end].split(|&c| c == b'\n') {
            self.line_no += 1;
            let at = format!("{}:{}", self.path.display(), self.line_no);
            let text = std::str::from_utf8(line).map_err(|_| Error::RunDir {
                path: at.clone().into(),
                msg: "not UTF-8".into(),
            })?;
            if text.trim().is_empty() {
                continue;
            }
            let v = serde_json::from_str(text).map_err(|e| Error::RunDir {
                path: at.clone().into(),
                msg: format!("not valid JSON: {e}"),
            })?;
            out.push((at, v));
        }
        Ok(out)
    }
}

/// TensorBoard: every metric as a scalar, the config and a few samples per step as text.
pub struct TensorBoardSink {
    writer: EventWriter,
    text_samples: usize,
}

impl TensorBoardSink {
    pub fn create(dir: &Path, config_toml: &str, text_samples: usize) -> Result<Self> {
        let mut writer = EventWriter::create(dir)?;
        writer.write(0, &[("config", Value::Text(&indent_code(config_toml)))])?;
        Ok(TensorBoardSink {
            writer,
            text_samples,
        })
    }
}

/// Markdown code block by indentation (TensorBoard's text tab renders Markdown).
fn indent_code(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A samples.jsonl line as Markdown: prompt, answer, then each response with its figures.
pub fn sample_markdown(v: &serde_json::Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let mut md = format!(
        "**prompt** `{}` — **answer** `{}`\n\n| reward | correct | advantage | response |\n|---|---|---|---|\n",
        s("prompt").replace('`', "'"),
        s("answer").replace('`', "'")
    );
    for r in v["responses"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {:.3} | {} | {:.3} | `{}` |\n",
            r["reward"].as_f64().unwrap_or(f64::NAN),
            r["correct"].as_bool().unwrap_or(false),
            r["advantage"].as_f64().unwrap_or(f64::NAN),
            r["text"]
                .as_str()
                .unwrap_or("")
                .replace(['`', '|', '\n'], " ")
        ));
    }
    md
}

impl Sink for TensorBoardSink {
    fn metrics(&mut self, line: &MetricsLine) -> Result<()> {
        let tags: Vec<(String, f32)> = line
            .values
            .iter()
            .filter_map(|(k, v)| v.map(|v| (line.tag(k), v as f32)))
            .collect();
        let values: Vec<(&str, Value)> = tags
            .iter()
            .map(|(t, v)| (t.as_str(), Value::Scalar(*v)))
            .collect();
        self.writer.write(line.step as i64, &values)
    }

    fn samples(&mut self, step: usize, lines: &[serde_json::Value]) -> Result<()> {
        if self.text_samples == 0 || lines.is_empty() {
            return Ok(());
        }
        let md: Vec<String> = lines
            .iter()
            .take(self.text_samples)
            .map(sample_markdown)
            .collect();
        self.writer
            .write(step as i64, &[("samples", Value::Text(&md.join("\n\n")))])
    }

    fn finish(&mut self, _run_dir: &Path) -> Result<()> {
        Ok(())
    }
}

/// The TensorBoard sink of a run, in a new event file. A resumed run's metrics.jsonl and
/// samples.jsonl were cut back to its checkpoint, but its earlier event files also hold the
/// steps logged after that checkpoint before the run stopped; TensorBoard would show those
/// steps twice. So the new file is filled from the cut-back files, and the earlier event files
/// are removed once it holds everything (a crash in between leaves both, and the next resume
/// rebuilds again).
fn tensorboard_sink(
    cfg: &ReportConfig,
    run_dir: &Path,
    config_toml: &str,
) -> Result<Box<dyn Sink>> {
    let dir = run_dir.join("tb");
    let earlier = crate::report::tensorboard::event_files(&dir)?;
    let mut sink: Vec<Box<dyn Sink>> = vec![Box::new(TensorBoardSink::create(
        &dir,
        config_toml,
        cfg.text_samples,
    )?)];
    if !earlier.is_empty() {
        let metrics = Tail::at_start(&run_dir.join("metrics.jsonl")).read_new()?;
        let samples = Tail::at_start(&run_dir.join("samples.jsonl")).read_new()?;
        forward(&mut sink, &metrics, &samples)?;
        for p in earlier {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(sink.remove(0))
}

/// Hands metrics.jsonl and samples.jsonl lines (`(file:line, value)`) to every sink.
fn forward(
    sinks: &mut [Box<dyn Sink>],
    metrics: &[(String, serde_json::Value)],
    samples: &[(String, serde_json::Value)],
) -> Result<()> {
    if sinks.is_empty() {
        return Ok(());
    }
    for (at, v) in metrics {
        let line = MetricsLine::parse(v, at)?;
        for s in sinks.iter_mut() {
            s.metrics(&line)?;
        }
    }
    // samples.jsonl holds several lines per step; hand them over step by step.
    let mut i = 0;
    while i < samples.len() {
        let step = samples[i].1["step"].as_u64().unwrap_or(0);
        let mut j = i;
        while j < samples.len() && samples[j].1["step"].as_u64().unwrap_or(0) == step {
            j += 1;
        }
        let lines: Vec<serde_json::Value> = samples[i..j].iter().map(|(_, v)| v.clone()).collect();
        for s in sinks.iter_mut() {
            s.samples(step as usize, &lines)?;
        }
        i = j;
    }
    Ok(())
}

/// Tails the run's JSON lines into every configured sink.
pub struct Reporter {
    run_dir: PathBuf,
    metrics: Tail,
    samples: Tail,
    sinks: Vec<Box<dyn Sink>>,
}

impl Reporter {
    /// Opens the sinks of `cfg` for `run_dir`; lines already in the files (a resumed run's
    /// earlier steps) were mirrored by the run that wrote them and are not sent again.
    /// `config_toml` is the run's config; `params` its flattened `section.key = value` pairs.
    pub fn start(
        cfg: &ReportConfig,
        run_dir: &Path,
        config_toml: &str,
        params: Vec<(String, String)>,
        quiet: bool,
    ) -> Result<Self> {
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        if cfg.tensorboard {
            sinks.push(tensorboard_sink(cfg, run_dir, config_toml)?);
        }
        if let Some(url) = &cfg.mlflow {
            let run_name = run_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            sinks.push(Box::new(crate::report::mlflow::MlflowSink::new(
                url,
                &cfg.mlflow_experiment,
                &run_name,
                params,
                quiet,
            )?));
        }
        Ok(Self::with_sinks(run_dir, sinks))
    }

    pub fn with_sinks(run_dir: &Path, sinks: Vec<Box<dyn Sink>>) -> Self {
        Reporter {
            run_dir: run_dir.to_path_buf(),
            metrics: Tail::at_end(&run_dir.join("metrics.jsonl")),
            samples: Tail::at_end(&run_dir.join("samples.jsonl")),
            sinks,
        }
    }

    /// Forwards the lines written since the last call.
    pub fn sync(&mut self) -> Result<()> {
        let metrics = self.metrics.read_new()?;
        let samples = self.samples.read_new()?;
        forward(&mut self.sinks, &metrics, &samples)
    }

    /// Last sync, then each sink's end of run (MLflow: plots as artifacts, run finished).
    pub fn finish(&mut self) -> Result<()> {
        self.sync()?;
        for s in &mut self.sinks {
            s.finish(&self.run_dir)?;
        }
        Ok(())
    }
}

/// The config as `section.key = value` pairs (nested tables joined by dots), for trackers'
/// parameter tables.
pub fn flatten_params(table: &toml::Table) -> Vec<(String, String)> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            toml::Value::String(s) => out.push((prefix.to_string(), s.clone())),
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    walk("", &toml::Value::Table(table.clone()), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_returns_only_whole_new_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.jsonl");
        std::fs::write(&p, "{\"step\":0}\n").unwrap();
        let mut t = Tail::at_end(&p);
        assert!(t.read_new().unwrap().is_empty());
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        write!(f, "{{\"step\":1}}\n{{\"step\":").unwrap();
        let got = t.read_new().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1["step"], 1);
        assert!(got[0].0.ends_with("m.jsonl:2"), "{}", got[0].0);
        writeln!(f, "2}}").unwrap();
        let got = t.read_new().unwrap();
        assert_eq!(got[0].1["step"], 2);
        assert!(got[0].0.ends_with(":3"));
    }

    #[test]
    fn bad_metrics_line_names_file_line_and_field() {
        let v = serde_json::json!({"step": 3, "phase": "rl", "reward/mean": "high"});
        let e = MetricsLine::parse(&v, "runs/x/metrics.jsonl:7")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("metrics.jsonl:7"), "{e}");
        assert!(e.contains("reward/mean") && e.contains("\"high\""), "{e}");
    }

    #[test]
    fn warmup_metrics_are_prefixed_rl_metrics_are_not() {
        let v = serde_json::json!({"step": 3, "phase": "warmup", "loss/sft": 1.0, "x": null});
        let l = MetricsLine::parse(&v, "f:1").unwrap();
        assert_eq!(l.tag("loss/sft"), "warmup/loss/sft");
        assert!(l.values.contains(&("x".to_string(), None)));
        let v = serde_json::json!({"step": 3, "phase": "rl"});
        assert_eq!(MetricsLine::parse(&v, "f:1").unwrap().tag("lr"), "lr");
    }

    #[test]
    fn params_flatten_nested_tables() {
        let t: toml::Table =
            toml::from_str("seed = 3\n[rollout]\ngroup_size = 8\nname = \"a\"\n").unwrap();
        let p = flatten_params(&t);
        assert!(p.contains(&("seed".into(), "3".into())));
        assert!(p.contains(&("rollout.group_size".into(), "8".into())));
        assert!(p.contains(&("rollout.name".into(), "a".into())));
    }
}
