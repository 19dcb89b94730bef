//! Advantage estimation: group rewards → one scalar advantage per response
//! (docs/algorithms.md#advantage-estimators).
//!
//! Everything here is a pure function over `f64`; no tensors, no gradients. The trainer broadcasts
//! each response's advantage to its tokens.
//!
//! Layout, following the data flow of [`compute`]:
//! - [`config`]: [`AdvantageConfig`] (serde, TOML/JSON) and its [`AdvantageConfig::validate`].
//! - [`pipeline`]: [`compute`] — input checks, reward transforms, the estimator, the adjustments.
//! - [`estimators`]: the estimators, declared once in one table (`grpo`, `rloo`, ...).
//! - [`bnpo`]: Beta normalisation, which needs batch-level statistics.
//! - [`noisy`]: noisy-verifier corrections and the EMA of their scale (the appeal estimate of ρ₁
//!   and the noise injector are `reward::noise`).
//! - [`adjust`]: per-response adjustments (STCR, TempSamp, StableReinforce filter,
//!   RED-Weight, duration weights).
//! - [`calculator`]: the `grove advantage` CLI calculator (JSON in, JSON out, through [`compute`]).
//!
//! Degenerate groups (docs/algorithms.md#degenerate-groups), applied by every estimator that
//! subtracts a group baseline (`group-mean`, `grpo`, `rloo`, `asymre`, `opmd`, `bnpo`,
//! `global-mean`, `noisy-backward`):
//! a group of one sample has mean 0 and std 1, so A = r; a group whose rewards are all equal has
//! A = 0 for every member. Estimators without a baseline (`reinforce`, `w-reinforce`, `psr`, `nsr`,
//! `noisy-forward`) give each response a value that does not depend on the rest of its group, so
//! they are left as defined. `frac_zero_std` counts groups of two or more responses whose raw
//! rewards are all equal, whatever the estimator.

pub mod adjust;
pub mod bnpo;
pub mod calculator;
pub mod config;
pub mod estimators;
pub mod gae;
pub mod noisy;
pub mod pipeline;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use calculator::run_calculator;
pub use config::{
    AdvantageConfig, AnchorConfig, BnpoConfig, DurationConfig, NoisyConfig, RedWeightConfig,
    RewardCorrection, SoftShapingConfig, StableFilterConfig, StcrConfig,
};
pub use estimators::{
    asymre, global_mean, group_mean, grpo, nsr, opmd, psr, reinforce, rloo, w_reinforce, Estimator,
    Prepared, Reads,
};
pub use noisy::{noisy_backward, noisy_forward};
pub use pipeline::{compute, compute_with_state, AdvantageState};

/// Which standard deviation `grpo` divides by (docs/algorithms.md#degenerate-groups, **Decision**: sample by default,
/// as verl and TRL compute it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StdKind {
    /// Divide the sum of squares by G − 1.
    #[default]
    Sample,
    /// Divide the sum of squares by G.
    Population,
}

/// One prompt's responses and what the estimators and adjustments may need about them.
/// Only `rewards` is required; the rest is checked for shape when given and demanded when a
/// configured estimator or adjustment needs it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Group {
    /// Scalar reward of each response r_1..r_G (must be finite).
    pub rewards: Vec<f64>,
    /// Correctness of each response; when absent, reward > `positive_threshold` counts as correct.
    pub correct: Option<Vec<bool>>,
    /// Token count L_i of each response (STCR; token weights of the StableReinforce filter).
    pub lengths: Option<Vec<usize>>,
    /// Execution time of each response's action (duration weights); NaN or negative = unparsable.
    pub durations: Option<Vec<f64>>,
    /// Every sample drawn for the prompt, including discarded ones (`global-mean` baseline).
    pub all_rewards: Option<Vec<f64>>,
    /// Per-response reward components `components[i][k]` for the BNPO decomposition.
    pub components: Option<Vec<Vec<f64>>>,
    /// Marks injected ground-truth (off-policy) responses for TempSamp anchoring.
    pub ground_truth: Option<Vec<bool>>,
}

impl Group {
    /// A group with rewards only.
    pub fn from_rewards(rewards: Vec<f64>) -> Self {
        Group {
            rewards,
            ..Group::default()
        }
    }
}

/// What [`compute`] returns for a batch of groups.
#[derive(Debug, Clone, PartialEq)]
pub struct AdvantageOutput {
    /// `advantages[g][i]`: the advantage of response i of group g.
    pub advantages: Vec<Vec<f64>>,
    /// Fraction of groups (of two or more responses) whose raw rewards are all equal
    /// (`reward/frac_zero_std`).
    pub frac_zero_std: f64,
    /// How many responses the StableReinforce filter set to zero.
    pub filtered: usize,
}

