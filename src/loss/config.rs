//! Loss configuration: the name enums (policy loss, aggregation, KL estimator, REC options) and
//! [`LossConfig`] with its defaults and [`LossConfig::validate`].
//!
//! Every enum serialises in kebab-case, has `ALL`, `name()` and `from_name()`; an unknown name
//! fails with the list of known names.

use serde::{Deserialize, Serialize};

use super::LossError;

/// Defines a name enum with `ALL`, `name()`, `from_name()` and `Display`, keeping the names in
/// one table so that they cannot drift from each other (a test checks them against serde).
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $ty:ident, $kind:literal, {
            $( $(#[$vmeta:meta])* $variant:ident => $name:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        pub enum $ty {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$ty] = &[ $( $ty::$variant ),+ ];

            /// The kebab-case name used in configs and on the command line.
            pub fn name(self) -> &'static str {
                match self {
                    $( $ty::$variant => $name ),+
                }
            }

            /// Parses a name; the error lists every known name.
            pub fn from_name(name: &str) -> Result<Self, LossError> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.name() == name)
                    .ok_or_else(|| LossError::UnknownName {
                        kind: $kind,
                        found: name.to_string(),
                        known: Self::ALL
                            .iter()
                            .map(|v| v.name())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

named_enum! {
    /// The per-token policy loss (docs/algorithms.md#policy-losses).
    PolicyLoss, "policy loss", {
        /// −A·ℓ (Williams 1992).
        Reinforce => "reinforce",
        /// max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high)), optional dual clip (PPO, Schulman et al.
        /// 2017; GRPO, Shao et al. 2024).
        PpoClip => "ppo-clip",
        /// REINFORCE with clipping as a mask: −W·A·ℓ·M + Reg (REC, docs/algorithms.md#policy-losses).
        Rec => "rec",
        /// Tapered off-policy REINFORCE, −α·A·ℓ (TOPR, Le Roux et al. 2025, arXiv 2503.14286).
        /// Normalised per sequence: requires `agg = seq-mean-token-mean`.
        Topr => "topr",
        /// PPO-clip with the log-ratio clamped before exponentiation (StableReinforce,
        /// R1-Reward, 2025).
        StableReinforce => "stable-reinforce",
        /// PPO-clip on the sequence ratio s = exp(mean_t Δ) with the sequence-level ε (GSPO,
        /// Zheng et al. 2025, arXiv 2507.18071; the GSPO-token form). Normalised per sequence:
        /// requires `agg = seq-mean-token-mean`.
        Gspo => "gspo",
        /// −sg(clip(ρ, 1−ε_low, 1+ε_high))·A·ℓ: the IS weight is clipped and detached, no token
        /// loses its gradient (CISPO, MiniMax-M1 2025, arXiv 2506.13585).
        Cispo => "cispo",
    }
}

impl PolicyLoss {
    /// Losses normalised per sequence, which only `agg = seq-mean-token-mean` expresses.
    pub fn needs_seq_mean_token_mean(self) -> bool {
        matches!(self, PolicyLoss::Topr | PolicyLoss::Gspo)
    }
}

named_enum! {
    /// How per-token losses become one number (docs/algorithms.md#aggregation, named by arithmetic).
    Aggregation, "aggregation", {
        /// Σ m·loss / Σ m over the whole batch (REC, DAPO, BNPO code).
        TokenMean => "token-mean",
        /// Mean over sequences of each sequence's token mean (original GRPO).
        SeqMeanTokenMean => "seq-mean-token-mean",
        /// Mean over sequences of each sequence's token sum.
        SeqMeanTokenSum => "seq-mean-token-sum",
        /// Σ m·loss / (B·L_max) with a fixed L_max (Dr. GRPO, Liu et al. 2025).
        SeqMeanTokenSumNorm => "seq-mean-token-sum-norm",
    }
}

named_enum! {
    /// KL estimators of KL(π‖π_ref) per token, Δʳ = ℓ − ℓʳ (Schulman 2020, "Approximating KL
    /// divergence"; `low-var-kl` as in verl).
    KlEstimator, "kl estimator", {
        /// Δʳ.
        K1 => "k1",
        /// ½(Δʳ)².
        K2 => "k2",
        /// exp(−Δʳ) − 1 + Δʳ.
        K3 => "k3",
        /// clamp(k3, −10, 10).
        LowVarKl => "low-var-kl",
    }
}

named_enum! {
    /// REC's detached importance weight W (docs/algorithms.md#policy-losses).
    RecWeight, "rec weight", {
        /// W = 1.
        None => "none",
        /// W = ρ.
        Is => "is",
        /// W = clamp(ρ, 1−ε′_low, 1+ε′_high).
        TruncatedIs => "truncated-is",
        /// W = exp(mean_t Δ) of the sequence.
        SeqIs => "seq-is",
    }
}

named_enum! {
    /// REC's detached token mask M: which tokens keep their gradient (docs/algorithms.md#policy-losses).
    RecMask, "rec mask", {
        /// Every token kept.
        None => "none",
        /// (A ≥ 0 and ρ ≤ 1+ε_high) or (A ≤ 0 and ρ ≥ 1−ε_low): PPO-clip's rule.
        OneSide => "one-side",
        /// 1−ε_low ≤ ρ ≤ 1+ε_high.
        TwoSide => "two-side",
        /// two-side, or (A ≥ 0 and ρ ≤ 1−ε′_low), or (A ≤ 0 and ρ ≥ 1+ε′_high).
        Ring => "ring",
        /// The one-side rule on the sequence ratio exp(mean_t Δ) with the sequence-level ε.
        SeqOneSide => "seq-one-side",
    }
}

named_enum! {
    /// REC's regulariser Reg, added per token (REP, docs/algorithms.md#policy-losses).
    RecReg, "rec regulariser", {
        /// No regulariser.
        None => "none",
        /// −c·ℓ (AsymRE, Arnal et al. 2025).
        Asymre => "asymre",
        /// +c·(ℓ − ℓᵒ)² (OPMD).
        Opmd => "opmd",
    }
}

named_enum! {
    /// Which ratio TOPR tapers negative samples with (docs/algorithms.md#policy-losses, **Decision**).
    RatioLevel, "ratio level", {
        /// ρ = exp(ℓ − ℓᵒ) per token (default).
        Token => "token",
        /// exp(mean_t Δ) of the whole sequence.
        Sequence => "sequence",
    }
}

/// Everything the loss library needs to turn per-token log-probs into a loss and its gradient.
///
/// Fields that belong to one loss (`rec_*`, `topr_ratio`, `dual_clip`) must stay at their
/// defaults when another loss is selected, so a misplaced setting fails validation instead of
/// being silently ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Per-token policy loss. Default `ppo-clip` (GRPO, Shao et al. 2024).
    pub loss: PolicyLoss,
    /// Batch aggregation of per-token losses (policy and KL terms). Default `token-mean`
    /// (DAPO, Yu et al. 2025). `topr` and `gspo` require `seq-mean-token-mean`.
    pub agg: Aggregation,
    /// Lower clip ε_low: ratios below 1−ε_low are clipped (PPO) or masked (REC). In (0, 1);
    /// `cispo` also takes 1 (no lower bound on its IS weight, as MiniMax-M1 sets it).
    /// Default 0.2 (PPO, Schulman et al. 2017).
    pub eps_low: f64,
    /// Upper clip ε_high: ratios above 1+ε_high are clipped/masked. > 0. Default 0.2 (PPO;
    /// DAPO's "clip-higher" raises it to 0.28).
    pub eps_high: f64,
    /// Dual-clip constant c for A < 0: the loss is capped at −c·A. `None` (off) by default;
    /// c = 3 when used (Ye et al. 2020, dual-clip PPO). Must be > 1. ppo-clip and
    /// stable-reinforce only.
    pub dual_clip: Option<f64>,
    /// REC importance weight W. Default `none`. rec only.
    pub rec_weight: RecWeight,
    /// REC token mask M. Default `none`. rec only.
    pub rec_mask: RecMask,
    /// REC regulariser. Default `none`. rec only.
    pub rec_reg: RecReg,
    /// REC regulariser coefficient c (asymre: −c·ℓ; opmd: +c·Δ²). ≥ 0. Default 0.1 (AsymRE,
    /// Arnal et al. 2025).
    pub reg_coef: f64,
    /// Loose lower bound ε′_low for `truncated-is` and `ring`. In (0, 1). Default 0.6 (REC
    /// "loose" setting).
    pub eps_prime_low: f64,
    /// Loose upper bound ε′_high for `truncated-is` and `ring`. > 0. Default 2.0 (REC).
    pub eps_prime_high: f64,
    /// Sequence-level ε_low for `seq-one-side` and `gspo`. In (0, 1). Default 3e-4 (GSPO).
    pub seq_eps_low: f64,
    /// Sequence-level ε_high for `seq-one-side` and `gspo`. > 0. Default 4e-4 (GSPO).
    pub seq_eps_high: f64,
    /// Ratio used by TOPR's taper. Default `token` (docs/algorithms.md#policy-losses, **Decision**). topr only.
    pub topr_ratio: RatioLevel,
    /// StableReinforce clamps Δ to at least this before exp. Default ln 1e−3 (R1-Reward 2025).
    pub stable_logratio_min: f64,
    /// StableReinforce clamps Δ to at most this before exp. Default ln 1e3 (R1-Reward 2025).
    pub stable_logratio_max: f64,
    /// β of the KL term: added to the loss as β·k (or, with `kl_in_reward`, subtracted from the
    /// reward by the trainer). ≥ 0. Default 0: most recent recipes drop it, and with β = 0 the
    /// reference model need not be loaded.
    pub kl_coef: f64,
    /// KL estimator. Default `low-var-kl` (verl's default for the KL loss).
    pub kl_estimator: KlEstimator,
    /// Subtract β·KL from the reward (trainer, via `kl_reward_penalty`) instead of adding it to
    /// the loss. Default false.
    pub kl_in_reward: bool,
    /// DADS (APO): a k3 KL term with β = `dads_beta` in the loss, weighted per sequence by
    /// `SeqInput::kl_weight` (see `dads_weight`). Replaces `kl_coef`/`kl_estimator`, so it
    /// cannot be combined with `kl_coef > 0` or `kl_in_reward`. Default false.
    pub dads: bool,
    /// DADS KL coefficient. ≥ 0. Default 1e-3 (APO).
    pub dads_beta: f64,
    /// SFT mixing weight μ: total = (1−μ)·RL + μ·(−ℓ token-mean over expert sequences). Used only
    /// when expert sequences are present. In [0, 1]. Default 0.1 (docs/algorithms.md#dads-entropy-and-sft-mixing).
    pub sft_mu: f64,
    /// L_max for `seq-mean-token-sum-norm` (Dr. GRPO: usually the generation budget). Required
    /// for that mode, > 0. Default none.
    pub max_len: Option<usize>,
    /// Entropy bonus coefficient: the trainer (which has the full distribution) adds
    /// −coef·mean token entropy. Carried and validated here only. ≥ 0. Default 0.
    pub entropy_coef: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            loss: PolicyLoss::PpoClip,
            agg: Aggregation::TokenMean,
            eps_low: 0.2,
            eps_high: 0.2,
            dual_clip: None,
            rec_weight: RecWeight::None,
            rec_mask: RecMask::None,
            rec_reg: RecReg::None,
            reg_coef: 0.1,
            eps_prime_low: 0.6,
            eps_prime_high: 2.0,
            seq_eps_low: 3e-4,
            seq_eps_high: 4e-4,
            topr_ratio: RatioLevel::Token,
            stable_logratio_min: 1e-3_f64.ln(),
            stable_logratio_max: 1e3_f64.ln(),
            kl_coef: 0.0,
            kl_estimator: KlEstimator::LowVarKl,
            kl_in_reward: false,
            dads: false,
            dads_beta: 1e-3,
            sft_mu: 0.1,
            max_len: None,
            entropy_coef: 0.0,
        }
    }
}

