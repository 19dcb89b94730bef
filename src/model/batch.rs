//! Packing (prompt, response) pairs into one tensor batch and computing the per-token
//! log-probs of the response tokens, with gradient.
//!
//! Layout: prompts left-padded to P (as the sampler sees them), responses right-padded to R.
//! The logits at column P−1+j predict response token j, so only R columns reach the output
//! layer, and the numerics match the sampler's (same positions, same masks).
use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};
use crate::model::{attention_mask, logprob, Llama};

/// Left-pads prompts; returns ids, positions and key validity, all (b, p).
pub fn left_pad(prompts: &[Vec<u32>], pad: u32) -> (Vec<u32>, Vec<u32>, Vec<Vec<bool>>, usize) {
    let p = prompts.iter().map(|x| x.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * p);
    let mut pos = Vec::with_capacity(prompts.len() * p);
    let mut valid = Vec::with_capacity(prompts.len());
    for pr in prompts {
        let npad = p - pr.len();
        ids.extend(std::iter::repeat_n(pad, npad));
        ids.extend_from_slice(pr);
        pos.extend(std::iter::repeat_n(0, npad));
        pos.extend(0..pr.len() as u32);
        valid.push((0..p).map(|j| j >= npad).collect());
    }
    (ids, pos, valid, p)
}

pub struct SeqBatch {
    pub ids: Tensor,
    pub pos: Tensor,
    pub mask: Tensor,
    pub targets: Tensor,
    /// 1.0 for real response tokens, 0.0 for padding: (b, r).
    pub valid: Vec<Vec<f64>>,
    pub prompt_len: usize,
    pub resp_len: usize,
}

pub fn build(
    prompts: &[Vec<u32>],
    responses: &[Vec<u32>],
    pad: u32,
    dev: &Device,
) -> Result<SeqBatch> {
    if prompts.len() != responses.len() || prompts.is_empty() {
        return Err(Error::Model(format!(
            "batch: {} prompts for {} responses (need the same, non-zero number)",
            prompts.len(),
            responses.len()
        )));
    }
    let b = prompts.len();
    let (pids, ppos, pvalid, p) = left_pad(prompts, pad);
    if p == 0 {
        return Err(Error::Model("batch: every prompt is empty".into()));
    }
    let r = responses.iter().map(|x| x.len()).max().unwrap_or(0).max(1);
    // Inputs are columns 0..p+r−1: the last response token is only a target.
    let t = p + r - 1;
    let mut ids = Vec::with_capacity(b * t);
    let mut pos = Vec::with_capacity(b * t);
    let mut key_valid = Vec::with_capacity(b);
    let mut targets = Vec::with_capacity(b * r);
    let mut valid = Vec::with_capacity(b);
    for i in 0..b {
        let resp = &responses[i];
        let plen = prompts[i].len() as u32;
        ids.extend_from_slice(&pids[i * p..(i + 1) * p]);
        pos.extend_from_slice(&ppos[i * p..(i + 1) * p]);
        let mut kv = pvalid[i].clone();
        for j in 0..r - 1 {
            ids.push(resp.get(j).copied().unwrap_or(pad));
            pos.push(plen + j as u32);
            kv.push(j < resp.len());
        }
        key_valid.push(kv);
        targets.extend((0..r).map(|j| resp.get(j).copied().unwrap_or(pad)));
        valid.push(
            (0..r)
                .map(|j| if j < resp.len() { 1.0 } else { 0.0 })
                .collect(),
        );
    }
    Ok(SeqBatch {
        ids: Tensor::from_vec(ids, (b, t), dev)?,
        pos: Tensor::from_vec(pos, (b, t), dev)?,
        mask: attention_mask(&key_valid, 0, t, dev)?,
        targets: Tensor::from_vec(targets, (b, r), dev)?,
        valid,
        prompt_len: p,
        resp_len: r,
    })
}

/// How [`response_logprobs_with`] computes token log-probs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobImpl {
    /// Chunked above [`crate::model::logprob::CHUNKED_MIN_VOCAB`] tokens, composed below.
    Auto,
    /// Full log-softmax then gather: (b, r, V) tensors, fastest for small vocabularies.
    Composed,
    /// Vocabulary chunks with a custom backward (`model::logprob`).
    Chunked,
}

impl std::str::FromStr for LogprobImpl {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(LogprobImpl::Auto),
            "composed" => Ok(LogprobImpl::Composed),
            "chunked" => Ok(LogprobImpl::Chunked),
            other => Err(format!(
                "unknown log-prob implementation {other:?} (expected auto, composed or chunked)"
            )),
        }
    }
}

/// Per-token log-probs (b, r) of the response tokens under `model` at `temperature`
/// (1 for SFT; the sampling temperature for RL so ratios compare like with like), and the
/// per-token entropies (b, r) of the same tempered distribution, both with gradient.
/// Large vocabularies go through the chunked op, which never builds (b, r, V) tensors.
pub fn response_logprobs(
    model: &Llama,
    batch: &SeqBatch,
    temperature: f64,
) -> Result<(Tensor, Tensor)> {
    response_logprobs_with(model, batch, temperature, LogprobImpl::Auto)
}

