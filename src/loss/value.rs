//! The critic's clipped value loss (PPO; docs/algorithms.md#ppo-with-a-critic-gae).
//!
//! Per token, with V the critic's new value, V_old its value when the batch was scored, R the
//! GAE return and c = `critic.cliprange_value`:
//!
//! ```text
//! V_clip = V_old + clip(V − V_old, −c, c)
//! ℓ_t    = ½·max((V − R)², (V_clip − R)²)
//! ```
//!
//! aggregated over the batch like the policy loss (`loss.agg`, [`super::aggregate::token_weights`]), as verl
//! does. The gradient is ∂ℓ/∂V = V − R where the unclipped term is the larger one or V is
//! inside the clip range, and 0 where the clipped term wins outside it (the clipped value does
//! not move with V there). `vf_clipfrac` is the masked fraction of tokens where the clipped
//! term is strictly larger (verl's `vf_clipfrac`).

use super::aggregate::token_weights;
use super::config::Aggregation;
use super::LossError;

/// The value loss, its gradient with respect to every token's value, and the clip fraction.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueLoss {
    pub loss: f64,
    /// dL/dV per token (0 under a zero mask).
    pub grad: Vec<Vec<f64>>,
    pub clipfrac: f64,
}

/// [`ValueLoss`] of a batch; `values`, `old_values`, `returns` and `masks` have one row per
/// response of equal lengths. `max_len` is what `seq-mean-token-sum-norm` needs.
pub fn value_loss(
    values: &[Vec<f64>],
    old_values: &[Vec<f64>],
    returns: &[Vec<f64>],
    masks: &[Vec<f64>],
    cliprange: f64,
    agg: Aggregation,
    max_len: Option<usize>,
) -> Result<ValueLoss, LossError> {
    if !(cliprange.is_finite() && cliprange > 0.0) {
        return Err(LossError::InvalidConfig {
            field: "critic.cliprange_value",
            expected: "a finite number > 0".into(),
            found: cliprange.to_string(),
        });
    }
    for (seq, m) in masks.iter().enumerate() {
        for (field, row) in [
            ("values", &values[seq]),
            ("old_values", &old_values[seq]),
            ("returns", &returns[seq]),
        ] {
            if row.len() != m.len() {
                return Err(LossError::LengthMismatch {
                    seq,
                    field,
                    found: row.len(),
                    expected: m.len(),
                });
            }
        }
    }
    let mask_refs: Vec<&[f64]> = masks.iter().map(|m| m.as_slice()).collect();
    let weights = token_weights(agg, &mask_refs, max_len)?;
    let (mut loss, mut clipped, mut counted) = (0.0, 0.0, 0.0);
    let mut grad = Vec::with_capacity(masks.len());
    for (i, w) in weights.iter().enumerate() {
        let mut g = vec![0.0; w.len()];
        for t in 0..w.len() {
            if masks[i][t] <= 0.0 {
                continue;
            }
            let (v, v_old, r) = (values[i][t], old_values[i][t], returns[i][t]);
            let v_clip = v_old + (v - v_old).clamp(-cliprange, cliprange);
            let (plain, clip) = ((v - r).powi(2), (v_clip - r).powi(2));
            loss += w[t] * 0.5 * plain.max(clip);
            let inside = (v - v_old).abs() <= cliprange;
            g[t] = if plain >= clip || inside {
                w[t] * (v - r)
            } else {
                0.0
            };
            counted += masks[i][t];
            if clip > plain {
                clipped += masks[i][t];
            }
        }
        grad.push(g);
    }
    Ok(ValueLoss {
        loss,
        grad,
        clipfrac: if counted > 0.0 {
            clipped / counted
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::near;

    #[test]
    fn hand_computed_clipped_value_loss() {
        // c = 0.2, token-mean over 3 tokens (weights 1/3):
        // t0: V 1.0, V_old 0.5, R 0.0 → V_clip 0.7; (1.0)² = 1 vs (0.7)² = 0.49: unclipped,
        //     ℓ = 0.5, grad = (1 − 0)/3.
        // t1: V 0.0, V_old 0.5, R 1.0 → V_clip 0.3; 1 vs 0.49: unclipped, ℓ = 0.5,
        //     grad = (0 − 1)/3.
        // t2: V 0.9, V_old 0.5, R 1.0 → V_clip 0.7; 0.01 vs 0.09: clipped wins (outside the
        //     range), ℓ = 0.045, grad 0.
        // loss = (0.5 + 0.5 + 0.045)/3 = 0.348333…, clipfrac = 1/3.
        let out = value_loss(
            &[vec![1.0, 0.0], vec![0.9]],
            &[vec![0.5, 0.5], vec![0.5]],
            &[vec![0.0, 1.0], vec![1.0]],
            &[vec![1.0, 1.0], vec![1.0]],
            0.2,
            Aggregation::TokenMean,
            None,
        )
        .unwrap();
        assert!(near(out.loss, 1.045 / 3.0), "{}", out.loss);
        assert!(near(out.grad[0][0], 1.0 / 3.0) && near(out.grad[0][1], -1.0 / 3.0));
        assert_eq!(out.grad[1][0], 0.0);
        assert!(near(out.clipfrac, 1.0 / 3.0));
    }

    #[test]
    fn a_wide_clip_range_is_plain_half_squared_error() {
        // Reduction: c large ⇒ ½(V − R)², gradient V − R; seq-mean-token-mean weights.
        // seq 0: (2 − 1)² ·½ = 0.5 and (0 − 0)² = 0 → mean 0.25; seq 1: ½(3 − 1)² = 2.
        // loss = (0.25 + 2)/2 = 1.125.
        let v = vec![vec![2.0, 0.0], vec![3.0]];
        let out = value_loss(
            &v,
            &[vec![0.0, 0.0], vec![0.0]],
            &[vec![1.0, 0.0], vec![1.0]],
            &[vec![1.0, 1.0], vec![1.0]],
            1e9,
            Aggregation::SeqMeanTokenMean,
            None,
        )
        .unwrap();
        assert!(near(out.loss, 1.125), "{}", out.loss);
        assert!(near(out.grad[0][0], 0.25) && near(out.grad[1][0], 1.0));
        assert_eq!(out.clipfrac, 0.0);
    }

    #[test]
    fn masked_tokens_and_bad_inputs() {
        let out = value_loss(
            &[vec![5.0, f64::NAN]],
            &[vec![5.0, 0.0]],
            &[vec![4.0, 0.0]],
            &[vec![1.0, 0.0]],
            0.5,
            Aggregation::TokenMean,
            None,
        )
        .unwrap();
        assert!(near(out.loss, 0.5) && out.grad[0][1] == 0.0);
        let e = value_loss(
            &[vec![1.0]],
            &[vec![1.0]],
            &[vec![1.0]],
            &[vec![1.0]],
            0.0,
            Aggregation::TokenMean,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("critic.cliprange_value"), "{e}");
        let e = value_loss(
            &[vec![1.0]],
            &[vec![1.0]],
            &[vec![]],
            &[vec![1.0]],
            0.5,
            Aggregation::TokenMean,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("returns"), "{e}");
    }
}
