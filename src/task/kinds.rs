//! Pluggable training tasks: the `[task]` config section and the [`Task`] trait that
//! `grove train` samples prompts from, evaluates on and rewards with.
//!
//! - `kind = "arithmetic"` (default): the built-in generator ([`ArithmeticTask`]), judged by
//!   exact match followed by EOS.
//! - `kind = "dataset"`: the user's own file (JSONL, JSON array, CSV, Parquet), fields mapped
//!   by name, scored by the reward named in `reward` ([`crate::task::dataset`],
//!   docs/tasks.md).
//! - `kind = "gsm8k"` / `"math500"`: presets of the dataset path: the JSONL files of
//!   `task::datasets`, their prompt templates (base, or the model's chat template), the math
//!   verifier. Training prompts are drawn uniformly from `train_data`; the held-out set is the
//!   first `heldout_size` rows of `eval_data`; when both are the same file (MATH-500 has only a
//!   test split) those rows are left out of training.
use std::path::PathBuf;

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Tokenizer;
use crate::reward::exact::exact_answer;
use crate::reward::external::ExternalConfig;
use crate::reward::Verdict;
use crate::task::arithmetic::{ArithmeticConfig, ArithmeticTask, Problem};
use crate::task::dataset::DatasetTask;
use crate::task::datasets::{DatasetKind, PromptStyle};
use crate::task::scorers::RewardKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    #[default]
    Arithmetic,
    Gsm8k,
    Math500,
    Dataset,
}

impl TaskKind {
    pub fn is_arithmetic(&self) -> bool {
        *self == TaskKind::Arithmetic
    }
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Arithmetic => "arithmetic",
            TaskKind::Gsm8k => "gsm8k",
            TaskKind::Math500 => "math500",
            TaskKind::Dataset => "dataset",
        }
    }
    /// The preset dataset of `gsm8k` / `math500`.
    pub fn dataset(self) -> Option<DatasetKind> {
        match self {
            TaskKind::Gsm8k => Some(DatasetKind::Gsm8k),
            TaskKind::Math500 => Some(DatasetKind::Math500),
            TaskKind::Arithmetic | TaskKind::Dataset => None,
        }
    }
}

/// The `[task]` section. Optional fields are left out of a saved config when unset, so the
/// built-in task's `config.toml` is unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    /// The task: arithmetic (built in, the default), gsm8k or math500 (datasets; they need a
    /// pretrained model.source).
    #[serde(skip_serializing_if = "TaskKind::is_arithmetic")]
    pub kind: TaskKind,
    /// Arithmetic: digits of each operand (2: operands 10..=99).
    pub digits: u32,
    /// Arithmetic: operators to draw from: any of "+", "-", "*".
    pub ops: Vec<String>,
    /// Size of the fixed held-out split (datasets: the first rows of `eval_data`).
    pub heldout_size: usize,
    /// Presets: training rows (default `../shared/data/gsm8k/train.jsonl`; MATH-500:
    /// `../shared/data/math500/test.jsonl`, without its held-out rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_data: Option<String>,
    /// Presets: held-out rows (default `../shared/data/<kind>/test.jsonl`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_data: Option<String>,
    /// Datasets and presets: "base" or "chat" prompts (default: chat when the model has a
    /// chat template).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_style: Option<String>,
    // kind = "dataset" (docs/tasks.md); `reward` and its options are read by the presets too.
    /// Training rows: a .jsonl, .ndjson, .json (array), .csv or .parquet file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Held-out rows in a second file (the first `heldout_size` of them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_path: Option<String>,
    /// Or: this fraction of `path`'s rows held out (default 0.1 when no `eval_path`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_fraction: Option<f64>,
    /// Seed of the fraction split (default: the run seed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split_seed: Option<u64>,
    /// Dotted path of the prompt: text, or a list of {role, content} messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_field: Option<String>,
    /// Dotted path of the reference answer (a string or a number).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer_field: Option<String>,
    /// Dotted path of a system message (chat prompts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_field: Option<String>,
    /// Dotted path of a unique row id (the fraction split then follows ids, not positions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_field: Option<String>,
    /// minijinja template of a text prompt, the row's fields in scope.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_template: Option<String>,
    /// The reward by name (`task::scorers::REWARDS`; presets: "math").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward: Option<String>,
    /// With `reward = "pipeline"`: the correctness check (default "exact").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// `numeric`: absolute tolerance (default 1e-6).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
    /// `numeric`: relative tolerance (default 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rel_tolerance: Option<f64>,
    /// `regex`: the pattern whose first capture group is the answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer_regex: Option<String>,
    /// `external`: the reward command ([task.external]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalConfig>,
}

