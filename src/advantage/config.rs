//! Advantage configuration (`[advantage]` in a run's TOML) and its validation.
//!
//! Every field has a default, so an empty table is plain GRPO. Sub-tables hold the options of
//! BNPO, the noisy-verifier corrections and each adjustment; every adjustment is off by
//! default. [`AdvantageConfig::validate`] rejects values and combinations that cannot mean what
//! the user intended, with a message that says why.

use serde::de::{Error as _, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::estimators::EstimatorParams;
use super::{AdvantageError, Estimator, StdKind};

/// Estimator and adjustment settings for [`super::compute`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdvantageConfig {
    /// Which estimator (docs/algorithms.md#advantage-estimators). Default `grpo` (GRPO, Shao et al. 2024, DeepSeekMath).
    pub estimator: Estimator,
    /// Std used by `grpo`: `sample` (divide by G − 1, as verl and TRL) or `population`.
    /// Default `sample` (docs/algorithms.md#degenerate-groups, **Decision**).
    pub std: StdKind,
    /// Std guard ε of `grpo` and of the StableReinforce z-score; also the floor of 1 − ρ₀ − ρ₁.
    /// Default 1e-6.
    pub eps: f64,
    /// A response counts as correct when its reward is > this, if the group gives no `correct`
    /// flags (`w-reinforce`, `psr`, `nsr`, STCR). Default 0.5 (grove choice for 0/1 rewards).
    pub positive_threshold: f64,
    /// Noise model and scale of `noisy-backward`, `noisy-forward` and `reward_correction`
    /// (docs/algorithms.md#noisy-verifiers).
    pub noisy: NoisyConfig,
    /// Affine correction of the rewards before a *different* estimator: `none`, `backward`
    /// (r̂ = (r − ρ₀)/(1 − ρ₀ − ρ₁)) or `forward` (r − (1 − ρ₁)). Default `none`.
    pub reward_correction: RewardCorrection,
    /// STCR length penalty for long wrong answers (APO). Off by default.
    pub stcr: StcrConfig,
    /// TempSamp soft reward shaping before the estimator (TempSamp-R1). Off by default.
    pub tempsamp_shaping: SoftShapingConfig,
    /// TempSamp anchoring of injected ground-truth responses (TempSamp-R1). Off by default.
    pub tempsamp_anchor: AnchorConfig,
    /// StableReinforce advantage filter (StableReinforce / R1-Reward). Off by default.
    pub stable_filter: StableFilterConfig,
    /// RED-Weight A·exp(A/τ) (RED). Off by default.
    pub red_weight: RedWeightConfig,
    /// Duration weights for asynchronous agents. Off by default.
    pub duration: DurationConfig,
    /// DAPO's soft overlong punishment, added to the reward before the estimator. Off by default.
    pub overlong: OverlongConfig,
    /// The estimators' own parameters, each in its sub-table `[advantage.NAME]`, declared with
    /// the estimators in `src/advantage/estimators.rs`.
    #[serde(flatten)]
    pub params: EstimatorParams,
    /// Rejects a key nothing above took, listing the known ones.
    #[serde(flatten)]
    pub unknown_keys: RejectUnknownKeys,
}

/// Keys that moved into an estimator's own table: (old key, new place).
const MOVED_KEYS: [(&str, &str); 3] = [
    ("asymre_c", "`c` in `[advantage.asymre]`"),
    ("opmd_tau", "`tau` in `[advantage.opmd]`"),
    ("w_lambda", "`lambda` in `[advantage.w_reinforce]`"),
];

/// Takes whatever keys of `[advantage]` the fields and the estimators' parameters left and
/// rejects the first with the list of known keys. Needed because serde's own
/// `deny_unknown_fields` message loses that list once a struct flattens another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RejectUnknownKeys;

impl Serialize for RejectUnknownKeys {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_map(Some(0))?.end()
    }
}

