//! Reinforce-Ada (Xiong et al. 2025): adaptive sampling per prompt. Each round draws
//! `samples_per_round` more responses for every prompt still active; a prompt stops once its
//! stopping rule holds; after `rounds` rounds the final group of n responses is selected from
//! everything the prompt drew (docs/algorithms.md#reinforce-ada). The baseline over every
//! drawn sample is the `global-mean` estimator. With one round of n samples it is plain GRPO
//! sampling: the group is exactly the n draws, in order.
use serde::{Deserialize, Serialize};

/// Which stopping rule ends a prompt's sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdaMode {
    /// No adaptive sampling: each prompt gets `rollout.group_size` responses in one draw.
    #[default]
    Off,
    /// Stop once the prompt has ≥ ⌊n/2⌋ positives and ≥ n − ⌊n/2⌋ negatives.
    Balanced,
    /// Stop once the prompt has ≥ 1 positive.
    PositiveFocused,
}

/// `[sampling.reinforce_ada]`: adaptive sampling per prompt; the final group size n is
/// `rollout.group_size`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReinforceAdaConfig {
    /// "off" (default), "balanced" (stop at ≥ ⌊n/2⌋ positives and ≥ n − ⌊n/2⌋ negatives) or
    /// "positive-focused" (stop at ≥ 1 positive). On-policy rollouts of a `[task]` only.
    pub mode: AdaMode,
    /// Rounds T at most per step. Default 4.
    pub rounds: usize,
    /// Responses M drawn per round for every prompt still active. Default 8.
    pub samples_per_round: usize,
    /// A response is positive when its reward is above this. Default 0.7.
    pub positive_threshold: f64,
}

impl Default for ReinforceAdaConfig {
    fn default() -> Self {
        ReinforceAdaConfig {
            mode: AdaMode::Off,
            rounds: 4,
            samples_per_round: 8,
            positive_threshold: 0.7,
        }
    }
}

impl AdaMode {
    /// The name in configs.
    pub fn name(self) -> &'static str {
        match self {
            AdaMode::Off => "off",
            AdaMode::Balanced => "balanced",
            AdaMode::PositiveFocused => "positive-focused",
        }
    }
}

impl ReinforceAdaConfig {
    pub fn enabled(&self) -> bool {
        self.mode != AdaMode::Off
    }

    /// Values that cannot work with final groups of `group_size` responses.
    pub fn validate(&self, group_size: usize) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        if self.rounds == 0 || self.samples_per_round == 0 {
            return Err(format!(
                "sampling.reinforce_ada: rounds ({}) and samples_per_round ({}) must be positive",
                self.rounds, self.samples_per_round
            ));
        }
        if self.rounds.saturating_mul(self.samples_per_round) < group_size {
            return Err(format!(
                "sampling.reinforce_ada: rounds × samples_per_round = {} × {} draws fewer than the \
                 final group of rollout.group_size = {group_size} responses",
                self.rounds, self.samples_per_round
            ));
        }
        if !self.positive_threshold.is_finite() {
            return Err(format!(
                "sampling.reinforce_ada.positive_threshold must be finite, found {}",
                self.positive_threshold
            ));
        }
        Ok(())
    }
}

/// Whether a prompt with `positives` and `negatives` drawn so far stops sampling, for a final
/// group of `n`.
pub fn is_finished(mode: AdaMode, positives: usize, negatives: usize, n: usize) -> bool {
    match mode {
        AdaMode::Off => true,
        AdaMode::Balanced => positives >= n / 2 && negatives >= n - n / 2,
        AdaMode::PositiveFocused => positives >= 1,
    }
}

/// The final group of `n` from a prompt's draws (`positive[i]` of draw i): the first ⌊n/2⌋
/// positives and the first n − ⌊n/2⌋ negatives in draw order; when one kind is short, more of
/// the other fills the group. Returns draw indices in ascending order (fewer than `n` only
/// when fewer were drawn). The draws are i.i.d., so taking the first ones is an unbiased pick.
pub fn select_group(positive: &[bool], n: usize) -> Vec<usize> {
    let pos: Vec<usize> = (0..positive.len()).filter(|&i| positive[i]).collect();
    let neg: Vec<usize> = (0..positive.len()).filter(|&i| !positive[i]).collect();
    let want_pos = n / 2;
    let mut take_pos = want_pos.min(pos.len());
    let take_neg = (n - take_pos).min(neg.len());
    take_pos = (n - take_neg).min(pos.len());
    let mut out: Vec<usize> = pos[..take_pos]
        .iter()
        .chain(&neg[..take_neg])
        .copied()
        .collect();
    out.sort_unstable();
    out
}

/// What adaptive sampling took for one batch (docs/metrics.md, `sampling/ada_*`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AdaStats {
    pub prompts: usize,
    /// Responses drawn over all prompts and rounds.
    pub samples: usize,
    /// Σ over prompts of the rounds each took.
    pub rounds: usize,
    /// Prompts whose stopping rule held within the rounds.
    pub finished: usize,
}

