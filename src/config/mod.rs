//! Configuration in two stages, ripgrep style: raw values (TOML file, recipe, `--set`
//! overrides) deserialised into [`RunConfig`], then a validated [`Plan`] with the derived numbers
//! that is printed at start-up and saved with the run.
//!
//! Layering, lowest first: built-in defaults (the quickstart), the recipe named by `recipe`,
//! the file's own values, then `--set section.key=value` overrides.
pub mod pipeline_rules;
pub mod recipes;
pub mod resume;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::advantage::AdvantageConfig;
use crate::error::{Error, Result};
use crate::loss::LossConfig;
use crate::rollout::SamplingParams;
use crate::sampling::SamplingConfig;
use crate::task::{TaskConfig, TaskKind};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Run name; the run directory is `<output_dir>/<name>` (suffixed -2, -3, ... if taken).
    pub name: String,
    /// One seed drives initialisation, prompt order and sampling.
    pub seed: u64,
    /// A named preset of the values below (see `grove recipes`); the file's values win.
    pub recipe: Option<String>,
    /// Folder that holds run directories.
    pub output_dir: String,
    pub model: ModelConfig,
    pub task: TaskConfig,
    pub warmup: WarmupConfig,
    pub rollout: RolloutConfig,
    pub sampling: SamplingConfig,
    pub reward: RewardConfig,
    pub advantage: AdvantageConfig,
    pub loss: LossConfig,
    pub train: TrainConfig,
    pub sync: SyncConfig,
    /// `grove explore` samples through this OpenAI-compatible completions server instead of
    /// its own weights (`--remote URL` sets `remote.url`); other commands ignore it.
    pub remote: Option<crate::rollout::remote::RemoteConfig>,
    /// Trackers besides metrics.jsonl: TensorBoard (on by default), MLflow (docs/metrics.md).
    pub report: crate::report::sinks::ReportConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            name: "quickstart".into(),
            seed: 0,
            recipe: None,
            output_dir: "runs".into(),
            model: ModelConfig::default(),
            task: TaskConfig::default(),
            warmup: WarmupConfig::default(),
            rollout: RolloutConfig::default(),
            sampling: SamplingConfig::default(),
            reward: RewardConfig::default(),
            advantage: AdvantageConfig::default(),
            loss: LossConfig::default(),
            train: TrainConfig::default(),
            sync: SyncConfig::default(),
            remote: None,
            report: Default::default(),
        }
    }
}

/// The policy: the built-in tiny Llama (shape given here) or a pretrained model, whose own
/// tokenizer and chat template then build the prompts (the shape fields are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// "builtin", or a pretrained model: an HF folder (config.json + safetensors +
    /// tokenizer.json), a GGUF file, a grove checkpoint or `hf://ORG/NAME` (feature `hub`).
    pub source: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    /// `[model.lora]`: train a LoRA adapter on a frozen base instead of every weight
    /// (docs/lora.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::model::lora::LoraConfig>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            source: "builtin".into(),
            hidden_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 4,
            intermediate_size: 352,
            lora: None,
        }
    }
}

/// Supervised warm-up on generated solutions, stopped on a held-out accuracy rule: below
/// ≈15% the RL reward carries too little signal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmupConfig {
    /// Stop once greedy held-out accuracy reaches this fraction.
    pub target_acc: f64,
    /// Hard cap on warm-up steps.
    pub max_steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Check the stop rule every this many steps.
    pub eval_every: usize,
    /// Held-out problems used by the stop rule (the first ones of the split).
    pub eval_size: usize,
}

impl Default for WarmupConfig {
    fn default() -> Self {
        WarmupConfig {
            target_acc: 0.2,
            max_steps: 4000,
            batch_size: 64,
            lr: 1e-3,
            eval_every: 50,
            eval_size: 200,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    pub prompts_per_step: usize,
    /// G: responses per prompt.
    pub group_size: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            prompts_per_step: 32,
            group_size: 8,
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 4,
        }
    }
}

