//! Continuous batching for `grove serve`: one scheduler thread owns the served weights and one
//! KV cache that holds every live sequence of every request.
//!
//! Each iteration of the scheduler: newcomers from the queue are prefilled together (one
//! forward pass over their left-padded prompts) and their cache rows appended to the running
//! batch; every live row samples one token; rows that end (EOS or `max_tokens`) leave the
//! batch, and a request whose rows have all ended is answered; then one decode step (one
//! forward pass) runs over all rows still live. Rows of different ages share the cache: a row
//! that joins later has its missing leading columns padded and masked, positions are per row,
//! so every row decodes exactly as it would alone.
//!
//! **Sampling is a function of the request.** A request's sequences draw from the request's
//! own generator (`ChaCha8(seed)`), one uniform per live sequence per step in sequence order,
//! exactly as [`crate::rollout::generate`] does for the request's prompts alone, so what else
//! is in the batch does not change its answer.
//!
//! **Weights.** A load ([`Scheduler::load`]) stops admitting requests, lets the live ones
//! finish on the weights they started on, swaps, then admits the waiting ones: every answer
//! comes from one version of the weights and says which ([`VersionTag`]).
//!
//! **Back-pressure.** At most `max_queue` requests wait for the batch; beyond that
//! [`Scheduler::submit`] refuses at once (the server answers 503 with `Retry-After`).
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::Tensor;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::batch::left_pad;
use crate::model::{attention_mask, CausalLm, KvCache, Llama};
use crate::rollout::{draw_uniform, sampler, Generation, SamplingParams};

/// Which weights produced an answer: `weights_version` counts the loads of this server (0:
/// the weights it started with); `policy_version` is the trainer's version of those weights
/// when known (a grove checkpoint's `state.json`, or the version a load named).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VersionTag {
    pub weights_version: u64,
    pub policy_version: Option<u64>,
}

/// Weights as served, with their versions and where they came from.
pub struct Weights {
    pub model: Llama,
    pub version: VersionTag,
    /// The folder they were loaded from (the base folder plus the adapter for an adapter).
    pub source: String,
}

/// One request: a sequence per row (each prompt repeated `n` times, prompt-major).
pub struct Job {
    pub prompts: Vec<Vec<u32>>,
    pub params: SamplingParams,
    /// The request's generator; its sequences draw from it in order.
    pub rng: ChaCha8Rng,
    pub reply: Sender<Outcome>,
}

/// A request's answer: its generations (or why it failed) and the weights that produced it.
pub struct Outcome {
    pub result: std::result::Result<Vec<Generation>, String>,
    pub version: VersionTag,
}

/// Counters for `GET /metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Model forward passes (prefills and decode steps).
    pub forward_passes: AtomicU64,
    pub prefills: AtomicU64,
    pub decode_steps: AtomicU64,
    /// Requests answered (successfully or not) and their sequences.
    pub requests: AtomicU64,
    pub sequences: AtomicU64,
    /// Tokens sampled.
    pub tokens: AtomicU64,
    /// Most sequences decoded in one step.
    pub max_batch_rows: AtomicU64,
    /// Requests refused because the queue was full.
    pub refused: AtomicU64,
    pub loads: AtomicU64,
}

impl Counters {
    pub fn to_json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "forward_passes": g(&self.forward_passes),
            "prefills": g(&self.prefills),
            "decode_steps": g(&self.decode_steps),
            "requests": g(&self.requests),
            "sequences": g(&self.sequences),
            "tokens": g(&self.tokens),
            "max_batch_rows": g(&self.max_batch_rows),
            "refused": g(&self.refused),
            "loads": g(&self.loads),
        })
    }
}

/// A load waiting for the batch to drain.
struct Swap {
    weights: Weights,
    done: Sender<VersionTag>,
}

#[derive(Default)]
struct Pending {
    jobs: VecDeque<Job>,
    swap: Option<Swap>,
    closed: bool,
}

/// Why a request or a load was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// `max_queue` requests are already waiting.
    QueueFull(usize),
    /// Another load has not finished yet.
    LoadInProgress,
    /// The request cannot be decoded (empty prompt, too long, bad sampling parameters).
    Invalid(String),
    /// The scheduler has stopped.
    Closed,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::QueueFull(n) => write!(
                f,
                "{n} requests are already waiting for the batch (--max-queue); retry later"
            ),
            Refused::LoadInProgress => write!(f, "another weight load is still in progress"),
            Refused::Invalid(m) => write!(f, "{m}"),
            Refused::Closed => write!(f, "grove serve is shutting down"),
        }
    }
}

