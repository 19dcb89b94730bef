//! BARFI-style reward blending (Gupta et al. 2023, "Behavior Alignment via Reward Function
//! Optimization"), one-step version: the training reward is a blend r_φ = Σ_k φ_k·r_k of a
//! primary and auxiliary components, and the blend weights φ move to raise the primary return
//! after one policy-gradient step on the blended reward (docs/rewards.md#learned-blend-weights).
//!
//! Inner step: θ' = θ + α·g(φ), where g(φ) is the gradient of the policy-gradient surrogate
//! S_φ(θ) = (1/N) Σ_i A_i(φ) · log π_θ(y_i | x_i). Outer objective: J(θ') on a held-out batch
//! scored by the primary component alone. By the chain rule
//!
//! dJ(θ')/dφ_k = α · ∇_θ J(θ')ᵀ · ∂g/∂φ_k.
//!
//! The weights are unconstrained reals (not a softmax: a weight may go to 0 or below, and the
//! blend's scale is part of what is learned). The advantage of the blend gradient is the
//! **group-mean baseline** A_i = r_i − mean of its group (no std division): it is linear in the
//! reward, so A(φ) = Σ_k φ_k·A(r_k), g(φ) = Σ_k φ_k·g_k with g_k the surrogate gradient of
//! component k alone, and ∂g/∂φ_k = g_k: the implicit gradient is a dot product of gradients,
//! exact, with no second derivative. (GRPO's std division would make A non-linear in φ; the
//! training step itself may use any estimator, the blend gradient does not.)

use crate::error::{Error, Result};

/// The blended reward of each sample: r_φ,i = Σ_k `weights[k] · components[k][i]`.
/// One weight per component and one value per sample in every component; anything else is
/// an error (a caller's broken invariant, never a silent truncation).
pub fn blended_rewards(weights: &[f64], components: &[Vec<f64>]) -> Result<Vec<f64>> {
    if weights.len() != components.len() {
        return Err(Error::Internal(format!(
            "blended_rewards: {} weights for {} components",
            weights.len(),
            components.len()
        )));
    }
    let n = components.first().map_or(0, Vec::len);
    if let Some((k, c)) = components.iter().enumerate().find(|(_, c)| c.len() != n) {
        return Err(Error::Internal(format!(
            "blended_rewards: component {k} has {} values, component 0 has {n}",
            c.len()
        )));
    }
    Ok((0..n)
        .map(|i| weights.iter().zip(components).map(|(w, c)| w * c[i]).sum())
        .collect())
}

/// Group-mean baseline advantages: each sample's reward minus the mean of its group (groups
/// of `group` consecutive samples; a shorter last group uses its own mean). Linear in the
/// rewards, which makes the blend gradient exact ([`implicit_gradient`]).
pub fn group_mean_advantages(rewards: &[f64], group: usize) -> Vec<f64> {
    rewards
        .chunks(group.max(1))
        .flat_map(|g| {
            let mean = g.iter().sum::<f64>() / g.len() as f64;
            g.iter().map(move |r| r - mean)
        })
        .collect()
}

/// dJ(θ')/dφ_k = α · ⟨∇_θ J(θ'), g_k⟩ for each component k, where `outer` is ∇_θ J at the
/// stepped parameters θ' = θ + α·g(φ) and `per_component[k]` is g_k, the surrogate gradient
/// with component k's group-mean advantages alone (all flattened the same way).
pub fn implicit_gradient(alpha: f64, outer: &[f64], per_component: &[Vec<f64>]) -> Vec<f64> {
    per_component
        .iter()
        .map(|g| alpha * outer.iter().zip(g).map(|(a, b)| a * b).sum::<f64>())
        .collect()
}

