//! What the buffer stores: one `Experience` per sampled response, gathered into an
//! `ExperienceGroup` (all responses to one prompt). Groups are the unit of exchange between
//! explorers and trainers, because group-relative advantages need the whole group.
//! The serialized form is the JSONL schema documented in `docs/experience-schema.md`.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One response to a prompt, with everything the trainer needs to score it off-policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experience {
    /// The prompt group this response belongs to (unique per prompt-group).
    pub group_id: u64,
    /// The prompt as text (for logs and samples).
    pub prompt: String,
    /// The prompt's token ids, as fed to the policy.
    pub prompt_ids: Vec<u32>,
    /// The sampled response's token ids.
    pub response_ids: Vec<u32>,
    /// Behaviour-policy log-probability of each response token; same length as `response_ids`.
    pub logprobs: Vec<f32>,
    /// Total reward.
    pub reward: f64,
    /// Named reward components (e.g. "correct", "format"); may be empty.
    #[serde(default)]
    pub components: BTreeMap<String, f64>,
    /// The reference answer the reward was computed against.
    pub answer: String,
    /// True when the response ended with EOS, false when it hit the length limit.
    pub finished: bool,
    /// Version of the weights that sampled this response.
    pub policy_version: u64,
    /// How many times this experience has been handed to a trainer.
    #[serde(default)]
    pub use_count: u32,
    /// Per response token: true where the policy sampled it, false where an environment or
    /// tool wrote it (masked out of the loss and the ratio statistics). Empty: all trainable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trainable: Vec<bool>,
    /// A multi-turn episode's transcript (messages, per-turn rewards and infos); None for a
    /// single response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub episode: Option<serde_json::Value>,
    /// An environment episode's hidden state (`Reset::hidden`), read only by an asymmetric
    /// critic (`critic.privileged = "hidden"`); None for a task or an environment that
    /// exposes none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<String>,
}

impl Experience {
    /// Whether response token `t` is the policy's own (trained).
    pub fn is_trainable(&self, t: usize) -> bool {
        self.trainable.get(t).copied().unwrap_or(true)
    }
}

/// All responses to one prompt, sampled by one policy version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperienceGroup {
    pub group_id: u64,
    pub policy_version: u64,
    pub experiences: Vec<Experience>,
    /// Rewards of every response drawn for the prompt, the discarded ones included
    /// (Reinforce-Ada's `global-mean` baseline); empty: the experiences are all that was drawn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drawn_rewards: Vec<f64>,
}

/// Why a group is not fit to store: each message names the experience and field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExperienceError {
    #[error("group {group_id}: has no experiences (expected at least one)")]
    EmptyGroup { group_id: u64 },
    #[error(
        "group {group_id}: experiences[{index}].{field} is {found}, expected the group's {expected}"
    )]
    Mismatch {
        group_id: u64,
        index: usize,
        field: &'static str,
        expected: u64,
        found: u64,
    },
    #[error(
        "group {group_id}: experiences[{index}].logprobs has {found} entries, expected {expected} \
         (one per response token)"
    )]
    LogprobLength {
        group_id: u64,
        index: usize,
        expected: usize,
        found: usize,
    },
    #[error(
        "group {group_id}: experiences[{index}].trainable has {found} entries, expected {expected} \
         (one per response token) or none (all trainable)"
    )]
    TrainableLength {
        group_id: u64,
        index: usize,
        expected: usize,
        found: usize,
    },
    #[error(
        "group {group_id}: experiences[{index}].response_ids is empty, expected at least one token"
    )]
    EmptyResponse { group_id: u64, index: usize },
    #[error(
        "group {group_id}: experiences[{index}].logprobs[{token}] is {value}, expected a log \
         probability <= 0"
    )]
    PositiveLogprob {
        group_id: u64,
        index: usize,
        token: usize,
        value: f32,
    },
    #[error(
        "group {group_id}: experiences[{index}].{field} is {value}, expected a finite number \
         (JSON cannot store NaN or infinity)"
    )]
    NotFinite {
        group_id: u64,
        index: usize,
        field: String,
        value: f64,
    },
}

