//! eva's creator (Ye et al. 2024, "Evolving Alignment via Asymmetric Self-Play"): the pure
//! rules of one creator round. A prompt's informativeness is read from its group's rewards
//! (max − min by default), min-max normalised over the round's prompts, a fraction of them
//! drawn without replacement with probability proportional to it, and each drawn prompt evolved
//! into new ones that join the originals (docs/algorithms.md#sampling-rules). The prompt pool these rules
//! act on is `task::eva_pool`.
use rand::Rng;
use serde::{Deserialize, Serialize};

/// How much a prompt's group of rewards says about what the policy still has to learn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Informativeness {
    /// max − min reward (eva's default).
    #[default]
    MaxMin,
    /// Population variance of the rewards.
    Variance,
    /// max − mean reward.
    MaxMean,
}

impl Informativeness {
    /// The name in configs.
    pub fn name(self) -> &'static str {
        match self {
            Informativeness::MaxMin => "max-min",
            Informativeness::Variance => "variance",
            Informativeness::MaxMean => "max-mean",
        }
    }
}

/// `[sampling.eva]`: a finite prompt pool that eva's creator grows. Off (`pool_size = 0`) the
/// task draws a fresh prompt for every group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaConfig {
    /// Prompts drawn once from the task (with the run seed) as the initial pool; every batch
    /// then draws its prompts uniformly from the pool. 0 (default): no pool.
    pub pool_size: usize,
    /// A creator round after every this many RL steps (its new prompts join the pool for the
    /// following steps). 0: the pool stays as drawn (a fixed prompt set). Default 10.
    pub every: usize,
    /// "max-min" (default), "variance" or "max-mean" of a prompt's group rewards.
    pub informativeness: Informativeness,
    /// Fraction of the prompts seen since the previous round that a round evolves, drawn
    /// weighted by min-max normalised informativeness. Default 0.25.
    pub select_fraction: f64,
    /// New prompts evolved from each selected prompt. Default 4.
    pub children: usize,
    /// Text datasets: the model that writes the evolved prompts: "policy" (default, the
    /// current policy) or the path of a second model (anything `model.source` takes).
    pub generator: String,
    /// Text datasets: the instruction the generator gets, `{prompt}` standing for the
    /// selected prompt's question; rendered with the generator's chat template when it has one.
    pub generator_template: String,
    /// Text datasets: tokens a generated prompt may have; a generation cut off here is
    /// rejected as too long. Default 128.
    pub generator_max_tokens: usize,
}

/// Where [`EvaConfig::generator_template`] puts the selected prompt's question.
pub const GENERATOR_PROMPT: &str = "{prompt}";

/// The default [`EvaConfig::generator_template`].
pub const DEFAULT_GENERATOR_TEMPLATE: &str = "Write a new problem that is a harder variant of \
     this one, and reply with the new problem only. The problem: {prompt}";

impl Default for EvaConfig {
    fn default() -> Self {
        EvaConfig {
            pool_size: 0,
            every: 10,
            informativeness: Informativeness::MaxMin,
            select_fraction: 0.25,
            children: 4,
            generator: "policy".into(),
            generator_template: DEFAULT_GENERATOR_TEMPLATE.into(),
            generator_max_tokens: 128,
        }
    }
}

impl EvaConfig {
    pub fn enabled(&self) -> bool {
        self.pool_size > 0
    }

    /// Values that cannot mean anything.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        if !(self.select_fraction > 0.0 && self.select_fraction <= 1.0) {
            return Err(format!(
                "sampling.eva.select_fraction must be in (0, 1], found {}",
                self.select_fraction
            ));
        }
        if self.every > 0 && self.children == 0 {
            return Err(
                "sampling.eva.children must be positive when sampling.eva.every > 0 (a round \
                 that evolves nothing; set every = 0 for a fixed prompt pool)"
                    .into(),
            );
        }
        if !self.generator_template.contains(GENERATOR_PROMPT) {
            return Err(format!(
                "sampling.eva.generator_template must contain {GENERATOR_PROMPT} (where the \
                 selected prompt goes), found {:?}",
                self.generator_template
            ));
        }
        if self.generator_max_tokens == 0 {
            return Err("sampling.eva.generator_max_tokens must be positive, found 0".into());
        }
        if self.generator.trim().is_empty() {
            return Err(
                "sampling.eva.generator must be \"policy\" or the path of a model, found \"\""
                    .into(),
            );
        }
        Ok(())
    }

    /// The second model that writes evolved text prompts; None: the policy writes them.
    pub fn generator_model(&self) -> Option<&str> {
        (self.generator != "policy").then_some(self.generator.as_str())
    }
}

