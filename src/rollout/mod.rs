//! Turning prompts into responses with the behaviour policy's per-token log-probs.
//!
//! The local engine decodes a whole batch at once with a KV cache. Prompts are left-padded so
//! every sequence's next token sits in the same column; positions count real tokens only and
//! the attention mask hides the padding, so a padded prompt decodes exactly like an unpadded one.
pub mod engine;
pub mod launch;
pub mod remote;
pub mod sampler;
pub mod serve;
pub mod session;
pub mod vllm;

use candle_core::{Device, Tensor};
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::batch::left_pad;
use crate::model::{attention_mask, CausalLm};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy decoding.
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f64,
    /// Generation stops at EOS or after this many new tokens.
    pub max_new_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 4,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            max_new_tokens,
        }
    }
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, found {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], found {}", self.top_p));
        }
        if self.max_new_tokens == 0 {
            return Err("max_new_tokens must be positive, found 0".into());
        }
        Ok(())
    }
}

/// One sampled response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Response tokens, including the final EOS when one was sampled.
    pub tokens: Vec<u32>,
    /// log π_behaviour(token | prefix) of each response token under the tempered distribution
    /// (top-p truncation is not renormalised into it, as with vLLM's raw log-probs).
    pub logprobs: Vec<f32>,
    /// The response ended with EOS (false: cut at max_new_tokens).
    pub finished: bool,
}

/// Samples one response per prompt. Consumes exactly one uniform draw of `rng` per active
/// sequence per step, so runs are reproducible from the seed.
pub fn generate<M: CausalLm + ?Sized, R: Rng>(
    model: &M,
    prompts: &[Vec<u32>],
    eos: u32,
    pad: u32,
    params: &SamplingParams,
    rng: &mut R,
) -> Result<Vec<Generation>> {
    params.validate().map_err(Error::Model)?;
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::Model(format!(
            "prompt {i} is empty: nothing to condition on"
        )));
    }
    let dev: &Device = model.device();
    let (ids, pos, mut key_valid, p) = left_pad(prompts, pad);
    let max_pos = model.config().max_positions();
    let longest = prompts.iter().map(|x| x.len()).max().unwrap_or(0);
    if longest + params.max_new_tokens > max_pos {
        return Err(Error::Model(format!(
            "prompt length {longest} + max_new_tokens {} exceeds max_position_embeddings {max_pos}",
            params.max_new_tokens
        )));
    }
    let mut cache = model.new_cache();
    let ids_t = Tensor::from_vec(ids, (b, p), dev)?;
    let pos_t = Tensor::from_vec(pos, (b, p), dev)?;
    let mask = attention_mask(&key_valid, 0, p, dev)?;
    let hidden = model.forward_hidden(&ids_t, &pos_t, &mask, Some(&mut cache))?;
    let mut logits = model.logits(&hidden.narrow(1, p - 1, 1)?.squeeze(1)?)?;

    let mut out: Vec<Generation> = (0..b)
        .map(|_| Generation {
            tokens: vec![],
            logprobs: vec![],
            finished: false,
        })
        .collect();
    let mut next_pos: Vec<u32> = prompts.iter().map(|x| x.len() as u32).collect();
    for step in 0..params.max_new_tokens {
        let flat: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let v = flat.len() / b;
        check_logits(&flat, v, step)?;
        // One uniform per active sequence, drawn in row order before the parallel part, so
        // the stream does not depend on thread scheduling.
        let draws: Vec<Option<f64>> = out
            .iter()
            .map(|g| (!g.finished).then(|| draw_uniform(params, rng)))
            .collect();
        let picks: Vec<Option<(u32, f32)>> = flat
            .par_chunks(v)
            .zip(draws.par_iter())
            .map_init(sampler::Scratch::default, |s, (row, d)| {
                d.map(|u| sampler::sample_with_uniform(row, params, u, s))
            })
            .collect();
        let mut step_ids = Vec::with_capacity(b);
        let mut active_now = Vec::with_capacity(b);
        for (g, pick) in out.iter_mut().zip(picks) {
            match pick {
                None => {
                    step_ids.push(pad);
                    active_now.push(false);
                }
                Some((tok, lp)) => {
                    g.tokens.push(tok);
                    g.logprobs.push(lp);
                    g.finished = tok == eos;
                    step_ids.push(tok);
                    active_now.push(true);
                }
            }
        }
        if step + 1 == params.max_new_tokens || out.iter().all(|g| g.finished) {
            break;
        }
        let offset = cache.len();
        for (row, &a) in key_valid.iter_mut().zip(&active_now) {
            row.push(a);
        }
        let pos_now: Vec<u32> = next_pos.clone();
        for (np, &a) in next_pos.iter_mut().zip(&active_now) {
            if a {
                *np += 1;
            }
        }
        let ids_t = Tensor::from_vec(step_ids, (b, 1), dev)?;
        let pos_t = Tensor::from_vec(pos_now, (b, 1), dev)?;
        let mask = attention_mask(&key_valid, offset, 1, dev)?;
        let hidden = model.forward_hidden(&ids_t, &pos_t, &mask, Some(&mut cache))?;
        logits = model.logits(&hidden.squeeze(1)?)?;
    }
    Ok(out)
}

