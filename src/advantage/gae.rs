//! Generalized advantage estimation (Schulman et al. 2016) over one response's tokens, for PPO
//! with a critic (docs/algorithms.md#ppo-with-a-critic-gae).
//!
//! Unlike the group estimators of [`super::estimators`], GAE reads the critic's value V(s_t) of
//! every token position, so the trainer calls these functions itself (`train::critic`); the
//! `gae` entry of the estimator table only names the method. Pure functions over `f64`.
//!
//! With token rewards r_t, values V_t (V_T = 0 after the last token), discount γ and λ:
//!
//! ```text
//! δ_t = r_t + γ·V_{t+1} − V_t
//! A_t = δ_t + γλ·A_{t+1}          (A_T = 0)
//! R_t = A_t + V_t                 (the critic's regression target)
//! ```
//!
//! Reductions (tested): λ = 1, γ = 1, V ≡ 0 ⇒ A_t = Σ_{k≥t} r_k, the return-to-go (REINFORCE);
//! λ = 0 ⇒ A_t = δ_t, the one-step TD error.

use serde::{Deserialize, Serialize};

use super::config::non_negative;
use super::estimators::EstimatorParamsTable;
use super::AdvantageError;

/// `[advantage.gae]`: the parameters of `gae` (PPO with a critic; verl's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GaeParams {
    /// Discount γ in [0, 1] per token. Default 1.0 (verl's PPO).
    pub gamma: f64,
    /// GAE λ in [0, 1]: 1 is the Monte-Carlo return minus V, 0 the one-step TD error. Default
    /// 0.95 (verl's PPO).
    pub lambda: f64,
    /// Whiten the advantages over every trainable token of the batch: (A − mean)/√(var + 1e-8),
    /// unbiased variance (verl's `masked_whiten`). Default true.
    pub whiten: bool,
}

impl Default for GaeParams {
    fn default() -> Self {
        GaeParams {
            gamma: 1.0,
            lambda: 0.95,
            whiten: true,
        }
    }
}

impl EstimatorParamsTable for GaeParams {
    fn check(&self, table: &str) -> Result<(), AdvantageError> {
        for (key, v) in [("gamma", self.gamma), ("lambda", self.lambda)] {
            non_negative(&format!("{table}.{key}"), v)?;
            if v > 1.0 {
                return Err(AdvantageError::InvalidConfig {
                    field: format!("{table}.{key}"),
                    message: format!("must be in [0, 1], found {v}"),
                });
            }
        }
        Ok(())
    }
}

/// The token rewards of one response: −β·kl_t at every token (InstructGPT / verl
/// `kl_in_reward`; `kl` empty for none) plus the outcome reward on the last token.
pub fn token_rewards(outcome: f64, len: usize, kl: &[f64], kl_coef: f64) -> Vec<f64> {
    let mut r: Vec<f64> = (0..len)
        .map(|t| -kl_coef * kl.get(t).copied().unwrap_or(0.0))
        .collect();
    if let Some(last) = r.last_mut() {
        *last += outcome;
    }
    r
}

/// GAE advantages and returns of one response (`rewards` and `values` of the same length).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lambda: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len().min(values.len());
    let mut adv = vec![0.0; n];
    let mut next_value = 0.0;
    let mut next_adv = 0.0;
    for t in (0..n).rev() {
        let delta = rewards[t] + gamma * next_value - values[t];
        next_adv = delta + gamma * lambda * next_adv;
        adv[t] = next_adv;
        next_value = values[t];
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// [`gae`] over the trainable tokens only (`mask[t] > 0`): tokens the environment wrote in a
/// multi-turn episode are part of the next state, not actions, so the value after the last
/// token of one turn is the value at the first token of the next. Masked positions get
/// advantage 0 and return 0 (they enter neither loss).
pub fn gae_masked(
    rewards: &[f64],
    values: &[f64],
    mask: &[f64],
    gamma: f64,
    lambda: f64,
) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let idx: Vec<usize> = (0..n)
        .filter(|&t| mask.get(t).is_some_and(|&m| m > 0.0))
        .collect();
    // A reward on a masked token (none by construction of `token_rewards` when the last token
    // is trainable) is credited to the action before it.
    let mut r = vec![0.0; idx.len()];
    let mut k = 0usize;
    for (t, &rt) in rewards.iter().enumerate() {
        while k + 1 < idx.len() && idx[k + 1] <= t {
            k += 1;
        }
        if !idx.is_empty() {
            r[k] += rt;
        }
    }
    let v: Vec<f64> = idx.iter().map(|&t| values[t]).collect();
    let (a, ret) = gae(&r, &v, gamma, lambda);
    let mut adv = vec![0.0; n];
    let mut returns = vec![0.0; n];
    for (k, &t) in idx.iter().enumerate() {
        adv[t] = a[k];
        returns[t] = ret[k];
    }
    (adv, returns)
}

