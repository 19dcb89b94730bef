//! Remote rollouts over loopback: `grove serve` on a checkpoint of a tiny training run,
//! queried by the remote engine and compared with the local engine; retries, timeouts and
//! missing log-probs against small fake servers in the test thread.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use grove::model::{io::load_hf_folder, Tokenizer};
use grove::rollout::remote::{request_seed, RemoteConfig, RemoteEngine};
use grove::rollout::{generate, Generation, SamplingParams};
use grove::train::explore::encode_prompt;
use grove::train::{run, TrainOptions};
use rand::SeedableRng;

/// A checkpoint of a one-step run (short warm-up): runs/NAME/checkpoints/step-1.
pub(crate) fn tiny_checkpoint(out: &Path) -> PathBuf {
    let sets: Vec<String> = [
        format!("output_dir={:?}", out.display().to_string()),
        "warmup.max_steps=20".into(),
        "warmup.eval_every=10".into(),
        "warmup.target_acc=1.0".into(),
        "rollout.prompts_per_step=4".into(),
        "rollout.group_size=4".into(),
        "train.steps=1".into(),
        "train.eval_every=1".into(),
        "train.eval_size=16".into(),
        "train.checkpoint_every=1".into(),
    ]
    .to_vec();
    let cfg = grove::config::load(None, &sets).unwrap();
    let s = run(
        cfg,
        &TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    s.run_dir.join("checkpoints/step-1")
}

/// A `grove serve` child process, killed on drop.
pub(crate) struct Served {
    pub(crate) child: Child,
    pub(crate) addr: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(ckpt: &Path) -> Served {
    serve_with(ckpt, &[])
}

/// `grove serve CKPT` with `extra` options.
pub(crate) fn serve_with(ckpt: &Path, extra: &[&str]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_grove"))
        .args(["serve", "--port", "0", "--quiet"])
        .args(extra)
        .arg(ckpt)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line of grove serve: {line:?}"))
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    Served { child, addr }
}

pub(crate) fn local(
    model: &grove::model::Llama,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    seed: u64,
) -> Vec<Generation> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    generate(model, prompts, tok.eos, tok.pad, params, &mut rng).unwrap()
}

fn assert_same(remote: &Generation, local: &Generation, what: &str) {
    assert_eq!(remote.tokens, local.tokens, "{what}: tokens");
    assert_eq!(remote.finished, local.finished, "{what}: finished");
    assert_eq!(remote.logprobs.len(), local.logprobs.len(), "{what}");
    for (a, b) in remote.logprobs.iter().zip(&local.logprobs) {
        assert!((a - b).abs() <= 1e-5, "{what}: log-prob {a} vs local {b}");
    }
}

#[test]
fn grove_serve_matches_the_local_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(tmp.path());
    let server = serve(&ckpt);
    let url = format!("http://{}", server.addr);
    // A request lost once in a full `cargo test` run (not reproduced since) cost the default
    // 300 s timeout before its retry succeeded; every request here takes well under a second.
    let timeout_s = 20.0;
    let mut c = RemoteConfig::new(url.clone());
    c.timeout_s = timeout_s;
    let engine = RemoteEngine::new(c).unwrap();
    let tok = Tokenizer::builtin_arithmetic();
    let model = load_hf_folder(&ckpt, &candle_core::Device::Cpu).unwrap();
    let prompts: Vec<Vec<u32>> = ["12+7=", "3*4=", "45-9=", "8+8="]
        .iter()
        .map(|p| encode_prompt(&tok, p).unwrap())
        .collect();

    // The model name comes from /v1/models (MODEL as given), with the checkpoint's version.
    assert_eq!(engine.model_name().unwrap(), ckpt.display().to_string());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json")).unwrap()).unwrap();
    assert_eq!(
        engine.policy_version().unwrap(),
        Some(state["version"].as_u64().unwrap())
    );

    // Greedy: every one of the n = 3 samples equals the local engine's greedy decode.
    let greedy = SamplingParams::greedy(6);
    let r = engine.generate(&tok, &prompts, 3, &greedy, 0).unwrap();
    assert_eq!(r.len(), 4 * 3);
    let l = local(&model, &tok, &prompts, &greedy, 0);
    for (k, g) in r.iter().enumerate() {
        assert_same(
            g,
            &l[k / 3],
            &format!("greedy prompt {} sample {}", k / 3, k % 3),
        );
    }
    assert!(
        r.iter().any(|g| !g.tokens.is_empty()),
        "responses are not empty"
    );

    // Sampling at temperature 1: each prompt's request carries seed request_seed(5, i), and
    // the server decodes its n copies as one batch from ChaCha8(seed); so does this check.
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: 6,
    };
    let n = 4;
    let r = engine.generate(&tok, &prompts, n, &params, 5).unwrap();
    assert_eq!(r.len(), prompts.len() * n);
    for (i, p) in prompts.iter().enumerate() {
        let l = local(
            &model,
            &tok,
            &vec![p.clone(); n],
            &params,
            request_seed(5, i, None),
        );
        for j in 0..n {
            assert_same(
                &r[i * n + j],
                &l[j],
                &format!("sampled prompt {i} sample {j}"),
            );
        }
    }
    let distinct: std::collections::HashSet<&Vec<u32>> = r.iter().map(|g| &g.tokens).collect();
    assert!(
        distinct.len() > prompts.len(),
        "samples differ within a group"
    );
    // Same seed, same answer; text prompts and vocabulary-string tokens give the same too.
    assert_eq!(engine.generate(&tok, &prompts, n, &params, 5).unwrap(), r);
    let mut c = RemoteConfig::new(url.clone());
    c.timeout_s = timeout_s;
    c.prompt_token_ids = false;
    c.return_token_ids = false;
    let by_text = RemoteEngine::new(c).unwrap();
    assert_eq!(by_text.generate(&tok, &prompts, n, &params, 5).unwrap(), r);

    // Bad requests: HTTP 400 naming the field, and the client reports it without retrying.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .post(&format!("{url}/v1/completions"))
        .send("{\"prompt\": \"1+1=\", \"max_tokens\": \"many\"}")
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: serde_json::Value =
        serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(body["error"]["param"], "max_tokens", "{body}");
    let mut resp = agent
        .post(&format!("{url}/v1/completions"))
        .send("{\"prompt\": [1, 5,")
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert!(resp
        .body_mut()
        .read_to_string()
        .unwrap()
        .contains("not valid JSON"));
    let too_long = SamplingParams::greedy(200);
    let e = engine
        .generate(&tok, &prompts[..1], 1, &too_long, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("HTTP 400") && e.contains("`max_tokens` = 200"),
        "{e}"
    );

    // `grove explore --remote` writes groups sampled by the server, tagged with its version.
    let out = tmp.path().join("remote.jsonl");
    let st = Command::new(env!("CARGO_BIN_EXE_grove"))
        .args(["explore", "--quiet", "--remote", &url, "--out"])
        .arg(&out)
        .args([
            "--groups",
            "3",
            "--set",
            "rollout.prompts_per_step=2",
            "--set",
            "rollout.group_size=3",
            "--set",
            "remote.timeout_s=20",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let groups = grove::buffer::jsonl::read_groups(&out).unwrap();
    assert_eq!(groups.len(), 3);
    for g in &groups {
        assert_eq!(g.experiences.len(), 3);
        assert_eq!(g.policy_version, state["version"].as_u64().unwrap());
        for e in &g.experiences {
            assert_eq!(e.logprobs.len(), e.response_ids.len());
            assert!(!e.response_ids.is_empty());
            assert!(e.logprobs.iter().all(|&x| x <= 0.0 && x.is_finite()));
        }
    }
}

/// Reads one HTTP/1.1 request (headers, then Content-Length bytes); returns its body.
fn read_request(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap() == 0 {
            break;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

/// A server that answers one connection per entry of `answers`, in order, then stops;
/// returns the request bodies it saw.
fn fake_server(answers: Vec<(u16, String)>) -> (String, std::thread::JoinHandle<Vec<String>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for (status, body) in answers {
            let (mut s, _) = l.accept().unwrap();
            seen.push(read_request(&mut s));
            write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
        seen
    });
    (url, h)
}

fn quick(url: &str, retries: u32) -> RemoteConfig {
    let mut c = RemoteConfig::new(url);
    c.model = "m".into();
    c.retries = retries;
    c.backoff_s = 0.05;
    c.timeout_s = 5.0;
    c
}

const ONE_SAMPLE: &str = r#"{"choices": [{"index": 0, "text": "12",
    "logprobs": {"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-0.5, -0.25]},
    "finish_reason": "stop"}]}"#;

