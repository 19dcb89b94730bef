//! Reward shaping (docs/algorithms.md#reward-shaping): transforms applied to raw rewards before the advantage
//! estimator.
//!
//! Stateless transforms take the reward and the rewards of the M reference responses drawn for
//! the same prompt (`refs`):
//! - PAR: (1/M) Σ_m σ(r − r_ref,m), bounded in (0, 1) and monotone in r.
//! - LSC: log σ(r − q) with q the 0.85 quantile of a normal fit to the references *(unverified
//!   default; a config value)*. Summing LSC over several reward models gives log P(good on all).
//! - centered: r − mean(refs); ceil: min(r, c); length penalty: r − coef·max(0, len − l0).
//!
//! Running transforms keep serde-serialisable state so they survive checkpoint/resume:
//! [`RunningMeanStd`], [`RunningClip`], [`RunningMinMax`]. [`Shaper`] bundles a validated
//! [`ShapingConfig`] with that state and shapes one group at a time.
//!
//! Error policy: an empty reference set (M = 0) or any non-finite input is an error, never a NaN
//! passed on silently.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Guard added to a running std before dividing (same ε as the advantage estimators).
pub const STD_EPS: f64 = 1e-6;
/// Default quantile of the reference fit used by LSC *(unverified)*.
pub const DEFAULT_LSC_QUANTILE: f64 = 0.85;
/// Default length-penalty coefficient per token beyond the free length.
pub const DEFAULT_LENGTH_COEF: f64 = 0.01;
/// Default number of tokens that carry no length penalty.
pub const DEFAULT_FREE_LEN: usize = 300;
/// Default half-width of the running clip, in running standard deviations.
pub const DEFAULT_CLIP_K: f64 = 1.0;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum ShapingError {
    #[error("{what}: expected at least one reference reward, found 0")]
    NoReferences { what: &'static str },
    #[error("{what}[{index}]: expected a finite number, found {value}")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f64,
    },
    #[error("{what}: expected {expected} values, found {found}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("quantile p: expected a value in (0, 1), found {0}")]
    QuantileOutOfRange(f64),
    #[error("shaper state: config {config} expects its own running state, found `{state}`")]
    StateMismatch { config: String, state: &'static str },
    #[error("shaping config `{field}`: expected {expected}, found {found}")]
    InvalidConfig {
        field: &'static str,
        expected: &'static str,
        found: f64,
    },
}

/// Numerically stable logistic σ(x) = 1 / (1 + e^−x).
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        // e^x / (1 + e^x) avoids e^−x overflowing for very negative x.
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Numerically stable log σ(x) = −softplus(−x); finite for any finite x.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn check_finite(what: &'static str, values: &[f64]) -> Result<(), ShapingError> {
    match values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        Some((index, &value)) => Err(ShapingError::NonFinite { what, index, value }),
        None => Ok(()),
    }
}

fn check_refs(what: &'static str, refs: &[f64]) -> Result<(), ShapingError> {
    if refs.is_empty() {
        return Err(ShapingError::NoReferences { what });
    }
    check_finite(what, refs)
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// Sample std (divide by M − 1, the project default); 0 for a single value.
fn sample_std(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return 0.0;
    }
    let m = mean(values);
    let ss: f64 = values.iter().map(|v| (v - m) * (v - m)).sum();
    (ss / (values.len() - 1) as f64).sqrt()
}

/// PAR: (1/M) Σ_m σ(r − r_ref,m). Errors on M = 0 or non-finite input.
pub fn par(r: f64, refs: &[f64]) -> Result<f64, ShapingError> {
    check_finite("par reward", &[r])?;
    check_refs("par refs", refs)?;
    Ok(refs.iter().map(|&q| sigmoid(r - q)).sum::<f64>() / refs.len() as f64)
}

/// LSC for one reward model: log σ(r − q). Stable for any finite r − q.
pub fn lsc(r: f64, q: f64) -> f64 {
    log_sigmoid(r - q)
}

/// Σ_k log σ(r_k − q_k) over reward models = log P(good on all), models independent.
pub fn lsc_and(rs: &[f64], qs: &[f64]) -> Result<f64, ShapingError> {
    if rs.len() != qs.len() {
        return Err(ShapingError::LengthMismatch {
            what: "lsc_and quantiles (one per reward model)",
            expected: rs.len(),
            found: qs.len(),
        });
    }
    Ok(rs.iter().zip(qs).map(|(&r, &q)| lsc(r, q)).sum())
}

