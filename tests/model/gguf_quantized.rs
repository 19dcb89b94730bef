//! GGUF on candle's quantized module, against the `gguf` package (llama.cpp's numpy reference):
//! fixtures in tests/fixtures/gguf (made by make_fixtures.sh with ggml's own quantizer), the
//! reference side computed at test time by hf_from_gguf.py in the Python of `GROVE_PYTHON`
//! (default .ci/venv/bin/python, installed by .ci/install-gguf.sh).
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use grove::model::gguf::{dequantize, hf_qtensor, read_gguf};
use grove::model::io::{load_config, load_gguf, load_pretrained};
use grove::model::quantized::QLinear;
use grove::model::{attention_mask, CausalLm, Llama, QuantizedLlama};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/gguf").join(name)
}

/// Runs hf_from_gguf.py; the tests fail (not skip) without the Python packages.
fn reference(mode: &str, gguf: &Path, out: &Path) {
    let python = std::env::var("GROVE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".ci/venv/bin/python"));
    let result = Command::new(&python)
        .arg(fixture("hf_from_gguf.py"))
        .args([mode, gguf.to_str().unwrap(), out.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run .ci/install-gguf.sh or set GROVE_PYTHON)",
                python.display()
            )
        });
    assert!(
        result.status.success(),
        "hf_from_gguf.py {mode} failed (needs the `gguf` package: .ci/install-gguf.sh): {}",
        String::from_utf8_lossy(&result.stderr)
    );
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().map(|x| x.abs()).fold(0.0, f32::max)
}

#[test]
fn every_ggml_type_dequantizes_like_the_gguf_package_and_multiplies_on_its_blocks() {
    let path = fixture("types.gguf");
    let bytes = std::fs::read(&path).unwrap();
    let file = read_gguf(&bytes, "types.gguf").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    reference("dequant", &path, tmp.path());
    // One activation row per weight row scale, for the matmul check.
    let x: Vec<f32> = (0..3 * 256)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let x = Tensor::from_vec(x, (3, 256), &Device::Cpu).unwrap();
    assert_eq!(file.tensors.len(), 13);
    for info in &file.tensors {
        let ours = dequantize(&file, &bytes, info).unwrap();
        let theirs = read_f32(&tmp.path().join(format!("{}.f32", info.name)));
        // Same arithmetic up to the order of f32 operations.
        let d = max_abs_diff(&ours, &theirs);
        assert!(d <= 1e-6 * max_abs(&theirs), "{}: {d}", info.name);

        // The sampling path: QMatMul on the blocks against x · Wᵀ with the dequantized W.
        let q = hf_qtensor(&file, &bytes, info, None, &Device::Cpu).unwrap();
        assert_eq!(q.shape().dims(), &[4, 256]);
        let lin = QLinear::new(q, None).unwrap();
        // Blocks stay blocks where candle has SIMD kernels for them.
        let fast = ["Q4_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"];
        assert_eq!(
            lin.on_blocks(),
            fast.contains(&info.name.as_str()),
            "{}",
            info.name
        );
        let y: Vec<f32> = lin
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w = Tensor::from_vec(theirs, (4, 256), &Device::Cpu).unwrap();
        let expect: Vec<f32> = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // candle quantizes the activations (Q8_K / Q8_0) for block types: 1% of the scale.
        let tol = if ["F32", "F16", "BF16"].contains(&info.name.as_str()) {
            1e-4
        } else {
            1e-2
        };
        let d = max_abs_diff(&y, &expect);
        assert!(
            d <= tol * max_abs(&expect),
            "{}: matmul off by {d}",
            info.name
        );
    }
}

