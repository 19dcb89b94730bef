//! Configuration in two stages, ripgrep style: raw values (TOML file, recipe, `--set`
//! overrides) deserialised into [`RunConfig`] ([`parse`]), then one [`validate`] that checks
//! everything once and returns the [`ValidatedRun`] the rest of the code takes; a run derives
//! its [`Plan`] (the derived numbers, printed at start-up and saved with the run) from it.
//!
//! Layering, lowest first: built-in defaults (the quickstart), the recipe named by `recipe`,
//! the file's own values, then `--set section.key=value` overrides.
pub mod critic;
pub mod pace_rules;
pub mod pipeline_rules;
mod plan;
pub mod recipes;
pub mod reference;
pub mod resume;
pub mod secrets;
mod validated;

pub use plan::{MemoryEstimate, Plan};
pub use validated::{validate, Purpose, ValidatedRun};

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::advantage::AdvantageConfig;
use crate::env::EnvKind;
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
    /// A multi-turn environment (`[env]`, docs/environments.md); it replaces `[task]`.
    pub env: Option<crate::env::EnvConfig>,
    pub warmup: WarmupConfig,
    pub rollout: RolloutConfig,
    pub sampling: SamplingConfig,
    pub reward: RewardConfig,
    pub advantage: AdvantageConfig,
    pub loss: LossConfig,
    /// PPO's value model (`[critic]`, docs/algorithms.md#ppo-with-a-critic-gae): required by
    /// and only read by `advantage.estimator = "gae"`.
    pub critic: Option<critic::CriticConfig>,
    pub train: TrainConfig,
    pub sync: SyncConfig,
    /// `grove explore` samples through this OpenAI-compatible completions server instead of
    /// its own weights (`--remote URL` sets `remote.url`). `grove train` samples through it
    /// when `remote.admin_token` lets it push its weights to the server after every update
    /// (docs/remote-rollouts.md); otherwise it refuses it unless the config also names the
    /// `sync.buffer` its explorers fill.
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
            env: None,
            warmup: WarmupConfig::default(),
            rollout: RolloutConfig::default(),
            sampling: SamplingConfig::default(),
            reward: RewardConfig::default(),
            advantage: AdvantageConfig::default(),
            loss: LossConfig::default(),
            critic: None,
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
    /// Built-in model: width of the residual stream.
    pub hidden_size: usize,
    /// Built-in model: transformer blocks.
    pub num_layers: usize,
    /// Built-in model: attention heads (must divide hidden_size).
    pub num_heads: usize,
    /// Built-in model: key/value heads (grouped-query attention; must divide num_heads).
    pub num_kv_heads: usize,
    /// Built-in model: width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Precision of the matrix products: "f32" (the reference) or "bf16": matmuls on bf16
    /// values with f32 accumulation, on AVX-512-BF16 where the CPU has it; norms, softmax,
    /// log-probs, losses, master weights and AdamW state stay f32; a LoRA run's frozen base is
    /// kept in bf16 only (docs/performance.md).
    pub dtype: crate::model::bf16::Dtype,
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
            dtype: Default::default(),
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
    /// Hard cap on warm-up steps (0: no warm-up).
    pub max_steps: usize,
    /// Problems per supervised step.
    pub batch_size: usize,
    /// AdamW learning rate of the warm-up.
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

/// Sampling of each RL step's responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// Prompts per RL step (each gets `group_size` responses).
    pub prompts_per_step: usize,
    /// G: responses per prompt.
    pub group_size: usize,
    /// Sampling temperature (> 0; the learner's log-probs use the same temperature).
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability (1: all).
    pub top_p: f64,
    /// Generation budget per response, in tokens (EOS included).
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
    /// published every `interval` steps. With `max_staleness` k, batch b is sampled by the
    /// oldest published version at or after b − k (repeatable); without, by the newest one.
    Async,
}

