//! A composable reward pipeline (docs/algorithms.md#reward-shaping, docs/rewards.md): named components with weights, each
//! optionally shaped, summed, then optionally shaped again.
//!
//! For one group (the G responses to one prompt):
//!
//! 1. every component k computes a raw value c_k,i per response i (verifiers first, then the
//!    others in config order, then gated components, which read the raw values of others);
//! 2. a component with its own `shaping` turns c_k into s_k = shape_k(c_k; refs_k), where refs_k
//!    are c_k on the prompt's M reference responses; otherwise s_k = c_k;
//! 3. the total is t_i = Σ_k w_k·s_k,i;
//! 4. the pipeline's `shaping` gives the reward r_i = shape(t_i; Σ_k w_k·c_k on the references).
//!
//! Reference responses come from a frozen reference policy, supplied by the caller through
//! [`ReferenceProvider`], sampled once per prompt and cached in a [`ReferenceRewardCache`]
//! (raw component values only). Reference values are needed only by `par`, `lsc` and
//! `centered` shaping.
//!
//! Components (`kind`):
//! - `verifier`: the task's check, 1/0 (`check = "exact"`: the response equals the first
//!   reference answer and ended with EOS; `"math"`: [`MathVerifier`], best over references).
//!   The first verifier also gives the verdicts and the correctness used by `consistency`.
//! - `length-penalty`: −coef·max(0, tokens − free_len) (defaults 0.01, 300).
//! - `external`: a user command ([`super::external`]).
//! - `reward-model`: a trained reward model ([`super::rm_scorer`]).
//! - `sar`: R_SA = max((ppl(a) − ppl(a|q))/ppl(a), −1) ([`super::sar`]); default weight α = 0.2
//!   so that verifier + sar = R_correct + 0.2·R_SA. Training only: evaluation uses correctness.
//! - `consistency`: 0.5·format + acc·(1 + 0.5·cons) with a [`ConsistencyJudge`].
//! - `gated`: [`gated_channels`] over other components' raw values in priority order.
//! - `milestones`: credit × distinct milestones the environment reported for the response.
//! - `function`: a Rust [`RewardFn`] registered under a name in [`Registry`].
use std::collections::{BTreeMap, HashMap, VecDeque};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::reward::exact::exact_answer;
use crate::reward::external::{ExternalCommandReward, ExternalConfig, RewardFn, RewardRequest};
use crate::reward::gates::{
    consistency_reward, gated_channels, Channel, ConsistencyJudge, LastNumberJudge,
    MilestoneTracker, DEFAULT_MILESTONE_CREDIT,
};
use crate::reward::math::MathVerifier;
use crate::reward::rm_scorer::RewardModelScorer;
use crate::reward::sar::{self_aligned_reward, DEFAULT_SAR_ALPHA};
use crate::reward::shaping::{Shaper, ShapingConfig, DEFAULT_FREE_LEN, DEFAULT_LENGTH_COEF};
use crate::reward::Verdict;

/// Default number M of reference responses per prompt for par/lsc/centered shaping.
pub const DEFAULT_REFERENCE_SAMPLES: usize = 10;
/// Default number of prompts whose reference rewards are kept (oldest evicted first).
pub const DEFAULT_REFERENCE_CACHE_SIZE: usize = 100_000;

fn pipeline_err(msg: impl Into<String>) -> Error {
    Error::config("reward.pipeline", msg)
}

fn verr(msg: impl Into<String>) -> String {
    msg.into()
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// Which check a `verifier` component runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifierCheck {
    /// The built-in arithmetic task's exact match followed by EOS.
    #[default]
    Exact,
    /// Math answer extraction and equivalence (GSM8K, MATH).
    Math,
}

/// One channel of a `gated` component: a component name and its pass threshold (none: the
/// channel always passes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateChannel {
    pub component: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
}

fn default_length_coef() -> f64 {
    DEFAULT_LENGTH_COEF
}
fn default_free_len() -> usize {
    DEFAULT_FREE_LEN
}
fn default_credit() -> f64 {
    DEFAULT_MILESTONE_CREDIT
}
fn default_rm_batch() -> usize {
    64
}
fn default_judge() -> String {
    "last-number".into()
}

/// What a component computes (the `kind` key and its options).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ComponentKind {
    Verifier {
        #[serde(default)]
        check: VerifierCheck,
    },
    LengthPenalty {
        #[serde(default = "default_length_coef")]
        coef: f64,
        #[serde(default = "default_free_len")]
        free_len: usize,
    },
    External(ExternalConfig),
    RewardModel {
        /// A folder written by `grove rm-train`.
        path: String,
        #[serde(default = "default_rm_batch")]
        batch_size: usize,
        /// Value for responses that hit the token limit without EOS (the reward model was
        /// trained on finished answers); none: score them like any other.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        truncated_score: Option<f64>,
    },
    Sar {},
    Consistency {
        /// "last-number" (built in) or a judge registered in [`Registry`].
        #[serde(default = "default_judge")]
        judge: String,
    },
    Gated {
        channels: Vec<GateChannel>,
    },
    Milestones {
        #[serde(default = "default_credit")]
        credit: f64,
    },
    Function {
        /// Name of a [`RewardFn`] registered in [`Registry`].
        function: String,
    },
}

impl ComponentKind {
    /// The `kind` name as written in configs.
    pub fn label(&self) -> &'static str {
        match self {
            ComponentKind::Verifier { .. } => "verifier",
            ComponentKind::LengthPenalty { .. } => "length-penalty",
            ComponentKind::External(_) => "external",
            ComponentKind::RewardModel { .. } => "reward-model",
            ComponentKind::Sar {} => "sar",
            ComponentKind::Consistency { .. } => "consistency",
            ComponentKind::Gated { .. } => "gated",
            ComponentKind::Milestones { .. } => "milestones",
            ComponentKind::Function { .. } => "function",
        }
    }

    /// Weight when the config gives none: α = 0.2 for SAR, 1 otherwise.
    pub fn default_weight(&self) -> f64 {
        match self {
            ComponentKind::Sar {} => DEFAULT_SAR_ALPHA,
            _ => 1.0,
        }
    }
}

fn is_no_shaping(s: &ShapingConfig) -> bool {
    *s == ShapingConfig::None
}

/// One `[[reward.pipeline.components]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentConfig {
    /// Logged as `reward/<name>/mean`; letters, digits, `_` and `-`.
    pub name: String,
    /// Default: [`ComponentKind::default_weight`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Shaping of this component's values alone (e.g. LSC per reward model).
    #[serde(default, skip_serializing_if = "is_no_shaping")]
    pub shaping: ShapingConfig,
    #[serde(flatten)]
    pub kind: ComponentKind,
}

impl ComponentConfig {
    pub fn new(name: &str, kind: ComponentKind) -> Self {
        ComponentConfig {
            name: name.into(),
            weight: None,
            shaping: ShapingConfig::None,
            kind,
        }
    }
    pub fn weighted(mut self, w: f64) -> Self {
        self.weight = Some(w);
        self
    }
    pub fn shaped(mut self, s: ShapingConfig) -> Self {
        self.shaping = s;
        self
    }
    pub fn weight(&self) -> f64 {
        self.weight.unwrap_or_else(|| self.kind.default_weight())
    }
}

fn default_reference_samples() -> usize {
    DEFAULT_REFERENCE_SAMPLES
}
fn default_cache_size() -> usize {
    DEFAULT_REFERENCE_CACHE_SIZE
}

/// The `[reward.pipeline]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub components: Vec<ComponentConfig>,
    /// Shaping of the weighted sum.
    #[serde(default, skip_serializing_if = "is_no_shaping")]
    pub shaping: ShapingConfig,
    /// M: reference responses per prompt (par, lsc, centered).
    #[serde(default = "default_reference_samples")]
    pub reference_samples: usize,
    #[serde(default = "default_cache_size")]
    pub reference_cache_size: usize,
}

