//! `grove eval`: sample n responses per question from a model (HF folder, GGUF file or grove
//! checkpoint), verify them, and report unbiased pass@k, mean@n and maj@n (docs/algorithms.md#evaluation),
//! with one JSON line per question for inspection.
//!
//! Prompts: GSM8K / MATH-500 questions go through `task::datasets::render_prompt`; with the
//! chat style (the default when the model has a chat template) the text becomes one user
//! message rendered by the model's template, otherwise it is a base-model completion prompt
//! (BOS prepended when the model's tokenizer adds one). Built-in arithmetic prompts come from
//! the held-out split of `task::ArithmeticTask` (the run's own task config when the checkpoint
//! sits in a run directory) and are judged by exact match followed by EOS, as in training.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::env::runner::EnvRunner;
use crate::env::{EnvConfig, EnvKind};
use crate::error::{Error, Result};
use crate::eval::{maj_at_n, mean_at_n, pass_at_k, summarize, EvalSummary, PromptSamples};
use crate::model::quantized::load_for_sampling;
use crate::model::{CausalLm, ChatTemplate, Tokenizer};
use crate::reward::exact::exact_answer;
use crate::reward::math::{canonical_answer, MathVerifier};
use crate::reward::Verdict;
use crate::rollout::{generate, SamplingParams};
use crate::task::arithmetic::{ArithmeticConfig, ArithmeticTask};
use crate::task::datasets::{render_prompt, DatasetKind, PromptStyle};

/// What to evaluate on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalTask {
    Gsm8k,
    Math500,
    /// The built-in arithmetic task's held-out split.
    Builtin,
    /// An environment's held-out episodes (the run's `[env]` section when the checkpoint
    /// sits in a run directory of that kind, else the kind's defaults); a sample is an
    /// episode, correct when solved.
    Env(EnvKind),
}

/// The names `--task` takes besides the environment kinds.
const TASK_NAMES: &str = "gsm8k, math500, builtin";

impl std::str::FromStr for EvalTask {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "gsm8k" => Ok(EvalTask::Gsm8k),
            "math500" | "math-500" => Ok(EvalTask::Math500),
            "builtin" | "arithmetic" => Ok(EvalTask::Builtin),
            other => serde_json::from_value::<EnvKind>(serde_json::json!(other))
                .map(EvalTask::Env)
                .map_err(|_| {
                    format!(
                        "unknown task {other:?} (expected {TASK_NAMES}, or an environment: {})",
                        ENV_KINDS.join(", ")
                    )
                }),
        }
    }
}

/// The environment kinds by name, as `--task` takes them.
const ENV_KINDS: [&str; 5] = [
    "guess",
    "countdown",
    "calculator-arithmetic",
    "bandit",
    "program",
];

