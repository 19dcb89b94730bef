//! KL estimators between the current and the reference policy (docs/algorithms.md#kl-estimators), the
//! reward-side KL penalty, and the DADS per-response weight (docs/algorithms.md#dads-entropy-and-sft-mixing).
//!
//! With Δʳ = ℓ − ℓʳ: k1 = Δʳ; k2 = ½(Δʳ)²; k3 = exp(−Δʳ) − 1 + Δʳ; low-var-kl = clamp(k3, −10, 10).

use super::config::{KlEstimator, LossConfig};

/// Bound of `low-var-kl` (verl's clamp).
const LOW_VAR_KL_BOUND: f64 = 10.0;

/// One token's KL estimate and its derivative with respect to ℓ (`logp`); ℓʳ is constant.
/// `low-var-kl` has zero gradient where the clamp is active (k3 ≥ 0, so only above 10).
pub fn kl_per_token(est: KlEstimator, logp: f64, logp_ref: f64) -> (f64, f64) {
    let d = logp - logp_ref;
    match est {
        KlEstimator::K1 => (d, 1.0),
        KlEstimator::K2 => (0.5 * d * d, d),
        KlEstimator::K3 => k3(d),
        KlEstimator::LowVarKl => {
            let (value, grad) = k3(d);
            if value.abs() <= LOW_VAR_KL_BOUND {
                (value, grad)
            } else {
                (value.clamp(-LOW_VAR_KL_BOUND, LOW_VAR_KL_BOUND), 0.0)
            }
        }
    }
}

/// k3 = exp(−Δ) − 1 + Δ and dk3/dΔ = 1 − exp(−Δ).
fn k3(d: f64) -> (f64, f64) {
    let e = (-d).exp();
    (e - 1.0 + d, 1.0 - e)
}

/// β·Σ_t m_t·k(ℓᵒ_t, ℓʳ_t) for one response, with β = `kl_coef` and k = `kl_estimator`: the
/// per-response penalty the trainer subtracts from the reward in `kl_in_reward` mode. Computed
/// on the behaviour log-probs, so it is detached by construction. Tokens beyond the shortest of
/// the three slices are ignored (the trainer's shapes are checked by `compute`).
pub fn kl_reward_penalty(
    cfg: &LossConfig,
    logp_old: &[f64],
    logp_ref: &[f64],
    mask: &[f64],
) -> f64 {
    let sum: f64 = logp_old
        .iter()
        .zip(logp_ref)
        .zip(mask)
        .filter(|(_, &m)| m > 0.0)
        .map(|((&lo, &lr), &m)| m * kl_per_token(cfg.kl_estimator, lo, lr).0)
        .sum();
    cfg.kl_coef * sum
}

