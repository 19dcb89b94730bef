//! BNPO, Beta normalisation (docs/algorithms.md#bnpo).
//!
//! Rewards are scaled to [0, 1]; p_q is the mean reward of group q. Over the groups of a batch,
//! μ = mean(p_q), v = unbiased var(p_q); method of moments κ = μ(1−μ)/v − 1, a = κμ, b = κ(1−μ);
//! normalising parameters α = max(1 + a/3, 1), β = max(1 + b/3, 1), and
//! A_i = (r_i − p_q)/Beta_pdf(p_q; α, β) with 1/pdf clamped to [0, 1e6].
//! Guard: v = 0 (or fewer than two groups) or a non-finite κ ⇒ α = β = 1, where A = r − p
//! (`group-mean`). α = β = 3/2 gives (π/8)·(r − p)/sqrt(p(1 − p)): GRPO with population std for
//! binary rewards, up to the constant π/8.

use super::config::BnpoConfig;
use super::estimators::{mean, with_degenerate_rules, Prepared};
use super::AdvantageError;

/// Upper clamp of 1/Beta_pdf (docs/algorithms.md#bnpo).
pub const MAX_INV_PDF: f64 = 1e6;

/// The two parameters of a Beta distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BetaParams {
    pub alpha: f64,
    pub beta: f64,
}

impl BetaParams {
    /// α = β = 1: the uniform density, under which BNPO is `group-mean`.
    pub const UNIFORM: BetaParams = BetaParams {
        alpha: 1.0,
        beta: 1.0,
    };
}

/// Maps a reward from [min, max] to [0, 1].
pub fn scale_to_unit(reward: f64, min: f64, max: f64) -> f64 {
    (reward - min) / (max - min)
}

/// Normalising parameters from the batch's group means p_q by the method of moments.
pub fn normalising_params(group_means: &[f64]) -> BetaParams {
    if group_means.len() < 2 {
        return BetaParams::UNIFORM;
    }
    let mu = mean(group_means);
    let var = group_means.iter().map(|p| (p - mu) * (p - mu)).sum::<f64>()
        / (group_means.len() - 1) as f64;
    let kappa = mu * (1.0 - mu) / var - 1.0;
    if var == 0.0 || !kappa.is_finite() {
        return BetaParams::UNIFORM;
    }
    let a = kappa * mu;
    let b = kappa * (1.0 - mu);
    BetaParams {
        alpha: (1.0 + a / 3.0).max(1.0),
        beta: (1.0 + b / 3.0).max(1.0),
    }
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms; about 15 significant digits).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // reflection: Γ(x)Γ(1−x) = π / sin(πx)
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + G + 0.5;
    let series = COEF
        .iter()
        .enumerate()
        .skip(1)
        .fold(COEF[0], |acc, (i, c)| acc + c / (x + i as f64));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + series.ln()
}

/// (k)·ln(x) with the convention 0·ln 0 = 0, so α = 1 or β = 1 is exact at the edges.
fn k_ln(k: f64, x: f64) -> f64 {
    if k == 0.0 {
        0.0
    } else {
        k * x.ln()
    }
}

/// Beta density at x ∈ [0, 1].
pub fn beta_pdf(x: f64, params: BetaParams) -> f64 {
    let BetaParams { alpha, beta } = params;
    let ln_norm = ln_gamma(alpha) + ln_gamma(beta) - ln_gamma(alpha + beta);
    (k_ln(alpha - 1.0, x) + k_ln(beta - 1.0, 1.0 - x) - ln_norm).exp()
}

/// 1/Beta_pdf(p), clamped to [0, MAX_INV_PDF] (a zero density gives the clamp).
pub fn inverse_pdf(p: f64, params: BetaParams) -> f64 {
    let inv = 1.0 / beta_pdf(p, params);
    if inv.is_finite() {
        inv.clamp(0.0, MAX_INV_PDF)
    } else {
        MAX_INV_PDF
    }
}

/// BNPO advantage of one group whose rewards are already in [0, 1]:
/// A_i = (r_i − p)/Beta_pdf(p; α, β) with p the group mean; degenerate-group rules apply.
pub fn bnpo(rewards: &[f64], params: BetaParams) -> Vec<f64> {
    with_degenerate_rules(rewards, |r| {
        let p = mean(r);
        let inv = inverse_pdf(p, params);
        r.iter().map(|x| (x - p) * inv).collect()
    })
}

