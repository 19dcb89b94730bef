use super::*;
use crate::compute::optim::{AdamW, AdamWParams};
use crate::model::attention_mask;
use crate::model::llama::Weight;

fn tiny_cfg() -> Config {
    let mut cfg = Config::builtin_tiny(29);
    cfg.hidden_size = 16;
    cfg.intermediate_size = 24;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = Some(2);
    cfg.tie_word_embeddings = Some(false);
    cfg.attention_bias = Some(true);
    cfg
}

fn base() -> Llama {
    Llama::init(&tiny_cfg(), 3, &Device::Cpu).unwrap()
}

/// Logits (1, t, vocab) for a fixed id sequence.
fn logits(m: &Llama) -> Tensor {
    let ids_v: Vec<u32> = vec![1, 5, 7, 2, 9, 11];
    let t = ids_v.len();
    let dev = Device::Cpu;
    let ids = Tensor::from_vec(ids_v, (1, t), &dev).unwrap();
    let pos = Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), (1, t), &dev).unwrap();
    let mask = attention_mask(&[vec![true; t]], 0, t, &dev).unwrap();
    let h = m.forward_hidden(&ids, &pos, &mask, None).unwrap();
    m.logits(&h).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    values(a)
        .iter()
        .zip(values(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Gives every B a seeded non-zero value, so the adapter changes the outputs.
fn perturb_b(m: &Llama, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (name, v) in m.params() {
        if name.ends_with("lora_B.weight") {
            let n = v.as_tensor().elem_count();
            let data: Vec<f32> = (0..n).map(|_| rng.gen_range(-0.5..0.5)).collect();
            v.set(&Tensor::from_vec(data, v.as_tensor().shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn a_fresh_adapter_gives_exactly_the_base_outputs() {
    let b = base();
    let want = values(&logits(&b));
    let m = b.with_lora(&LoraConfig::default(), 9, "builtin").unwrap();
    assert_eq!(values(&logits(&m)), want);
    // Only A and B train: 2 layers × 7 projections × (A, B).
    assert_eq!(m.params().len(), 2 * 7 * 2);
    assert!(m
        .params()
        .iter()
        .all(|(n, _)| n.starts_with("base_model.model.model.layers.")));
    // A is uniform in ±1/√in, from the seed: the same seed draws the same A.
    let a = m.params()[0].1.as_tensor().clone();
    let bound = 1.0 / (16f32).sqrt();
    assert!(values(&a).iter().all(|x| x.abs() <= bound));
    assert!(values(&a).iter().any(|&x| x != 0.0));
    let m2 = base()
        .with_lora(&LoraConfig::default(), 9, "builtin")
        .unwrap();
    assert_eq!(values(m2.params()[0].1.as_tensor()), values(&a));
}

#[test]
fn the_adapter_adds_x_a_b_times_the_scale_computed_by_hand() {
    let cfg = tiny_cfg();
    let lora = LoraConfig {
        rank: 2,
        alpha: 3.0,
        target_modules: vec!["v_proj".into()],
        ..Default::default()
    };
    let ident = BaseIdentity {
        source: "t".into(),
        hash: "0".into(),
    };
    let a = Adapter::init(&lora, &cfg, 1, ident.clone(), &Device::Cpu).unwrap();
    // v_proj of this config: (2 kv heads × 4, 16).
    let (out_f, in_f, r) = (8usize, 16usize, 2usize);
    let av: Vec<f32> = (0..r * in_f).map(|i| (i as f32 * 0.37).sin()).collect();
    let bv: Vec<f32> = (0..out_f * r).map(|i| (i as f32 * 0.53).cos()).collect();
    let xv: Vec<f32> = (0..3 * in_f).map(|i| (i as f32 * 0.11).sin()).collect();
    let mut t = HashMap::new();
    for l in 0..2 {
        t.insert(
            peft_key(l, V, "A"),
            Tensor::from_vec(av.clone(), (r, in_f), &Device::Cpu).unwrap(),
        );
        t.insert(
            peft_key(l, V, "B"),
            Tensor::from_vec(bv.clone(), (out_f, r), &Device::Cpu).unwrap(),
        );
    }
    a.load_values(&t, "test").unwrap();
    let x = Tensor::from_vec(xv.clone(), (1, 3, in_f), &Device::Cpu).unwrap();
    let got = values(&a.delta(1, V, &x).unwrap().unwrap());
    assert!(a.delta(1, Q, &x).unwrap().is_none());
    let s = 3.0 / 2.0;
    for row in 0..3 {
        for o in 0..out_f {
            let mut want = 0.0f64;
            for k in 0..r {
                let xa: f64 = (0..in_f)
                    .map(|i| xv[row * in_f + i] as f64 * av[k * in_f + i] as f64)
                    .sum();
                want += xa * bv[o * r + k] as f64;
            }
            want *= s;
            let g = got[row * out_f + o] as f64;
            assert!((g - want).abs() < 1e-5, "row {row} out {o}: {g} vs {want}");
        }
    }
    // rsLoRA: α/√r.
    let rs = LoraConfig {
        rslora: true,
        ..lora
    };
    assert!((rs.scale() - 3.0 / 2f64.sqrt()).abs() < 1e-12);
}

#[test]
fn a_step_changes_only_adapter_tensors_and_base_weights_get_no_gradient() {
    let m = base()
        .with_lora(&LoraConfig::default(), 4, "builtin")
        .unwrap();
    perturb_b(&m, 1);
    let base_before: Vec<(String, Vec<f32>)> = m
        .base_tensors()
        .unwrap()
        .iter()
        .map(|(n, t)| (n.clone(), values(t)))
        .collect();
    let adapter_before: Vec<Vec<f32>> = m
        .params()
        .iter()
        .map(|(_, v)| values(v.as_tensor()))
        .collect();
    let mut opt = AdamW::new(m.params(), AdamWParams::default());
    let loss = logits(&m).sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (n, t) in m.base_tensors().unwrap() {
        assert!(grads.get(&t).is_none(), "frozen `{n}` got a gradient");
    }
    for (n, v) in m.params() {
        assert!(grads.get(v.as_tensor()).is_some(), "`{n}` has no gradient");
    }
    opt.step(&grads, 1e-2, 1.0).unwrap();
    for ((n, before), (_, t)) in base_before.iter().zip(m.base_tensors().unwrap()) {
        assert!(before == &values(&t), "base tensor `{n}` changed");
    }
    let changed = m
        .params()
        .iter()
        .zip(&adapter_before)
        .filter(|((_, v), b)| &values(v.as_tensor()) != *b)
        .count();
    assert_eq!(changed, m.params().len(), "every A and B moves");
}

#[test]
fn adapter_gradients_match_finite_differences() {
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        ..Default::default()
    };
    let m = base().with_lora(&lora, 5, "builtin").unwrap();
    perturb_b(&m, 2);
    // A fixed weighting of the logits, so the loss is not symmetric.
    let w = logits(&m).ones_like().unwrap();
    let wv: Vec<f32> = (0..w.elem_count())
        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0)
        .collect();
    let w = Tensor::from_vec(wv, w.shape(), &Device::Cpu).unwrap();
    let loss = |m: &Llama| -> f64 {
        let l = (logits(m) * &w).unwrap().sum_all().unwrap();
        l.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    };
    let l = (logits(&m) * &w).unwrap().sum_all().unwrap();
    let grads = l.backward().unwrap();
    let eps = 1e-2f32;
    // A few entries of an A and a B of each block (attention and MLP).
    for (name, var) in m.params().iter().filter(|(n, _)| {
        n.contains("layers.0.self_attn.q_proj") || n.contains("layers.1.mlp.down_proj")
    }) {
        let g = values(grads.get(var.as_tensor()).unwrap());
        let orig = values(var.as_tensor());
        for idx in [0usize, 3, orig.len() - 1] {
            let set = |d: f32| {
                let mut v = orig.clone();
                v[idx] += d;
                var.set(&Tensor::from_vec(v, var.as_tensor().shape(), &Device::Cpu).unwrap())
                    .unwrap();
            };
            set(eps);
            let up = loss(&m);
            set(-eps);
            let down = loss(&m);
            set(0.0);
            let fd = (up - down) / (2.0 * eps as f64);
            let an = g[idx] as f64;
            assert!(
                (fd - an).abs() <= 2e-2 * an.abs().max(1.0),
                "`{name}`[{idx}]: finite difference {fd} vs gradient {an}"
            );
        }
    }
}

#[test]
fn merged_weights_give_the_adapted_logits_and_the_reference_is_the_base() {
    let b = base();
    let base_logits = logits(&b);
    let m = b.with_lora(&LoraConfig::default(), 6, "builtin").unwrap();
    perturb_b(&m, 3);
    let adapted = logits(&m);
    assert!(
        max_diff(&adapted, &base_logits) > 1e-3,
        "the adapter changes the outputs"
    );
    let merged = m.merged().unwrap();
    assert!(merged.adapter().is_none());
    let d = max_diff(&logits(&merged), &adapted);
    assert!(d < 1e-4, "merged vs adapted: {d}");
    // The KL reference: the same base with the adapter off.
    let r = m.reference_copy(false).unwrap();
    assert_eq!(values(&logits(&r)), values(&base_logits));
    // A clone shares the base and copies the adapter.
    let c = m.deep_clone().unwrap();
    assert_eq!(values(&logits(&c)), values(&adapted));
}

#[test]
fn peft_files_round_trip_with_peft_key_names() {
    let m = base()
        .with_lora(
            &LoraConfig {
                rank: 4,
                alpha: 16.0,
                target_modules: vec!["v_proj".into(), "q_proj".into(), "down_proj".into()],
                ..Default::default()
            },
            7,
            "builtin",
        )
        .unwrap();
    perturb_b(&m, 4);
    let dir = tempfile::tempdir().unwrap();
    m.adapter().unwrap().save(dir.path()).unwrap();
    let peft = read_peft(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(peft.cfg.rank, 4);
    assert_eq!(peft.cfg.alpha, 16.0);
    assert_eq!(
        peft.cfg.target_modules,
        vec!["q_proj", "v_proj", "down_proj"]
    );
    let mut keys: Vec<&String> = peft.tensors.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), 2 * 3 * 2);
    assert_eq!(
        keys[0],
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    );
    assert_eq!(
        peft.tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].dims(),
        &[8, 4]
    );
    let again = load_onto(base(), dir.path(), "builtin").unwrap();
    assert_eq!(values(&logits(&again)), values(&logits(&m)));
}

#[test]
fn bad_adapters_and_configs_are_clear_errors() {
    // A rank larger than a targeted layer (k_proj is 8×16 here).
    let e = base()
        .with_lora(
            &LoraConfig {
                rank: 9,
                ..Default::default()
            },
            1,
            "builtin",
        )
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("rank 9 is larger than the layer")
            && e.contains("k_proj")
            && e.contains("at most 8"),
        "{e}"
    );
    // A module that does not exist.
    let bad = LoraConfig {
        target_modules: vec!["q_proj".into(), "qkv_proj".into()],
        ..Default::default()
    };
    let e = bad.validate().unwrap_err();
    assert!(
        e.contains("unknown module \"qkv_proj\"") && e.contains("gate_proj"),
        "{e}"
    );
    // An adapter whose base hash does not match the base it is loaded onto.
    let m = base()
        .with_lora(&LoraConfig::default(), 1, "builtin")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.adapter().unwrap().save(dir.path()).unwrap();
    let other = Llama::init(&tiny_cfg(), 99, &Device::Cpu).unwrap();
    let e = load_onto(other, dir.path(), "other-base")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("content hash") && e.contains("other-base"),
        "{e}"
    );
    // init_from with a different rank than [model.lora].
    let e = apply(
        base(),
        &LoraConfig {
            rank: 4,
            init_from: Some(dir.path().display().to_string()),
            ..Default::default()
        },
        1,
        "builtin",
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("rank = 8") && e.contains("model.lora.rank"),
        "{e}"
    );
}

#[test]
fn a_quantized_base_gives_the_logits_and_gradients_of_its_dequantized_copy() {
    use candle_core::quantized::{GgmlDType, QTensor};
    // Q8_0 blocks hold 32 values: every projection's in-features are multiples of 32 here.
    let mut cfg = Config::builtin_tiny(40);
    cfg.hidden_size = 64;
    cfg.intermediate_size = 96;
    cfg.num_attention_heads = 2;
    cfg.num_key_value_heads = Some(2);
    cfg.tie_word_embeddings = Some(false);
    let dev = Device::Cpu;
    let dense = Llama::init(&cfg, 8, &dev).unwrap();
    let mut blocks = HashMap::new();
    for (n, t) in dense.base_tensors().unwrap() {
        let t = (t * 10.0).unwrap();
        let dtype = match n.ends_with("_proj.weight") {
            true => GgmlDType::Q8_0,
            false => GgmlDType::F32,
        };
        blocks.insert(n, QTensor::quantize(&t, dtype).unwrap());
    }
    // The f32 reference: the same blocks dequantized up front.
    let deq: HashMap<String, Tensor> = blocks
        .iter()
        .map(|(n, q)| (n.clone(), q.dequantize(&dev).unwrap()))
        .collect();
    let lora = LoraConfig::default();
    let f32_model = Llama::from_tensors(&cfg, deq, &dev, "deq")
        .unwrap()
        .with_lora(&lora, 2, "base")
        .unwrap();
    let q_model = Llama::frozen_quantized(&cfg, blocks, &dev, "blocks")
        .unwrap()
        .with_lora(&lora, 2, "base")
        .unwrap();
    let kept = q_model
        .base_weights()
        .iter()
        .filter(|(_, w)| matches!(w, Weight::Quantized(_)))
        .count();
    assert_eq!(kept, 2 * 7, "every projection stays in its blocks");
    assert_eq!(
        q_model.adapter().unwrap().base.hash,
        f32_model.adapter().unwrap().base.hash
    );
    perturb_b(&f32_model, 5);
    perturb_b(&q_model, 5);
    let (lf, lq) = (logits(&f32_model), logits(&q_model));
    let d = max_diff(&lf, &lq);
    assert!(d < 1e-4, "logits differ by {d}");
    let gf = lf.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let gq = lq.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for ((n, vf), (_, vq)) in f32_model.params().iter().zip(q_model.params()) {
        let (a, b) = (
            gf.get(vf.as_tensor()).unwrap(),
            gq.get(vq.as_tensor()).unwrap(),
        );
        let scale = values(a).iter().fold(1f32, |m, x| m.max(x.abs()));
        let d = max_diff(a, b) / scale;
        assert!(d < 1e-4, "gradient of `{n}` differs by {d} (relative)");
    }
}

#[test]
fn the_one_node_lora_linear_matches_the_composed_values_and_gradients() {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut t = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let (w, bias) = (t(&[24, 20]), t(&[24]));
    let x = Var::from_tensor(&t(&[2, 19, 20])).unwrap();
    let a = Var::from_tensor(&t(&[3, 20])).unwrap();
    let b = Var::from_tensor(&t(&[24, 3])).unwrap();
    let g = t(&[2, 19, 24]);
    let s = 0.7;
    let fused = crate::model::fused::lora_linear(
        x.as_tensor(),
        &Weight::Dense(w.clone()),
        Some(&bias),
        a.as_tensor(),
        b.as_tensor(),
        s,
    )
    .unwrap();
    let composed = (crate::model::fused::linear_composed(x.as_tensor(), &w)
        .unwrap()
        .broadcast_add(&bias)
        .unwrap()
        + crate::model::fused::linear_composed(
            &crate::model::fused::linear_composed(x.as_tensor(), a.as_tensor()).unwrap(),
            b.as_tensor(),
        )
        .unwrap()
        .affine(s, 0.0)
        .unwrap())
    .unwrap();
    assert!(max_diff(&fused, &composed) < 1e-5);
    let gf = (&fused * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gc = (&composed * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in [&x, &a, &b] {
        let d = max_diff(
            gf.get(v.as_tensor()).unwrap(),
            gc.get(v.as_tensor()).unwrap(),
        );
        assert!(d < 1e-4, "gradient differs by {d}");
    }
    assert!(gf.get(&w).is_none() && gf.get(&bias).is_none());
}