impl Default for TaskConfig {
    fn default() -> Self {
        let a = ArithmeticConfig::default();
        TaskConfig {
            kind: TaskKind::Arithmetic,
            digits: a.digits,
            ops: a.ops,
            heldout_size: a.heldout_size,
            train_data: None,
            eval_data: None,
            prompt_style: None,
            path: None,
            eval_path: None,
            eval_fraction: None,
            split_seed: None,
            prompt_field: None,
            answer_field: None,
            system_field: None,
            id_field: None,
            prompt_template: None,
            reward: None,
            check: None,
            tolerance: None,
            rel_tolerance: None,
            answer_regex: None,
            external: None,
        }
    }
}

impl TaskConfig {
    /// The arithmetic generator's settings.
    pub fn arithmetic(&self) -> ArithmeticConfig {
        ArithmeticConfig {
            digits: self.digits,
            ops: self.ops.clone(),
            heldout_size: self.heldout_size,
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        match self.kind {
            TaskKind::Arithmetic => {
                crate::task::dataset::refuse_fields_of_other_kinds(self)?;
                self.arithmetic().validate()
            }
            TaskKind::Gsm8k | TaskKind::Math500 | TaskKind::Dataset => {
                if self.heldout_size == 0 {
                    return Err("task.heldout_size must be positive".into());
                }
                self.style()?;
                crate::task::dataset::validate(self)
            }
        }
    }

    /// `prompt_style` parsed; None = automatic.
    pub fn style(&self) -> std::result::Result<Option<PromptStyle>, String> {
        match self.prompt_style.as_deref() {
            None => Ok(None),
            Some("base") => Ok(Some(PromptStyle::Base)),
            Some("chat") => Ok(Some(PromptStyle::Chat)),
            Some(other) => Err(format!(
                "task.prompt_style: expected \"base\" or \"chat\", found {other:?}"
            )),
        }
    }

    /// The reward that trains (presets: "math"; the built-in task has none to choose).
    pub fn reward_kind(&self) -> std::result::Result<Option<RewardKind>, String> {
        match (self.kind, self.reward.as_deref()) {
            (_, Some(name)) => RewardKind::parse(name)
                .map(Some)
                .map_err(|m| format!("task.reward: {m}")),
            (TaskKind::Gsm8k | TaskKind::Math500, None) => Ok(Some(RewardKind::Math)),
            (TaskKind::Dataset, None) => Err(format!(
                "task.reward: kind = \"dataset\" needs a reward by name; known: {}",
                crate::task::scorers::known_rewards()
            )),
            (TaskKind::Arithmetic, None) => Ok(None),
        }
    }

    /// The check that judges correctness: the reward itself, or `check` under "pipeline".
    pub fn check_kind(&self) -> std::result::Result<Option<RewardKind>, String> {
        match self.reward_kind()? {
            Some(RewardKind::Pipeline) => match self.check.as_deref() {
                None => Ok(Some(RewardKind::Exact)),
                Some(name) => match RewardKind::parse(name) {
                    Ok(RewardKind::Pipeline) | Err(_) => Err(format!(
                        "task.check: expected a correctness check, one of math, exact, choice, \
                         numeric, regex, external; found {name:?}"
                    )),
                    Ok(k) => Ok(Some(k)),
                },
            },
            other => Ok(other),
        }
    }

    /// The reward command the task starts, if its check is `external`.
    pub fn external_command(&self) -> Option<&ExternalConfig> {
        match self.check_kind() {
            Ok(Some(RewardKind::External)) => self.external.as_ref(),
            _ => None,
        }
    }

    /// (training file, held-out file) of a preset.
    pub fn data_paths(&self, kind: DatasetKind) -> (PathBuf, PathBuf) {
        let dir = match kind {
            DatasetKind::Gsm8k => "../shared/data/gsm8k",
            DatasetKind::Math500 => "../shared/data/math500",
        };
        let eval = self
            .eval_data
            .clone()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(format!("{dir}/test.jsonl")));
        let train = match (&self.train_data, kind) {
            (Some(t), _) => PathBuf::from(t),
            (None, DatasetKind::Gsm8k) => PathBuf::from(format!("{dir}/train.jsonl")),
            (None, DatasetKind::Math500) => eval.clone(),
        };
        (train, eval)
    }
}

