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
//! (docs/algorithms.md#degenerate-groups), except `asymre`, whose all-equal groups keep +c as
//! in the paper. An estimator's own parameters (`[advantage.asymre] c`, ...) are declared here
//! too, in [`EstimatorParams`].

use serde::{Deserialize, Serialize};

use super::config::{finite, non_negative, positive, AdvantageConfig, BnpoConfig};
use super::gae::GaeParams;
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
/// `doc; Variant => "config-name", reads Reads::X, group_relative BOOL, [params FIELD,]
/// |cfg, batch, state| advantages;` where the optional `params FIELD` names the estimator's own
/// parameters: a field of [`EstimatorParams`] (its sub-table `[advantage.FIELD]`), validated
/// through [`EstimatorParamsTable::check`] by the generated [`EstimatorParams::validate`]; the
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
            $(params $params:ident,)?
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

            /// The sub-table `[advantage.NAME]` of the estimator's own parameters, if it has any.
            pub fn params_table(&self) -> Option<&'static str> {
                match self {
                    $( Estimator::$variant => params_name!($($params)?) ),+
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

        impl EstimatorParams {
            /// Checks the parameters of every estimator that declares some; an error names the
            /// key as `TABLE.KEY`.
            pub fn validate(&self) -> Result<(), AdvantageError> {
                $( $( self.$params.check(stringify!($params))?; )? )+
                Ok(())
            }
        }
    };
}

/// `Some("field")` for an entry with `params field`, else `None`.
macro_rules! params_name {
    () => {
        None
    };
    ($params:ident) => {
        Some(stringify!($params))
    };
}

/// The parameters of the estimators that have their own, each in its sub-table
/// `[advantage.FIELD]` (flattened into [`AdvantageConfig`], so the TOML path is
/// `advantage.asymre.c`). A new estimator's parameters are one struct and one field here, named
/// by the `params` clause of its table entry.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EstimatorParams {
    /// Parameters of `asymre` (AsymRE, Arnal et al. 2025).
    pub asymre: AsymreParams,
    /// Parameters of `opmd` (OPMD).
    pub opmd: OpmdParams,
    /// BNPO options (docs/algorithms.md#bnpo).
    pub bnpo: BnpoConfig,
    /// Parameters of `w-reinforce` (NSR paper, W-REINFORCE).
    pub w_reinforce: WReinforceParams,
    /// Parameters of `gae` (PPO with a critic).
    pub gae: GaeParams,
}

/// One estimator's parameter table: its range checks, the error naming `table.key`.
pub trait EstimatorParamsTable {
    /// Rejects out-of-range values; `table` is the sub-table's name.
    fn check(&self, table: &str) -> Result<(), AdvantageError>;
}

/// `asymre`: A = r − (r̄ − c).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AsymreParams {
    /// Baseline shift c: A = r − (r̄ − c), also in groups whose rewards are all equal. Default 0.1 (AsymRE).
    pub c: f64,
}

impl Default for AsymreParams {
    fn default() -> Self {
        AsymreParams { c: 0.1 }
    }
}

impl EstimatorParamsTable for AsymreParams {
    fn check(&self, table: &str) -> Result<(), AdvantageError> {
        finite(&format!("{table}.c"), self.c)
    }
}

/// `opmd`: A = r − τ·log mean exp(r/τ).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpmdParams {
    /// Temperature τ: A = r − τ·log mean exp(r/τ). Default 1.0 (OPMD).
    pub tau: f64,
}

impl Default for OpmdParams {
    fn default() -> Self {
        OpmdParams { tau: 1.0 }
    }
}

impl EstimatorParamsTable for OpmdParams {
    fn check(&self, table: &str) -> Result<(), AdvantageError> {
        positive(&format!("{table}.tau"), self.tau)
    }
}

/// `w-reinforce`: λ for a correct response, −1 for an incorrect one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WReinforceParams {
    /// Weight λ of correct responses. Default 0.1 (NSR paper, W-REINFORCE).
    pub lambda: f64,
}

impl Default for WReinforceParams {
    fn default() -> Self {
        WReinforceParams { lambda: 0.1 }
    }
}

