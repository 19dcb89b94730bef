//! Which samples a step trains on: group filters applied between reward and advantage
//! (docs/algorithms.md#sampling-rules). Dropped samples keep their place in the batch with a zero mask, so
//! they contribute nothing to the loss or its normaliser.
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Which samples of a step reach the loss: group filters between reward and advantage, and
/// reference solutions injected into groups (docs/algorithms.md#sampling-rules).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// RED-Drop: treat r ≥ r̄ as positive; when negatives outnumber positives, drop random
    /// negatives until the counts are equal; statistics are recomputed on the kept ones.
    pub red_drop: bool,
    /// Dynamic sampling (DAPO): drop groups whose rewards are all equal (no refill).
    pub filter_zero_std: bool,
    /// TempSamp: replace the last of each group's G samples with the reference solution; its
    /// behaviour log-probs are the current policy's.
    pub inject_ground_truth: bool,
}

/// RED-Drop keep flags for one group's rewards. Draws from `rng` only when it drops.
pub fn red_drop_keep<R: Rng>(rewards: &[f64], rng: &mut R) -> Vec<bool> {
    let n = rewards.len();
    if n == 0 {
        return vec![];
    }
    let mean = rewards.iter().sum::<f64>() / n as f64;
    let positive: Vec<bool> = rewards.iter().map(|&r| r >= mean).collect();
    let n_pos = positive.iter().filter(|&&p| p).count();
    let mut negatives: Vec<usize> = (0..n).filter(|&i| !positive[i]).collect();
    let mut keep = vec![true; n];
    if negatives.len() > n_pos {
        negatives.shuffle(rng);
        for &i in &negatives[n_pos..] {
            keep[i] = false;
        }
    }
    keep
}

/// True when every reward of the group is equal (a zero-variance group).
pub fn is_zero_std(rewards: &[f64]) -> bool {
    rewards.windows(2).all(|w| w[0] == w[1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn red_drop_balances_negatives() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        // mean = 0.25: one positive (r=1 ≥ 0.25), three negatives → keep 1 of them.
        let keep = red_drop_keep(&[1.0, 0.0, 0.0, 0.0], &mut rng);
        assert!(keep[0]);
        assert_eq!(keep.iter().filter(|&&k| k).count(), 2);
        // mean = 0.75: three positives, one negative → nothing dropped.
        assert_eq!(
            red_drop_keep(&[1.0, 1.0, 0.0, 1.0], &mut rng),
            vec![true; 4]
        );
        // all equal: every r ≥ r̄ is positive → nothing dropped.
        assert_eq!(red_drop_keep(&[0.0, 0.0], &mut rng), vec![true; 2]);
    }

    #[test]
    fn zero_std_groups() {
        assert!(is_zero_std(&[1.0, 1.0, 1.0]));
        assert!(is_zero_std(&[0.5]));
        assert!(!is_zero_std(&[1.0, 0.0]));
    }
}
