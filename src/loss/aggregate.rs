//! Batch aggregation of per-token losses (docs/algorithms.md#aggregation, "name by arithmetic").
//!
//! Every mode is linear in the per-token losses, so it is expressed as one weight w\[i\]\[t\] per
//! token: loss = Σ w·loss_token and dL/dℓ = w·dloss_token/dℓ. With m the mask, L_i = Σ_t m\[i\]\[t\],
//! N = Σ_i L_i, B⁺ = number of sequences with L_i > 0 and B = all sequences:
//!
//! | mode | w\[i\]\[t\] |
//! |---|---|
//! | `token-mean` | m / N |
//! | `seq-mean-token-mean` | m / (L_i · B⁺) |
//! | `seq-mean-token-sum` | m / B⁺ |
//! | `seq-mean-token-sum-norm` | m / (B · L_max) |
//!
//! Sequences with no valid token drop out of the seq-mean modes (as in verl), while
//! `seq-mean-token-sum-norm` keeps B fixed because its normaliser is meant to be independent of
//! the data (Dr. GRPO). No valid token anywhere gives all-zero weights, never NaN.

use super::config::Aggregation;
use super::LossError;

/// The aggregation weight of every token. `max_len` is required by `seq-mean-token-sum-norm`.
pub fn token_weights(
    agg: Aggregation,
    masks: &[&[f64]],
    max_len: Option<usize>,
) -> Result<Vec<Vec<f64>>, LossError> {
    let lens: Vec<f64> = masks.iter().map(|m| m.iter().sum()).collect();
    let total: f64 = lens.iter().sum();
    let nonempty = lens.iter().filter(|&&l| l > 0.0).count() as f64;
    // Per-sequence scale s_i such that w[i][t] = m[i][t]·s_i.
    let scale: Vec<f64> = match agg {
        Aggregation::TokenMean => lens.iter().map(|_| safe_inv(total)).collect(),
        Aggregation::SeqMeanTokenMean => lens.iter().map(|&l| safe_inv(l * nonempty)).collect(),
        Aggregation::SeqMeanTokenSum => lens.iter().map(|_| safe_inv(nonempty)).collect(),
        Aggregation::SeqMeanTokenSumNorm => {
            let l_max = max_len.ok_or_else(|| LossError::InvalidConfig {
                field: "max_len",
                expected: "set (L_max) when agg = seq-mean-token-sum-norm".into(),
                found: "none".into(),
            })?;
            let denom = masks.len() as f64 * l_max as f64;
            lens.iter().map(|_| safe_inv(denom)).collect()
        }
    };
    Ok(masks
        .iter()
        .zip(scale)
        .map(|(m, s)| m.iter().map(|&mt| mt * s).collect())
        .collect())
}

/// 1/x, or 0 when x is 0 (an empty batch or sequence contributes nothing).
fn safe_inv(x: f64) -> f64 {
    if x > 0.0 {
        1.0 / x
    } else {
        0.0
    }
}

/// Σ w·value over all tokens with the weights of [`token_weights`]. Values under a zero mask are
/// skipped (so NaN padding cannot leak in).
pub fn aggregate(
    agg: Aggregation,
    values: &[&[f64]],
    masks: &[&[f64]],
    max_len: Option<usize>,
) -> Result<f64, LossError> {
    let weights = token_weights(agg, masks, max_len)?;
    Ok(weights
        .iter()
        .zip(values)
        .flat_map(|(w, v)| w.iter().zip(v.iter()))
        .filter(|(&w, _)| w != 0.0)
        .map(|(w, v)| w * v)
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::near;

    // Sequence 0: one token with loss 4; sequence 1: three tokens with losses 1, 2, 3.
    const V0: [f64; 1] = [4.0];
    const V1: [f64; 3] = [1.0, 2.0, 3.0];
    const M0: [f64; 1] = [1.0];
    const M1: [f64; 3] = [1.0, 1.0, 1.0];

    fn agg(mode: Aggregation) -> f64 {
        aggregate(mode, &[&V0, &V1], &[&M0, &M1], Some(5)).expect("aggregate")
    }

    #[test]
    fn four_modes_differ_on_sequences_of_different_lengths() {
        // token-mean: (4 + 1 + 2 + 3) / 4 = 2.5
        assert!(near(agg(Aggregation::TokenMean), 2.5));
        // seq-mean-token-mean: (4/1 + 6/3) / 2 = (4 + 2)/2 = 3
        assert!(near(agg(Aggregation::SeqMeanTokenMean), 3.0));
        // seq-mean-token-sum: (4 + 6) / 2 = 5
        assert!(near(agg(Aggregation::SeqMeanTokenSum), 5.0));
        // seq-mean-token-sum-norm: (4 + 6) / (2·5) = 1
        assert!(near(agg(Aggregation::SeqMeanTokenSumNorm), 1.0));
    }

    #[test]
    fn weights_per_mode() {
        let w = token_weights(Aggregation::SeqMeanTokenMean, &[&M0, &M1], None).expect("w");
        // 1/(1·2) = 0.5 for seq 0; 1/(3·2) = 1/6 for seq 1
        assert!(near(w[0][0], 0.5));
        assert!(w[1].iter().all(|&x| near(x, 1.0 / 6.0)));
    }

    #[test]
    fn masked_tokens_and_empty_sequences() {
        // seq 1 has token 2 masked (value NaN must not leak); seq 2 entirely masked.
        let v1 = [1.0, 2.0, f64::NAN];
        let m1 = [1.0, 1.0, 0.0];
        let v2 = [7.0, 7.0];
        let m2 = [0.0, 0.0];
        let values: [&[f64]; 3] = [&V0, &v1, &v2];
        let masks: [&[f64]; 3] = [&M0, &m1, &m2];
        let a = |mode| aggregate(mode, &values, &masks, Some(4)).expect("aggregate");
        // token-mean: (4 + 1 + 2)/3 = 7/3
        assert!(near(a(Aggregation::TokenMean), 7.0 / 3.0));
        // seq-mean-token-mean over the 2 non-empty sequences: (4 + 1.5)/2 = 2.75
        assert!(near(a(Aggregation::SeqMeanTokenMean), 2.75));
        // seq-mean-token-sum: (4 + 3)/2 = 3.5
        assert!(near(a(Aggregation::SeqMeanTokenSum), 3.5));
        // sum-norm keeps B = 3: 7/(3·4) = 0.58333…
        assert!(near(a(Aggregation::SeqMeanTokenSumNorm), 7.0 / 12.0));
    }

    #[test]
    fn all_masked_gives_zero_not_nan() {
        let m = [0.0, 0.0];
        let v = [f64::NAN, 3.0];
        for mode in Aggregation::ALL {
            let x = aggregate(*mode, &[&v], &[&m], Some(8)).expect("aggregate");
            assert_eq!(x, 0.0, "{mode}");
        }
        assert_eq!(aggregate(Aggregation::TokenMean, &[], &[], None), Ok(0.0));
    }

    #[test]
    fn sum_norm_without_max_len_is_an_error() {
        let err =
            token_weights(Aggregation::SeqMeanTokenSumNorm, &[&M0], None).expect_err("max_len");
        assert!(err.to_string().contains("max_len"), "{err}");
    }
}
