//! MLflow through its REST API (`/api/2.0/mlflow/...`): one MLflow run per grove run, the
//! config as params, metrics in batches (`runs/log-batch`), and at the end the plots and the
//! JSON lines as artifacts (the tracking server's artifact proxy, `mlflow-artifacts:/`).
//!
//! The server is best effort: when it cannot be reached the values wait in a queue, the user
//! gets one warning, and each later step retries (at most every few seconds, so a dead server
//! costs the training loop nothing). metrics.jsonl is the record either way.
use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::report::sinks::{MetricsLine, Sink};

/// MLflow's limits per `log-batch` call (REST API docs: 1000 metrics, 100 params).
const MAX_METRICS_PER_BATCH: usize = 1000;
const MAX_PARAMS_PER_BATCH: usize = 100;
/// Longest param value the server stores (MLflow ≥ 2.x; longer ones are rejected).
const MAX_PARAM_LEN: usize = 6000;

/// Why a request failed: worth retrying (no connection, 5xx) or refused for good (4xx).
#[derive(Debug)]
pub enum Failure {
    Unreachable(String),
    Rejected(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unreachable(m) => write!(f, "unreachable: {m}"),
            Failure::Rejected(m) => write!(f, "rejected: {m}"),
        }
    }
}

struct RunIds {
    run_id: String,
    /// Path under the server's artifact proxy; None when the server does not proxy artifacts.
    artifact_path: Option<String>,
}