/// BNPO over a batch: one [`normalising_params`] from all groups' means (unless `fixed`), then
/// [`bnpo`] per group. Rewards must already be in [0, 1].
pub fn bnpo_batch(groups: &[Vec<f64>], fixed: Option<BetaParams>) -> Vec<Vec<f64>> {
    let params = fixed.unwrap_or_else(|| {
        let means: Vec<f64> = groups.iter().map(|g| mean(g)).collect();
        normalising_params(&means)
    });
    groups.iter().map(|g| bnpo(g, params)).collect()
}

/// BNPO decomposition over several reward components: `components[q][i][k]` is component k of
/// response i in group q. Each component gets its own batch parameters and advantage; a
/// response's advantage is the mean over components. All responses must have the same number of
/// components (checked by the caller).
pub fn bnpo_decomposed(components: &[Vec<Vec<f64>>], fixed: Option<BetaParams>) -> Vec<Vec<f64>> {
    let k_count = components
        .iter()
        .flat_map(|g| g.iter())
        .map(|c| c.len())
        .next()
        .unwrap_or(0);
    let mut total: Vec<Vec<f64>> = components.iter().map(|g| vec![0.0; g.len()]).collect();
    if k_count == 0 {
        return total;
    }
    for k in 0..k_count {
        let column: Vec<Vec<f64>> = components
            .iter()
            .map(|g| g.iter().map(|c| c.get(k).copied().unwrap_or(0.0)).collect())
            .collect();
        for (sum, adv) in total.iter_mut().zip(bnpo_batch(&column, fixed)) {
            for (s, a) in sum.iter_mut().zip(adv) {
                *s += a / k_count as f64;
            }
        }
    }
    total
}

/// BNPO over the batch: rewards (or each component) scaled to [0, 1], batch Beta parameters,
/// per-group advantages. With components, the degenerate-group rules apply per component.
pub fn estimate_batch(
    b: &BnpoConfig,
    prepared: &[Prepared],
) -> Result<Vec<Vec<f64>>, AdvantageError> {
    let fixed = match (b.alpha, b.beta) {
        (Some(alpha), Some(beta)) => Some(BetaParams { alpha, beta }),
        _ => None,
    };
    let unit = |group: usize, field: &'static str, position: usize, value: f64| {
        if (b.reward_min..=b.reward_max).contains(&value) {
            Ok(scale_to_unit(value, b.reward_min, b.reward_max))
        } else {
            Err(AdvantageError::OutOfRange {
                group,
                field,
                position,
                value,
                min: b.reward_min,
                max: b.reward_max,
            })
        }
    };
    if prepared.iter().any(|p| p.components.is_some()) {
        let mut scaled = Vec::with_capacity(prepared.len());
        for (gi, p) in prepared.iter().enumerate() {
            let mut rows = Vec::new();
            for (row, &pos) in p.components.iter().flatten().zip(&p.members) {
                let cells: Result<Vec<f64>, _> = row
                    .iter()
                    .map(|&c| unit(gi, "components", pos, c))
                    .collect();
                rows.push(cells?);
            }
            scaled.push(rows);
        }
        return Ok(bnpo_decomposed(&scaled, fixed));
    }
    let mut scaled = Vec::with_capacity(prepared.len());
    for (gi, p) in prepared.iter().enumerate() {
        let rewards: Result<Vec<f64>, _> = p
            .rewards
            .iter()
            .zip(&p.members)
            .map(|(&r, &pos)| unit(gi, "rewards", pos, r))
            .collect();
        scaled.push(rewards?);
    }
    Ok(bnpo_batch(&scaled, fixed))
}

#[cfg(test)]
mod tests {
    use super::super::estimators::{group_mean, grpo};
    use super::super::StdKind;
    use super::*;
    use crate::testing::assert_close;
    use std::f64::consts::FRAC_PI_8;

