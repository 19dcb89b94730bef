//! Qwen3 (dense): per-head q/k RMSNorms, `head_dim` independent of hidden/heads, no q/k/v
//! bias; config parsing, HF-folder round trip and gradients of the new norms.
use candle_core::{DType, Device, Tensor, D};
use grove::model::io::{load_pretrained, save_pretrained};
use grove::model::llama::parameter_shapes;
use grove::model::{attention_mask, Config, Llama, Tokenizer};

/// A tiny Qwen3 over the built-in 19-token vocabulary: hidden 16, 4 heads of head_dim 6
/// (4 × 6 = 24 ≠ 16, as in real Qwen3 where head_dim is set independently), 2 KV heads.
fn tiny_qwen3(tied: bool) -> Config {
    let text = format!(
        r#"{{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 19,
        "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6,
        "attention_bias": false, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": {tied}, "hidden_act": "silu",
        "sliding_window": null, "use_sliding_window": false, "max_window_layers": 28}}"#
    );
    Config::from_json(&text, "qwen3 config.json").unwrap()
}

fn forward_logits(model: &Llama, ids: &[u32]) -> Tensor {
    let dev = Device::Cpu;
    let t = ids.len();
    let ids_t = Tensor::from_slice(ids, (1, t), &dev).unwrap();
    let pos_t = Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), (1, t), &dev).unwrap();
    let mask = attention_mask(&[vec![true; t]], 0, t, &dev).unwrap();
    let h = model.forward_hidden(&ids_t, &pos_t, &mask, None).unwrap();
    model.logits(&h).unwrap()
}

