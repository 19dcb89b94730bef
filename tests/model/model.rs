//! The policy network: gradients against finite differences, checkpoint round trips, and
//! KV-cached decoding with left padding against a plain forward pass.
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use grove::model::io::{load_hf_folder, load_safetensors, save_hf_folder, save_safetensors};
use grove::model::{attention_mask, Config, KvCache, Llama};

fn tiny_cfg(bias: bool, tied: bool, kv: usize) -> Config {
    let mut c = Config::builtin_tiny(11);
    c.hidden_size = 16;
    c.intermediate_size = 24;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(kv);
    c.attention_bias = Some(bias);
    c.tie_word_embeddings = Some(tied);
    c
}

/// Sum of log p(target) over a fixed batch, with a full causal forward (no padding).
fn objective(model: &Llama, ids: &[u32], targets: &[u32], b: usize, t: usize) -> Tensor {
    let dev = Device::Cpu;
    let ids_t = Tensor::from_slice(ids, (b, t), &dev).unwrap();
    let pos: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
    let pos_t = Tensor::from_vec(pos, (b, t), &dev).unwrap();
    let mask = attention_mask(&vec![vec![true; t]; b], 0, t, &dev).unwrap();
    let h = model.forward_hidden(&ids_t, &pos_t, &mask, None).unwrap();
    let lsm = candle_nn::ops::log_softmax(&model.logits(&h).unwrap(), D::Minus1).unwrap();
    let tg = Tensor::from_slice(targets, (b, t, 1), &dev).unwrap();
    // Weighted so that every position matters differently (a plain sum hides sign errors less well).
    let w: Vec<f32> = (0..b * t).map(|i| 1.0 + 0.1 * i as f32).collect();
    let w = Tensor::from_vec(w, (b, t), &dev).unwrap();
    (lsm.gather(&tg, D::Minus1)
        .unwrap()
        .squeeze(D::Minus1)
        .unwrap()
        * w)
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    for (bias, tied, kv) in [(false, true, 4), (true, false, 2)] {
        let cfg = tiny_cfg(bias, tied, kv);
        let model = Llama::init(&cfg, 7, &Device::Cpu).unwrap();
        // Larger weights than the default init so that every path carries signal.
        for (_, v) in model.params() {
            let t = v.as_tensor();
            if t.dims().len() == 2 {
                v.set(&(t * 10.0).unwrap()).unwrap();
            }
        }
        let (b, t) = (2, 5);
        let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 3) % 11) as u32).collect();
        let targets: Vec<u32> = (0..b * t).map(|i| ((i * 5 + 1) % 11) as u32).collect();
        let grads = objective(&model, &ids, &targets, b, t).backward().unwrap();
        let mut checked = 0;
        for (name, var) in model.params() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient reached {name}"));
            let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                g.iter().any(|x| x.abs() > 0.0),
                "{name}: gradient is all zero"
            );
            let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            // Three entries per tensor: first, middle, last.
            for &k in &[0, base.len() / 2, base.len() - 1] {
                let eps = 1e-2f32;
                let f = |delta: f32| {
                    let mut w = base.clone();
                    w[k] += delta;
                    var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();

                    objective(&model, &ids, &targets, b, t)
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                };
                let fd = (f(eps) - f(-eps)) / (2.0 * eps as f64);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let an = g[k] as f64;
                assert!(
                    (fd - an).abs() <= 5e-3 + 3e-2 * an.abs(),
                    "{name}[{k}] (bias {bias}, tied {tied}, kv {kv}): analytic {an} vs finite difference {fd}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 3 * 10);
    }
}

fn logits_of(model: &Llama, ids: &[u32]) -> Vec<f32> {
    let dev = Device::Cpu;
    let t = ids.len();
    let ids_t = Tensor::from_slice(ids, (1, t), &dev).unwrap();
    let pos_t = Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), (1, t), &dev).unwrap();
    let mask = attention_mask(&[vec![true; t]], 0, t, &dev).unwrap();
    let h = model.forward_hidden(&ids_t, &pos_t, &mask, None).unwrap();
    model
        .logits(&h)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn saved_then_loaded_checkpoint_gives_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    for (bias, tied) in [(false, true), (true, false)] {
        let cfg = tiny_cfg(bias, tied, 2);
        let model = Llama::init(&cfg, 3, &Device::Cpu).unwrap();
        let ids = [1u32, 5, 2, 9, 4];
        let before = logits_of(&model, &ids);

        let path = dir.path().join(format!("m-{bias}-{tied}.safetensors"));
        save_safetensors(&model.named_tensors(), &path).unwrap();
        let loaded = Llama::from_tensors(
            &cfg,
            load_safetensors(&path, &Device::Cpu).unwrap(),
            &Device::Cpu,
            "t",
        )
        .unwrap();
        assert_eq!(before, logits_of(&loaded, &ids));

        let hf = dir.path().join(format!("hf-{bias}-{tied}"));
        save_hf_folder(&model, &hf).unwrap();
        let from_hf = load_hf_folder(&hf, &Device::Cpu).unwrap();
        assert_eq!(before, logits_of(&from_hf, &ids));
    }
}