impl RolloutConfig {
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
        }
    }
}

/// How rollouts reach the learner (docs/architecture.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// Each step samples with the current weights.
    #[default]
    OnPolicy,
    /// Rollouts come from a separate copy of the weights refreshed every `interval` steps,
    /// generated `offset` steps ahead of the learner.
    Lagged,
    /// An explorer thread fills a bounded buffer while the learner consumes it; weights are
    /// published every `interval` steps; the explorer runs at most `max_staleness` versions ahead.
    Async,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    pub mode: SyncMode,
    /// Refresh (lagged) or publish (async, buffer) the rollout weights every this many steps.
    pub interval: usize,
    /// Lagged mode: rollouts run this many steps ahead of the learner.
    pub offset: usize,
    /// Experiences more than this many versions older than the learner are dropped and
    /// counted in `staleness/dropped` (async and buffer modes; unset = keep everything).
    pub max_staleness: Option<u64>,
    /// Async mode: buffer capacity in groups (0 = 4 steps' worth).
    pub capacity: usize,
    /// Train from experiences in this buffer (`sqlite:PATH`, `postgres://...`) written by
    /// `grove explore` processes, instead of sampling.
    pub buffer: Option<String>,
    /// With `buffer`: folder where the learner publishes versioned weights for explorers.
    pub publish_dir: Option<String>,
    /// Train from an experience JSONL file (see docs/experience-schema.md); stops when the
    /// file is exhausted.
    pub offline: Option<String>,
    /// Buffer mode: give up after waiting this many seconds for experiences.
    pub wait_timeout_s: f64,
    /// Buffer mode: priority replay instead of FIFO — groups stay after use, priority =
    /// policy version − decay × use count, evicted after `max_uses` uses.
    pub replay: Option<crate::buffer::ReplayConfig>,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            mode: SyncMode::OnPolicy,
            interval: 1,
            offset: 0,
            max_staleness: None,
            capacity: 0,
            buffer: None,
            publish_dir: None,
            offline: None,
            wait_timeout_s: 600.0,
            replay: None,
        }
    }
}

/// Where rewards come from beyond the task's verifier.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// Experiments with noisy verifiers: flip a correct (1) observed reward to 0 with
    /// probability `noise_rho1` and an incorrect one to 1 with `noise_rho0` (seeded).
    /// `acc/train` stays the clean accuracy; `reward/mean` is what the learner saw.
    pub noise_rho0: f64,
    pub noise_rho1: f64,
    /// A composable reward pipeline (`[reward.pipeline]`, docs/rewards.md); None: the task's
    /// verifier alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<crate::reward::pipeline::PipelineConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// RL steps (one optimizer update per step).
    pub steps: usize,
    pub lr: f64,
    /// Linear learning-rate warm-up over this many RL steps.
    pub lr_warmup_steps: usize,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (0 disables).
    pub grad_clip: f64,
    /// Greedy held-out evaluation every this many steps (also at step 0 and at the end).
    pub eval_every: usize,
    /// Held-out problems evaluated (the first ones of the split; 0 = all).
    pub eval_size: usize,
    /// Write a checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,
    /// Prompts per step whose responses are written to samples.jsonl.
    pub log_samples: usize,
    /// Sequences per forward/backward pass of the learner (0 = the whole step at once). Below
    /// the step's sample count, log-probs are first computed without a graph, then gradients
    /// are accumulated pass by pass: peak memory follows the micro-batch, at the cost of one
    /// extra forward pass. The update is the same up to float rounding.
    pub micro_batch: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 300,
            lr: 1e-4,
            lr_warmup_steps: 10,
            weight_decay: 0.0,
            grad_clip: 1.0,
            eval_every: 25,
            eval_size: 0,
            checkpoint_every: 50,
            log_samples: 2,
            micro_batch: 0,
        }
    }
}

