//! The explorer: prompts → responses with behaviour log-probs → verified rewards, packed as
//! experience groups tagged with the policy version that produced them. The same function
//! serves every mode: on-policy (the trainer's own weights), lagged (an older copy), async
//! (a thread with its own copy) and separate `grove explore` processes.
use std::collections::BTreeMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::buffer::{Experience, ExperienceGroup};
use crate::config::{RunConfig, ValidatedRun};
use crate::env::runner::{EnvRunner, EnvTask, Pacing};
use crate::error::{Error, Result};
use crate::model::{Llama, Tokenizer};
use crate::reward::noise::NoiseInjector;
use crate::rollout::engine::{LocalEngine, RolloutEngine};
use crate::rollout::Generation;
use crate::sampling::pace::Pace;
use crate::task::eva_pool::PromptPool;
use crate::task::{Problem, Task};
use crate::train::reward_hook::PipelineRewarder;

/// What every stage reads and nobody changes: the config, tokenizer and task.
pub struct Env {
    /// The run's validated config (read as a `RunConfig` through `Deref`).
    pub cfg: ValidatedRun,
    pub tok: Tokenizer,
    pub task: Box<dyn Task>,
    /// Local path of the pretrained policy (`model.source`); None: the built-in model.
    pub model_path: Option<std::path::PathBuf>,
    /// The `[env]` environment that replaces the task's single prompts with episodes.
    pub environment: Option<std::sync::Arc<EnvRunner>>,
}

impl Env {
    /// The built-in model's vocabulary, or the pretrained model's own tokenizer (and chat
    /// template, which renders the task's prompts).
    pub fn new(cfg: ValidatedRun) -> Result<Self> {
        let (tok, model_path) = if cfg.model.source == "builtin" {
            // Environments talk in text: the built-in model then gets letters too.
            let tok = match &cfg.env {
                Some(e) if e.kind.offers_tools() => Tokenizer::builtin_tool_text(),
                Some(_) => Tokenizer::builtin_text(),
                None => Tokenizer::builtin_arithmetic(),
            };
            (tok, None)
        } else {
            let path = super::pretrained::model_path(&cfg.model.source)?;
            (
                crate::model::io::load_pretrained_tokenizer(&path)?,
                Some(path),
            )
        };
        let model_name = match &model_path {
            Some(p) => p.display().to_string(),
            None => "the built-in model".to_string(),
        };
        let (task, environment): (Box<dyn Task>, _) = match &cfg.env {
            Some(ec) => {
                let runner = EnvRunner::new(ec, &tok, &model_name)?;
                (
                    Box::new(EnvTask::new(&runner)),
                    Some(std::sync::Arc::new(runner)),
                )
            }
            None => (
                crate::task::kinds::build(&cfg.task, &tok, &model_name)?,
                None,
            ),
        };
        Ok(Env {
            cfg,
            tok,
            task,
            model_path,
            environment,
        })
    }

    /// Prompt token ids: BOS (when the tokenizer has one and the task's template wants it)
    /// followed by the text.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        if self.task.prompt_bos() {
            encode_prompt(&self.tok, text)
        } else {
            self.tok.encode(text)
        }
    }

    /// The weights a run starts from: the seeded built-in model or the pretrained one.
    pub fn initial_policy(&self, dev: &candle_core::Device) -> Result<Llama> {
        let quantized = self
            .cfg
            .model
            .lora
            .as_ref()
            .is_some_and(|l| l.quantized_base);
        let base = match &self.model_path {
            Some(p) if quantized => crate::model::io::load_gguf_frozen(p, dev)?,
            None if quantized => {
                return Err(Error::config(
                    "model.lora.quantized_base",
                    "needs a GGUF model.source; the built-in model has no quantized weights",
                ))
            }
            None => Llama::init(
                &super::builtin_shape(&self.cfg, self.tok.vocab_size()),
                self.cfg.seed,
                dev,
            )?,
            Some(p) => crate::model::io::load_pretrained(p, dev)?.0,
        };
        let policy = match &self.cfg.model.lora {
            // [model.lora]: only an adapter trains; the base stays frozen (docs/lora.md).
            Some(l) => crate::model::lora::apply(base, l, self.cfg.seed, &self.cfg.model.source)?,
            None => base,
        };
        // Last: a LoRA base's identity hash is of its f32 values.
        policy.with_dtype(self.cfg.model.dtype)
    }
}

