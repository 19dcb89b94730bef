//! Token log-probs and entropies over a large vocabulary, computed in vocabulary chunks with a
//! hand-written backward: the full-vocabulary log-softmax is the memory hot spot.
//!
//! The composed path (`log_softmax(h·Wᵀ/T)` then `gather`) keeps several (N, V) tensors alive
//! for the backward pass: the logits, the log-softmax and its gradient. With a 152k vocabulary
//! and N = 2048 response tokens each one is 1.2 GB in f32. Here the vocabulary is visited in
//! chunks of `chunk` rows of the output matrix W (V, H), and only one (N, chunk) block exists at
//! a time, forward and backward:
//!
//! forward, per row n with z = h_n·Wᵀ/T: an online logsumexp over chunks gives
//!   log Z = m + ln s,  s = Σ_v e^{z_v − m},  and  a = Σ_v e^{z_v − m}(z_v − m),
//!   so  log p(y) = z_y − log Z  and the entropy  H = log Z − E_p\[z\] = ln s − a/s;
//!   when the running max m moves to m', s ← s·e^{m−m'} + …, a ← e^{m−m'}(a + s(m − m')) + ….
//! backward, with incoming gradients g (for log p(y)) and e (for H):
//!   ∂log p(y)/∂z_v = 1[v = y] − p_v,   ∂H/∂z_v = −p_v (z_v − E_p\[z\]),
//!   so  ∂L/∂z_v = g·1[v = y] − p_v (g + e (z_v − E_p\[z\])),
//!   ∂L/∂h = Σ_chunks (∂L/∂z)·W_c / T   and   ∂L/∂W_c = (∂L/∂z)ᵀ·h / T,
//!   recomputing each chunk's logits from h and W (one extra matmul instead of storing them).
//!
//! On the CPU the element-wise part of each chunk (the fold above, and ∂L/∂z) is one fused,
//! multi-threaded pass, and when all N·V logits fit in [`CACHE_LOGITS_MAX_BYTES`] the forward
//! keeps its chunks for the backward, which then skips the recomputing matmul (one of four
//! output-layer GEMMs); above that budget only one (N, chunk) block exists at a time.
//!
//! The op is a candle [`CustomOp3`] over (hidden, lm_head, stats): the chunked forward runs first
//! on detached tensors (candle's `cpu_fwd`/`cuda_fwd` only see raw storages, and tensor ops let
//! one implementation serve every device), the op passes its (N, 2) result through and carries
//! the backward above. The result has no gradient path other than this backward.
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};

use crate::error::{Error, Result};
use crate::model::fused::{fast_exp, gemm_acc, gemm_into, lane_max, output_buffer, with_cpu_f32};
use crate::model::simd::simd_kernel;

/// Vocabulary rows per chunk.
pub const DEFAULT_CHUNK: usize = 4096;
/// Logits up to this size (N·V·4 bytes) are kept from the forward pass for the backward.
pub const CACHE_LOGITS_MAX_BYTES: usize = 1 << 30;
/// `model::batch::response_logprobs` uses the chunked op above this vocabulary size.
pub const CHUNKED_MIN_VOCAB: usize = 4096;

fn err(msg: String) -> Error {
    Error::Model(format!("chunked token log-probs: {msg}"))
}

/// Checks shapes and returns (N, H, V).
fn check(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &Tensor,
    chunk: usize,
) -> Result<(usize, usize, usize)> {
    let (n, h) = hidden
        .dims2()
        .map_err(|_| err(format!("hidden must be (N, H), found {:?}", hidden.dims())))?;
    let (v, h2) = lm_head.dims2().map_err(|_| {
        err(format!(
            "lm_head must be (V, H), found {:?}",
            lm_head.dims()
        ))
    })?;
    if h != h2 {
        return Err(err(format!(
            "hidden size {h} of hidden {:?} differs from lm_head {:?}",
            hidden.dims(),
            lm_head.dims()
        )));
    }
    if targets.dims() != [n] || targets.dtype() != DType::U32 {
        return Err(err(format!(
            "targets must be ({n},) u32, found {:?} {:?}",
            targets.dims(),
            targets.dtype()
        )));
    }
    if chunk == 0 {
        return Err(err("chunk must be positive, found 0".into()));
    }
    Ok((n, h, v))
}

