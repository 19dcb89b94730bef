//! The learner: experience groups in, one policy-gradient update out.
//!
//! Read top to bottom it is the algorithm: ground-truth injection → KL-in-reward → which
//! samples count → advantages → per-token loss and its gradient → backward through the
//! model → clipped AdamW step. The loss library returns dL/dℓ for every response token
//! (`loss::compute`); backpropagating the surrogate Σ g·ℓ gives exactly the loss's gradient.
use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

use crate::advantage::{self, Group};
use crate::buffer::{Experience, ExperienceGroup};
use crate::compute::optim::AdamW;
use crate::config::RunConfig;
use crate::error::Result;
use crate::loss::{self, SeqInput};
use crate::model::batch;
use crate::model::Llama;
use crate::report::{JsonlWriter, Metrics};
use crate::sampling;
use crate::train::explore::{response_text, Env};

pub struct Learner {
    pub model: Llama,
    /// Frozen reference policy for KL terms (None when no KL is used).
    pub reference: Option<Llama>,
    /// PPO's value model (`[critic]`, `advantage.estimator = "gae"`).
    pub critic: Option<crate::train::critic::Critic>,
    pub opt: AdamW,
    /// Policy version: the number of updates taken.
    pub version: u64,
    /// Draws of the learner itself (RED-Drop).
    pub learn_rng: ChaCha8Rng,
    /// Running statistics of the advantage estimators (noisy-backward's EMA scale).
    pub adv_state: advantage::AdvantageState,
    pub metrics: JsonlWriter,
    pub samples: JsonlWriter,
    pub run_dir: PathBuf,
    /// `[reward.pipeline]` scoring of freshly sampled groups (None: the verifier alone).
    pub rewards: Option<crate::train::reward_hook::PipelineRewarder>,
    /// `[reward.pipeline.blend]`: the learned weights of the training reward (None: fixed).
    pub blend: Option<crate::train::blend::Blender>,
    /// Updates skipped because the loss or gradient norm was not finite (over the run:
    /// checkpointed and restored on resume).
    pub skipped_steps: usize,
    /// What refilling the batch about to be learned took (`sampling.refill_max_rounds`),
    /// noted by the batch source and logged with that step.
    refill: Option<sampling::RefillStats>,
    /// What Reinforce-Ada's rounds took for that batch (`sampling/ada_*`).
    ada: Option<sampling::reinforce_ada::AdaStats>,
    /// Responses sampled for that batch, discarded ones included (`sampling/samples_drawn`).
    drawn: Option<usize>,
    /// What eva's prompt pool did for that batch (`eva/*`).
    eva: Option<crate::task::eva_pool::EvaStats>,
}

/// The execution time of sample `e`'s actions (duration weights): its episode's step
/// durations; NaN (an unparsable sample) for a sample without an episode.
fn sample_exec_time(e: &Experience, unparsable: f64) -> f64 {
    match &e.episode {
        Some(ep) => crate::env::episode::episode_exec_time(ep, unparsable),
        None => f64::NAN,
    }
}

/// Whether an update may be applied: loss and gradient norm both finite.
pub fn update_is_finite(loss: f64, grad_norm: f64) -> bool {
    loss.is_finite() && grad_norm.is_finite()
}

fn valid_tensor(valid: &[Vec<f64>], dev: &Device) -> Result<Tensor> {
    let r = valid.first().map(|v| v.len()).unwrap_or(0);
    let flat: Vec<f32> = valid.iter().flatten().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(flat, (valid.len(), r), dev)?)
}

impl Learner {
    /// A learner at version 0 that appends metrics and samples to `run_dir`, drawing from the
    /// run's learner RNG stream.
    pub fn new(model: Llama, opt: AdamW, run_dir: &std::path::Path, seed: u64) -> Result<Self> {
        Ok(Learner {
            metrics: JsonlWriter::open_append(&run_dir.join("metrics.jsonl"))?,
            samples: JsonlWriter::open_append(&run_dir.join("samples.jsonl"))?,
            model,
            reference: None,
            critic: None,
            opt,
            version: 0,
            learn_rng: crate::train::explore::rng_stream(seed, crate::train::explore::STREAM_LEARN),
            adv_state: Default::default(),
            run_dir: run_dir.to_path_buf(),
            rewards: None,
            blend: None,
            skipped_steps: 0,
            refill: None,
            ada: None,
            drawn: None,
            eva: None,
        })
    }

    /// Records what refilling the next batch took, for that step's `sampling/refill_*` metrics.
    pub fn note_refill(&mut self, stats: sampling::RefillStats) {
        self.refill = Some(stats);
    }

    /// Records what Reinforce-Ada's rounds took for the next batch (`sampling/ada_*`).
    pub fn note_ada(&mut self, stats: sampling::reinforce_ada::AdaStats) {
        self.ada = Some(stats);
    }

    /// Records what eva's prompt pool did for the next batch (`eva/*`).
    pub fn note_eva(&mut self, stats: crate::task::eva_pool::EvaStats) {
        self.eva = Some(stats);
    }

    /// Records how many responses were sampled for the next batch (`sampling/samples_drawn`).
    pub fn note_drawn(&mut self, samples: usize) {
        self.drawn = Some(samples);
    }

