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
        /// Train from experiences in this buffer (sqlite:PATH or postgres://...[#table]),
        /// written by `grove explore` processes (sets sync.buffer).
        #[arg(long, value_name = "URL")]
        buffer: Option<String>,
        /// With --buffer: publish versioned weights here for explorers (sets sync.publish_dir).
        #[arg(long, value_name = "DIR")]
        publish_dir: Option<String>,
        /// Train from an experience JSONL file (sets sync.offline).
        #[arg(long, value_name = "FILE")]
        offline: Option<String>,
        /// The policy to train (sets model.source): an HF folder, a .gguf file, a grove
        /// checkpoint or hf://ORG/NAME (needs `--features hub`).
        #[arg(long, value_name = "MODEL")]
        model: Option<String>,
        /// No plan, progress bar or summary.
        #[arg(long)]
        quiet: bool,
    },
    /// Sample experience groups into a shared buffer (for `grove train --buffer`) or a JSONL file.
    Explore {
        /// A TOML run config (the same one the learner uses).
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Write groups to this JSONL file (offline data).
        #[arg(long, value_name = "FILE", conflicts_with = "buffer")]
        out: Option<PathBuf>,
        /// Put groups into this buffer URL.
        #[arg(long, value_name = "URL")]
        buffer: Option<String>,
        /// Follow the learner's published weights in this folder.
        #[arg(long, value_name = "DIR")]
        weights: Option<PathBuf>,
        /// Sample with the weights of a grove checkpoint (runs/NAME/checkpoints/step-N).
        #[arg(long, value_name = "CKPT_DIR", conflicts_with = "weights")]
        policy: Option<PathBuf>,
        /// Sample through this OpenAI-compatible completions server (vLLM, SGLang, llama.cpp,
        /// `grove serve`) instead of local weights (sets remote.url; see [remote] in the README).
        #[arg(long, value_name = "URL", conflicts_with_all = ["weights", "policy"])]
        remote: Option<String>,
        /// Stop after this many groups.
        #[arg(long)]
        groups: Option<usize>,
        /// Explorer number 1, 2, ...: separate explorers draw different prompts.
        #[arg(long, default_value_t = 1)]
        explorer_id: u64,
        #[arg(long)]
        quiet: bool,
    },
    /// Run a small-scale reproduction (e.g. rec-offpolicy): table and plot under docs/experiments/.
    Experiment {
        name: String,
        /// Seeds, comma-separated.
        #[arg(long, default_value = "0,1,2")]
        seeds: String,
        /// Overrides applied to every run (e.g. --set train.steps=200).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Where the runs go.
        #[arg(long, default_value = "runs/experiments")]
        runs_dir: PathBuf,
        /// Where the table and plot go.
        #[arg(long, default_value = "docs/experiments")]
        out: PathBuf,
    },
    /// Serve a model on an OpenAI-compatible completions endpoint (POST /v1/completions with
    /// per-token log-probs, GET /v1/models), for `grove explore --remote`.
    Serve {
        /// A grove checkpoint (runs/NAME/checkpoints/step-N) or an HF model folder, each with
        /// config.json, model.safetensors and tokenizer.json.
        model: PathBuf,
        /// TCP port; 0 picks a free one. The first stdout line is "listening on HOST:PORT".
        #[arg(long, default_value_t = 8000)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The model name clients send (default: MODEL as given).
        #[arg(long)]
        name: Option<String>,
        /// No per-request log lines on stderr.
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
        /// An HF config.json, model folder or GGUF file giving the shape (weights are random),
        /// "builtin" for the quickstart policy, or a preset of docs/performance.md: anchor,
        /// spike, qwen2.5-0.5b.
        #[arg(long, default_value = "builtin")]
        model: String,
        /// Time full GRPO steps of the TRL anchor work instead (needs --tokenizer).
        #[arg(long)]
        rl_step: bool,
        /// tokenizer.json for --rl-step (the anchor uses GPT-2's).
        #[arg(long, value_name = "tokenizer.json")]
        tokenizer: Option<PathBuf>,
        /// RL steps for --rl-step; steps 3.. are timed.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Reward for --rl-step: exact (starts with the sum) or partial (also 0.5 for a digit).
        #[arg(long, default_value = "exact")]
        reward: String,
        /// Per-operation profile instead: fused vs composed ops and GEMM GFLOP/s.
        #[arg(long, conflicts_with = "rl_step")]
        ops: bool,
        /// Token log-probs of the training step: auto (chunked above 4096 tokens), composed
        /// (full log-softmax) or chunked.
        #[arg(long, default_value = "auto")]
        logprobs: String,
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
        model: PathBuf,
        /// The output folder (created).
        out: PathBuf,
    },
    /// Sample n responses per question from a model and report pass@k, mean@n and maj@n.
    Eval {
        /// An HF model folder, a .gguf file or a grove checkpoint (runs/NAME/checkpoints/step-N).
        model: PathBuf,
        /// gsm8k, math500 or builtin (the arithmetic task's held-out split).
        #[arg(long)]
        task: String,
        /// Samples per question.
        #[arg(long, default_value_t = 1)]
        n: usize,
        /// The k of pass@k, comma-separated, each at most n (default: 1 and n).
        #[arg(long)]
        k: Option<String>,
        /// Only the first L questions.
        #[arg(long)]
        limit: Option<usize>,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Default: 512 (gsm8k), 1024 (math500), longest answer + 1 (builtin).
        #[arg(long)]
        max_new_tokens: Option<usize>,
        /// Per-question results as JSONL.
        #[arg(long, value_name = "FILE.jsonl")]
        out: Option<PathBuf>,
        /// The dataset file (default: ../shared/data/<task>/test.jsonl).
        #[arg(long, value_name = "PATH")]
        data: Option<PathBuf>,
        /// base or chat (default: chat when the model has a chat template).
        #[arg(long)]
        prompt_style: Option<String>,
        /// Sequences decoded together.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
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

/// A TOML string literal for `--set` (paths may contain characters TOML would misread).
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
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
    grove::tuning::process();
    let cli = Cli::parse();
    match cli.cmd {
        Command::Train {
            config,
            mut set,
            resume,
            stop_after,
            buffer,
            publish_dir,
            offline,
            model,
            quiet,
        } => {
            for (key, v) in [
                ("buffer", buffer),
                ("publish_dir", publish_dir),
                ("offline", offline),
            ] {
                if let Some(v) = v {
                    set.push(format!("sync.{key}={}", toml_string(&v)));
                }
            }
            if let Some(m) = model {
                set.push(format!("model.source={}", toml_string(&m)));
            }
            train(config, set, resume, stop_after, quiet)?
        }
        Command::Explore {
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
        } => {
            if let Some(url) = remote {
                set.push(format!("remote.url={}", toml_string(&url)));
            }
            let cfg = grove::config::load(config.as_deref(), &set)?;
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
        }
        Command::Experiment {
            name,
            seeds,
            set,
            runs_dir,
            out,
        } => {
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
            let path =
                grove::experiment::run_experiment(exp, &seeds, &set, &runs_dir, &out, &command)?;
            println!("wrote {}", path.display());
        }
        Command::Serve {
            model,
            port,
            host,
            name,
            quiet,
        } => {
            let opts = grove::rollout::serve::ServeOptions {
                host,
                port,
                name,
                quiet,
            };
            grove::rollout::serve::run(&model, &opts)?;
        }
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
            let dev = grove::train::device();
            let (m, tok) = grove::model::io::load_pretrained(&model, &dev)?;
            grove::model::io::save_pretrained(&m, &tok, &out)?;
            println!(
                "{} ({} parameters) -> {}",
                model.display(),
                m.num_params(),
                out.display()
            );
        }
        Command::Eval {
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
        } => {
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
                temperature,
                top_p,
                max_new_tokens,
                data,
                out: out.clone(),
                prompt_style,
                batch_size,
                seed,
                progress: !quiet,
            };
            let report = run_eval(&model, &opts)?;
            println!("{report}");
            if let Some(out) = out {
                println!("per-question results: {}", out.display());
            }
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
            logprobs,
            sample_batch,
            new_tokens,
            train_batch,
            train_seq,
            reps,
            rl_step,
            tokenizer,
            steps,
            reward,
            ops,
        } => {
            let cfg = if let Some(c) = grove::bench::preset(&model) {
                c
            } else if model == "builtin" {
                let c = grove::config::RunConfig::default();
                grove::train::builtin_shape(
                    &c,
                    grove::model::Tokenizer::builtin_arithmetic().vocab_size(),
                )
            } else {
                grove::model::io::load_config(std::path::Path::new(&model))?
            };
            if rl_step {
                let path = tokenizer.ok_or_else(|| {
                    anyhow::anyhow!(
                        "--rl-step needs --tokenizer tokenizer.json (the anchor uses GPT-2's)"
                    )
                })?;
                let partial = match reward.as_str() {
                    "exact" => false,
                    "partial" => true,
                    other => anyhow::bail!("--reward {other:?}: expected exact or partial"),
                };
                let tok = grove::model::Tokenizer::from_file(
                    &path,
                    None,
                    "<|endoftext|>",
                    Some("<|endoftext|>"),
                )?;
                let r = grove::bench::rl_step(&cfg, tok, steps, 8, 8, new_tokens, partial)?;
                let mut v = serde_json::to_value(&r)?;
                v["model"] = serde_json::Value::String(model);
                v["reward"] = serde_json::Value::String(reward);
                println!("{}", serde_json::to_string(&v)?);
                return Ok(());
            }
            if ops {
                let (op_t, gemm_t) = grove::bench::ops_profile(&cfg, train_batch, train_seq, reps)?;
                for o in op_t {
                    println!("{}", serde_json::to_string(&o)?);
                }
                for g in gemm_t {
                    println!("{}", serde_json::to_string(&g)?);
                }
                return Ok(());
            }
            let opts = grove::bench::BenchOptions {
                sample_batch,
                new_tokens,
                train_batch,
                train_seq,
                reps,
                logprobs: logprobs.parse().map_err(anyhow::Error::msg)?,
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
