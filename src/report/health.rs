//! Live health of an RL run, from each step's metrics: the progress line and the warnings a
//! practitioner would otherwise find only afterwards in the curves. Pure functions of the
//! metric stream, so each signal is tested on synthetic numbers.
use std::collections::BTreeSet;

use crate::report::Metrics;

/// Entropy below this fraction of its first RL step's value counts as collapsed.
pub const ENTROPY_COLLAPSE_FRACTION: f64 = 0.1;
/// Fraction of groups with all-equal rewards above which most of the batch teaches nothing.
pub const ZERO_STD_FRACTION: f64 = 0.5;
/// Fraction of responses cut by `max_new_tokens` above which lengths are being clipped.
pub const TRUNCATED_FRACTION: f64 = 0.2;

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
/// hold and again only after it has cleared, so a long collapse is one line, not hundreds.
/// A non-finite loss is reported every time (each one is a skipped step).
#[derive(Default)]
pub struct Monitor {
    first_entropy: Option<f64>,
    active: BTreeSet<Signal>,
}

impl Monitor {
    /// The warnings to print after `step`.
    pub fn check(&mut self, step: usize, m: &Metrics) -> Vec<String> {
        if self.first_entropy.is_none() {
            self.first_entropy = m.get("entropy").copied().filter(|e| e.is_finite());
        }
        let now = signals(m, self.first_entropy);
        let mut out = Vec::new();
        for (sig, msg) in &now {
            if *sig == Signal::NonFiniteLoss || !self.active.contains(sig) {
                out.push(format!("warning: step {step}: {msg}"));
            }
        }
        self.active = now.into_iter().map(|(s, _)| s).collect();
        out
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
        // 1.0 → 0.5 → 0.09 (collapsed) → 0.05 (still) → 0.5 (recovered) → 0.08 (again).
        let seq = [1.0, 0.5, 0.09, 0.05, 0.5, 0.08];
        let fired: Vec<usize> = seq
            .iter()
            .enumerate()
            .filter(|(i, &e)| {
                mon.check(*i, &m(&[("entropy", e)]))
                    .iter()
                    .any(|w| w.contains("entropy collapsed"))
            })
            .map(|(i, _)| i)
            .collect();
        assert_eq!(fired, vec![2, 5]);
        // 0.1 × 1.0 exactly is not below the threshold.
        assert!(signals(&m(&[("entropy", 0.1)]), Some(1.0)).is_empty());
    }

    #[test]
    fn most_groups_without_variance_warn_half_does_not() {
        assert!(signals(&m(&[("reward/frac_zero_std", 0.5)]), None).is_empty());
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