/// Shape of the batch: queue bound, rows decoded together, the special tokens.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Requests waiting for the batch at most; more are refused.
    pub max_queue: usize,
    /// Sequences decoded together at most (a larger request runs alone).
    pub max_rows: usize,
    pub eos: u32,
    pub pad: u32,
}

/// The queue in front of the scheduler thread, the served weights and the counters.
pub struct Scheduler {
    pending: Mutex<Pending>,
    wake: Condvar,
    limits: BatchLimits,
    current: Mutex<Arc<Weights>>,
    pub counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Refuses what [`crate::rollout::generate`] would refuse, before the request is queued.
fn check_job(
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    max_pos: usize,
) -> std::result::Result<(), String> {
    params.validate()?;
    if prompts.is_empty() {
        return Err("no prompts".into());
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(format!("prompt {i} is empty: nothing to condition on"));
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest + params.max_new_tokens > max_pos {
        return Err(format!(
            "prompt length {longest} + max_new_tokens {} exceeds max_position_embeddings {max_pos}",
            params.max_new_tokens
        ));
    }
    Ok(())
}

impl Scheduler {
    /// The queue and state; [`Scheduler::spawn`] starts the thread that serves it.
    pub fn new(weights: Weights, limits: BatchLimits) -> Arc<Self> {
        let limits = BatchLimits {
            max_rows: limits.max_rows.max(1),
            ..limits
        };
        Arc::new(Scheduler {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            limits,
            current: Mutex::new(Arc::new(weights)),
            counters: Counters::default(),
        })
    }

    /// Starts the scheduler thread; it ends after [`Scheduler::close`].
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<()> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("grove-serve-batch".into())
            .spawn(move || me.run())
            .map(|_| ())
    }

    /// The weights new requests are served with.
    pub fn current(&self) -> Arc<Weights> {
        Arc::clone(&lock(&self.current))
    }

    /// Requests waiting for the batch now.
    pub fn queued(&self) -> usize {
        lock(&self.pending).jobs.len()
    }

    /// Queues a request (one sequence per entry of `prompts`); its answer arrives on the
    /// receiver.
    pub fn submit(
        &self,
        prompts: Vec<Vec<u32>>,
        params: SamplingParams,
        rng: ChaCha8Rng,
    ) -> std::result::Result<Receiver<Outcome>, Refused> {
        let max_pos = self.current().model.cfg.max_positions();
        check_job(&prompts, &params, max_pos).map_err(Refused::Invalid)?;
        let (reply, rx) = mpsc::channel();
        let mut p = lock(&self.pending);
        if p.closed {
            return Err(Refused::Closed);
        }
        if p.jobs.len() >= self.limits.max_queue {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::QueueFull(self.limits.max_queue));
        }
        p.jobs.push_back(Job {
            prompts,
            params,
            rng,
            reply,
        });
        self.wake.notify_all();
        Ok(rx)
    }

    /// Swaps in `weights` once the live requests have finished on the old ones; the receiver
    /// gets the new version when the swap is done. The swap numbers the weights: the
    /// `weights_version` given is replaced by the served one's plus 1.
    pub fn load(&self, weights: Weights) -> std::result::Result<Receiver<VersionTag>, Refused> {
        let (done, rx) = mpsc::channel();
        let mut p = lock(&self.pending);
        if p.closed {
            return Err(Refused::Closed);
        }
        if p.swap.is_some() {
            return Err(Refused::LoadInProgress);
        }
        p.swap = Some(Swap { weights, done });
        self.wake.notify_all();
        Ok(rx)
    }

    /// Stops the thread after its live requests; queued ones are answered with an error.
    pub fn close(&self) {
        lock(&self.pending).closed = true;
        self.wake.notify_all();
    }

