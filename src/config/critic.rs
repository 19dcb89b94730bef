//! `[critic]`: the value model of PPO with GAE (docs/algorithms.md#ppo-with-a-critic-gae), and
//! the rules that tie it to the rest of a run config.
use serde::{Deserialize, Serialize};

use super::{RunConfig, SyncMode};
use crate::advantage::Estimator;

/// What the critic reads besides the policy's context (an asymmetric critic): text the policy
/// never sees, appended to the critic's copy of the prompt before the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Privileged {
    /// The critic sees exactly what the policy sees (a symmetric critic).
    #[default]
    None,
    /// The task's reference answer (tasks only; `[env]` runs have none to give).
    Answer,
    /// The environment's hidden state at reset (`[env]` runs only): guess's secret number,
    /// countdown's generated solution, calculator's result, bandit's mean payouts, or a
    /// program's optional `hidden` reset field.
    Hidden,
}

impl Privileged {
    pub const ALL: [Privileged; 3] = [Privileged::None, Privileged::Answer, Privileged::Hidden];

    pub fn name(&self) -> &'static str {
        match self {
            Privileged::None => "none",
            Privileged::Answer => "answer",
            Privileged::Hidden => "hidden",
        }
    }
}

/// `[critic]`: a separate value network V(s_t) for `advantage.estimator = "gae"`: the policy's
/// warmed-up weights with a new scalar head (HF `LlamaForSequenceClassification` layout), its
/// own AdamW, trained each step on the clipped value loss against the GAE returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriticConfig {
    /// AdamW learning rate of the critic; the `ppo` recipe sets 1e-3, 10× its policy's
    /// `train.lr`, the ratio of verl's PPO example (critic 1e-5, actor 1e-6).
    pub lr: f64,
    /// Linear learning-rate warm-up of the critic over this many steps (0: none).
    pub lr_warmup_steps: usize,
    /// Clip the critic's global gradient norm to this (0: no clipping).
    pub grad_clip: f64,
    /// AdamW weight decay of the critic.
    pub weight_decay: f64,
    /// c of the clipped value loss: V_clip = V_old + clip(V − V_old, −c, c) (verl's default 0.5).
    pub cliprange_value: f64,
    /// The first this many RL steps train only the critic; the policy is not updated
    /// (verl's `critic_warmup`).
    pub warmup_steps: usize,
    /// Privileged input of an asymmetric critic: "none" (the policy's context), "answer" (the
    /// task's reference answer, which the policy never sees) or "hidden" (an environment's
    /// hidden state at reset, e.g. guess's secret number; see docs/environments.md).
    pub privileged: Privileged,
}

impl Default for CriticConfig {
    fn default() -> Self {
        CriticConfig {
            lr: 1e-4,
            lr_warmup_steps: 0,
            grad_clip: 1.0,
            weight_decay: 0.0,
            cliprange_value: 0.5,
            warmup_steps: 0,
            privileged: Privileged::None,
        }
    }
}