    /// One update from `groups`. `generate_s` is the sampling time that produced them (0 when
    /// they came from elsewhere) and `dropped` the groups discarded as too stale.
    pub fn learn(
        &mut self,
        env: &Env,
        groups: &[ExperienceGroup],
        step: usize,
        generate_s: f64,
        dropped: usize,
    ) -> Result<Metrics> {
        let cfg = &env.cfg;
        let t_train = Instant::now();
        // 1. The batch, flat, with TempSamp ground-truth injection.
        let mut b = StepBatch::flatten(groups);
        b.inject_ground_truth(env)?;
        // 2. Current-policy log-probs (with gradient) and, when KL is used, the reference's.
        // A LoRA adapter's dropout is on for this step's passes only (keyed by the step).
        self.model.set_dropout_step(Some(step as u64));
        let lp = self.logprobs(env, &b)?;
        let behaviour = b.behaviour(&lp.rows);
        // With a critic the KL penalty enters GAE's token rewards instead (below).
        let mut kl_penalty_mean = match self.critic {
            None => b.kl_in_reward(cfg, &behaviour, lp.ref_rows.as_deref()),
            Some(_) => 0.0,
        };
        // 3. Which samples count (RED-Drop, zero-variance filter), then advantages per group,
        // or per token from the critic's values (GAE).
        let mut sel = self.select_and_advantage(cfg, &b)?;
        let estimate = match &self.critic {
            Some(c) => {
                let (est, kl_mean) = b.gae_estimate(env, c, &behaviour, &lp, &mut sel)?;
                kl_penalty_mean = kl_mean;
                Some(est)
            }
            None => None,
        };
        // 4. Loss and its gradient w.r.t. each response token's log-prob.
        let seqs = b.seq_inputs(cfg, &lp, &behaviour, &sel);
        let out = loss::compute(&cfg.loss, &seqs)?;
        // 5. Backward, clip, update (the policy stays frozen during the critic's warm-up).
        let frozen = cfg.critic.as_ref().is_some_and(|c| step <= c.warmup_steps);
        let upd = self.update(
            cfg,
            &lp,
            &out.grad_logp,
            out.metrics.policy_loss,
            step,
            frozen,
        );
        self.model.set_dropout_step(None);
        let upd = upd?;
        // 5b. The critic's step on the clipped value loss.
        let critic_metrics = match (self.critic.as_mut(), &estimate) {
            (Some(c), Some(est)) => Some(c.update(cfg, env.tok.pad, &b.exps, est, step)?),
            _ => None,
        };
        let train_s = t_train.elapsed().as_secs_f64();
        // 6. Metrics (names: docs/metrics.md) and samples.
        let mut m = b.reward_metrics(kl_penalty_mean);
        self.learner_metrics(cfg, &b, &sel, &out.metrics, &upd, &mut m);
        m.extend(critic_metrics.into_iter().flatten());
        if let Some(r) = self.refill.take() {
            m.insert("sampling/refill_rounds".into(), r.rounds as f64);
            m.insert("sampling/refill_prompts".into(), r.prompts as f64);
            m.insert("sampling/refill_short".into(), r.short as f64);
        }
        if let Some(a) = self.ada.take() {
            m.insert(
                "sampling/ada_samples_per_prompt".into(),
                a.samples_per_prompt(),
            );
            m.insert("sampling/ada_rounds".into(), a.rounds_per_prompt());
            m.insert("sampling/ada_finished_frac".into(), a.finished_frac());
        }
        if let Some(e) = self.eva.take() {
            m.insert("eva/pool_size".into(), e.pool_size as f64);
            m.insert("eva/evolved".into(), e.evolved as f64);
            m.insert("eva/added".into(), e.added as f64);
            m.insert("eva/informativeness_mean".into(), e.informativeness_mean);
            m.insert("eva/frac_evolved_in_batch".into(), e.frac_evolved_in_batch);
            m.insert(
                "eva/mutations_attempted".into(),
                e.mutations_attempted as f64,
            );
            m.insert("eva/mutations_accepted".into(), e.mutations_accepted as f64);
            m.insert("eva/mutations_rejected".into(), e.mutations_rejected as f64);
        }
        // Noted by the sources that discard (on-policy refill's rounds, buffer-reading sources'
        // stale groups); the others: what the groups hold or drew.
        let drawn = self
            .drawn
            .take()
            .unwrap_or_else(|| groups.iter().map(|g| g.samples_drawn()).sum());
        m.insert("sampling/samples_drawn".into(), drawn as f64);
        if cfg.sampling.pace == sampling::pace::Pace::Time {
            let s = sampling::pace::stream_stats(groups.iter().map(|g| {
                let kept = g.experiences.iter().map(|e| e.reward).collect();
                (kept, g.drawn_rewards.as_slice())
            }));
            m.insert("sampling/pace_kept_frac".into(), s.kept_frac());
            m.insert(
                "sampling/pace_drawn_reward_mean".into(),
                s.drawn_reward_mean,
            );
        }
        let gen_tokens: usize = (0..b.n()).map(|i| b.len(i)).sum();
        let staleness: Vec<f64> = groups
            .iter()
            .map(|g| self.version.saturating_sub(1 + g.policy_version) as f64)
            .collect();
        m.insert(
            "staleness/mean".into(),
            staleness.iter().sum::<f64>() / staleness.len().max(1) as f64,
        );
        m.insert("staleness/dropped".into(), dropped as f64);
        m.insert("timing/generate_s".into(), generate_s);
        m.insert("timing/train_s".into(), train_s);
        m.insert(
            "throughput/tokens_per_s".into(),
            gen_tokens as f64 / (generate_s + train_s).max(1e-9),
        );
        self.log_samples(env, groups, &b, &sel, step)?;
        Ok(m)
    }

