//! The second stage of a run config (ripgrep style): [`validate`] checks a parsed
//! [`RunConfig`] once, for what it is about to be used for ([`Purpose`]), fills in the derived
//! defaults, and returns a [`ValidatedRun`]. Only this module can build one, so the code that
//! takes it (the training loop, the explorer, their shared `Env`, the run's `Plan`) never
//! checks the config again.
use std::ops::Deref;
use std::path::Path;

use super::{resume, RunConfig};
use crate::error::{Error, Result};

/// What a config is validated for: the checks beyond the config's own that the use needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A fresh `grove train`: also no `[remote]` without `sync.buffer`, the shared buffer
    /// reachable, every reward-model folder present.
    Train,
    /// `grove train --resume`: the checks of `Train`, and a sync mode that resumes exactly.
    Resume,
    /// Reading a finished run back (`grove experiment --reuse` of an async run): the checks
    /// of `Train`; no step is trained, so the sync mode need not resume exactly
    /// (`train::run` refuses such a run when it is not finished).
    ReadBack,
    /// `grove explore`: the config's own checks (`[remote]` is what an explorer samples
    /// through; the buffer is the one given with `--buffer`).
    Explore,
    /// Reading a config to show or inspect it (`grove config`, a checkpoint's task for
    /// `grove eval`, a recorded config before a resume): the config's own checks only.
    Inspect,
}

/// A run config that passed every check for its [`Purpose`], with its derived defaults
/// filled in. Read it through `Deref` (`run.train.steps`); build it with [`validate`].
#[derive(Debug, Clone)]
pub struct ValidatedRun {
    config: RunConfig,
    purpose: Purpose,
    warnings: Vec<String>,
}

impl ValidatedRun {
    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    pub fn purpose(&self) -> Purpose {
        self.purpose
    }

    /// What is allowed but probably not meant, to be printed at start.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The config itself, to change and validate again.
    pub fn into_config(self) -> RunConfig {
        self.config
    }
}

impl Deref for ValidatedRun {
    type Target = RunConfig;

    fn deref(&self) -> &RunConfig {
        &self.config
    }
}

/// Checks `raw` (read from `source`, named in every error) for `purpose` and returns it
/// validated, with the derived defaults (`RunConfig::derive_defaults`) filled in.
pub fn validate(mut raw: RunConfig, source: &str, purpose: Purpose) -> Result<ValidatedRun> {
    raw.derive_defaults();
    raw.check(source)?;
    if purpose == Purpose::Resume {
        resume::refuse_inexact(&raw)?;
    }
    if matches!(
        purpose,
        Purpose::Train | Purpose::Resume | Purpose::ReadBack
    ) {
        check_train_preconditions(&raw)?;
    }
    let warnings = raw.warnings();
    Ok(ValidatedRun {
        config: raw,
        purpose,
        warnings,
    })
}

/// What a training run needs besides a valid config, checked before its run directory
/// exists: no `[remote]` it would ignore, the shared buffer reachable, reward-model folders
/// and eva's generator model present.
fn check_train_preconditions(cfg: &RunConfig) -> Result<()> {
    // vLLM's load endpoints need no admin token (its API key, if any, covers them).
    let pushes = cfg.remote.as_ref().is_some_and(|r| {
        r.admin_token.is_some() || r.engine == crate::rollout::remote::Engine::Vllm
    });
    if cfg.remote.is_some() && cfg.sync.buffer.is_none() && !pushes {
        // A trainer samples through a server only when it can keep the server on its policy.
        return Err(Error::config(
            "[remote]",
            "`grove train` samples through [remote] only when it can push its weights to the \
             server after every update: set remote.admin_token to the token the server was \
             started with (grove serve --admin-token), or remote.engine = \"vllm\" for a \
             vLLM server. Without it [remote] is for `grove \
             explore --buffer URL` processes feeding a trainer started with --buffer URL",
        ));
    }
    if let Some(url) = &cfg.sync.buffer {
        crate::buffer::open(url, 1).map_err(|e| {
            Error::config(
                "sync.buffer",
                format!("{}: {e}", crate::error::redact_url(url)),
            )
        })?;
    }
    if let Some(p) = &cfg.reward.pipeline {
        for dir in p.model_folders() {
            if !Path::new(&dir).join("config.json").exists() {
                return Err(Error::config(
                    "reward.pipeline",
                    format!(
                        "reward model folder {dir} has no config.json (train one with \
                         `grove rm-train --out {dir}`)"
                    ),
                ));
            }
        }
    }
    if let Some(g) = cfg.sampling.eva.generator_model() {
        let local = !g.starts_with("hf://");
        if local && !Path::new(g).exists() {
            return Err(Error::config(
                "sampling.eva.generator",
                format!(
                    "model {g} does not exist (give \"policy\", an HF model folder, a .gguf \
                     file, a grove checkpoint directory or hf://ORG/NAME)"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncMode;

    #[test]
    fn validation_fills_the_derived_defaults_and_keeps_the_warnings() {
        let mut raw = RunConfig::default();
        raw.rollout.group_size = 1;
        raw.loss.agg = crate::loss::Aggregation::SeqMeanTokenSumNorm;
        let run = validate(raw, "test", Purpose::Inspect).unwrap();
        assert_eq!(run.loss.max_len, Some(run.rollout.max_new_tokens));
        assert_eq!(run.warnings().len(), 1, "{:?}", run.warnings());
        assert_eq!(run.purpose(), Purpose::Inspect);
    }

    #[test]
    fn each_purpose_adds_its_own_checks() {
        let mut raw = RunConfig::default();
        raw.sync.mode = SyncMode::Async;
        // ReadBack trains no step: an async run may be read back (train::run refuses it
        // unless finished).
        for p in [
            Purpose::Train,
            Purpose::Explore,
            Purpose::Inspect,
            Purpose::ReadBack,
        ] {
            assert!(validate(raw.clone(), "test", p).is_ok(), "{p:?}");
        }
        let e = validate(raw, "test", Purpose::Resume)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be resumed exactly"), "{e}");

        let raw = RunConfig {
            remote: Some(toml::from_str("url = \"http://127.0.0.1:9\"").unwrap()),
            ..Default::default()
        };
        for p in [Purpose::Explore, Purpose::Inspect] {
            assert!(validate(raw.clone(), "test", p).is_ok(), "{p:?}");
        }
        for p in [Purpose::Train, Purpose::Resume, Purpose::ReadBack] {
            let e = validate(raw.clone(), "test", p).unwrap_err().to_string();
            assert!(
                e.contains("only when it can push its weights"),
                "{p:?}: {e}"
            );
        }
    }

    #[test]
    fn a_config_error_names_the_source() {
        let mut raw = RunConfig::default();
        raw.train.lr = -1.0;
        let e = validate(raw, "my.toml", Purpose::Inspect)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("my.toml") && e.contains("train.lr must be positive"),
            "{e}"
        );
    }
}