#[test]
fn server_errors_are_retried_with_backoff() {
    let busy = r#"{"error": {"message": "overloaded"}}"#.to_string();
    let (url, h) = fake_server(vec![
        (503, busy.clone()),
        (500, busy),
        (200, ONE_SAMPLE.to_string()),
    ]);
    let tok = Tokenizer::builtin_arithmetic();
    let engine = RemoteEngine::new(quick(&url, 2)).unwrap();
    let t = Instant::now();
    let g = engine
        .generate(&tok, &[vec![1, 5]], 1, &SamplingParams::greedy(2), 9)
        .unwrap();
    // Back-off 0.05 s, then 0.1 s.
    assert!(t.elapsed() >= Duration::from_millis(150));
    assert_eq!(
        g[0].tokens,
        vec![5, 6, 2],
        "EOS appended after finish_reason stop"
    );
    assert_eq!(g[0].logprobs, vec![-0.5, -0.25, 0.0]);
    let seen = h.join().unwrap();
    assert_eq!(seen.len(), 3);
    let req: serde_json::Value = serde_json::from_str(&seen[2]).unwrap();
    assert_eq!(req["prompt"], serde_json::json!([1, 5]));
    assert_eq!(req["logprobs"], 1);
    assert_eq!(req["n"], 1);
    assert_eq!(req["max_tokens"], 2);
    assert_eq!(req["temperature"], 0.0);
    assert_eq!(req["return_tokens_as_token_ids"], true);
    assert_eq!(req["seed"], request_seed(9, 0, None));
}