impl<'de> Deserialize<'de> for RejectUnknownKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Leftovers;
        impl<'de> Visitor<'de> for Leftovers {
            type Value = RejectUnknownKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("the [advantage] table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                match map.next_key::<String>()? {
                    None => Ok(RejectUnknownKeys),
                    Some(key) => Err(A::Error::custom(unknown_key_message(&key))),
                }
            }
        }
        deserializer.deserialize_map(Leftovers)
    }
}

/// serde's wording ("unknown field `k`, expected one of `a`, `b`"), which
/// `grove config --reference` reads, or where a moved key went.
fn unknown_key_message(key: &str) -> String {
    if let Some((_, to)) = MOVED_KEYS.iter().find(|(from, _)| *from == key) {
        return format!("unknown field `{key}`: it moved to {to}");
    }
    let known: Vec<String> = advantage_keys().iter().map(|k| format!("`{k}`")).collect();
    format!(
        "unknown field `{key}`, expected one of {}",
        known.join(", ")
    )
}

/// The top-level keys of `[advantage]` in declaration order: those of the default config
/// written as TOML (plain keys first, then the tables, as TOML writes them).
pub fn advantage_keys() -> Vec<String> {
    let text = toml::to_string(&AdvantageConfig::default()).unwrap_or_default();
    let mut keys: Vec<String> = Vec::new();
    let mut in_table = false;
    for line in text.lines().map(str::trim) {
        let key = match line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            Some(table) => {
                in_table = true;
                table.split('.').next().map(String::from)
            }
            None if in_table => None,
            None => line.split_once(" = ").map(|(k, _)| k.to_string()),
        };
        if let Some(key) = key.filter(|k| !keys.contains(k)) {
            keys.push(key);
        }
    }
    keys
}

impl Default for AdvantageConfig {
    fn default() -> Self {
        AdvantageConfig {
            estimator: Estimator::Grpo,
            std: StdKind::Sample,
            eps: 1e-6,
            positive_threshold: 0.5,
            noisy: NoisyConfig::default(),
            reward_correction: RewardCorrection::None,
            stcr: StcrConfig::default(),
            tempsamp_shaping: SoftShapingConfig::default(),
            tempsamp_anchor: AnchorConfig::default(),
            stable_filter: StableFilterConfig::default(),
            red_weight: RedWeightConfig::default(),
            duration: DurationConfig::default(),
            overlong: OverlongConfig::default(),
            params: EstimatorParams::default(),
            unknown_keys: RejectUnknownKeys,
        }
    }
}

/// BNPO options (BNPO, Beta Normalization Policy Optimization; docs/algorithms.md#bnpo).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BnpoConfig {
    /// Fixed α instead of the method-of-moments estimate; set together with `beta`.
    /// Default none (estimated per batch). α = β = 1 is `group-mean`, 3/2 is GRPO·π/8.
    pub alpha: Option<f64>,
    /// Fixed β instead of the method-of-moments estimate; set together with `alpha`. Default none.
    pub beta: Option<f64>,
    /// Reward mapped to 0 when scaling rewards to [0, 1]. Default 0.0.
    pub reward_min: f64,
    /// Reward mapped to 1 when scaling rewards to [0, 1]. Default 1.0. Rewards outside
    /// [reward_min, reward_max] are an error.
    pub reward_max: f64,
}

impl Default for BnpoConfig {
    fn default() -> Self {
        BnpoConfig {
            alpha: None,
            beta: None,
            reward_min: 0.0,
            reward_max: 1.0,
        }
    }
}

/// Noise model of a binary verifier (RL with verifiable yet noisy rewards; docs/algorithms.md#noisy-verifiers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NoisyConfig {
    /// ρ₀ = P(observed 1 | truly 0), the false-positive rate. Default 0.0 (the headline
    /// experiment uses 0.1).
    pub rho0: f64,
    /// ρ₁ = P(observed 0 | truly 1), the false-negative rate. Default 0.0 (headline: 0.2).
    pub rho1: f64,
    /// Fixed scale s dividing `noisy-backward` / `noisy-forward` advantages. Default 1.0.
    pub scale: f64,
    /// When set, `noisy-backward` divides by an EMA (this decay) of the batch spread of its
    /// unscaled advantages instead of `scale`; the EMA lives in `AdvantageState`. Default none.
    pub ema_decay: Option<f64>,
}

