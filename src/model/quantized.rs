//! The Llama / Qwen2 / Qwen3 decoder on quantized weights, for sampling and evaluation from a
//! GGUF file: every projection is a candle `QMatMul` over the file's ggml blocks (Q4_K stays
//! Q4_K in memory and in the matmul), the embedding is looked up block-wise, and only the norms
//! and biases are f32. Same forward as [`Llama`]'s cached path (HF layout: llama.cpp's Q/K row
//! permutation is undone on the blocks at load time, so RoPE is "rotate half" as in HF), so the
//! two agree up to the quantization of the activations inside `QMatMul`.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::causal_lm::CausalLm;
use super::llama::{parameter_shapes, rope_tables, Config, KvCache, Llama};
use super::Tokenizer;
use crate::error::{Error, Result};

/// A frozen linear layer on a quantized weight (out, in), plus an optional f32 bias. Built
/// once for sampling here and meant to be the frozen base a LoRA adapter wraps: [`weight`]
/// gives the blocks for a per-matmul dequantization in a backward pass.
///
/// [`weight`]: QLinear::weight
pub struct QLinear {
    weight: Arc<QTensor>,
    matmul: QMatMul,
    bias: Option<Tensor>,
}

/// Whether candle multiplies by blocks of this type with SIMD kernels (AVX2 / NEON). Its Q4_1,
/// Q5_0, Q5_1 and Q8_1 kernels are scalar: sampling SmolLM2-135M Q4_1 on them ran at a tenth
/// of the f32 speed (docs/performance.md), so those weights are dequantized at load instead.
pub fn has_fast_kernel(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(dtype, Q4_0 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K | Q8K)
}

impl QLinear {
    pub fn new(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let weight = Arc::new(weight);
        // F32/F16/BF16 weights become plain matmuls (candle's choice), and so do block types
        // without a fast kernel; the others stay blocks.
        let matmul = Self::new_matmul(weight.clone())?;
        Ok(QLinear {
            weight,
            matmul,
            bias,
        })
    }

    fn new_matmul(weight: Arc<QTensor>) -> Result<QMatMul> {
        Ok(match has_fast_kernel(weight.dtype()) {
            true => QMatMul::from_arc(weight)?,
            false => QMatMul::Tensor(weight.dequantize(&weight.device())?),
        })
    }

    /// (…, in) → (…, out), no autograd.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.matmul.forward(&x.contiguous()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The weight in its ggml blocks, (out, in).
    pub fn weight(&self) -> &Arc<QTensor> {
        &self.weight
    }

    /// Whether the matmul runs on the blocks (see [`has_fast_kernel`]).
    pub fn on_blocks(&self) -> bool {
        matches!(self.matmul, QMatMul::QTensor(_))
    }
}

struct QLayer {
    ln1: Tensor,
    q: QLinear,
    k: QLinear,
    v: QLinear,
    qk_norm: Option<(Tensor, Tensor)>,
    o: QLinear,
    ln2: Tensor,
    gate: QLinear,
    up: QLinear,
    down: QLinear,
}

pub struct QuantizedLlama {
    pub cfg: Config,
    embed: QMatMul,
    layers: Vec<QLayer>,
    norm: Tensor,
    lm_head: QMatMul,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// Takes the tensors of a model by their HF names, checking each shape and refusing leftovers.
struct Weights<'a> {
    tensors: HashMap<String, QTensor>,
    shapes: HashMap<String, Vec<usize>>,
    source: &'a str,
    device: Device,
}

impl Weights<'_> {
    fn take(&mut self, name: &str) -> Result<QTensor> {
        let shape = self.shapes.get(name).cloned().unwrap_or_default();
        let t = self.tensors.remove(name).ok_or_else(|| {
            Error::checkpoint(
                self.source,
                format!("missing tensor `{name}` (expected shape {shape:?})"),
            )
        })?;
        if t.shape().dims() != shape.as_slice() {
            return Err(Error::checkpoint(
                self.source,
                format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.shape().dims()
                ),
            ));
        }
        Ok(t)
    }

    /// Norm weights and biases: small, used elementwise, so f32.
    fn vector(&mut self, name: &str) -> Result<Tensor> {
        Ok(self
            .take(name)?
            .dequantize(&self.device)?
            .to_dtype(DType::F32)?)
    }

    fn linear(&mut self, prefix: &str, bias: bool) -> Result<QLinear> {
        let w = self.take(&format!("{prefix}.weight"))?;
        let b = match bias {
            true => Some(self.vector(&format!("{prefix}.bias"))?),
            false => None,
        };
        QLinear::new(w, b)
    }
}

