//! Per-response adjustments (docs/algorithms.md#adjustments-after-the-estimator), each off by default.
//!
//! Reward shaping before the estimator: TempSamp soft shaping. Inside the estimator step:
//! TempSamp anchoring (statistics over on-policy members, ground truth gets 1.2·max). After the
//! estimator, in this order: STCR, RED-Weight, the StableReinforce filter, duration weights.
//! Duration weights multiply the loss of a sample; every policy loss is positively
//! homogeneous in A, so multiplying A by w_i > 0 is the same thing.

use super::estimators::mean;

/// STCR (APO): in a group with at least one correct response, each incorrect response longer
/// than the mean correct length by Δ > 0 gets A ← A·(2 − base^(−Δ)).
pub fn stcr(advantages: &[f64], correct: &[bool], lengths: &[usize], base: f64) -> Vec<f64> {
    let correct_lengths: Vec<f64> = correct
        .iter()
        .zip(lengths)
        .filter(|(c, _)| **c)
        .map(|(_, &l)| l as f64)
        .collect();
    if correct_lengths.is_empty() {
        return advantages.to_vec();
    }
    let mean_correct = mean(&correct_lengths);
    advantages
        .iter()
        .zip(correct.iter().zip(lengths))
        .map(|(&a, (&c, &l))| {
            let delta = l as f64 - mean_correct;
            if !c && delta > 0.0 {
                a * (2.0 - base.powf(-delta))
            } else {
                a
            }
        })
        .collect()
}

/// TempSamp soft shaping of one reward, applied before the estimator:
/// r ≥ τ ⇒ τ + a1·ln(r − τ + 1); r < τ ⇒ τ − (exp(a2(τ − r)) − 1)/(exp(a2) − 1).
/// DAPO's soft overlong punishment of a response of `len` tokens with budget `max_len` (L) and
/// cache `cache` (C): 0 up to L − C, then ((L − C) − len)/C falling linearly to −1 at L, and −1
/// beyond L.
pub fn overlong_penalty(len: usize, max_len: usize, cache: usize) -> f64 {
    let free = max_len.saturating_sub(cache);
    if len <= free {
        0.0
    } else if len <= max_len {
        (free as f64 - len as f64) / cache as f64
    } else {
        -1.0
    }
}

pub fn soft_shape(reward: f64, tau: f64, a1: f64, a2: f64) -> f64 {
    if reward >= tau {
        tau + a1 * (reward - tau + 1.0).ln()
    } else {
        tau - ((a2 * (tau - reward)).exp() - 1.0) / (a2.exp() - 1.0)
    }
}

/// TempSamp anchoring: spreads the advantages computed over the on-policy `members` back to a
/// group of `len` responses; every other (ground-truth) response gets factor·max on-policy A.
pub fn anchor(member_advantages: &[f64], members: &[usize], len: usize, factor: f64) -> Vec<f64> {
    let max = member_advantages
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    let anchored = if max.is_finite() { factor * max } else { 0.0 };
    let mut out = vec![anchored; len];
    for (&i, &a) in members.iter().zip(member_advantages) {
        if let Some(slot) = out.get_mut(i) {
            *slot = a;
        }
    }
    out
}

/// RED-Weight: effective advantage A·exp(A/τ).
pub fn red_weight(advantage: f64, tau: f64) -> f64 {
    advantage * (advantage / tau).exp()
}

/// StableReinforce advantage filter over a batch. z = (A − μ)/(σ + ε) with μ, σ the
/// `weights`-weighted mean and population std of the finite advantages (token weights: response
/// lengths). Sets to 0, and counts, every advantage that is non-finite, has |z| > `z_max`, or has
/// |A| > `abs_max`. **Decision:** the source lists "|z| > 3, non-finite, or |z| > 10", where
/// the last is implied by the first; the second threshold is read as a bound on |A| itself.
pub fn stable_filter(
    advantages: &[Vec<f64>],
    weights: &[Vec<f64>],
    z_max: f64,
    abs_max: f64,
    eps: f64,
) -> (Vec<Vec<f64>>, usize) {
    let pairs: Vec<(f64, f64)> = advantages
        .iter()
        .zip(weights)
        .flat_map(|(a, w)| a.iter().copied().zip(w.iter().copied()))
        .filter(|(a, _)| a.is_finite())
        .collect();
    let total_weight: f64 = pairs.iter().map(|(_, w)| w).sum();
    let (mu, sigma) = if total_weight > 0.0 {
        let mu = pairs.iter().map(|(a, w)| a * w).sum::<f64>() / total_weight;
        let var = pairs
            .iter()
            .map(|(a, w)| w * (a - mu) * (a - mu))
            .sum::<f64>()
            / total_weight;
        (mu, var.sqrt())
    } else {
        (0.0, 0.0)
    };
    let mut filtered = 0;
    let out = advantages
        .iter()
        .map(|group| {
            group
                .iter()
                .map(|&a| {
                    let z = if total_weight > 0.0 {
                        (a - mu) / (sigma + eps)
                    } else {
                        0.0
                    };
                    if !a.is_finite() || z.abs() > z_max || a.abs() > abs_max {
                        filtered += 1;
                        0.0
                    } else {
                        a
                    }
                })
                .collect()
        })
        .collect();
    (out, filtered)
}

