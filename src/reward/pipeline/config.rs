//! `[reward.pipeline]` configuration: components, their kinds and validation.
use super::*;

/// Which check a `verifier` component runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifierCheck {
    /// The built-in arithmetic task's exact match followed by EOS.
    #[default]
    Exact,
    /// Math answer extraction and equivalence (GSM8K, MATH).
    Math,
}

/// Which part of an episode's discounted per-turn rewards a `turns` component takes
/// ([`crate::reward::gates::split_turns`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TurnPart {
    /// Σ_t γ^t r_t: the trajectory-level return (what an `[env]` run uses without a pipeline).
    #[default]
    Return,
    /// The last turn's reward when the environment ended the episode, else 0.
    Outcome,
    /// Every other turn's reward, summed (return − outcome).
    Steps,
}

/// A per-turn gate of a `turns` component: turn t's reward counts only once the condition has
/// held at some turn s ≤ t ([`crate::reward::gates::gate_turns`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TurnGate {
    /// The turn's step reported this milestone (`info.milestone` / `info.milestones`).
    Milestone(String),
    /// The turn's own reward r_t (before discounting) was at least this.
    RewardAtLeast(f64),
}

impl TurnGate {
    /// Whether the condition held at each turn of `turns`.
    pub fn held(&self, turns: &EpisodeTurns) -> Vec<bool> {
        match self {
            TurnGate::Milestone(name) => turns
                .milestones
                .iter()
                .map(|ms| ms.iter().any(|m| m == name))
                .collect(),
            TurnGate::RewardAtLeast(delta) => turns.rewards.iter().map(|r| r >= delta).collect(),
        }
    }

    fn validate(&self) -> std::result::Result<(), String> {
        match self {
            TurnGate::Milestone(m) if m.is_empty() => {
                Err("gate.milestone: expected a milestone name, found \"\"".into())
            }
            TurnGate::RewardAtLeast(d) if !d.is_finite() => Err(format!(
                "gate.reward_at_least: expected a finite number, found {d}"
            )),
            _ => Ok(()),
        }
    }
}

/// One channel of a `gated` component: a component name and its pass threshold (none: the
/// channel always passes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateChannel {
    pub component: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
}

fn default_length_coef() -> f64 {
    DEFAULT_LENGTH_COEF
}
fn default_free_len() -> usize {
    DEFAULT_FREE_LEN
}
fn default_credit() -> f64 {
    DEFAULT_MILESTONE_CREDIT
}
fn default_rm_batch() -> usize {
    64
}
fn default_judge() -> String {
    "last-number".into()
}

/// What a component computes (the `kind` key and its options).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ComponentKind {
    Verifier {
        #[serde(default)]
        check: VerifierCheck,
    },
    LengthPenalty {
        #[serde(default = "default_length_coef")]
        coef: f64,
        #[serde(default = "default_free_len")]
        free_len: usize,
    },
    External(ExternalConfig),
    RewardModel {
        /// A folder written by `grove rm-train`.
        path: String,
        #[serde(default = "default_rm_batch")]
        batch_size: usize,
        /// Value for responses that hit the token limit without EOS (the reward model was
        /// trained on finished answers); none: score them like any other.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        truncated_score: Option<f64>,
    },
    Sar {},
    Consistency {
        /// "last-number" (built in) or a judge registered in [`Registry`].
        #[serde(default = "default_judge")]
        judge: String,
    },
    Gated {
        channels: Vec<GateChannel>,
    },
    Milestones {
        #[serde(default = "default_credit")]
        credit: f64,
    },
    Function {
        /// Name of a [`RewardFn`] registered in [`Registry`].
        function: String,
    },
    /// An `[env]` episode's per-turn rewards, discounted by `env.discount`.
    Turns {
        #[serde(default)]
        part: TurnPart,
        /// Per-turn gate (none: every turn counts), applied before the split into parts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gate: Option<TurnGate>,
    },
    /// 1 when the `[env]` episode was solved (`"success": true`), else 0.
    Success {},
}

