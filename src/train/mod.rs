//! The training loop, top to bottom: a supervised warm-up on generated solutions, then
//! on-policy RL — sample G responses per prompt, verify, turn rewards into advantages, take
//! one policy-gradient step — with evaluation, metrics and atomic checkpoints along the way.
//!
//! The loss library works on per-token scalars and returns dL/dℓ for every response token
//! (`loss::compute`); the step backpropagates the surrogate Σ g·ℓ through the model, which has
//! exactly the gradient of the chosen loss.
pub mod batch;
pub mod checkpoint;
pub mod optim;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::advantage::{self, Group};
use crate::config::{Plan, RunConfig};
use crate::error::{Error, Result};
use crate::loss::{self, SeqInput};
use crate::model::{Config as ModelShape, Llama, Tokenizer};
use crate::report::{self, JsonlWriter, Metrics};
use crate::reward::exact::exact_answer;
use crate::reward::noise::NoiseInjector;
use crate::reward::Verdict;
use crate::rollout::{generate, Generation, SamplingParams};
use crate::sampling;
use crate::task::{ArithmeticTask, Problem};
use checkpoint::{RngState, TrainState};
use optim::{AdamW, AdamWParams};

#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue the run in this directory from its latest checkpoint.
    pub resume: Option<PathBuf>,
    /// Stop (with a checkpoint) after this RL step, as if interrupted.
    pub stop_after: Option<usize>,
    /// No plan, progress bar or summary on the terminal.
    pub quiet: bool,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub warmup_steps: usize,
    pub acc_after_warmup: f64,
    pub acc_final: f64,
    pub rl_steps_done: usize,
    pub wall_s: f64,
}

/// The compute device: the first CUDA GPU when built with `--features cuda` and one exists.
pub fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::cuda_if_available(0) {
        return d;
    }
    Device::Cpu
}

/// The built-in policy shape for a vocabulary.
pub fn builtin_shape(cfg: &RunConfig, vocab: usize) -> ModelShape {
    let mut s = ModelShape::builtin_tiny(vocab);
    s.hidden_size = cfg.model.hidden_size;
    s.num_hidden_layers = cfg.model.num_layers;
    s.num_attention_heads = cfg.model.num_heads;
    s.num_key_value_heads = Some(cfg.model.num_kv_heads);
    s.intermediate_size = cfg.model.intermediate_size;
    s
}

/// Creates `<output_dir>/<name>`, or `<name>-2`, `<name>-3`, ... when taken: an existing run
/// directory is never reused or touched.
pub fn create_run_dir(output_dir: &Path, name: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(output_dir).map_err(|e| Error::io(output_dir, e))?;
    for i in 1.. {
        let cand = if i == 1 {
            output_dir.join(name)
        } else {
            output_dir.join(format!("{name}-{i}"))
        };
        match std::fs::create_dir(&cand) {
            Ok(()) => return Ok(cand),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&cand, e)),
        }
    }
    unreachable!("the loop above returns")
}

fn rng_stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

fn encode_prompt(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let mut ids = Vec::with_capacity(text.len() + 1);
    if let Some(b) = tok.bos {
        ids.push(b);
    }
    ids.extend(tok.encode(text)?);
    Ok(ids)
}

/// Decoded response text without the EOS, and whether it ended with EOS.
fn response_text(tok: &Tokenizer, g: &Generation) -> Result<String> {
    let body: Vec<u32> = g.tokens.iter().copied().filter(|&t| t != tok.eos).collect();
    tok.decode(&body)
}

