//! Fused causal attention (forward and hand-written backward).
use super::*;

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
pub(super) struct AttnDims {
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
pub(super) struct AttnSaved {
    p: Vec<f32>,
    qr: Vec<f32>,
    kr: Vec<f32>,
}

pub(super) struct Attention {
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
    pub(super) fn rotate / rotate_at(x: &[f32], cos: &[f32], sin: &[f32], sign: f32, out: &mut [f32]) {
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
