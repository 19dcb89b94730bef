//! Fused CPU kernels, each with a hand-written backward pass, for the decoder's element-wise
//! hot spots: RMSNorm, rotate-half RoPE, scaled + masked softmax, SwiGLU, and the linear layer
//! (one GEMM node instead of four view/matmul nodes).
//!
//! Composed from candle ops, each of these is 4–8 tensor passes forward and as many again in
//! autograd, every one a fresh allocation and a single-threaded loop. Fused, each is one
//! multi-threaded pass forward and one backward. The math, with g the incoming gradient:
//!
//! - RMSNorm  y = x·r·w,  r = (mean(x²) + ε)^(-1/2):
//!   ∂x_i = r·g_i·w_i − r³·x_i·(Σ_j g_j·w_j·x_j)/H,   ∂w_i = Σ_rows g_i·x_i·r.
//! - RoPE (rotate half)  y₁ = x₁·c − x₂·s,  y₂ = x₂·c + x₁·s:  the transpose of a rotation by θ
//!   is the rotation by −θ, so ∂x = RoPE(g) with s negated.
//! - Softmax  y = softmax(scale·z + m):  ∂z = scale · y ⊙ (g − Σ g⊙y);  the mask gets none.
//! - SwiGLU  y = silu(a)·u:  ∂a = g·u·σ(a)·(1 + a·(1 − σ(a))),  ∂u = g·silu(a).
//!
//! The kernels are f32 and CPU-only; on any other device or dtype the public functions fall
//! back to the composed reference (also public, and what the tests compare against), so the
//! model runs unchanged under `--features cuda`. Parallel reductions (∂w of RMSNorm) sum
//! per-task partials in task order, so results do not depend on thread scheduling.
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::simd::simd_kernel;
use crate::error::Result;

/// exp(x) for f32 without a libm call, so loops over it vectorise. Range reduction
/// x = n·ln2 + r (|r| ≤ ln2/2, n by round-to-nearest through the 1.5·2²³ trick), a degree-6
/// Taylor polynomial for e^r (relative error < 3e-7 on that interval), and 2ⁿ assembled in the
/// exponent bits. Below −87 it returns 0 (a masked softmax entry is exactly 0); above 88 it
/// saturates at e⁸⁸.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³
    let under = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // SAFETY: x is clamped to [−87, 88], so n is an integer in [−126, 127] and fits an i32
    // (the unchecked conversion skips the saturation fix-ups that `as` adds to vector code).
    let n_int: i32 = unsafe { n.to_int_unchecked() };
    let bits = ((n_int + 127) as u32) << 23;
    let y = p * f32::from_bits(bits);
    // A select, not a branch: the loop still vectorises.
    if under {
        0.0
    } else {
        y
    }
}

/// Smallest amount of work (elements) worth a rayon task.
const MIN_TASK_ELEMS: usize = 1 << 14;

fn rows_per_task(row_len: usize) -> usize {
    (MIN_TASK_ELEMS / row_len.max(1)).max(1)
}

/// A vector of `n` floats for a kernel that writes every element before it reads any, so
/// without the zero fill of `vec![0.0; n]`: a single-threaded memset that was 3–4% of a spike
/// training step's samples, with the other core idle. Each call site names the writes that cover
/// the buffer. The same pattern as candle's own CPU kernels for their outputs.
#[allow(clippy::uninit_vec)]
pub(crate) fn output_buffer(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is n; every caller overwrites all n elements before reading them.
    unsafe { v.set_len(n) };
    v
}

/// The f32 data of contiguous CPU tensors, for a backward pass that runs its own kernels.
pub(crate) fn with_cpu_f32<const N: usize, R>(
    ts: [&Tensor; N],
    what: &str,
    f: impl FnOnce([&[f32]; N]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: [&[f32]; N] = [&[]; N];
    for (slot, (storage, layout)) in slices.iter_mut().zip(&guards) {
        *slot = match &**storage {
            candle_core::Storage::Cpu(cpu) => f32_slice(cpu, layout, what)?,
            _ => candle_core::bail!("fused {what}: expected a CPU tensor"),
        };
    }
    f(slices)
}

fn fusable(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused {what}: input must be contiguous"),
    }
}

/// Max with eight lanes, so the loop vectorises (`fold(max)` does not).
#[inline(always)]
pub fn lane_max(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let blocks = x.chunks_exact(8);
    let rest = blocks.remainder();
    for b in blocks {
        for k in 0..8 {
            m[k] = m[k].max(b[k]);
        }
    }
    let mut out = m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for &v in rest {
        out = out.max(v);
    }
    out
}

/// Σ x_i with eight lanes.
#[inline(always)]
pub fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let blocks = x.chunks_exact(8);
    let rest = blocks.remainder();
    for b in blocks {
        for k in 0..8 {
            acc[k] += b[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for &v in rest {
        s += v;
    }
    s
}

/// Σ a_i·b_i with eight independent accumulators, so the loop vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// `x · (mean(x², last dim) + eps)^(-1/2) · w`, x (…, H), w (H).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !fusable(&[x, w]) || w.rank() != 1 || x.dim(D::Minus1)? != w.dim(0)? {
        return rms_norm_composed(x, w, eps);
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    Ok(x.apply_op2(&w, RmsNorm { eps: eps as f32 })?)
}

/// The composed reference.
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?
        .broadcast_mul(w)?)
}

struct RmsNorm {
    eps: f32,
}

simd_kernel! {
    /// RMSNorm of the rows (each w.len() long) of xs into out.
    fn rms_norm_rows / rms_norm_rows_at(xs: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let h = w.len();
        for (orow, xrow) in out.chunks_mut(h).zip(xs.chunks(h)) {
            let r = 1.0 / (dot(xrow, xrow) / h as f32 + eps).sqrt();
            for ((o, &x), &w) in orow.iter_mut().zip(xrow).zip(w) {
                *o = x * r * w;
            }
        }
    }
}

simd_kernel! {
    /// RMSNorm's backward over rows: ∂x into dxs, ∂w accumulated into dw; gw is scratch (h).
    fn rms_norm_bwd_rows / rms_norm_bwd_rows_at(
        xs: &[f32],
        gs: &[f32],
        w: &[f32],
        eps: f32,
        dxs: &mut [f32],
        dw: &mut [f32],
        gw: &mut [f32],
    ) {
        let h = w.len();
        for ((dxr, xr), gr) in dxs.chunks_mut(h).zip(xs.chunks(h)).zip(gs.chunks(h)) {
            let r = 1.0 / (dot(xr, xr) / h as f32 + eps).sqrt();
            for ((o, &gi), &wi) in gw.iter_mut().zip(gr).zip(w) {
                *o = gi * wi;
            }
            let c = dot(gw, xr) * r * r * r / h as f32;
            for (((o, &gwi), &xi), (dwi, &gi)) in
                dxr.iter_mut().zip(gw.iter()).zip(xr).zip(dw.iter_mut().zip(gr))
            {
                *o = r * gwi - c * xi;
                *dwi += gi * xi * r;
            }
        }
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "grove-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms_norm")?;
        let w = f32_slice(s2, l2, "rms_norm")?;
        let h = w.len();
        let eps = self.eps;
        // Every row written by rms_norm_rows.
        let mut out = output_buffer(x.len());
        let per = rows_per_task(h) * h;
        out.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(o, xs)| rms_norm_rows(xs, w, eps, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let n = x.elem_count();
        let packed = x.apply_op3_no_bwd(w, &g, &RmsNormBwd { eps: self.eps })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, w.elem_count())?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// (x, w, g) → [∂x (flattened) ; ∂w], one flat vector.
struct RmsNormBwd {
    eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "grove-rms-norm-bwd"
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
        let x = f32_slice(s1, l1, "rms_norm backward")?;
        let w = f32_slice(s2, l2, "rms_norm backward")?;
        let g = f32_slice(s3, l3, "rms_norm backward")?;
        let h = w.len();
        let n = x.len();
        let eps = self.eps;
        // ∂x: every row written by rms_norm_bwd_rows; ∂w: zeroed here, then summed into.
        let mut out = output_buffer(n + h);
        let (dx, dw) = out.split_at_mut(n);
        dw.fill(0.0);
        let per = rows_per_task(h) * h;
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .zip(g.par_chunks(per))
            .map(|((dxs, xs), gs)| {
                let mut dw = vec![0f32; h];
                let mut gw = vec![0f32; h];
                rms_norm_bwd_rows(xs, gs, w, eps, dxs, &mut dw, &mut gw);
                dw
            })
            .collect();
        for p in partials {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n + h)))
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// Rotate-half RoPE of x (b, heads, t, d) with cos/sin (b, t, d/2) (one row per absolute
/// position of each sequence, so left padding is handled by the caller's position ids).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let ok_shape = match (x.dims(), cos.dims(), sin.dims()) {
        ([b, _, t, d], [cb, ct, cd], [sb, st, sd]) => {
            d % 2 == 0 && cb == b && sb == b && ct == t && st == t && *cd == d / 2 && *sd == d / 2
        }
        _ => false,
    };
    if !ok_shape || !fusable(&[x, cos, sin]) {
        return rope_composed(x, cos, sin);
    }
    let x = x.contiguous()?;
    Ok(x.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { inverse: false },
    )?)
}