pub struct MlflowSink {
    base: String,
    experiment: String,
    run_name: String,
    agent: ureq::Agent,
    run: Option<RunIds>,
    params: VecDeque<(String, String)>,
    queue: VecDeque<serde_json::Value>,
    retry_every: Duration,
    last_failure: Option<Instant>,
    warned: bool,
    quiet: bool,
    /// Metric values the server has accepted.
    pub sent: usize,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl MlflowSink {
    /// Nothing is sent yet: the run is created with the first metrics (or at `finish`).
    pub fn new(
        url: &str,
        experiment: &str,
        run_name: &str,
        params: Vec<(String, String)>,
        quiet: bool,
    ) -> Result<Self> {
        let base = url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::config(
                "[report]",
                format!("mlflow: expected an http:// or https:// URL, found {url:?}"),
            ));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(2)))
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .into();
        let params = params
            .into_iter()
            .map(|(k, mut v)| {
                if v.len() > MAX_PARAM_LEN {
                    let mut cut = MAX_PARAM_LEN;
                    while !v.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    v.truncate(cut);
                }
                (k, v)
            })
            .collect();
        Ok(MlflowSink {
            base,
            experiment: experiment.to_string(),
            run_name: run_name.to_string(),
            agent,
            run: None,
            params,
            queue: VecDeque::new(),
            retry_every: Duration::from_secs(5),
            last_failure: None,
            warned: false,
            quiet,
            sent: 0,
        })
    }

    /// How long to wait after a failure before the next try (default 5 s).
    pub fn with_retry_every(mut self, d: Duration) -> Self {
        self.retry_every = d;
        self
    }

    /// Metric values waiting for the server.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The MLflow run id once the run exists on the server.
    pub fn run_id(&self) -> Option<&str> {
        self.run.as_ref().map(|r| r.run_id.as_str())
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> std::result::Result<serde_json::Value, Failure> {
        let url = format!("{}/api/2.0/mlflow/{path}", self.base);
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            (_, b) => self
                .agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(b.map(|b| b.to_string()).unwrap_or_default()),
        };
        let mut resp = resp.map_err(|e| Failure::Unreachable(format!("{url}: {e}")))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| Failure::Unreachable(format!("{url}: reading the answer: {e}")))?;
        match status {
            200..=299 => serde_json::from_str(&text)
                .map_err(|e| Failure::Rejected(format!("{url}: answer is not JSON ({e}): {text}"))),
            400..=499 => Err(Failure::Rejected(format!("{url}: HTTP {status}: {text}"))),
            _ => Err(Failure::Unreachable(format!(
                "{url}: HTTP {status}: {text}"
            ))),
        }
    }

    fn ensure_run(&mut self) -> std::result::Result<(), Failure> {
        if self.run.is_some() {
            return Ok(());
        }
        let q = format!(
            "experiments/get-by-name?experiment_name={}",
            url_encode(&self.experiment)
        );
        let experiment_id = match self.call("GET", &q, None) {
            Ok(v) => json_str(&v["experiment"]["experiment_id"])?,
            // RESOURCE_DOES_NOT_EXIST is a 404: create the experiment.
            Err(Failure::Rejected(m)) if m.contains("RESOURCE_DOES_NOT_EXIST") => {
                let v = self.call(
                    "POST",
                    "experiments/create",
                    Some(&serde_json::json!({"name": self.experiment})),
                )?;
                json_str(&v["experiment_id"])?
            }
            Err(e) => return Err(e),
        };
        let v = self.call(
            "POST",
            "runs/create",
            Some(&serde_json::json!({
                "experiment_id": experiment_id,
                "run_name": self.run_name,
                "start_time": now_ms(),
                "tags": [{"key": "mlflow.runName", "value": self.run_name},
                         {"key": "mlflow.source.name", "value": "grove"}],
            })),
        )?;
        let run_id = json_str(&v["run"]["info"]["run_id"])?;
        let artifact_path = v["run"]["info"]["artifact_uri"]
            .as_str()
            .and_then(|u| u.strip_prefix("mlflow-artifacts:"))
            .map(|p| p.trim_start_matches('/').to_string());
        self.run = Some(RunIds {
            run_id,
            artifact_path,
        });
        Ok(())
    }

    /// Sends params and queued metrics; on failure what was not accepted stays queued.
    fn flush(&mut self) -> std::result::Result<(), Failure> {
        self.ensure_run()?;
        let run_id = self.run_id().unwrap_or_default().to_string();
        while !self.params.is_empty() {
            let n = self.params.len().min(MAX_PARAMS_PER_BATCH);
            let batch: Vec<serde_json::Value> = self
                .params
                .iter()
                .take(n)
                .map(|(k, v)| serde_json::json!({"key": k, "value": v}))
                .collect();
            self.call(
                "POST",
                "runs/log-batch",
                Some(&serde_json::json!({"run_id": run_id, "params": batch})),
            )?;
            self.params.drain(..n);
        }
        while !self.queue.is_empty() {
            let n = self.queue.len().min(MAX_METRICS_PER_BATCH);
            let batch: Vec<serde_json::Value> = self.queue.iter().take(n).cloned().collect();
            match self.call(
                "POST",
                "runs/log-batch",
                Some(&serde_json::json!({"run_id": run_id, "metrics": batch})),
            ) {
                Ok(_) => self.sent += n,
                // Refused for good: retrying cannot help; the values are in metrics.jsonl.
                Err(Failure::Rejected(m)) => self.warn(&format!("dropped {n} metric values: {m}")),
                Err(e) => return Err(e),
            }
            self.queue.drain(..n);
        }
        Ok(())
    }

    fn warn(&self, msg: &str) {
        if !self.quiet {
            eprintln!("warning: MLflow {}: {msg}", self.base);
        }
    }

    /// Flushes unless the last failure was under `retry_every` ago.
    fn try_flush(&mut self, force: bool) {
        if !force {
            if let Some(t) = self.last_failure {
                if t.elapsed() < self.retry_every {
                    return;
                }
            }
        }
        match self.flush() {
            Ok(()) => {
                if self.last_failure.take().is_some() {
                    self.warn("reachable again; the queued values were sent");
                }
            }
            Err(e) => {
                if !self.warned {
                    self.warn(&format!(
                        "{e}; {} values queued and retried every {} s (all are in metrics.jsonl)",
                        self.queue.len(),
                        self.retry_every.as_secs_f64()
                    ));
                    self.warned = true;
                }
                self.last_failure = Some(Instant::now());
            }
        }
    }

    fn upload(&self, name: &str, file: &Path) -> std::result::Result<(), Failure> {
        let Some(run) = &self.run else {
            return Err(Failure::Unreachable("no run on the server".into()));
        };
        let Some(prefix) = &run.artifact_path else {
            return Err(Failure::Rejected(
                "the server does not proxy artifacts (start it without --no-serve-artifacts)"
                    .into(),
            ));
        };
        let bytes = std::fs::read(file)
            .map_err(|e| Failure::Rejected(format!("{}: {e}", file.display())))?;
        let url = format!(
            "{}/api/2.0/mlflow-artifacts/artifacts/{prefix}/{name}",
            self.base
        );
        let mut resp = self
            .agent
            .put(&url)
            .send(&bytes[..])
            .map_err(|e| Failure::Unreachable(format!("{url}: {e}")))?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            Ok(())
        } else {
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            Err(Failure::Rejected(format!("{url}: HTTP {status}: {text}")))
        }
    }
}