/// Δt_i = max(exec_time_i + t_min, t_floor); a NaN, infinite or negative time is an unparsable
/// action and gets the fixed `unparsable` duration.
pub fn effective_duration(exec_time: f64, t_min: f64, t_floor: f64, unparsable: f64) -> f64 {
    if !exec_time.is_finite() || exec_time < 0.0 {
        unparsable
    } else {
        (exec_time + t_min).max(t_floor)
    }
}

/// Duration weights w_i = Δt_i / mean over the batch of Δt.
pub fn duration_weights(
    durations: &[Vec<f64>],
    t_min: f64,
    t_floor: f64,
    unparsable: f64,
) -> Vec<Vec<f64>> {
    let dt: Vec<Vec<f64>> = durations
        .iter()
        .map(|g| {
            g.iter()
                .map(|&d| effective_duration(d, t_min, t_floor, unparsable))
                .collect()
        })
        .collect();
    let flat: Vec<f64> = dt.iter().flatten().copied().collect();
    let batch_mean = mean(&flat);
    dt.into_iter()
        .map(|g| g.into_iter().map(|d| d / batch_mean).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_close;

    #[test]
    fn stcr_hand_computed() {
        // correct lengths [10] ⇒ mean 10. Response 1 incorrect, Δ = 20 − 10 = 10 ⇒
        // factor 2 − 2^(−10) = 1.9990234; response 2 incorrect but shorter (Δ = −5) ⇒ unchanged.
        let a = stcr(
            &[2.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0],
            &[true, false, false],
            &[10, 20, 5],
            2.0,
        );
        assert_close(
            &a,
            &[2.0 / 3.0, -1.0 / 3.0 * 1.999_023_437_5, -1.0 / 3.0],
            1e-12,
        );
    }

    #[test]
    fn stcr_default_base_and_no_correct_answer() {
        // base 1.00001, Δ = 100 ⇒ 2 − 1.00001^(−100) = 1 + (1 − e^(−100·ln 1.00001)) = 1.0009995
        let a = stcr(&[1.0, -1.0], &[true, false], &[100, 200], 1.00001);
        assert_close(&a, &[1.0, -1.000_999_5], 1e-7);
        // no correct response ⇒ nothing to compare against ⇒ unchanged
        assert_eq!(
            stcr(&[-1.0, -1.0], &[false, false], &[1, 900], 2.0),
            vec![-1.0, -1.0]
        );
    }

    #[test]
    fn soft_shape_hand_computed() {
        // r = 1   ⇒ 0.8 + 0.01·ln 1.2 = 0.8018232
        // r = 0   ⇒ 0.8 − (e^0.8 − 1)/(e − 1) = 0.8 − 1.2255409/1.7182818 = 0.0867637
        // r = 0.5 ⇒ 0.8 − (e^0.3 − 1)/(e − 1) = 0.8 − 0.3498588/1.7182818 = 0.5963903
        // r = τ   ⇒ τ (continuous at the threshold)
        assert_close(
            &[
                soft_shape(1.0, 0.8, 0.01, 1.0),
                soft_shape(0.0, 0.8, 0.01, 1.0),
                soft_shape(0.5, 0.8, 0.01, 1.0),
                soft_shape(0.8, 0.8, 0.01, 1.0),
            ],
            &[0.801_823_2, 0.086_763_7, 0.596_390_3, 0.8],
            1e-7,
        );
    }

    #[test]
    fn anchor_fills_ground_truth_with_factor_times_max() {
        // on-policy members 1, 2, 3 with A = [−0.5, 1.0, −0.5]; ground truth at 0 gets 1.2·1.0
        let a = anchor(&[-0.5, 1.0, -0.5], &[1, 2, 3], 4, 1.2);
        assert_close(&a, &[1.2, -0.5, 1.0, -0.5], 1e-12);
    }

    #[test]
    fn red_weight_hand_computed() {
        use std::f64::consts::E;
        // 1·e^1 = 2.7182818; −1·e^−1 = −0.3678794; 0 stays 0; τ = 2: 1·e^0.5 = 1.6487213
        assert_close(
            &[
                red_weight(1.0, 1.0),
                red_weight(-1.0, 1.0),
                red_weight(0.0, 1.0),
                red_weight(1.0, 2.0),
            ],
            &[E, -1.0 / E, 0.0, 1.648_721_3],
            1e-7,
        );
    }

    #[test]
    fn stable_filter_drops_a_three_sigma_outlier() {
        // ten zeros and one 1: μ = 1/11, σ = sqrt(10)/11 ⇒ z(1) = (10/11)/(sqrt(10)/11) = 3.162 > 3
        // z(0) = −1/sqrt(10) = −0.316 ⇒ kept
        let mut a = vec![vec![0.0; 10]];
        a.push(vec![1.0]);
        let w: Vec<Vec<f64>> = a.iter().map(|g| vec![1.0; g.len()]).collect();
        let (out, n) = stable_filter(&a, &w, 3.0, 10.0, 1e-6);
        assert_eq!(n, 1);
        assert_eq!(out[1], vec![0.0]);
    }

    #[test]
    fn stable_filter_is_token_weighted() {
        // A = [0, 1]. Lengths [10, 1]: weighted like the case above ⇒ z(1) = 3.162 ⇒ zeroed.
        // Equal weights: μ = 0.5, σ = 0.5 ⇒ |z| = 1 ⇒ kept.
        let a = vec![vec![0.0, 1.0]];
        let (out, n) = stable_filter(&a, &[vec![10.0, 1.0]], 3.0, 10.0, 1e-6);
        assert_eq!((out[0].clone(), n), (vec![0.0, 0.0], 1));
        let (out, n) = stable_filter(&a, &[vec![1.0, 1.0]], 3.0, 10.0, 1e-6);
        assert_eq!((out[0].clone(), n), (vec![0.0, 1.0], 0));
    }

    #[test]
    fn stable_filter_drops_non_finite_and_huge_advantages() {
        // NaN and ∞ are dropped and excluded from the statistics; |−12| > 10 is dropped.
        // The finite values [1, −1, −12]: μ = −4, σ = sqrt((25 + 9 + 64)/3) = 5.715 ⇒ |z| ≤ 1.4
        let a = vec![vec![f64::NAN, 1.0], vec![f64::INFINITY, -1.0, -12.0]];
        let w: Vec<Vec<f64>> = a.iter().map(|g| vec![1.0; g.len()]).collect();
        let (out, n) = stable_filter(&a, &w, 3.0, 10.0, 1e-6);
        assert_eq!(n, 3);
        assert_eq!(out, vec![vec![0.0, 1.0], vec![0.0, -1.0, 0.0]]);
    }

    #[test]
    fn stable_filter_keeps_a_constant_batch() {
        // σ = 0 ⇒ z = 0 for all (ε guard) ⇒ nothing filtered
        let a = vec![vec![0.5, 0.5], vec![0.5]];
        let w: Vec<Vec<f64>> = a.iter().map(|g| vec![1.0; g.len()]).collect();
        let (out, n) = stable_filter(&a, &w, 3.0, 10.0, 1e-6);
        assert_eq!((out, n), (a.clone(), 0));
    }

    #[test]
    fn duration_weights_hand_computed() {
        // Δt = [max(1 + 0, 0.01), max(3 + 0, 0.01), unparsable 2] = [1, 3, 2], mean 2
        // ⇒ w = [0.5, 1.5, 1.0]; a negative time is unparsable too
        let w = duration_weights(&[vec![1.0, 3.0], vec![f64::NAN]], 0.0, 0.01, 2.0);
        assert_eq!(w, vec![vec![0.5, 1.5], vec![1.0]]);
        let w = duration_weights(&[vec![-1.0, 2.0]], 0.0, 0.01, 2.0);
        assert_eq!(w, vec![vec![1.0, 1.0]]);
    }

    #[test]
    fn effective_duration_applies_t_min_and_floor() {
        // 0.001 + 0.5 = 0.501; 0 + 0 below floor 0.1 ⇒ 0.1
        assert!((effective_duration(0.001, 0.5, 0.1, 9.0) - 0.501).abs() < 1e-12);
        assert_eq!(effective_duration(0.0, 0.0, 0.1, 9.0), 0.1);
        assert_eq!(effective_duration(f64::INFINITY, 0.0, 0.1, 9.0), 9.0);
    }

    #[test]
    fn overlong_penalty_by_hand() {
        // L = 20, C = 4: free up to 16; 17 ⇒ (16 − 17)/4 = −0.25; 18 ⇒ −0.5; 20 ⇒ −1; 21 ⇒ −1
        let p = |len| overlong_penalty(len, 20, 4);
        assert_eq!(
            [p(0), p(16), p(17), p(18), p(20), p(21)],
            [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
        );
        // C = L: the whole budget is soft
        assert_eq!(overlong_penalty(5, 10, 10), -0.5);
    }
}