// Acklam's rational approximation of the inverse standard normal CDF (relative error < 1.15e-9).
const ACKLAM_A: [f64; 6] = [
    -3.969_683_028_665_376e1,
    2.209_460_984_245_205e2,
    -2.759_285_104_469_687e2,
    1.383_577_518_672_69e2,
    -3.066_479_806_614_716e1,
    2.506_628_277_459_239,
];
const ACKLAM_B: [f64; 5] = [
    -5.447_609_879_822_406e1,
    1.615_858_368_580_409e2,
    -1.556_989_798_598_866e2,
    6.680_131_188_771_972e1,
    -1.328_068_155_288_572e1,
];
const ACKLAM_C: [f64; 6] = [
    -7.784_894_002_430_293e-3,
    -3.223_964_580_411_365e-1,
    -2.400_758_277_161_838,
    -2.549_732_539_343_734,
    4.374_664_141_464_968,
    2.938_163_982_698_783,
];
const ACKLAM_D: [f64; 4] = [
    7.784_695_709_041_462e-3,
    3.224_671_290_700_398e-1,
    2.445_134_137_142_996,
    3.754_408_661_907_416,
];
const ACKLAM_P_LOW: f64 = 0.02425;

/// Lower-tail branch of Acklam's approximation, valid for 0 < p < ACKLAM_P_LOW.
fn acklam_tail(p: f64) -> f64 {
    let [c0, c1, c2, c3, c4, c5] = ACKLAM_C;
    let [d0, d1, d2, d3] = ACKLAM_D;
    let q = (-2.0 * p.ln()).sqrt();
    (((((c0 * q + c1) * q + c2) * q + c3) * q + c4) * q + c5)
        / ((((d0 * q + d1) * q + d2) * q + d3) * q + 1.0)
}

/// z_p = Φ⁻¹(p) for p ∈ (0, 1) (Acklam, relative error < 1.15e-9).
pub fn inverse_normal_cdf(p: f64) -> Result<f64, ShapingError> {
    if !(p > 0.0 && p < 1.0) {
        return Err(ShapingError::QuantileOutOfRange(p));
    }
    if p < ACKLAM_P_LOW {
        return Ok(acklam_tail(p));
    }
    if p > 1.0 - ACKLAM_P_LOW {
        // Symmetry Φ⁻¹(p) = −Φ⁻¹(1 − p) keeps the upper tail as accurate as the lower.
        return Ok(-acklam_tail(1.0 - p));
    }
    let [a0, a1, a2, a3, a4, a5] = ACKLAM_A;
    let [b0, b1, b2, b3, b4] = ACKLAM_B;
    let q = p - 0.5;
    let r = q * q;
    Ok(
        (((((a0 * r + a1) * r + a2) * r + a3) * r + a4) * r + a5) * q
            / (((((b0 * r + b1) * r + b2) * r + b3) * r + b4) * r + 1.0),
    )
}

/// p-quantile of a normal fit to the references: mean + z_p·std, std the sample std (M − 1);
/// a single reference has std 0, so the quantile is that reference.
pub fn reference_quantile(refs: &[f64], p: f64) -> Result<f64, ShapingError> {
    let z = inverse_normal_cdf(p)?;
    check_refs("reference_quantile refs", refs)?;
    Ok(mean(refs) + z * sample_std(refs))
}

/// r − mean(refs).
pub fn centered(r: f64, refs: &[f64]) -> Result<f64, ShapingError> {
    check_finite("centered reward", &[r])?;
    check_refs("centered refs", refs)?;
    Ok(r - mean(refs))
}

/// r − coef·max(0, len − free_len).
pub fn length_penalty(r: f64, len: usize, coef: f64, free_len: usize) -> f64 {
    r - coef * len.saturating_sub(free_len) as f64
}

/// min(r, c).
pub fn ceil(r: f64, c: f64) -> f64 {
    r.min(c)
}

/// Running mean and variance by Welford's algorithm, starting empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningMeanStd {
    count: u64,
    mean: f64,
    /// Σ (x − mean)², the Welford accumulator.
    m2: f64,
}

impl RunningMeanStd {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a batch. Rejects the whole batch (state unchanged) if any value is non-finite,
    /// since one NaN would poison the statistics for the rest of the run.
    pub fn update(&mut self, values: &[f64]) -> Result<(), ShapingError> {
        check_finite("running stats update", values)?;
        for &x in values {
            self.count += 1;
            let delta = x - self.mean;
            self.mean += delta / self.count as f64;
            self.m2 += delta * (x - self.mean);
        }
        Ok(())
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Running mean; 0 before any update.
    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// Running sample std (n − 1); 0 with fewer than two values.
    pub fn std(&self) -> f64 {
        if self.count < 2 {
            return 0.0;
        }
        (self.m2 / (self.count - 1) as f64).sqrt()
    }

    /// (r − mean)/(std + ε). With fewer than two values seen there is no scale yet, so this is
    /// the identity (mean 0, std 1, as for a group of one sample).
    pub fn normalize(&self, r: f64) -> f64 {
        if self.count < 2 {
            return r;
        }
        (r - self.mean) / (self.std() + STD_EPS)
    }
}

/// Clips rewards to mean ± k·std of all rewards seen so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningClip {
    k: f64,
    stats: RunningMeanStd,
}