impl ComponentKind {
    /// The `kind` name as written in configs.
    pub fn label(&self) -> &'static str {
        match self {
            ComponentKind::Verifier { .. } => "verifier",
            ComponentKind::LengthPenalty { .. } => "length-penalty",
            ComponentKind::External(_) => "external",
            ComponentKind::RewardModel { .. } => "reward-model",
            ComponentKind::Sar {} => "sar",
            ComponentKind::Consistency { .. } => "consistency",
            ComponentKind::Gated { .. } => "gated",
            ComponentKind::Milestones { .. } => "milestones",
            ComponentKind::Function { .. } => "function",
            ComponentKind::Turns { .. } => "turns",
            ComponentKind::Success {} => "success",
        }
    }

    /// Whether the component reads an `[env]` episode (per-turn rewards, success).
    pub fn needs_episode(&self) -> bool {
        matches!(
            self,
            ComponentKind::Turns { .. } | ComponentKind::Success {}
        )
    }

    /// Weight when the config gives none: α = 0.2 for SAR, 1 otherwise.
    pub fn default_weight(&self) -> f64 {
        match self {
            ComponentKind::Sar {} => DEFAULT_SAR_ALPHA,
            _ => 1.0,
        }
    }
}

fn is_no_shaping(s: &ShapingConfig) -> bool {
    *s == ShapingConfig::None
}

/// One `[[reward.pipeline.components]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentConfig {
    /// Logged as `reward/<name>/mean`; letters, digits, `_` and `-`.
    pub name: String,
    /// Default: [`ComponentKind::default_weight`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Shaping of this component's values alone (e.g. LSC per reward model).
    #[serde(default, skip_serializing_if = "is_no_shaping")]
    pub shaping: ShapingConfig,
    #[serde(flatten)]
    pub kind: ComponentKind,
}

impl ComponentConfig {
    pub fn new(name: &str, kind: ComponentKind) -> Self {
        ComponentConfig {
            name: name.into(),
            weight: None,
            shaping: ShapingConfig::None,
            kind,
        }
    }
    pub fn weighted(mut self, w: f64) -> Self {
        self.weight = Some(w);
        self
    }
    pub fn shaped(mut self, s: ShapingConfig) -> Self {
        self.shaping = s;
        self
    }
    pub fn weight(&self) -> f64 {
        self.weight.unwrap_or_else(|| self.kind.default_weight())
    }
}

fn default_reference_samples() -> usize {
    DEFAULT_REFERENCE_SAMPLES
}
fn default_cache_size() -> usize {
    DEFAULT_REFERENCE_CACHE_SIZE
}

/// The `[reward.pipeline]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// The reward components, each a `[[reward.pipeline.components]]` table with `name`,
    /// `kind` (verifier, length-penalty, external, reward-model, sar, consistency, gated,
    /// milestones, function, and for `[env]` episodes turns and success), optional `weight`
    /// and `shaping`, and the kind's own keys (docs/rewards.md).
    pub components: Vec<ComponentConfig>,
    /// Shaping of the weighted sum.
    #[serde(default, skip_serializing_if = "is_no_shaping")]
    pub shaping: ShapingConfig,
    /// M: reference responses per prompt (par, lsc, centered).
    #[serde(default = "default_reference_samples")]
    pub reference_samples: usize,
    /// Prompts whose reference rewards are kept for reuse (the oldest are evicted beyond it).
    #[serde(default = "default_cache_size")]
    pub reference_cache_size: usize,
    /// Learned blend weights (BARFI, docs/rewards.md#learned-blend-weights): the weights of a
    /// primary and an auxiliary component move each step to raise the primary's return after
    /// the policy's step; unset: the components' weights stay as configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blend: Option<BlendConfig>,
}

fn default_heldout_groups() -> usize {
    1
}

/// β·α when `blend.outer_lr` is unset: dJ/dφ is proportional to α, so β = this / α moves a
/// weight by this times ⟨∇J(θ'), g_k⟩ per step whatever the policy's learning rate.
pub const DEFAULT_BLEND_OUTER_STEP: f64 = 0.01;