/// How rollouts reach the learner: sampled in-process (on-policy, lagged, async), from a shared
/// buffer filled by `grove explore` processes, or from an offline file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// on-policy (sample with the current weights), lagged (older weights refreshed every
    /// `interval` steps) or async (an explorer thread and a bounded buffer).
    pub mode: SyncMode,
    /// Refresh (lagged) or publish (async, buffer) the rollout weights every this many steps.
    pub interval: usize,
    /// Lagged mode: rollouts run this many steps ahead of the learner.
    pub offset: usize,
    /// Experiences more than this many versions older than the learner are dropped and
    /// counted in `staleness/dropped` (async and buffer modes; unset = keep everything, except
    /// with `buffer`, where it defaults to 4 or `interval`, whichever is larger). In async mode
    /// it also fixes which weights sample each batch, so that the run repeats exactly.
    pub max_staleness: Option<u64>,
    /// Async mode: buffer capacity in groups; also the most groups a `grove explore` process
    /// lets a shared buffer hold (0 = 4 steps' worth).
    pub capacity: usize,
    /// Train from experiences in this buffer (`sqlite:PATH`, `postgres://...`) written by
    /// `grove explore` processes, instead of sampling.
    pub buffer: Option<String>,
    /// With `buffer`: folder where the learner publishes versioned weights for explorers.
    /// With `[remote]` and `remote.admin_token`: folder where the learner writes each policy
    /// it pushes to the server (`vN/`), which the server reads (default: a folder under the
    /// system's temporary directory; on two machines, a shared path).
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
    /// Noisy-verifier experiments: probability that an incorrect response's observed reward
    /// is flipped to 1 (seeded; `acc/train` stays the clean accuracy, `reward/mean` is what the
    /// learner saw).
    pub noise_rho0: f64,
    /// Noisy-verifier experiments: probability that a correct response's observed reward is
    /// flipped to 0.
    pub noise_rho1: f64,
    /// A composable reward pipeline (`[reward.pipeline]`, docs/rewards.md); None: the task's
    /// verifier alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<crate::reward::pipeline::PipelineConfig>,
}

/// The RL phase: steps, optimizer, evaluation, checkpoints and samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// RL steps (one optimizer update per step).
    pub steps: usize,
    /// AdamW learning rate of the RL updates.
    pub lr: f64,
    /// Linear learning-rate warm-up over this many RL steps.
    pub lr_warmup_steps: usize,
    /// AdamW decoupled weight decay.
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

/// `sync.max_staleness` of a shared buffer (`sync.buffer`) when the config sets none.
pub const DEFAULT_BUFFER_MAX_STALENESS: u64 = 4;

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
    toml::from_str(&text).map_err(|e| {
        let key = e.span().and_then(|span| key_at(&text, span.start));
        let msg = e.message().trim();
        Error::config(
            source,
            match key {
                Some(k) => format!("`{k}`: {msg}"),
                None => msg.to_string(),
            },
        )
    })
}

/// The dotted key whose value starts at byte `offset` of a TOML text written by `toml`
/// (`[section]` headers, then `key = value` lines).
fn key_at(text: &str, offset: usize) -> Option<String> {
    let mut section = String::new();
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let end = start + line.len();
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            section = trimmed.trim_matches(['[', ']']).trim().to_string();
        } else if offset < end {
            let key = trimmed.split_once('=')?.0.trim().trim_matches('"');
            return Some(if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            });
        }
        start = end;
    }
    None
}

/// Every number of the config is finite: TOML can spell `nan` and `inf`, and no grove setting
/// means either. The error names the dotted key.
fn check_numbers_finite(cfg: &RunConfig) -> std::result::Result<(), String> {
    fn walk(key: &str, v: &toml::Value) -> std::result::Result<(), String> {
        match v {
            toml::Value::Float(x) if !x.is_finite() => {
                Err(format!("`{key}` is {x}; expected a finite number"))
            }
            toml::Value::Table(t) => t.iter().try_for_each(|(k, v)| {
                walk(
                    &if key.is_empty() {
                        k.clone()
                    } else {
                        format!("{key}.{k}")
                    },
                    v,
                )
            }),
            toml::Value::Array(a) => a
                .iter()
                .enumerate()
                .try_for_each(|(i, v)| walk(&format!("{key}[{i}]"), v)),
            _ => Ok(()),
        }
    }
    let value = toml::Value::try_from(cfg).map_err(|e| format!("cannot be read as TOML: {e}"))?;
    walk("", &value)
}

/// Reads and validates a run config for `grove train` ([`Purpose::Train`]): `file` (None =
/// quickstart defaults), its recipe, then overrides.
pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<ValidatedRun> {
    load_for(file, overrides, Purpose::Train)
}