    /// Token log-probs of every response under the policy (and the reference), in passes of
    /// `train.micro_batch` samples (one pass when 0 or ≥ n), each batch built once. With
    /// several passes the log-probs come from graph-free passes first (the loss needs all of
    /// them before any gradient); with one, its graph serves both.
    fn logprobs(&self, env: &Env, b: &StepBatch) -> Result<LogProbs> {
        let cfg = &env.cfg;
        let n = b.n();
        let prompts: Vec<Vec<u32>> = b.exps.iter().map(|e| e.prompt_ids.clone()).collect();
        let responses: Vec<Vec<u32>> = b.exps.iter().map(|e| e.response_ids.clone()).collect();
        let dev = self.model.device().clone();
        let temp = if cfg.rollout.temperature > 0.0 {
            cfg.rollout.temperature
        } else {
            1.0
        };
        let mb = match cfg.train.micro_batch {
            0 => n,
            m => m.min(n),
        };
        let chunks: Vec<Range<usize>> = (0..n)
            .step_by(mb.max(1))
            .map(|a| a..(a + mb).min(n))
            .collect();
        let batches = chunks
            .iter()
            .map(|c| {
                let mut bc = batch::build(
                    &prompts[c.clone()],
                    &responses[c.clone()],
                    env.tok.pad,
                    &dev,
                )?;
                // Environment and tool tokens count as padding for the entropy term.
                for (row, e) in bc.valid.iter_mut().zip(&b.exps[c.clone()]) {
                    for (t, v) in row.iter_mut().enumerate().take(e.response_ids.len()) {
                        if !e.is_trainable(t) {
                            *v = 0.0;
                        }
                    }
                }
                Ok(bc)
            })
            .collect::<Result<Vec<_>>>()?;
        let rows_of = |model: &Llama| -> Result<Vec<Vec<f64>>> {
            let mut rows = Vec::with_capacity(n);
            for bc in &batches {
                let lp = batch::response_logprobs(model, bc, temp)?.0.detach();
                rows.extend(batch::to_f64_rows(&lp)?);
            }
            Ok(rows)
        };
        let whole = match batches.as_slice() {
            [one] => Some(batch::response_logprobs(&self.model, one, temp)?),
            _ => None,
        };
        let rows = match &whole {
            Some((lp, _)) => batch::to_f64_rows(lp)?,
            None => rows_of(&self.model)?,
        };
        let ref_rows = match &self.reference {
            Some(r) => Some(rows_of(r)?),
            None => None,
        };
        Ok(LogProbs {
            chunks,
            batches,
            whole,
            rows,
            ref_rows,
            temp,
        })
    }

    /// Which samples count and their advantages.
    fn select_and_advantage(&mut self, cfg: &RunConfig, b: &StepBatch) -> Result<Selection> {
        let n = b.n();
        let rewards = &b.rewards;
        let mut keep = vec![true; n];
        let mut zero_std_groups = 0usize;
        for r in &b.ranges {
            if sampling::is_zero_std(&rewards[r.clone()]) {
                zero_std_groups += 1;
                if cfg.sampling.filter_zero_std {
                    keep[r.clone()].iter_mut().for_each(|k| *k = false);
                }
            }
            if cfg.sampling.red_drop {
                let k = sampling::red_drop_keep(&rewards[r.clone()], &mut self.learn_rng);
                for (slot, kk) in keep[r.clone()].iter_mut().zip(k) {
                    *slot &= kk;
                }
            }
        }
        let members: Vec<Vec<usize>> = b
            .ranges
            .iter()
            .map(|r| r.clone().filter(|&i| keep[i]).collect())
            .collect();
        let live: Vec<usize> = (0..b.ranges.len())
            .filter(|&p| !members[p].is_empty())
            .collect();
        if cfg.advantage.estimator == advantage::Estimator::Gae {
            // Per token, from the critic's values: `StepBatch::gae_estimate`.
            return Ok(Selection {
                keep,
                zero_std_groups,
                adv: vec![0.0; n],
                token_adv: None,
                filtered: 0,
            });
        }
        let adv_groups: Vec<Group> = live
            .iter()
            .map(|&p| {
                let m = &members[p];
                let mut grp = Group::from_rewards(m.iter().map(|&i| rewards[i]).collect());
                grp.correct = Some(m.iter().map(|&i| b.correct[i]).collect());
                grp.lengths = Some(m.iter().map(|&i| b.len(i)).collect());
                grp.all_rewards = Some(if b.drawn_rewards[p].is_empty() {
                    rewards[b.ranges[p].clone()].to_vec()
                } else {
                    b.drawn_rewards[p].clone()
                });
                if cfg.advantage.duration.enabled {
                    let d = &cfg.advantage.duration;
                    grp.durations = Some(
                        m.iter()
                            .map(|&i| sample_exec_time(&b.exps[i], d.unparsable))
                            .collect(),
                    );
                }
                if cfg.sampling.inject_ground_truth {
                    grp.ground_truth = Some(m.iter().map(|&i| b.ground_truth[i]).collect());
                }
                grp
            })
            .collect();
        let adv_out =
            advantage::compute_with_state(&cfg.advantage, &adv_groups, &mut self.adv_state)?;
        let mut adv = vec![0.0f64; n];
        for (gi, &p) in live.iter().enumerate() {
            for (k, &i) in members[p].iter().enumerate() {
                adv[i] = adv_out.advantages[gi][k];
            }
        }
        Ok(Selection {
            keep,
            zero_std_groups,
            adv,
            token_adv: None,
            filtered: adv_out.filtered,
        })
    }

