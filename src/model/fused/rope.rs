//! Rotate-half RoPE (forward and hand-written backward).
use super::*;

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
pub(super) struct Rope {
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