/// Sets `path` (dotted) in a TOML table to `value`, parsed as a TOML value when it parses
/// (numbers, booleans, arrays, quoted strings); a bare word such as `lagged` is a string. A
/// value that is neither (`1e-3x`, `[1, 2`) is an error naming the key, not a string.
pub fn apply_override(doc: &mut toml::Table, spec: &str) -> Result<()> {
    let (path, raw) = spec.split_once('=').ok_or_else(|| {
        Error::config(
            "--set",
            format!("`{spec}` is not of the form section.key=value"),
        )
    })?;
    let path = path.trim();
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(e) if !resume::is_bare_word(raw.trim()) => {
            return Err(Error::config(
                "--set",
                format!(
                    "`{}`: the value `{}` is not a TOML value ({}); quote text as \
                     {}=\"...\"",
                    path.trim(),
                    raw.trim(),
                    e.message().trim(),
                    path.trim()
                ),
            ))
        }
        Err(_) => toml::Value::String(raw.trim().to_string()),
    };
    let keys: Vec<&str> = path.split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(Error::config(
            "--set",
            format!("`{path}` is not a valid dotted key"),
        ));
    }
    let mut table = doc;
    for k in &keys[..keys.len() - 1] {
        let entry = table
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        table = entry.as_table_mut().ok_or_else(|| {
            Error::config(
                "--set",
                format!("`{k}` in `{path}` is a value, not a section"),
            )
        })?;
    }
    table.insert(keys[keys.len() - 1].to_string(), value);
    Ok(())
}

/// Deep-merges `over` into `base` (tables merge key by key; other values replace).
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn deserialize(table: toml::Table, source: &str) -> Result<RunConfig> {
    let text = toml::to_string(&table).map_err(|e| Error::config(source, e.to_string()))?;
    toml::from_str(&text).map_err(|e| Error::config(source, e.message().to_string()))
}

/// Reads a run config: `file` (None = quickstart defaults), its recipe, then overrides.
pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<RunConfig> {
    let (source, file_table) = match file {
        Some(p) => {
            let name = p.display().to_string();
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            // First pass on the text itself, so errors carry the file's line and column.
            if let Err(e) = toml::from_str::<RunConfig>(&text) {
                return Err(Error::config(&name, e.to_string().trim_end().to_string()));
            }
            let t: toml::Table =
                toml::from_str(&text).map_err(|e| Error::config(&name, e.to_string()))?;
            (name, t)
        }
        None => ("built-in quickstart".to_string(), toml::Table::new()),
    };
    let mut over = file_table;
    for o in overrides {
        apply_override(&mut over, o)?;
    }
    let recipe = over
        .get("recipe")
        .and_then(|v| v.as_str())
        .map(String::from);
    let mut table = match &recipe {
        Some(name) => recipes::table(name).map_err(|m| Error::config(&source, m))?,
        None => toml::Table::new(),
    };
    merge(&mut table, over);
    let src = if overrides.is_empty() {
        source.clone()
    } else {
        format!("{source} with --set overrides")
    };
    let mut cfg = deserialize(table, &src)?;
    cfg.derive_defaults();
    cfg.validate(&src)?;
    Ok(cfg)
}

impl RunConfig {
    /// Values derived from others when not given: `loss.max_len` (Dr. GRPO's fixed L_max) is
    /// the generation budget `rollout.max_new_tokens`.
    pub fn derive_defaults(&mut self) {
        if self.loss.agg == crate::loss::Aggregation::SeqMeanTokenSumNorm
            && self.loss.max_len.is_none()
        {
            self.loss.max_len = Some(self.rollout.max_new_tokens);
        }
    }