impl EvalTask {
    fn name(self) -> String {
        match self {
            EvalTask::Gsm8k => "gsm8k".into(),
            EvalTask::Math500 => "math500".into(),
            EvalTask::Builtin => "builtin".into(),
            EvalTask::Env(kind) => serde_json::to_value(kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| format!("{kind:?}")),
        }
    }
    fn dataset(self) -> Option<DatasetKind> {
        match self {
            EvalTask::Gsm8k => Some(DatasetKind::Gsm8k),
            EvalTask::Math500 => Some(DatasetKind::Math500),
            EvalTask::Builtin | EvalTask::Env(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub task: EvalTask,
    /// Samples per question.
    pub n: usize,
    /// The k of pass@k, each in 1..=n.
    pub ks: Vec<usize>,
    /// Only the first `limit` questions.
    pub limit: Option<usize>,
    pub temperature: f64,
    pub top_p: f64,
    /// Default: 512 for GSM8K, 1024 for MATH-500, the longest answer + EOS for builtin.
    pub max_new_tokens: Option<usize>,
    /// Dataset file (default: `../shared/data/<task>/test.jsonl` from the current directory).
    pub data: Option<PathBuf>,
    /// Per-question JSONL output.
    pub out: Option<PathBuf>,
    /// Default: chat when the model has a chat template, else base.
    pub prompt_style: Option<PromptStyle>,
    /// Sequences decoded together.
    pub batch_size: usize,
    pub seed: u64,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// The temperature `grove eval` uses when none is given: greedy (0) for one sample per
/// question, which is what training's held-out `acc/eval` reports, so the two compare; 1.0 for
/// several samples (pass@k and maj@n need distinct samples).
pub fn default_temperature(n: usize) -> f64 {
    if n <= 1 {
        0.0
    } else {
        1.0
    }
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            task: EvalTask::Gsm8k,
            n: 1,
            ks: vec![1],
            limit: None,
            temperature: default_temperature(1),
            top_p: 1.0,
            max_new_tokens: None,
            data: None,
            out: None,
            prompt_style: None,
            batch_size: 16,
            seed: 0,
            progress: false,
        }
    }
}

impl EvalOptions {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| {
            Err(Error::Usage {
                option: "eval".into(),
                msg: m,
            })
        };
        if self.n == 0 {
            return bad("--n must be at least 1".into());
        }
        if self.ks.is_empty() {
            return bad("--k needs at least one value".into());
        }
        if let Some(&k) = self.ks.iter().find(|&&k| k == 0 || k > self.n) {
            return bad(format!(
                "--k {k} is outside 1..={}: pass@k needs k ≤ n samples per question",
                self.n
            ));
        }
        if self.limit == Some(0) {
            return bad("--limit must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("--batch-size must be at least 1".into());
        }
        if self.max_new_tokens == Some(0) {
            return bad("--max-new-tokens must be at least 1".into());
        }
        Ok(())
    }
}

/// One question, ready to sample.
struct Item {
    index: usize,
    question: String,
    reference: String,
    prompt: String,
    ids: Vec<u32>,
}

/// One judged sample in the JSONL output.
#[derive(Debug, Clone, Serialize)]
pub struct SampleRecord {
    pub response: String,
    pub score: f64,
    pub reason: String,
    pub extracted: Option<String>,
    pub finished: bool,
    pub tokens: usize,
}

/// One question's line in the JSONL output.
#[derive(Debug, Clone, Serialize)]
pub struct QuestionRecord {
    pub index: usize,
    pub question: String,
    pub reference: String,
    pub prompt: String,
    pub n: usize,
    pub correct: usize,
    pub mean: f64,
    pub maj: f64,
    #[serde(rename = "pass@k")]
    pub pass_at_k: std::collections::BTreeMap<String, f64>,
    pub samples: Vec<SampleRecord>,
}

#[derive(Debug, Clone)]
pub struct EvalReport {
    pub task: EvalTask,
    pub questions: usize,
    pub n: usize,
    pub prompt_style: PromptStyle,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub summary: EvalSummary,
    pub generated_tokens: usize,
    pub wall_s: f64,
}

impl EvalReport {
    /// The report of `opts`' evaluation of `questions` questions, sampled in `style` with at
    /// most `max_new_tokens` each, from their samples `all`; `start` is when it began.
    fn new(
        opts: &EvalOptions,
        questions: usize,
        style: PromptStyle,
        max_new_tokens: usize,
        all: &[PromptSamples],
        generated_tokens: usize,
        start: Instant,
    ) -> Self {
        EvalReport {
            task: opts.task,
            questions,
            n: opts.n,
            prompt_style: style,
            max_new_tokens,
            temperature: opts.temperature,
            top_p: opts.top_p,
            summary: summarize(all, &opts.ks),
            generated_tokens,
            wall_s: start.elapsed().as_secs_f64(),
        }
    }
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let style = match self.prompt_style {
            PromptStyle::Base => "base",
            PromptStyle::Chat => "chat",
        };
        let decoding = if self.temperature == 0.0 {
            "greedy decoding".to_string()
        } else if self.top_p < 1.0 {
            format!(
                "sampled at temperature {}, top-p {}",
                self.temperature, self.top_p
            )
        } else {
            format!("sampled at temperature {}", self.temperature)
        };
        writeln!(
            f,
            "{}: {} questions x {} samples, {decoding} ({style} prompts, max {} new tokens), \
             {} tokens in {:.1} s",
            self.task.name(),
            self.questions,
            self.n,
            self.max_new_tokens,
            self.generated_tokens,
            self.wall_s
        )?;
        for (k, v) in &self.summary.pass_at_k {
            writeln!(f, "pass@{k}: {v:.4}")?;
        }
        match self.task {
            // Episodes have no answer to vote on: maj@n would print 0 whatever happened.
            EvalTask::Env(_) => write!(f, "mean@{}: {:.4}", self.n, self.summary.mean_at_n),
            _ => {
                writeln!(f, "mean@{}: {:.4}", self.n, self.summary.mean_at_n)?;
                write!(f, "maj@{}: {:.4}", self.n, self.summary.maj_at_n)
            }
        }
    }
}

/// The run's config when `ckpt` is `<run>/checkpoints/step-N` with `<run>/config.toml`.
fn run_config(ckpt: &Path) -> Result<Option<crate::config::ValidatedRun>> {
    let run_cfg = ckpt
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "checkpoints"))
        .and_then(|p| p.parent())
        .map(|run| run.join("config.toml"));
    match run_cfg {
        Some(p) if p.is_file() => Ok(Some(crate::config::load_for(
            Some(&p),
            &[],
            crate::config::Purpose::Inspect,
        )?)),
        _ => Ok(None),
    }
}

