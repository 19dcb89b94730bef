//! The reward-pipeline hook of `grove train` (`[reward.pipeline]`, docs/rewards.md).
//!
//! Without a pipeline a response's reward is the task's verified correctness. With one, the
//! explorer hands each freshly sampled group to [`PipelineRewarder::score_group`], which
//! replaces every experience's `reward` with the pipeline's and adds the pipeline's component
//! values to `components` (logged by the learner as `reward/<name>/mean`). The verified
//! correctness stays in `components["correct"]`, so `acc/train` and `acc/eval` remain the
//! task's accuracy whatever the shaped reward is.
//!
//! Callbacks the components may need:
//! - SAR's log-probs come from the model that sampled the group (the current weights
//!   on-policy, the behaviour copy in lagged mode): log p(a|q) is the rollout's own behaviour
//!   log-probs, log p(a) one extra forward pass after an empty prompt;
//! - PAR/LSC/centered reference responses come from a frozen copy of the policy taken at the
//!   end of warm-up (checkpoint `step-0` on resume), sampled with their own RNG stream once per
//!   prompt and cached by the pipeline.
//!
//! The running state (shaper statistics, reference cache, the reference RNG) is saved with
//! every checkpoint ([`RewarderState`]) so a resumed run scores exactly as an uninterrupted one.
use std::path::Path;

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::buffer::Experience;
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::model::{Llama, Tokenizer};
use crate::reward::pipeline::{
    GroupContext, PipelineConfig, PipelineState, Providers, Registry, ResponseContext,
    RewardPipeline,
};
use crate::rollout::SamplingParams;
use crate::train::checkpoint;
use crate::train::explore::{response_text, rng_stream};
use crate::train::policy_callbacks::{PolicyLogProbs, PolicyReferenceSampler};

/// RNG stream of the reference sampler (explore.rs uses 1–4; explorer processes add
/// multiples of 16).
pub const STREAM_REWARD_REFERENCE: u64 = 5;

pub use crate::reward::CORRECT_KEY;

/// What a checkpoint keeps of the rewarder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewarderState {
    pub pipeline: PipelineState,
    pub reference_rng: ChaCha8Rng,
}

/// A [`RewardPipeline`] with the trainer's providers.
pub struct PipelineRewarder {
    pipeline: RewardPipeline,
    /// Frozen reference policy (the warm-up result).
    reference: Llama,
    reference_rng: ChaCha8Rng,
    params: SamplingParams,
    /// Temperature of SAR's answer-only pass: the rollout's (1 when sampling greedily).
    temperature: f64,
    /// `env.discount` of an `[env]` run: the γ of the `turns` components.
    discount: f64,
}

impl PipelineRewarder {
    /// A rewarder whose reference policy is `reference` (a frozen copy, owned from now on).
    pub fn new(cfg: &RunConfig, pipeline: &PipelineConfig, reference: Llama) -> Result<Self> {
        let registry = Registry {
            device: reference.device().clone(),
            ..Default::default()
        };
        let pipeline = RewardPipeline::with_registry(pipeline.clone(), registry)?;
        let t = cfg.rollout.temperature;
        Ok(PipelineRewarder {
            pipeline,
            reference,
            reference_rng: rng_stream(cfg.seed, STREAM_REWARD_REFERENCE),
            params: cfg.rollout.sampling(),
            temperature: if t > 0.0 { t } else { 1.0 },
            discount: cfg.env.as_ref().map_or(1.0, |e| e.discount),
        })
    }

    /// The rewarder of a training run. Fresh start: the reference is a copy of `policy` (the
    /// warm-up result). Resume (`resumed` is Some): the reference is checkpoint step-0's
    /// weights and the running state is the checkpoint's, which must be there.
    pub fn for_run(
        cfg: &RunConfig,
        pipeline: &PipelineConfig,
        policy: &Llama,
        run_dir: &Path,
        resumed: Option<(&Path, Option<RewarderState>)>,
    ) -> Result<Self> {
        let Some((ckpt, saved)) = resumed else {
            return Self::new(cfg, pipeline, policy.deep_clone()?);
        };
        let p = checkpoint::step_dir(run_dir, 0).join("model.safetensors");
        let w = crate::model::io::load_safetensors(&p, policy.device())?;
        let reference =
            Llama::from_tensors(&policy.cfg, w, policy.device(), &p.display().to_string())?;
        let mut r = Self::new(cfg, pipeline, reference)?;
        let state = saved.ok_or_else(|| {
            Error::checkpoint(
                ckpt.join("state.json"),
                "the config has [reward.pipeline] but the checkpoint has no reward_pipeline \
                 state (was the run started without a pipeline?)",
            )
        })?;
        r.restore(state)?;
        Ok(r)
    }

