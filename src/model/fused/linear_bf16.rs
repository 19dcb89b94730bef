//! The linear layer with a bf16 weight (`model.dtype = "bf16"`): y = x·wᵀ (+ b) on the bf16
//! kernels of [`crate::model::bf16`], f32 in and out, as PyTorch's autocast runs a linear layer.
use std::sync::{Arc, Mutex};

use candle_core::CustomOp1;
use half::bf16;

use super::*;
use crate::model::bf16::{
    gemm_bf16, gemm_bf16_cached, kernel, to_bf16, to_f32, Operand, WeightPacks,
};

/// A frozen weight kept in bf16 only (the base of a LoRA run in bf16): half the memory of f32.
#[derive(Clone)]
pub struct Bf16Matrix {
    pub data: Arc<Vec<bf16>>,
    /// (out, in)
    pub dims: (usize, usize),
}

impl Bf16Matrix {
    /// `w` (out, in) rounded to bf16.
    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let dims = w.dims2()?;
        let data = with_cpu_f32([&w.contiguous()?], "bf16 weight", |[s]| Ok(to_bf16(s)))?;
        Ok(Bf16Matrix {
            data: Arc::new(data),
            dims,
        })
    }

    /// The f32 values (exact: every bf16 is an f32).
    pub fn to_tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(to_f32(&self.data), self.dims, device)?)
    }
}

/// The bf16 working copy of a trainable f32 weight (full-parameter training in bf16): made
/// from the f32 master on first use and again whenever the weights have changed since (an
/// optimizer step or a load bumps [`crate::compute::optim::weights_generation`]), so sampling
/// reuses one copy for every token and the optimizer keeps updating f32 values. The copy's
/// packed panels for the bf16 kernels ([`WeightPacks`]) live and die with it, so a weight is
/// packed once per update rather than once per product.
#[derive(Default)]
pub struct Bf16Copy {
    cell: Mutex<Option<CopyOf>>,
}

/// A working copy: the weights generation it was made at, the bf16 values, their panels.
type CopyOf = (u64, Arc<Vec<bf16>>, Arc<WeightPacks>);

impl Bf16Copy {
    /// The copy of `master`, converted again if the weights changed.
    pub fn of(&self, master: &Tensor) -> Result<Arc<Vec<bf16>>> {
        Ok(self.of_packed(master)?.0)
    }

    /// The copy of `master` and its packed panels (fresh, made when first needed, after a
    /// change of the weights).
    pub fn of_packed(&self, master: &Tensor) -> Result<(Arc<Vec<bf16>>, Arc<WeightPacks>)> {
        // Read before converting: a change during the conversion leaves an older generation
        // recorded, so the next call converts again.
        let generation = crate::compute::optim::weights_generation();
        let mut cell = self.cell.lock().expect("bf16 copy poisoned");
        if let Some((g, v, packs)) = cell.as_ref() {
            if *g == generation {
                return Ok((v.clone(), packs.clone()));
            }
        }
        let v = Arc::new(with_cpu_f32([&master.contiguous()?], "bf16 copy", |[s]| {
            Ok(to_bf16(s))
        })?);
        let packs = Arc::new(WeightPacks::default());
        *cell = Some((generation, v.clone(), packs.clone()));
        Ok((v, packs))
    }
}

/// `x · wᵀ (+ b)` with w's bf16 values `w16` (out, in). `master` is the f32 weight the
/// gradient ∂w goes to (full-parameter training); without one, w is frozen and only ∂x flows.
/// `packs` keeps w's packed panels between products (None: packed per product).
pub fn linear_bf16(
    x: &Tensor,
    (w16, packs): (Arc<Vec<bf16>>, Option<Arc<WeightPacks>>),
    dims: (usize, usize),
    master: Option<&Tensor>,
    b: Option<&Tensor>,
) -> Result<Tensor> {
    let (out_f, in_f) = dims;
    let ok = fusable(&[x])
        && x.rank() > 0
        && x.dim(D::Minus1)? == in_f
        && master.is_none_or(|m| fusable(&[m]) && m.dims() == [out_f, in_f])
        && b.is_none_or(|t| fusable(&[t]) && t.dims() == [out_f]);
    let op = LinearBf16 {
        w16,
        packs,
        out_f,
        in_f,
    };
    if !ok {
        // Another device or dtype: the f32 product of the same bf16 values.
        let w = Tensor::from_vec(to_f32(&op.w16), dims, x.device())?.to_dtype(x.dtype())?;
        let y = linear_composed(x, &w)?;
        return Ok(match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        });
    }
    let x = x.contiguous()?;
    Ok(match (master, b) {
        (Some(m), Some(b)) => x.apply_op3(&m.contiguous()?, &b.contiguous()?, op)?,
        (Some(m), None) => x.apply_op2(&m.contiguous()?, op)?,
        (None, b) => {
            let y = x.apply_op1(op)?;
            match b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        }
    })
}

