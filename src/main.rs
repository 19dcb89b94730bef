//! The `grove` command line: a thin layer over the library.
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "grove",
    version,
    about = "Reinforcement-learning post-training of language models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a policy. With no CONFIG, runs the built-in quickstart recipe.
    Train {
        /// A TOML run config (see configs/ and `grove recipes`).
        config: Option<PathBuf>,
        /// Override a value: --set section.key=value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue the run in RUN_DIR from its latest checkpoint.
        #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "set"])]
        resume: Option<PathBuf>,
        /// Stop after this RL step (a checkpoint is written), as if interrupted.
        #[arg(long, value_name = "STEP")]
        stop_after: Option<usize>,
        /// No plan, progress bar or summary.
        #[arg(long)]
        quiet: bool,
    },
    /// List the recipes: named presets of config values, with their papers.
    Recipes,
    /// Advantage calculator: reads {"groups": [[r, ...], ...]} on stdin, prints advantages.
    Advantage {
        #[arg(long)]
        estimator: String,
        /// key=value for an advantage config field (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
    },
    /// Loss calculator: reads {"logp": [[...]], "logp_old": [[...]], "adv": [...]} on stdin,
    /// prints the aggregated loss and its gradient w.r.t. each token log-prob.
    Loss {
        #[arg(long)]
        loss: String,
        #[arg(long)]
        agg: Option<String>,
        /// key=value for a loss config field (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
    },
    /// Write a preference set from the built-in arithmetic task: correct answer preferred to a
    /// perturbed one, strength 1–3 by how wrong (JSONL for `grove rm-train`).
    RmData {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 4000)]
        pairs: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Operand digits of the problems (as task.digits).
        #[arg(long, default_value_t = 2)]
        digits: u32,
    },
    /// Train a reward model (scalar head on the policy architecture) on pairwise preferences.
    RmTrain {
        /// JSONL: prompt, chosen, rejected, optional strength (1-3) and chosen/rejected_rating.
        #[arg(long)]
        data: PathBuf,
        /// bt, margin-bt, scaled-bt, regression or regression-then-scaled-bt.
        #[arg(long, default_value = "bt")]
        loss: String,
        #[arg(long, default_value_t = 1000)]
        steps: u64,
        /// Output folder: config.json, model.safetensors (head: score.weight), tokenizer.json.
        #[arg(long, default_value = "rm")]
        out: PathBuf,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// regression-then-scaled-bt: regression steps before the switch.
        #[arg(long, default_value_t = 200)]
        switch_step: u64,
        #[arg(long, default_value_t = 0.1)]
        heldout_frac: f64,
        #[arg(long, default_value_t = 100)]
        eval_every: u64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Weight of an auxiliary language-modelling loss on the chosen responses (0: off).
        #[arg(long, default_value_t = 1.0)]
        lm_coef: f64,
        /// Start the body from a model folder (e.g. a grove checkpoint) instead of scratch.
        #[arg(long)]
        init: Option<PathBuf>,
        #[arg(long)]
        quiet: bool,
    },
    /// Sampling and training throughput of a model shape, as one JSON line.
    Bench {
        /// An HF config.json giving the shape, or "builtin" for the quickstart policy.
        #[arg(long, default_value = "builtin")]
        model: String,
        #[arg(long, default_value_t = 64)]
        sample_batch: usize,
        #[arg(long, default_value_t = 32)]
        new_tokens: usize,
        #[arg(long, default_value_t = 8)]
        train_batch: usize,
        #[arg(long, default_value_t = 256)]
        train_seq: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
}

fn stdin_text() -> Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading stdin")?;
    Ok(s)
}

fn train(
    config: Option<PathBuf>,
    set: Vec<String>,
    resume: Option<PathBuf>,
    stop_after: Option<usize>,
    quiet: bool,
) -> Result<()> {
    let cfg = match &resume {
        Some(dir) => {
            let p = dir.join("config.toml");
            if !p.exists() {
                bail!("{}: not a run directory (no config.toml)", dir.display());
            }
            grove::config::load(Some(&p), &[])?
        }
        None => grove::config::load(config.as_deref(), &set)?,
    };
    let opts = grove::train::TrainOptions {
        resume,
        stop_after,
        quiet,
    };
    let s = grove::train::run(cfg, &opts)?;
    if !quiet {
        println!(
            "held-out accuracy: {:.1}% after warm-up ({} steps) -> {:.1}% after {} RL steps ({:+.1} points) in {:.0} s",
            s.acc_after_warmup * 100.0,
            s.warmup_steps,
            s.acc_final * 100.0,
            s.rl_steps_done,
            (s.acc_final - s.acc_after_warmup) * 100.0,
            s.wall_s
        );
        println!("run directory: {}", s.run_dir.display());
    }
    Ok(())
}

