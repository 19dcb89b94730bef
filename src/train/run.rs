//! One training run from start (or resume) to end: plan, run directory, warm-up or restore,
//! then the RL loop over batches from the run's [`BatchSource`].
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::checkpoint::{self, TrainState};
use super::critic::Critic;
use super::explore::{Env, ExploreState};
use super::learn::Learner;
use super::source::{self, BatchSource, Restored};
use super::{create_run_dir, evaluate_task, heldout, reward_hook, warmup, Summary, TrainOptions};
use crate::buffer::{self, ExperienceGroup};
use crate::compute::device;
use crate::compute::optim::{AdamW, AdamWParams};
use crate::config::{Plan, Purpose, RunConfig, ValidatedRun};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::report::{self, Metrics};

/// Runs (or resumes) a training run to its end, or to `opts.stop_after`. Everything that can
/// be checked before the warm-up is checked before the run directory is created, and a fresh
/// run that fails before its first checkpoint removes its directory again.
/// `run` was validated for [`Purpose::Train`], or [`Purpose::Resume`] with `opts.resume`.
pub fn run(run: ValidatedRun, opts: &TrainOptions) -> Result<Summary> {
    crate::compute::tuning::allocator();
    let wanted = match opts.resume {
        Some(_) if run.purpose() == Purpose::ReadBack => Purpose::ReadBack,
        Some(_) => Purpose::Resume,
        None => Purpose::Train,
    };
    if run.purpose() != wanted {
        return Err(Error::Internal(format!(
            "the run config was validated for {:?}, but this run is a {wanted:?}: validate \
             it with config::Purpose::{wanted:?}",
            run.purpose()
        )));
    }
    let cfg = run;
    let t0 = Instant::now();
    let dev = device();
    let env = Arc::new(Env::new(cfg)?);
    let cfg = &env.cfg;
    let model = env.initial_policy(&dev)?;
    // Offline data is read (and checked) before anything is created.
    let offline = match &cfg.sync.offline {
        Some(p) => Some(
            buffer::jsonl::read_offline(
                Path::new(p),
                model.cfg.vocab_size,
                cfg.rollout.prompts_per_step,
            )
            .map_err(Error::from)?,
        ),
        None => None,
    };
    let mut plan = plan_for(&env, &model)?;
    if let Some(groups) = &offline {
        plan.limit_to_offline(groups.len());
    }
    // Sizes are checked against the machine before anything is written.
    plan.check_memory(crate::compute::available_memory())?;
    let (run_dir, ckpt) = open_run_dir(cfg, &plan, opts)?;
    let fresh = opts.resume.is_none();
    let result = train_in(&env, model, &plan, offline, &run_dir, ckpt, opts, t0);
    if result.is_err() && fresh && !run_dir.join("checkpoints").exists() {
        // Nothing worth keeping (no checkpoint to resume from): leave no half-made run behind.
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    result
}

/// The run in its directory: warm-up or restore, the RL loop, plots and trackers.
#[allow(clippy::too_many_arguments)]
fn train_in(
    env: &Arc<Env>,
    model: Llama,
    plan: &Plan,
    offline: Option<Vec<ExperienceGroup>>,
    run_dir: &Path,
    ckpt: Option<PathBuf>,
    opts: &TrainOptions,
    t0: Instant,
) -> Result<Summary> {
    let cfg = &env.cfg;
    let run_dir = run_dir.to_path_buf();
    if !opts.quiet {
        println!("{}", plan.render());
        println!("run directory: {}", run_dir.display());
    }
    let mut opt = AdamW::new(
        model.params(),
        AdamWParams {
            weight_decay: cfg.train.weight_decay,
            ..Default::default()
        },
    );
    // Everything is read and checked from the checkpoint, and metrics.jsonl/samples.jsonl
    // truncated to it (or removed on a fresh start), before the learner opens them to append.
    let resumed = match &ckpt {
        Some(c) => Some(restore(env, &model, &mut opt, &run_dir, c)?),
        None => {
            for name in ["metrics.jsonl", "samples.jsonl"] {
                let p = run_dir.join(name);
                if p.exists() {
                    std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
                }
            }
            None
        }
    };
    let mut learner = Learner::new(model, opt, &run_dir, cfg.seed)?;
    // Trackers ([report]) mirror metrics.jsonl and samples.jsonl from here on.
    let config_toml = cfg.to_toml()?;
    let params = report::sinks::flatten_params(&config_toml.parse().unwrap_or_default());
    let reporter =
        report::sinks::Reporter::start(&cfg.report, &run_dir, &config_toml, params, opts.quiet)?;
    let pb = report::progress_bar(cfg.warmup.max_steps as u64, opts.quiet);
    let start = match resumed {
        Some((start, st, reference, critic)) => {
            learner.reference = reference;
            learner.version = st.version;
            learner.learn_rng = st.learn_rng;
            learner.adv_state = st.adv_state;
            learner.skipped_steps = st.skipped_steps;
            learner.critic = critic;
            start
        }
        None => {
            let start = fresh_start(env, &mut learner, &pb)?;
            if let Some(cc) = &cfg.critic {
                // The critic starts from the warmed-up policy (verl, OpenRLHF).
                learner.critic = Some(Critic::from_policy(&learner.model, cc, cfg.seed)?);
            }
            start
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
            start
                .reward_pipeline
                .clone()
                .map(|s| (ckpt.as_deref().unwrap_or(run_dir.as_path()), s)),
        )?);
    }
    learner.blend = super::blend::Blender::for_run(
        cfg,
        start
            .blend
            .clone()
            .map(|s| (ckpt.as_deref().unwrap_or(run_dir.as_path()), s)),
    )?;
    let restored = Restored {
        offline,
        lagged: start.lagged,
        pending: start.pending,
        sampler: start.sampler,
    };
    check_read_back(cfg, ckpt.is_some(), start.step, plan.rl_steps, &run_dir)?;
    let mut explore_st = start.explore_st;
    let mut source = source::open(env, &learner, &explore_st, start.step, restored)?;
    let mut run = RunState {
        env,
        run_dir: &run_dir,
        steps: plan.rl_steps,
        warmup_steps: start.warmup_steps,
        acc_after_warmup: start.acc_after_warmup,
        reporter,
        health: report::health::Monitor::default(),
        plan: plan.clone(),
    };
    if ckpt.is_none() {
        run.save(&learner, 0, &explore_st, source.as_ref())?;
    }
    let already_finished = ckpt.is_some() && start.step >= run.steps;
    let (step, acc_final) = if already_finished {
        (
            start.step,
            last_heldout_accuracy(&run_dir, start.acc_after_warmup)?,
        )
    } else {
        run.rl_loop(
            &mut learner,
            source.as_mut(),
            &mut explore_st,
            start.step,
            &pb,
            opts,
        )?
    };
    drop(source);
    pb.finish_and_clear();
    if step >= run.steps {
        if let (Some(dir), Some(_)) = (&cfg.sync.publish_dir, &cfg.sync.buffer) {
            // Explorers following these weights stop on this marker.
            super::publish::mark_finished(Path::new(dir), step, learner.version)?;
        }
    }
    report::plot::plot_run(&run_dir)?;
    run.reporter.finish()?;
    Ok(Summary {
        run_dir: run_dir.clone(),
        warmup_steps: run.warmup_steps,
        acc_after_warmup: run.acc_after_warmup,
        acc_final,
        rl_steps_done: step,
        wall_s: t0.elapsed().as_secs_f64(),
        already_finished,
    })
}