/// Greedy held-out accuracy of `model` on `problems`.
pub fn evaluate(
    model: &Llama,
    tok: &Tokenizer,
    problems: &[Problem],
    max_new_tokens: usize,
) -> Result<f64> {
    if problems.is_empty() {
        return Ok(0.0);
    }
    let params = SamplingParams::greedy(max_new_tokens);
    // Greedy decoding draws nothing from the RNG; a fixed one keeps the signature simple.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut correct = 0usize;
    for chunk in problems.chunks(512) {
        let prompts = chunk
            .iter()
            .map(|p| encode_prompt(tok, &p.prompt))
            .collect::<Result<Vec<_>>>()?;
        let gens = generate(model, &prompts, tok.eos, tok.pad, &params, &mut rng)?;
        for (g, p) in gens.iter().zip(chunk) {
            if exact_answer(&response_text(tok, g)?, g.finished, &p.answer).score > 0.5 {
                correct += 1;
            }
        }
    }
    Ok(correct as f64 / problems.len() as f64)
}

/// Everything one run carries from step to step.
pub struct Trainer {
    pub cfg: RunConfig,
    pub run_dir: PathBuf,
    pub model: Llama,
    pub reference: Option<Llama>,
    pub tok: Tokenizer,
    pub task: ArithmeticTask,
    pub opt: AdamW,
    pub prompt_rng: ChaCha8Rng,
    pub sample_rng: ChaCha8Rng,
    pub state_step: usize,
    pub version: u64,
    pub warmup_steps: usize,
    pub acc_after_warmup: f64,
    /// Running statistics of the advantage estimators (noisy-backward's EMA scale).
    pub adv_state: advantage::AdvantageState,
    /// Reward-noise injector of noisy-verifier experiments (None when both rates are 0).
    pub noise: Option<NoiseInjector>,
    metrics: JsonlWriter,
    samples: JsonlWriter,
}

impl Trainer {
    fn max_new_tokens(&self) -> usize {
        self.cfg.rollout.max_new_tokens
    }

    fn heldout(&self) -> &[Problem] {
        let h = self.task.heldout();
        match self.cfg.train.eval_size {
            0 => h,
            n => &h[..n.min(h.len())],
        }
    }

    fn state(&self) -> TrainState {
        TrainState {
            step: self.state_step,
            optimizer_t: self.opt.t,
            version: self.version,
            prompt_rng: RngState::of(&self.prompt_rng),
            sample_rng: RngState::of(&self.sample_rng),
            warmup_steps: self.warmup_steps,
            acc_after_warmup: self.acc_after_warmup,
            adv_state: self.adv_state.clone(),
            noise: self.noise.clone(),
        }
    }

    fn checkpoint(&self) -> Result<PathBuf> {
        checkpoint::save(
            &self.run_dir,
            &self.model,
            &self.opt,
            &self.tok,
            &self.state(),
        )
    }

    /// Supervised warm-up on generated solutions until the held-out stop rule fires.
    fn warmup(&mut self, pb: &indicatif::ProgressBar) -> Result<()> {
        let w = self.cfg.warmup.clone();
        let mut opt = AdamW::new(self.model.params(), AdamWParams::default());
        let eval_set: Vec<Problem> =
            self.task.heldout()[..w.eval_size.min(self.task.heldout().len())].to_vec();
        let mut acc = 0.0;
        let mut steps = 0;
        pb.set_prefix("warm-up");
        pb.set_length(w.max_steps as u64);
        for step in 1..=w.max_steps {
            steps = step;
            let problems: Vec<Problem> = (0..w.batch_size)
                .map(|_| self.task.sample_train(&mut self.prompt_rng))
                .collect();
            let prompts = problems
                .iter()
                .map(|p| encode_prompt(&self.tok, &p.prompt))
                .collect::<Result<Vec<_>>>()?;
            let answers = problems
                .iter()
                .map(|p| {
                    let mut a = self.tok.encode(&p.answer)?;
                    a.push(self.tok.eos);
                    Ok(a)
                })
                .collect::<Result<Vec<_>>>()?;
            let b = batch::build(&prompts, &answers, self.tok.pad, self.model.device())?;
            let (lp, _) = batch::response_logprobs(&self.model, &b, 1.0)?;
            let valid = valid_tensor(&b.valid, self.model.device())?;
            let n: f64 = b.valid.iter().flatten().sum();
            let loss = ((lp * &valid)?.sum_all()?.neg()? / n)?;
            let grads = loss.backward()?;
            opt.step(&grads, w.lr, 1.0)?;
            pb.inc(1);
            if step % w.eval_every == 0 || step == w.max_steps {
                acc = evaluate(&self.model, &self.tok, &eval_set, self.max_new_tokens())?;
                let mut m = Metrics::new();
                m.insert("loss/sft".into(), loss.to_scalar::<f32>()? as f64);
                m.insert("acc/eval".into(), acc);
                self.metrics
                    .write(&report::metrics_line(step, "warmup", &m))?;
                pb.set_message(format!(
                    "sft loss {:.3} | held-out acc {:.1}%",
                    m["loss/sft"],
                    acc * 100.0
                ));
                if acc >= w.target_acc {
                    break;
                }
            }
        }
        self.warmup_steps = steps;
        let _ = acc;
        Ok(())
    }

