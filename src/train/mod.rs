//! Training runs: a supervised warm-up on generated solutions, then RL steps, each one batch
//! of experience groups (from `explore`) turned into one update (by `learn`), with
//! evaluation, metrics and atomic checkpoints along the way.
//!
//! Where the batches come from is the sync mode (docs/architecture.md): on-policy (current weights),
//! lagged (a separate older copy refreshed every `sync.interval` steps, `sync.offset` steps
//! ahead), async (an explorer thread and a bounded buffer), a shared buffer filled by
//! `grove explore` processes, or an offline JSONL file.
pub mod blend;
pub mod checkpoint;
pub mod critic;
pub mod eva_generator;
pub mod explore;
pub mod explorer;
pub mod learn;
pub mod policy_callbacks;
pub mod pretrained;
pub mod publish;
pub mod reinforce_ada;
pub mod reward_hook;
mod run;
pub mod source;

pub use run::run;

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::compute::optim::{AdamW, AdamWParams};
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::model::batch;
use crate::model::{Config as ModelShape, Llama, Tokenizer};
use crate::report::{self, JsonlWriter, Metrics};
use crate::rollout::{generate, SamplingParams};
use crate::task::Problem;
use explore::{response_text, rng_stream, Env};

#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue the run in this directory from its latest checkpoint.
    pub resume: Option<PathBuf>,
    /// Stop (with a checkpoint) after this RL step, as if interrupted.
    pub stop_after: Option<usize>,
    /// No plan, progress bar or summary on the terminal.
    pub quiet: bool,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub warmup_steps: usize,
    pub acc_after_warmup: f64,
    pub acc_final: f64,
    pub rl_steps_done: usize,
    pub wall_s: f64,
    /// A resumed run that had already taken all its steps: nothing was trained, and
    /// `acc_final` is the last held-out accuracy its metrics.jsonl records.
    pub already_finished: bool,
}

/// The built-in policy shape for a vocabulary.
pub fn builtin_shape(cfg: &RunConfig, vocab: usize) -> ModelShape {
    let mut s = ModelShape::builtin_tiny(vocab);
    if let Some(e) = &cfg.env {
        // Episodes are longer than an arithmetic prompt and answer.
        s.max_position_embeddings = Some(e.max_tokens);
    }
    s.hidden_size = cfg.model.hidden_size;
    s.num_hidden_layers = cfg.model.num_layers;
    s.num_attention_heads = cfg.model.num_heads;
    s.num_key_value_heads = Some(cfg.model.num_kv_heads);
    s.intermediate_size = cfg.model.intermediate_size;
    s
}

/// Creates `<output_dir>/<name>`, or `<name>-2`, `<name>-3`, ... when taken: an existing run
/// directory is never reused or touched.
pub fn create_run_dir(output_dir: &Path, name: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(output_dir).map_err(|e| Error::io(output_dir, e))?;
    let mut i = 1usize;
    loop {
        let cand = if i == 1 {
            output_dir.join(name)
        } else {
            output_dir.join(format!("{name}-{i}"))
        };
        match std::fs::create_dir(&cand) {
            Ok(()) => return Ok(cand),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => i += 1,
            Err(e) => return Err(Error::io(&cand, e)),
        }
    }
}

/// Greedy held-out accuracy of `model` on built-in arithmetic `problems` (exact match followed
/// by EOS, BOS-prefixed prompts); [`evaluate_task`] is the same for any task of a run.
pub fn evaluate(
    model: &Llama,
    tok: &Tokenizer,
    problems: &[Problem],
    max_new_tokens: usize,
) -> Result<f64> {
    if problems.is_empty() {
        return Ok(0.0);
    }
    let params = SamplingParams::greedy(max_new_tokens);
    // Greedy decoding draws nothing from the RNG; a fixed one keeps the signature simple.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut correct = 0usize;
    for chunk in problems.chunks(512) {
        let prompts = chunk
            .iter()
            .map(|p| explore::encode_prompt(tok, &p.prompt))
            .collect::<Result<Vec<_>>>()?;
        let gens = generate(model, &prompts, tok.eos, tok.pad, &params, &mut rng)?;
        for (g, p) in gens.iter().zip(chunk) {
            let text = response_text(tok, &g.tokens)?;
            if crate::reward::exact::exact_answer(&text, g.finished, &p.answer).score > 0.5 {
                correct += 1;
            }
        }
    }
    Ok(correct as f64 / problems.len() as f64)
}

