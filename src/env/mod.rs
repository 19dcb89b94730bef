//! Environments: multi-turn episodes in which the policy talks with something that answers
//! back (docs/environments.md).
//!
//! An [`Environment`] is reset with a seed (and, with `env.data`, a dataset row) to its first
//! messages (and the tools the model may call), then stepped on each model message to new `user`/`tool` messages, a per-turn
//! reward, whether the episode is done, and free-form info. [`episode`] rolls episodes out
//! turn by turn on a kept KV cache and marks which response tokens the model wrote (the
//! only ones trained); [`builtin`] holds the built-in environments, [`program`] runs user
//! programs speaking JSON lines, [`tools`] parses and answers tool calls.
pub mod builtin;
pub mod countdown_eva;
pub mod episode;
pub mod program;
pub mod rational;
pub mod runner;
pub mod tools;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
pub use crate::model::chat::Message;

/// What a reset gives the model: its first messages and the tool schemas (OpenAI style,
/// passed to the chat template's `tools`), and what it keeps from the model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reset {
    pub messages: Vec<Message>,
    pub tools: Vec<Value>,
    /// The episode's hidden state as text (guess's secret, calculator's result): never shown
    /// to the policy, read by an asymmetric critic (`critic.privileged = "hidden"`). None: the
    /// environment exposes none.
    pub hidden: Option<String>,
}

/// The environment's answer to one model message.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    /// New `user` or `tool` messages (empty when done).
    pub messages: Vec<Message>,
    pub reward: f64,
    pub done: bool,
    /// Anything worth logging; `{"success": bool}` marks a solved episode, `{"error": ...}`
    /// an episode ended by a failure.
    pub info: Value,
}

impl StepResult {
    /// An episode ended by a failure (reward 0), with the reason in `info.error`.
    pub fn failed(message: impl Into<String>) -> Self {
        StepResult {
            messages: vec![],
            reward: 0.0,
            done: true,
            info: serde_json::json!({"error": message.into()}),
        }
    }
}

/// A multi-turn environment. One instance plays one episode at a time.
pub trait Environment: Send {
    /// Starts an episode; the same seed gives the same episode.
    fn reset(&mut self, seed: u64) -> Result<Reset>;
    /// Starts an episode from a dataset row (`env.data`): the row's fields decide the
    /// episode, the seed anything left to chance. Environments that do not read rows refuse
    /// (config validation keeps `env.data` to those that do).
    fn reset_row(&mut self, seed: u64, row: &Value) -> Result<Reset> {
        let _ = (seed, row);
        Err(Error::config(
            "env.data",
            "this environment draws its episodes from the seed and does not read dataset rows",
        ))
    }
    /// Answers the model's message (its text, EOS removed) before `deadline`. Failures the
    /// episode can absorb are a [`StepResult::failed`] or an error observation; `Err` stops
    /// the run (an environment program that keeps failing).
    fn step(&mut self, message: &str, deadline: Instant) -> Result<StepResult>;
    /// Ends the episode (frees a program's state).
    fn close(&mut self) {}
    /// The model's messages of a reference play of the episode just reset, for a supervised
    /// warm-up (docs/environments.md#warm-up); None when the environment has none.
    fn demonstration(&self) -> Option<Vec<String>> {
        None
    }
}

/// Which environment, by name (`[env] kind`); unknown names list these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnvKind {
    /// Multi-turn number guessing: the environment answers "higher" or "lower".
    #[default]
    Guess,
    /// Reach a target from given numbers with + − × ÷, each used at most once.
    Countdown,
    /// Large-number arithmetic that needs the calculator tool.
    CalculatorArithmetic,
    /// A timed bandit: arms take different simulated times; the slow arm pays more.
    Bandit,
    /// A user program speaking the JSON-lines protocol (`env.program`).
    Program,
}

