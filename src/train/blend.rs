//! Learned reward blending in `grove train` (`[reward.pipeline.blend]`, BARFI's one-step
//! version; the gradient and its tests are in [`crate::reward::blend`], the config in
//! docs/rewards.md#learned-blend-weights).
//!
//! Each step, before the learner's update and at the policy θ that sampled the batch:
//!
//! 1. every sample's reward becomes r_φ = φ_p·s_primary + φ_a·s_auxiliary with the current
//!    weights (the components' values as the pipeline logged them); the policy's own step
//!    then trains on these rewards, on every group, with the run's estimator and loss;
//! 2. the last `heldout_groups` groups are held out; on the others, g_k is the gradient of the
//!    surrogate (1/N) Σ_i A_k,i·log π_θ(y_i | x_i) with component k's group-mean advantages;
//! 3. θ' = θ + α·(φ_p·g_p + φ_a·g_a) is built in a separate copy of the policy (the live
//!    weights and the optimizer's state are never touched), and ∇J(θ') is the gradient of the
//!    same surrogate on the held-out groups with the primary component's advantages alone;
//! 4. dJ/dφ_k = α·⟨∇J(θ'), g_k⟩ and φ ← φ + β·dJ/dφ, used from the next step on.
//!
//! The held-out groups are a split of the step's own groups, not an extra rollout: no
//! sampling cost, and the inner gradient never sees them (a sample in both would bias
//! ⟨∇J, g_k⟩ by its own squared gradient). The cost is three backward passes over the batch
//! and one forward pass of the copy, about one more learner step's work.
use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::buffer::{Experience, ExperienceGroup};
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::model::{batch, Llama};
use crate::reward::blend::{blended_rewards, group_mean_advantages, implicit_gradient, outer_step};
use crate::report::Metrics;
use crate::train::explore::Env;

/// What a checkpoint keeps of the blend: component name → its current weight φ_k.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlendState {
    pub weights: BTreeMap<String, f64>,
}

/// The outer loop of a blended run: the weights and the step sizes.
pub struct Blender {
    /// [primary, auxiliary] component names.
    names: [String; 2],
    /// [φ_p, φ_a].
    weights: [f64; 2],
    /// α: the look-ahead's step size.
    alpha: f64,
    /// β: the weights' step size.
    beta: f64,
    heldout_groups: usize,
    /// The learner's log-prob temperature (the rollout's, 1 when greedy).
    temperature: f64,
    /// `train.micro_batch` (0: one pass).
    micro_batch: usize,
}

impl Blender {
    /// The blender of a run with `[reward.pipeline.blend]`, at the components' configured
    /// weights; None without one.
    pub fn new(cfg: &RunConfig) -> Option<Self> {
        let p = cfg.reward.pipeline.as_ref()?;
        let b = p.blend.as_ref()?;
        let weight = |name: &str| {
            p.components
                .iter()
                .find(|c| c.name == name)
                .map_or(0.0, |c| c.weight())
        };
        let t = cfg.rollout.temperature;
        Some(Blender {
            weights: [weight(&b.primary), weight(&b.auxiliary)],
            names: [b.primary.clone(), b.auxiliary.clone()],
            alpha: b.inner_lr.unwrap_or(cfg.train.lr),
            beta: b.outer_lr,
            heldout_groups: b.heldout_groups,
            temperature: if t > 0.0 { t } else { 1.0 },
            micro_batch: cfg.train.micro_batch,
        })
    }

    /// The blender of a training run: fresh (`resumed` None), or with the checkpoint's
    /// weights, which must be there.
    pub fn for_run(
        cfg: &RunConfig,
        resumed: Option<(&std::path::Path, Option<BlendState>)>,
    ) -> Result<Option<Self>> {
        let Some(mut b) = Self::new(cfg) else {
            return Ok(None);
        };
        if let Some((ckpt, saved)) = resumed {
            let st = saved.ok_or_else(|| {
                Error::checkpoint(
                    ckpt.join("state.json"),
                    "the config has [reward.pipeline.blend] but the checkpoint has no blend \
                     weights (was the run started without it?)",
                )
            })?;
            b.restore(st)
                .map_err(|m| Error::checkpoint(ckpt.join("state.json"), m))?;
        }
        Ok(Some(b))
    }