    /// Backward (per micro-batch, gradients summed), clip, update. The surrogate
    /// Σ logp·∂L/∂logp has the loss's gradient; the entropy bonus is the mean over all valid
    /// response tokens of the step, so each pass divides by the step's count.
    fn update(
        &mut self,
        cfg: &RunConfig,
        lp: &LogProbs,
        grad_logp: &[Vec<f64>],
        policy_loss: f64,
        step: usize,
        frozen: bool,
    ) -> Result<Update> {
        let dev = self.model.device().clone();
        let valid_total: usize = lp
            .batches
            .iter()
            .map(|bc| bc.valid.iter().flatten().filter(|&&v| v > 0.0).count())
            .sum();
        let mut entropy_sum = 0.0f64;
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        for (c, bc) in lp.chunks.iter().zip(&lp.batches) {
            let own;
            let (logp, lsm) = match &lp.whole {
                Some(w) => w,
                None => {
                    own = batch::response_logprobs(&self.model, bc, lp.temp)?;
                    &own
                }
            };
            let rl = bc.resp_len;
            let mut gflat = Vec::with_capacity(c.len() * rl);
            for row in &grad_logp[c.clone()] {
                gflat.extend(row.iter().map(|&x| x as f32));
                gflat.extend(std::iter::repeat_n(0.0f32, rl - row.len()));
            }
            let gt = Tensor::from_vec(gflat, (c.len(), rl), &dev)?;
            let valid = valid_tensor(&bc.valid, &dev)?;
            let ent_sum = (lsm * &valid)?.sum_all()?;
            entropy_sum += ent_sum
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            let mut surrogate = (logp * &gt)?.sum_all()?;
            if cfg.loss.entropy_coef > 0.0 {
                let scale = cfg.loss.entropy_coef / valid_total.max(1) as f64;
                surrogate = (surrogate - (ent_sum * scale)?)?;
            }
            let g = surrogate.backward()?;
            grads = Some(match grads.take() {
                None => g,
                Some(acc) => self.opt.add_grads(acc, &g)?,
            });
        }
        let grads = grads
            .ok_or_else(|| crate::error::Error::Model("a learner step without samples".into()))?;
        let gnorm = self.opt.grad_norm(&grads)?;
        let clip = cfg.train.grad_clip;
        let scale = if clip > 0.0 && gnorm > clip {
            clip / gnorm
        } else {
            1.0
        };
        let lr = cfg.train.lr * (step as f64 / cfg.train.lr_warmup_steps.max(1) as f64).min(1.0);
        // A non-finite loss or gradient would poison every weight: skip the update and count
        // it (the version still advances so sync schedules keyed on it stay in step).
        if frozen {
            // The critic's warm-up: the policy waits for a useful baseline.
        } else if update_is_finite(policy_loss, gnorm) {
            self.opt.step(&grads, lr, scale)?;
        } else {
            self.skipped_steps += 1;
        }
        self.version += 1;
        Ok(Update {
            grad_norm: gnorm,
            lr,
            entropy_mean: entropy_sum / valid_total.max(1) as f64,
        })
    }

