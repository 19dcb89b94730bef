//! Remote mode: rollouts come from a completions server (`[remote]`: `grove serve` or vLLM)
//! that follows the policy. The learner writes its weights (a full HF folder, or only the
//! adapter with `[model.lora]`) into `sync.publish_dir/vN`, has the server load them as
//! version N (`grove serve`: `POST /admin/load` with `remote.admin_token`; vLLM: see
//! [`crate::rollout::vllm`]), and samples only once the server confirms it serves N: at the
//! start and after every `sync.interval` updates (earlier when the served version would be
//! more than `sync.max_staleness` behind). Every group is tagged with the version the
//! server's answers reported; an answer from another version, a push that fails after
//! `remote.retries` retries, or a push the server confirms with another version stops the
//! run with an error naming the server and the versions.
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::Rng;

use super::{Batch, BatchSource};
use crate::config::{RunConfig, SyncMode};
use crate::error::{Error, Result};
use crate::model::io::{save_hf_folder, save_pretrained};
use crate::model::{Llama, Tokenizer};
use crate::rollout::launch::Launched;
use crate::rollout::remote::{Engine, Payload, RemoteConfig, RemoteEngine};
use crate::rollout::vllm;
use crate::train::explore::{collect_with, Env, ExploreState};
use crate::train::learn::Learner;

/// Pushed folders kept next to the newest (the server may still be reading the previous one
/// when a push times out and is retried).
const KEEP: u64 = 1;

pub struct RemoteSync {
    engine: RemoteEngine,
    /// Where pushed weights are written (`sync.publish_dir`, or a folder under the system's
    /// temporary directory); the server reads them from there.
    dir: PathBuf,
    /// The policy version the server confirmed last.
    served: u64,
    /// The server grove runs itself (`remote.launch`), stopped when the run ends.
    launched: Option<Launched>,
}

/// The model name of a launched server that serves no versioned name (a LoRA run's base,
/// untied weights reloaded in place).
const LAUNCHED_NAME: &str = "grove-policy";