/// The composed reference: x·cos + rotate_half(x)·sin with the half tables duplicated.
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
}

/// `inverse` rotates by −θ: the backward of the forward rotation.
struct Rope {
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "grove-rope"
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
        let x = f32_slice(s1, l1, "rope")?;
        let cos = f32_slice(s2, l2, "rope")?;
        let sin = f32_slice(s3, l3, "rope")?;
        let (_, nh, t, d) = l1.shape().dims4()?;
        let half = d / 2;
        let sign = if self.inverse { -1f32 } else { 1f32 };
        // Every row written by rotate.
        let mut out = output_buffer(x.len());
        let per = rows_per_task(d) * d;
        out.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .enumerate()
            .for_each(|(task, (o, xs))| {
                let row0 = task * (per / d);
                for (k, (orow, xrow)) in o.chunks_mut(d).zip(xs.chunks(d)).enumerate() {
                    let row = row0 + k;
                    // rows run over (b, head, t); the tables over (b, t).
                    let (bi, ti) = (row / (nh * t), row % t);
                    let base = (bi * t + ti) * half;
                    rotate(
                        xrow,
                        &cos[base..base + half],
                        &sin[base..base + half],
                        sign,
                        orow,
                    );
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = g.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------------------------------------
// Scaled, masked softmax

/// softmax(scale·scores + mask) over the last dim; scores (b, h, t, s), mask (b, 1, t, s)
/// additive. The mask is a constant: it gets no gradient.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let ok_shape = match (scores.dims(), mask.dims()) {
        ([b, _, t, s], [mb, 1, mt, ms]) => mb == b && mt == t && ms == s,
        _ => false,
    };
    if !ok_shape || !fusable(&[scores, mask]) {
        return masked_softmax_composed(scores, mask, scale);
    }
    let scores = scores.contiguous()?;
    Ok(scores.apply_op2(
        &mask.detach().contiguous()?,
        MaskedSoftmax {
            scale: scale as f32,
        },
    )?)
}

/// The composed reference.
pub fn masked_softmax_composed(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(
        &(scores * scale)?.broadcast_add(mask)?,
        D::Minus1,
    )?)
}

struct MaskedSoftmax {
    scale: f32,
}

simd_kernel! {
    /// One row in place: z ← softmax(scale·z + mask).
    fn softmax_row / softmax_row_at(z: &mut [f32], mask: &[f32], scale: f32) {
        for (o, &mi) in z.iter_mut().zip(mask) {
            *o = *o * scale + mi;
        }
        let max = lane_max(z);
        for o in z.iter_mut() {
            *o = fast_exp(*o - max);
        }
        let inv = 1.0 / lane_sum(z);
        for o in z.iter_mut() {
            *o *= inv;
        }
    }
}

simd_kernel! {
    /// One row in place: d ← scale · y ⊙ (d − Σ d⊙y), d holding ∂y on entry (softmax backward).
    fn softmax_grad_row / softmax_grad_row_at(d: &mut [f32], y: &[f32], scale: f32) {
        let c = dot(d, y);
        for (x, &yi) in d.iter_mut().zip(y) {
            *x = scale * yi * (*x - c);
        }
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "grove-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let z = f32_slice(s1, l1, "masked_softmax")?;
        let m = f32_slice(s2, l2, "masked_softmax")?;
        let (_, nh, t, s) = l1.shape().dims4()?;
        let scale = self.scale;
        // Every row copied from z, then normalised in place.
        let mut out = output_buffer(z.len());
        let per = rows_per_task(s) * s;
        out.par_chunks_mut(per)
            .zip(z.par_chunks(per))
            .enumerate()
            .for_each(|(task, (o, zs))| {
                let row0 = task * (per / s);
                for (k, (orow, zrow)) in o.chunks_mut(s).zip(zs.chunks(s)).enumerate() {
                    let row = row0 + k;
                    let (bi, ti) = (row / (nh * t), row % t);
                    let mrow = &m[(bi * t + ti) * s..(bi * t + ti + 1) * s];
                    orow.copy_from_slice(zrow);
                    softmax_row(orow, mrow, scale);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dz = res.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd { scale: self.scale })?;
        Ok((Some(dz), None))
    }
}

/// (y, g) → scale · y ⊙ (g − Σ g⊙y), row-wise over the last dim.
struct SoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "grove-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, "softmax backward")?;
        let g = f32_slice(s2, l2, "softmax backward")?;
        let s = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let scale = self.scale;
        // Every row copied from g, then transformed in place.
        let mut out = output_buffer(y.len());
        let per = rows_per_task(s) * s;
        out.par_chunks_mut(per)
            .zip(y.par_chunks(per).zip(g.par_chunks(per)))
            .for_each(|(o, (ys, gs))| {
                for ((orow, yrow), grow) in o.chunks_mut(s).zip(ys.chunks(s)).zip(gs.chunks(s)) {
                    orow.copy_from_slice(grow);
                    softmax_grad_row(orow, yrow, scale);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// silu(gate) · up, element-wise, same shapes.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() || !fusable(&[gate, up]) {
        return swiglu_composed(gate, up);
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?)
}

/// The composed reference.
pub fn swiglu_composed(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

#[inline(always)]
fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-a))
}

simd_kernel! {
    /// out = silu(a)·u, element-wise.
    fn swiglu_fwd / swiglu_fwd_at(a: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, &ai), &ui) in out.iter_mut().zip(a).zip(u) {
            *o = ai * sigmoid(ai) * ui;
        }
    }
}

/// [`swiglu_fwd`] over all of a, u and out, in parallel chunks.
fn swiglu_fwd_par(a: &[f32], u: &[f32], out: &mut [f32]) {
    let c = MIN_TASK_ELEMS;
    out.par_chunks_mut(c)
        .zip(a.par_chunks(c).zip(u.par_chunks(c)))
        .for_each(|(o, (a, u))| swiglu_fwd(a, u, o));
}

/// [`swiglu_bwd`] over all of its slices, in parallel chunks.
fn swiglu_bwd_par(a: &[f32], u: &[f32], g: &[f32], da: &mut [f32], du: &mut [f32]) {
    let c = MIN_TASK_ELEMS;
    da.par_chunks_mut(c)
        .zip(du.par_chunks_mut(c))
        .zip(a.par_chunks(c).zip(u.par_chunks(c)).zip(g.par_chunks(c)))
        .for_each(|((da, du), ((a, u), g))| swiglu_bwd(a, u, g, da, du));
}

simd_kernel! {
    /// ∂a and ∂u of silu(a)·u for the incoming gradient g, element-wise.
    fn swiglu_bwd / swiglu_bwd_at(a: &[f32], u: &[f32], g: &[f32], da: &mut [f32], du: &mut [f32]) {
        let n = a.len().min(u.len()).min(g.len()).min(da.len()).min(du.len());
        for i in 0..n {
            let s = sigmoid(a[i]);
            da[i] = g[i] * u[i] * s * (1.0 + a[i] * (1.0 - s));
            du[i] = g[i] * a[i] * s;
        }
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "grove-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, "swiglu")?;
        let u = f32_slice(s2, l2, "swiglu")?;
        // Every element written by swiglu_fwd.
        let mut out = output_buffer(a.len());
        swiglu_fwd_par(a, u, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = a.elem_count();
        let packed = a.apply_op3_no_bwd(u, &g.contiguous()?, &SwiGluBwd)?;
        let da = packed.narrow(0, 0, n)?.reshape(a.shape())?;
        let du = packed.narrow(0, n, n)?.reshape(u.shape())?;
        Ok((Some(da), Some(du)))
    }
}

/// (a, u, g) → [∂a ; ∂u], one flat vector.
struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "grove-swiglu-bwd"
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
        let a = f32_slice(s1, l1, "swiglu backward")?;
        let u = f32_slice(s2, l2, "swiglu backward")?;
        let g = f32_slice(s3, l3, "swiglu backward")?;
        let n = a.len();
        // Every element of both halves written by swiglu_bwd.
        let mut out = output_buffer(2 * n);
        let (da, du) = out.split_at_mut(n);
        swiglu_bwd_par(a, u, g, da, du);
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }
}

