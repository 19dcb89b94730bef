//! Noisy-verifier tools (docs/algorithms.md#noisy-verifiers).
//!
//! Noise model: ρ₀ = P(observed 1 | truly 0) (false positive), ρ₁ = P(observed 0 | truly 1)
//! (false negative), ρ₀ + ρ₁ < 1.
//!
//! - [`NoiseInjector`]: for experiments, turns a clean binary reward into a noisy observed one
//!   with the given ρ₀, ρ₁ (seeded; exactly one uniform draw per call, so the random stream does
//!   not depend on the rewards).
//! - [`AppealsEstimator`]: online estimate of ρ₁. Each rule-negative is sent to a second
//!   verifier with probability q = 0.1; FN̂ = flips/q; ρ̂₁ = (FN̂ + 1e-5)/(FN̂ + #positives + 2e-5),
//!   smoothed by an EMA with decay 0.9. The formula counts observed positives as true positives,
//!   so it is unbiased only when ρ₀ ≈ 0.
//!
//! Both serialise (seed and stream position, not the generator's internals), so a resumed run
//! draws the same numbers as an uninterrupted one.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Default probability of appealing a rule-negative.
pub const DEFAULT_APPEAL_PROB: f64 = 0.1;
/// Default EMA decay of the ρ₁ estimate.
pub const DEFAULT_APPEAL_DECAY: f64 = 0.9;
/// Additive smoothing in the numerator of ρ̂₁ (the denominator uses twice this).
const APPEAL_SMOOTHING: f64 = 1e-5;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum NoiseError {
    #[error("{field}: expected a value in [0, 1), found {found}")]
    RateOutOfRange { field: &'static str, found: f64 },
    #[error("rho0 + rho1: expected < 1 (otherwise the observed reward carries no signal), found {found}")]
    RatesTooLarge { found: f64 },
    #[error("clean reward: expected 0 or 1, found {found}")]
    NotBinary { found: f64 },
    #[error("{field}: expected {expected}, found {found}")]
    InvalidParameter {
        field: &'static str,
        expected: &'static str,
        found: f64,
    },
}

fn check_rate(field: &'static str, rate: f64) -> Result<(), NoiseError> {
    if (0.0..1.0).contains(&rate) {
        Ok(())
    } else {
        Err(NoiseError::RateOutOfRange { field, found: rate })
    }
}

/// Seeded generator positioned `word_pos` 32-bit words into its stream.
fn rng_at(seed: u64, word_pos: u128) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_word_pos(word_pos);
    rng
}

/// Flips clean binary rewards with false-positive rate ρ₀ and false-negative rate ρ₁.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "NoiseInjectorState", into = "NoiseInjectorState")]
pub struct NoiseInjector {
    rho0: f64,
    rho1: f64,
    seed: u64,
    rng: ChaCha8Rng,
}

/// Serialised form of [`NoiseInjector`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoiseInjectorState {
    pub rho0: f64,
    pub rho1: f64,
    pub seed: u64,
    pub word_pos: u128,
}