    /// The selection, advantage, loss and update metrics of a step.
    fn learner_metrics(
        &self,
        cfg: &RunConfig,
        b: &StepBatch,
        sel: &Selection,
        lm: &loss::LossMetrics,
        upd: &Update,
        m: &mut Metrics,
    ) {
        let nf = b.n().max(1) as f64;
        m.insert(
            "reward/frac_zero_std".into(),
            sel.zero_std_groups as f64 / b.ranges.len().max(1) as f64,
        );
        if let Some(rw) = &self.rewards {
            m.insert(
                "reward/external_failures".into(),
                rw.external_failures() as f64,
            );
        }
        if cfg.reward.noise_rho0 == 0.0 && cfg.reward.noise_rho1 == 0.0 && !cfg.loss.kl_in_reward {
            m.remove("reward/observed_mean");
            m.remove("reward/kl_penalty_mean");
        }
        if cfg.sampling.red_drop || cfg.sampling.filter_zero_std {
            m.insert(
                "sampling/dropped_frac".into(),
                sel.keep.iter().filter(|&&k| !k).count() as f64 / nf,
            );
        }
        if cfg.advantage.stable_filter.enabled {
            m.insert("adv/filtered".into(), sel.filtered as f64);
        }
        m.insert("adv/mean".into(), sel.adv.iter().sum::<f64>() / nf);
        m.insert(
            "adv/abs_mean".into(),
            sel.adv.iter().map(|a| a.abs()).sum::<f64>() / nf,
        );
        m.insert("loss/policy".into(), lm.policy_loss);
        m.insert("loss/kl".into(), lm.kl_loss);
        m.insert("loss/clipfrac".into(), lm.clipfrac);
        m.insert("loss/masked_frac".into(), lm.masked_frac);
        m.insert("is/ratio_mean".into(), lm.ratio_mean);
        m.insert("is/ratio_max".into(), lm.ratio_max);
        m.insert("kl/k3".into(), lm.kl_k3);
        m.insert("entropy".into(), upd.entropy_mean);
        let gen_tokens: usize = (0..b.n()).map(|i| b.len(i)).sum();
        m.insert("len/mean".into(), gen_tokens as f64 / nf);
        m.insert(
            "len/truncated_frac".into(),
            b.exps.iter().filter(|e| !e.finished).count() as f64 / nf,
        );
        m.insert("grad/norm".into(), upd.grad_norm);
        m.insert("loss/skipped_steps".into(), self.skipped_steps as f64);
        m.insert("lr".into(), upd.lr);
    }

    /// The first `train.log_samples` groups of the step to samples.jsonl.
    fn log_samples(
        &mut self,
        env: &Env,
        groups: &[ExperienceGroup],
        b: &StepBatch,
        sel: &Selection,
        step: usize,
    ) -> Result<()> {
        for (p, r) in b.ranges.iter().enumerate().take(env.cfg.train.log_samples) {
            let mut rs = Vec::with_capacity(r.len());
            for i in r.clone() {
                let e = &b.exps[i];
                let text = response_text(&env.tok, &e.response_ids)?;
                let mut r = serde_json::json!({
                    "text": text,
                    "reward": b.rewards[i],
                    "correct": b.correct[i],
                    "advantage": sel.adv[i],
                    "ground_truth": b.ground_truth[i],
                    "length": b.len(i),
                    "finished": b.exps[i].finished,
                    "masked": !sel.keep[i],
                    "components": b.exps[i].components,
                });
                match &e.episode {
                    Some(ep) => r["episode"] = ep.clone(),
                    // The task verifier's judgement, so a reader sees why (pipeline rewards add
                    // their components).
                    None => {
                        r["reason"] = env.task.verify(&text, e.finished, &e.answer).reason.into()
                    }
                }
                rs.push(r);
            }
            let mut line = serde_json::json!({
                "step": step, "phase": "rl", "policy_version": groups[p].policy_version,
                "prompt": b.exps[r.start].prompt, "answer": b.exps[r.start].answer, "responses": rs
            });
            if !b.drawn_rewards[p].is_empty() {
                line["drawn_rewards"] = serde_json::json!(b.drawn_rewards[p]);
            }
            self.samples.write(&line)?;
        }
        Ok(())
    }
}

/// One step's samples, flat: sample i belongs to group p when i ∈ `ranges[p]`.
struct StepBatch {
    exps: Vec<Experience>,
    ranges: Vec<Range<usize>>,
    /// Samples replaced by the reference solution (TempSamp).
    ground_truth: Vec<bool>,
    correct: Vec<bool>,
    /// The rewards the advantage sees (after any KL-in-reward penalty).
    rewards: Vec<f64>,
    /// The mean reward as observed, before any penalty.
    observed_mean: f64,
    /// Per group: the rewards of every response drawn for its prompt (Reinforce-Ada), or
    /// empty when the group is all that was drawn.
    drawn_rewards: Vec<Vec<f64>>,
}

impl StepBatch {
    fn flatten(groups: &[ExperienceGroup]) -> Self {
        let mut ranges = Vec::with_capacity(groups.len());
        let mut exps = Vec::new();
        for grp in groups {
            let start = exps.len();
            exps.extend(grp.experiences.iter().cloned());
            ranges.push(start..exps.len());
        }
        let n = exps.len();
        let mut b = StepBatch {
            exps,
            ranges,
            ground_truth: vec![false; n],
            correct: vec![],
            rewards: vec![],
            observed_mean: 0.0,
            drawn_rewards: groups.iter().map(|g| g.drawn_rewards.clone()).collect(),
        };
        b.score();
        b
    }

    fn n(&self) -> usize {
        self.exps.len()
    }

    /// `weight` on sample i's trainable tokens, 0 on environment and tool tokens: those
    /// enter neither the loss nor the ratio statistics.
    fn trainable_mask(&self, i: usize, weight: f64) -> Vec<f64> {
        let e = &self.exps[i];
        (0..e.response_ids.len())
            .map(|t| if e.is_trainable(t) { weight } else { 0.0 })
            .collect()
    }

    fn len(&self, i: usize) -> usize {
        self.exps[i].response_ids.len()
    }

    fn score(&mut self) {
        self.correct = self
            .exps
            .iter()
            .map(|e| e.components.get("correct").copied().unwrap_or(e.reward) > 0.5)
            .collect();
        self.rewards = self.exps.iter().map(|e| e.reward).collect();
        self.observed_mean = self.rewards.iter().sum::<f64>() / self.n().max(1) as f64;
    }

