//! `grove eval`.
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub report: Option<EvalReport>,
    /// An HF model folder, a .gguf file or a grove checkpoint (runs/NAME/checkpoints/step-N).
    #[arg(required = true)]
    pub model: Option<PathBuf>,
    /// gsm8k, math500, builtin (the arithmetic task's held-out split) or an environment kind
    /// (countdown, guess, ...: its held-out episodes, configured as in the checkpoint's run).
    #[arg(long, required = true)]
    pub task: Option<String>,
    /// Samples per question (with n > 1 the default temperature is 1.0).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// The k of pass@k, comma-separated, each at most n (default: 1 and n).
    #[arg(long)]
    pub k: Option<String>,
    /// Only the first L questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Sampling temperature; 0 is greedy. Default: 0 (greedy) with --n 1, which is what
    /// training's held-out accuracy (acc/eval) reports, so the figures compare; 1.0 with
    /// --n > 1 (pass@k and maj@n need distinct samples). The header line says which.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Default: 512 (gsm8k), 1024 (math500), longest answer + 1 (builtin).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Per-question results as JSONL.
    #[arg(long, value_name = "FILE.jsonl")]
    pub out: Option<PathBuf>,
    /// The dataset file (default: ../shared/data/<task>/test.jsonl).
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// base or chat (default: chat when the model has a chat template).
    #[arg(long)]
    pub prompt_style: Option<String>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Seed of the sampling (no effect when greedy).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// A LoRA adapter folder (PEFT format) to apply to MODEL.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
}

/// Reports over files that earlier `grove eval --out` runs (or other tools) wrote.
#[derive(Subcommand)]
pub enum EvalReport {
    /// Weak-to-strong deception: among the questions the weak-supervised strong model gets
    /// wrong and the strong ceiling gets right, the fraction the weak supervisor also gets
    /// wrong (docs/algorithms.md#evaluation). Each file is JSONL keyed by `index` or `id`,
    /// with a boolean `correct` or a `grove eval --out` record.
    Deception {
        /// Correctness of the strong model trained on the weak model's labels.
        #[arg(long, value_name = "FILE.jsonl")]
        weak_to_strong: PathBuf,
        /// Correctness of the strong model trained on ground truth (the ceiling).
        #[arg(long, value_name = "FILE.jsonl")]
        ceiling: PathBuf,
        /// Correctness of the weak supervisor.
        #[arg(long, value_name = "FILE.jsonl")]
        weak: PathBuf,
        /// Also list the keys of the qualifying questions (weak also wrong first).
        #[arg(long)]
        list: bool,
    },
}

fn run_report(report: EvalReport) -> Result<()> {
    match report {
        EvalReport::Deception {
            weak_to_strong,
            ceiling,
            weak,
            list,
        } => {
            let r = grove::eval::deception::run([&weak_to_strong, &ceiling, &weak])?;
            println!("{r}");
            if list {
                let (fooled, other) = r.qualifying_keys.split_at(r.weak_also_wrong);
                println!("weak also wrong: {}", fooled.join(" "));
                println!("weak right: {}", other.join(" "));
            }
            Ok(())
        }
    }
}

pub fn run(args: EvalArgs) -> Result<()> {
    let EvalArgs {
        report,
        model,
        task,
        n,
        k,
        limit,
        temperature,
        top_p,
        max_new_tokens,
        out,
        data,
        prompt_style,
        batch_size,
        seed,
        quiet,
        adapter,
    } = args;
    if let Some(report) = report {
        return run_report(report);
    }
    let (Some(model), Some(task)) = (model, task) else {
        bail!("grove eval needs MODEL and --task (or a report: grove eval deception ...)");
    };
    use grove::eval::runner::{parse_ks, run_eval, EvalOptions};
    use grove::task::datasets::PromptStyle;
    let ks = match k {
        Some(k) => parse_ks(&k)?,
        None if n > 1 => vec![1, n],
        None => vec![1],
    };
    let prompt_style = match prompt_style.as_deref() {
        None => None,
        Some("base") => Some(PromptStyle::Base),
        Some("chat") => Some(PromptStyle::Chat),
        Some(other) => bail!("--prompt-style {other:?}: expected base or chat"),
    };
    let opts = EvalOptions {
        task: task.parse().map_err(anyhow::Error::msg)?,
        n,
        ks,
        limit,
        temperature: temperature.unwrap_or_else(|| grove::eval::runner::default_temperature(n)),
        top_p,
        max_new_tokens,
        data,
        out: out.clone(),
        prompt_style,
        batch_size,
        seed,
        progress: !quiet,
    };
    let report = match adapter {
        None => run_eval(&model, &opts)?,
        Some(dir) => {
            let dev = grove::compute::device();
            let (base, tok) = grove::model::io::load_pretrained(&model, &dev)?;
            let m = grove::model::lora::load_onto(base, &dir, &model.display().to_string())?;
            grove::eval::runner::run_eval_with(&m, &tok, &model, &opts)?
        }
    };
    println!("{report}");
    if let Some(out) = out {
        println!("per-question results: {}", out.display());
    }
    Ok(())
}