/// [`response_logprobs`] with an explicit implementation (for benchmarks and tests).
pub fn response_logprobs_with(
    model: &Llama,
    batch: &SeqBatch,
    temperature: f64,
    how: LogprobImpl,
) -> Result<(Tensor, Tensor)> {
    let hidden = model.forward_hidden(&batch.ids, &batch.pos, &batch.mask, None)?;
    let h = hidden.narrow(1, batch.prompt_len - 1, batch.resp_len)?;
    let chunked = match how {
        LogprobImpl::Auto => model.cfg.vocab_size > logprob::CHUNKED_MIN_VOCAB,
        LogprobImpl::Composed => false,
        LogprobImpl::Chunked => true,
    };
    if chunked {
        let (b, r, hs) = h.dims3()?;
        let stats = logprob::chunked_token_stats(
            &h.contiguous()?.reshape((b * r, hs))?,
            model.lm_head(),
            &batch.targets.flatten_all()?,
            temperature,
            logprob::DEFAULT_CHUNK,
        )?;
        let lp = stats.narrow(1, 0, 1)?.reshape((b, r))?;
        let ent = stats.narrow(1, 1, 1)?.reshape((b, r))?;
        return Ok((lp, ent));
    }
    let mut logits = model.logits(&h)?;
    if temperature > 0.0 && temperature != 1.0 {
        logits = (logits / temperature)?;
    }
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let lp = lsm
        .gather(
            &batch.targets.unsqueeze(D::Minus1)?.contiguous()?,
            D::Minus1,
        )?
        .squeeze(D::Minus1)?;
    let ent = (lsm.exp()? * &lsm)?.sum(D::Minus1)?.neg()?;
    Ok((lp, ent))
}

/// Mean token entropy over valid tokens, as a tensor with gradient, from the per-token
/// entropies (b, r) that [`response_logprobs`] returns.
pub fn entropy(token_entropy: &Tensor, valid: &Tensor) -> Result<Tensor> {
    let n = valid
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        .max(1.0);
    Ok(((token_entropy * valid)?.sum_all()? / n)?)
}

pub fn to_f64_rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.to_dtype(DType::F64)?.to_vec2::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;

    #[test]
    fn chunked_and_composed_paths_agree_through_the_model() {
        let dev = Device::Cpu;
        let mut cfg = Config::builtin_tiny(37);
        cfg.hidden_size = 16;
        cfg.intermediate_size = 24;
        cfg.tie_word_embeddings = Some(false);
        let model = Llama::init(&cfg, 5, &dev).unwrap();
        for (_, v) in model.params() {
            if v.as_tensor().dims().len() == 2 {
                v.set(&(v.as_tensor() * 20.0).unwrap()).unwrap();
            }
        }
        let prompts = vec![vec![1, 2, 3], vec![4, 5]];
        let responses = vec![vec![6, 7, 8, 9], vec![10]];
        let b = build(&prompts, &responses, 0, &dev).unwrap();
        let valid = Tensor::new(&[[1f32, 1., 1., 1.], [1., 0., 0., 0.]], &dev).unwrap();
        let run = |how| {
            let (lp, ent) = response_logprobs_with(&model, &b, 0.8, how).unwrap();
            let obj = ((&lp * &valid).unwrap().sum_all().unwrap() + entropy(&ent, &valid).unwrap())
                .unwrap();
            let g = obj.backward().unwrap();
            (lp, ent, g)
        };
        let (lp_a, ent_a, g_a) = run(LogprobImpl::Composed);
        let (lp_b, ent_b, g_b) = run(LogprobImpl::Chunked);
        // Largest difference relative to the largest magnitude (at least 1).
        let close = |x: &Tensor, y: &Tensor, tol: f32| {
            let amax = |t: &Tensor| {
                let m = t.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                m.to_scalar::<f32>().unwrap()
            };
            let d = amax(&(x - y).unwrap()) / amax(y).max(1.0);
            assert!(d < tol, "relative max difference {d}");
        };
        close(&lp_a, &lp_b, 1e-4);
        close(&ent_a, &ent_b, 1e-4);
        assert_eq!(lp_a.dims(), &[2, 4]);
        for (_, var) in model.params() {
            close(
                g_a.get(var.as_tensor()).unwrap(),
                g_b.get(var.as_tensor()).unwrap(),
                1e-4,
            );
        }
    }

    #[test]
    fn left_pad_positions_count_real_tokens() {
        let (ids, pos, valid, p) = left_pad(&[vec![5, 6, 7], vec![8]], 0);
        assert_eq!(p, 3);
        assert_eq!(ids, vec![5, 6, 7, 0, 0, 8]);
        assert_eq!(pos, vec![0, 1, 2, 0, 0, 0]);
        assert_eq!(valid[1], vec![false, false, true]);
    }
}
