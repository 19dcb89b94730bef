//! Keeping a vLLM server on grove's policy (`remote.engine = "vllm"`).
//!
//! vLLM reports no policy version, so the version is carried or confirmed another way:
//! - **Adapters** (`[model.lora]` runs): version N is loaded by
//!   `POST /v1/load_lora_adapter {"lora_name": "grove-policy-vN", "lora_path", "load_inplace": true}`
//!   and confirmed by `GET /v1/models` listing it; requests then name `grove-policy-vN` and
//!   vLLM's answers echo that name in `model`, so every answer says which adapter produced it.
//!   The previous adapter's name is unloaded: a request for it fails instead of sampling
//!   stale weights. `load_inplace` makes a retried push (the first attempt may have loaded
//!   it) succeed.
//! - **Full weights**: `POST /collective_rpc {"method": "reload_weights", "kwargs":
//!   {"weights_path": DIR}}` (a server started with `VLLM_SERVER_DEV_MODE=1`), then
//!   `POST /reset_prefix_cache` so that no cached prefix of the old weights is reused. The
//!   RPC's success is the confirmation: the trainer pushes only between batches, with no
//!   request in flight, so every later answer (whose `model` is the base name) comes from
//!   version N. vLLM's reload is wrong for tied embeddings on CPU (it answers 200 and serves
//!   wrong text), so grove refuses to push full tied weights this way
//!   (`train::source::remote`).
use std::path::Path;

use serde_json::{json, Value};

use super::remote::{Payload, RemoteEngine};
use crate::error::{Error, Result};

/// Adapter names are this prefix and the policy version.
pub const POLICY_NAME_PREFIX: &str = "grove-policy-v";

/// What the last confirmed push installed on a vLLM server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub version: u64,
    /// The adapter's served name; None for full weights (answers name the base model).
    pub adapter: Option<String>,
}

/// The served name of policy version `version`'s adapter.
pub fn adapter_name(version: u64) -> String {
    format!("{POLICY_NAME_PREFIX}{version}")
}

/// The version a served name carries (`grove-policy-v7` → 7).
pub fn version_of_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(POLICY_NAME_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The policy version a vLLM answer came from: the one its echoed model name carries, else
/// (an answer of the base model) the version of the last full-weight push, else unknown.
pub fn reported_version(answered_model: Option<&str>, pushed: Option<&Pushed>) -> Option<u64> {
    if let Some(v) = answered_model.and_then(version_of_name) {
        return Some(v);
    }
    match pushed {
        Some(Pushed {
            version,
            adapter: None,
        }) => Some(*version),
        _ => None,
    }
}

/// Whether a `GET /v1/models` answer lists a model called `name`.
pub fn lists_model(models: &Value, name: &str) -> bool {
    models
        .get("data")
        .and_then(Value::as_array)
        .is_some_and(|d| {
            d.iter()
                .any(|m| m.get("id").and_then(Value::as_str) == Some(name))
        })
}

/// Has the server serve `path` as policy `version` and confirms it (module docs).
pub fn push(engine: &RemoteEngine, path: &Path, version: u64, payload: Payload) -> Result<Pushed> {
    let path_text = path.display().to_string();
    match payload {
        Payload::Adapter => {
            let name = adapter_name(version);
            engine.post_root(
                "/v1/load_lora_adapter",
                &json!({"lora_name": name, "lora_path": path_text, "load_inplace": true}),
            )?;
            let models = engine.models()?;
            if !lists_model(&models, &name) {
                return Err(Error::Remote(format!(
                    "{}: loaded adapter {name} from {path_text}, but GET /v1/models does not \
                     list it: {}",
                    engine.root(),
                    models
                )));
            }
            Ok(Pushed {
                version,
                adapter: Some(name),
            })
        }
        Payload::Full => {
            engine.post_root(
                "/collective_rpc",
                &json!({"method": "reload_weights", "kwargs": {"weights_path": path_text}}),
            )?;
            engine.post_root("/reset_prefix_cache", &json!({}))?;
            Ok(Pushed {
                version,
                adapter: None,
            })
        }
    }
}

/// Retires an adapter name (`POST /v1/unload_lora_adapter`).
pub fn unload_adapter(engine: &RemoteEngine, name: &str) -> Result<()> {
    engine
        .post_root("/v1/unload_lora_adapter", &json!({"lora_name": name}))
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_versions() {
        assert_eq!(adapter_name(12), "grove-policy-v12");
        assert_eq!(version_of_name("grove-policy-v12"), Some(12));
        for other in [
            "grove-policy-v",
            "grove-policy-v1x",
            "base",
            "grove-policy-v-1",
            "",
        ] {
            assert_eq!(version_of_name(other), None, "{other}");
        }
    }

    #[test]
    fn versions_come_from_the_echoed_name_or_the_full_push() {
        let full = Pushed {
            version: 4,
            adapter: None,
        };
        let adapter = Pushed {
            version: 5,
            adapter: Some(adapter_name(5)),
        };
        // An adapter answer names its version, whatever was pushed last.
        assert_eq!(
            reported_version(Some("grove-policy-v5"), Some(&adapter)),
            Some(5)
        );
        assert_eq!(
            reported_version(Some("grove-policy-v3"), Some(&adapter)),
            Some(3)
        );
        // The base model's answer: the full push's version, unknown before any push or when
        // an adapter (not the base) was pushed.
        assert_eq!(reported_version(Some("base"), Some(&full)), Some(4));
        assert_eq!(reported_version(None, Some(&full)), Some(4));
        assert_eq!(reported_version(Some("base"), Some(&adapter)), None);
        assert_eq!(reported_version(Some("base"), None), None);
    }

    #[test]
    fn model_listing() {
        let m = json!({"data": [{"id": "base"}, {"id": "grove-policy-v2"}]});
        assert!(lists_model(&m, "grove-policy-v2"));
        assert!(!lists_model(&m, "grove-policy-v1"));
        assert!(!lists_model(&json!({}), "base"));
    }
}