impl PipelineConfig {
    pub fn new(components: Vec<ComponentConfig>) -> Self {
        PipelineConfig {
            components,
            shaping: ShapingConfig::None,
            reference_samples: DEFAULT_REFERENCE_SAMPLES,
            reference_cache_size: DEFAULT_REFERENCE_CACHE_SIZE,
        }
    }

    /// Checks everything that does not need the registry or the file system; messages start
    /// with the field's path inside `[reward.pipeline]`.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.components.is_empty() {
            return Err(verr(
                "components: expected at least one component, found none",
            ));
        }
        let mut seen = BTreeMap::new();
        for (i, c) in self.components.iter().enumerate() {
            let at = format!("components[{i}] (`{}`)", c.name);
            if c.name.is_empty()
                || !c
                    .name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
            {
                return Err(verr(format!(
                    "components[{i}].name: expected letters, digits, `_` or `-`, found {:?}",
                    c.name
                )));
            }
            if let Some(j) = seen.insert(c.name.as_str(), i) {
                return Err(verr(format!("{at}: name already used by components[{j}]")));
            }
            if !c.weight().is_finite() {
                return Err(verr(format!(
                    "{at}.weight: expected a finite number, found {}",
                    c.weight()
                )));
            }
            c.shaping
                .validate()
                .map_err(|e| format!("{at}.shaping: {e}"))?;
            match &c.kind {
                ComponentKind::LengthPenalty { coef, .. }
                    if !(coef.is_finite() && *coef >= 0.0) =>
                {
                    return Err(verr(format!(
                        "{at}.coef: expected a finite number >= 0, found {coef}"
                    )))
                }
                ComponentKind::External(e) => e.validate().map_err(|m| format!("{at}: {m}"))?,
                ComponentKind::RewardModel { batch_size: 0, .. } => {
                    return Err(verr(format!("{at}.batch_size: expected >= 1, found 0")))
                }
                ComponentKind::RewardModel {
                    truncated_score: Some(v),
                    ..
                } if !v.is_finite() => {
                    return Err(verr(format!(
                        "{at}.truncated_score: expected a finite number, found {v}"
                    )))
                }
                ComponentKind::Milestones { credit } if !(credit.is_finite() && *credit >= 0.0) => {
                    return Err(verr(format!(
                        "{at}.credit: expected a finite number >= 0, found {credit}"
                    )))
                }
                ComponentKind::Consistency { .. }
                    if !self
                        .components
                        .iter()
                        .any(|o| matches!(o.kind, ComponentKind::Verifier { .. })) =>
                {
                    return Err(verr(format!(
                        "{at}: a consistency component needs a verifier component for its \
                             accuracy and format terms, found none"
                    )));
                }
                _ => {}
            }
        }
        for (i, c) in self.components.iter().enumerate() {
            if let ComponentKind::Gated { channels } = &c.kind {
                if channels.is_empty() {
                    return Err(verr(format!(
                        "components[{i}] (`{}`).channels: expected at least one channel",
                        c.name
                    )));
                }
                for ch in channels {
                    match seen.get(ch.component.as_str()) {
                        None => {
                            return Err(verr(format!(
                            "components[{i}] (`{}`): channel `{}` is not a component (known: {})",
                            c.name,
                            ch.component,
                            seen.keys().copied().collect::<Vec<_>>().join(", ")
                        )))
                        }
                        Some(&j)
                            if matches!(self.components[j].kind, ComponentKind::Gated { .. }) =>
                        {
                            return Err(verr(format!(
                                "components[{i}] (`{}`): channel `{}` is itself gated; channels \
                                 must be plain components",
                                c.name, ch.component
                            )))
                        }
                        _ => {}
                    }
                    if let Some(t) = ch.threshold.filter(|t| t.is_nan()) {
                        return Err(verr(format!(
                            "components[{i}] (`{}`): channel `{}` threshold is {t}",
                            c.name, ch.component
                        )));
                    }
                }
            }
        }
        self.shaping
            .validate()
            .map_err(|e| format!("shaping: {e}"))?;
        if needs_refs(&self.shaping) {
            if let Some(c) = self.components.iter().find(|c| !is_no_shaping(&c.shaping)) {
                return Err(verr(format!(
                    "shaping {:?} compares the total with reference totals of raw component \
                     values, so components cannot be shaped themselves; component `{}` has \
                     shaping {:?}",
                    self.shaping, c.name, c.shaping
                )));
            }
        }
        let any_refs =
            needs_refs(&self.shaping) || self.components.iter().any(|c| needs_refs(&c.shaping));
        if any_refs && self.reference_samples == 0 {
            return Err(verr(
                "reference_samples: par/lsc/centered shaping needs at least 1, found 0",
            ));
        }
        if self.reference_cache_size == 0 {
            return Err(verr("reference_cache_size: expected >= 1, found 0"));
        }
        Ok(())
    }
}

/// Whether a shaping compares with reference rewards.
pub fn needs_refs(s: &ShapingConfig) -> bool {
    matches!(
        s,
        ShapingConfig::Par | ShapingConfig::Lsc { .. } | ShapingConfig::Centered
    )
}

// ---------------------------------------------------------------------------------------------
// Inputs and callbacks

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
}

/// One log-prob request: the response's tokens (plus EOS when `finished`) after `prompt`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogProbRequest<'a> {
    /// "" for SAR's answer-only pass (the model then sees only BOS, if it has one).
    pub prompt: &'a str,
    pub response: &'a str,
    pub finished: bool,
}

/// Token log-probs under the rollout policy; the model lives in the trainer, which implements
/// this (see [`super::policy::PolicyLogProbs`]).
pub trait LogProbProvider {
    /// One vector of per-token log-probs per request, in order.
    fn logprobs(&mut self, requests: &[LogProbRequest<'_>]) -> Result<Vec<Vec<f64>>>;
}

/// Responses of the frozen reference policy (see [`super::policy::PolicyReferenceSampler`]).
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

// ---------------------------------------------------------------------------------------------
// Reference cache

/// Raw component values of a prompt's reference responses.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ReferenceRewards {
    /// Component name → its raw value on each reference response.
    pub components: BTreeMap<String, Vec<f64>>,
    /// Σ_k w_k·c_k on each reference response.
    pub totals: Vec<f64>,
}

/// Reference rewards by prompt, computed once and kept (oldest prompts evicted beyond
/// `capacity`). Serialisable, so a resumed run reuses the same references.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceRewardCache {
    capacity: usize,
    entries: HashMap<String, ReferenceRewards>,
    order: VecDeque<String>,
    hits: u64,
    misses: u64,
}

impl ReferenceRewardCache {
    pub fn new(capacity: usize) -> Self {
        ReferenceRewardCache {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
            hits: 0,
            misses: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Lookups answered from the cache.
    pub fn hits(&self) -> u64 {
        self.hits
    }
    /// Lookups that had to compute.
    pub fn misses(&self) -> u64 {
        self.misses
    }
    pub fn get(&self, prompt: &str) -> Option<&ReferenceRewards> {
        self.entries.get(prompt)
    }

    /// The cached rewards of `prompt`, or `compute()`'s, stored. An error stores nothing.
    pub fn get_or_compute(
        &mut self,
        prompt: &str,
        compute: impl FnOnce() -> Result<ReferenceRewards>,
    ) -> Result<(&ReferenceRewards, bool)> {
        if self.entries.contains_key(prompt) {
            self.hits += 1;
            return Ok((&self.entries[prompt], true));
        }
        let value = compute()?;
        self.misses += 1;
        while self.entries.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.entries.remove(&old);
                }
                None => break,
            }
        }
        self.order.push_back(prompt.to_string());
        self.entries.insert(prompt.to_string(), value);
        Ok((&self.entries[prompt], false))
    }
}