    /// One RL step; returns its metrics.
    pub fn rl_step(&mut self, step: usize) -> Result<Metrics> {
        let cfg = self.cfg.clone();
        let (np, g) = (cfg.rollout.prompts_per_step, cfg.rollout.group_size);
        let t_start = Instant::now();

        // 1. Prompts and rollouts with the behaviour policy (here: the current weights).
        let problems: Vec<Problem> = (0..np)
            .map(|_| self.task.sample_train(&mut self.prompt_rng))
            .collect();
        let mut prompts = Vec::with_capacity(np * g);
        for p in &problems {
            let ids = encode_prompt(&self.tok, &p.prompt)?;
            prompts.extend(std::iter::repeat(ids).take(g));
        }
        let gens = generate(
            &self.model,
            &prompts,
            self.tok.eos,
            self.tok.pad,
            &cfg.rollout.sampling(),
            &mut self.sample_rng,
        )?;
        let generate_s = t_start.elapsed().as_secs_f64();
        let t_train = Instant::now();

        // 2. TempSamp ground-truth injection: the last sample of each group becomes the
        //    reference solution; its behaviour log-probs are filled in from the current policy.
        let mut gens = gens;
        let mut ground_truth = vec![false; gens.len()];
        if cfg.sampling.inject_ground_truth {
            for (p, prob) in problems.iter().enumerate() {
                let i = p * g + g - 1;
                let mut tokens = self.tok.encode(&prob.answer)?;
                tokens.push(self.tok.eos);
                gens[i] = Generation {
                    logprobs: vec![0.0; tokens.len()],
                    tokens,
                    finished: true,
                };
                ground_truth[i] = true;
            }
        }

        // 3. Rewards from the verifier (then, in noise experiments, corrupted as observed).
        let mut verdicts: Vec<Verdict> = Vec::with_capacity(gens.len());
        let mut texts = Vec::with_capacity(gens.len());
        for (i, gen) in gens.iter().enumerate() {
            let text = response_text(&self.tok, gen)?;
            verdicts.push(exact_answer(&text, gen.finished, &problems[i / g].answer));
            texts.push(text);
        }
        let correct: Vec<bool> = verdicts.iter().map(|v| v.score > 0.5).collect();
        let mut rewards: Vec<f64> = verdicts.iter().map(|v| v.score).collect();
        if let Some(inj) = self.noise.as_mut() {
            for r in rewards.iter_mut() {
                *r = inj
                    .flip(*r)
                    .map_err(|e| Error::Task(format!("noise injector: {e}")))?;
            }
        }

        // 4. Current-policy log-probs (with gradient) and, when KL is used, the reference's.
        let responses: Vec<Vec<u32>> = gens.iter().map(|x| x.tokens.clone()).collect();
        let dev = self.model.device().clone();
        let b = batch::build(&prompts, &responses, self.tok.pad, &dev)?;
        let temp = if cfg.rollout.temperature > 0.0 {
            cfg.rollout.temperature
        } else {
            1.0
        };
        let (lp, lsm) = batch::response_logprobs(&self.model, &b, temp)?;
        let lp_rows = batch::to_f64_rows(&lp)?;
        let ref_rows = match &self.reference {
            Some(r) => Some(batch::to_f64_rows(
                &batch::response_logprobs(r, &b, temp)?.0,
            )?),
            None => None,
        };
        let len = |i: usize| gens[i].tokens.len();
        let behaviour = |i: usize| -> Vec<f64> {
            if ground_truth[i] {
                lp_rows[i][..len(i)].to_vec()
            } else {
                gens[i].logprobs.iter().map(|&x| x as f64).collect()
            }
        };
        let reward_raw_mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
        let mut kl_penalty_mean = 0.0;
        if cfg.loss.kl_in_reward && cfg.loss.kl_coef > 0.0 {
            if let Some(rr) = &ref_rows {
                for (i, r) in rewards.iter_mut().enumerate() {
                    let pen = loss::kl_reward_penalty(
                        &cfg.loss,
                        &behaviour(i),
                        &rr[i][..len(i)],
                        &vec![1.0; len(i)],
                    );
                    kl_penalty_mean += pen / gens.len() as f64;
                    *r -= pen;
                }
            }
        }

        // 5. Which samples count (RED-Drop, zero-variance filter), then advantages per group.
        let mut keep = vec![true; gens.len()];
        let mut zero_std_groups = 0usize;
        for p in 0..np {
            let idx = p * g..(p + 1) * g;
            if sampling::is_zero_std(&rewards[idx.clone()]) {
                zero_std_groups += 1;
                if cfg.sampling.filter_zero_std {
                    keep[idx.clone()].iter_mut().for_each(|k| *k = false);
                }
            }
            if cfg.sampling.red_drop {
                let k = sampling::red_drop_keep(&rewards[idx.clone()], &mut self.sample_rng);
                for (slot, kk) in keep[idx].iter_mut().zip(k) {
                    *slot &= kk;
                }
            }
        }
        let members: Vec<Vec<usize>> = (0..np)
            .map(|p| (p * g..(p + 1) * g).filter(|&i| keep[i]).collect())
            .collect();
        let live: Vec<usize> = (0..np).filter(|&p| !members[p].is_empty()).collect();
        let groups: Vec<Group> = live
            .iter()
            .map(|&p| {
                let m = &members[p];
                let mut grp = Group::from_rewards(m.iter().map(|&i| rewards[i]).collect());
                grp.correct = Some(m.iter().map(|&i| correct[i]).collect());
                grp.lengths = Some(m.iter().map(|&i| len(i)).collect());
                grp.all_rewards = Some(rewards[p * g..(p + 1) * g].to_vec());
                if cfg.sampling.inject_ground_truth {
                    grp.ground_truth = Some(m.iter().map(|&i| ground_truth[i]).collect());
                }
                grp
            })
            .collect();
        let adv_out = advantage::compute_with_state(&cfg.advantage, &groups, &mut self.adv_state)?;
        let mut adv = vec![0.0f64; gens.len()];
        for (gi, &p) in live.iter().enumerate() {
            for (k, &i) in members[p].iter().enumerate() {
                adv[i] = adv_out.advantages[gi][k];
            }
        }

        // 6. Loss and its gradient w.r.t. each response token's log-prob.
        let seqs: Vec<SeqInput> = (0..gens.len())
            .map(|i| {
                let p = i / g;
                let a = adv[i];
                let n_correct = correct[p * g..(p + 1) * g].iter().filter(|&&c| c).count();
                SeqInput {
                    logp: lp_rows[i][..len(i)].to_vec(),
                    logp_old: behaviour(i),
                    logp_ref: ref_rows.as_ref().map(|r| r[i][..len(i)].to_vec()),
                    mask: vec![if keep[i] { 1.0 } else { 0.0 }; len(i)],
                    adv: vec![a; len(i)],
                    kl_weight: if cfg.loss.dads {
                        loss::dads_weight(a > 0.0, n_correct, g)
                    } else {
                        1.0
                    },
                    expert: false,
                }
            })
            .collect();
        let out = loss::compute(&cfg.loss, &seqs)?;
        let r = b.resp_len;
        let mut gflat = Vec::with_capacity(gens.len() * r);
        for row in &out.grad_logp {
            gflat.extend(row.iter().map(|&x| x as f32));
            gflat.extend(std::iter::repeat(0.0f32).take(r - row.len()));
        }
        let gt = Tensor::from_vec(gflat, (gens.len(), r), &dev)?;
        let valid = valid_tensor(&b.valid, &dev)?;
        let entropy_t = batch::entropy(&lsm, &valid)?;
        let mut surrogate = (&lp * &gt)?.sum_all()?;
        if cfg.loss.entropy_coef > 0.0 {
            surrogate = (surrogate - (&entropy_t * cfg.loss.entropy_coef)?)?;
        }
        let grads = surrogate.backward()?;
        let gnorm = self.opt.grad_norm(&grads)?;
        let clip = cfg.train.grad_clip;
        let scale = if clip > 0.0 && gnorm > clip {
            clip / gnorm
        } else {
            1.0
        };
        let lr = cfg.train.lr * (step as f64 / cfg.train.lr_warmup_steps.max(1) as f64).min(1.0);
        self.opt.step(&grads, lr, scale)?;
        self.version += 1;
        let train_s = t_train.elapsed().as_secs_f64();

        // 6. Metrics (names: DESIGN.md §7, docs/metrics.md).
        let n = rewards.len() as f64;
        let mean = rewards.iter().sum::<f64>() / n;
        let std = (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
        let flat_adv = &adv;
        let gen_tokens: usize = gens.iter().map(|x| x.tokens.len()).sum();
        let mut m = Metrics::new();
        m.insert("reward/mean".into(), mean);
        m.insert("reward/std".into(), std);
        m.insert(
            "reward/frac_zero_std".into(),
            zero_std_groups as f64 / np as f64,
        );
        m.insert(
            "acc/train".into(),
            correct.iter().filter(|&&c| c).count() as f64 / n,
        );
        if self.noise.is_some() || cfg.loss.kl_in_reward {
            m.insert("reward/raw_mean".into(), reward_raw_mean);
            m.insert("reward/kl_penalty_mean".into(), kl_penalty_mean);
        }
        if cfg.sampling.red_drop || cfg.sampling.filter_zero_std {
            m.insert(
                "sampling/dropped_frac".into(),
                keep.iter().filter(|&&k| !k).count() as f64 / n,
            );
        }
        if adv_out.filtered > 0 || cfg.advantage.stable_filter.enabled {
            m.insert("adv/filtered".into(), adv_out.filtered as f64);
        }
        m.insert("adv/mean".into(), flat_adv.iter().sum::<f64>() / n);
        m.insert(
            "adv/abs_mean".into(),
            flat_adv.iter().map(|a| a.abs()).sum::<f64>() / n,
        );
        m.insert("loss/policy".into(), out.metrics.policy_loss);
        m.insert("loss/kl".into(), out.metrics.kl_loss);
        m.insert("loss/clipfrac".into(), out.metrics.clipfrac);
        m.insert("loss/masked_frac".into(), out.metrics.masked_frac);
        m.insert("is/ratio_mean".into(), out.metrics.ratio_mean);
        m.insert("is/ratio_max".into(), out.metrics.ratio_max);
        m.insert("kl/k3".into(), out.metrics.kl_k3);
        m.insert("entropy".into(), entropy_t.to_scalar::<f32>()? as f64);
        m.insert("len/mean".into(), gen_tokens as f64 / n);
        m.insert(
            "len/truncated_frac".into(),
            gens.iter().filter(|x| !x.finished).count() as f64 / n,
        );
        m.insert("staleness/mean".into(), 0.0);
        m.insert("staleness/dropped".into(), 0.0);
        m.insert("grad/norm".into(), gnorm);
        m.insert("lr".into(), lr);
        m.insert("timing/generate_s".into(), generate_s);
        m.insert("timing/train_s".into(), train_s);
        m.insert(
            "throughput/tokens_per_s".into(),
            gen_tokens as f64 / t_start.elapsed().as_secs_f64().max(1e-9),
        );

        for p in 0..cfg.train.log_samples.min(np) {
            let responses: Vec<serde_json::Value> = (p * g..(p + 1) * g)
                .map(|i| serde_json::json!({"text": texts[i], "reward": rewards[i], "reason": verdicts[i].reason}))
                .collect();
            self.samples.write(&serde_json::json!({
                "step": step, "prompt": problems[p].prompt, "answer": problems[p].answer, "responses": responses
            }))?;
        }
        Ok(m)
    }
}

fn valid_tensor(valid: &[Vec<f64>], dev: &Device) -> Result<Tensor> {
    let r = valid.first().map(|v| v.len()).unwrap_or(0);
    let flat: Vec<f32> = valid.iter().flatten().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(flat, (valid.len(), r), dev)?)
}