    /// Checks every section; messages name the field and what was expected.
    pub fn validate(&self, source: &str) -> Result<()> {
        let err = |m: String| Err(Error::config(source, m));
        if self.name.is_empty() || self.name.contains(['/', '\\']) {
            return err(format!(
                "name {:?} must be non-empty and contain no path separator",
                self.name
            ));
        }
        self.task.validate().map_err(|m| Error::config(source, m))?;
        self.rollout
            .sampling()
            .validate()
            .map_err(|m| Error::config(source, format!("rollout: {m}")))?;
        self.advantage
            .validate()
            .map_err(|e| Error::config(source, format!("advantage: {e}")))?;
        self.loss
            .validate()
            .map_err(|e| Error::config(source, format!("loss: {e}")))?;
        let r = &self.rollout;
        if r.prompts_per_step == 0 || r.group_size == 0 {
            return err("rollout.prompts_per_step and rollout.group_size must be positive".into());
        }
        let rw = &self.reward;
        if !(0.0..1.0).contains(&rw.noise_rho0)
            || !(0.0..1.0).contains(&rw.noise_rho1)
            || rw.noise_rho0 + rw.noise_rho1 >= 1.0
        {
            return err(format!(
                "reward.noise_rho0 ({}) and reward.noise_rho1 ({}) must each be in [0, 1) with a sum below 1",
                rw.noise_rho0, rw.noise_rho1
            ));
        }
        if let Some(p) = &rw.pipeline {
            p.validate()
                .map_err(|m| Error::config(source, format!("reward.pipeline.{m}")))?;
        }
        pipeline_rules::validate_for_train(self).map_err(|m| Error::config(source, m))?;
        if self.sampling.inject_ground_truth && self.rollout.group_size < 2 {
            return err("sampling.inject_ground_truth needs rollout.group_size >= 2".into());
        }
        let sy = &self.sync;
        if sy.interval == 0 {
            return err("sync.interval must be positive, found 0".into());
        }
        if sy.mode != SyncMode::Lagged && sy.offset > 0 {
            return err(format!(
                "sync.offset = {} only applies to sync.mode = \"lagged\"",
                sy.offset
            ));
        }
        if sy.mode == SyncMode::Async {
            if let Some(s) = sy.max_staleness {
                if (s as usize) + 1 < sy.interval {
                    return err(format!(
                        "sync.max_staleness = {s} with sync.interval = {}: the explorer would only ever hold \
                         weights older than allowed (need max_staleness >= interval - 1)",
                        sy.interval
                    ));
                }
            }
        }
        if let Some(r) = &sy.replay {
            if sy.buffer.is_none() {
                return err("sync.replay applies to a shared buffer: set sync.buffer too".into());
            }
            r.validate()
                .map_err(|e| Error::config(source, format!("sync.replay: {e}")))?;
        }
        if sy.buffer.is_some() && sy.offline.is_some() {
            return err("sync.buffer and sync.offline are exclusive: train from one source".into());
        }
        if sy.buffer.is_some() && sy.publish_dir.is_none() {
            return err(
                "sync.buffer needs sync.publish_dir: explorers read the learner's weights from it"
                    .into(),
            );
        }
        if (sy.buffer.is_some() || sy.offline.is_some()) && sy.mode != SyncMode::OnPolicy {
            return err("sync.mode applies to built-in rollouts; leave it \"on-policy\" with sync.buffer or sync.offline".into());
        }
        if let Some(r) = &self.remote {
            r.validate()
                .map_err(|m| Error::config(source, format!("remote: {m}")))?;
        }
        let t = &self.train;
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return err(format!("train.lr must be positive, found {}", t.lr));
        }
        if t.grad_clip < 0.0 {
            return err(format!(
                "train.grad_clip must be >= 0, found {}",
                t.grad_clip
            ));
        }
        if t.eval_every == 0 || t.checkpoint_every == 0 {
            return err("train.eval_every and train.checkpoint_every must be positive".into());
        }
        let w = &self.warmup;
        if w.batch_size == 0 || w.eval_every == 0 || w.eval_size == 0 {
            return err(
                "warmup.batch_size, warmup.eval_every and warmup.eval_size must be positive".into(),
            );
        }
        if !(0.0..=1.0).contains(&w.target_acc) {
            return err(format!(
                "warmup.target_acc must be in [0, 1], found {}",
                w.target_acc
            ));
        }
        if self.model.source.trim().is_empty() {
            return err(
                "model.source is empty: give \"builtin\" or a model (HF folder, .gguf file, \
                 grove checkpoint, hf://ORG/NAME)"
                    .into(),
            );
        }
        if let Some(l) = &self.model.lora {
            l.validate().map_err(|m| Error::config(source, m))?;
        }
        if self.model.source == "builtin" && self.task.kind != TaskKind::Arithmetic {
            return err(format!(
                "task.kind = {:?} needs a pretrained model with a real tokenizer: set model.source \
                 to an HF folder, a .gguf file or hf://ORG/NAME (the built-in model only knows \
                 the arithmetic task's 19 tokens)",
                self.task.kind.name()
            ));
        }
        Ok(())
    }

    /// The config as TOML (what a run saves as config.toml). An error, never an empty file:
    /// `--resume` reads it back.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| Error::config("config.toml", format!("cannot be written as TOML: {e}")))
    }
}