#[test]
fn server_down_retries_then_fails_clearly() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // closed again: nothing listens there now
    let url = format!("http://127.0.0.1:{port}");
    let tok = Tokenizer::builtin_arithmetic();
    let engine = RemoteEngine::new(quick(&url, 2)).unwrap();
    let t = Instant::now();
    let e = engine
        .generate(&tok, &[vec![1, 5]], 1, &SamplingParams::greedy(2), 0)
        .unwrap_err()
        .to_string();
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "backed off twice"
    );
    assert!(
        e.contains(&format!("POST {url}/v1/completions"))
            && e.contains("after 3 attempt(s) (2 retries"),
        "{e}"
    );
    // A model name asked of a dead server fails the same way.
    let mut c = quick(&url, 0);
    c.model = String::new();
    let e = RemoteEngine::new(c)
        .unwrap()
        .model_name()
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("GET {url}/v1/models")), "{e}");
}

#[test]
fn a_silent_server_times_out() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    // Accepts connections and never answers.
    let h = std::thread::spawn(move || {
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(l.accept().unwrap().0);
        }
        std::thread::sleep(Duration::from_secs(2));
    });
    let mut c = quick(&url, 1);
    c.timeout_s = 0.3;
    let tok = Tokenizer::builtin_arithmetic();
    let e = RemoteEngine::new(c)
        .unwrap()
        .generate(&tok, &[vec![1]], 1, &SamplingParams::greedy(1), 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("timed out after 0.3 s") && e.contains("2 attempt(s)"),
        "{e}"
    );
    h.join().unwrap();
}

#[test]
fn a_server_without_logprobs_is_a_clear_error() {
    let no_lp = r#"{"choices": [{"index": 0, "text": "12", "logprobs": null,
                    "finish_reason": "length"}]}"#;
    let (url, h) = fake_server(vec![(200, no_lp.to_string())]);
    let tok = Tokenizer::builtin_arithmetic();
    let e = RemoteEngine::new(quick(&url, 3))
        .unwrap()
        .generate(&tok, &[vec![1, 5]], 1, &SamplingParams::greedy(2), 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no log-probs") && e.contains("`choices[0].logprobs` is null"),
        "{e}"
    );
    assert_eq!(h.join().unwrap().len(), 1, "not retried");
}