/// Prefill logits (b, t, vocab) and one decode step's logits (b, vocab) for two prompts of
/// different lengths (left-padded), through the KV-cached path the sampler uses.
fn prefill_and_step(model: &dyn CausalLm) -> (Vec<f32>, Vec<f32>) {
    let dev = Device::Cpu;
    let prompts = [vec![5u32, 70, 300, 12, 99, 250], vec![7u32, 8, 280]];
    let (ids, pos, mut valid, p) = grove::model::batch::left_pad(&prompts, 0);
    let ids = Tensor::from_vec(ids, (2, p), &dev).unwrap();
    let pos = Tensor::from_vec(pos, (2, p), &dev).unwrap();
    let mask = attention_mask(&valid, 0, p, &dev).unwrap();
    let mut cache = model.new_cache();
    let h = model
        .forward_hidden(&ids, &pos, &mask, Some(&mut cache))
        .unwrap();
    let prefill: Vec<f32> = model
        .logits(&h)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for row in valid.iter_mut() {
        row.push(true);
    }
    let ids = Tensor::from_vec(vec![42u32, 43], (2, 1), &dev).unwrap();
    let pos = Tensor::from_vec(vec![6u32, 3], (2, 1), &dev).unwrap();
    let mask = attention_mask(&valid, p, 1, &dev).unwrap();
    let h = model
        .forward_hidden(&ids, &pos, &mask, Some(&mut cache))
        .unwrap();
    let step: Vec<f32> = model
        .logits(&h)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (prefill, step)
}

fn check_fixture(name: &str, weight_type: candle_core::quantized::GgmlDType) {
    let gguf = fixture(name);
    let tmp = tempfile::tempdir().unwrap();
    reference("hf", &gguf, tmp.path());
    let (hf_model, hf_tok) = load_pretrained(tmp.path(), &Device::Cpu).unwrap();

    // Config and tokenizer rebuilt from the metadata are the HF folder's.
    let cfg = load_config(&gguf).unwrap();
    let hf_cfg = &hf_model.cfg;
    assert_eq!(
        (
            cfg.vocab_size,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers
        ),
        (
            hf_cfg.vocab_size,
            hf_cfg.hidden_size,
            hf_cfg.intermediate_size,
            hf_cfg.num_hidden_layers
        )
    );
    assert_eq!(
        (
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
            cfg.tied()
        ),
        (
            hf_cfg.num_attention_heads,
            hf_cfg.num_kv_heads(),
            hf_cfg.head_dim(),
            hf_cfg.tied()
        )
    );
    assert_eq!(
        (cfg.rms_eps(), cfg.rope_theta()),
        (hf_cfg.rms_eps(), hf_cfg.rope_theta())
    );

    // The training path: candle's dequantization, names mapped, Q/K un-permuted: the same f32
    // weights as the gguf package's, so the same logits to f32 rounding.
    let (train_model, tok) = load_gguf(&gguf, &Device::Cpu).unwrap();
    for text in [
        "Natalia sold clips to 48 of her friends.",
        "  12+7=19\n#### 19",
        "naïve 🙂",
    ] {
        assert_eq!(
            tok.encode(text).unwrap(),
            hf_tok.encode(text).unwrap(),
            "{text:?}"
        );
    }
    assert_eq!((tok.eos, tok.bos), (hf_tok.eos, hf_tok.bos));
    let named = train_model.named_tensors();
    for (n, t) in hf_model.named_tensors() {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = named[&n].flatten_all().unwrap().to_vec1().unwrap();
        assert!(max_abs_diff(&a, &b) <= 1e-6 * max_abs(&a), "{n}");
    }
    let (hf_prefill, hf_step) = prefill_and_step(&hf_model);
    let (tr_prefill, tr_step) = prefill_and_step(&train_model);
    let scale = max_abs(&hf_prefill);
    assert!(max_abs_diff(&hf_prefill, &tr_prefill) <= 1e-5 * scale);
    assert!(max_abs_diff(&hf_step, &tr_step) <= 1e-5 * scale);

    // The sampling path: QMatMul on the blocks. candle quantizes the activations to 8 bits
    // inside each matmul (Q8_K), so this agrees to that precision, not to f32 rounding (with
    // CANDLE_DEQUANTIZE_ALL=1, which makes QMatMul dequantize, it agrees within 3%).
    let (q_model, _) = QuantizedLlama::load_gguf(&gguf, &Device::Cpu).unwrap();
    assert_eq!(q_model.weight_type(), Some(weight_type));
    let (q_prefill, q_step) = prefill_and_step(&q_model);
    let d = max_abs_diff(&hf_prefill, &q_prefill).max(max_abs_diff(&hf_step, &q_step));
    let mean = hf_prefill
        .iter()
        .zip(&q_prefill)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / hf_prefill.len() as f32;
    println!("{name}: quantized logits max diff {d}, mean {mean}, scale {scale}");
    assert!(
        d <= 0.08 * scale,
        "quantized logits off by {d} (scale {scale})"
    );
    assert!(
        mean <= 0.01 * scale,
        "quantized logits off by {mean} on average"
    );
    // ... and is not the f32 path in disguise.
    assert!(d > 1e-4 * scale);
    // Real tokens' greedy picks agree (row 1 starts with 3 padding columns).
    let vocab = cfg.vocab_size;
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap()
    };
    let rows: Vec<usize> = (0..6).chain(9..12).collect();
    let agree = rows
        .iter()
        .filter(|&&r| {
            let s = r * vocab..(r + 1) * vocab;
            argmax(&hf_prefill[s.clone()]) == argmax(&q_prefill[s])
        })
        .count();
    println!("greedy picks agree on {agree} of 9 positions");
    assert!(agree >= 7, "greedy tokens agree on {agree} of 9 positions");
    println!(
        "weights: {} bytes quantized, {} as f32",
        q_model.weight_bytes(),
        weights_f32_bytes(&train_model)
    );
    assert!(q_model.weight_bytes() * 4 < weights_f32_bytes(&train_model));
}