impl QuantizedLlama {
    /// Builds the model from quantized tensors under their HF names (HF row order), as
    /// [`load_gguf_quantized`](super::io::load_gguf_quantized) returns them. `source` names the
    /// file in errors; missing, misshapen and extra tensors are errors.
    pub fn from_qtensors(
        cfg: &Config,
        mut tensors: HashMap<String, QTensor>,
        device: &Device,
        source: &str,
    ) -> Result<Self> {
        cfg.validate(source)?;
        if cfg.tied() {
            tensors.remove("lm_head.weight");
        }
        let mut w = Weights {
            tensors,
            shapes: parameter_shapes(cfg).into_iter().collect(),
            source,
            device: device.clone(),
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let qk_norm = match cfg.qk_norm() {
                true => Some((
                    w.vector(&format!("{a}.q_norm.weight"))?,
                    w.vector(&format!("{a}.k_norm.weight"))?,
                )),
                false => None,
            };
            layers.push(QLayer {
                ln1: w.vector(&format!("{p}.input_layernorm.weight"))?,
                q: w.linear(&format!("{a}.q_proj"), cfg.qkv_bias())?,
                k: w.linear(&format!("{a}.k_proj"), cfg.qkv_bias())?,
                v: w.linear(&format!("{a}.v_proj"), cfg.qkv_bias())?,
                qk_norm,
                o: w.linear(&format!("{a}.o_proj"), false)?,
                ln2: w.vector(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: w.linear(&format!("{p}.mlp.gate_proj"), false)?,
                up: w.linear(&format!("{p}.mlp.up_proj"), false)?,
                down: w.linear(&format!("{p}.mlp.down_proj"), false)?,
            });
        }
        let embed = Arc::new(w.take("model.embed_tokens.weight")?);
        let lm_head = match cfg.tied() {
            true => embed.clone(),
            false => Arc::new(w.take("lm_head.weight")?),
        };
        let (embed, lm_head) = (QLinear::new_matmul(embed)?, QLinear::new_matmul(lm_head)?);
        let norm = w.vector("model.norm.weight")?;
        if let Some(extra) = w.tensors.keys().min() {
            return Err(Error::checkpoint(
                source,
                format!(
                    "unexpected tensor `{extra}` ({} extra in all) for this config",
                    w.tensors.len()
                ),
            ));
        }
        let (cos, sin) = rope_tables(cfg, device)?;
        Ok(QuantizedLlama {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device: device.clone(),
        })
    }

    /// Loads a GGUF file with its weights kept in their ggml blocks.
    pub fn load_gguf(path: &Path, device: &Device) -> Result<(Self, Tokenizer)> {
        let (cfg, tensors, tok) = super::io::load_gguf_quantized(path, device)?;
        let model = Self::from_qtensors(&cfg, tensors, device, &path.display().to_string())?;
        Ok((model, tok))
    }

    /// Bytes the weights take in memory (blocks as stored, f32 for norms and biases).
    pub fn weight_bytes(&self) -> usize {
        fn qbytes(m: &QMatMul) -> usize {
            match m {
                QMatMul::QTensor(q) => q.storage_size_in_bytes(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                    t.elem_count() * t.dtype().size_in_bytes()
                }
            }
        }
        let f32s = |t: &Tensor| t.elem_count() * 4;
        let lin = |l: &QLinear| qbytes(&l.matmul) + l.bias.as_ref().map_or(0, f32s);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                f32s(&l.ln1)
                    + f32s(&l.ln2)
                    + [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                        .iter()
                        .map(|x| lin(x))
                        .sum::<usize>()
                    + l.qk_norm.as_ref().map_or(0, |(a, b)| f32s(a) + f32s(b))
            })
            .sum();
        let head = if self.cfg.tied() {
            0
        } else {
            qbytes(&self.lm_head)
        };
        layers + qbytes(&self.embed) + head + f32s(&self.norm)
    }