    pub fn state(&self) -> RewarderState {
        RewarderState {
            pipeline: self.pipeline.state(),
            reference_rng: self.reference_rng.clone(),
        }
    }

    pub fn restore(&mut self, st: RewarderState) -> Result<()> {
        self.pipeline.restore(st.pipeline)?;
        self.reference_rng = st.reference_rng;
        Ok(())
    }

    /// External-command and user-function failures so far.
    pub fn external_failures(&self) -> u64 {
        self.pipeline.external_failures()
    }

    /// Prompts whose reference rewards are cached.
    pub fn reference_cache_len(&self) -> usize {
        self.pipeline.cache().len()
    }

    /// Scores one group of experiences (one prompt), sampled by `policy`: sets `reward` and
    /// adds the pipeline's components, keeping `components["correct"]`.
    pub fn score_group(
        &mut self,
        tok: &Tokenizer,
        policy: &Llama,
        experiences: &mut [Experience],
    ) -> Result<()> {
        let Some(first) = experiences.first() else {
            return Ok(());
        };
        let ctx = GroupContext {
            prompt: first.prompt.clone(),
            references: vec![first.answer.clone()],
            metadata: serde_json::Value::Null,
        };
        let responses = experiences
            .iter()
            .enumerate()
            .map(|(i, e)| response_context(tok, e, self.discount, i))
            .collect::<Result<Vec<_>>>()?;
        let mut logprobs = PolicyLogProbs {
            model: policy,
            tok,
            temperature: self.temperature,
        };
        let mut references = PolicyReferenceSampler {
            model: &self.reference,
            tok,
            params: self.params.clone(),
            rng: &mut self.reference_rng,
        };
        let scored = self.pipeline.score_group_with(
            &ctx,
            &responses,
            &mut Providers {
                logprobs: Some(&mut logprobs),
                references: Some(&mut references),
            },
        )?;
        for ((e, r), comps) in experiences
            .iter_mut()
            .zip(&scored.rewards)
            .zip(scored.components)
        {
            e.reward = *r;
            for (k, v) in comps {
                if k != CORRECT_KEY {
                    e.components.insert(k, v);
                }
            }
        }
        Ok(())
    }
}

