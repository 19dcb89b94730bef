//! The linear layer as one GEMM node (forward and hand-written backward).
use super::*;

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

pub(super) struct Linear;

/// Up to this many rows (decoding: one token per sequence), `x · wᵀ` runs as row-by-row dot
/// products instead of a GEMM. Such products are bound by reading w once, and the GEMM's
/// AVX-512 kernels pack and tile for large m: on Qwen2.5-0.5B shapes, sampling 8 sequences ran
/// at 35 tokens/s through them against 52 through these dot products.
pub(super) const SKINNY_ROWS: usize = 16;

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
pub(super) fn skinny_matmul_t(
    x: &[f32],
    w: &[f32],
    n: usize,
    in_f: usize,
    out_f: usize,
    y: &mut [f32],
) {
    // Transposed result (out, n), so parallel blocks of w's rows write disjoint slices.
    let mut yt = vec![0f32; out_f * n];
    let block = rows_per_task(in_f).max(16);
    yt.par_chunks_mut(block * n)
        .zip(w.par_chunks(block * in_f))
        .for_each(|(yt, w)| {
            for (yj, wj) in yt.chunks_mut(n).zip(w.chunks(in_f)) {
                #[cfg(target_arch = "x86_64")]
                if crate::model::simd::level() >= crate::model::simd::Level::Avx2 {
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
        Ok((dx, dw))
    }
}

pub(super) struct LinearBias;

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
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // A frozen bias (LoRA's base) gets no gradient.
        let (dx, dw, db) = linear_bwd(x, w, g, b.track_op())?;
        Ok((dx, dw, db))
    }
}

/// y = x·wᵀ (+ b on every row).
pub(super) fn linear_fwd(
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
        add_bias(&mut y, b);
    }
    let mut dims = l1.shape().dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out_f;
    }
    Ok((CpuStorage::F32(y), Shape::from(dims)))
}

/// y += b on every row of y (rows of b.len()).
pub(super) fn add_bias(y: &mut [f32], b: &[f32]) {
    let out_f = b.len();
    if out_f == 0 {
        return;
    }
    y.par_chunks_mut(rows_per_task(out_f) * out_f)
        .for_each(|rows| {
            for row in rows.chunks_mut(out_f) {
                for (v, &bv) in row.iter_mut().zip(b) {
                    *v += bv;
                }
            }
        });
}

/// Σ over the rows of g (rows of `width`): per-task partial sums added in task order, so the
/// result does not depend on thread scheduling.
pub(super) fn column_sums(g: &[f32], width: usize) -> Vec<f32> {
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

/// ∂x = g·w, ∂w = gᵀ·x and, with `bias`, ∂b = Σ_rows g. A gradient is computed only for an
/// input that tracks one: a frozen weight (LoRA's base, a plain tensor) costs no GEMM and no
/// (out, in) buffer, and neither does the input of the first adapted layer.
pub(super) fn linear_bwd(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    bias: bool,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (out_f, in_f) = w.dims2()?;
    let n = x.elem_count() / in_f.max(1);
    let g = g.contiguous()?;
    let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
    let (want_dx, want_dw) = (x.track_op(), w.track_op());
    // Both written in full by their GEMM.
    let mut dx = output_buffer(if want_dx { n * in_f } else { 0 });
    let mut dw = output_buffer(if want_dw { out_f * in_f } else { 0 });
    let mut db = None;
    with_cpu_f32([x, w, &g], "linear backward", |[xs, ws, gs]| {
        if want_dx {
            // ∂x (n, in) = g (n, out) · w (out, in)
            gemm_into(&mut dx, n, in_f, out_f, gs, (out_f, 1), ws, (in_f, 1), par);
        }
        if want_dw {
            // ∂w (out, in) = gᵀ · x, gᵀ read through strides.
            gemm_into(&mut dw, out_f, in_f, n, gs, (1, out_f), xs, (in_f, 1), par);
        }
        if bias {
            db = Some(column_sums(gs, out_f));
        }
        Ok(())
    })?;
    linear_grads(x, (out_f, in_f), (want_dx, dx), (want_dw, dw), db)
}

/// The linear layer's gradients as tensors: ∂x shaped like `x`, ∂w (out, in), ∂b (out); a
/// gradient not wanted is `None` (its buffer is empty).
#[allow(clippy::type_complexity)]
pub(super) fn linear_grads(
    x: &Tensor,
    (out_f, in_f): (usize, usize),
    (want_dx, dx): (bool, Vec<f32>),
    (want_dw, dw): (bool, Vec<f32>),
    db: Option<Vec<f32>>,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let dev = x.device();
    Ok((
        want_dx
            .then(|| Tensor::from_vec(dx, x.shape(), dev))
            .transpose()?,
        want_dw
            .then(|| Tensor::from_vec(dw, (out_f, in_f), dev))
            .transpose()?,
        db.map(|v| Tensor::from_vec(v, out_f, dev)).transpose()?,
    ))
}