    /// Waits for work; returns the jobs to admit now, or a swap to apply (only with no live
    /// rows), or None when closed and idle.
    fn next_work(&self, live_rows: usize) -> Option<(Vec<Job>, Option<Swap>)> {
        let mut p = lock(&self.pending);
        while live_rows == 0 && p.jobs.is_empty() && p.swap.is_none() && !p.closed {
            p = self.wake.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        if p.swap.is_some() {
            // Drain: nothing new joins until the live rows have finished on the old weights.
            let swap = if live_rows == 0 { p.swap.take() } else { None };
            return Some((vec![], swap));
        }
        if p.closed && live_rows == 0 {
            let version = self.current().version;
            for job in p.jobs.drain(..) {
                let _ = job.reply.send(Outcome {
                    result: Err(Refused::Closed.to_string()),
                    version,
                });
            }
            return None;
        }
        let mut rows = live_rows;
        let mut admit = vec![];
        while let Some(job) = p.jobs.front() {
            let n = job.prompts.len();
            if rows > 0 && rows + n > self.limits.max_rows {
                break;
            }
            rows += n;
            admit.extend(p.jobs.pop_front());
        }
        Some((admit, None))
    }

    fn run(&self) {
        let mut weights = self.current();
        let mut batch = Batch::new(&weights.model, self.limits.eos, self.limits.pad);
        while let Some((admit, swap)) = self.next_work(batch.rows.len()) {
            if let Some(s) = swap {
                let mut next = s.weights;
                next.version.weights_version = weights.version.weights_version + 1;
                weights = Arc::new(next);
                *lock(&self.current) = Arc::clone(&weights);
                batch = Batch::new(&weights.model, self.limits.eos, self.limits.pad);
                self.counters.loads.fetch_add(1, Ordering::Relaxed);
                let _ = s.done.send(weights.version);
                continue;
            }
            if let Err(e) = self.step(&weights, &mut batch, admit) {
                // A failure of the batch as a whole (not one request's logits): every live
                // request is answered with it and the batch starts over.
                for live in std::mem::take(&mut batch.jobs).into_iter().flatten() {
                    self.answer(live.job, Err(format!("generation failed: {e}")), &weights);
                }
                batch = Batch::new(&weights.model, self.limits.eos, self.limits.pad);
            }
        }
    }

    fn answer(
        &self,
        job: Job,
        result: std::result::Result<Vec<Generation>, String>,
        weights: &Weights,
    ) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters
            .sequences
            .fetch_add(job.prompts.len() as u64, Ordering::Relaxed);
        let _ = job.reply.send(Outcome {
            result,
            version: weights.version,
        });
    }