// ---------------------------------------------------------------------------------------------
// Gate/up projections and SwiGLU

/// silu(x·w_gateᵀ) ⊙ (x·w_upᵀ), x (…, H), w_gate and w_up (I, H) → (…, I): the MLP up to its
/// down projection, as one autograd node.
///
/// Composed, this is two linear nodes and a SwiGLU node, and candle's backward gives each of
/// the two (…, I) intermediates and the shared input x a zero-filled gradient buffer and an add
/// (about 50 MB of memory traffic per layer of the spike config). Fused, the backward computes
/// ∂G = ∂y·u·σ(g)·(1 + g·(1 − σ(g))) and ∂U = ∂y·silu(g) into scratch, then
/// ∂x = ∂G·w_gate + ∂U·w_up (the second GEMM accumulating into the first),
/// ∂w_gate = ∂Gᵀ·x and ∂w_up = ∂Uᵀ·x. G and U are kept from the forward (the same memory the
/// composed graph holds).
pub fn gate_up_swiglu(x: &Tensor, w_gate: &Tensor, w_up: &Tensor) -> Result<Tensor> {
    let ok = fusable(&[x, w_gate, w_up])
        && w_gate.rank() == 2
        && w_gate.dims() == w_up.dims()
        && x.rank() > 0
        && x.dim(D::Minus1)? == w_gate.dim(1)?;
    if !ok {
        return gate_up_swiglu_composed(x, w_gate, w_up);
    }
    if x.elem_count() / w_gate.dim(1)?.max(1) <= SKINNY_ROWS {
        // Decoding: the fused linear's dot-product path beats the GEMM at a few rows.
        return swiglu(&linear(x, w_gate)?, &linear(x, w_up)?);
    }
    let op = GateUpSwiglu {
        saved: std::sync::Mutex::new(None),
    };
    Ok(x.contiguous()?
        .apply_op3(&w_gate.contiguous()?, &w_up.contiguous()?, op)?)
}

/// The composed reference: two linear layers and SwiGLU.
pub fn gate_up_swiglu_composed(x: &Tensor, w_gate: &Tensor, w_up: &Tensor) -> Result<Tensor> {
    swiglu_composed(&linear_composed(x, w_gate)?, &linear_composed(x, w_up)?)
}

struct GateUpSwiglu {
    /// G = x·w_gateᵀ and U = x·w_upᵀ from the forward, (n, I) each.
    saved: std::sync::Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl CustomOp3 for GateUpSwiglu {
    fn name(&self) -> &'static str {
        "grove-gate-up-swiglu"
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
        let x = f32_slice(s1, l1, "gate_up_swiglu")?;
        let wg = f32_slice(s2, l2, "gate_up_swiglu")?;
        let wu = f32_slice(s3, l3, "gate_up_swiglu")?;
        let (inter, hidden) = l2.shape().dims2()?;
        let n = x.len() / hidden.max(1);
        let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
        // G and U written in full by their GEMMs, y by swiglu_fwd.
        let mut g = output_buffer(n * inter);
        let mut u = output_buffer(n * inter);
        gemm_into(
            &mut g,
            n,
            inter,
            hidden,
            x,
            (hidden, 1),
            wg,
            (1, hidden),
            par,
        );
        gemm_into(
            &mut u,
            n,
            inter,
            hidden,
            x,
            (hidden, 1),
            wu,
            (1, hidden),
            par,
        );
        let mut y = output_buffer(n * inter);
        swiglu_fwd_par(&g, &u, &mut y);
        *self.saved.lock().expect("gate_up_swiglu state poisoned") = Some((g, u));
        let mut dims = l1.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = inter;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w_gate: &Tensor,
        w_up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().expect("gate_up_swiglu state poisoned");
        let Some((g, u)) = guard.as_ref() else {
            candle_core::bail!("grove-gate-up-swiglu: backward without a forward")
        };
        let (inter, hidden) = w_gate.dims2()?;
        let n = x.elem_count() / hidden.max(1);
        let grad = grad.contiguous()?;
        let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
        // ∂G and ∂U written in full by swiglu_bwd; ∂x, ∂w_gate, ∂w_up by their GEMMs.
        let mut dg = output_buffer(n * inter);
        let mut du = output_buffer(n * inter);
        let mut dx = output_buffer(n * hidden);
        let mut dwg = output_buffer(inter * hidden);
        let mut dwu = output_buffer(inter * hidden);
        with_cpu_f32(
            [&grad, x, w_gate, w_up],
            "gate_up_swiglu backward",
            |[gy, xs, wg, wu]| {
                swiglu_bwd_par(g, u, gy, &mut dg, &mut du);
                // ∂x = ∂G·w_gate + ∂U·w_up
                gemm_into(
                    &mut dx,
                    n,
                    hidden,
                    inter,
                    &dg,
                    (inter, 1),
                    wg,
                    (hidden, 1),
                    par,
                );
                gemm_acc(
                    &mut dx,
                    true,
                    n,
                    hidden,
                    inter,
                    &du,
                    (inter, 1),
                    wu,
                    (hidden, 1),
                    par,
                );
                // ∂w = ∂ᵀ·x, ∂ᵀ read through strides.
                gemm_into(
                    &mut dwg,
                    inter,
                    hidden,
                    n,
                    &dg,
                    (1, inter),
                    xs,
                    (hidden, 1),
                    par,
                );
                gemm_into(
                    &mut dwu,
                    inter,
                    hidden,
                    n,
                    &du,
                    (1, inter),
                    xs,
                    (hidden, 1),
                    par,
                );
                Ok(())
            },
        )?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dwg, (inter, hidden), dev)?),
            Some(Tensor::from_vec(dwu, (inter, hidden), dev)?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Causal grouped-query attention with RoPE, from projections to the o_proj input, as one
/// autograd node: q (b, t, nh·hd), k and v (b, t, nkv·hd) straight from their linears,
/// cos/sin (b, t, hd/2), additive mask (b, 1, t, t) → (b, t, nh·hd).
///
/// Composed, the same work is about twenty autograd nodes (head reshapes and transposes,
/// contiguous copies, RoPE, two batched matmuls, the softmax and their views), each with a
/// zero-filled gradient buffer and an add in the backward, several on the (b, nh, t, t) score
/// tensor. Fused, each (sequence, KV head) pair is one task: its `rep` query heads are stacked
/// into a (rep·t, hd) block, so S = Q·Kᵀ, P = softmax(scale·S + mask) and Y = P·V are three
/// GEMMs, and the backward is five:
///   ∂V = Pᵀ·∂Y,  ∂P = ∂Y·Vᵀ,  ∂S = scale · P ⊙ (∂P − rowsum(∂P ⊙ P)),  ∂Q = ∂S·K,  ∂K = ∂Sᵀ·Q,
/// with ∂Q and ∂K rotated back by −θ (the transpose of RoPE). P and the rotated Q and K are kept
/// from the forward for the backward (the same memory the composed graph holds).
///
/// While P (b·nh·t² floats) fits [`ATTN_KEEP_P_MAX_BYTES`] it is kept; above, the backward
/// recomputes it from the kept Qr and Kr (one more GEMM and softmax per task), so that long
/// sequences do not hold b·nh·t² floats per layer until the backward.
///
/// Only self-attention without a cache (training and scoring); decoding keeps the composed path.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Tensor,
    n_heads: usize,
    n_kv_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    attention_with_budget(
        q,
        k,
        v,
        cos,
        sin,
        mask,
        n_heads,
        n_kv_heads,
        scale,
        ATTN_KEEP_P_MAX_BYTES,
    )
}

/// Attention probabilities up to this size (b·nh·t²·4 bytes, per layer) are kept from the
/// forward pass for the backward. 16 MiB keeps them for the performance targets' shapes (the
/// spike config's 8 × 256 tokens: 8 MiB) and recomputes them for long responses (8 sequences
/// of 500 tokens with SmolLM2's 9 heads: 72 MB per layer, 2.2 GB over its 30 layers).
pub const ATTN_KEEP_P_MAX_BYTES: usize = 16 << 20;

