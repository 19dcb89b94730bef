//! `grove serve` as a batching engine that follows the policy: concurrent requests decoded
//! as one batch, weights swapped under load by `POST /admin/load`, and a training run that
//! samples through the server and pushes its weights after every update.
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use grove::model::io::{load_hf_folder, save_hf_folder};
use grove::model::{Llama, Tokenizer};
use grove::rollout::SamplingParams;
use grove::train::explore::encode_prompt;
use serde_json::{json, Value};

use super::killed_server::{assert_stopped_by_dead_server, wait_for_step1_checkpoint};
use super::remote::{local, serve_with, tiny_checkpoint};

const ADMIN: &str = "adm-token";

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// POST `body` to `url` (with the admin token when `admin`): (status, JSON answer).
fn post(url: &str, body: &Value, admin: bool) -> (u16, Value) {
    let mut r = agent().post(url).header("Content-Type", "application/json");
    if admin {
        r = r.header("Authorization", format!("Bearer {ADMIN}"));
    }
    let mut resp = r.send(body.to_string()).unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn get(url: &str) -> Value {
    let mut resp = agent().get(url).call().unwrap();
    serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap()
}

/// Token ids of choice 0 (`return_tokens_as_token_ids`).
fn tokens(answer: &Value) -> Vec<u32> {
    answer["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap()["token_id:".len()..].parse().unwrap())
        .collect()
}

/// Another model of the same shape as `ckpt` (fresh weights), with its tokenizer.
fn other_weights(ckpt: &Path, out: &Path) -> Llama {
    let cfg = load_hf_folder(ckpt, &candle_core::Device::Cpu).unwrap().cfg;
    let m = Llama::init(&cfg, 99, &candle_core::Device::Cpu).unwrap();
    save_hf_folder(&m, out).unwrap();
    std::fs::copy(ckpt.join("tokenizer.json"), out.join("tokenizer.json")).unwrap();
    m
}

fn greedy_local(m: &Llama, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let tok = Tokenizer::builtin_arithmetic();
    local(
        m,
        &tok,
        &[prompt.to_vec()],
        &SamplingParams::greedy(max_tokens),
        0,
    )[0]
    .tokens
    .clone()
}

#[test]
fn grove_serve_batches_requests_and_swaps_weights_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(tmp.path());
    let b_dir = tmp.path().join("other");
    let model_b = other_weights(&ckpt, &b_dir);
    let model_a = load_hf_folder(&ckpt, &candle_core::Device::Cpu).unwrap();
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json")).unwrap()).unwrap();
    let version_a = state["version"].as_u64().unwrap();
    let server = serve_with(&ckpt, &["--admin-token", ADMIN]);
    let base = format!("http://{}", server.addr);
    let completions = format!("{base}/v1/completions");
    let tok = Tokenizer::builtin_arithmetic();
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|i| encode_prompt(&tok, &format!("{}+{}=", 10 + i, 3 * i)).unwrap())
        .collect();

    // 16 concurrent requests of 12 tokens: far fewer forward passes than 16 × 12.
    let max_tokens = 12;
    let start = Arc::new(Barrier::new(16));
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (url, start) = (completions.clone(), Arc::clone(&start));
            let body = json!({"prompt": p, "max_tokens": max_tokens, "seed": i,
                              "logprobs": 1, "return_tokens_as_token_ids": true});
            std::thread::spawn(move || {
                start.wait();
                post(&url, &body, false)
            })
        })
        .collect();
    for h in handles {
        let (s, v) = h.join().unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["weights_version"], 0);
        assert_eq!(v["grove_policy_version"], version_a);
    }
    let m = get(&format!("{base}/metrics"));
    let passes = m["forward_passes"].as_u64().unwrap();
    assert_eq!(m["requests"], 16, "{m}");
    assert!(
        passes < 16 * max_tokens,
        "{passes} forward passes for 16 requests: {m}"
    );
    assert!(m["max_batch_rows"].as_u64().unwrap() > 1, "{m}");

    // The admin endpoint needs the token; a folder that is not a model is refused.
    let load = format!("{base}/admin/load");
    let (s, _) = post(&load, &json!({"path": b_dir}), false);
    assert_eq!(s, 401);
    let (s, v) = post(&load, &json!({"path": tmp.path().join("nowhere")}), true);
    assert_eq!((s, &v["error"]["param"]), (400, &json!("path")), "{v}");

    // A swap under load: 6 clients send greedy requests in a loop while the weights change.
    // No request is lost, each answer names its version, versions never go back, and each
    // answer is the greedy decode of the weights it names.
    let loaded = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let (url, loaded) = (completions.clone(), Arc::clone(&loaded));
            let p = prompts[i].clone();
            std::thread::spawn(move || {
                let body = json!({"prompt": p, "max_tokens": 8, "temperature": 0,
                                  "logprobs": 1, "return_tokens_as_token_ids": true});
                let mut seen = vec![];
                let mut after = 0;
                let t = Instant::now();
                while after < 2 && t.elapsed() < Duration::from_secs(60) {
                    let sent_after_load = loaded.load(Ordering::SeqCst);
                    let (s, v) = post(&url, &body, false);
                    assert_eq!(s, 200, "{v}");
                    seen.push((sent_after_load, v));
                    after += usize::from(sent_after_load);
                }
                (p, seen)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (s, v) = post(&load, &json!({"path": b_dir, "version": 42}), true);
    loaded.store(true, Ordering::SeqCst);
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            &v["weights_version"],
            &v["grove_policy_version"],
            &v["kind"]
        ),
        (&json!(1), &json!(42), &json!("full"))
    );
    for c in clients {
        let (p, seen) = c.join().unwrap();
        let (want_a, want_b) = (greedy_local(&model_a, &p, 8), greedy_local(&model_b, &p, 8));
        assert_ne!(want_a, want_b, "the two models answer differently");
        let mut last = 0;
        for (sent_after_load, v) in &seen {
            let w = v["weights_version"].as_u64().unwrap();
            assert!(w >= last, "versions go back: {seen:?}");
            last = w;
            match w {
                0 => {
                    assert!(
                        !sent_after_load,
                        "sent after the load returned, served by v0"
                    );
                    assert_eq!(v["grove_policy_version"], version_a);
                    assert_eq!(tokens(v), want_a);
                }
                1 => {
                    assert_eq!(v["grove_policy_version"], 42);
                    assert_eq!(tokens(v), want_b);
                }
                _ => panic!("unknown version in {v}"),
            }
        }
        assert_eq!(last, 1, "every client saw the new weights");
    }
    let models = get(&format!("{base}/v1/models"));
    assert_eq!(models["data"][0]["grove_policy_version"], 42);
    assert_eq!(get(&format!("{base}/metrics"))["loads"], 1);
}

