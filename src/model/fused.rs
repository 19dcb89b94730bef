//! Fused CPU kernels, each with a hand-written backward pass, for the decoder's element-wise
//! hot spots: RMSNorm, rotate-half RoPE, scaled + masked softmax, and SwiGLU.
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
    let bits = ((n as i32 + 127) as u32) << 23;
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
        let mut out = vec![0f32; x.len()];
        let per = rows_per_task(h) * h;
        out.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(o, xs)| {
                for (orow, xrow) in o.chunks_mut(h).zip(xs.chunks(h)) {
                    let r = 1.0 / (dot(xrow, xrow) / h as f32 + eps).sqrt();
                    for ((o, &x), &w) in orow.iter_mut().zip(xrow).zip(w) {
                        *o = x * r * w;
                    }
                }
            });
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
        let mut out = vec![0f32; n + h];
        let (dx, dw) = out.split_at_mut(n);
        let per = rows_per_task(h) * h;
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .zip(g.par_chunks(per))
            .map(|((dxs, xs), gs)| {
                let mut dw = vec![0f32; h];
                let mut gw = vec![0f32; h];
                for ((dxr, xr), gr) in dxs.chunks_mut(h).zip(xs.chunks(h)).zip(gs.chunks(h)) {
                    let r = 1.0 / (dot(xr, xr) / h as f32 + eps).sqrt();
                    for ((o, &gi), &wi) in gw.iter_mut().zip(gr).zip(w) {
                        *o = gi * wi;
                    }
                    let c = dot(&gw, xr) * r * r * r / h as f32;
                    for (((o, &gwi), &xi), (dwi, &gi)) in
                        dxr.iter_mut().zip(&gw).zip(xr).zip(dw.iter_mut().zip(gr))
                    {
                        *o = r * gwi - c * xi;
                        *dwi += gi * xi * r;
                    }
                }
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
        let mut out = vec![0f32; x.len()];
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
                    let (c, s) = (&cos[base..base + half], &sin[base..base + half]);
                    let (x1, x2) = xrow.split_at(half);
                    let (o1, o2) = orow.split_at_mut(half);
                    for i in 0..half {
                        let si = sign * s[i];
                        o1[i] = x1[i] * c[i] - x2[i] * si;
                        o2[i] = x2[i] * c[i] + x1[i] * si;
                    }
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
        let mut out = vec![0f32; z.len()];
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
                    for ((o, &zi), &mi) in orow.iter_mut().zip(zrow).zip(mrow) {
                        *o = zi * scale + mi;
                    }
                    let max = lane_max(orow);
                    for o in orow.iter_mut() {
                        *o = fast_exp(*o - max);
                    }
                    let sum = lane_sum(orow);
                    let inv = 1.0 / sum;
                    for o in orow.iter_mut() {
                        *o *= inv;
                    }
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
        let mut out = vec![0f32; y.len()];
        let per = rows_per_task(s) * s;
        out.par_chunks_mut(per)
            .zip(y.par_chunks(per).zip(g.par_chunks(per)))
            .for_each(|(o, (ys, gs))| {
                for ((orow, yrow), grow) in o.chunks_mut(s).zip(ys.chunks(s)).zip(gs.chunks(s)) {
                    let c = dot(yrow, grow);
                    for ((o, &yi), &gi) in orow.iter_mut().zip(yrow).zip(grow) {
                        *o = scale * yi * (gi - c);
                    }
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

fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-a))
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
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(MIN_TASK_ELEMS)
            .zip(
                a.par_chunks(MIN_TASK_ELEMS)
                    .zip(u.par_chunks(MIN_TASK_ELEMS)),
            )
            .for_each(|(o, (a, u))| {
                for ((o, &ai), &ui) in o.iter_mut().zip(a).zip(u) {
                    *o = ai * sigmoid(ai) * ui;
                }
            });
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
        let mut out = vec![0f32; 2 * n];
        let (da, du) = out.split_at_mut(n);
        let c = MIN_TASK_ELEMS;
        da.par_chunks_mut(c)
            .zip(du.par_chunks_mut(c))
            .zip(a.par_chunks(c).zip(u.par_chunks(c)).zip(g.par_chunks(c)))
            .for_each(|((da, du), ((a, u), g))| {
                for i in 0..a.len() {
                    let s = sigmoid(a[i]);
                    da[i] = g[i] * u[i] * s * (1.0 + a[i] * (1.0 - s));
                    du[i] = g[i] * a[i] * s;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }
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
    fn swiglu_of_hand_computed_values() {
        // silu(0)·5 = 0; silu(2)·1 = 2·σ(2) = 2 / (1 + e⁻²) = 1.761594.
        let a = Tensor::new(&[0f32, 2.0], &Device::Cpu).unwrap();
        let u = Tensor::new(&[5f32, 1.0], &Device::Cpu).unwrap();
        let y: Vec<f32> = swiglu(&a, &u).unwrap().to_vec1().unwrap();
        assert_eq!(y[0], 0.0);
        assert!((y[1] - 1.761594).abs() < 1e-5);
    }
}
