//! Self-aligned reward (SAR, docs/algorithms.md#sar).
//!
//! From the rollout policy's token log-probs of the answer `a` scored once after the real prompt
//! `q` and once after an empty prompt:
//! R_SA = max((ppl(a) − ppl(a|q)) / ppl(a), −1), total R = R_correct + α·R_SA with α = 0.2.
//! R_SA < 1 always; it is positive when the prompt makes the answer more likely. Training only:
//! evaluation uses correctness alone.
//!
//! Empty or non-finite log-prob sequences are errors (a perplexity of nothing is undefined).
//! The two sequences need not have the same length: the answer may tokenize differently after a
//! prompt; each perplexity is a per-token mean.

use thiserror::Error;

/// Default weight α of the self-aligned term in the total reward.
pub const DEFAULT_SAR_ALPHA: f64 = 0.2;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum SarError {
    #[error("{what}: expected at least one token log-prob, found 0")]
    Empty { what: &'static str },
    #[error("{what}[{index}]: expected a finite log-prob, found {value}")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f64,
    },
}

/// Mean token log-prob, after checking the sequence is non-empty and finite.
fn mean_logprob(what: &'static str, token_logprobs: &[f64]) -> Result<f64, SarError> {
    if token_logprobs.is_empty() {
        return Err(SarError::Empty { what });
    }
    if let Some((index, &value)) = token_logprobs
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite())
    {
        return Err(SarError::NonFinite { what, index, value });
    }
    Ok(token_logprobs.iter().sum::<f64>() / token_logprobs.len() as f64)
}

/// exp(−mean token log-prob).
pub fn perplexity(token_logprobs: &[f64]) -> Result<f64, SarError> {
    Ok((-mean_logprob("perplexity log-probs", token_logprobs)?).exp())
}

/// max((ppl(a) − ppl(a|q)) / ppl(a), −1).
pub fn self_aligned_reward(
    logp_answer_given_q: &[f64],
    logp_answer_alone: &[f64],
) -> Result<f64, SarError> {
    let mean_given_q = mean_logprob("logp_answer_given_q", logp_answer_given_q)?;
    let mean_alone = mean_logprob("logp_answer_alone", logp_answer_alone)?;
    // (ppl(a) − ppl(a|q))/ppl(a) = 1 − ppl(a|q)/ppl(a) = 1 − exp(mean_alone − mean_given_q);
    // the ratio in log space cannot overflow to inf/inf, and an infinite ratio clamps to −1.
    let ratio = (mean_alone - mean_given_q).exp();
    Ok((1.0 - ratio).max(-1.0))
}

/// R_correct + α·R_SA.
pub fn sar_total(r_correct: f64, r_sa: f64, alpha: f64) -> f64 {
    r_correct + alpha * r_sa
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::close;

    #[test]
    fn perplexity_hand_computed() {
        // mean(−0.5, −1.5) = −1 → e^1 = 2.718281828459045
        assert!(close(
            perplexity(&[-0.5, -1.5]).unwrap(),
            std::f64::consts::E,
            1e-15
        ));
        // all log-probs 0 (certain tokens) → ppl 1
        assert_eq!(perplexity(&[0.0, 0.0, 0.0]).unwrap(), 1.0);
        // one token with log-prob −ln 4 (p = 1/4) → ppl 4
        assert!(close(perplexity(&[-(4f64.ln())]).unwrap(), 4.0, 1e-14));
    }

    #[test]
    fn perplexity_rejects_empty_and_non_finite() {
        assert!(matches!(perplexity(&[]), Err(SarError::Empty { .. })));
        assert!(matches!(
            perplexity(&[-1.0, f64::NEG_INFINITY]),
            Err(SarError::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            perplexity(&[f64::NAN]),
            Err(SarError::NonFinite { index: 0, .. })
        ));
    }

    #[test]
    fn sar_positive_when_prompt_helps() {
        // ppl(a|q) = e^1 (mean −1), ppl(a) = e^2 (mean −2):
        // (e² − e)/e² = 1 − e^−1 = 1 − 0.3678794412 = 0.6321205588
        let r = self_aligned_reward(&[-0.5, -1.5], &[-2.0, -2.0, -2.0]).unwrap();
        assert!(close(r, 0.632_120_558_828_557_7, 1e-14));
    }

    #[test]
    fn sar_negative_and_clamped() {
        // ppl(a|q) = e^1.2, ppl(a) = e^1: 1 − e^0.2 = 1 − 1.2214027582 = −0.2214027582
        let r = self_aligned_reward(&[-1.2], &[-1.0]).unwrap();
        assert!(close(r, -0.221_402_758_160_169_8, 1e-14));
        // ppl(a|q) = e^3, ppl(a) = e^1: 1 − e^2 = −6.389 → clamped to −1
        assert_eq!(self_aligned_reward(&[-3.0], &[-1.0]).unwrap(), -1.0);
        // Extreme gap: ratio exp(1000) overflows to inf → still −1, not NaN
        assert_eq!(self_aligned_reward(&[-1001.0], &[-1.0]).unwrap(), -1.0);
        // Equal perplexities → 0
        assert_eq!(self_aligned_reward(&[-0.7, -0.3], &[-0.5]).unwrap(), 0.0);
    }

    #[test]
    fn sar_matches_definition_from_perplexities() {
        let given_q = [-0.2, -0.9, -0.4];
        let alone = [-1.1, -0.6];
        let (pq, pa) = (perplexity(&given_q).unwrap(), perplexity(&alone).unwrap());
        let direct = ((pa - pq) / pa).max(-1.0);
        assert!(close(
            self_aligned_reward(&given_q, &alone).unwrap(),
            direct,
            1e-14
        ));
    }

    #[test]
    fn sar_rejects_empty_inputs() {
        assert!(matches!(
            self_aligned_reward(&[], &[-1.0]),
            Err(SarError::Empty {
                what: "logp_answer_given_q"
            })
        ));
        assert!(matches!(
            self_aligned_reward(&[-1.0], &[]),
            Err(SarError::Empty {
                what: "logp_answer_alone"
            })
        ));
    }

    #[test]
    fn sar_total_hand_computed() {
        // 1 + 0.2·0.6321205588 = 1.1264241118
        assert!(close(
            sar_total(1.0, 0.632_120_558_828_557_7, DEFAULT_SAR_ALPHA),
            1.126_424_111_765_711_4,
            1e-14
        ));
        // 0 + 0.2·(−1) = −0.2
        assert!(close(sar_total(0.0, -1.0, 0.2), -0.2, 1e-15));
        // α = 0 reduces to the correctness reward.
        assert_eq!(sar_total(1.0, -1.0, 0.0), 1.0);
    }
}