fn rm_train(
    data: PathBuf,
    loss: &str,
    out: PathBuf,
    init: Option<PathBuf>,
    quiet: bool,
    set: impl FnOnce(&mut grove::reward::rm_train::RmTrainOptions),
) -> Result<()> {
    use grove::reward::rm_train::{train_reward_model, RmTrainOptions};
    let loss =
        serde_json::from_value(serde_json::Value::String(loss.to_string())).map_err(|_| {
            anyhow::anyhow!(
                "--loss {loss:?}: expected one of bt, margin-bt, scaled-bt, regression, \
             regression-then-scaled-bt"
            )
        })?;
    let mut opts = RmTrainOptions::new(data, out);
    opts.loss = loss;
    opts.init = init;
    set(&mut opts);
    let report = train_reward_model(&opts, &grove::train::device(), |p| {
        if let (Some(acc), false) = (p.heldout_accuracy, quiet) {
            println!(
                "step {:>5}  loss {:.4}  batch acc {:5.1}%  held-out acc {:5.1}%",
                p.step,
                p.loss,
                p.train_batch_accuracy * 100.0,
                acc * 100.0
            );
        }
    })?;
    println!(
        "held-out pairwise accuracy: {:.1}% -> {:.1}% ({} held-out pairs, {} training pairs, {} steps, {:.0} s); reward model written to {}",
        report.heldout_accuracy_start * 100.0,
        report.heldout_accuracy * 100.0,
        report.heldout_pairs,
        report.train_pairs,
        report.steps,
        report.wall_s,
        report.out.display()
    );
    Ok(())
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Command::Train {
            config,
            set,
            resume,
            stop_after,
            quiet,
        } => train(config, set, resume, stop_after, quiet)?,
        Command::Recipes => {
            for r in grove::config::recipes::RECIPES {
                println!("{:<20} {}  [{}]", r.name, r.description, r.source);
            }
        }
        Command::Advantage { estimator, params } => {
            println!(
                "{}",
                grove::advantage::run_calculator(&stdin_text()?, &estimator, &params)?
            );
        }
        Command::Loss { loss, agg, params } => {
            println!(
                "{}",
                grove::loss::run_calculator(&stdin_text()?, &loss, agg.as_deref(), &params)?
            );
        }
        Command::RmData {
            out,
            pairs,
            seed,
            digits,
        } => {
            let task = grove::task::ArithmeticTask::new(grove::task::ArithmeticConfig {
                digits,
                ..Default::default()
            })
            .map_err(anyhow::Error::msg)?;
            let set = grove::reward::rm_train::arithmetic_preferences(&task, pairs, seed);
            grove::reward::rm_train::write_pairs(&out, &set)?;
            println!("wrote {} preference pairs to {}", set.len(), out.display());
        }
        Command::RmTrain {
            data,
            loss,
            steps,
            out,
            batch_size,
            lr,
            switch_step,
            heldout_frac,
            eval_every,
            seed,
            lm_coef,
            init,
            quiet,
        } => rm_train(
            data,
            &loss,
            out,
            init,
            quiet,
            |o: &mut grove::reward::rm_train::RmTrainOptions| {
                o.steps = steps;
                o.batch_size = batch_size;
                o.lr = lr;
                o.switch_step = switch_step;
                o.heldout_frac = heldout_frac;
                o.eval_every = eval_every;
                o.seed = seed;
                o.lm_coef = lm_coef;
            },
        )?,
        Command::Bench {
            model,
            sample_batch,
            new_tokens,
            train_batch,
            train_seq,
            reps,
        } => {
            let cfg = if model == "builtin" {
                let c = grove::config::RunConfig::default();
                grove::train::builtin_shape(
                    &c,
                    grove::model::Tokenizer::builtin_arithmetic().vocab_size(),
                )
            } else {
                grove::model::Config::from_file(std::path::Path::new(&model))?
            };
            let opts = grove::bench::BenchOptions {
                sample_batch,
                new_tokens,
                train_batch,
                train_seq,
                reps,
                ..Default::default()
            };
            let r = grove::bench::run(&cfg, &opts)?;
            let mut v = serde_json::to_value(&r)?;
            v["model"] = serde_json::Value::String(model);
            println!("{}", serde_json::to_string(&v)?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
