//! Noisy-verifier corrections (docs/algorithms.md#noisy-verifiers).
//!
//! Noise model: ρ₀ = P(observed 1 | truly 0) (false positive), ρ₁ = P(observed 0 | truly 1)
//! (false negative), ρ₀ + ρ₁ < 1.
//! - Backward: r̂ = (r̃ − ρ₀)/max(1 − ρ₀ − ρ₁, ε) is unbiased for the true reward; the advantage is
//!   a leave-one-out baseline on r̂ divided by a fixed or EMA scale, never the group's own std.
//! - Forward: w = r̃ − (1 − ρ₁), A = w/s, no centring within the group.
//!
//! Z-scoring inside a group cancels any affine correction of a binary reward, so a correction
//! followed by `grpo` equals the uncorrected run; `AdvantageConfig::validate` rejects it.
//!
//! Also here: the exponential moving average of the `noisy-backward` scale (also used by
//! `reward::noise`, which holds the appeals estimate of ρ₁ and the seeded noise injector).

use super::config::AdvantageConfig;
use super::estimators::{rloo, Prepared};
use super::pipeline::AdvantageState;

/// Backward-corrected (unbiased) reward r̂ = (r̃ − ρ₀)/max(1 − ρ₀ − ρ₁, ε).
pub fn backward_corrected(observed: f64, rho0: f64, rho1: f64, eps: f64) -> f64 {
    (observed - rho0) / (1.0 - rho0 - rho1).max(eps)
}

/// Forward weight w = r̃ − (1 − ρ₁): ρ₁ − 1 for an observed 0, ρ₁ for an observed 1.
pub fn forward_corrected(observed: f64, rho1: f64) -> f64 {
    observed - (1.0 - rho1)
}

/// Leave-one-out advantage on the backward-corrected rewards, before dividing by the scale
/// (degenerate-group rules apply: one sample ⇒ r̂, all equal ⇒ 0).
pub fn noisy_backward_unscaled(observed: &[f64], rho0: f64, rho1: f64, eps: f64) -> Vec<f64> {
    let corrected: Vec<f64> = observed
        .iter()
        .map(|&r| backward_corrected(r, rho0, rho1, eps))
        .collect();
    rloo(&corrected)
}

/// `noisy-backward`: A_i = (r̂_i − mean_{j≠i} r̂_j)/scale.
pub fn noisy_backward(observed: &[f64], rho0: f64, rho1: f64, scale: f64, eps: f64) -> Vec<f64> {
    noisy_backward_unscaled(observed, rho0, rho1, eps)
        .into_iter()
        .map(|a| a / scale)
        .collect()
}

/// `noisy-forward`: A_i = (r̃_i − (1 − ρ₁))/scale, no centring.
pub fn noisy_forward(observed: &[f64], rho1: f64, scale: f64) -> Vec<f64> {
    observed
        .iter()
        .map(|&r| forward_corrected(r, rho1) / scale)
        .collect()
}

/// One step of an exponential moving average; the first observation initialises it.
pub fn ema_update(previous: Option<f64>, observation: f64, decay: f64) -> f64 {
    match previous {
        None => observation,
        Some(v) => decay * v + (1.0 - decay) * observation,
    }
}

/// Population std over every value of a batch: what the EMA scale of `noisy-backward` tracks
/// (**Decision**: the spread of the unscaled leave-one-out advantages over the whole batch).
pub fn batch_spread(values: &[Vec<f64>]) -> f64 {
    let flat: Vec<f64> = values.iter().flatten().copied().collect();
    if flat.is_empty() {
        return 0.0;
    }
    let n = flat.len() as f64;
    let m = flat.iter().sum::<f64>() / n;
    (flat.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n).sqrt()
}

