//! `grove bench`: sampling and training throughput for a model shape, as one JSON line, so
//! speed can be tracked over time. Weights are random (seeded); only the shape matters.
use std::time::Instant;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::compute::optim::{AdamW, AdamWParams};
use crate::error::{Error, Result};
use crate::model::batch;
use crate::model::{Config, Llama};
use crate::rollout::{generate, SamplingParams};

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
    /// Precision of the matrix products (`model.dtype`).
    pub dtype: crate::model::bf16::Dtype,
    /// Train a LoRA adapter of this rank on all projections instead of every weight.
    pub lora_rank: Option<usize>,
    /// Keep the LoRA run's frozen base projections in Q4_0 blocks (quantized in process).
    pub q4_base: bool,
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
            dtype: Default::default(),
            lora_rank: None,
            q4_base: false,
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
    /// Best-of-reps phase times of the training step (each the minimum over repetitions, so
    /// they need not add up to `train_step_s` exactly).
    pub train_forward_s: f64,
    pub train_backward_s: f64,
    pub train_optimizer_s: f64,
    /// Matmul FLOPs of the phase (counted from the shapes, `train_matmul_flops`) per second
    /// of the whole phase: a lower bound on the GEMMs' own rate.
    pub forward_matmul_gflops: f64,
    pub backward_matmul_gflops: f64,
    pub peak_rss_gb: f64,
}

/// Matmul FLOPs (forward, backward) of one training step over `batch` sequences of `seq`
/// tokens of which the last `resp` reach the output layer: 2·m·n·k per product; attention
/// counted over the full t×t score matrix as computed; backward = 2 × forward (one product
/// for the input gradient, one for the weight gradient).
pub fn train_matmul_flops(cfg: &Config, batch: usize, seq: usize, resp: usize) -> (f64, f64) {
    let (h, i, v) = (
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.vocab_size as f64,
    );
    let (nh, nkv, hd) = (
        cfg.num_attention_heads as f64,
        cfg.num_kv_heads() as f64,
        cfg.head_dim() as f64,
    );
    let tokens = (batch * seq) as f64;
    let per_token_layer = 2.0 * (h * nh * hd + 2.0 * h * nkv * hd + nh * hd * h + 3.0 * h * i);
    let attention = 2.0 * 2.0 * (batch as f64) * nh * (seq as f64) * (seq as f64) * hd;
    let layers = cfg.num_hidden_layers as f64;
    let head = 2.0 * (batch * resp) as f64 * h * v;
    let fwd = layers * (tokens * per_token_layer + attention) + head;
    (fwd, 2.0 * fwd)
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

/// The default `--train-seq`: 256 tokens, or the model's positions when it has fewer (the
/// built-in policy has 64).
pub fn default_train_seq(cfg: &Config) -> usize {
    256.min(cfg.max_positions())
}

/// Checks that every sequence the bench builds fits the model's positions; the message names
/// the flag, its value and the limit.
pub fn check_positions(cfg: &Config, opts: &BenchOptions) -> Result<()> {
    let limit = cfg.max_positions();
    let too_long = |flag: &str, n: usize| {
        Err(Error::config(
            "grove bench",
            format!(
                "{flag} {n} exceeds the model's {limit} positions (max_position_embeddings); \
                 give at most {limit}"
            ),
        ))
    };
    if opts.train_seq > limit {
        return too_long("--train-seq", opts.train_seq);
    }
    if opts.prompt_len + opts.new_tokens > limit {
        return too_long(
            &format!("--new-tokens (plus the {}-token prompt)", opts.prompt_len),
            opts.prompt_len + opts.new_tokens,
        );
    }
    Ok(())
}

/// Which model a benchmark times: products at `dtype`; with `lora_rank` a fresh LoRA adapter
/// on the frozen base, kept in Q4_0 blocks with `q4_base`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ModelVariant {
    pub dtype: crate::model::bf16::Dtype,
    pub lora_rank: Option<usize>,
    pub q4_base: bool,
}

