//! `grove experiment`.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

/// The NAME argument's help, listing the experiments from their table.
fn name_help() -> String {
    let names: Vec<&str> = grove::experiment::EXPERIMENTS
        .iter()
        .map(|e| e.name)
        .collect();
    format!("The experiment: {} (docs/experiments/)", names.join(", "))
}

#[derive(Args)]
pub struct ExperimentArgs {
    /// The experiment (docs/experiments/).
    #[arg(help = name_help())]
    pub name: String,
    /// Seeds, comma-separated.
    #[arg(long, default_value = "0,1,2")]
    pub seeds: String,
    /// Overrides applied to every run (e.g. --set train.steps=200).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Where the runs go.
    #[arg(long, default_value = "runs/experiments")]
    pub runs_dir: PathBuf,
    /// Where the table and plot go (default: RUNS_DIR/NAME, next to the runs).
    #[arg(long, conflicts_with = "publish")]
    pub out: Option<PathBuf>,
    /// Update the committed page docs/experiments/NAME.md (and .png) instead, keeping its
    /// hand-written "## Reading" section; run from the repository root.
    #[arg(long)]
    pub publish: bool,
    /// Resume runs whose folder already exists under RUNS_DIR (a finished run is read back,
    /// not trained again; its config must match): seeds run as separate processes, e.g.
    /// `--seeds 1` in parallel, are then gathered into one page.
    #[arg(long)]
    pub reuse: bool,
}

pub fn run(args: ExperimentArgs) -> Result<()> {
    let ExperimentArgs {
        name,
        seeds,
        set,
        runs_dir,
        out,
        publish,
        reuse,
    } = args;
    let exp = grove::experiment::find(&name)?;
    let seeds: Vec<u64> = seeds
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .with_context(|| format!("--seeds: {s:?} is not an integer"))
        })
        .collect::<Result<_>>()?;
    let mut command = format!(
        "grove experiment {name} --seeds {}",
        seeds
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    for s in &set {
        command.push_str(&format!(" --set {s}"));
    }
    let out = grove::experiment::output_dir(&runs_dir, &name, out.as_deref(), publish);
    let path =
        grove::experiment::run_experiment(exp, &seeds, &set, &runs_dir, &out, &command, reuse)?;
    println!("wrote {}", path.display());
    Ok(())
}
