//! SwiGLU (forward and hand-written backward).
use super::*;

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
pub(super) fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-a))
}

simd_kernel! {
    /// out = silu(a)·u, element-wise.
    pub(super) fn swiglu_fwd / swiglu_fwd_at(a: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, &ai), &ui) in out.iter_mut().zip(a).zip(u) {
            *o = ai * sigmoid(ai) * ui;
        }
    }
}

/// [`swiglu_fwd`] over all of a, u and out, in parallel chunks.
pub(super) fn swiglu_fwd_par(a: &[f32], u: &[f32], out: &mut [f32]) {
    let c = MIN_TASK_ELEMS;
    out.par_chunks_mut(c)
        .zip(a.par_chunks(c).zip(u.par_chunks(c)))
        .for_each(|(o, (a, u))| swiglu_fwd(a, u, o));
}

/// [`swiglu_bwd`] over all of its slices, in parallel chunks.
pub(super) fn swiglu_bwd_par(a: &[f32], u: &[f32], g: &[f32], da: &mut [f32], du: &mut [f32]) {
    let c = MIN_TASK_ELEMS;
    da.par_chunks_mut(c)
        .zip(du.par_chunks_mut(c))
        .zip(a.par_chunks(c).zip(u.par_chunks(c)).zip(g.par_chunks(c)))
        .for_each(|((da, du), ((a, u), g))| swiglu_bwd(a, u, g, da, du));
}

simd_kernel! {
    /// ∂a and ∂u of silu(a)·u for the incoming gradient g, element-wise.
    pub(super) fn swiglu_bwd / swiglu_bwd_at(a: &[f32], u: &[f32], g: &[f32], da: &mut [f32], du: &mut [f32]) {
        let n = a.len().min(u.len()).min(g.len()).min(da.len()).min(du.len());
        for i in 0..n {
            let s = sigmoid(a[i]);
            da[i] = g[i] * u[i] * s * (1.0 + a[i] * (1.0 - s));
            du[i] = g[i] * a[i] * s;
        }
    }
}

pub(super) struct SwiGlu;

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
pub(super) struct SwiGluBwd;

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