/// Per-token log p(target) and entropy of softmax(hidden·lm_headᵀ / temperature), as (N, 2):
/// column 0 the log-prob, column 1 the entropy. Differentiable with respect to `hidden` and
/// `lm_head`; never holds more than one (N, chunk) block of logits. `temperature` ≤ 0 means 1.
pub fn chunked_token_stats(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &Tensor,
    temperature: f64,
    chunk: usize,
) -> Result<Tensor> {
    chunked_token_stats_with_cache(
        hidden,
        lm_head,
        targets,
        temperature,
        chunk,
        CACHE_LOGITS_MAX_BYTES,
    )
}

/// [`chunked_token_stats`] with an explicit logit-cache budget in bytes (0: always recompute).
pub fn chunked_token_stats_with_cache(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &Tensor,
    temperature: f64,
    chunk: usize,
    cache_bytes: usize,
) -> Result<Tensor> {
    let (n, _, v) = check(hidden, lm_head, targets, chunk)?;
    if n == 0 {
        return Ok(Tensor::zeros((0, 2), DType::F32, hidden.device())?);
    }
    let inv_t = if temperature > 0.0 {
        1.0 / temperature
    } else {
        1.0
    };
    let targets = targets.contiguous()?;
    let hd = hidden.detach().to_dtype(DType::F32)?.contiguous()?;
    let wd = lm_head.detach().to_dtype(DType::F32)?;
    let max_target = targets.max(0)?.to_scalar::<u32>()? as usize;
    if max_target >= v {
        return Err(err(format!(
            "target id {max_target} is outside the vocabulary of {v}"
        )));
    }
    // Running max m, sum s = Σ e^{z−m} and a = Σ e^{z−m}(z−m), each (N, 1).
    let keep_logits = hd.device().is_cpu()
        && (hidden.track_op() || lm_head.track_op())
        && n.saturating_mul(v).saturating_mul(4) <= cache_bytes;
    let mut cached = Vec::new();
    let run = if hd.device().is_cpu() {
        // One fused, multi-threaded pass per chunk folds the chunk into (m, s, a).
        let mut state =
            Tensor::from_vec([f32::NEG_INFINITY, 0.0, 0.0].repeat(n), (n, 3), hd.device())?;
        for v0 in (0..v).step_by(chunk) {
            let c = chunk.min(v - v0);
            let z = hd.matmul(&wd.narrow(0, v0, c)?.t()?)?;
            state = z.apply_op2_no_bwd(
                &state,
                &ChunkFold {
                    inv_t: inv_t as f32,
                },
            )?;
            if keep_logits {
                cached.push(z);
            }
        }
        Some((
            state.narrow(1, 0, 1)?,
            state.narrow(1, 1, 1)?,
            state.narrow(1, 2, 1)?,
        ))
    } else {
        chunked_fold_composed(&hd, &wd, v, chunk, inv_t)?
    };
    let (m, s, a) = run.ok_or_else(|| err("the vocabulary is empty".into()))?;
    let log_s = s.log()?;
    let log_z = (&m + &log_s)?;
    let mean_z = (&m + (&a / &s)?)?;
    let ent = (log_s - (&a / &s)?)?;
    let z_y = ((&hd * wd.index_select(&targets, 0)?)?.sum_keepdim(D::Minus1)? * inv_t)?;
    let lp = (z_y - &log_z)?;
    let stats = Tensor::cat(&[&lp, &ent], 1)?.contiguous()?;
    if !hidden.track_op() && !lm_head.track_op() {
        return Ok(stats);
    }
    let op = ChunkedLogprobOp {
        cached: keep_logits.then_some(cached),
        targets,
        log_z,
        mean_z,
        inv_t,
        chunk,
    };
    Ok(hidden.apply_op3(lm_head, &stats, op)?)
}