fn logits_of(model: &Llama, ids: &[u32]) -> Vec<f32> {
    forward_logits(model, ids)
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Sets every parameter whose name ends with `suffix` to deterministic non-trivial values.
fn perturb(model: &Llama, suffix: &str, scale: f32) {
    for (name, v) in model.params() {
        if name.ends_with(suffix) {
            let n = v.elem_count();
            let w: Vec<f32> = (0..n)
                .map(|i| 1.0 + scale * (((i * 7 + 3) % 11) as f32 - 5.0) / 5.0)
                .collect();
            v.set(&Tensor::from_vec(w, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn qwen3_config_json_parses_with_its_own_head_dim() {
    // The shape fields of Qwen/Qwen3-0.6B's config.json: head_dim 128 although
    // hidden_size / num_attention_heads = 1024 / 16 = 64.
    let text = r#"{"architectures": ["Qwen3ForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
        "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
        "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": null,
        "rope_theta": 1000000, "sliding_window": null, "tie_word_embeddings": true,
        "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true,
        "use_sliding_window": false, "vocab_size": 151936}"#;
    let c = Config::from_json(text, "config.json").unwrap();
    assert_eq!((c.head_dim(), c.num_kv_heads()), (128, 8));
    assert!(c.qk_norm() && !c.qkv_bias());
    let shapes = parameter_shapes(&c);
    let get = |n: &str| shapes.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone());
    assert_eq!(
        get("model.layers.0.self_attn.q_proj.weight"),
        Some(vec![16 * 128, 1024])
    );
    assert_eq!(
        get("model.layers.0.self_attn.k_proj.weight"),
        Some(vec![8 * 128, 1024])
    );
    assert_eq!(
        get("model.layers.0.self_attn.o_proj.weight"),
        Some(vec![1024, 16 * 128])
    );
    assert_eq!(
        get("model.layers.27.self_attn.q_norm.weight"),
        Some(vec![128])
    );
    assert_eq!(
        get("model.layers.27.self_attn.k_norm.weight"),
        Some(vec![128])
    );
    assert_eq!(get("model.layers.0.self_attn.q_proj.bias"), None);
    // 28 layers × (9 Llama tensors + 2 norms) + embedding + final norm (tied head).
    assert_eq!(shapes.len(), 28 * 11 + 2);
    // Qwen2 configs keep their biases and get no q/k norms.
    let q2 = Config::from_json(&text.replace("\"qwen3\"", "\"qwen2\""), "c").unwrap();
    assert!(!q2.qk_norm());
    assert!(!parameter_shapes(&q2)
        .iter()
        .any(|(n, _)| n.ends_with("q_norm.weight")));
}

#[test]
fn qwen3_saved_as_hf_folder_loads_back_with_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::builtin_arithmetic();
    for tied in [true, false] {
        let model = Llama::init(&tiny_qwen3(tied), 5, &Device::Cpu).unwrap();
        perturb(&model, "q_norm.weight", 0.5);
        perturb(&model, "k_norm.weight", 0.3);
        let ids = [1u32, 5, 2, 9, 4, 7];
        let before = logits_of(&model, &ids);
        let out = dir.path().join(format!("qwen3-{tied}"));
        save_pretrained(&model, &tok, &out).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], "qwen3");
        assert_eq!(cfg["architectures"][0], "Qwen3ForCausalLM");
        assert_eq!(cfg["head_dim"], 6);
        assert_eq!(cfg["attention_bias"], false);
        let (loaded, _) = load_pretrained(&out, &Device::Cpu).unwrap();
        assert!(loaded.cfg.qk_norm());
        assert_eq!(before, logits_of(&loaded, &ids));
    }
}

#[test]
fn q_and_k_norms_are_per_head_and_change_the_output() {
    let ids = [3u32, 1, 4, 1, 5];
    let model = Llama::init(&tiny_qwen3(true), 9, &Device::Cpu).unwrap();
    let base = logits_of(&model, &ids);
    // RMSNorm over each head's 6 values makes the output blind to a positive scale of one
    // head's query rows (rows 0..6 of q_proj, head 0) up to eps = 1e-6 in the norm.
    let (_, q) = model
        .params()
        .iter()
        .find(|(n, _)| n == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    let orig = q.as_tensor().copy().unwrap();
    let head0 = q.as_tensor().narrow(0, 0, 6).unwrap();
    let rest = q.as_tensor().narrow(0, 6, 18).unwrap();
    let scaled = Tensor::cat(&[(head0 * 3.0).unwrap(), rest], 0).unwrap();
    q.set(&scaled).unwrap();
    let after_scale = logits_of(&model, &ids);
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(max_diff(&base, &after_scale) < 1e-5);
    q.set(&orig).unwrap();
    // Without the norms (the same weights read as Llama), the same scaling changes the logits.
    let mut llama_cfg = tiny_qwen3(true);
    llama_cfg.model_type = Some("llama".into());
    let tensors: std::collections::HashMap<String, Tensor> = model
        .named_tensors()
        .into_iter()
        .filter(|(n, _)| !n.contains("_norm.weight") || n.contains("layernorm"))
        .collect();
    let llama = Llama::from_tensors(&llama_cfg, tensors, &Device::Cpu, "t").unwrap();
    let l_base = logits_of(&llama, &ids);
    let (_, lq) = llama
        .params()
        .iter()
        .find(|(n, _)| n == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    lq.set(&scaled).unwrap();
    assert!(max_diff(&l_base, &logits_of(&llama, &ids)) > 1e-4);
    // The norm weights themselves change the output.
    perturb(&model, "k_norm.weight", 0.5);
    assert!(max_diff(&base, &logits_of(&model, &ids)) > 1e-4);
}

#[test]
fn gradients_of_q_and_k_norms_match_finite_differences() {
    let model = Llama::init(&tiny_qwen3(false), 11, &Device::Cpu).unwrap();
    for (_, v) in model.params() {
        let t = v.as_tensor();
        if t.dims().len() == 2 {
            v.set(&(t * 10.0).unwrap()).unwrap();
        }
    }
    perturb(&model, "q_norm.weight", 0.5);
    perturb(&model, "k_norm.weight", 0.5);
    let ids = [1u32, 7, 3, 12, 5, 9];
    let targets = [4u32, 2, 8, 1, 16, 3];
    // Weighted sum of log p(target): every position matters differently.
    let objective = |m: &Llama| -> Tensor {
        let lsm = candle_nn::ops::log_softmax(&forward_logits(m, &ids), D::Minus1).unwrap();
        let tg = Tensor::from_slice(&targets, (1, 6, 1), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(
            (0..6).map(|i| 1.0 + 0.1 * i as f32).collect::<Vec<_>>(),
            (1, 6),
            &Device::Cpu,
        )
        .unwrap();
        (lsm.gather(&tg, D::Minus1)
            .unwrap()
            .squeeze(D::Minus1)
            .unwrap()
            * w)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = objective(&model).backward().unwrap();
    let mut checked = 0;
    for (name, var) in model.params() {
        if !(name.ends_with("q_norm.weight") || name.ends_with("k_norm.weight")) {
            continue;
        }
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for k in 0..base.len() {
            let eps = 1e-2f32;
            let f = |delta: f32| {
                let mut w = base.clone();
                w[k] += delta;
                var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                objective(&model)
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
                "{name}[{k}]: analytic {an} vs finite difference {fd}"
            );
            checked += 1;
        }
    }
    // 2 layers × 2 norms × head_dim 6.
    assert_eq!(checked, 24);
}
