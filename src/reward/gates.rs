//! Gated and composite rewards (docs/algorithms.md#gates-and-composite-rewards).
//!
//! - G-RA gated accumulation (multi-turn): R = r_outcome + 1[r_outcome ≥ δ]·Σ_t r_step,t.
//! - Priority channels: channels are ordered from highest priority; a channel passes when
//!   value ≥ threshold. Values are summed in order up to and including the first failing
//!   channel; channels after it do not count. **Decision:** the failing channel's own value
//!   counts, so a failed outcome still contributes its (low) score. G-RA is the two-channel case
//!   [outcome with threshold δ, Σ steps with threshold −∞].
//! - Per-turn rewards of a multi-turn episode: discounted by γ^t ([`discount_turns`]) and split
//!   into the outcome (the last turn, when the environment ended the episode) and the steps
//!   (every other turn) by [`split_turns`], so that G-RA can gate the steps on the outcome.
//! - Per-turn gates ([`gate_turns`]): turn t's reward counts only once the gate condition has
//!   held at some turn s ≤ t (e.g. a milestone reached by turn t); earlier turns give 0.
//! - Partial credit: [`MilestoneTracker`], +0.1 per distinct milestone, each counted once.
//! - Consistency reward (StableReinforce): R = 0.5·format + acc·(1 + 0.5·cons), cons ∈ {−1,0,1},
//!   with cons from a [`ConsistencyJudge`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use thiserror::Error;

/// Default credit per milestone.
pub const DEFAULT_MILESTONE_CREDIT: f64 = 0.1;
/// Weight of the format term in the consistency reward.
pub const CONSISTENCY_FORMAT_WEIGHT: f64 = 0.5;
/// Weight of the consistency verdict in the consistency reward.
pub const CONSISTENCY_WEIGHT: f64 = 0.5;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum GateError {
    #[error("consistency verdict: expected -1, 0 or 1, found {found}")]
    InvalidConsistency { found: i8 },
    #[error("milestone credit: expected a finite number >= 0, found {found}")]
    InvalidCredit { found: f64 },
}

/// G-RA: r_outcome + 1[r_outcome ≥ δ]·Σ_t r_step,t. No steps ⇒ r_outcome.
pub fn gated_reward(r_outcome: f64, step_rewards: &[f64], delta: f64) -> f64 {
    if r_outcome >= delta {
        r_outcome + step_rewards.iter().sum::<f64>()
    } else {
        r_outcome
    }
}

/// γ^t·r_t for each turn t (from 0).
pub fn discount_turns(rewards: &[f64], discount: f64) -> Vec<f64> {
    let mut weight = 1.0;
    rewards
        .iter()
        .map(|r| {
            let v = weight * r;
            weight *= discount;
            v
        })
        .collect()
}

/// An episode's (discounted) per-turn rewards as (outcome, steps): the outcome is the last
/// turn's reward when the environment ended the episode (`ended_by_env`) and 0 when a limit
/// did (no outcome was reached); the steps are the sum of the other turns. outcome + steps is
/// the return.
pub fn split_turns(turns: &[f64], ended_by_env: bool) -> (f64, f64) {
    match turns.split_last() {
        Some((last, before)) if ended_by_env => (*last, before.iter().sum()),
        _ => (0.0, turns.iter().sum()),
    }
}

/// Per-turn gate: turn t keeps its reward `turns[t]` once the condition has held at some turn
/// s ≤ t (`held[s]`, turn t itself included) and gives 0 before; a turn past the end of
/// `held` did not hold it. A condition that holds at turn 0 leaves the turns unchanged.
pub fn gate_turns(turns: &[f64], held: &[bool]) -> Vec<f64> {
    let mut open = false;
    turns
        .iter()
        .enumerate()
        .map(|(t, &r)| {
            open |= held.get(t).copied().unwrap_or(false);
            if open {
                r
            } else {
                0.0
            }
        })
        .collect()
}