/// Reads a run config ([`parse`]) and validates it for `purpose`.
pub fn load_for(
    file: Option<&Path>,
    overrides: &[String],
    purpose: Purpose,
) -> Result<ValidatedRun> {
    let (raw, source) = parse(file, overrides)?;
    validate(raw, &source, purpose)
}

/// The first stage: `file` (None = quickstart defaults), its recipe, then overrides, read
/// into a [`RunConfig`] that is not checked beyond its types. Returns it with the name of
/// its source for error messages.
pub fn parse(file: Option<&Path>, overrides: &[String]) -> Result<(RunConfig, String)> {
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
    let cfg = deserialize(table, &src)?;
    Ok((cfg, src))
}

impl RunConfig {
    /// `[sampling]`: refill and Reinforce-Ada need batches sampled here by the current weights.
    fn validate_sampling(&self) -> std::result::Result<(), String> {
        let on_policy_rollouts = self.sync.mode == SyncMode::OnPolicy
            && self.sync.buffer.is_none()
            && self.sync.offline.is_none();
        self.sampling.validate(on_policy_rollouts)?;
        self.validate_eva(on_policy_rollouts)?;
        let ada = &self.sampling.reinforce_ada;
        ada.validate(self.rollout.group_size)?;
        if !ada.enabled() {
            return Ok(());
        }
        // Each round's rewards decide the next round, and the baseline needs every drawn
        // reward: both exist only where the current weights sample and score the groups.
        let clash = [
            (
                !on_policy_rollouts || self.remote.is_some(),
                "lagged, async, shared-buffer, offline or [remote] rollouts (they hand the learner \
                 finished groups, without the rounds' draws; use sync.mode = \"on-policy\")",
            ),
            (
                self.env.is_some(),
                "[env] episodes (a group's episodes are rolled out together from one seed)",
            ),
            (
                self.reward.pipeline.is_some(),
                "[reward.pipeline] (the stopping rule reads each round's task rewards; the \
                 pipeline scores whole groups)",
            ),
            (
                self.sampling.refill_max_rounds > 0,
                "sampling.refill_max_rounds (both decide what is sampled again; choose one)",
            ),
            (
                self.loss.kl_in_reward,
                "loss.kl_in_reward (only the kept responses get the penalty, so the baseline \
                 over every drawn reward would mix penalised and unpenalised rewards)",
            ),
        ];
        match clash.iter().find(|(on, _)| *on) {
            Some((_, what)) => Err(format!(
                "sampling.reinforce_ada.mode = \"{}\" cannot be combined with {what}",
                ada.mode.name()
            )),
            None => Ok(()),
        }
    }

    /// `[sampling.eva]`: its rounds run where batches are sampled by the current weights, and
    /// it needs a task with a mutator.
    fn validate_eva(&self, on_policy_rollouts: bool) -> std::result::Result<(), String> {
        let eva = &self.sampling.eva;
        eva.validate()?;
        if !eva.enabled() {
            return Ok(());
        }
        let clash = [
            (
                !on_policy_rollouts || self.remote.is_some(),
                "lagged, async, shared-buffer, offline or [remote] rollouts (the creator's rounds \
                 run in the on-policy source; use sync.mode = \"on-policy\")",
            ),
            (
                self.env
                    .as_ref()
                    .is_some_and(|e| e.kind != EnvKind::Countdown),
                "an [env] other than env.kind = \"countdown\" (the pool's prompts are countdown \
                 puzzles; other environments draw their own episodes)",
            ),
            (
                self.sampling.reinforce_ada.enabled(),
                "sampling.reinforce_ada (it draws its prompts from the task, not the pool)",
            ),
        ];
        if let Some((_, what)) = clash.iter().find(|(on, _)| *on) {
            return Err(format!(
                "sampling.eva.pool_size = {} cannot be combined with {what}",
                eva.pool_size
            ));
        }
        if self.env.is_none() && !self.task.kind.is_arithmetic() && eva.every > 0 {
            self.validate_eva_text()?;
        }
        if eva.generator_model().is_some() && (self.env.is_some() || self.task.kind.is_arithmetic())
        {
            return Err(format!(
                "sampling.eva.generator = {:?} applies to text datasets (task.kind = \"dataset\", \
                 \"gsm8k\" or \"math500\"); arithmetic and countdown have their own mutators",
                eva.generator
            ));
        }
        Ok(())
    }