impl RunningClip {
    /// `k` must be finite and > 0.
    pub fn new(k: f64) -> Result<Self, ShapingError> {
        if !(k.is_finite() && k > 0.0) {
            return Err(ShapingError::InvalidConfig {
                field: "running-clip.k",
                expected: "a finite number > 0",
                found: k,
            });
        }
        Ok(Self {
            k,
            stats: RunningMeanStd::new(),
        })
    }

    pub fn update(&mut self, values: &[f64]) -> Result<(), ShapingError> {
        self.stats.update(values)
    }

    pub fn stats(&self) -> &RunningMeanStd {
        &self.stats
    }

    /// clamp(r, μ − kσ, μ + kσ); identity with fewer than two values seen.
    pub fn clip(&self, r: f64) -> f64 {
        if self.stats.count() < 2 {
            return r;
        }
        let half_width = self.k * self.stats.std();
        r.clamp(
            self.stats.mean() - half_width,
            self.stats.mean() + half_width,
        )
    }
}

/// Scales rewards to [0, 1] by the min and max seen so far.
/// `Option` rather than ±∞ so the state round-trips through JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningMinMax {
    min: Option<f64>,
    max: Option<f64>,
}

impl RunningMinMax {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rejects the whole batch (state unchanged) if any value is non-finite.
    pub fn update(&mut self, values: &[f64]) -> Result<(), ShapingError> {
        check_finite("running min-max update", values)?;
        for &x in values {
            self.min = Some(self.min.map_or(x, |m| m.min(x)));
            self.max = Some(self.max.map_or(x, |m| m.max(x)));
        }
        Ok(())
    }

    pub fn min(&self) -> Option<f64> {
        self.min
    }

    pub fn max(&self) -> Option<f64> {
        self.max
    }

    /// (r − min)/(max − min). Identity before any update; 0 when max − min ≤ ε (no spread yet,
    /// like an all-equal group). Not clamped: a value outside the seen range maps outside [0, 1].
    pub fn normalize(&self, r: f64) -> f64 {
        match (self.min, self.max) {
            (Some(lo), Some(hi)) if hi - lo > STD_EPS => (r - lo) / (hi - lo),
            (Some(_), Some(_)) => 0.0,
            _ => r,
        }
    }
}

fn default_lsc_quantile() -> f64 {
    DEFAULT_LSC_QUANTILE
}
fn default_clip_k() -> f64 {
    DEFAULT_CLIP_K
}
fn default_length_coef() -> f64 {
    DEFAULT_LENGTH_COEF
}
fn default_free_len() -> usize {
    DEFAULT_FREE_LEN
}

/// Which shaping to apply. In TOML: `shaping = { kind = "lsc", quantile = 0.85 }`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ShapingConfig {
    #[default]
    None,
    Par,
    Lsc {
        #[serde(default = "default_lsc_quantile")]
        quantile: f64,
    },
    Centered,
    RunningNorm,
    RunningClip {
        #[serde(default = "default_clip_k")]
        k: f64,
    },
    #[serde(rename = "running-minmax")]
    RunningMinMax,
    Ceil {
        ceiling: f64,
    },
    LengthPenalty {
        #[serde(default = "default_length_coef")]
        coef: f64,
        #[serde(default = "default_free_len")]
        free_len: usize,
    },
}

impl ShapingConfig {
    pub fn validate(&self) -> Result<(), ShapingError> {
        match *self {
            Self::Lsc { quantile } if !(quantile > 0.0 && quantile < 1.0) => {
                Err(ShapingError::InvalidConfig {
                    field: "lsc.quantile",
                    expected: "a value in (0, 1)",
                    found: quantile,
                })
            }
            Self::RunningClip { k } if !(k.is_finite() && k > 0.0) => {
                Err(ShapingError::InvalidConfig {
                    field: "running-clip.k",
                    expected: "a finite number > 0",
                    found: k,
                })
            }
            Self::Ceil { ceiling } if !ceiling.is_finite() => Err(ShapingError::InvalidConfig {
                field: "ceil.ceiling",
                expected: "a finite number",
                found: ceiling,
            }),
            Self::LengthPenalty { coef, .. } if !(coef.is_finite() && coef >= 0.0) => {
                Err(ShapingError::InvalidConfig {
                    field: "length-penalty.coef",
                    expected: "a finite number >= 0",
                    found: coef,
                })
            }
            _ => Ok(()),
        }
    }
}