/// One reward channel; passes when `value >= threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Channel {
    pub value: f64,
    pub threshold: f64,
}

impl Channel {
    pub fn passes(&self) -> bool {
        self.value >= self.threshold
    }
}

/// Sum of channel values, highest priority first, up to and including the first failing
/// channel. No channels ⇒ 0.
pub fn gated_channels(channels: &[Channel]) -> f64 {
    gated_contributions(channels)
        .iter()
        .fold(0.0, |total, v| total + v)
}

/// What each channel contributes to [`gated_channels`] (their sum): its value while every
/// channel before it passed (the first failing channel's value still counts), 0 after.
/// `reward/<gated>/<channel>/mean` logs them, so G-RA's step reward is seen after the gate.
pub fn gated_contributions(channels: &[Channel]) -> Vec<f64> {
    let mut open = true;
    channels
        .iter()
        .map(|c| {
            let v = if open { c.value } else { 0.0 };
            open = open && c.passes();
            v
        })
        .collect()
}

/// Partial credit: each distinct milestone earns `credit` the first time it is observed.
/// Serialisable so an episode's progress survives checkpoint/resume; `BTreeSet` keeps the
/// serialised order stable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MilestoneTracker {
    credit: f64,
    seen: BTreeSet<String>,
}

impl Default for MilestoneTracker {
    fn default() -> Self {
        Self {
            credit: DEFAULT_MILESTONE_CREDIT,
            seen: BTreeSet::new(),
        }
    }
}

impl MilestoneTracker {
    pub fn new(credit: f64) -> Result<Self, GateError> {
        if !(credit.is_finite() && credit >= 0.0) {
            return Err(GateError::InvalidCredit { found: credit });
        }
        Ok(Self {
            credit,
            seen: BTreeSet::new(),
        })
    }

    /// Records a milestone; returns the credit earned now (`credit` if new, else 0).
    pub fn observe(&mut self, milestone: &str) -> f64 {
        if self.seen.insert(milestone.to_owned()) {
            self.credit
        } else {
            0.0
        }
    }

    /// Total credit so far = credit × number of distinct milestones.
    pub fn total(&self) -> f64 {
        self.credit * self.seen.len() as f64
    }

    pub fn count(&self) -> usize {
        self.seen.len()
    }

    /// Forget all milestones (start of a new episode).
    pub fn reset(&mut self) {
        self.seen.clear();
    }
}

/// 0.5·format + acc·(1 + 0.5·cons), cons ∈ {−1, 0, 1}.
pub fn consistency_reward(format: f64, acc: f64, cons: i8) -> Result<f64, GateError> {
    if !(-1..=1).contains(&cons) {
        return Err(GateError::InvalidConsistency { found: cons });
    }
    Ok(CONSISTENCY_FORMAT_WEIGHT * format + acc * (1.0 + CONSISTENCY_WEIGHT * f64::from(cons)))
}

/// Judges whether a response's reasoning agrees with its final answer:
/// 1 consistent, −1 inconsistent, 0 cannot tell.
pub trait ConsistencyJudge {
    fn judge(&self, prompt: &str, response: &str) -> i8;
}

/// Consistency reward with the verdict from `judge`; a judge returning anything outside
/// {−1, 0, 1} is an error.
pub fn judged_consistency_reward(
    judge: &dyn ConsistencyJudge,
    prompt: &str,
    response: &str,
    format: f64,
    acc: f64,
) -> Result<f64, GateError> {
    consistency_reward(format, acc, judge.judge(prompt, response))
}

/// A cheap heuristic judge for numeric answers. The final answer is the text after the last
/// `\boxed{…}`, `####` or `Answer:` (case-insensitive) marker; the reasoning is everything
/// before that marker. It returns 1 when the last number written in the reasoning equals the
/// final answer's number, −1 when it differs, and 0 when there is no marker or either side has
/// no number. It says nothing about whether the reasoning is valid, and a trailing number that
/// is not the result (e.g. "8 apples in 2 baskets") gives a false −1. The prompt is ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LastNumberJudge;

