//! `model.dtype = "bf16"` on whole models: log-probs against f32, a training step, LoRA's
//! bf16 base.
use candle_core::{Device, Tensor, D};

use super::Dtype;
use crate::compute::optim::{AdamW, AdamWParams};
use crate::model::attention_mask;
use crate::model::llama::{Config, Llama, Weight};
use crate::model::lora::LoraConfig;

const IDS: [u32; 12] = [1, 5, 7, 2, 9, 11, 3, 3, 8, 0, 4, 6];

fn cfg() -> Config {
    let mut cfg = Config::builtin_tiny(29);
    cfg.hidden_size = 64;
    cfg.intermediate_size = 96;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = Some(2);
    cfg.tie_word_embeddings = Some(false);
    cfg.attention_bias = Some(true);
    cfg
}

/// A seeded model whose matrices are 8× the initial N(0, 0.02) (norms stay 1), so its
/// log-probs spread over several nats (at initialisation every token is near ln(1/29)).
fn model() -> Llama {
    let m = Llama::init(&cfg(), 5, &Device::Cpu).unwrap();
    for (n, v) in m.params() {
        if !n.ends_with("norm.weight") {
            v.set(&(v.as_tensor() * 8.0).unwrap()).unwrap();
        }
    }
    m
}

/// The f32 model with every matrix a bf16 product reads (projections, output layer) rounded
/// to bf16: the unavoidable part of bf16's error, measured on the model itself.
fn with_rounded_matrices(m: &Llama) -> Llama {
    let r = m.deep_clone().unwrap();
    for (n, v) in r.params() {
        if n.ends_with("_proj.weight") || n == "lm_head.weight" {
            let rounded = super::to_f32(&super::to_bf16(&values(v.as_tensor())));
            v.set(&Tensor::from_vec(rounded, v.as_tensor().shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    r
}

fn logits(m: &Llama) -> Tensor {
    let t = IDS.len();
    let dev = Device::Cpu;
    let ids = Tensor::from_vec(IDS.to_vec(), (1, t), &dev).unwrap();
    let pos = Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), (1, t), &dev).unwrap();
    let mask = attention_mask(&[vec![true; t]], 0, t, &dev).unwrap();
    let h = m.forward_hidden(&ids, &pos, &mask, None).unwrap();
    m.logits(&h).unwrap()
}

/// log p(IDS[i+1] | IDS[..=i]) for every position, as a (t − 1) tensor (f32 log-softmax).
fn token_logprobs(m: &Llama) -> Tensor {
    let lp = candle_nn::ops::log_softmax(&logits(m).squeeze(0).unwrap(), D::Minus1).unwrap();
    let next = Tensor::from_vec(IDS[1..].to_vec(), (IDS.len() - 1, 1), &Device::Cpu).unwrap();
    lp.narrow(0, 0, IDS.len() - 1)
        .unwrap()
        .gather(&next, 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// bf16 token log-probs against f32's. The stated tolerance is relative to the model's own
/// sensitivity: rounding only its matrices to bf16 (relative error ≤ 2⁻⁸ each, 8 significant
/// bits) moves the f32 log-probs by some δ; bf16 also rounds the activations entering each
/// product, an error of the same size, so its log-probs must stay within 4·δ (max and mean
/// over tokens), and within 0.25 nats in any case (a PPO/GRPO ratio's clip range is 0.2).
#[test]
fn bf16_token_logprobs_match_f32_within_the_stated_tolerance() {
    let f = model();
    let b = f.deep_clone().unwrap().with_dtype(Dtype::Bf16).unwrap();
    assert_eq!(b.dtype(), Dtype::Bf16);
    let lf = values(&token_logprobs(&f));
    let lb = values(&token_logprobs(&b));
    let lr = values(&token_logprobs(&with_rounded_matrices(&f)));
    let spread = lf.iter().cloned().fold(f32::INFINITY, f32::min);
    assert!(
        spread < -3.0,
        "the model's log-probs spread over nats: min {spread}"
    );
    let stats = |other: &[f32]| {
        let d: Vec<f32> = lf.iter().zip(other).map(|(x, y)| (x - y).abs()).collect();
        let max = d.iter().cloned().fold(0.0, f32::max);
        (max, d.iter().sum::<f32>() / d.len() as f32)
    };
    let ((max, mean), (max_w, mean_w)) = (stats(&lb), stats(&lr));
    let msg = format!("bf16: max {max}, mean {mean}; matrices rounded: max {max_w}, mean {mean_w}");
    assert!(
        max <= 4.0 * max_w && mean <= 4.0 * mean_w && max <= 0.25,
        "{msg}"
    );
    // The products did run in bf16: rounding moved the values.
    assert!(max > 0.0 && max_w > 0.0, "{msg}");
    // The f32 model is untouched by its bf16 copy.
    assert_eq!(values(&token_logprobs(&f)), lf);
}

/// One AdamW step on the mean token NLL, f32 and bf16: the same tensors get gradients and
/// move, the gradients point the same way (cosine > 0.99 per tensor), and after the step the
/// bf16 model computes with its updated weights (its working copies were made again): its
/// logits equal those of a fresh bf16 copy of the stepped weights.
#[test]
fn a_bf16_step_changes_the_same_tensors_and_refreshes_the_working_copies() {
    let f = model();
    let b = f.deep_clone().unwrap().with_dtype(Dtype::Bf16).unwrap();
    let before_b = values(&logits(&b));
    let mut grads_of = vec![];
    let mut moved = vec![];
    for m in [&f, &b] {
        let before: Vec<Vec<f32>> = m
            .params()
            .iter()
            .map(|(_, v)| values(v.as_tensor()))
            .collect();
        let loss = token_logprobs(m).mean_all().unwrap().neg().unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<Option<Vec<f32>>> = m
            .params()
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).map(values))
            .collect();
        let mut opt = AdamW::new(m.params(), AdamWParams::default());
        opt.step(&grads, 1e-2, 1.0).unwrap();
        let changed: Vec<&str> = m
            .params()
            .iter()
            .zip(&before)
            .filter(|((_, v), b)| &values(v.as_tensor()) != *b)
            .map(|((n, _), _)| n.as_str())
            .collect();
        grads_of.push(g);
        moved.push(changed);
    }
    assert_eq!(moved[0], moved[1]);
    assert_eq!(moved[0].len(), f.params().len(), "every tensor moves");
    for ((n, _), (gf, gb)) in f.params().iter().zip(grads_of[0].iter().zip(&grads_of[1])) {
        let (gf, gb) = (gf.as_ref().unwrap(), gb.as_ref().unwrap());
        let dot: f64 = gf
            .iter()
            .zip(gb)
            .map(|(x, y)| (*x as f64) * (*y as f64))
            .sum();
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (norm(gf) * norm(gb)).max(1e-30);
        assert!(cos > 0.99, "`{n}`: gradient cosine {cos}");
    }
    let after_b = values(&logits(&b));
    assert_ne!(
        after_b, before_b,
        "the bf16 model still computes with its old weights"
    );
    let fresh = b.deep_clone().unwrap();
    assert_eq!(fresh.dtype(), Dtype::Bf16);
    assert_eq!(values(&logits(&fresh)), after_b);
}

/// LoRA in bf16: the frozen base projections are kept in bf16 only (half their f32 bytes), a
/// fresh adapter gives exactly the bf16 base's outputs, and a step moves only the adapter.
#[test]
fn a_lora_base_in_bf16_is_stored_in_bf16_and_only_the_adapter_trains() {
    let full = model().with_dtype(Dtype::Bf16).unwrap();
    let m = model()
        .with_lora(&LoraConfig::default(), 9, "builtin")
        .unwrap()
        .with_dtype(Dtype::Bf16)
        .unwrap();
    let mut bf16_bytes = 0;
    let mut f32_bytes = 0;
    for (n, w) in m.base_weights() {
        if n.ends_with("_proj.weight") {
            let Weight::Bf16(mat) = &w else {
                panic!("`{n}` is not stored in bf16")
            };
            bf16_bytes += mat.data.len() * 2;
            f32_bytes += mat.dims.0 * mat.dims.1 * 4;
        }
    }
    assert_eq!(bf16_bytes * 2, f32_bytes);
    assert!(bf16_bytes > 0);
    assert_eq!(values(&logits(&m)), values(&logits(&full)));
    let base_before: Vec<Vec<f32>> = m
        .base_tensors()
        .unwrap()
        .iter()
        .map(|(_, t)| values(t))
        .collect();
    // Give B a value so A gets a gradient too.
    for (n, v) in m.params() {
        if n.ends_with("lora_B.weight") {
            v.set(&(v.as_tensor().ones_like().unwrap() * 0.1).unwrap())
                .unwrap();
        }
    }
    let loss = token_logprobs(&m).mean_all().unwrap().neg().unwrap();
    let grads = loss.backward().unwrap();
    let before: Vec<Vec<f32>> = m
        .params()
        .iter()
        .map(|(_, v)| values(v.as_tensor()))
        .collect();
    AdamW::new(m.params(), AdamWParams::default())
        .step(&grads, 1e-2, 1.0)
        .unwrap();
    for (b, (n, t)) in base_before.iter().zip(m.base_tensors().unwrap()) {
        assert!(b == &values(&t), "base `{n}` changed");
    }
    for (b, (n, v)) in before.iter().zip(m.params()) {
        assert!(b != &values(v.as_tensor()), "adapter `{n}` did not move");
    }
    // The reference (adapter off) is the bf16 base.
    let reference = m.reference_copy(false).unwrap();
    assert_eq!(values(&logits(&reference)), values(&logits(&full)));
}
