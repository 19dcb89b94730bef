//! Which samples a step trains on: group filters applied between reward and advantage
//! (docs/algorithms.md#sampling-rules). Dropped samples keep their place in the batch with a zero mask, so
//! they contribute nothing to the loss or its normaliser.
pub mod eva;
pub mod pace;
pub mod reinforce_ada;

use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Which samples of a step reach the loss: group filters between reward and advantage, and
/// reference solutions injected into groups (docs/algorithms.md#sampling-rules).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// RED-Drop: treat r ≥ r̄ as positive; when negatives outnumber positives, drop random
    /// negatives until the counts are equal; statistics are recomputed on the kept ones.
    pub red_drop: bool,
    /// Dynamic sampling (DAPO): drop groups whose rewards are all equal; with
    /// `refill_max_rounds` > 0 they are also replaced by newly sampled prompts.
    pub filter_zero_std: bool,
    /// Refill (DAPO's dynamic sampling): with `filter_zero_std`, sample up to this many extra
    /// rounds of `rollout.prompts_per_step` prompts per step to replace all-equal groups
    /// until the batch is full (extra informative groups of the last round are discarded; if
    /// the cap is reached, all-equal groups fill the rest and the filter drops them).
    /// On-policy rollouts only. Default 0 (no refill).
    pub refill_max_rounds: usize,
    /// TempSamp: replace the last of each group's G samples with the reference solution; its
    /// behaviour log-probs are the current policy's.
    pub inject_ground_truth: bool,
    /// What sets the composition of the sample stream: `compute` (every sampled episode
    /// reaches the learner) or `time` (episodes reach it at the rate their simulated actions
    /// finish: each is kept with probability `pace_window_s` / Δt and more are drawn until
    /// every group is full; `[env]` runs whose steps record `duration_s`;
    /// docs/algorithms.md#duration-aware-updates).
    pub pace: pace::Pace,
    /// With `pace = "time"`: the window in simulated seconds, at most the shortest episode's
    /// Δt (Δt priced as `[advantage.duration]` prices it). Required with `time`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pace_window_s: Option<f64>,
    /// With `pace = "time"`: rounds of draws per batch at most before a group still short is
    /// an error. Default 50.
    pub pace_max_rounds: usize,
    /// Reinforce-Ada: adaptive rounds of samples per prompt (docs/algorithms.md#reinforce-ada).
    pub reinforce_ada: reinforce_ada::ReinforceAdaConfig,
    /// eva's creator loop: a prompt pool grown from its most informative prompts
    /// (docs/algorithms.md#sampling-rules).
    pub eva: eva::EvaConfig,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            red_drop: false,
            filter_zero_std: false,
            refill_max_rounds: 0,
            inject_ground_truth: false,
            reinforce_ada: Default::default(),
            eva: Default::default(),
            pace: pace::Pace::Compute,
            pace_window_s: None,
            pace_max_rounds: 50,
        }
    }
}

impl SamplingConfig {
    /// Combinations that cannot mean what was asked; `on_policy_rollouts` is whether batches
    /// are sampled by the current weights in this process (the only source that refills).
    pub fn validate(&self, on_policy_rollouts: bool) -> Result<(), String> {
        if self.refill_max_rounds > 0 && !self.filter_zero_std {
            return Err(format!(
                "sampling.refill_max_rounds = {} refills the groups that sampling.filter_zero_std                  drops: set filter_zero_std = true too",
                self.refill_max_rounds
            ));
        }
        self.validate_pace()?;
        if self.refill_max_rounds > 0 && !on_policy_rollouts {
            return Err(
                "sampling.refill_max_rounds applies to on-policy rollouts (sync.mode =                  \"on-policy\", no sync.buffer or sync.offline)"
                    .into(),
            );
        }
        Ok(())
    }
}

impl SamplingConfig {
    /// `pace_window_s` is given exactly when `pace = "time"`, finite and > 0; at least one round.
    fn validate_pace(&self) -> Result<(), String> {
        match (self.pace, self.pace_window_s) {
            (pace::Pace::Time, None) => Err(
                "sampling.pace = \"time\" needs sampling.pace_window_s: the window in simulated \
                 seconds, at most the shortest episode's duration (each episode is kept with \
                 probability pace_window_s / its duration)"
                    .into(),
            ),
            (pace::Pace::Compute, Some(_)) => {
                Err("sampling.pace_window_s applies with sampling.pace = \"time\" only".into())
            }
            (pace::Pace::Time, Some(w)) if !(w.is_finite() && w > 0.0) => Err(format!(
                "sampling.pace_window_s must be a finite number > 0, found {w}"
            )),
            (pace::Pace::Time, Some(_)) if self.pace_max_rounds == 0 => {
                Err("sampling.pace_max_rounds must be positive, found 0".into())
            }
            _ => Ok(()),
        }
    }
}

/// What refilling one batch took (docs/metrics.md, `sampling/*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RefillStats {
    /// Extra sampling rounds after the first.
    pub rounds: usize,
    /// Prompts sampled in those rounds.
    pub prompts: usize,
    /// Batch slots left to all-equal groups because the cap was reached.
    pub short: usize,
}