#[test]
fn corrupt_and_mismatched_checkpoints_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_cfg(false, true, 4);
    let model = Llama::init(&cfg, 3, &Device::Cpu).unwrap();
    let path = dir.path().join("m.safetensors");
    save_safetensors(&model.named_tensors(), &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    let trunc = dir.path().join("trunc.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_safetensors(&trunc, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("trunc.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    let e = load_safetensors(&garbage, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("garbage.safetensors"), "{e}");

    let mut other = cfg.clone();
    other.hidden_size = 32;
    let e = Llama::from_tensors(
        &other,
        load_safetensors(&path, &Device::Cpu).unwrap(),
        &Device::Cpu,
        "m.safetensors",
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("m.safetensors")
            && e.contains("model.embed_tokens.weight")
            && e.contains("expected"),
        "{e}"
    );

    let mut missing: HashMap<String, Tensor> = model.named_tensors();
    missing.remove("model.norm.weight");
    let e = Llama::from_tensors(&cfg, missing, &Device::Cpu, "x")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing tensor `model.norm.weight`"), "{e}");
}

#[test]
fn cached_left_padded_decoding_matches_full_forward() {
    let cfg = tiny_cfg(true, false, 2);
    let model = Llama::init(&cfg, 11, &Device::Cpu).unwrap();
    for (_, v) in model.params() {
        v.set(&(v.as_tensor() * 5.0).unwrap()).unwrap();
    }
    let dev = Device::Cpu;
    // Sequence A (len 3 prompt + 2 decoded), sequence B (len 1 prompt + 2 decoded), batched
    // with B left-padded by two.
    let a = [3u32, 4, 5, 6, 7];
    let bseq = [8u32, 9, 10];
    let (p, pad) = (3usize, 0u32);
    let mut cache = KvCache::new(cfg.num_hidden_layers);
    let ids = Tensor::from_slice(&[3u32, 4, 5, pad, pad, 8], (2, p), &dev).unwrap();
    let pos = Tensor::from_slice(&[0u32, 1, 2, 0, 0, 0], (2, p), &dev).unwrap();
    let mut valid = vec![vec![true, true, true], vec![false, false, true]];
    let mask = attention_mask(&valid, 0, p, &dev).unwrap();
    let h = model
        .forward_hidden(&ids, &pos, &mask, Some(&mut cache))
        .unwrap();
    let mut last: Vec<Vec<f32>> = model
        .logits(&h.narrow(1, p - 1, 1).unwrap().squeeze(1).unwrap())
        .unwrap()
        .to_vec2()
        .unwrap();
    let full_a = logits_of(&model, &a);
    let full_b = logits_of(&model, &bseq);
    let v = cfg.vocab_size;
    let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-4);
    assert!(close(&last[0], &full_a[2 * v..3 * v]));
    assert!(close(&last[1], &full_b[0..v]));
    for step in 0..2 {
        let next = [a[3 + step], bseq[1 + step]];
        let ids = Tensor::from_slice(&next, (2, 1), &dev).unwrap();
        let pos = Tensor::from_slice(&[3 + step as u32, 1 + step as u32], (2, 1), &dev).unwrap();
        for row in valid.iter_mut() {
            row.push(true);
        }
        let mask = attention_mask(&valid, cache.len(), 1, &dev).unwrap();
        let h = model
            .forward_hidden(&ids, &pos, &mask, Some(&mut cache))
            .unwrap();
        last = model
            .logits(&h.squeeze(1).unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        assert!(
            close(&last[0], &full_a[(3 + step) * v..(4 + step) * v]),
            "A step {step}"
        );
        assert!(
            close(&last[1], &full_b[(1 + step) * v..(2 + step) * v]),
            "B step {step}"
        );
    }
}

#[test]
fn config_json_is_parsed_tolerantly_and_checked() {
    let text = r#"{"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": null,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "tie_word_embeddings": true,
        "some_future_field": [1, 2]}"#;
    let c = Config::from_json(text, "config.json").unwrap();
    assert_eq!(c.rope_theta(), 1e6);
    assert!(c.qkv_bias());
    let bad = text.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");
    let e = Config::from_json(&bad, "config.json")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("num_key_value_heads 3"),
        "{e}"
    );
    let e = Config::from_json("{\"vocab_size\": \"many\"}", "c.json")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("c.json"), "{e}");
}
