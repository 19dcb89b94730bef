//! The derived numbers of a run ([`Plan`]), printed at start and saved as plan.json, and the
//! check that the run fits the machine before anything is written.
use serde::{Deserialize, Serialize};

use super::{resume, RunConfig, ValidatedRun};
use crate::error::{Error, Result};

/// Derived numbers of a run, printed at start and saved as plan.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub recipe: String,
    pub estimator: String,
    pub loss: String,
    pub aggregation: String,
    pub model_params: usize,
    pub prompts_per_step: usize,
    pub samples_per_step: usize,
    /// Upper bound of tokens per step: samples × (prompt + max new tokens).
    pub max_tokens_per_step: usize,
    pub rl_steps: usize,
    pub total_samples: usize,
    pub warmup_max_steps: usize,
    pub warmup_target_acc: f64,
    pub heldout_size: usize,
    pub seed: u64,
    /// Every external program the run starts ([`resume::external_programs`]).
    #[serde(default)]
    pub external_programs: Vec<String>,
    /// The least memory the run needs ([`MemoryEstimate`]).
    #[serde(default)]
    pub memory: MemoryEstimate,
    /// Why `rl_steps` is below `train.steps` (offline data holds fewer steps), when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rl_steps_limited_by: Option<String>,
}

/// A lower bound of a run's memory, in bytes: the parts that are certain to be allocated at
/// once. Real use is higher (temporaries, the tokenizer, the data set), so a run refused by it
/// could never have fit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    /// f32 weights, gradients and AdamW's two moments: 16 bytes per parameter.
    pub training_state: f64,
    /// PPO's critic (`[critic]`): a second network of the policy's size with its own
    /// gradients and AdamW moments, 16 bytes per parameter; 0 without a critic.
    #[serde(default)]
    pub critic_state: f64,
    /// Keys and values of every sequence of a step while it is sampled:
    /// samples × tokens × layers × 2 × kv width × 4 bytes.
    pub kv_cache: f64,
    /// The residual stream the learner keeps per layer for the backward pass:
    /// sequences per pass × tokens × hidden × layers × 4 bytes.
    pub activations: f64,
}

impl MemoryEstimate {
    /// Sampling and learning take turns, so the larger of the two adds to the state.
    pub fn total(&self) -> f64 {
        self.training_state + self.critic_state + self.kv_cache.max(self.activations)
    }

    fn new(cfg: &RunConfig, model: &crate::model::Config, params: usize, tokens: f64) -> Self {
        let samples = (cfg.rollout.prompts_per_step as f64) * (cfg.rollout.group_size as f64);
        let per_pass = match cfg.train.micro_batch {
            0 => samples,
            m => samples.min(m as f64),
        };
        let layers = model.num_hidden_layers as f64;
        let kv_width = (model.num_kv_heads() * model.head_dim()) as f64;
        MemoryEstimate {
            training_state: 16.0 * params as f64,
            critic_state: if cfg.critic.is_some() {
                16.0 * params as f64
            } else {
                0.0
            },
            kv_cache: samples * tokens * layers * 2.0 * kv_width * 4.0,
            activations: per_pass * tokens * (model.hidden_size as f64) * layers * 4.0,
        }
    }
}

fn gb(bytes: f64) -> String {
    format!("{:.2} GB", bytes / 1e9)
}

/// `a × b` or an error naming what overflowed.
fn product(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| {
        Error::config(
            "plan",
            format!(
                "{what} = {a} × {b} does not fit in a {}-bit count",
                usize::BITS
            ),
        )
    })
}

impl Plan {
    /// The plan of `cfg` on a policy of shape `model` with `model_params` parameters whose
    /// longest prompt has `prompt_tokens` tokens. Counts that overflow are an error naming them.
    /// Only a validated config has a plan.
    pub fn new(
        cfg: &ValidatedRun,
        model: &crate::model::Config,
        model_params: usize,
        prompt_tokens: usize,
    ) -> Result<Self> {
        let r = &cfg.rollout;
        let samples = product(
            r.prompts_per_step,
            r.group_size,
            "samples per step (rollout.prompts_per_step × rollout.group_size)",
        )?;
        let tokens = prompt_tokens.checked_add(r.max_new_tokens).ok_or_else(|| {
            Error::config("plan", "prompt tokens + rollout.max_new_tokens overflow")
        })?;
        Ok(Plan {
            recipe: cfg.recipe.clone().unwrap_or_else(|| "quickstart".into()),
            estimator: cfg.advantage.estimator.name().to_string(),
            loss: cfg.loss.loss.name().to_string(),
            aggregation: cfg.loss.agg.name().to_string(),
            model_params,
            prompts_per_step: r.prompts_per_step,
            samples_per_step: samples,
            max_tokens_per_step: product(samples, tokens, "tokens per step")?,
            rl_steps: cfg.train.steps,
            total_samples: product(
                samples,
                cfg.train.steps,
                "samples of the run (samples per step × train.steps)",
            )?,
            warmup_max_steps: cfg.warmup.max_steps,
            warmup_target_acc: cfg.warmup.target_acc,
            heldout_size: cfg.task.heldout_size,
            seed: cfg.seed,
            external_programs: resume::external_programs(cfg),
            memory: MemoryEstimate::new(cfg, model, model_params, tokens as f64),
            rl_steps_limited_by: None,
        })
    }

    /// Caps the RL steps at what offline data holds (`groups` groups, `prompts_per_step` a
    /// step), saying so in the plan.
    pub fn limit_to_offline(&mut self, groups: usize) {
        let available = groups / self.prompts_per_step.max(1);
        if available < self.rl_steps {
            self.rl_steps_limited_by = Some(format!(
                "offline data: {groups} groups of {} per step; train.steps = {}",
                self.prompts_per_step, self.rl_steps
            ));
            self.rl_steps = available;
            self.total_samples = available * self.samples_per_step;
        }
    }