/// `[reward.pipeline.blend]`: the training reward is φ_p·primary + φ_a·auxiliary, starting
/// from the two components' `weight`s, and φ steps by β·dJ(θ')/dφ ([`crate::reward::blend`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlendConfig {
    /// The component whose return the weights are learned to raise: the held-out groups are
    /// scored by it alone. The initial weight φ_p is its `weight`.
    pub primary: String,
    /// The component whose weight is learned next to the primary's (initial φ_a: its
    /// `weight`). Every other component must have weight 0 (it is logged, not trained on).
    pub auxiliary: String,
    /// β: the outer step size, φ ← φ + β·dJ(θ')/dφ (unset: 0.01/α; dJ/dφ is proportional
    /// to α, so a step then moves a weight by 0.01·⟨∇J(θ'), g_k⟩).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outer_lr: Option<f64>,
    /// α: the inner step size of the look-ahead θ' = θ + α·g(φ) (unset: `train.lr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner_lr: Option<f64>,
    /// The last this many groups of each step form the held-out batch of the outer objective
    /// J (the inner gradient g does not see them; the policy's own step uses every group).
    /// Default 1.
    #[serde(default = "default_heldout_groups")]
    pub heldout_groups: usize,
}

impl BlendConfig {
    /// Checks the blend against the pipeline's components (`known`: their names and weights)
    /// and shaping; messages start with the key inside `[reward.pipeline]`.
    fn validate(
        &self,
        components: &[ComponentConfig],
        shaping: &ShapingConfig,
    ) -> std::result::Result<(), String> {
        let known = || {
            components
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (key, name) in [("primary", &self.primary), ("auxiliary", &self.auxiliary)] {
            if !components.iter().any(|c| &c.name == name) {
                return Err(verr(format!(
                    "blend.{key}: `{name}` is not a component (known: {})",
                    known()
                )));
            }
        }
        if self.primary == self.auxiliary {
            return Err(verr(format!(
                "blend.auxiliary: expected a component other than the primary, found `{}` for both",
                self.primary
            )));
        }
        if let Some((i, c)) = components
            .iter()
            .enumerate()
            .find(|(_, c)| c.name != self.primary && c.name != self.auxiliary && c.weight() != 0.0)
        {
            return Err(verr(format!(
                "components[{i}] (`{}`).weight: with blend the training reward is φ_p·{} + \
                 φ_a·{} alone, so every other component needs weight 0 (logged only), found {}",
                c.name,
                self.primary,
                self.auxiliary,
                c.weight()
            )));
        }
        if !is_no_shaping(shaping) {
            return Err(verr(format!(
                "shaping: blend needs the reward linear in the weights (its gradient is exact \
                 only then); shape the components themselves, found pipeline shaping {shaping:?}"
            )));
        }
        if let Some(b) = self.outer_lr.filter(|b| !(b.is_finite() && *b >= 0.0)) {
            return Err(verr(format!(
                "blend.outer_lr: expected a finite number >= 0, found {b}"
            )));
        }
        if let Some(a) = self.inner_lr.filter(|a| !(a.is_finite() && *a > 0.0)) {
            return Err(verr(format!(
                "blend.inner_lr: expected a finite number > 0, found {a}"
            )));
        }
        if self.heldout_groups == 0 {
            return Err(verr("blend.heldout_groups: expected >= 1, found 0"));
        }
        Ok(())
    }
}

impl PipelineConfig {
    /// The folders of the `reward-model` components, in order (checked before a run starts).
    pub fn model_folders(&self) -> Vec<String> {
        self.components
            .iter()
            .filter_map(|c| match &c.kind {
                ComponentKind::RewardModel { path, .. } => Some(path.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn new(components: Vec<ComponentConfig>) -> Self {
        PipelineConfig {
            components,
            shaping: ShapingConfig::None,
            reference_samples: DEFAULT_REFERENCE_SAMPLES,
            reference_cache_size: DEFAULT_REFERENCE_CACHE_SIZE,
            blend: None,
        }
    }

    /// Checks everything that does not need the registry or the file system; messages start
    /// with the field's path inside `[reward.pipeline]`.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.components.is_empty() {
            return Err(verr(
                "components: expected at least one component, found none",
            ));
        }
        let mut seen = BTreeMap::new();
        for (i, c) in self.components.iter().enumerate() {
            let at = format!("components[{i}] (`{}`)", c.name);
            if c.name.is_empty()
                || !c
                    .name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
            {
                return Err(verr(format!(
                    "components[{i}].name: expected letters, digits, `_` or `-`, found {:?}",
                    c.name
                )));
            }
            if let Some(j) = seen.insert(c.name.as_str(), i) {
                return Err(verr(format!("{at}: name already used by components[{j}]")));
            }
            if !c.weight().is_finite() {
                return Err(verr(format!(
                    "{at}.weight: expected a finite number, found {}",
                    c.weight()
                )));
            }
            c.shaping
                .validate()
                .map_err(|e| format!("{at}.shaping: {e}"))?;
            match &c.kind {
                ComponentKind::LengthPenalty { coef, .. }
                    if !(coef.is_finite() && *coef >= 0.0) =>
                {
                    return Err(verr(format!(
                        "{at}.coef: expected a finite number >= 0, found {coef}"
                    )))
                }
                ComponentKind::External(e) => e.validate().map_err(|m| format!("{at}: {m}"))?,
                ComponentKind::RewardModel { batch_size: 0, .. } => {
                    return Err(verr(format!("{at}.batch_size: expected >= 1, found 0")))
                }
                ComponentKind::RewardModel {
                    truncated_score: Some(v),
                    ..
                } if !v.is_finite() => {
                    return Err(verr(format!(
                        "{at}.truncated_score: expected a finite number, found {v}"
                    )))
                }
                ComponentKind::Turns {
                    gate: Some(gate), ..
                } => gate.validate().map_err(|m| format!("{at}.{m}"))?,
                ComponentKind::Milestones { credit } if !(credit.is_finite() && *credit >= 0.0) => {
                    return Err(verr(format!(
                        "{at}.credit: expected a finite number >= 0, found {credit}"
                    )))
                }
                ComponentKind::Consistency { .. }
                    if !self
                        .components
                        .iter()
                        .any(|o| matches!(o.kind, ComponentKind::Verifier { .. })) =>
                {
                    return Err(verr(format!(
                        "{at}: a consistency component needs a verifier component for its \
                             accuracy and format terms, found none"
                    )));
                }
                _ => {}
            }
        }
        for (i, c) in self.components.iter().enumerate() {
            if let ComponentKind::Gated { channels } = &c.kind {
                if channels.is_empty() {
                    return Err(verr(format!(
                        "components[{i}] (`{}`).channels: expected at least one channel",
                        c.name
                    )));
                }
                for ch in channels {
                    match seen.get(ch.component.as_str()) {
                        None => {
                            return Err(verr(format!(
                            "components[{i}] (`{}`): channel `{}` is not a component (known: {})",
                            c.name,
                            ch.component,
                            seen.keys().copied().collect::<Vec<_>>().join(", ")
                        )))
                        }
                        Some(&j)
                            if matches!(self.components[j].kind, ComponentKind::Gated { .. }) =>
                        {
                            return Err(verr(format!(
                                "components[{i}] (`{}`): channel `{}` is itself gated; channels \
                                 must be plain components",
                                c.name, ch.component
                            )))
                        }
                        _ => {}
                    }
                    if let Some(t) = ch.threshold.filter(|t| t.is_nan()) {
                        return Err(verr(format!(
                            "components[{i}] (`{}`): channel `{}` threshold is {t}",
                            c.name, ch.component
                        )));
                    }
                }
            }
        }
        self.shaping
            .validate()
            .map_err(|e| format!("shaping: {e}"))?;
        if needs_refs(&self.shaping) {
            if let Some(c) = self.components.iter().find(|c| !is_no_shaping(&c.shaping)) {
                return Err(verr(format!(
                    "shaping {:?} compares the total with reference totals of raw component \
                     values, so components cannot be shaped themselves; component `{}` has \
                     shaping {:?}",
                    self.shaping, c.name, c.shaping
                )));
            }
        }
        let any_refs =
            needs_refs(&self.shaping) || self.components.iter().any(|c| needs_refs(&c.shaping));
        if any_refs && self.reference_samples == 0 {
            return Err(verr(
                "reference_samples: par/lsc/centered shaping needs at least 1, found 0",
            ));
        }
        if self.reference_cache_size == 0 {
            return Err(verr("reference_cache_size: expected >= 1, found 0"));
        }
        if let Some(b) = &self.blend {
            b.validate(&self.components, &self.shaping)?;
        }
        Ok(())
    }
}

/// Whether a shaping compares with reference rewards.
pub fn needs_refs(s: &ShapingConfig) -> bool {
    matches!(
        s,
        ShapingConfig::Par | ShapingConfig::Lsc { .. } | ShapingConfig::Centered
    )
}
