//! Training runs: a supervised warm-up on generated solutions, then RL steps, each one batch
//! of experience groups (from `explore`) turned into one update (by `learn`), with
//! evaluation, metrics and atomic checkpoints along the way.
//!
//! Where the batches come from is the sync mode (DESIGN.md §4): on-policy (current weights),
//! lagged (a separate older copy refreshed every `sync.interval` steps, `sync.offset` steps
//! ahead), async (an explorer thread and a bounded buffer), a shared buffer filled by
//! `grove explore` processes, or an offline JSONL file.
pub mod batch;
pub mod checkpoint;
pub mod explore;
pub mod explorer;
pub mod learn;
pub mod optim;
pub mod pretrained;
pub mod publish;
pub mod reward_hook;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::buffer::{self, Buffer, ExperienceGroup, MemoryBuffer, TakeMode};
use crate::config::{Plan, RunConfig, SyncMode};
use crate::error::{Error, Result};
use crate::model::{Config as ModelShape, Llama, Tokenizer};
use crate::report::{self, JsonlWriter, Metrics};
use crate::rollout::{generate, SamplingParams};
use crate::task::Problem;
use checkpoint::{Extras, LaggedState, TrainState};
use explore::{collect, collect_rewarded, response_text, rng_stream, Env, ExploreState};
use learn::Learner;
use optim::{AdamW, AdamWParams};

#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue the run in this directory from its latest checkpoint.
    pub resume: Option<PathBuf>,
    /// Stop (with a checkpoint) after this RL step, as if interrupted.
    pub stop_after: Option<usize>,
    /// No plan, progress bar or summary on the terminal.
    pub quiet: bool,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub warmup_steps: usize,
    pub acc_after_warmup: f64,
    pub acc_final: f64,
    pub rl_steps_done: usize,
    pub wall_s: f64,
}

/// The compute device: the first CUDA GPU when built with `--features cuda` and one exists.
pub fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::cuda_if_available(0) {
        return d;
    }
    Device::Cpu
}

/// The built-in policy shape for a vocabulary.
pub fn builtin_shape(cfg: &RunConfig, vocab: usize) -> ModelShape {
    let mut s = ModelShape::builtin_tiny(vocab);
    s.hidden_size = cfg.model.hidden_size;
    s.num_hidden_layers = cfg.model.num_layers;
    s.num_attention_heads = cfg.model.num_heads;
    s.num_key_value_heads = Some(cfg.model.num_kv_heads);
    s.intermediate_size = cfg.model.intermediate_size;
    s
}

/// Creates `<output_dir>/<name>`, or `<name>-2`, `<name>-3`, ... when taken: an existing run
/// directory is never reused or touched.
pub fn create_run_dir(output_dir: &Path, name: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(output_dir).map_err(|e| Error::io(output_dir, e))?;
    let mut i = 1usize;
    loop {
        let cand = if i == 1 {
            output_dir.join(name)
        } else {
            output_dir.join(format!("{name}-{i}"))
        };
        match std::fs::create_dir(&cand) {
            Ok(()) => return Ok(cand),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => i += 1,
            Err(e) => return Err(Error::io(&cand, e)),
        }
    }
}

/// Greedy held-out accuracy of `model` on built-in arithmetic `problems` (exact match followed
/// by EOS, BOS-prefixed prompts); [`evaluate_task`] is the same for any task of a run.
pub fn evaluate(
    model: &Llama,
    tok: &Tokenizer,
    problems: &[Problem],
    max_new_tokens: usize,
) -> Result<f64> {
    if problems.is_empty() {
        return Ok(0.0);
    }
    let params = SamplingParams::greedy(max_new_tokens);
    // Greedy decoding draws nothing from the RNG; a fixed one keeps the signature simple.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut correct = 0usize;
    for chunk in problems.chunks(512) {
        let prompts = chunk
            .iter()
            .map(|p| explore::encode_prompt(tok, &p.prompt))
            .collect::<Result<Vec<_>>>()?;
        let gens = generate(model, &prompts, tok.eos, tok.pad, &params, &mut rng)?;
        for (g, p) in gens.iter().zip(chunk) {
            let text = response_text(tok, &g.tokens)?;
            if crate::reward::exact::exact_answer(&text, g.finished, &p.answer).score > 0.5 {
                correct += 1;
            }
        }
    }
    Ok(correct as f64 / problems.len() as f64)
}

