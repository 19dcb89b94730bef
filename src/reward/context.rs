//! What the reward pipeline is given per group and per response, and the callbacks
//! (log-probs, reference responses) its components may ask the trainer for.
use std::collections::BTreeMap;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::reward::external::RewardFn;
use crate::reward::gates::ConsistencyJudge;

/// What is known about a prompt.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GroupContext {
    pub prompt: String,
    /// Reference answers (the task's ground truth); verifiers compare against them.
    pub references: Vec<String>,
    /// Passed to external commands as `metadata` (with `finished` and `num_tokens` added).
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// One response to score.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ResponseContext {
    /// Decoded text without special tokens.
    pub text: String,
    /// Ended with EOS (false: cut at the token limit).
    pub finished: bool,
    /// Response length in tokens (EOS included).
    pub num_tokens: usize,
    /// log π(token | prompt, prefix) of the response tokens (EOS included) under the rollout
    /// policy; SAR uses them as log p(a|q). None: asked from the [`LogProbProvider`].
    #[serde(default)]
    pub token_logprobs: Option<Vec<f64>>,
    /// Milestones an instrumented environment observed during this response.
    #[serde(default)]
    pub milestones: Vec<String>,
    /// A multi-turn episode's per-turn rewards (`[env]`); None for a single response.
    #[serde(default)]
    pub turns: Option<EpisodeTurns>,
}

/// What the reward pipeline sees of an episode's turns.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EpisodeTurns {
    /// γ^t·r_t of each turn t, in turn order (`env.discount`).
    pub discounted: Vec<f64>,
    /// The environment ended the episode (its last turn is the outcome); false when a limit
    /// (max turns, max tokens, a failure) did.
    pub ended_by_env: bool,
    /// The environment marked the episode solved (`"success": true`).
    pub success: bool,
    /// r_t of each turn before discounting (what a `reward_at_least` gate reads).
    #[serde(default)]
    pub rewards: Vec<f64>,
    /// The milestones each turn's step reported (what a `milestone` gate reads).
    #[serde(default)]
    pub milestones: Vec<Vec<String>>,
}

/// One log-prob request: the response's tokens (plus EOS when `finished`) after `prompt`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogProbRequest<'a> {
    /// "" for SAR's answer-only pass (the model then sees only BOS, if it has one).
    pub prompt: &'a str,
    pub response: &'a str,
    pub finished: bool,
}

/// Token log-probs under the rollout policy; the model lives in the trainer
/// (`train::policy_callbacks` implements this).
pub trait LogProbProvider {
    /// One vector of per-token log-probs per request, in order.
    fn logprobs(&mut self, requests: &[LogProbRequest<'_>]) -> Result<Vec<Vec<f64>>>;
}

/// Responses of the frozen reference policy (`train::policy_callbacks` implements this).
pub trait ReferenceProvider {
    /// `m` responses to `ctx.prompt`.
    fn reference_responses(&mut self, ctx: &GroupContext, m: usize)
        -> Result<Vec<ResponseContext>>;
}

/// The callbacks a scoring call may need; components that need a missing one give an error
/// saying which.
#[derive(Default)]
pub struct Providers<'a> {
    pub logprobs: Option<&'a mut dyn LogProbProvider>,
    pub references: Option<&'a mut dyn ReferenceProvider>,
}

/// User reward functions and judges, by the names configs refer to them with.
pub struct Registry {
    pub functions: BTreeMap<String, Box<dyn RewardFn>>,
    pub judges: BTreeMap<String, Box<dyn ConsistencyJudge>>,
    /// Where reward models run.
    pub device: Device,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            functions: BTreeMap::new(),
            judges: BTreeMap::new(),
            device: Device::Cpu,
        }
    }
}

impl Registry {
    pub fn function(mut self, name: &str, f: Box<dyn RewardFn>) -> Self {
        self.functions.insert(name.into(), f);
        self
    }
    pub fn judge(mut self, name: &str, j: Box<dyn ConsistencyJudge>) -> Self {
        self.judges.insert(name.into(), j);
        self
    }
}