impl AdaStats {
    pub fn samples_per_prompt(&self) -> f64 {
        self.samples as f64 / self.prompts.max(1) as f64
    }
    pub fn rounds_per_prompt(&self) -> f64 {
        self.rounds as f64 / self.prompts.max(1) as f64
    }
    pub fn finished_frac(&self) -> f64 {
        self.finished as f64 / self.prompts.max(1) as f64
    }
}

/// One prompt's draws and the final group chosen from them.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaPrompt<S> {
    /// Every draw, in order (the `global-mean` baseline's population).
    pub drawn: Vec<S>,
    /// Indices into `drawn` of the final group, ascending.
    pub selected: Vec<usize>,
}

/// Runs the rounds for `n_prompts` prompts: `draw(active, m)` returns `m` samples for each
/// prompt index in `active` (ascending), prompt-major; `positive(s)` classifies a sample.
/// Stops early once no prompt is active.
pub fn adaptive_sample<S, E>(
    n_prompts: usize,
    cfg: &ReinforceAdaConfig,
    n: usize,
    positive: impl Fn(&S) -> bool,
    mut draw: impl FnMut(&[usize], usize) -> Result<Vec<Vec<S>>, E>,
) -> Result<(Vec<AdaPrompt<S>>, AdaStats), E> {
    let m = cfg.samples_per_round;
    let mut drawn: Vec<Vec<S>> = (0..n_prompts).map(|_| Vec::new()).collect();
    let mut done = vec![false; n_prompts];
    let mut stats = AdaStats {
        prompts: n_prompts,
        ..AdaStats::default()
    };
    for _ in 0..cfg.rounds {
        let active: Vec<usize> = (0..n_prompts).filter(|&p| !done[p]).collect();
        if active.is_empty() {
            break;
        }
        let round = draw(&active, m)?;
        for (&p, samples) in active.iter().zip(round) {
            stats.samples += samples.len();
            stats.rounds += 1;
            drawn[p].extend(samples);
            let pos = drawn[p].iter().filter(|s| positive(s)).count();
            if is_finished(cfg.mode, pos, drawn[p].len() - pos, n) {
                done[p] = true;
            }
        }
    }
    stats.finished = done.iter().filter(|&&d| d).count();
    let prompts = drawn
        .into_iter()
        .map(|d| {
            let flags: Vec<bool> = d.iter().map(&positive).collect();
            AdaPrompt {
                selected: select_group(&flags, n),
                drawn: d,
            }
        })
        .collect();
    Ok((prompts, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopping_rules_by_hand() {
        use AdaMode::*;
        // n = 4: balanced needs 2 positives and 2 negatives.
        assert!(!is_finished(Balanced, 1, 7, 4));
        assert!(!is_finished(Balanced, 5, 1, 4));
        assert!(is_finished(Balanced, 2, 2, 4));
        // n = 5: ⌊5/2⌋ = 2 positives and 5 − 2 = 3 negatives.
        assert!(!is_finished(Balanced, 2, 2, 5));
        assert!(is_finished(Balanced, 2, 3, 5));
        assert!(!is_finished(PositiveFocused, 0, 16, 4));
        assert!(is_finished(PositiveFocused, 1, 0, 4));
    }

    #[test]
    fn selection_balances_and_fills_by_hand() {
        let (t, f) = (true, false);
        // 3 positives (0, 2, 5), 3 negatives (1, 3, 4); n = 4 → positives 0, 2; negatives 1, 3.
        assert_eq!(select_group(&[t, f, t, f, f, t], 4), vec![0, 1, 2, 3]);
        // one positive (4): it and the first 3 negatives.
        assert_eq!(select_group(&[f, f, f, f, t, f], 4), vec![0, 1, 2, 4]);
        // one negative (3): it and the first 3 positives.
        assert_eq!(select_group(&[t, t, t, f, t, t], 4), vec![0, 1, 2, 3]);
        // n = 3: ⌊3/2⌋ = 1 positive (2), 2 negatives (0, 1).
        assert_eq!(select_group(&[f, f, t, t, f], 3), vec![0, 1, 2]);
        // all negative, fewer draws than n: everything.
        assert_eq!(select_group(&[f, f], 4), vec![0, 1]);
        // exactly n draws: all of them in order, whatever they are (the GRPO reduction).
        assert_eq!(select_group(&[t, t, t, f], 4), vec![0, 1, 2, 3]);
        assert_eq!(select_group(&[f, f, f, f], 4), vec![0, 1, 2, 3]);
    }

    /// Scripted rewards per prompt, handed out `m` at a time; records each round's actives.
    struct Script {
        per_prompt: Vec<Vec<f64>>,
        next: Vec<usize>,
        calls: Vec<Vec<usize>>,
    }

    impl Script {
        fn draw(&mut self, active: &[usize], m: usize) -> Result<Vec<Vec<f64>>, String> {
            self.calls.push(active.to_vec());
            Ok(active
                .iter()
                .map(|&p| {
                    let s = self.next[p];
                    self.next[p] += m;
                    self.per_prompt[p][s..s + m].to_vec()
                })
                .collect())
        }
    }

    fn script(per_prompt: Vec<Vec<f64>>) -> Script {
        let n = per_prompt.len();
        Script {
            per_prompt,
            next: vec![0; n],
            calls: vec![],
        }
    }

    #[test]
    fn balanced_rounds_by_hand() {
        // n = 2, M = 2, T = 3. Prompt 0: [1, 0] finishes in round 1. Prompt 1: [0, 0], [0, 1]
        // finishes in round 2. Prompt 2 never has a positive: 3 rounds, unfinished.
        let mut s = script(vec![
            vec![1.0, 0.0, 9.0, 9.0, 9.0, 9.0],
            vec![0.0, 0.0, 0.0, 1.0, 9.0, 9.0],
            vec![0.0; 6],
        ]);
        let cfg = ReinforceAdaConfig {
            mode: AdaMode::Balanced,
            rounds: 3,
            samples_per_round: 2,
            positive_threshold: 0.7,
        };
        let (prompts, stats) =
            adaptive_sample(3, &cfg, 2, |r: &f64| *r > 0.7, |a, m| s.draw(a, m)).unwrap();
        assert_eq!(s.calls, vec![vec![0, 1, 2], vec![1, 2], vec![2]]);
        assert_eq!(
            stats,
            AdaStats {
                prompts: 3,
                samples: 2 + 4 + 6,
                rounds: 1 + 2 + 3,
                finished: 2
            }
        );
        assert_eq!(prompts[0].drawn, vec![1.0, 0.0]);
        assert_eq!(prompts[0].selected, vec![0, 1]);
        // prompt 1: draws [0, 0, 0, 1] → positive 3, first negative 0.
        assert_eq!(prompts[1].drawn, vec![0.0, 0.0, 0.0, 1.0]);
        assert_eq!(prompts[1].selected, vec![0, 3]);
        assert_eq!(prompts[2].selected, vec![0, 1]);
        assert_eq!(prompts[2].drawn.len(), 6);
        assert!((stats.samples_per_prompt() - 4.0).abs() < 1e-12);
        assert!((stats.rounds_per_prompt() - 2.0).abs() < 1e-12);
        assert!((stats.finished_frac() - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn positive_focused_stops_at_the_first_positive() {
        // n = 4, M = 2, T = 4: prompt 0's first positive is draw 5 (round 3).
        let mut s = script(vec![vec![0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 9.0, 9.0]]);
        let cfg = ReinforceAdaConfig {
            mode: AdaMode::PositiveFocused,
            rounds: 4,
            samples_per_round: 2,
            positive_threshold: 0.7,
        };
        let (prompts, stats) =
            adaptive_sample(1, &cfg, 4, |r: &f64| *r > 0.7, |a, m| s.draw(a, m)).unwrap();
        assert_eq!(stats.rounds, 3);
        assert_eq!(stats.finished, 1);
        // the positive and the first three negatives
        assert_eq!(prompts[0].selected, vec![0, 1, 2, 5]);
    }

    #[test]
    fn one_round_of_n_is_plain_group_sampling() {
        let mut s = script(vec![vec![1.0, 1.0, 1.0], vec![0.0, 1.0, 0.0]]);
        let cfg = ReinforceAdaConfig {
            mode: AdaMode::Balanced,
            rounds: 1,
            samples_per_round: 3,
            positive_threshold: 0.7,
        };
        let (prompts, stats) =
            adaptive_sample(2, &cfg, 3, |r: &f64| *r > 0.7, |a, m| s.draw(a, m)).unwrap();
        assert_eq!(s.calls, vec![vec![0, 1]]);
        for (p, want) in prompts.iter().zip([vec![1.0; 3], vec![0.0, 1.0, 0.0]]) {
            assert_eq!(p.selected, vec![0, 1, 2]);
            assert_eq!(p.drawn, want);
        }
        assert_eq!(stats.samples, 6);
    }

    #[test]
    fn validation_refuses_groups_that_cannot_fill() {
        let mut c = ReinforceAdaConfig {
            mode: AdaMode::Balanced,
            rounds: 1,
            samples_per_round: 3,
            ..Default::default()
        };
        assert!(c.validate(4).unwrap_err().contains("fewer than"));
        assert_eq!(c.validate(3), Ok(()));
        c.rounds = 0;
        assert!(c.validate(3).unwrap_err().contains("positive"));
        c.mode = AdaMode::Off;
        assert_eq!(c.validate(3), Ok(()));
    }
}