/// A run opened only to be read back (`grove experiment --reuse` of a sync mode that cannot
/// resume exactly) must already be finished: it is never trained further.
fn check_read_back(
    cfg: &crate::config::ValidatedRun,
    from_checkpoint: bool,
    step: usize,
    steps: usize,
    run_dir: &Path,
) -> Result<()> {
    if cfg.purpose() == Purpose::ReadBack && !(from_checkpoint && step >= steps) {
        return Err(Error::config(
            "--reuse",
            format!(
                "{} is not finished (step {step} of {steps}) and its sync.mode cannot be \
                 resumed exactly; remove it to train it again",
                run_dir.display(),
            ),
        ));
    }
    Ok(())
}

/// The last held-out accuracy metrics.jsonl records for the RL phase (a finished run that is
/// resumed reports it instead of re-evaluating); `fallback` when it holds none.
fn last_heldout_accuracy(run_dir: &Path, fallback: f64) -> Result<f64> {
    let p = run_dir.join("metrics.jsonl");
    if !p.exists() {
        return Ok(fallback);
    }
    let lines = report::read_jsonl(&p)?;
    Ok(lines
        .iter()
        .rev()
        .filter(|v| v["phase"] == "rl")
        .find_map(|v| v["acc/eval"].as_f64())
        .unwrap_or(fallback))
}

