//! Live health of an RL run, from each step's metrics: the progress line and the warnings a
//! practitioner would otherwise find only afterwards in the curves. Pure functions of the
//! metric stream, so each signal is tested on synthetic numbers.
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::report::Metrics;

/// Entropy below this fraction of its first RL step's value counts as collapsed.
pub const ENTROPY_COLLAPSE_FRACTION: f64 = 0.1;
/// Fraction of groups with all-equal rewards above which most of the batch teaches nothing.
pub const ZERO_STD_FRACTION: f64 = 0.6;
/// Fraction of responses cut by `max_new_tokens` above which lengths are being clipped.
pub const TRUNCATED_FRACTION: f64 = 0.2;
/// The batch fractions (`reward/frac_zero_std`, `len/truncated_frac`) are judged on their mean over this many steps, and not
/// before that many steps: one step of 32 prompts measures a fraction only to about ±0.09, so
/// a healthy run flickers across a threshold that its average stays under.
pub const WINDOW_STEPS: usize = 10;
/// A warning is not repeated within this many steps of the last one of its kind, even when its
/// condition cleared and returned in between (a non-finite loss excepted).
pub const REPEAT_AFTER_STEPS: usize = 50;
/// Metrics that are fractions of one step's batch, judged over [`WINDOW_STEPS`] steps.
const SMOOTHED: [&str; 2] = ["reward/frac_zero_std", "len/truncated_frac"];

/// The conditions the monitor watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Signal {
    EntropyCollapse,
    ZeroVarianceGroups,
    Truncation,
    NonFiniteLoss,
    StaleData,
}

/// One RL step's progress line: reward, accuracy, KL, entropy and clip fraction.
pub fn progress_message(m: &Metrics, held_out_acc: f64) -> String {
    let g = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
    format!(
        "reward {:.3} | acc {:.1}% (held-out {:.1}%) | KL {:.4} | entropy {:.3} | clip {:.1}%",
        g("reward/mean"),
        g("acc/train") * 100.0,
        held_out_acc * 100.0,
        g("kl/k3"),
        g("entropy"),
        g("loss/clipfrac") * 100.0,
    )
}

/// The signals that hold for one step's metrics, each with its message. `first_entropy` is
/// the entropy of the run's first RL step.
pub fn signals(m: &Metrics, first_entropy: Option<f64>) -> Vec<(Signal, String)> {
    let mut out = Vec::new();
    if let (Some(&e), Some(e0)) = (m.get("entropy"), first_entropy) {
        if e0 > 0.0 && e < ENTROPY_COLLAPSE_FRACTION * e0 {
            out.push((
                Signal::EntropyCollapse,
                format!(
                    "entropy collapsed: {e:.4} is under {:.0}% of the first step's {e0:.4}; \
                     the policy has stopped exploring (raise temperature or loss.entropy_coef, \
                     lower lr)",
                    ENTROPY_COLLAPSE_FRACTION * 100.0
                ),
            ));
        }
    }
    if let Some(&z) = m.get("reward/frac_zero_std") {
        if z > ZERO_STD_FRACTION {
            out.push((
                Signal::ZeroVarianceGroups,
                format!(
                    "{:.0}% of groups have the same reward for every response: their advantages \
                     are 0 and they teach nothing (prompts too easy or too hard for the policy; \
                     a larger rollout.group_size helps)",
                    z * 100.0
                ),
            ));
        }
    }
    if let Some(&t) = m.get("len/truncated_frac") {
        if t > TRUNCATED_FRACTION {
            out.push((
                Signal::Truncation,
                format!(
                    "{:.0}% of responses hit rollout.max_new_tokens before EOS (lengths are \
                     being clipped; raise max_new_tokens or penalise length)",
                    t * 100.0
                ),
            ));
        }
    }
    if let Some(&d) = m.get("staleness/dropped").filter(|&&d| d > 0.0) {
        out.push((
            Signal::StaleData,
            format!(
                "{d} groups older than sync.max_staleness were dropped: the data arrives \
                 stale (explorers lag the learner's weights; a smaller sync.capacity or faster \
                 explorers help)"
            ),
        ));
    }
    let loss = m.get("loss/policy").copied().unwrap_or(0.0);
    let gnorm = m.get("grad/norm").copied().unwrap_or(0.0);
    if !loss.is_finite() || !gnorm.is_finite() {
        let skipped = m.get("loss/skipped_steps").copied().unwrap_or(0.0);
        out.push((
            Signal::NonFiniteLoss,
            format!(
                "non-finite loss ({loss}) or gradient norm ({gnorm}): the update was skipped \
                 ({skipped} skipped so far)"
            ),
        ));
    }
    out
}