    /// [φ_p, φ_a].
    pub fn weights(&self) -> [f64; 2] {
        self.weights
    }

    pub fn state(&self) -> BlendState {
        BlendState {
            weights: self.names.iter().cloned().zip(self.weights).collect(),
        }
    }

    /// Takes the saved weights; they must be of this config's two components.
    pub fn restore(&mut self, st: BlendState) -> std::result::Result<(), String> {
        let names: Vec<&String> = st.weights.keys().collect();
        for (slot, name) in self.weights.iter_mut().zip(&self.names) {
            *slot = *st.weights.get(name).ok_or_else(|| {
                format!(
                    "blend weights are for components {names:?}, the config blends `{}` and `{}`",
                    self.names[0], self.names[1]
                )
            })?;
        }
        Ok(())
    }

    /// One outer step on the batch `groups`, sampled by `model` (the live policy, before its
    /// update): sets every reward to the blend with the current weights, computes dJ/dφ and
    /// steps the weights. Returns `reward/blend/<component>` (the weights this step's rewards
    /// used) and `reward/blend_grad/<component>`.
    pub fn step(
        &mut self,
        env: &Env,
        model: &Llama,
        groups: &mut [ExperienceGroup],
    ) -> Result<Metrics> {
        let values = groups
            .iter()
            .map(|g| self.component_values(g))
            .collect::<Result<Vec<_>>>()?;
        for (g, v) in groups.iter_mut().zip(&values) {
            let r = blended_rewards(&self.weights, v)?;
            for (e, r) in g.experiences.iter_mut().zip(r) {
                e.reward = r;
            }
        }
        let split = groups.len().checked_sub(self.heldout_groups).filter(|&s| s > 0);
        let Some(split) = split else {
            return Err(Error::Internal(format!(
                "blend: a batch of {} groups has none left once {} are held out",
                groups.len(),
                self.heldout_groups
            )));
        };
        let (train, held) = groups.split_at(split);
        let advantages = |k: usize, gs: &[ExperienceGroup], vs: &[[Vec<f64>; 2]]| -> Vec<f64> {
            gs.iter()
                .zip(vs)
                .flat_map(|(g, v)| group_mean_advantages(&v[k], g.experiences.len()))
                .collect()
        };
        let train_exps: Vec<&Experience> = train.iter().flat_map(|g| &g.experiences).collect();
        let inner = self.surrogate_grads(
            env,
            model,
            &train_exps,
            &[
                advantages(0, train, &values[..split]),
                advantages(1, train, &values[..split]),
            ],
        )?;
        let ahead = self.look_ahead(model, &inner)?;
        let held_exps: Vec<&Experience> = held.iter().flat_map(|g| &g.experiences).collect();
        let outer = self
            .surrogate_grads(
                env,
                &ahead,
                &held_exps,
                &[advantages(0, held, &values[split..])],
            )?
            .remove(0);
        let mut grad = [0.0; 2];
        for (j, o) in outer.iter().enumerate() {
            let flat = |t: &Tensor| -> Result<Vec<f64>> {
                Ok(t.flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(f64::from)
                    .collect())
            };
            let per_k = [flat(&inner[0][j])?, flat(&inner[1][j])?];
            for (acc, d) in grad
                .iter_mut()
                .zip(implicit_gradient(self.alpha, &flat(o)?, &per_k))
            {
                *acc += d;
            }
        }
        let mut m = Metrics::new();
        for ((name, w), d) in self.names.iter().zip(self.weights).zip(grad) {
            m.insert(format!("reward/blend/{name}"), w);
            m.insert(format!("reward/blend_grad/{name}"), d);
        }
        outer_step(&mut self.weights, &grad, self.beta);
        if let Some(w) = self.weights.iter().find(|w| !w.is_finite()) {
            return Err(Error::Reward(format!(
                "reward.pipeline.blend: a weight became {w} (outer gradient {grad:?}); lower \
                 blend.outer_lr"
            )));
        }
        Ok(m)
    }