/// The `[critic]` rules of a run config: `gae` and `[critic]` come together, the critic's
/// numbers are in range, and the run is one the critic supports.
pub fn validate(cfg: &RunConfig) -> Result<(), String> {
    let gae = cfg.advantage.estimator == Estimator::Gae;
    let Some(c) = &cfg.critic else {
        if gae {
            return Err(
                "advantage.estimator = \"gae\" needs a [critic] section: the value \
                        model whose V(s_t) GAE reads (add [critic], or use recipe = \"ppo\")"
                    .into(),
            );
        }
        return Ok(());
    };
    if !gae {
        return Err(format!(
            "[critic] is read only by advantage.estimator = \"gae\", found {:?}: remove \
             [critic] or set advantage.estimator = \"gae\"",
            cfg.advantage.estimator.name()
        ));
    }
    if c.lr.is_nan() || c.lr <= 0.0 {
        return Err(format!("critic.lr must be positive, found {}", c.lr));
    }
    if c.cliprange_value.is_nan() || c.cliprange_value <= 0.0 {
        return Err(format!(
            "critic.cliprange_value must be positive, found {}",
            c.cliprange_value
        ));
    }
    for (key, v) in [
        ("critic.grad_clip", c.grad_clip),
        ("critic.weight_decay", c.weight_decay),
    ] {
        if v < 0.0 {
            return Err(format!("{key} must be >= 0, found {v}"));
        }
    }
    let sy = &cfg.sync;
    if sy.mode != SyncMode::OnPolicy
        || sy.buffer.is_some()
        || sy.offline.is_some()
        || cfg.remote.is_some()
    {
        return Err(format!(
            "[critic] (PPO with GAE) supports sync.mode = \"on-policy\" with the trainer's own \
             rollouts only; found sync.mode = {:?}{}{}{}",
            serde_json::to_value(sy.mode).unwrap_or_default(),
            if sy.buffer.is_some() {
                ", sync.buffer"
            } else {
                ""
            },
            if sy.offline.is_some() {
                ", sync.offline"
            } else {
                ""
            },
            if cfg.remote.is_some() {
                ", [remote]"
            } else {
                ""
            },
        ));
    }
    if cfg.model.lora.is_some() {
        return Err(
            "[critic] with [model.lora] is not supported: the critic is a full copy \
                    of the policy's weights; train the policy without LoRA"
                .into(),
        );
    }
    if cfg.sampling.inject_ground_truth {
        return Err(
            "[critic] with sampling.inject_ground_truth is not supported: an injected \
                    reference solution is off-policy, and GAE's returns assume the policy \
                    sampled every token"
                .into(),
        );
    }
    if c.privileged == Privileged::Answer && cfg.env.is_some() {
        return Err(
            "critic.privileged = \"answer\" reads the task's reference answer; an \
                    [env] run has none (use \"hidden\" for the environment's hidden state, or \
                    \"none\")"
                .into(),
        );
    }
    if c.privileged == Privileged::Hidden && cfg.env.is_none() {
        return Err(
            "critic.privileged = \"hidden\" reads an environment's hidden state; a task run \
                    (no [env]) has none (use \"answer\" for the task's reference answer, or \
                    \"none\")"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ppo() -> RunConfig {
        let mut cfg = RunConfig {
            critic: Some(CriticConfig::default()),
            ..Default::default()
        };
        cfg.advantage.estimator = Estimator::Gae;
        cfg
    }

    #[test]
    fn gae_and_critic_come_together() {
        assert_eq!(validate(&ppo()), Ok(()));
        let mut no_critic = ppo();
        no_critic.critic = None;
        let e = validate(&no_critic).unwrap_err();
        assert!(e.contains("needs a [critic]"), "{e}");
        let mut grpo = ppo();
        grpo.advantage.estimator = Estimator::Grpo;
        let e = validate(&grpo).unwrap_err();
        assert!(
            e.contains("[critic] is read only") && e.contains("grpo"),
            "{e}"
        );
        assert_eq!(validate(&RunConfig::default()), Ok(()));
    }

    #[test]
    fn bad_values_and_unsupported_runs_are_named() {
        let with = |f: &dyn Fn(&mut RunConfig)| {
            let mut c = ppo();
            f(&mut c);
            validate(&c).unwrap_err()
        };
        let e = with(&|c| c.critic.as_mut().unwrap().lr = 0.0);
        assert!(e.contains("critic.lr") && e.contains("found 0"), "{e}");
        let e = with(&|c| c.critic.as_mut().unwrap().cliprange_value = -1.0);
        assert!(e.contains("critic.cliprange_value"), "{e}");
        let e = with(&|c| c.critic.as_mut().unwrap().grad_clip = -1.0);
        assert!(e.contains("critic.grad_clip"), "{e}");
        let e = with(&|c| c.sync.mode = SyncMode::Lagged);
        assert!(e.contains("on-policy") && e.contains("lagged"), "{e}");
        let e = with(&|c| c.sampling.inject_ground_truth = true);
        assert!(e.contains("inject_ground_truth"), "{e}");
        let e = with(&|c| {
            c.env = Some(Default::default());
            c.critic.as_mut().unwrap().privileged = Privileged::Answer;
        });
        assert!(
            e.contains("critic.privileged") && e.contains("\"hidden\""),
            "{e}"
        );
        let e = with(&|c| c.critic.as_mut().unwrap().privileged = Privileged::Hidden);
        assert!(
            e.contains("critic.privileged = \"hidden\"") && e.contains("no [env]"),
            "{e}"
        );
        let mut env_run = ppo();
        env_run.env = Some(Default::default());
        env_run.critic.as_mut().unwrap().privileged = Privileged::Hidden;
        assert_eq!(validate(&env_run), Ok(()));
    }
}