impl ExperienceGroup {
    /// Responses sampled for this group: its experiences, or every draw when it records more
    /// (`drawn_rewards`: Reinforce-Ada, time pacing). `sampling/samples_drawn` sums these.
    pub fn samples_drawn(&self) -> usize {
        self.experiences.len().max(self.drawn_rewards.len())
    }

    /// How often this group has been handed out: the largest count among its experiences
    /// (they move together, so they agree unless edited by hand).
    pub fn use_count(&self) -> u32 {
        self.experiences
            .iter()
            .map(|e| e.use_count)
            .max()
            .unwrap_or(0)
    }

    /// Sets the use count of every experience in the group.
    pub fn set_use_count(&mut self, use_count: u32) {
        for experience in &mut self.experiences {
            experience.use_count = use_count;
        }
    }

    /// Checks what the trainer relies on and what JSON can round-trip.
    pub fn validate(&self) -> Result<(), ExperienceError> {
        if self.experiences.is_empty() {
            return Err(ExperienceError::EmptyGroup {
                group_id: self.group_id,
            });
        }
        for (index, experience) in self.experiences.iter().enumerate() {
            self.validate_member(index, experience)?;
        }
        Ok(())
    }

    fn validate_member(&self, index: usize, e: &Experience) -> Result<(), ExperienceError> {
        let mismatch = |field, expected, found| ExperienceError::Mismatch {
            group_id: self.group_id,
            index,
            field,
            expected,
            found,
        };
        if e.group_id != self.group_id {
            return Err(mismatch("group_id", self.group_id, e.group_id));
        }
        if e.policy_version != self.policy_version {
            return Err(mismatch(
                "policy_version",
                self.policy_version,
                e.policy_version,
            ));
        }
        if e.logprobs.len() != e.response_ids.len() {
            return Err(ExperienceError::LogprobLength {
                group_id: self.group_id,
                index,
                expected: e.response_ids.len(),
                found: e.logprobs.len(),
            });
        }
        if !e.trainable.is_empty() && e.trainable.len() != e.response_ids.len() {
            return Err(ExperienceError::TrainableLength {
                group_id: self.group_id,
                index,
                expected: e.response_ids.len(),
                found: e.trainable.len(),
            });
        }
        let not_finite = |field: String, value: f64| ExperienceError::NotFinite {
            group_id: self.group_id,
            index,
            field,
            value,
        };
        if e.response_ids.is_empty() {
            return Err(ExperienceError::EmptyResponse {
                group_id: self.group_id,
                index,
            });
        }
        if let Some((i, &lp)) = e.logprobs.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(not_finite(format!("logprobs[{i}]"), f64::from(lp)));
        }
        // A log-softmax can round a hair above 0; anything more is not a log probability.
        if let Some((token, &value)) = e.logprobs.iter().enumerate().find(|(_, v)| **v > 1e-5) {
            return Err(ExperienceError::PositiveLogprob {
                group_id: self.group_id,
                index,
                token,
                value,
            });
        }
        if !e.reward.is_finite() {
            return Err(not_finite("reward".to_string(), e.reward));
        }
        if let Some((name, &v)) = e.components.iter().find(|(_, v)| !v.is_finite()) {
            return Err(not_finite(format!("components.{name}"), v));
        }
        Ok(())
    }
}

