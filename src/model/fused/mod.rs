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

use crate::error::Result;
use crate::model::simd::simd_kernel;

mod attention;
mod gate_up;
mod linear;
mod linear_bf16;
mod lora_linear;
mod matmul;
mod norm;
mod qlinear;
mod rope;
mod softmax;
mod swiglu;
#[cfg(test)]
mod tests;

pub use attention::*;
pub use gate_up::*;
pub use linear::*;
pub use linear_bf16::*;
pub use lora_linear::*;
pub(crate) use matmul::*;
pub use norm::*;
pub use qlinear::*;
pub use rope::*;
pub use softmax::*;
pub use swiglu::*;

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