impl ModelVariant {
    /// Random weights of `cfg` (seed 0) in this variant. A Q4_0 base is quantized here from the
    /// random f32 weights (as a GGUF file would hold them): every projection's input size must
    /// be a multiple of 32.
    pub fn build(&self, cfg: &Config) -> Result<Llama> {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = crate::compute::device();
        let mut model = Llama::init(cfg, 0, &dev)?;
        if self.q4_base {
            if self.lora_rank.is_none() {
                return Err(Error::Usage {
                    option: "--q4-base".into(),
                    msg: "needs --lora-rank: a quantized base is frozen, only an adapter trains"
                        .into(),
                });
            }
            let mut blocks = std::collections::HashMap::new();
            for (name, t) in model.base_tensors()? {
                let dtype = match name.ends_with("_proj.weight") {
                    true => GgmlDType::Q4_0,
                    false => GgmlDType::F32,
                };
                let q = QTensor::quantize(&t, dtype).map_err(|e| Error::Usage {
                    option: "--q4-base".into(),
                    msg: format!("cannot quantize `{name}` {:?} to Q4_0: {e}", t.dims()),
                })?;
                blocks.insert(name, q);
            }
            drop(model);
            model = Llama::frozen_quantized(cfg, blocks, &dev, "bench (Q4_0)")?;
        }
        if let Some(rank) = self.lora_rank {
            let lora = crate::model::lora::LoraConfig {
                rank,
                ..Default::default()
            };
            model = model.with_lora(&lora, 0, "bench")?;
        }
        model.with_dtype(self.dtype)
    }
}

/// Sets this process's peak resident memory (VmHWM) back to its current size, so that
/// [`peak_rss_gb`] reports the peak of what follows (a model's f32 initialisation before it
/// is quantized or rounded is not part of training). Linux only; elsewhere nothing happens.
pub fn reset_peak_rss() {
    // Freed heap pages stay resident until the allocator returns them: without the trim the
    // "peak" would start from the discarded f32 initialisation's footprint.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of glibc's heap; it touches no live block.
    unsafe {
        libc::malloc_trim(0);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn run(cfg: &Config, opts: &BenchOptions) -> Result<BenchResult> {
    check_positions(cfg, opts)?;
    let dev = crate::compute::device();
    let model = ModelVariant {
        dtype: opts.dtype,
        lora_rank: opts.lora_rank,
        q4_base: opts.q4_base,
    }
    .build(cfg)?;
    reset_peak_rss();
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
    let mut best = [f64::INFINITY; 4]; // step, forward, backward, optimizer
    for _ in 0..opts.reps + 1 {
        let t = Instant::now();
        let (lp, _) = batch::response_logprobs_with(&model, &b, 1.0, opts.logprobs)?;
        let loss = lp.mean_all()?.neg()?;
        let _ = loss.to_scalar::<f32>()?;
        let t_fwd = t.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        let t_bwd = t.elapsed().as_secs_f64();
        opt.step(&grads, 1e-5, 1.0)?;
        let total = t.elapsed().as_secs_f64();
        for (slot, v) in best
            .iter_mut()
            .zip([total, t_fwd, t_bwd - t_fwd, total - t_bwd])
        {
            *slot = slot.min(v);
        }
    }
    let step_s = best[0];
    let flops = train_matmul_flops(cfg, opts.train_batch, opts.train_seq, opts.train_seq - half);
    Ok(BenchResult {
        params: model.num_params(),
        threads: rayon::current_num_threads(),
        sample_tokens_per_s: sampled / sample_s,
        sample_s,
        train_tokens_per_s: (opts.train_batch * opts.train_seq) as f64 / step_s,
        train_step_s: step_s,
        train_forward_s: best[1],
        train_backward_s: best[2],
        train_optimizer_s: best[3],
        forward_matmul_gflops: flops.0 / best[1] / 1e9,
        backward_matmul_gflops: flops.1 / best[2] / 1e9,
        peak_rss_gb: peak_rss_gb(),
    })
}

/// Named model shapes of the performance targets (docs/performance.md): random weights, HF
/// config semantics.
pub const PRESETS: &[&str] = &["anchor", "spike", "qwen2.5-0.5b", "qwen2.5-1.5b"];

/// `anchor`: the TRL GRPO anchor (Qwen2, hidden 256, 4 layers, 4/2 heads, FFN 704, tied,
/// GPT-2 vocabulary 50257); `spike`: the same body over an 8192 vocabulary (the training-step
/// target); `qwen2.5-0.5b`, `qwen2.5-1.5b`: those models' shapes.
pub fn preset(name: &str) -> Option<Config> {
    let qwen2 = |vocab, hidden, layers, heads, kv, ffn, max_pos| Config {
        model_type: Some("qwen2".into()),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv),
        head_dim: None,
        rms_norm_eps: Some(1e-6),
        rope_theta: Some(1_000_000.0),
        rope_parameters: None,
        max_position_embeddings: Some(max_pos),
        tie_word_embeddings: Some(true),
        attention_bias: None,
        bos_token_id: None,
        eos_token_id: None,
        hidden_act: Some("silu".into()),
        architectures: Some(vec!["Qwen2ForCausalLM".into()]),
        torch_dtype: Some("float32".into()),
    };
    match name {
        "anchor" => Some(qwen2(50257, 256, 4, 4, 2, 704, 512)),
        "spike" => Some(qwen2(8192, 256, 4, 4, 2, 704, 512)),
        "qwen2.5-0.5b" => Some(qwen2(151936, 896, 24, 14, 2, 4864, 32768)),
        "qwen2.5-1.5b" => Some(qwen2(151936, 1536, 28, 12, 2, 8960, 32768)),
        _ => None,
    }
}

/// What the RL-step benchmark reports: medians over the timed steps.
#[derive(Debug, Clone, Serialize)]
pub struct RlStepResult {
    pub params: usize,
    pub threads: usize,
    pub steps_timed: usize,
    pub step_s: f64,
    pub generate_s: f64,
    pub train_s: f64,
    pub sampled_tokens_per_step: f64,
    pub reward_mean: f64,
    pub peak_rss_gb: f64,
}

/// The reward of the anchor task: 1 when the completion, trimmed, starts with the sum;
/// `partial` also gives 0.5 to a completion containing any digit (TRL anchor's sanity
/// variant, which makes advantages non-zero for a random model).
pub fn sum_reward(completion: &str, answer: &str, partial: bool) -> f64 {
    let c = completion.trim();
    if c.starts_with(answer) {
        1.0
    } else if partial && c.chars().any(|ch| ch.is_ascii_digit()) {
        0.5
    } else {
        0.0
    }
}

/// The TRL anchor's task: 256 fixed prompts "a+b=" (a, b < 100, seeded), drawn at random,
/// scored by [`sum_reward`].
struct AnchorTask {
    problems: Vec<crate::task::Problem>,
    partial: bool,
}

impl AnchorTask {
    fn new(partial: bool) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let problems = (0..256)
            .map(|_| {
                let (a, b) = (rng.gen_range(0..100u32), rng.gen_range(0..100u32));
                crate::task::Problem {
                    prompt: format!("{a}+{b}="),
                    answer: (a + b).to_string(),
                }
            })
            .collect();
        AnchorTask { problems, partial }
    }
}