impl EnvKind {
    /// Whether the environment writes reference plays ([`Environment::demonstration`]) that
    /// a supervised warm-up can imitate.
    pub fn demonstrates(self) -> bool {
        matches!(self, EnvKind::CalculatorArithmetic | EnvKind::Countdown)
    }

    /// Whether the model is offered tools (the built-in model then also needs `{`, `}`
    /// and `"` to write a call).
    pub fn offers_tools(self) -> bool {
        matches!(self, EnvKind::CalculatorArithmetic)
    }
}

/// How `countdown` asks its puzzle (`env.countdown_prompt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CountdownPrompt {
    /// The whole instruction: numbers, target, operators and the rules.
    #[default]
    Full,
    /// `make <target> from <numbers>`.
    Short,
}

/// The `[env]` section: an environment replaces the `[task]` of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnvConfig {
    /// Which environment: a built-in one or `program` (a user program speaking JSON lines).
    pub kind: EnvKind,
    /// Model turns per episode at most.
    pub max_turns: usize,
    /// Tokens per episode at most (prompt, model turns and environment messages).
    pub max_tokens: usize,
    /// Seconds an environment step (tool calls included) may take; a slower step ends the
    /// episode with an error in its info.
    pub step_timeout_s: f64,
    /// Discount γ over turns: the return is Σ_t γ^t r_t (turn t from 0), and the reward
    /// pipeline's `turns` components see γ^t r_t.
    pub discount: f64,
    /// Held-out episodes (seeds 0..n of the held-out stream).
    pub heldout_size: usize,
    /// `guess`: the secret is drawn from 1..=guess_max.
    pub guess_max: u64,
    /// `guess`: reward of a turn whose guess is a number in 1..=guess_max but not the secret
    /// (a per-turn format reward; 0: only finding the secret pays).
    pub guess_valid_reward: f64,
    /// `calculator-arithmetic`: digits of each operand.
    pub digits: u32,
    /// `countdown`: numbers given per puzzle (2..=6).
    pub countdown_numbers: usize,
    /// `countdown`: the numbers are drawn from 1..=10, 25, 50, 75, 100 up to this one (>= 4).
    pub countdown_max_number: i64,
    /// `countdown`: the target is drawn from 10..=countdown_max_target (>= 10).
    pub countdown_max_target: i64,
    /// `countdown`: how the puzzle is asked: `full` (the whole instruction: numbers, target,
    /// operators and rules) or `short` ("make 13 from 3 7 2", a few tokens for small models).
    pub countdown_prompt: CountdownPrompt,
    /// `calculator-arithmetic`: the question's wording, `{question}` standing for the
    /// expression (`523 * 871`); unset: "what is {question}? call the calculator tool, then
    /// reply with the number only." A terse one ("{question}=? use the calculator") puts the
    /// operands closer to where a small model must copy them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calculator_prompt: Option<String>,
    /// `bandit`: simulated seconds each arm's pull takes, arm 1 first (at least two arms;
    /// each > 0). The prompt names them.
    pub bandit_arm_durations_s: Vec<f64>,
    /// `bandit`: mean payout of each arm, in the order of `bandit_arm_durations_s` (one per
    /// arm); a pull pays mean × (0.5 + u), u uniform in [0, 1) from the episode's seed.
    pub bandit_arm_payoffs: Vec<f64>,
    /// `bandit`: simulated seconds per episode: pulls go on until they are spent (> 0).
    pub bandit_budget_s: f64,
    /// `program`: the program and its arguments.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub program: Vec<String>,
    /// Environment steps (and resets) run concurrently, on this many threads; `program`:
    /// also the processes started (episodes are spread over them).
    pub pool: usize,
    /// `program`: failures in a row (crash, hang, garbage) after which the run stops.
    pub max_consecutive_failures: usize,
    /// `program`: a dataset file (JSONL, JSON array, CSV or Parquet, by extension) whose rows
    /// start the training episodes: each group draws a row, sent as `row` with the reset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// With `env.data`: the file whose rows start the held-out episodes (the first
    /// `heldout_size` rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heldout_data: Option<String>,
    /// User commands offered to the model as tools (`calculator-arithmetic` adds the
    /// calculator).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<tools::CommandToolConfig>,
}

