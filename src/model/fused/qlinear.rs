//! The linear layer on a frozen quantized weight (a LoRA run's GGUF base), dequantized per
//! matmul.
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{CustomOp1, Device};

use super::*;

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
