//! The `grove` command line: a thin layer over the library.
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod cli;

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
    Train(cli::train::TrainArgs),
    /// Sample experience groups into a shared buffer (for `grove train --buffer`) or a JSONL file.
    Explore(cli::explore::ExploreArgs),
    /// Run a small-scale reproduction (e.g. rec-offpolicy): table and plot in its runs folder
    /// (docs/experiments/ with --publish).
    Experiment(cli::experiment::ExperimentArgs),
    /// Serve a model on an OpenAI-compatible completions endpoint (POST /v1/completions with
    /// per-token log-probs, GET /v1/models), for `grove explore --remote`.
    Serve {
        /// A grove checkpoint (runs/NAME/checkpoints/step-N) or an HF model folder, each with
        /// config.json, model.safetensors and tokenizer.json.
        model: PathBuf,
        /// TCP port; 0 picks a free one. The first stdout line is "listening on HOST:PORT".
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Address to bind; anything but loopback needs --api-key.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The model name clients send (default: MODEL as given).
        #[arg(long)]
        name: Option<String>,
        /// No per-request log lines on stderr.
        #[arg(long)]
        quiet: bool,
        /// Require `Authorization: Bearer KEY` (default: env GROVE_API_KEY); needed for a
        /// --host other than loopback.
        #[arg(long)]
        api_key: Option<String>,
        /// Deadline for receiving one request (headers and body), seconds.
        #[arg(long, default_value_t = grove::rollout::serve::DEFAULT_REQUEST_TIMEOUT_S)]
        request_timeout_s: f64,
        /// Connections handled at the same time (each waits for its answer from the batch).
        #[arg(long, default_value_t = grove::rollout::serve::DEFAULT_WORKERS)]
        workers: usize,
        /// Sequences (prompts × n) decoded together at most; a larger request runs alone.
        #[arg(long, default_value_t = grove::rollout::serve::DEFAULT_MAX_BATCH)]
        max_batch: usize,
        /// Requests waiting for the batch at most; more are answered 503 with Retry-After.
        #[arg(long, default_value_t = grove::rollout::serve::DEFAULT_MAX_QUEUE)]
        max_queue: usize,
        /// Enables POST /admin/load (new weights or an adapter from a folder) for clients
        /// sending `Authorization: Bearer TOKEN` (default: env GROVE_ADMIN_TOKEN; none: off).
        #[arg(long)]
        admin_token: Option<String>,
    },
    /// Watch and compare runs in the browser: every metric's curve, samples (local page).
    View {
        /// A folder of run directories (runs/) or one run directory.
        #[arg(default_value = "runs")]
        dir: PathBuf,
        /// TCP port; 0 picks a free one. The first stdout line is "listening on URL".
        #[arg(long, default_value_t = 6060)]
        port: u16,
        /// Address to bind (the page has no authentication: keep it on loopback).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// No log lines for failed requests.
        #[arg(long)]
        quiet: bool,
    },
    /// List the recipes: named presets of config values, with their papers.
    Recipes,
    /// Print a config as grove resolves it (file, recipe, --set), the defaults as commented
    /// TOML (--defaults), or the reference of every key as Markdown (--reference, which is
    /// docs/configuration.md).
    Config {
        /// A TOML run config (default: the built-in quickstart).
        #[arg(conflicts_with_all = ["defaults", "reference"])]
        config: Option<PathBuf>,
        /// Override a value: --set section.key=value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with_all = ["defaults", "reference"])]
        set: Vec<String>,
        /// Every key at its default, with its meaning as a comment.
        #[arg(long, conflicts_with = "reference")]
        defaults: bool,
        /// Every key with type, default, allowed values and meaning, as Markdown.
        #[arg(long)]
        reference: bool,
    },
    /// Advantage calculator: reads {"groups": [[r, ...], ...]} on stdin, prints advantages.
    Advantage {
        #[arg(long, help = names_help("Advantage estimator", &grove::advantage::Estimator::known_names()))]
        estimator: String,
        /// key=value for an advantage config field (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
    },
    /// Loss calculator: reads {"logp": [[...]], "logp_old": [[...]], "adv": [...]} on stdin,
    /// prints the aggregated loss and its gradient w.r.t. each token log-prob.
    Loss {
        #[arg(long, help = names_help("Policy loss", &names(grove::loss::PolicyLoss::ALL.iter().map(|l| l.name()))))]
        loss: String,
        #[arg(long, help = names_help("Aggregation over tokens (default: the loss config's, token-mean)", &names(grove::loss::Aggregation::ALL.iter().map(|a| a.name()))))]
        agg: Option<String>,
        /// key=value for a loss config field (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
    },
    /// Write a preference set from the built-in arithmetic task: correct answer preferred to a
    /// perturbed one, strength 1–3 by how wrong (JSONL for `grove rm-train`).
    RmData {
        /// The JSONL file to write.
        #[arg(long)]
        out: PathBuf,
        /// Preference pairs to write.
        #[arg(long, default_value_t = 4000)]
        pairs: usize,
        /// Seed of the problems and perturbations.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Operand digits of the problems (as task.digits).
        #[arg(long, default_value_t = 2)]
        digits: u32,
    },
    /// Train a reward model (scalar head on the policy architecture) on pairwise preferences.
    RmTrain(cli::rm_train::RmTrainArgs),
    /// Sampling and training throughput of a model shape, as one JSON line.
    Bench(cli::bench::BenchArgs),
    /// Score existing model outputs with the math verifier and print the accuracy.
    Verify {
        /// gsm8k or math500: judge --responses against this dataset's reference answers.
        #[arg(long, requires = "responses")]
        task: Option<String>,
        /// JSONL with `index` (dataset row) and `response` on each line.
        #[arg(long, value_name = "FILE.jsonl", requires = "task")]
        responses: Option<PathBuf>,
        /// JSONL with `response` and `reference` on each line; prints every verdict as JSONL
        /// with its audit (correct, rule, reason, extracted, extracted_by, parsed forms).
        #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = ["task", "responses", "data"])]
        pairs: Option<PathBuf>,
        /// The dataset file (default: ../shared/data/<task>/test.jsonl).
        #[arg(long, value_name = "PATH")]
        data: Option<PathBuf>,
        /// Do not fall back to the last math block or number when a response marks no answer.
        #[arg(long)]
        no_last_number: bool,
    },
    /// Write a model (HF folder, .gguf file or grove checkpoint) as an HF folder that
    /// `transformers` loads: config.json, model.safetensors (f32), tokenizer files.
    Export {
        /// An HF model folder, a .gguf file or a grove checkpoint (runs/NAME/checkpoints/step-N).
        model: PathBuf,
        /// The output folder (created).
        out: PathBuf,
    },
    /// Sample n responses per question from a model and report pass@k, mean@n and maj@n.
    Eval(cli::eval::EvalArgs),
    /// Merge a LoRA adapter (PEFT folder or a LoRA run's checkpoint) into its base and write
    /// an HF folder (docs/lora.md).
    Merge {
        /// The base: HF folder, .gguf file or grove checkpoint.
        base: PathBuf,
        /// The adapter folder (adapter_config.json, adapter_model.safetensors).
        adapter: PathBuf,
        /// The output folder (created).
        out: PathBuf,
    },
}