/// Greedy held-out accuracy of `model` on `problems`, judged by the run's task verifier.
pub fn evaluate_task(
    env: &Env,
    model: &Llama,
    problems: &[Problem],
    max_new_tokens: usize,
) -> Result<f64> {
    if let Some(runner) = &env.environment {
        return runner.evaluate(model, &env.tok, problems.len(), max_new_tokens);
    }
    if problems.is_empty() {
        return Ok(0.0);
    }
    let tok = &env.tok;
    let params = SamplingParams::greedy(max_new_tokens);
    // Greedy decoding draws nothing from the RNG; a fixed one keeps the signature simple.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut correct = 0usize;
    // Pretrained models decode long answers with large KV caches: smaller batches.
    let chunk_size = if env.model_path.is_some() { 16 } else { 512 };
    for chunk in problems.chunks(chunk_size) {
        let prompts = chunk
            .iter()
            .map(|p| env.encode_prompt(&p.prompt))
            .collect::<Result<Vec<_>>>()?;
        let gens = generate(model, &prompts, tok.eos, tok.pad, &params, &mut rng)?;
        for (g, p) in gens.iter().zip(chunk) {
            let text = response_text(tok, &g.tokens)?;
            if env
                .task
                .score(&p.prompt, &text, g.finished, &p.answer)?
                .score
                > 0.5
            {
                correct += 1;
            }
        }
    }
    Ok(correct as f64 / problems.len() as f64)
}

fn heldout(env: &Env) -> &[Problem] {
    let h = env.task.heldout();
    match env.cfg.train.eval_size {
        0 => h,
        n => &h[..n.min(h.len())],
    }
}

/// Supervised warm-up on generated solutions until greedy held-out accuracy reaches
/// `warmup.target_acc`; returns the number of steps taken. A pretrained policy has none; an
/// environment's is `warmup_env`.
pub fn warmup(
    env: &Env,
    model: &Llama,
    metrics: &mut JsonlWriter,
    pb: &indicatif::ProgressBar,
) -> Result<usize> {
    if env.model_path.is_some() {
        return Ok(0);
    }
    if let Some(runner) = &env.environment {
        return warmup_env(env, runner, model, metrics, pb);
    }
    let w = &env.cfg.warmup;
    let mut rng = rng_stream(env.cfg.seed, explore::STREAM_WARMUP);
    let mut opt = AdamW::new(model.params(), AdamWParams::default());
    let eval_set = &env.task.heldout()[..w.eval_size.min(env.task.heldout().len())];
    let max_new = env.cfg.rollout.max_new_tokens;
    pb.set_prefix("warm-up");
    pb.set_length(w.max_steps as u64);
    for step in 1..=w.max_steps {
        let problems: Vec<Problem> = (0..w.batch_size)
            .map(|_| env.task.sample_train(&mut rng))
            .collect();
        let prompts = problems
            .iter()
            .map(|p| env.encode_prompt(&p.prompt))
            .collect::<Result<Vec<_>>>()?;
        let answers = problems
            .iter()
            .map(|p| {
                let mut a = env.tok.encode(&p.answer)?;
                a.push(env.tok.eos);
                Ok(a)
            })
            .collect::<Result<Vec<_>>>()?;
        let pair = (prompts.as_slice(), answers.as_slice());
        let loss = sft_step(model, &mut opt, w.lr, pair, None, env.tok.pad)?;
        pb.inc(1);
        if step % w.eval_every == 0 || step == w.max_steps {
            let acc = evaluate_task(env, model, eval_set, max_new)?;
            if warmup_checkpoint(metrics, pb, step, loss, acc)? >= w.target_acc {
                return Ok(step);
            }
        }
    }
    Ok(w.max_steps)
}