// ---------------------------------------------------------------------------------------------
// The pipeline

enum Scorer {
    Verifier(VerifierCheck),
    LengthPenalty { coef: f64, free_len: usize },
    External(Box<ExternalCommandReward>),
    RewardModel(Box<RewardModelScorer>),
    Sar,
    Consistency(Box<dyn ConsistencyJudge>),
    Gated(Vec<(usize, Option<f64>)>),
    Milestones(f64),
    Function(Box<dyn RewardFn>),
}

struct Component {
    name: String,
    weight: f64,
    shaper: Shaper,
    scorer: Scorer,
}

/// The result of scoring one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredGroup {
    /// Final reward per response.
    pub rewards: Vec<f64>,
    /// Per response: component name → value after its own shaping, before its weight.
    pub components: Vec<BTreeMap<String, f64>>,
    /// Per response: the first verifier's verdict; without a verifier, the total with the
    /// component values as the reason.
    pub verdicts: Vec<Verdict>,
    /// External-command failures while scoring this group (references included).
    pub external_failures: u64,
    /// Whether the reference rewards came from the cache (None: no references needed).
    pub reference_cache_hit: Option<bool>,
}

/// `reward/<component>/mean` over all responses of `groups`.
pub fn component_means(groups: &[ScoredGroup]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for g in groups {
        for row in &g.components {
            for (k, v) in row {
                let e = sums.entry(k.clone()).or_insert((0.0, 0));
                e.0 += v;
                e.1 += 1;
            }
        }
    }
    sums.into_iter()
        .map(|(k, (s, n))| (format!("reward/{k}/mean"), s / n as f64))
        .collect()
}

/// Running state to keep in checkpoints: the shapers' statistics and the reference cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineState {
    pub component_shapers: BTreeMap<String, Shaper>,
    pub shaper: Shaper,
    pub cache: ReferenceRewardCache,
}

pub struct RewardPipeline {
    cfg: PipelineConfig,
    components: Vec<Component>,
    shaper: Shaper,
    cache: ReferenceRewardCache,
    /// Index of the first verifier component.
    verifier: Option<usize>,
    math: MathVerifier,
}

impl RewardPipeline {
    /// A pipeline without user functions or judges; reward models run on the CPU.
    pub fn new(cfg: PipelineConfig) -> Result<Self> {
        Self::with_registry(cfg, Registry::default())
    }