/// The run's task config when the checkpoint sits in a run directory.
fn run_task_config(ckpt: &Path) -> Result<Option<ArithmeticConfig>> {
    Ok(run_config(ckpt)?.map(|c| c.task.arithmetic()))
}

/// The environment to evaluate on and the response budget of a turn: the run's `[env]`
/// (and `rollout.max_new_tokens`) when the checkpoint sits in a run directory of an
/// environment of this kind, else the kind's defaults; `--max-new-tokens` wins.
fn env_eval_config(
    kind: EnvKind,
    model_path: &Path,
    opts: &EvalOptions,
) -> Result<(EnvConfig, usize)> {
    let (env, max_new) = match run_config(model_path)? {
        Some(run) => match &run.env {
            Some(e) if e.kind == kind => (e.clone(), run.rollout.max_new_tokens),
            Some(e) => {
                return Err(Error::Usage {
                    option: format!("--task {}", EvalTask::Env(kind).name()),
                    msg: format!(
                        "{} was trained on the {} environment; evaluate it with --task {}",
                        model_path.display(),
                        EvalTask::Env(e.kind).name(),
                        EvalTask::Env(e.kind).name()
                    ),
                })
            }
            None => (
                EnvConfig {
                    kind,
                    ..Default::default()
                },
                run.rollout.max_new_tokens,
            ),
        },
        None => (
            EnvConfig {
                kind,
                ..Default::default()
            },
            crate::config::RolloutConfig::default().max_new_tokens,
        ),
    };
    Ok((env, opts.max_new_tokens.unwrap_or(max_new)))
}

fn prompt_ids(tok: &Tokenizer, text: &str, add_bos: bool) -> Result<Vec<u32>> {
    if add_bos {
        tok.encode_with_bos(text)
    } else {
        tok.encode(text)
    }
}

/// The questions to ask, as prompts for `style`, and the default response budget.
fn eval_items(
    tok: &Tokenizer,
    model_path: &Path,
    opts: &EvalOptions,
    style: PromptStyle,
    template: Option<&ChatTemplate>,
) -> Result<(Vec<Item>, usize)> {
    let mut items = Vec::new();
    let max_new_tokens = match opts.task.dataset() {
        Some(kind) => {
            let path = opts
                .data
                .clone()
                .unwrap_or_else(|| super::verify::default_data_path(kind));
            let problems = super::verify::load_dataset(kind, &path)?;
            let limit = opts.limit.unwrap_or(problems.len()).min(problems.len());
            for p in &problems[..limit] {
                let text = render_prompt(p, style, kind);
                let (prompt, add_bos) = match (style, template) {
                    (PromptStyle::Chat, Some(t)) => (t.render_user(&text)?, false),
                    _ => (text, true),
                };
                items.push(Item {
                    index: p.index,
                    question: p.question.clone(),
                    reference: p.answer.clone(),
                    ids: prompt_ids(tok, &prompt, add_bos)?,
                    prompt,
                });
            }
            opts.max_new_tokens.unwrap_or(match kind {
                DatasetKind::Gsm8k => 512,
                DatasetKind::Math500 => 1024,
            })
        }
        None => {
            let cfg = run_task_config(model_path)?.unwrap_or_default();
            let task = ArithmeticTask::new(cfg).map_err(|e| Error::Task(format!("eval: {e}")))?;
            let held = task.heldout();
            let limit = opts.limit.unwrap_or(held.len()).min(held.len());
            for (i, p) in held[..limit].iter().enumerate() {
                items.push(Item {
                    index: i,
                    question: p.prompt.clone(),
                    reference: p.answer.clone(),
                    ids: prompt_ids(tok, &p.prompt, true)?,
                    prompt: p.prompt.clone(),
                });
            }
            opts.max_new_tokens.unwrap_or(task.max_answer_chars() + 1)
        }
    };
    Ok((items, max_new_tokens))
}

