//! Benchmark: sampling from a GGUF model on its quantized weights (`QuantizedLlama`, candle's
//! `QMatMul`) against the same file dequantized to f32 (`Llama`, the training path).
//!
//!   cargo run --release --example gguf_sampling -- MODEL.gguf [BATCH] [NEW_TOKENS]
//!
//! Each path runs in its own child process (this binary again), so the peak resident memory
//! (VmHWM) of one does not hide the other's; the parent prints both side by side with the CPU.
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use grove::model::{io, CausalLm, QuantizedLlama};
use grove::rollout::{generate, SamplingParams};
use rand::SeedableRng;

const PROMPT: &str = "Question: Natalia sold clips to 48 of her friends in April, and then she \
                      sold half as many clips in May. How many clips did Natalia sell altogether?\nAnswer:";

fn run_one(path_kind: &str, model: &Path, batch: usize, new_tokens: usize) -> grove::Result<()> {
    let start = Instant::now();
    let (model, tok): (Box<dyn CausalLm>, _) = match path_kind {
        "quantized" => {
            let (m, t) = QuantizedLlama::load_gguf(model, &Device::Cpu)?;
            (Box::new(m), t)
        }
        _ => {
            let (m, t) = io::load_gguf(model, &Device::Cpu)?;
            (Box::new(m), t)
        }
    };
    let load_s = start.elapsed().as_secs_f64();
    let mut ids: Vec<u32> = tok.bos.into_iter().collect();
    ids.extend(tok.encode(PROMPT)?);
    let prompts = vec![ids; batch];
    // Sampled at temperature 1 with no EOS (u32::MAX is no token id), so every sequence
    // decodes exactly `new_tokens` tokens.
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: new_tokens,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let warm = SamplingParams {
        max_new_tokens: 2,
        ..params.clone()
    };
    generate(model.as_ref(), &prompts, u32::MAX, tok.pad, &warm, &mut rng)?;
    let start = Instant::now();
    let gens = generate(
        model.as_ref(),
        &prompts,
        u32::MAX,
        tok.pad,
        &params,
        &mut rng,
    )?;
    let secs = start.elapsed().as_secs_f64();
    let tokens: usize = gens.iter().map(|g| g.tokens.len()).sum();
    println!(
        "{}",
        serde_json::json!({
            "path": path_kind,
            "load_s": load_s,
            "tokens": tokens,
            "tokens_per_s": tokens as f64 / secs,
            "peak_rss_gb": grove::bench::peak_rss_gb(),
        })
    );
    Ok(())
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() -> grove::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: gguf_sampling MODEL.gguf [BATCH] [NEW_TOKENS]";
    let model = args
        .get(1)
        .ok_or_else(|| grove::Error::Model(usage.into()))?;
    let num = |i: usize, default: usize| -> grove::Result<usize> {
        match args.get(i) {
            None => Ok(default),
            Some(s) => s
                .parse()
                .map_err(|_| grove::Error::Model(format!("{usage}: {s:?} is not a count"))),
        }
    };
    let (batch, new_tokens) = (num(2, 8)?, num(3, 64)?);
    if let Ok(kind) = std::env::var("GGUF_BENCH_CHILD") {
        return run_one(&kind, Path::new(model), batch, new_tokens);
    }
    let exe = std::env::current_exe().map_err(|e| grove::Error::Model(e.to_string()))?;
    println!(
        "{model}: batch {batch}, {new_tokens} new tokens, {} threads, {}",
        rayon::current_num_threads(),
        cpu_name()
    );
    for kind in ["quantized", "dequantized"] {
        let out = Command::new(&exe)
            .args(&args[1..])
            .env("GGUF_BENCH_CHILD", kind)
            .output()
            .map_err(|e| grove::Error::Model(e.to_string()))?;
        if !out.status.success() {
            return Err(grove::Error::Model(format!(
                "{kind} run failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}
