//! `grove bench`.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct BenchArgs {
    /// An HF config.json, model folder or GGUF file giving the shape (weights are random),
    /// "builtin" for the quickstart policy, or a preset of docs/performance.md: anchor,
    /// spike, qwen2.5-0.5b, qwen2.5-1.5b.
    #[arg(long, default_value = "builtin")]
    pub model: String,
    /// Time full GRPO steps of the TRL anchor work instead (needs --tokenizer).
    #[arg(long)]
    pub rl_step: bool,
    /// tokenizer.json for --rl-step (the anchor uses GPT-2's).
    #[arg(long, value_name = "tokenizer.json")]
    pub tokenizer: Option<PathBuf>,
    /// RL steps for --rl-step; steps 3.. are timed.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Reward for --rl-step: exact (starts with the sum) or partial (also 0.5 for a digit).
    #[arg(long, default_value = "exact")]
    pub reward: String,
    /// Per-operation profile instead: fused vs composed ops and GEMM GFLOP/s.
    #[arg(long, conflicts_with = "rl_step")]
    pub ops: bool,
    /// Throughput of `grove serve` instead: tokens/s with each of --clients concurrent
    /// clients, batched and one request at a time (docs/performance.md); the tokenizer is
    /// --tokenizer, or the built-in one for --model builtin.
    #[arg(long, conflicts_with_all = ["rl_step", "ops"])]
    pub serve: bool,
    /// Concurrent clients for --serve.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 64])]
    pub clients: Vec<usize>,
    /// The linear layers' products in f32 and in bf16 instead (GFLOP/s of each, same run),
    /// at train-batch × train-seq rows and at sample-batch rows (decoding).
    #[arg(long, conflicts_with_all = ["rl_step", "ops", "serve"])]
    pub gemm_bf16: bool,
    /// Token log-probs of the training step: auto (chunked above 4096 tokens), composed
    /// (full log-softmax) or chunked.
    #[arg(long, default_value = "auto")]
    pub logprobs: String,
    /// Sequences sampled together (8-token random prompts).
    #[arg(long, default_value_t = 64)]
    pub sample_batch: usize,
    /// Tokens generated per sequence; with the prompt at most the model's positions.
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Sequences per timed training step.
    #[arg(long, default_value_t = 8)]
    pub train_batch: usize,
    /// Tokens per training sequence (default: 256, or the model's positions when fewer:
    /// 64 for builtin); at most the model's positions.
    #[arg(long)]
    pub train_seq: Option<usize>,
    /// Precision of the matrix products: f32 or bf16 (as `model.dtype`).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Train a LoRA adapter of this rank (all projections) instead of every weight.
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// With --lora-rank: keep the frozen base projections in Q4_0 blocks (quantized from the
    /// random weights in process), as a LoRA run on a Q4_0 GGUF base does.
    #[arg(long, requires = "lora_rank")]
    pub q4_base: bool,
    /// Prompts per step for --rl-step.
    #[arg(long, default_value_t = 8)]
    pub prompts: usize,
    /// Samples per prompt for --rl-step.
    #[arg(long, default_value_t = 8)]
    pub group: usize,
    /// Timed repetitions, after one untimed warm-up repetition.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let BenchArgs {
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
        serve,
        clients,
        gemm_bf16,
        dtype,
        lora_rank,
        q4_base,
        prompts,
        group,
    } = args;
    let dtype = grove::model::bf16::Dtype::from_name(&dtype)
        .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
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
    let train_seq = train_seq.unwrap_or_else(|| grove::bench::default_train_seq(&cfg));
    if rl_step {
        let path = tokenizer.ok_or_else(|| {
            anyhow::anyhow!("--rl-step needs --tokenizer tokenizer.json (the anchor uses GPT-2's)")
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
        let variant = grove::bench::ModelVariant {
            dtype,
            lora_rank,
            q4_base,
        };
        let r = grove::bench::rl_step(
            &cfg, &variant, tok, steps, prompts, group, new_tokens, partial,
        )?;
        let mut v = serde_json::to_value(&r)?;
        v["model"] = serde_json::Value::String(model);
        v["dtype"] = serde_json::Value::String(dtype.name().into());
        v["lora_rank"] = serde_json::json!(lora_rank);
        v["q4_base"] = serde_json::json!(q4_base);
        v["prompts"] = serde_json::json!(prompts);
        v["group"] = serde_json::json!(group);
        v["new_tokens"] = serde_json::json!(new_tokens);
        v["reward"] = serde_json::Value::String(reward);
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    if serve {
        return serve_throughput(&cfg, &model, tokenizer, &clients, new_tokens);
    }
    if gemm_bf16 {
        let rows = train_batch * train_seq;
        for t in grove::bench::bf16_gemm_profile(&cfg, rows, sample_batch, reps)? {
            println!("{}", serde_json::to_string(&t)?);
        }
        return Ok(());
    }
    if ops {
        grove::bench::check_positions(
            &cfg,
            &grove::bench::BenchOptions {
                train_seq,
                ..Default::default()
            },
        )?;
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
        dtype,
        lora_rank,
        q4_base,
        ..Default::default()
    };
    let r = grove::bench::run(&cfg, &opts)?;
    let mut v = serde_json::to_value(&r)?;
    v["model"] = serde_json::Value::String(model);
    v["dtype"] = serde_json::Value::String(dtype.name().into());
    v["lora_rank"] = serde_json::json!(lora_rank);
    v["q4_base"] = serde_json::json!(q4_base);
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}

/// `grove bench --serve`: JSON lines per concurrency, then the markdown table.
fn serve_throughput(
    cfg: &grove::model::Config,
    model: &str,
    tokenizer: Option<PathBuf>,
    clients: &[usize],
    new_tokens: usize,
) -> Result<()> {
    use grove::rollout::serve::throughput;
    if clients.is_empty() || clients.contains(&0) {
        anyhow::bail!("--clients must be positive numbers, found {clients:?}");
    }
    let make_tok = || -> grove::error::Result<grove::model::Tokenizer> {
        match &tokenizer {
            Some(p) => {
                grove::model::Tokenizer::from_file(p, None, "<|endoftext|>", Some("<|endoftext|>"))
            }
            None if model == "builtin" => Ok(grove::model::Tokenizer::builtin_arithmetic()),
            None => Err(grove::error::Error::Usage {
                option: "--tokenizer".into(),
                msg: format!("--serve with --model {model} needs --tokenizer tokenizer.json"),
            }),
        }
    };
    let dev = candle_core::Device::Cpu;
    let make_model = || grove::model::Llama::init(cfg, 0, &dev);
    let rows = throughput::measure(&make_model, &make_tok, clients, new_tokens)?;
    for r in &rows {
        let mut v = serde_json::to_value(r)?;
        v["model"] = serde_json::Value::String(model.to_string());
        println!("{}", serde_json::to_string(&v)?);
    }
    print!("{}", throughput::table(&rows, new_tokens));
    Ok(())
}
