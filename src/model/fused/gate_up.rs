//! The gate/up projections and SwiGLU as one node (forward and hand-written backward).
use super::*;

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

pub(super) struct GateUpSwiglu {
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
        // Frozen weights (LoRA's base) get no gradient: no GEMM, no (I, H) buffer.
        let want_dw = w_gate.track_op() || w_up.track_op();
        let dw_len = if want_dw { inter * hidden } else { 0 };
        let mut dwg = output_buffer(dw_len);
        let mut dwu = output_buffer(dw_len);
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
                if !want_dw {
                    return Ok(());
                }
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
        let dw = |v: Vec<f32>| {
            want_dw
                .then(|| Tensor::from_vec(v, (inter, hidden), dev))
                .transpose()
        };
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            dw(dwg)?,
            dw(dwu)?,
        ))
    }
}
