//! Verifiers, reward shaping and reward models: where a response's scalar reward comes from
//! and how it is transformed before the advantage (docs/algorithms.md#reward-shaping, docs/rewards.md).
pub mod blend;
pub mod context;
pub mod exact;
pub mod external;
pub mod external_pool;
pub mod gates;
pub mod math;
pub mod noise;
pub mod pipeline;
pub mod rm_loss;
pub mod rm_scorer;
pub mod rm_train;
pub mod sar;
pub mod shaping;

/// The component key that holds the verified correctness (`acc/train`). A pipeline component
/// may use the name only as an unshaped `verifier` (its value is then the task's check too);
/// the logged `reward/correct/mean` stays the explorer's own exact-answer check.
pub const CORRECT_KEY: &str = "correct";

/// A verifier's judgement: a score and the reason for it, so that a user reading
/// `samples.jsonl` sees why a response got its reward.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    /// The reward, 1.0 / 0.0 for pass/fail verifiers.
    pub score: f64,
    /// Human-readable explanation, e.g. `correct: 1/3 == 0.3333333` or `no answer found`.
    pub reason: String,
    /// The raw answer text the verifier extracted from the response, when it extracts one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extracted: Option<String>,
}