/// Third-party check, run by hand against llama-cpp-python's server on the tiny GGUF:
///
/// ```sh
/// python3 -m llama_cpp.server --model ../shared/data/models/llama-tiny-random-gguf/llama-2-tiny-random.gguf --port 8123 &
/// GROVE_LLAMA_CPP_URL=http://127.0.0.1:8123 cargo test --release --test train -- --ignored --nocapture llama_cpp
/// ```
///
/// That server takes text prompts only and ignores `n`, so the client sends text and splits `n`.
/// grove loads the same GGUF (dequantized to f32, Q/K rows unpermuted) and greedy decoding
/// must pick the same tokens with log-probs within 1e-3 (llama.cpp computes in its own kernels).
/// Token ids are recovered from token strings (this server has no token-id option), which fails,
/// clearly, on byte-fallback tokens that it sends as "".
#[test]
#[ignore = "needs a running llama_cpp.server; see the doc comment"]
fn llama_cpp_server_agrees_with_grove_on_the_same_gguf() {
    use grove::model::gguf;
    let url = std::env::var("GROVE_LLAMA_CPP_URL")
        .expect("set GROVE_LLAMA_CPP_URL to the base URL of a running llama_cpp.server");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/models/llama-tiny-random-gguf/llama-2-tiny-random.gguf"
    );
    let bytes = std::fs::read(path).unwrap();
    let f = gguf::read_gguf(&bytes, path).unwrap();
    let cfg =
        grove::model::Config::from_json(&gguf::llama_config_json(&f).unwrap().to_string(), path)
            .unwrap();
    let mut tensors = std::collections::HashMap::new();
    for t in &f.tensors {
        let Some(name) = gguf::hf_name(&t.name) else {
            continue;
        };
        let shape = gguf::hf_shape(t);
        let mut data = gguf::dequantize(&f, &bytes, t).unwrap();
        if gguf::qk_permuted(&f) && (name.contains("q_proj") || name.contains("k_proj")) {
            let heads = if name.contains("q_proj") {
                cfg.num_attention_heads
            } else {
                cfg.num_kv_heads()
            };
            let cols = shape.get(1).copied().unwrap_or(1);
            data = gguf::unpermute_qk(&data, shape[0], cols, heads).unwrap();
        }
        let t = candle_core::Tensor::from_vec(data, shape, &candle_core::Device::Cpu).unwrap();
        tensors.insert(name, t);
    }
    let model =
        grove::model::Llama::from_tensors(&cfg, tensors, &candle_core::Device::Cpu, path).unwrap();
    let sp = gguf::special_tokens(&f).unwrap();
    let tok = Tokenizer::from_json(
        gguf::tokenizer_json(&f).unwrap(),
        path,
        sp.bos.as_deref(),
        &sp.eos,
        sp.pad.as_deref(),
    )
    .unwrap();
    let prompts: Vec<Vec<u32>> = ["Hello world", "The quick brown fox jumps"]
        .iter()
        .map(|p| encode_prompt(&tok, p).unwrap())
        .collect();
    let mut c = RemoteConfig::new(url);
    c.prompt_token_ids = false;
    c.split_n = true;
    c.retries = 0;
    let engine = RemoteEngine::new(c).unwrap();
    println!(
        "model name from /v1/models: {}",
        engine.model_name().unwrap()
    );

    let greedy = SamplingParams::greedy(8);
    let remote = engine.generate(&tok, &prompts, 2, &greedy, 0).unwrap();
    let local = local(&model, &tok, &prompts, &greedy, 0);
    let mut worst = 0f32;
    for (k, r) in remote.iter().enumerate() {
        let l = &local[k / 2];
        println!(
            "greedy prompt {} sample {}: llama.cpp {:?} {:?} finished {}\n                        grove     {:?} {:?} finished {}",
            k / 2,
            k % 2,
            r.tokens,
            r.logprobs,
            r.finished,
            l.tokens,
            l.logprobs,
            l.finished
        );
        assert_eq!(r.tokens, l.tokens, "greedy tokens, prompt {}", k / 2);
        for (a, b) in r.logprobs.iter().zip(&l.logprobs) {
            worst = worst.max((a - b).abs());
        }
    }
    println!("largest |log-prob difference|, greedy: {worst:e}");
    assert!(worst < 1e-3, "{worst}");

    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: 8,
    };
    let sampled = engine.generate(&tok, &prompts, 3, &params, 1).unwrap();
    assert_eq!(sampled.len(), 6);
    for (k, g) in sampled.iter().enumerate() {
        println!(
            "sampled prompt {} sample {}: {:?} {:?} finished {}",
            k / 3,
            k % 3,
            g.tokens,
            g.logprobs,
            g.finished
        );
        assert_eq!(g.tokens.len(), g.logprobs.len());
    }
    assert_eq!(
        engine.generate(&tok, &prompts, 3, &params, 1).unwrap(),
        sampled,
        "same seeds, same samples"
    );
    // llama-cpp-python sends a byte-fallback token (<0xE5>, ...) as the empty string (it drops
    // partial UTF-8), which names no token: long samples from this random model hit one.
    let long = SamplingParams {
        max_new_tokens: 300,
        ..params
    };
    match engine.generate(&tok, &prompts[..1], 4, &long, 2) {
        Ok(g) => println!(
            "300-token samples mapped completely: {:?}",
            g.iter().map(|x| x.tokens.len()).collect::<Vec<_>>()
        ),
        Err(e) => {
            let e = e.to_string();
            println!("300-token samples: {e}");
            assert!(
                e.contains("= \"\" is not in grove's tokenizer vocabulary"),
                "{e}"
            );
        }
    }
}