/// What a training run needs from a task.
pub trait Task: Send + Sync {
    /// A training problem (prompt text as fed to the tokenizer, and its reference answer).
    fn sample_train(&self, rng: &mut ChaCha8Rng) -> Problem;
    /// The fixed held-out problems, in order.
    fn heldout(&self) -> &[Problem];
    /// Scores a decoded response (EOS removed); `finished`: it ended with EOS.
    fn verify(&self, response: &str, finished: bool, reference: &str) -> Verdict;
    /// [`Task::verify`] for a response to `prompt`, where scoring may need the prompt or may
    /// fail (an external reward command): what training and evaluation call.
    fn score(
        &self,
        _prompt: &str,
        response: &str,
        finished: bool,
        reference: &str,
    ) -> Result<Verdict> {
        Ok(self.verify(response, finished, reference))
    }
    /// Whether prompts get the tokenizer's BOS prepended (chat templates write their own).
    fn prompt_bos(&self) -> bool {
        true
    }
    /// The reference solution of the training problem with this prompt, rendered as a
    /// response (TempSamp ground-truth injection). Tasks without worked solutions, and prompts
    /// the task does not know, get the reference answer itself.
    fn reference_response(&self, _prompt: &str, answer: &str) -> String {
        answer.to_string()
    }
    /// The question of a training prompt as the user wrote it, before any chat template
    /// (text datasets: what eva's generator is asked to vary); None: the task has no such text.
    fn question(&self, _prompt: &str) -> Option<String> {
        None
    }
    /// The training prompt of a new `question` written after `parent` (whose question is
    /// `parent_question`): the same system message and template, no reference answer. None:
    /// the task cannot make one (the parent's prompt does not contain its question).
    fn text_variant(
        &self,
        _parent: &Problem,
        _parent_question: &str,
        _question: &str,
    ) -> Option<Problem> {
        None
    }
    /// What makes two problems the same for eva's pool, which holds one problem per key: the
    /// prompt, unless the task writes one problem several ways (countdown's numbers in any
    /// order).
    fn pool_key(&self, problem: &Problem) -> String {
        problem.prompt.clone()
    }
    /// eva's mutator: up to `n` new training problems evolved from `parent`, never held-out
    /// ones (`Ok(None)`: the task has none; config validation refuses eva then).
    fn evolve(
        &self,
        _parent: &Problem,
        _n: usize,
        _rng: &mut ChaCha8Rng,
    ) -> Result<Option<Vec<Problem>>> {
        Ok(None)
    }
}