/// Derived numbers of a run, printed at start and saved as plan.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub recipe: String,
    pub estimator: String,
    pub loss: String,
    pub aggregation: String,
    pub model_params: usize,
    pub prompts_per_step: usize,
    pub samples_per_step: usize,
    /// Upper bound of tokens per step: samples × (prompt + max new tokens).
    pub max_tokens_per_step: usize,
    pub rl_steps: usize,
    pub total_samples: usize,
    pub warmup_max_steps: usize,
    pub warmup_target_acc: f64,
    pub heldout_size: usize,
    pub seed: u64,
    /// Every external program the run starts ([`resume::external_programs`]).
    #[serde(default)]
    pub external_programs: Vec<String>,
}

impl Plan {
    pub fn new(cfg: &RunConfig, model_params: usize, prompt_tokens: usize) -> Self {
        let samples = cfg.rollout.prompts_per_step * cfg.rollout.group_size;
        Plan {
            recipe: cfg.recipe.clone().unwrap_or_else(|| "quickstart".into()),
            estimator: cfg.advantage.estimator.name().to_string(),
            loss: cfg.loss.loss.name().to_string(),
            aggregation: cfg.loss.agg.name().to_string(),
            model_params,
            prompts_per_step: cfg.rollout.prompts_per_step,
            samples_per_step: samples,
            max_tokens_per_step: samples * (prompt_tokens + cfg.rollout.max_new_tokens),
            rl_steps: cfg.train.steps,
            total_samples: samples * cfg.train.steps,
            warmup_max_steps: cfg.warmup.max_steps,
            warmup_target_acc: cfg.warmup.target_acc,
            heldout_size: cfg.task.heldout_size,
            seed: cfg.seed,
            external_programs: resume::external_programs(cfg),
        }
    }

    pub fn render(&self) -> String {
        let programs = if self.external_programs.is_empty() {
            "none".to_string()
        } else {
            self.external_programs.join("; ")
        };
        format!(
            "plan: recipe {} | {} advantage, {} loss, {} | model {} params | {} prompts x {} = {} samples/step, \
             <= {} tokens/step | {} RL steps ({} samples) | {} | held-out {} | seed {} | \
             external programs: {programs}",
            self.recipe,
            self.estimator,
            self.loss,
            self.aggregation,
            self.model_params,
            self.prompts_per_step,
            self.samples_per_step / self.prompts_per_step.max(1),
            self.samples_per_step,
            self.max_tokens_per_step,
            self.rl_steps,
            self.total_samples,
            if self.warmup_max_steps == 0 {
                "no warm-up".to_string()
            } else {
                format!(
                    "warm-up until held-out acc >= {:.0}% (max {} steps)",
                    self.warmup_target_acc * 100.0,
                    self.warmup_max_steps
                )
            },
            self.heldout_size,
            self.seed
        )
    }
}
