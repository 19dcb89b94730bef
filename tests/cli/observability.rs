//! Observability against real components: grove's TensorBoard files read back by the
//! `tensorboard` package's event reader, a real MLflow tracking server (up, and down then up),
//! and `grove view` in headless Chromium. The Python packages live in the venv that
//! `.ci/install-observe.sh` builds (`GROVE_PYTHON`, default `.ci/venv/bin/python`); a missing
//! package or browser fails these tests.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use grove::config;
use grove::report::mlflow::MlflowSink;
use grove::report::sinks::{MetricsLine, Sink};
use grove::train::{run, Summary, TrainOptions};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let p = std::env::var_os("GROVE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".ci/venv/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run .ci/install-observe.sh (or set GROVE_PYTHON)",
        p.display()
    );
    p
}

/// A few seconds of training on the built-in task: 30 warm-up steps, `steps` RL steps.
fn small_run(out: &Path, name: &str, steps: usize, extra: &[String]) -> Summary {
    run(
        small_cfg(out, name, steps, extra),
        &TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap()
}

fn small_cfg(out: &Path, name: &str, steps: usize, extra: &[String]) -> config::ValidatedRun {
    let mut sets: Vec<String> = vec![
        format!("output_dir={:?}", out.display().to_string()),
        format!("name={name:?}"),
        "warmup.max_steps=30".into(),
        "warmup.eval_every=10".into(),
        "warmup.target_acc=1.0".into(),
        "rollout.prompts_per_step=8".into(),
        "rollout.group_size=4".into(),
        format!("train.steps={steps}"),
        "train.eval_every=2".into(),
        "train.eval_size=32".into(),
        "train.checkpoint_every=100".into(),
        "train.lr=1e-3".into(),
    ];
    sets.extend(extra.iter().cloned());
    config::load(None, &sets).unwrap()
}

/// (tag, step) → value for every number in metrics.jsonl, tagged as the sinks tag it.
fn jsonl_metrics(run_dir: &Path) -> BTreeMap<(String, u64), f64> {
    let mut out = BTreeMap::new();
    for (i, v) in grove::report::read_jsonl(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .enumerate()
    {
        let line = MetricsLine::parse(v, &format!("metrics.jsonl:{}", i + 1)).unwrap();
        for (k, val) in &line.values {
            if let Some(val) = val {
                let prev = out.insert((line.tag(k), line.step as u64), *val);
                assert!(prev.is_none(), "{k} twice at step {}", line.step);
            }
        }
    }
    out
}

const READ_EVENTS: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
acc.Reload()
tags = acc.Tags()
out = {"scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
       "text": {t: [[e.step, b"".join(e.tensor_proto.string_val).decode()] for e in acc.Tensors(t)]
                for t in tags["tensors"]}}
print(json.dumps(out))
"#;

/// The run's event files as the `tensorboard` package's reader sees them: (tag, step) →
/// value of every scalar (each at most once), and the reader's JSON (scalars and text).
fn read_events(tb: &Path) -> (BTreeMap<(String, u64), f64>, serde_json::Value) {
    let out = Command::new(python())
        .args(["-c", READ_EVENTS])
        .arg(tb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tensorboard reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut tb_values: BTreeMap<(String, u64), f64> = BTreeMap::new();
    for (tag, events) in got["scalars"].as_object().unwrap() {
        for e in events.as_array().unwrap() {
            let prev = tb_values.insert(
                (tag.clone(), e[0].as_u64().unwrap()),
                e[1].as_f64().unwrap(),
            );
            assert!(prev.is_none(), "{tag} twice at step {}", e[0]);
        }
    }
    (tb_values, got)
}

/// Every value of metrics.jsonl is in the event files as the f32 TensorBoard keeps, and
/// nothing else is.
fn assert_events_mirror_metrics(run_dir: &Path, tb_values: &BTreeMap<(String, u64), f64>) {
    let want = jsonl_metrics(run_dir);
    for ((tag, step), v) in &want {
        let tbv = tb_values
            .get(&(tag.clone(), *step))
            .unwrap_or_else(|| panic!("{tag} at step {step} missing from the event files"));
        assert_eq!(*tbv, (*v as f32) as f64, "{tag} at step {step}");
    }
    assert_eq!(
        tb_values.len(),
        want.len(),
        "event files hold extra scalars"
    );
}

/// A run stopped after step 3 whose step-3 checkpoint never made it to disk (a crash) resumes
/// from step 2: its metrics.jsonl is cut back to step 2, and TensorBoard, read by the real
/// reader, shows every step exactly once (step 3 is the resumed run's, not both).
#[test]
fn a_resumed_run_shows_each_step_once_in_tensorboard() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = ["train.checkpoint_every=2".to_string()];
    let s = run(
        small_cfg(tmp.path(), "tb-resume", 4, &extra),
        &TrainOptions {
            quiet: true,
            stop_after: Some(3),
            ..Default::default()
        },
    )
    .unwrap();
    let (before, _) = read_events(&s.run_dir.join("tb"));
    assert!(before.contains_key(&("reward/mean".to_string(), 3)));
    std::fs::remove_dir_all(s.run_dir.join("checkpoints/step-3")).unwrap();
    let cfg = config::load_for(
        Some(&s.run_dir.join("config.toml")),
        &[],
        config::Purpose::Resume,
    )
    .unwrap();
    let r = run(
        cfg,
        &TrainOptions {
            quiet: true,
            resume: Some(s.run_dir.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.rl_steps_done, 4);
    let tb = s.run_dir.join("tb");
    let (after, got) = read_events(&tb);
    assert_events_mirror_metrics(&s.run_dir, &after);
    assert!(after.contains_key(&("warmup/loss/sft".to_string(), 30)));
    assert!(after.contains_key(&("reward/mean".to_string(), 4)));
    assert_eq!(got["text"]["config"].as_array().unwrap().len(), 1);
    let steps: Vec<u64> = got["text"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[0].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4], "one samples event per RL step");
    let files = grove::report::tensorboard::event_files(&tb).unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
}

#[test]
fn tensorboard_reader_finds_every_metric_of_metrics_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let s = small_run(tmp.path(), "tb", 3, &[]);
    let tb = s.run_dir.join("tb");
    let (tb_values, got) = read_events(&tb);
    let want = jsonl_metrics(&s.run_dir);
    assert!(want.len() > 75, "only {} metric values", want.len());
    for ((tag, step), v) in &want {
        // Scalars are f32 in TensorBoard (simple_value): equal after the same rounding.
        let tbv = tb_values
            .get(&(tag.clone(), *step))
            .unwrap_or_else(|| panic!("{tag} at step {step} missing from the event files"));
        assert_eq!(*tbv, (*v as f32) as f64, "{tag} at step {step}");
    }
    assert_eq!(
        tb_values.len(),
        want.len(),
        "event files hold extra scalars"
    );
    assert!(want.contains_key(&("warmup/loss/sft".to_string(), 10)));
    assert!(want.contains_key(&("reward/mean".to_string(), 3)));

    // The config as text, and the samples of each RL step.
    let config = &got["text"]["config"][0][1];
    assert!(config.as_str().unwrap().contains("[rollout]"), "{config}");
    let samples = got["text"]["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3, "one text event per RL step");
    let first = grove::report::read_jsonl(&s.run_dir.join("samples.jsonl")).unwrap()[0].clone();
    let prompt = first["prompt"].as_str().unwrap();
    assert_eq!(samples[0][0], 1);
    assert!(samples[0][1].as_str().unwrap().contains(prompt));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A process group this test started, ended (TERM to the group) when dropped.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

fn start_mlflow(dir: &Path, port: u16) -> Server {
    let bin = python().with_file_name("mlflow");
    let log = dir.join("mlflow.log");
    let child = {
        use std::os::unix::process::CommandExt;
        Command::new(&bin)
            .args(["server", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--workers", "1"])
            // No background job runner (a handful of Python processes grove does not use).
            .env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
            .arg("--artifacts-destination")
            .arg(dir.join("artifacts"))
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("mlflow.err")).unwrap())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (run .ci/install-observe.sh)", bin.display()))
    };
    let server = Server { child, log };
    // Cold imports take tens of seconds on a loaded 2-core machine.
    let deadline = Instant::now() + Duration::from_secs(300);
    let url = format!("http://127.0.0.1:{port}/health");
    while Instant::now() < deadline {
        if let Ok(r) = ureq::get(&url).call() {
            if r.status() == 200 {
                return server;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let err = std::fs::read_to_string(dir.join("mlflow.err")).unwrap_or_default();
    panic!(
        "mlflow server on port {port} not healthy after 300 s ({}):\n{err}",
        server.log.display()
    );
}

fn get_json(url: &str) -> serde_json::Value {
    let mut r = ureq::get(url)
        .call()
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
}

/// step → value of one metric's history on the server.
fn history(base: &str, run_id: &str, key: &str) -> BTreeMap<u64, f64> {
    let v = get_json(&format!(
        "{base}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key={}&max_results=10000",
        key.replace('/', "%2F")
    ));
    v["metrics"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    (
                        m["step"]
                            .as_str()
                            .map(|s| s.parse().unwrap())
                            .unwrap_or_else(|| m["step"].as_u64().unwrap()),
                        m["value"].as_f64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn line(step: usize, value: f64) -> MetricsLine {
    MetricsLine {
        phase: "rl".into(),
        step,
        values: vec![
            ("reward/mean".into(), Some(value)),
            ("loss/policy".into(), None),
        ],
    }
}

/// The server is down while five steps are logged (queued, nothing sent), comes up, and
/// the next step delivers all six; then a training run logs params, every metric of
/// metrics.jsonl and the plots.
#[test]
fn mlflow_server_down_then_up_loses_nothing_and_a_run_logs_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");

    let mut sink = MlflowSink::new(&base, "queue", "down-then-up", vec![], true)
        .unwrap()
        .with_retry_every(Duration::ZERO);
    for step in 1..=5 {
        sink.metrics(&line(step, step as f64 * 0.1)).unwrap();
    }
    assert_eq!(
        sink.queued(),
        5,
        "the null loss is not sent, five rewards wait"
    );
    assert_eq!(sink.sent, 0);
    assert!(sink.run_id().is_none());

    let _server = start_mlflow(tmp.path(), port);
    sink.metrics(&line(6, 6.0 * 0.1)).unwrap();
    assert_eq!(sink.queued(), 0);
    assert_eq!(sink.sent, 6);
    let run_id = sink.run_id().unwrap().to_string();
    let h = history(&base, &run_id, "reward/mean");
    let want: BTreeMap<u64, f64> = (1..=6).map(|s| (s, s as f64 * 0.1)).collect();
    assert_eq!(h, want);

    // A training run with `[report] mlflow`.
    let s = small_run(
        tmp.path(),
        "mlflow-run",
        3,
        &[
            format!("report.mlflow={base:?}"),
            "report.mlflow_experiment=\"grove-test\"".into(),
        ],
    );
    let exp = get_json(&format!(
        "{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=grove-test"
    ));
    let exp_id = exp["experiment"]["experiment_id"].as_str().unwrap();
    let mut r = ureq::post(&format!("{base}/api/2.0/mlflow/runs/search"))
        .header("Content-Type", "application/json")
        .send(serde_json::json!({"experiment_ids": [exp_id]}).to_string())
        .unwrap();
    let runs: serde_json::Value =
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    let info = &runs[0]["info"];
    assert_eq!(info["run_name"], "mlflow-run");
    assert_eq!(info["status"], "FINISHED");
    let run_id = info["run_id"].as_str().unwrap();
    let params: BTreeMap<String, String> = runs[0]["data"]["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["key"].as_str().unwrap().to_string(),
                p["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(params["rollout.group_size"], "4");
    assert_eq!(params["train.steps"], "3");

    let want = jsonl_metrics(&s.run_dir);
    let mut by_key: BTreeMap<String, BTreeMap<u64, f64>> = BTreeMap::new();
    for ((tag, step), v) in &want {
        by_key.entry(tag.clone()).or_default().insert(*step, *v);
    }
    for (key, steps) in &by_key {
        assert_eq!(&history(&base, run_id, key), steps, "{key}");
    }

    let listed = get_json(&format!(
        "{base}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=plots"
    ));
    let files: Vec<&str> = listed["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    let local: Vec<_> = std::fs::read_dir(s.run_dir.join("plots"))
        .unwrap()
        .flatten()
        .collect();
    assert!(!local.is_empty());
    assert_eq!(files.len(), local.len(), "{files:?}");
    let name = local[0].file_name().to_string_lossy().into_owned();
    let mut bytes = Vec::new();
    ureq::get(&format!(
        "{base}/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/plots/{name}"
    ))
    .call()
    .unwrap()
    .body_mut()
    .as_reader()
    .read_to_end(&mut bytes)
    .unwrap();
    assert_eq!(bytes, std::fs::read(local[0].path()).unwrap(), "{name}");
}

/// With nothing listening at the MLflow URL the run finishes, and metrics.jsonl is whole.
#[test]
fn training_with_the_mlflow_server_down_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}", free_port());
    let s = small_run(tmp.path(), "down", 2, &[format!("report.mlflow={url:?}")]);
    assert_eq!(s.rl_steps_done, 2);
    let steps: Vec<u64> = grove::report::read_jsonl(&s.run_dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|v| v["phase"] == "rl")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![0, 1, 2]);
}

/// First line of a child's stdout, within `timeout`.
fn first_line(child: &mut Child, timeout: Duration) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut l = String::new();
        let _ = BufReader::new(stdout).read_line(&mut l);
        let _ = tx.send(l);
    });
    rx.recv_timeout(timeout)
        .expect("no first line from the child in time")
}

/// Runs headless Chromium on `url` with `extra` flags (a fresh profile each time), within
/// two minutes; returns its stdout.
fn chromium(profile: &Path, url: &str, extra: &[String]) -> String {
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            // Virtual time: the page's fetches and first polls finish before the dump.
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium not found: run .ci/install-observe.sh");
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "chromium exited with {status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 120 s on {url}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap()
}

/// The `grove view` process, killed when dropped.
struct Viewer(Child);

impl Drop for Viewer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn grove_view_in_headless_chromium_shows_runs_curves_and_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let a = small_run(&runs, "alpha", 3, &[]);
    small_run(&runs, "beta", 2, &["seed=1".into()]);

    let mut viewer = Viewer(
        Command::new(env!("CARGO_BIN_EXE_grove"))
            .args(["view", "--port", "0", "--quiet"])
            .arg(&runs)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let line = first_line(&mut viewer.0, Duration::from_secs(30));
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let dom = chromium(&tmp.path().join("p1"), &url, &["--dump-dom".into()]);
    assert!(dom.contains("2 run(s)"), "status line missing:\n{dom}");
    for run in ["alpha", "beta"] {
        assert!(
            dom.contains(&format!("value=\"{run}\"")),
            "run {run} not listed"
        );
    }
    // One chart and one latest-value row per metric of metrics.jsonl.
    for ((tag, _), _) in jsonl_metrics(&a.run_dir) {
        assert!(
            dom.contains(&format!("class=\"chart\" data-tag=\"{tag}\"")),
            "no chart for {tag}"
        );
        assert!(
            dom.contains(&format!("data-metric=\"{tag}\"")),
            "no row for {tag}"
        );
    }
    let reward_row = dom.split("data-metric=\"reward/mean\"").nth(1).unwrap();
    let reward_row = &reward_row[..reward_row.find("</tr>").unwrap()];
    assert!(
        reward_row.contains("@3") && reward_row.contains("@2"),
        "{reward_row}"
    );
    // The sample browser shows the logged prompts and responses with their figures.
    let samples = grove::report::read_jsonl(&a.run_dir.join("samples.jsonl")).unwrap();
    let last = samples.last().unwrap();
    assert!(dom.contains(&format!(
        "<span class=\"prompt\">{}</span>",
        last["prompt"].as_str().unwrap()
    )));
    let n_responses: usize = samples
        .iter()
        .map(|s| s["responses"].as_array().unwrap().len())
        .sum();
    assert!(n_responses > 0);
    assert!(dom.contains("<b>advantage</b>") && dom.contains("class=\"components\""));

    // A screenshot that is not blank: many colours, no colour covering almost everything.
    let shot = tmp.path().join("view.png");
    chromium(
        &tmp.path().join("p2"),
        &url,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,1000".into(),
        ],
    );
    let decoder = png::Decoder::new(std::fs::File::open(&shot).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1280, 1000));
    let px = info.color_type.samples();
    let mut counts: std::collections::HashMap<&[u8], usize> = Default::default();
    for p in buf[..info.buffer_size()].chunks(px) {
        *counts.entry(&p[..3]).or_default() += 1;
    }
    let total = (info.width * info.height) as usize;
    let top = counts.values().max().copied().unwrap();
    assert!(counts.len() > 50, "only {} colours", counts.len());
    assert!(
        top * 100 < total * 90,
        "one colour covers {top} of {total} pixels"
    );
    if let Some(keep) = std::env::var_os("GROVE_VIEW_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
}