fn invalid(field: &'static str, expected: impl Into<String>, found: impl ToString) -> LossError {
    LossError::InvalidConfig {
        field,
        expected: expected.into(),
        found: found.to_string(),
    }
}

/// `value` must lie strictly inside (0, 1).
fn check_open_unit(field: &'static str, value: f64) -> Result<(), LossError> {
    if value.is_finite() && value > 0.0 && value < 1.0 {
        Ok(())
    } else {
        Err(invalid(field, "in (0, 1)", value))
    }
}

fn check_positive(field: &'static str, value: f64) -> Result<(), LossError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(invalid(field, "a finite number > 0", value))
    }
}

fn check_non_negative(field: &'static str, value: f64) -> Result<(), LossError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(invalid(field, "a finite number >= 0", value))
    }
}

impl LossConfig {
    /// The effective KL-in-loss term: `(β, estimator)`, or `None` when no KL enters the loss.
    /// DADS uses k3 with `dads_beta` (docs/algorithms.md#dads-entropy-and-sft-mixing).
    pub fn loss_kl(&self) -> Option<(f64, KlEstimator)> {
        if self.dads {
            (self.dads_beta > 0.0).then_some((self.dads_beta, KlEstimator::K3))
        } else if !self.kl_in_reward && self.kl_coef > 0.0 {
            Some((self.kl_coef, self.kl_estimator))
        } else {
            None
        }
    }