/// RNG streams of one run: fixed numbers so every mode draws the same numbers.
pub const STREAM_PROMPTS: u64 = 1;
pub const STREAM_SAMPLES: u64 = 2;
pub const STREAM_LEARN: u64 = 3;
pub const STREAM_WARMUP: u64 = 4;
/// eva's creator: the initial prompt pool, then its selections and mutations.
pub const STREAM_EVA: u64 = 5;
/// `sampling.pace = "time"`: the uniforms that decide which episodes reach the learner.
pub const STREAM_PACE: u64 = 6;
/// Explorer processes `k = 1, 2, ...` use streams offset by this much times k.
pub const STREAM_EXPLORER_STRIDE: u64 = 16;

pub fn rng_stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

/// The explorer's mutable state; saved with checkpoints so a resumed run draws the same
/// prompts and samples.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExploreState {
    pub prompt_rng: ChaCha8Rng,
    pub sample_rng: ChaCha8Rng,
    /// Reward-noise injector of noisy-verifier experiments (None when both rates are 0).
    pub noise: Option<NoiseInjector>,
    pub next_group_id: u64,
    /// `[sampling.eva]`: the prompt pool the batches draw from, grown by eva's creator (the
    /// evolved prompt set a checkpoint must keep). None: prompts come from the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eva: Option<PromptPool>,
    /// `sampling.pace = "time"`: the pace stream (None otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pace_rng: Option<ChaCha8Rng>,
}

impl ExploreState {
    /// `explorer` 0 is the trainer's own explorer; separate processes use 1, 2, ...
    pub fn new(cfg: &RunConfig, explorer: u64) -> Result<Self> {
        let off = explorer * STREAM_EXPLORER_STRIDE;
        let rw = &cfg.reward;
        let noise = if rw.noise_rho0 > 0.0 || rw.noise_rho1 > 0.0 {
            Some(
                NoiseInjector::new(rw.noise_rho0, rw.noise_rho1, cfg.seed ^ 0x6e6f_6973 ^ off)
                    .map_err(|e| Error::config("reward", e.to_string()))?,
            )
        } else {
            None
        };
        Ok(ExploreState {
            prompt_rng: rng_stream(cfg.seed, STREAM_PROMPTS + off),
            sample_rng: rng_stream(cfg.seed, STREAM_SAMPLES + off),
            noise,
            // Explorer k numbers its groups from k·2⁴⁸ so ids never collide across processes.
            next_group_id: explorer << 48,
            eva: None,
            pace_rng: (cfg.sampling.pace == Pace::Time)
                .then(|| rng_stream(cfg.seed, STREAM_PACE + off)),
        })
    }

    /// The trainer's own explorer state: [`ExploreState::new`] plus eva's initial prompt pool,
    /// drawn from `task` on its own stream when `[sampling.eva]` is on.
    pub fn for_trainer(cfg: &RunConfig, task: &dyn Task) -> Result<Self> {
        let mut st = Self::new(cfg, 0)?;
        let eva = &cfg.sampling.eva;
        if eva.enabled() {
            st.eva = Some(PromptPool::new(
                task,
                eva,
                rng_stream(cfg.seed, STREAM_EVA),
            )?);
        }
        Ok(st)
    }
}

pub fn encode_prompt(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    tok.encode_with_bos(text)
}

/// Decoded response text without the EOS.
pub fn response_text(tok: &Tokenizer, tokens: &[u32]) -> Result<String> {
    let body: Vec<u32> = tokens.iter().copied().filter(|&t| t != tok.eos).collect();
    tok.decode(&body)
}