/// Running state of a [`Shaper`]; only the variant its config needs is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShapingState {
    Stateless,
    MeanStd(RunningMeanStd),
    Clip(RunningClip),
    MinMax(RunningMinMax),
}

fn state_name(state: &ShapingState) -> &'static str {
    match state {
        ShapingState::Stateless => "stateless",
        ShapingState::MeanStd(_) => "mean-std",
        ShapingState::Clip(_) => "clip",
        ShapingState::MinMax(_) => "min-max",
    }
}

/// A validated shaping config plus its running state; serialise it into checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shaper {
    config: ShapingConfig,
    state: ShapingState,
}

impl Shaper {
    pub fn new(config: ShapingConfig) -> Result<Self, ShapingError> {
        config.validate()?;
        let state = match config {
            ShapingConfig::RunningNorm => ShapingState::MeanStd(RunningMeanStd::new()),
            ShapingConfig::RunningClip { k } => ShapingState::Clip(RunningClip::new(k)?),
            ShapingConfig::RunningMinMax => ShapingState::MinMax(RunningMinMax::new()),
            _ => ShapingState::Stateless,
        };
        Ok(Self { config, state })
    }

    pub fn config(&self) -> &ShapingConfig {
        &self.config
    }

    pub fn state(&self) -> &ShapingState {
        &self.state
    }

