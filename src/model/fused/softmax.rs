//! Scaled, masked softmax (forward and hand-written backward).
use super::*;

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

pub(super) struct MaskedSoftmax {
    scale: f32,
}

simd_kernel! {
    /// One row in place: z ← softmax(scale·z + mask).
    pub(super) fn softmax_row / softmax_row_at(z: &mut [f32], mask: &[f32], scale: f32) {
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
    pub(super) fn softmax_grad_row / softmax_grad_row_at(d: &mut [f32], y: &[f32], scale: f32) {
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
pub(super) struct SoftmaxBwd {
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