/// Help text that lists the known names, from the table they are declared in.
fn names_help(what: &str, known: &str) -> String {
    format!("{what}: {known}")
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(", ")
}

fn print_config(
    config: Option<PathBuf>,
    set: Vec<String>,
    defaults: bool,
    reference: bool,
) -> Result<()> {
    use grove::config::reference as r;
    if defaults || reference {
        let sections = r::reference().map_err(anyhow::Error::msg)?;
        let text = if defaults {
            r::defaults_toml(&sections)
        } else {
            r::markdown(&sections)
        };
        print!("{text}");
        return Ok(());
    }
    print!(
        "{}",
        grove::config::load_for(config.as_deref(), &set, grove::config::Purpose::Inspect)?
            .to_toml()?
    );
    Ok(())
}

fn stdin_text() -> Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading stdin")?;
    Ok(s)
}

fn verify(
    task: Option<String>,
    responses: Option<PathBuf>,
    pairs: Option<PathBuf>,
    data: Option<PathBuf>,
    no_last_number: bool,
) -> Result<()> {
    use grove::eval::verify as v;
    let verifier = grove::reward::math::MathVerifier {
        last_number_fallback: !no_last_number,
        ..Default::default()
    };
    let summary = match (task, responses, pairs) {
        (_, _, Some(pairs)) => {
            let stdout = std::io::stdout();
            let mut lock = stdout.lock();
            v::verify_pairs(&pairs, &verifier, &mut lock)?
        }
        (Some(task), Some(responses), None) => {
            let kind = v::parse_dataset(&task)?;
            let data = data.unwrap_or_else(|| v::default_data_path(kind));
            let problems = v::load_dataset(kind, &data)?;
            v::verify_responses(&problems, &data, &responses, &verifier)?
        }
        _ => bail!("give --task gsm8k|math500 with --responses FILE.jsonl, or --pairs FILE.jsonl"),
    };
    println!("{summary}");
    Ok(())
}