    /// Shapes one group. `refs` are the prompt's reference rewards (needed by par, lsc,
    /// centered), `lengths` the responses' token lengths (needed by length-penalty; one per
    /// reward). Running transforms first add the group to their statistics, then transform it.
    /// On any error the running state is left unchanged.
    pub fn apply(
        &mut self,
        rewards: &[f64],
        refs: &[f64],
        lengths: &[usize],
    ) -> Result<Vec<f64>, ShapingError> {
        check_finite("rewards", rewards)?;
        match (&self.config, &mut self.state) {
            (ShapingConfig::None, _) => Ok(rewards.to_vec()),
            (ShapingConfig::Par, _) => rewards.iter().map(|&r| par(r, refs)).collect(),
            (ShapingConfig::Lsc { quantile }, _) => {
                let q = reference_quantile(refs, *quantile)?;
                Ok(rewards.iter().map(|&r| lsc(r, q)).collect())
            }
            (ShapingConfig::Centered, _) => rewards.iter().map(|&r| centered(r, refs)).collect(),
            (ShapingConfig::Ceil { ceiling }, _) => {
                Ok(rewards.iter().map(|&r| ceil(r, *ceiling)).collect())
            }
            (ShapingConfig::LengthPenalty { coef, free_len }, _) => {
                if lengths.len() != rewards.len() {
                    return Err(ShapingError::LengthMismatch {
                        what: "length-penalty lengths (one per reward)",
                        expected: rewards.len(),
                        found: lengths.len(),
                    });
                }
                Ok(rewards
                    .iter()
                    .zip(lengths)
                    .map(|(&r, &len)| length_penalty(r, len, *coef, *free_len))
                    .collect())
            }
            (ShapingConfig::RunningNorm, ShapingState::MeanStd(stats)) => {
                stats.update(rewards)?;
                Ok(rewards.iter().map(|&r| stats.normalize(r)).collect())
            }
            (ShapingConfig::RunningClip { .. }, ShapingState::Clip(clip)) => {
                clip.update(rewards)?;
                Ok(rewards.iter().map(|&r| clip.clip(r)).collect())
            }
            (ShapingConfig::RunningMinMax, ShapingState::MinMax(mm)) => {
                mm.update(rewards)?;
                Ok(rewards.iter().map(|&r| mm.normalize(r)).collect())
            }
            // Unreachable through `new`; a hand-edited checkpoint could pair them wrongly.
            (config, state) => Err(ShapingError::StateMismatch {
                config: format!("{config:?}"),
                state: state_name(state),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::close;

    #[test]
    fn sigmoid_and_log_sigmoid_hand_values() {
        // σ(0) = 0.5; σ(2) = 1/(1+e^−2) = 1/1.1353352832 = 0.8807970780
        assert_eq!(sigmoid(0.0), 0.5);
        assert!(close(sigmoid(2.0), 0.880_797_077_977_882_3, 1e-15));
        assert!(close(sigmoid(-2.0), 1.0 - 0.880_797_077_977_882_3, 1e-15));
        // log σ(0) = −ln 2 = −0.6931471806
        assert!(close(log_sigmoid(0.0), -std::f64::consts::LN_2, 1e-15));
    }

    #[test]
    fn par_hand_computed() {
        // refs [0, 2], r = 1: (σ(1) + σ(−1))/2 = 1/2 exactly, since σ(x) + σ(−x) = 1.
        assert!(close(par(1.0, &[0.0, 2.0]).unwrap(), 0.5, 1e-15));
        // refs [0, 1], r = 1: (σ(1) + σ(0))/2 = (0.7310585786 + 0.5)/2 = 0.6155292893
        assert!(close(
            par(1.0, &[0.0, 1.0]).unwrap(),
            0.615_529_289_315_002_4,
            1e-12
        ));
    }

    #[test]
    fn par_with_one_reference_is_sigmoid_of_difference() {
        for (r, q) in [(0.3, -1.2), (5.0, 5.0), (-2.0, 7.5)] {
            assert!(close(par(r, &[q]).unwrap(), sigmoid(r - q), 1e-15));
        }
    }

    #[test]
    fn par_is_bounded_and_monotone_in_r() {
        let refs = [-1.0, 0.0, 0.5, 3.0];
        let mut previous = 0.0;
        for i in -20..=20 {
            let r = i as f64 * 0.5;
            let v = par(r, &refs).unwrap();
            assert!(v > 0.0 && v < 1.0, "par({r}) = {v} outside (0,1)");
            assert!(v > previous, "par not increasing at r = {r}");
            previous = v;
        }
    }

    #[test]
    fn par_rejects_empty_and_non_finite_refs() {
        assert!(matches!(
            par(1.0, &[]),
            Err(ShapingError::NoReferences { .. })
        ));
        assert!(matches!(
            par(1.0, &[0.0, f64::NAN]),
            Err(ShapingError::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            par(f64::INFINITY, &[0.0]),
            Err(ShapingError::NonFinite { .. })
        ));
    }

    #[test]
    fn lsc_hand_values_and_stability() {
        // log σ(0) = −ln 2
        assert!(close(lsc(1.0, 1.0), -std::f64::consts::LN_2, 1e-15));
        // log σ(2) = −ln(1 + e^−2) = −ln 1.1353352832 = −0.1269280110
        assert!(close(lsc(3.0, 1.0), -0.126_928_011_042_972_6, 1e-14));
        // log σ(1000) = −ln1p(e^−1000) ≈ −0 (e^−1000 underflows to 0)
        let big = lsc(1e3, 0.0);
        assert!(big.is_finite() && big <= 0.0 && big > -1e-300);
        // log σ(−1000) = −1000 − ln1p(e^−1000) = −1000
        assert_eq!(lsc(-1e3, 0.0), -1000.0);
        assert_eq!(lsc(0.0, 1e3), -1000.0);
    }

    #[test]
    fn lsc_and_is_sum_and_checks_lengths() {
        // log σ(0) + log σ(2) = −0.6931471806 − 0.1269280110 = −0.8200751916
        let v = lsc_and(&[1.0, 3.0], &[1.0, 1.0]).unwrap();
        assert!(close(v, -0.820_075_191_602_917_9, 1e-13));
        // It is the log of the product of the probabilities: ln(0.5 · 0.8807970780)
        assert!(close(v, (0.5 * sigmoid(2.0)).ln(), 1e-14));
        assert!(matches!(
            lsc_and(&[1.0, 2.0], &[1.0]),
            Err(ShapingError::LengthMismatch {
                expected: 2,
                found: 1,
                ..
            })
        ));
        // No reward models: log P(good on all of none) = log 1 = 0.
        assert_eq!(lsc_and(&[], &[]).unwrap(), 0.0);
    }

    #[test]
    fn inverse_normal_cdf_matches_known_z_values() {
        // References: Python statistics.NormalDist().inv_cdf (Wichura AS241, ~1e-16).
        let cases = [
            (0.85, 1.036_433_389_493_789_4),
            (0.975, 1.959_963_984_540_053_6),
            (0.5, 0.0),
            (0.3, -0.524_400_512_708_040_7),
            (0.01, -2.326_347_874_040_840_8),    // lower-tail branch
            (0.02425, -1.972_961_051_311_884_5), // branch boundary
            (0.999, 3.090_232_306_167_813),      // upper-tail branch
            (1e-6, -4.753_424_308_822_899),
        ];
        for (p, z) in cases {
            let got = inverse_normal_cdf(p).unwrap();
            // Acklam's relative error bound is 1.15e-9.
            assert!(
                close(got, z, 1.2e-9 * z.abs().max(1.0)),
                "p={p}: {got} vs {z}"
            );
        }
    }

    #[test]
    fn inverse_normal_cdf_is_antisymmetric_and_rejects_bad_p() {
        for p in [0.001, 0.1, 0.3, 0.49] {
            let lo = inverse_normal_cdf(p).unwrap();
            let hi = inverse_normal_cdf(1.0 - p).unwrap();
            assert!(close(lo, -hi, 1e-12), "p={p}");
        }
        for p in [0.0, 1.0, -0.1, 1.5, f64::NAN] {
            assert!(matches!(
                inverse_normal_cdf(p),
                Err(ShapingError::QuantileOutOfRange(_))
            ));
        }
    }

    #[test]
    fn reference_quantile_hand_computed() {
        // refs [1, 2, 3]: mean 2, sample std sqrt(((1)+(0)+(1))/2) = 1;
        // q_0.85 = 2 + 1.0364333895·1 = 3.0364333895
        let q = reference_quantile(&[1.0, 2.0, 3.0], 0.85).unwrap();
        assert!(close(q, 3.036_433_389_493_789, 1e-8));
        // One reference: std 0, quantile is the reference itself.
        assert_eq!(reference_quantile(&[4.0], 0.85).unwrap(), 4.0);
        assert!(matches!(
            reference_quantile(&[], 0.85),
            Err(ShapingError::NoReferences { .. })
        ));
        assert!(reference_quantile(&[1.0], 1.0).is_err());
    }

    #[test]
    fn centered_length_penalty_and_ceil_hand_computed() {
        // 5 − mean(1, 2, 6) = 5 − 3 = 2
        assert_eq!(centered(5.0, &[1.0, 2.0, 6.0]).unwrap(), 2.0);
        assert!(centered(5.0, &[]).is_err());
        // 1 − 0.01·(350 − 300) = 1 − 0.5 = 0.5
        assert!(close(length_penalty(1.0, 350, 0.01, 300), 0.5, 1e-15));
        // len ≤ l0: no penalty
        assert_eq!(length_penalty(1.0, 300, 0.01, 300), 1.0);
        assert_eq!(length_penalty(1.0, 10, 0.01, 300), 1.0);
        assert_eq!(ceil(3.0, 2.0), 2.0);
        assert_eq!(ceil(-3.0, 2.0), -3.0);
    }

    #[test]
    fn running_mean_std_matches_direct_computation() {
        let data = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        let mut stats = RunningMeanStd::new();
        stats.update(&data[..3]).unwrap();
        stats.update(&data[3..]).unwrap();
        // mean = 40/8 = 5; Σ(x−5)² = 9+1+1+1+0+0+4+16 = 32; sample var 32/7, std 2.1380899353
        assert_eq!(stats.count(), 8);
        assert!(close(stats.mean(), 5.0, 1e-15));
        assert!(close(stats.std(), (32.0f64 / 7.0).sqrt(), 1e-14));
        assert!(close(stats.std(), sample_std(&data), 1e-14));
        // normalize(9) = (9 − 5)/(2.1380899353 + 1e-6) = 1.8708278
        assert!(close(
            stats.normalize(9.0),
            4.0 / ((32.0f64 / 7.0).sqrt() + STD_EPS),
            1e-14
        ));
    }

    #[test]
    fn running_mean_std_degenerate_and_nan() {
        let mut stats = RunningMeanStd::new();
        assert_eq!(stats.normalize(3.0), 3.0); // nothing seen: identity
        stats.update(&[1.0]).unwrap();
        assert_eq!(stats.std(), 0.0);
        assert_eq!(stats.normalize(3.0), 3.0); // one value: still identity
        let before = stats.clone();
        assert!(stats.update(&[2.0, f64::NAN]).is_err());
        assert_eq!(stats, before, "a rejected batch must not change the state");
    }

    #[test]
    fn running_clip_hand_computed() {
        let mut clip = RunningClip::new(1.0).unwrap();
        assert_eq!(clip.clip(100.0), 100.0); // nothing seen: identity
        clip.update(&[0.0, 2.0]).unwrap();
        // mean 1, sample std sqrt((1+1)/1) = 1.4142135624: bounds [−0.4142, 2.4142]
        assert!(close(clip.clip(10.0), 1.0 + 2f64.sqrt(), 1e-15));
        assert!(close(clip.clip(-10.0), 1.0 - 2f64.sqrt(), 1e-15));
        assert_eq!(clip.clip(1.5), 1.5);
        assert!(RunningClip::new(0.0).is_err());
        assert!(RunningClip::new(f64::NAN).is_err());
    }

    #[test]
    fn running_min_max_hand_computed() {
        let mut mm = RunningMinMax::new();
        assert_eq!(mm.normalize(7.0), 7.0); // nothing seen: identity
        mm.update(&[3.0]).unwrap();
        assert_eq!(mm.normalize(3.0), 0.0); // no spread yet
        mm.update(&[1.0, 5.0]).unwrap();
        // (4 − 1)/(5 − 1) = 0.75
        assert_eq!(mm.normalize(4.0), 0.75);
        assert_eq!((mm.min(), mm.max()), (Some(1.0), Some(5.0)));
        assert!(mm.update(&[f64::INFINITY]).is_err());
        assert_eq!(mm.max(), Some(5.0));
    }

    #[test]
    fn running_state_round_trips_through_json() {
        let mut shaper = Shaper::new(ShapingConfig::RunningNorm).unwrap();
        shaper.apply(&[1.0, 2.0, 4.0], &[], &[]).unwrap();
        let json = serde_json::to_string(&shaper).unwrap();
        let mut resumed: Shaper = serde_json::from_str(&json).unwrap();
        assert_eq!(resumed, shaper);
        // Resumed and original continue identically.
        let a = shaper.apply(&[3.0, 0.0], &[], &[]).unwrap();
        let b = resumed.apply(&[3.0, 0.0], &[], &[]).unwrap();
        assert_eq!(a, b);

        let mut mm = RunningMinMax::new();
        mm.update(&[1.0, -2.0]).unwrap();
        let back: RunningMinMax =
            serde_json::from_str(&serde_json::to_string(&mm).unwrap()).unwrap();
        assert_eq!(back, mm);
        let empty: RunningMinMax =
            serde_json::from_str(&serde_json::to_string(&RunningMinMax::new()).unwrap()).unwrap();
        assert_eq!(empty, RunningMinMax::new());
    }

    #[test]
    fn config_parses_kebab_names_with_defaults() {
        let parse = |s: &str| serde_json::from_str::<ShapingConfig>(s).unwrap();
        assert_eq!(parse(r#"{"kind":"none"}"#), ShapingConfig::None);
        assert_eq!(parse(r#"{"kind":"par"}"#), ShapingConfig::Par);
        assert_eq!(
            parse(r#"{"kind":"lsc"}"#),
            ShapingConfig::Lsc { quantile: 0.85 }
        );
        assert_eq!(parse(r#"{"kind":"centered"}"#), ShapingConfig::Centered);
        assert_eq!(
            parse(r#"{"kind":"running-norm"}"#),
            ShapingConfig::RunningNorm
        );
        assert_eq!(
            parse(r#"{"kind":"running-clip"}"#),
            ShapingConfig::RunningClip { k: 1.0 }
        );
        assert_eq!(
            parse(r#"{"kind":"running-minmax"}"#),
            ShapingConfig::RunningMinMax
        );
        assert_eq!(
            parse(r#"{"kind":"ceil","ceiling":0.9}"#),
            ShapingConfig::Ceil { ceiling: 0.9 }
        );
        assert_eq!(
            parse(r#"{"kind":"length-penalty"}"#),
            ShapingConfig::LengthPenalty {
                coef: 0.01,
                free_len: 300
            }
        );
        assert_eq!(ShapingConfig::default(), ShapingConfig::None);
    }

    #[test]
    fn config_unknown_name_lists_known_names_and_unknown_field_fails() {
        let err = serde_json::from_str::<ShapingConfig>(r#"{"kind":"parr"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("parr") && err.contains("running-minmax"),
            "{err}"
        );
        assert!(serde_json::from_str::<ShapingConfig>(r#"{"kind":"lsc","quantil":0.8}"#).is_err());
    }

    #[test]
    fn config_validate_rejects_bad_values() {
        assert!(ShapingConfig::Lsc { quantile: 1.0 }.validate().is_err());
        assert!(ShapingConfig::Lsc { quantile: 0.0 }.validate().is_err());
        assert!(ShapingConfig::RunningClip { k: -1.0 }.validate().is_err());
        assert!(ShapingConfig::Ceil { ceiling: f64::NAN }
            .validate()
            .is_err());
        let err = ShapingConfig::LengthPenalty {
            coef: -0.01,
            free_len: 300,
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("length-penalty.coef"), "{err}");
        assert!(Shaper::new(ShapingConfig::Lsc { quantile: 2.0 }).is_err());
        assert!(ShapingConfig::Lsc { quantile: 0.85 }.validate().is_ok());
    }

    #[test]
    fn shaper_applies_each_stateless_kind() {
        let rewards = [1.0, 3.0];
        let refs = [1.0, 2.0, 3.0];
        let apply = |c: ShapingConfig, lengths: &[usize]| {
            Shaper::new(c).unwrap().apply(&rewards, &refs, lengths)
        };
        assert_eq!(apply(ShapingConfig::None, &[]).unwrap(), vec![1.0, 3.0]);
        // centered: mean(refs) = 2 → [−1, 1]
        assert_eq!(
            apply(ShapingConfig::Centered, &[]).unwrap(),
            vec![-1.0, 1.0]
        );
        // par(3): (σ(2) + σ(1) + σ(0))/3 = (0.8807970780 + 0.7310585786 + 0.5)/3 = 0.7039518855
        let p = apply(ShapingConfig::Par, &[]).unwrap();
        assert!(close(p[1], 0.703_951_885_535_962_4, 1e-12));
        // lsc: q = 3.0364333895 (see reference_quantile test); log σ(1 − q) = log σ(−2.0364334)
        //      = −2.0364334 − ln(1 + e^−2.0364334) = −2.0364334 − 0.1226541 = −2.1590875
        let l = apply(ShapingConfig::Lsc { quantile: 0.85 }, &[]).unwrap();
        assert!(close(l[0], log_sigmoid(1.0 - 3.036_433_389_493_789), 1e-8));
        assert!(close(l[0], -2.159_087_5, 1e-6));
        assert_eq!(
            apply(ShapingConfig::Ceil { ceiling: 2.0 }, &[]).unwrap(),
            vec![1.0, 2.0]
        );
        // 1 − 0.01·0 = 1; 3 − 0.01·(400 − 300) = 2
        let lp = apply(
            ShapingConfig::LengthPenalty {
                coef: 0.01,
                free_len: 300,
            },
            &[100, 400],
        )
        .unwrap();
        assert!(close(lp[0], 1.0, 1e-15) && close(lp[1], 2.0, 1e-15));
    }

    #[test]
    fn shaper_reports_missing_inputs() {
        let mut par = Shaper::new(ShapingConfig::Par).unwrap();
        assert!(matches!(
            par.apply(&[1.0], &[], &[]),
            Err(ShapingError::NoReferences { .. })
        ));
        let mut lp = Shaper::new(ShapingConfig::LengthPenalty {
            coef: 0.01,
            free_len: 300,
        })
        .unwrap();
        assert!(matches!(
            lp.apply(&[1.0, 2.0], &[], &[5]),
            Err(ShapingError::LengthMismatch {
                expected: 2,
                found: 1,
                ..
            })
        ));
        let mut none = Shaper::new(ShapingConfig::None).unwrap();
        assert!(none.apply(&[f64::NAN], &[], &[]).is_err());
    }

    #[test]
    fn shaper_with_mismatched_checkpoint_state_errors() {
        // A checkpoint whose state does not belong to its config is reported, not silently reset.
        let json = r#"{"config":{"kind":"running-norm"},"state":"stateless"}"#;
        let mut shaper: Shaper = serde_json::from_str(json).unwrap();
        let err = shaper.apply(&[1.0], &[], &[]).unwrap_err();
        assert!(
            matches!(
                err,
                ShapingError::StateMismatch {
                    state: "stateless",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn shaper_running_kinds_update_then_transform() {
        // running-minmax: after [0, 2, 4], 2 ↦ 0.5
        let mut mm = Shaper::new(ShapingConfig::RunningMinMax).unwrap();
        assert_eq!(
            mm.apply(&[0.0, 2.0, 4.0], &[], &[]).unwrap(),
            vec![0.0, 0.5, 1.0]
        );
        // Next group [1]: range still [0, 4] → 0.25
        assert_eq!(mm.apply(&[1.0], &[], &[]).unwrap(), vec![0.25]);

        // running-clip k=1 on [0, 2]: mean 1, std √2 → both inside, unchanged
        let mut clip = Shaper::new(ShapingConfig::RunningClip { k: 1.0 }).unwrap();
        assert_eq!(clip.apply(&[0.0, 2.0], &[], &[]).unwrap(), vec![0.0, 2.0]);
        // then [10]: stats over [0,2,10]: mean 4, std sqrt((16+4+36)/2) = √28 = 5.2915 → 9.2915
        let c = clip.apply(&[10.0], &[], &[]).unwrap();
        assert!(close(c[0], 4.0 + 28f64.sqrt(), 1e-12));

        // running-norm on [1, 3]: mean 2, std √2 → ±1/(√2 + 1e-6)
        let mut norm = Shaper::new(ShapingConfig::RunningNorm).unwrap();
        let n = norm.apply(&[1.0, 3.0], &[], &[]).unwrap();
        assert!(close(n[1], 1.0 / (2f64.sqrt() + STD_EPS), 1e-14));
        assert!(close(n[0], -n[1], 1e-15));
    }
}