/// The informativeness of one prompt's group of rewards (0 for an empty group).
pub fn informativeness(kind: Informativeness, rewards: &[f64]) -> f64 {
    if rewards.is_empty() {
        return 0.0;
    }
    let max = rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = rewards.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
    match kind {
        Informativeness::MaxMin => max - min,
        Informativeness::MaxMean => max - mean,
        Informativeness::Variance => {
            rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rewards.len() as f64
        }
    }
}

/// (x − min) / (max − min) for each x. When every value is equal (no prompt stands out, e.g.
/// all groups solved) every weight is 1: the round then picks uniformly. **Decision.**
pub fn min_max_normalise(xs: &[f64]) -> Vec<f64> {
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    if xs.is_empty() || max <= min {
        return vec![1.0; xs.len()];
    }
    xs.iter().map(|x| (x - min) / (max - min)).collect()
}

/// How many of `n` prompts a round selects: ⌈fraction · n⌉ (at least one of a non-empty set).
pub fn select_count(n: usize, fraction: f64) -> usize {
    ((n as f64 * fraction).ceil() as usize).min(n)
}

/// `k` distinct indices drawn one after another, each with probability proportional to its
/// weight among those not drawn yet (successive sampling without replacement). Indices of
/// weight 0 are never drawn, so fewer than `k` come back when fewer weights are positive.
/// Returned in draw order; draws one uniform number from `rng` per index drawn.
pub fn weighted_sample<R: Rng>(weights: &[f64], k: usize, rng: &mut R) -> Vec<usize> {
    let mut left: Vec<f64> = weights
        .iter()
        .map(|&w| if w.is_finite() && w > 0.0 { w } else { 0.0 })
        .collect();
    let mut out = Vec::with_capacity(k);
    while out.len() < k {
        let total: f64 = left.iter().sum();
        if total <= 0.0 {
            break;
        }
        let u = rng.gen::<f64>() * total;
        let mut acc = 0.0;
        // The last positive weight takes any rounding remainder.
        let mut pick = left.iter().rposition(|&w| w > 0.0).unwrap_or(0);
        for (i, &w) in left.iter().enumerate() {
            acc += w;
            if w > 0.0 && u < acc {
                pick = i;
                break;
            }
        }
        out.push(pick);
        left[pick] = 0.0;
    }
    out
}

