//! Versioned weights in a shared folder: the learner publishes, explorer processes poll.
//! `weights-v{N}.safetensors` is written under a temporary name and renamed, then
//! `latest.json` (`{"version": N, "file": "weights-vN.safetensors"}`) the same way, so a
//! reader never sees a half-written file.
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::io::{load_safetensors, save_safetensors};
use crate::model::Llama;

/// How many old versions to keep next to the newest (readers may still be loading them).
const KEEP: u64 = 2;

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

pub fn publish(dir: &Path, version: u64, model: &Llama) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = format!("weights-v{version}.safetensors");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    save_safetensors(&model.named_tensors(), &tmp)?;
    let path = dir.join(&name);
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    let latest = serde_json::json!({"version": version, "file": name});
    write_atomic(
        &dir.join("latest.json"),
        serde_json::to_string(&latest)?.as_bytes(),
    )?;
    if version > KEEP {
        let old = dir.join(format!("weights-v{}.safetensors", version - KEEP - 1));
        let _ = std::fs::remove_file(old);
    }
    Ok(path)
}

/// The marker the learner writes into its publish folder when its run has ended, so that
/// `grove explore --weights DIR` processes stop instead of sampling forever.
pub const FINISHED: &str = "finished.json";

/// Marks the learner's run as ended at `step` (policy `version`).
pub fn mark_finished(dir: &Path, step: usize, version: u64) -> Result<()> {
    let text = serde_json::json!({"step": step, "version": version}).to_string();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_atomic(&dir.join(FINISHED), text.as_bytes())
}

/// Removes an earlier run's end marker (a learner starting to publish into `dir`).
pub fn clear_finished(dir: &Path) -> Result<()> {
    let p = dir.join(FINISHED);
    match std::fs::remove_file(&p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&p, e)),
        _ => Ok(()),
    }
}

/// Whether the learner publishing into `dir` has ended its run.
pub fn is_finished(dir: &Path) -> bool {
    dir.join(FINISHED).exists()
}

/// The newest published version and its file, if any.
pub fn latest(dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    let p = dir.join("latest.json");
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(&p, format!("not valid JSON: {e}")))?;
    let version = v["version"]
        .as_u64()
        .ok_or_else(|| Error::checkpoint(&p, "field `version` missing or not an integer"))?;
    let file = v["file"]
        .as_str()
        .ok_or_else(|| Error::checkpoint(&p, "field `file` missing or not a string"))?;
    Ok(Some((version, dir.join(file))))
}

/// Loads published weights into `model` (same architecture).
pub fn load_into(model: &Llama, path: &Path) -> Result<()> {
    let w = load_safetensors(path, model.device())?;
    model.set_trainable(w, &path.display().to_string())
}
