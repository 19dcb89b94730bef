//! Policy losses over per-token scalars, with analytic gradients (docs/algorithms.md#policy-losses).
//!
//! The model produces per-token log-probs ℓ\[i\]\[t\] as a candle tensor. The trainer hands their
//! values to [`compute`](fn@compute), which returns the aggregated loss **and** dL/dℓ\[i\]\[t\] for every token;
//! the trainer then backpropagates the surrogate Σ g·ℓ through the model. Everything here is
//! therefore a pure function of f64 scalars:
//!
//! - ℓ (`logp`, current policy) is the only input that carries gradient;
//! - ℓᵒ (`logp_old`, behaviour policy), ℓʳ (`logp_ref`, reference policy), advantages, masks and
//!   weights are constants;
//! - quantities docs/algorithms.md calls *detached* (REC's W and M, TOPR's α, sequence-level ratios)
//!   have zero gradient; PPO-clip's ratio ρ = exp(ℓ − ℓᵒ) carries gradient through ℓ.
//!
//! Layout: [`config`] (enums, [`LossConfig`], validation), [`policy`] (one small function per
//! per-token loss), [`kl`] (KL estimators, DADS weight, reward-side penalty), [`aggregate`](mod@aggregate)
//! (batch reduction weights), [`compute`](mod@compute) (the batch entry point) and
//! [`calculator`] (the JSON calculator behind the CLI).
//!
//! Metrics ([`LossMetrics`]) map onto the docs/metrics.md names: `loss/policy`, `loss/kl`,
//! `loss/clipfrac`, `loss/masked_frac`, `is/ratio_mean`, `is/ratio_max`, `kl/k3`.

pub mod aggregate;
pub mod calculator;
pub mod compute;
pub mod config;
pub mod kl;
pub mod policy;
pub mod value;

pub use aggregate::{aggregate, token_weights};
pub use calculator::run_calculator;
pub use compute::{compute, LossMetrics, LossOutput, SeqInput};
pub use config::{
    Aggregation, KlEstimator, LossConfig, PolicyLoss, RatioLevel, RecMask, RecReg, RecWeight,
};
pub use kl::{dads_weight, kl_per_token, kl_reward_penalty};
pub use policy::{
    ppo_clip_token, rec_keeps_token, rec_token, rec_weight_value, reinforce_token,
    stable_reinforce_token, topr_token, TokenLoss,
};

/// Everything that can go wrong in the loss library. Each message names the field (and the
/// sequence/token position where there is one) with what was expected and what was found.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LossError {
    #[error("unknown {kind} '{found}'; known names: {known}")]
    UnknownName {
        kind: &'static str,
        found: String,
        known: String,
    },
    #[error("invalid loss config: {field} must be {expected}, found {found}")]
    InvalidConfig {
        field: &'static str,
        expected: String,
        found: String,
    },
    #[error("sequence {seq}: {field} has {found} entries but logp has {expected}")]
    LengthMismatch {
        seq: usize,
        field: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("sequence {seq}, token {token}: {field} must be finite, found {value}")]
    NonFinite {
        seq: usize,
        token: usize,
        field: &'static str,
        value: f64,
    },
    #[error("sequence {seq}, token {token}: mask must be a finite number >= 0, found {value}")]
    InvalidMask {
        seq: usize,
        token: usize,
        value: f64,
    },
    #[error("sequence {seq}: kl_weight must be a finite number >= 0, found {value}")]
    InvalidKlWeight { seq: usize, value: f64 },
    #[error("sequence {seq}: logp_ref is required ({reason}) but is missing")]
    MissingRef { seq: usize, reason: &'static str },
    #[error("calculator input: {0}")]
    Input(String),
    #[error("unknown --param key '{key}'; valid keys: {known}")]
    UnknownParam { key: String, known: String },
    #[error("--param {key}={value}: {reason}")]
    BadParam {
        key: String,
        value: String,
        reason: String,
    },
}

impl From<LossError> for crate::error::Error {
    fn from(e: LossError) -> Self {
        crate::error::Error::Loss(Box::new(e))
    }
}