/// [`attention`] with an explicit budget in bytes for keeping P (0: always recompute).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_with_budget(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Tensor,
    n_heads: usize,
    n_kv_heads: usize,
    scale: f64,
    keep_p_bytes: usize,
) -> Result<Tensor> {
    let (b, t, qw) = q.dims3()?;
    let hd = qw / n_heads.max(1);
    let shapes_ok = n_heads > 0
        && n_kv_heads > 0
        && n_heads.is_multiple_of(n_kv_heads)
        && qw == n_heads * hd
        && hd.is_multiple_of(2)
        && k.dims() == [b, t, n_kv_heads * hd]
        && v.dims() == [b, t, n_kv_heads * hd]
        && cos.dims() == [b, t, hd / 2]
        && sin.dims() == [b, t, hd / 2]
        && mask.dims() == [b, 1, t, t];
    if !shapes_ok || !fusable(&[q, k, v, cos, sin, mask]) {
        return attention_composed(q, k, v, cos, sin, mask, n_heads, n_kv_heads, scale);
    }
    let table = |x: &Tensor| -> Result<std::sync::Arc<Vec<f32>>> {
        Ok(std::sync::Arc::new(x.flatten_all()?.to_vec1::<f32>()?))
    };
    let op = Attention {
        dims: AttnDims {
            b,
            t,
            nh: n_heads,
            nkv: n_kv_heads,
            hd,
            scale: scale as f32,
        },
        cos: table(cos)?,
        sin: table(sin)?,
        mask: table(mask)?,
        keep_p: (b * n_heads * t * t).saturating_mul(4) <= keep_p_bytes,
        saved: std::sync::Mutex::new(None),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// The composed reference (and the path on other devices): per-head views, RoPE, scores,
/// masked softmax and the value product from candle ops.
#[allow(clippy::too_many_arguments)]
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Tensor,
    n_heads: usize,
    n_kv_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, qw) = q.dims3()?;
    let hd = qw / n_heads;
    let rep = n_heads / n_kv_heads;
    let heads = |x: &Tensor, n: usize| -> Result<Tensor> {
        Ok(x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
    };
    let q = rope_composed(&heads(q, n_heads)?, cos, sin)?;
    let k = rope_composed(&heads(k, n_kv_heads)?, cos, sin)?;
    let v = heads(v, n_kv_heads)?;
    // HF's repeat_kv: query head h reads KV head h / rep.
    let expand = |x: &Tensor| -> Result<Tensor> {
        Ok(x.unsqueeze(2)?
            .broadcast_as((b, n_kv_heads, rep, t, hd))?
            .reshape((b, n_heads, t, hd))?)
    };
    let (k, v) = (expand(&k)?, expand(&v)?);
    let att = q.matmul(&k.t()?.contiguous()?)?;
    let att = masked_softmax_composed(&att, mask, scale)?;
    Ok(att
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, t, n_heads * hd))?)
}

#[derive(Clone, Copy)]
struct AttnDims {
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    scale: f32,
}

impl AttnDims {
    fn rep(&self) -> usize {
        self.nh / self.nkv
    }
    /// Rows of one task's stacked query block.
    fn m(&self) -> usize {
        self.rep() * self.t
    }
    fn tasks(&self) -> usize {
        self.b * self.nkv
    }
    /// Entries of sequence bi, position ti in the (b·t, hd/2) cos/sin tables.
    fn table(&self, bi: usize, ti: usize) -> std::ops::Range<usize> {
        let (row, half) = (bi * self.t + ti, self.hd / 2);
        row * half..(row + 1) * half
    }
}

/// What the forward keeps for the backward, per task (sequence bi, KV head g), task-major:
/// P (rep·t, t; empty when not kept), rotated Q (rep·t, hd), rotated K (t, hd).
struct AttnSaved {
    p: Vec<f32>,
    qr: Vec<f32>,
    kr: Vec<f32>,
}

struct Attention {
    dims: AttnDims,
    /// Keep P from the forward for the backward; else the backward recomputes it (one more
    /// GEMM and softmax per task) and P never exists for more than one task at a time.
    keep_p: bool,
    cos: std::sync::Arc<Vec<f32>>,
    sin: std::sync::Arc<Vec<f32>>,
    mask: std::sync::Arc<Vec<f32>>,
    saved: std::sync::Mutex<Option<AttnSaved>>,
}

simd_kernel! {
    /// Rotates `x` (hd) by the angles in `cos`/`sin` (hd/2, one row of the tables) into `out`;
    /// `sign` −1 rotates by −θ.
    fn rotate / rotate_at(x: &[f32], cos: &[f32], sin: &[f32], sign: f32, out: &mut [f32]) {
        let half = x.len() / 2;
        let (x1, x2) = x.split_at(half);
        let (o1, o2) = out.split_at_mut(half);
        let (o1, o2, cos, sin) = (&mut o1[..half], &mut o2[..half], &cos[..half], &sin[..half]);
        for i in 0..half {
            let (c, s) = (cos[i], sign * sin[i]);
            o1[i] = x1[i] * c - x2[i] * s;
            o2[i] = x2[i] * c + x1[i] * s;
        }
    }
}

/// C (m, n) = A·B with explicit strides (row stride, column stride) for A and B; C row-major.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_strides: (usize, usize),
    bm: &[f32],
    b_strides: (usize, usize),
    par: gemm::Parallelism,
) {
    gemm_acc(c, false, m, n, k, a, a_strides, bm, b_strides, par)
}

