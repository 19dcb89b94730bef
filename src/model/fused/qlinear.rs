//! The linear layer on a frozen quantized weight (a LoRA run's GGUF base), dequantized per
//! matmul.
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{CustomOp1, Device};

use super::*;

/// A projection's weight: f32, kept in its ggml blocks (the frozen base of a LoRA run with
/// `model.lora.quantized_base`), or for `model.dtype = "bf16"` bf16 alone (a frozen base) or
/// an f32 master with its bf16 working copy (full-parameter training).
#[derive(Clone)]
pub enum Weight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
    Bf16(Bf16Matrix),
    Autocast(Tensor, Arc<Bf16Copy>),
}

impl Weight {
    /// The f32 values (of a quantized weight: a fresh dequantized copy).
    pub fn to_dense(&self, device: &Device) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t.clone()),
            Weight::Quantized(q) => Ok(q.dequantize(device)?.to_dtype(DType::F32)?),
            Weight::Bf16(m) => m.to_tensor(device),
            Weight::Autocast(t, _) => Ok(t.clone()),
        }
    }

    /// The bf16 values the products use (None: an f32 or quantized weight).
    pub fn bf16_values(&self) -> Result<Option<Arc<Vec<half::bf16>>>> {
        Ok(match self {
            Weight::Bf16(m) => Some(m.data.clone()),
            Weight::Autocast(t, copy) => Some(copy.of(t)?),
            Weight::Dense(_) | Weight::Quantized(_) => None,
        })
    }

    /// (out, in).
    pub fn dims2(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Weight::Dense(t) => t.dims2()?,
            Weight::Quantized(q) => q.shape().dims2()?,
            Weight::Bf16(m) => m.dims,
            Weight::Autocast(t, _) => t.dims2()?,
        })
    }

    /// Whether the fused CPU kernels take it (quantized weights are dequantized on the CPU).
    pub fn is_cpu_f32(&self) -> bool {
        match self {
            Weight::Dense(t) | Weight::Autocast(t, _) => fusable(&[t]),
            Weight::Quantized(q) => q.device().is_cpu(),
            Weight::Bf16(_) => true,
        }
    }

    /// A dense weight made contiguous (a quantized one as it is).
    pub fn contiguous(&self) -> Result<Self> {
        Ok(match self {
            Weight::Dense(t) => Weight::Dense(t.contiguous()?),
            Weight::Autocast(t, copy) => Weight::Autocast(t.contiguous()?, copy.clone()),
            Weight::Quantized(_) | Weight::Bf16(_) => self.clone(),
        })
    }

    /// `x · wᵀ (+ b)`.
    pub fn linear(&self, x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => match b {
                Some(b) => linear_bias(x, w, b),
                None => linear(x, w),
            },
            Weight::Quantized(q) => {
                let y = linear_quantized(x, q)?;
                Ok(match b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            }
            // A frozen bf16 base is packed per product: keeping its panels would double its
            // memory, which is what a bf16 base is for.
            Weight::Bf16(m) => linear_bf16(x, (m.data.clone(), None), m.dims, None, b),
            Weight::Autocast(t, copy) => {
                let (w16, packs) = copy.of_packed(t)?;
                linear_bf16(x, (w16, Some(packs)), t.dims2()?, Some(t), b)
            }
        }
    }
}

/// `x · wᵀ` for a weight kept in its ggml blocks, w (out, in): the forward and the backward
/// each dequantize w into a transient f32 matrix for one GEMM and drop it, so the model never
/// holds the base as f32 (one layer's matrix at a time). w is frozen: the backward gives
/// ∂x = g·w only. Numerically the same as [`linear`] on the dequantized weight.
pub fn linear_quantized(x: &Tensor, w: &Arc<QTensor>) -> Result<Tensor> {
    let in_f = w.shape().dims2()?.1;
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() == 0 || x.dim(D::Minus1)? != in_f
    {
        return linear_composed(x, &w.dequantize(x.device())?);
    }
    Ok(x.contiguous()?
        .apply_op1(QuantizedLinear { w: w.clone() })?)
}

struct QuantizedLinear {
    w: Arc<QTensor>,
}

impl CustomOp1 for QuantizedLinear {
    fn name(&self) -> &'static str {
        "grove-quantized-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "quantized linear")?;
        let wd = self.w.dequantize(&Device::Cpu)?.contiguous()?;
        let (storage, layout) = wd.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*storage else {
            candle_core::bail!("quantized linear: expected a CPU weight")
        };
        linear_fwd(
            x,
            l,
            f32_slice(ws, layout, "quantized linear")?,
            layout,
            None,
        )
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let wd = self.w.dequantize(x.device())?;
        let (dx, _, _) = linear_bwd(x, &wd, g, false)?;
        Ok(dx)
    }
}