impl Default for EnvConfig {
    fn default() -> Self {
        EnvConfig {
            kind: EnvKind::Guess,
            max_turns: 6,
            max_tokens: 256,
            step_timeout_s: 10.0,
            discount: 1.0,
            heldout_size: 64,
            guess_max: 16,
            guess_valid_reward: 0.0,
            digits: 9,
            countdown_numbers: 4,
            countdown_max_number: 100,
            countdown_max_target: 999,
            countdown_prompt: CountdownPrompt::Full,
            calculator_prompt: None,
            bandit_arm_durations_s: builtin::BANDIT_ARM_DURATIONS_S.to_vec(),
            bandit_arm_payoffs: builtin::BANDIT_ARM_PAYOFFS.to_vec(),
            bandit_budget_s: builtin::BANDIT_BUDGET_S,
            program: vec![],
            pool: 4,
            max_consecutive_failures: 5,
            data: None,
            heldout_data: None,
            tools: vec![],
        }
    }
}

impl EnvConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("max_turns", self.max_turns),
            ("max_tokens", self.max_tokens),
            ("heldout_size", self.heldout_size),
            ("pool", self.pool),
            ("max_consecutive_failures", self.max_consecutive_failures),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("env.{name} must be positive, found 0"));
        }
        if !(self.step_timeout_s.is_finite() && self.step_timeout_s > 0.0) {
            return Err(format!(
                "env.step_timeout_s must be a finite number > 0, found {}",
                self.step_timeout_s
            ));
        }
        if !(0.0..=1.0).contains(&self.discount) {
            return Err(format!(
                "env.discount must be in [0, 1], found {}",
                self.discount
            ));
        }
        if !self.guess_valid_reward.is_finite() {
            return Err(format!(
                "env.guess_valid_reward must be a finite number, found {}",
                self.guess_valid_reward
            ));
        }
        match (&self.data, &self.heldout_data) {
            (Some(_), _) if self.kind != EnvKind::Program => {
                return Err(
                    "env.data applies to env.kind = \"program\" (its reset receives the row); \
                     built-in environments draw their episodes from the seed"
                        .into(),
                )
            }
            (Some(_), None) => {
                return Err(
                    "env.data needs env.heldout_data: the rows of the held-out episodes".into(),
                )
            }
            (None, Some(_)) => return Err("env.heldout_data applies with env.data only".into()),
            _ => {}
        }
        if self.guess_max < 2 {
            return Err(format!(
                "env.guess_max must be >= 2, found {}",
                self.guess_max
            ));
        }
        if !(1..=18).contains(&self.digits) {
            return Err(format!(
                "env.digits must be in 1..=18, found {}",
                self.digits
            ));
        }
        if !(2..=6).contains(&self.countdown_numbers) {
            return Err(format!(
                "env.countdown_numbers must be in 2..=6, found {}",
                self.countdown_numbers
            ));
        }
        if self.countdown_max_number < 4 {
            return Err(format!(
                "env.countdown_max_number must be >= 4 (smaller numbers cannot make a target of \
                 10 or more reliably), found {}",
                self.countdown_max_number
            ));
        }
        if self.countdown_max_target < 10 {
            return Err(format!(
                "env.countdown_max_target must be >= 10 (targets are drawn from 10 up), found {}",
                self.countdown_max_target
            ));
        }
        if let Some(p) = &self.calculator_prompt {
            if self.kind != EnvKind::CalculatorArithmetic {
                return Err(
                    "env.calculator_prompt applies to env.kind = \"calculator-arithmetic\" only"
                        .into(),
                );
            }
            if !p.contains(builtin::QUESTION) {
                return Err(format!(
                    "env.calculator_prompt must contain {} (where the expression goes), found {p:?}",
                    builtin::QUESTION
                ));
            }
        }
        self.validate_bandit()?;
        match (self.kind, self.program.first()) {
            (EnvKind::Program, None) => {
                return Err(
                    "env.kind = \"program\" needs env.program = [\"program\", \"args\"...]".into(),
                )
            }
            (EnvKind::Program, Some(p)) if p.is_empty() => {
                return Err("env.program: the program name is empty".into())
            }
            (k, Some(_)) if k != EnvKind::Program => {
                return Err("env.program applies to env.kind = \"program\" only".into())
            }
            _ => {}
        }
        if !self.tools.is_empty() && self.kind != EnvKind::CalculatorArithmetic {
            return Err(
                "env.tools applies to env.kind = \"calculator-arithmetic\" (a program answers its own tool calls)"
                    .into(),
            );
        }
        for (i, t) in self.tools.iter().enumerate() {
            if t.name.is_empty() || t.command.first().is_none_or(|p| p.is_empty()) {
                return Err(format!(
                    "env.tools[{i}]: needs a name and command = [\"program\", \"args\"...]"
                ));
            }
        }
        Ok(())
    }

    /// The `bandit_*` keys: one duration and one payoff per arm, at least two arms, durations
    /// and budget finite and positive; set only with `kind = "bandit"`.
    fn validate_bandit(&self) -> std::result::Result<(), String> {
        let default = EnvConfig::default();
        let changed = self.bandit_arm_durations_s != default.bandit_arm_durations_s
            || self.bandit_arm_payoffs != default.bandit_arm_payoffs
            || self.bandit_budget_s != default.bandit_budget_s;
        if self.kind != EnvKind::Bandit {
            if changed {
                return Err("env.bandit_arm_durations_s, env.bandit_arm_payoffs and \
                            env.bandit_budget_s apply to env.kind = \"bandit\" only"
                    .into());
            }
            return Ok(());
        }
        let (durations, payoffs) = (&self.bandit_arm_durations_s, &self.bandit_arm_payoffs);
        if durations.len() < 2 {
            return Err(format!(
                "env.bandit_arm_durations_s must list at least two arms, found {}",
                durations.len()
            ));
        }
        if payoffs.len() != durations.len() {
            return Err(format!(
                "env.bandit_arm_payoffs must have one entry per arm: env.bandit_arm_durations_s \
                 lists {} arms, env.bandit_arm_payoffs has {}",
                durations.len(),
                payoffs.len()
            ));
        }
        if let Some((i, d)) = durations
            .iter()
            .enumerate()
            .find(|(_, d)| !(d.is_finite() && **d > 0.0))
        {
            return Err(format!(
                "env.bandit_arm_durations_s[{i}] (arm {}) must be a finite number > 0, found {d}",
                i + 1
            ));
        }
        if let Some((i, m)) = payoffs.iter().enumerate().find(|(_, m)| !m.is_finite()) {
            return Err(format!(
                "env.bandit_arm_payoffs[{i}] (arm {}) must be a finite number, found {m}",
                i + 1
            ));
        }
        if !(self.bandit_budget_s.is_finite() && self.bandit_budget_s > 0.0) {
            return Err(format!(
                "env.bandit_budget_s must be a finite number > 0, found {}",
                self.bandit_budget_s
            ));
        }
        Ok(())
    }

    /// Every external program the environment starts, for the plan and `--resume` checks.
    pub fn external_programs(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.kind == EnvKind::Program {
            out.push(format!("env.program: {}", self.program.join(" ")));
        }
        for t in &self.tools {
            out.push(format!("env.tools `{}`: {}", t.name, t.command.join(" ")));
        }
        out
    }
}