    /// eva on a text dataset: an evolved prompt has no reference answer, so the reward must
    /// not need one.
    fn validate_eva_text(&self) -> std::result::Result<(), String> {
        use crate::reward::pipeline::ComponentKind;
        use crate::task::scorers::RewardKind;
        let check = self.task.check_kind()?;
        let verifier = self.reward.pipeline.as_ref().and_then(|p| {
            p.components
                .iter()
                .find(|c| matches!(c.kind, ComponentKind::Verifier { .. }))
        });
        if check == Some(RewardKind::External) && verifier.is_none() {
            return Ok(());
        }
        let found = match verifier {
            Some(v) => format!("[reward.pipeline] component {:?} of kind verifier", v.name),
            None => format!(
                "task.reward = {:?}{}",
                self.task.reward.as_deref().unwrap_or("(unset)"),
                self.task
                    .check
                    .as_deref()
                    .map(|c| format!(", task.check = {c:?}"))
                    .unwrap_or_default()
            ),
        };
        Err(format!(
            "sampling.eva.every = {} evolves new text prompts, which have no reference answer, \
             so the reward must not need one: task.reward = \"external\" (a command that \
             ignores the reference; evolved prompts send it an empty one), or task.reward = \
             \"pipeline\" with task.check = \"external\" and no verifier component (e.g. a \
             reward-model component); found {found} (sampling.eva.every = 0 gives a fixed pool \
             of {} prompts with their references)",
            self.sampling.eva.every, self.sampling.eva.pool_size
        ))
    }

    /// An `[env]` section and what it cannot be combined with; what needs one.
    fn validate_env(&self) -> std::result::Result<(), String> {
        let Some(e) = &self.env else {
            if self.advantage.duration.enabled {
                return Err(
                    "advantage.duration.enabled needs an [env]: a sample's duration is \
                            the time its episode's actions took (each step's info `duration_s`, \
                            which the `bandit` environment records)"
                        .into(),
                );
            }
            return Ok(());
        };
        e.validate()?;
        let clash = [
            (
                self.sampling.inject_ground_truth,
                "sampling.inject_ground_truth (an episode has no reference solution)",
            ),
            (
                self.reward.noise_rho0 > 0.0 || self.reward.noise_rho1 > 0.0,
                "reward.noise_rho0/1",
            ),
        ];
        match clash.iter().find(|(on, _)| *on) {
            Some((_, what)) => Err(format!("[env] cannot be combined with {what}")),
            None => Ok(()),
        }
    }

    /// Values derived from others when not given: `loss.max_len` (Dr. GRPO's fixed L_max) is
    /// the generation budget `rollout.max_new_tokens`.
    ///
    /// A shared buffer without `sync.max_staleness` (and without replay, which bounds reuse by
    /// itself) gets [`DEFAULT_BUFFER_MAX_STALENESS`] (at least `sync.interval`): unbounded,
    /// a learner behind fast explorers trained on data over 100 versions old.
    pub(crate) fn derive_defaults(&mut self) {
        let sy = &mut self.sync;
        if sy.buffer.is_some() && sy.replay.is_none() && sy.max_staleness.is_none() {
            sy.max_staleness = Some(DEFAULT_BUFFER_MAX_STALENESS.max(sy.interval as u64));
        }
        if self.loss.agg == crate::loss::Aggregation::SeqMeanTokenSumNorm
            && self.loss.max_len.is_none()
        {
            // An episode's response spans every turn: its budget is env.max_tokens.
            self.loss.max_len = Some(match &self.env {
                Some(e) => e.max_tokens,
                None => self.rollout.max_new_tokens,
            });
        }
        // DAPO's overlong budget is the generation budget unless given.
        let overlong = &mut self.advantage.overlong;
        if overlong.enabled && overlong.max_len.is_none() {
            overlong.max_len = Some(match &self.env {
                Some(e) => e.max_tokens,
                None => self.rollout.max_new_tokens,
            });
        }
        // A dataset's held-out fraction is drawn with the run seed unless given its own.
        if self.task.kind == TaskKind::Dataset && self.task.split_seed.is_none() {
            self.task.split_seed = Some(self.seed);
        }
    }

