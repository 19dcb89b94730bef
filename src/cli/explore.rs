//! `grove explore`.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct ExploreArgs {
    /// A TOML run config (the same one the learner uses).
    pub config: Option<PathBuf>,
    /// Override a value: --set section.key=value (repeatable), as for `grove train`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Write groups to this JSONL file (offline data).
    #[arg(long, value_name = "FILE", conflicts_with = "buffer")]
    pub out: Option<PathBuf>,
    /// Put groups into this buffer URL.
    #[arg(long, value_name = "URL")]
    pub buffer: Option<String>,
    /// Follow the learner's published weights in this folder.
    #[arg(long, value_name = "DIR")]
    pub weights: Option<PathBuf>,
    /// Sample with the weights of a grove checkpoint (runs/NAME/checkpoints/step-N).
    #[arg(long, value_name = "CKPT_DIR", conflicts_with = "weights")]
    pub policy: Option<PathBuf>,
    /// Sample through this OpenAI-compatible completions server (vLLM, SGLang, llama.cpp,
    /// `grove serve`) instead of local weights (sets remote.url; see [remote] in the README).
    /// With --weights DIR the learner's published weights are pushed to the server
    /// (remote.admin_token).
    #[arg(long, value_name = "URL", conflicts_with = "policy")]
    pub remote: Option<String>,
    /// Stop after this many groups. Default: one step's worth with --out; with --buffer, until
    /// the learner finishes (its finished.json in --weights DIR) or the buffer stays full for
    /// sync.wait_timeout_s (600 s) because nobody takes from it.
    #[arg(long)]
    pub groups: Option<usize>,
    /// Explorer number 1, 2, ...: separate explorers draw different prompts.
    #[arg(long, default_value_t = 1)]
    pub explorer_id: u64,
    /// No progress lines and no stop message.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: ExploreArgs) -> Result<()> {
    let ExploreArgs {
        config,
        mut set,
        out,
        buffer,
        weights,
        policy,
        remote,
        groups,
        explorer_id,
        quiet,
    } = args;
    if let Some(url) = remote {
        set.push(format!("remote.url={}", super::toml_string(&url)));
    }
    let cfg = grove::config::load_for(config.as_deref(), &set, grove::config::Purpose::Explore)?;
    let opts = grove::train::explorer::ExploreOptions {
        out,
        buffer,
        weights,
        policy,
        groups,
        explorer_id,
        quiet,
    };
    let n = grove::train::explorer::run_explorer(cfg, &opts)?;
    if !quiet {
        println!("{n} groups written");
    }
    Ok(())
}