    /// Admits `admit`, samples one token for every live row, answers finished requests and
    /// runs the next decode step.
    fn step(&self, weights: &Weights, batch: &mut Batch, admit: Vec<Job>) -> Result<()> {
        let model = &weights.model;
        if !admit.is_empty() {
            batch.admit(model, admit)?;
            self.counters.prefills.fetch_add(1, Ordering::Relaxed);
            self.counters.forward_passes.fetch_add(1, Ordering::Relaxed);
        }
        let sampled = batch.sample();
        self.counters
            .tokens
            .fetch_add(sampled as u64, Ordering::Relaxed);
        for (job, result) in batch.remove_finished(model)? {
            self.answer(job, result, weights);
        }
        if !batch.rows.is_empty() {
            self.counters
                .max_batch_rows
                .fetch_max(batch.rows.len() as u64, Ordering::Relaxed);
            batch.decode(model)?;
            self.counters.decode_steps.fetch_add(1, Ordering::Relaxed);
            self.counters.forward_passes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// A request in the batch: its sequences so far.
struct LiveJob {
    job: Job,
    gens: Vec<Generation>,
    /// Why the request failed (non-finite logits); its rows leave at once.
    failed: Option<String>,
}

impl LiveJob {
    fn done(&self) -> bool {
        self.failed.is_some()
            || self
                .gens
                .iter()
                .all(|g| g.finished || g.tokens.len() >= self.job.params.max_new_tokens)
    }
}

/// One row of the batch: a sequence of a live request.
struct Row {
    /// Index into `Batch::jobs`.
    job: usize,
    /// Sequence index within the request.
    seq: usize,
    /// Position of the row's next token.
    next_pos: u32,
    /// Logits for the row's next token.
    logits: Vec<f32>,
    /// The last sampled token, fed at the next decode step.
    last: u32,
}

/// The running batch: one KV cache over all live rows; `key_valid[r]` says which cached
/// columns are row r's tokens (the others are padding, masked).
struct Batch {
    eos: u32,
    pad: u32,
    cache: KvCache,
    key_valid: Vec<Vec<bool>>,
    rows: Vec<Row>,
    /// Requests by slot; a slot is emptied when its request is answered.
    jobs: Vec<Option<LiveJob>>,
}

/// Applies `f` to every cached key and value tensor.
fn map_cache(cache: &KvCache, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<KvCache> {
    let layers = cache
        .layers
        .iter()
        .map(|l| match l {
            Some((k, v)) => Ok(Some((f(k)?, f(v)?))),
            None => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(KvCache { layers })
}

/// `t` (b, nkv, s, hd) with `cols` zero columns before its first.
fn pad_columns(t: &Tensor, cols: usize) -> Result<Tensor> {
    if cols == 0 {
        return Ok(t.clone());
    }
    let (b, h, _, d) = t.dims4()?;
    let z = Tensor::zeros((b, h, cols, d), t.dtype(), t.device())?;
    Ok(Tensor::cat(&[&z, t], 2)?)
}

/// The rows of `a` then the rows of `b`, both padded on the left to the longer one's columns.
fn cat_rows(a: &KvCache, b: &KvCache) -> Result<KvCache> {
    let (sa, sb) = (a.len(), b.len());
    let s = sa.max(sb);
    let layers = a
        .layers
        .iter()
        .zip(&b.layers)
        .map(|(x, y)| match (x, y) {
            (Some((ka, va)), Some((kb, vb))) => {
                let k = Tensor::cat(&[&pad_columns(ka, s - sa)?, &pad_columns(kb, s - sb)?], 0)?;
                let v = Tensor::cat(&[&pad_columns(va, s - sa)?, &pad_columns(vb, s - sb)?], 0)?;
                Ok(Some((k, v)))
            }
            _ => Err(Error::Internal("batch cache: a layer has no keys".into())),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(KvCache { layers })
}

impl Batch {
    fn new(model: &Llama, eos: u32, pad: u32) -> Self {
        Batch {
            eos,
            pad,
            cache: model.new_cache(),
            key_valid: vec![],
            rows: vec![],
            jobs: vec![],
        }
    }

    /// Prefills the newcomers' prompts in one forward pass and appends their rows.
    fn admit(&mut self, model: &Llama, jobs: Vec<Job>) -> Result<()> {
        let prompts: Vec<Vec<u32>> = jobs
            .iter()
            .flat_map(|j| j.prompts.iter().cloned())
            .collect();
        let dev = model.device();
        let (ids, pos, valid, p) = left_pad(&prompts, self.pad);
        let b = prompts.len();
        let mut cache = model.new_cache();
        let ids_t = Tensor::from_vec(ids, (b, p), dev)?;
        let pos_t = Tensor::from_vec(pos, (b, p), dev)?;
        let mask = attention_mask(&valid, 0, p, dev)?;
        let hidden = model.forward_hidden(&ids_t, &pos_t, &mask, Some(&mut cache))?;
        let logits: Vec<Vec<f32>> = model
            .logits(&hidden.narrow(1, p - 1, 1)?.squeeze(1)?)?
            .to_vec2()?;
        let s0 = self.cache.len();
        if self.rows.is_empty() {
            self.cache = cache;
        } else {
            self.cache = cat_rows(&self.cache, &cache)?;
        }
        let s = s0.max(p);
        for row in &mut self.key_valid {
            row.splice(0..0, std::iter::repeat_n(false, s - s0));
        }
        for mut row in valid {
            row.splice(0..0, std::iter::repeat_n(false, s - p));
            self.key_valid.push(row);
        }
        let mut logits = logits.into_iter();
        for job in jobs {
            let slot = self.jobs.len();
            for (seq, prompt) in job.prompts.iter().enumerate() {
                self.rows.push(Row {
                    job: slot,
                    seq,
                    next_pos: prompt.len() as u32,
                    logits: logits.next().unwrap_or_default(),
                    last: self.pad,
                });
            }
            let gens = vec![
                Generation {
                    tokens: vec![],
                    logprobs: vec![],
                    finished: false
                };
                job.prompts.len()
            ];
            self.jobs.push(Some(LiveJob {
                job,
                gens,
                failed: None,
            }));
        }
        Ok(())
    }

    /// Samples one token for every row (of a request not failed); returns how many.
    fn sample(&mut self) -> usize {
        // One uniform per row, drawn in row order from the row's request generator before the
        // parallel part: a request's rows are contiguous and in sequence order, so its draws
        // are those of `generate` on its prompts alone.
        let mut draws: Vec<Option<f64>> = Vec::with_capacity(self.rows.len());
        for row in &self.rows {
            let Some(live) = self.jobs[row.job].as_mut() else {
                draws.push(None);
                continue;
            };
            if live.failed.is_some() {
                draws.push(None);
                continue;
            }
            if let Some(i) = row
                .logits
                .iter()
                .position(|x| x.is_nan() || *x == f32::INFINITY)
            {
                let e = Error::NonFiniteLogits {
                    sequence: row.seq,
                    new_token: live.gens[row.seq].tokens.len(),
                    value: row.logits[i],
                };
                live.failed = Some(format!("generation failed: {e}"));
                draws.push(None);
                continue;
            }
            draws.push(Some(draw_uniform(&live.job.params, &mut live.job.rng)));
        }
        let jobs = &self.jobs;
        let picks: Vec<Option<(u32, f32)>> = self
            .rows
            .par_iter()
            .zip(draws.par_iter())
            .map_init(sampler::Scratch::default, |s, (row, d)| {
                let live = jobs[row.job].as_ref()?;
                d.map(|u| sampler::sample_with_uniform(&row.logits, &live.job.params, u, s))
            })
            .collect();
        let mut n = 0;
        for (row, pick) in self.rows.iter_mut().zip(picks) {
            let (Some((tok, lp)), Some(live)) = (pick, self.jobs[row.job].as_mut()) else {
                continue;
            };
            let g = &mut live.gens[row.seq];
            g.tokens.push(tok);
            g.logprobs.push(lp);
            g.finished = tok == self.eos;
            row.last = tok;
            n += 1;
        }
        n
    }

    /// Drops the rows whose sequence ended and returns the requests now complete.
    #[allow(clippy::type_complexity)]
    fn remove_finished(
        &mut self,
        model: &Llama,
    ) -> Result<Vec<(Job, std::result::Result<Vec<Generation>, String>)>> {
        let row_live = |row: &Row| {
            self.jobs[row.job].as_ref().is_some_and(|live| {
                let g = &live.gens[row.seq];
                live.failed.is_none()
                    && !g.finished
                    && g.tokens.len() < live.job.params.max_new_tokens
            })
        };
        let keep: Vec<usize> = (0..self.rows.len())
            .filter(|&r| row_live(&self.rows[r]))
            .collect();
        let mut answered = vec![];
        for slot in &mut self.jobs {
            if slot.as_ref().is_some_and(LiveJob::done) {
                if let Some(live) = slot.take() {
                    let result = match live.failed {
                        Some(m) => Err(m),
                        None => Ok(live.gens),
                    };
                    answered.push((live.job, result));
                }
            }
        }
        if keep.len() == self.rows.len() {
            return Ok(answered);
        }
        if keep.is_empty() {
            *self = Batch::new(model, self.eos, self.pad);
            return Ok(answered);
        }
        let idx: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
        let idx = Tensor::new(idx.as_slice(), model.device())?;
        let cache = map_cache(&self.cache, |t| Ok(t.index_select(&idx, 0)?))?;
        let mut rows = std::mem::take(&mut self.rows);
        let mut valid = std::mem::take(&mut self.key_valid);
        let mut k = 0;
        rows.retain(|_| {
            k += 1;
            keep.binary_search(&(k - 1)).is_ok()
        });
        let mut k = 0;
        valid.retain(|_| {
            k += 1;
            keep.binary_search(&(k - 1)).is_ok()
        });
        // Leading columns that are padding in every remaining row are dropped, so the cache
        // never spans more than the longest remaining sequence.
        let s = cache.len();
        let lead = (0..s).take_while(|&c| valid.iter().all(|r| !r[c])).count();
        self.cache = if lead == 0 {
            cache
        } else {
            map_cache(&cache, |t| Ok(t.narrow(2, lead, s - lead)?))?
        };
        for r in &mut valid {
            r.drain(..lead);
        }
        self.rows = rows;
        self.key_valid = valid;
        Ok(answered)
    }

    /// One forward pass feeding every row its last sampled token.
    fn decode(&mut self, model: &Llama) -> Result<()> {
        let dev = model.device();
        let b = self.rows.len();
        let offset = self.cache.len();
        for r in &mut self.key_valid {
            r.push(true);
        }
        let ids: Vec<u32> = self.rows.iter().map(|r| r.last).collect();
        let pos: Vec<u32> = self.rows.iter().map(|r| r.next_pos).collect();
        let ids_t = Tensor::from_vec(ids, (b, 1), dev)?;
        let pos_t = Tensor::from_vec(pos, (b, 1), dev)?;
        let mask = attention_mask(&self.key_valid, offset, 1, dev)?;
        let hidden = model.forward_hidden(&ids_t, &pos_t, &mask, Some(&mut self.cache))?;
        let logits: Vec<Vec<f32>> = model.logits(&hidden.squeeze(1)?)?.to_vec2()?;
        for (row, l) in self.rows.iter_mut().zip(logits) {
            row.logits = l;
            row.next_pos += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;
    use rand::SeedableRng;
    use std::time::{Duration, Instant};

    /// Never sampled: sequences run to `max_tokens`, so lengths (and the batch's churn) are
    /// known in advance.
    const NO_EOS: u32 = u32::MAX;
    const PAD: u32 = 0;

    fn model(seed: u64) -> Llama {
        let mut cfg = Config::builtin_tiny(19);
        cfg.max_position_embeddings = Some(128);
        Llama::init(&cfg, seed, &candle_core::Device::Cpu).unwrap()
    }

    fn weights(seed: u64, policy_version: Option<u64>) -> Weights {
        Weights {
            model: model(seed),
            version: VersionTag {
                weights_version: 0,
                policy_version,
            },
            source: format!("init seed {seed}"),
        }
    }

    fn scheduler(max_queue: usize, max_rows: usize) -> Arc<Scheduler> {
        Scheduler::new(
            weights(7, Some(3)),
            BatchLimits {
                max_queue,
                max_rows,
                eos: NO_EOS,
                pad: PAD,
            },
        )
    }

    fn sampled(max_new_tokens: usize) -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            max_new_tokens,
        }
    }

    /// Request `i`: prompts of different lengths, n = 1 or 2, its own seed.
    fn request(i: usize) -> (Vec<Vec<u32>>, u64) {
        let prompt: Vec<u32> = (0..(2 + i % 5))
            .map(|j| 3 + ((i + j) % 15) as u32)
            .collect();
        let n = 1 + i % 2;
        (vec![prompt; n], 100 + i as u64)
    }

    /// What `generate` samples for the request alone on `m`.
    fn alone(
        m: &Llama,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
        seed: u64,
    ) -> Vec<Generation> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        crate::rollout::generate(m, prompts, NO_EOS, PAD, params, &mut rng).unwrap()
    }

    fn assert_same(got: &[Generation], want: &[Generation], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.tokens, w.tokens, "{what}: tokens");
            for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
                assert!((a - b).abs() < 1e-4, "{what}: log-prob {a} vs {b}");
            }
        }
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// 16 requests queued before the scheduler starts are decoded as one batch: one prefill
    /// and max_tokens − 1 decode steps for all of them, not 16 × max_tokens passes; each
    /// answer is what `generate` samples for that request alone.
    #[test]
    fn sixteen_requests_share_one_batch_and_answer_as_if_alone() {
        let s = scheduler(64, 256);
        let params = sampled(8);
        let reqs: Vec<_> = (0..16).map(request).collect();
        let rxs: Vec<_> = reqs
            .iter()
            .map(|(p, seed)| {
                s.submit(p.clone(), params.clone(), ChaCha8Rng::seed_from_u64(*seed))
                    .unwrap()
            })
            .collect();
        s.spawn().unwrap();
        let reference = model(7);
        for (i, (rx, (p, seed))) in rxs.into_iter().zip(&reqs).enumerate() {
            let out = rx.recv_timeout(Duration::from_secs(60)).unwrap();
            assert_eq!(
                out.version,
                VersionTag {
                    weights_version: 0,
                    policy_version: Some(3)
                }
            );
            let got = out.result.unwrap();
            assert!(got.iter().all(|g| g.tokens.len() == 8));
            assert_same(
                &got,
                &alone(&reference, p, &params, *seed),
                &format!("request {i}"),
            );
        }
        let c = &s.counters;
        let rows: usize = reqs.iter().map(|(p, _)| p.len()).sum();
        assert_eq!(
            c.forward_passes.load(Ordering::Relaxed),
            8,
            "1 prefill + 7 decode steps"
        );
        assert_eq!(c.max_batch_rows.load(Ordering::Relaxed), rows as u64);
        assert_eq!(c.requests.load(Ordering::Relaxed), 16);
        assert_eq!(c.tokens.load(Ordering::Relaxed), 8 * rows as u64);
        s.close();
    }

    /// Requests joining a running batch (one with a shorter prompt than the batch's columns,
    /// one with a longer one) and leaving before it ends decode exactly as alone; the queue
    /// bound refuses the request over it.
    #[test]
    fn requests_join_and_leave_a_running_batch() {
        let s = scheduler(2, 256);
        let params = sampled(120);
        let long = vec![vec![1u32, 5, 6]];
        let rx_long = s
            .submit(long.clone(), params.clone(), ChaCha8Rng::seed_from_u64(1))
            .unwrap();
        s.spawn().unwrap();
        wait_for("3 decode steps", || {
            s.counters.decode_steps.load(Ordering::Relaxed) >= 3
        });
        let short = sampled(5);
        let joiners = [vec![vec![1u32, 9]; 2], vec![(1..=14).collect::<Vec<u32>>()]];
        let rxs: Vec<_> = joiners
            .iter()
            .enumerate()
            .map(|(i, p)| {
                s.submit(
                    p.clone(),
                    short.clone(),
                    ChaCha8Rng::seed_from_u64(20 + i as u64),
                )
                .unwrap()
            })
            .collect();
        let reference = model(7);
        for (i, rx) in rxs.into_iter().enumerate() {
            let got = rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap()
                .result
                .unwrap();
            assert_same(
                &got,
                &alone(&reference, &joiners[i], &short, 20 + i as u64),
                &format!("joiner {i}"),
            );
        }
        let got = rx_long
            .recv_timeout(Duration::from_secs(60))
            .unwrap()
            .result
            .unwrap();
        assert_same(
            &got,
            &alone(&reference, &long, &params, 1),
            "the long request",
        );
        // Fewer passes than answering the three one after another (120 + 5 + 5): the long
        // request leaves 117 steps for the others to join.
        assert!(s.counters.forward_passes.load(Ordering::Relaxed) < 130);
        // Nothing runs now: two requests fill the queue, the third is refused.
        s.close();
        let q = scheduler(2, 256);
        for _ in 0..2 {
            q.submit(long.clone(), short.clone(), ChaCha8Rng::seed_from_u64(0))
                .unwrap();
        }
        let e = q
            .submit(long.clone(), short.clone(), ChaCha8Rng::seed_from_u64(0))
            .err();
        assert_eq!(e, Some(Refused::QueueFull(2)));
        let e = q
            .submit(vec![vec![]], short.clone(), ChaCha8Rng::seed_from_u64(0))
            .err();
        assert!(matches!(e, Some(Refused::Invalid(m)) if m.contains("prompt 0 is empty")));
        q.close();
    }

    /// A load while a request decodes: that request finishes on the old weights and says so,
    /// a request sent during the drain waits and runs on the new weights, as `generate` on
    /// them would.
    #[test]
    fn a_load_lets_live_requests_finish_on_the_old_weights() {
        let s = scheduler(8, 256);
        let params = sampled(30);
        let p = vec![vec![1u32, 4, 8]];
        let rx_old = s
            .submit(p.clone(), params.clone(), ChaCha8Rng::seed_from_u64(5))
            .unwrap();
        s.spawn().unwrap();
        wait_for("2 decode steps", || {
            s.counters.decode_steps.load(Ordering::Relaxed) >= 2
        });
        let done = s.load(weights(8, Some(9))).unwrap();
        let rx_new = s
            .submit(p.clone(), params.clone(), ChaCha8Rng::seed_from_u64(5))
            .unwrap();
        let old = rx_old.recv_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(
            old.version,
            VersionTag {
                weights_version: 0,
                policy_version: Some(3)
            }
        );
        assert_same(
            &old.result.unwrap(),
            &alone(&model(7), &p, &params, 5),
            "old weights",
        );
        let v = done.recv_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(
            v,
            VersionTag {
                weights_version: 1,
                policy_version: Some(9)
            }
        );
        let new = rx_new.recv_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(new.version, v);
        let new = new.result.unwrap();
        assert_same(&new, &alone(&model(8), &p, &params, 5), "new weights");
        assert_eq!(s.current().version, v);
        s.close();
        // A second load while one waits is refused (no thread here: the first stays pending).
        let q = scheduler(8, 256);
        let _pending = q.load(weights(8, Some(1))).unwrap();
        assert_eq!(
            q.load(weights(8, None)).err(),
            Some(Refused::LoadInProgress)
        );
        q.close();
    }
}
