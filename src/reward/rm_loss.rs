//! Reward-model training losses (docs/algorithms.md#reward-model-training), as pure functions of the scalar scores.
//!
//! Pairwise preferences come with a strength m ∈ {1, 2, 3}. With x = r_c − r_r:
//! - `bt`: −log σ(x) = softplus(−x)
//! - `margin-bt`: −log σ(x − m)
//! - `scaled-bt`: −m·log σ(x)
//! - `regression`: squared error to a rating, per response; a pair contributes the mean of its
//!   two responses' errors, so the batch mean is the MSE over responses.
//! - `regression-then-scaled-bt`: regression before `switch_step`, scaled BT from it on (the
//!   best recipe reported).
//!
//! Every loss returns its value and its derivatives with respect to the chosen and rejected
//! scores, so the model code only has to backpropagate two scalars per pair. Everything goes
//! through a stable softplus, finite for any finite score.

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum RmLossError {
    #[error("{what}: expected {expected} values, found {found}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("{what}: expected at least one pair, found 0")]
    Empty { what: &'static str },
    #[error("{what}[{index}]: expected a finite number, found {value}")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f64,
    },
    #[error("pair {index} strength: expected a finite number >= 0, found {found}")]
    InvalidStrength { index: usize, found: f64 },
    #[error("pair {index}: the regression loss needs a {which} rating, found none")]
    MissingRating { index: usize, which: &'static str },
    #[error("regression-then-scaled-bt is a schedule: resolve it with loss_at_step first")]
    Unscheduled,
}

/// Loss value and its derivatives with respect to the chosen and rejected scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLoss {
    pub loss: f64,
    pub d_chosen: f64,
    pub d_rejected: f64,
}

/// Mean loss over a batch and the derivatives of that mean per pair.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLoss {
    pub loss: f64,
    pub d_chosen: Vec<f64>,
    pub d_rejected: Vec<f64>,
}

/// What one preference pair says: its strength m and, for regression, the two ratings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PreferenceLabel {
    pub strength: f64,
    pub chosen_rating: Option<f64>,
    pub rejected_rating: Option<f64>,
}

/// softplus(x) = ln(1 + eˣ), computed as max(x, 0) + ln1p(e^−|x|).
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// −scale·log σ(r_c − r_r − margin) and its gradient.
fn scaled_margin_bt(r_chosen: f64, r_rejected: f64, margin: f64, scale: f64) -> PairLoss {
    let x = r_chosen - r_rejected - margin;
    // d/dx [−log σ(x)] = −(1 − σ(x)) = −σ(−x)
    let d_x = -scale * sigmoid(-x);
    PairLoss {
        loss: scale * softplus(-x),
        d_chosen: d_x,
        d_rejected: -d_x,
    }
}

/// Bradley–Terry: −log σ(r_c − r_r).
pub fn bt_loss(r_chosen: f64, r_rejected: f64) -> PairLoss {
    scaled_margin_bt(r_chosen, r_rejected, 0.0, 1.0)
}

/// Margin BT: −log σ(r_c − r_r − m).
pub fn margin_bt_loss(r_chosen: f64, r_rejected: f64, margin: f64) -> PairLoss {
    scaled_margin_bt(r_chosen, r_rejected, margin, 1.0)
}

/// Scaled BT: −m·log σ(r_c − r_r).
pub fn scaled_bt_loss(r_chosen: f64, r_rejected: f64, strength: f64) -> PairLoss {
    scaled_margin_bt(r_chosen, r_rejected, 0.0, strength)
}

/// (r − rating)² and its derivative 2(r − rating).
pub fn regression_loss(r: f64, rating: f64) -> (f64, f64) {
    let err = r - rating;
    (err * err, 2.0 * err)
}

/// Mean of the two responses' squared errors: ½[(r_c − y_c)² + (r_r − y_r)²].
pub fn pair_regression_loss(
    r_chosen: f64,
    r_rejected: f64,
    chosen_rating: f64,
    rejected_rating: f64,
) -> PairLoss {
    let (loss_c, d_c) = regression_loss(r_chosen, chosen_rating);
    let (loss_r, d_r) = regression_loss(r_rejected, rejected_rating);
    PairLoss {
        loss: 0.5 * (loss_c + loss_r),
        d_chosen: 0.5 * d_c,
        d_rejected: 0.5 * d_r,
    }
}