struct LinearBf16 {
    w16: Arc<Vec<bf16>>,
    packs: Option<Arc<WeightPacks>>,
    out_f: usize,
    in_f: usize,
}

impl LinearBf16 {
    fn forward_cpu(
        &self,
        x: &[f32],
        l: &Layout,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out_f, in_f) = (self.out_f, self.in_f);
        let n = x.len() / in_f.max(1);
        // Written in full by the product.
        let mut y = output_buffer(n * out_f);
        let packs = self.packs.as_deref();
        bf16_product_t(&mut y, false, x, n, (&self.w16[..], packs), out_f, in_f);
        if let Some(b) = bias {
            add_bias(&mut y, b);
        }
        let mut dims = l.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out_f;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    /// ∂x = g·w (bf16 w), ∂w = gᵀ·x (both rounded to bf16, f32 result) when `master` tracks
    /// a gradient, ∂b = Σ_rows g with `bias`.
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        x: &Tensor,
        master: Option<&Tensor>,
        g: &Tensor,
        bias: bool,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out_f, in_f) = (self.out_f, self.in_f);
        let n = x.elem_count() / in_f.max(1);
        let g = g.contiguous()?;
        let want_dx = x.track_op();
        let want_dw = master.is_some_and(|m| m.track_op());
        // Both written in full by their product.
        let mut dx = output_buffer(if want_dx { n * in_f } else { 0 });
        let mut dw = output_buffer(if want_dw { out_f * in_f } else { 0 });
        let mut db = None;
        with_cpu_f32([x, &g], "bf16 linear backward", |[xs, gs]| {
            if want_dx {
                let w = (&self.w16[..], self.packs.as_deref());
                bf16_product_dx(&mut dx, false, gs, n, w, out_f, in_f);
            }
            if want_dw {
                // ∂w (out, in) = gᵀ · x, gᵀ read through strides.
                gemm_bf16(
                    &mut dw,
                    false,
                    out_f,
                    in_f,
                    n,
                    Operand::F32(gs),
                    (1, out_f),
                    Operand::F32(xs),
                    (in_f, 1),
                );
            }
            if bias {
                db = Some(column_sums(gs, out_f));
            }
            Ok(())
        })?;
        super::linear::linear_grads(x, (out_f, in_f), (want_dx, dx), (want_dw, dw), db)
    }
}

/// y (n, out) (+)= x (n, in) · wᵀ with w (out, in) in bf16 (and its packed panels, if kept).
pub(super) fn bf16_product_t(
    y: &mut [f32],
    acc: bool,
    x: &[f32],
    n: usize,
    (w, packs): (&[bf16], Option<&WeightPacks>),
    out_f: usize,
    in_f: usize,
) {
    let (a, b) = (Operand::F32(x), Operand::Bf16(w));
    match packs {
        Some(p) => {
            let k = kernel();
            gemm_bf16_cached(k, y, acc, n, out_f, in_f, a, (in_f, 1), b, (1, in_f), &p.t)
        }
        None => gemm_bf16(y, acc, n, out_f, in_f, a, (in_f, 1), b, (1, in_f)),
    };
}

/// ∂x (n, in) (+)= g (n, out) · w with w (out, in) in bf16 (and its packed panels, if kept).
pub(super) fn bf16_product_dx(
    dx: &mut [f32],
    acc: bool,
    g: &[f32],
    n: usize,
    (w, packs): (&[bf16], Option<&WeightPacks>),
    out_f: usize,
    in_f: usize,
) {
    let (a, b) = (Operand::F32(g), Operand::Bf16(w));
    match packs {
        Some(p) => {
            let k = kernel();
            gemm_bf16_cached(
                k,
                dx,
                acc,
                n,
                in_f,
                out_f,
                a,
                (out_f, 1),
                b,
                (in_f, 1),
                &p.dx,
            )
        }
        None => gemm_bf16(dx, acc, n, in_f, out_f, a, (out_f, 1), b, (in_f, 1)),
    };
}

impl CustomOp1 for LinearBf16 {
    fn name(&self) -> &'static str {
        "grove-linear-bf16-frozen"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward_cpu(f32_slice(s, l, "bf16 linear")?, l, None)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(self.backward(x, None, g, false)?.0)
    }
}

impl CustomOp2 for LinearBf16 {
    fn name(&self) -> &'static str {
        "grove-linear-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // The master's f32 values are not read: the product uses their bf16 copy.
        self.forward_cpu(f32_slice(s1, l1, "bf16 linear")?, l1, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, Some(w), g, false)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for LinearBf16 {
    fn name(&self) -> &'static str {
        "grove-linear-bf16-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let b = f32_slice(s3, l3, "bf16 linear")?;
        self.forward_cpu(f32_slice(s1, l1, "bf16 linear")?, l1, Some(b))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, Some(w), g, b.track_op())
    }
}
