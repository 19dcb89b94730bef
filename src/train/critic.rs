//! PPO's critic in the training loop (docs/algorithms.md#ppo-with-a-critic-gae): a separate
//! value network ([`RewardModel::token_values`] on a copy of the warmed-up policy) with its own
//! AdamW. Each step it scores the batch (V_old), GAE turns its values and the token rewards
//! into advantages and returns (`advantage::gae`), and after the policy's update it takes one
//! step on the clipped value loss (`loss::value`).
//!
//! An asymmetric critic (`critic.privileged = "answer"` or `"hidden"`) reads the policy's
//! prompt followed by the task's reference answer or the environment's hidden state: its copy
//! of the prompt only, so the policy's inputs, and with them its log-probs, are untouched.
use std::ops::Range;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::advantage::gae;
use crate::buffer::Experience;
use crate::compute::optim::{AdamW, AdamWParams};
use crate::config::critic::{CriticConfig, Privileged};
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::model::batch;
use crate::model::io::{load_safetensors, save_safetensors};
use crate::model::reward_model::RewardModel;
use crate::model::{Llama, Tokenizer};
use crate::report::Metrics;

/// Checkpoint files of the critic's weights and AdamW moments.
pub const CRITIC_FILE: &str = "critic.safetensors";
pub const CRITIC_OPTIMIZER_FILE: &str = "critic_optimizer.safetensors";

pub struct Critic {
    pub model: RewardModel,
    pub opt: AdamW,
}

/// One step's critic inputs and GAE results, one row per response (response-token length).
pub struct Estimate {
    /// The critic's prompts: the policy's, followed by the privileged tokens.
    prompts: Vec<Vec<u32>>,
    /// Trainable and kept tokens (1) — those enter both losses.
    pub masks: Vec<Vec<f64>>,
    /// V_old: the critic's values before its update.
    pub values: Vec<Vec<f64>>,
    pub advantages: Vec<Vec<f64>>,
    pub returns: Vec<Vec<f64>>,
}