/// Which reward-model loss to train with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RmLoss {
    #[default]
    Bt,
    MarginBt,
    ScaledBt,
    Regression,
    RegressionThenScaledBt,
}

impl RmLoss {
    /// The loss in force at `step`: `regression-then-scaled-bt` is `regression` for
    /// step < switch_step and `scaled-bt` from then on; every other loss is itself.
    pub fn loss_at_step(self, step: u64, switch_step: u64) -> RmLoss {
        match self {
            RmLoss::RegressionThenScaledBt if step < switch_step => RmLoss::Regression,
            RmLoss::RegressionThenScaledBt => RmLoss::ScaledBt,
            other => other,
        }
    }

    /// Loss of pair `index` (the index only labels errors). The schedule variant must be
    /// resolved with [`Self::loss_at_step`] first.
    pub fn pair_loss(
        self,
        index: usize,
        r_chosen: f64,
        r_rejected: f64,
        label: &PreferenceLabel,
    ) -> Result<PairLoss, RmLossError> {
        let strength = || {
            if label.strength.is_finite() && label.strength >= 0.0 {
                Ok(label.strength)
            } else {
                Err(RmLossError::InvalidStrength {
                    index,
                    found: label.strength,
                })
            }
        };
        let rating = |value: Option<f64>, which: &'static str| match value {
            Some(v) if v.is_finite() => Ok(v),
            Some(v) => Err(RmLossError::NonFinite {
                what: which,
                index,
                value: v,
            }),
            None => Err(RmLossError::MissingRating { index, which }),
        };
        match self {
            RmLoss::Bt => Ok(bt_loss(r_chosen, r_rejected)),
            RmLoss::MarginBt => Ok(margin_bt_loss(r_chosen, r_rejected, strength()?)),
            RmLoss::ScaledBt => Ok(scaled_bt_loss(r_chosen, r_rejected, strength()?)),
            RmLoss::Regression => Ok(pair_regression_loss(
                r_chosen,
                r_rejected,
                rating(label.chosen_rating, "chosen")?,
                rating(label.rejected_rating, "rejected")?,
            )),
            RmLoss::RegressionThenScaledBt => Err(RmLossError::Unscheduled),
        }
    }
}

fn check_pairs(chosen: &[f64], rejected: &[f64]) -> Result<(), RmLossError> {
    if chosen.len() != rejected.len() {
        return Err(RmLossError::LengthMismatch {
            what: "rejected scores (one per chosen score)",
            expected: chosen.len(),
            found: rejected.len(),
        });
    }
    if chosen.is_empty() {
        return Err(RmLossError::Empty {
            what: "preference batch",
        });
    }
    for (what, values) in [("chosen scores", chosen), ("rejected scores", rejected)] {
        if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(RmLossError::NonFinite { what, index, value });
        }
    }
    Ok(())
}

/// Mean loss over a batch of pairs at training `step` (the schedule is resolved here), with
/// the derivatives of the mean (each pair's gradient divided by the batch size).
pub fn batch_loss(
    loss: RmLoss,
    step: u64,
    switch_step: u64,
    chosen: &[f64],
    rejected: &[f64],
    labels: &[PreferenceLabel],
) -> Result<BatchLoss, RmLossError> {
    check_pairs(chosen, rejected)?;
    if labels.len() != chosen.len() {
        return Err(RmLossError::LengthMismatch {
            what: "labels (one per pair)",
            expected: chosen.len(),
            found: labels.len(),
        });
    }
    let active = loss.loss_at_step(step, switch_step);
    let n = chosen.len() as f64;
    let mut out = BatchLoss {
        loss: 0.0,
        d_chosen: Vec::with_capacity(chosen.len()),
        d_rejected: Vec::with_capacity(chosen.len()),
    };
    for (index, ((&c, &r), label)) in chosen.iter().zip(rejected).zip(labels).enumerate() {
        let pair = active.pair_loss(index, c, r, label)?;
        out.loss += pair.loss / n;
        out.d_chosen.push(pair.d_chosen / n);
        out.d_rejected.push(pair.d_rejected / n);
    }
    Ok(out)
}