impl Default for NoisyConfig {
    fn default() -> Self {
        NoisyConfig {
            rho0: 0.0,
            rho1: 0.0,
            scale: 1.0,
            ema_decay: None,
        }
    }
}

/// Affine reward correction applied before an estimator other than the noisy ones (docs/algorithms.md#noisy-verifiers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RewardCorrection {
    /// Rewards are used as observed.
    #[default]
    None,
    /// r̂ = (r − ρ₀)/max(1 − ρ₀ − ρ₁, ε).
    Backward,
    /// r − (1 − ρ₁).
    Forward,
}

impl RewardCorrection {
    /// The config name.
    pub fn name(&self) -> &'static str {
        match self {
            RewardCorrection::None => "none",
            RewardCorrection::Backward => "backward",
            RewardCorrection::Forward => "forward",
        }
    }
}

/// STCR (APO): A ← A·(2 − base^(−Δ)) for incorrect responses longer than the correct mean by Δ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StcrConfig {
    /// Turn STCR on (needs `lengths`). Default false.
    pub enabled: bool,
    /// Base of the length penalty. Default 1.00001 (APO, *unverified*).
    pub base: f64,
}

impl Default for StcrConfig {
    fn default() -> Self {
        StcrConfig {
            enabled: false,
            base: 1.00001,
        }
    }
}

/// TempSamp soft shaping of rewards before the estimator (TempSamp-R1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SoftShapingConfig {
    /// Turn shaping on. Default false.
    pub enabled: bool,
    /// Threshold τ between the log (above) and exponential (below) branches. Default 0.8.
    pub tau: f64,
    /// Slope α₁ of the log branch r ≥ τ. Default 0.01.
    pub a1: f64,
    /// Curvature α₂ of the exponential branch r < τ. Default 1.0.
    pub a2: f64,
}

impl Default for SoftShapingConfig {
    fn default() -> Self {
        SoftShapingConfig {
            enabled: false,
            tau: 0.8,
            a1: 0.01,
            a2: 1.0,
        }
    }
}

/// TempSamp anchoring: group statistics over on-policy members only; responses flagged
/// `ground_truth` get A_GT = factor·max on-policy A (TempSamp-R1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnchorConfig {
    /// Turn anchoring on (uses `ground_truth`; a group without it is all on-policy). Default false.
    pub enabled: bool,
    /// Multiplier of the largest on-policy advantage. Default 1.2.
    pub factor: f64,
}

impl Default for AnchorConfig {
    fn default() -> Self {
        AnchorConfig {
            enabled: false,
            factor: 1.2,
        }
    }
}

/// StableReinforce advantage filter over the batch (StableReinforce, R1-Reward).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StableFilterConfig {
    /// Turn the filter on. Default false.
    pub enabled: bool,
    /// Zero advantages whose token-weighted batch z-score exceeds this in magnitude. Default 3.0.
    pub z_threshold: f64,
    /// Zero advantages whose magnitude exceeds this (**Decision**, see `adjust::stable_filter`).
    /// Default 10.0.
    pub abs_threshold: f64,
}

impl Default for StableFilterConfig {
    fn default() -> Self {
        StableFilterConfig {
            enabled: false,
            z_threshold: 3.0,
            abs_threshold: 10.0,
        }
    }
}

/// RED-Weight: effective advantage A·exp(A/τ) (RED).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedWeightConfig {
    /// Turn RED-Weight on. Default false.
    pub enabled: bool,
    /// Temperature τ. Default 1.0.
    pub tau: f64,
}

impl Default for RedWeightConfig {
    fn default() -> Self {
        RedWeightConfig {
            enabled: false,
            tau: 1.0,
        }
    }
}

/// Duration weights w_i = Δt_i / mean Δt, Δt_i = max(exec_time_i + t_min, t_floor), for
/// asynchronous agents (duration-weighted policy gradient). Times in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DurationConfig {
    /// Turn duration weights on (needs `durations`). Default false.
    pub enabled: bool,
    /// Added to every execution time. Default 0.0 (*unverified*, not given by the source).
    pub t_min: f64,
    /// Smallest duration Δt. Default 0.001 (*unverified*).
    pub t_floor: f64,
    /// Fixed duration of an unparsable action (NaN or negative time). Default 1.0 (*unverified*).
    pub unparsable: f64,
}