impl Task for ArithmeticTask {
    fn sample_train(&self, rng: &mut ChaCha8Rng) -> Problem {
        ArithmeticTask::sample_train(self, rng)
    }
    fn heldout(&self) -> &[Problem] {
        ArithmeticTask::heldout(self)
    }
    fn verify(&self, response: &str, finished: bool, reference: &str) -> Verdict {
        exact_answer(response, finished, reference)
    }
    fn evolve(
        &self,
        parent: &Problem,
        n: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Option<Vec<Problem>>> {
        self.mutate(&parent.prompt, n, rng)
            .map(Some)
            .map_err(|e| Error::Internal(format!("eva's arithmetic mutator: {e}")))
    }
}

/// The task of a run config, prompts rendered for `tok` (the model named `model`).
pub fn build(cfg: &TaskConfig, tok: &Tokenizer, model: &str) -> Result<Box<dyn Task>> {
    match cfg.kind {
        TaskKind::Arithmetic => Ok(Box::new(
            ArithmeticTask::new(cfg.arithmetic()).map_err(|m| Error::config("task", m))?,
        )),
        TaskKind::Gsm8k | TaskKind::Math500 | TaskKind::Dataset => {
            Ok(Box::new(DatasetTask::new(cfg, tok, model)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::path::Path;

    fn data(rel: &str) -> String {
        format!("{}/../shared/data/{rel}", env!("CARGO_MANIFEST_DIR"))
    }

    /// The real GPT-2 tokenizer (its folder's config.json is GPT-2's, not a Llama's).
    fn gpt2() -> Tokenizer {
        let path = data("models/gpt2-tiny-random/tokenizer.json");
        Tokenizer::from_file(Path::new(&path), None, "<|endoftext|>", None).unwrap()
    }

    #[test]
    fn config_defaults_keep_the_builtin_toml() {
        let c = TaskConfig::default();
        assert_eq!(
            toml::to_string(&c).unwrap(),
            "digits = 2\nops = [\"+\"]\nheldout_size = 500\n"
        );
        let g: TaskConfig = toml::from_str("kind = \"gsm8k\"\nprompt_style = \"base\"").unwrap();
        assert_eq!(g.kind, TaskKind::Gsm8k);
        assert_eq!(g.style(), Ok(Some(PromptStyle::Base)));
        let bad: TaskConfig = toml::from_str("kind = \"gsm8k\"\nprompt_style = \"x\"").unwrap();
        assert!(bad.validate().unwrap_err().contains("\"x\""));
        assert!(toml::from_str::<TaskConfig>("kind = \"mmlu\"").is_err());
        let (t, e) = g.data_paths(DatasetKind::Gsm8k);
        assert!(t.ends_with("gsm8k/train.jsonl") && e.ends_with("gsm8k/test.jsonl"));
        let (t, e) = g.data_paths(DatasetKind::Math500);
        assert_eq!(t, e);
    }

    /// GSM8K from ../shared/data, the first 5 test rows held out.
    fn gsm8k_cfg() -> TaskConfig {
        TaskConfig {
            kind: TaskKind::Gsm8k,
            heldout_size: 5,
            train_data: Some(data("gsm8k/train.jsonl")),
            eval_data: Some(data("gsm8k/test.jsonl")),
            ..Default::default()
        }
    }

    #[test]
    fn gsm8k_task_renders_base_prompts_and_scores_with_the_math_verifier() {
        let cfg = gsm8k_cfg();
        let tok = gpt2();
        let task = DatasetTask::new(&cfg, &tok, "gpt2").unwrap();
        // gpt2-tiny-random has no chat template: base prompts.
        assert_eq!(task.style, PromptStyle::Base);
        assert_eq!(task.train_len(), 7473);
        let h = task.heldout();
        assert_eq!(h.len(), 5);
        assert!(h[0]
            .prompt
            .starts_with("Solve the problem. End with \"#### <answer>\".\n\nQuestion: Janet"));
        assert!(h[0].prompt.ends_with("\nAnswer:"));
        assert_eq!(h[0].answer, "18");
        // The reward is the math verifier's verdict; a base model's run-on is cut.
        assert_eq!(
            task.verify(" 16 - 3 - 4 = 9, 9 * 2 = 18\n#### 18", false, "18")
                .score,
            1.0
        );
        assert_eq!(
            task.verify(" #### 18\nQuestion: what is 5?\n#### 5", true, "18")
                .score,
            1.0
        );
        assert_eq!(task.verify(" #### 17", true, "18").score, 0.0);
        // Truncated (no EOS, no next question): the last-number fallback does not apply...
        let cut = task.verify(" 16 - 3 - 4 = 9, 9 * 2 = 18", false, "18");
        assert_eq!(cut.score, 0.0);
        assert_eq!(cut.reason, "truncated (no EOS) and no marked answer");
        // ...but it does for a finished response, and a marked answer counts either way.
        assert_eq!(task.verify(" 9 * 2 = 18", true, "18").score, 1.0);
        assert_eq!(task.verify(" so the answer is 18.", false, "18").score, 1.0);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let p = Task::sample_train(&task, &mut rng);
        assert!(p.prompt.starts_with("Solve the problem.") && !p.answer.is_empty());
        assert!(task.prompt_bos());
    }

    #[test]
    fn chat_prompts_use_the_model_template_and_same_file_splits_are_disjoint() {
        let mut tok = gpt2();
        tok.chat_template = Some(
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}\
             {% if add_generation_prompt %}<|assistant|>{% endif %}"
                .into(),
        );
        let cfg = TaskConfig {
            kind: TaskKind::Math500,
            heldout_size: 490,
            eval_data: Some(data("math500/test.jsonl")),
            ..Default::default()
        };
        let task = DatasetTask::new(&cfg, &tok, "m").unwrap();
        assert_eq!(task.style, PromptStyle::Chat);
        assert!(!task.prompt_bos());
        // 500 rows, the first 490 held out, the last 10 for training.
        assert_eq!((task.heldout().len(), task.train_len()), (490, 10));
        let h0 = &task.heldout()[0].prompt;
        assert!(h0.starts_with("<|user|>Convert the point $(0,3)$"), "{h0}");
        assert!(h0.ends_with("within \\boxed{}.\n<|assistant|>"), "{h0}");
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..50 {
            let p = Task::sample_train(&task, &mut rng);
            assert!(!task.heldout().iter().any(|h| h.prompt == p.prompt));
        }
        assert_eq!(
            task.verify("so \\boxed{\\frac{1}{2}}", true, "0.5").score,
            1.0
        );
        let all = TaskConfig {
            heldout_size: 500,
            ..cfg.clone()
        };
        let e = DatasetTask::new(&all, &tok, "m").err().unwrap().to_string();
        assert!(e.contains("no training rows"), "{e}");
        let forced = TaskConfig {
            prompt_style: Some("chat".into()),
            ..cfg
        };
        let e = DatasetTask::new(&forced, &gpt2(), "plain")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("plain has no chat template"), "{e}");
    }

    #[test]
    fn injected_reference_solutions_are_worked_solutions_that_verify() {
        let tok = gpt2();
        let gsm = gsm8k_cfg();
        let math = TaskConfig {
            kind: TaskKind::Math500,
            heldout_size: 0,
            eval_data: Some(data("math500/test.jsonl")),
            ..Default::default()
        };
        for (cfg, kind) in [(gsm, TaskKind::Gsm8k), (math, TaskKind::Math500)] {
            let task = DatasetTask::new(&cfg, &tok, "gpt2").unwrap();
            let mut failed = Vec::new();
            for p in task.train_problems() {
                let r = task.reference_response(&p.prompt, &p.answer);
                assert!(!r.contains("<<") && r.len() > p.answer.len(), "{r}");
                if task.verify(&r, true, &p.answer).score != 1.0 {
                    failed.push(p.answer.clone());
                }
            }
            // All 7473 GSM8K and 500 MATH-500 solutions verify.
            assert!(failed.is_empty(), "{kind:?}: {failed:?}");
        }
        // By hand, GSM8K train row 1 (Natalia's clips), annotations removed:
        let task = DatasetTask::new(&gsm8k_cfg(), &tok, "gpt2").unwrap();
        let natalia = &task.train_problems()[0];
        assert_eq!(
            task.reference_response(&natalia.prompt, &natalia.answer),
            "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether \
             in April and May.\n#### 72"
        );
        // An unknown prompt (and the arithmetic task) injects the reference answer.
        assert_eq!(task.reference_response("unknown prompt", "72"), "72");
    }

    #[test]
    fn missing_dataset_file_is_named() {
        let cfg = TaskConfig {
            kind: TaskKind::Gsm8k,
            eval_data: Some("/nonexistent/gsm8k-test.jsonl".into()),
            ..Default::default()
        };
        let e = build(&cfg, &gpt2(), "gpt2").err().unwrap().to_string();
        assert!(e.contains("/nonexistent/gsm8k-test.jsonl"), "{e}");
    }
}