/// The settings of `tiny_checkpoint`'s run, for a run of `steps` RL steps sampled through the
/// server at `url`, pushing into `sync_dir`.
fn remote_run_sets(out: &Path, url: &str, sync_dir: &Path, steps: usize) -> Vec<String> {
    vec![
        format!("output_dir={:?}", out.display().to_string()),
        "warmup.max_steps=20".into(),
        "warmup.eval_every=10".into(),
        "warmup.target_acc=1.0".into(),
        "rollout.prompts_per_step=4".into(),
        "rollout.group_size=4".into(),
        format!("train.steps={steps}"),
        format!("train.eval_every={steps}"),
        "train.eval_size=16".into(),
        "train.checkpoint_every=1".into(),
        "train.log_samples=4".into(),
        // Decoupled weight decay moves the weights at every update, even one whose groups all
        // have equal rewards, so each push serves different weights.
        "train.weight_decay=0.5".into(),
        format!("remote.url={url:?}"),
        format!("remote.admin_token={ADMIN:?}"),
        "remote.timeout_s=20".into(),
        format!("sync.publish_dir={:?}", sync_dir.display().to_string()),
    ]
}

/// The server's greedy answer for `prompt` (tokens, log-probs).
fn served_greedy(base: &str, prompt: &[u32]) -> (Vec<u32>, Vec<f64>) {
    let body = json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 1,
                      "return_tokens_as_token_ids": true});
    let (s, v) = post(&format!("{base}/v1/completions"), &body, false);
    assert_eq!(s, 200, "{v}");
    let lps = v["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    (tokens(&v), lps)
}

