//! `grove explore`: a separate process that samples experience groups and writes them to a
//! shared buffer (for a learner started with `sync.buffer`) or to a JSONL file (offline data).
//! With a `[remote]` server (`--remote URL`) it samples through that server and tags groups
//! with the policy version the server reports (`grove serve`) or 0.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::buffer::{self, BufferError};
use crate::compute::device;
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::report::JsonlWriter;
use crate::rollout::remote::RemoteEngine;
use crate::train::explore::{collect, collect_with, Env, ExploreState};
use crate::train::{checkpoint, publish, warmup};

#[derive(Debug, Clone, Default)]
pub struct ExploreOptions {
    /// Write groups to this JSONL file.
    pub out: Option<PathBuf>,
    /// Put groups into this buffer URL (`sqlite:PATH`, `postgres://...[#table]`).
    pub buffer: Option<String>,
    /// Follow the learner's published weights in this folder.
    pub weights: Option<PathBuf>,
    /// Sample with the weights of this grove checkpoint directory.
    pub policy: Option<PathBuf>,
    /// Stop after this many groups (default: forever with `buffer`, one step's worth with `out`).
    pub groups: Option<usize>,
    /// Explorer number (1, 2, ...): separate processes draw different prompts.
    pub explorer_id: u64,
    pub quiet: bool,
}

/// What the explorer samples with: its own copy of the weights, or a completions server
/// (`[remote]` / `--remote URL`).
enum Sampler {
    Local(Box<Llama>),
    Remote(RemoteEngine),
}

/// The local policy: the learner's published weights, a checkpoint, or the deterministic
/// warm-up a training run starts with. Returns it with its policy version.
fn local_policy(env: &Env, opts: &ExploreOptions) -> Result<(Llama, u64)> {
    let dev = device();
    let model = env.initial_policy(&dev)?;
    let wait_limit = env.cfg.sync.wait_timeout_s;
    let mut version = 0u64;
    if let Some(dir) = &opts.weights {
        let t = Instant::now();
        loop {
            if let Some((v, path)) = publish::latest(dir)? {
                publish::load_into(&model, &path)?;
                version = v;
                break;
            }
            if t.elapsed().as_secs_f64() > wait_limit {
                return Err(Error::Task(format!(
                    "no weights published in {} after {wait_limit} s",
                    dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    } else if let Some(ck) = &opts.policy {
        let st = checkpoint::read_state(ck)?;
        publish::load_into(&model, &ck.join("model.safetensors"))?;
        version = st.version;
    } else {
        // No policy given: the same deterministic warm-up a training run starts with.
        let tmp =
            std::env::temp_dir().join(format!("grove-explore-warmup-{}.jsonl", std::process::id()));
        let mut sink = JsonlWriter::open_append(&tmp)?;
        let pb = crate::report::progress_bar(env.cfg.warmup.max_steps as u64, opts.quiet);
        warmup(env, &model, &mut sink, &pb)?;
        pb.finish_and_clear();
        let _ = std::fs::remove_file(tmp);
    }
    Ok((model, version))
}

/// Runs an explorer until `groups` groups are written; returns how many were.
pub fn run_explorer(cfg: RunConfig, opts: &ExploreOptions) -> Result<usize> {
    if opts.out.is_some() == opts.buffer.is_some() {
        return Err(Error::config(
            "grove explore",
            "give exactly one of --out FILE.jsonl or --buffer URL",
        ));
    }
    // A [reward.pipeline] is not run here: explorers write the verifier's reward and the
    // learner scores each batch with the pipeline as it takes it (train/run.rs).
    let env = Env::new(cfg)?;
    let mut version = 0u64;
    let sampler = match &env.cfg.remote {
        Some(rc) => {
            if opts.weights.is_some() || opts.policy.is_some() {
                return Err(Error::config(
                    "grove explore",
                    "--remote samples through a server: leave out --weights and --policy",
                ));
            }
            Sampler::Remote(RemoteEngine::new(rc.clone())?)
        }
        None => {
            let (model, v) = local_policy(&env, opts)?;
            version = v;
            Sampler::Local(Box::new(model))
        }
    };
    let limit = opts.groups.unwrap_or(if opts.out.is_some() {
        env.cfg.rollout.prompts_per_step
    } else {
        usize::MAX
    });
    let mut st = ExploreState::new(&env.cfg, opts.explorer_id.max(1))?;
    let mut store = match &opts.buffer {
        Some(url) => Some(
            buffer::open(url, usize::MAX / 2).map_err(|e| Error::Task(format!("--buffer: {e}")))?,
        ),
        None => None,
    };
    let mut written = 0usize;
    while written < limit {
        let groups = match &sampler {
            Sampler::Local(model) => {
                if let Some(dir) = &opts.weights {
                    if let Some((v, path)) = publish::latest(dir)? {
                        if v > version {
                            publish::load_into(model, &path)?;
                            version = v;
                        }
                    }
                }
                collect(&env, model, version, &mut st)?
            }
            Sampler::Remote(engine) => {
                // `grove serve` reports its checkpoint's policy version; other servers: 0.
                version = engine.policy_version()?.unwrap_or(0);
                let params = env.cfg.rollout.sampling();
                collect_with(&env, version, &mut st, |prompts, g, rng| {
                    engine.generate(&env.tok, prompts, g, &params, rng.gen())
                })?
            }
        };
        let take = (limit - written).min(groups.len());
        let groups = &groups[..take];
        match (&mut store, &opts.out) {
            (Some(b), _) => {
                for g in groups {
                    loop {
                        match b.put(g.clone()) {
                            Ok(()) => break,
                            Err(BufferError::Full { .. }) => {
                                std::thread::sleep(Duration::from_millis(50))
                            }
                            Err(e) => return Err(Error::Task(format!("--buffer: {e}"))),
                        }
                    }
                }
            }
            (None, Some(path)) => {
                buffer::jsonl::write_groups(path, groups)
                    .map_err(|e| Error::Task(e.to_string()))?;
            }
            (None, None) => unreachable!("checked above"),
        }
        written += take;
        if !opts.quiet {
            eprintln!(
                "explorer {}: {written} groups written (policy v{version})",
                opts.explorer_id.max(1)
            );
        }
    }
    Ok(written)
}