/// The running (max, sum, a) of the module docs over all chunks, from candle tensor ops (any
/// device).
fn chunked_fold_composed(
    hd: &Tensor,
    wd: &Tensor,
    v: usize,
    chunk: usize,
    inv_t: f64,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let mut run: Option<(Tensor, Tensor, Tensor)> = None;
    for v0 in (0..v).step_by(chunk) {
        let c = chunk.min(v - v0);
        let z = (hd.matmul(&wd.narrow(0, v0, c)?.t()?)? * inv_t)?;
        let cm = z.max_keepdim(D::Minus1)?;
        run = Some(match run {
            None => {
                let zc = z.broadcast_sub(&cm)?;
                let e = zc.exp()?;
                let s = e.sum_keepdim(D::Minus1)?;
                let a = (&e * &zc)?.sum_keepdim(D::Minus1)?;
                (cm, s, a)
            }
            Some((m, s, a)) => {
                let m2 = m.maximum(&cm)?;
                let shift = (&m - &m2)?; // ≤ 0
                let scale = shift.exp()?;
                let zc = z.broadcast_sub(&m2)?;
                let e = zc.exp()?;
                let s2 = ((&s * &scale)? + e.sum_keepdim(D::Minus1)?)?;
                let a2 =
                    (((a + (&s * &shift)?)? * &scale)? + (&e * &zc)?.sum_keepdim(D::Minus1)?)?;
                (m2, s2, a2)
            }
        });
    }
    Ok(run)
}

/// Folds one chunk of logits z (N, c), scaled by `inv_t`, into the running state (N, 3) =
/// (m, s, a): m' = max(m, max z), s' = s·e^{m−m'} + Σ e^{z−m'},
/// a' = e^{m−m'}·(a + s·(m − m')) + Σ e^{z−m'}·(z − m'). Rows in parallel, one pass.
struct ChunkFold {
    inv_t: f32,
}