/// Remembers what it has already said: a warning is printed when its condition starts to
/// hold, and again only after it has cleared and at least [`REPEAT_AFTER_STEPS`] steps after
/// the last one of its kind, so a long or flickering condition is one line, not hundreds. The
/// batch fractions are judged on their [`WINDOW_STEPS`]-step mean. A non-finite loss is
/// reported every time (each one is a skipped step).
#[derive(Default)]
pub struct Monitor {
    first_entropy: Option<f64>,
    active: BTreeSet<Signal>,
    /// The step of the last warning of each kind.
    last_warned: BTreeMap<Signal, usize>,
    /// The last [`WINDOW_STEPS`] values of each [`SMOOTHED`] metric.
    recent: BTreeMap<&'static str, VecDeque<f64>>,
}

impl Monitor {
    /// The warnings to print after `step`.
    pub fn check(&mut self, step: usize, m: &Metrics) -> Vec<String> {
        if self.first_entropy.is_none() {
            self.first_entropy = m.get("entropy").copied().filter(|e| e.is_finite());
        }
        let judged = self.smoothed(m);
        let now = signals(&judged, self.first_entropy);
        let mut out = Vec::new();
        for (sig, msg) in &now {
            let repeat_ok = self
                .last_warned
                .get(sig)
                .is_none_or(|&last| step >= last + REPEAT_AFTER_STEPS);
            if *sig == Signal::NonFiniteLoss || (!self.active.contains(sig) && repeat_ok) {
                out.push(format!("warning: step {step}: {msg}"));
                self.last_warned.insert(*sig, step);
            }
        }
        self.active = now.into_iter().map(|(s, _)| s).collect();
        out
    }

