//! What a run leaves for people to read: metrics.jsonl (one line a step; names are the
//! contract of docs/metrics.md), samples.jsonl, and the progress bar.
pub mod health;
pub mod mlflow;
pub mod plot;
pub mod sinks;
pub mod tensorboard;
pub mod torn;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Metrics of one step: name → value, written sorted by name after `step` and `phase`.
pub type Metrics = BTreeMap<String, f64>;

/// Appends JSON lines and flushes each one, so a crash loses at most the line being written.
pub struct JsonlWriter {
    path: PathBuf,
    file: File,
}

impl JsonlWriter {
    /// Opens `path` for appending, first moving a torn last line aside ([`torn`]).
    pub fn open_append(path: &Path) -> Result<Self> {
        torn::repair_and_warn(path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(JsonlWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write<T: serde::Serialize>(&mut self, value: &T) -> Result<()> {
        let mut line = serde_json::to_string(value)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// One metrics line: `{"step": N, "phase": "rl", "reward/mean": ...}`.
pub fn metrics_line(step: usize, phase: &str, m: &Metrics) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    obj.insert("step".into(), step.into());
    obj.insert("phase".into(), phase.into());
    for (k, v) in m {
        let v = if v.is_finite() {
            serde_json::json!(v)
        } else {
            serde_json::Value::Null
        };
        obj.insert(k.clone(), v);
    }
    serde_json::Value::Object(obj)
}

/// Reads metrics.jsonl back (for resume truncation, comparisons and plots).
pub fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(&line).map_err(|e| Error::RunDir {
            path: path.to_path_buf(),
            msg: format!("line {}: not valid JSON: {e}", i + 1),
        })?;
        out.push(v);
    }
    Ok(out)
}

/// Keeps only lines whose `step` is at most `max_step` (or whose phase is not `phase`):
/// a resumed run rewrites the steps after its checkpoint, so the file matches an
/// uninterrupted run. Written to a temporary file, then renamed. A torn last line (left by a
/// crash or a full disk) is moved aside first, with a warning.
pub fn truncate_after(path: &Path, phase: &str, max_step: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    torn::repair_and_warn(path)?;
    let lines = read_jsonl(path)?;
    let tmp = path.with_extension("jsonl.tmp");
    {
        let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        for v in lines {
            let keep = v.get("phase").and_then(|p| p.as_str()) != Some(phase)
                || v.get("step")
                    .and_then(|s| s.as_u64())
                    .map(|s| s as usize <= max_step)
                    .unwrap_or(true);
            if keep {
                writeln!(f, "{}", serde_json::to_string(&v)?).map_err(|e| Error::io(&tmp, e))?;
            }
        }
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

pub fn progress_bar(len: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_truncation_and_appending_survive_a_torn_last_line() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("metrics.jsonl");
        std::fs::write(
            &p,
            "{\"step\":1,\"phase\":\"rl\"}\n{\"step\":2,\"phase\":\"rl\"}\n{\"step\":3,\"ph",
        )
        .unwrap();
        truncate_after(&p, "rl", 1).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"phase\":\"rl\",\"step\":1}\n"
        );
        assert!(tmp.path().join("metrics.jsonl.torn").exists());
        // An appender opening a torn file starts on a fresh line.
        std::fs::write(&p, "{\"step\":1}\n{\"st").unwrap();
        let mut w = JsonlWriter::open_append(&p).unwrap();
        w.write(&serde_json::json!({"step": 2})).unwrap();
        let lines = read_jsonl(&p).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["step"], 2);
    }
}