/// What the pipeline is given of experience `i`. An `[env]` episode brings its per-turn
/// rewards and milestones; its length is the model's own tokens (environment tokens are not
/// the policy's), and it has no single-response log-probs.
fn response_context(
    tok: &Tokenizer,
    e: &Experience,
    discount: f64,
    i: usize,
) -> Result<ResponseContext> {
    let text = response_text(tok, &e.response_ids)?;
    let Some(ep) = &e.episode else {
        return Ok(ResponseContext {
            text,
            finished: e.finished,
            num_tokens: e.response_ids.len(),
            token_logprobs: Some(e.logprobs.iter().map(|&x| x as f64).collect()),
            ..Default::default()
        });
    };
    let (turns, milestones) = crate::env::episode::pipeline_view(ep, e.finished, discount)
        .map_err(|m| {
            Error::Reward(format!(
                "group {} experience {i}: its saved episode cannot be scored: {m}",
                e.group_id
            ))
        })?;
    Ok(ResponseContext {
        text,
        finished: e.finished,
        num_tokens: e.trainable.iter().filter(|t| **t).count(),
        token_logprobs: None,
        milestones,
        turns: Some(turns),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::model::Config;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    fn load(sets: &[&str]) -> Result<RunConfig> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        config::load_for(None, &sets, config::Purpose::Inspect)
            .map(config::ValidatedRun::into_config)
    }

    const TWO: &str = r#"reward.pipeline.components=[{name="correct", kind="verifier"}, {name="len", kind="length-penalty", coef=0.5, free_len=1}]"#;

    #[test]
    fn train_validation_names_what_is_not_supported() {
        assert!(load(&[TWO]).is_ok());
        assert!(load(&[TWO, "sync.mode=\"lagged\"", "sync.offset=1"]).is_ok());
        // Every sync mode takes a pipeline (async, buffer and offline groups are scored by the
        // learner); only reward noise and injected answers are refused.
        assert!(load(&[TWO, "sync.mode=\"async\""]).is_ok());
        assert!(load(&[TWO, "sync.offline=\"x.jsonl\""]).is_ok());
        assert!(load(&[TWO, "sync.buffer=\"sqlite:b.db\"", "sync.publish_dir=\"w\""]).is_ok());
        let cases = [
            ("reward.noise_rho1=0.2", "noise_rho1"),
            ("sampling.inject_ground_truth=true", "inject_ground_truth"),
        ];
        for (set, needle) in cases {
            let e = load(&[TWO, set]).expect_err(set).to_string();
            assert!(
                e.contains(needle) && e.contains("reward.pipeline"),
                "{set}: {e}"
            );
        }
        // `correct` is the verified accuracy: only an unshaped verifier may take the name.
        let e = load(&[r#"reward.pipeline.components=[{name="correct", kind="length-penalty"}]"#])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("`correct`") && e.contains("length-penalty"),
            "{e}"
        );
        let e = load(&[
            r#"reward.pipeline.components=[{name="correct", kind="verifier", shaping={kind="running-norm"}}]"#,
        ])
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("only an unshaped verifier"), "{e}");
    }

    /// The built-in tokenizer, a tiny random policy and a rewarder for `cfg`'s pipeline whose
    /// frozen reference is a copy of that policy.
    fn tiny_rewarder(cfg: &RunConfig) -> (Tokenizer, Llama, PipelineRewarder) {
        let tok = Tokenizer::builtin_arithmetic();
        let mut shape = Config::builtin_tiny(tok.vocab_size());
        shape.hidden_size = 16;
        shape.intermediate_size = 16;
        let policy = Llama::init(&shape, 1, &Device::Cpu).unwrap();
        let rw = PipelineRewarder::new(
            cfg,
            cfg.reward.pipeline.as_ref().unwrap(),
            policy.deep_clone().unwrap(),
        )
        .unwrap();
        (tok, policy, rw)
    }

    fn experience(tok: &Tokenizer, text: &str, finished: bool, correct: f64) -> Experience {
        let mut ids = tok.encode(text).unwrap();
        if finished {
            ids.push(tok.eos);
        }
        Experience {
            group_id: 7,
            prompt: "2+3=".into(),
            prompt_ids: vec![],
            logprobs: vec![-0.5; ids.len()],
            response_ids: ids,
            reward: correct,
            components: [(CORRECT_KEY.to_string(), correct)].into(),
            answer: "5".into(),
            finished,
            policy_version: 0,
            use_count: 0,
            trainable: vec![],
            episode: None,
            hidden: None,
        }
    }

    #[test]
    fn score_group_sets_the_pipeline_reward_and_keeps_the_verified_correctness() {
        let cfg = load(&[TWO]).unwrap();
        let (tok, policy, mut rw) = tiny_rewarder(&cfg);
        // The explorer's verified values (a sentinel 0.25 on the first, to see it kept).
        let mut exps = vec![
            experience(&tok, "5", true, 0.25),
            experience(&tok, "6", true, 0.0),
            experience(&tok, "555", false, 0.0),
        ];
        rw.score_group(&tok, &policy, &mut exps).unwrap();
        // Tokens: "5"+EOS = 2, "6"+EOS = 2, "555" = 3 (truncated).
        // correct (raw, weight 1): 1, 0, 0 (no EOS); len: −0.5·max(0, n − 1) = −0.5, −0.5, −1.
        // reward = correct + len = 0.5, −0.5, −1.
        let rewards: Vec<f64> = exps.iter().map(|e| e.reward).collect();
        assert_eq!(rewards, vec![0.5, -0.5, -1.0]);
        let lens: Vec<f64> = exps.iter().map(|e| e.components["len"]).collect();
        assert_eq!(lens, vec![-0.5, -0.5, -1.0]);
        let kept: Vec<f64> = exps.iter().map(|e| e.components[CORRECT_KEY]).collect();
        assert_eq!(kept, vec![0.25, 0.0, 0.0]);
        assert_eq!(rw.external_failures(), 0);
        assert_eq!(rw.reference_cache_len(), 0, "no shaping needs references");
    }

    #[test]
    fn rewarder_state_round_trips_through_json_bit_for_bit() {
        let cfg = load(&[
            r#"reward.pipeline.components=[{name="v", kind="verifier"}, {name="len", kind="length-penalty", coef=0.37, free_len=0, shaping={kind="running-norm"}}]"#,
        ])
        .unwrap();
        let (tok, policy, mut rw) = tiny_rewarder(&cfg);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut states = vec![];
        for _ in 0..40 {
            let mut exps: Vec<Experience> = (0..3)
                .map(|_| {
                    let n = rng.gen_range(1..=4);
                    experience(&tok, &"7".repeat(n), rng.gen_bool(0.5), 0.0)
                })
                .collect();
            rw.score_group(&tok, &policy, &mut exps).unwrap();
            states.push(rw.state());
        }
        // Welford means and sums of squares of such values need all 17 digits; each must
        // parse back to the same bits (serde_json's float_roundtrip).
        for st in states {
            let text = serde_json::to_string(&st).unwrap();
            let back: RewarderState = serde_json::from_str(&text).unwrap();
            assert_eq!(back, st, "{text}");
        }
    }
}
