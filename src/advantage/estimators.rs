//! The advantage estimators, each declared once in the `estimators!` table below: its config
//! name, its doc (formula and paper), what it reads and how it is computed. The [`Estimator`]
//! enum, its `ALL` list, names, parsing (an unknown name lists the known ones), `Display` and the
//! dispatch of [`super::compute`] are all generated from that table, so adding an estimator
//! means one table entry, its function and its hand-computed test, all in this file
//! (docs/algorithms.md#adding-an-advantage-estimator).
//!
//! The functions are small and pure (verl `core_algos` style): one group in, one advantage per
//! response out. The baselined ones apply the degenerate-group rules through
//! [`with_degenerate_rules`]: one sample ⇒ A = r (mean 0, std 1); all rewards equal ⇒ A = 0
//! (docs/algorithms.md#degenerate-groups).

use serde::{Deserialize, Serialize};

use super::config::AdvantageConfig;
use super::pipeline::AdvantageState;
use super::{bnpo, noisy, AdvantageError, StdKind};

/// What an estimator reads of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// The (transformed) reward values.
    Rewards,
    /// Only whether each response is correct; reward corrections and shaping cannot affect it.
    Correctness,
}

/// One group as an estimator sees it: after the reward transforms (`reward_correction`,
/// TempSamp shaping) and restricted to its statistics members (every response, or only the
/// on-policy ones under TempSamp anchoring).
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// Number of responses in the group.
    pub len: usize,
    /// Positions of the responses whose rewards define the group statistics.
    pub members: Vec<usize>,
    /// Transformed rewards of the members.
    pub rewards: Vec<f64>,
    /// Correctness of the members.
    pub correct: Vec<bool>,
    /// Correctness of every response (STCR).
    pub all_correct: Vec<bool>,
    /// Transformed `all_rewards`, or the member rewards when absent (`global-mean`).
    pub all_rewards: Vec<f64>,
    /// Components of the members (BNPO decomposition).
    pub components: Option<Vec<Vec<f64>>>,
}

/// Advantages of the members of every group, one group at a time.
pub fn per_group(
    batch: &[Prepared],
    estimate: impl Fn(&Prepared) -> Vec<f64>,
) -> Result<Vec<Vec<f64>>, AdvantageError> {
    Ok(batch.iter().map(estimate).collect())
}

/// The members' rewards of every group, for estimators that need statistics over the batch.
pub fn batch_rewards(batch: &[Prepared]) -> Vec<Vec<f64>> {
    batch.iter().map(|g| g.rewards.clone()).collect()
}