/// DADS weight of one response's KL term: 1 − exp(−e·(1 − d)) with d = 1 − n_correct/G, for a
/// positive response (A > 0); 1 when d ∈ {0, 1} and for non-positive responses. `n_correct` is
/// capped at `group_size`; an empty group gives 1.
pub fn dads_weight(is_positive: bool, n_correct: usize, group_size: usize) -> f64 {
    if !is_positive || group_size == 0 {
        return 1.0;
    }
    let solved = n_correct.min(group_size) as f64 / group_size as f64; // = 1 − d
    if solved == 0.0 || solved == 1.0 {
        return 1.0;
    }
    1.0 - (-std::f64::consts::E * solved).exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::near;

    #[test]
    fn k1_k2_k3_values_and_gradients() {
        // ℓ = −0.5, ℓʳ = −1.0 ⇒ Δʳ = 0.5
        let (v, g) = kl_per_token(KlEstimator::K1, -0.5, -1.0);
        assert!(near(v, 0.5) && near(g, 1.0)); // k1 = Δ, d/dℓ = 1
        let (v, g) = kl_per_token(KlEstimator::K2, -0.5, -1.0);
        assert!(near(v, 0.125) && near(g, 0.5)); // ½·0.25 = 0.125, d = Δ = 0.5
        let (v, g) = kl_per_token(KlEstimator::K3, -0.5, -1.0);
        // exp(−0.5) = 0.6065306597126334 ⇒ k3 = 0.6065306597 − 1 + 0.5 = 0.1065306597126334
        // d = 1 − exp(−0.5) = 0.3934693402873666
        assert!(near(v, 0.1065306597126334), "{v}");
        assert!(near(g, 0.3934693402873666), "{g}");
        let (lv, lg) = kl_per_token(KlEstimator::LowVarKl, -0.5, -1.0);
        assert_eq!((lv, lg), (v, g)); // below the clamp it is k3
    }

    #[test]
    fn low_var_kl_clamps_at_ten_with_zero_gradient() {
        // Δʳ = −3: k3 = e³ − 1 − 3 = 20.0855369 − 4 = 16.0855369 > 10 ⇒ 10, gradient 0
        let (v, g) = kl_per_token(KlEstimator::LowVarKl, -3.0, 0.0);
        assert_eq!((v, g), (10.0, 0.0));
        let (v3, g3) = kl_per_token(KlEstimator::K3, -3.0, 0.0);
        assert!(near(v3, 16.085536923187668), "{v3}");
        assert!(near(g3, 1.0 - 3f64.exp()), "{g3}"); // 1 − e³
    }

    #[test]
    fn estimators_vanish_on_the_reference() {
        for est in KlEstimator::ALL {
            let (v, g) = kl_per_token(*est, -0.7, -0.7);
            assert_eq!(v, 0.0, "{est}");
            let expected_grad = if *est == KlEstimator::K1 { 1.0 } else { 0.0 };
            assert_eq!(g, expected_grad, "{est}");
        }
    }

    #[test]
    fn estimator_gradients_match_central_differences() {
        let h = 1e-6;
        for est in KlEstimator::ALL {
            for (l, r) in [(-0.4, -1.1), (-1.3, -0.2), (-2.0, -2.5)] {
                let fd =
                    (kl_per_token(*est, l + h, r).0 - kl_per_token(*est, l - h, r).0) / (2.0 * h);
                let g = kl_per_token(*est, l, r).1;
                assert!((fd - g).abs() < 1e-7, "{est} at ({l},{r}): fd {fd} vs {g}");
            }
        }
    }

    #[test]
    fn reward_penalty_sums_valid_tokens_times_beta() {
        let cfg = LossConfig {
            kl_coef: 0.5,
            kl_estimator: KlEstimator::K1,
            ..Default::default()
        };
        // k1 per token: (−1 − −1.5) = 0.5, (−2 − −1) = −1, masked, (−0.3 − −0.5) = 0.2
        // β·Σ = 0.5·(0.5 − 1 + 0.2) = −0.15
        let p = kl_reward_penalty(
            &cfg,
            &[-1.0, -2.0, 9.0, -0.3],
            &[-1.5, -1.0, 0.0, -0.5],
            &[1.0, 1.0, 0.0, 1.0],
        );
        assert!(near(p, -0.15), "{p}");
        let zero = LossConfig::default(); // β = 0
        assert_eq!(kl_reward_penalty(&zero, &[-1.0], &[-2.0], &[1.0]), 0.0);
    }

    #[test]
    fn dads_weight_values() {
        // G = 4, 1 correct: d = 0.75, 1 − exp(−e·0.25) = 1 − exp(−0.6795704571147613)
        //                                           = 1 − 0.5068346528 = 0.4931653472
        let w = dads_weight(true, 1, 4);
        assert!((w - 0.4931653471658926).abs() < 1e-12, "{w}");
        // G = 4, 3 correct: 1 − exp(−e·0.75) = 1 − exp(−2.0387113713) = 1 − 0.1301963776
        assert!((dads_weight(true, 3, 4) - 0.8698036223917958).abs() < 1e-12);
        // d ∈ {0, 1}, non-positive, empty group ⇒ 1
        assert_eq!(dads_weight(true, 4, 4), 1.0);
        assert_eq!(dads_weight(true, 0, 4), 1.0);
        assert_eq!(dads_weight(false, 1, 4), 1.0);
        assert_eq!(dads_weight(true, 0, 0), 1.0);
    }
}