/// C (m, n) = A·B, or C += A·B with `accumulate`; strides as in [`gemm_into`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_acc(
    c: &mut [f32],
    accumulate: bool,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    bm: &[f32],
    (b_rs, b_cs): (usize, usize),
    par: gemm::Parallelism,
) {
    assert!(c.len() >= m * n, "gemm_into: C holds {} < {m}×{n}", c.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    assert!(
        a.len() > (m - 1) * a_rs + (k - 1) * a_cs,
        "gemm_into: A too short"
    );
    assert!(
        bm.len() > (k - 1) * b_rs + (n - 1) * b_cs,
        "gemm_into: B too short"
    );
    // SAFETY: the asserts above bound every index the GEMM reads or writes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            bm.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Parallelism for the GEMMs inside one task: the tasks themselves fill the threads unless
/// there are fewer tasks than threads.
fn inner_parallelism(tasks: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if tasks >= threads {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    }
}

impl Attention {
    /// P = softmax(scale · Qr·Krᵀ + mask) of one task (sequence bi) into p (rep·t, t): the
    /// forward's computation, which the backward repeats bit for bit when P was not kept.
    fn probabilities(
        &self,
        bi: usize,
        qr: &[f32],
        kr: &[f32],
        p: &mut [f32],
        par: gemm::Parallelism,
    ) {
        let d = self.dims;
        let (t, m) = (d.t, d.m());
        // S = Qr · Krᵀ
        gemm_into(p, m, t, d.hd, qr, (d.hd, 1), kr, (1, d.hd), par);
        for row in 0..m {
            let ti = row % t;
            let mrow = &self.mask[(bi * t + ti) * t..][..t];
            softmax_row(&mut p[row * t..][..t], mrow, d.scale);
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "grove-attention"
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
        let q = f32_slice(s1, l1, "attention")?;
        let k = f32_slice(s2, l2, "attention")?;
        let v = f32_slice(s3, l3, "attention")?;
        let d = self.dims;
        let (t, hd, m) = (d.t, d.hd, d.m());
        let (qw, kw) = (d.nh * hd, d.nkv * hd);
        // Written in full by each task: P by its GEMM (then the softmax in place), Qr and Kr
        // row by row by rotate, Yh by its GEMM.
        let mut qr = output_buffer(d.tasks() * m * hd);
        let mut kr = output_buffer(d.tasks() * t * hd);
        // Per-task outputs in (b, nh, t, hd) order, transposed to (b, t, nh·hd) below.
        let mut yh = output_buffer(d.tasks() * m * hd);
        let par = inner_parallelism(d.tasks());
        let run = |task: usize, p: &mut [f32], qr: &mut [f32], kr: &mut [f32], yh: &mut [f32]| {
            let (bi, g) = (task / d.nkv, task % d.nkv);
            for row in 0..m {
                let (r, ti) = (row / t, row % t);
                let h = g * d.rep() + r;
                let src = &q[(bi * t + ti) * qw + h * hd..][..hd];
                rotate(
                    src,
                    &self.cos[d.table(bi, ti)],
                    &self.sin[d.table(bi, ti)],
                    1.0,
                    &mut qr[row * hd..][..hd],
                );
            }
            for j in 0..t {
                let src = &k[(bi * t + j) * kw + g * hd..][..hd];
                rotate(
                    src,
                    &self.cos[d.table(bi, j)],
                    &self.sin[d.table(bi, j)],
                    1.0,
                    &mut kr[j * hd..][..hd],
                );
            }
            self.probabilities(bi, qr, kr, p, par);
            // Y = P · V, V read in place: row j of head g at (bi·t + j)·kw + g·hd.
            let vg = &v[bi * t * kw + g * hd..];
            gemm_into(yh, m, hd, t, p, (t, 1), vg, (kw, 1), par);
        };
        let p = if self.keep_p {
            let mut p = output_buffer(d.tasks() * m * t);
            p.par_chunks_mut(m * t)
                .zip(qr.par_chunks_mut(m * hd))
                .zip(kr.par_chunks_mut(t * hd))
                .zip(yh.par_chunks_mut(m * hd))
                .enumerate()
                .for_each(|(task, (((p, qr), kr), yh))| run(task, p, qr, kr, yh));
            p
        } else {
            // Long sequences: P exists one task at a time; the backward recomputes it.
            qr.par_chunks_mut(m * hd)
                .zip(kr.par_chunks_mut(t * hd))
                .zip(yh.par_chunks_mut(m * hd))
                .enumerate()
                .for_each(|(task, ((qr, kr), yh))| {
                    run(task, &mut output_buffer(m * t), qr, kr, yh)
                });
            Vec::new()
        };
        // Every (sequence, position, head) slot copied below.
        let mut y = output_buffer(d.b * t * qw);
        y.par_chunks_mut(t * qw).enumerate().for_each(|(bi, yb)| {
            for h in 0..d.nh {
                let (g, r) = (h / d.rep(), h % d.rep());
                for ti in 0..t {
                    let src = &yh[((bi * d.nkv + g) * m + r * t + ti) * hd..][..hd];
                    yb[ti * qw + h * hd..][..hd].copy_from_slice(src);
                }
            }
        });
        *self.saved.lock().expect("attention state poisoned") = Some(AttnSaved { p, qr, kr });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().expect("attention state poisoned");
        let Some(saved) = guard.as_ref() else {
            candle_core::bail!("grove-attention: backward without a forward")
        };
        let d = self.dims;
        let (t, hd, m) = (d.t, d.hd, d.m());
        let (qw, kw) = (d.nh * hd, d.nkv * hd);
        let grad = grad.contiguous()?;
        // Per-task gradients: ∂Qr (rep·t, hd), ∂Kr (t, hd), ∂V (t, hd).
        // Each written in full by its task's GEMM.
        let mut dqr = output_buffer(d.tasks() * m * hd);
        let mut dkr = output_buffer(d.tasks() * t * hd);
        let mut dvh = output_buffer(d.tasks() * t * hd);
        with_cpu_f32([&grad, v], "attention backward", |[gy, vv]| {
            let par = inner_parallelism(d.tasks());
            dqr.par_chunks_mut(m * hd)
                .zip(dkr.par_chunks_mut(t * hd))
                .zip(dvh.par_chunks_mut(t * hd))
                .enumerate()
                .for_each(|(task, ((dqr, dkr), dvh))| {
                    let (bi, g) = (task / d.nkv, task % d.nkv);
                    let qr = &saved.qr[task * m * hd..][..m * hd];
                    let kr = &saved.kr[task * t * hd..][..t * hd];
                    let recomputed;
                    let p: &[f32] = if self.keep_p {
                        &saved.p[task * m * t..][..m * t]
                    } else {
                        let mut p = output_buffer(m * t);
                        self.probabilities(bi, qr, kr, &mut p, par);
                        recomputed = p;
                        &recomputed
                    };
                    // ∂Y of this task's stacked heads, read in place from (b, t, nh·hd):
                    // row r·t + ti starts at (bi·t + ti)·qw + (g·rep + r)·hd. Stacked heads are
                    // not one stride apart, so gather them.
                    // Every row copied below.
                    let mut dy = output_buffer(m * hd);
                    for row in 0..m {
                        let (r, ti) = (row / t, row % t);
                        let h = g * d.rep() + r;
                        dy[row * hd..][..hd]
                            .copy_from_slice(&gy[(bi * t + ti) * qw + h * hd..][..hd]);
                    }
                    let vg = &vv[bi * t * kw + g * hd..];
                    // ∂V = Pᵀ · ∂Y
                    gemm_into(dvh, t, hd, m, p, (1, t), &dy, (hd, 1), par);
                    // ∂P = ∂Y · Vᵀ, then ∂S in place.
                    // Written in full by the GEMM.
                    let mut ds = output_buffer(m * t);
                    gemm_into(&mut ds, m, t, hd, &dy, (hd, 1), vg, (1, kw), par);
                    for row in 0..m {
                        softmax_grad_row(&mut ds[row * t..][..t], &p[row * t..][..t], d.scale);
                    }
                    // ∂Qr = ∂S · Kr,  ∂Kr = ∂Sᵀ · Qr
                    gemm_into(dqr, m, hd, t, &ds, (t, 1), kr, (hd, 1), par);
                    gemm_into(dkr, t, hd, m, &ds, (1, t), qr, (hd, 1), par);
                });
            Ok(())
        })?;
        // Back to (b, t, heads·hd), rotating ∂Q and ∂K by −θ.
        // Every (sequence, position, head) slot written below.
        let mut dq = output_buffer(d.b * t * qw);
        let mut dk = output_buffer(d.b * t * kw);
        let mut dv = output_buffer(d.b * t * kw);
        dq.par_chunks_mut(t * qw)
            .zip(dk.par_chunks_mut(t * kw))
            .zip(dv.par_chunks_mut(t * kw))
            .enumerate()
            .for_each(|(bi, ((dqb, dkb), dvb))| {
                for h in 0..d.nh {
                    let (g, r) = (h / d.rep(), h % d.rep());
                    for ti in 0..t {
                        let src = &dqr[((bi * d.nkv + g) * m + r * t + ti) * hd..][..hd];
                        let (c, s) = (&self.cos[d.table(bi, ti)], &self.sin[d.table(bi, ti)]);
                        rotate(src, c, s, -1.0, &mut dqb[ti * qw + h * hd..][..hd]);
                    }
                }
                for g in 0..d.nkv {
                    for j in 0..t {
                        let at = ((bi * d.nkv + g) * t + j) * hd;
                        let (c, s) = (&self.cos[d.table(bi, j)], &self.sin[d.table(bi, j)]);
                        rotate(
                            &dkr[at..][..hd],
                            c,
                            s,
                            -1.0,
                            &mut dkb[j * kw + g * hd..][..hd],
                        );
                        dvb[j * kw + g * hd..][..hd].copy_from_slice(&dvh[at..][..hd]);
                    }
                }
            });
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Linear

/// `x · wᵀ`, x (…, in), w (out, in) → (…, out): one GEMM over the flattened leading dims.
///
/// Composed, this is a reshape, a transposed view of w, a matmul and a reshape back: four
/// autograd nodes, and candle's backward gives every node a zero-filled gradient buffer and an
/// add (for the transposed view, a strided copy of ∂w). Fused, it is one node whose backward
/// writes ∂x = g·w and ∂w = gᵀ·x straight from two GEMMs.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !fusable(&[x, w]) || w.rank() != 2 || x.rank() == 0 || x.dim(D::Minus1)? != w.dim(1)? {
        return linear_composed(x, w);
    }
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, Linear)?)
}

/// `x · wᵀ + b`, b (out): [`linear`] with the bias inside the same node. Composed, the bias is a
/// broadcast add whose backward is candle's single-threaded strided reduce over every row (4%
/// of a spike training step's samples for the q/k/v biases); here ∂b is one vectorised pass
/// of row sums.
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fusable(&[x, w, b])
        || w.rank() != 2
        || x.rank() == 0
        || x.dim(D::Minus1)? != w.dim(1)?
        || b.dims() != [w.dim(0)?]
    {
        return Ok(linear_composed(x, w)?.broadcast_add(b)?);
    }
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearBias)?)
}

/// The composed reference.
pub fn linear_composed(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (lead, last) = dims.split_at(dims.len().saturating_sub(1));
    let n: usize = lead.iter().product();
    let y = x
        .reshape((n, last.first().copied().unwrap_or(1)))?
        .matmul(&w.t()?)?;
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    Ok(y.reshape(out)?)
}

struct Linear;

/// Up to this many rows (decoding: one token per sequence), `x · wᵀ` runs as row-by-row dot
/// products instead of a GEMM. Such products are bound by reading w once, and the GEMM's
/// AVX-512 kernels pack and tile for large m: on Qwen2.5-0.5B shapes, sampling 8 sequences ran
/// at 35 tokens/s through them against 52 through these dot products.
const SKINNY_ROWS: usize = 16;