/// A dataset row that starts an episode: its fields and where it is (`file: line 3`).
#[derive(Debug, Clone, PartialEq)]
pub struct DataRow {
    pub at: String,
    pub fields: Value,
}

/// How an episode starts: its seed and, with `env.data`, the row handed to `reset`.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    pub seed: u64,
    pub row: Option<Arc<DataRow>>,
}

impl Start {
    pub fn seed(seed: u64) -> Self {
        Start { seed, row: None }
    }

    /// How samples and experiences name the episode: `seed N` (and the row's place).
    pub fn describe(&self) -> String {
        match &self.row {
            Some(r) => format!("seed {}, {}", self.seed, r.at),
            None => format!("seed {}", self.seed),
        }
    }
}

/// Every row of a dataset file (errors name the file and the row).
pub fn read_data_rows(path: &str) -> Result<Vec<Arc<DataRow>>> {
    let rows = crate::task::rows::read_rows(Path::new(path))
        .map_err(|e| Error::config("env.data", e.to_string()))?;
    rows.into_iter()
        .map(|r| match r.value {
            fields @ Value::Object(_) => Ok(Arc::new(DataRow {
                at: r.at.to_string(),
                fields,
            })),
            other => Err(Error::config(
                "env.data",
                format!(
                    "{}: expected an object of fields, found {}",
                    r.at,
                    crate::task::rows::json_type_name(&other)
                ),
            )),
        })
        .collect()
}

