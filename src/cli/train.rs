//! `grove train`.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct TrainArgs {
    /// A TOML run config: see examples/*.toml, docs/configuration.md (every key) and
    /// `grove recipes`; `grove config --defaults` prints the defaults. With --resume: the run's
    /// own config again, which supplies its secrets (saved as `***`) and confirms its external
    /// programs; it must equal the recorded config.
    pub config: Option<PathBuf>,
    /// Override a value: --set section.key=value (repeatable). With --resume only a secret the
    /// run directory holds as `***` may be given (the rest must equal the recorded config).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue the run in RUN_DIR from its latest checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// With --resume: start the external programs (reward commands) that RUN_DIR's
    /// config.toml names; without it such a resume stops and lists them.
    #[arg(long, requires = "resume")]
    pub trust_commands: bool,
    /// Stop after this RL step (a checkpoint is written), as if interrupted.
    #[arg(long, value_name = "STEP")]
    pub stop_after: Option<usize>,
    /// Train from experiences in this buffer (sqlite:PATH or postgres://...[#table]),
    /// written by `grove explore` processes (sets sync.buffer).
    #[arg(long, value_name = "URL")]
    pub buffer: Option<String>,
    /// With --buffer: publish versioned weights here for explorers (sets sync.publish_dir).
    #[arg(long, value_name = "DIR")]
    pub publish_dir: Option<String>,
    /// Train from an experience JSONL file (sets sync.offline).
    #[arg(long, value_name = "FILE")]
    pub offline: Option<String>,
    /// The policy to train (sets model.source): an HF folder, a .gguf file, a grove
    /// checkpoint or hf://ORG/NAME (needs `--features hub`).
    #[arg(long, value_name = "MODEL")]
    pub model: Option<String>,
    /// No plan, progress bar or summary.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let TrainArgs {
        config,
        mut set,
        resume,
        trust_commands,
        stop_after,
        buffer,
        publish_dir,
        offline,
        model,
        quiet,
    } = args;
    for (key, v) in [
        ("buffer", buffer),
        ("publish_dir", publish_dir),
        ("offline", offline),
    ] {
        if let Some(v) = v {
            set.push(format!("sync.{key}={}", super::toml_string(&v)));
        }
    }
    if let Some(m) = model {
        set.push(format!("model.source={}", super::toml_string(&m)));
    }
    train(config, set, resume, trust_commands, stop_after, quiet)
}

fn train(
    config: Option<PathBuf>,
    set: Vec<String>,
    resume: Option<PathBuf>,
    trust_commands: bool,
    stop_after: Option<usize>,
    quiet: bool,
) -> Result<()> {
    use grove::config::{resume::resume_config, validate, Purpose};
    let run = match &resume {
        Some(dir) => {
            let raw = resume_config(dir, config.as_deref(), &set, trust_commands)?;
            let source = dir.join("config.toml").display().to_string();
            validate(raw, &source, Purpose::Resume)?
        }
        None => grove::config::load(config.as_deref(), &set)?,
    };
    if !quiet {
        for w in run.warnings() {
            eprintln!("warning: {w}");
        }
    }
    let opts = grove::train::TrainOptions {
        resume,
        stop_after,
        quiet,
    };
    let s = grove::train::run(run, &opts)?;
    if !quiet && s.already_finished {
        println!(
            "the run had already finished: {} RL steps; held-out accuracy {:.1}% after warm-up \
             -> {:.1}% at the last evaluation (metrics.jsonl); nothing trained",
            s.rl_steps_done,
            s.acc_after_warmup * 100.0,
            s.acc_final * 100.0,
        );
        println!("run directory: {}", s.run_dir.display());
    } else if !quiet {
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