    /// Builds every component: starts external commands, loads reward models, takes the
    /// registered functions and judges it names.
    pub fn with_registry(cfg: PipelineConfig, mut registry: Registry) -> Result<Self> {
        cfg.validate().map_err(pipeline_err)?;
        let index: BTreeMap<&str, usize> = cfg
            .components
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.as_str(), i))
            .collect();
        let mut components = Vec::with_capacity(cfg.components.len());
        for (i, c) in cfg.components.iter().enumerate() {
            let at = format!("components[{i}] (`{}`)", c.name);
            let scorer = match &c.kind {
                ComponentKind::Verifier { check } => Scorer::Verifier(*check),
                ComponentKind::LengthPenalty { coef, free_len } => Scorer::LengthPenalty {
                    coef: *coef,
                    free_len: *free_len,
                },
                ComponentKind::External(e) => Scorer::External(Box::new(
                    ExternalCommandReward::new(e.clone())
                        .map_err(|err| pipeline_err(format!("{at}: {err}")))?,
                )),
                ComponentKind::RewardModel {
                    path,
                    batch_size,
                    truncated_score,
                } => Scorer::RewardModel(Box::new(RewardModelScorer::load(
                    std::path::Path::new(path),
                    *batch_size,
                    *truncated_score,
                    &registry.device,
                )?)),
                ComponentKind::Sar {} => Scorer::Sar,
                ComponentKind::Consistency { judge } => {
                    let j: Box<dyn ConsistencyJudge> = match registry.judges.remove(judge) {
                        Some(j) => j,
                        None if judge == "last-number" => Box::new(LastNumberJudge),
                        None => {
                            return Err(pipeline_err(format!(
                                "{at}.judge: `{judge}` is neither \"last-number\" nor a \
                                 registered judge (registered: {})",
                                names(registry.judges.keys())
                            )))
                        }
                    };
                    Scorer::Consistency(j)
                }
                ComponentKind::Gated { channels } => Scorer::Gated(
                    channels
                        .iter()
                        .map(|ch| (index[ch.component.as_str()], ch.threshold))
                        .collect(),
                ),
                ComponentKind::Milestones { credit } => Scorer::Milestones(*credit),
                ComponentKind::Function { function } => match registry.functions.remove(function) {
                    Some(f) => Scorer::Function(f),
                    None => {
                        return Err(pipeline_err(format!(
                            "{at}.function: no reward function `{function}` is registered \
                             (registered: {})",
                            names(registry.functions.keys())
                        )))
                    }
                },
            };
            components.push(Component {
                name: c.name.clone(),
                weight: c.weight(),
                shaper: Shaper::new(c.shaping.clone())
                    .map_err(|e| pipeline_err(format!("{at}.shaping: {e}")))?,
                scorer,
            });
        }
        let verifier = cfg
            .components
            .iter()
            .position(|c| matches!(c.kind, ComponentKind::Verifier { .. }));
        Ok(RewardPipeline {
            shaper: Shaper::new(cfg.shaping.clone())
                .map_err(|e| pipeline_err(format!("shaping: {e}")))?,
            cache: ReferenceRewardCache::new(cfg.reference_cache_size),
            cfg,
            components,
            verifier,
            math: MathVerifier::default(),
        })
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.cfg
    }

    pub fn component_names(&self) -> Vec<&str> {
        self.components.iter().map(|c| c.name.as_str()).collect()
    }

    pub fn cache(&self) -> &ReferenceRewardCache {
        &self.cache
    }

    /// Failures of external commands and user functions so far, summed (log it as
    /// `reward/external_failures`).
    pub fn external_failures(&self) -> u64 {
        self.components
            .iter()
            .map(|c| match &c.scorer {
                Scorer::External(e) => e.failures(),
                Scorer::Function(f) => f.failures(),
                _ => 0,
            })
            .sum()
    }

    /// Whether scoring needs reference responses (par/lsc/centered anywhere).
    pub fn needs_references(&self) -> bool {
        needs_refs(&self.cfg.shaping) || self.cfg.components.iter().any(|c| needs_refs(&c.shaping))
    }

    /// Whether scoring needs a [`LogProbProvider`] (a `sar` component).
    pub fn needs_logprobs(&self) -> bool {
        self.components
            .iter()
            .any(|c| matches!(c.scorer, Scorer::Sar))
    }

    pub fn state(&self) -> PipelineState {
        PipelineState {
            component_shapers: self
                .components
                .iter()
                .map(|c| (c.name.clone(), c.shaper.clone()))
                .collect(),
            shaper: self.shaper.clone(),
            cache: self.cache.clone(),
        }
    }

    /// Restores [`Self::state`] from a checkpoint; the shapers must match this config.
    pub fn restore(&mut self, state: PipelineState) -> Result<()> {
        if state.shaper.config() != self.shaper.config() {
            return Err(pipeline_err(format!(
                "checkpoint state: shaping {:?} does not match the config's {:?}",
                state.shaper.config(),
                self.shaper.config()
            )));
        }
        for c in &self.components {
            match state.component_shapers.get(&c.name) {
                Some(s) if s.config() == c.shaper.config() => {}
                other => {
                    return Err(pipeline_err(format!(
                        "checkpoint state: component `{}` shaping {:?} does not match the \
                         config's {:?}",
                        c.name,
                        other.map(|s| s.config()),
                        c.shaper.config()
                    )))
                }
            }
        }
        for c in &mut self.components {
            c.shaper = state.component_shapers[&c.name].clone();
        }
        self.shaper = state.shaper;
        self.cache = state.cache;
        Ok(())
    }

    /// Scores a group without callbacks; errors if a component needs one.
    pub fn score_group(
        &mut self,
        ctx: &GroupContext,
        responses: &[ResponseContext],
    ) -> Result<ScoredGroup> {
        self.score_group_with(ctx, responses, &mut Providers::default())
    }

    /// Scores the responses of one group (see the module docs for the order of operations).
    pub fn score_group_with(
        &mut self,
        ctx: &GroupContext,
        responses: &[ResponseContext],
        providers: &mut Providers<'_>,
    ) -> Result<ScoredGroup> {
        if responses.is_empty() {
            return Err(pipeline_err("score_group: no responses to score"));
        }
        let failures_before = self.external_failures();
        let (raw, verdicts) = self.raw_values(ctx, responses, providers.logprobs.as_deref_mut())?;

        // Reference rewards: computed (or taken from the cache) only when some shaping needs them.
        let mut cache_hit = None;
        let refs: Option<ReferenceRewards> = if self.needs_references() {
            let m = self.cfg.reference_samples;
            let mut cache = std::mem::replace(&mut self.cache, ReferenceRewardCache::new(1));
            let result = cache.get_or_compute(&ctx.prompt, || {
                let provider = providers.references.as_deref_mut().ok_or_else(|| {
                    pipeline_err(
                        "par/lsc/centered shaping needs reference responses, but no \
                         ReferenceProvider was given",
                    )
                })?;
                let ref_responses = provider.reference_responses(ctx, m)?;
                if ref_responses.is_empty() {
                    return Err(pipeline_err(format!(
                        "the ReferenceProvider returned no responses for prompt {:?}",
                        ctx.prompt
                    )));
                }
                let (ref_raw, _) =
                    self.raw_values(ctx, &ref_responses, providers.logprobs.as_deref_mut())?;
                Ok(self.reference_rewards(&ref_raw))
            });
            let out = result.map(|(r, hit)| (r.clone(), hit));
            self.cache = cache;
            let (r, hit) = out?;
            cache_hit = Some(hit);
            Some(r)
        } else {
            None
        };

        let lengths: Vec<usize> = responses.iter().map(|r| r.num_tokens).collect();
        let empty = Vec::new();
        let n = responses.len();
        let mut shaped = Vec::with_capacity(self.components.len());
        for (k, c) in self.components.iter_mut().enumerate() {
            let refs_k = refs
                .as_ref()
                .and_then(|r| r.components.get(&c.name))
                .unwrap_or(&empty);
            let s = c
                .shaper
                .apply(&raw[k], refs_k, &lengths)
                .map_err(|e| pipeline_err(format!("component `{}` shaping: {e}", c.name)))?;
            shaped.push(s);
        }
        let totals: Vec<f64> = (0..n)
            .map(|i| {
                self.components
                    .iter()
                    .zip(&shaped)
                    .map(|(c, s)| c.weight * s[i])
                    .sum()
            })
            .collect();
        let ref_totals = refs.as_ref().map(|r| r.totals.as_slice()).unwrap_or(&[]);
        let rewards = self
            .shaper
            .apply(&totals, ref_totals, &lengths)
            .map_err(|e| pipeline_err(format!("shaping: {e}")))?;

        let components: Vec<BTreeMap<String, f64>> = (0..n)
            .map(|i| {
                self.components
                    .iter()
                    .zip(&shaped)
                    .map(|(c, s)| (c.name.clone(), s[i]))
                    .collect()
            })
            .collect();
        let verdicts = match verdicts {
            Some(v) => v,
            None => components
                .iter()
                .zip(&rewards)
                .map(|(row, &r)| Verdict {
                    score: r,
                    reason: row
                        .iter()
                        .map(|(k, v)| format!("{k}={v:.4}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    extracted: None,
                })
                .collect(),
        };
        Ok(ScoredGroup {
            rewards,
            components,
            verdicts,
            external_failures: self.external_failures() - failures_before,
            reference_cache_hit: cache_hit,
        })
    }

    fn reference_rewards(&self, raw: &[Vec<f64>]) -> ReferenceRewards {
        let m = raw.first().map(|v| v.len()).unwrap_or(0);
        ReferenceRewards {
            components: self
                .components
                .iter()
                .zip(raw)
                .map(|(c, v)| (c.name.clone(), v.clone()))
                .collect(),
            totals: (0..m)
                .map(|i| {
                    self.components
                        .iter()
                        .zip(raw)
                        .map(|(c, v)| c.weight * v[i])
                        .sum()
                })
                .collect(),
        }
    }

    /// Raw values of every component (indexed like the config) and the first verifier's
    /// verdicts.
    #[allow(clippy::type_complexity)]
    fn raw_values(
        &mut self,
        ctx: &GroupContext,
        responses: &[ResponseContext],
        mut logprobs: Option<&mut (dyn LogProbProvider + '_)>,
    ) -> Result<(Vec<Vec<f64>>, Option<Vec<Verdict>>)> {
        let n = responses.len();
        let mut values: Vec<Option<Vec<f64>>> = vec![None; self.components.len()];
        let mut verdicts: Option<Vec<Verdict>> = None;
        // Pass 1: verifiers.
        for (k, c) in self.components.iter().enumerate() {
            if let Scorer::Verifier(check) = &c.scorer {
                let v = responses
                    .iter()
                    .map(|r| self.verify(*check, ctx, r))
                    .collect::<Result<Vec<_>>>()?;
                values[k] = Some(v.iter().map(|x| x.score).collect());
                if self.verifier == Some(k) {
                    verdicts = Some(v);
                }
            }
        }
        // Pass 2: everything but verifiers and gates.
        for k in 0..self.components.len() {
            if values[k].is_some() || matches!(self.components[k].scorer, Scorer::Gated(_)) {
                continue;
            }
            let v = self.score_plain(
                k,
                ctx,
                responses,
                verdicts.as_deref(),
                logprobs.as_deref_mut(),
            )?;
            values[k] = Some(v);
        }
        // Pass 3: gates over raw values.
        for k in 0..self.components.len() {
            if let Scorer::Gated(chs) = &self.components[k].scorer {
                let v = (0..n)
                    .map(|i| {
                        let channels: Vec<Channel> = chs
                            .iter()
                            .map(|&(j, t)| Channel {
                                value: values[j].as_ref().expect("plain components done")[i],
                                threshold: t.unwrap_or(f64::NEG_INFINITY),
                            })
                            .collect();
                        gated_channels(&channels)
                    })
                    .collect();
                values[k] = Some(v);
            }
        }
        let values: Vec<Vec<f64>> = values
            .into_iter()
            .map(|v| v.expect("every component scored"))
            .collect();
        for (c, v) in self.components.iter().zip(&values) {
            if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                return Err(Error::Reward(format!(
                    "component `{}` gave response {i} the non-finite value {x}",
                    c.name
                )));
            }
        }
        Ok((values, verdicts))
    }

    fn verify(
        &self,
        check: VerifierCheck,
        ctx: &GroupContext,
        r: &ResponseContext,
    ) -> Result<Verdict> {
        let Some(first) = ctx.references.first() else {
            return Err(Error::Reward(format!(
                "verifier: prompt {:?} has no reference answer to check against",
                ctx.prompt
            )));
        };
        Ok(match check {
            VerifierCheck::Exact => exact_answer(&r.text, r.finished, first),
            VerifierCheck::Math => {
                let mut best = self.math.verify(&r.text, first);
                for reference in &ctx.references[1..] {
                    let v = self.math.verify(&r.text, reference);
                    if v.score > best.score {
                        best = v;
                    }
                }
                best
            }
        })
    }

    fn score_plain(
        &mut self,
        k: usize,
        ctx: &GroupContext,
        responses: &[ResponseContext],
        verdicts: Option<&[Verdict]>,
        logprobs: Option<&mut (dyn LogProbProvider + '_)>,
    ) -> Result<Vec<f64>> {
        let name = self.components[k].name.clone();
        let request = |r: &ResponseContext| RewardRequest {
            prompt: ctx.prompt.clone(),
            response: r.text.clone(),
            references: ctx.references.clone(),
            metadata: response_metadata(&ctx.metadata, r),
        };
        match &mut self.components[k].scorer {
            Scorer::LengthPenalty { coef, free_len } => Ok(responses
                .iter()
                .map(|r| -*coef * r.num_tokens.saturating_sub(*free_len) as f64)
                .collect()),
            Scorer::External(e) => responses.iter().map(|r| e.score(&request(r))).collect(),
            Scorer::Function(f) => responses
                .iter()
                .map(|r| {
                    f.score(&request(r)).map_err(|e| {
                        Error::Reward(format!("reward function of component `{name}`: {e}"))
                    })
                })
                .collect(),
            Scorer::RewardModel(rm) => rm.score(&ctx.prompt, responses),
            Scorer::Sar => {
                let lp = logprobs.ok_or_else(|| {
                    pipeline_err(format!(
                        "component `{name}` (sar) needs token log-probs, but no LogProbProvider \
                         was given"
                    ))
                })?;
                sar_values(ctx, responses, lp)
                    .map_err(|e| Error::Reward(format!("component `{name}` (sar): {e}")))
            }
            Scorer::Consistency(judge) => {
                let verdicts = verdicts.ok_or_else(|| {
                    Error::Reward(format!("component `{name}`: no verifier verdicts"))
                })?;
                responses
                    .iter()
                    .zip(verdicts)
                    .map(|(r, v)| {
                        let format = f64::from(u8::from(
                            r.finished
                                && v.extracted.as_deref().is_some_and(|x| !x.trim().is_empty()),
                        ));
                        consistency_reward(format, v.score, judge.judge(&ctx.prompt, &r.text))
                            .map_err(|e| {
                                Error::Reward(format!("component `{name}` (consistency): {e}"))
                            })
                    })
                    .collect()
            }
            Scorer::Milestones(credit) => responses
                .iter()
                .map(|r| {
                    let mut t = MilestoneTracker::new(*credit)
                        .map_err(|e| Error::Reward(format!("component `{name}`: {e}")))?;
                    for m in &r.milestones {
                        t.observe(m);
                    }
                    Ok(t.total())
                })
                .collect(),
            Scorer::Verifier(_) | Scorer::Gated(_) => {
                unreachable!("verifiers and gates are scored in their own passes")
            }
        }
    }
}

fn names<'a>(keys: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = keys.map(|s| s.as_str()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// The group's metadata object with `finished` and `num_tokens` of the response added.
fn response_metadata(group: &serde_json::Value, r: &ResponseContext) -> serde_json::Value {
    let mut m = match group {
        serde_json::Value::Object(map) => map.clone(),
        serde_json::Value::Null => serde_json::Map::new(),
        other => {
            let mut map = serde_json::Map::new();
            map.insert("group".into(), other.clone());
            map
        }
    };
    m.insert("finished".into(), r.finished.into());
    m.insert("num_tokens".into(), r.num_tokens.into());
    serde_json::Value::Object(m)
}

/// R_SA for each response: log p(a|q) from the response (or the provider), log p(a) from the
/// provider with an empty prompt. One provider call per pass for the whole group.
fn sar_values(
    ctx: &GroupContext,
    responses: &[ResponseContext],
    lp: &mut dyn LogProbProvider,
) -> Result<Vec<f64>> {
    let missing: Vec<usize> = (0..responses.len())
        .filter(|&i| responses[i].token_logprobs.is_none())
        .collect();
    let mut given_q: Vec<Option<Vec<f64>>> =
        responses.iter().map(|r| r.token_logprobs.clone()).collect();
    if !missing.is_empty() {
        let reqs: Vec<LogProbRequest> = missing
            .iter()
            .map(|&i| LogProbRequest {
                prompt: &ctx.prompt,
                response: &responses[i].text,
                finished: responses[i].finished,
            })
            .collect();
        let got = lp.logprobs(&reqs)?;
        check_count("log p(a|q)", reqs.len(), got.len())?;
        for (&i, v) in missing.iter().zip(got) {
            given_q[i] = Some(v);
        }
    }
    let reqs: Vec<LogProbRequest> = responses
        .iter()
        .map(|r| LogProbRequest {
            prompt: "",
            response: &r.text,
            finished: r.finished,
        })
        .collect();
    let alone = lp.logprobs(&reqs)?;
    check_count("log p(a)", reqs.len(), alone.len())?;
    given_q
        .iter()
        .zip(&alone)
        .enumerate()
        .map(|(i, (q, a))| {
            self_aligned_reward(q.as_deref().unwrap_or(&[]), a)
                .map_err(|e| Error::Reward(format!("response {i}: {e}")))
        })
        .collect()
}

fn check_count(what: &str, expected: usize, found: usize) -> Result<()> {
    if expected != found {
        return Err(Error::Reward(format!(
            "LogProbProvider ({what}): expected {expected} log-prob vectors, found {found}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::shaping::{log_sigmoid, reference_quantile, sigmoid};
    use std::cell::RefCell;
    use std::rc::Rc;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    fn group(prompt: &str, answer: &str) -> GroupContext {
        GroupContext {
            prompt: prompt.into(),
            references: vec![answer.into()],
            metadata: serde_json::Value::Null,
        }
    }

    fn resp(text: &str, finished: bool, num_tokens: usize) -> ResponseContext {
        ResponseContext {
            text: text.into(),
            finished,
            num_tokens,
            ..Default::default()
        }
    }

    fn verifier(name: &str) -> ComponentConfig {
        ComponentConfig::new(
            name,
            ComponentKind::Verifier {
                check: VerifierCheck::Exact,
            },
        )
    }

    fn length(coef: f64, free_len: usize) -> ComponentConfig {
        ComponentConfig::new("length", ComponentKind::LengthPenalty { coef, free_len })
    }

    #[test]
    fn toml_config_parses_with_defaults() {
        let text = r#"
            reference_samples = 4
            shaping = { kind = "running-norm" }
            [[components]]
            name = "correct"
            kind = "verifier"
            [[components]]
            name = "length"
            kind = "length-penalty"
            weight = 0.5
            coef = 0.02
            [[components]]
            name = "sar"
            kind = "sar"
            [[components]]
            name = "cmd"
            kind = "external"
            command = ["python3", "examples/reward_length.py"]
            on_error = "fail-response"
            timeout_s = 2.0
            [[components]]
            name = "gate"
            kind = "gated"
            weight = 0.0
            channels = [{ component = "correct", threshold = 0.5 }, { component = "length" }]
        "#;
        let cfg: PipelineConfig = toml::from_str(text).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.reference_samples, 4);
        assert_eq!(cfg.shaping, ShapingConfig::RunningNorm);
        assert_eq!(
            cfg.components[0].kind,
            ComponentKind::Verifier {
                check: VerifierCheck::Exact
            }
        );
        assert_eq!(cfg.components[0].weight(), 1.0);
        assert_eq!(cfg.components[1].weight(), 0.5);
        assert_eq!(
            cfg.components[1].kind,
            ComponentKind::LengthPenalty {
                coef: 0.02,
                free_len: 300
            }
        );
        // SAR's default weight is α = 0.2.
        assert_eq!(cfg.components[2].weight(), 0.2);
        match &cfg.components[3].kind {
            ComponentKind::External(e) => {
                assert_eq!(e.on_error, crate::reward::external::OnError::FailResponse);
                assert_eq!((e.timeout_s, e.failure_reward), (2.0, 0.0));
            }
            other => panic!("{other:?}"),
        }
        // Round trip through TOML.
        let back: PipelineConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn run_config_section_loads_validates_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(
            &file,
            "[reward.pipeline]\nshaping = { kind = \"centered\" }\nreference_samples = 2\n\
             [[reward.pipeline.components]]\nname = \"correct\"\nkind = \"verifier\"\n\
             [[reward.pipeline.components]]\nname = \"len\"\nkind = \"length-penalty\"\n",
        )
        .unwrap();
        // It loads through the run-config path (`grove train` uses it)...
        let loaded = crate::config::load(Some(&file), &[]).unwrap();
        assert_eq!(
            loaded.reward.pipeline.as_ref().map(|p| p.components.len()),
            Some(2)
        );
        // ...and deserialises and round-trips as a config value.
        let text = std::fs::read_to_string(&file).unwrap();
        let cfg: crate::config::RunConfig = toml::from_str(&text).unwrap();
        let p = cfg.reward.pipeline.as_ref().unwrap();
        assert_eq!(p.components.len(), 2);
        assert_eq!(p.shaping, ShapingConfig::Centered);
        // The saved config.toml of a run reads back to the same config.
        let back: crate::config::RunConfig = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(back.reward, cfg.reward);
        // Without the section there is no pipeline.
        assert!(crate::config::RunConfig::default()
            .reward
            .pipeline
            .is_none());

        std::fs::write(
            &file,
            "[[reward.pipeline.components]]\nname = \"g\"\nkind = \"gated\"\n\
             channels = [{ component = \"missing\" }]\n",
        )
        .unwrap();
        let e = crate::config::load(Some(&file), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("run.toml")
                && e.contains("reward.pipeline.components[0]")
                && e.contains("`missing`"),
            "{e}"
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = |text: &str| {
            toml::from_str::<PipelineConfig>(text)
                .unwrap_err()
                .to_string()
        };
        let e = bad("[[components]]\nname = \"a\"\nkind = \"verifer\"\n");
        assert!(e.contains("verifer") && e.contains("length-penalty"), "{e}");
        let e = bad("[[components]]\nname = \"a\"\nkind = \"length-penalty\"\ncoeff = 1\n");
        assert!(e.contains("coeff"), "{e}");

        let invalid = |cfg: PipelineConfig| cfg.validate().unwrap_err().to_string();
        let e = invalid(PipelineConfig::new(vec![verifier("a"), verifier("a")]));
        assert!(e.contains("already used"), "{e}");
        let e = invalid(PipelineConfig::new(vec![verifier("a/b")]));
        assert!(e.contains("components[0].name"), "{e}");
        let e = invalid(PipelineConfig::new(vec![ComponentConfig::new(
            "g",
            ComponentKind::Gated {
                channels: vec![GateChannel {
                    component: "nope".into(),
                    threshold: None,
                }],
            },
        )]));
        assert!(e.contains("`nope` is not a component"), "{e}");
        let e = invalid(PipelineConfig::new(vec![ComponentConfig::new(
            "c",
            ComponentKind::Consistency {
                judge: "last-number".into(),
            },
        )]));
        assert!(e.contains("needs a verifier"), "{e}");
        let e = invalid(PipelineConfig {
            shaping: ShapingConfig::Par,
            ..PipelineConfig::new(vec![verifier("a").shaped(ShapingConfig::Centered)])
        });
        assert!(e.contains("cannot be shaped themselves"), "{e}");
        let e = invalid(PipelineConfig::new(vec![verifier("a").weighted(f64::NAN)]));
        assert!(e.contains("weight"), "{e}");
        let e = invalid(PipelineConfig::new(vec![]));
        assert!(e.contains("at least one component"), "{e}");
    }

    #[test]
    fn weighted_sum_of_verifier_and_length_penalty() {
        // correct (w 1) + length (w 0.5, coef 0.1, free 2):
        //   "85" finished, 3 tokens:   1 + 0.5·(−0.1·1) = 0.95
        //   "84" finished, 3 tokens:   0 + 0.5·(−0.1·1) = −0.05
        //   "85" unfinished, 2 tokens: 0 + 0 = 0
        let mut p = RewardPipeline::new(PipelineConfig::new(vec![
            verifier("correct"),
            length(0.1, 2).weighted(0.5),
        ]))
        .unwrap();
        let out = p
            .score_group(
                &group("37+48=", "85"),
                &[
                    resp("85", true, 3),
                    resp("84", true, 3),
                    resp("85", false, 2),
                ],
            )
            .unwrap();
        assert!(close(out.rewards[0], 0.95), "{:?}", out.rewards);
        assert!(close(out.rewards[1], -0.05));
        assert!(close(out.rewards[2], 0.0));
        assert_eq!(out.components[0]["correct"], 1.0);
        assert!(close(out.components[0]["length"], -0.1));
        assert_eq!(out.verdicts[1].score, 0.0);
        assert!(out.verdicts[1].reason.contains("mismatch"));
        let means = component_means(&[out]);
        // correct: (1 + 0 + 0)/3; length: (−0.1 − 0.1 + 0)/3
        assert!(close(means["reward/correct/mean"], 1.0 / 3.0));
        assert!(close(means["reward/length/mean"], -0.2 / 3.0));
    }

    #[test]
    fn math_verifier_takes_the_best_reference() {
        let mut p = RewardPipeline::new(PipelineConfig::new(vec![ComponentConfig::new(
            "math",
            ComponentKind::Verifier {
                check: VerifierCheck::Math,
            },
        )]))
        .unwrap();
        let ctx = GroupContext {
            prompt: "q".into(),
            references: vec!["3".into(), "0.5".into()],
            metadata: serde_json::Value::Null,
        };
        let out = p
            .score_group(
                &ctx,
                &[resp("so #### 1/2", true, 5), resp("#### 4", true, 3)],
            )
            .unwrap();
        assert_eq!(out.rewards, vec![1.0, 0.0]);
        // A verifier with no reference answer is an error, not a silent 0.
        let err = p
            .score_group(
                &GroupContext {
                    prompt: "q".into(),
                    ..Default::default()
                },
                &[resp("1", true, 1)],
            )
            .unwrap_err();
        assert!(err.to_string().contains("no reference answer"), "{err}");
    }

    /// Reference provider returning fixed responses and counting its calls.
    struct FixedRefs {
        calls: Rc<RefCell<Vec<String>>>,
        responses: Vec<ResponseContext>,
    }
    impl ReferenceProvider for FixedRefs {
        fn reference_responses(
            &mut self,
            ctx: &GroupContext,
            m: usize,
        ) -> Result<Vec<ResponseContext>> {
            self.calls.borrow_mut().push(ctx.prompt.clone());
            Ok(self.responses.iter().cycle().take(m).cloned().collect())
        }
    }

    #[test]
    fn par_against_cached_reference_rewards() {
        // References (M = 2): one correct, one wrong → totals [1, 0].
        // PAR(r) = (σ(r − 1) + σ(r − 0))/2: r = 1 → (0.5 + 0.7310585786)/2 = 0.6155292893;
        // r = 0 → (σ(−1) + 0.5)/2 = (0.2689414214 + 0.5)/2 = 0.3844707107.
        let cfg = PipelineConfig {
            shaping: ShapingConfig::Par,
            reference_samples: 2,
            ..PipelineConfig::new(vec![verifier("correct")])
        };
        let mut p = RewardPipeline::new(cfg).unwrap();
        let calls = Rc::new(RefCell::new(vec![]));
        let mut refs = FixedRefs {
            calls: Rc::clone(&calls),
            responses: vec![resp("85", true, 3), resp("11", true, 3)],
        };
        let rs = [resp("85", true, 3), resp("84", true, 3)];
        let mut score = |p: &mut RewardPipeline, prompt: &str| {
            p.score_group_with(
                &group(prompt, "85"),
                &rs,
                &mut Providers {
                    references: Some(&mut refs),
                    logprobs: None,
                },
            )
            .unwrap()
        };
        let a = score(&mut p, "37+48=");
        assert!(
            close(a.rewards[0], 0.615_529_289_315_002_4),
            "{:?}",
            a.rewards
        );
        assert!(close(a.rewards[1], 0.384_470_710_684_997_6));
        assert!(close(a.rewards[0], (sigmoid(0.0) + sigmoid(1.0)) / 2.0));
        assert_eq!(a.reference_cache_hit, Some(false));
        // Same prompt again: served from the cache, the provider is not called.
        let b = score(&mut p, "37+48=");
        assert_eq!(b.rewards, a.rewards);
        assert_eq!(b.reference_cache_hit, Some(true));
        assert_eq!(calls.borrow().len(), 1);
        // A new prompt calls the provider once more.
        score(&mut p, "48+37=");
        assert_eq!(
            *calls.borrow(),
            vec!["37+48=".to_string(), "48+37=".to_string()]
        );
        assert_eq!(
            (p.cache().hits(), p.cache().misses(), p.cache().len()),
            (1, 2, 2)
        );
        assert_eq!(
            p.cache().get("37+48=").unwrap(),
            &ReferenceRewards {
                components: [("correct".to_string(), vec![1.0, 0.0])]
                    .into_iter()
                    .collect(),
                totals: vec![1.0, 0.0],
            }
        );
        // Without a provider the missing callback is named.
        let err = p
            .score_group(&group("new=", "1"), &rs)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ReferenceProvider"), "{err}");
    }

    #[test]
    fn reference_cache_evicts_oldest_and_keeps_errors_out() {
        let mut c = ReferenceRewardCache::new(2);
        let rr = |x: f64| ReferenceRewards {
            components: BTreeMap::new(),
            totals: vec![x],
        };
        c.get_or_compute("a", || Ok(rr(1.0))).unwrap();
        c.get_or_compute("b", || Ok(rr(2.0))).unwrap();
        assert!(c
            .get_or_compute("x", || Err(Error::Reward("no".into())))
            .is_err());
        assert_eq!(c.len(), 2);
        c.get_or_compute("c", || Ok(rr(3.0))).unwrap();
        assert!(c.get("a").is_none(), "oldest entry evicted");
        assert_eq!(c.get("b").unwrap().totals, vec![2.0]);
        let (v, hit) = c.get_or_compute("b", || panic!("must be cached")).unwrap();
        assert!(hit && v.totals == vec![2.0]);
        let back: ReferenceRewardCache =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn lsc_per_reward_component_sums_as_and() {
        // Two "reward models" (user functions) each with LSC against its own references;
        // the sum is log P(good on both). Function a = text length, b = 1 if it contains '5'.
        let reg = Registry::default()
            .function(
                "len",
                Box::new(|r: &RewardRequest| -> Result<f64> { Ok(r.response.len() as f64) }),
            )
            .function(
                "five",
                Box::new(|r: &RewardRequest| -> Result<f64> {
                    Ok(f64::from(u8::from(r.response.contains('5'))))
                }),
            );
        let lsc = ShapingConfig::Lsc { quantile: 0.85 };
        let cfg = PipelineConfig {
            reference_samples: 3,
            ..PipelineConfig::new(vec![
                ComponentConfig::new(
                    "a",
                    ComponentKind::Function {
                        function: "len".into(),
                    },
                )
                .shaped(lsc.clone()),
                ComponentConfig::new(
                    "b",
                    ComponentKind::Function {
                        function: "five".into(),
                    },
                )
                .shaped(lsc),
            ])
        };
        let mut p = RewardPipeline::with_registry(cfg, reg).unwrap();
        // References: texts of length 1, 2, 3 → a refs [1, 2, 3], q_a = 2 + 1.0364333895 = 3.0364333895;
        // b refs: "5" → 1, "12" → 0, "555" → 1 → mean 2/3, sample std = sqrt(1/3) = 0.5773502692,
        // q_b = 0.6666666667 + 1.0364333895·0.5773502692 = 1.2650517631.
        let mut refs = FixedRefs {
            calls: Rc::new(RefCell::new(vec![])),
            responses: vec![
                resp("5", true, 1),
                resp("12", true, 2),
                resp("555", true, 3),
            ],
        };
        let out = p
            .score_group_with(
                &group("p", "x"),
                &[resp("4444", true, 4)],
                &mut Providers {
                    references: Some(&mut refs),
                    logprobs: None,
                },
            )
            .unwrap();
        let qa = reference_quantile(&[1.0, 2.0, 3.0], 0.85).unwrap();
        let qb = reference_quantile(&[1.0, 0.0, 1.0], 0.85).unwrap();
        assert!((qb - 1.265_051_763_1).abs() < 1e-8, "{qb}");
        // a = log σ(4 − 3.0364333895) = log σ(0.9635666105) = −0.3231913553;
        // b = log σ(0 − 1.2650517631) = −1.2650517631 − ln(1 + e^−1.2650517631) = −1.5136483691
        let expected = log_sigmoid(4.0 - qa) + log_sigmoid(0.0 - qb);
        assert!(
            close(out.rewards[0], expected),
            "{} vs {expected}",
            out.rewards[0]
        );
        assert!((out.components[0]["a"] - -0.323_191_355_3).abs() < 1e-8);
        assert!((out.components[0]["b"] - -1.513_648_369_1).abs() < 1e-8);
        assert_eq!(out.verdicts[0].score, out.rewards[0]);
        assert!(out.verdicts[0].reason.contains("a=") && out.verdicts[0].reason.contains("b="));
    }

    /// Log-probs from a table: prompt "" → the answer-only pass.
    struct TableLogProbs {
        calls: usize,
    }
    impl LogProbProvider for TableLogProbs {
        fn logprobs(&mut self, reqs: &[LogProbRequest<'_>]) -> Result<Vec<Vec<f64>>> {
            self.calls += 1;
            Ok(reqs
                .iter()
                .map(|r| match (r.prompt.is_empty(), r.response) {
                    (true, "85") => vec![-2.0, -2.0],  // ppl(a) = e²
                    (false, "85") => vec![-0.5, -1.5], // ppl(a|q) = e¹
                    (true, _) => vec![-1.0],           // ppl(a) = e
                    (false, _) => vec![-1.2],          // ppl(a|q) = e^1.2
                })
                .collect())
        }
    }

    #[test]
    fn sar_adds_alpha_times_self_aligned_reward() {
        // correct + 0.2·R_SA:
        //   "85": R_SA = 1 − e^(−2 − (−1)) = 1 − e^−1 = 0.6321205588 → 1 + 0.1264241118 = 1.1264241118
        //   "84": R_SA = 1 − e^(−1 − (−1.2)) = 1 − e^0.2 = −0.2214027582 → 0 − 0.0442805516
        let mut p = RewardPipeline::new(PipelineConfig::new(vec![
            verifier("correct"),
            ComponentConfig::new("sar", ComponentKind::Sar {}),
        ]))
        .unwrap();
        assert!(p.needs_logprobs() && !p.needs_references());
        let mut lp = TableLogProbs { calls: 0 };
        let out = p
            .score_group_with(
                &group("37+48=", "85"),
                &[resp("85", true, 2), resp("84", true, 2)],
                &mut Providers {
                    logprobs: Some(&mut lp),
                    references: None,
                },
            )
            .unwrap();
        assert!(
            close(out.rewards[0], 1.126_424_111_765_711_4),
            "{:?}",
            out.rewards
        );
        assert!(close(out.rewards[1], -0.044_280_551_632_033_96));
        assert!(close(out.components[0]["sar"], 0.632_120_558_828_557_7));
        assert_eq!(lp.calls, 2, "one batched call per pass");
        // With the rollout's log-probs supplied, only the answer-only pass is asked for.
        let mut with_lp = resp("85", true, 2);
        with_lp.token_logprobs = Some(vec![-1.0, -1.0]); // ppl(a|q) = e → same R_SA as above
        let mut lp2 = TableLogProbs { calls: 0 };
        let out = p
            .score_group_with(
                &group("37+48=", "85"),
                &[with_lp],
                &mut Providers {
                    logprobs: Some(&mut lp2),
                    references: None,
                },
            )
            .unwrap();
        assert!(close(out.rewards[0], 1.126_424_111_765_711_4));
        assert_eq!(lp2.calls, 1);
        let err = p
            .score_group(&group("q", "85"), &[resp("85", true, 2)])
            .unwrap_err();
        assert!(err.to_string().contains("LogProbProvider"), "{err}");
    }

    #[test]
    fn consistency_with_builtin_and_registered_judges() {
        struct Always(i8);
        impl ConsistencyJudge for Always {
            fn judge(&self, _: &str, _: &str) -> i8 {
                self.0
            }
        }
        let cfg = |judge: &str| {
            PipelineConfig::new(vec![
                ComponentConfig::new(
                    "math",
                    ComponentKind::Verifier {
                        check: VerifierCheck::Math,
                    },
                )
                .weighted(0.0),
                ComponentConfig::new(
                    "cons",
                    ComponentKind::Consistency {
                        judge: judge.into(),
                    },
                ),
            ])
        };
        let ctx = group("q", "8");
        let rs = [
            resp("5 + 3 = 8\n#### 8", true, 9), // format 1, acc 1, cons 1: 0.5 + 1.5 = 2
            resp("5 + 3 = 8\n#### 9", true, 9), // format 1, acc 0: 0.5
            resp("5 + 3 = 9\n#### 8", true, 9), // acc 1, cons −1: 0.5 + 0.5 = 1
            resp("5 + 3 = 8\n#### 8", false, 9), // truncated: format 0, acc 1, cons 1: 1.5
        ];
        let mut p = RewardPipeline::new(cfg("last-number")).unwrap();
        assert_eq!(
            p.score_group(&ctx, &rs).unwrap().rewards,
            vec![2.0, 0.5, 1.0, 1.5]
        );
        let reg = Registry::default().judge("never", Box::new(Always(-1)));
        let mut p = RewardPipeline::with_registry(cfg("never"), reg).unwrap();
        // cons −1 everywhere: 0.5 + 0.5, 0.5, 0.5 + 0.5, 0 + 0.5
        assert_eq!(
            p.score_group(&ctx, &rs).unwrap().rewards,
            vec![1.0, 0.5, 1.0, 0.5]
        );
        let err = RewardPipeline::new(cfg("nobody"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`nobody`"), "{err}");
    }

    #[test]
    fn gated_component_truth_table() {
        // gate = correct (threshold 0.5) then length (always passes): G-RA with one step reward.
        // Component weights 0 so the reward is the gate alone.
        let cfg = PipelineConfig::new(vec![
            verifier("correct").weighted(0.0),
            length(0.1, 0).weighted(0.0),
            ComponentConfig::new(
                "gate",
                ComponentKind::Gated {
                    channels: vec![
                        GateChannel {
                            component: "correct".into(),
                            threshold: Some(0.5),
                        },
                        GateChannel {
                            component: "length".into(),
                            threshold: None,
                        },
                    ],
                },
            ),
        ]);
        let mut p = RewardPipeline::new(cfg).unwrap();
        let out = p
            .score_group(
                &group("1+1=", "2"),
                &[resp("2", true, 2), resp("3", true, 2)],
            )
            .unwrap();
        // correct passes: 1 + (−0.1·2) = 0.8; wrong fails the first gate: 0 (length ignored).
        assert!(close(out.rewards[0], 0.8), "{:?}", out.rewards);
        assert_eq!(out.rewards[1], 0.0);
        assert!(close(out.components[1]["length"], -0.2));
    }

    #[test]
    fn milestones_and_running_shaping_with_state_round_trip() {
        let cfg = PipelineConfig {
            shaping: ShapingConfig::RunningMinMax,
            ..PipelineConfig::new(vec![ComponentConfig::new(
                "steps",
                ComponentKind::Milestones { credit: 0.1 },
            )])
        };
        let mut p = RewardPipeline::new(cfg.clone()).unwrap();
        let r = |ms: &[&str]| ResponseContext {
            milestones: ms.iter().map(|s| s.to_string()).collect(),
            ..resp("", true, 1)
        };
        // raw: {a,b} → 0.2, {a,a} → 0.1, {} → 0; min-max over [0.2, 0.1, 0] → [1, 0.5, 0]
        let out = p
            .score_group(
                &GroupContext::default(),
                &[r(&["a", "b"]), r(&["a", "a"]), r(&[])],
            )
            .unwrap();
        assert!(close(out.components[0]["steps"], 0.2));
        assert!(close(out.rewards[1], 0.5) && out.rewards[0] == 1.0 && out.rewards[2] == 0.0);
        // Resume: a fresh pipeline with the saved state continues identically.
        let state = p.state();
        let mut q = RewardPipeline::new(cfg).unwrap();
        q.restore(serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap())
            .unwrap();
        let g = [r(&["a"])]; // 0.1 → (0.1 − 0)/(0.2 − 0) = 0.5
        let a = p.score_group(&GroupContext::default(), &g).unwrap();
        let b = q.score_group(&GroupContext::default(), &g).unwrap();
        assert_eq!(a, b);
        assert!(close(a.rewards[0], 0.5));
        // State of another config is refused.
        let mut other = RewardPipeline::new(PipelineConfig::new(vec![verifier("steps")])).unwrap();
        assert!(other.restore(state).is_err());
    }

    #[test]
    fn external_component_counts_failures() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("half.py");
        // Answers 1 for "ok", prints garbage otherwise.
        std::fs::write(
            &script,
            "import sys, json\nfor line in sys.stdin:\n    r = json.loads(line)\n    \
             assert r['metadata']['num_tokens'] >= 1 and r['references'] == ['2']\n    \
             print(1 if r['response'] == 'ok' else 'garbage', flush=True)\n",
        )
        .unwrap();
        let ext = ExternalConfig {
            timeout_s: 1.0,
            on_error: crate::reward::external::OnError::FailResponse,
            failure_reward: -1.0,
            ..ExternalConfig::new(vec!["python3".into(), script.display().to_string()])
        };
        let mut p = RewardPipeline::new(PipelineConfig::new(vec![ComponentConfig::new(
            "ext",
            ComponentKind::External(ext),
        )]))
        .unwrap();
        let out = p
            .score_group(
                &group("1+1=", "2"),
                &[
                    resp("ok", true, 2),
                    resp("bad", true, 2),
                    resp("ok", true, 2),
                ],
            )
            .unwrap();
        assert_eq!(out.rewards, vec![1.0, -1.0, 1.0]);
        assert_eq!(out.external_failures, 1);
        assert_eq!(p.external_failures(), 1);
    }

    #[test]
    fn unknown_function_and_non_finite_values_are_errors() {
        let cfg = PipelineConfig::new(vec![ComponentConfig::new(
            "f",
            ComponentKind::Function {
                function: "mine".into(),
            },
        )]);
        let err = RewardPipeline::new(cfg.clone()).err().unwrap().to_string();
        assert!(
            err.contains("`mine`") && err.contains("registered: none"),
            "{err}"
        );
        let reg = Registry::default().function(
            "mine",
            Box::new(|_: &RewardRequest| -> Result<f64> { Ok(f64::NAN) }),
        );
        let mut p = RewardPipeline::with_registry(cfg, reg).unwrap();
        let err = p
            .score_group(&group("q", "a"), &[resp("x", true, 1)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("component `f`") && err.contains("NaN"),
            "{err}"
        );
    }
}