/// One batch of `rollout.prompts_per_step` groups of `rollout.group_size` responses sampled
/// from `model`, which is policy version `version`.
pub fn collect(
    env: &Env,
    model: &Llama,
    version: u64,
    st: &mut ExploreState,
) -> Result<Vec<ExperienceGroup>> {
    collect_rewarded(env, model, version, st, None)
}

/// [`collect`], with rewards from a `[reward.pipeline]` when `rewarder` is given (see
/// [`crate::train::reward_hook`]).
pub fn collect_rewarded(
    env: &Env,
    model: &Llama,
    version: u64,
    st: &mut ExploreState,
    rewarder: Option<&mut PipelineRewarder>,
) -> Result<Vec<ExperienceGroup>> {
    if let Some(runner) = &env.environment {
        let r = &env.cfg.rollout;
        let sampling = &env.cfg.sampling;
        let pacing = match (sampling.pace_window_s, st.pace_rng.as_mut()) {
            (Some(window_s), Some(rng)) if sampling.pace == Pace::Time => Some(Pacing {
                window_s,
                max_rounds: sampling.pace_max_rounds,
                duration: &env.cfg.advantage.duration,
                rng,
            }),
            _ => None,
        };
        // eva on countdown: the groups play puzzles of the pool, not fresh seeds.
        let pool_starts = match st.eva.as_mut() {
            Some(pool) => {
                let ids = pool.draw(r.prompts_per_step, &mut st.prompt_rng);
                let starts = ids
                    .iter()
                    .map(|&i| runner.pool_start(pool.problem(i), &mut st.prompt_rng))
                    .collect::<Result<Vec<_>>>()?;
                Some((ids, starts))
            }
            None => None,
        };
        let mut groups = match &pool_starts {
            Some((_, starts)) => runner.collect_starts(
                model,
                &env.tok,
                r.sampling(),
                (starts, r.group_size),
                version,
                &mut st.sample_rng,
                pacing,
                &mut st.next_group_id,
            )?,
            None => runner.collect(
                model,
                &env.tok,
                r.sampling(),
                (r.prompts_per_step, r.group_size),
                version,
                (&mut st.prompt_rng, &mut st.sample_rng),
                pacing,
                &mut st.next_group_id,
            )?,
        };
        // [reward.pipeline] over episodes: the per-turn rewards become its `turns` components.
        if let Some(rewarder) = rewarder {
            for g in &mut groups {
                rewarder.score_group(&env.tok, model, &mut g.experiences)?;
            }
        }
        if let (Some(pool), Some((ids, _))) = (st.eva.as_mut(), &pool_starts) {
            for (g, &id) in groups.iter().zip(ids) {
                let rewards: Vec<f64> = g.experiences.iter().map(|e| e.reward).collect();
                pool.observe(id, &rewards, &env.cfg.sampling.eva);
            }
        }
        return Ok(groups);
    }
    let hook = rewarder.map(|r| (r, model));
    let engine = LocalEngine::new(model, &env.tok);
    collect_hooked(env, version, st, hook, |prompts, g, rng| {
        engine.generate_n(prompts, g, &env.cfg.rollout.sampling(), rng)
    })
}

/// [`collect`] with another sampler: `sample(prompts, g, sample_rng)` returns `g` generations
/// per prompt, prompt-major (a remote server, for example).
pub fn collect_with<F>(
    env: &Env,
    version: u64,
    st: &mut ExploreState,
    sample: F,
) -> Result<Vec<ExperienceGroup>>
where
    F: FnOnce(&[Vec<u32>], usize, &mut ChaCha8Rng) -> Result<Vec<Generation>>,
{
    if env.environment.is_some() {
        return Err(Error::config(
            "[env]",
            "[env] episodes are rolled out by grove's own engine, not through a remote server \
             (remove --remote / [remote])",
        ));
    }
    collect_hooked(env, version, st, None, sample)
}