impl crate::task::Task for AnchorTask {
    fn sample_train(&self, rng: &mut ChaCha8Rng) -> crate::task::Problem {
        self.problems[rng.gen_range(0..self.problems.len())].clone()
    }
    fn heldout(&self) -> &[crate::task::Problem] {
        &self.problems
    }
    fn verify(&self, response: &str, _finished: bool, reference: &str) -> crate::reward::Verdict {
        let score = sum_reward(response, reference, self.partial);
        crate::reward::Verdict {
            score,
            reason: format!("sum reward {score}"),
            extracted: None,
        }
    }
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => 0.5 * (xs[n / 2 - 1] + xs[n / 2]),
    }
}

/// Full GRPO steps of grove's own learner on the TRL anchor work: `prompts` prompts
/// "a+b=" (a, b < 100) × `group` samples, up to `new_tokens` tokens at temperature 1, the
/// sum reward, GRPO advantages, PPO-clip with token-mean aggregation (TRL's `dapo`), lr 1e-5,
/// no KL, AdamW with gradient clipping at 1, on the model `variant` of `model_cfg`. Steps
/// 3..=`steps` are timed (TRL anchor: median of steps 3–10); the peak memory is that of the
/// steps (and the model they hold), not of building the model.
#[allow(clippy::too_many_arguments)]
pub fn rl_step(
    model_cfg: &Config,
    variant: &ModelVariant,
    tokenizer: crate::model::Tokenizer,
    steps: usize,
    prompts: usize,
    group: usize,
    new_tokens: usize,
    partial_reward: bool,
) -> Result<RlStepResult> {
    use crate::train::explore::{collect, Env, ExploreState};
    use crate::train::learn::Learner;

    let model = variant.build(model_cfg)?;
    reset_peak_rss();
    let params = model.num_params();
    let mut cfg = crate::config::RunConfig::default();
    cfg.rollout.prompts_per_step = prompts;
    cfg.rollout.group_size = group;
    cfg.rollout.max_new_tokens = new_tokens;
    cfg.rollout.temperature = 1.0;
    cfg.rollout.top_p = 1.0;
    cfg.advantage = Default::default(); // grpo
    cfg.loss = crate::loss::LossConfig::default();
    cfg.sampling = Default::default();
    cfg.train.lr = 1e-5;
    cfg.train.lr_warmup_steps = 0;
    cfg.train.grad_clip = 1.0;
    cfg.train.log_samples = 0;
    let mut explore_st = ExploreState::new(&cfg, 0)?;
    let env = Env {
        task: Box::new(AnchorTask::new(partial_reward)),
        model_path: None,
        cfg: crate::config::validate(cfg, "bench", crate::config::Purpose::Inspect)?,
        tok: tokenizer,
        environment: None,
    };
    let scratch = std::env::temp_dir().join(format!("grove-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| crate::error::Error::io(&scratch, e))?;
    let opt = AdamW::new(model.params(), AdamWParams::default());
    let mut learner = Learner::new(model, opt, &scratch, 0)?;
    let (mut gen_s, mut train_s, mut tot_s) = (vec![], vec![], vec![]);
    let (mut tokens, mut reward_sum, mut reward_n) = (0usize, 0f64, 0usize);
    for step in 1..=steps {
        let t = Instant::now();
        let groups = collect(&env, &learner.model, learner.version, &mut explore_st)?;
        for e in groups.iter().flat_map(|g| &g.experiences) {
            tokens += e.response_ids.len();
            reward_sum += e.reward;
            reward_n += 1;
        }
        let g = t.elapsed().as_secs_f64();
        learner.learn(&env, &groups, step, g, 0)?;
        let total = t.elapsed().as_secs_f64();
        if step >= 3 || steps < 3 {
            gen_s.push(g);
            train_s.push(total - g);
            tot_s.push(total);
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(RlStepResult {
        params,
        threads: rayon::current_num_threads(),
        steps_timed: tot_s.len(),
        step_s: median(&mut tot_s),
        generate_s: median(&mut gen_s),
        train_s: median(&mut train_s),
        sampled_tokens_per_step: tokens as f64 / steps.max(1) as f64,
        reward_mean: reward_sum / reward_n.max(1) as f64,
        peak_rss_gb: peak_rss_gb(),
    })
}

/// One operation of the per-operation profile: best-of-reps forward and backward seconds of
/// grove's fused kernel and of the composed reference, at one layer's training shapes.
#[derive(Debug, Clone, Serialize)]
pub struct OpTiming {
    pub op: String,
    pub shape: String,
    pub fused_fwd_s: f64,
    pub fused_bwd_s: f64,
    pub composed_fwd_s: f64,
    pub composed_bwd_s: f64,
}

/// A matmul of the training step timed alone: (m × k) · (k × n).
#[derive(Debug, Clone, Serialize)]
pub struct GemmTiming {
    pub what: String,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub seconds: f64,
    pub gflops: f64,
}

fn best_of<F: FnMut() -> Result<()>>(reps: usize, mut f: F) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..reps + 1 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn rand_tensor(shape: &[usize], rng: &mut ChaCha8Rng, dev: &candle_core::Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

/// Per-operation profile of one decoder layer at `batch` × `seq` tokens: each fused op against
/// its composed reference (forward, and backward of Σ y ⊙ r), and the step's GEMM shapes
/// timed alone (GFLOP/s against the machine's peak).
pub fn ops_profile(
    cfg: &Config,
    batch: usize,
    seq: usize,
    reps: usize,
) -> Result<(Vec<OpTiming>, Vec<GemmTiming>)> {
    use crate::model::fused;
    use candle_core::Var;
    let dev = crate::compute::device();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (h, nh, hd, inter) = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.head_dim(),
        cfg.intermediate_size,
    );
    type OpFn = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;
    /// (name, shape label, input shapes, fused op, composed reference)
    type OpCase = (String, String, Vec<Vec<usize>>, OpFn, OpFn);
    let mut ops: Vec<OpCase> = vec![];
    ops.push((
        "rms_norm".into(),
        format!("({batch}, {seq}, {h})"),
        vec![vec![batch, seq, h], vec![h]],
        Box::new(|t: &[Tensor]| fused::rms_norm(&t[0], &t[1], 1e-6)),
        Box::new(|t: &[Tensor]| fused::rms_norm_composed(&t[0], &t[1], 1e-6)),
    ));
    ops.push((
        "rope".into(),
        format!("({batch}, {nh}, {seq}, {hd})"),
        vec![
            vec![batch, nh, seq, hd],
            vec![batch, seq, hd / 2],
            vec![batch, seq, hd / 2],
        ],
        Box::new(|t: &[Tensor]| fused::rope(&t[0], &t[1], &t[2])),
        Box::new(|t: &[Tensor]| fused::rope_composed(&t[0], &t[1], &t[2])),
    ));
    let valid = vec![vec![true; seq]; batch];
    let mask = crate::model::attention_mask(&valid, 0, seq, &dev)?;
    let (m1, m2) = (mask.clone(), mask.clone());
    let scale = 1.0 / (hd as f64).sqrt();
    ops.push((
        "masked_softmax".into(),
        format!("({batch}, {nh}, {seq}, {seq})"),
        vec![vec![batch, nh, seq, seq]],
        Box::new(move |t: &[Tensor]| fused::masked_softmax(&t[0], &m1, scale)),
        Box::new(move |t: &[Tensor]| fused::masked_softmax_composed(&t[0], &m2, scale)),
    ));
    ops.push((
        "swiglu".into(),
        format!("({batch}, {seq}, {inter})"),
        vec![vec![batch, seq, inter], vec![batch, seq, inter]],
        Box::new(|t: &[Tensor]| fused::swiglu(&t[0], &t[1])),
        Box::new(|t: &[Tensor]| fused::swiglu_composed(&t[0], &t[1])),
    ));
    let nkv = cfg.num_kv_heads();
    let cos = rand_tensor(&[batch, seq, hd / 2], &mut rng, &dev)?;
    let sin = rand_tensor(&[batch, seq, hd / 2], &mut rng, &dev)?;
    let (c1, s1, m1) = (cos.clone(), sin.clone(), mask.clone());
    ops.push((
        "attention".into(),
        format!("({batch}, {seq}, {nh}/{nkv} heads × {hd})"),
        vec![
            vec![batch, seq, nh * hd],
            vec![batch, seq, nkv * hd],
            vec![batch, seq, nkv * hd],
        ],
        Box::new(move |t: &[Tensor]| {
            fused::attention(&t[0], &t[1], &t[2], &c1, &s1, &m1, nh, nkv, scale)
        }),
        Box::new(move |t: &[Tensor]| {
            fused::attention_composed(&t[0], &t[1], &t[2], &cos, &sin, &mask, nh, nkv, scale)
        }),
    ));
    ops.push((
        "linear".into(),
        format!("({batch}, {seq}, {h}) × ({inter}, {h})ᵀ"),
        vec![vec![batch, seq, h], vec![inter, h]],
        Box::new(|t: &[Tensor]| fused::linear(&t[0], &t[1])),
        Box::new(|t: &[Tensor]| fused::linear_composed(&t[0], &t[1])),
    ));
    ops.push((
        "gate_up_swiglu".into(),
        format!("({batch}, {seq}, {h}) × 2 × ({inter}, {h})ᵀ"),
        vec![vec![batch, seq, h], vec![inter, h], vec![inter, h]],
        Box::new(|t: &[Tensor]| fused::gate_up_swiglu(&t[0], &t[1], &t[2])),
        Box::new(|t: &[Tensor]| fused::gate_up_swiglu_composed(&t[0], &t[1], &t[2])),
    ));
    let mut out = vec![];
    for (name, shape, shapes, fused_f, composed_f) in ops {
        let vars: Vec<Var> = shapes
            .iter()
            .map(|s| Ok(Var::from_tensor(&rand_tensor(s, &mut rng, &dev)?)?))
            .collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        // The output's shape (for linear and attention it differs from the first input's).
        let r = rand_tensor(fused_f(&ts)?.dims(), &mut rng, &dev)?;
        let mut timings = [0f64; 4];
        for (k, f) in [&fused_f, &composed_f].into_iter().enumerate() {
            timings[2 * k] = best_of(reps, || {
                let _ = f(&ts)?;
                Ok(())
            })?;
            let y = f(&ts)?;
            let loss = (&y * &r)?.sum_all()?;
            timings[2 * k + 1] = best_of(reps, || {
                let _ = loss.backward()?;
                Ok(())
            })?;
        }
        out.push(OpTiming {
            op: name,
            shape,
            fused_fwd_s: timings[0],
            fused_bwd_s: timings[1],
            composed_fwd_s: timings[2],
            composed_bwd_s: timings[3],
        });
    }
    let tokens = batch * seq;
    let mut gemms = vec![];
    for (what, m, k, n) in [
        ("q_proj", tokens, h, nh * hd),
        ("gate_proj", tokens, h, inter),
        ("down_proj", tokens, inter, h),
        ("square 2048", 2048, 2048, 2048),
    ] {
        let a = rand_tensor(&[m, k], &mut rng, &dev)?;
        let w = rand_tensor(&[n, k], &mut rng, &dev)?;
        let secs = best_of(reps, || {
            let _ = a.matmul(&w.t()?)?;
            Ok(())
        })?;
        gemms.push(GemmTiming {
            what: what.into(),
            m,
            k,
            n,
            seconds: secs,
            gflops: 2.0 * (m * k * n) as f64 / secs / 1e9,
        });
    }
    Ok((out, gemms))
}

/// One linear-layer product timed in f32 and on every bf16 kernel the CPU has (same shape,
/// same run).
#[derive(Debug, Clone, Serialize)]
pub struct Bf16GemmTiming {
    pub what: String,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub f32_s: f64,
    pub f32_gflops: f64,
    /// One entry per kernel, slowest kind first (`Widen`: the f32 fallback, `Avx512Bf16`,
    /// `Amx`).
    pub bf16: Vec<Bf16KernelTiming>,
}

/// One bf16 kernel's time for a [`Bf16GemmTiming`].
#[derive(Debug, Clone, Serialize)]
pub struct Bf16KernelTiming {
    pub kernel: String,
    pub s: f64,
    pub gflops: f64,
    /// f32 seconds / these seconds.
    pub speedup: f64,
}

/// The linear layers' products at a model's shapes, f32 against each bf16 kernel (weights
/// stored in bf16, activations and gradients f32 and rounded inside the timed call, as the
/// bf16 model runs them): the forward y = x·wᵀ of each projection at `tokens` rows and at
/// `decode_rows`, and the backward ∂x = g·w and ∂w = gᵀ·x of the gate projection. A weight's
/// packed panels are made before the timing, as full-parameter bf16 training keeps them per
/// update. The f32 forward runs through the fused linear layer (its decode path included); the
/// backward through the f32 GEMM.
pub fn bf16_gemm_profile(
    cfg: &Config,
    tokens: usize,
    decode_rows: usize,
    reps: usize,
) -> Result<Vec<Bf16GemmTiming>> {
    use crate::model::fused;
    let dev = crate::compute::device();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let (q_out, kv_out) = (
        cfg.num_attention_heads * cfg.head_dim(),
        cfg.num_kv_heads() * cfg.head_dim(),
    );
    let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
    let mut out = vec![];
    let forwards = [
        ("q_proj", tokens, h, q_out),
        ("k_proj", tokens, h, kv_out),
        ("gate_proj", tokens, h, inter),
        ("down_proj", tokens, inter, h),
        ("gate_proj decode", decode_rows, h, inter),
    ];
    for (what, m, k, n) in forwards {
        let x = rand_tensor(&[m, k], &mut rng, &dev)?;
        let w = rand_tensor(&[n, k], &mut rng, &dev)?;
        let (xv, wv) = (
            x.flatten_all()?.to_vec1::<f32>()?,
            w.flatten_all()?.to_vec1::<f32>()?,
        );
        let f32_s = best_of(reps, || {
            let _ = fused::linear(&x, &w)?;
            Ok(())
        })?;
        let bf16 = bf16_kernel_timings((m, k, n), f32_s, reps, &xv, (k, 1), &wv, (1, k))?;
        out.push(bf16_timing(what, (m, k, n), f32_s, bf16));
    }
    // ∂x (tokens, h) = g (tokens, inter) · w (inter, h); ∂w (inter, h) = gᵀ · x (tokens, h).
    let g: Vec<f32> = (0..tokens * inter)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    let x: Vec<f32> = (0..tokens * h)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    let w: Vec<f32> = (0..inter * h)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    let mut dx = vec![0f32; tokens * h];
    let mut dw = vec![0f32; inter * h];
    let f32_s = best_of(reps, || {
        fused::gemm_into(&mut dx, tokens, h, inter, &g, (inter, 1), &w, (h, 1), par);
        Ok(())
    })?;
    let shape = (tokens, inter, h);
    let bf16 = bf16_kernel_timings(shape, f32_s, reps, &g, (inter, 1), &w, (h, 1))?;
    out.push(bf16_timing("gate_proj ∂x = g·w", shape, f32_s, bf16));
    let f32_s = best_of(reps, || {
        fused::gemm_into(&mut dw, inter, h, tokens, &g, (1, inter), &x, (h, 1), par);
        Ok(())
    })?;
    // Both operands are activations: nothing to keep packed, so the timing includes it.
    let shape = (inter, tokens, h);
    let bf16 = bf16_kernel_timings(shape, f32_s, reps, &g, (1, inter), &x, (h, 1))?;
    out.push(bf16_timing("gate_proj ∂w = gᵀ·x", shape, f32_s, bf16));
    Ok(out)
}

/// C (m, n) = A·B timed on every bf16 kernel the CPU has: A f32 (rounded in the call), B
/// rounded to bf16 beforehand and its panels packed before the timing.
#[allow(clippy::too_many_arguments)]
fn bf16_kernel_timings(
    (m, k, n): (usize, usize, usize),
    f32_s: f64,
    reps: usize,
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
) -> Result<Vec<Bf16KernelTiming>> {
    use crate::model::bf16::{self, Bf16Kernel, Operand, PackedB};
    let bb = bf16::to_bf16(b);
    let (ao, bo) = (Operand::F32(a), Operand::Bf16(&bb));
    let mut c = vec![0f32; m * n];
    let mut out = vec![];
    for kernel in Bf16Kernel::available() {
        let packed = std::sync::OnceLock::new();
        if kernel != Bf16Kernel::Widen {
            let _ = packed.set(PackedB::new(bo, b_strides, k, n));
        }
        let mut ran = kernel;
        let s = best_of(reps, || {
            ran = bf16::gemm_bf16_cached(
                kernel, &mut c, false, m, n, k, ao, a_strides, bo, b_strides, &packed,
            );
            Ok(())
        })?;
        let flops = 2.0 * (m * k * n) as f64;
        out.push(Bf16KernelTiming {
            kernel: format!("{ran:?}"),
            s,
            gflops: flops / s / 1e9,
            speedup: f32_s / s,
        });
    }
    Ok(out)
}

fn bf16_timing(
    what: &str,
    (m, k, n): (usize, usize, usize),
    f32_s: f64,
    bf16: Vec<Bf16KernelTiming>,
) -> Bf16GemmTiming {
    let flops = 2.0 * (m * k * n) as f64;
    Bf16GemmTiming {
        what: what.into(),
        m,
        k,
        n,
        f32_s,
        f32_gflops: flops / f32_s / 1e9,
        bf16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_model_gets_a_train_seq_within_its_positions() {
        let cfg = Config::builtin_tiny(19);
        assert_eq!(cfg.max_positions(), 64);
        assert_eq!(default_train_seq(&cfg), 64);
        let fits = BenchOptions {
            train_seq: default_train_seq(&cfg),
            ..Default::default()
        };
        check_positions(&cfg, &fits).unwrap();
        // The old default (256 tokens) failed deep inside the model with an index error.
        let e = check_positions(&cfg, &BenchOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--train-seq 256") && e.contains("64 positions"),
            "{e}"
        );
        let e = check_positions(
            &cfg,
            &BenchOptions {
                train_seq: 64,
                new_tokens: 60,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--new-tokens") && e.contains("68"), "{e}");
    }
}
