//! `grove bench`: sampling and training throughput for a model shape, as one JSON line, so
//! speed can be tracked over time. Weights are random (seeded); only the shape matters.
use std::time::Instant;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::Result;
use crate::model::{Config, Llama};
use crate::rollout::{generate, SamplingParams};
use crate::train::batch;
use crate::train::optim::{AdamW, AdamWParams};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Sequences sampled at once.
    pub sample_batch: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    /// Training batch: sequences × tokens per sequence.
    pub train_batch: usize,
    pub train_seq: usize,
    /// Timed repetitions (after one warm-up repetition).
    pub reps: usize,
    /// How the training step computes token log-probs (chunked above 4096 tokens by default).
    pub logprobs: batch::LogprobImpl,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            sample_batch: 64,
            prompt_len: 8,
            new_tokens: 32,
            train_batch: 8,
            train_seq: 256,
            reps: 3,
            logprobs: batch::LogprobImpl::Auto,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub params: usize,
    pub threads: usize,
    pub sample_tokens_per_s: f64,
    pub sample_s: f64,
    pub train_tokens_per_s: f64,
    pub train_step_s: f64,
    pub peak_rss_gb: f64,
}

/// Peak resident memory of this process (VmHWM), in GiB; 0 where /proc is unavailable.
pub fn peak_rss_gb() -> f64 {
    let Ok(st) = std::fs::read_to_string("/proc/self/status") else {
        return 0.0;
    };
    st.lines()
        .find(|l| l.starts_with("VmHWM"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1_048_576.0)
        .unwrap_or(0.0)
}

pub fn run(cfg: &Config, opts: &BenchOptions) -> Result<BenchResult> {
    let dev = crate::train::device();
    let model = Llama::init(cfg, 0, &dev)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let v = cfg.vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..opts.sample_batch)
        .map(|_| (0..opts.prompt_len).map(|_| rng.gen_range(0..v)).collect())
        .collect();
    // EOS outside the vocabulary: every sequence generates the full budget.
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: opts.new_tokens,
    };
    let mut sample_s = f64::INFINITY;
    for _ in 0..opts.reps + 1 {
        let t = Instant::now();
        let gens = generate(&model, &prompts, u32::MAX, 0, &params, &mut rng)?;
        let _ = gens.len();
        sample_s = sample_s.min(t.elapsed().as_secs_f64());
    }
    let sampled = (opts.sample_batch * opts.new_tokens) as f64;

    let half = (opts.train_seq / 2).max(1);
    let tp: Vec<Vec<u32>> = (0..opts.train_batch)
        .map(|_| (0..half).map(|_| rng.gen_range(0..v)).collect())
        .collect();
    let tr: Vec<Vec<u32>> = (0..opts.train_batch)
        .map(|_| {
            (0..opts.train_seq - half)
                .map(|_| rng.gen_range(0..v))
                .collect()
        })
        .collect();
    let b = batch::build(&tp, &tr, 0, &dev)?;
    let mut opt = AdamW::new(model.params(), AdamWParams::default());
    let mut step_s = f64::INFINITY;
    for _ in 0..opts.reps + 1 {
        let t = Instant::now();
        let (lp, _) = batch::response_logprobs_with(&model, &b, 1.0, opts.logprobs)?;
        let loss = lp.mean_all()?.neg()?;
        let grads = loss.backward()?;
        opt.step(&grads, 1e-5, 1.0)?;
        let _ = Tensor::zeros(1, candle_core::DType::F32, &dev)?;
        step_s = step_s.min(t.elapsed().as_secs_f64());
    }
    Ok(BenchResult {
        params: model.num_params(),
        threads: rayon::current_num_threads(),
        sample_tokens_per_s: sampled / sample_s,
        sample_s,
        train_tokens_per_s: (opts.train_batch * opts.train_seq) as f64 / step_s,
        train_step_s: step_s,
        peak_rss_gb: peak_rss_gb(),
    })
}
