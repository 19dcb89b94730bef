//! Remote mode: rollouts come from a completions server (`[remote]`: `grove serve`) that
//! follows the policy. The learner writes its weights (a full HF folder, or only the adapter
//! with `[model.lora]`) into `sync.publish_dir/vN`, asks the server to load them as version N
//! (`POST /admin/load` with `remote.admin_token`), and samples only once the server confirms
//! it serves N: at the start and after every `sync.interval` updates (earlier when the served
//! version would be more than `sync.max_staleness` behind). Every group is tagged with the
//! version the server reported in its answers; an answer from another version, a push that
//! fails after `remote.retries` retries, or a push the server confirms with another version
//! stops the run with an error naming the server and the versions.
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::Rng;

use super::{Batch, BatchSource};
use crate::config::{RunConfig, SyncMode};
use crate::error::{Error, Result};
use crate::model::io::save_hf_folder;
use crate::model::Llama;
use crate::rollout::remote::RemoteEngine;
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
}

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
/// the full weights (HF folder). Written under a temporary name and renamed, so the server
/// never reads a half-written folder.
pub fn write_policy(model: &Llama, folder: &Path) -> Result<()> {
    let tmp = folder.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    match model.adapter() {
        Some(a) => a.save(&tmp)?,
        None => save_hf_folder(model, &tmp)?,
    }
    if folder.exists() {
        std::fs::remove_dir_all(folder).map_err(|e| Error::io(folder, e))?;
    }
    std::fs::rename(&tmp, folder).map_err(|e| Error::io(folder, e))
}

impl RemoteSync {
    /// Connects to the server and pushes the starting weights.
    pub fn open(cfg: &RunConfig, learner: &Learner) -> Result<Self> {
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
        if rc.admin_token.is_none() {
            return Err(Error::config(
                "remote.admin_token",
                "grove train pushes its weights to the [remote] server after every \
                 sync.interval updates: set remote.admin_token to the token the server was \
                 started with (grove serve --admin-token)",
            ));
        }
        let mut s = RemoteSync {
            engine: RemoteEngine::new(rc)?,
            dir: sync_dir(cfg)?,
            served: 0,
        };
        s.push(learner)?;
        Ok(s)
    }

    /// Writes the learner's weights, has the server load them and checks the version.
    fn push(&mut self, learner: &Learner) -> Result<()> {
        let v = learner.version;
        let folder = self.dir.join(format!("v{v}"));
        write_policy(&learner.model, &folder)?;
        self.engine.push_weights(&folder, v)?;
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
                self.push(learner)?;
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
        })?;
        Ok(Some(Batch {
            groups,
            generate_s: t.elapsed().as_secs_f64(),
            dropped: 0,
        }))
    }

    fn after_update(&mut self, env: &Env, learner: &Learner) -> Result<()> {
        if learner.version.is_multiple_of(env.cfg.sync.interval as u64) {
            self.push(learner)?;
        }
        Ok(())
    }
}