impl Critic {
    /// A fresh critic: the policy's weights (the warm-up result) with a new N(0, 0.02²) head.
    pub fn from_policy(policy: &Llama, cfg: &CriticConfig, seed: u64) -> Result<Self> {
        if policy.adapter().is_some() {
            return Err(Error::Internal(
                "a critic on a LoRA policy (refused by config validation)".into(),
            ));
        }
        let model = RewardModel::from_policy(policy.deep_clone()?, seed)?;
        let opt = AdamW::new(
            &model.params(),
            AdamWParams {
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        );
        Ok(Critic { model, opt })
    }

    /// Writes the critic's weights and optimizer state into a checkpoint directory.
    pub fn save(&self, dir: &Path) -> Result<()> {
        save_safetensors(&self.model.named_tensors(), &dir.join(CRITIC_FILE))?;
        save_safetensors(&self.opt.state_tensors()?, &dir.join(CRITIC_OPTIMIZER_FILE))
    }

    /// Loads weights and optimizer state written by [`Critic::save`] into this critic (the
    /// checkpoint's checksums are checked by the policy's restore first).
    pub fn restore(&mut self, ckpt: &Path, optimizer_t: u64) -> Result<()> {
        let p = ckpt.join(CRITIC_FILE);
        if !p.exists() {
            return Err(Error::checkpoint(
                &p,
                "missing: this run has a [critic], but the checkpoint holds none",
            ));
        }
        let dev = self.model.body.device().clone();
        let tensors = load_safetensors(&p, &dev)?;
        self.model = RewardModel::from_tensors(
            &self.model.body.cfg,
            tensors,
            &dev,
            &p.display().to_string(),
        )?;
        let hp = self.opt.hp;
        self.opt = AdamW::new(&self.model.params(), hp);
        let op = ckpt.join(CRITIC_OPTIMIZER_FILE);
        let st = load_safetensors(&op, &Device::Cpu)?;
        self.opt.load_state(st, optimizer_t, &op)
    }

    /// The critic's prompt of each experience: the policy's prompt, then the privileged text.
    pub fn prompts(
        privileged: Privileged,
        tok: &Tokenizer,
        exps: &[Experience],
    ) -> Result<Vec<Vec<u32>>> {
        exps.iter()
            .map(|e| {
                let mut ids = e.prompt_ids.clone();
                let (what, text) = match privileged {
                    Privileged::None => return Ok(ids),
                    Privileged::Answer => ("the reference answer", e.answer.as_str()),
                    Privileged::Hidden => match &e.hidden {
                        Some(h) => ("the hidden state", h.as_str()),
                        None => {
                            return Err(Error::config(
                                "critic.privileged",
                                "\"hidden\": the environment exposed no hidden state at reset \
                                 (a program's reset reply needs a `hidden` string, see \
                                 docs/environments.md); use \"none\"",
                            ))
                        }
                    },
                };
                let extra = tok.encode(text).map_err(|err| {
                    Error::config(
                        "critic.privileged",
                        format!(
                            "\"{}\": {what} {text:?} cannot be encoded by the policy's \
                             tokenizer: {err}",
                            privileged.name()
                        ),
                    )
                })?;
                ids.extend(extra);
                Ok(ids)
            })
            .collect()
    }

    /// The critic's values of every response token, no gradient, in passes of `micro_batch`.
    fn values(
        &self,
        prompts: &[Vec<u32>],
        exps: &[Experience],
        pad: u32,
        micro_batch: usize,
    ) -> Result<Vec<Vec<f64>>> {
        let mut rows = Vec::with_capacity(exps.len());
        for c in chunks(exps.len(), micro_batch) {
            let bc = self.batch(&prompts[c.clone()], &exps[c], pad)?;
            rows.extend(batch::to_f64_rows(&self.model.token_values(&bc)?.detach())?);
        }
        Ok(rows)
    }

    fn batch(
        &self,
        prompts: &[Vec<u32>],
        exps: &[Experience],
        pad: u32,
    ) -> Result<batch::SeqBatch> {
        let responses: Vec<Vec<u32>> = exps.iter().map(|e| e.response_ids.clone()).collect();
        batch::build(prompts, &responses, pad, self.model.body.device())
    }

    /// Values, GAE advantages (whitened when `[advantage.gae] whiten`) and returns of a step.
    /// `rewards` are the outcome rewards, `kl` each response's per-token KL to the reference
    /// (empty rows when no KL enters the reward), `masks` the tokens that count.
    #[allow(clippy::too_many_arguments)]
    pub fn estimate(
        &self,
        cfg: &RunConfig,
        tok: &Tokenizer,
        exps: &[Experience],
        rewards: &[f64],
        kl: &[Vec<f64>],
        masks: Vec<Vec<f64>>,
    ) -> Result<Estimate> {
        let critic = cfg.critic.as_ref().ok_or_else(|| {
            Error::Internal("a critic estimate without [critic] (validation pairs them)".into())
        })?;
        let prompts = Self::prompts(critic.privileged, tok, exps)?;
        let raw = self.values(&prompts, exps, tok.pad, cfg.train.micro_batch)?;
        let p = &cfg.advantage.params.gae;
        let kl_coef = if cfg.loss.kl_in_reward {
            cfg.loss.kl_coef
        } else {
            0.0
        };
        let mut values = Vec::with_capacity(exps.len());
        let mut advantages = Vec::with_capacity(exps.len());
        let mut returns = Vec::with_capacity(exps.len());
        for (i, e) in exps.iter().enumerate() {
            let len = e.response_ids.len();
            let v: Vec<f64> = raw[i][..len].to_vec();
            let r = gae::token_rewards(rewards[i], len, &kl[i], kl_coef);
            let trainable: Vec<f64> = (0..len)
                .map(|t| if e.is_trainable(t) { 1.0 } else { 0.0 })
                .collect();
            let (a, ret) = gae::gae_masked(&r, &v, &trainable, p.gamma, p.lambda);
            values.push(v);
            advantages.push(a);
            returns.push(ret);
        }
        if p.whiten {
            gae::whiten(&mut advantages, &masks);
        }
        Ok(Estimate {
            prompts,
            masks,
            values,
            advantages,
            returns,
        })
    }

    /// One AdamW step on the clipped value loss of the step's batch; returns its metrics
    /// (`critic/*`, docs/metrics.md).
    pub fn update(
        &mut self,
        cfg: &RunConfig,
        pad: u32,
        exps: &[Experience],
        est: &Estimate,
        step: usize,
    ) -> Result<Metrics> {
        let critic = cfg.critic.as_ref().ok_or_else(|| {
            Error::Internal("a critic update without [critic] (validation pairs them)".into())
        })?;
        let dev = self.model.body.device().clone();
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let mut new_values: Vec<Vec<f64>> = Vec::with_capacity(exps.len());
        let mut passes = vec![];
        for c in chunks(exps.len(), cfg.train.micro_batch) {
            let bc = self.batch(&est.prompts[c.clone()], &exps[c.clone()], pad)?;
            let v = self.model.token_values(&bc)?;
            for (k, row) in batch::to_f64_rows(&v.detach())?.into_iter().enumerate() {
                new_values.push(row[..exps[c.start + k].response_ids.len()].to_vec());
            }
            passes.push((c, bc.resp_len, v));
        }
        // The loss needs every value first (its aggregation weights span the batch).
        let out = crate::loss::value::value_loss(
            &new_values,
            &est.values,
            &est.returns,
            &est.masks,
            critic.cliprange_value,
            cfg.loss.agg,
            cfg.loss.max_len,
        )?;
        for (c, rl, v) in passes {
            let mut gflat = Vec::with_capacity(c.len() * rl);
            for row in &out.grad[c.clone()] {
                gflat.extend(row.iter().map(|&x| x as f32));
                gflat.extend(std::iter::repeat_n(0.0f32, rl - row.len()));
            }
            let gt = Tensor::from_vec(gflat, (c.len(), rl), &dev)?;
            let g = (v * gt)?.sum_all()?.backward()?;
            grads = Some(match grads.take() {
                None => g,
                Some(acc) => self.opt.add_grads(acc, &g)?,
            });
        }
        let grads = grads.ok_or_else(|| Error::Internal("a critic step without samples".into()))?;
        let gnorm = self.opt.grad_norm(&grads)?;
        let scale = if critic.grad_clip > 0.0 && gnorm > critic.grad_clip {
            critic.grad_clip / gnorm
        } else {
            1.0
        };
        let lr = critic.lr * (step as f64 / critic.lr_warmup_steps.max(1) as f64).min(1.0);
        if crate::train::learn::update_is_finite(out.loss, gnorm) {
            self.opt.step(&grads, lr, scale)?;
        }
        let mut m = Metrics::new();
        m.insert("critic/value_loss".into(), out.loss);
        m.insert("critic/vf_clipfrac".into(), out.clipfrac);
        m.insert("critic/grad_norm".into(), gnorm);
        m.insert("critic/lr".into(), lr);
        m.insert(
            "critic/values_mean".into(),
            masked_mean(&est.values, &est.masks),
        );
        m.insert(
            "critic/returns_mean".into(),
            masked_mean(&est.returns, &est.masks),
        );
        m.insert(
            "critic/explained_variance".into(),
            gae::explained_variance(&est.values, &est.returns, &est.masks),
        );
        Ok(m)
    }
}

/// Mean over masked-in tokens (0 when there are none).
fn masked_mean(rows: &[Vec<f64>], masks: &[Vec<f64>]) -> f64 {
    let (mut s, mut n) = (0.0, 0.0);
    for (r, m) in rows.iter().zip(masks) {
        for (&x, &mt) in r.iter().zip(m) {
            if mt > 0.0 {
                s += x;
                n += 1.0;
            }
        }
    }
    if n > 0.0 {
        s / n
    } else {
        0.0
    }
}

/// Passes of `micro_batch` samples (one pass when 0 or ≥ n), as the learner makes them.
fn chunks(n: usize, micro_batch: usize) -> Vec<Range<usize>> {
    let mb = match micro_batch {
        0 => n,
        m => m.min(n),
    }
    .max(1);
    (0..n).step_by(mb).map(|a| a..(a + mb).min(n)).collect()
}

/// Per-token KL of each response to the reference, k = `loss.kl_estimator` on the behaviour
/// log-probs (the InstructGPT penalty, before β), over trainable tokens; empty rows without
/// a reference.
pub fn token_kl(
    cfg: &RunConfig,
    behaviour: &[Vec<f64>],
    reference: Option<&[Vec<f64>]>,
    exps: &[Experience],
) -> Vec<Vec<f64>> {
    let Some(rr) = reference else {
        return vec![vec![]; exps.len()];
    };
    exps.iter()
        .enumerate()
        .map(|(i, e)| {
            (0..e.response_ids.len())
                .map(|t| {
                    if e.is_trainable(t) {
                        crate::loss::kl_per_token(cfg.loss.kl_estimator, behaviour[i][t], rr[i][t])
                            .0
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::optim::AdamW;
    use crate::train::explore::{collect, Env, ExploreState};
    use crate::train::learn::Learner;

    fn ppo_config(privileged: Privileged) -> RunConfig {
        let mut cfg = RunConfig::default();
        cfg.advantage.estimator = crate::advantage::Estimator::Gae;
        cfg.critic = Some(CriticConfig {
            privileged,
            ..Default::default()
        });
        cfg.sampling.filter_zero_std = false;
        cfg.rollout.prompts_per_step = 3;
        cfg.rollout.group_size = 4;
        cfg.train.lr_warmup_steps = 0;
        cfg.train.log_samples = 0;
        cfg
    }

    /// The asymmetric critic reads the reference answer after the prompt; the policy's inputs
    /// are untouched: the same policy pass (entropy, ratio) and the same policy log-probs of
    /// the untouched experiences, but other values and so other advantages.
    #[test]
    fn privileged_answer_changes_the_critic_not_the_policy() {
        let base = ppo_config(Privileged::None);
        let v = |c: RunConfig| crate::config::validate(c, "test", crate::config::Purpose::Inspect);
        let env = Env::new(v(base.clone()).unwrap()).unwrap();
        let model = env.initial_policy(&Device::Cpu).unwrap();
        let mut st = ExploreState::new(&base, 0).unwrap();
        let mut groups = collect(&env, &model, 0, &mut st).unwrap();
        for (i, e) in groups
            .iter_mut()
            .flat_map(|g| &mut g.experiences)
            .enumerate()
        {
            e.reward = (i % 3 == 0) as u8 as f64;
        }
        let exps: Vec<Experience> = groups.iter().flat_map(|g| g.experiences.clone()).collect();
        let critic = Critic::from_policy(&model, &CriticConfig::default(), 0).unwrap();
        let plain = Critic::prompts(Privileged::None, &env.tok, &exps).unwrap();
        let with = Critic::prompts(Privileged::Answer, &env.tok, &exps).unwrap();
        for ((p, w), e) in plain.iter().zip(&with).zip(&exps) {
            assert_eq!(p, &e.prompt_ids);
            let mut expected = e.prompt_ids.clone();
            expected.extend(env.tok.encode(&e.answer).unwrap());
            assert_eq!(w, &expected);
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut metrics = vec![];
        for (k, privileged) in [Privileged::None, Privileged::Answer]
            .into_iter()
            .enumerate()
        {
            let env = Env::new(v(ppo_config(privileged)).unwrap()).unwrap();
            let m = model.deep_clone().unwrap();
            let opt = AdamW::new(m.params(), Default::default());
            let dir = tmp.path().join(format!("run{k}"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut learner = Learner::new(m, opt, &dir, 0).unwrap();
            learner.critic =
                Some(Critic::from_policy(&model, &CriticConfig::default(), 0).unwrap());
            metrics.push(learner.learn(&env, &groups, 1, 0.0, 0).unwrap());
        }
        let (a, b) = (&metrics[0], &metrics[1]);
        for key in ["entropy", "is/ratio_mean", "is/ratio_max"] {
            assert_eq!(a[key], b[key], "{key}: the policy's pass must not change");
        }
        for key in ["critic/values_mean", "adv/abs_mean", "critic/value_loss"] {
            assert!(a[key] != b[key], "{key}: {} vs {}", a[key], b[key]);
        }
        // During the critic's warm-up the policy is not updated; the critic is.
        let mut cfg = ppo_config(Privileged::None);
        cfg.critic.as_mut().unwrap().warmup_steps = 1;
        let env1 = Env::new(v(cfg).unwrap()).unwrap();
        let opt = AdamW::new(model.params(), Default::default());
        let dir = tmp.path().join("warmup");
        std::fs::create_dir_all(&dir).unwrap();
        let mut learner = Learner::new(model.deep_clone().unwrap(), opt, &dir, 0).unwrap();
        learner.critic = Some(Critic::from_policy(&model, &CriticConfig::default(), 0).unwrap());
        // Copies: the optimizer updates the weights in place.
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let before: Vec<(String, Vec<f32>)> = learner
            .critic
            .as_ref()
            .unwrap()
            .model
            .named_tensors()
            .iter()
            .map(|(k, t)| (k.clone(), flat(t)))
            .collect();
        learner.learn(&env1, &groups, 1, 0.0, 0).unwrap();
        for (name, t) in model.named_tensors() {
            assert_eq!(
                flat(&t),
                flat(&learner.model.named_tensors()[&name]),
                "{name}"
            );
        }
        let after = learner.critic.as_ref().unwrap().model.named_tensors();
        assert!(before.iter().any(|(k, t)| t != &flat(&after[k])));
        // Directly: the critic's values differ with the answer appended.
        let va = critic.values(&plain, &exps, env.tok.pad, 0).unwrap();
        let vb = critic.values(&with, &exps, env.tok.pad, 0).unwrap();
        assert!(va != vb);
    }

    /// With `"hidden"` on a `guess` run the critic reads the policy's prompt followed by the
    /// episode's secret number; the policy's prompt (and so its pass) is unchanged, the
    /// critic's values are not. An experience without hidden state is refused by name.
    #[test]
    fn privileged_hidden_changes_the_critic_not_the_policy() {
        let mut base = ppo_config(Privileged::None);
        base.env = Some(crate::env::EnvConfig {
            max_turns: 2,
            ..Default::default()
        });
        base.rollout.max_new_tokens = 4;
        let v = |c: RunConfig| crate::config::validate(c, "test", crate::config::Purpose::Inspect);
        let env = Env::new(v(base.clone()).unwrap()).unwrap();
        let model = env.initial_policy(&Device::Cpu).unwrap();
        let mut st = ExploreState::new(&base, 0).unwrap();
        let groups = collect(&env, &model, 0, &mut st).unwrap();
        let exps: Vec<Experience> = groups.iter().flat_map(|g| g.experiences.clone()).collect();
        let plain = Critic::prompts(Privileged::None, &env.tok, &exps).unwrap();
        let with = Critic::prompts(Privileged::Hidden, &env.tok, &exps).unwrap();
        for ((p, w), e) in plain.iter().zip(&with).zip(&exps) {
            assert_eq!(p, &e.prompt_ids);
            // The secret is the environment's: reset again with the episode's seed.
            let seed: u64 = e.answer.trim_start_matches("seed ").parse().unwrap();
            let max = crate::env::EnvConfig::default().guess_max;
            let mut game = crate::env::builtin::Guess::new(max, 0.0);
            let secret = crate::env::Environment::reset(&mut game, seed)
                .unwrap()
                .hidden
                .unwrap();
            assert!(secret.starts_with("secret "), "{secret}");
            assert!(!e.prompt.contains(&secret), "the policy must not see it");
            let mut expected = e.prompt_ids.clone();
            expected.extend(env.tok.encode(&secret).unwrap());
            assert_eq!(w, &expected);
        }
        let critic = Critic::from_policy(&model, &CriticConfig::default(), 0).unwrap();
        let va = critic.values(&plain, &exps, env.tok.pad, 0).unwrap();
        let vb = critic.values(&with, &exps, env.tok.pad, 0).unwrap();
        assert!(va != vb);
        let mut bare = exps.clone();
        bare[0].hidden = None;
        let e = Critic::prompts(Privileged::Hidden, &env.tok, &bare)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("critic.privileged") && e.contains("no hidden state"),
            "{e}"
        );
    }

    /// Critic steps on one batch's fixed targets lower its value loss, and a resumed critic
    /// (saved and restored) computes the same values bit for bit.
    #[test]
    fn a_critic_step_fits_the_returns_and_round_trips_through_a_checkpoint() {
        let cfg = ppo_config(Privileged::None);
        let run =
            crate::config::validate(cfg.clone(), "test", crate::config::Purpose::Inspect).unwrap();
        let env = Env::new(run).unwrap();
        let model = env.initial_policy(&Device::Cpu).unwrap();
        let mut st = ExploreState::new(&cfg, 0).unwrap();
        let groups = collect(&env, &model, 0, &mut st).unwrap();
        let exps: Vec<Experience> = groups.iter().flat_map(|g| g.experiences.clone()).collect();
        let rewards: Vec<f64> = (0..exps.len()).map(|i| (i % 2) as f64).collect();
        let masks: Vec<Vec<f64>> = exps
            .iter()
            .map(|e| vec![1.0; e.response_ids.len()])
            .collect();
        let mut c = env.cfg.config().clone();
        c.critic.as_mut().unwrap().lr = 1e-3;
        let mut critic = Critic::from_policy(&model, c.critic.as_ref().unwrap(), 0).unwrap();
        let kl = vec![vec![]; exps.len()];
        let est = critic
            .estimate(&c, &env.tok, &exps, &rewards, &kl, masks.clone())
            .unwrap();
        let mut losses = vec![];
        for step in 1..=3 {
            let m = critic.update(&c, env.tok.pad, &exps, &est, step).unwrap();
            losses.push(m["critic/value_loss"]);
        }
        assert!(losses[2] < losses[0], "{losses:?}");
        let tmp = tempfile::tempdir().unwrap();
        critic.save(tmp.path()).unwrap();
        let mut back = Critic::from_policy(&model, c.critic.as_ref().unwrap(), 9).unwrap();
        back.restore(tmp.path(), critic.opt.t).unwrap();
        let p = Critic::prompts(Privileged::None, &env.tok, &exps).unwrap();
        assert_eq!(
            critic.values(&p, &exps, env.tok.pad, 0).unwrap(),
            back.values(&p, &exps, env.tok.pad, 0).unwrap()
        );
        assert_eq!(back.opt.t, 3);
        let e = back
            .restore(&tmp.path().join("nowhere"), 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("critic.safetensors") && e.contains("holds none"),
            "{e}"
        );
    }
}