    /// Refuses a run whose [`MemoryEstimate`] exceeds `available` bytes (None: not known, not
    /// checked), with the figures and the settings that drive them.
    pub fn check_memory(&self, available: Option<u64>) -> Result<()> {
        let Some(available) = available else {
            return Ok(());
        };
        let m = &self.memory;
        if m.total() <= available as f64 {
            return Ok(());
        }
        Err(Error::config(
            "plan",
            format!(
                "the run needs at least {} of memory but {} is available: training state {} \
                 ({} params × 16 bytes{}), then the larger of the KV cache while sampling {} \
                 ({} samples/step) and the learner's activations {}; lower \
                 rollout.prompts_per_step × rollout.group_size or rollout.max_new_tokens, or set \
                 train.micro_batch",
                gb(m.total()),
                gb(available as f64),
                gb(m.training_state + m.critic_state),
                self.model_params,
                if m.critic_state > 0.0 {
                    ", twice: the policy and the critic"
                } else {
                    ""
                },
                gb(m.kv_cache),
                self.samples_per_step,
                gb(m.activations),
            ),
        ))
    }

    pub fn render(&self) -> String {
        let programs = if self.external_programs.is_empty() {
            "none".to_string()
        } else {
            self.external_programs.join("; ")
        };
        format!(
            "plan: recipe {} | {} advantage, {} loss, {} | model {} params | {} prompts x {} = {} samples/step, \
             <= {} tokens/step | {} RL steps{} ({} samples) | {} | held-out {} | seed {} | \
             memory >= {} | external programs: {programs}",
            self.recipe,
            self.estimator,
            self.loss,
            self.aggregation,
            self.model_params,
            self.prompts_per_step,
            self.samples_per_step / self.prompts_per_step.max(1),
            self.samples_per_step,
            self.max_tokens_per_step,
            self.rl_steps,
            match &self.rl_steps_limited_by {
                Some(why) => format!(" ({why})"),
                None => String::new(),
            },
            self.total_samples,
            if self.warmup_max_steps == 0 {
                "no warm-up".to_string()
            } else {
                format!(
                    "warm-up until held-out acc >= {:.0}% (max {} steps)",
                    self.warmup_target_acc * 100.0,
                    self.warmup_max_steps
                )
            },
            self.heldout_size,
            self.seed,
            gb(self.memory.total()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> crate::model::Config {
        // hidden 8, 2 layers, 2 heads of 4, one KV head: kv width 4.
        serde_json::from_str(
            r#"{"vocab_size": 19, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}"#,
        )
        .unwrap()
    }

    fn validated(cfg: &RunConfig) -> ValidatedRun {
        crate::config::validate(cfg.clone(), "test", crate::config::Purpose::Inspect).unwrap()
    }

    #[test]
    fn memory_estimate_by_hand() {
        let mut cfg = RunConfig::default();
        cfg.rollout.prompts_per_step = 3;
        cfg.rollout.group_size = 2;
        cfg.rollout.max_new_tokens = 4;
        let plan = Plan::new(&validated(&cfg), &shape(), 100, 6).unwrap();
        // 6 samples × 10 tokens: KV 6·10·2 layers·2·4·4 B = 3840; activations 6·10·8·2·4 = 3840.
        assert_eq!(
            plan.memory,
            MemoryEstimate {
                training_state: 1600.0,
                critic_state: 0.0,
                kv_cache: 3840.0,
                activations: 3840.0,
            }
        );
        assert_eq!(plan.memory.total(), 5440.0);
        // A micro-batch of 2 sequences keeps a third of the activations.
        cfg.train.micro_batch = 2;
        let plan = Plan::new(&validated(&cfg), &shape(), 100, 6).unwrap();
        assert_eq!(plan.memory.activations, 1280.0);
        assert!(plan.check_memory(Some(5440)).is_ok());
        assert!(plan.check_memory(None).is_ok());
        let e = plan.check_memory(Some(5439)).unwrap_err().to_string();
        assert!(
            e.contains("needs at least") && e.contains("6 samples/step"),
            "{e}"
        );
        // PPO's critic: a second 100-parameter network with its optimizer, 1600 bytes more.
        cfg.critic = Some(Default::default());
        cfg.advantage.estimator = crate::advantage::Estimator::Gae;
        let plan = Plan::new(&validated(&cfg), &shape(), 100, 6).unwrap();
        assert_eq!(plan.memory.critic_state, 1600.0);
        assert_eq!(plan.memory.total(), 1600.0 + 1600.0 + 3840.0);
        let e = plan.check_memory(Some(7039)).unwrap_err().to_string();
        assert!(e.contains("the policy and the critic"), "{e}");
    }

    #[test]
    fn impossible_sizes_are_refused_with_the_figures() {
        let mut cfg = RunConfig::default();
        cfg.rollout.group_size = 1_000_000_000;
        let plan = Plan::new(&validated(&cfg), &shape(), 100, 6).unwrap();
        let e = plan
            .check_memory(Some(64_000_000_000))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("32000000000 samples/step") && e.contains("64.00 GB is available"),
            "{e}"
        );
        // Counts that would wrap around are errors naming them, not wrapped numbers.
        cfg.rollout.group_size = 8;
        cfg.train.steps = usize::MAX / 2;
        let e = Plan::new(&validated(&cfg), &shape(), 100, 6)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.steps") && e.contains("does not fit"),
            "{e}"
        );
    }
}
