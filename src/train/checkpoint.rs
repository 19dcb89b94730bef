//! Checkpoints: `checkpoints/step-N/{model.safetensors, optimizer.safetensors, state.json,
//! config.json, tokenizer.json}`, written under a temporary name and renamed, so a crash never
//! leaves a half-written checkpoint where resume would look.
//!
//! Each checkpoint also holds `checksums.json`, a 64-bit FNV-1a digest of every file, checked
//! on resume: a bit flip on disk is an error naming the file, not a silently different run.
//! Loaded weights must be finite; a NaN or infinity is an error naming the file and tensor.
//! Temporary directories left by a killed writer are removed at the next save.
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
    /// `[reward.pipeline.blend]`: the current blend weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blend: Option<crate::train::blend::BlendState>,
    /// Updates skipped so far for a non-finite loss or gradient norm (`loss/skipped_steps`).
    /// A checkpoint written before this field existed reads 0 (what it had counted is lost).
    #[serde(default)]
    pub skipped_steps: usize,
    /// `[env]` runs: episode numbers handed out so far (program environments see them as
    /// `episode`). A checkpoint written before this field existed restarts the numbering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_episodes: Option<u64>,
    /// `[critic]` runs: the critic's optimizer updates (its weights and moments are
    /// `critic.safetensors` and `critic_optimizer.safetensors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critic_optimizer_t: Option<u64>,
    /// Async runs with a staleness bound: the versions of the older published weights the
    /// explorer samples by from this step on, saved as `sampler-v<N>.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_sampler: Option<Vec<u64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaggedState {
    pub behaviour_version: u64,
    pub next_batch: usize,
}

/// What a checkpoint of a bounded-staleness async run keeps so that it resumes exactly: the
/// explorer's state at the start of the learner's next batch, and the published weights older
/// than the learner that the batches from there on are sampled by.
pub struct AsyncSnapshot {
    pub explore: ExploreState,
    pub env_episodes: Option<u64>,
    pub weights: Vec<(u64, Llama)>,
}

/// Mode-specific things a checkpoint carries besides the policy and optimizer.
#[derive(Default)]
pub struct Extras<'a> {
    pub behaviour: Option<&'a Llama>,
    pub pending: Vec<ExperienceGroup>,
    /// The run's validated plan, saved as the checkpoint's plan.json: what the weights were
    /// trained under travels with them.
    pub plan: Option<&'a crate::config::Plan>,
    /// PPO's critic (`[critic]` runs).
    pub critic: Option<&'a crate::train::critic::Critic>,
    /// Async runs with a staleness bound; its weights are `sampler-v<N>.safetensors`.
    pub async_snapshot: Option<AsyncSnapshot>,
}

/// The file of an async checkpoint's published weights of version `v`.
pub fn sampler_file(v: u64) -> String {
    format!("sampler-v{v}.safetensors")
}

/// The checkpoint file of the policy's trainable weights: the whole model, or a LoRA run's
/// adapter (PEFT keys).
pub fn policy_file(model: &Llama) -> &'static str {
    match model.adapter() {
        Some(_) => crate::model::lora::ADAPTER_WEIGHTS,
        None => "model.safetensors",
    }
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
    remove_stale_tmp(&parent)?;
    let tmp = parent.join(format!(".tmp-step-{}-{}", state.step, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    match model.adapter() {
        // A LoRA run: PEFT's adapter files (and the base's identity) instead of the weights.
        Some(a) => a.save(&tmp)?,
        None => save_safetensors(&model.named_tensors(), &tmp.join("model.safetensors"))?,
    }
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
    if let Some(plan) = extras.plan {
        write("plan.json", &serde_json::to_string_pretty(plan)?)?;
    }
    if let Some(c) = extras.critic {
        c.save(&tmp)?;
    }
    if let Some(b) = extras.behaviour {
        save_safetensors(&b.named_tensors(), &tmp.join("behaviour.safetensors"))?;
    }
    if let Some(snap) = &extras.async_snapshot {
        for (v, w) in &snap.weights {
            save_safetensors(&w.named_tensors(), &tmp.join(sampler_file(*v)))?;
        }
    }
    if !extras.pending.is_empty() {
        crate::buffer::jsonl::write_groups(&tmp.join("pending.jsonl"), &extras.pending)
            .map_err(|e| Error::checkpoint(&tmp, e.to_string()))?;
    }
    write_checksums(&tmp)?;
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

/// The file holding the digests of a checkpoint's other files.
pub const CHECKSUMS: &str = "checksums.json";

/// 64-bit FNV-1a of a file's bytes, as 16 hex digits.
fn digest(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    Ok(format!("{hash:016x}"))
}

/// Writes `checksums.json` for every other file of `dir`.
pub fn write_checksums(dir: &Path) -> Result<()> {
    let mut sums = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name != CHECKSUMS && entry.path().is_file() {
            sums.insert(name, digest(&entry.path())?);
        }
    }
    let p = dir.join(CHECKSUMS);
    std::fs::write(&p, serde_json::to_string_pretty(&sums)?).map_err(|e| Error::io(&p, e))
}

/// Checks every file listed in `checksums.json` (checkpoints written before it existed have
/// none and are not checked).
pub fn verify_checksums(ckpt: &Path) -> Result<()> {
    let p = ckpt.join(CHECKSUMS);
    if !p.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let sums: std::collections::BTreeMap<String, String> = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(&p, format!("invalid {CHECKSUMS}: {e}")))?;
    for (name, expected) in sums {
        let f = ckpt.join(&name);
        if !f.exists() {
            return Err(Error::checkpoint(
                &f,
                format!("missing, though {CHECKSUMS} lists it"),
            ));
        }
        let found = digest(&f)?;
        if found != expected {
            return Err(Error::checkpoint(
                &f,
                format!(
                    "checksum mismatch (expected {expected}, found {found}): the file changed \
                     after it was written (disk corruption or an edit)"
                ),
            ));
        }
    }
    Ok(())
}