fn real_main() -> Result<()> {
    grove::compute::tuning::process();
    let cli = Cli::parse();
    match cli.cmd {
        Command::Train(args) => cli::train::run(args)?,
        Command::Explore(args) => cli::explore::run(args)?,
        Command::Experiment(args) => cli::experiment::run(args)?,
        Command::Serve {
            model,
            port,
            host,
            name,
            quiet,
            api_key,
            request_timeout_s,
            workers,
            max_batch,
            max_queue,
            admin_token,
        } => {
            let opts = grove::rollout::serve::ServeOptions {
                host,
                port,
                name,
                quiet,
                api_key,
                request_timeout_s,
                workers,
                batch: grove::rollout::serve::BatchOptions {
                    max_batch,
                    max_queue,
                },
                admin_token,
            }
            .with_env_api_key();
            grove::rollout::serve::run(&model, &opts)?;
        }
        Command::View {
            dir,
            port,
            host,
            quiet,
        } => {
            let opts = grove::view::ViewOptions { host, port, quiet };
            grove::view::serve(&dir, &opts)?;
        }
        Command::Config {
            config,
            set,
            defaults,
            reference,
        } => print_config(config, set, defaults, reference)?,
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
        Command::Verify {
            task,
            responses,
            pairs,
            data,
            no_last_number,
        } => verify(task, responses, pairs, data, no_last_number)?,
        Command::Export { model, out } => {
            let dev = grove::compute::device();
            let (m, tok) = grove::model::io::load_pretrained(&model, &dev)?;
            grove::model::io::save_pretrained(&m, &tok, &out)?;
            println!(
                "{} ({} parameters) -> {}",
                model.display(),
                m.num_params(),
                out.display()
            );
        }
        Command::Eval(args) => cli::eval::run(args)?,
        Command::Merge { base, adapter, out } => {
            let n = grove::model::lora::merge_to_folder(&base, &adapter, &out)?;
            println!(
                "{} + {} ({n} parameters) -> {}",
                base.display(),
                adapter.display(),
                out.display()
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
            let set = grove::task::arithmetic::arithmetic_preferences(&task, pairs, seed);
            grove::reward::rm_train::write_pairs(&out, &set)?;
            println!("wrote {} preference pairs to {}", set.len(), out.display());
        }
        Command::RmTrain(args) => cli::rm_train::run(args)?,
        Command::Bench(args) => cli::bench::run(args)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", grove::error::render_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every argument of every subcommand says what it takes: `--estimator`, `--loss` and
    /// `--agg` once had none.
    #[test]
    fn every_argument_has_help() {
        let cli = super::Cli::command();
        let mut missing = vec![];
        for sub in cli.get_subcommands() {
            for a in sub.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let help = a
                    .get_help()
                    .or(a.get_long_help())
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                if help.trim().is_empty() {
                    missing.push(format!("grove {} {id}", sub.get_name()));
                }
                assert!(!help.contains("configs/"), "{id}: {help}");
            }
        }
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    #[test]
    fn name_flags_list_the_names_of_their_tables() {
        let cli = super::Cli::command();
        let help = |sub: &str, arg: &str| {
            cli.find_subcommand(sub)
                .unwrap()
                .get_arguments()
                .find(|a| a.get_id().as_str() == arg)
                .unwrap()
                .get_help()
                .unwrap()
                .to_string()
        };
        let est = help("advantage", "estimator");
        for e in grove::advantage::Estimator::ALL {
            assert!(est.contains(e.name()), "{est}");
        }
        let loss = help("loss", "loss");
        for l in grove::loss::PolicyLoss::ALL {
            assert!(loss.contains(l.name()), "{loss}");
        }
        let agg = help("loss", "agg");
        for a in grove::loss::Aggregation::ALL {
            assert!(agg.contains(a.name()), "{agg}");
        }
    }
}
