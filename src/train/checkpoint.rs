//! Checkpoints: `checkpoints/step-N/{model.safetensors, optimizer.safetensors, state.json,
//! config.json, tokenizer.json}`, written under a temporary name and renamed, so a crash never
//! leaves a half-written checkpoint where resume would look.
use std::path::{Path, PathBuf};

use rand_chacha::ChaCha8Rng;

use crate::buffer::ExperienceGroup;
use crate::train::explore::ExploreState;
use serde::{Deserialize, Serialize};

use crate::compute::optim::AdamW;
use crate::error::{Error, Result};
use crate::model::io::{load_safetensors, save_safetensors};
use crate::model::{Llama, Tokenizer};

/// Everything besides tensors that a resumed run needs to continue bit for bit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// RL steps completed (0: right after the warm-up).
    pub step: usize,
    /// Optimizer updates taken (bias correction).
    pub optimizer_t: u64,
    /// Policy version: increments with every update.
    pub version: u64,
    /// The trainer's own explorer (prompt and sample streams, noise injector).
    pub explore: ExploreState,
    pub learn_rng: ChaCha8Rng,
    pub warmup_steps: usize,
    pub acc_after_warmup: f64,
    pub adv_state: crate::advantage::AdvantageState,
    /// Lagged mode: the behaviour copy's version and the next batch index to generate.
    /// Its weights are `behaviour.safetensors` and queued batches `pending.jsonl`.
    pub lagged: Option<LaggedState>,
    /// `[reward.pipeline]` running state: shaper statistics, reference cache and RNG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_pipeline: Option<crate::train::reward_hook::RewarderState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaggedState {
    pub behaviour_version: u64,
    pub next_batch: usize,
}

/// Mode-specific things a checkpoint carries besides the policy and optimizer.
#[derive(Default)]
pub struct Extras<'a> {
    pub behaviour: Option<&'a Llama>,
    pub pending: Vec<ExperienceGroup>,
}

pub fn step_dir(run_dir: &Path, step: usize) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step}"))
}

/// Writes a checkpoint atomically (temporary directory, then rename).
pub fn save(
    run_dir: &Path,
    model: &Llama,
    opt: &AdamW,
    tok: &Tokenizer,
    state: &TrainState,
    extras: &Extras,
) -> Result<PathBuf> {
    let final_dir = step_dir(run_dir, state.step);
    let parent = final_dir.parent().unwrap_or(run_dir).to_path_buf();
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = parent.join(format!(".tmp-step-{}-{}", state.step, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    save_safetensors(&model.named_tensors(), &tmp.join("model.safetensors"))?;
    save_safetensors(&opt.state_tensors()?, &tmp.join("optimizer.safetensors"))?;
    let write = |name: &str, text: &str| -> Result<()> {
        let p = tmp.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    write("state.json", &serde_json::to_string_pretty(state)?)?;
    write("config.json", &serde_json::to_string_pretty(&model.cfg)?)?;
    write("tokenizer.json", tok.to_json())?;
    if tok.chat_template.is_some() {
        // A pretrained chat model: keep its template and special tokens with the checkpoint,
        // so `grove eval` on it builds the same prompts as training did.
        let tc = crate::model::io::tokenizer_config_json(tok, model.cfg.max_positions());
        write("tokenizer_config.json", &serde_json::to_string_pretty(&tc)?)?;
    }
    if let Some(b) = extras.behaviour {
        save_safetensors(&b.named_tensors(), &tmp.join("behaviour.safetensors"))?;
    }
    if !extras.pending.is_empty() {
        crate::buffer::jsonl::write_groups(&tmp.join("pending.jsonl"), &extras.pending)
            .map_err(|e| Error::checkpoint(&tmp, e.to_string()))?;
    }
    if final_dir.exists() {
        // Re-running a step after resume: replace the old copy.
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    Ok(final_dir)
}

/// The highest-numbered complete checkpoint of a run, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let dir = run_dir.join("checkpoints");
    if !dir.exists() {
        return Ok(None);
    }
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if entry.path().join("state.json").exists()
            && best.as_ref().map(|b| n > b.0).unwrap_or(true)
        {
            best = Some((n, entry.path()));
        }
    }
    Ok(best.map(|b| b.1))
}

pub fn read_state(ckpt: &Path) -> Result<TrainState> {
    let p = ckpt.join("state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(&p, format!("invalid state.json: {e}")))
}

/// Loads model weights and optimizer moments from a checkpoint into existing objects.
pub fn restore(ckpt: &Path, model: &Llama, opt: &mut AdamW, state: &TrainState) -> Result<()> {
    let weights_path = ckpt.join("model.safetensors");
    let weights = load_safetensors(&weights_path, model.device())?;
    let loaded = Llama::from_tensors(
        &model.cfg,
        weights,
        model.device(),
        &weights_path.display().to_string(),
    )?;
    model.copy_weights_from(&loaded)?;
    let opt_path = ckpt.join("optimizer.safetensors");
    let st = load_safetensors(&opt_path, &candle_core::Device::Cpu)?;
    opt.load_state(st, state.optimizer_t, &opt_path)
}