/// Dynamic sampling with refill: draws rounds of groups until `target` informative groups
/// (`informative(g)`, e.g. rewards not all equal) are collected or `max_extra_rounds` rounds
/// after the first were drawn. Returns `target` groups when at least that many were drawn:
/// the informative ones in draw order, then, if the cap was hit, the first uninformative ones
/// (the group filter drops them later). A round that returns nothing ends the refill.
pub fn fill_batch<G, E>(
    target: usize,
    max_extra_rounds: usize,
    informative: impl Fn(&G) -> bool,
    mut draw: impl FnMut() -> Result<Vec<G>, E>,
) -> Result<(Vec<G>, RefillStats), E> {
    let mut kept: Vec<G> = Vec::with_capacity(target);
    let mut spare: Vec<G> = Vec::new();
    let mut stats = RefillStats::default();
    for round in 0..=max_extra_rounds {
        let groups = draw()?;
        if round > 0 {
            stats.rounds += 1;
            stats.prompts += groups.len();
        }
        let empty = groups.is_empty();
        for g in groups {
            if informative(&g) {
                kept.push(g);
            } else {
                spare.push(g);
            }
        }
        if kept.len() >= target || empty {
            break;
        }
    }
    kept.truncate(target);
    let missing = target.saturating_sub(kept.len());
    stats.short = missing.min(spare.len());
    kept.extend(spare.into_iter().take(missing));
    Ok((kept, stats))
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

    /// Rounds of groups given as reward lists, drawn in order, counting draws.
    fn rounds(all: Vec<Vec<Vec<f64>>>) -> impl FnMut() -> Result<Vec<Vec<f64>>, String> {
        let mut it = all.into_iter();
        move || Ok(it.next().unwrap_or_default())
    }

    #[test]
    fn refill_counts_rounds_and_prompts() {
        let informative = |g: &Vec<f64>| !is_zero_std(g);
        // target 3. Round 0: [1,0] informative, [0,0] and [1,1] not ⇒ 1 kept.
        // Round 1 (refill 1, 3 prompts): [0,1] and [0,0.5] ⇒ 3 kept, done.
        let (batch, stats) = fill_batch(
            3,
            5,
            informative,
            rounds(vec![
                vec![vec![1.0, 0.0], vec![0.0, 0.0], vec![1.0, 1.0]],
                vec![vec![0.0, 1.0], vec![0.0, 0.0], vec![0.0, 0.5]],
                vec![vec![1.0, 0.0]; 3],
            ]),
        )
        .unwrap();
        assert_eq!(batch, vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.0, 0.5]]);
        assert_eq!(
            stats,
            RefillStats {
                rounds: 1,
                prompts: 3,
                short: 0
            }
        );
        // the last round's surplus informative groups are discarded: target 2, one round of 3
        let (batch, stats) =
            fill_batch(2, 5, informative, rounds(vec![vec![vec![1.0, 0.0]; 3]])).unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(stats, RefillStats::default());
    }

    #[test]
    fn refill_stops_at_the_cap_and_fills_with_all_equal_groups() {
        // every group all-equal (a task the policy always fails): 1 + 2 rounds, then the
        // batch is the first 3 all-equal groups, all of them short
        let mut draws = 0;
        let (batch, stats) = fill_batch(
            3,
            2,
            |g: &Vec<f64>| !is_zero_std(g),
            || -> Result<Vec<Vec<f64>>, String> {
                draws += 1;
                Ok(vec![vec![0.0, 0.0]; 3])
            },
        )
        .unwrap();
        assert_eq!(draws, 3);
        assert_eq!(batch, vec![vec![0.0, 0.0]; 3]);
        assert_eq!(
            stats,
            RefillStats {
                rounds: 2,
                prompts: 6,
                short: 3
            }
        );
        // no refill: one draw, whatever it holds
        let (batch, stats) = fill_batch(
            2,
            0,
            |g: &Vec<f64>| !is_zero_std(g),
            rounds(vec![vec![vec![1.0, 1.0]; 2]]),
        )
        .unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(
            stats,
            RefillStats {
                rounds: 0,
                prompts: 0,
                short: 2
            }
        );
    }

    #[test]
    fn refill_needs_the_filter_and_on_policy_rollouts() {
        let c = SamplingConfig {
            refill_max_rounds: 2,
            ..Default::default()
        };
        assert!(c.validate(true).unwrap_err().contains("filter_zero_std"));
        let c = SamplingConfig {
            refill_max_rounds: 2,
            filter_zero_std: true,
            ..Default::default()
        };
        assert_eq!(c.validate(true), Ok(()));
        assert!(c.validate(false).unwrap_err().contains("on-policy"));
    }

    #[test]
    fn time_pace_needs_a_window() {
        let time = |w: Option<f64>, rounds: usize| SamplingConfig {
            pace: pace::Pace::Time,
            pace_window_s: w,
            pace_max_rounds: rounds,
            ..Default::default()
        };
        assert_eq!(time(Some(1.0), 50).validate(false), Ok(()));
        assert!(time(None, 50)
            .validate(true)
            .unwrap_err()
            .starts_with("sampling.pace = \"time\" needs sampling.pace_window_s"));
        assert_eq!(
            time(Some(0.0), 50).validate(true).unwrap_err(),
            "sampling.pace_window_s must be a finite number > 0, found 0"
        );
        assert_eq!(
            time(Some(1.0), 0).validate(true).unwrap_err(),
            "sampling.pace_max_rounds must be positive, found 0"
        );
        let compute = SamplingConfig {
            pace_window_s: Some(1.0),
            ..Default::default()
        };
        assert!(compute.validate(true).unwrap_err().contains("applies with"));
        let e = toml::from_str::<SamplingConfig>("pace = \"wall\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("compute") && e.contains("time"), "{e}");
    }

    #[test]
    fn zero_std_groups() {
        assert!(is_zero_std(&[1.0, 1.0, 1.0]));
        assert!(is_zero_std(&[0.5]));
        assert!(!is_zero_std(&[1.0, 0.0]));
    }
}