    /// The ggml type of the first layer's Q projection (what "a Q4_K model" means in reports).
    pub fn weight_type(&self) -> Option<GgmlDType> {
        self.layers.first().map(|l| l.q.weight.dtype())
    }

    fn attention(
        &self,
        layer: &QLayer,
        li: usize,
        h: &Tensor,
        rope: (&Tensor, &Tensor),
        mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = h.dims3()?;
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let split = |x: Tensor, heads: usize| x.reshape((b, t, heads, hd))?.transpose(1, 2);
        let q = split(layer.q.forward(h)?, nh)?;
        let k = split(layer.k.forward(h)?, nkv)?;
        let v = split(layer.v.forward(h)?, nkv)?;
        let (q, k) = match &layer.qk_norm {
            Some((qn, kn)) => (
                super::fused::rms_norm(&q, qn, cfg.rms_eps())?,
                super::fused::rms_norm(&k, kn, cfg.rms_eps())?,
            ),
            None => (q, k),
        };
        let q = super::fused::rope(&q, rope.0, rope.1)?;
        let k = super::fused::rope(&k, rope.0, rope.1)?;
        let (k, v) = match cache {
            Some(c) => c.append(li, &k, &v)?,
            None => (k.contiguous()?, v.contiguous()?),
        };
        // Grouped-query attention as in `Llama::forward_hidden`: the `rep` query heads of one KV
        // head stacked along the query axis.
        let rep = nh / nkv;
        let s_len = k.dim(2)?;
        let qg = q.contiguous()?.reshape((b, nkv, rep * t, hd))?;
        let att = qg.matmul(&k.t()?)?.reshape((b, nh, t, s_len))?;
        let att = super::fused::masked_softmax(&att, mask, 1.0 / (hd as f64).sqrt())?;
        let y = att
            .reshape((b, nkv, rep * t, s_len))?
            .matmul(&v)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        layer.o.forward(&y)
    }
}

impl CausalLm for QuantizedLlama {
    fn config(&self) -> &Config {
        &self.cfg
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward_hidden(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let half = self.cfg.head_dim() / 2;
        let flat_pos = pos.flatten_all()?;
        let cos = self.cos.index_select(&flat_pos, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&flat_pos, 0)?.reshape((b, t, half))?;
        let eps = self.cfg.rms_eps();
        let mut x = self
            .embed
            .embedding(&ids.flatten_all()?)?
            .to_dtype(DType::F32)?
            .reshape((b, t, ()))?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = super::fused::rms_norm(&x, &layer.ln1, eps)?;
            let y = self.attention(layer, li, &h, (&cos, &sin), mask, cache.as_deref_mut())?;
            x = (x + y)?;
            let h = super::fused::rms_norm(&x, &layer.ln2, eps)?;
            let s = (layer.gate.forward(&h)?.silu()? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&s)?)?;
        }
        super::fused::rms_norm(&x, &self.norm, eps)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(&hidden.contiguous()?)?)
    }
}

/// The model at `path` for sampling only (evaluation, serving): a GGUF file stays quantized
/// ([`QuantizedLlama`]); HF folders, grove checkpoints and Hub references load as [`Llama`].
pub fn load_for_sampling(path: &Path, device: &Device) -> Result<(Box<dyn CausalLm>, Tokenizer)> {
    let resolved = super::hub::resolve_path(path)?;
    if super::io::is_gguf(&resolved) {
        let (m, tok) = QuantizedLlama::load_gguf(&resolved, device)?;
        return Ok((Box::new(m), tok));
    }
    let (m, tok): (Llama, Tokenizer) = super::io::load_pretrained(path, device)?;
    Ok((Box::new(m), tok))
}