    /// TempSamp ground-truth injection: the last sample of each group becomes the reference
    /// solution (the task's worked solution where it has one, else the reference answer); its
    /// behaviour log-probs are the current policy's ([`StepBatch::behaviour`]).
    fn inject_ground_truth(&mut self, env: &Env) -> Result<()> {
        if !env.cfg.sampling.inject_ground_truth {
            return Ok(());
        }
        let tok = &env.tok;
        for r in &self.ranges {
            if r.len() < 2 {
                continue;
            }
            let i = r.end - 1;
            let text = env
                .task
                .reference_response(&self.exps[i].prompt, &self.exps[i].answer);
            let mut tokens = tok.encode(&text)?;
            tokens.push(tok.eos);
            let e = &mut self.exps[i];
            e.logprobs = vec![0.0; tokens.len()];
            e.response_ids = tokens;
            e.trainable.clear();
            e.episode = None;
            e.finished = true;
            e.reward = 1.0;
            e.components.insert("correct".into(), 1.0);
            self.ground_truth[i] = true;
        }
        self.score();
        Ok(())
    }

    /// Behaviour log-probs: the sampler's, or the current policy's for injected samples.
    fn behaviour(&self, lp_rows: &[Vec<f64>]) -> Vec<Vec<f64>> {
        (0..self.n())
            .map(|i| {
                if self.ground_truth[i] {
                    lp_rows[i][..self.len(i)].to_vec()
                } else {
                    self.exps[i].logprobs.iter().map(|&x| x as f64).collect()
                }
            })
            .collect()
    }

    /// Subtracts the KL penalty from the rewards when `loss.kl_in_reward`; returns its mean.
    fn kl_in_reward(
        &mut self,
        cfg: &RunConfig,
        behaviour: &[Vec<f64>],
        ref_rows: Option<&[Vec<f64>]>,
    ) -> f64 {
        let n = self.n();
        let mut kl_penalty_mean = 0.0;
        if let (true, Some(rr)) = (cfg.loss.kl_in_reward && cfg.loss.kl_coef > 0.0, ref_rows) {
            for i in 0..n {
                let len = self.len(i);
                let pen = loss::kl_reward_penalty(
                    &cfg.loss,
                    &behaviour[i],
                    &rr[i][..len],
                    &self.trainable_mask(i, 1.0),
                );
                kl_penalty_mean += pen / n as f64;
                self.rewards[i] -= pen;
            }
        }
        kl_penalty_mean
    }

    /// GAE from the critic's values: per-token advantages into `sel` (their per-sample means
    /// into `sel.adv`), and the estimate the critic's update needs. Returns it with the mean
    /// KL penalty β·Σ_t kl_t per response when the KL enters the reward.
    fn gae_estimate(
        &self,
        env: &Env,
        critic: &crate::train::critic::Critic,
        behaviour: &[Vec<f64>],
        lp: &LogProbs,
        sel: &mut Selection,
    ) -> Result<(crate::train::critic::Estimate, f64)> {
        let cfg = &env.cfg;
        let kl = if cfg.loss.kl_in_reward && cfg.loss.kl_coef > 0.0 {
            crate::train::critic::token_kl(cfg, behaviour, lp.ref_rows.as_deref(), &self.exps)
        } else {
            vec![vec![]; self.n()]
        };
        let kl_mean = kl
            .iter()
            .map(|r| cfg.loss.kl_coef * r.iter().sum::<f64>())
            .sum::<f64>()
            / self.n().max(1) as f64;
        let masks: Vec<Vec<f64>> = (0..self.n())
            .map(|i| self.trainable_mask(i, if sel.keep[i] { 1.0 } else { 0.0 }))
            .collect();
        let est = critic.estimate(cfg, &env.tok, &self.exps, &self.rewards, &kl, masks)?;
        for (i, (a, m)) in est.advantages.iter().zip(&est.masks).enumerate() {
            let count: f64 = m.iter().sum();
            let sum: f64 = a.iter().zip(m).map(|(x, w)| x * w).sum();
            sel.adv[i] = if count > 0.0 { sum / count } else { 0.0 };
        }
        sel.token_adv = Some(est.advantages.clone());
        Ok((est, kl_mean))
    }

    /// The loss's per-sequence inputs.
    fn seq_inputs(
        &self,
        cfg: &RunConfig,
        lp: &LogProbs,
        behaviour: &[Vec<f64>],
        sel: &Selection,
    ) -> Vec<SeqInput> {
        let mut seqs = Vec::with_capacity(self.n());
        for r in &self.ranges {
            let n_correct = r.clone().filter(|&i| self.correct[i]).count();
            for i in r.clone() {
                let len = self.len(i);
                seqs.push(SeqInput {
                    logp: lp.rows[i][..len].to_vec(),
                    logp_old: behaviour[i].clone(),
                    logp_ref: lp.ref_rows.as_ref().map(|rr| rr[i][..len].to_vec()),
                    mask: self.trainable_mask(i, if sel.keep[i] { 1.0 } else { 0.0 }),
                    adv: match &sel.token_adv {
                        Some(t) => t[i].clone(),
                        None => vec![sel.adv[i]; len],
                    },
                    kl_weight: if cfg.loss.dads {
                        loss::dads_weight(sel.adv[i] > 0.0, n_correct, r.len())
                    } else {
                        1.0
                    },
                    expert: false,
                });
            }
        }
        seqs
    }