impl Default for DurationConfig {
    fn default() -> Self {
        DurationConfig {
            enabled: false,
            t_min: 0.0,
            t_floor: 0.001,
            unparsable: 1.0,
        }
    }
}

/// DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): with L the length budget and C the
/// cache, a response of |y| tokens gets 0 when |y| ≤ L − C, ((L − C) − |y|)/C up to L, and −1
/// beyond, added to its reward before the estimator (docs/algorithms.md#adjustments-after-the-estimator).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverlongConfig {
    /// Turn the punishment on (needs `lengths`). Default false.
    pub enabled: bool,
    /// Length budget L in tokens. Default unset: a run uses `rollout.max_new_tokens`
    /// (`grove advantage` needs it set).
    pub max_len: Option<usize>,
    /// Soft-punishment cache C in tokens, 1 ≤ C ≤ L. Default unset: L/5 rounded down, at
    /// least 1 (DAPO's 4,096 of 20,480).
    pub cache: Option<usize>,
}

impl OverlongConfig {
    /// (L, C) when enabled and L is known.
    pub fn budget(&self) -> Option<(usize, usize)> {
        let max_len = self.max_len.filter(|_| self.enabled)?;
        Some((max_len, self.cache.unwrap_or((max_len / 5).max(1))))
    }
}

pub(super) fn invalid(field: &str, message: impl Into<String>) -> AdvantageError {
    AdvantageError::InvalidConfig {
        field: field.to_string(),
        message: message.into(),
    }
}

pub(super) fn positive(field: &str, value: f64) -> Result<(), AdvantageError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("must be a finite number > 0, found {value}"),
        ))
    }
}

pub(super) fn non_negative(field: &str, value: f64) -> Result<(), AdvantageError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("must be a finite number ≥ 0, found {value}"),
        ))
    }
}

pub(super) fn finite(field: &str, value: f64) -> Result<(), AdvantageError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(invalid(field, format!("must be finite, found {value}")))
    }
}

impl AdvantageConfig {
    /// Rejects out-of-range values and meaningless combinations; the message says why.
    pub fn validate(&self) -> Result<(), AdvantageError> {
        positive("eps", self.eps)?;
        finite("positive_threshold", self.positive_threshold)?;
        self.params.validate()?;
        self.validate_noisy()?;
        self.validate_adjustments()?;
        self.validate_combinations()
    }

    fn validate_noisy(&self) -> Result<(), AdvantageError> {
        let n = &self.noisy;
        for (field, rho) in [("noisy.rho0", n.rho0), ("noisy.rho1", n.rho1)] {
            if !(rho.is_finite() && (0.0..1.0).contains(&rho)) {
                return Err(invalid(field, format!("must be in [0, 1), found {rho}")));
            }
        }
        if n.rho0 + n.rho1 >= 1.0 {
            return Err(invalid(
                "noisy.rho0",
                format!(
                    "noisy.rho0 + noisy.rho1 must be < 1 (found {} + {} = {}); at ≥ 1 the verifier \
                     carries no information and the correction divides by zero",
                    n.rho0,
                    n.rho1,
                    n.rho0 + n.rho1
                ),
            ));
        }
        positive("noisy.scale", n.scale)?;
        if let Some(decay) = n.ema_decay {
            if !(decay.is_finite() && (0.0..1.0).contains(&decay)) {
                return Err(invalid(
                    "noisy.ema_decay",
                    format!("must be in [0, 1), found {decay}"),
                ));
            }
        }
        Ok(())
    }