/// The oldest policy version a trainer at `current_version` still accepts:
/// `max_staleness = 0` keeps only experiences from the current weights (on-policy).
pub fn min_version(current_version: u64, max_staleness: u64) -> u64 {
    current_version.saturating_sub(max_staleness)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid group of `size` experiences; rewards 0, 1, 2, ... so members are distinguishable.
    pub(crate) fn sample_group(group_id: u64, version: u64, size: usize) -> ExperienceGroup {
        let experiences = (0..size)
            .map(|i| Experience {
                group_id,
                prompt: format!("prompt {group_id}: 37+48="),
                prompt_ids: vec![3, 7, 11, 4, 8, 12],
                response_ids: vec![8, 5, 1],
                logprobs: vec![-0.25, -1.5, -0.125],
                reward: i as f64,
                components: BTreeMap::from([("correct".to_string(), i as f64)]),
                answer: "85".to_string(),
                finished: i % 2 == 0,
                policy_version: version,
                use_count: 0,
                trainable: vec![],
                episode: None,
                hidden: None,
            })
            .collect();
        ExperienceGroup {
            group_id,
            policy_version: version,
            experiences,
            drawn_rewards: vec![],
        }
    }

    #[test]
    fn valid_group_passes() {
        assert_eq!(sample_group(1, 2, 3).validate(), Ok(()));
    }

    #[test]
    fn empty_group_is_rejected() {
        let mut g = sample_group(4, 0, 1);
        g.experiences.clear();
        assert_eq!(
            g.validate(),
            Err(ExperienceError::EmptyGroup { group_id: 4 })
        );
    }

    #[test]
    fn member_with_other_group_id_or_version_is_rejected() {
        let mut g = sample_group(4, 7, 2);
        g.experiences[1].group_id = 5;
        assert_eq!(
            g.validate(),
            Err(ExperienceError::Mismatch {
                group_id: 4,
                index: 1,
                field: "group_id",
                expected: 4,
                found: 5
            })
        );
        let mut g = sample_group(4, 7, 2);
        g.experiences[0].policy_version = 6;
        let message = g.validate().unwrap_err().to_string();
        assert_eq!(
            message,
            "group 4: experiences[0].policy_version is 6, expected the group's 7"
        );
    }

    #[test]
    fn logprob_length_must_match_response() {
        let mut g = sample_group(1, 0, 1);
        g.experiences[0].logprobs.pop();
        assert_eq!(
            g.validate(),
            Err(ExperienceError::LogprobLength {
                group_id: 1,
                index: 0,
                expected: 3,
                found: 2
            })
        );
    }

    #[test]
    fn non_finite_numbers_are_named() {
        let mut g = sample_group(1, 0, 2);
        g.experiences[1].logprobs[2] = f32::NEG_INFINITY;
        let message = g.validate().unwrap_err().to_string();
        assert!(
            message.contains("experiences[1].logprobs[2] is -inf"),
            "{message}"
        );

        let mut g = sample_group(1, 0, 1);
        g.experiences[0].reward = f64::NAN;
        assert!(g
            .validate()
            .unwrap_err()
            .to_string()
            .contains(".reward is NaN"));

        let mut g = sample_group(1, 0, 1);
        g.experiences[0]
            .components
            .insert("format".to_string(), f64::INFINITY);
        assert!(g
            .validate()
            .unwrap_err()
            .to_string()
            .contains("components.format is inf"));
    }

    #[test]
    fn use_count_is_the_largest_member_count() {
        let mut g = sample_group(1, 0, 3);
        assert_eq!(g.use_count(), 0);
        g.experiences[1].use_count = 2;
        assert_eq!(g.use_count(), 2); // max(0, 2, 0)
        g.set_use_count(5);
        assert!(g.experiences.iter().all(|e| e.use_count == 5));
    }

    #[test]
    fn min_version_reduces_to_on_policy_at_zero_staleness() {
        assert_eq!(min_version(7, 0), 7); // on-policy: only version 7
        assert_eq!(min_version(7, 2), 5); // 7 - 2
        assert_eq!(min_version(1, 5), 0); // saturates, never below 0
    }

    #[test]
    fn defaults_fill_use_count_and_components() {
        let line = r#"{"group_id":1,"prompt":"p","prompt_ids":[1],"response_ids":[2],
            "logprobs":[-0.5],"reward":1.0,"answer":"a","finished":true,"policy_version":3}"#;
        let e: Experience = serde_json::from_str(line).unwrap();
        assert_eq!(e.use_count, 0);
        assert!(e.components.is_empty());
        // Lines written before multi-turn episodes: every token trainable, no transcript.
        assert!(e.trainable.is_empty() && e.is_trainable(0) && e.episode.is_none());
        assert!(!serde_json::to_string(&e).unwrap().contains("trainable"));
    }

    #[test]
    fn trainable_mask_length_must_match_response() {
        let mut g = sample_group(1, 0, 2);
        g.experiences[1].trainable = vec![true, false, true];
        assert_eq!(g.validate(), Ok(()));
        assert!(!g.experiences[1].is_trainable(1));
        g.experiences[1].trainable.pop();
        assert_eq!(
            g.validate().unwrap_err().to_string(),
            "group 1: experiences[1].trainable has 2 entries, expected 3 (one per response \
             token) or none (all trainable)"
        );
    }
}
