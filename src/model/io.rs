//! Checkpoint IO: safetensors in and out, HF model folders (single file or sharded).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::llama::{Config, Llama};

/// Reads every tensor of a safetensors file. A truncated or corrupt file is an error naming it.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::checkpoint(path, "file does not exist"));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::checkpoint(
            path,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device)
            .map_err(|e| Error::checkpoint(path, format!("tensor `{name}`: {e}")))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Writes tensors to `path` (callers make the enclosing directory atomic).
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| Error::checkpoint(path, format!("cannot write: {e}")))
}

/// Loads an HF model folder: `config.json` plus `model.safetensors` or the shards listed in
/// `model.safetensors.index.json`.
pub fn load_hf_folder(dir: &Path, device: &Device) -> Result<Llama> {
    let cfg = Config::from_file(&dir.join("config.json"))?;
    let index = dir.join("model.safetensors.index.json");
    let mut tensors = HashMap::new();
    let files: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                Error::checkpoint(&index, "field `weight_map` missing or not an object")
            })?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    for f in &files {
        tensors.extend(load_safetensors(f, device)?);
    }
    Llama::from_tensors(&cfg, tensors, device, &dir.display().to_string())
}

/// Saves a model as an HF folder: config.json and model.safetensors.
pub fn save_hf_folder(model: &Llama, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = serde_json::to_string_pretty(&model.cfg)?;
    let p = dir.join("config.json");
    std::fs::write(&p, cfg).map_err(|e| Error::io(&p, e))?;
    save_safetensors(&model.named_tensors(), &dir.join("model.safetensors"))
}