    fn validate_adjustments(&self) -> Result<(), AdvantageError> {
        if !(self.stcr.base.is_finite() && self.stcr.base >= 1.0) {
            return Err(invalid(
                "stcr.base",
                format!(
                    "must be a finite number ≥ 1 (a base below 1 would shrink the penalty of long \
                     wrong answers), found {}",
                    self.stcr.base
                ),
            ));
        }
        positive("tempsamp_shaping.tau", self.tempsamp_shaping.tau)?;
        non_negative("tempsamp_shaping.a1", self.tempsamp_shaping.a1)?;
        positive("tempsamp_shaping.a2", self.tempsamp_shaping.a2)?;
        positive("tempsamp_anchor.factor", self.tempsamp_anchor.factor)?;
        positive("stable_filter.z_threshold", self.stable_filter.z_threshold)?;
        positive(
            "stable_filter.abs_threshold",
            self.stable_filter.abs_threshold,
        )?;
        positive("red_weight.tau", self.red_weight.tau)?;
        non_negative("duration.t_min", self.duration.t_min)?;
        positive("duration.t_floor", self.duration.t_floor)?;
        positive("duration.unparsable", self.duration.unparsable)?;
        self.validate_overlong()
    }

    fn validate_overlong(&self) -> Result<(), AdvantageError> {
        let o = &self.overlong;
        if !o.enabled {
            return Ok(());
        }
        let Some((max_len, cache)) = o.budget() else {
            return Err(invalid(
                "overlong.max_len",
                "must be set when overlong.enabled (a run derives it from rollout.max_new_tokens)",
            ));
        };
        if max_len == 0 || cache == 0 || cache > max_len {
            return Err(invalid(
                "overlong.cache",
                format!("must satisfy 1 ≤ cache ≤ max_len, found cache {cache}, max_len {max_len}"),
            ));
        }
        let est = self.estimator;
        if est.uses_only_correctness()
            || matches!(
                est,
                Estimator::NoisyBackward | Estimator::NoisyForward | Estimator::Bnpo
            )
            || self.reward_correction != RewardCorrection::None
        {
            return Err(invalid(
                "overlong.enabled",
                format!(
                    "overlong shaping with estimator = \"{}\", reward_correction = \"{}\": it \
                     makes rewards non-binary and out of [0, 1] (or has no effect on a \
                     correctness-only estimator)",
                    est.name(),
                    self.reward_correction.name()
                ),
            ));
        }
        Ok(())
    }

