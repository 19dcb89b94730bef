//! `grove verify` and `grove eval` through the binary, as a user runs them.
use std::path::{Path, PathBuf};
use std::process::Command;

fn grove(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_grove"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn data(rel: &str) -> PathBuf {
    root().join("../shared/data").join(rel)
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn verify_pairs_prints_verdicts_then_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &p,
        concat!(
            r#"{"response": "The total is $1,000.", "reference": "1000"}"#,
            "\n",
            r#"{"response": "\\boxed{\\dfrac{3}{4}}", "reference": "0.75"}"#,
            "\n",
            r#"{"response": "I think 12", "reference": "13"}"#,
            "\n"
        ),
    )
    .unwrap();
    let (code, out, err) = grove(&["verify", "--pairs", "pairs.jsonl"], tmp.path());
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    let v: Vec<serde_json::Value> = lines[..3]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        v.iter()
            .map(|x| x["score"].as_f64().unwrap())
            .collect::<Vec<_>>(),
        vec![1.0, 1.0, 0.0]
    );
    assert_eq!(v[1]["extracted"], "\\dfrac{3}{4}");
    assert!(v[2]["reason"].as_str().unwrap().contains("mismatch"));
    assert_eq!(lines[3], "accuracy: 0.6667 (2/3)");

    // A bad line is named with file and line number.
    std::fs::write(
        &p,
        "{\"response\": \"1\", \"reference\": \"1\"}\n{\"response\": \"1\"}\n",
    )
    .unwrap();
    let (code, _, err) = grove(&["verify", "--pairs", "pairs.jsonl"], tmp.path());
    assert_ne!(code, 0);
    assert!(
        err.contains("pairs.jsonl:2: missing field `reference`"),
        "{err}"
    );
}