/// The outer step: φ ← φ + lr · dJ/dφ (ascent: the primary return should rise).
pub fn outer_step(weights: &mut [f64], grad: &[f64], lr: f64) {
    for (w, g) in weights.iter_mut().zip(grad) {
        *w += lr * g;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{batch, Config, Llama, Tokenizer};
    use crate::testing::{assert_close, close_rel, near};
    use candle_core::{Device, Tensor};

    #[test]
    fn blend_and_baseline_hand_computed() {
        // Two components over 4 samples, weights (1, 0.5):
        // r = (1 + 0.5·0.2, 0 + 0.5·0.4, 1 + 0.5·0, 0 + 0.5·1) = (1.1, 0.2, 1.0, 0.5).
        let comps = vec![vec![1.0, 0.0, 1.0, 0.0], vec![0.2, 0.4, 0.0, 1.0]];
        assert_close(
            &blended_rewards(&[1.0, 0.5], &comps).unwrap(),
            &[1.1, 0.2, 1.0, 0.5],
            1e-12,
        );
        // Unequal lengths (or a weight per component missing) are errors, not truncations.
        let short = vec![vec![1.0, 0.0, 1.0, 0.0], vec![0.2, 0.4, 0.0]];
        let e = blended_rewards(&[1.0, 0.5], &short)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("component 1 has 3 values, component 0 has 4"),
            "{e}"
        );
        let e = blended_rewards(&[1.0], &comps).unwrap_err().to_string();
        assert!(e.contains("1 weights for 2 components"), "{e}");
        // Groups of 2: means 0.65 and 0.75 → (0.45, −0.45, 0.25, −0.25).
        let a = group_mean_advantages(&[1.1, 0.2, 1.0, 0.5], 2);
        assert_close(&a, &[0.45, -0.45, 0.25, -0.25], 1e-12);
        // Linearity, the property the blend gradient rests on: A(Σ φ_k r_k) = Σ φ_k A(r_k).
        let a0 = group_mean_advantages(&comps[0], 2);
        let a1 = group_mean_advantages(&comps[1], 2);
        let sum: Vec<f64> = a0.iter().zip(&a1).map(|(x, y)| x + 0.5 * y).collect();
        assert_close(&a, &sum, 1e-12);
        // A shorter last group uses its own mean: (3) alone → 0.
        assert_close(
            &group_mean_advantages(&[1.0, 3.0, 3.0], 2),
            &[-1.0, 1.0, 0.0],
            1e-12,
        );
        // α⟨∇J, g_k⟩: α = 0.5, ∇J = (1, 2), g_0 = (3, 4) → 0.5·11 = 5.5; g_1 = (−1, 0) → −0.5.
        let d = implicit_gradient(0.5, &[1.0, 2.0], &[vec![3.0, 4.0], vec![-1.0, 0.0]]);
        assert_close(&d, &[5.5, -0.5], 1e-12);
        let mut w = vec![1.0, 0.5];
        outer_step(&mut w, &d, 0.1);
        assert_close(&w, &[1.55, 0.45], 1e-12);
        // Reduction: with the auxiliary weight at 0 the blend is the primary reward.
        assert_close(
            &blended_rewards(&[1.0, 0.0], &comps).unwrap(),
            &comps[0],
            1e-12,
        );
        assert!(near(group_mean_advantages(&[2.0], 1)[0], 0.0));
    }

    /// The surrogate (1/N) Σ_i A_i · Σ_t log π_θ(y_i,t | ...) on a fixed batch, and its
    /// gradient flattened over the model's parameters.
    fn surrogate(model: &Llama, data: &Data, adv: &[f64]) -> (f64, Vec<f64>) {
        let b = batch::build(&data.prompts, &data.responses, data.pad, model.device()).unwrap();
        let (lp, _) = batch::response_logprobs(model, &b, 1.0).unwrap();
        let n = adv.len();
        let weights: Vec<f32> = b
            .valid
            .iter()
            .zip(adv)
            .flat_map(|(row, a)| row.iter().map(move |v| (v * a / n as f64) as f32))
            .collect();
        let w = Tensor::from_vec(weights, (n, b.resp_len), model.device()).unwrap();
        let s = (lp * w).unwrap().sum_all().unwrap();
        let grads = s.backward().unwrap();
        let mut flat = Vec::new();
        for (_, var) in model.params() {
            match grads.get(var.as_tensor()) {
                Some(g) => flat.extend(
                    g.flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .into_iter()
                        .map(f64::from),
                ),
                None => flat.extend(std::iter::repeat_n(0.0, var.elem_count())),
            }
        }
        (s.to_scalar::<f32>().unwrap() as f64, flat)
    }

    struct Data {
        prompts: Vec<Vec<u32>>,
        responses: Vec<Vec<u32>>,
        pad: u32,
    }

    /// Sets every parameter to θ0 + step (flattened as [`surrogate`] flattens gradients).
    fn set_params(model: &Llama, theta0: &[Tensor], step: &[f64]) {
        let mut at = 0;
        for ((_, var), t0) in model.params().iter().zip(theta0) {
            let n = var.elem_count();
            let d: Vec<f32> = step[at..at + n].iter().map(|x| *x as f32).collect();
            let d = Tensor::from_vec(d, t0.shape(), t0.device()).unwrap();
            var.set(&(t0 + d).unwrap()).unwrap();
            at += n;
        }
    }

    /// BARFI's gradient against a central finite difference: on a tiny model, the analytic
    /// dJ(θ')/dφ_k = α⟨∇J(θ'), g_k⟩ matches (J(θ + α·g(φ + ε e_k)) − J(θ + α·g(φ − ε e_k))) / 2ε,
    /// where g(φ) is the surrogate gradient of the blended reward's group-mean advantages and
    /// J the primary component's surrogate on a separate held-out batch.
    #[test]
    fn barfi_gradient_matches_a_finite_difference() {
        let tok = Tokenizer::builtin_arithmetic();
        let model = Llama::init(&Config::builtin_tiny(tok.vocab_size()), 3, &Device::Cpu).unwrap();
        let enc = |s: &str| tok.encode(s).unwrap();
        // Training batch: 2 groups of 3 responses; primary = exact answer, auxiliary = short.
        let train = Data {
            prompts: ["12+30=", "12+30=", "12+30=", "21+14=", "21+14=", "21+14="]
                .iter()
                .map(|p| enc(p))
                .collect(),
            responses: ["42", "4", "420", "35", "53", "3"]
                .iter()
                .map(|r| enc(r))
                .collect(),
            pad: tok.pad,
        };
        let primary = vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        let aux: Vec<f64> = train
            .responses
            .iter()
            .map(|r| -(r.len() as f64) / 3.0)
            .collect();
        let heldout = Data {
            prompts: ["40+11=", "40+11=", "33+33="]
                .iter()
                .map(|p| enc(p))
                .collect(),
            responses: ["51", "15", "66"].iter().map(|r| enc(r)).collect(),
            pad: tok.pad,
        };
        let heldout_adv = group_mean_advantages(&[1.0, 0.0, 1.0], 2);
        let theta0: Vec<Tensor> = model
            .params()
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();
        let g: Vec<Vec<f64>> = [&primary, &aux]
            .iter()
            .map(|r| surrogate(&model, &train, &group_mean_advantages(r, 3)).1)
            .collect();
        let (alpha, phi) = (2.0, [1.0, 0.5]);
        // J(θ + α·g(φ)), g(φ) = Σ_k φ_k g_k (linear: the group-mean baseline).
        let j_at = |phi: [f64; 2]| -> (f64, Vec<f64>) {
            let step: Vec<f64> = (0..g[0].len())
                .map(|i| alpha * (phi[0] * g[0][i] + phi[1] * g[1][i]))
                .collect();
            set_params(&model, &theta0, &step);
            surrogate(&model, &heldout, &heldout_adv)
        };
        // g(φ) computed directly from the blended reward equals Σ_k φ_k g_k.
        let direct = surrogate(
            &model,
            &train,
            &group_mean_advantages(
                &blended_rewards(&phi, &[primary.clone(), aux.clone()]).unwrap(),
                3,
            ),
        )
        .1;
        let composed: Vec<f64> = (0..direct.len())
            .map(|i| phi[0] * g[0][i] + phi[1] * g[1][i])
            .collect();
        assert_close(&direct, &composed, 1e-5);
        let (_, outer) = j_at(phi);
        let analytic = implicit_gradient(alpha, &outer, &g);
        let eps = 0.05;
        for k in 0..2 {
            let (mut up, mut down) = (phi, phi);
            up[k] += eps;
            down[k] -= eps;
            let fd = (j_at(up).0 - j_at(down).0) / (2.0 * eps);
            assert!(
                close_rel(analytic[k], fd, 2e-2),
                "component {k}: analytic {} vs finite difference {fd}",
                analytic[k]
            );
            assert!(analytic[k].abs() > 1e-3, "a vacuous gradient: {analytic:?}");
        }
    }
}