/// A training run sampling through `grove serve`: the learner pushes its weights after every
/// update, every sample carries the version the server answered with, and the server's greedy
/// answers are grove's own forward pass on the pushed weights, different for each push.
#[test]
fn training_through_grove_serve_pushes_every_update() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(tmp.path());
    let server = serve_with(&ckpt, &["--admin-token", ADMIN]);
    let base = format!("http://{}", server.addr);
    let sync_dir = tmp.path().join("sync");
    let out = tmp.path().join("remote-run");
    let cfg = grove::config::load(None, &remote_run_sets(&out, &base, &sync_dir, 3)).unwrap();
    let summary = grove::train::run(cfg, &super::common::quiet()).unwrap();
    assert_eq!(summary.rl_steps_done, 3);

    // Every group of every step is in samples.jsonl (train.log_samples = 4), and step k's
    // (0-based) come from the version pushed before it, v0 + k, as the server reported it.
    let samples = grove::report::read_jsonl(&summary.run_dir.join("samples.jsonl")).unwrap();
    let rl: Vec<&Value> = samples.iter().filter(|v| v["phase"] == "rl").collect();
    assert_eq!(rl.len(), 3 * 4);
    let v0 = rl[0]["policy_version"].as_u64().unwrap();
    let s0 = rl[0]["step"].as_u64().unwrap();
    for s in &rl {
        let step = s["step"].as_u64().unwrap();
        assert_eq!(s["policy_version"].as_u64().unwrap(), v0 + step - s0, "{s}");
    }
    // After the last update the server serves v0 + 3, and the last two pushes are kept.
    let last = v0 + 3;
    let models = get(&format!("{base}/v1/models"));
    assert_eq!(models["data"][0]["grove_policy_version"], last);
    let tok = Tokenizer::builtin_arithmetic();
    let prompt = encode_prompt(&tok, "12+7=").unwrap();
    let mut answers = vec![];
    for v in [last, last - 1] {
        let dir = sync_dir.join(format!("v{v}"));
        if v != last {
            let (s, a) = post(
                &format!("{base}/admin/load"),
                &json!({"path": dir, "version": v}),
                true,
            );
            assert_eq!((s, &a["grove_policy_version"]), (200, &json!(v)), "{a}");
        }
        let pushed = load_hf_folder(&dir, &candle_core::Device::Cpu).unwrap();
        let want = &local(
            &pushed,
            &tok,
            std::slice::from_ref(&prompt),
            &SamplingParams::greedy(6),
            0,
        )[0];
        let (got, lps) = served_greedy(&base, &prompt);
        assert_eq!(got, want.tokens, "v{v}: tokens");
        for (a, b) in lps.iter().zip(&want.logprobs) {
            assert!(
                (a - *b as f64).abs() < 1e-5,
                "v{v}: log-prob {a} vs local {b}"
            );
        }
        answers.push(lps);
    }
    let moved = answers[0]
        .iter()
        .zip(&answers[1])
        .any(|(a, b)| (a - b).abs() > 1e-6);
    assert!(
        moved,
        "the two pushed versions answer with the same log-probs: {answers:?}"
    );
}

