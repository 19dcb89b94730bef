//! `grove rm-train`.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct RmTrainArgs {
    /// JSONL: prompt, chosen, rejected, optional strength (1-3) and chosen/rejected_rating.
    #[arg(long)]
    pub data: PathBuf,
    /// bt, margin-bt, scaled-bt, regression or regression-then-scaled-bt.
    #[arg(long, default_value = "bt")]
    pub loss: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    /// Output folder: config.json, model.safetensors (head: score.weight), tokenizer.json.
    #[arg(long, default_value = "rm")]
    pub out: PathBuf,
    /// Preference pairs per step.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// regression-then-scaled-bt: regression steps before the switch.
    #[arg(long, default_value_t = 200)]
    pub switch_step: u64,
    /// Fraction of the pairs held out for the accuracy (0 to 1).
    #[arg(long, default_value_t = 0.1)]
    pub heldout_frac: f64,
    /// Held-out pairwise accuracy every this many steps.
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    /// Seed of the split, the initialisation and the batches.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Weight of an auxiliary language-modelling loss on the chosen responses (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub lm_coef: f64,
    /// Start the body from a model folder (e.g. a grove checkpoint) instead of scratch.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// No per-evaluation lines, only the final summary.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: RmTrainArgs) -> Result<()> {
    let RmTrainArgs {
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
    } = args;
    rm_train(
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
    )
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
    let report = train_reward_model(&opts, &grove::compute::device(), |p| {
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