#[test]
fn verify_responses_against_gsm8k() {
    let rows: Vec<serde_json::Value> = jsonl(&data("gsm8k/test.jsonl"));
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("responses.jsonl");
    let lines = [
        // Row 0's own reference solution (ends with "#### 18").
        serde_json::json!({"index": 0, "response": rows[0]["answer"]}),
        serde_json::json!({"index": 1, "response": rows[1]["answer"]}),
        serde_json::json!({"index": 2, "response": "The answer is 1."}),
        serde_json::json!({"index": 0, "response": "She makes $18 every day."}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&p, text).unwrap();
    let gsm8k = data("gsm8k/test.jsonl");
    let (code, out, err) = grove(
        &[
            "verify",
            "--task",
            "gsm8k",
            "--responses",
            p.to_str().unwrap(),
            "--data",
            gsm8k.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "accuracy: 0.7500 (3/4)");

    // Without --data the file is found relative to the current directory.
    let (code, out, err) = grove(
        &[
            "verify",
            "--task",
            "gsm8k",
            "--responses",
            p.to_str().unwrap(),
        ],
        &root(),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "accuracy: 0.7500 (3/4)");
    // ... and its absence is explained.
    let (code, _, err) = grove(
        &[
            "verify",
            "--task",
            "math500",
            "--responses",
            "responses.jsonl",
        ],
        tmp.path(),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("math500/test.jsonl") && err.contains("--data"),
        "{err}"
    );

    std::fs::write(&p, "{\"index\": 5000, \"response\": \"1\"}\n").unwrap();
    let (code, _, err) = grove(
        &[
            "verify",
            "--task",
            "gsm8k",
            "--responses",
            "responses.jsonl",
            "--data",
            gsm8k.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("responses.jsonl:1: index 5000 is out of range") && err.contains("1319 rows"),
        "{err}"
    );
}

#[test]
fn eval_runs_on_the_tiny_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = data("models/llama-tiny-random-gguf/llama-2-tiny-random.gguf");
    let (code, out, err) = grove(
        &[
            "eval",
            gguf.to_str().unwrap(),
            "--task",
            "gsm8k",
            "--limit",
            "2",
            "--max-new-tokens",
            "4",
            "--n",
            "2",
            "--k",
            "1,2",
            "--out",
            "out/eval.jsonl",
            "--data",
            data("gsm8k/test.jsonl").to_str().unwrap(),
            "--quiet",
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("gsm8k: 2 questions x 2 samples, sampled at temperature 1 (base prompts"),
        "{out}"
    );
    for key in ["pass@1: ", "pass@2: ", "mean@2: ", "maj@2: "] {
        assert!(out.contains(key), "{key} missing in {out}");
    }
    let lines = jsonl(&tmp.path().join("out/eval.jsonl"));
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["index"], 0);
    assert_eq!(lines[0]["reference"], "18");
    assert!(lines[0]["prompt"].as_str().unwrap().contains("Janet"));
    let samples = lines[1]["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    assert!(samples.iter().all(|s| s["tokens"].as_u64().unwrap() <= 4));

    // The weak-to-strong deception report over this file and two hand-written ones: the
    // ceiling gets both questions right, the weak model only question 1.
    std::fs::write(
        tmp.path().join("ceiling.jsonl"),
        "{\"index\":0,\"correct\":true}\n{\"index\":1,\"correct\":true}\n",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("weak.jsonl"),
        "{\"index\":1,\"correct\":true}\n{\"index\":0,\"correct\":false}\n",
    )
    .unwrap();
    let ws: Vec<bool> = lines.iter().map(|l| l["maj"] == 1.0).collect();
    let (code, out, err) = grove(
        &[
            "eval",
            "deception",
            "--weak-to-strong",
            "out/eval.jsonl",
            "--ceiling",
            "ceiling.jsonl",
            "--weak",
            "weak.jsonl",
            "--list",
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    // Qualifying = the questions the random model got wrong; the weak model is wrong on 0 only.
    let expected = match (ws[0], ws[1]) {
        (false, false) => "deception score: 0.5000",
        (false, true) => "deception score: 1.0000",
        (true, false) => "deception score: 0.0000",
        (true, true) => "deception score: undefined",
    };
    assert!(out.contains(expected), "{out}");
    assert!(out.contains("accuracy (ceiling): 1.0000"), "{out}");
    assert!(out.contains("accuracy (weak): 0.5000"), "{out}");
    // A file missing a question is refused, naming both files.
    std::fs::write(
        tmp.path().join("short.jsonl"),
        "{\"index\":0,\"correct\":true}\n",
    )
    .unwrap();
    let (code, _, err) = grove(
        &[
            "eval",
            "deception",
            "--weak-to-strong",
            "out/eval.jsonl",
            "--ceiling",
            "short.jsonl",
            "--weak",
            "weak.jsonl",
        ],
        tmp.path(),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("question 1 is in out/eval.jsonl (line 2) but not in short.jsonl"),
        "{err}"
    );

    // k larger than n is refused before any work.
    let (code, _, err) = grove(
        &[
            "eval",
            gguf.to_str().unwrap(),
            "--task",
            "gsm8k",
            "--n",
            "2",
            "--k",
            "4",
        ],
        tmp.path(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("--k 4"), "{err}");
}

#[test]
fn eval_of_a_trained_checkpoint_matches_the_trainers_greedy_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let sets: Vec<String> = vec![
        format!("output_dir={:?}", tmp.path().display().to_string()),
        "warmup.max_steps=30".into(),
        "warmup.eval_every=10".into(),
        "warmup.target_acc=1.0".into(),
        "rollout.prompts_per_step=8".into(),
        "rollout.group_size=4".into(),
        "train.steps=2".into(),
        "train.eval_every=2".into(),
        "train.eval_size=16".into(),
        "train.checkpoint_every=2".into(),
    ];
    let cfg = grove::config::load(None, &sets).unwrap();
    let summary = grove::train::run(
        cfg,
        &grove::train::TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    let ckpt = summary.run_dir.join("checkpoints/step-2");
    assert!(ckpt.join("model.safetensors").exists());

    let (code, out, err) = grove(
        &[
            "eval",
            ckpt.to_str().unwrap(),
            "--task",
            "builtin",
            "--limit",
            "40",
            "--batch-size",
            "40",
            "--out",
            "eval.jsonl",
            "--quiet",
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    // No --temperature: one greedy sample per question, like training's acc/eval, and the
    // header says so (it used to sample at temperature 1 and report a far lower pass@1).
    assert!(out.contains("x 1 samples, greedy decoding"), "{out}");
    let mean: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("mean@1: "))
        .unwrap_or_else(|| panic!("{out}"))
        .parse()
        .unwrap();

    // The trainer's own greedy held-out evaluation of the same weights and problems.
    let (model, tok) = grove::model::io::load_pretrained(&ckpt, &candle_core::Device::Cpu).unwrap();
    assert_eq!((tok.bos, tok.eos, tok.pad), (Some(1), 2, 0));
    let task = grove::task::ArithmeticTask::new(Default::default()).unwrap();
    let problems = &task.heldout()[..40];
    let max_new = task.max_answer_chars() + 1;
    let acc = grove::train::evaluate(&model, &tok, problems, max_new).unwrap();
    assert!((mean - acc).abs() < 1e-9, "eval {mean} vs trainer {acc}");

    let lines = jsonl(&tmp.path().join("eval.jsonl"));
    assert_eq!(lines.len(), 40);
    let correct: u64 = lines.iter().map(|l| l["correct"].as_u64().unwrap()).sum();
    assert!((correct as f64 / 40.0 - acc).abs() < 1e-9);
    assert_eq!(lines[0]["question"], problems[0].prompt.as_str());

    // The responses are the greedy continuations of "<bos>" + prompt, as in training.
    let prompts: Vec<Vec<u32>> = problems
        .iter()
        .map(|p| {
            let mut ids = vec![tok.bos.unwrap()];
            ids.extend(tok.encode(&p.prompt).unwrap());
            ids
        })
        .collect();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(9);
    let gens = grove::rollout::generate(
        &model,
        &prompts,
        tok.eos,
        tok.pad,
        &grove::rollout::SamplingParams::greedy(max_new),
        &mut rng,
    )
    .unwrap();
    for (line, g) in lines.iter().zip(&gens) {
        let body: Vec<u32> = g.tokens.iter().copied().filter(|&t| t != tok.eos).collect();
        let sample = &line["samples"][0];
        assert_eq!(sample["response"], tok.decode(&body).unwrap().as_str());
        assert_eq!(sample["finished"], g.finished);
        let right = g.finished && sample["response"] == line["reference"];
        assert_eq!(sample["score"], if right { 1.0 } else { 0.0 });
    }
}
