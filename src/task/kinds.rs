//! Pluggable training tasks: the `[task]` config section and the [`Task`] trait that
//! `grove train` samples prompts from, evaluates on and rewards with.
//!
//! - `kind = "arithmetic"` (default): the built-in generator ([`ArithmeticTask`]), judged by
//!   exact match followed by EOS.
//! - `kind = "gsm8k"` / `"math500"`: JSONL datasets (`task::datasets`), prompts rendered with
//!   the base or chat template (chat: the model's own chat template), judged by the math
//!   verifier (`reward::math`). Training prompts are drawn uniformly from `train_data`; the
//!   held-out set is the first `heldout_size` rows of `eval_data`; when both are the same file
//!   (MATH-500 has only a test split) those rows are left out of training.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{ChatTemplate, Tokenizer};
use crate::reward::exact::exact_answer;
use crate::reward::math::MathVerifier;
use crate::reward::Verdict;
use crate::task::arithmetic::{ArithmeticConfig, ArithmeticTask, Problem};
use crate::task::datasets::{self, DatasetKind, MathProblem, PromptStyle};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    #[default]
    Arithmetic,
    Gsm8k,
    Math500,
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
        }
    }
    pub fn dataset(self) -> Option<DatasetKind> {
        match self {
            TaskKind::Arithmetic => None,
            TaskKind::Gsm8k => Some(DatasetKind::Gsm8k),
            TaskKind::Math500 => Some(DatasetKind::Math500),
        }
    }
}

/// The `[task]` section. Fields of other kinds are ignored; the dataset fields are left out
/// of a saved config when unset, so the built-in task's `config.toml` is unchanged.
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
    /// Datasets: training rows (default `../shared/data/gsm8k/train.jsonl`; MATH-500:
    /// `../shared/data/math500/test.jsonl`, without its held-out rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_data: Option<String>,
    /// Datasets: held-out rows (default `../shared/data/<kind>/test.jsonl`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_data: Option<String>,
    /// Datasets: "base" or "chat" prompts (default: chat when the model has a chat template).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_style: Option<String>,
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
            TaskKind::Arithmetic => self.arithmetic().validate(),
            _ => {
                if self.heldout_size == 0 {
                    return Err("task.heldout_size must be positive".into());
                }
                self.style().map(|_| ())
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

    /// (training file, held-out file) of a dataset task.
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
}

/// GSM8K or MATH-500 with rendered prompts and the math verifier.
pub struct MathTask {
    pub kind: DatasetKind,
    pub style: PromptStyle,
    train: Vec<Problem>,
    heldout: Vec<Problem>,
    verifier: MathVerifier,
    /// Training prompt → its worked solution rendered as a response.
    references: HashMap<String, String>,
}

impl MathTask {
    /// Loads the dataset and renders every prompt with `tok`'s chat template (chat style) or
    /// the base template. `model` names the model in errors.
    pub fn new(cfg: &TaskConfig, kind: DatasetKind, tok: &Tokenizer, model: &str) -> Result<Self> {
        let template = ChatTemplate::from_tokenizer(tok, model).transpose()?;
        let style = match (
            cfg.style().map_err(|m| Error::config("task", m))?,
            &template,
        ) {
            (Some(PromptStyle::Chat), None) => {
                return Err(Error::config(
                    "task",
                    format!("task.prompt_style = \"chat\", but {model} has no chat template"),
                ))
            }
            (Some(s), _) => s,
            (None, Some(_)) => PromptStyle::Chat,
            (None, None) => PromptStyle::Base,
        };
        let (train_path, eval_path) = cfg.data_paths(kind);
        let load = |p: &Path| -> Result<Vec<MathProblem>> {
            datasets::load(kind, p).map_err(|e| {
                Error::config(
                    "task",
                    format!("{e} (task.train_data / task.eval_data name the files)"),
                )
            })
        };
        let eval_rows = load(&eval_path)?;
        let n_held = cfg.heldout_size.min(eval_rows.len());
        let same = match (train_path.canonicalize(), eval_path.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => train_path == eval_path,
        };
        let train_rows = if same {
            eval_rows[n_held..].to_vec()
        } else {
            load(&train_path)?
        };
        if train_rows.is_empty() {
            return Err(Error::config(
                "task",
                format!(
                    "no training rows: {} has {} rows and task.heldout_size = {} of them are held out",
                    train_path.display(),
                    eval_rows.len(),
                    cfg.heldout_size
                ),
            ));
        }
        let render = |rows: &[MathProblem]| -> Result<Vec<Problem>> {
            rows.iter()
                .map(|p| {
                    let text = datasets::render_prompt(p, style, kind);
                    let prompt = match (&template, style) {
                        (Some(t), PromptStyle::Chat) => t.render_user(&text)?,
                        _ => text,
                    };
                    Ok(Problem {
                        prompt,
                        answer: p.answer.clone(),
                    })
                })
                .collect()
        };
        let train = render(&train_rows)?;
        let references = train
            .iter()
            .zip(&train_rows)
            .map(|(p, row)| (p.prompt.clone(), datasets::reference_response(row, kind)))
            .collect();
        Ok(MathTask {
            kind,
            style,
            train,
            heldout: render(&eval_rows[..n_held])?,
            verifier: MathVerifier::default(),
            references,
        })
    }

