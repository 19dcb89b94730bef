//! `POST /admin/load`: new weights while the server serves.
//!
//! Body: `{"path": PATH, "version": N}`. PATH is full weights (a grove checkpoint or an HF
//! model folder: `config.json` and safetensors), a PEFT adapter folder (`adapter_config.json`,
//! `adapter_model.safetensors`), which is put onto the weights the server started with (the
//! adapter's recorded base, when it has one, must be those), or one `.safetensors` file of
//! the served architecture's weights (what a learner publishes for `grove explore --weights`).
//! `version` (optional) is the trainer's policy version of these weights; without it, a grove
//! checkpoint's `state.json` version, else none.
//!
//! The folder is read on the connection's worker while the batch keeps decoding; then the
//! scheduler lets the requests in the batch finish on the old weights, swaps, and the answer
//! comes once the new weights serve: `{"weights_version", "grove_policy_version", "kind",
//! "source"}`. A folder that does not load, or whose vocabulary size or context length differ
//! from the served model's (the tokenizer stays), is refused with 400 and the old weights
//! keep serving; a second load while one is in progress is 409.
use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

use super::batcher::{Refused, VersionTag, Weights};
use super::{checkpoint_version, ApiError, ApiResult, Handler};
use crate::model::io::{load_hf_folder, load_safetensors};
use crate::model::{lora, Llama};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadRequest {
    /// The folder to load.
    path: String,
    /// The policy version these weights are.
    #[serde(default)]
    version: Option<u64>,
}

/// What a folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    Full,
    Adapter,
    /// One safetensors file of the served architecture's weights.
    Tensors,
}

impl Payload {
    pub fn name(self) -> &'static str {
        match self {
            Payload::Full => "full",
            Payload::Adapter => "adapter",
            Payload::Tensors => "tensors",
        }
    }

    /// A file is tensors; a folder with `adapter_config.json` an adapter; any other folder
    /// full weights.
    pub fn of(path: &Path) -> Self {
        if path.is_file() {
            Payload::Tensors
        } else if path.join("adapter_config.json").exists() {
            Payload::Adapter
        } else {
            Payload::Full
        }
    }
}

/// Reads the weights of `dir`; an adapter goes onto the folder the server started from.
fn read_weights(h: &Handler, dir: &Path, payload: Payload) -> crate::error::Result<Llama> {
    let dev = crate::compute::device();
    if payload == Payload::Full {
        return load_hf_folder(dir, &dev);
    }
    let base_dir = h.dir.as_ref().ok_or_else(|| {
        crate::error::Error::checkpoint(
            dir,
            "an adapter or a tensors file needs the folder the server started from, and this \
             server was not started from a folder",
        )
    })?;
    let base = load_hf_folder(base_dir, &dev)?;
    if payload == Payload::Adapter {
        return lora::load_onto(base, dir, &base_dir.display().to_string());
    }
    let tensors = load_safetensors(dir, &dev)?;
    base.set_trainable(tensors, &dir.display().to_string())?;
    Ok(base)
}

/// The fields of the served model a load must keep: the tokenizer and the request checks
/// depend on them.
fn check_same_shape(h: &Handler, model: &Llama, dir: &Path) -> ApiResult<()> {
    let (want, got) = (&h.cfg, &model.cfg);
    for (what, a, b) in [
        ("vocab_size", want.vocab_size, got.vocab_size),
        (
            "max_position_embeddings",
            want.max_positions(),
            got.max_positions(),
        ),
    ] {
        if a != b {
            return Err(ApiError::field(
                "path",
                format!(
                    "{}: {what} is {b}, but the served model's is {a}: a load must keep the \
                     vocabulary and context length",
                    dir.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Answers `POST /admin/load`.
pub fn load(h: &Handler, body: &[u8]) -> ApiResult<Value> {
    let req: LoadRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::status(
            400,
            format!(
                "the load request must be {{\"path\": FOLDER, \"version\": N (optional)}}: {e}"
            ),
        )
    })?;
    let dir = Path::new(&req.path);
    if !dir.exists() {
        return Err(ApiError::field(
            "path",
            format!(
                "{}: no such folder or file on the server's machine",
                dir.display()
            ),
        ));
    }
    let payload = Payload::of(dir);
    let model = read_weights(h, dir, payload)
        .map_err(|e| ApiError::field("path", format!("cannot load {}: {e}", dir.display())))?;
    check_same_shape(h, &model, dir)?;
    let policy_version = match req.version {
        Some(v) => Some(v),
        None => checkpoint_version(dir).map_err(|e| ApiError::field("path", e.to_string()))?,
    };
    let weights = Weights {
        model,
        // The scheduler numbers the load when it swaps.
        version: VersionTag {
            weights_version: 0,
            policy_version,
        },
        source: dir.display().to_string(),
    };
    let done = h.scheduler.load(weights).map_err(|r| match r {
        Refused::LoadInProgress => ApiError::status(409, r.to_string()),
        other => ApiError::status(503, other.to_string()),
    })?;
    let version = done
        .recv()
        .map_err(|_| ApiError::status(500, "the batch scheduler stopped during the load"))?;
    Ok(json!({
        "weights_version": version.weights_version,
        "grove_policy_version": version.policy_version,
        "kind": payload.name(),
        "source": dir.display().to_string(),
    }))
}
