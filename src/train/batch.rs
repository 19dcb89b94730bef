//! Packing (prompt, response) pairs into one tensor batch and computing the per-token
//! log-probs of the response tokens, with gradient.
//!
//! Layout: prompts left-padded to P (as the sampler sees them), responses right-padded to R.
//! The logits at column P−1+j predict response token j, so only R columns reach the output
//! layer, and the numerics match the sampler's (same positions, same masks).
use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};
use crate::model::{attention_mask, Llama};
use crate::rollout::left_pad;

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

/// Per-token log-probs (b, r) of the response tokens under `model` at `temperature`
/// (1 for SFT; the sampling temperature for RL so ratios compare like with like), and the
/// logits' log-softmax for entropy.
pub fn response_logprobs(
    model: &Llama,
    batch: &SeqBatch,
    temperature: f64,
) -> Result<(Tensor, Tensor)> {
    let hidden = model.forward_hidden(&batch.ids, &batch.pos, &batch.mask, None)?;
    let h = hidden.narrow(1, batch.prompt_len - 1, batch.resp_len)?;
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
    Ok((lp, lsm))
}

/// Mean token entropy over valid tokens, as a tensor with gradient: −Σ p log p.
pub fn entropy(lsm: &Tensor, valid: &Tensor) -> Result<Tensor> {
    let ent = (lsm.exp()? * lsm)?.sum(D::Minus1)?.neg()?;
    let n = valid
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        .max(1.0);
    Ok(((ent * valid)?.sum_all()? / n)?)
}

pub fn to_f64_rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.to_dtype(DType::F64)?.to_vec2::<f64>()?)
}