impl ConsistencyJudge for LastNumberJudge {
    fn judge(&self, _prompt: &str, response: &str) -> i8 {
        let Some((reasoning, final_text)) = split_final_answer(response) else {
            return 0;
        };
        match (last_number(reasoning), last_number(final_text)) {
            (Some(a), Some(b)) if numbers_equal(a, b) => 1,
            (Some(_), Some(_)) => -1,
            _ => 0,
        }
    }
}

/// Splits at the last final-answer marker into (reasoning, final answer text).
fn split_final_answer(response: &str) -> Option<(&str, &str)> {
    // ASCII lowercasing keeps byte offsets, so positions index `response` directly.
    let lower = response.to_ascii_lowercase();
    let markers: [(&str, bool); 3] = [("\\boxed{", true), ("####", false), ("answer:", false)];
    let (start, marker, braced) = markers
        .iter()
        .filter_map(|&(m, braced)| lower.rfind(m).map(|pos| (pos, m, braced)))
        .max_by_key(|&(pos, _, _)| pos)?;
    let reasoning = response.get(..start)?;
    let rest = response.get(start + marker.len()..)?;
    let final_text = if braced {
        braced_content(rest)
    } else {
        rest.lines().next().unwrap_or("")
    };
    Some((reasoning, final_text))
}

/// Text up to the brace that closes an already-opened `{`; all of `rest` if unclosed.
fn braced_content(rest: &str) -> &str {
    let mut depth = 1usize;
    for (i, c) in rest.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &rest[..i];
                }
            }
            _ => {}
        }
    }
    rest
}

/// The last number in `text`: digits with optional sign, decimal point, thousands commas, or a
/// fraction a/b.
fn last_number(text: &str) -> Option<f64> {
    text.split(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | ',' | '-' | '/')))
        .rev()
        .filter(|token| token.chars().any(|c| c.is_ascii_digit()))
        .find_map(parse_number)
}

fn parse_number(token: &str) -> Option<f64> {
    let cleaned: String = token
        .trim_matches(|c| c == '.' || c == ',')
        .chars()
        .filter(|&c| c != ',')
        .collect();
    match cleaned.split_once('/') {
        Some((num, den)) => {
            let den: f64 = den.parse().ok()?;
            if den == 0.0 {
                return None;
            }
            Some(num.parse::<f64>().ok()? / den)
        }
        None => cleaned.parse().ok(),
    }
}