/// `noisy-backward` with a fixed scale, or an EMA of the batch spread when `ema_decay` is set.
pub fn backward_batch(
    cfg: &AdvantageConfig,
    prepared: &[Prepared],
    state: &mut AdvantageState,
) -> Vec<Vec<f64>> {
    let n = &cfg.noisy;
    let unscaled: Vec<Vec<f64>> = prepared
        .iter()
        .map(|p| noisy_backward_unscaled(&p.rewards, n.rho0, n.rho1, cfg.eps))
        .collect();
    let scale = match n.ema_decay {
        None => n.scale,
        Some(decay) => {
            let spread = batch_spread(&unscaled);
            // an all-degenerate batch says nothing about the scale: keep the previous one
            if spread > cfg.eps {
                state.noisy_scale_ema = Some(ema_update(state.noisy_scale_ema, spread, decay));
            }
            state.noisy_scale_ema.unwrap_or(n.scale)
        }
    };
    unscaled
        .into_iter()
        .map(|a| a.into_iter().map(|x| x / scale).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::estimators::grpo;
    use super::super::StdKind;
    use super::*;
    use crate::testing::assert_close;

    #[test]
    fn backward_correction_hand_computed() {
        // ρ₀ = 0.1, ρ₁ = 0.2 ⇒ 1 − ρ₀ − ρ₁ = 0.7; r̂(1) = 0.9/0.7 = 1.2857143, r̂(0) = −0.1/0.7 = −0.1428571
        assert!((backward_corrected(1.0, 0.1, 0.2, 1e-6) - 1.285_714_3).abs() < 1e-7);
        assert!((backward_corrected(0.0, 0.1, 0.2, 1e-6) + 0.142_857_1).abs() < 1e-7);
    }

    #[test]
    fn backward_correction_is_unbiased() {
        // true 1 reads 1 w.p. 1 − ρ₁: E[r̂] = (0.8·0.9 + 0.2·(−0.1))/0.7 = 0.7/0.7 = 1
        // true 0 reads 1 w.p. ρ₀:     E[r̂] = (0.1·0.9 + 0.9·(−0.1))/0.7 = 0
        let (r1, r0) = (
            backward_corrected(1.0, 0.1, 0.2, 1e-6),
            backward_corrected(0.0, 0.1, 0.2, 1e-6),
        );
        assert!((0.8 * r1 + 0.2 * r0 - 1.0).abs() < 1e-12);
        assert!((0.1 * r1 + 0.9 * r0).abs() < 1e-12);
    }

    #[test]
    fn noisy_backward_hand_computed() {
        // observed [1, 0, 0], r̂ = [9/7, −1/7, −1/7]; LOO: A_0 = 9/7 − (−1/7) = 10/7 = 1.4285714,
        // A_1 = −1/7 − (9/7 − 1/7)/2 = −1/7 − 4/7 = −5/7 = −0.7142857; scale 2 halves them.
        assert_close(
            &noisy_backward(&[1.0, 0.0, 0.0], 0.1, 0.2, 2.0, 1e-6),
            &[0.714_285_7, -0.357_142_9, -0.357_142_9],
            1e-7,
        );
    }

    #[test]
    fn noisy_forward_hand_computed() {
        // ρ₁ = 0.2: observed 1 ⇒ 0.2, observed 0 ⇒ −0.8; no centring, s = 1
        assert_close(
            &noisy_forward(&[1.0, 0.0, 0.0], 0.2, 1.0),
            &[0.2, -0.8, -0.8],
            1e-12,
        );
        // all-equal groups keep their signal: forward has no baseline
        assert_close(&noisy_forward(&[1.0, 1.0], 0.2, 1.0), &[0.2, 0.2], 1e-12);
    }

    #[test]
    fn z_scoring_cancels_an_affine_correction_of_binary_rewards() {
        // grpo(corrected) == grpo(raw): (r̂ − mean r̂)/std r̂ = (r − r̄)/std r for r̂ = (r − ρ₀)/k.
        // Only ε differs (std/k + ε vs std + ε), hence the 1e-5 tolerance.
        let raw = [1.0, 0.0, 0.0, 1.0, 0.0];
        let backward: Vec<f64> = raw
            .iter()
            .map(|&r| backward_corrected(r, 0.1, 0.2, 1e-6))
            .collect();
        let forward: Vec<f64> = raw.iter().map(|&r| forward_corrected(r, 0.2)).collect();
        let plain = grpo(&raw, StdKind::Sample, 1e-6);
        assert_close(&grpo(&backward, StdKind::Sample, 1e-6), &plain, 1e-5);
        assert_close(&grpo(&forward, StdKind::Sample, 1e-6), &plain, 1e-5);
    }

    #[test]
    fn ema_initialises_then_smooths() {
        // first: 0.3; then 0.9·0.3 + 0.1·0.5 = 0.32
        let v = ema_update(None, 0.3, 0.9);
        assert_eq!(v, 0.3);
        assert!((ema_update(Some(v), 0.5, 0.9) - 0.32).abs() < 1e-12);
    }

    #[test]
    fn batch_spread_hand_computed() {
        // [1, −1] ∪ [1, −1]: mean 0, population std 1
        assert!((batch_spread(&[vec![1.0, -1.0], vec![1.0, -1.0]]) - 1.0).abs() < 1e-12);
    }
}