/// out[i] = x_i · w for the rows x_i of x (out.len() rows of w.len()), four rows at a time so
/// each 8-lane load of w feeds four FMAs. The build targets baseline x86-64, where the
/// portable `dot` compiles to 4-lane SSE2 without FMA: too slow for a product that decoding
/// runs over every weight matrix for every token.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(x: &[f32], in_f: usize, w: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len();
    assert!(w.len() >= in_f && x.len() >= n * in_f);
    let k8 = in_f / 8 * 8;
    let hsum = |v: __m256| -> f32 {
        let mut a = [0f32; 8];
        _mm256_storeu_ps(a.as_mut_ptr(), v);
        a.iter().sum()
    };
    let mut i0 = 0;
    while i0 < n {
        let rows = (n - i0).min(4);
        let xr = |r: usize| x.as_ptr().add((i0 + r.min(rows - 1)) * in_f);
        let (x0, x1, x2, x3) = (xr(0), xr(1), xr(2), xr(3));
        let (mut a0, mut a1, mut a2, mut a3) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
        let mut k = 0;
        while k < k8 {
            let wv = _mm256_loadu_ps(w.as_ptr().add(k));
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0.add(k)), wv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1.add(k)), wv, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2.add(k)), wv, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3.add(k)), wv, a3);
            k += 8;
        }
        let sums = [hsum(a0), hsum(a1), hsum(a2), hsum(a3)];
        for r in 0..rows {
            let xi = &x[(i0 + r) * in_f..][..in_f];
            let tail: f32 = (k8..in_f).map(|k| xi[k] * w[k]).sum();
            out[i0 + r] = sums[r] + tail;
        }
        i0 += rows;
    }
}