fn numbers_equal(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::near;

    #[test]
    fn gated_reward_hand_computed() {
        // outcome 1 ≥ δ = 0.5: 1 + (0.1 + 0.2 + 0.3) = 1.6
        assert!(near(gated_reward(1.0, &[0.1, 0.2, 0.3], 0.5), 1.6));
        // outcome 0.4 < 0.5: steps ignored → 0.4
        assert_eq!(gated_reward(0.4, &[0.1, 0.2, 0.3], 0.5), 0.4);
        // boundary r = δ passes (≥): 0.5 + 1 = 1.5
        assert_eq!(gated_reward(0.5, &[1.0], 0.5), 1.5);
        // no steps
        assert_eq!(gated_reward(0.7, &[], 0.5), 0.7);
        // negative step rewards are accumulated too: 1 + (−0.25) = 0.75
        assert_eq!(gated_reward(1.0, &[-0.25], 0.0), 0.75);
    }

    #[test]
    fn turns_are_discounted_and_split_into_outcome_and_steps() {
        // γ = 0.5: [0.2, 0.2, 1] → [0.2, 0.1, 0.25].
        assert_eq!(discount_turns(&[0.2, 0.2, 1.0], 0.5), vec![0.2, 0.1, 0.25]);
        // γ = 1 is the plain list; γ = 0 keeps the first turn only.
        assert_eq!(discount_turns(&[0.2, 0.2, 1.0], 1.0), vec![0.2, 0.2, 1.0]);
        assert_eq!(discount_turns(&[3.0, 2.0], 0.0), vec![3.0, 0.0]);
        // Ended by the environment: the last turn is the outcome.
        let (o, s) = split_turns(&[0.2, 0.1, 0.25], true);
        assert_eq!(o, 0.25);
        assert!((s - 0.3).abs() < 1e-12);
        // Ended by a limit: no outcome; every turn is a step.
        let (o, s) = split_turns(&[0.2, 0.1], false);
        assert_eq!(o, 0.0);
        assert!((s - 0.3).abs() < 1e-12);
        assert_eq!(split_turns(&[], true), (0.0, 0.0));
        // G-RA over turns: steps count only when the outcome passes δ = 1.
        let won = split_turns(&discount_turns(&[0.2, 0.2, 1.0], 1.0), true);
        assert!((gated_reward(won.0, &[won.1], 1.0) - 1.4).abs() < 1e-12);
        let lost = split_turns(&discount_turns(&[0.2, 0.2, 0.2], 1.0), false);
        assert_eq!(gated_reward(lost.0, &[lost.1], 1.0), 0.0);
    }

    #[test]
    fn per_turn_gates_count_a_turn_once_the_condition_held_by_it() {
        let turns = [0.1, 0.2, 0.3, 0.4];
        // Held first at turn 1: turn 0 gives 0, turns 1.. keep theirs (turn 1 included).
        assert_eq!(
            gate_turns(&turns, &[false, true, false, false]),
            vec![0.0, 0.2, 0.3, 0.4]
        );
        // Held only at the last turn: only it counts; never held: nothing counts.
        assert_eq!(
            gate_turns(&turns, &[false, false, false, true]),
            vec![0.0, 0.0, 0.0, 0.4]
        );
        assert_eq!(gate_turns(&turns, &[false; 4]), vec![0.0; 4]);
        // A shorter `held` list: the missing turns did not hold it (but an open gate stays open).
        assert_eq!(gate_turns(&turns, &[false]), vec![0.0; 4]);
        assert_eq!(gate_turns(&turns, &[true]), turns.to_vec());
        // Reduction: a gate that always holds is no gate.
        assert_eq!(gate_turns(&turns, &[true; 4]), turns.to_vec());
        assert_eq!(gate_turns(&[], &[]), Vec::<f64>::new());
        // With the split: steps = 0.2 + 0.3 (turn 0 gated off), outcome = 0.4.
        let (o, s) = split_turns(&gate_turns(&turns, &[false, true, false, false]), true);
        assert_eq!(o, 0.4);
        assert!((s - 0.5).abs() < 1e-12);
        // The trajectory-level gate differs: it counts turn 0 too once the condition held
        // anywhere (0.1 + 0.2 + 0.3 = 0.6).
        let (_, all_steps) = split_turns(&turns, true);
        assert!((all_steps - 0.6).abs() < 1e-12);
    }

    #[test]
    fn gated_channels_truth_table_three_channels() {
        // Values 1, 10, 100 make every partial sum distinct. Pass: threshold 0; fail: 1000.
        let channel = |value: f64, pass: bool| Channel {
            value,
            threshold: if pass { 0.0 } else { 1000.0 },
        };
        // (pass1, pass2, pass3) → sum up to and including the first failure.
        let table = [
            ((true, true, true), 111.0),  // 1 + 10 + 100
            ((true, true, false), 111.0), // 1 + 10 + 100 (channel 3 fails, its value counts)
            ((true, false, true), 11.0),  // 1 + 10, stop at channel 2
            ((true, false, false), 11.0), // 1 + 10
            ((false, true, true), 1.0),   // stop at channel 1
            ((false, true, false), 1.0),  // 1
            ((false, false, true), 1.0),  // 1
            ((false, false, false), 1.0), // 1
        ];
        for ((p1, p2, p3), expected) in table {
            let channels = [channel(1.0, p1), channel(10.0, p2), channel(100.0, p3)];
            assert_eq!(
                gated_channels(&channels),
                expected,
                "pattern ({p1}, {p2}, {p3})"
            );
        }
    }

    #[test]
    fn gated_contributions_are_the_channels_up_to_the_first_failure() {
        // G-RA over turns, δ = 1: outcome 1 passes, so the steps 0.75 count; outcome 0 fails,
        // its own 0 counts and the steps give 0.
        let ch = |value: f64, threshold: f64| Channel { value, threshold };
        let solved = [ch(1.0, 1.0), ch(0.75, f64::NEG_INFINITY)];
        assert_eq!(gated_contributions(&solved), vec![1.0, 0.75]);
        let unsolved = [ch(0.0, 1.0), ch(0.75, f64::NEG_INFINITY)];
        assert_eq!(gated_contributions(&unsolved), vec![0.0, 0.0]);
        // Three channels, the second fails: 1 and 10 count, 100 does not.
        let three = [ch(1.0, 0.0), ch(10.0, 1000.0), ch(100.0, 0.0)];
        assert_eq!(gated_contributions(&three), vec![1.0, 10.0, 0.0]);
        assert!(gated_contributions(&[]).is_empty());
        // They sum to the gated value (the truth table's patterns).
        for pass in 0..8u32 {
            let chs: Vec<Channel> = (0..3)
                .map(|b| ch(10f64.powi(b), if pass >> b & 1 == 1 { 0.0 } else { 1e9 }))
                .collect();
            let sum: f64 = gated_contributions(&chs).iter().sum();
            assert_eq!(sum, gated_channels(&chs), "pattern {pass:03b}");
        }
    }

    #[test]
    fn gated_channels_edge_cases() {
        assert_eq!(gated_channels(&[]), 0.0);
        // value exactly at threshold passes
        let at = Channel {
            value: 0.5,
            threshold: 0.5,
        };
        let next = Channel {
            value: 2.0,
            threshold: 0.0,
        };
        assert_eq!(gated_channels(&[at, next]), 2.5);
        // NaN value fails its gate (NaN ≥ t is false) and stops the chain
        let nan = Channel {
            value: f64::NAN,
            threshold: 0.0,
        };
        assert!(!nan.passes());
    }

    #[test]
    fn gated_channels_reduce_to_g_ra() {
        // G-RA is [outcome gated at δ, Σ steps never failing].
        let steps = [0.1, -0.4, 0.25];
        for outcome in [0.0, 0.49, 0.5, 1.0] {
            let channels = [
                Channel {
                    value: outcome,
                    threshold: 0.5,
                },
                Channel {
                    value: steps.iter().sum(),
                    threshold: f64::NEG_INFINITY,
                },
            ];
            assert!(near(
                gated_channels(&channels),
                gated_reward(outcome, &steps, 0.5)
            ));
        }
    }

    #[test]
    fn milestones_count_once() {
        let mut tracker = MilestoneTracker::default();
        assert_eq!(tracker.observe("opened-file"), 0.1);
        assert_eq!(tracker.observe("opened-file"), 0.0); // repeat: no credit
        assert_eq!(tracker.observe("ran-tests"), 0.1);
        // 2 distinct milestones × 0.1 = 0.2
        assert!(near(tracker.total(), 0.2));
        assert_eq!(tracker.count(), 2);
        tracker.reset();
        assert_eq!(tracker.total(), 0.0);
        assert_eq!(tracker.observe("opened-file"), 0.1);
    }

    #[test]
    fn milestone_tracker_round_trips_and_validates() {
        let mut tracker = MilestoneTracker::new(0.25).unwrap();
        tracker.observe("b");
        tracker.observe("a");
        let json = serde_json::to_string(&tracker).unwrap();
        let mut back: MilestoneTracker = serde_json::from_str(&json).unwrap();
        assert_eq!(back, tracker);
        assert_eq!(back.observe("a"), 0.0); // remembered across resume
        assert_eq!(back.observe("c"), 0.25);
        assert!(MilestoneTracker::new(-0.1).is_err());
        assert!(MilestoneTracker::new(f64::NAN).is_err());
    }

    #[test]
    fn consistency_reward_table() {
        // 0.5·1 + 1·(1 + 0.5·1) = 2.0
        assert_eq!(consistency_reward(1.0, 1.0, 1).unwrap(), 2.0);
        // 0.5·1 + 1·(1 + 0) = 1.5
        assert_eq!(consistency_reward(1.0, 1.0, 0).unwrap(), 1.5);
        // 0.5·1 + 1·(1 − 0.5) = 1.0
        assert_eq!(consistency_reward(1.0, 1.0, -1).unwrap(), 1.0);
        // acc = 0: consistency does not matter, 0.5·1 = 0.5
        for cons in [-1, 0, 1] {
            assert_eq!(consistency_reward(1.0, 0.0, cons).unwrap(), 0.5);
        }
        // 0.5·0 + 1·(1 + 0.5) = 1.5
        assert_eq!(consistency_reward(0.0, 1.0, 1).unwrap(), 1.5);
        assert_eq!(consistency_reward(0.0, 0.0, 0).unwrap(), 0.0);
        assert!(matches!(
            consistency_reward(1.0, 1.0, 2),
            Err(GateError::InvalidConsistency { found: 2 })
        ));
    }

    #[test]
    fn last_number_judge_verdicts() {
        let judge = LastNumberJudge;
        // consistent: reasoning ends with 8, answer 8
        assert_eq!(judge.judge("", "5 + 3 = 8.\n#### 8"), 1);
        // inconsistent: reasoning computes 8, answer 9
        assert_eq!(judge.judge("", "5 + 3 = 8.\n#### 9"), -1);
        // boxed with thousands separator and trailing text
        assert_eq!(
            judge.judge("", "So the total is 1,000 dollars. \\boxed{1000} done"),
            1
        );
        // Answer: marker, case-insensitive, fraction equals decimal
        assert_eq!(judge.judge("", "Half of one is 1/2.\nANSWER: 0.5"), 1);
        // nested braces in \boxed{\frac{1}{2}}: last number inside is 2 → differs from 0.5
        assert_eq!(judge.judge("", "it is 0.5 \\boxed{\\frac{1}{2}}"), -1);
        // negative numbers
        assert_eq!(judge.judge("", "4 − 7 gives -3\n#### -3"), 1);
    }

    #[test]
    fn last_number_judge_abstains() {
        let judge = LastNumberJudge;
        assert_eq!(judge.judge("", "the answer is eight"), 0); // no marker
        assert_eq!(judge.judge("", "#### 8"), 0); // no reasoning number
        assert_eq!(judge.judge("", "we get 8\n#### eight"), 0); // final not numeric
        assert_eq!(judge.judge("", ""), 0);
        // unclosed \boxed{ and non-ASCII text must not panic
        assert_eq!(judge.judge("", "été 3 \\boxed{3"), 1);
        assert_eq!(judge.judge("", "x/0 = 1/0\n#### 1/0"), 0); // division by zero is no number
    }

    #[test]
    fn judged_consistency_reward_uses_the_verdict() {
        struct Fixed(i8);
        impl ConsistencyJudge for Fixed {
            fn judge(&self, _: &str, _: &str) -> i8 {
                self.0
            }
        }
        // LastNumberJudge says −1: 0.5·1 + 1·(1 − 0.5) = 1.0
        let r = judged_consistency_reward(&LastNumberJudge, "q", "2 + 2 = 4\n#### 5", 1.0, 1.0);
        assert_eq!(r.unwrap(), 1.0);
        assert_eq!(
            judged_consistency_reward(&Fixed(1), "", "", 1.0, 1.0).unwrap(),
            2.0
        );
        assert!(judged_consistency_reward(&Fixed(5), "", "", 1.0, 1.0).is_err());
    }
}