/// Declares every estimator once. Each entry is
/// `doc; Variant => "config-name", reads Reads::X, group_relative BOOL, |cfg, batch, state|
/// advantages;` where the
/// closure-like body sees the [`AdvantageConfig`] (`cfg`), the prepared groups of the batch
/// (`batch: &[Prepared]`) and the state carried between batches (`state: &mut AdvantageState`),
/// and returns `Result<Vec<Vec<f64>>, AdvantageError>` with the members' advantages per group
/// ([`per_group`] for estimators that look at one group at a time). Generates [`Estimator`] with
/// `ALL`, `name`, `from_name`, `known_names`, `reads`, `Display`, serde (kebab-case names) and
/// the dispatch `estimate`.
macro_rules! estimators {
    (
        $(
            $(#[$meta:meta])*
            $variant:ident => $name:literal, reads $reads:expr, group_relative $relative:literal,
            |$cfg:ident, $batch:ident, $state:ident| $body:expr;
        )+
    ) => {
        /// Which advantage estimator turns a group's rewards into advantages
        /// (docs/algorithms.md#advantage-estimators). Serialised as its config name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
        pub enum Estimator {
            $( $(#[$meta])* #[serde(rename = $name)] $variant, )+
        }

        impl Estimator {
            /// How many estimators there are.
            pub const COUNT: usize = [$( $name ),+].len();

            /// Every estimator, in declaration order.
            pub const ALL: [Estimator; Estimator::COUNT] = [ $( Estimator::$variant ),+ ];

            /// The config / CLI name, identical to the serde name.
            pub fn name(&self) -> &'static str {
                match self {
                    $( Estimator::$variant => $name ),+
                }
            }

            /// What the estimator reads of a group.
            pub fn reads(&self) -> Reads {
                match self {
                    $( Estimator::$variant => $reads ),+
                }
            }

            /// True when a response's advantage is measured against the other responses of its
            /// group (a group baseline): with one response per group there is none, and the
            /// singleton rule A = r applies.
            pub fn group_relative(&self) -> bool {
                match self {
                    $( Estimator::$variant => $relative ),+
                }
            }

            /// The members' advantages of every prepared group of a batch.
            pub fn estimate(
                &self,
                cfg: &AdvantageConfig,
                batch: &[Prepared],
                state: &mut AdvantageState,
            ) -> Result<Vec<Vec<f64>>, AdvantageError> {
                match self {
                    $(
                        Estimator::$variant => {
                            let ($cfg, $batch, $state) = (cfg, batch, &mut *state);
                            $body
                        }
                    )+
                }
            }
        }
    };
}

estimators! {
    /// A_i = r_i, no baseline (REINFORCE, Williams 1992).
    Reinforce => "reinforce", reads Reads::Rewards, group_relative false,
        |_cfg, batch, _state| per_group(batch, |g| reinforce(&g.rewards));
    /// A_i = r_i − r̄ (Dr. GRPO, Liu et al. 2025; the REC default).
    GroupMean => "group-mean", reads Reads::Rewards, group_relative true,
        |_cfg, batch, _state| per_group(batch, |g| group_mean(&g.rewards));
    /// A_i = (r_i − r̄)/(std + ε) (GRPO, Shao et al. 2024, DeepSeekMath). The default.
    #[default]
    Grpo => "grpo", reads Reads::Rewards, group_relative true,
        |cfg, batch, _state| per_group(batch, |g| grpo(&g.rewards, cfg.std, cfg.eps));
    /// A_i = r_i − mean_{j≠i} r_j (RLOO, Ahmadian et al. 2024).
    Rloo => "rloo", reads Reads::Rewards, group_relative true,
        |_cfg, batch, _state| per_group(batch, |g| rloo(&g.rewards));
    /// A_i = r_i − (r̄ − c), c = `asymre_c` (AsymRE, Arnal et al. 2025).
    Asymre => "asymre", reads Reads::Rewards, group_relative true,
        |cfg, batch, _state| per_group(batch, |g| asymre(&g.rewards, cfg.asymre_c));
    /// A_i = r_i − τ·log mean_j exp(r_j/τ), τ = `opmd_tau` (OPMD).
    Opmd => "opmd", reads Reads::Rewards, group_relative true,
        |cfg, batch, _state| per_group(batch, |g| opmd(&g.rewards, cfg.opmd_tau));
    /// Beta-normalised advantage with batch-level Beta parameters (BNPO; `[advantage.bnpo]`).
    Bnpo => "bnpo", reads Reads::Rewards, group_relative false,
        |cfg, batch, _state| bnpo::estimate_batch(&cfg.bnpo, batch);
    /// λ if correct, −1 if not, λ = `w_lambda` (W-REINFORCE, NSR paper, Zhu et al. 2025).
    WReinforce => "w-reinforce", reads Reads::Correctness, group_relative false,
        |cfg, batch, _state| per_group(batch, |g| w_reinforce(&g.correct, cfg.w_lambda));
    /// +1 if correct, 0 otherwise (positive-sample reinforcement, NSR paper).
    Psr => "psr", reads Reads::Correctness, group_relative false,
        |_cfg, batch, _state| per_group(batch, |g| psr(&g.correct));
    /// −1 if incorrect, 0 otherwise (negative-sample reinforcement, NSR paper).
    Nsr => "nsr", reads Reads::Correctness, group_relative false,
        |_cfg, batch, _state| per_group(batch, |g| nsr(&g.correct));
    /// A_i = r_i − mean of every sample drawn for the prompt (Reinforce-Ada).
    GlobalMean => "global-mean", reads Reads::Rewards, group_relative true,
        |_cfg, batch, _state| per_group(batch, |g| global_mean(&g.rewards, &g.all_rewards));
    /// Leave-one-out baseline on the unbiased reward, fixed or EMA scale (noisy verifiers;
    /// `[advantage.noisy]`).
    NoisyBackward => "noisy-backward", reads Reads::Rewards, group_relative true,
        |cfg, batch, state| Ok(noisy::backward_batch(cfg, batch, state));
    /// A = (r̃ − (1 − ρ₁))/s, no centring (noisy verifiers; `[advantage.noisy]`).
    NoisyForward => "noisy-forward", reads Reads::Rewards, group_relative false,
        |cfg, batch, _state| per_group(batch, |g| {
            noisy::noisy_forward(&g.rewards, cfg.noisy.rho1, cfg.noisy.scale)
        });
}

impl Estimator {
    /// Parses a config / CLI name; the error lists every known name.
    pub fn from_name(name: &str) -> Result<Self, AdvantageError> {
        Estimator::ALL
            .iter()
            .copied()
            .find(|e| e.name() == name)
            .ok_or_else(|| AdvantageError::UnknownEstimator {
                name: name.to_string(),
                known: Estimator::known_names(),
            })
    }

    /// Every known name, comma separated (for error messages and `--help`).
    pub fn known_names() -> String {
        Estimator::ALL
            .iter()
            .map(|e| e.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// True for estimators that read only correctness, never the reward value.
    pub fn uses_only_correctness(&self) -> bool {
        self.reads() == Reads::Correctness
    }
}

impl std::fmt::Display for Estimator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Arithmetic mean; 0 for an empty slice.
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Standard deviation of a group; 1 for fewer than two samples (singleton rule).
pub fn std_dev(xs: &[f64], kind: StdKind) -> f64 {
    let n = xs.len();
    if n < 2 {
        return 1.0;
    }
    let m = mean(xs);
    let sum_sq: f64 = xs.iter().map(|x| (x - m) * (x - m)).sum();
    let denom = match kind {
        StdKind::Sample => (n - 1) as f64,
        StdKind::Population => n as f64,
    };
    (sum_sq / denom).sqrt()
}

/// True when every value equals the first (exact comparison: verifier rewards repeat exactly).
pub fn all_equal(xs: &[f64]) -> bool {
    xs.windows(2).all(|w| w[0] == w[1])
}

/// Applies the degenerate-group rules around a centred estimator, which is only called for groups of two or
/// more rewards that are not all equal.
pub fn with_degenerate_rules(
    rewards: &[f64],
    centred: impl FnOnce(&[f64]) -> Vec<f64>,
) -> Vec<f64> {
    match rewards.len() {
        0 => Vec::new(),
        1 => rewards.to_vec(),
        _ if all_equal(rewards) => vec![0.0; rewards.len()],
        _ => centred(rewards),
    }
}

/// `reinforce`: A_i = r_i (no baseline).
pub fn reinforce(rewards: &[f64]) -> Vec<f64> {
    rewards.to_vec()
}

/// `group-mean`: A_i = r_i − r̄ (Dr. GRPO).
pub fn group_mean(rewards: &[f64]) -> Vec<f64> {
    with_degenerate_rules(rewards, |r| {
        let m = mean(r);
        r.iter().map(|x| x - m).collect()
    })
}

/// `grpo`: A_i = (r_i − r̄)/(std + ε) (GRPO).
pub fn grpo(rewards: &[f64], std: StdKind, eps: f64) -> Vec<f64> {
    with_degenerate_rules(rewards, |r| {
        let m = mean(r);
        let s = std_dev(r, std);
        r.iter().map(|x| (x - m) / (s + eps)).collect()
    })
}

/// `rloo`: A_i = r_i − mean_{j≠i} r_j = (G·r_i − Σ_j r_j)/(G − 1) (RLOO).
pub fn rloo(rewards: &[f64]) -> Vec<f64> {
    with_degenerate_rules(rewards, |r| {
        let g = r.len() as f64;
        let sum: f64 = r.iter().sum();
        r.iter().map(|x| (g * x - sum) / (g - 1.0)).collect()
    })
}

/// `asymre`: A_i = r_i − (r̄ − c); the lowered baseline tilts the update toward positives (AsymRE).
pub fn asymre(rewards: &[f64], c: f64) -> Vec<f64> {
    with_degenerate_rules(rewards, |r| {
        let baseline = mean(r) - c;
        r.iter().map(|x| x - baseline).collect()
    })
}

/// `opmd`: A_i = r_i − τ·log mean_j exp(r_j/τ) (OPMD), computed as a stable log-sum-exp.
pub fn opmd(rewards: &[f64], tau: f64) -> Vec<f64> {
    with_degenerate_rules(rewards, |r| {
        let baseline = tau * log_mean_exp(r, tau);
        r.iter().map(|x| x - baseline).collect()
    })
}

/// log mean_j exp(r_j/τ), shifted by the maximum so large rewards do not overflow.
fn log_mean_exp(rewards: &[f64], tau: f64) -> f64 {
    let scaled: Vec<f64> = rewards.iter().map(|r| r / tau).collect();
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mean_shifted = mean(&scaled.iter().map(|s| (s - max).exp()).collect::<Vec<_>>());
    max + mean_shifted.ln()
}

/// `w-reinforce`: λ for a correct response, −1 for an incorrect one (NSR paper, λ = 0.1).
pub fn w_reinforce(correct: &[bool], lambda: f64) -> Vec<f64> {
    correct
        .iter()
        .map(|&c| if c { lambda } else { -1.0 })
        .collect()
}

/// `psr`: only positive samples train, A = +1 if correct, else 0 (NSR paper).
pub fn psr(correct: &[bool]) -> Vec<f64> {
    correct.iter().map(|&c| if c { 1.0 } else { 0.0 }).collect()
}

/// `nsr`: only negative samples train, A = −1 if incorrect, else 0 (NSR paper).
pub fn nsr(correct: &[bool]) -> Vec<f64> {
    correct
        .iter()
        .map(|&c| if c { 0.0 } else { -1.0 })
        .collect()
}

/// `global-mean`: A_i = r_i − mean of `all_rewards`, every sample drawn for the prompt including
/// discarded ones (Reinforce-Ada). The degenerate-group rules apply to the baseline's samples: one drawn sample
/// ⇒ mean 0 (A = r); every drawn and kept reward equal ⇒ A = 0.
pub fn global_mean(rewards: &[f64], all_rewards: &[f64]) -> Vec<f64> {
    if all_rewards.len() < 2 {
        return rewards.to_vec();
    }
    let first = all_rewards[0];
    if all_equal(all_rewards) && rewards.iter().all(|&r| r == first) {
        return vec![0.0; rewards.len()];
    }
    let m = mean(all_rewards);
    rewards.iter().map(|r| r - m).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_close;

    const EPS: f64 = 1e-6;

    #[test]
    fn grpo_two_samples_sample_std() {
        // mean 0.5, sample std = sqrt((0.25 + 0.25)/1) = 0.7071068; 0.5/(0.7071068 + 1e-6) = 0.7071058
        assert_close(
            &grpo(&[1.0, 0.0], StdKind::Sample, EPS),
            &[0.707_105_8, -0.707_105_8],
            1e-6,
        );
    }

    #[test]
    fn grpo_two_samples_population_std() {
        // mean 0.5, population std = 0.5; 0.5/(0.5 + 1e-6) = 0.999998
        assert_close(
            &grpo(&[1.0, 0.0], StdKind::Population, EPS),
            &[0.999_998, -0.999_998],
            1e-6,
        );
    }

    #[test]
    fn grpo_three_samples_hand_computed() {
        // r = [1, 0, 0]: mean 1/3, sample var = (4/9 + 1/9 + 1/9)/2 = 1/3, std = 0.5773503
        // A = [ (2/3)/0.5773503, (−1/3)/0.5773503 ] = [1.1547005, −0.5773503] (ε shifts the 6th digit)
        assert_close(
            &grpo(&[1.0, 0.0, 0.0], StdKind::Sample, EPS),
            &[1.154_698_5, -0.577_349_3, -0.577_349_3],
            1e-6,
        );
    }

    #[test]
    fn all_equal_group_gives_zero_for_every_baselined_estimator() {
        let r = [0.7, 0.7, 0.7];
        let zeros = vec![0.0; 3];
        assert_eq!(grpo(&r, StdKind::Sample, EPS), zeros);
        assert_eq!(group_mean(&r), zeros);
        assert_eq!(rloo(&r), zeros);
        assert_eq!(asymre(&r, 0.1), zeros);
        assert_eq!(opmd(&r, 1.0), zeros);
        assert_eq!(global_mean(&r, &r), zeros);
    }

    #[test]
    fn singleton_group_has_mean_zero_and_std_one() {
        // mean 0, std 1 ⇒ A = (r − 0)/1 = r
        assert_eq!(grpo(&[0.3], StdKind::Sample, EPS), vec![0.3]);
        assert_eq!(grpo(&[0.3], StdKind::Population, EPS), vec![0.3]);
        assert_eq!(group_mean(&[0.3]), vec![0.3]);
        assert_eq!(rloo(&[0.3]), vec![0.3]);
        assert_eq!(asymre(&[0.3], 0.1), vec![0.3]);
        assert_eq!(opmd(&[0.3], 1.0), vec![0.3]);
        assert_eq!(global_mean(&[0.3], &[0.3]), vec![0.3]);
        assert_eq!(std_dev(&[0.3], StdKind::Sample), 1.0);
    }

    #[test]
    fn std_guard_keeps_a_near_constant_group_finite() {
        // r = [1, 1 + 1e-12]: sample std ≈ 7.07e-13 ≪ ε, so A ≈ ±5e-13/1e-6 = ±5e-7, not ±0.707
        let a = grpo(&[1.0, 1.0 + 1e-12], StdKind::Sample, EPS);
        assert!(a.iter().all(|x| x.abs() < 1e-6), "{a:?}");
    }

    #[test]
    fn reinforce_is_the_reward() {
        assert_eq!(reinforce(&[1.0, -0.5, 0.0]), vec![1.0, -0.5, 0.0]);
    }

    #[test]
    fn group_mean_hand_computed() {
        // mean of [1, 0, 0, 1, 1] = 0.6 ⇒ [0.4, −0.6, −0.6, 0.4, 0.4]
        assert_close(
            &group_mean(&[1.0, 0.0, 0.0, 1.0, 1.0]),
            &[0.4, -0.6, -0.6, 0.4, 0.4],
            1e-12,
        );
    }

    #[test]
    fn rloo_hand_computed() {
        // r = [1, 0, 0, 0]: A_0 = 1 − 0 = 1; A_j = 0 − (1/3) = −1/3
        assert_close(
            &rloo(&[1.0, 0.0, 0.0, 0.0]),
            &[1.0, -1.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0],
            1e-12,
        );
    }

    #[test]
    fn rloo_equals_g_over_g_minus_one_times_group_mean() {
        let r = [0.2, 0.9, 0.4, 0.0, 1.0];
        let g = r.len() as f64;
        let scaled: Vec<f64> = group_mean(&r).iter().map(|a| g / (g - 1.0) * a).collect();
        assert_close(&rloo(&r), &scaled, 1e-12);
    }

    #[test]
    fn asymre_hand_computed() {
        // mean [1, 0] = 0.5, baseline 0.5 − 0.1 = 0.4 ⇒ [0.6, −0.4]
        assert_close(&asymre(&[1.0, 0.0], 0.1), &[0.6, -0.4], 1e-12);
    }

    #[test]
    fn opmd_hand_computed() {
        // τ = 1, r = [1, 0]: baseline = ln((e + 1)/2) = ln(1.8591409) = 0.6201145
        // A = [1 − 0.6201145, −0.6201145] = [0.3798855, −0.6201145]
        assert_close(&opmd(&[1.0, 0.0], 1.0), &[0.379_885_5, -0.620_114_5], 1e-7);
    }

    #[test]
    fn opmd_is_stable_for_large_rewards() {
        // shifting every reward by 1000 shifts the baseline by 1000: same advantages as above
        assert_close(
            &opmd(&[1001.0, 1000.0], 1.0),
            &[0.379_885_5, -0.620_114_5],
            1e-7,
        );
    }

    #[test]
    fn w_reinforce_psr_nsr_hand_computed() {
        let c = [true, false, true];
        assert_eq!(w_reinforce(&c, 0.1), vec![0.1, -1.0, 0.1]);
        assert_eq!(psr(&c), vec![1.0, 0.0, 1.0]);
        assert_eq!(nsr(&c), vec![0.0, -1.0, 0.0]);
    }

    #[test]
    fn w_reinforce_with_lambda_one_on_plus_minus_one_rewards_is_reinforce() {
        let r = [1.0, -1.0, -1.0, 1.0];
        let correct: Vec<bool> = r.iter().map(|&x| x > 0.0).collect();
        assert_eq!(w_reinforce(&correct, 1.0), reinforce(&r));
    }

    #[test]
    fn global_mean_uses_every_drawn_sample() {
        // kept [1, 0]; drawn [1, 0, 0, 0, 0, 1, 0, 0] has mean 0.25 ⇒ [0.75, −0.25]
        let all = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        assert_close(&global_mean(&[1.0, 0.0], &all), &[0.75, -0.25], 1e-12);
        // a kept group that is all equal still gets signal from the discarded samples
        assert_close(&global_mean(&[1.0, 1.0], &all), &[0.75, 0.75], 1e-12);
    }
}