/// The per-question JSONL output, its folder created.
fn open_output(opts: &EvalOptions) -> Result<Option<(std::io::BufWriter<std::fs::File>, PathBuf)>> {
    Ok(match &opts.out {
        Some(p) => {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            let f = std::fs::File::create(p).map_err(|e| Error::io(p, e))?;
            Some((std::io::BufWriter::new(f), p.clone()))
        }
        None => None,
    })
}

/// Per-question scores for the summary, each question written to `opts.out` when set.
fn summarize_questions(
    items: &[Item],
    per_question: Vec<Vec<(SampleRecord, Option<String>)>>,
    opts: &EvalOptions,
    mut out: Option<(std::io::BufWriter<std::fs::File>, PathBuf)>,
) -> Result<Vec<PromptSamples>> {
    let mut all = Vec::with_capacity(items.len());
    for (item, samples) in items.iter().zip(per_question) {
        let (records, answers): (Vec<SampleRecord>, Vec<Option<String>>) =
            samples.into_iter().unzip();
        let ps = PromptSamples {
            scores: records.iter().map(|r| r.score).collect(),
            correct: records.iter().map(|r| r.score > 0.5).collect(),
            answers,
        };
        if let Some((w, path)) = out.as_mut() {
            let c = ps.correct.iter().filter(|&&x| x).count();
            let rec = QuestionRecord {
                index: item.index,
                question: item.question.clone(),
                reference: item.reference.clone(),
                prompt: item.prompt.clone(),
                n: records.len(),
                correct: c,
                mean: mean_at_n(&ps.scores),
                maj: maj_at_n(&ps.answers, &ps.correct),
                pass_at_k: opts
                    .ks
                    .iter()
                    .map(|&k| (k.to_string(), pass_at_k(records.len(), c, k)))
                    .collect(),
                samples: records,
            };
            writeln!(w, "{}", serde_json::to_string(&rec)?).map_err(|e| Error::io(&*path, e))?;
        }
        all.push(ps);
    }
    if let Some((mut w, path)) = out {
        w.flush().map_err(|e| Error::io(&path, e))?;
    }
    Ok(all)
}

/// Evaluates the model at `model_path` (HF folder, GGUF file or grove checkpoint directory);
/// a GGUF model samples on its quantized weights.
pub fn run_eval(model_path: &Path, opts: &EvalOptions) -> Result<EvalReport> {
    opts.validate()?;
    let device = crate::compute::device();
    let (model, tok) = load_for_sampling(model_path, &device)?;
    run_eval_with(model.as_ref(), &tok, model_path, opts).map_err(|e| match e {
        // Which model produced them is the useful part.
        Error::NonFiniteLogits { .. } => Error::Model(format!("{}: {e}", model_path.display())),
        e => e,
    })
}

