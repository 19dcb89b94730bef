//! A composable reward pipeline (docs/algorithms.md#reward-shaping, docs/rewards.md): named
//! components with weights, each
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
//! - `turns`: an `[env]` episode's discounted per-turn rewards: the return, the outcome or the
//!   steps ([`TurnPart`]); with `gated` over [outcome ≥ δ, steps] this is G-RA over turns.
//!   A per-turn `gate` ([`TurnGate`]) counts turn t only once its condition held by turn t.
//! - `success`: 1 when the `[env]` episode was solved.
use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::reward::exact::exact_answer;
use crate::reward::external::{ExternalConfig, RewardFn, RewardRequest};
use crate::reward::external_pool::ExternalPool;
use crate::reward::gates::{
    consistency_reward, gate_turns, gated_channels, gated_contributions, split_turns, Channel,
    ConsistencyJudge, LastNumberJudge, MilestoneTracker, DEFAULT_MILESTONE_CREDIT,
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

mod cache;
mod config;
#[cfg(test)]
mod tests;

pub use crate::reward::context::*;
pub use cache::*;
pub use config::*;

// ---------------------------------------------------------------------------------------------
// The pipeline

enum Scorer {
    Verifier(VerifierCheck),
    LengthPenalty { coef: f64, free_len: usize },
    External(Box<ExternalPool>),
    RewardModel(Box<RewardModelScorer>),
    Sar,
    Consistency(Box<dyn ConsistencyJudge>),
    Gated(Vec<(usize, Option<f64>)>),
    Milestones(f64),
    Function(Box<dyn RewardFn>),
    Turns(TurnPart, Option<TurnGate>),
    Success,
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
    /// Per response: component name → value after its own shaping, before its weight; and
    /// for each channel of a `gated` component, `<gated>/<channel>` → what that channel
    /// contributed to the gate (its raw value, 0 once an earlier channel failed).
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
                    ExternalPool::new(e.clone())
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
                ComponentKind::Turns { part, gate } => Scorer::Turns(*part, gate.clone()),
                ComponentKind::Success {} => Scorer::Success,
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
                let mut row: BTreeMap<String, f64> = self
                    .components
                    .iter()
                    .zip(&shaped)
                    .map(|(c, s)| (c.name.clone(), s[i]))
                    .collect();
                row.extend(self.gate_contributions(&raw, i));
                row
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

    /// `<gated>/<channel>` → the channel's contribution to each `gated` component, for
    /// response `i` (`raw` indexed like the config).
    fn gate_contributions(&self, raw: &[Vec<f64>], i: usize) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for c in &self.components {
            if let Scorer::Gated(chs) = &c.scorer {
                let channels: Vec<Channel> = chs
                    .iter()
                    .map(|&(j, t)| Channel {
                        value: raw[j][i],
                        threshold: t.unwrap_or(f64::NEG_INFINITY),
                    })
                    .collect();
                for (&(j, _), v) in chs.iter().zip(gated_contributions(&channels)) {
                    out.push((format!("{}/{}", c.name, self.components[j].name), v));
                }
            }
        }
        out
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
        for (k, slot) in values.iter_mut().enumerate() {
            if slot.is_some() || matches!(self.components[k].scorer, Scorer::Gated(_)) {
                continue;
            }
            let v = self.score_plain(
                k,
                ctx,
                responses,
                verdicts.as_deref(),
                logprobs.as_deref_mut(),
            )?;
            *slot = Some(v);
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
            Scorer::External(e) => e.score_all(&responses.iter().map(request).collect::<Vec<_>>()),
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
            Scorer::Turns(part, gate) => responses
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let t = episode_turns(r, i, &name, "turns")?;
                    let gated = match gate {
                        Some(g) => gate_turns(&t.discounted, &g.held(t)),
                        None => t.discounted.clone(),
                    };
                    let (outcome, steps) = split_turns(&gated, t.ended_by_env);
                    Ok(match part {
                        TurnPart::Return => outcome + steps,
                        TurnPart::Outcome => outcome,
                        TurnPart::Steps => steps,
                    })
                })
                .collect(),
            Scorer::Success => responses
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let t = episode_turns(r, i, &name, "success")?;
                    Ok(if t.success { 1.0 } else { 0.0 })
                })
                .collect(),
            Scorer::Verifier(_) | Scorer::Gated(_) => {
                unreachable!("verifiers and gates are scored in their own passes")
            }
        }
    }
}

/// The episode of response `i`, or an error naming the component that needs one.
fn episode_turns<'a>(
    r: &'a ResponseContext,
    i: usize,
    component: &str,
    kind: &str,
) -> Result<&'a EpisodeTurns> {
    r.turns.as_ref().ok_or_else(|| {
        Error::Reward(format!(
            "component `{component}` ({kind}) reads a multi-turn episode, but response {i} is a \
             single response (use it with an [env] section)"
        ))
    })
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