/// The derived numbers printed at start and saved as plan.json.
fn plan_for(env: &Env, model: &Llama) -> Result<Plan> {
    let cfg = &env.cfg;
    if let Some(r) = &env.environment {
        // An episode is at most env.max_tokens long.
        let prompt = r
            .config()
            .max_tokens
            .saturating_sub(cfg.rollout.max_new_tokens);
        let mut plan = Plan::new(cfg, &model.cfg, model.num_params(), prompt)?;
        // A warm-up only on reference plays, which only some environments write, and never
        // for a policy loaded from model.source (train::warmup).
        if !r.config().kind.demonstrates() || env.model_path.is_some() {
            plan.warmup_max_steps = 0;
        }
        plan.heldout_size = heldout(env).len();
        return Ok(plan);
    }
    if env.model_path.is_none() {
        let prompt_tokens = 1 + env
            .task
            .heldout()
            .iter()
            .map(|p| p.prompt.len())
            .max()
            .unwrap_or(0);
        return Plan::new(cfg, &model.cfg, model.num_params(), prompt_tokens);
    }
    let mut longest = 0;
    for p in heldout(env) {
        longest = longest.max(env.encode_prompt(&p.prompt)?.len());
    }
    let mut plan = Plan::new(cfg, &model.cfg, model.num_params(), longest)?;
    plan.warmup_max_steps = 0;
    plan.heldout_size = heldout(env).len();
    Ok(plan)
}

/// The run directory and its latest checkpoint: the given one on resume, else a new directory
/// with config.toml and plan.json.
fn open_run_dir(
    cfg: &RunConfig,
    plan: &Plan,
    opts: &TrainOptions,
) -> Result<(PathBuf, Option<PathBuf>)> {
    if let Some(dir) = &opts.resume {
        return Ok((dir.clone(), checkpoint::latest(dir)?));
    }
    let dir = create_run_dir(Path::new(&cfg.output_dir), &cfg.name)?;
    let write = |name: &str, text: String| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    write("config.toml", cfg.to_toml()?)?;
    write("plan.json", serde_json::to_string_pretty(plan)?)?;
    Ok((dir, None))
}

/// Where the RL loop starts: from a checkpoint, or after warm-up.
struct Start {
    step: usize,
    warmup_steps: usize,
    acc_after_warmup: f64,
    explore_st: ExploreState,
    /// The checkpoint's rewarder state on resume (`Some(None)`: the checkpoint had none).
    reward_pipeline: Option<Option<reward_hook::RewarderState>>,
    /// The checkpoint's blend weights on resume (`Some(None)`: the checkpoint had none).
    blend: Option<Option<super::blend::BlendState>>,
    lagged: Option<(checkpoint::LaggedState, Llama)>,
    pending: Vec<ExperienceGroup>,
    /// Async mode with a staleness bound: the checkpoint's older published weights.
    sampler: Vec<(u64, Llama)>,
}

/// A reference policy is needed for a KL term in the loss (incl. DADS) or in the reward.
fn uses_reference(cfg: &RunConfig) -> bool {
    cfg.loss.loss_kl().is_some() || (cfg.loss.kl_in_reward && cfg.loss.kl_coef > 0.0)
}