impl NoiseInjector {
    /// ρ₀, ρ₁ each in [0, 1) with ρ₀ + ρ₁ < 1.
    pub fn new(rho0: f64, rho1: f64, seed: u64) -> Result<Self, NoiseError> {
        check_rate("rho0", rho0)?;
        check_rate("rho1", rho1)?;
        if rho0 + rho1 >= 1.0 {
            return Err(NoiseError::RatesTooLarge { found: rho0 + rho1 });
        }
        Ok(Self {
            rho0,
            rho1,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    pub fn rho0(&self) -> f64 {
        self.rho0
    }

    pub fn rho1(&self) -> f64 {
        self.rho1
    }

    /// The observed reward for a clean reward (0 or 1): 1 → 0 with probability ρ₁,
    /// 0 → 1 with probability ρ₀, otherwise unchanged.
    pub fn flip(&mut self, clean: f64) -> Result<f64, NoiseError> {
        let flip_prob = if clean == 1.0 {
            self.rho1
        } else if clean == 0.0 {
            self.rho0
        } else {
            return Err(NoiseError::NotBinary { found: clean });
        };
        let u: f64 = self.rng.gen();
        Ok(if u < flip_prob { 1.0 - clean } else { clean })
    }

    /// [`Self::flip`] over a batch; on a non-binary value nothing is drawn.
    pub fn flip_all(&mut self, clean: &[f64]) -> Result<Vec<f64>, NoiseError> {
        if let Some(&bad) = clean.iter().find(|&&c| c != 0.0 && c != 1.0) {
            return Err(NoiseError::NotBinary { found: bad });
        }
        clean.iter().map(|&c| self.flip(c)).collect()
    }
}

impl From<NoiseInjector> for NoiseInjectorState {
    fn from(injector: NoiseInjector) -> Self {
        Self {
            rho0: injector.rho0,
            rho1: injector.rho1,
            seed: injector.seed,
            word_pos: injector.rng.get_word_pos(),
        }
    }
}

impl TryFrom<NoiseInjectorState> for NoiseInjector {
    type Error = NoiseError;
    fn try_from(state: NoiseInjectorState) -> Result<Self, NoiseError> {
        let mut injector = NoiseInjector::new(state.rho0, state.rho1, state.seed)?;
        injector.rng = rng_at(state.seed, state.word_pos);
        Ok(injector)
    }
}

/// Online estimate of the false-negative rate ρ₁ from appeals to a second verifier.
///
/// EMA initialisation: the first informative batch sets the estimate to its own ρ̂₁ (no pull
/// toward an arbitrary prior); later batches give ema ← decay·ema + (1 − decay)·ρ̂₁.
/// **Decision:** a batch with no positives and no flips carries no information (its ρ̂₁ would be
/// the smoothing's 1e-5/2e-5 = 0.5), so it leaves the EMA unchanged; `update` then returns the
/// current estimate, or 0.5 if there is none yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "AppealsEstimatorState", into = "AppealsEstimatorState")]
pub struct AppealsEstimator {
    appeal_prob: f64,
    decay: f64,
    ema: Option<f64>,
    seed: u64,
    rng: ChaCha8Rng,
}

/// Serialised form of [`AppealsEstimator`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppealsEstimatorState {
    pub appeal_prob: f64,
    pub decay: f64,
    pub ema: Option<f64>,
    pub seed: u64,
    pub word_pos: u128,
}

/// One batch's ρ̂₁ = (FN̂ + 1e-5)/(FN̂ + #positives + 2e-5), FN̂ = flips/q.
pub fn appeal_rho1_estimate(n_positives: usize, n_flips: usize, appeal_prob: f64) -> f64 {
    let fn_hat = n_flips as f64 / appeal_prob;
    (fn_hat + APPEAL_SMOOTHING) / (fn_hat + n_positives as f64 + 2.0 * APPEAL_SMOOTHING)
}

impl AppealsEstimator {
    /// `appeal_prob` (q) in (0, 1], `decay` in [0, 1).
    pub fn new(appeal_prob: f64, decay: f64, seed: u64) -> Result<Self, NoiseError> {
        if !(appeal_prob > 0.0 && appeal_prob <= 1.0) {
            return Err(NoiseError::InvalidParameter {
                field: "appeal_prob",
                expected: "a value in (0, 1]",
                found: appeal_prob,
            });
        }
        if !(0.0..1.0).contains(&decay) {
            return Err(NoiseError::InvalidParameter {
                field: "decay",
                expected: "a value in [0, 1)",
                found: decay,
            });
        }
        Ok(Self {
            appeal_prob,
            decay,
            ema: None,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// q = 0.1, decay 0.9.
    pub fn with_defaults(seed: u64) -> Self {
        Self {
            appeal_prob: DEFAULT_APPEAL_PROB,
            decay: DEFAULT_APPEAL_DECAY,
            ema: None,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Whether to send this rule-negative to the second verifier (probability q, seeded).
    pub fn should_appeal(&mut self) -> bool {
        self.rng.gen::<f64>() < self.appeal_prob
    }

    /// Folds in one batch: `n_positives` rule-positives and `n_flips` appealed negatives that
    /// the second verifier judged correct. Returns the EMA estimate of ρ₁.
    pub fn update(&mut self, n_positives: usize, n_flips: usize) -> f64 {
        let batch = appeal_rho1_estimate(n_positives, n_flips, self.appeal_prob);
        if n_positives == 0 && n_flips == 0 {
            return self.ema.unwrap_or(batch);
        }
        let ema = crate::advantage::noisy::ema_update(self.ema, batch, self.decay);
        self.ema = Some(ema);
        ema
    }

    /// Current EMA estimate; `None` before any informative batch.
    pub fn estimate(&self) -> Option<f64> {
        self.ema
    }
}

impl From<AppealsEstimator> for AppealsEstimatorState {
    fn from(est: AppealsEstimator) -> Self {
        Self {
            appeal_prob: est.appeal_prob,
            decay: est.decay,
            ema: est.ema,
            seed: est.seed,
            word_pos: est.rng.get_word_pos(),
        }
    }
}

impl TryFrom<AppealsEstimatorState> for AppealsEstimator {
    type Error = NoiseError;
    fn try_from(state: AppealsEstimatorState) -> Result<Self, NoiseError> {
        let mut est = AppealsEstimator::new(state.appeal_prob, state.decay, state.seed)?;
        est.ema = state.ema;
        est.rng = rng_at(state.seed, state.word_pos);
        Ok(est)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injector_validates_rates() {
        assert!(NoiseInjector::new(0.1, 0.2, 0).is_ok());
        assert!(NoiseInjector::new(0.0, 0.0, 0).is_ok());
        assert!(matches!(
            NoiseInjector::new(1.0, 0.0, 0),
            Err(NoiseError::RateOutOfRange { field: "rho0", .. })
        ));
        assert!(matches!(
            NoiseInjector::new(0.0, -0.1, 0),
            Err(NoiseError::RateOutOfRange { field: "rho1", .. })
        ));
        assert!(NoiseInjector::new(f64::NAN, 0.0, 0).is_err());
        // 0.5 + 0.5 = 1 is not < 1
        assert!(matches!(
            NoiseInjector::new(0.5, 0.5, 0),
            Err(NoiseError::RatesTooLarge { .. })
        ));
    }

    #[test]
    fn injector_flip_rates_over_100k_draws() {
        // ρ₀ = 0.1, ρ₁ = 0.2; std of a rate over 1e5 draws ≤ sqrt(0.2·0.8/1e5) = 0.0013,
        // tolerance 0.005 (≈ 4 std).
        let mut injector = NoiseInjector::new(0.1, 0.2, 7).unwrap();
        let n = 100_000;
        let false_neg = (0..n)
            .filter(|_| injector.flip(1.0).unwrap() == 0.0)
            .count() as f64
            / n as f64;
        let false_pos = (0..n)
            .filter(|_| injector.flip(0.0).unwrap() == 1.0)
            .count() as f64
            / n as f64;
        assert!(
            (false_neg - 0.2).abs() < 0.005,
            "false-negative rate {false_neg}"
        );
        assert!(
            (false_pos - 0.1).abs() < 0.005,
            "false-positive rate {false_pos}"
        );
    }

    #[test]
    fn injector_zero_rates_is_identity_and_rejects_non_binary() {
        let mut injector = NoiseInjector::new(0.0, 0.0, 3).unwrap();
        let clean = [1.0, 0.0, 1.0, 1.0, 0.0];
        assert_eq!(injector.flip_all(&clean).unwrap(), clean.to_vec());
        assert!(matches!(
            injector.flip(0.5),
            Err(NoiseError::NotBinary { .. })
        ));
        assert!(injector.flip_all(&[1.0, f64::NAN]).is_err());
    }

    #[test]
    fn injector_is_seeded_and_resumes_exactly() {
        let clean: Vec<f64> = (0..200).map(|i| (i % 2) as f64).collect();
        let mut a = NoiseInjector::new(0.3, 0.3, 11).unwrap();
        let mut b = NoiseInjector::new(0.3, 0.3, 11).unwrap();
        let mut c = NoiseInjector::new(0.3, 0.3, 12).unwrap();
        let first_a = a.flip_all(&clean).unwrap();
        assert_eq!(first_a, b.flip_all(&clean).unwrap());
        assert_ne!(first_a, c.flip_all(&clean).unwrap());
        // Checkpoint a mid-stream, resume, and continue identically.
        let json = serde_json::to_string(&a).unwrap();
        let mut resumed: NoiseInjector = serde_json::from_str(&json).unwrap();
        assert_eq!(
            a.flip_all(&clean).unwrap(),
            resumed.flip_all(&clean).unwrap()
        );
        // A checkpoint with invalid rates is rejected on load.
        let bad = r#"{"rho0":0.7,"rho1":0.7,"seed":1,"word_pos":0}"#;
        assert!(serde_json::from_str::<NoiseInjector>(bad).is_err());
    }

    #[test]
    fn appeals_single_updates_hand_computed() {
        let mut est = AppealsEstimator::with_defaults(0);
        assert_eq!(est.estimate(), None);
        // q = 0.1, 90 positives, 1 flip: FN̂ = 10; ρ̂ = 10.00001/100.00002 = 0.10000007999998
        // First batch initialises the EMA to ρ̂.
        let first = est.update(90, 1);
        assert!((first - 10.00001 / 100.00002).abs() < 1e-15);
        assert!((first - 0.100_000_08).abs() < 1e-12);
        // 80 positives, 2 flips: FN̂ = 20; ρ̂ = 20.00001/100.00002 = 0.20000005999999
        // EMA = 0.9·0.10000008 + 0.1·0.20000006 = 0.090000072 + 0.020000006 = 0.110000078
        let second = est.update(80, 2);
        assert!((second - 0.110_000_078).abs() < 1e-12, "{second}");
        assert_eq!(est.estimate(), Some(second));
    }

    #[test]
    fn appeals_batch_estimate_edge_cases() {
        // No flips, 50 positives: 1e-5/(50 + 2e-5) ≈ 2e-7
        assert!((appeal_rho1_estimate(50, 0, 0.1) - 1e-5 / 50.00002).abs() < 1e-20);
        // Only flips (no positives): (10 + 1e-5)/(10 + 2e-5) ≈ 1 − 1e-6
        assert!((appeal_rho1_estimate(0, 1, 0.1) - 10.00001 / 10.00002).abs() < 1e-15);
        // Empty batch does not move the EMA.
        let mut est = AppealsEstimator::with_defaults(0);
        assert_eq!(est.update(0, 0), 0.5); // nothing yet: the smoothing's 0.5, not stored
        assert_eq!(est.estimate(), None);
        let v = est.update(90, 1);
        assert_eq!(est.update(0, 0), v);
    }

    #[test]
    fn appeals_validates_parameters() {
        assert!(AppealsEstimator::new(0.0, 0.9, 0).is_err());
        assert!(AppealsEstimator::new(1.5, 0.9, 0).is_err());
        assert!(AppealsEstimator::new(0.1, 1.0, 0).is_err());
        assert!(AppealsEstimator::new(1.0, 0.0, 0).is_ok());
    }

    #[test]
    fn should_appeal_rate_and_determinism() {
        // q = 0.1 over 1e5 draws: std sqrt(0.09/1e5) = 0.00095, tolerance 0.004.
        let mut est = AppealsEstimator::with_defaults(5);
        let n = 100_000;
        let rate = (0..n).filter(|_| est.should_appeal()).count() as f64 / n as f64;
        assert!((rate - 0.1).abs() < 0.004, "appeal rate {rate}");
        let draws = |seed| {
            let mut e = AppealsEstimator::with_defaults(seed);
            (0..64).map(|_| e.should_appeal()).collect::<Vec<_>>()
        };
        assert_eq!(draws(9), draws(9));
        // Resume mid-stream draws the same appeals.
        let mut a = AppealsEstimator::with_defaults(9);
        a.update(10, 1);
        (0..17).for_each(|_| {
            a.should_appeal();
        });
        let mut b: AppealsEstimator =
            serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(a.estimate(), b.estimate());
        let next_a: Vec<bool> = (0..64).map(|_| a.should_appeal()).collect();
        let next_b: Vec<bool> = (0..64).map(|_| b.should_appeal()).collect();
        assert_eq!(next_a, next_b);
    }

    #[test]
    fn appeals_estimate_converges_to_true_rho1() {
        // Synthetic run: clean rewards Bernoulli(0.5), observed through an injector with
        // ρ₀ = 0, ρ₁ = 0.2; a perfect second verifier (the clean reward) judges appeals.
        // 1024 samples a batch: per-batch ρ̂ has std ≈ 0.05, the decay-0.9 EMA ≈ 0.05·sqrt(0.1/1.9)
        // ≈ 0.012. Tolerances: final EMA within 0.04, mean EMA over the last 300 batches within
        // 0.015 of 0.2.
        let mut data_rng = ChaCha8Rng::seed_from_u64(2024);
        let mut injector = NoiseInjector::new(0.0, 0.2, 1).unwrap();
        let mut est = AppealsEstimator::with_defaults(2);
        let mut history = Vec::new();
        for _ in 0..400 {
            let (mut positives, mut flips) = (0, 0);
            for _ in 0..1024 {
                let clean = if data_rng.gen::<f64>() < 0.5 {
                    1.0
                } else {
                    0.0
                };
                if injector.flip(clean).unwrap() == 1.0 {
                    positives += 1;
                } else if est.should_appeal() && clean == 1.0 {
                    flips += 1;
                }
            }
            history.push(est.update(positives, flips));
        }
        let last = *history.last().unwrap();
        let tail_mean = history[100..].iter().sum::<f64>() / 300.0;
        assert!((last - 0.2).abs() < 0.04, "final estimate {last}");
        assert!((tail_mean - 0.2).abs() < 0.015, "mean estimate {tail_mean}");
    }
}
