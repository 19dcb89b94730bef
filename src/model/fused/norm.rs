//! RMSNorm (forward and hand-written backward).
use super::*;

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

pub(super) struct RmsNorm {
    eps: f32,
}

simd_kernel! {
    /// RMSNorm of the rows (each w.len() long) of xs into out.
    pub(super) fn rms_norm_rows / rms_norm_rows_at(xs: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
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
    pub(super) fn rms_norm_bwd_rows / rms_norm_bwd_rows_at(
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
        // A frozen norm weight (LoRA's base) gets no gradient entry.
        Ok((Some(dx), w.track_op().then_some(dw)))
    }
}

/// (x, w, g) → [∂x (flattened) ; ∂w], one flat vector.
pub(super) struct RmsNormBwd {
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