/// [`run_eval`] for a model already in memory; `model_path` locates a run's task config.
pub fn run_eval_with<M: CausalLm + ?Sized>(
    model: &M,
    tok: &Tokenizer,
    model_path: &Path,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    opts.validate()?;
    let start = Instant::now();
    let template =
        ChatTemplate::from_tokenizer(tok, &model_path.display().to_string()).transpose()?;
    if let EvalTask::Env(kind) = opts.task {
        if opts.prompt_style.is_some() {
            return Err(Error::Usage {
                option: "--prompt-style".into(),
                msg: "does not apply to environments: an episode is rendered with the model's \
                      chat template when it has one, as in training"
                    .into(),
            });
        }
        let style = match template {
            Some(_) => PromptStyle::Chat,
            None => PromptStyle::Base,
        };
        return run_env_eval(model, tok, model_path, opts, kind, style, start);
    }
    let style = match (opts.prompt_style, &template) {
        (Some(PromptStyle::Chat), None) => {
            return Err(Error::Usage {
                option: "--prompt-style chat".into(),
                msg: format!("{} has no chat template", model_path.display()),
            })
        }
        (Some(s), _) => s,
        (None, Some(_)) if opts.task != EvalTask::Builtin => PromptStyle::Chat,
        (None, _) => PromptStyle::Base,
    };
    let (items, max_new_tokens) = eval_items(tok, model_path, opts, style, template.as_ref())?;
    let params = SamplingParams {
        temperature: opts.temperature,
        top_p: opts.top_p,
        max_new_tokens,
    };
    params.validate().map_err(|e| Error::Usage {
        option: "eval".into(),
        msg: e,
    })?;
    let verifier = MathVerifier::default();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    // The output file is created before sampling, so a bad path fails at once.
    let out = open_output(opts)?;
    let pb = if opts.progress {
        indicatif::ProgressBar::new((items.len() * opts.n) as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} samples {elapsed_precise} (eta {eta}) {msg}",
        )
        .map_err(|e| Error::Internal(format!("progress bar template: {e}")))?
        .progress_chars("=> "),
    );
    pb.set_prefix(format!("eval {}", opts.task.name()));

    // Every (question, sample) pair, decoded batch_size at a time.
    let jobs: Vec<usize> = (0..items.len())
        .flat_map(|q| std::iter::repeat_n(q, opts.n))
        .collect();
    let mut per_question: Vec<Vec<(SampleRecord, Option<String>)>> =
        (0..items.len()).map(|_| Vec::new()).collect();
    let mut generated = 0usize;
    let mut correct_so_far = 0usize;
    let mut done = 0usize;
    for batch in jobs.chunks(opts.batch_size) {
        let prompts: Vec<Vec<u32>> = batch.iter().map(|&q| items[q].ids.clone()).collect();
        let gens = generate(model, &prompts, tok.eos, tok.pad, &params, &mut rng)?;
        for (&q, g) in batch.iter().zip(&gens) {
            let body: Vec<u32> = g.tokens.iter().copied().filter(|&t| t != tok.eos).collect();
            let mut text = tok.decode(&body)?;
            generated += g.tokens.len();
            let (verdict, answer): (Verdict, Option<String>) = match opts.task {
                EvalTask::Builtin => {
                    let v = exact_answer(&text, g.finished, &items[q].reference);
                    let a = g.finished.then(|| text.clone());
                    (v, a)
                }
                _ => {
                    if style == PromptStyle::Base {
                        // A base model runs on into the next "Question:"; judge its answer only.
                        if let Some(cut) = text.find("\nQuestion:") {
                            text.truncate(cut);
                        }
                    }
                    let v = verifier.verify(&text, &items[q].reference);
                    let a = v.extracted.as_deref().map(canonical_answer);
                    (v, a)
                }
            };
            if verdict.score > 0.5 {
                correct_so_far += 1;
            }
            per_question[q].push((
                SampleRecord {
                    response: text,
                    score: verdict.score,
                    reason: verdict.reason,
                    extracted: verdict.extracted,
                    finished: g.finished,
                    tokens: g.tokens.len(),
                },
                answer,
            ));
        }
        done += batch.len();
        pb.set_position(done as u64);
        pb.set_message(format!(
            "mean score {:.3}",
            correct_so_far as f64 / done as f64
        ));
    }
    pb.finish_and_clear();

    let all = summarize_questions(&items, per_question, opts, out)?;
    let questions = items.len();
    Ok(EvalReport::new(
        opts,
        questions,
        style,
        max_new_tokens,
        &all,
        generated,
        start,
    ))
}