    fn validate_combinations(&self) -> Result<(), AdvantageError> {
        let est = self.estimator;
        let correction = self.reward_correction;
        if correction != RewardCorrection::None {
            let why = match est {
                Estimator::Grpo => Some(
                    "group std normalisation cancels any affine correction of a binary reward \
                     (docs/algorithms.md#noisy-verifiers), so this run would equal the uncorrected one; use \
                     estimator noisy-backward or noisy-forward, or a correction with group-mean, \
                     rloo or reinforce",
                ),
                Estimator::NoisyBackward | Estimator::NoisyForward => Some(
                    "the noisy estimators already correct the reward; a second correction would \
                     apply it twice (set reward_correction = \"none\")",
                ),
                Estimator::Bnpo => Some(
                    "BNPO needs rewards in [bnpo.reward_min, bnpo.reward_max]; a corrected binary \
                     reward leaves that range",
                ),
                e if e.uses_only_correctness() => Some(
                    "this estimator reads only correctness, so a reward correction has no effect",
                ),
                _ => None,
            };
            if let Some(why) = why {
                return Err(invalid(
                    "reward_correction",
                    format!(
                        "reward_correction = \"{}\" with estimator = \"{}\": {why}",
                        correction.name(),
                        est.name()
                    ),
                ));
            }
        }
        if self.tempsamp_shaping.enabled {
            let why = if est.uses_only_correctness() {
                Some("this estimator reads only correctness, so shaping the reward has no effect")
            } else if matches!(est, Estimator::NoisyBackward | Estimator::NoisyForward)
                || correction != RewardCorrection::None
            {
                Some(
                    "noisy-verifier corrections assume binary observed rewards; soft shaping \
                     makes them non-binary and the correction is no longer unbiased",
                )
            } else {
                None
            };
            if let Some(why) = why {
                return Err(invalid(
                    "tempsamp_shaping.enabled",
                    format!(
                        "tempsamp_shaping with estimator = \"{}\", reward_correction = \"{}\": {why}",
                        est.name(),
                        correction.name()
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl super::estimators::EstimatorParamsTable for BnpoConfig {
    fn check(&self, _table: &str) -> Result<(), AdvantageError> {
        let b = self;
        match (b.alpha, b.beta) {
            (Some(a), Some(be)) => {
                positive("bnpo.alpha", a)?;
                positive("bnpo.beta", be)?;
            }
            (None, None) => {}
            _ => return Err(invalid(
                "bnpo.alpha",
                "set bnpo.alpha and bnpo.beta together (or neither, to estimate both per batch)",
            )),
        }
        finite("bnpo.reward_min", b.reward_min)?;
        finite("bnpo.reward_max", b.reward_max)?;
        if b.reward_min >= b.reward_max {
            return Err(invalid(
                "bnpo.reward_max",
                format!(
                    "must be greater than bnpo.reward_min ({} ≥ {})",
                    b.reward_min, b.reward_max
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: AdvantageError) -> String {
        match err {
            AdvantageError::InvalidConfig { field, .. } => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_algorithms_md() {
        let c = AdvantageConfig::default();
        assert_eq!(c.estimator, Estimator::Grpo);
        assert_eq!(c.std, StdKind::Sample);
        assert_eq!(
            (
                c.eps,
                c.params.asymre.c,
                c.params.opmd.tau,
                c.params.w_reinforce.lambda,
                c.positive_threshold
            ),
            (1e-6, 0.1, 1.0, 0.1, 0.5)
        );
        assert_eq!(c.stcr.base, 1.00001);
        assert_eq!(
            (
                c.tempsamp_shaping.tau,
                c.tempsamp_shaping.a1,
                c.tempsamp_shaping.a2
            ),
            (0.8, 0.01, 1.0)
        );
        assert_eq!(c.tempsamp_anchor.factor, 1.2);
        assert_eq!(
            (c.stable_filter.z_threshold, c.stable_filter.abs_threshold),
            (3.0, 10.0)
        );
        assert_eq!(c.red_weight.tau, 1.0);
        assert!(!c.stcr.enabled && !c.tempsamp_shaping.enabled && !c.tempsamp_anchor.enabled);
        assert!(!c.stable_filter.enabled && !c.red_weight.enabled && !c.duration.enabled);
        assert_eq!(c.reward_correction, RewardCorrection::None);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn json_uses_kebab_names_and_rejects_unknown_fields() {
        let c: AdvantageConfig =
            serde_json::from_str(r#"{"estimator": "w-reinforce", "stcr": {"enabled": true}}"#)
                .unwrap();
        assert_eq!(c.estimator, Estimator::WReinforce);
        assert!(c.stcr.enabled);
        assert_eq!(c.stcr.base, 1.00001);
        let err = serde_json::from_str::<AdvantageConfig>(r#"{"estmator": "grpo"}"#).unwrap_err();
        assert!(err.to_string().contains("estmator"), "{err}");
    }

    #[test]
    fn unknown_key_lists_every_known_key_and_moved_keys_say_where() {
        let err = toml::from_str::<AdvantageConfig>("estmator = \"grpo\"").unwrap_err();
        let msg = err.message();
        assert!(
            msg.starts_with("unknown field `estmator`, expected one of `estimator`, `std`"),
            "{msg}"
        );
        for key in [
            "`noisy`",
            "`asymre`",
            "`opmd`",
            "`bnpo`",
            "`w_reinforce`",
            "`duration`",
        ] {
            assert!(msg.contains(key), "{msg} lacks {key}");
        }
        assert!(
            !msg.contains("unknown_keys") && !msg.contains("params"),
            "{msg}"
        );
        let err = toml::from_str::<AdvantageConfig>("asymre_c = 0.2").unwrap_err();
        assert!(
            err.message()
                .contains("it moved to `c` in `[advantage.asymre]`"),
            "{err}"
        );
        // a default config written out reads back equal (the flattened tables round-trip)
        let text = toml::to_string(&AdvantageConfig::default()).unwrap();
        assert_eq!(
            toml::from_str::<AdvantageConfig>(&text).unwrap(),
            AdvantageConfig::default()
        );
    }

    #[test]
    fn correction_before_grpo_is_rejected_with_the_reason() {
        for correction in [RewardCorrection::Backward, RewardCorrection::Forward] {
            let c = AdvantageConfig {
                reward_correction: correction,
                ..AdvantageConfig::default()
            };
            let msg = c.validate().unwrap_err().to_string();
            assert!(
                msg.contains(
                    "group std normalisation cancels any affine correction of a binary reward"
                ),
                "{msg}"
            );
        }
        let ok = AdvantageConfig {
            reward_correction: RewardCorrection::Backward,
            estimator: Estimator::GroupMean,
            ..AdvantageConfig::default()
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn other_meaningless_combinations_are_rejected() {
        for est in [Estimator::NoisyBackward, Estimator::Bnpo, Estimator::Psr] {
            let c = AdvantageConfig {
                estimator: est,
                reward_correction: RewardCorrection::Forward,
                ..AdvantageConfig::default()
            };
            assert_eq!(field_of(c.validate().unwrap_err()), "reward_correction");
        }
        let mut c = AdvantageConfig {
            estimator: Estimator::NoisyForward,
            ..AdvantageConfig::default()
        };
        c.tempsamp_shaping.enabled = true;
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "tempsamp_shaping.enabled"
        );
    }

    #[test]
    fn noise_rates_must_sum_below_one() {
        let mut c = AdvantageConfig::default();
        c.noisy.rho0 = 0.5;
        c.noisy.rho1 = 0.5;
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("must be < 1"), "{err}");
        c.noisy.rho1 = 0.49;
        assert_eq!(c.validate(), Ok(()));
        c.noisy.rho0 = -0.1;
        assert_eq!(field_of(c.validate().unwrap_err()), "noisy.rho0");
    }

    #[test]
    fn non_positive_and_non_finite_parameters_are_rejected() {
        type Setter = Box<dyn Fn(&mut AdvantageConfig)>;
        let cases: Vec<(&str, Setter)> = vec![
            ("eps", Box::new(|c| c.eps = 0.0)),
            ("opmd.tau", Box::new(|c| c.params.opmd.tau = -1.0)),
            ("asymre.c", Box::new(|c| c.params.asymre.c = f64::NAN)),
            (
                "w_reinforce.lambda",
                Box::new(|c| c.params.w_reinforce.lambda = -0.1),
            ),
            (
                "tempsamp_shaping.tau",
                Box::new(|c| c.tempsamp_shaping.tau = 0.0),
            ),
            (
                "tempsamp_shaping.a2",
                Box::new(|c| c.tempsamp_shaping.a2 = 0.0),
            ),
            ("red_weight.tau", Box::new(|c| c.red_weight.tau = 0.0)),
            (
                "red_weight.tau",
                Box::new(|c| c.red_weight.tau = f64::INFINITY),
            ),
            ("stcr.base", Box::new(|c| c.stcr.base = 0.9)),
            (
                "tempsamp_anchor.factor",
                Box::new(|c| c.tempsamp_anchor.factor = -1.2),
            ),
            (
                "stable_filter.z_threshold",
                Box::new(|c| c.stable_filter.z_threshold = 0.0),
            ),
            ("duration.t_floor", Box::new(|c| c.duration.t_floor = 0.0)),
            ("noisy.scale", Box::new(|c| c.noisy.scale = 0.0)),
            (
                "noisy.ema_decay",
                Box::new(|c| c.noisy.ema_decay = Some(1.0)),
            ),
            ("bnpo.alpha", Box::new(|c| c.params.bnpo.alpha = Some(1.0))),
            (
                "bnpo.reward_max",
                Box::new(|c| c.params.bnpo.reward_max = 0.0),
            ),
        ];
        for (field, set) in cases {
            let mut c = AdvantageConfig::default();
            set(&mut c);
            assert_eq!(field_of(c.validate().unwrap_err()), field);
        }
    }
}