/// Runs (or resumes) a training run to its end, or to `opts.stop_after`.
pub fn run(cfg: RunConfig, opts: &TrainOptions) -> Result<Summary> {
    let t0 = Instant::now();
    let dev = device();
    let tok = Tokenizer::builtin_arithmetic();
    let task = ArithmeticTask::new(cfg.task.clone()).map_err(|m| Error::config("task", m))?;
    let shape = builtin_shape(&cfg, tok.vocab_size());
    let model = Llama::init(&shape, cfg.seed, &dev)?;
    let prompt_tokens = 1 + task
        .heldout()
        .iter()
        .map(|p| p.prompt.len())
        .max()
        .unwrap_or(0);
    let plan = Plan::new(&cfg, model.num_params(), prompt_tokens);

    let (run_dir, ckpt) = match &opts.resume {
        Some(dir) => (dir.clone(), checkpoint::latest(dir)?),
        None => {
            let dir = create_run_dir(Path::new(&cfg.output_dir), &cfg.name)?;
            let write = |name: &str, text: String| -> Result<()> {
                let p = dir.join(name);
                std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
            };
            write("config.toml", cfg.to_toml())?;
            write("plan.json", serde_json::to_string_pretty(&plan)?)?;
            (dir, None)
        }
    };
    if !opts.quiet {
        println!("{}", plan.render());
        println!("run directory: {}", run_dir.display());
    }
    let metrics_path = run_dir.join("metrics.jsonl");
    let samples_path = run_dir.join("samples.jsonl");
    let mut opt = AdamW::new(
        model.params(),
        AdamWParams {
            weight_decay: cfg.train.weight_decay,
            ..Default::default()
        },
    );
    // A reference policy is needed for a KL term in the loss (incl. DADS) or in the reward.
    let use_ref = cfg.loss.loss_kl().is_some() || (cfg.loss.kl_in_reward && cfg.loss.kl_coef > 0.0);
    // Resume: load and check everything from the checkpoint before touching any file of the
    // run, so a corrupt checkpoint leaves the directory exactly as it was.
    let resumed = match &ckpt {
        Some(c) => {
            let st = checkpoint::read_state(c)?;
            checkpoint::restore(c, &model, &mut opt, &st)?;
            let rngs = (st.prompt_rng.restore(c)?, st.sample_rng.restore(c)?);
            let reference = if use_ref {
                // The reference policy is the warm-up result, kept as checkpoint step-0.
                let p0 = checkpoint::step_dir(&run_dir, 0).join("model.safetensors");
                let w = crate::model::io::load_safetensors(&p0, &dev)?;
                Some(Llama::from_tensors(
                    &model.cfg,
                    w,
                    &dev,
                    &p0.display().to_string(),
                )?)
            } else {
                None
            };
            report::truncate_after(&metrics_path, "rl", st.step)?;
            report::truncate_after(&samples_path, "rl", st.step)?;
            Some((st, rngs, reference))
        }
        None => {
            // Fresh start (or a resume before the first checkpoint): begin from nothing.
            for p in [&metrics_path, &samples_path] {
                if p.exists() {
                    std::fs::remove_file(p).map_err(|e| Error::io(p, e))?;
                }
            }
            None
        }
    };
    let mut tr = Trainer {
        metrics: JsonlWriter::open_append(&metrics_path)?,
        samples: JsonlWriter::open_append(&samples_path)?,
        prompt_rng: rng_stream(cfg.seed, 1),
        sample_rng: rng_stream(cfg.seed, 2),
        cfg,
        run_dir: run_dir.clone(),
        model,
        reference: None,
        tok,
        task,
        opt,
        state_step: 0,
        version: 0,
        warmup_steps: 0,
        acc_after_warmup: 0.0,
        adv_state: Default::default(),
        noise: None,
    };
    let rw = &tr.cfg.reward;
    if rw.noise_rho0 > 0.0 || rw.noise_rho1 > 0.0 {
        tr.noise = Some(
            NoiseInjector::new(rw.noise_rho0, rw.noise_rho1, tr.cfg.seed ^ 0x6e6f_6973)
                .map_err(|e| Error::config("reward", e.to_string()))?,
        );
    }
    let pb = report::progress_bar(tr.cfg.warmup.max_steps as u64, opts.quiet);
    match resumed {
        Some((st, (prompt_rng, sample_rng), reference)) => {
            tr.prompt_rng = prompt_rng;
            tr.sample_rng = sample_rng;
            tr.reference = reference;
            tr.state_step = st.step;
            tr.version = st.version;
            tr.warmup_steps = st.warmup_steps;
            tr.acc_after_warmup = st.acc_after_warmup;
            tr.adv_state = st.adv_state;
            tr.noise = st.noise;
        }
        None => {
            tr.warmup(&pb)?;
            tr.acc_after_warmup = evaluate(&tr.model, &tr.tok, tr.heldout(), tr.max_new_tokens())?;
            let mut m = Metrics::new();
            m.insert("acc/eval".into(), tr.acc_after_warmup);
            tr.metrics.write(&report::metrics_line(0, "rl", &m))?;
            if use_ref {
                tr.reference = Some(tr.model.deep_clone()?);
            }
            tr.checkpoint()?;
        }
    }

    let steps = tr.cfg.train.steps;
    pb.set_prefix("RL");
    pb.set_length(steps as u64);
    pb.set_position(tr.state_step as u64);
    pb.reset_eta();
    let mut acc_final = tr.acc_after_warmup;
    let mut last_eval = tr.acc_after_warmup;
    while tr.state_step < steps {
        let step = tr.state_step + 1;
        let mut m = tr.rl_step(step)?;
        tr.state_step = step;
        if step % tr.cfg.train.eval_every == 0 || step == steps {
            last_eval = evaluate(&tr.model, &tr.tok, tr.heldout(), tr.max_new_tokens())?;
            m.insert("acc/eval".into(), last_eval);
        }
        tr.metrics.write(&report::metrics_line(step, "rl", &m))?;
        pb.set_message(format!(
            "reward {:.3} | train acc {:.1}% | held-out acc {:.1}%",
            m["reward/mean"],
            m["acc/train"] * 100.0,
            last_eval * 100.0
        ));
        pb.inc(1);
        let stop_here = opts.stop_after == Some(step);
        if step % tr.cfg.train.checkpoint_every == 0 || step == steps || stop_here {
            tr.checkpoint()?;
        }
        if step == steps {
            acc_final = last_eval;
        }
        if stop_here {
            break;
        }
    }
    pb.finish_and_clear();
    report::plot::plot_run(&run_dir)?;
    Ok(Summary {
        run_dir,
        warmup_steps: tr.warmup_steps,
        acc_after_warmup: tr.acc_after_warmup,
        acc_final,
        rl_steps_done: tr.state_step,
        wall_s: t0.elapsed().as_secs_f64(),
    })
}