/// [`run_eval_with`] on an environment: `opts.n` episodes of each held-out start, sampled
/// as training samples them (the transcript, turn by turn); a sample's score is its return,
/// correct when the episode is solved.
fn run_env_eval<M: CausalLm + ?Sized>(
    model: &M,
    tok: &Tokenizer,
    model_path: &Path,
    opts: &EvalOptions,
    kind: EnvKind,
    style: PromptStyle,
    start: Instant,
) -> Result<EvalReport> {
    let (env_cfg, max_new_tokens) = env_eval_config(kind, model_path, opts)?;
    let params = SamplingParams {
        temperature: opts.temperature,
        top_p: opts.top_p,
        max_new_tokens,
    };
    params.validate().map_err(|e| Error::Usage {
        option: "eval".into(),
        msg: e,
    })?;
    let runner = EnvRunner::new(&env_cfg, tok, &model_path.display().to_string())?;
    let out = open_output(opts)?;
    let pb = if opts.progress {
        indicatif::ProgressBar::new((opts.limit.unwrap_or(env_cfg.heldout_size) * opts.n) as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let per_start = runner.sample_heldout(
        model,
        tok,
        params,
        (opts.n, opts.limit),
        opts.batch_size,
        &mut rng,
        |done| pb.inc(done.len() as u64),
    )?;
    pb.finish_and_clear();
    let mut generated = 0usize;
    let mut items = Vec::with_capacity(per_start.len());
    let mut per_question = Vec::with_capacity(per_start.len());
    for (index, (eps, s)) in per_start.iter().zip(runner.heldout_starts()).enumerate() {
        let first = eps.first();
        let question = first
            .and_then(|e| e.messages.first())
            .map(|m| m.content.clone())
            .unwrap_or_default();
        items.push(Item {
            index,
            question,
            reference: s.describe(),
            prompt: first.map(|e| e.prompt.clone()).unwrap_or_default(),
            ids: vec![],
        });
        let samples = eps
            .iter()
            .map(|e| {
                // The model's own tokens; the environment's and tools' are not generated.
                let model_tokens = e.trainable.iter().filter(|t| **t).count();
                generated += model_tokens;
                let last = e.infos.last();
                let reason = last
                    .and_then(|i| i.get("reason").or_else(|| i.get("error")))
                    .and_then(|v| v.as_str())
                    .unwrap_or(&e.stop)
                    .to_string();
                let response = tok.decode(&e.response_ids)?;
                Ok((
                    SampleRecord {
                        response,
                        score: if e.success { 1.0 } else { 0.0 },
                        reason,
                        extracted: None,
                        finished: e.ended_by_env,
                        tokens: model_tokens,
                    },
                    None,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        per_question.push(samples);
    }
    let all = summarize_questions(&items, per_question, opts, out)?;
    let questions = items.len();
    Ok(EvalReport::new(
        opts,
        questions,
        style,
        max_new_tokens,
        &all,
        generated,
        start,
    ))
}

/// Parses `--k 1,4,16`.
pub fn parse_ks(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|p| {
            p.trim().parse::<usize>().map_err(|_| Error::Usage {
                option: format!("--k {s:?}"),
                msg: format!("{p:?} is not a positive integer (expected e.g. 1,4,16)"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_validated() {
        let o = EvalOptions {
            n: 4,
            ks: vec![1, 8],
            ..Default::default()
        };
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("--k 8") && e.contains("1..=4"), "{e}");
        assert!(EvalOptions {
            n: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert_eq!(parse_ks("1, 4,16").unwrap(), vec![1, 4, 16]);
        assert!(parse_ks("1,x").unwrap_err().to_string().contains("\"x\""));
        assert_eq!("math500".parse::<EvalTask>(), Ok(EvalTask::Math500));
        assert!("mmlu".parse::<EvalTask>().is_err());
    }

    #[test]
    fn a_model_with_nan_weights_is_an_error_not_a_score() {
        let tok = Tokenizer::builtin_arithmetic();
        let cfg = crate::model::Config::builtin_tiny(tok.vocab_size());
        let model = crate::model::Llama::init(&cfg, 1, &candle_core::Device::Cpu).unwrap();
        model.poison_with_nan();
        let dir = tempfile::tempdir().unwrap();
        let opts = EvalOptions {
            task: EvalTask::Builtin,
            limit: Some(2),
            ..Default::default()
        };
        let e = run_eval_with(&model, &tok, dir.path(), &opts).unwrap_err();
        assert!(
            matches!(
                e,
                Error::NonFiniteLogits {
                    sequence: 0,
                    new_token: 0,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn builtin_eval_of_a_random_model_scores_zero_and_writes_every_question() {
        let tok = Tokenizer::builtin_arithmetic();
        let cfg = crate::model::Config::builtin_tiny(tok.vocab_size());
        let model = crate::model::Llama::init(&cfg, 1, &candle_core::Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sub/eval.jsonl");
        let opts = EvalOptions {
            task: EvalTask::Builtin,
            n: 3,
            ks: vec![1, 3],
            limit: Some(5),
            out: Some(out.clone()),
            batch_size: 4,
            ..Default::default()
        };
        let r = run_eval_with(&model, &tok, dir.path(), &opts).unwrap();
        assert_eq!((r.questions, r.n), (5, 3));
        assert_eq!(r.prompt_style, PromptStyle::Base);
        // An untrained model does not produce "<digits><eos>" answers to 2-digit additions.
        assert_eq!(r.summary.mean_at_n, 0.0);
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 5);
        let held = ArithmeticTask::new(ArithmeticConfig::default()).unwrap();
        assert_eq!(lines[2]["question"], held.heldout()[2].prompt.as_str());
        assert_eq!(lines[2]["samples"].as_array().unwrap().len(), 3);
        assert!(lines[0]["pass@k"]["3"].is_number());
    }

    /// `--task countdown`: each held-out episode sampled n times, grouped by episode in
    /// held-out order, and the summary's pass@k is the estimator over the written per-episode
    /// counts. A random model solves nothing, so the solved episodes are checked against the
    /// file too.
    #[test]
    fn env_eval_samples_each_heldout_episode_n_times() {
        let tok = Tokenizer::builtin_text();
        let mut cfg = crate::model::Config::builtin_tiny(tok.vocab_size());
        cfg.max_position_embeddings = Some(256);
        let model = crate::model::Llama::init(&cfg, 1, &candle_core::Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env.jsonl");
        let opts = EvalOptions {
            task: "countdown".parse().unwrap(),
            n: 3,
            ks: vec![1, 3],
            limit: Some(4),
            temperature: 1.0,
            max_new_tokens: Some(6),
            out: Some(out.clone()),
            batch_size: 5,
            ..Default::default()
        };
        let r = run_eval_with(&model, &tok, dir.path(), &opts).unwrap();
        assert_eq!((r.questions, r.n), (4, 3));
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4);
        let runner = EnvRunner::new(
            &EnvConfig {
                kind: EnvKind::Countdown,
                ..Default::default()
            },
            &tok,
            "test",
        )
        .unwrap();
        let mut want_pass1 = 0.0;
        for (line, start) in lines.iter().zip(runner.heldout_starts()) {
            assert_eq!(line["reference"], start.describe().as_str());
            assert!(line["question"]
                .as_str()
                .unwrap()
                .starts_with("use the numbers"));
            assert_eq!(line["samples"].as_array().unwrap().len(), 3);
            let c = line["correct"].as_u64().unwrap() as usize;
            want_pass1 += pass_at_k(3, c, 1) / 4.0;
        }
        assert!(crate::testing::near(r.summary.pass_at_k[0].1, want_pass1));
        // An unknown task lists the tasks and the environments.
        let e = "chess".parse::<EvalTask>().unwrap_err();
        assert!(e.contains("countdown") && e.contains("gsm8k"), "{e}");
        let style = EvalOptions {
            prompt_style: Some(PromptStyle::Base),
            ..opts
        };
        let e = run_eval_with(&model, &tok, dir.path(), &style).unwrap_err();
        assert!(e.to_string().contains("--prompt-style"), "{e}");
    }
}