    /// Reward metrics: mean/std, correctness, each named component's mean, and the
    /// observed reward and KL penalty (removed again by `learner_metrics` when unused).
    fn reward_metrics(&self, kl_penalty_mean: f64) -> Metrics {
        let nf = self.n().max(1) as f64;
        let mean = self.rewards.iter().sum::<f64>() / nf;
        let std = (self.rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / nf).sqrt();
        let n_correct = self.correct.iter().filter(|&&c| c).count() as f64;
        let mut m = Metrics::new();
        m.insert("reward/mean".into(), mean);
        m.insert("reward/std".into(), std);
        m.insert("reward/correct/mean".into(), n_correct / nf);
        m.insert("acc/train".into(), n_correct / nf);
        // Other named components (a [reward.pipeline]'s): mean over the batch.
        let mut comp_sums: std::collections::BTreeMap<&str, (f64, usize)> = Default::default();
        for e in &self.exps {
            for (k, v) in e.components.iter().filter(|(k, _)| k.as_str() != "correct") {
                let s = comp_sums.entry(k.as_str()).or_insert((0.0, 0));
                s.0 += v;
                s.1 += 1;
            }
        }
        for (k, (sum, cnt)) in comp_sums {
            m.insert(format!("reward/{k}/mean"), sum / cnt as f64);
        }
        m.insert("reward/observed_mean".into(), self.observed_mean);
        m.insert("reward/kl_penalty_mean".into(), kl_penalty_mean);
        m
    }
}

/// The policy's token log-probs of a step and the batches they came from.
struct LogProbs {
    chunks: Vec<Range<usize>>,
    batches: Vec<batch::SeqBatch>,
    /// The one pass's (log-probs, entropy) with their graph, when the step is one pass.
    whole: Option<(Tensor, Tensor)>,
    rows: Vec<Vec<f64>>,
    ref_rows: Option<Vec<Vec<f64>>>,
    temp: f64,
}

/// Which samples count and their advantages.
struct Selection {
    keep: Vec<bool>,
    zero_std_groups: usize,
    /// One advantage per sample (with GAE: the mean over its trainable tokens, for metrics).
    adv: Vec<f64>,
    /// GAE's advantage of every token (None: `adv` broadcast to the tokens).
    token_adv: Option<Vec<Vec<f64>>>,
    filtered: usize,
}

/// What an update reports.
struct Update {
    grad_norm: f64,
    lr: f64,
    entropy_mean: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::optim::AdamWParams;
    use crate::config::RunConfig;
    use crate::train::explore::{collect, ExploreState};

    fn validated(cfg: RunConfig) -> crate::config::ValidatedRun {
        crate::config::validate(cfg, "test", crate::config::Purpose::Inspect).unwrap()
    }