/// The server dies mid-run: the run stops after its retries with an error naming the server,
/// and what it wrote before (metrics, checkpoints) is intact.
#[test]
fn a_server_killed_mid_run_stops_training_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(tmp.path());
    let mut server = serve_with(&ckpt, &["--admin-token", ADMIN]);
    let base = format!("http://{}", server.addr);
    let out = tmp.path().join("remote-run");
    let mut sets = remote_run_sets(&out, &base, &tmp.path().join("sync"), 500);
    sets.extend([
        "remote.retries=1".to_string(),
        "remote.backoff_s=0.1".into(),
        "remote.timeout_s=5".into(),
    ]);
    let cfg = grove::config::load(None, &sets).unwrap();
    let run = std::thread::spawn(move || grove::train::run(cfg, &super::common::quiet()));
    // Kill the server once the run has checkpointed its first step.
    let step1 = wait_for_step1_checkpoint(&out);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let e = run.join().unwrap().unwrap_err().to_string();
    assert_stopped_by_dead_server(&e, &base, &step1, 500);
}

/// The push after step 2 fails (its folder cannot be written: a file sits where the
/// half-written `v2.partial` goes): the run stops, and step 2's metrics line is in
/// metrics.jsonl next to step 2's samples, because the line is written before the push.
#[test]
fn a_push_that_fails_after_a_step_keeps_that_steps_metrics_line() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(tmp.path());
    let server = serve_with(&ckpt, &["--admin-token", ADMIN]);
    let base = format!("http://{}", server.addr);
    let out = tmp.path().join("remote-run");
    let sync = tmp.path().join("sync");
    std::fs::create_dir_all(&sync).unwrap();
    std::fs::write(sync.join("v2.partial"), "not a folder").unwrap();
    let sets = remote_run_sets(&out, &base, &sync, 5);
    let cfg = grove::config::load(None, &sets).unwrap();
    let e = grove::train::run(cfg, &super::common::quiet())
        .unwrap_err()
        .to_string();
    assert!(e.contains("v2.partial"), "{e}");
    let run_dir = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|d| d.path())
        .find(|p| p.join("metrics.jsonl").exists())
        .expect("the run directory stays (it has checkpoints)");
    let steps: Vec<u64> = super::common::rl_lines(&run_dir)
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![0, 1, 2], "rl metrics lines");
    let samples = grove::report::read_jsonl(&run_dir.join("samples.jsonl")).unwrap();
    assert!(samples.iter().any(|s| s["step"] == 2), "step 2's samples");
    assert!(run_dir.join("checkpoints/step-1").exists());
}

/// `grove explore --remote URL --weights DIR` pushes the learner's newest published weights
/// (a `.safetensors` file) to the server and tags its groups with the version served.
#[test]
fn explore_pushes_published_weights_to_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(tmp.path());
    let model_b = other_weights(&ckpt, &tmp.path().join("other"));
    let published = tmp.path().join("published");
    grove::train::publish::publish(&published, 5, &model_b).unwrap();
    let server = serve_with(&ckpt, &["--admin-token", ADMIN]);
    let base = format!("http://{}", server.addr);
    let out = tmp.path().join("groups.jsonl");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_grove"))
        .args(["explore", "--quiet", "--remote", &base, "--weights"])
        .arg(&published)
        .arg("--out")
        .arg(&out)
        .args(["--groups", "2", "--set", "rollout.prompts_per_step=2"])
        .args(["--set", &format!("remote.admin_token={ADMIN:?}")])
        .status()
        .unwrap();
    assert!(st.success());
    let groups = grove::buffer::jsonl::read_groups(&out).unwrap();
    assert_eq!(groups.len(), 2);
    assert!(groups.iter().all(|g| g.policy_version == 5));
    let models = get(&format!("{base}/v1/models"));
    assert_eq!(models["data"][0]["grove_policy_version"], 5);
    let tok = Tokenizer::builtin_arithmetic();
    let prompt = encode_prompt(&tok, "3*4=").unwrap();
    assert_eq!(
        served_greedy(&base, &prompt).0,
        greedy_local(&model_b, &prompt, 6)
    );
}