/// Removes `.tmp-step-*-PID` directories of `checkpoints/` whose writer is no longer running.
fn remove_stale_tmp(checkpoints: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(checkpoints) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(".tmp-step-") else {
            continue;
        };
        let pid = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid
            .is_some_and(|p| p != std::process::id() && Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let p = entry.path();
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// Loads model weights and optimizer moments from a checkpoint into existing objects, after
/// checking the checksums and that the weights are finite.
pub fn restore(ckpt: &Path, model: &Llama, opt: &mut AdamW, state: &TrainState) -> Result<()> {
    verify_checksums(ckpt)?;
    let weights_path = ckpt.join(policy_file(model));
    let weights = load_safetensors(&weights_path, model.device())?;
    if let Some(a) = model.adapter() {
        let peft = crate::model::lora::read_peft(ckpt, model.device())?;
        if let Some(b) = peft.base.filter(|b| b.hash != a.base.hash) {
            return Err(Error::checkpoint(
                ckpt,
                format!(
                    "the adapter was trained on base {} (content hash {}), but this run's base \
                     {} has content hash {}",
                    b.source, b.hash, a.base.source, a.base.hash
                ),
            ));
        }
    }
    model.set_trainable(weights, &weights_path.display().to_string())?;
    let opt_path = ckpt.join("optimizer.safetensors");
    let st = load_safetensors(&opt_path, &candle_core::Device::Cpu)?;
    opt.load_state(st, state.optimizer_t, &opt_path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_plan_is_saved_and_checksummed_with_the_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let tok = Tokenizer::builtin_arithmetic();
        let shape = crate::model::Config::builtin_tiny(tok.vocab_size());
        let model = Llama::init(&shape, 1, &Device::Cpu).unwrap();
        let opt = AdamW::new(model.params(), Default::default());
        let cfg = crate::config::validate(
            crate::config::RunConfig::default(),
            "test",
            crate::config::Purpose::Inspect,
        )
        .unwrap();
        let plan = crate::config::Plan::new(&cfg, &shape, model.num_params(), 9).unwrap();
        let extras = Extras {
            plan: Some(&plan),
            ..Default::default()
        };
        let state = TrainState {
            step: 3,
            optimizer_t: 3,
            version: 3,
            explore: ExploreState::new(&cfg, 0).unwrap(),
            learn_rng: crate::train::explore::rng_stream(0, crate::train::explore::STREAM_LEARN),
            warmup_steps: 0,
            acc_after_warmup: 0.0,
            adv_state: Default::default(),
            lagged: None,
            reward_pipeline: None,
            blend: None,
            skipped_steps: 2,
            env_episodes: None,
            critic_optimizer_t: None,
            async_sampler: None,
        };
        let dir = save(tmp.path(), &model, &opt, &tok, &state, &extras).unwrap();
        // The skip counter travels with the checkpoint; a state.json written before it
        // existed (no such key) still reads, as 0.
        assert_eq!(read_state(&dir).unwrap().skipped_steps, 2);
        let mut old: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap())
                .unwrap();
        assert!(old
            .as_object_mut()
            .unwrap()
            .remove("skipped_steps")
            .is_some());
        let old: TrainState = serde_json::from_value(old).unwrap();
        assert_eq!((old.step, old.skipped_steps), (3, 0));
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("plan.json")).unwrap()).unwrap();
        assert_eq!(saved, serde_json::to_value(&plan).unwrap());
        let sums = std::fs::read_to_string(dir.join("checksums.json")).unwrap();
        assert!(sums.contains("plan.json"), "{sums}");
        verify_checksums(&dir).unwrap();
    }

    #[test]
    fn a_flipped_bit_is_a_checksum_error_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("model.safetensors"), vec![7u8; 5000]).unwrap();
        std::fs::write(d.join("state.json"), "{}").unwrap();
        write_checksums(d).unwrap();
        verify_checksums(d).unwrap();
        let mut bytes = std::fs::read(d.join("model.safetensors")).unwrap();
        bytes[1234] ^= 0x10;
        std::fs::write(d.join("model.safetensors"), bytes).unwrap();
        let e = verify_checksums(d).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("checksum mismatch"),
            "{e}"
        );
        std::fs::remove_file(d.join("state.json")).unwrap();
        std::fs::write(d.join("model.safetensors"), vec![7u8; 5000]).unwrap();
        let e = verify_checksums(d).unwrap_err().to_string();
        assert!(e.contains("state.json") && e.contains("missing"), "{e}");
        // FNV-1a 64 of "a" (published test vector).
        std::fs::write(d.join("a"), "a").unwrap();
        assert_eq!(digest(&d.join("a")).unwrap(), "af63dc4c8601ec8c");
    }

    #[test]
    fn stale_temporary_checkpoints_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        // A writer that no longer runs (no such pid) and one that does (pid 1 always runs).
        let dead = d.join(".tmp-step-5-4194999999");
        let live = d.join(".tmp-step-5-1");
        let done = d.join("step-4");
        for p in [&dead, &live, &done] {
            std::fs::create_dir_all(p).unwrap();
        }
        remove_stale_tmp(d).unwrap();
        assert!(!dead.exists() && live.exists() && done.exists());
    }
}