/// [`collect_with`] plus the reward-pipeline hook: the rewarder and the model that sampled.
fn collect_hooked<F>(
    env: &Env,
    version: u64,
    st: &mut ExploreState,
    mut hook: Option<(&mut PipelineRewarder, &Llama)>,
    sample: F,
) -> Result<Vec<ExperienceGroup>>
where
    F: FnOnce(&[Vec<u32>], usize, &mut ChaCha8Rng) -> Result<Vec<Generation>>,
{
    let r = &env.cfg.rollout;
    let (np, g) = (r.prompts_per_step, r.group_size);
    let (problems, pool_ids) = draw_problems(env, st, np);
    let mut prompt_ids = Vec::with_capacity(np);
    for p in &problems {
        prompt_ids.push(env.encode_prompt(&p.prompt)?);
    }
    let gens: Vec<Generation> = sample(&prompt_ids, g, &mut st.sample_rng)?;
    if gens.len() != np * g {
        return Err(Error::Internal(format!(
            "sampler returned {} responses for {np} prompts × {g}",
            gens.len()
        )));
    }
    let mut out = Vec::with_capacity(np);
    for (p, prob) in problems.iter().enumerate() {
        let group_id = st.next_group_id;
        st.next_group_id += 1;
        let mut experiences = Vec::with_capacity(g);
        for gen in &gens[p * g..(p + 1) * g] {
            experiences.push(scored_experience(
                env,
                st,
                prob,
                &prompt_ids[p],
                gen,
                (group_id, version),
            )?);
        }
        // Reward-pipeline hook ([reward.pipeline], src/train/reward_hook.rs): the pipeline's
        // reward replaces the verifier's; components["correct"] stays the verified correctness.
        if let Some((rewarder, model)) = hook.as_mut() {
            rewarder.score_group(&env.tok, model, &mut experiences)?;
        }
        if let (Some(pool), Some(ids)) = (st.eva.as_mut(), &pool_ids) {
            let rewards: Vec<f64> = experiences.iter().map(|e| e.reward).collect();
            pool.observe(ids[p], &rewards, &env.cfg.sampling.eva);
        }
        out.push(ExperienceGroup {
            group_id,
            policy_version: version,
            experiences,
            drawn_rewards: vec![],
        });
    }
    Ok(out)
}

/// The batch's `np` problems: from eva's prompt pool (with their pool indices) when the run
/// has one, else fresh from the task; either way drawn from the prompt stream.
fn draw_problems(
    env: &Env,
    st: &mut ExploreState,
    np: usize,
) -> (Vec<Problem>, Option<Vec<usize>>) {
    match st.eva.as_mut() {
        Some(pool) => {
            let ids = pool.draw(np, &mut st.prompt_rng);
            let problems = ids.iter().map(|&i| pool.problem(i).clone()).collect();
            (problems, Some(ids))
        }
        None => (
            (0..np)
                .map(|_| env.task.sample_train(&mut st.prompt_rng))
                .collect(),
            None,
        ),
    }
}

/// One sampled response to `prob`, scored by the task (and flipped by the noise injector):
/// an experience of group `ids.0`, sampled by policy version `ids.1`.
pub fn scored_experience(
    env: &Env,
    st: &mut ExploreState,
    prob: &Problem,
    prompt_ids: &[u32],
    gen: &Generation,
    (group_id, version): (u64, u64),
) -> Result<Experience> {
    let text = response_text(&env.tok, &gen.tokens)?;
    let clean = env
        .task
        .score(&prob.prompt, &text, gen.finished, &prob.answer)?
        .score;
    let observed = match st.noise.as_mut() {
        Some(inj) => inj
            .flip(clean)
            .map_err(|e| Error::Reward(format!("noise injector: {e}")))?,
        None => clean,
    };
    let mut components = BTreeMap::new();
    components.insert("correct".to_string(), clean);
    Ok(Experience {
        group_id,
        prompt: prob.prompt.clone(),
        prompt_ids: prompt_ids.to_vec(),
        response_ids: gen.tokens.clone(),
        logprobs: gen.logprobs.clone(),
        reward: observed,
        components,
        answer: prob.answer.clone(),
        finished: gen.finished,
        policy_version: version,
        use_count: 0,
        trainable: vec![],
        episode: None,
        hidden: None,
    })
}