/// An adapter push: the PEFT adapter written by the real `peft` package (tests/fixtures/peft)
/// goes onto the weights the server started with, and the server then answers as grove's own
/// forward pass of base + adapter, not as the base.
#[test]
fn an_adapter_load_serves_base_plus_adapter() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft");
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = tmp.path().join("base");
    std::fs::create_dir_all(&base_dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join("base").join(f), base_dir.join(f)).unwrap();
    }
    let tok = Tokenizer::builtin_arithmetic();
    std::fs::write(base_dir.join("tokenizer.json"), tok.to_json()).unwrap();
    let server = serve_with(&base_dir, &["--admin-token", ADMIN]);
    let base = format!("http://{}", server.addr);
    let prompt = vec![1u32, 5, 7, 2, 9];
    let dev = candle_core::Device::Cpu;
    let plain = load_hf_folder(&base_dir, &dev).unwrap();
    let (before, before_lps) = served_greedy(&base, &prompt);
    assert_eq!(before, greedy_local(&plain, &prompt, 6));
    let adapter = fixture.join("adapter");
    let (s, v) = post(
        &format!("{base}/admin/load"),
        &json!({"path": adapter, "version": 3}),
        true,
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (&v["kind"], &v["grove_policy_version"]),
        (&json!("adapter"), &json!(3))
    );
    let with =
        grove::model::lora::load_onto(plain, &adapter, &base_dir.display().to_string()).unwrap();
    let want = &local(
        &with,
        &tok,
        std::slice::from_ref(&prompt),
        &SamplingParams::greedy(6),
        0,
    )[0];
    let (got, lps) = served_greedy(&base, &prompt);
    assert_eq!(got, want.tokens);
    for (a, b) in lps.iter().zip(&want.logprobs) {
        assert!((a - *b as f64).abs() < 1e-4, "log-prob {a} vs local {b}");
    }
    let moved = lps
        .iter()
        .zip(&before_lps)
        .any(|(a, b)| (a - b).abs() > 1e-6);
    assert!(
        moved || got != before,
        "the adapter changed nothing: {lps:?}"
    );
}

/// `sync.interval = 4` with `sync.max_staleness = 1`: the learner pushes on its own only every
/// 4 updates, so the staleness bound forces the pushes in between. No sample is more than one
/// version behind the learner that trains on it, some are exactly one behind (the run does
/// not simply push after every update), and the server loaded fewer versions than updates.
#[test]
fn max_staleness_forces_a_push_between_interval_pushes() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(tmp.path());
    let server = serve_with(&ckpt, &["--admin-token", ADMIN]);
    let base = format!("http://{}", server.addr);
    let out = tmp.path().join("remote-run");
    let steps = 8;
    let mut sets = remote_run_sets(&out, &base, &tmp.path().join("sync"), steps);
    sets.extend(["sync.interval=4".to_string(), "sync.max_staleness=1".into()]);
    let cfg = grove::config::load(None, &sets).unwrap();
    let summary = grove::train::run(cfg, &super::common::quiet()).unwrap();
    assert_eq!(summary.rl_steps_done, steps);

    let samples = grove::report::read_jsonl(&summary.run_dir.join("samples.jsonl")).unwrap();
    let rl: Vec<&Value> = samples.iter().filter(|v| v["phase"] == "rl").collect();
    assert_eq!(rl.len(), steps * 4);
    // The learner's version at step s is v0 + (s - s0): one update per step.
    let (v0, s0) = (
        rl[0]["policy_version"].as_u64().unwrap(),
        rl[0]["step"].as_u64().unwrap(),
    );
    let mut lags = vec![];
    for s in &rl {
        let learner = v0 + s["step"].as_u64().unwrap() - s0;
        let served = s["policy_version"].as_u64().unwrap();
        assert!(served <= learner, "{s}");
        lags.push(learner - served);
    }
    assert!(lags.iter().all(|&l| l <= 1), "staleness above 1: {lags:?}");
    assert!(
        lags.contains(&1),
        "no sample was one version behind: {lags:?}"
    );
    // The pushes: about one every second update (the bound forces them), fewer than the
    // 1 + steps that pushing after every update makes.
    let loads = get(&format!("{base}/metrics"))["loads"].as_u64().unwrap();
    assert!(
        (steps as u64 / 2..=steps as u64).contains(&loads),
        "{loads} loads for {steps} updates"
    );
}