    pub fn train_len(&self) -> usize {
        self.train.len()
    }
}

impl Task for MathTask {
    fn sample_train(&self, rng: &mut ChaCha8Rng) -> Problem {
        self.train[rng.gen_range(0..self.train.len())].clone()
    }
    fn heldout(&self) -> &[Problem] {
        &self.heldout
    }
    fn verify(&self, response: &str, finished: bool, reference: &str) -> Verdict {
        let mut text = response;
        let mut finished = finished;
        if self.style == PromptStyle::Base {
            // A base model runs on into the next "Question:"; judge its answer only. Reaching
            // the next question means the answer was complete.
            if let Some(cut) = text.find("\nQuestion:") {
                text = &text[..cut];
                finished = true;
            }
        }
        if finished {
            return self.verifier.verify(text, reference);
        }
        // Cut off at the token limit: only an explicitly marked answer (`####`, `\boxed{}`, an
        // answer line) counts. The last-number fallback would score whatever number the
        // reasoning had reached when it was cut.
        let strict = MathVerifier {
            last_number_fallback: false,
            ..self.verifier.clone()
        };
        let mut v = strict.verify(text, reference);
        if v.extracted.is_none() {
            v.reason = "truncated (no EOS) and no marked answer".to_string();
        }
        v
    }
    fn prompt_bos(&self) -> bool {
        self.style == PromptStyle::Base
    }
    fn reference_response(&self, prompt: &str, answer: &str) -> String {
        self.references
            .get(prompt)
            .cloned()
            .unwrap_or_else(|| answer.to_string())
    }
}

/// The task of a run config, prompts rendered for `tok` (the model named `model`).
pub fn build(cfg: &TaskConfig, tok: &Tokenizer, model: &str) -> Result<Box<dyn Task>> {
    match cfg.kind.dataset() {
        None => Ok(Box::new(
            ArithmeticTask::new(cfg.arithmetic()).map_err(|m| Error::config("task", m))?,
        )),
        Some(kind) => Ok(Box::new(MathTask::new(cfg, kind, tok, model)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

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
        let task = MathTask::new(&cfg, DatasetKind::Gsm8k, &tok, "gpt2").unwrap();
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
        let task = MathTask::new(&cfg, DatasetKind::Math500, &tok, "m").unwrap();
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
        let e = MathTask::new(&all, DatasetKind::Math500, &tok, "m")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no training rows"), "{e}");
        let forced = TaskConfig {
            prompt_style: Some("chat".into()),
            ..cfg
        };
        let e = MathTask::new(&forced, DatasetKind::Math500, &gpt2(), "plain")
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
        for (cfg, kind) in [(gsm, DatasetKind::Gsm8k), (math, DatasetKind::Math500)] {
            let task = MathTask::new(&cfg, kind, &tok, "gpt2").unwrap();
            let mut failed = Vec::new();
            for p in &task.train {
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
        let task = MathTask::new(&gsm8k_cfg(), DatasetKind::Gsm8k, &tok, "gpt2").unwrap();
        let natalia = &task.train[0];
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