/// The folder pushes are written to: `sync.publish_dir`, else one per process under the
/// temporary directory (a server on another machine needs a shared `publish_dir`).
fn sync_dir(cfg: &RunConfig) -> Result<PathBuf> {
    let dir = match &cfg.sync.publish_dir {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir().join(format!("grove-remote-sync-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    // The server may run in another working directory: it gets an absolute path.
    std::fs::canonicalize(&dir).map_err(|e| Error::io(&dir, e))
}

/// Writes what the server loads for `model`: its adapter (PEFT folder) when it has one, else
/// the full weights: an HF folder (with `tok`, a folder `transformers` and vLLM load too).
/// Written under a temporary name and renamed, so the server never reads a half-written
/// folder.
pub fn write_policy(model: &Llama, tok: Option<&Tokenizer>, folder: &Path) -> Result<()> {
    let tmp = folder.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    // `Adapter::save` writes into an existing folder.
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    match (model.adapter(), tok) {
        (Some(a), _) => a.save(&tmp)?,
        (None, Some(tok)) => save_pretrained(model, tok, &tmp)?,
        (None, None) => save_hf_folder(model, &tmp)?,
    }
    if folder.exists() {
        std::fs::remove_dir_all(folder).map_err(|e| Error::io(folder, e))?;
    }
    std::fs::rename(&tmp, folder).map_err(|e| Error::io(folder, e))
}

/// Why `rc`'s server cannot follow a policy shaped like `model`, if it cannot.
fn unsupported(rc: &RemoteConfig, model: &Llama) -> Option<String> {
    let full_tied = model.adapter().is_none() && model.cfg.tied();
    (rc.engine == Engine::Vllm && full_tied && rc.launch.is_none()).then(|| {
        "remote.engine = \"vllm\" pushes full weights with vLLM's reload_weights RPC, which \
         serves wrong text for a model with tied embeddings (tie_word_embeddings = true): set \
         remote.launch = \"vllm\" (grove then restarts the server on each push), train a \
         LoRA adapter ([model.lora]), or use grove serve"
            .to_string()
    })
}

/// The flags a launched vLLM needs for the run's adapters.
fn lora_flags(model: &Llama) -> Vec<String> {
    match model.adapter() {
        Some(a) => vec![
            "--enable-lora".into(),
            "--max-lora-rank".into(),
            a.cfg.rank.to_string(),
        ],
        None => vec![],
    }
}

impl RemoteSync {
    /// Connects to the server (starting it with `remote.launch`) and pushes the starting
    /// weights.
    pub fn open(env: &Env, learner: &Learner) -> Result<Self> {
        let cfg = &env.cfg;
        let rc = cfg
            .remote
            .clone()
            .ok_or_else(|| Error::Internal("remote sync without [remote]".into()))?;
        if cfg.sync.mode != SyncMode::OnPolicy {
            return Err(Error::config(
                "sync.mode",
                format!(
                    "[remote] rollouts follow the policy by pushes every sync.interval updates; \
                     sync.mode = {:?} samples with local weights: leave sync.mode unset",
                    cfg.sync.mode
                ),
            ));
        }
        if let Some(why) = unsupported(&rc, &learner.model) {
            return Err(Error::config("remote.engine", why));
        }
        if rc.engine == Engine::Grove && rc.admin_token.is_none() {
            return Err(Error::config(
                "remote.admin_token",
                "grove train pushes its weights to the [remote] server after every \
                 sync.interval updates: set remote.admin_token to the token the server was \
                 started with (grove serve --admin-token)",
            ));
        }
        let dir = sync_dir(cfg)?;
        let launched = match rc.launch {
            Some(_) => Some(Launched::new(
                &rc,
                dir.join("server.log"),
                lora_flags(&learner.model),
            )?),
            None => None,
        };
        let mut s = RemoteSync {
            engine: RemoteEngine::new(rc)?,
            dir,
            served: 0,
            launched,
        };
        if learner.model.adapter().is_some() {
            s.launch_base(env)?;
        }
        s.push(learner, &env.tok)?;
        Ok(s)
    }

    /// A LoRA run's launched server starts on the base model; adapters are pushed to it.
    fn launch_base(&mut self, env: &Env) -> Result<()> {
        let Some(l) = self.launched.as_mut() else {
            return Ok(());
        };
        let base = env
            .model_path
            .as_deref()
            .filter(|p| p.is_dir())
            .ok_or_else(|| {
                Error::config(
                    "remote.launch",
                    "a launched vLLM serves the LoRA run's base from its folder: model.source \
                     must be an HF model folder",
                )
            })?;
        l.start(base, LAUNCHED_NAME)?;
        self.engine.serve_as(LAUNCHED_NAME.into(), None);
        Ok(())
    }

    /// Has the server serve `folder` as policy `v`: a push, or (full weights on a launched
    /// server that is not running, or whose tied embeddings vLLM cannot reload) a start on
    /// the folder under a name carrying `v`, which every answer then echoes.
    fn install(&mut self, folder: &Path, v: u64, payload: Payload, tied: bool) -> Result<()> {
        if let (Some(l), Payload::Full) = (self.launched.as_mut(), payload) {
            if tied || !l.is_running() {
                // Untied weights keep a neutral name: later pushes reload them in place.
                let name = if tied {
                    vllm::adapter_name(v)
                } else {
                    LAUNCHED_NAME.to_string()
                };
                l.start(folder, &name)?;
                let pushed = vllm::Pushed {
                    version: v,
                    adapter: None,
                };
                self.engine.serve_as(name, Some(pushed));
                return Ok(());
            }
        }
        self.engine.push_policy(folder, v, payload)
    }

    /// An error of the server's, with how a launched server died when it did.
    fn explain(&mut self, e: Error) -> Error {
        match (e, self.launched.as_mut().and_then(|l| l.exit_note())) {
            (Error::Remote(m), Some(note)) => Error::Remote(format!("{m}; {note}")),
            (e, _) => e,
        }
    }

    /// Writes the learner's weights, has the server load them and checks the version.
    fn push(&mut self, learner: &Learner, tok: &Tokenizer) -> Result<()> {
        let v = learner.version;
        let folder = self.dir.join(format!("v{v}"));
        // vLLM reads an HF folder with its config and tokenizer; grove serve needs neither.
        let engine = self.engine.config().engine;
        write_policy(
            &learner.model,
            (engine == Engine::Vllm).then_some(tok),
            &folder,
        )?;
        let payload = match learner.model.adapter() {
            Some(_) => Payload::Adapter,
            None => Payload::Full,
        };
        if let Err(e) = self.install(&folder, v, payload, learner.model.cfg.tied()) {
            let e = self.explain(e);
            return Err(Error::Remote(format!(
                "pushing policy version {v} ({}) to the server at {} failed; it served \
                 version {} before: {e}",
                folder.display(),
                self.engine.root(),
                self.served,
            )));
        }
        self.served = v;
        for old in 0..v.saturating_sub(KEEP) {
            let p = self.dir.join(format!("v{old}"));
            if p.exists() {
                let _ = std::fs::remove_dir_all(p);
            }
        }
        Ok(())
    }
}

impl BatchSource for RemoteSync {
    fn next_batch(
        &mut self,
        env: &Env,
        learner: &mut Learner,
        explore_st: &mut ExploreState,
        _s: usize,
    ) -> Result<Option<Batch>> {
        let cfg = &env.cfg;
        if let Some(m) = cfg.sync.max_staleness {
            if learner.version.saturating_sub(self.served) > m {
                self.push(learner, &env.tok)?;
            }
        }
        let t = Instant::now();
        let params = cfg.rollout.sampling();
        let (engine, served) = (&self.engine, self.served);
        let groups = collect_with(env, served, explore_st, |prompts, g, rng| {
            let (gens, reported) =
                engine.generate_tagged(&env.tok, prompts, g, &params, rng.gen())?;
            if reported != Some(served) {
                return Err(Error::Remote(format!(
                    "{}: answered with policy version {}, but version {served} was pushed and \
                     confirmed: is another trainer pushing to this server?",
                    engine.config().url,
                    reported.map_or("none".to_string(), |v| v.to_string())
                )));
            }
            Ok(gens)
        });
        let groups = groups.map_err(|e| self.explain(e))?;
        Ok(Some(Batch {
            groups,
            generate_s: t.elapsed().as_secs_f64(),
            dropped: 0,
        }))
    }

    fn after_update(&mut self, env: &Env, learner: &Learner) -> Result<()> {
        if learner.version.is_multiple_of(env.cfg.sync.interval as u64) {
            self.push(learner, &env.tok)?;
        }
        Ok(())
    }
}