/// The new pool after a round: the current prompts in order, then each evolved prompt not
/// already present (by key), in the order given. Returns how many were added.
pub fn mix_into<T, K: Eq + std::hash::Hash>(
    pool: &mut Vec<T>,
    evolved: Vec<T>,
    key: impl Fn(&T) -> K,
) -> usize {
    let mut seen: std::collections::HashSet<K> = pool.iter().map(&key).collect();
    let before = pool.len();
    for e in evolved {
        if seen.insert(key(&e)) {
            pool.push(e);
        }
    }
    pool.len() - before
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::near;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn informativeness_by_hand() {
        let r = [1.0, 0.0, 0.0, 0.0];
        // max − min = 1; mean = 0.25, max − mean = 0.75;
        // variance = (0.75² + 3·0.25²)/4 = (0.5625 + 0.1875)/4 = 0.1875
        assert_eq!(informativeness(Informativeness::MaxMin, &r), 1.0);
        assert_eq!(informativeness(Informativeness::MaxMean, &r), 0.75);
        assert!(near(informativeness(Informativeness::Variance, &r), 0.1875));
        // an all-equal group tells nothing, whatever the rule
        for kind in [
            Informativeness::MaxMin,
            Informativeness::MaxMean,
            Informativeness::Variance,
        ] {
            assert_eq!(informativeness(kind, &[0.5, 0.5, 0.5]), 0.0);
            assert_eq!(informativeness(kind, &[]), 0.0);
        }
        // graded rewards: [0.2, 0.8, 0.5]: max − min = 0.6, mean 0.5, max − mean = 0.3,
        // variance = (0.09 + 0.09 + 0)/3 = 0.06
        let g = [0.2, 0.8, 0.5];
        assert!(near(informativeness(Informativeness::MaxMin, &g), 0.6));
        assert!(near(informativeness(Informativeness::MaxMean, &g), 0.3));
        assert!(near(informativeness(Informativeness::Variance, &g), 0.06));
    }

    #[test]
    fn min_max_normalisation_by_hand() {
        assert_eq!(min_max_normalise(&[0.0, 0.5, 1.0]), vec![0.0, 0.5, 1.0]);
        // [2, 4, 3]: min 2, max 4 ⇒ [0, 1, 0.5]
        assert_eq!(min_max_normalise(&[2.0, 4.0, 3.0]), vec![0.0, 1.0, 0.5]);
        // all equal: uniform weights
        assert_eq!(min_max_normalise(&[0.0, 0.0, 0.0]), vec![1.0; 3]);
        assert_eq!(min_max_normalise(&[0.3]), vec![1.0]);
        assert!(min_max_normalise(&[]).is_empty());
    }

    #[test]
    fn select_count_is_the_ceiling_of_the_fraction() {
        assert_eq!(select_count(8, 0.25), 2);
        assert_eq!(select_count(9, 0.25), 3); // 2.25 ⇒ 3
        assert_eq!(select_count(1, 0.25), 1);
        assert_eq!(select_count(0, 0.25), 0);
        assert_eq!(select_count(5, 1.0), 5);
    }

    #[test]
    fn weighted_sample_never_draws_zero_weights_and_draws_each_index_once() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        // one positive weight: it is the only draw, even when more are asked for
        assert_eq!(weighted_sample(&[0.0, 1.0, 0.0, 0.0], 3, &mut rng), vec![1]);
        // two positive weights, two draws: both, in some order
        let mut got = weighted_sample(&[0.0, 0.3, 0.0, 0.7], 2, &mut rng);
        got.sort_unstable();
        assert_eq!(got, vec![1, 3]);
        // all positive, k = n: a permutation
        let mut got = weighted_sample(&[0.1, 0.2, 0.3, 0.4, 0.5], 5, &mut rng);
        got.sort_unstable();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert!(weighted_sample(&[0.0, 0.0], 1, &mut rng).is_empty());
        assert!(weighted_sample(&[f64::NAN, -1.0], 1, &mut rng).is_empty());
    }

    /// The first draw picks i with probability w_i / Σw; the second, given the first was j,
    /// w_i / (Σw − w_j). For w = [1, 2, 3] (Σ = 6) the chance that index 0 is among two draws
    /// is 1 − P(first two are 1 and 2 in either order)
    /// = 1 − (2/6 · 3/4 + 3/6 · 2/3) = 1 − (1/4 + 1/3) = 5/12.
    #[test]
    fn weighted_sample_frequencies_match_the_hand_computed_probabilities() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let trials = 60_000;
        let (mut first, mut zero_in_two) = ([0usize; 3], 0usize);
        for _ in 0..trials {
            let d = weighted_sample(&[1.0, 2.0, 3.0], 2, &mut rng);
            first[d[0]] += 1;
            zero_in_two += usize::from(d.contains(&0));
        }
        let f = |c: usize| c as f64 / trials as f64;
        // 3 sd of a binomial frequency at these sizes is under 0.006
        assert!((f(first[0]) - 1.0 / 6.0).abs() < 0.006, "{first:?}");
        assert!((f(first[1]) - 2.0 / 6.0).abs() < 0.006, "{first:?}");
        assert!((f(first[2]) - 3.0 / 6.0).abs() < 0.006, "{first:?}");
        assert!((f(zero_in_two) - 5.0 / 12.0).abs() < 0.006, "{zero_in_two}");
    }

    #[test]
    fn weighted_sample_is_reproducible_from_the_seed() {
        let w = [0.2, 0.0, 1.0, 0.5, 0.7, 0.1];
        let a = weighted_sample(&w, 3, &mut ChaCha8Rng::seed_from_u64(3));
        let b = weighted_sample(&w, 3, &mut ChaCha8Rng::seed_from_u64(3));
        assert_eq!(a, b);
        assert_eq!(a.len(), 3);
        assert!(!a.contains(&1));
    }

    #[test]
    fn mixing_keeps_the_originals_and_adds_new_prompts_once() {
        let mut pool = vec!["a", "b"];
        let added = mix_into(&mut pool, vec!["c", "a", "c", "d"], |s| *s);
        assert_eq!(added, 2);
        assert_eq!(pool, vec!["a", "b", "c", "d"]);
    }

    /// Reduction: with `every = 0` the pool never changes (a fixed prompt set); and a round
    /// over all-equal groups selects uniformly (every weight 1).
    #[test]
    fn config_reduction_and_validation() {
        let off = EvaConfig::default();
        assert!(!off.enabled());
        assert_eq!(off.validate(), Ok(()));
        let c = EvaConfig {
            pool_size: 64,
            select_fraction: 0.0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("select_fraction"));
        let c = EvaConfig {
            pool_size: 64,
            children: 0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("children"));
        let fixed = EvaConfig {
            pool_size: 64,
            every: 0,
            children: 0,
            ..Default::default()
        };
        assert_eq!(fixed.validate(), Ok(()));
    }
}