/// Greedy held-out accuracy of `model` on `problems`, judged by the run's task verifier.
pub fn evaluate_task(
    env: &Env,
    model: &Llama,
    problems: &[Problem],
    max_new_tokens: usize,
) -> Result<f64> {
    if problems.is_empty() {
        return Ok(0.0);
    }
    let tok = &env.tok;
    let params = SamplingParams::greedy(max_new_tokens);
    // Greedy decoding draws nothing from the RNG; a fixed one keeps the signature simple.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut correct = 0usize;
    // Pretrained models decode long answers with large KV caches: smaller batches.
    let chunk_size = if env.model_path.is_some() { 16 } else { 512 };
    for chunk in problems.chunks(chunk_size) {
        let prompts = chunk
            .iter()
            .map(|p| env.encode_prompt(&p.prompt))
            .collect::<Result<Vec<_>>>()?;
        let gens = generate(model, &prompts, tok.eos, tok.pad, &params, &mut rng)?;
        for (g, p) in gens.iter().zip(chunk) {
            let text = response_text(tok, &g.tokens)?;
            if env.task.verify(&text, g.finished, &p.answer).score > 0.5 {
                correct += 1;
            }
        }
    }
    Ok(correct as f64 / problems.len() as f64)
}

fn heldout(env: &Env) -> &[Problem] {
    let h = env.task.heldout();
    match env.cfg.train.eval_size {
        0 => h,
        n => &h[..n.min(h.len())],
    }
}

/// Supervised warm-up on generated solutions until greedy held-out accuracy reaches
/// `warmup.target_acc`; returns the number of steps taken. A pretrained policy has none.
pub fn warmup(
    env: &Env,
    model: &Llama,
    metrics: &mut JsonlWriter,
    pb: &indicatif::ProgressBar,
) -> Result<usize> {
    if env.model_path.is_some() {
        return Ok(0);
    }
    let w = &env.cfg.warmup;
    let mut rng = rng_stream(env.cfg.seed, explore::STREAM_WARMUP);
    let mut opt = AdamW::new(model.params(), AdamWParams::default());
    let eval_set = &env.task.heldout()[..w.eval_size.min(env.task.heldout().len())];
    let max_new = env.cfg.rollout.max_new_tokens;
    pb.set_prefix("warm-up");
    pb.set_length(w.max_steps as u64);
    for step in 1..=w.max_steps {
        let problems: Vec<Problem> = (0..w.batch_size)
            .map(|_| env.task.sample_train(&mut rng))
            .collect();
        let prompts = problems
            .iter()
            .map(|p| env.encode_prompt(&p.prompt))
            .collect::<Result<Vec<_>>>()?;
        let answers = problems
            .iter()
            .map(|p| {
                let mut a = env.tok.encode(&p.answer)?;
                a.push(env.tok.eos);
                Ok(a)
            })
            .collect::<Result<Vec<_>>>()?;
        let b = batch::build(&prompts, &answers, env.tok.pad, model.device())?;
        let (lp, _) = batch::response_logprobs(model, &b, 1.0)?;
        let flat: Vec<f32> = b.valid.iter().flatten().map(|&x| x as f32).collect();
        let valid =
            candle_core::Tensor::from_vec(flat, (b.valid.len(), b.resp_len), model.device())?;
        let n: f64 = b.valid.iter().flatten().sum();
        let loss = ((lp * &valid)?.sum_all()?.neg()? / n)?;
        let grads = loss.backward()?;
        opt.step(&grads, w.lr, 1.0)?;
        pb.inc(1);
        if step % w.eval_every == 0 || step == w.max_steps {
            let acc = evaluate_task(env, model, eval_set, max_new)?;
            let mut m = Metrics::new();
            m.insert("loss/sft".into(), loss.to_scalar::<f32>()? as f64);
            m.insert("acc/eval".into(), acc);
            metrics.write(&report::metrics_line(step, "warmup", &m))?;
            pb.set_message(format!(
                "sft loss {:.3} | held-out acc {:.1}%",
                m["loss/sft"],
                acc * 100.0
            ));
            if acc >= w.target_acc {
                return Ok(step);
            }
        }
    }
    Ok(w.max_steps)
}

