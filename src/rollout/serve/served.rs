//! The model `grove serve` starts with: a grove checkpoint or an HF folder, with its
//! tokenizer and special tokens.
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::{Llama, Tokenizer};

/// A model with its tokenizer, as served.
pub struct ServedModel {
    pub model: Llama,
    pub tok: Tokenizer,
    pub name: String,
    /// Policy version of a grove checkpoint (`state.json`), None for an HF folder.
    pub version: Option<u64>,
    /// The folder it was loaded from.
    pub dir: Option<PathBuf>,
}

/// The policy version in a grove checkpoint's `state.json`; None when the folder has none.
pub fn checkpoint_version(dir: &Path) -> Result<Option<u64>> {
    let state = dir.join("state.json");
    if !state.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&state).map_err(|e| Error::io(&state, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(&state, format!("not valid JSON: {e}")))?;
    Ok(v.get("version").and_then(|x| x.as_u64()))
}

/// A special token's content from `tokenizer_config.json` (a string or `{"content": ...}`).
fn config_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// A token id from `config.json` (`eos_token_id` may be a number or a list of numbers).
fn config_id(v: &Option<Value>) -> Option<u32> {
    match v.as_ref()? {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first()?.as_u64().map(|x| x as u32),
        _ => None,
    }
}

impl ServedModel {
    /// Loads a grove checkpoint (`runs/NAME/checkpoints/step-N`) or an HF model folder: both
    /// hold `config.json`, `model.safetensors` (or shards) and `tokenizer.json`. Special tokens
    /// come from `tokenizer_config.json`, else `config.json`'s `bos_token_id`/`eos_token_id`,
    /// else the built-in vocabulary's `<bos>`, `<eos>`, `<pad>`.
    pub fn load(dir: &Path, name: Option<String>, device: &candle_core::Device) -> Result<Self> {
        if !dir.join("config.json").exists() {
            return Err(Error::checkpoint(
                dir,
                "no config.json: expected a grove checkpoint (runs/NAME/checkpoints/step-N) \
                 or an HF model folder",
            ));
        }
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::checkpoint(
                dir,
                "no tokenizer.json: grove serve needs the tokenizer to read text prompts and \
                 name tokens",
            ));
        }
        let model = crate::model::io::load_hf_folder(dir, device)?;
        let json = std::fs::read_to_string(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
        let raw = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| {
            Error::Tokenizer(format!(
                "{}: not a valid tokenizer.json: {e}",
                tok_path.display()
            ))
        })?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc: Value = if tc_path.exists() {
            let text = std::fs::read_to_string(&tc_path).map_err(|e| Error::io(&tc_path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::checkpoint(&tc_path, format!("not valid JSON: {e}")))?
        } else {
            Value::Null
        };
        let by_id = |v: &Option<Value>| config_id(v).and_then(|id| raw.id_to_token(id));
        let builtin = |s: &str| raw.token_to_id(s).map(|_| s.to_string());
        let bos = config_token(&tc, "bos_token")
            .or_else(|| by_id(&model.cfg.bos_token_id))
            .or_else(|| builtin("<bos>"));
        let eos = config_token(&tc, "eos_token")
            .or_else(|| by_id(&model.cfg.eos_token_id))
            .or_else(|| builtin("<eos>"))
            .ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: no EOS token: none in tokenizer_config.json (`eos_token`), config.json \
                     (`eos_token_id`) or the vocabulary (`<eos>`)",
                    dir.display()
                ))
            })?;
        let pad = config_token(&tc, "pad_token").or_else(|| builtin("<pad>"));
        let tok = Tokenizer::from_json(
            json,
            &tok_path.display().to_string(),
            bos.as_deref(),
            &eos,
            pad.as_deref(),
        )?;
        if tok.vocab_size() > model.cfg.vocab_size {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "tokenizer.json has {} tokens but config.json's vocab_size is {}",
                    tok.vocab_size(),
                    model.cfg.vocab_size
                ),
            ));
        }
        let version = checkpoint_version(dir)?;
        Ok(ServedModel {
            model,
            tok,
            name: name.unwrap_or_else(|| dir.display().to_string()),
            version,
            dir: Some(dir.to_path_buf()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;

    #[test]
    fn special_tokens_come_from_the_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let tok = Tokenizer::builtin_arithmetic();
        let mut cfg = Config::builtin_tiny(tok.vocab_size());
        let model = Llama::init(&cfg, 1, &candle_core::Device::Cpu).unwrap();
        let dev = candle_core::Device::Cpu;
        let e = ServedModel::load(dir, None, &dev)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no config.json"), "{e}");
        crate::model::io::save_hf_folder(&model, dir).unwrap();
        let e = ServedModel::load(dir, None, &dev)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no tokenizer.json"), "{e}");
        std::fs::write(dir.join("tokenizer.json"), tok.to_json()).unwrap();
        // Built-in names: <bos> 1, <eos> 2, <pad> 0; no state.json, so no version.
        let s = ServedModel::load(dir, Some("m".into()), &dev).unwrap();
        assert_eq!((s.tok.bos, s.tok.eos, s.tok.pad), (Some(1), 2, 0));
        assert_eq!((s.name.as_str(), s.version), ("m", None));
        // config.json's eos_token_id (a list: its first) wins over the built-in name: '=' is 17.
        cfg.eos_token_id = Some(serde_json::json!([17, 2]));
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string(&cfg).unwrap(),
        )
        .unwrap();
        assert_eq!(ServedModel::load(dir, None, &dev).unwrap().tok.eos, 17);
        // tokenizer_config.json wins over both; tokens may be objects with "content".
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": {"content": "+"}, "bos_token": null, "pad_token": "<unk>"}"#,
        )
        .unwrap();
        let s = ServedModel::load(dir, None, &dev).unwrap();
        assert_eq!((s.tok.bos, s.tok.eos, s.tok.pad), (Some(1), 14, 3));
    }
}