/// Makes one environment instance per episode.
pub struct Factory {
    cfg: EnvConfig,
    pool: Option<Arc<program::Pool>>,
    /// `env.data` and `env.heldout_data` rows (empty without them).
    rows: Vec<Arc<DataRow>>,
    heldout_rows: Vec<Arc<DataRow>>,
    /// Makes the instances instead of `kind` ([`Factory::with_maker`]).
    maker: Option<Maker>,
}

/// Makes the environment instance of an episode, by episode number.
pub type Maker = Arc<dyn Fn(u64) -> Box<dyn Environment> + Send + Sync>;

impl Factory {
    /// Reads `env.data` / `env.heldout_data` when set; a file with no rows is an error here,
    /// before any episode.
    pub fn new(cfg: &EnvConfig) -> Result<Self> {
        cfg.validate().map_err(|m| Error::config("env", m))?;
        let pool = match cfg.kind {
            EnvKind::Program => Some(Arc::new(program::Pool::new(cfg))),
            _ => None,
        };
        let read = |p: &Option<String>| p.as_deref().map_or(Ok(vec![]), read_data_rows);
        Ok(Factory {
            cfg: cfg.clone(),
            pool,
            rows: read(&cfg.data)?,
            heldout_rows: read(&cfg.heldout_data)?,
            maker: None,
        })
    }

    /// Episodes played by environments written in Rust outside the built-ins (tests use it
    /// for instrumented environments): `maker` makes each instance; `cfg` still sets the
    /// limits (`max_turns`, `max_tokens`, `pool`, ...).
    pub fn with_maker(cfg: &EnvConfig, maker: Maker) -> Result<Self> {
        Ok(Factory {
            maker: Some(maker),
            ..Factory::new(cfg)?
        })
    }

    pub fn config(&self) -> &EnvConfig {
        &self.cfg
    }

    /// Training rows (empty: episodes start from seeds alone).
    pub fn rows(&self) -> &[Arc<DataRow>] {
        &self.rows
    }

    pub fn heldout_rows(&self) -> &[Arc<DataRow>] {
        &self.heldout_rows
    }