    /// What is allowed but probably not meant, printed as warnings at start
    /// ([`ValidatedRun::warnings`]).
    fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let estimator = self.advantage.estimator;
        if self.rollout.group_size == 1 && estimator.group_relative() {
            out.push(format!(
                "rollout.group_size = 1 with the group-relative `{estimator}` advantage: each \
                 response is compared with the other responses to its prompt, and there are \
                 none, so no baseline is subtracted (singleton rule A = r) and groups never \
                 differ in reward; set rollout.group_size >= 2, or advantage.estimator = \
                 \"reinforce\" to ask for A = r"
            ));
        }
        out
    }

    /// Checks every section; messages name the field and what was expected. Called by
    /// [`validate`] only: a [`ValidatedRun`] is the proof that it passed.
    fn check(&self, source: &str) -> Result<()> {
        let err = |m: String| Err(Error::config(source, m));
        check_numbers_finite(self).map_err(|m| Error::config(source, m))?;
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
        self.validate_env().map_err(|m| Error::config(source, m))?;
        critic::validate(self).map_err(|m| Error::config(source, m))?;
        self.validate_sampling()
            .map_err(|m| Error::config(source, m))?;
        pace_rules::validate(self).map_err(|m| Error::config(source, m))?;
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
        for (key, v) in [
            ("train.grad_clip", t.grad_clip),
            ("train.weight_decay", t.weight_decay),
        ] {
            if v < 0.0 {
                return err(format!("{key} must be >= 0, found {v}"));
            }
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
        // Finite here (checked above), so `<= 0` is the whole test.
        if w.lr <= 0.0 {
            return err(format!("warmup.lr must be positive, found {}", w.lr));
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
        // A dataset on the built-in model is checked row by row against its 19 tokens.
        if self.model.source == "builtin" && self.task.kind.dataset().is_some() {
            return err(format!(
                "task.kind = {:?} needs a pretrained model with a real tokenizer: set model.source \
                 to an HF folder, a .gguf file or hf://ORG/NAME (the built-in model only knows \
                 the arithmetic task's 19 tokens)",
                self.task.kind.name()
            ));
        }
        Ok(())
    }

    /// The config as TOML (what a run saves as config.toml), with every secret shown as `***`
    /// ([`secrets`]). An error, never an empty file: `--resume` reads it back.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(&secrets::redacted(self))
            .map_err(|e| Error::config("config.toml", format!("cannot be written as TOML: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_err(overrides: &[&str]) -> String {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        load(None, &o).unwrap_err().to_string()
    }

    #[test]
    fn set_type_errors_name_the_key_and_the_expected_type() {
        let e = load_err(&["rollout.group_size=\"many\""]);
        assert!(
            e.contains("`rollout.group_size`") && e.contains("expected usize"),
            "{e}"
        );
        let e = load_err(&["train.lr=true"]);
        assert!(
            e.contains("`train.lr`") && e.contains("expected f64"),
            "{e}"
        );
        let e = load_err(&["advantage.bnpo.alpha=\"x\""]);
        assert!(e.contains("`advantage.bnpo.alpha`"), "{e}");
    }

    #[test]
    fn non_finite_numbers_are_refused_naming_the_key() {
        for (set, key) in [
            ("train.grad_clip=nan", "`train.grad_clip` is NaN"),
            ("train.weight_decay=inf", "`train.weight_decay` is inf"),
            ("advantage.eps=-inf", "`advantage.eps` is -inf"),
        ] {
            let e = load_err(&[set]);
            assert!(e.contains(key), "{set}: {e}");
        }
        let e = load_err(&["warmup.lr=-1e-3"]);
        assert!(e.contains("warmup.lr must be positive"), "{e}");
    }

    #[test]
    fn group_size_one_warns_for_group_relative_estimators() {
        let mut cfg = RunConfig::default();
        assert!(cfg.warnings().is_empty());
        cfg.rollout.group_size = 1;
        let w = cfg.warnings();
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("`grpo`") && w[0].contains("no baseline"),
            "{w:?}"
        );
        cfg.advantage.estimator = crate::advantage::Estimator::Reinforce;
        assert!(cfg.warnings().is_empty());
    }
}
