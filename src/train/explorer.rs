//! `grove explore`: a separate process that samples experience groups and writes them to a
//! shared buffer (for a learner started with `sync.buffer`) or to a JSONL file (offline data).
//! With a `[remote]` server (`--remote URL`) it samples through that server and tags groups
//! with the policy version the server reports (`grove serve`) or 0. A buffer explorer keeps at
//! most [`buffer_bound`] groups in the buffer and stops by itself when the learner it follows
//! has finished ([`publish::FINISHED`]) or the buffer stays full for `sync.wait_timeout_s`.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::buffer::{self, BufferError};
use crate::compute::device;
use crate::config::{RunConfig, ValidatedRun};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::report::JsonlWriter;
use crate::rollout::engine::{RemoteRollouts, RolloutEngine};
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
    /// Stop after this many groups (default: one step's worth with `out`; with `buffer`, until
    /// the learner has finished or the buffer stays full for `sync.wait_timeout_s`).
    pub groups: Option<usize>,
    /// Explorer number (1, 2, ...): separate processes draw different prompts.
    pub explorer_id: u64,
    pub quiet: bool,
}

/// What the explorer samples with: its own copy of the weights, or a completions server
/// (`[remote]` / `--remote URL`).
enum Sampler {
    Local(Box<Llama>),
    Remote(Box<RemoteEngine>),
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
                return Err(Error::Timeout {
                    what: format!("weights in {}", dir.display()),
                    waited_s: wait_limit,
                    hint: "is the learner running with this publish directory?".into(),
                });
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
pub fn run_explorer(cfg: ValidatedRun, opts: &ExploreOptions) -> Result<usize> {
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
            if opts.policy.is_some() {
                return Err(Error::config(
                    "grove explore",
                    "--remote samples through a server: leave out --policy (--weights DIR \
                     pushes the learner's published weights to the server)",
                ));
            }
            if rc.launch.is_some() {
                return Err(Error::config(
                    "remote.launch",
                    "grove explore samples through a server someone else runs; `grove train` \
                     is what starts one with remote.launch",
                ));
            }
            if opts.weights.is_some() && rc.engine != crate::rollout::remote::Engine::Grove {
                // A learner publishes one .safetensors file per version, which only grove
                // serve's /admin/load takes; `grove train` with [remote] pushes folders to vLLM.
                return Err(Error::config(
                    "remote.engine",
                    "--weights DIR pushes the learner's published .safetensors files, which \
                     only grove serve loads: with vLLM, let `grove train` sample through it \
                     ([remote] with engine = \"vllm\")",
                ));
            }
            Sampler::Remote(Box::new(RemoteEngine::new(rc.clone())?))
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
            buffer::open(url, buffer_bound(&env.cfg)).map_err(|e| Error::Usage {
                option: "--buffer".into(),
                msg: e.to_string(),
            })?,
        ),
        None => None,
    };
    let mut written = 0usize;
    // The newest published version pushed to the [remote] server (with --weights).
    let mut pushed: Option<u64> = None;
    let say_stop = |why: String, written: usize| {
        if !opts.quiet {
            eprintln!(
                "explorer {}: {why}; stopping after {written} groups",
                opts.explorer_id.max(1)
            );
        }
    };
    while written < limit {
        if let Some(dir) = opts.weights.as_deref().filter(|d| publish::is_finished(d)) {
            say_stop(
                format!(
                    "the learner has finished ({})",
                    dir.join(publish::FINISHED).display()
                ),
                written,
            );
            break;
        }
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
            Sampler::Remote(remote) => {
                if let Some(dir) = &opts.weights {
                    push_newest(remote, dir, &mut pushed, env.cfg.sync.wait_timeout_s)?;
                }
                let engine = RemoteRollouts {
                    engine: remote,
                    tok: &env.tok,
                };
                // `grove serve` reports its checkpoint's (or last push's) policy version;
                // other servers: 0.
                version = engine.policy_version()?.unwrap_or(0);
                let params = env.cfg.rollout.sampling();
                collect_with(&env, version, &mut st, |prompts, g, rng| {
                    engine.generate_n(prompts, g, &params, rng)
                })?
            }
        };
        let take = (limit - written).min(groups.len());
        let groups = &groups[..take];
        match (&mut store, &opts.out) {
            (Some(b), _) => {
                if let Some(why) = put_all(b.as_mut(), groups, &env.cfg, opts)? {
                    say_stop(why, written);
                    break;
                }
            }
            (None, Some(path)) => {
                buffer::jsonl::write_groups(path, groups)?;
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

/// Pushes the learner's newest published weights in `dir` to the server when they are newer
/// than `pushed` (waiting up to `wait_limit` seconds for the first).
fn push_newest(
    remote: &RemoteEngine,
    dir: &std::path::Path,
    pushed: &mut Option<u64>,
    wait_limit: f64,
) -> Result<()> {
    let t = Instant::now();
    loop {
        if let Some((v, path)) = publish::latest(dir)? {
            if *pushed != Some(v) {
                let path = std::fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
                remote.push_weights(&path, v)?;
                *pushed = Some(v);
            }
            return Ok(());
        }
        if pushed.is_some() || t.elapsed().as_secs_f64() > wait_limit {
            return Err(Error::Timeout {
                what: format!("weights in {}", dir.display()),
                waited_s: wait_limit,
                hint: "is the learner running with this publish directory?".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The most groups an explorer lets a shared buffer hold before it waits for the learner:
/// `sync.capacity`, else 4 steps' worth (times `max_uses` under priority replay, whose groups
/// stay after use). Without a bound explorers flood the buffer with data the learner only
/// drops as stale.
pub fn buffer_bound(cfg: &RunConfig) -> usize {
    if cfg.sync.capacity > 0 {
        return cfg.sync.capacity;
    }
    let uses = cfg.sync.replay.map_or(1, |r| r.max_uses.max(1) as usize);
    4 * cfg.rollout.prompts_per_step * uses
}

/// Puts `groups` into the buffer, waiting while it is full. Returns why the explorer should
/// stop instead: the learner has finished (`--weights`), or the buffer stayed full for
/// `sync.wait_timeout_s` (nobody takes from it).
fn put_all(
    b: &mut dyn buffer::Buffer,
    groups: &[crate::buffer::ExperienceGroup],
    cfg: &RunConfig,
    opts: &ExploreOptions,
) -> Result<Option<String>> {
    for g in groups {
        let waited = Instant::now();
        loop {
            match b.put(g.clone()) {
                Ok(()) => break,
                Err(BufferError::Full { capacity }) => {
                    if let Some(dir) = opts.weights.as_deref().filter(|d| publish::is_finished(d)) {
                        return Ok(Some(format!(
                            "the learner has finished ({})",
                            dir.join(publish::FINISHED).display()
                        )));
                    }
                    if waited.elapsed().as_secs_f64() > cfg.sync.wait_timeout_s {
                        return Ok(Some(format!(
                            "the buffer stayed full ({capacity} groups) for sync.wait_timeout_s = \
                             {} s: no learner is taking from it",
                            cfg.sync.wait_timeout_s
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(Error::from(e)),
            }
        }
    }
    Ok(None)
}