/// Everything that can go wrong when configuring or computing advantages.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AdvantageError {
    #[error("unknown advantage estimator `{name}`; known estimators: {known}")]
    UnknownEstimator { name: String, known: String },
    #[error("advantage config `{field}`: {message}")]
    InvalidConfig { field: String, message: String },
    #[error("group {group}: `rewards` is empty; every group needs at least one response")]
    EmptyGroup { group: usize },
    #[error("group {group}: `{field}` is empty; give at least one value or leave it out")]
    EmptyField { group: usize, field: &'static str },
    #[error("group {group}: `{field}[{position}]` is {value}; expected a finite number")]
    NonFinite {
        group: usize,
        field: &'static str,
        position: usize,
        value: f64,
    },
    #[error(
        "group {group}: `{field}` reach {largest:e}, so their sum or variance overflows f64 \
         (every statistic of the group would be infinite); rescale them, e.g. to [-1e100, 1e100]"
    )]
    Overflow {
        group: usize,
        field: &'static str,
        largest: f64,
    },
    #[error("group {group}: `{field}` has {found} entries but `rewards` has {expected}")]
    LengthMismatch {
        group: usize,
        field: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("group {group}: `components[{position}]` has {found} entries but {expected} were expected (every response of the batch needs the same number of components)")]
    ComponentCount {
        group: usize,
        position: usize,
        found: usize,
        expected: usize,
    },
    #[error("group {group}: `{field}` is required by {needed_by} but was not given")]
    MissingField {
        group: usize,
        field: &'static str,
        needed_by: &'static str,
    },
    #[error("group {group}: `{field}` is given for some groups but not this one; {needed_by} needs it for every group or none")]
    PartialField {
        group: usize,
        field: &'static str,
        needed_by: &'static str,
    },
    #[error("group {group}: `{field}[{position}]` = {value} is outside the BNPO reward range [{min}, {max}] (set bnpo.reward_min / bnpo.reward_max)")]
    OutOfRange {
        group: usize,
        field: &'static str,
        position: usize,
        value: f64,
        min: f64,
        max: f64,
    },
    #[error("group {group}: every response is marked `ground_truth`; TempSamp anchoring needs at least one on-policy response")]
    NoOnPolicy { group: usize },
    #[error("group {group}: advantage at position {position} is {value} after {stage}; lower its scale or enable the stable_filter")]
    NonFiniteAdvantage {
        group: usize,
        position: usize,
        value: f64,
        stage: &'static str,
    },
    #[error("unknown --param key `{key}`; valid keys: {valid}")]
    UnknownParam { key: String, valid: String },
    #[error("--param {param}: {message}")]
    InvalidParam { param: String, message: String },
    #[error("{at} {message}")]
    Input { at: String, message: String },
}

impl From<AdvantageError> for crate::error::Error {
    fn from(e: AdvantageError) -> Self {
        crate::error::Error::Advantage(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips_through_from_name_and_serde() {
        for e in Estimator::ALL {
            assert_eq!(Estimator::from_name(e.name()), Ok(e));
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(json, format!("\"{}\"", e.name()));
            let back: Estimator = serde_json::from_str(&json).unwrap();
            assert_eq!(back, e);
        }
    }

    #[test]
    fn documented_names_keep_their_order_and_spelling() {
        // configs in the wild use these names: renaming or reordering one fails here, while a
        // new estimator appended to the table does not
        let names: Vec<&str> = Estimator::ALL.iter().map(|e| e.name()).collect();
        assert_eq!(
            names[..13],
            [
                "reinforce",
                "group-mean",
                "grpo",
                "rloo",
                "asymre",
                "opmd",
                "bnpo",
                "w-reinforce",
                "psr",
                "nsr",
                "global-mean",
                "noisy-backward",
                "noisy-forward"
            ]
        );
    }

    #[test]
    fn unknown_estimator_lists_every_known_name() {
        let err = Estimator::from_name("ppo").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`ppo`"), "{msg}");
        for e in Estimator::ALL {
            assert!(msg.contains(e.name()), "{msg} lacks {}", e.name());
        }
    }

    #[test]
    fn std_kind_is_lowercase_and_defaults_to_sample() {
        assert_eq!(StdKind::default(), StdKind::Sample);
        assert_eq!(
            serde_json::to_string(&StdKind::Population).unwrap(),
            "\"population\""
        );
        let s: StdKind = serde_json::from_str("\"sample\"").unwrap();
        assert_eq!(s, StdKind::Sample);
    }

    #[test]
    fn from_rewards_leaves_everything_else_absent() {
        let g = Group::from_rewards(vec![1.0, 0.0]);
        assert_eq!(g.rewards, vec![1.0, 0.0]);
        assert!(g.correct.is_none() && g.lengths.is_none() && g.ground_truth.is_none());
    }
}