    #[test]
    fn ln_gamma_matches_known_values() {
        // Γ(1) = Γ(2) = 1; Γ(5) = 24; Γ(1/2) = √π ⇒ ln = 0.5723649429
        assert!(ln_gamma(1.0).abs() < 1e-13);
        assert!(ln_gamma(2.0).abs() < 1e-13);
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-12);
        assert!((ln_gamma(0.5) - 0.572_364_942_924_700_1).abs() < 1e-12);
    }

    #[test]
    fn beta_pdf_known_values() {
        // Beta(1,1) is uniform; Beta(2,2) pdf = 6x(1−x) ⇒ 1.5 at 0.5;
        // Beta(1.5,1.5) pdf = (8/π)·sqrt(x(1−x)) ⇒ at 0.25: 2.5464791·0.4330127 = 1.1026578
        assert!((beta_pdf(0.3, BetaParams::UNIFORM) - 1.0).abs() < 1e-12);
        let two = BetaParams {
            alpha: 2.0,
            beta: 2.0,
        };
        assert!((beta_pdf(0.5, two) - 1.5).abs() < 1e-12);
        let half = BetaParams {
            alpha: 1.5,
            beta: 1.5,
        };
        assert!((beta_pdf(0.25, half) - 1.102_657_8).abs() < 1e-7);
        // α = 1 at x = 0 stays finite: Beta(1, 2) pdf = 2(1 − x) ⇒ 2
        let edge = BetaParams {
            alpha: 1.0,
            beta: 2.0,
        };
        assert!((beta_pdf(0.0, edge) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn inverse_pdf_is_clamped_where_the_density_vanishes() {
        // Beta(2,2) has density 0 at p = 0 ⇒ 1/pdf = ∞ ⇒ clamp 1e6
        let two = BetaParams {
            alpha: 2.0,
            beta: 2.0,
        };
        assert_eq!(inverse_pdf(0.0, two), MAX_INV_PDF);
    }

    #[test]
    fn method_of_moments_hand_computed() {
        // p = [0.25, 0.5, 0.75]: μ = 0.5, v = (0.0625 + 0 + 0.0625)/2 = 0.0625,
        // κ = 0.25/0.0625 − 1 = 3, a = b = 1.5, α = β = 1 + 1.5/3 = 1.5
        let p = normalising_params(&[0.25, 0.5, 0.75]);
        assert!(
            (p.alpha - 1.5).abs() < 1e-12 && (p.beta - 1.5).abs() < 1e-12,
            "{p:?}"
        );
    }

    #[test]
    fn method_of_moments_guards() {
        // v = 0 ⇒ uniform; one group ⇒ uniform; κ < 0 (v > μ(1−μ)) ⇒ a, b < 0 ⇒ max(·, 1) = 1
        assert_eq!(normalising_params(&[0.5, 0.5]), BetaParams::UNIFORM);
        assert_eq!(normalising_params(&[0.3]), BetaParams::UNIFORM);
        assert_eq!(normalising_params(&[0.0, 1.0]), BetaParams::UNIFORM);
    }

    #[test]
    fn bnpo_with_uniform_params_equals_group_mean() {
        let r = [1.0, 0.0, 0.0, 1.0, 1.0];
        let gm = group_mean(&r);
        assert_close(&bnpo(&r, BetaParams::UNIFORM), &gm, 1e-12);
    }

    #[test]
    fn bnpo_batch_hand_computed() {
        // groups with p = 0.25, 0.5, 0.75 ⇒ α = β = 1.5 (see above).
        // group 0: pdf(0.25) = 1.1026578 ⇒ A = [0.75, −0.25, −0.25, −0.25]/1.1026578
        //        = [0.6801748, −0.2267249, −0.2267249, −0.2267249]
        // group 1: pdf(0.5) = (8/π)·0.5 = 1.2732395 ⇒ A = ±0.5/1.2732395 = ±0.3926991 (= π/8)
        let groups = vec![
            vec![1.0, 0.0, 0.0, 0.0],
            vec![1.0, 1.0, 0.0, 0.0],
            vec![1.0, 1.0, 1.0, 0.0],
        ];
        let a = bnpo_batch(&groups, None);
        assert_close(
            &a[0],
            &[0.680_174_8, -0.226_724_9, -0.226_724_9, -0.226_724_9],
            1e-6,
        );
        assert_close(&a[1], &[FRAC_PI_8, FRAC_PI_8, -FRAC_PI_8, -FRAC_PI_8], 1e-6);
    }

    #[test]
    fn bnpo_three_halves_is_grpo_population_up_to_pi_over_8() {
        let r = [1.0, 0.0, 0.0, 0.0, 1.0];
        let half = BetaParams {
            alpha: 1.5,
            beta: 1.5,
        };
        let g = grpo(&r, StdKind::Population, 0.0);
        let expected: Vec<f64> = g.iter().map(|x| x * std::f64::consts::PI / 8.0).collect();
        assert_close(&bnpo(&r, half), &expected, 1e-12);
    }

    #[test]
    fn bnpo_decomposition_averages_component_advantages() {
        // Uniform params: each component's advantage is its group-mean deviation.
        // component 0 = [1, 0] ⇒ [0.5, −0.5]; component 1 = [1, 1] ⇒ all equal ⇒ [0, 0]
        // mean over components ⇒ [0.25, −0.25]
        let comps = vec![vec![vec![1.0, 1.0], vec![0.0, 1.0]]];
        let a = bnpo_decomposed(&comps, Some(BetaParams::UNIFORM));
        assert_close(&a[0], &[0.25, -0.25], 1e-12);
    }
}
