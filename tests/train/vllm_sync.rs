//! vLLM as the rollout engine of a training run: grove pushes each new policy to a real vLLM
//! server (the CPU build installed by .ci/install-vllm.sh) and tags every experience with
//! the version vLLM serves. One server is shared by the checks (it takes 30–45 s to start):
//! a LoRA run pushes adapters, a full-weight run reloads weights, and a last run loses its
//! server mid-run. A missing vLLM install fails these tests; it does not skip them.
//!
//! vLLM runs with `--dtype float32` on the float32 fixture: it then serves exactly the weights
//! grove trains, so its greedy tokens must equal grove's own forward pass token for token.
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use grove::model::io::{load_hf_folder, load_pretrained_tokenizer};
use grove::model::{Llama, Tokenizer};
use grove::rollout::SamplingParams;
use serde_json::{json, Value};

use super::killed_server::{assert_stopped_by_dead_server, wait_for_step1_checkpoint};
use super::remote::local;

const SERVED_NAME: &str = "base";
/// vLLM's start-up takes 30–45 s on an idle 2-core machine; CI machines are busier.
const START_LIMIT: Duration = Duration::from_secs(300);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's python (`GROVE_VLLM_PYTHON` overrides), or a failure saying how to install it.
fn vllm_python() -> PathBuf {
    let p = std::env::var_os("GROVE_VLLM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".ci/vllm-venv/bin/python"));
    let ok = Command::new(&p)
        .args(["-c", "import vllm, transformers"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import vllm and transformers: run .ci/install-vllm.sh (or set \
         GROVE_VLLM_PYTHON)",
        p.display()
    );
    p
}

/// The tiny untied and tied Qwen2 folders (tests/fixtures/make_tiny_qwen2.py).
fn tiny_qwen2(python: &Path, out: &Path) -> (PathBuf, PathBuf) {
    let st = Command::new(python)
        .arg(repo().join("tests/fixtures/make_tiny_qwen2.py"))
        .arg(out)
        .arg(repo().join("../shared/data/tokenizers/qwen2/tokenizer.json.gz"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "make_tiny_qwen2.py failed");
    (out.join("untied"), out.join("tied"))
}

/// A vLLM server in its own process group (vLLM forks its engine), killed with it on drop.
struct Vllm {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Vllm {
    fn start(python: &Path, model: &Path, log: &Path) -> Vllm {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(python)
            .args(["-m", "vllm.entrypoints.openai.api_server", "--model"])
            .arg(model)
            .args(["--served-model-name", SERVED_NAME, "--host", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .args([
                "--dtype",
                "float32",
                "--enforce-eager",
                "--max-model-len",
                "512",
            ])
            .args(["--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"])
            .envs([
                ("VLLM_CPU_KVCACHE_SPACE", "1"),
                ("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
                ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True"),
                ("VLLM_SERVER_DEV_MODE", "1"),
                ("HF_HUB_OFFLINE", "1"),
                ("VLLM_NO_USAGE_STATS", "1"),
                ("DO_NOT_TRACK", "1"),
            ])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap();
        let mut server = Vllm {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log: log.to_path_buf(),
        };
        let t = Instant::now();
        loop {
            if let Ok(Some(st)) = server.child.try_wait() {
                panic!("vLLM exited ({st}) before serving:\n{}", server.log_tail());
            }
            let up = agent()
                .get(&format!("{}/health", server.url))
                .call()
                .is_ok_and(|r| r.status() == 200);
            if up {
                return server;
            }
            assert!(
                t.elapsed() < START_LIMIT,
                "vLLM did not answer /health within {START_LIMIT:?}:\n{}",
                server.log_tail()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGKILL to the whole group (the API server and its engine process).
    fn kill(&mut self) {
        let pid = self.child.id() as i32;
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Vllm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// POST `body` to the server's `path`: the answer's text, after checking it is a 200.
fn post(url: &str, path: &str, body: &Value) -> String {
    let mut resp = agent()
        .post(&format!("{url}{path}"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    assert_eq!(status, 200, "POST {path}: {text}");
    text
}

/// vLLM's greedy answer for `prompt` from served model `model`: (tokens, log-probs, the
/// answer's `model`).
fn served_greedy(url: &str, model: &str, prompt: &[u32]) -> (Vec<u32>, Vec<f64>, String) {
    let body = json!({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                      "logprobs": 1, "return_tokens_as_token_ids": true});
    let v: Value = serde_json::from_str(&post(url, "/v1/completions", &body)).unwrap();
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap()["token_id:".len()..].parse().unwrap())
        .collect();
    let lps = lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    (tokens, lps, v["model"].as_str().unwrap().to_string())
}

fn prompts(tok: &Tokenizer) -> Vec<Vec<u32>> {
    ["12+7=", "The quick brown fox", "3*4="]
        .iter()
        .map(|p| tok.encode(p).unwrap())
        .collect()
}

/// vLLM's greedy answers for `model` equal grove's forward pass of `policy` on every prompt
/// (tokens; log-probs within 1e-3: two float32 implementations); returns the tokens.
fn assert_serves(
    url: &str,
    model: &str,
    policy: &Llama,
    tok: &Tokenizer,
    what: &str,
) -> Vec<Vec<u32>> {
    let mut all = vec![];
    for p in prompts(tok) {
        let (got, lps, answered) = served_greedy(url, model, &p);
        assert_eq!(answered, model, "{what}: the answer names another model");
        let want = &local(
            policy,
            tok,
            std::slice::from_ref(&p),
            &SamplingParams::greedy(8),
            0,
        )[0];
        assert_eq!(
            got, want.tokens,
            "{what}: vLLM's greedy tokens vs grove's forward pass"
        );
        for (a, b) in lps.iter().zip(&want.logprobs) {
            assert!(
                (a - *b as f64).abs() < 1e-3,
                "{what}: log-prob {a} vs grove {b}"
            );
        }
        all.push(got);
    }
    all
}

/// The settings of a run of `steps` steps on `model` sampling through vLLM at `url`.
fn run_sets(out: &Path, model: &Path, url: &str, sync: &Path, steps: usize) -> Vec<String> {
    vec![
        format!("output_dir={:?}", out.display().to_string()),
        format!("model.source={:?}", model.display().to_string()),
        "task.heldout_size=4".into(),
        "rollout.prompts_per_step=2".into(),
        "rollout.group_size=3".into(),
        "rollout.max_new_tokens=6".into(),
        // The reference answer as each group's last response: reward 1 in every group, so
        // every update moves the weights although a random model never solves a problem.
        "sampling.inject_ground_truth=true".into(),
        format!("train.steps={steps}"),
        format!("train.eval_every={steps}"),
        "train.eval_size=2".into(),
        "train.checkpoint_every=1".into(),
        "train.log_samples=2".into(),
        "train.lr_warmup_steps=0".into(),
        format!("remote.url={url:?}"),
        "remote.engine=\"vllm\"".into(),
        "remote.timeout_s=120".into(),
        format!("sync.publish_dir={:?}", sync.display().to_string()),
    ]
}

/// [`run_sets`] for the server this test started (named [`SERVED_NAME`]).
fn vllm_run_sets(out: &Path, model: &Path, url: &str, sync: &Path, steps: usize) -> Vec<String> {
    let mut sets = run_sets(out, model, url, sync, steps);
    sets.push(format!("remote.model={SERVED_NAME:?}"));
    sets
}

/// Every step was sampled from the weights the learner had: the importance ratios
/// π_grove / π_vLLM of the sampled tokens are 1 up to float rounding (a stale server would
/// put them far from 1 after these large updates).
fn assert_on_policy(run_dir: &Path) -> usize {
    let updates = update_lines(run_dir);
    for l in &updates {
        let (mean, max) = (
            l["is/ratio_mean"].as_f64().unwrap(),
            l["is/ratio_max"].as_f64().unwrap(),
        );
        assert!(
            (mean - 1.0).abs() < 1e-2 && max < 1.01,
            "step {}: ratio mean {mean}, max {max}",
            l["step"]
        );
    }
    updates.len()
}

/// The metrics lines of the run's updates (evaluations write lines of their own).
fn update_lines(run_dir: &Path) -> Vec<Value> {
    super::common::rl_lines(run_dir)
        .into_iter()
        .filter(|l| l.get("is/ratio_mean").is_some())
        .collect()
}

/// Every RL sample's `policy_version` is the version pushed before its step: v0 + step index.
fn assert_samples_carry_pushed_versions(run_dir: &Path, steps: u64) -> u64 {
    let samples = grove::report::read_jsonl(&run_dir.join("samples.jsonl")).unwrap();
    let rl: Vec<&Value> = samples.iter().filter(|v| v["phase"] == "rl").collect();
    assert_eq!(rl.len() as u64, steps * 2, "2 logged prompts per step");
    let v0 = rl[0]["policy_version"].as_u64().unwrap();
    let s0 = rl[0]["step"].as_u64().unwrap();
    for s in &rl {
        let step = s["step"].as_u64().unwrap();
        assert_eq!(s["policy_version"].as_u64().unwrap(), v0 + step - s0, "{s}");
    }
    v0
}

/// Consecutive versions answer differently on at least one prompt.
fn assert_each_push_changes_output(answers: &[Vec<Vec<u32>>], what: &str) {
    for (k, w) in answers.windows(2).enumerate() {
        assert_ne!(
            w[0],
            w[1],
            "{what}: versions {k} and {} answer alike",
            k + 1
        );
    }
}

/// A LoRA run pushes each adapter to vLLM under a name that carries its version; a full run
/// reloads the weights after every update; both tag every sample with the served version,
/// and vLLM's greedy output changes with each push and equals grove's forward pass of the
/// pushed policy. Then vLLM is killed under a third run, which stops naming the server and
/// keeps everything it wrote.
#[test]
fn vllm_follows_the_policy_and_a_killed_server_stops_the_run() {
    let python = vllm_python();
    let tmp = tempfile::tempdir().unwrap();
    let (untied, tied) = tiny_qwen2(&python, &tmp.path().join("models"));
    let mut server = Vllm::start(&python, &untied, &tmp.path().join("vllm.log"));
    let url = server.url.clone();
    let dev = candle_core::Device::Cpu;
    let tok = load_pretrained_tokenizer(&untied).unwrap();
    let base = load_hf_folder(&untied, &dev).unwrap();
    let source = untied.display().to_string();

    // Tied embeddings: vLLM's reload would serve wrong text, so grove refuses to push.
    let mut sets = vllm_run_sets(
        &tmp.path().join("tied"),
        &tied,
        &url,
        &tmp.path().join("s"),
        1,
    );
    sets.push("train.steps=1".into());
    let e = grove::train::run(
        grove::config::load(None, &sets).unwrap(),
        &super::common::quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("tie_word_embeddings") && e.contains("remote.engine"),
        "{e}"
    );

    // LoRA: adapters v0 (B = 0: the base), v1, v2.
    let sync = tmp.path().join("sync-lora");
    let mut sets = vllm_run_sets(&tmp.path().join("lora"), &untied, &url, &sync, 2);
    sets.extend([
        "model.lora.rank=8".into(),
        "model.lora.alpha=16".into(),
        "train.lr=0.2".into(),
    ]);
    let s = grove::train::run(
        grove::config::load(None, &sets).unwrap(),
        &super::common::quiet(),
    )
    .unwrap();
    assert_eq!(s.rl_steps_done, 2);
    let v0 = assert_samples_carry_pushed_versions(&s.run_dir, 2);
    assert_eq!(assert_on_policy(&s.run_dir), 2);
    let mut answers = vec![assert_serves(&url, SERVED_NAME, &base, &tok, "base")];
    for v in [v0 + 1, v0 + 2] {
        let name = format!("grove-policy-v{v}");
        let adapter = sync.join(format!("v{v}"));
        if v == v0 + 1 {
            // Retired by the next push: load it again to look at it.
            post(
                &url,
                "/v1/load_lora_adapter",
                &json!({"lora_name": name, "lora_path": adapter}),
            );
        }
        let policy =
            grove::model::lora::load_onto(base.deep_clone().unwrap(), &adapter, &source).unwrap();
        answers.push(assert_serves(&url, &name, &policy, &tok, &name));
    }
    assert_each_push_changes_output(&answers, "LoRA");

    // Full weights: v0 (the fixture's weights), v1, v2 by reload_weights.
    let sync = tmp.path().join("sync-full");
    let mut sets = vllm_run_sets(&tmp.path().join("full"), &untied, &url, &sync, 2);
    sets.push("train.lr=0.05".into());
    let s = grove::train::run(
        grove::config::load(None, &sets).unwrap(),
        &super::common::quiet(),
    )
    .unwrap();
    let v0 = assert_samples_carry_pushed_versions(&s.run_dir, 2);
    assert_eq!(assert_on_policy(&s.run_dir), 2);
    let mut answers = vec![];
    for (v, dir) in [
        (v0 + 2, sync.join(format!("v{}", v0 + 2))),
        (v0 + 1, sync.join(format!("v{}", v0 + 1))),
        (v0, untied.clone()),
    ] {
        if v != v0 + 2 {
            post(
                &url,
                "/collective_rpc",
                &json!({"method": "reload_weights", "kwargs": {"weights_path": dir}}),
            );
            post(&url, "/reset_prefix_cache", &json!({}));
        }
        let policy = load_hf_folder(&dir, &dev).unwrap();
        answers.push(assert_serves(
            &url,
            SERVED_NAME,
            &policy,
            &tok,
            &format!("full v{v}"),
        ));
    }
    assert_each_push_changes_output(&answers, "full weights");

    // The server dies mid-run: the run stops after its retry, naming the server, and keeps
    // its metrics, samples and step-1 checkpoint.
    let out = tmp.path().join("killed");
    let mut sets = vllm_run_sets(&out, &untied, &url, &tmp.path().join("sync-killed"), 500);
    sets.extend([
        "remote.retries=1".into(),
        "remote.backoff_s=0.1".into(),
        "remote.timeout_s=10".into(),
    ]);
    let cfg = grove::config::load(None, &sets).unwrap();
    let run = std::thread::spawn(move || grove::train::run(cfg, &super::common::quiet()));
    let step1 = wait_for_step1_checkpoint(&out);
    server.kill();
    let e = run.join().unwrap().unwrap_err().to_string();
    assert_stopped_by_dead_server(&e, &url, &step1, 500);
}

/// The processes whose command line has each of `args` as one of its arguments.
fn pids_with_args(args: &[&str]) -> Vec<i32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let has = |a: &str| cmdline.split(|&b| b == 0).any(|x| x == a.as_bytes());
        if args.iter().all(|a| has(a)) {
            out.push(pid);
        }
    }
    out
}

/// grove starts vLLM itself (`remote.launch`) on a model with tied embeddings, whose weights
/// vLLM cannot reload: each push restarts it on the new folder under a name carrying the
/// version, which every answer echoes, so each step's samples carry the version that
/// produced them and match the learner's weights. Killing the server mid-run stops the run
/// with the server's exit and the end of its log, keeps what was written, and leaves no
/// server process behind.
#[test]
fn grove_launches_vllm_and_restarts_it_for_tied_embeddings() {
    let python = vllm_python();
    let tmp = tempfile::tempdir().unwrap();
    let (_, tied) = tiny_qwen2(&python, &tmp.path().join("models"));
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let sync = tmp.path().join("sync");
    let out = tmp.path().join("launched");
    let mut sets = run_sets(&out, &tied, &url, &sync, 500);
    // The user names the program; `env` sets vLLM's CPU settings for it.
    let command = json!([
        "env",
        "VLLM_CPU_KVCACHE_SPACE=1",
        "VLLM_CPU_OMP_THREADS_BIND=nobind",
        "HF_HUB_OFFLINE=1",
        "VLLM_NO_USAGE_STATS=1",
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "512"
    ]);
    sets.extend([
        "remote.launch=\"vllm\"".to_string(),
        format!("remote.launch_command={command}"),
        "remote.launch_timeout_s=300".into(),
        "remote.retries=1".into(),
        "remote.backoff_s=0.1".into(),
        "train.lr=0.05".into(),
    ]);
    let cfg = grove::config::load(None, &sets).unwrap();
    let run = std::thread::spawn(move || grove::train::run(cfg, &super::common::quiet()));
    // v0's server samples step 1, v1's (restarted) step 2. Then kill the server grove starts
    // for v0 + 2, as soon as it appears: killing an older one could race with grove's own
    // stop before a restart, and the run would go on.
    let t = Instant::now();
    let limit = Duration::from_secs(900);
    let run_dir = loop {
        let dir = std::fs::read_dir(&out)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.path());
        let logged = dir.as_ref().map_or(0, |d| rl_sample_steps(d).len());
        if logged >= 4 {
            break dir.unwrap();
        }
        if run.is_finished() {
            panic!("the run ended early: {:?}", run.join().unwrap().err());
        }
        assert!(t.elapsed() < limit, "no samples of step 2");
        std::thread::sleep(Duration::from_millis(5));
    };
    let port_arg = port.to_string();
    let third = format!("grove-policy-v{}", rl_sample_steps(&run_dir)[0].1 + 2);
    let pids = loop {
        let pids = pids_with_args(&[&port_arg, &third]);
        if !pids.is_empty() {
            break pids;
        }
        if run.is_finished() {
            panic!("the run ended early: {:?}", run.join().unwrap().err());
        }
        assert!(t.elapsed() < limit, "grove started no server for {third}");
        std::thread::sleep(Duration::from_millis(5));
    };
    for pid in &pids {
        unsafe {
            libc::kill(*pid, libc::SIGKILL);
        }
    }
    let e = run.join().unwrap().unwrap_err().to_string();
    assert!(
        e.contains(&url) && e.contains("the server grove launched exited"),
        "{e}"
    );
    assert!(e.contains("server.log"), "{e}");
    let versions = rl_sample_steps(&run_dir);
    let (s0, v0) = versions[0];
    assert_eq!(
        versions[..4],
        [(s0, v0), (s0, v0), (s0 + 1, v0 + 1), (s0 + 1, v0 + 1)],
        "two logged groups per step, each from the version its server was started on"
    );
    assert!(run_dir.join("checkpoints/step-1").exists());
    // Step 2's metrics line would follow its push, which the kill stopped.
    assert!(assert_on_policy(&run_dir) >= 1);
    // Both versions were served under their own names.
    let log = std::fs::read_to_string(sync.join("server.log")).unwrap();
    for v in [v0, v0 + 1] {
        assert!(
            log.contains(&format!("grove-policy-v{v}")),
            "server.log names no v{v}"
        );
    }
    assert!(
        pids_with_args(&[&port_arg]).is_empty(),
        "a server process outlived the run"
    );
}

/// (step, policy_version) of every RL sample a run has written so far.
fn rl_sample_steps(run_dir: &Path) -> Vec<(u64, u64)> {
    let Ok(text) = std::fs::read_to_string(run_dir.join("samples.jsonl")) else {
        return vec![];
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["phase"] == "rl")
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["policy_version"].as_u64().unwrap(),
            )
        })
        .collect()
}
