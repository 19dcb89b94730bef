//! `[task] kind = "dataset"`: prompts and answers from the user's own file (docs/tasks.md),
//! and the GSM8K / MATH-500 presets, which are this same task with fixed settings.
//!
//! Loading, in order, all before the first step (and before the run directory is made):
//! 1. rows: [`rows::read_rows`] (the format by extension) or, for a preset, its loader;
//! 2. fields by dotted path (`prompt_field`, `answer_field`, `system_field`, `id_field`), a
//!    text prompt through `prompt_template`, every answer checked by the reward's scorer;
//! 3. the held-out split: the first `heldout_size` rows of `eval_path` (left out of training
//!    when it is the training file), or `eval_fraction` of the rows by a seeded hash of the row
//!    id (or position), so that the two sets are disjoint and fixed by the seed;
//! 4. prompts rendered: chat style through the model's chat template (message-list prompts
//!    always), base style as the text itself.
//!
//! Every error names the file, the row and the field.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::chat::Message;
use crate::model::{ChatTemplate, Tokenizer};
use crate::reward::Verdict;
use crate::task::arithmetic::Problem;
use crate::task::datasets::{self, DatasetKind, PromptStyle};
use crate::task::fields::{self, PromptValue};
use crate::task::kinds::{Task, TaskConfig, TaskKind};
use crate::task::rows;
use crate::task::scorers::{RewardKind, Scorer, ScorerOptions, Tolerance};

/// Held-out fraction of `path` when neither `eval_path` nor `eval_fraction` is given.
pub const DEFAULT_EVAL_FRACTION: f64 = 0.1;
/// Default field names.
pub const DEFAULT_PROMPT_FIELD: &str = "prompt";
pub const DEFAULT_ANSWER_FIELD: &str = "answer";
/// Where a base model writing a preset's answer runs on into the next question.
const PRESET_BASE_STOP: &str = "\nQuestion:";