/// Resume: load and check everything from the checkpoint before touching any file of the run,
/// so a corrupt checkpoint leaves the directory exactly as it was.
/// Returns where the loop starts, the checkpoint's state, the reference policy and the critic.
fn restore(
    env: &Env,
    model: &Llama,
    opt: &mut AdamW,
    run_dir: &Path,
    c: &Path,
) -> Result<(Start, TrainState, Option<Llama>, Option<Critic>)> {
    let st = checkpoint::read_state(c)?;
    checkpoint::restore(c, model, opt, &st)?;
    let dev = model.device().clone();
    let load = |p: PathBuf| -> Result<Llama> {
        let w = crate::model::io::load_safetensors(&p, &dev)?;
        model.sibling_with(w, &p.display().to_string())
    };
    // The reference policy is the warm-up result, kept as checkpoint step-0 (a LoRA run's:
    // the shared base, its adapter off unless the warm-up trained it).
    let reference = if uses_reference(&env.cfg) {
        let r = load(checkpoint::step_dir(run_dir, 0).join(checkpoint::policy_file(model)))?;
        Some(r.switch_adapter(st.warmup_steps > 0))
    } else {
        None
    };
    let behaviour = if st.lagged.is_some() {
        Some(load(c.join("behaviour.safetensors"))?)
    } else {
        None
    };
    let mut sampler = Vec::new();
    for &v in st.async_sampler.iter().flatten() {
        sampler.push((v, load(c.join(checkpoint::sampler_file(v)))?));
    }
    let critic = match &env.cfg.critic {
        Some(cc) => {
            // Built on the restored policy for its shape; every weight is then replaced.
            let mut critic = Critic::from_policy(model, cc, env.cfg.seed)?;
            critic.restore(c, st.critic_optimizer_t.unwrap_or(0))?;
            Some(critic)
        }
        None => None,
    };
    let pending_path = c.join("pending.jsonl");
    let pending = if pending_path.exists() {
        buffer::jsonl::read_groups(&pending_path)
            .map_err(|e| Error::checkpoint(&pending_path, e.to_string()))?
    } else {
        vec![]
    };
    report::truncate_after(&run_dir.join("metrics.jsonl"), "rl", st.step)?;
    report::truncate_after(&run_dir.join("samples.jsonl"), "rl", st.step)?;
    if let (Some(runner), Some(n)) = (&env.environment, st.env_episodes) {
        // Program environments see episode ids: the resumed run continues the numbering.
        runner.resume_episode_numbering(n);
    }
    let start = Start {
        step: st.step,
        warmup_steps: st.warmup_steps,
        acc_after_warmup: st.acc_after_warmup,
        explore_st: st.explore.clone(),
        reward_pipeline: Some(st.reward_pipeline.clone()),
        blend: Some(st.blend.clone()),
        lagged: st.lagged.clone().zip(behaviour),
        pending,
        sampler,
    };
    Ok((start, st, reference, critic))
}

/// Fresh start (or a resume before the first checkpoint): warm up, and evaluate the
/// warmed-up policy as step 0.
fn fresh_start(env: &Env, learner: &mut Learner, pb: &indicatif::ProgressBar) -> Result<Start> {
    let cfg = &env.cfg;
    let warmup_steps = warmup(env, &learner.model, &mut learner.metrics, pb)?;
    let acc = evaluate_task(
        env,
        &learner.model,
        heldout(env),
        cfg.rollout.max_new_tokens,
    )?;
    let mut m = Metrics::new();
    m.insert("acc/eval".into(), acc);
    learner.metrics.write(&report::metrics_line(0, "rl", &m))?;
    if uses_reference(cfg) {
        learner.reference = Some(learner.model.reference_copy(warmup_steps > 0)?);
    }
    Ok(Start {
        step: 0,
        warmup_steps,
        acc_after_warmup: acc,
        explore_st: ExploreState::for_trainer(cfg, env.task.as_ref())?,
        reward_pipeline: None,
        blend: None,
        lagged: None,
        pending: vec![],
        sampler: vec![],
    })
}

/// What the RL loop and its checkpoints need besides the learner and the source.
struct RunState<'a> {
    env: &'a Env,
    run_dir: &'a Path,
    /// The RL steps this run takes: `train.steps`, or fewer when offline data holds fewer.
    steps: usize,
    warmup_steps: usize,
    acc_after_warmup: f64,
    /// The [report] sinks (TensorBoard, MLflow), fed from metrics.jsonl and samples.jsonl.
    reporter: report::sinks::Reporter,
    health: report::health::Monitor,
    /// Saved with every checkpoint.
    plan: Plan,
}

