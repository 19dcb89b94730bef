//! LoRA end to end: a PEFT adapter written by the real `peft` package (tests/fixtures/peft,
//! made by its make_fixture.py) loads with the same logits, merges, and a LoRA run trains only
//! its adapter, checkpoints it in PEFT's format and resumes exactly.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::common::{quiet, rl_lines};
use candle_core::{Device, Tensor};
use grove::config;
use grove::model::lora::{self, LoraConfig};
use grove::model::{attention_mask, Llama};
use grove::train::{run, TrainOptions};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn logits(m: &Llama, ids: &[u32]) -> Vec<f32> {
    let dev = Device::Cpu;
    let t = ids.len();
    let x = Tensor::from_vec(ids.to_vec(), (1, t), &dev).unwrap();
    let pos = Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), (1, t), &dev).unwrap();
    let mask = attention_mask(&[vec![true; t]], 0, t, &dev).unwrap();
    let h = m.forward_hidden(&x, &pos, &mask, None).unwrap();
    m.logits(&h)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest |a − b| (f32 logits of magnitude ≤ ~5: PyTorch and grove sum in different orders).
fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let d = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-4, "{what}: max |grove − PyTorch| = {d}");
}

#[test]
fn a_peft_adapter_loads_with_pytorch_logits_and_merges() {
    let exp = expected();
    let ids: Vec<u32> = exp["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let base = grove::model::io::load_hf_folder(&fixture().join("base"), &Device::Cpu).unwrap();
    assert_close("base", &logits(&base, &ids), &floats(&exp["logits_base"]));
    let adapter_dir = fixture().join("adapter");
    let m = lora::load_onto(base, &adapter_dir, "fixture base").unwrap();
    let adapted = logits(&m, &ids);
    assert_close("base + adapter", &adapted, &floats(&exp["logits_adapter"]));
    // Keys and shapes: the file PEFT wrote holds exactly what grove writes for that config.
    let peft = lora::read_peft(&adapter_dir, &Device::Cpu).unwrap();
    let mut file: Vec<(String, Vec<usize>)> = peft
        .tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    let mut ours: Vec<(String, Vec<usize>)> = m
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().dims().to_vec()))
        .collect();
    file.sort();
    ours.sort();
    assert_eq!(file, ours);
    assert!(ours.contains(&(
        "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight".to_string(),
        vec![8, 4]
    )));
    // Round trip: grove's files hold the same tensors, and read back the same config.
    let out = tempfile::tempdir().unwrap();
    m.adapter().unwrap().save(out.path()).unwrap();
    let back = lora::read_peft(out.path(), &Device::Cpu).unwrap();
    assert_eq!(back.cfg, peft.cfg);
    for (k, t) in &peft.tensors {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = back.tensors[k].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{k}");
    }
    // merge(base, adapter) == base + adapter, and == PEFT's merge_and_unload.
    let merged = m.merged().unwrap();
    assert_close("merged vs adapted", &logits(&merged, &ids), &adapted);
    assert_close(
        "merged vs PEFT merge",
        &logits(&merged, &ids),
        &floats(&exp["logits_merged"]),
    );
}

fn small(out: &Path, steps: usize, extra: &[&str]) -> config::ValidatedRun {
    let mut sets: Vec<String> = vec![
        format!("output_dir={:?}", out.display().to_string()),
        "warmup.max_steps=20".into(),
        "warmup.eval_every=10".into(),
        "warmup.target_acc=1.0".into(),
        "rollout.prompts_per_step=8".into(),
        "rollout.group_size=4".into(),
        format!("train.steps={steps}"),
        "train.eval_every=2".into(),
        "train.eval_size=32".into(),
        "train.checkpoint_every=2".into(),
        "train.lr=1e-3".into(),
        "loss.kl_coef=0.05".into(),
        "model.lora.rank=4".into(),
        "model.lora.alpha=8".into(),
        "model.lora.dropout=0.1".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    config::load(None, &sets).unwrap()
}

#[test]
fn a_lora_run_checkpoints_peft_files_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let a = run(small(&tmp.path().join("a"), 4, &[]), &quiet()).unwrap();
    let b = run(
        small(&tmp.path().join("b"), 4, &[]),
        &TrainOptions {
            stop_after: Some(2),
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(b.rl_steps_done, 2);
    let cfg = config::load_for(
        Some(&b.run_dir.join("config.toml")),
        &[],
        config::Purpose::Resume,
    )
    .unwrap();
    assert_eq!(cfg.model.lora.as_ref().unwrap().rank, 4);
    let b2 = run(
        cfg,
        &TrainOptions {
            resume: Some(b.run_dir.clone()),
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(b2.rl_steps_done, 4);
    assert_eq!(
        rl_lines(&a.run_dir),
        rl_lines(&b.run_dir),
        "metrics differ between the uninterrupted and the resumed LoRA run"
    );
    let ck = a.run_dir.join("checkpoints/step-4");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "grove_base.json",
        "optimizer.safetensors",
    ] {
        assert!(ck.join(f).exists(), "{f} missing");
    }
    assert!(!ck.join("model.safetensors").exists());
    let wa = std::fs::read(ck.join("adapter_model.safetensors")).unwrap();
    let wb = std::fs::read(
        b.run_dir
            .join("checkpoints/step-4/adapter_model.safetensors"),
    )
    .unwrap();
    assert!(wa == wb, "final adapters differ");
    // The adapter moved during training; step-0 (after warm-up) and step-4 differ.
    let w0 = std::fs::read(
        a.run_dir
            .join("checkpoints/step-0/adapter_model.safetensors"),
    )
    .unwrap();
    assert!(w0 != wa, "the adapter did not train");
    // Only A and B are in the optimizer state: 2 layers × 7 projections × 2, two moments each.
    let opt = grove::model::io::load_safetensors(&ck.join("optimizer.safetensors"), &Device::Cpu)
        .unwrap();
    let cfg: HashMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(ck.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(
        opt.len(),
        2 * 7 * 2 * 2,
        "{:?}",
        opt.keys().collect::<Vec<_>>()
    );
}

#[test]
fn bad_lora_settings_fail_before_any_step() {
    let tmp = tempfile::tempdir().unwrap();
    let e = config::load(
        None,
        &["model.lora.target_modules=[\"q_proj\", \"qkv\"]".to_string()],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("unknown module \"qkv\"") && e.contains("down_proj"),
        "{e}"
    );
    // The built-in model's k_proj is 128×128.
    let cfg = small(tmp.path(), 2, &["model.lora.rank=200"]);
    let e = run(cfg, &quiet()).err().unwrap().to_string();
    assert!(e.contains("rank 200 is larger than the layer"), "{e}");
    assert!(
        std::fs::read_dir(tmp.path())
            .map(|d| d.count())
            .unwrap_or(0)
            == 0
    );
    let e = LoraConfig {
        dropout: 1.0,
        ..Default::default()
    }
    .validate()
    .unwrap_err();
    assert!(e.contains("dropout"), "{e}");
}