/// Fraction of pairs scored r_c > r_r; ties count as wrong.
pub fn pairwise_accuracy(chosen: &[f64], rejected: &[f64]) -> Result<f64, RmLossError> {
    check_pairs(chosen, rejected)?;
    let right = chosen.iter().zip(rejected).filter(|(c, r)| c > r).count();
    Ok(right as f64 / chosen.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::close;

    fn label(strength: f64) -> PreferenceLabel {
        PreferenceLabel {
            strength,
            chosen_rating: None,
            rejected_rating: None,
        }
    }

    fn rated(strength: f64, yc: f64, yr: f64) -> PreferenceLabel {
        PreferenceLabel {
            strength,
            chosen_rating: Some(yc),
            rejected_rating: Some(yr),
        }
    }

    // −log σ(1) = ln(1 + e^−1) = ln 1.3678794412 = 0.3132616875
    const NLS_1: f64 = 0.313_261_687_518_222_8;
    // σ(−1) = 1/(1 + e) = 0.2689414214
    const SIG_M1: f64 = 0.268_941_421_369_995_1;

    #[test]
    fn softplus_hand_values_and_stability() {
        assert!(close(softplus(0.0), std::f64::consts::LN_2, 1e-15));
        assert!(close(softplus(-1.0), NLS_1, 1e-15));
        assert_eq!(softplus(1e3), 1e3);
        let tiny = softplus(-1e3); // e^−1000 underflows to 0
        assert!((0.0..1e-300).contains(&tiny));
    }

    #[test]
    fn bt_hand_computed() {
        // x = 1 − 0 = 1: loss ln(1 + e^−1) = 0.3132616875, d_c = −σ(−1) = −0.2689414214
        let l = bt_loss(1.0, 0.0);
        assert!(close(l.loss, NLS_1, 1e-15));
        assert!(close(l.d_chosen, -SIG_M1, 1e-15));
        assert!(close(l.d_rejected, SIG_M1, 1e-15));
        // equal scores: ln 2, ∓0.5
        let e = bt_loss(0.7, 0.7);
        assert!(close(e.loss, std::f64::consts::LN_2, 1e-15));
        assert_eq!((e.d_chosen, e.d_rejected), (-0.5, 0.5));
    }

    #[test]
    fn bt_is_stable_at_large_gaps() {
        // x = −1000: loss = softplus(1000) = 1000, d_c = −σ(1000) = −1
        let bad = bt_loss(-500.0, 500.0);
        assert_eq!(bad.loss, 1000.0);
        assert_eq!(bad.d_chosen, -1.0);
        // x = +1000: loss ≈ 0, d_c ≈ −0, both finite
        let good = bt_loss(500.0, -500.0);
        assert!(good.loss.is_finite() && good.loss < 1e-300);
        assert!(good.d_chosen.is_finite() && good.d_chosen.abs() < 1e-300);
    }

    #[test]
    fn margin_bt_hand_computed_and_reductions() {
        // x = 2 − 0 − 1 = 1 → same as BT at gap 1: 0.3132616875
        let l = margin_bt_loss(2.0, 0.0, 1.0);
        assert!(close(l.loss, NLS_1, 1e-15));
        assert!(close(l.d_chosen, -SIG_M1, 1e-15));
        // m = 0 is plain BT
        assert_eq!(margin_bt_loss(0.3, -0.2, 0.0), bt_loss(0.3, -0.2));
        // a larger margin demands a larger gap: loss grows with m
        assert!(margin_bt_loss(1.0, 0.0, 3.0).loss > margin_bt_loss(1.0, 0.0, 1.0).loss);
    }

    #[test]
    fn scaled_bt_hand_computed_and_reductions() {
        // m = 3, x = 1: 3·0.3132616875 = 0.9397850626, d_c = −3·0.2689414214 = −0.8068242641
        let l = scaled_bt_loss(1.0, 0.0, 3.0);
        assert!(close(l.loss, 3.0 * NLS_1, 1e-14));
        assert!(close(l.loss, 0.939_785_062_554_668_4, 1e-14));
        assert!(close(l.d_chosen, -0.806_824_264_109_985_3, 1e-14));
        assert!(close(l.d_rejected, 0.806_824_264_109_985_3, 1e-14));
        // m = 1 is plain BT
        assert_eq!(scaled_bt_loss(0.3, -0.2, 1.0), bt_loss(0.3, -0.2));
    }

    #[test]
    fn regression_hand_computed() {
        // (0.5 − 2)² = 2.25, derivative 2·(−1.5) = −3
        assert_eq!(regression_loss(0.5, 2.0), (2.25, -3.0));
        // ½[(3 − 4)² + (1 − 0)²] = 1, d_c = 3 − 4 = −1, d_r = 1 − 0 = 1
        let p = pair_regression_loss(3.0, 1.0, 4.0, 0.0);
        assert_eq!((p.loss, p.d_chosen, p.d_rejected), (1.0, -1.0, 1.0));
    }

    /// Central-difference check of d_chosen and d_rejected.
    fn check_gradient(f: impl Fn(f64, f64) -> PairLoss, c: f64, r: f64) {
        let h = 1e-6;
        let analytic = f(c, r);
        let num_c = (f(c + h, r).loss - f(c - h, r).loss) / (2.0 * h);
        let num_r = (f(c, r + h).loss - f(c, r - h).loss) / (2.0 * h);
        assert!(
            close(analytic.d_chosen, num_c, 1e-7),
            "d_chosen at ({c}, {r}): {} vs {num_c}",
            analytic.d_chosen
        );
        assert!(
            close(analytic.d_rejected, num_r, 1e-7),
            "d_rejected at ({c}, {r}): {} vs {num_r}",
            analytic.d_rejected
        );
    }

    #[test]
    fn gradients_match_finite_differences() {
        let points = [
            (0.0, 0.0),
            (1.3, -0.4),
            (-2.0, 1.5),
            (4.0, 3.9),
            (-0.7, -0.2),
        ];
        for (c, r) in points {
            check_gradient(bt_loss, c, r);
            check_gradient(|c, r| margin_bt_loss(c, r, 2.0), c, r);
            check_gradient(|c, r| scaled_bt_loss(c, r, 3.0), c, r);
            check_gradient(|c, r| pair_regression_loss(c, r, 0.8, -0.3), c, r);
        }
    }

    #[test]
    fn batch_loss_hand_computed_mean() {
        // pairs (1, 0) and (0, 0): mean = (0.3132616875 + 0.6931471806)/2 = 0.5032044340
        let b = batch_loss(
            RmLoss::Bt,
            0,
            0,
            &[1.0, 0.0],
            &[0.0, 0.0],
            &[label(1.0), label(1.0)],
        )
        .unwrap();
        assert!(close(b.loss, (NLS_1 + std::f64::consts::LN_2) / 2.0, 1e-15));
        assert!(close(b.loss, 0.503_204_434_039_084_1, 1e-12));
        // gradients of the mean: −0.2689414214/2 = −0.1344707107 and −0.5/2 = −0.25
        assert!(close(b.d_chosen[0], -SIG_M1 / 2.0, 1e-15));
        assert_eq!(b.d_chosen[1], -0.25);
        assert_eq!(b.d_rejected[1], 0.25);
    }

    #[test]
    fn batch_loss_gradient_matches_finite_differences() {
        let chosen = [0.4, -1.0, 2.0];
        let rejected = [0.1, 0.5, 2.5];
        let labels = [
            rated(1.0, 1.0, 0.0),
            rated(2.0, 0.5, 0.2),
            rated(3.0, 2.0, 1.0),
        ];
        for kind in [
            RmLoss::Bt,
            RmLoss::MarginBt,
            RmLoss::ScaledBt,
            RmLoss::Regression,
        ] {
            let b = batch_loss(kind, 0, 0, &chosen, &rejected, &labels).unwrap();
            let h = 1e-6;
            for i in 0..chosen.len() {
                let mut plus = chosen;
                let mut minus = chosen;
                plus[i] += h;
                minus[i] -= h;
                let lp = batch_loss(kind, 0, 0, &plus, &rejected, &labels)
                    .unwrap()
                    .loss;
                let lm = batch_loss(kind, 0, 0, &minus, &rejected, &labels)
                    .unwrap()
                    .loss;
                let numeric = (lp - lm) / (2.0 * h);
                assert!(
                    close(b.d_chosen[i], numeric, 1e-7),
                    "{kind:?} pair {i}: {} vs {numeric}",
                    b.d_chosen[i]
                );
            }
        }
    }

    #[test]
    fn schedule_switches_at_switch_step() {
        let sched = RmLoss::RegressionThenScaledBt;
        assert_eq!(sched.loss_at_step(0, 100), RmLoss::Regression);
        assert_eq!(sched.loss_at_step(99, 100), RmLoss::Regression);
        assert_eq!(sched.loss_at_step(100, 100), RmLoss::ScaledBt);
        assert_eq!(sched.loss_at_step(5, 0), RmLoss::ScaledBt); // switch at 0: never regression
        assert_eq!(RmLoss::MarginBt.loss_at_step(0, 100), RmLoss::MarginBt);
        // The batch function resolves it: before the switch it equals regression.
        let labels = [rated(2.0, 1.0, 0.0)];
        let before = batch_loss(sched, 10, 100, &[0.0], &[0.0], &labels).unwrap();
        // ½[(0 − 1)² + 0²] = 0.5
        assert_eq!(before.loss, 0.5);
        // after: scaled BT with m = 2 at x = 0: 2·ln 2 = 1.3862943611
        let after = batch_loss(sched, 100, 100, &[0.0], &[0.0], &labels).unwrap();
        assert!(close(after.loss, 2.0 * std::f64::consts::LN_2, 1e-15));
        assert_eq!(
            sched.pair_loss(0, 0.0, 0.0, &labels[0]),
            Err(RmLossError::Unscheduled)
        );
    }

    #[test]
    fn rm_loss_serde_names() {
        let names = [
            (RmLoss::Bt, "\"bt\""),
            (RmLoss::MarginBt, "\"margin-bt\""),
            (RmLoss::ScaledBt, "\"scaled-bt\""),
            (RmLoss::Regression, "\"regression\""),
            (
                RmLoss::RegressionThenScaledBt,
                "\"regression-then-scaled-bt\"",
            ),
        ];
        for (kind, json) in names {
            assert_eq!(serde_json::to_string(&kind).unwrap(), json);
            assert_eq!(serde_json::from_str::<RmLoss>(json).unwrap(), kind);
        }
        let err = serde_json::from_str::<RmLoss>("\"btt\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("btt") && err.contains("margin-bt"), "{err}");
    }

    #[test]
    fn batch_loss_input_errors() {
        let l = [label(1.0)];
        assert!(matches!(
            batch_loss(RmLoss::Bt, 0, 0, &[1.0], &[0.0, 1.0], &l),
            Err(RmLossError::LengthMismatch { .. })
        ));
        assert!(matches!(
            batch_loss(RmLoss::Bt, 0, 0, &[1.0], &[0.0], &[]),
            Err(RmLossError::LengthMismatch { .. })
        ));
        assert!(matches!(
            batch_loss(RmLoss::Bt, 0, 0, &[], &[], &[]),
            Err(RmLossError::Empty { .. })
        ));
        assert!(matches!(
            batch_loss(RmLoss::Bt, 0, 0, &[f64::NAN], &[0.0], &l),
            Err(RmLossError::NonFinite { index: 0, .. })
        ));
        assert!(matches!(
            batch_loss(RmLoss::ScaledBt, 0, 0, &[1.0], &[0.0], &[label(-1.0)]),
            Err(RmLossError::InvalidStrength { index: 0, .. })
        ));
        assert!(matches!(
            batch_loss(RmLoss::Regression, 0, 0, &[1.0], &[0.0], &l),
            Err(RmLossError::MissingRating {
                which: "chosen",
                ..
            })
        ));
        // BT ignores the strength, so an odd strength is no error there.
        assert!(batch_loss(RmLoss::Bt, 0, 0, &[1.0], &[0.0], &[label(f64::NAN)]).is_ok());
    }

    #[test]
    fn pairwise_accuracy_hand_computed() {
        // 1 > 0 right, 2 = 2 tie (wrong), 3 < 4 wrong → 1/3
        let acc = pairwise_accuracy(&[1.0, 2.0, 3.0], &[0.0, 2.0, 4.0]).unwrap();
        assert!(close(acc, 1.0 / 3.0, 1e-15));
        assert_eq!(pairwise_accuracy(&[1.0, 2.0], &[0.0, 1.0]).unwrap(), 1.0);
        assert!(pairwise_accuracy(&[], &[]).is_err());
        assert!(pairwise_accuracy(&[1.0], &[]).is_err());
    }
}