    /// One update from the same groups, in one pass and in micro-batches of 5 (16 samples:
    /// passes of 5, 5, 5, 1, each padded differently): the same metrics and parameters.
    #[test]
    fn micro_batches_give_the_same_update_as_one_pass() {
        let mut cfg = RunConfig::default();
        cfg.rollout.prompts_per_step = 4;
        cfg.rollout.group_size = 4;
        cfg.train.lr_warmup_steps = 0;
        cfg.train.log_samples = 0;
        cfg.loss.entropy_coef = 0.01;
        let env = Env::new(validated(cfg.clone())).unwrap();
        let model = env.initial_policy(&Device::Cpu).unwrap();
        let mut st = ExploreState::new(&cfg, 0).unwrap();
        let mut groups = collect(&env, &model, 0, &mut st).unwrap();
        // The untrained policy is all wrong; alternate the rewards so advantages are non-zero.
        for (i, e) in groups
            .iter_mut()
            .flat_map(|g| &mut g.experiences)
            .enumerate()
        {
            let r = (i % 2) as f64;
            e.reward = r;
            e.components.insert("correct".into(), r);
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut runs = vec![];
        for mb in [0usize, 5] {
            let mut c = cfg.clone();
            c.train.micro_batch = mb;
            let env = Env::new(validated(c)).unwrap();
            let m = model.deep_clone().unwrap();
            // A large ε makes the first AdamW step ≈ lr·g instead of lr·sign(g), so the
            // parameters compare gradients, not the signs of near-zero ones.
            let hp = AdamWParams {
                eps: 1.0,
                ..Default::default()
            };
            let opt = AdamW::new(m.params(), hp);
            let dir = tmp.path().join(format!("mb{mb}"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut learner = Learner::new(m, opt, &dir, 0).unwrap();
            let metrics = learner.learn(&env, &groups, 1, 0.0, 0).unwrap();
            let params: Vec<Vec<f32>> = learner
                .model
                .params()
                .iter()
                .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            runs.push((metrics, params));
        }
        let (a, b) = (&runs[0], &runs[1]);
        for key in ["loss/policy", "entropy", "grad/norm", "adv/mean"] {
            let (x, y) = (a.0[key], b.0[key]);
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                "{key}: one pass {x} vs micro-batches {y}"
            );
        }
        assert!(a.0["grad/norm"] > 1e-3, "the update must not be trivial");
        let worst =
            a.1.iter()
                .flatten()
                .zip(b.1.iter().flatten())
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
        assert!(worst < 1e-8, "parameters differ by {worst}");
    }

    /// Episodes of the built-in `guess` environment: environment tokens get exactly zero
    /// dL/dℓ and do not enter the ratio statistics. Their behaviour log-probs are replaced by
    /// wild values: with the mask the update is bit-identical; without it (every token
    /// trainable, the hand-built equivalent of not masking) the ratio statistics move.
    #[test]
    fn environment_tokens_get_zero_gradient_and_stay_out_of_ratio_statistics() {
        let mut cfg = RunConfig {
            env: Some(crate::env::EnvConfig {
                max_turns: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        cfg.rollout.prompts_per_step = 2;
        cfg.rollout.group_size = 3;
        cfg.rollout.max_new_tokens = 3;
        cfg.train.lr_warmup_steps = 0;
        cfg.train.log_samples = 1;
        cfg.loss.entropy_coef = 0.01;
        let env = Env::new(validated(cfg.clone())).unwrap();
        let model = env.initial_policy(&Device::Cpu).unwrap();
        let mut st = ExploreState::new(&cfg, 0).unwrap();
        let mut groups = collect(&env, &model, 0, &mut st).unwrap();
        for (i, e) in groups
            .iter_mut()
            .flat_map(|g| &mut g.experiences)
            .enumerate()
        {
            e.reward = (i % 2) as f64;
        }
        let masked: usize = groups
            .iter()
            .flat_map(|g| &g.experiences)
            .map(|e| e.trainable.iter().filter(|t| !**t).count())
            .sum();
        assert!(masked > 0, "the episodes must hold environment tokens");
        // The same episodes with the environment tokens' behaviour log-probs garbled.
        let mut garbled = groups.clone();
        for e in garbled.iter_mut().flat_map(|g| &mut g.experiences) {
            for t in 0..e.logprobs.len() {
                if !e.is_trainable(t) {
                    e.logprobs[t] = -7.5;
                }
            }
        }
        let mut all_trainable = garbled.clone();
        for e in all_trainable.iter_mut().flat_map(|g| &mut g.experiences) {
            e.trainable.clear();
        }
        // dL/dℓ is exactly 0 at every environment token.
        {
            let tmp = tempfile::tempdir().unwrap();
            let opt = AdamW::new(model.params(), AdamWParams::default());
            let mut learner =
                Learner::new(model.deep_clone().unwrap(), opt, tmp.path(), 0).unwrap();
            let b = StepBatch::flatten(&garbled);
            let lp = learner.logprobs(&env, &b).unwrap();
            let behaviour = b.behaviour(&lp.rows);
            let sel = learner.select_and_advantage(&env.cfg, &b).unwrap();
            let seqs = b.seq_inputs(&env.cfg, &lp, &behaviour, &sel);
            let out = loss::compute(&env.cfg.loss, &seqs).unwrap();
            let mut env_tokens = 0;
            for (i, g) in out.grad_logp.iter().enumerate() {
                for (t, &d) in g.iter().enumerate() {
                    if !b.exps[i].is_trainable(t) {
                        assert_eq!(d, 0.0, "sample {i}, token {t}");
                        env_tokens += 1;
                    }
                }
            }
            assert_eq!(env_tokens, masked);
            assert!(sel.adv.iter().any(|a| *a != 0.0));
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut runs = vec![];
        for (k, gs) in [&groups, &garbled, &all_trainable].into_iter().enumerate() {
            let opt = AdamW::new(model.params(), AdamWParams::default());
            let dir = tmp.path().join(format!("run{k}"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut learner = Learner::new(model.deep_clone().unwrap(), opt, &dir, 0).unwrap();
            let m = learner.learn(&env, gs, 1, 0.0, 0).unwrap();
            let params: Vec<Vec<f32>> = learner
                .model
                .params()
                .iter()
                .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            runs.push((m, params, dir));
        }
        let (a, b, c) = (&runs[0], &runs[1], &runs[2]);
        for key in [
            "is/ratio_mean",
            "is/ratio_max",
            "loss/clipfrac",
            "loss/policy",
            "grad/norm",
            "entropy",
        ] {
            assert_eq!(a.0[key], b.0[key], "{key}");
        }
        assert_eq!(a.1, b.1, "the update must not see environment tokens");
        // On-policy: the model's own tokens have ratio 1; unmasked garbage does not.
        assert!(
            (a.0["is/ratio_max"] - 1.0).abs() < 1e-3,
            "{}",
            a.0["is/ratio_max"]
        );
        assert!(c.0["is/ratio_max"] > 10.0, "{}", c.0["is/ratio_max"]);
        // samples.jsonl carries the episode as messages.
        let samples = std::fs::read_to_string(a.2.join("samples.jsonl")).unwrap();
        let line: serde_json::Value =
            serde_json::from_str(samples.lines().next().unwrap()).unwrap();
        let msgs = &line["responses"][0]["episode"]["messages"];
        assert_eq!(msgs[0]["role"], "user");
        assert_eq!(msgs[1]["role"], "assistant");
    }
}