impl RunState<'_> {
    fn save(
        &self,
        learner: &Learner,
        step: usize,
        explore_st: &ExploreState,
        source: &dyn BatchSource,
    ) -> Result<PathBuf> {
        let (lagged, mut extras) = source.checkpoint()?;
        extras.plan = Some(&self.plan);
        extras.critic = learner.critic.as_ref();
        // An async explorer runs ahead: its state at the learner's next batch stands in for the
        // trainer's own (unused) one.
        let snap = extras.async_snapshot.as_ref();
        let st = TrainState {
            step,
            optimizer_t: learner.opt.t,
            version: learner.version,
            explore: snap.map_or_else(|| explore_st.clone(), |a| a.explore.clone()),
            learn_rng: learner.learn_rng.clone(),
            warmup_steps: self.warmup_steps,
            acc_after_warmup: self.acc_after_warmup,
            adv_state: learner.adv_state.clone(),
            lagged,
            reward_pipeline: learner.rewards.as_ref().map(|r| r.state()),
            blend: learner.blend.as_ref().map(|b| b.state()),
            skipped_steps: learner.skipped_steps,
            env_episodes: match snap {
                Some(a) => a.env_episodes,
                None => self.env.environment.as_ref().map(|r| r.episodes_numbered()),
            },
            critic_optimizer_t: learner.critic.as_ref().map(|c| c.opt.t),
            async_sampler: snap.map(|a| a.weights.iter().map(|(v, _)| *v).collect()),
        };
        checkpoint::save(
            self.run_dir,
            &learner.model,
            &learner.opt,
            &self.env.tok,
            &st,
            &extras,
        )
    }

    /// RL steps until `train.steps`, `opts.stop_after` or the source runs dry; returns the
    /// last step and the last held-out accuracy.
    fn rl_loop(
        &mut self,
        learner: &mut Learner,
        source: &mut dyn BatchSource,
        explore_st: &mut ExploreState,
        mut step: usize,
        pb: &indicatif::ProgressBar,
        opts: &TrainOptions,
    ) -> Result<(usize, f64)> {
        let env = self.env;
        let cfg = &env.cfg;
        let steps = self.steps;
        self.reporter.sync()?;
        pb.set_prefix("RL");
        pb.set_length(steps as u64);
        pb.set_position(step as u64);
        pb.reset_eta();
        let mut acc_final = self.acc_after_warmup;
        let mut last_eval = self.acc_after_warmup;
        while step < steps {
            let s = step + 1;
            let Some(mut batch) = source.next_batch(env, learner, explore_st, s)? else {
                if !opts.quiet {
                    eprintln!("offline data exhausted after {step} steps");
                }
                break;
            };
            if !source.scored_by_pipeline() {
                // Async, shared-buffer and offline groups come with the verifier's reward: the
                // pipeline scores them here (SAR's p(a) pass then uses the learner's weights).
                if let Some(rw) = learner.rewards.as_mut() {
                    for g in &mut batch.groups {
                        rw.score_group(&env.tok, &learner.model, &mut g.experiences)?;
                    }
                }
            }
            // [reward.pipeline.blend]: the rewards become the blend with the current weights,
            // and the weights take their step, at the policy that sampled the batch.
            let blend_m = match learner.blend.as_mut() {
                Some(b) => Some(b.step(env, &learner.model, &mut batch.groups)?),
                None => None,
            };
            let mut m = learner.learn(env, &batch.groups, s, batch.generate_s, batch.dropped)?;
            m.extend(blend_m.into_iter().flatten());
            step = s;
            if step.is_multiple_of(cfg.train.eval_every) || step == steps {
                last_eval = evaluate_task(
                    env,
                    &learner.model,
                    heldout(env),
                    cfg.rollout.max_new_tokens,
                )?;
                m.insert("acc/eval".into(), last_eval);
            }
            learner
                .metrics
                .write(&report::metrics_line(step, "rl", &m))?;
            self.reporter.sync()?;
            // Only now the weights leave (a push to a [remote] server, a publish, the async
            // explorer's copy): a run that dies in that push keeps this step's metrics line.
            source.after_update(env, learner)?;
            pb.set_message(report::health::progress_message(&m, last_eval));
            for w in self.health.check(step, &m) {
                if !opts.quiet {
                    // Above the bar on a terminal, and on stderr when it is not one.
                    pb.suspend(|| eprintln!("{w}"));
                }
            }
            pb.inc(1);
            let stop_here = opts.stop_after == Some(step);
            if step.is_multiple_of(cfg.train.checkpoint_every) || step == steps || stop_here {
                self.save(learner, step, explore_st, source)?;
            }
            acc_final = last_eval;
            if stop_here {
                return Ok((step, acc_final));
            }
        }
        if step < steps {
            // Offline data ran out: evaluate and checkpoint where we stopped.
            acc_final = evaluate_task(
                env,
                &learner.model,
                heldout(env),
                cfg.rollout.max_new_tokens,
            )?;
            self.save(learner, step, explore_st, source)?;
        }
        Ok((step, acc_final))
    }
}