/// y (n, out) = x (n, in) · wᵀ, w (out, in) row-major, for small n: each row of w is read once
/// and dotted with every row of x (which stays in cache); blocks of w's rows run in parallel.
fn skinny_matmul_t(x: &[f32], w: &[f32], n: usize, in_f: usize, out_f: usize, y: &mut [f32]) {
    // Transposed result (out, n), so parallel blocks of w's rows write disjoint slices.
    let mut yt = vec![0f32; out_f * n];
    let block = rows_per_task(in_f).max(16);
    yt.par_chunks_mut(block * n)
        .zip(w.par_chunks(block * in_f))
        .for_each(|(yt, w)| {
            for (yj, wj) in yt.chunks_mut(n).zip(w.chunks(in_f)) {
                #[cfg(target_arch = "x86_64")]
                if super::simd::level() >= super::simd::Level::Avx2 {
                    // SAFETY: the CPU has AVX2 and FMA (`simd` reports Avx2 or wider only
                    // then, detected at run time); x holds n rows of in_f, wj one row of in_f
                    // and yj n outputs.
                    unsafe { dots_avx2(x, in_f, wj, yj) };
                    continue;
                }
                for (i, out) in yj.iter_mut().enumerate() {
                    *out = dot(&x[i * in_f..][..in_f], wj);
                }
            }
        });
    for j in 0..out_f {
        for i in 0..n {
            y[i * out_f + j] = yt[j * n + i];
        }
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "grove-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "linear")?;
        let w = f32_slice(s2, l2, "linear")?;
        linear_fwd(x, l1, w, l2, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = linear_bwd(x, w, g, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "grove-linear-bias"
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
        let x = f32_slice(s1, l1, "linear")?;
        let w = f32_slice(s2, l2, "linear")?;
        let b = f32_slice(s3, l3, "linear")?;
        linear_fwd(x, l1, w, l2, Some(b))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = linear_bwd(x, w, g, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// y = x·wᵀ (+ b on every row).
fn linear_fwd(
    x: &[f32],
    l1: &Layout,
    w: &[f32],
    l2: &Layout,
    bias: Option<&[f32]>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (out_f, in_f) = l2.shape().dims2()?;
    let n = x.len() / in_f.max(1);
    // Written in full by the GEMM or by skinny_matmul_t's transposition.
    let mut y = output_buffer(n * out_f);
    if n > 0 && n <= SKINNY_ROWS && in_f > 0 {
        skinny_matmul_t(x, w, n, in_f, out_f, &mut y);
    } else {
        // x (n, in) row-major; wᵀ read through strides from w (out, in) row-major.
        let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
        gemm_into(&mut y, n, out_f, in_f, x, (in_f, 1), w, (1, in_f), par);
    }
    if let Some(b) = bias {
        if out_f > 0 {
            y.par_chunks_mut(rows_per_task(out_f) * out_f)
                .for_each(|rows| {
                    for row in rows.chunks_mut(out_f) {
                        for (v, &bv) in row.iter_mut().zip(b) {
                            *v += bv;
                        }
                    }
                });
        }
    }
    let mut dims = l1.shape().dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out_f;
    }
    Ok((CpuStorage::F32(y), Shape::from(dims)))
}

/// Σ over the rows of g (rows of `width`): per-task partial sums added in task order, so the
/// result does not depend on thread scheduling.
fn column_sums(g: &[f32], width: usize) -> Vec<f32> {
    let mut acc = vec![0f32; width];
    if width == 0 {
        return acc;
    }
    let partials: Vec<Vec<f32>> = g
        .par_chunks(rows_per_task(width) * width)
        .map(|rows| {
            let mut p = vec![0f32; width];
            for row in rows.chunks(width) {
                for (a, &v) in p.iter_mut().zip(row) {
                    *a += v;
                }
            }
            p
        })
        .collect();
    for p in partials {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
    acc
}

/// ∂x = g·w, ∂w = gᵀ·x and, with `bias`, ∂b = Σ_rows g.
fn linear_bwd(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    bias: bool,
) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
    let (out_f, in_f) = w.dims2()?;
    let n = x.elem_count() / in_f.max(1);
    let g = g.contiguous()?;
    let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
    // Both written in full by their GEMM.
    let mut dx = output_buffer(n * in_f);
    let mut dw = output_buffer(out_f * in_f);
    let mut db = None;
    with_cpu_f32([x, w, &g], "linear backward", |[xs, ws, gs]| {
        // ∂x (n, in) = g (n, out) · w (out, in)
        gemm_into(&mut dx, n, in_f, out_f, gs, (out_f, 1), ws, (in_f, 1), par);
        // ∂w (out, in) = gᵀ · x, gᵀ read through strides.
        gemm_into(&mut dw, out_f, in_f, n, gs, (1, out_f), xs, (in_f, 1), par);
        if bias {
            db = Some(column_sums(gs, out_f));
        }
        Ok(())
    })?;
    let dev = w.device();
    Ok((
        Tensor::from_vec(dx, x.shape(), dev)?,
        Tensor::from_vec(dw, (out_f, in_f), dev)?,
        db.map(|v| Tensor::from_vec(v, out_f, dev)).transpose()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rand_var(shape: &[usize], seed: u64) -> Var {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
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

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-3.0f32..3.0)).collect()
    }

    fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    #[test]
    fn every_simd_level_computes_the_same_kernels() {
        use crate::model::simd::Level;
        // Odd lengths so the vector loops' remainders run too.
        let (h, n) = (37, 3);
        let x = rand_vec(n * h, 1);
        let w = rand_vec(h, 2);
        let g = rand_vec(n * h, 3);
        let mut mask = vec![0f32; h];
        mask[h - 5..].fill(f32::NEG_INFINITY); // a causal-style masked tail
        let at = |l: Level| {
            let mut out: Vec<f32> = Vec::new();
            let mut y = vec![0f32; n * h];
            rms_norm_rows_at(l, &x, &w, 1e-6, &mut y);
            out.extend(&y);
            let (mut dx, mut dw, mut gw) = (vec![0f32; n * h], vec![0f32; h], vec![0f32; h]);
            rms_norm_bwd_rows_at(l, &x, &g, &w, 1e-6, &mut dx, &mut dw, &mut gw);
            out.extend(&dx);
            out.extend(&dw);
            let mut p = x[..h].to_vec();
            softmax_row_at(l, &mut p, &mask, 0.7);
            out.extend(&p);
            let mut d = g[..h].to_vec();
            softmax_grad_row_at(l, &mut d, &p, 0.7);
            out.extend(&d);
            let mut y = vec![0f32; n * h];
            swiglu_fwd_at(l, &x, &g, &mut y);
            out.extend(&y);
            let (mut da, mut du) = (vec![0f32; n * h], vec![0f32; n * h]);
            swiglu_bwd_at(l, &x, &g, &w.repeat(n), &mut da, &mut du);
            out.extend(&da);
            out.extend(&du);
            let mut r = vec![0f32; 36];
            rotate_at(l, &x[..36], &w[..18], &g[..18], -1.0, &mut r);
            out.extend(&r);
            out
        };
        let base = at(Level::Baseline);
        assert!(base.iter().all(|v| v.is_finite()));
        // The masked tail of the softmax row is exactly zero.
        let p0 = 2 * n * h + h;
        assert!(base[p0 + h - 5..p0 + h].iter().all(|&v| v == 0.0));
        for l in Level::available() {
            // FMA contraction changes the last bits only.
            assert_close(&at(l), &base, 1e-5, &format!("{l:?}"));
        }
    }

    fn max_abs(a: &Tensor) -> f32 {
        a.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Values and gradients (of Σ out ⊙ R for a random R) of `fused` against `composed`,
    /// relative to the largest magnitude, for every input in `wrt`.
    fn check(
        fused: impl Fn(&[Tensor]) -> Tensor,
        composed: impl Fn(&[Tensor]) -> Tensor,
        inputs: &[Var],
        wrt: &[usize],
        tol: f32,
    ) {
        let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let yf = fused(&ts);
        let yc = composed(&ts);
        let scale = max_abs(&yc).max(1.0);
        assert!(
            max_abs_diff(&yf, &yc) <= tol * scale,
            "values differ by {} (scale {scale})",
            max_abs_diff(&yf, &yc)
        );
        let r = rand_var(yf.dims(), 99);
        let gf = (&yf * r.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (&yc * r.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for &i in wrt {
            let a = gf.get(&ts[i]).expect("fused gradient missing");
            let b = gc.get(&ts[i]).expect("composed gradient missing");
            let scale = max_abs(b).max(1.0);
            let d = max_abs_diff(a, b);
            assert!(
                d <= tol * scale,
                "gradient of input {i} differs by {d} (scale {scale})"
            );
        }
    }

    #[test]
    fn fast_exp_is_accurate_over_its_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 10.0 {
            let r = (x as f64).exp();
            let rel = ((fast_exp(x) as f64 - r) / r).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert_eq!(fast_exp(-1e4), 0.0);
        assert_eq!(fast_exp(-87.5), 0.0);
    }

    #[test]
    fn rms_norm_matches_composed_values_and_gradients() {
        // H = 13 exercises the dot-product remainder; 3000 rows span several rayon tasks, so
        // the ∂w partial sums are combined.
        for (rows, h) in [(1usize, 8usize), (7, 13), (3000, 24)] {
            let x = rand_var(&[rows, h], 1);
            let w = rand_var(&[h], 2);
            check(
                |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
                |t| rms_norm_composed(&t[0], &t[1], 1e-5).unwrap(),
                &[x, w],
                &[0, 1],
                2e-5,
            );
        }
    }

    #[test]
    fn rms_norm_of_a_hand_computed_row() {
        // x = [3, 4], w = [1, 2], eps = 0: mean(x²) = 12.5, r = 1/√12.5 = 0.282843;
        // y = [3r, 8r] = [0.848528, 2.262742].
        let x = Tensor::new(&[[3f32, 4.0]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let y: Vec<Vec<f32>> = rms_norm(&x, &w, 0.0).unwrap().to_vec2().unwrap();
        assert!((y[0][0] - 0.848528).abs() < 1e-5 && (y[0][1] - 2.262742).abs() < 1e-5);
    }

    #[test]
    fn rope_matches_composed_including_non_contiguous_input() {
        let (b, nh, t, d) = (2usize, 3usize, 5usize, 8usize);
        let cos = rand_var(&[b, t, d / 2], 3);
        let sin = rand_var(&[b, t, d / 2], 4);
        let x = rand_var(&[b, nh, t, d], 5);
        check(
            |ts| rope(&ts[0], &ts[1], &ts[2]).unwrap(),
            |ts| rope_composed(&ts[0], &ts[1], &ts[2]).unwrap(),
            &[x, cos.clone(), sin.clone()],
            &[0],
            1e-5,
        );
        // The model rotates a transposed (b, t, h, d) → (b, h, t, d) view.
        let xt = rand_var(&[b, t, nh, d], 6);
        check(
            |ts| rope(&ts[0].transpose(1, 2).unwrap(), &ts[1], &ts[2]).unwrap(),
            |ts| rope_composed(&ts[0].transpose(1, 2).unwrap(), &ts[1], &ts[2]).unwrap(),
            &[xt, cos, sin],
            &[0],
            1e-5,
        );
    }

    #[test]
    fn rope_by_a_quarter_turn_rotates_pairs() {
        // cos = 0, sin = 1: (x₁, x₂) → (−x₂, x₁); x = [1, 2, 3, 4] pairs (1,3), (2,4).
        let x = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap();
        let cos = Tensor::zeros((1, 1, 2), DType::F32, &Device::Cpu).unwrap();
        let sin = Tensor::ones((1, 1, 2), DType::F32, &Device::Cpu).unwrap();
        let y: Vec<f32> = rope(&x, &cos, &sin)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, vec![-3.0, -4.0, 1.0, 2.0]);
    }

    #[test]
    fn masked_softmax_matches_composed_and_ignores_masked_keys() {
        let (b, nh, t, s) = (2usize, 3usize, 4usize, 6usize);
        let z = rand_var(&[b, nh, t, s], 7);
        let valid: Vec<Vec<bool>> = (0..b)
            .map(|bi| (0..s).map(|j| !(bi == 1 && j == 0)).collect())
            .collect();
        let mask = crate::model::attention_mask(&valid, s - t, t, &Device::Cpu).unwrap();
        let mvar = Var::from_tensor(&mask).unwrap();
        check(
            |ts| masked_softmax(&ts[0], &ts[1], 0.35).unwrap(),
            |ts| masked_softmax_composed(&ts[0], &ts[1], 0.35).unwrap(),
            &[z.clone(), mvar],
            &[0],
            1e-5,
        );
        // Sequence 1's padding key 0 gets no weight; future keys get none either.
        let yv = masked_softmax(z.as_tensor(), &mask, 0.35)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let at = |bi: usize, h: usize, ti: usize, j: usize| yv[((bi * nh + h) * t + ti) * s + j];
        assert_eq!(at(1, 2, 0, 0), 0.0);
        assert_eq!(at(0, 1, 0, s - t + 1), 0.0);
        let row: f32 = (0..s).map(|j| at(0, 0, 2, j)).sum();
        assert!((row - 1.0).abs() < 1e-6);
    }

    #[test]
    fn swiglu_matches_composed_values_and_gradients() {
        for shape in [vec![1usize], vec![4, 7], vec![70, 300]] {
            let a = rand_var(&shape, 8);
            let u = rand_var(&shape, 9);
            check(
                |t| swiglu(&t[0], &t[1]).unwrap(),
                |t| swiglu_composed(&t[0], &t[1]).unwrap(),
                &[a, u],
                &[0, 1],
                1e-5,
            );
        }
    }

    #[test]
    fn gate_up_swiglu_matches_composed_values_and_gradients() {
        // One row (n = 1), odd sizes, and enough rows for several parallel tasks.
        // One row takes the decoding path (linear + swiglu); 17, 21 and 384 rows the fused node.
        for (lead, hidden, inter) in [
            (vec![1usize], 8usize, 5usize),
            (vec![3, 7], 13, 29),
            (vec![17], 13, 29),
            (vec![4, 96], 24, 200),
        ] {
            let mut xs = lead.clone();
            xs.push(hidden);
            let x = rand_var(&xs, 21);
            let wg = rand_var(&[inter, hidden], 22);
            let wu = rand_var(&[inter, hidden], 23);
            check(
                |t| gate_up_swiglu(&t[0], &t[1], &t[2]).unwrap(),
                |t| gate_up_swiglu_composed(&t[0], &t[1], &t[2]).unwrap(),
                &[x, wg, wu],
                &[0, 1, 2],
                1e-5,
            );
        }
    }

    #[test]
    fn gate_up_swiglu_of_hand_computed_values() {
        // x = [1, 2]; w_gate rows [1, 0], [0, 1] → g = [1, 2]; w_up rows [1, 1], [0.5, 0]
        // → u = [3, 0.5]. y = silu(g)·u = [σ(1)·3, 2σ(2)·0.5] = [2.193176, 0.880797].
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0]], &dev).unwrap();
        let wg = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap();
        let wu = Tensor::new(&[[1f32, 1.0], [0.5, 0.0]], &dev).unwrap();
        let y: Vec<Vec<f32>> = gate_up_swiglu(&x, &wg, &wu).unwrap().to_vec2().unwrap();
        assert!((y[0][0] - 2.193176).abs() < 1e-5, "{y:?}");
        assert!((y[0][1] - 0.880797).abs() < 1e-5, "{y:?}");
    }

    #[test]
    fn swiglu_of_hand_computed_values() {
        // silu(0)·5 = 0; silu(2)·1 = 2·σ(2) = 2 / (1 + e⁻²) = 1.761594.
        let a = Tensor::new(&[0f32, 2.0], &Device::Cpu).unwrap();
        let u = Tensor::new(&[5f32, 1.0], &Device::Cpu).unwrap();
        let y: Vec<f32> = swiglu(&a, &u).unwrap().to_vec1().unwrap();
        assert_eq!(y[0], 0.0);
        assert!((y[1] - 1.761594).abs() < 1e-5);
    }

    #[test]
    fn linear_matches_composed_values_and_gradients() {
        // A 3-D input (the model's (b, t, hidden)), a 2-D one, and odd sizes for the GEMM's
        // edge kernels.
        // Up to SKINNY_ROWS rows take the dot-product path, more the GEMM: both are covered.
        for (xs, out_f) in [
            (vec![2usize, 5, 16], 24usize),
            (vec![7, 13], 3),
            (vec![1, 1, 9], 1),
            (vec![3, 40, 33], 70),
            (vec![17, 8], 1000),
        ] {
            let in_f = *xs.last().unwrap();
            let x = rand_var(&xs, 10);
            let w = rand_var(&[out_f, in_f], 11);
            check(
                |t| linear(&t[0], &t[1]).unwrap(),
                |t| linear_composed(&t[0], &t[1]).unwrap(),
                &[x, w],
                &[0, 1],
                1e-5,
            );
        }
    }

    #[test]
    fn linear_of_hand_computed_values() {
        // x = [[1, 2]], w = [[3, 4], [5, 6], [0, -1]]: y = [1·3 + 2·4, 1·5 + 2·6, −2] = [11, 17, −2].
        // With R = ones: ∂x = Σ_rows w = [8, 9]; ∂w = every row x = [1, 2].
        let x = Var::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
        let w = Var::new(&[[3f32, 4.0], [5.0, 6.0], [0.0, -1.0]], &Device::Cpu).unwrap();
        let y = linear(x.as_tensor(), w.as_tensor()).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![11.0, 17.0, -2.0]]);
        let g = y.sum_all().unwrap().backward().unwrap();
        let dx: Vec<Vec<f32>> = g.get(x.as_tensor()).unwrap().to_vec2().unwrap();
        let dw: Vec<Vec<f32>> = g.get(w.as_tensor()).unwrap().to_vec2().unwrap();
        assert_eq!(dx, vec![vec![8.0, 9.0]]);
        assert_eq!(dw, vec![vec![1.0, 2.0]; 3]);
    }

    #[test]
    fn attention_matches_composed_values_and_gradients() {
        // GQA (4 query heads on 2 KV heads) with a left-padded sequence, plain multi-head, and
        // one sequence with one KV head (fewer tasks than threads: the GEMMs go parallel).
        for (b, t, nh, nkv, hd) in [
            (2usize, 5usize, 4usize, 2usize, 8usize),
            (3, 4, 2, 2, 6),
            (1, 7, 3, 1, 4),
        ] {
            let q = rand_var(&[b, t, nh * hd], 20);
            let k = rand_var(&[b, t, nkv * hd], 21);
            let v = rand_var(&[b, t, nkv * hd], 22);
            let cos = rand_var(&[b, t, hd / 2], 23);
            let sin = rand_var(&[b, t, hd / 2], 24);
            let valid: Vec<Vec<bool>> = (0..b)
                .map(|bi| (0..t).map(|j| !(bi == 1 && j < 2)).collect())
                .collect();
            let mask = crate::model::attention_mask(&valid, 0, t, &Device::Cpu).unwrap();
            let mask = Var::from_tensor(&mask).unwrap();
            let scale = 1.0 / (hd as f64).sqrt();
            // P kept from the forward, and recomputed in the backward (budget 0).
            for budget in [ATTN_KEEP_P_MAX_BYTES, 0] {
                check(
                    |ts| {
                        attention_with_budget(
                            &ts[0], &ts[1], &ts[2], &ts[3], &ts[4], &ts[5], nh, nkv, scale, budget,
                        )
                        .unwrap()
                    },
                    |ts| {
                        attention_composed(
                            &ts[0], &ts[1], &ts[2], &ts[3], &ts[4], &ts[5], nh, nkv, scale,
                        )
                        .unwrap()
                    },
                    &[
                        q.clone(),
                        k.clone(),
                        v.clone(),
                        cos.clone(),
                        sin.clone(),
                        mask.clone(),
                    ],
                    &[0, 1, 2],
                    2e-5,
                );
            }
        }
    }

    #[test]
    fn recomputed_attention_probabilities_give_the_same_gradients_bit_for_bit() {
        let (b, t, nh, nkv, hd) = (2usize, 9usize, 4usize, 2usize, 8usize);
        let ins: Vec<Var> = [nh * hd, nkv * hd, nkv * hd]
            .iter()
            .enumerate()
            .map(|(i, &w)| rand_var(&[b, t, w], 40 + i as u64))
            .collect();
        let cos = rand_var(&[b, t, hd / 2], 44);
        let sin = rand_var(&[b, t, hd / 2], 45);
        let mask =
            crate::model::attention_mask(&vec![vec![true; t]; b], 0, t, &Device::Cpu).unwrap();
        let r = rand_var(&[b, t, nh * hd], 46);
        let grads = |budget: usize| -> Vec<Vec<f32>> {
            let y = attention_with_budget(
                ins[0].as_tensor(),
                ins[1].as_tensor(),
                ins[2].as_tensor(),
                cos.as_tensor(),
                sin.as_tensor(),
                &mask,
                nh,
                nkv,
                0.35,
                budget,
            )
            .unwrap();
            let g = (y * r.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            ins.iter()
                .map(|v| {
                    g.get(v.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect()
        };
        // The backward repeats the forward's GEMM and softmax, so the results are identical.
        assert_eq!(grads(usize::MAX), grads(0));
    }

    #[test]
    fn attention_of_hand_computed_values() {
        // One head, hd = 2, no rotation (cos 1, sin 0), t = 2, scale 1.
        // q = [[1, 0], [0, 1]], k = [[1, 0], [1, 1]], v = [[1, 2], [3, 4]].
        // Row 0 sees key 0 only: y₀ = v₀ = [1, 2].
        // Row 1: scores q₁·k = [0, 1], p = [1/(1+e), e/(1+e)] = [0.268941, 0.731059];
        // y₁ = 0.268941·[1, 2] + 0.731059·[3, 4] = [2.462117, 3.462117].
        let dev = Device::Cpu;
        let q = Tensor::new(&[[[1f32, 0.0], [0.0, 1.0]]], &dev).unwrap();
        let k = Tensor::new(&[[[1f32, 0.0], [1.0, 1.0]]], &dev).unwrap();
        let v = Tensor::new(&[[[1f32, 2.0], [3.0, 4.0]]], &dev).unwrap();
        let cos = Tensor::ones((1, 2, 1), DType::F32, &dev).unwrap();
        let sin = Tensor::zeros((1, 2, 1), DType::F32, &dev).unwrap();
        let mask = crate::model::attention_mask(&[vec![true, true]], 0, 2, &dev).unwrap();
        let y: Vec<f32> = attention(&q, &k, &v, &cos, &sin, &mask, 1, 1, 1.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = [1.0, 2.0, 2.462117, 3.462117];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{y:?} vs {want:?}");
        }
    }

    #[test]
    fn linear_bias_matches_composed_values_and_gradients() {
        // Skinny (≤ 16 rows) and GEMM paths, 3-D and 2-D inputs.
        for (xs, out_f) in [
            (vec![2usize, 5, 16], 24usize),
            (vec![3, 40, 33], 70),
            (vec![1, 7], 1),
        ] {
            let in_f = *xs.last().unwrap();
            let x = rand_var(&xs, 13);
            let w = rand_var(&[out_f, in_f], 14);
            let b = rand_var(&[out_f], 15);
            check(
                |t| linear_bias(&t[0], &t[1], &t[2]).unwrap(),
                |t| {
                    linear_composed(&t[0], &t[1])
                        .unwrap()
                        .broadcast_add(&t[2])
                        .unwrap()
                },
                &[x, w, b],
                &[0, 1, 2],
                1e-5,
            );
        }
        // x = [[1, 2], [3, 4]], w = [[1, 0]], b = [10]: y = [[11], [13]]; with R = ones,
        // ∂b = number of rows = 2.
        let x = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let w = Var::new(&[[1f32, 0.0]], &Device::Cpu).unwrap();
        let b = Var::new(&[10f32], &Device::Cpu).unwrap();
        let y = linear_bias(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![11.0], vec![13.0]]);
        let g = y.sum_all().unwrap().backward().unwrap();
        let db: Vec<f32> = g.get(b.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(db, vec![2.0]);
    }
}