/// An environment's warm-up: supervised steps on the environment's reference plays (only the
/// model's turns are trained, as in RL), stopped by the same held-out rule. Environments
/// without reference plays ([`crate::env::EnvKind::demonstrates`]) have none.
fn warmup_env(
    env: &Env,
    runner: &crate::env::runner::EnvRunner,
    model: &Llama,
    metrics: &mut JsonlWriter,
    pb: &indicatif::ProgressBar,
) -> Result<usize> {
    let w = &env.cfg.warmup;
    if !runner.config().kind.demonstrates() || w.max_steps == 0 {
        return Ok(0);
    }
    let mut rng = rng_stream(env.cfg.seed, explore::STREAM_WARMUP);
    let mut opt = AdamW::new(model.params(), AdamWParams::default());
    let max_new = env.cfg.rollout.max_new_tokens;
    pb.set_prefix("warm-up");
    pb.set_length(w.max_steps as u64);
    for step in 1..=w.max_steps {
        let Some(demos) = runner.demonstrations(&env.tok, w.batch_size, max_new, &mut rng)? else {
            return Ok(0);
        };
        let prompts: Vec<Vec<u32>> = demos.iter().map(|d| d.prompt_ids.clone()).collect();
        let responses: Vec<Vec<u32>> = demos.iter().map(|d| d.response_ids.clone()).collect();
        let trainable: Vec<Vec<bool>> = demos.iter().map(|d| d.trainable.clone()).collect();
        let pair = (prompts.as_slice(), responses.as_slice());
        let mask = Some(trainable.as_slice());
        let loss = sft_step(model, &mut opt, w.lr, pair, mask, env.tok.pad)?;
        pb.inc(1);
        if step % w.eval_every == 0 || step == w.max_steps {
            let acc = runner.evaluate(model, &env.tok, w.eval_size, max_new)?;
            if warmup_checkpoint(metrics, pb, step, loss, acc)? >= w.target_acc {
                return Ok(step);
            }
        }
    }
    Ok(w.max_steps)
}

/// One supervised step: the mean negative log-likelihood of the response tokens after their
/// prompts, over the tokens `trainable` marks (all of them when None); returns the loss.
fn sft_step(
    model: &Llama,
    opt: &mut AdamW,
    lr: f64,
    (prompts, responses): (&[Vec<u32>], &[Vec<u32>]),
    trainable: Option<&[Vec<bool>]>,
    pad: u32,
) -> Result<f64> {
    let b = batch::build(prompts, responses, pad, model.device())?;
    let (lp, _) = batch::response_logprobs(model, &b, 1.0)?;
    let mut valid = b.valid.clone();
    if let Some(mask) = trainable {
        for (row, m) in valid.iter_mut().zip(mask) {
            for (v, t) in row.iter_mut().zip(m) {
                *v *= f64::from(u8::from(*t));
            }
        }
    }
    let n: f64 = valid.iter().flatten().sum();
    let flat: Vec<f32> = valid.iter().flatten().map(|&x| x as f32).collect();
    let valid = candle_core::Tensor::from_vec(flat, (valid.len(), b.resp_len), model.device())?;
    let loss = ((lp * &valid)?.sum_all()?.neg()? / n.max(1.0))?;
    let grads = loss.backward()?;
    opt.step(&grads, lr, 1.0)?;
    Ok(loss.to_scalar::<f32>()? as f64)
}

/// Logs a warm-up evaluation (metrics line and progress bar); returns the accuracy.
fn warmup_checkpoint(
    metrics: &mut JsonlWriter,
    pb: &indicatif::ProgressBar,
    step: usize,
    loss: f64,
    acc: f64,
) -> Result<f64> {
    let mut m = Metrics::new();
    m.insert("loss/sft".into(), loss);
    m.insert("acc/eval".into(), acc);
    metrics.write(&report::metrics_line(step, "warmup", &m))?;
    pb.set_message(format!(
        "sft loss {loss:.3} | held-out acc {:.1}%",
        acc * 100.0
    ));
    Ok(acc)
}