    /// `m` with each [`SMOOTHED`] fraction replaced by its mean over the last [`WINDOW_STEPS`]
    /// steps, or left out while fewer steps have reported it.
    fn smoothed(&mut self, m: &Metrics) -> Metrics {
        let mut judged = m.clone();
        for key in SMOOTHED {
            let Some(v) = judged.remove(key).filter(|v| v.is_finite()) else {
                continue;
            };
            let w = self.recent.entry(key).or_default();
            w.push_back(v);
            if w.len() > WINDOW_STEPS {
                w.pop_front();
            }
            if w.len() == WINDOW_STEPS {
                judged.insert(key.to_string(), w.iter().sum::<f64>() / WINDOW_STEPS as f64);
            }
        }
        judged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, f64)]) -> Metrics {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn progress_line_shows_the_five_health_figures() {
        let line = progress_message(
            &m(&[
                ("reward/mean", 0.5),
                ("acc/train", 0.25),
                ("kl/k3", 0.0123),
                ("entropy", 0.75),
                ("loss/clipfrac", 0.031),
            ]),
            0.4,
        );
        assert_eq!(
            line,
            "reward 0.500 | acc 25.0% (held-out 40.0%) | KL 0.0123 | entropy 0.750 | clip 3.1%"
        );
    }

    #[test]
    fn entropy_collapse_fires_below_a_tenth_of_the_first_value_once() {
        let mut mon = Monitor::default();
        // 1.0 → 0.5 → 0.09 (collapsed) → 0.05 (still) → 0.5 (recovered) → 0.08 (again, too
        // soon after the first warning) → 0.5 → 0.07 (again, 50 steps later).
        let seq = [
            (0, 1.0),
            (1, 0.5),
            (2, 0.09),
            (3, 0.05),
            (4, 0.5),
            (5, 0.08),
            (51, 0.5),
            (52, 0.07),
        ];
        let fired: Vec<usize> = seq
            .iter()
            .filter(|(step, e)| {
                mon.check(*step, &m(&[("entropy", *e)]))
                    .iter()
                    .any(|w| w.contains("entropy collapsed"))
            })
            .map(|(step, _)| *step)
            .collect();
        assert_eq!(fired, vec![2, 52]);
        // 0.1 × 1.0 exactly is not below the threshold.
        assert!(signals(&m(&[("entropy", 0.1)]), Some(1.0)).is_empty());
    }

    #[test]
    fn most_groups_without_variance_warn_half_does_not() {
        assert!(signals(&m(&[("reward/frac_zero_std", 0.5)]), None).is_empty());
        assert!(signals(&m(&[("reward/frac_zero_std", 0.6)]), None).is_empty());
        let s = signals(&m(&[("reward/frac_zero_std", 0.75)]), None);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, Signal::ZeroVarianceGroups);
        assert!(s[0].1.starts_with("75% of groups"), "{}", s[0].1);
    }

    #[test]
    fn dropped_stale_groups_warn_once_until_it_clears() {
        let mut mon = Monitor::default();
        assert!(mon.check(1, &m(&[("staleness/dropped", 0.0)])).is_empty());
        let w = mon.check(2, &m(&[("staleness/dropped", 3.0)]));
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("step 2") && w[0].contains("3 groups") && w[0].contains("max_staleness"),
            "{w:?}"
        );
        assert!(mon.check(3, &m(&[("staleness/dropped", 5.0)])).is_empty());
    }

    #[test]
    fn truncation_warns_above_a_fifth_of_responses() {
        assert!(signals(&m(&[("len/truncated_frac", 0.2)]), None).is_empty());
        let s = signals(&m(&[("len/truncated_frac", 0.25)]), None);
        assert_eq!(s[0].0, Signal::Truncation);
        assert!(s[0].1.contains("25%") && s[0].1.contains("max_new_tokens"));
    }

    /// `reward/frac_zero_std` of the quickstart's first 50 RL steps (a healthy run: 20% →
    /// 66% held-out accuracy), which warned 9 times when each step was judged alone.
    const QUICKSTART_ZERO_STD: [f64; 50] = [
        0.53, 0.41, 0.53, 0.34, 0.5, 0.5, 0.5, 0.47, 0.34, 0.44, 0.53, 0.5, 0.47, 0.31, 0.5, 0.44,
        0.47, 0.59, 0.34, 0.59, 0.5, 0.47, 0.53, 0.44, 0.44, 0.25, 0.44, 0.41, 0.34, 0.28, 0.25,
        0.34, 0.53, 0.5, 0.38, 0.25, 0.41, 0.59, 0.41, 0.31, 0.28, 0.25, 0.28, 0.44, 0.28, 0.44,
        0.31, 0.53, 0.44, 0.31,
    ];

    #[test]
    fn a_healthy_runs_step_to_step_flicker_does_not_warn() {
        let mut mon = Monitor::default();
        for (i, z) in QUICKSTART_ZERO_STD.iter().enumerate() {
            let w = mon.check(
                i + 1,
                &m(&[("reward/frac_zero_std", *z), ("len/truncated_frac", 0.03)]),
            );
            assert!(w.is_empty(), "step {}: {w:?}", i + 1);
        }
        // Judged alone, 9 of those steps are over the old threshold of one half: the 9
        // warnings the quickstart printed.
        assert_eq!(QUICKSTART_ZERO_STD.iter().filter(|&&z| z > 0.5).count(), 9);
    }

    #[test]
    fn an_unhealthy_run_warns_once_per_kind() {
        // 100 steps: 90% of groups without variance, 50% truncated, entropy collapsing from
        // 1.0 to 0.05 at step 20. Window means are full at step 10.
        let mut mon = Monitor::default();
        let mut said = vec![];
        for step in 1..=100 {
            let entropy = if step < 20 { 1.0 } else { 0.05 };
            let metrics = m(&[
                ("reward/frac_zero_std", 0.9),
                ("len/truncated_frac", 0.5),
                ("entropy", entropy),
            ]);
            for w in mon.check(step, &metrics) {
                said.push((step, w));
            }
        }
        let kinds: Vec<(usize, bool, bool, bool)> = said
            .iter()
            .map(|(s, w)| {
                (
                    *s,
                    w.contains("90% of groups"),
                    w.contains("50% of responses hit"),
                    w.contains("entropy collapsed"),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                (10, true, false, false),
                (10, false, true, false),
                (20, false, false, true)
            ],
            "{said:?}"
        );
    }

    #[test]
    fn a_condition_that_clears_and_returns_is_not_repeated_within_fifty_steps() {
        let mut mon = Monitor::default();
        let mut fired = vec![];
        // Blocks of 10 steps: bad, good, bad (too soon after the first warning), good ×3, bad.
        for (block, z) in [0.9, 0.1, 0.9, 0.1, 0.1, 0.1, 0.9].iter().enumerate() {
            for i in 1..=10 {
                let step = block * 10 + i;
                if !mon
                    .check(step, &m(&[("reward/frac_zero_std", *z)]))
                    .is_empty()
                {
                    fired.push(step);
                }
            }
        }
        // The 10-step mean crosses 0.6 at step 10, then (rising) at step 27 and step 67.
        assert_eq!(fired, vec![10, 67]);
    }

    #[test]
    fn a_non_finite_loss_warns_every_step_with_the_skip_count() {
        let mut mon = Monitor::default();
        for (step, skipped) in [(1, 1.0), (2, 2.0)] {
            let w = mon.check(
                step,
                &m(&[("loss/policy", f64::NAN), ("loss/skipped_steps", skipped)]),
            );
            assert_eq!(w.len(), 1);
            assert!(
                w[0].contains(&format!("({skipped} skipped so far)")),
                "{}",
                w[0]
            );
        }
        let w = mon.check(3, &m(&[("loss/policy", 0.1), ("grad/norm", f64::INFINITY)]));
        assert_eq!(w.len(), 1);
        assert!(mon.check(4, &m(&[("loss/policy", 0.1)])).is_empty());
    }
}