impl EstimatorParamsTable for WReinforceParams {
    fn check(&self, table: &str) -> Result<(), AdvantageError> {
        non_negative(&format!("{table}.lambda"), self.lambda)
    }
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
    /// A_i = r_i − (r̄ − c), c = `[advantage.asymre] c` (AsymRE, Arnal et al. 2025); all-equal
    /// groups keep the +c.
    Asymre => "asymre", reads Reads::Rewards, group_relative true, params asymre,
        |cfg, batch, _state| per_group(batch, |g| asymre(&g.rewards, cfg.params.asymre.c));
    /// A_i = r_i − τ·log mean_j exp(r_j/τ), τ = `[advantage.opmd] tau` (OPMD).
    Opmd => "opmd", reads Reads::Rewards, group_relative true, params opmd,
        |cfg, batch, _state| per_group(batch, |g| opmd(&g.rewards, cfg.params.opmd.tau));
    /// Beta-normalised advantage with batch-level Beta parameters (BNPO; `[advantage.bnpo]`).
    Bnpo => "bnpo", reads Reads::Rewards, group_relative false, params bnpo,
        |cfg, batch, _state| bnpo::estimate_batch(&cfg.params.bnpo, batch);
    /// λ if correct, −1 if not, λ = `[advantage.w_reinforce] lambda` (W-REINFORCE, NSR paper,
    /// Zhu et al. 2025).
    WReinforce => "w-reinforce", reads Reads::Correctness, group_relative false,
        params w_reinforce,
        |cfg, batch, _state| {
            per_group(batch, |g| w_reinforce(&g.correct, cfg.params.w_reinforce.lambda))
        };
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
    /// A_i = (r_i − μ_B)/(σ_B + ε) with the mean and std (`std`) of every reward of the batch,
    /// not of the group (REINFORCE++, Hu et al. 2025, arXiv 2501.03262); the KL penalty enters
    /// the reward with `loss.kl_in_reward` (docs/algorithms.md#reinforce).
    ReinforcePp => "reinforce++", reads Reads::Rewards, group_relative false,
        |cfg, batch, _state| Ok(reinforce_pp(&batch_rewards(batch), cfg.std, cfg.eps));
    /// Generalized advantage estimation from a critic's per-token values (PPO, Schulman et al.
    /// 2016/2017; `[advantage.gae]`, `[critic]`). It needs V(s_t) at every token, which only the
    /// trainer has: it computes it through [`super::gae`], and group rewards alone (`grove
    /// advantage`) are refused.
    Gae => "gae", reads Reads::Rewards, group_relative false, params gae,
        |_cfg, _batch, _state| Err(AdvantageError::InvalidConfig {
            field: "estimator".into(),
            message: "`gae` reads the critic's value of every token, which group rewards \
                      alone do not give; train with `[critic]` (recipe = \"ppo\"), where the \
                      trainer computes it per token".into(),
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
/// The paper's estimator has no all-equal special case, so such a group gets +c for every member
/// (exactly c, not r − r̄ + c, which could be off in the last bit); a single sample keeps A = r.
pub fn asymre(rewards: &[f64], c: f64) -> Vec<f64> {
    match rewards.len() {
        0 | 1 => rewards.to_vec(),
        n if all_equal(rewards) => vec![c; n],
        _ => {
            let baseline = mean(rewards) - c;
            rewards.iter().map(|x| x - baseline).collect()
        }
    }
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

/// `reinforce++`: every reward of the batch z-scored with the batch mean and std (REINFORCE++'s
/// global advantage normalisation). A batch whose rewards are all equal gives 0 (as a
/// degenerate group does; σ would be 0), one sample alone gives 0 too (its own mean).
pub fn reinforce_pp(groups: &[Vec<f64>], std: StdKind, eps: f64) -> Vec<Vec<f64>> {
    let all: Vec<f64> = groups.iter().flatten().copied().collect();
    if all_equal(&all) {
        return groups.iter().map(|g| vec![0.0; g.len()]).collect();
    }
    let (m, s) = (mean(&all), std_dev(&all, std));
    groups
        .iter()
        .map(|g| g.iter().map(|r| (r - m) / (s + eps)).collect())
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
    fn asymre_keeps_its_shift_in_all_equal_groups() {
        // r = [0.7, 0.7, 0.7]: r̄ = 0.7, baseline 0.7 − 0.1 = 0.6 ⇒ A = 0.1 for everyone
        assert_eq!(asymre(&[0.7, 0.7, 0.7], 0.1), vec![0.1; 3]);
        // all wrong: r = [0, 0] ⇒ baseline −0.25 ⇒ A = 0.25
        assert_eq!(asymre(&[0.0, 0.0], 0.25), vec![0.25, 0.25]);
        // reduction: c = 0 is group-mean, all-equal groups included
        assert_eq!(asymre(&[0.7, 0.7, 0.7], 0.0), group_mean(&[0.7, 0.7, 0.7]));
        assert_close(
            &asymre(&[1.0, 0.0, 0.5], 0.0),
            &group_mean(&[1.0, 0.0, 0.5]),
            1e-15,
        );
    }

    #[test]
    fn estimator_params_are_read_from_their_own_tables() {
        let cfg: AdvantageConfig = toml::from_str(
            "estimator = \"asymre\"\n[asymre]\nc = 0.25\n[opmd]\ntau = 0.5\n[w_reinforce]\nlambda = 1\n",
        )
        .unwrap();
        assert_eq!(cfg.params.asymre.c, 0.25);
        assert_eq!(cfg.params.opmd.tau, 0.5);
        assert_eq!(cfg.params.w_reinforce.lambda, 1.0);
        assert_eq!(Estimator::Asymre.params_table(), Some("asymre"));
        assert_eq!(Estimator::WReinforce.params_table(), Some("w_reinforce"));
        assert_eq!(Estimator::Grpo.params_table(), None);
        // an unknown key inside an estimator's table lists that table's keys
        let err = toml::from_str::<AdvantageConfig>("[asymre]\nk = 1\n").unwrap_err();
        assert!(
            err.message().contains("unknown field `k`, expected `c`"),
            "{err}"
        );
        // validation names the key by its table
        let mut bad = AdvantageConfig::default();
        bad.params.opmd.tau = 0.0;
        match bad.validate().unwrap_err() {
            AdvantageError::InvalidConfig { field, .. } => assert_eq!(field, "opmd.tau"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reinforce_pp_normalises_over_the_batch() {
        // batch [1, 0] + [1, 1, 0]: mean 3/5 = 0.6, sample var = (0.16·3 + 0.36·2)/4 = 0.3,
        // std = 0.5477226 ⇒ (1 − 0.6)/0.5477226 = 0.7302967, (0 − 0.6)/0.5477226 = −1.0954451
        let a = reinforce_pp(&[vec![1.0, 0.0], vec![1.0, 1.0, 0.0]], StdKind::Sample, 0.0);
        assert_close(&a[0], &[0.730_296_7, -1.095_445_1], 1e-7);
        assert_close(&a[1], &[0.730_296_7, 0.730_296_7, -1.095_445_1], 1e-7);
        // an all-equal group is not zero here: the batch mean is its baseline
        let a = reinforce_pp(&[vec![1.0, 1.0], vec![0.0, 0.0]], StdKind::Population, 0.0);
        assert_eq!(a, vec![vec![1.0, 1.0], vec![-1.0, -1.0]]);
        assert_eq!(
            reinforce_pp(&[vec![0.5, 0.5]], StdKind::Sample, EPS),
            vec![vec![0.0, 0.0]]
        );
    }

    #[test]
    fn reduction_reinforce_pp_with_one_group_is_grpo() {
        for r in [
            vec![1.0, 0.0, 0.0],
            vec![0.2, 0.9, 0.4, 0.0, 1.0],
            vec![0.3, 0.3],
        ] {
            for std in [StdKind::Sample, StdKind::Population] {
                assert_eq!(
                    reinforce_pp(std::slice::from_ref(&r), std, EPS)[0],
                    grpo(&r, std, EPS)
                );
            }
        }
        // and through the config name, as the trainer calls it
        let cfg = AdvantageConfig {
            estimator: Estimator::from_name("reinforce++").unwrap(),
            ..AdvantageConfig::default()
        };
        let groups = [super::super::Group::from_rewards(vec![1.0, 0.0])];
        let out = super::super::compute(&cfg, &groups).unwrap();
        assert_close(&out.advantages[0], &[0.707_105_8, -0.707_105_8], 1e-6);
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