/// Whitens advantages over every masked-in token of the batch in place: (A − μ)/√(σ² + 1e-8),
/// σ² the unbiased variance (verl's `masked_whiten`). Fewer than two tokens: only centred.
pub fn whiten(adv: &mut [Vec<f64>], masks: &[Vec<f64>]) {
    let vals: Vec<f64> = adv
        .iter()
        .zip(masks)
        .flat_map(|(a, m)| a.iter().zip(m).filter(|(_, &m)| m > 0.0).map(|(a, _)| *a))
        .collect();
    let n = vals.len() as f64;
    if vals.is_empty() {
        return;
    }
    let mean = vals.iter().sum::<f64>() / n;
    let scale = if vals.len() > 1 {
        let var = vals.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        1.0 / (var + 1e-8).sqrt()
    } else {
        1.0
    };
    for (a, m) in adv.iter_mut().zip(masks) {
        for (x, &mt) in a.iter_mut().zip(m) {
            *x = if mt > 0.0 { (*x - mean) * scale } else { 0.0 };
        }
    }
}

/// Explained variance of the values as predictors of the returns over masked-in tokens:
/// 1 − Var(R − V)/Var(R) (population variances); NaN when the returns do not vary.
pub fn explained_variance(values: &[Vec<f64>], returns: &[Vec<f64>], masks: &[Vec<f64>]) -> f64 {
    let mut pairs = vec![];
    for ((v, r), m) in values.iter().zip(returns).zip(masks) {
        for ((&vt, &rt), &mt) in v.iter().zip(r).zip(m) {
            if mt > 0.0 {
                pairs.push((vt, rt));
            }
        }
    }
    let var = |xs: &mut dyn Iterator<Item = f64>| {
        let xs: Vec<f64> = xs.collect();
        let n = xs.len().max(1) as f64;
        let mean = xs.iter().sum::<f64>() / n;
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n
    };
    let var_r = var(&mut pairs.iter().map(|p| p.1));
    if var_r == 0.0 {
        return f64::NAN;
    }
    1.0 - var(&mut pairs.iter().map(|p| p.1 - p.0)) / var_r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::near;

    fn all_near(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| near(*x, *y))
    }

    #[test]
    fn hand_computed_three_tokens() {
        // r = [0, 0, 1], V = [0.5, 0.6, 0.8], γ = 0.9, λ = 0.5.
        // δ_2 = 1 + 0.9·0 − 0.8 = 0.2
        // δ_1 = 0 + 0.9·0.8 − 0.6 = 0.12
        // δ_0 = 0 + 0.9·0.6 − 0.5 = 0.04
        // A_2 = 0.2; A_1 = 0.12 + 0.45·0.2 = 0.21; A_0 = 0.04 + 0.45·0.21 = 0.1345
        // R = A + V = [0.6345, 0.81, 1.0]
        let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.6, 0.8], 0.9, 0.5);
        assert!(all_near(&a, &[0.1345, 0.21, 0.2]), "{a:?}");
        assert!(all_near(&r, &[0.6345, 0.81, 1.0]), "{r:?}");
    }

    #[test]
    fn reduction_lambda_one_gamma_one_zero_values_is_return_to_go() {
        let rewards = [0.5, -0.25, 0.0, 2.0];
        let (a, r) = gae(&rewards, &[0.0; 4], 1.0, 1.0);
        // Return-to-go: [2.25, 1.75, 2.0, 2.0].
        assert!(all_near(&a, &[2.25, 1.75, 2.0, 2.0]), "{a:?}");
        assert_eq!(a, r);
        // With an outcome reward only, every token gets the outcome (REINFORCE's A = r).
        let (a, _) = gae(&token_rewards(0.7, 3, &[], 0.0), &[0.0; 3], 1.0, 1.0);
        assert!(all_near(&a, &[0.7; 3]), "{a:?}");
    }

    #[test]
    fn reduction_lambda_zero_is_one_step_td_error() {
        let r = [0.1, 0.2, 1.0];
        let v = [0.3, -0.4, 0.9];
        let g = 0.8;
        let (a, ret) = gae(&r, &v, g, 0.0);
        let td = [0.1 + g * -0.4 - 0.3, 0.2 + g * 0.9 + 0.4, 1.0 - 0.9];
        assert!(all_near(&a, &td), "{a:?} vs {td:?}");
        // The return of λ = 0 is the one-step target r_t + γV_{t+1}.
        assert!(
            all_near(&ret, &[0.1 + g * -0.4, 0.2 + g * 0.9, 1.0]),
            "{ret:?}"
        );
    }

    #[test]
    fn token_rewards_put_the_outcome_on_the_last_token_minus_kl() {
        // β = 0.1, kl = [0.5, 1.0, 2.0], outcome 1: [−0.05, −0.1, 1 − 0.2].
        let r = token_rewards(1.0, 3, &[0.5, 1.0, 2.0], 0.1);
        assert!(all_near(&r, &[-0.05, -0.1, 0.8]), "{r:?}");
        assert!(token_rewards(1.0, 0, &[], 0.1).is_empty());
    }

    #[test]
    fn masked_tokens_are_skipped_as_states() {
        // Tokens 0 and 3 are actions; 1, 2 were written by the environment. γ = 0.5, λ = 1.
        // Compacted: r = [0, 1], V = [0.2, 0.4]: A_1 = 1 − 0.4 = 0.6;
        // A_0 = 0 + 0.5·0.4 − 0.2 + 0.5·(1 − 0.4) = 0.3. R = [0.5, 1.0].
        let mask = [1.0, 0.0, 0.0, 1.0];
        let (a, r) = gae_masked(
            &[0.0, 0.0, 0.0, 1.0],
            &[0.2, 9.0, 9.0, 0.4],
            &mask,
            0.5,
            1.0,
        );
        assert!(all_near(&a, &[0.3, 0.0, 0.0, 0.6]), "{a:?}");
        assert!(all_near(&r, &[0.5, 0.0, 0.0, 1.0]), "{r:?}");
        // All trainable: the same as gae.
        let full = gae_masked(&[0.0, 1.0], &[0.2, 0.4], &[1.0, 1.0], 0.5, 1.0);
        assert_eq!(full, gae(&[0.0, 1.0], &[0.2, 0.4], 0.5, 1.0));
        // A reward on a trailing environment token goes to the last action.
        let (a, _) = gae_masked(&[0.0, 0.0, 2.0], &[0.0; 3], &[1.0, 1.0, 0.0], 1.0, 1.0);
        assert!(all_near(&a, &[2.0, 2.0, 0.0]), "{a:?}");
    }

    #[test]
    fn whitening_over_the_batch_by_hand() {
        // Masked-in values 1, 2, 3 (the 10 is masked out): mean 2, unbiased var 1.
        let mut adv = vec![vec![1.0, 10.0], vec![2.0, 3.0]];
        whiten(&mut adv, &[vec![1.0, 0.0], vec![1.0, 1.0]]);
        let s = 1.0 / (1.0f64 + 1e-8).sqrt();
        assert!(all_near(&adv[0], &[-s, 0.0]), "{adv:?}");
        assert!(all_near(&adv[1], &[0.0, s]), "{adv:?}");
        let mut one = vec![vec![4.0]];
        whiten(&mut one, &[vec![1.0]]);
        assert_eq!(one, vec![vec![0.0]]);
    }

    #[test]
    fn explained_variance_by_hand() {
        // R = [1, 3], V = [1, 2]: Var(R) = 1, R − V = [0, 1], Var = 0.25 ⇒ 0.75.
        let ev = explained_variance(
            &[vec![1.0, 2.0, 7.0]],
            &[vec![1.0, 3.0, 0.0]],
            &[vec![1.0, 1.0, 0.0]],
        );
        assert!(near(ev, 0.75), "{ev}");
        // A perfect critic explains everything; constant returns: NaN.
        assert!(near(
            explained_variance(&[vec![1.0, 3.0]], &[vec![1.0, 3.0]], &[vec![1.0, 1.0]]),
            1.0
        ));
        assert!(explained_variance(&[vec![0.0]], &[vec![1.0]], &[vec![1.0]]).is_nan());
    }

    #[test]
    fn gamma_and_lambda_outside_zero_one_are_named() {
        let e = GaeParams {
            lambda: 1.5,
            ..Default::default()
        }
        .check("gae")
        .unwrap_err()
        .to_string();
        assert!(e.contains("gae.lambda") && e.contains("1.5"), "{e}");
        let e = GaeParams {
            gamma: -0.1,
            ..Default::default()
        }
        .check("gae")
        .unwrap_err()
        .to_string();
        assert!(e.contains("gae.gamma"), "{e}");
    }
}