impl candle_core::CustomOp2 for ChunkFold {
    fn name(&self) -> &'static str {
        "chunked-logprob-fold"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (Some((z0, z1)), Some((t0, t1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("chunked-logprob-fold: inputs must be contiguous")
        };
        let z = &s1.as_slice::<f32>()?[z0..z1];
        let st = &s2.as_slice::<f32>()?[t0..t1];
        let (_, c) = l1.shape().dims2()?;
        let inv_t = self.inv_t;
        let mut out = st.to_vec();
        out.par_chunks_mut(3)
            .zip(z.par_chunks(c))
            .with_min_len((1 << 14) / c.max(1) + 1)
            .for_each(|(o, zr)| {
                let (m, s, a) = (o[0], o[1], o[2]);
                let cm = lane_max(zr) * inv_t;
                let m2 = m.max(cm);
                let (cs, ca) = fold_row(zr, inv_t, m2);
                if s > 0.0 {
                    let scale = fast_exp(m - m2);
                    o[1] = s * scale + cs;
                    o[2] = scale * (a + s * (m - m2)) + ca;
                } else {
                    o[1] = cs;
                    o[2] = ca;
                }
                o[0] = m2;
            });
        Ok((CpuStorage::F32(out), l2.shape().clone()))
    }
}

simd_kernel! {
    /// (Σ e^{d_v}, Σ e^{d_v}·d_v) over one row of logits, d_v = z_v·inv_t − m.
    fn fold_row / fold_row_at(zr: &[f32], inv_t: f32, m: f32) -> (f32, f32) {
        // Sixteen independent accumulators so the loop vectorises.
        let (mut cs16, mut ca16) = ([0f32; 16], [0f32; 16]);
        let blocks = zr.chunks_exact(16);
        let rest = blocks.remainder();
        for b in blocks {
            for k in 0..16 {
                let d = b[k] * inv_t - m;
                let e = fast_exp(d);
                cs16[k] += e;
                ca16[k] += e * d;
            }
        }
        let (mut cs, mut ca): (f32, f32) = (cs16.iter().sum(), ca16.iter().sum());
        for &zv in rest {
            let d = zv * inv_t - m;
            let e = fast_exp(d);
            cs += e;
            ca += e * d;
        }
        (cs, ca)
    }
}

simd_kernel! {
    /// One row of ∂L/∂z without the target term: −inv_t·p_v·(g + e·(z_v·inv_t − E_p\[z\])),
    /// p_v = e^{z_v·inv_t − log Z}.
    fn grad_row / grad_row_at(zr: &[f32], inv_t: f32, log_z: f32, mean_z: f32, g: f32, e: f32, o: &mut [f32]) {
        for (ov, &zv) in o.iter_mut().zip(zr) {
            let zz = zv * inv_t;
            let p = fast_exp(zz - log_z);
            *ov = -inv_t * p * (g + e * (zz - mean_z));
        }
    }
}

/// ∂L/∂z of one chunk (N, c) from its logits z, the targets (N) and per-row
/// (log Z, E_p\[z\], g, e) (N, 4): inv_t·(g·1[v = y] − p_v·(g + e·(z_v − E_p\[z\]))) with z scaled
/// by inv_t and p_v = e^{z_v − log Z}. Rows in parallel, one pass.
struct ChunkGrad {
    v0: usize,
    inv_t: f32,
}

impl CustomOp3 for ChunkGrad {
    fn name(&self) -> &'static str {
        "chunked-logprob-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (Some((z0, z1)), Some((y0, y1)), Some((r0, r1))) = (
            l1.contiguous_offsets(),
            l2.contiguous_offsets(),
            l3.contiguous_offsets(),
        ) else {
            candle_core::bail!("chunked-logprob-grad: inputs must be contiguous")
        };
        let z = &s1.as_slice::<f32>()?[z0..z1];
        let ys = &s2.as_slice::<u32>()?[y0..y1];
        let rows = &s3.as_slice::<f32>()?[r0..r1];
        let (_, c) = l1.shape().dims2()?;
        let (v0, inv_t) = (self.v0, self.inv_t);
        // Every row written by grad_row.
        let mut out = output_buffer(z.len());
        out.par_chunks_mut(c)
            .zip(z.par_chunks(c))
            .zip(ys.par_iter().zip(rows.par_chunks(4)))
            .with_min_len((1 << 14) / c.max(1) + 1)
            .for_each(|((o, zr), (&y, r))| {
                let (log_z, mean_z, g, e) = (r[0], r[1], r[2], r[3]);
                grad_row(zr, inv_t, log_z, mean_z, g, e, o);
                let y = y as usize;
                if y >= v0 && y < v0 + c {
                    o[y - v0] += inv_t * g;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Per-token log p(target) (N) under softmax(hidden·lm_headᵀ / temperature), computed in
/// vocabulary chunks with its own backward; see the module docs.
pub fn chunked_token_logprobs(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &Tensor,
    temperature: f64,
    chunk: usize,
) -> Result<Tensor> {
    Ok(
        chunked_token_stats(hidden, lm_head, targets, temperature, chunk)?
            .narrow(1, 0, 1)?
            .squeeze(1)?,
    )
}

/// The composed reference: full log-softmax then gather; returns (N, 2) like
/// [`chunked_token_stats`]. Materialises (N, V) tensors; for tests and small vocabularies.
pub fn composed_token_stats(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    check(hidden, lm_head, targets, 1)?;
    let mut logits = hidden.matmul(&lm_head.t()?)?;
    if temperature > 0.0 && temperature != 1.0 {
        logits = (logits / temperature)?;
    }
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let lp = lsm.gather(&targets.contiguous()?.unsqueeze(1)?, D::Minus1)?;
    let ent = (lsm.exp()? * &lsm)?.sum_keepdim(D::Minus1)?.neg()?;
    Ok(Tensor::cat(&[&lp, &ent], 1)?)
}

/// The backward of [`chunked_token_stats`]; the forward passes the precomputed stats through.
struct ChunkedLogprobOp {
    /// The forward's unscaled logit chunks, when they fit the cache budget.
    cached: Option<Vec<Tensor>>,
    targets: Tensor,
    /// log Z and E_p\[z\] per row, (N, 1), from the forward pass.
    log_z: Tensor,
    mean_z: Tensor,
    inv_t: f64,
    chunk: usize,
}

// The tensor-op backward below is what other devices run; tests force it on the CPU so that it
// is checked against the composed reference too.
#[cfg(test)]
thread_local! {
    static FORCE_COMPOSED_BWD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn composed_bwd_forced() -> bool {
    #[cfg(test)]
    {
        FORCE_COMPOSED_BWD.with(|f| f.get())
    }
    #[cfg(not(test))]
    {
        false
    }
}

impl ChunkedLogprobOp {
    /// The CPU backward: per chunk, ∂L/∂z by the fused [`ChunkGrad`] pass, then
    /// ∂h += ∂z·W_c accumulated in one buffer and ∂W_c = ∂zᵀ·h written straight into its rows
    /// of ∂W. No (V, H) zero fill and no per-chunk copies: for a 152k vocabulary ∂W is 545 MB.
    fn cpu_bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        g_lp: &Tensor,
        g_ent: &Tensor,
        want_w: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let (n, hs) = h.dims2()?;
        let (v, _) = w.dims2()?;
        let rows = Tensor::cat(&[&self.log_z, &self.mean_z, g_lp, g_ent], 1)?.contiguous()?;
        let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
        // ∂h is accumulated over chunks, so it starts at zero; ∂W's rows are written in full,
        // chunk by chunk.
        let mut grad_h = vec![0f32; n * hs];
        // A frozen head (LoRA's base) gets no ∂W: no GEMM, no (V, H) buffer.
        let mut grad_w = output_buffer(if want_w { v * hs } else { 0 });
        for (k, v0) in (0..v).step_by(self.chunk).enumerate() {
            let c = self.chunk.min(v - v0);
            let z = match self.cached.as_ref().and_then(|cs| cs.get(k)) {
                Some(z) => z.clone(),
                None => h.matmul(&w.narrow(0, v0, c)?.t()?)?,
            };
            let gz = z.apply_op3_no_bwd(
                &self.targets,
                &rows,
                &ChunkGrad {
                    v0,
                    inv_t: self.inv_t as f32,
                },
            )?;
            with_cpu_f32([h, w, &gz], "chunked log-prob backward", |[hd, wd, gzd]| {
                let wc = &wd[v0 * hs..(v0 + c) * hs];
                gemm_acc(&mut grad_h, true, n, hs, c, gzd, (c, 1), wc, (hs, 1), par);
                if want_w {
                    let gw = &mut grad_w[v0 * hs..(v0 + c) * hs];
                    gemm_into(gw, c, hs, n, gzd, (1, c), hd, (hs, 1), par);
                }
                Ok(())
            })?;
        }
        let dev = h.device();
        Ok((
            Tensor::from_vec(grad_h, (n, hs), dev)?,
            want_w
                .then(|| Tensor::from_vec(grad_w, (v, hs), dev))
                .transpose()?,
        ))
    }
}

impl CustomOp3 for ChunkedLogprobOp {
    fn name(&self) -> &'static str {
        "chunked-token-logprobs"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        stats: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = stats.as_slice::<f32>()?;
        let out = match layout.contiguous_offsets() {
            Some((start, end)) => data[start..end].to_vec(),
            None => candle_core::bail!("chunked-token-logprobs: stats must be contiguous"),
        };
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        stats: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("chunked-token-logprobs: stats must be contiguous from offset 0");
        }
        Ok((stats.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        lm_head: &Tensor,
        _stats: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = hidden.detach().to_dtype(DType::F32)?.contiguous()?;
        let w = lm_head.detach().to_dtype(DType::F32)?;
        let (v, _) = w.dims2()?;
        let g = grad_res.to_dtype(DType::F32)?;
        let g_lp = g.narrow(1, 0, 1)?.contiguous()?;
        let g_ent = g.narrow(1, 1, 1)?.contiguous()?;
        if h.device().is_cpu() && !composed_bwd_forced() {
            let want_w = lm_head.track_op();
            let (grad_h, grad_w) = self.cpu_bwd(&h, &w.contiguous()?, &g_lp, &g_ent, want_w)?;
            let grad_h = grad_h.to_dtype(hidden.dtype())?;
            let grad_w = grad_w.map(|g| g.to_dtype(lm_head.dtype())).transpose()?;
            return Ok((Some(grad_h), grad_w, None));
        }
        let mut grad_h = h.zeros_like()?;
        let grad_w = Tensor::zeros(w.dims(), DType::F32, w.device())?;
        let tg = self.targets.unsqueeze(1)?;
        for v0 in (0..v).step_by(self.chunk) {
            let c = self.chunk.min(v - v0);
            let wc = w.narrow(0, v0, c)?;
            let z = (h.matmul(&wc.t()?)? * self.inv_t)?;
            let p = z.broadcast_sub(&self.log_z)?.exp()?;
            let coef = z
                .broadcast_sub(&self.mean_z)?
                .broadcast_mul(&g_ent)?
                .broadcast_add(&g_lp)?;
            let ids = Tensor::arange(v0 as u32, (v0 + c) as u32, w.device())?.unsqueeze(0)?;
            let onehot = tg.broadcast_eq(&ids)?.to_dtype(DType::F32)?;
            let gz = ((onehot.broadcast_mul(&g_lp)? - (p * coef)?)? * self.inv_t)?;
            grad_h = (grad_h + gz.matmul(&wc)?)?;
            grad_w.slice_set(&gz.t()?.matmul(&h)?.contiguous()?, 0, v0)?;
        }
        let grad_h = grad_h.to_dtype(hidden.dtype())?;
        let grad_w = grad_w.to_dtype(lm_head.dtype())?;
        Ok((Some(grad_h), Some(grad_w), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rand_tensor(rng: &mut ChaCha8Rng, shape: (usize, usize), scale: f32) -> Tensor {
        let n = shape.0 * shape.1;
        let data: Vec<f32> = (0..n)
            .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn every_simd_level_folds_and_differentiates_the_same() {
        use crate::model::simd::Level;
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // 53: three 16-lane blocks and a remainder.
        let z: Vec<f32> = (0..53).map(|_| rng.gen_range(-4.0f32..4.0)).collect();
        let m = lane_max(&z) * 0.8;
        // Reference in f64: Σ e^d and Σ e^d·d, d = 0.8·z − m.
        let (s_ref, a_ref) = z.iter().fold((0f64, 0f64), |(s, a), &zv| {
            let d = 0.8 * zv as f64 - m as f64;
            (s + d.exp(), a + d.exp() * d)
        });
        for l in Level::available() {
            let (s, a) = fold_row_at(l, &z, 0.8, m);
            assert!(
                (s as f64 - s_ref).abs() < 1e-5 * s_ref,
                "{l:?}: {s} vs {s_ref}"
            );
            assert!(
                (a as f64 - a_ref).abs() < 1e-4 * a_ref.abs().max(1.0),
                "{l:?}: {a} vs {a_ref}"
            );
            let mut o = vec![0f32; z.len()];
            grad_row_at(l, &z, 0.8, 1.5, 0.2, 0.6, -0.3, &mut o);
            for (ov, &zv) in o.iter().zip(&z) {
                let zz = 0.8 * zv as f64;
                let want = -0.8 * (zz - 1.5).exp() * (0.6 - 0.3 * (zz - 0.2));
                assert!(
                    (*ov as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "{l:?}"
                );
            }
        }
    }

    #[test]
    fn hand_computed_two_token_vocabulary() {
        // h = [1], W = [[0], [ln 3]]: logits [0, ln 3], p = [1/4, 3/4].
        // log p(1) = ln 0.75 = −0.287682; H = −(¼ ln ¼ + ¾ ln ¾) = 0.562335.
        let dev = Device::Cpu;
        let h = Tensor::new(&[[1.0f32]], &dev).unwrap();
        let w = Tensor::new(&[[0.0f32], [3.0f32.ln()]], &dev).unwrap();
        let y = Tensor::new(&[1u32], &dev).unwrap();
        for chunk in [1, 2, 5] {
            let s = chunked_token_stats(&h, &w, &y, 1.0, chunk)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert!((s[0][0] + 0.287682).abs() < 1e-5, "{s:?}");
            assert!((s[0][1] - 0.562335).abs() < 1e-5, "{s:?}");
        }
    }

    #[test]
    fn values_and_gradients_match_the_composed_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (n, hs, v) = (7, 5, 23);
        for (temperature, chunk) in [(1.0, 4), (0.7, 23), (1.3, 1), (1.0, 100), (0.0, 6)] {
            let h = Var::from_tensor(&rand_tensor(&mut rng, (n, hs), 2.0)).unwrap();
            let w = Var::from_tensor(&rand_tensor(&mut rng, (v, hs), 2.0)).unwrap();
            let ids: Vec<u32> = (0..n).map(|_| rng.gen_range(0..v as u32)).collect();
            let y = Tensor::from_vec(ids, n, &Device::Cpu).unwrap();
            // Distinct weights per output so that a transposed or misplaced gradient shows.
            let wl = rand_tensor(&mut rng, (n, 1), 1.0);
            let we = rand_tensor(&mut rng, (n, 1), 1.0);
            let objective = |s: &Tensor| {
                let lp = s.narrow(1, 0, 1).unwrap();
                let ent = s.narrow(1, 1, 1).unwrap();
                ((lp * &wl).unwrap().sum_all().unwrap() + (ent * &we).unwrap().sum_all().unwrap())
                    .unwrap()
            };
            let slow = composed_token_stats(h.as_tensor(), w.as_tensor(), &y, temperature).unwrap();
            let gs = objective(&slow).backward().unwrap();
            // Every backward path: logits kept from the forward or recomputed, and the
            // tensor-op path of other devices (run here on the CPU).
            for (budget, composed) in [(usize::MAX, false), (0, false), (0, true)] {
                FORCE_COMPOSED_BWD.with(|f| f.set(composed));
                let fast = chunked_token_stats_with_cache(
                    h.as_tensor(),
                    w.as_tensor(),
                    &y,
                    temperature,
                    chunk,
                    budget,
                )
                .unwrap();
                assert!(
                    max_abs_diff(&fast, &slow) < 1e-5,
                    "values T={temperature} chunk={chunk}"
                );
                let gf = objective(&fast).backward().unwrap();
                for var in [&h, &w] {
                    let a = gf.get(var.as_tensor()).unwrap();
                    let b = gs.get(var.as_tensor()).unwrap();
                    let d = max_abs_diff(a, b);
                    assert!(
                        d < 1e-4,
                        "gradient T={temperature} chunk={chunk} composed={composed}: {d}"
                    );
                    // Not trivially zero.
                    assert!(
                        b.abs()
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap()
                            > 1e-2
                    );
                }
                FORCE_COMPOSED_BWD.with(|f| f.set(false));
            }
        }
    }

    #[test]
    fn logprobs_only_objective_and_extreme_logits() {
        // Large logits: exp would overflow without the running max.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (n, hs, v) = (4, 3, 50);
        let h = Var::from_tensor(&rand_tensor(&mut rng, (n, hs), 40.0)).unwrap();
        let w = Var::from_tensor(&rand_tensor(&mut rng, (v, hs), 40.0)).unwrap();
        let y = Tensor::new(&[0u32, 49, 17, 17], &Device::Cpu).unwrap();
        let fast = chunked_token_logprobs(h.as_tensor(), w.as_tensor(), &y, 1.0, 7).unwrap();
        let slow = composed_token_stats(h.as_tensor(), w.as_tensor(), &y, 1.0)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        assert!(fast.to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()));
        let scale = slow
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0);
        assert!(max_abs_diff(&fast, &slow) / scale < 1e-5);
        let gf = fast.sum_all().unwrap().backward().unwrap();
        let gs = slow.sum_all().unwrap().backward().unwrap();
        for var in [&h, &w] {
            let a = gf.get(var.as_tensor()).unwrap();
            let b = gs.get(var.as_tensor()).unwrap();
            assert!(max_abs_diff(a, b) < 1e-3, "{}", max_abs_diff(a, b));
        }
    }

    #[test]
    fn bad_shapes_and_targets_are_errors() {
        let dev = Device::Cpu;
        let h = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((5, 3), DType::F32, &dev).unwrap();
        let y = Tensor::new(&[0u32, 5], &dev).unwrap();
        let e = chunked_token_logprobs(&h, &w, &y, 1.0, 2).unwrap_err();
        assert!(e.to_string().contains("target id 5"), "{e}");
        let w4 = Tensor::zeros((5, 4), DType::F32, &dev).unwrap();
        let e = chunked_token_logprobs(&h, &w4, &Tensor::new(&[0u32, 1], &dev).unwrap(), 1.0, 2)
            .unwrap_err();
        assert!(e.to_string().contains("hidden size 3"), "{e}");
        let e = chunked_token_logprobs(&h, &w, &Tensor::new(&[0u32, 1], &dev).unwrap(), 1.0, 0)
            .unwrap_err();
        assert!(e.to_string().contains("chunk"), "{e}");
    }
}