    /// A fresh instance for episode number `episode` (spreads program episodes over the pool).
    pub fn make(&self, episode: u64) -> Box<dyn Environment> {
        if let Some(maker) = &self.maker {
            return maker(episode);
        }
        let user_tools = || -> Vec<Box<dyn tools::Tool>> {
            self.cfg
                .tools
                .iter()
                .map(|t| Box::new(tools::CommandTool::new(t.clone())) as Box<dyn tools::Tool>)
                .collect()
        };
        match (self.cfg.kind, &self.pool) {
            (EnvKind::Program, Some(pool)) => {
                Box::new(program::ProgramEnv::new(Arc::clone(pool), episode))
            }
            (kind, _) => builtin::make(kind, &self.cfg, user_tools()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_its_problems() {
        assert_eq!(EnvConfig::default().validate(), Ok(()));
        let bad = EnvConfig {
            max_turns: 0,
            ..Default::default()
        };
        assert_eq!(
            bad.validate().unwrap_err(),
            "env.max_turns must be positive, found 0"
        );
        let prog = EnvConfig {
            kind: EnvKind::Program,
            ..Default::default()
        };
        assert!(prog.validate().unwrap_err().contains("needs env.program"));
        let e = toml::from_str::<EnvConfig>("kind = \"chess\"")
            .unwrap_err()
            .to_string();
        for known in [
            "guess",
            "countdown",
            "calculator-arithmetic",
            "bandit",
            "program",
        ] {
            assert!(e.contains(known), "{e}");
        }
        let wording = |kind, prompt: &str| EnvConfig {
            kind,
            calculator_prompt: Some(prompt.into()),
            ..Default::default()
        };
        assert_eq!(
            wording(EnvKind::CalculatorArithmetic, "{question}=?").validate(),
            Ok(())
        );
        assert_eq!(
            wording(EnvKind::CalculatorArithmetic, "what is it?")
                .validate()
                .unwrap_err(),
            "env.calculator_prompt must contain {question} (where the expression goes), found \"what is it?\""
        );
        assert!(wording(EnvKind::Guess, "{question}")
            .validate()
            .unwrap_err()
            .contains("applies to env.kind = \"calculator-arithmetic\" only"));
        let bandit = |durations: Vec<f64>, payoffs: Vec<f64>, budget: f64| EnvConfig {
            kind: EnvKind::Bandit,
            bandit_arm_durations_s: durations,
            bandit_arm_payoffs: payoffs,
            bandit_budget_s: budget,
            ..Default::default()
        };
        assert_eq!(
            bandit(vec![1.0, 3.0], vec![1.0, 2.0], 10.0).validate(),
            Ok(())
        );
        for (cfg, message) in [
            (
                bandit(vec![1.0], vec![1.0], 10.0),
                "env.bandit_arm_durations_s must list at least two arms, found 1",
            ),
            (
                bandit(vec![1.0, 3.0], vec![1.0], 10.0),
                "env.bandit_arm_payoffs must have one entry per arm: env.bandit_arm_durations_s \
                 lists 2 arms, env.bandit_arm_payoffs has 1",
            ),
            (
                bandit(vec![1.0, 0.0], vec![1.0, 2.0], 10.0),
                "env.bandit_arm_durations_s[1] (arm 2) must be a finite number > 0, found 0",
            ),
            (
                bandit(vec![1.0, 2.0], vec![f64::NAN, 2.0], 10.0),
                "env.bandit_arm_payoffs[0] (arm 1) must be a finite number, found NaN",
            ),
            (
                bandit(vec![1.0, 2.0], vec![1.0, 2.0], -1.0),
                "env.bandit_budget_s must be a finite number > 0, found -1",
            ),
            (
                EnvConfig {
                    bandit_budget_s: 5.0,
                    ..Default::default()
                },
                "env.bandit_arm_durations_s, env.bandit_arm_payoffs and env.bandit_budget_s \
                 apply to env.kind = \"bandit\" only",
            ),
        ] {
            assert_eq!(cfg.validate().unwrap_err(), message);
        }
        let p: EnvConfig =
            toml::from_str("kind = \"program\"\nprogram = [\"python3\", \"g.py\"]").unwrap();
        assert_eq!(p.external_programs(), vec!["env.program: python3 g.py"]);
    }
}