    /// [primary values, auxiliary values] of a group, as the pipeline logged them.
    fn component_values(&self, g: &ExperienceGroup) -> Result<[Vec<f64>; 2]> {
        let one = |name: &str| -> Result<Vec<f64>> {
            g.experiences
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    e.components.get(name).copied().ok_or_else(|| {
                        Error::Internal(format!(
                            "blend: experience {i} of group {} has no value of component \
                             `{name}` (has: {:?})",
                            g.group_id,
                            e.components.keys().collect::<Vec<_>>()
                        ))
                    })
                })
                .collect()
        };
        Ok([one(&self.names[0])?, one(&self.names[1])?])
    }

    /// θ' = θ + α·(φ_p·g_p + φ_a·g_a) in a copy of `model`.
    fn look_ahead(&self, model: &Llama, inner: &[Vec<Tensor>]) -> Result<Llama> {
        let ahead = model.deep_clone()?;
        let [wp, wa] = self.weights;
        for (j, ((_, live), (_, var))) in model.params().iter().zip(ahead.params()).enumerate() {
            let step = ((&inner[0][j] * (self.alpha * wp))? + (&inner[1][j] * (self.alpha * wa))?)?;
            var.set(&(live.as_tensor() + step.to_dtype(live.dtype())?)?)?;
        }
        // The copy's bf16 working copies (model.dtype = "bf16") must be made again.
        crate::compute::optim::weights_changed();
        Ok(ahead)
    }

    /// For each advantage vector A in `advs`: ∇_θ of (1/N) Σ_i A_i·Σ_t log π_θ(y_i,t | …) over
    /// the trainable tokens of `exps`, one tensor per parameter of `model` (in its order).
    /// One forward pass per micro-batch serves every A.
    fn surrogate_grads(
        &self,
        env: &Env,
        model: &Llama,
        exps: &[&Experience],
        advs: &[Vec<f64>],
    ) -> Result<Vec<Vec<Tensor>>> {
        let n = exps.len();
        let dev = model.device().clone();
        let params = model.params();
        let mut sums: Vec<Vec<Option<Tensor>>> = vec![vec![None; params.len()]; advs.len()];
        let mb = match self.micro_batch {
            0 => n,
            m => m.min(n),
        }
        .max(1);
        for start in (0..n).step_by(mb) {
            let chunk = &exps[start..(start + mb).min(n)];
            let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.prompt_ids.clone()).collect();
            let responses: Vec<Vec<u32>> = chunk.iter().map(|e| e.response_ids.clone()).collect();
            let b = batch::build(&prompts, &responses, env.tok.pad, &dev)?;
            let (lp, _) = batch::response_logprobs(model, &b, self.temperature)?;
            for (k, adv) in advs.iter().enumerate() {
                let mut w = Vec::with_capacity(chunk.len() * b.resp_len);
                for (i, (e, valid)) in chunk.iter().zip(&b.valid).enumerate() {
                    let a = adv[start + i] / n as f64;
                    w.extend(valid.iter().enumerate().map(|(t, v)| {
                        let on = *v > 0.0 && e.is_trainable(t);
                        (if on { a } else { 0.0 }) as f32
                    }));
                }
                let w = Tensor::from_vec(w, (chunk.len(), b.resp_len), &dev)?;
                let grads = (&lp * w)?.sum_all()?.backward()?;
                for (slot, (_, var)) in sums[k].iter_mut().zip(params) {
                    if let Some(g) = grads.get(var.as_tensor()) {
                        let g = g.to_dtype(DType::F32)?;
                        *slot = Some(match slot.take() {
                            Some(acc) => (acc + g)?,
                            None => g,
                        });
                    }
                }
            }
        }
        sums.into_iter()
            .map(|per_param| {
                per_param
                    .into_iter()
                    .zip(params)
                    .map(|(g, (_, var))| match g {
                        Some(g) => Ok(g),
                        None => Ok(var.as_tensor().zeros_like()?.to_dtype(DType::F32)?),
                    })
                    .collect()
            })
            .collect()
    }
}