    /// Checks ranges and combinations; the error names the field, what was expected and what
    /// was found.
    pub fn validate(&self) -> Result<(), LossError> {
        if self.loss == PolicyLoss::Cispo {
            // ε_low = 1 puts the lower clip at 0: no lower bound on CISPO's IS weight.
            if !(self.eps_low.is_finite() && self.eps_low > 0.0 && self.eps_low <= 1.0) {
                return Err(invalid(
                    "eps_low",
                    "in (0, 1] for loss = cispo",
                    self.eps_low,
                ));
            }
        } else {
            check_open_unit("eps_low", self.eps_low)?;
        }
        check_positive("eps_high", self.eps_high)?;
        check_open_unit("eps_prime_low", self.eps_prime_low)?;
        check_positive("eps_prime_high", self.eps_prime_high)?;
        check_open_unit("seq_eps_low", self.seq_eps_low)?;
        check_positive("seq_eps_high", self.seq_eps_high)?;
        check_non_negative("reg_coef", self.reg_coef)?;
        check_non_negative("kl_coef", self.kl_coef)?;
        check_non_negative("dads_beta", self.dads_beta)?;
        check_non_negative("entropy_coef", self.entropy_coef)?;
        if !(self.sft_mu.is_finite() && (0.0..=1.0).contains(&self.sft_mu)) {
            return Err(invalid("sft_mu", "in [0, 1]", self.sft_mu));
        }
        if let Some(c) = self.dual_clip {
            if !(c.is_finite() && c > 1.0) {
                return Err(invalid("dual_clip", "a finite number > 1 (e.g. 3)", c));
            }
        }
        let (lo, hi) = (self.stable_logratio_min, self.stable_logratio_max);
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return Err(invalid(
                "stable_logratio_min",
                format!("finite and < stable_logratio_max ({hi})"),
                lo,
            ));
        }
        match self.max_len {
            Some(0) => return Err(invalid("max_len", "> 0", 0)),
            None if self.agg == Aggregation::SeqMeanTokenSumNorm => {
                return Err(invalid(
                    "max_len",
                    "set (L_max) when agg = seq-mean-token-sum-norm",
                    "none",
                ))
            }
            _ => {}
        }
        self.validate_combinations()
    }

    /// Settings that only make sense for one loss, and mutually exclusive options.
    fn validate_combinations(&self) -> Result<(), LossError> {
        let loss = self.loss;
        if loss != PolicyLoss::Rec {
            let rec_defaults = [
                ("rec_weight", self.rec_weight.name(), RecWeight::None.name()),
                ("rec_mask", self.rec_mask.name(), RecMask::None.name()),
                ("rec_reg", self.rec_reg.name(), RecReg::None.name()),
            ];
            for (field, found, default) in rec_defaults {
                if found != default {
                    return Err(invalid(
                        field,
                        format!("'{default}' unless loss = rec (loss is {loss})"),
                        found,
                    ));
                }
            }
        }
        if loss != PolicyLoss::Topr && self.topr_ratio != RatioLevel::Token {
            return Err(invalid(
                "topr_ratio",
                format!("'token' unless loss = topr (loss is {loss})"),
                self.topr_ratio,
            ));
        }
        if loss.needs_seq_mean_token_mean() && self.agg != Aggregation::SeqMeanTokenMean {
            return Err(invalid(
                "agg",
                format!("seq-mean-token-mean for loss = {loss} (it is normalised per sequence)"),
                self.agg,
            ));
        }
        let clips = matches!(loss, PolicyLoss::PpoClip | PolicyLoss::StableReinforce);
        if let (Some(c), false) = (self.dual_clip, clips) {
            return Err(invalid(
                "dual_clip",
                format!("unset unless loss is ppo-clip or stable-reinforce (loss is {loss})"),
                c,
            ));
        }
        if loss == PolicyLoss::Rec && self.rec_mask == RecMask::Ring {
            if self.eps_prime_low < self.eps_low {
                return Err(invalid(
                    "eps_prime_low",
                    format!(">= eps_low ({}) for rec_mask = ring", self.eps_low),
                    self.eps_prime_low,
                ));
            }
            if self.eps_prime_high < self.eps_high {
                return Err(invalid(
                    "eps_prime_high",
                    format!(">= eps_high ({}) for rec_mask = ring", self.eps_high),
                    self.eps_prime_high,
                ));
            }
        }
        if self.dads && self.kl_coef > 0.0 {
            return Err(invalid(
                "kl_coef",
                "0 when dads = true (DADS uses dads_beta)",
                self.kl_coef,
            ));
        }
        if self.dads && self.kl_in_reward {
            return Err(invalid(
                "kl_in_reward",
                "false when dads = true (DADS puts its KL in the loss)",
                true,
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: LossError) -> &'static str {
        match err {
            LossError::InvalidConfig { field, .. } => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    fn rejects(cfg: LossConfig, field: &'static str) {
        let err = cfg.validate().expect_err("config should be rejected");
        assert_eq!(field_of(err), field);
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = LossConfig::default();
        assert_eq!(c.loss, PolicyLoss::PpoClip);
        assert_eq!(c.agg, Aggregation::TokenMean);
        assert_eq!((c.eps_low, c.eps_high), (0.2, 0.2));
        assert_eq!(c.dual_clip, None);
        assert_eq!((c.eps_prime_low, c.eps_prime_high), (0.6, 2.0));
        assert_eq!((c.seq_eps_low, c.seq_eps_high), (3e-4, 4e-4));
        assert_eq!(c.reg_coef, 0.1);
        // ln 1e-3 = −6.907755…, ln 1e3 = 6.907755…
        assert!((c.stable_logratio_min + 6.907755278982137).abs() < 1e-12);
        assert!((c.stable_logratio_max - 6.907755278982137).abs() < 1e-12);
        assert_eq!(c.kl_coef, 0.0);
        assert_eq!(c.kl_estimator, KlEstimator::LowVarKl);
        assert!(!c.kl_in_reward && !c.dads);
        assert_eq!((c.dads_beta, c.sft_mu, c.entropy_coef), (1e-3, 0.1, 0.0));
        assert_eq!(c.max_len, None);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn cispo_may_drop_the_lower_bound_and_gspo_needs_sequence_means() {
        let cispo = LossConfig {
            loss: PolicyLoss::Cispo,
            eps_low: 1.0,
            eps_high: 0.28,
            ..Default::default()
        };
        assert_eq!(cispo.validate(), Ok(()));
        rejects(
            LossConfig {
                eps_low: 1.0,
                ..Default::default()
            },
            "eps_low",
        );
        rejects(
            LossConfig {
                eps_low: 1.5,
                ..cispo
            },
            "eps_low",
        );
        rejects(
            LossConfig {
                loss: PolicyLoss::Gspo,
                ..Default::default()
            },
            "agg",
        );
        let gspo = LossConfig {
            loss: PolicyLoss::Gspo,
            agg: Aggregation::SeqMeanTokenMean,
            ..Default::default()
        };
        assert_eq!(gspo.validate(), Ok(()));
    }

    #[test]
    fn names_round_trip_and_match_serde() {
        fn check<T>(all: &[T], name: fn(T) -> &'static str, parse: fn(&str) -> Result<T, LossError>)
        where
            T: Copy + PartialEq + std::fmt::Debug + Serialize,
        {
            for &v in all {
                assert_eq!(parse(name(v)), Ok(v));
                let json = serde_json::to_string(&v).expect("serialise");
                assert_eq!(json, format!("\"{}\"", name(v)));
            }
        }
        check(PolicyLoss::ALL, PolicyLoss::name, PolicyLoss::from_name);
        check(Aggregation::ALL, Aggregation::name, Aggregation::from_name);
        check(KlEstimator::ALL, KlEstimator::name, KlEstimator::from_name);
        check(RecWeight::ALL, RecWeight::name, RecWeight::from_name);
        check(RecMask::ALL, RecMask::name, RecMask::from_name);
        check(RecReg::ALL, RecReg::name, RecReg::from_name);
        check(RatioLevel::ALL, RatioLevel::name, RatioLevel::from_name);
        assert_eq!(KlEstimator::LowVarKl.name(), "low-var-kl");
        assert_eq!(PolicyLoss::ALL.len(), 7);
        assert_eq!(RecMask::ALL.len(), 5);
    }

    #[test]
    fn unknown_name_lists_known_names() {
        let err = PolicyLoss::from_name("ppo").expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "unknown policy loss 'ppo'; known names: reinforce, ppo-clip, rec, topr, stable-reinforce, \
             gspo, cispo"
        );
        let err = KlEstimator::from_name("k4").expect_err("unknown");
        assert!(err.to_string().contains("k1, k2, k3, low-var-kl"), "{err}");
    }

    #[test]
    fn toml_like_json_config_parses_kebab_names_and_denies_unknown_fields() {
        let cfg: LossConfig = serde_json::from_str(
            r#"{"loss":"rec","rec_weight":"truncated-is","rec_mask":"seq-one-side",
                "agg":"seq-mean-token-sum-norm","max_len":512,"kl_estimator":"k3"}"#,
        )
        .expect("parse");
        assert_eq!(cfg.rec_weight, RecWeight::TruncatedIs);
        assert_eq!(cfg.rec_mask, RecMask::SeqOneSide);
        assert_eq!(cfg.max_len, Some(512));
        assert_eq!(cfg.eps_low, 0.2); // untouched fields keep their defaults
        assert_eq!(cfg.validate(), Ok(()));
        let err = serde_json::from_str::<LossConfig>(r#"{"eps":0.2}"#).expect_err("unknown");
        assert!(err.to_string().contains("unknown field `eps`"), "{err}");
    }

    #[test]
    fn rejects_clip_ranges_out_of_bounds() {
        for bad in [0.0, 1.0, 1.2, -0.1, f64::NAN] {
            rejects(
                LossConfig {
                    eps_low: bad,
                    ..Default::default()
                },
                "eps_low",
            );
        }
        rejects(
            LossConfig {
                eps_high: 0.0,
                ..Default::default()
            },
            "eps_high",
        );
        rejects(
            LossConfig {
                eps_prime_low: 1.0,
                ..Default::default()
            },
            "eps_prime_low",
        );
        rejects(
            LossConfig {
                seq_eps_high: -1e-4,
                ..Default::default()
            },
            "seq_eps_high",
        );
        // eps_high above 1 is legal (only the lower side must keep 1−ε > 0).
        let wide = LossConfig {
            eps_high: 1.5,
            ..Default::default()
        };
        assert_eq!(wide.validate(), Ok(()));
    }

    #[test]
    fn rejects_negative_coefficients_and_bad_mu() {
        rejects(
            LossConfig {
                kl_coef: -0.1,
                ..Default::default()
            },
            "kl_coef",
        );
        rejects(
            LossConfig {
                reg_coef: -1.0,
                ..Default::default()
            },
            "reg_coef",
        );
        rejects(
            LossConfig {
                dads_beta: -1e-3,
                ..Default::default()
            },
            "dads_beta",
        );
        rejects(
            LossConfig {
                entropy_coef: -0.01,
                ..Default::default()
            },
            "entropy_coef",
        );
        rejects(
            LossConfig {
                sft_mu: 1.5,
                ..Default::default()
            },
            "sft_mu",
        );
    }

    #[test]
    fn rejects_dual_clip_at_or_below_one_and_for_other_losses() {
        rejects(
            LossConfig {
                dual_clip: Some(1.0),
                ..Default::default()
            },
            "dual_clip",
        );
        let ok = LossConfig {
            dual_clip: Some(3.0),
            ..Default::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let reinforce = LossConfig {
            loss: PolicyLoss::Reinforce,
            dual_clip: Some(3.0),
            ..Default::default()
        };
        rejects(reinforce, "dual_clip");
    }

    #[test]
    fn sum_norm_needs_max_len_with_a_clear_message() {
        let cfg = LossConfig {
            agg: Aggregation::SeqMeanTokenSumNorm,
            ..Default::default()
        };
        let err = cfg.validate().expect_err("needs max_len");
        assert_eq!(
            err.to_string(),
            "invalid loss config: max_len must be set (L_max) when agg = seq-mean-token-sum-norm, found none"
        );
        rejects(
            LossConfig {
                max_len: Some(0),
                ..Default::default()
            },
            "max_len",
        );
    }

    #[test]
    fn rejects_settings_of_another_loss_and_exclusive_options() {
        rejects(
            LossConfig {
                rec_mask: RecMask::OneSide,
                ..Default::default()
            },
            "rec_mask",
        );
        rejects(
            LossConfig {
                topr_ratio: RatioLevel::Sequence,
                ..Default::default()
            },
            "topr_ratio",
        );
        rejects(
            LossConfig {
                loss: PolicyLoss::Topr,
                ..Default::default()
            },
            "agg",
        );
        rejects(
            LossConfig {
                dads: true,
                kl_coef: 0.1,
                ..Default::default()
            },
            "kl_coef",
        );
        rejects(
            LossConfig {
                dads: true,
                kl_in_reward: true,
                ..Default::default()
            },
            "kl_in_reward",
        );
        let ring = LossConfig {
            loss: PolicyLoss::Rec,
            rec_mask: RecMask::Ring,
            eps_prime_low: 0.1,
            ..Default::default()
        };
        rejects(ring, "eps_prime_low");
        rejects(
            LossConfig {
                stable_logratio_min: 1.0,
                stable_logratio_max: 0.5,
                ..Default::default()
            },
            "stable_logratio_min",
        );
    }

    #[test]
    fn loss_kl_selects_the_effective_term() {
        let base = LossConfig::default();
        assert_eq!(base.loss_kl(), None); // β = 0
        let kl = LossConfig {
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K2,
            ..Default::default()
        };
        assert_eq!(kl.loss_kl(), Some((0.05, KlEstimator::K2)));
        let in_reward = LossConfig {
            kl_in_reward: true,
            ..kl.clone()
        };
        assert_eq!(in_reward.loss_kl(), None);
        let dads = LossConfig {
            dads: true,
            ..Default::default()
        };
        assert_eq!(dads.loss_kl(), Some((1e-3, KlEstimator::K3)));
    }
}