fn weights_f32_bytes(m: &Llama) -> usize {
    m.num_params() * DType::F32.size_in_bytes()
}

#[test]
fn q4_k_m_fixture_matches_its_hf_folder_dequantized_by_the_gguf_package() {
    check_fixture("tiny-q4_k_m.gguf", candle_core::quantized::GgmlDType::Q4K);
}

#[test]
fn q6_k_fixture_matches_its_hf_folder_dequantized_by_the_gguf_package() {
    check_fixture("tiny-q6_k.gguf", candle_core::quantized::GgmlDType::Q6K);
}

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

fn data(rel: &str) -> String {
    root()
        .join("../shared/data")
        .join(rel)
        .display()
        .to_string()
}

#[test]
fn grove_eval_and_train_run_on_a_q4_k_m_file() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = fixture("tiny-q4_k_m.gguf").display().to_string();
    let test = data("gsm8k/test.jsonl");
    let (code, out, err) = grove(
        &[
            "eval",
            &gguf,
            "--task",
            "gsm8k",
            "--limit",
            "3",
            "--max-new-tokens",
            "8",
            "--n",
            "2",
            "--k",
            "1,2",
            "--out",
            "eval.jsonl",
            "--data",
            &test,
            "--quiet",
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("gsm8k: 3 questions x 2 samples, sampled at temperature 1 (base prompts"),
        "{out}"
    );
    let rows = std::fs::read_to_string(tmp.path().join("eval.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 3, "{rows}");

    let sets = [
        format!("output_dir={:?}", tmp.path().display().to_string()),
        "name=\"q4km\"".into(),
        "task.kind=\"gsm8k\"".into(),
        format!("task.train_data={:?}", data("gsm8k/train.jsonl")),
        format!("task.eval_data={test:?}"),
        "task.heldout_size=2".into(),
        "rollout.prompts_per_step=2".into(),
        "rollout.group_size=2".into(),
        "rollout.max_new_tokens=4".into(),
        "sampling.inject_ground_truth=true".into(),
        "train.steps=2".into(),
        "train.eval_every=1".into(),
        "train.lr=1e-2".into(),
        "train.lr_warmup_steps=0".into(),
    ];
    let mut args = vec!["train", "--model", gguf.as_str(), "--quiet"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let (code, _, err) = grove(&args, tmp.path());
    assert_eq!(code, 0, "{err}");
    let metrics = std::fs::read_to_string(tmp.path().join("q4km/metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 3, "{metrics}");
    for m in &steps[1..] {
        assert!(m["grad/norm"].as_f64().unwrap() > 0.0, "{m}");
    }
}