/// The `[task]` fields only `kind = "dataset"` reads, and whether each is set.
fn dataset_only_fields(cfg: &TaskConfig) -> [(&'static str, bool); 9] {
    [
        ("path", cfg.path.is_some()),
        ("eval_path", cfg.eval_path.is_some()),
        ("eval_fraction", cfg.eval_fraction.is_some()),
        ("split_seed", cfg.split_seed.is_some()),
        ("prompt_field", cfg.prompt_field.is_some()),
        ("answer_field", cfg.answer_field.is_some()),
        ("system_field", cfg.system_field.is_some()),
        ("id_field", cfg.id_field.is_some()),
        ("prompt_template", cfg.prompt_template.is_some()),
    ]
}

/// Dataset settings set for a kind that does not read them are an error, not ignored.
pub fn refuse_fields_of_other_kinds(cfg: &TaskConfig) -> std::result::Result<(), String> {
    let mut set: Vec<&str> = Vec::new();
    if cfg.kind != TaskKind::Dataset {
        set.extend(dataset_only_fields(cfg).iter().filter(|f| f.1).map(|f| f.0));
    }
    if cfg.kind == TaskKind::Arithmetic && cfg.reward.is_some() {
        set.push("reward");
    }
    if cfg.kind == TaskKind::Dataset {
        set.extend(
            [
                ("train_data", cfg.train_data.is_some()),
                ("eval_data", cfg.eval_data.is_some()),
            ]
            .iter()
            .filter(|f| f.1)
            .map(|f| f.0),
        );
    }
    match set.as_slice() {
        [] => Ok(()),
        names => Err(format!(
            "task.kind = {:?} does not read task.{} (kind = \"dataset\" reads path, eval_path, \
             prompt_field, ...; the presets gsm8k/math500 read train_data and eval_data)",
            cfg.kind.name(),
            names.join(", task.")
        )),
    }
}

/// Checks a dataset or preset `[task]` that can be checked without reading the files.
pub fn validate(cfg: &TaskConfig) -> std::result::Result<(), String> {
    refuse_fields_of_other_kinds(cfg)?;
    let check = cfg.check_kind()?;
    if cfg.check.is_some() && cfg.reward_kind()? != Some(RewardKind::Pipeline) {
        return Err("task.check applies to reward = \"pipeline\" only".into());
    }
    if cfg.kind == TaskKind::Dataset && cfg.path.is_none() {
        return Err(
            "task.kind = \"dataset\" needs task.path (a .jsonl, .json, .csv or .parquet file)"
                .into(),
        );
    }
    if let Some(p) = &cfg.path {
        rows::Format::of(Path::new(p)).map_err(|e| format!("task.path: {e}"))?;
    }
    if let Some(p) = &cfg.eval_path {
        rows::Format::of(Path::new(p)).map_err(|e| format!("task.eval_path: {e}"))?;
    }
    if cfg.eval_path.is_some() && cfg.eval_fraction.is_some() {
        return Err(
            "task.eval_path and task.eval_fraction are two ways to hold rows out: give one".into(),
        );
    }
    if let Some(f) = cfg.eval_fraction {
        if !(f > 0.0 && f < 1.0) {
            return Err(format!(
                "task.eval_fraction: expected a number in (0, 1), found {f}"
            ));
        }
    }
    let tol = tolerance(cfg);
    if !(tol.absolute >= 0.0
        && tol.absolute.is_finite()
        && tol.relative >= 0.0
        && tol.relative.is_finite())
    {
        return Err(format!(
            "task.tolerance / task.rel_tolerance: expected finite numbers >= 0, found {} / {}",
            tol.absolute, tol.relative
        ));
    }
    match check {
        Some(RewardKind::Regex) => {
            let pattern = cfg
                .answer_regex
                .as_deref()
                .ok_or("reward \"regex\" needs task.answer_regex (with one capture group)")?;
            crate::task::scorers::compile_answer_regex(pattern)?;
        }
        Some(RewardKind::External) => {
            let ext = cfg.external.as_ref().ok_or(
                "reward \"external\" needs [task.external] with command = [program, args...]",
            )?;
            ext.validate().map_err(|m| format!("task.external.{m}"))?;
            if ext.concurrency.is_some() {
                return Err(
                    "task.external.concurrency: the task's command scores one response \
                            at a time; for a pool of copies use an `external` component of \
                            [reward.pipeline] (docs/rewards.md)"
                        .into(),
                );
            }
        }
        _ => {}
    }
    Ok(())
}

fn tolerance(cfg: &TaskConfig) -> Tolerance {
    let d = Tolerance::default();
    Tolerance {
        absolute: cfg.tolerance.unwrap_or(d.absolute),
        relative: cfg.rel_tolerance.unwrap_or(d.relative),
    }
}

/// One usable row before rendering.
#[derive(Debug, Clone)]
struct Item {
    /// `file: line 3`, for errors.
    at: String,
    prompt: PromptValue,
    system: Option<String>,
    answer: String,
    /// The split key: the id field, else the row's position.
    key: String,
    /// A worked solution (presets), for ground-truth injection.
    solution: Option<String>,
}

/// A dataset task: rendered prompts, a held-out split and a scorer.
pub struct DatasetTask {
    pub style: PromptStyle,
    train: Vec<Problem>,
    heldout: Vec<Problem>,
    scorer: Scorer,
    /// Base-style presets: the response is judged up to the next "Question:".
    base_stop: Option<&'static str>,
    /// Training prompt → its worked solution (presets).
    references: HashMap<String, String>,
    /// Training prompt → its question before the chat template (eva's text generator).
    questions: HashMap<String, String>,
}

fn cfg_err(m: impl Into<String>) -> Error {
    Error::config("task", m)
}

impl DatasetTask {
    /// Loads the rows, splits and renders them for `tok` (the model named `model`).
    pub fn new(cfg: &TaskConfig, tok: &Tokenizer, model: &str) -> Result<Self> {
        validate(cfg).map_err(cfg_err)?;
        let template = ChatTemplate::from_tokenizer(tok, model).transpose()?;
        let style = match (cfg.style().map_err(cfg_err)?, &template) {
            (Some(PromptStyle::Chat), None) => {
                return Err(cfg_err(format!(
                    "task.prompt_style = \"chat\", but {model} has no chat template"
                )))
            }
            (Some(s), _) => s,
            (None, Some(_)) => PromptStyle::Chat,
            (None, None) => PromptStyle::Base,
        };
        let check = cfg
            .check_kind()
            .map_err(cfg_err)?
            .unwrap_or(RewardKind::Exact);
        let scorer = Scorer::new(
            check,
            &ScorerOptions {
                tolerance: tolerance(cfg),
                answer_regex: cfg.answer_regex.clone(),
                external: cfg.external.clone(),
            },
        )?;
        let (train_items, eval_items) = match cfg.kind.dataset() {
            Some(kind) => preset_items(cfg, kind, style)?,
            None => file_items(cfg)?,
        };
        let heldout_items = &eval_items[..cfg.heldout_size.min(eval_items.len())];
        for item in train_items.iter().chain(heldout_items) {
            scorer
                .check_reference(&item.answer)
                .map_err(|m| cfg_err(format!("{}: field `{}`: {m}", item.at, answer_field(cfg))))?;
        }
        let render_all = |items: &[Item]| -> Result<Vec<Problem>> {
            items
                .iter()
                .map(|it| render(it, style, template.as_ref(), tok, model, cfg))
                .collect()
        };
        let train = render_all(&train_items)?;
        let references = train
            .iter()
            .zip(&train_items)
            .filter_map(|(p, it)| Some((p.prompt.clone(), it.solution.clone()?)))
            .collect();
        let questions = train
            .iter()
            .zip(&train_items)
            .filter_map(|(p, it)| Some((p.prompt.clone(), it.prompt.question()?)))
            .collect();
        Ok(DatasetTask {
            style,
            questions,
            train,
            heldout: render_all(heldout_items)?,
            scorer,
            base_stop: (cfg.kind.dataset().is_some() && style == PromptStyle::Base)
                .then_some(PRESET_BASE_STOP),
            references,
        })
    }

    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    /// The training problems, in file order.
    pub fn train_problems(&self) -> &[Problem] {
        &self.train
    }
}

fn answer_field(cfg: &TaskConfig) -> &str {
    match cfg.kind.dataset() {
        Some(DatasetKind::Gsm8k) | Some(DatasetKind::Math500) => "answer",
        None => cfg.answer_field.as_deref().unwrap_or(DEFAULT_ANSWER_FIELD),
    }
}

/// A preset's rows through its own loader and prompt templates; the held-out rows are the
/// first `heldout_size` of the eval file, left out of training when it is the training file.
fn preset_items(
    cfg: &TaskConfig,
    kind: DatasetKind,
    style: PromptStyle,
) -> Result<(Vec<Item>, Vec<Item>)> {
    let (train_path, eval_path) = cfg.data_paths(kind);
    let load = |p: &Path| -> Result<Vec<Item>> {
        let rows = datasets::load(kind, p).map_err(|e| {
            cfg_err(format!(
                "{e} (task.train_data / task.eval_data name the files)"
            ))
        })?;
        Ok(rows
            .iter()
            .map(|r| Item {
                at: format!("{}: row {}", p.display(), r.index + 1),
                prompt: PromptValue::Text(datasets::render_prompt(r, style, kind)),
                system: None,
                answer: r.answer.clone(),
                key: r.index.to_string(),
                solution: Some(datasets::reference_response(r, kind)),
            })
            .collect())
    };
    let eval = load(&eval_path)?;
    let n_held = cfg.heldout_size.min(eval.len());
    let train = if same_file(&train_path, &eval_path) {
        eval[n_held..].to_vec()
    } else {
        load(&train_path)?
    };
    if train.is_empty() {
        return Err(cfg_err(format!(
            "no training rows: {} has {} rows and task.heldout_size = {} of them are held out",
            train_path.display(),
            eval.len(),
            cfg.heldout_size
        )));
    }
    Ok((train, eval))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The user's file(s): rows, fields, split.
fn file_items(cfg: &TaskConfig) -> Result<(Vec<Item>, Vec<Item>)> {
    let path = PathBuf::from(cfg.path.as_deref().unwrap_or_default());
    let prompt_template = cfg
        .prompt_template
        .as_deref()
        .map(compile_prompt_template)
        .transpose()?;
    let load = |p: &Path| -> Result<Vec<Item>> {
        let raw = rows::read_rows(p).map_err(|e| cfg_err(format!("task data: {e}")))?;
        let items = raw
            .iter()
            .map(|r| item_of(r, cfg, prompt_template.as_ref()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(cfg_err)?;
        unique_ids(&items, cfg)?;
        Ok(items)
    };
    let items = load(&path)?;
    let (train, eval) = match &cfg.eval_path {
        Some(e) => {
            let e = PathBuf::from(e);
            let eval = load(&e)?;
            let n_held = cfg.heldout_size.min(eval.len());
            let train = if same_file(&path, &e) {
                items[n_held..].to_vec()
            } else {
                items
            };
            (train, eval)
        }
        None => {
            let fraction = cfg.eval_fraction.unwrap_or(DEFAULT_EVAL_FRACTION);
            let keys: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
            let held = fraction_split(&keys, fraction, cfg.split_seed.unwrap_or(0));
            let (mut train, mut eval) = (Vec::new(), Vec::new());
            for (item, is_held) in items.into_iter().zip(held) {
                if is_held {
                    eval.push(item)
                } else {
                    train.push(item)
                }
            }
            (train, eval)
        }
    };
    if train.is_empty() || eval.is_empty() {
        return Err(cfg_err(format!(
            "{}: {} training and {} held-out rows after the split: both must be non-empty \
             (task.eval_path / task.eval_fraction / task.heldout_size)",
            path.display(),
            train.len(),
            eval.len()
        )));
    }
    Ok((train, eval))
}

/// Ids given by `id_field` must be unique within a file.
fn unique_ids(items: &[Item], cfg: &TaskConfig) -> Result<()> {
    let Some(field) = &cfg.id_field else {
        return Ok(());
    };
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for it in items {
        if let Some(first) = seen.insert(it.key.as_str(), it.at.as_str()) {
            return Err(cfg_err(format!(
                "{}: field `{field}`: id {:?} was already used at {first}",
                it.at, it.key
            )));
        }
    }
    Ok(())
}

/// Which rows are held out: those whose seeded hash of the key is among the lowest
/// round(fraction·n) (at least one, and at least one row left for training when n ≥ 2).
/// The result follows the keys, not the file order, so reordering a file with ids keeps
/// the split.
pub fn fraction_split(keys: &[&str], fraction: f64, seed: u64) -> Vec<bool> {
    let n = keys.len();
    let k = ((fraction * n as f64).round() as usize).clamp(1, n.saturating_sub(1).max(1));
    let mut order: Vec<(u64, usize)> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| (fnv1a(seed, key), i))
        .collect();
    order.sort_unstable();
    let mut held = vec![false; n];
    for &(_, i) in order.iter().take(k) {
        held[i] = true;
    }
    held
}

/// FNV-1a over the seed's bytes then the key: a hash that is the same on every platform.
fn fnv1a(seed: u64, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(key.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A `prompt_template` compiled with undefined names as errors (a typo names itself).
fn compile_prompt_template(src: &str) -> Result<minijinja::Environment<'static>> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_template_owned("prompt_template", src.to_string())
        .map_err(|e| cfg_err(format!("task.prompt_template: {e}")))?;
    Ok(env)
}

/// One row's fields; the message names the row and the field.
fn item_of(
    row: &rows::RawRow,
    cfg: &TaskConfig,
    template: Option<&minijinja::Environment<'static>>,
) -> std::result::Result<Item, String> {
    let at = row.at.to_string();
    let e = |m: String| format!("{at}: {m}");
    if !row.value.is_object() {
        return Err(e(format!(
            "expected an object of fields, found {}",
            rows::json_type_name(&row.value)
        )));
    }
    let get = |field: &str| fields::lookup(&row.value, field).map_err(e);
    let prompt_field = cfg.prompt_field.as_deref().unwrap_or(DEFAULT_PROMPT_FIELD);
    let answer_field = cfg.answer_field.as_deref().unwrap_or(DEFAULT_ANSWER_FIELD);
    let mut prompt = fields::prompt_value(get(prompt_field)?, prompt_field).map_err(e)?;
    if let (Some(env), PromptValue::Text(_)) = (template, &prompt) {
        let text = env
            .get_template("prompt_template")
            .and_then(|t| t.render(minijinja::Value::from(minijinja::value::Serde(&row.value))))
            .map_err(|err| e(format!("task.prompt_template: {}", template_message(&err))))?;
        prompt = PromptValue::Text(text);
    } else if template.is_some() {
        return Err(e(format!(
            "field `{prompt_field}` holds a message list; task.prompt_template applies to text prompts"
        )));
    }
    let answer = fields::text_value(get(answer_field)?, answer_field).map_err(e)?;
    let system = match &cfg.system_field {
        Some(f) => Some(fields::text_value(get(f)?, f).map_err(e)?),
        None => None,
    };
    let key = match &cfg.id_field {
        Some(f) => fields::text_value(get(f)?, f).map_err(e)?,
        None => row.at.number.to_string(),
    };
    Ok(Item {
        at,
        prompt,
        system,
        answer,
        key,
        solution: None,
    })
}

/// A minijinja error with its causes (an undefined name says which).
fn template_message(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut inner = std::error::Error::source(e);
    while let Some(s) = inner {
        msg.push_str(&format!(": {s}"));
        inner = s.source();
    }
    msg
}

/// The prompt as fed to the tokenizer: through the chat template in chat style (message
/// lists always), the text itself in base style; text the model cannot encode is an error.
fn render(
    it: &Item,
    style: PromptStyle,
    template: Option<&ChatTemplate>,
    tok: &Tokenizer,
    model: &str,
    cfg: &TaskConfig,
) -> Result<Problem> {
    let prompt_field = match cfg.kind {
        TaskKind::Dataset => cfg.prompt_field.as_deref().unwrap_or(DEFAULT_PROMPT_FIELD),
        _ => "question",
    };
    let mut messages = match &it.prompt {
        PromptValue::Text(t) if style == PromptStyle::Base => {
            if it.system.is_some() {
                return Err(cfg_err(format!(
                    "{}: task.system_field needs chat prompts, but the prompts are base style \
                     ({model} has no chat template, or task.prompt_style = \"base\")",
                    it.at
                )));
            }
            let problem = Problem {
                prompt: t.clone(),
                answer: it.answer.clone(),
            };
            check_encodable(tok, &problem.prompt, &it.at, prompt_field)?;
            check_encodable(tok, &problem.answer, &it.at, answer_field(cfg))?;
            return Ok(problem);
        }
        PromptValue::Text(t) => vec![Message::user(t.clone())],
        PromptValue::Messages(m) => m.clone(),
    };
    let Some(template) = template.filter(|_| style == PromptStyle::Chat) else {
        return Err(cfg_err(format!(
            "{}: field `{prompt_field}` holds a message list, which needs the model's chat \
             template; {model} has none (or task.prompt_style = \"base\")",
            it.at
        )));
    };
    if let Some(s) = &it.system {
        if messages.first().is_none_or(|m| m.role != "system") {
            messages.insert(
                0,
                Message {
                    role: "system".into(),
                    content: s.clone(),
                },
            );
        }
    }
    let prompt = template
        .render(&messages, true)
        .map_err(|e| cfg_err(format!("{}: {e}", it.at)))?;
    check_encodable(tok, &prompt, &it.at, prompt_field)?;
    Ok(Problem {
        prompt,
        answer: it.answer.clone(),
    })
}

/// A tokenizer with an `<unk>` token (the built-in model's characters) would train on
/// unknown tokens silently: text it cannot encode is an error naming the character.
fn check_encodable(tok: &Tokenizer, text: &str, at: &str, field: &str) -> Result<()> {
    let Some(unk) = tok.token_to_id("<unk>") else {
        return Ok(());
    };
    if !tok.encode(text)?.contains(&unk) {
        return Ok(());
    }
    let bad = text.chars().find(|c| {
        tok.encode(&c.to_string())
            .is_ok_and(|ids| ids.contains(&unk))
    });
    Err(cfg_err(format!(
        "{at}: field `{field}`: {} is not in the model's vocabulary (the built-in model \
         knows only {:?}); use a pretrained model (model.source) for this data",
        bad.map_or_else(|| "a character".to_string(), |c| format!("{c:?}")),
        crate::model::tokenizer::BUILTIN_CHARS
    )))
}

impl Task for DatasetTask {
    fn sample_train(&self, rng: &mut ChaCha8Rng) -> Problem {
        self.train[rng.gen_range(0..self.train.len())].clone()
    }
    fn heldout(&self) -> &[Problem] {
        &self.heldout
    }
    fn verify(&self, response: &str, finished: bool, reference: &str) -> Verdict {
        self.score("", response, finished, reference)
            .unwrap_or_else(|e| Verdict {
                score: 0.0,
                reason: e.to_string(),
                extracted: None,
            })
    }
    fn score(
        &self,
        prompt: &str,
        response: &str,
        finished: bool,
        reference: &str,
    ) -> Result<Verdict> {
        let mut text = response;
        let mut finished = finished;
        if let Some(stop) = self.base_stop {
            // A base model runs on into the next question; judge its answer only. Reaching the
            // next question means the answer was complete.
            if let Some(cut) = text.find(stop) {
                text = &text[..cut];
                finished = true;
            }
        }
        self.scorer.score(prompt, text, finished, reference)
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
    fn question(&self, prompt: &str) -> Option<String> {
        self.questions.get(prompt).cloned()
    }
    /// The parent's prompt with its question (the last place it occurs: chat templates copy
    /// the user message verbatim) replaced by `question`; no reference answer.
    fn text_variant(
        &self,
        parent: &Problem,
        parent_question: &str,
        question: &str,
    ) -> Option<Problem> {
        let at = parent.prompt.rfind(parent_question)?;
        let mut prompt = parent.prompt.clone();
        prompt.replace_range(at..at + parent_question.len(), question);
        Some(Problem {
            prompt,
            answer: String::new(),
        })
    }
}

#[cfg(test)]
mod tests;