/// One batch as handed to the learner.
struct Batch {
    groups: Vec<ExperienceGroup>,
    generate_s: f64,
    dropped: usize,
}

/// State shared between the learner and the async explorer thread.
struct AsyncShared {
    /// Updates the learner has taken.
    learner_version: u64,
    /// Newest published weights (deep copies) and their version.
    published: Option<(u64, Llama)>,
    queue: MemoryBuffer,
    /// Sampling seconds of queued groups, by group id.
    gen_s: std::collections::HashMap<u64, f64>,
    stop: bool,
    error: Option<String>,
}

struct AsyncExplorer {
    shared: Arc<(Mutex<AsyncShared>, Condvar)>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for AsyncExplorer {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.shared;
            if let Ok(mut s) = lock.lock() {
                s.stop = true;
            }
            cv.notify_all();
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Starts the explorer thread. Batch b (0-based) may only be sampled once the learner has
/// taken b − max_staleness updates, so with `max_staleness = 0` every batch is sampled by the
/// current weights and the run equals the on-policy run.
fn spawn_explorer(
    env: Arc<Env>,
    model: Llama,
    version: u64,
    mut st: ExploreState,
    first_batch: usize,
) -> Result<AsyncExplorer> {
    let cfg = &env.cfg;
    let np = cfg.rollout.prompts_per_step;
    let capacity = if cfg.sync.capacity == 0 {
        4 * np
    } else {
        cfg.sync.capacity.max(np)
    };
    let queue =
        MemoryBuffer::new(capacity, TakeMode::Fifo).map_err(|e| Error::Task(e.to_string()))?;
    let shared = Arc::new((
        Mutex::new(AsyncShared {
            learner_version: version,
            published: None,
            queue,
            gen_s: Default::default(),
            stop: false,
            error: None,
        }),
        Condvar::new(),
    ));
    let sh = shared.clone();
    let handle = std::thread::spawn(move || {
        let (lock, cv) = &*sh;
        let mut my_version = version;
        let max_stale = env.cfg.sync.max_staleness;
        let mut b = first_batch as u64;
        loop {
            {
                let Ok(mut s) = lock.lock() else { return };
                loop {
                    if s.stop {
                        return;
                    }
                    let gated = max_stale
                        .map(|m| s.learner_version + m < b)
                        .unwrap_or(false);
                    let full = s.queue.len().unwrap_or(0) + np > capacity;
                    if !gated && !full {
                        break;
                    }
                    s = match cv.wait(s) {
                        Ok(g) => g,
                        Err(_) => return,
                    };
                }
                if let Some((v, w)) = &s.published {
                    if *v > my_version {
                        if let Err(e) = model.copy_weights_from(w) {
                            s.error =
                                Some(format!("explorer: loading published weights v{v}: {e}"));
                            cv.notify_all();
                            return;
                        }
                        my_version = *v;
                    }
                }
            }
            let t = Instant::now();
            let res = collect(&env, &model, my_version, &mut st);
            let gen_s = t.elapsed().as_secs_f64();
            let Ok(mut s) = lock.lock() else { return };
            match res {
                Ok(groups) => {
                    for g in groups {
                        s.gen_s.insert(g.group_id, gen_s / np as f64);
                        if let Err(e) = s.queue.put(g) {
                            s.error = Some(format!("explorer: buffer: {e}"));
                            cv.notify_all();
                            return;
                        }
                    }
                }
                Err(e) => {
                    s.error = Some(format!("explorer: {e}"));
                    cv.notify_all();
                    return;
                }
            }
            cv.notify_all();
            b += 1;
        }
    });
    Ok(AsyncExplorer {
        shared,
        handle: Some(handle),
    })
}

/// Where the learner's batches come from.
enum Source {
    OnPolicy,
    Lagged {
        behaviour: Llama,
        behaviour_version: u64,
        next_batch: usize,
        pending: VecDeque<Vec<ExperienceGroup>>,
    },
    Async(AsyncExplorer),
    Shared {
        buffer: Box<dyn Buffer>,
        publish_dir: PathBuf,
    },
    Offline {
        groups: VecDeque<ExperienceGroup>,
    },
}

/// Runs (or resumes) a training run to its end, or to `opts.stop_after`.
pub fn run(cfg: RunConfig, opts: &TrainOptions) -> Result<Summary> {
    crate::tuning::allocator();
    if opts.resume.is_some() {
        crate::config::resume::refuse_inexact(&cfg)?;
    }
    let t0 = Instant::now();
    let dev = device();
    let env = Arc::new(Env::new(cfg)?);
    let cfg = &env.cfg;
    let model = env.initial_policy(&dev)?;
    let mut plan = if env.model_path.is_none() {
        let prompt_tokens = 1 + env
            .task
            .heldout()
            .iter()
            .map(|p| p.prompt.len())
            .max()
            .unwrap_or(0);
        Plan::new(cfg, model.num_params(), prompt_tokens)
    } else {
        let mut longest = 0;
        for p in heldout(&env) {
            longest = longest.max(env.encode_prompt(&p.prompt)?.len());
        }
        Plan::new(cfg, model.num_params(), longest)
    };
    if env.model_path.is_some() {
        plan.warmup_max_steps = 0;
        plan.heldout_size = heldout(&env).len();
    }
    // Offline data is read (and checked) before anything is created.
    let offline = match &cfg.sync.offline {
        Some(p) => Some(
            buffer::jsonl::read_offline(
                Path::new(p),
                model.cfg.vocab_size,
                cfg.rollout.prompts_per_step,
            )
            .map_err(|e| Error::Task(e.to_string()))?,
        ),
        None => None,
    };

    let (run_dir, ckpt) = match &opts.resume {
        Some(dir) => (dir.clone(), checkpoint::latest(dir)?),
        None => {
            let dir = create_run_dir(Path::new(&cfg.output_dir), &cfg.name)?;
            let write = |name: &str, text: String| -> Result<()> {
                let p = dir.join(name);
                std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
            };
            write("config.toml", cfg.to_toml())?;
            write("plan.json", serde_json::to_string_pretty(&plan)?)?;
            (dir, None)
        }
    };
    if !opts.quiet {
        println!("{}", plan.render());
        println!("run directory: {}", run_dir.display());
    }
    let metrics_path = run_dir.join("metrics.jsonl");
    let samples_path = run_dir.join("samples.jsonl");
    let mut opt = AdamW::new(
        model.params(),
        AdamWParams {
            weight_decay: cfg.train.weight_decay,
            ..Default::default()
        },
    );
    // A reference policy is needed for a KL term in the loss (incl. DADS) or in the reward.
    let use_ref = cfg.loss.loss_kl().is_some() || (cfg.loss.kl_in_reward && cfg.loss.kl_coef > 0.0);

    // Resume: load and check everything from the checkpoint before touching any file of the
    // run, so a corrupt checkpoint leaves the directory exactly as it was.
    struct Resumed {
        st: TrainState,
        reference: Option<Llama>,
        behaviour: Option<Llama>,
        pending: Vec<ExperienceGroup>,
    }
    let resumed = match &ckpt {
        Some(c) => {
            let st = checkpoint::read_state(c)?;
            checkpoint::restore(c, &model, &mut opt, &st)?;
            let load = |p: PathBuf| -> Result<Llama> {
                let w = crate::model::io::load_safetensors(&p, &dev)?;
                Llama::from_tensors(&model.cfg, w, &dev, &p.display().to_string())
            };
            // The reference policy is the warm-up result, kept as checkpoint step-0.
            let reference = if use_ref {
                Some(load(
                    checkpoint::step_dir(&run_dir, 0).join("model.safetensors"),
                )?)
            } else {
                None
            };
            let behaviour = if st.lagged.is_some() {
                Some(load(c.join("behaviour.safetensors"))?)
            } else {
                None
            };
            let pending_path = c.join("pending.jsonl");
            let pending = if pending_path.exists() {
                buffer::jsonl::read_groups(&pending_path)
                    .map_err(|e| Error::checkpoint(&pending_path, e.to_string()))?
            } else {
                vec![]
            };
            report::truncate_after(&metrics_path, "rl", st.step)?;
            report::truncate_after(&samples_path, "rl", st.step)?;
            Some(Resumed {
                st,
                reference,
                behaviour,
                pending,
            })
        }
        None => {
            // Fresh start (or a resume before the first checkpoint): begin from nothing.
            for p in [&metrics_path, &samples_path] {
                if p.exists() {
                    std::fs::remove_file(p).map_err(|e| Error::io(p, e))?;
                }
            }
            None
        }
    };
    let mut learner = Learner::new(model, opt, &run_dir, cfg.seed)?;
    // Reward-pipeline hook: the checkpoint's rewarder state when resuming.
    let resumed_rewards = resumed.as_ref().map(|r| r.st.reward_pipeline.clone());
    let mut explore_st = ExploreState::new(cfg, 0)?;
    let pb = report::progress_bar(cfg.warmup.max_steps as u64, opts.quiet);
    let (mut step, warmup_steps, acc_after_warmup, lagged_state, pending) = match resumed {
        Some(r) => {
            learner.reference = r.reference;
            learner.version = r.st.version;
            learner.learn_rng = r.st.learn_rng.clone();
            learner.adv_state = r.st.adv_state.clone();
            explore_st = r.st.explore.clone();
            let lagged = r.st.lagged.clone().zip(r.behaviour);
            (
                r.st.step,
                r.st.warmup_steps,
                r.st.acc_after_warmup,
                lagged,
                r.pending,
            )
        }
        None => {
            let ws = warmup(&env, &learner.model, &mut learner.metrics, &pb)?;
            let acc = evaluate_task(
                &env,
                &learner.model,
                heldout(&env),
                cfg.rollout.max_new_tokens,
            )?;
            let mut m = Metrics::new();
            m.insert("acc/eval".into(), acc);
            learner.metrics.write(&report::metrics_line(0, "rl", &m))?;
            if use_ref {
                learner.reference = Some(learner.model.deep_clone()?);
            }
            (0, ws, acc, None, vec![])
        }
    };
    // Reward-pipeline hook ([reward.pipeline], reward_hook.rs): its frozen reference policy is
    // the warm-up result (checkpoint step-0 on resume).
    if let Some(pc) = &cfg.reward.pipeline {
        learner.rewards = Some(reward_hook::PipelineRewarder::for_run(
            cfg,
            pc,
            &learner.model,
            &run_dir,
            resumed_rewards.map(|s| (ckpt.as_deref().unwrap_or(run_dir.as_path()), s)),
        )?);
    }

    let mut source = if let Some(url) = &cfg.sync.buffer {
        let mode = match &cfg.sync.replay {
            Some(r) => TakeMode::PriorityReplay(*r),
            None => TakeMode::Fifo,
        };
        let buffer = buffer::open_with_mode(url, usize::MAX / 2, mode)
            .map_err(|e| Error::Task(format!("sync.buffer: {e}")))?;
        let dir = PathBuf::from(cfg.sync.publish_dir.clone().unwrap_or_default());
        publish::publish(&dir, learner.version, &learner.model)?;
        Source::Shared {
            buffer,
            publish_dir: dir,
        }
    } else if let Some(groups) = offline {
        let np = cfg.rollout.prompts_per_step;
        Source::Offline {
            groups: groups.into_iter().skip(step * np).collect(),
        }
    } else {
        match cfg.sync.mode {
            SyncMode::OnPolicy => Source::OnPolicy,
            SyncMode::Lagged => match lagged_state {
                Some((ls, behaviour)) => Source::Lagged {
                    behaviour,
                    behaviour_version: ls.behaviour_version,
                    next_batch: ls.next_batch,
                    pending: chunk_groups(pending, cfg.rollout.prompts_per_step),
                },
                None => Source::Lagged {
                    behaviour: learner.model.deep_clone()?,
                    behaviour_version: learner.version,
                    next_batch: step,
                    pending: VecDeque::new(),
                },
            },
            SyncMode::Async => Source::Async(spawn_explorer(
                env.clone(),
                learner.model.deep_clone()?,
                learner.version,
                explore_st.clone(),
                step,
            )?),
        }
    };

    let save = |learner: &Learner,
                step: usize,
                explore_st: &ExploreState,
                source: &Source|
     -> Result<PathBuf> {
        let (lagged, extras) = match source {
            Source::Lagged {
                behaviour,
                behaviour_version,
                next_batch,
                pending,
            } => (
                Some(LaggedState {
                    behaviour_version: *behaviour_version,
                    next_batch: *next_batch,
                }),
                Extras {
                    behaviour: Some(behaviour),
                    pending: pending.iter().flatten().cloned().collect(),
                },
            ),
            _ => (None, Extras::default()),
        };
        let st = TrainState {
            step,
            optimizer_t: learner.opt.t,
            version: learner.version,
            explore: explore_st.clone(),
            learn_rng: learner.learn_rng.clone(),
            warmup_steps,
            acc_after_warmup,
            adv_state: learner.adv_state.clone(),
            lagged,
            reward_pipeline: learner.rewards.as_ref().map(|r| r.state()),
        };
        checkpoint::save(
            &run_dir,
            &learner.model,
            &learner.opt,
            &env.tok,
            &st,
            &extras,
        )
    };
    if ckpt.is_none() {
        save(&learner, 0, &explore_st, &source)?;
    }

    let steps = cfg.train.steps;
    pb.set_prefix("RL");
    pb.set_length(steps as u64);
    pb.set_position(step as u64);
    pb.reset_eta();
    let mut acc_final = acc_after_warmup;
    let mut last_eval = acc_after_warmup;
    while step < steps {
        let s = step + 1;
        let Some(batch) = next_batch(&env, &mut learner, &mut source, &mut explore_st, s)? else {
            if !opts.quiet {
                eprintln!("offline data exhausted after {step} steps");
            }
            break;
        };
        let mut m = learner.learn(&env, &batch.groups, s, batch.generate_s, batch.dropped)?;
        after_update(&env, &learner, &mut source)?;
        step = s;
        if step % cfg.train.eval_every == 0 || step == steps {
            last_eval = evaluate_task(
                &env,
                &learner.model,
                heldout(&env),
                cfg.rollout.max_new_tokens,
            )?;
            m.insert("acc/eval".into(), last_eval);
        }
        learner
            .metrics
            .write(&report::metrics_line(step, "rl", &m))?;
        pb.set_message(format!(
            "reward {:.3} | train acc {:.1}% | held-out acc {:.1}%",
            m["reward/mean"],
            m["acc/train"] * 100.0,
            last_eval * 100.0
        ));
        pb.inc(1);
        let stop_here = opts.stop_after == Some(step);
        if step % cfg.train.checkpoint_every == 0 || step == steps || stop_here {
            save(&learner, step, &explore_st, &source)?;
        }
        acc_final = last_eval;
        if stop_here {
            break;
        }
    }
    if step < steps && opts.stop_after != Some(step) {
        // Offline data ran out: evaluate and checkpoint where we stopped.
        acc_final = evaluate_task(
            &env,
            &learner.model,
            heldout(&env),
            cfg.rollout.max_new_tokens,
        )?;
        save(&learner, step, &explore_st, &source)?;
    }
    drop(source);
    pb.finish_and_clear();
    report::plot::plot_run(&run_dir)?;
    Ok(Summary {
        run_dir,
        warmup_steps,
        acc_after_warmup,
        acc_final,
        rl_steps_done: step,
        wall_s: t0.elapsed().as_secs_f64(),
    })
}

fn chunk_groups(groups: Vec<ExperienceGroup>, np: usize) -> VecDeque<Vec<ExperienceGroup>> {
    let mut out = VecDeque::new();
    let mut it = groups.into_iter().peekable();
    while it.peek().is_some() {
        out.push_back(it.by_ref().take(np).collect());
    }
    out
}

/// The batch for learner step `s` (1-based), or None when offline data is exhausted.
fn next_batch(
    env: &Env,
    learner: &mut Learner,
    source: &mut Source,
    explore_st: &mut ExploreState,
    s: usize,
) -> Result<Option<Batch>> {
    let cfg = &env.cfg;
    let np = cfg.rollout.prompts_per_step;
    match source {
        Source::OnPolicy => {
            let t = Instant::now();
            let groups = collect_rewarded(
                env,
                &learner.model,
                learner.version,
                explore_st,
                learner.rewards.as_mut(),
            )?;
            Ok(Some(Batch {
                groups,
                generate_s: t.elapsed().as_secs_f64(),
                dropped: 0,
            }))
        }
        Source::Lagged {
            behaviour,
            behaviour_version,
            next_batch,
            pending,
        } => {
            // Batch b is sampled when the learner is at step b − offset + 1, by a copy of the
            // weights refreshed whenever b is a multiple of the interval.
            let mut generate_s = 0.0;
            while *next_batch < s + cfg.sync.offset {
                if *next_batch % cfg.sync.interval == 0 {
                    behaviour.copy_weights_from(&learner.model)?;
                    *behaviour_version = learner.version;
                }
                let t = Instant::now();
                pending.push_back(collect_rewarded(
                    env,
                    behaviour,
                    *behaviour_version,
                    explore_st,
                    learner.rewards.as_mut(),
                )?);
                generate_s += t.elapsed().as_secs_f64();
                *next_batch += 1;
            }
            let groups = pending
                .pop_front()
                .ok_or_else(|| Error::Task("lagged mode: no pending batch".into()))?;
            Ok(Some(Batch {
                groups,
                generate_s,
                dropped: 0,
            }))
        }
        Source::Async(ex) => {
            let (lock, cv) = &*ex.shared;
            let min_version = cfg
                .sync
                .max_staleness
                .map(|m| buffer::min_version(learner.version, m))
                .unwrap_or(0);
            let mut groups = Vec::with_capacity(np);
            let mut dropped = 0;
            let mut generate_s = 0.0;
            let mut s_guard = lock
                .lock()
                .map_err(|_| Error::Task("async explorer panicked".into()))?;
            while groups.len() < np {
                if let Some(e) = &s_guard.error {
                    return Err(Error::Task(e.clone()));
                }
                let taken = s_guard
                    .queue
                    .take(np - groups.len(), min_version)
                    .map_err(|e| Error::Task(e.to_string()))?;
                dropped += taken.dropped;
                for g in taken.groups {
                    generate_s += s_guard.gen_s.remove(&g.group_id).unwrap_or(0.0);
                    groups.push(g);
                }
                cv.notify_all();
                if groups.len() < np {
                    s_guard = cv
                        .wait(s_guard)
                        .map_err(|_| Error::Task("async explorer panicked".into()))?;
                }
            }
            Ok(Some(Batch {
                groups,
                generate_s,
                dropped,
            }))
        }
        Source::Shared { buffer, .. } => {
            let min_version = cfg
                .sync
                .max_staleness
                .map(|m| buffer::min_version(learner.version, m))
                .unwrap_or(0);
            let mut groups = Vec::with_capacity(np);
            let mut dropped = 0;
            let waited = Instant::now();
            while groups.len() < np {
                let taken = buffer
                    .take(np - groups.len(), min_version)
                    .map_err(|e| Error::Task(e.to_string()))?;
                dropped += taken.dropped;
                groups.extend(taken.groups);
                if groups.len() < np {
                    if waited.elapsed().as_secs_f64() > cfg.sync.wait_timeout_s {
                        return Err(Error::Task(format!(
                            "no experience arrived in {} for {} s (have {} of {np} groups): is a `grove explore` process running?",
                            cfg.sync.buffer.as_deref().unwrap_or("the buffer"),
                            cfg.sync.wait_timeout_s,
                            groups.len()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Ok(Some(Batch {
                groups,
                generate_s: 0.0,
                dropped,
            }))
        }
        Source::Offline { groups } => {
            if groups.len() < np {
                return Ok(None);
            }
            Ok(Some(Batch {
                groups: groups.drain(..np).collect(),
                generate_s: 0.0,
                dropped: 0,
            }))
        }
    }
}

/// After an update: tell the async explorer, publish weights for explorer processes.
fn after_update(env: &Env, learner: &Learner, source: &mut Source) -> Result<()> {
    let interval = env.cfg.sync.interval as u64;
    match source {
        Source::Async(ex) => {
            let (lock, cv) = &*ex.shared;
            let publish = learner.version.is_multiple_of(interval);
            let copy = if publish {
                Some(learner.model.deep_clone()?)
            } else {
                None
            };
            let mut s = lock
                .lock()
                .map_err(|_| Error::Task("async explorer panicked".into()))?;
            s.learner_version = learner.version;
            if let Some(c) = copy {
                s.published = Some((learner.version, c));
            }
            cv.notify_all();
        }
        Source::Shared { publish_dir, .. } if learner.version.is_multiple_of(interval) => {
            publish::publish(publish_dir, learner.version, &learner.model)?;
        }
        _ => {}
    }
    Ok(())
}