fn json_str(v: &serde_json::Value) -> std::result::Result<String, Failure> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| Failure::Rejected(format!("expected a string id, found {v}")))
}

/// Percent-encodes a query value (everything but unreserved characters).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Sink for MlflowSink {
    fn metrics(&mut self, line: &MetricsLine) -> Result<()> {
        let ts = now_ms();
        for (k, v) in &line.values {
            // MLflow's JSON cannot carry NaN/inf; metrics.jsonl has them as null.
            if let Some(v) = v {
                self.queue.push_back(serde_json::json!({
                    "key": line.tag(k), "value": v, "timestamp": ts, "step": line.step
                }));
            }
        }
        self.try_flush(false);
        Ok(())
    }

    fn samples(&mut self, _step: usize, _lines: &[serde_json::Value]) -> Result<()> {
        Ok(())
    }

    /// A few last tries for anything queued, then plots and JSON lines as artifacts and the
    /// run marked finished. Never fails the training run.
    fn finish(&mut self, run_dir: &Path) -> Result<()> {
        for attempt in 0..3 {
            self.try_flush(true);
            if self.last_failure.is_none() {
                break;
            }
            if attempt < 2 {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        if self.last_failure.is_some() {
            self.warn(&format!(
                "still unreachable at the end of the run: {} metric values not sent (they are \
                 in metrics.jsonl)",
                self.queue.len()
            ));
            return Ok(());
        }
        let mut files: Vec<(String, std::path::PathBuf)> = Vec::new();
        for f in ["metrics.jsonl", "samples.jsonl", "config.toml"] {
            files.push((f.to_string(), run_dir.join(f)));
        }
        if let Ok(rd) = std::fs::read_dir(run_dir.join("plots")) {
            let mut pngs: Vec<_> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "png"))
                .collect();
            pngs.sort();
            for p in pngs {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                files.push((format!("plots/{name}"), p.clone()));
            }
        }
        for (name, path) in files.iter().filter(|(_, p)| p.exists()) {
            if let Err(e) = self.upload(name, path) {
                self.warn(&format!("artifact {name}: {e}"));
            }
        }
        let run_id = self.run_id().unwrap_or_default().to_string();
        if let Err(e) = self.call(
            "POST",
            "runs/update",
            Some(
                &serde_json::json!({"run_id": run_id, "status": "FINISHED", "end_time": now_ms()}),
            ),
        ) {
            self.warn(&format!("marking the run finished: {e}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encoding_keeps_unreserved_characters_only() {
        assert_eq!(url_encode("grove run/1"), "grove%20run%2F1");
        assert_eq!(url_encode("a-b_c.d~"), "a-b_c.d~");
    }

    #[test]
    fn a_url_without_scheme_is_a_config_error() {
        let e = MlflowSink::new("127.0.0.1:5000", "e", "r", vec![], true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("mlflow") && e.contains("127.0.0.1:5000"), "{e}");
    }

    #[test]
    fn long_param_values_are_cut_to_the_server_limit() {
        let s = MlflowSink::new(
            "http://127.0.0.1:9",
            "e",
            "r",
            vec![("k".into(), "é".repeat(4000))],
            true,
        )
        .unwrap();
        assert!(s.params[0].1.len() <= MAX_PARAM_LEN);
    }
}