/// NaN or +∞ logits (NaN weights, or activations that overflowed) would be sampled as an
/// arbitrary token: an error naming the sequence and the position instead.
fn check_logits(flat: &[f32], vocab: usize, step: usize) -> Result<()> {
    match flat.iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
        None => Ok(()),
        Some(i) => Err(Error::NonFiniteLogits {
            sequence: i / vocab.max(1),
            new_token: step,
            value: flat[i],
        }),
    }
}

/// Draws one token from a row of logits by inverse CDF (one uniform, no per-entry
/// exponential draws; `sampler`); returns it with its log-prob under the tempered
/// distribution. Greedy decoding draws nothing from `rng`.
pub fn sample_token<R: Rng>(
    logits: &[f32],
    params: &SamplingParams,
    rng: &mut R,
    scratch: &mut sampler::Scratch,
) -> (u32, f32) {
    sampler::sample_with_uniform(logits, params, draw_uniform(params, rng), scratch)
}

/// The one uniform a sampled token consumes; greedy decoding draws nothing.
fn draw_uniform<R: Rng>(params: &SamplingParams, rng: &mut R) -> f64 {
    if params.temperature == 0.0 {
        0.0
    } else {
        rng.gen::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_takes_argmax_with_its_logprob() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let (tok, lp) = sample_token(
            &[0.0, 2.0, 1.0],
            &SamplingParams::greedy(1),
            &mut rng,
            &mut Default::default(),
        );
        assert_eq!(tok, 1);
        // log softmax: 2 − ln(e^0 + e^2 + e^1) = 2 − 2.40761 = −0.40761
        assert!((lp as f64 + 0.407606).abs() < 1e-5);
    }

    #[test]
    fn sampling_frequencies_follow_probabilities() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 1,
        };
        let n = 20000;
        let ones = (0..n)
            .filter(|_| sample_token(&logits, &params, &mut rng, &mut Default::default()).0 == 1)
            .count();
        let f = ones as f64 / n as f64;
        assert!((f - 0.75).abs() < 0.015, "frequency {f}");
    }

    #[test]
    fn top_p_excludes_the_tail() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        // p ≈ [0.665, 0.245, 0.090]; top_p 0.8 keeps tokens 0 and 1 only.
        let logits = [2.0f32, 1.0, 0.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.8,
            max_new_tokens: 1,
        };
        for _ in 0..2000 {
            assert_ne!(
                sample_token(&logits, &params, &mut rng, &mut Default::default()).0,
                2
            );
        }
    }
}
