//! A Llama / Qwen2 / Qwen3-family decoder on candle, differentiable end to end.
//!
//! Qwen3 (dense) differs from Qwen2 by per-head RMSNorms on queries and keys (`q_norm`,
//! `k_norm`, weight `[head_dim]`, applied before RoPE), no q/k/v biases and a `head_dim` that
//! may differ from `hidden_size / num_attention_heads`.
//!
//! Weight names mirror the Hugging Face checkpoint keys (`model.layers.0.self_attn.q_proj.weight`,
//! ...), so safetensors files move between grove and `transformers` unchanged. RMSNorm, RoPE,
//! the masked softmax and SwiGLU are grove's own fused kernels with hand-written backward
//! passes (`model::fused`): candle-nn's fused kernels have no backward and would silently
//! detach most parameters.
use std::collections::HashMap;

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor, Var};

use super::bf16::Dtype;
use super::fused::Bf16Matrix;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::lora::{self, Adapter, BaseIdentity, LoraConfig};
use crate::error::{Error, Result};

/// The subset of an HF `config.json` that shapes the network. Unknown keys are ignored and
/// `null` values read as absent, because real configs carry dozens of unrelated fields
/// (`sliding_window: null`, `rope_parameters`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers ≥ 5 moves `rope_theta` here.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Llama's name for q/k/v biases; Qwen2 has them without saying so.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

impl Config {
    /// Parses an HF `config.json`; `file` names the source in errors.
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let cfg: Config = serde_json::from_str(text)
            .map_err(|e| Error::config(file, format!("not a valid model config.json: {e}")))?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Shape invariants the forward pass relies on.
    pub fn validate(&self, file: &str) -> Result<()> {
        let err = |m: String| Err(Error::config(file, m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ] {
            if v == 0 {
                return err(format!("field `{name}` must be positive, found 0"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return err(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" && act != "swish" {
                return err(format!(
                    "hidden_act `{act}` is not supported (expected \"silu\")"
                ));
            }
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    pub fn rms_eps(&self) -> f64 {
        self.rms_norm_eps.unwrap_or(1e-6)
    }
    pub fn rope_theta(&self) -> f64 {
        if let Some(t) = self.rope_theta {
            return t;
        }
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|v| v.as_f64())
            .unwrap_or(10_000.0)
    }
    pub fn max_positions(&self) -> usize {
        self.max_position_embeddings.unwrap_or(4096)
    }
    pub fn tied(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(false)
    }
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3).
    pub fn qk_norm(&self) -> bool {
        matches!(self.model_type.as_deref(), Some("qwen3"))
    }
    /// q/k/v projections carry biases (Qwen2 always; Llama and Qwen3 when `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias
            .unwrap_or(matches!(self.model_type.as_deref(), Some("qwen2")))
    }

    /// The built-in policy of the quickstart: a 2-layer, d=128 Llama over a tiny vocabulary.
    pub fn builtin_tiny(vocab_size: usize) -> Self {
        Config {
            model_type: Some("llama".into()),
            vocab_size,
            hidden_size: 128,
            intermediate_size: 352,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(4),
            head_dim: None,
            rms_norm_eps: Some(1e-5),
            rope_theta: Some(10_000.0),
            rope_parameters: None,
            max_position_embeddings: Some(64),
            tie_word_embeddings: Some(true),
            attention_bias: Some(false),
            bos_token_id: None,
            eos_token_id: None,
            hidden_act: Some("silu".into()),
            architectures: Some(vec!["LlamaForCausalLM".into()]),
            torch_dtype: Some("float32".into()),
        }
    }
}

/// The expected name and shape of every parameter, in a fixed order.
pub fn parameter_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![nh * hd, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![nkv * hd, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![nkv * hd, h]));
        if cfg.qkv_bias() {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![nh * hd]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![nkv * hd]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![nkv * hd]));
        }
        if cfg.qk_norm() {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, nh * hd]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tied() {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

struct Layer {
    ln1: Tensor,
    q: Weight,
    k: Weight,
    v: Weight,
    qkv_bias: Option<(Tensor, Tensor, Tensor)>,
    /// Qwen3's per-head query and key norms.
    qk_norm: Option<(Tensor, Tensor)>,
    o: Weight,
    ln2: Tensor,
    gate: Weight,
    up: Weight,
    down: Weight,
}

pub use super::fused::Weight;

impl Layer {
    /// The seven projections with their key suffixes.
    fn projections_mut(&mut self) -> [(&'static str, &mut Weight); 7] {
        [
            ("self_attn.q_proj", &mut self.q),
            ("self_attn.k_proj", &mut self.k),
            ("self_attn.v_proj", &mut self.v),
            ("self_attn.o_proj", &mut self.o),
            ("mlp.gate_proj", &mut self.gate),
            ("mlp.up_proj", &mut self.up),
            ("mlp.down_proj", &mut self.down),
        ]
    }
}

/// Per-layer key/value cache for incremental decoding: (b, n_kv, s, head_dim) each.
#[derive(Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: (0..n_layers).map(|_| None).collect(),
        }
    }

    /// Appends layer `li`'s new keys and values (b, nkv, t, hd) along the sequence axis and
    /// returns the whole cached keys and values, contiguous.
    pub(crate) fn append(&mut self, li: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let slot = self
            .layers
            .get_mut(li)
            .ok_or_else(|| Error::Model("kv cache has fewer layers than the model".into()))?;
        let (k, v) = match slot.take() {
            Some((pk, pv)) => (
                Tensor::cat(&[&pk, k], 2)?,
                Tensor::cat(&[&pv, &v.contiguous()?], 2)?,
            ),
            None => (k.contiguous()?, v.contiguous()?),
        };
        // Cached keys/values are detached: the cache serves decoding only, and an attached
        // cache would keep every earlier step's autograd graph (all its activations) alive
        // through the chain of concatenations.
        *slot = Some((k.detach(), v.detach()));
        Ok((k, v))
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dims()[2],
            _ => 0,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Llama {
    pub cfg: Config,
    /// The trainable parameters: every weight, or with an adapter the adapter's A and B alone.
    params: Vec<(String, Var)>,
    /// With an adapter: the frozen base weights (plain tensors, no gradient), key order.
    frozen: Vec<(String, Weight)>,
    adapter: Option<Adapter>,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    /// With `model.dtype = "bf16"`: the output matrix the logits use (its bf16 values).
    lm_head16: Option<Weight>,
    /// The precision of the matrix products (`model.dtype`).
    dtype: Dtype,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    // One 2-D GEMM over the flattened leading dims, one autograd node (`fused::linear`).
    match b {
        Some(b) => super::fused::linear_bias(x, w, b),
        None => super::fused::linear(x, w),
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    super::fused::rms_norm(x, w, eps)
}

impl Llama {
    /// A freshly initialised model: N(0, 0.02) matrices, unit norms, zero biases, drawn from a
    /// ChaCha RNG so the same seed gives the same weights on every machine.
    pub fn init(cfg: &Config, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate("model config")?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.02).map_err(|e| Error::Model(e.to_string()))?;
        let mut tensors = HashMap::new();
        for (name, shape) in parameter_shapes(cfg) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            tensors.insert(name, Tensor::from_vec(data, shape, device)?);
        }
        Self::from_tensors(cfg, tensors, device, "initialisation")
    }

    /// Builds the model from named tensors (any float dtype; converted to trainable f32).
    /// `source` names the file in errors. Extra keys are rejected so that a checkpoint of a
    /// different architecture cannot load half-way.
    pub fn from_tensors(
        cfg: &Config,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
        source: &str,
    ) -> Result<Self> {
        cfg.validate(source)?;
        if cfg.tied() {
            // HF keeps a copy of the tied head in some checkpoints; it is the embedding.
            tensors.remove("lm_head.weight");
        }
        let mut params = Vec::new();
        let mut by_name: HashMap<String, Tensor> = HashMap::new();
        for (name, shape) in parameter_shapes(cfg) {
            let t = tensors.remove(&name).ok_or_else(|| {
                Error::checkpoint(
                    source,
                    format!("missing tensor `{name}` (expected shape {shape:?})"),
                )
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::checkpoint(
                    source,
                    format!(
                        "tensor `{name}` has shape {:?}, expected {shape:?}",
                        t.dims()
                    ),
                ));
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?.contiguous()?;
            let var = Var::from_tensor(&t)?;
            by_name.insert(name.clone(), var.as_tensor().clone());
            params.push((name, var));
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(Error::checkpoint(
                source,
                format!(
                    "unexpected tensor `{extra}` ({} extra in all) for this config",
                    tensors.len()
                ),
            ));
        }
        Self::assemble(cfg, &by_name, &HashMap::new(), params, device)
    }

    /// The model over named weights (checked by the caller: every key present), trainable
    /// `params`; projections in `special` (quantized, bf16) are taken as they are.
    fn assemble(
        cfg: &Config,
        by_name: &HashMap<String, Tensor>,
        special: &HashMap<String, Weight>,
        params: Vec<(String, Var)>,
        device: &Device,
    ) -> Result<Self> {
        let take = |n: &str| by_name[n].clone();
        let proj = |n: &str| match special.get(n) {
            Some(w) => w.clone(),
            None => Weight::Dense(by_name[n].clone()),
        };
        let mut layers = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let qkv_bias = cfg.qkv_bias().then(|| {
                (
                    take(&format!("{p}.self_attn.q_proj.bias")),
                    take(&format!("{p}.self_attn.k_proj.bias")),
                    take(&format!("{p}.self_attn.v_proj.bias")),
                )
            });
            let qk_norm = cfg.qk_norm().then(|| {
                (
                    take(&format!("{p}.self_attn.q_norm.weight")),
                    take(&format!("{p}.self_attn.k_norm.weight")),
                )
            });
            layers.push(Layer {
                qk_norm,
                ln1: take(&format!("{p}.input_layernorm.weight")),
                q: proj(&format!("{p}.self_attn.q_proj.weight")),
                k: proj(&format!("{p}.self_attn.k_proj.weight")),
                v: proj(&format!("{p}.self_attn.v_proj.weight")),
                qkv_bias,
                o: proj(&format!("{p}.self_attn.o_proj.weight")),
                ln2: take(&format!("{p}.post_attention_layernorm.weight")),
                gate: proj(&format!("{p}.mlp.gate_proj.weight")),
                up: proj(&format!("{p}.mlp.up_proj.weight")),
                down: proj(&format!("{p}.mlp.down_proj.weight")),
            });
        }
        let embed = take("model.embed_tokens.weight");
        let lm_head = if cfg.tied() {
            embed.clone()
        } else {
            take("lm_head.weight")
        };
        let (cos, sin) = rope_tables(cfg, device)?;
        Ok(Llama {
            cfg: cfg.clone(),
            params,
            frozen: Vec::new(),
            adapter: None,
            embed,
            layers,
            norm: take("model.norm.weight"),
            lm_head,
            lm_head16: None,
            dtype: Dtype::F32,
            cos,
            sin,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Trainable parameters in checkpoint-key order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Sets every weight of the first parameter to NaN: a broken model for the tests that
    /// check what sampling, evaluation and serving do with one.
    #[cfg(test)]
    pub fn poison_with_nan(&self) {
        let (_, v) = &self.params[0];
        v.set(&v.as_tensor().affine(0.0, f64::NAN).unwrap())
            .unwrap();
    }

    pub fn num_params(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Named weights for saving (shares storage with the live parameters).
    pub fn named_tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// An independent copy of the trainable weights: the behaviour policy of lagged/async
    /// modes, which must not move when the trainer updates in place. With an adapter the
    /// frozen base is shared, not copied.
    pub fn deep_clone(&self) -> Result<Self> {
        if let Some(a) = &self.adapter {
            let mut m = self.frozen_view()?.with_adapter(a.deep_clone()?)?;
            // The frozen base (bf16 or not) is shared; so is the bf16 output matrix.
            m.dtype = self.dtype;
            m.lm_head16 = self.lm_head16.clone();
            return Ok(m);
        }
        let mut tensors = HashMap::new();
        for (n, v) in &self.params {
            tensors.insert(n.clone(), v.as_tensor().detach().copy()?);
        }
        Self::from_tensors(&self.cfg, tensors, &self.device, "in-memory copy")?
            .with_dtype(self.dtype)
    }

    /// Overwrites this model's weights with `other`'s (same config), keeping the Vars.
    pub fn copy_weights_from(&self, other: &Llama) -> Result<()> {
        if self.params.len() != other.params.len() {
            return Err(Error::Model(
                "copy of weights between a LoRA model and a full one".into(),
            ));
        }
        for ((n, dst), (_, src)) in self.params.iter().zip(other.params.iter()) {
            dst.set(&src.as_tensor().detach().copy()?)
                .map_err(|e| Error::Model(format!("copy of `{n}`: {e}")))?;
        }
        // Written in place: bf16 working copies must be made again.
        crate::compute::optim::weights_changed();
        Ok(())
    }

    /// Sets the trainable weights from `tensors` (the keys of [`Self::named_tensors`], every
    /// one with its shape); `source` names the file in errors.
    pub fn set_trainable(&self, tensors: HashMap<String, Tensor>, source: &str) -> Result<()> {
        match &self.adapter {
            Some(a) => a.load_values(&tensors, source),
            None => {
                let loaded = Self::from_tensors(&self.cfg, tensors, &self.device, source)?;
                self.copy_weights_from(&loaded)
            }
        }
    }

    /// A model like this one with the trainable weights from `tensors` (a full model is
    /// rebuilt from them; a LoRA model shares this one's base).
    pub fn sibling_with(&self, tensors: HashMap<String, Tensor>, source: &str) -> Result<Self> {
        if self.adapter.is_none() {
            return Self::from_tensors(&self.cfg, tensors, &self.device, source)?
                .with_dtype(self.dtype);
        }
        let m = self.deep_clone()?;
        m.set_trainable(tensors, source)?;
        Ok(m)
    }

    /// The frozen KL reference: a full model's copy, or for a LoRA model the shared base with
    /// a copy of the adapter, switched off unless `adapter_on` (the adapter was warmed up).
    pub fn reference_copy(&self, adapter_on: bool) -> Result<Self> {
        Ok(self.deep_clone()?.switch_adapter(adapter_on))
    }

    /// This model with its adapter (if any) switched on or off.
    pub fn switch_adapter(mut self, on: bool) -> Self {
        if let Some(a) = self.adapter.as_mut() {
            a.enabled = on;
        }
        self
    }

    /// The base weights, frozen: plain tensors sharing storage with this model's.
    fn frozen_view(&self) -> Result<Self> {
        Self::frozen_from(&self.cfg, self.base_weights(), &self.device)
    }

    /// A model over frozen weights (no trainable parameters until an adapter is put on).
    fn frozen_from(cfg: &Config, weights: Vec<(String, Weight)>, device: &Device) -> Result<Self> {
        let mut dense = HashMap::new();
        let mut special = HashMap::new();
        for (n, w) in &weights {
            match w {
                Weight::Dense(t) => {
                    dense.insert(n.clone(), t.clone());
                }
                other => {
                    special.insert(n.clone(), other.clone());
                }
            }
        }
        let mut m = Self::assemble(cfg, &dense, &special, Vec::new(), device)?;
        m.frozen = weights;
        Ok(m)
    }

    /// A frozen base from a GGUF file's tensors (HF names), its projections kept in their ggml
    /// blocks and dequantized per matmul; embeddings, norms and biases f32. Missing, misshapen
    /// and extra tensors are errors naming `source`.
    pub fn frozen_quantized(
        cfg: &Config,
        mut tensors: HashMap<String, QTensor>,
        device: &Device,
        source: &str,
    ) -> Result<Self> {
        cfg.validate(source)?;
        if cfg.tied() {
            tensors.remove("lm_head.weight");
        }
        let mut weights = Vec::new();
        for (name, shape) in parameter_shapes(cfg) {
            let q = tensors.remove(&name).ok_or_else(|| {
                Error::checkpoint(
                    source,
                    format!("missing tensor `{name}` (expected shape {shape:?})"),
                )
            })?;
            if q.shape().dims() != shape.as_slice() {
                return Err(Error::checkpoint(
                    source,
                    format!(
                        "tensor `{name}` has shape {:?}, expected {shape:?}",
                        q.shape().dims()
                    ),
                ));
            }
            let w = if name.ends_with("_proj.weight") {
                Weight::Quantized(Arc::new(q))
            } else {
                Weight::Dense(q.dequantize(device)?.to_dtype(DType::F32)?)
            };
            weights.push((name, w));
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(Error::checkpoint(
                source,
                format!(
                    "unexpected tensor `{extra}` ({} extra in all) for this config",
                    tensors.len()
                ),
            ));
        }
        Self::frozen_from(cfg, weights, device)
    }

    /// The base weights in key order (with an adapter: the frozen ones, without its ΔW).
    pub fn base_weights(&self) -> Vec<(String, Weight)> {
        if !self.frozen.is_empty() {
            return self.frozen.clone();
        }
        self.params
            .iter()
            .map(|(n, v)| (n.clone(), Weight::Dense(v.as_tensor().detach())))
            .collect()
    }

    /// [`Self::base_weights`] as f32 tensors (quantized ones dequantized: fresh copies).
    pub fn base_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.base_weights()
            .into_iter()
            .map(|(n, w)| Ok((n, w.to_dense(&self.device)?)))
            .collect()
    }

    /// This model with a fresh LoRA adapter (`lora`, A drawn from `seed`) on a frozen base
    /// whose identity records `source`.
    pub fn with_lora(self, lora: &LoraConfig, seed: u64, source: &str) -> Result<Self> {
        let base = self.base_identity(source)?;
        let adapter = Adapter::init(lora, &self.cfg, seed, base, &self.device)?;
        self.frozen_view()?.with_adapter(adapter)
    }

    /// The identity of this model's base weights, loaded from `source`.
    pub fn base_identity(&self, source: &str) -> Result<BaseIdentity> {
        Ok(BaseIdentity {
            source: source.to_string(),
            hash: lora::content_hash(&self.base_weights(), &self.device)?,
        })
    }

    /// Puts `adapter` on this model's base, which becomes frozen; only the adapter trains.
    pub fn with_adapter(self, adapter: Adapter) -> Result<Self> {
        if self.adapter.is_some() {
            return Err(Error::Model("the model already has an adapter".into()));
        }
        let mut m = if self.frozen.is_empty() {
            self.frozen_view()?
        } else {
            self
        };
        m.params = adapter.named_vars();
        m.adapter = Some(adapter);
        Ok(m)
    }

    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    /// Dropout of the adapter's input for the learner's gradient pass of `step` (None: off).
    pub fn set_dropout_step(&self, step: Option<u64>) {
        if let Some(a) = &self.adapter {
            a.set_dropout_step(step);
        }
    }

    /// A full model with every adapted weight replaced by W + s·B·A (PEFT's
    /// `merge_and_unload`); a model without an adapter is copied.
    pub fn merged(&self) -> Result<Self> {
        let mut tensors: HashMap<String, Tensor> = self
            .base_tensors()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.copy()?)))
            .collect::<Result<_>>()?;
        if let Some(a) = self.adapter.as_ref().filter(|a| a.enabled) {
            for (key, d) in a.deltas()? {
                let w = tensors
                    .remove(&key)
                    .ok_or_else(|| Error::Model(format!("merge: no base weight `{key}`")))?;
                tensors.insert(key, (w + d)?);
            }
        }
        Self::from_tensors(&self.cfg, tensors, &self.device, "merge")
    }

    /// A projection of layer `li`: the base linear plus the adapter's ΔW when it adapts it.
    fn proj(
        &self,
        li: usize,
        t: lora::Target,
        x: &Tensor,
        w: &Weight,
        b: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let Some((a, bm, s)) = self.adapter.as_ref().and_then(|a| a.fused_parts(li, t)) {
            return super::fused::lora_linear(x, w, b, a, bm, s);
        }
        let y = w.linear(x, b)?;
        match self
            .adapter
            .as_ref()
            .map(|a| a.delta(li, t, x))
            .transpose()?
            .flatten()
        {
            Some(d) => Ok((y + d)?),
            None => Ok(y),
        }
    }

    fn adapts(&self, li: usize, t: lora::Target) -> bool {
        self.adapter.as_ref().is_some_and(|a| a.adapts(li, t))
    }

    /// Final-norm hidden states (b, t, hidden).
    ///
    /// `ids`, `pos`: (b, t) u32; `pos` holds absolute positions (left padding shifts them).
    /// `mask`: additive (b, 1, t, cached + t), 0 where a query may attend, a large negative
    /// where not. With a cache, keys/values of this call are appended to it.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let flat_pos = pos.flatten_all()?;
        // Half tables (b, t, hd/2), one row per absolute position.
        let cos = self
            .cos
            .index_select(&flat_pos, 0)?
            .reshape((b, t, hd / 2))?;
        let sin = self
            .sin
            .index_select(&flat_pos, 0)?
            .reshape((b, t, hd / 2))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, ()))?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.ln1, cfg.rms_eps())?;
            let (qb, kb, vb) = match &layer.qkv_bias {
                Some((q, k, v)) => (Some(q), Some(k), Some(v)),
                None => (None, None, None),
            };
            let q = self.proj(li, lora::Q, &h, &layer.q, qb)?;
            let k = self.proj(li, lora::K, &h, &layer.k, kb)?;
            let v = self.proj(li, lora::V, &h, &layer.v, vb)?;
            // Training and scoring (no cache, no per-head norms): projections to the o_proj
            // input in one fused node (`fused::attention`, RoPE inside). Decoding and Qwen3's
            // q/k norms take the composed path.
            let y = if cache.is_none() && layer.qk_norm.is_none() {
                super::fused::attention(&q, &k, &v, &cos, &sin, mask, nh, nkv, scale)?
            } else {
                let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?;
                let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
                let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
                let (q, k) = match &layer.qk_norm {
                    Some((qn, kn)) => (
                        rms_norm(&q, qn, cfg.rms_eps())?,
                        rms_norm(&k, kn, cfg.rms_eps())?,
                    ),
                    None => (q, k),
                };
                let q = super::fused::rope(&q, &cos, &sin)?;
                let k = super::fused::rope(&k, &cos, &sin)?;
                let (k, v) = match cache.as_deref_mut() {
                    Some(c) => c.append(li, &k, &v)?,
                    None => (k.contiguous()?, v.contiguous()?),
                };
                // Grouped-query attention without copying keys/values per query head: the `rep`
                // query heads of one KV head are stacked along the query axis, (b, nkv, rep·t, hd),
                // which is the same memory as (b, nh, t, hd) (HF's repeat_kv maps query head h to
                // KV head h / rep).
                let rep = nh / nkv;
                let s_len = k.dim(2)?;
                let qg = q.contiguous()?.reshape((b, nkv, rep * t, hd))?;
                let att = qg.matmul(&k.t()?)?.reshape((b, nh, t, s_len))?;
                let att = super::fused::masked_softmax(&att, mask, scale)?;
                att.reshape((b, nkv, rep * t, s_len))?
                    .matmul(&v)?
                    .reshape((b, nh, t, hd))?
                    .transpose(1, 2)?
                    .reshape((b, t, nh * hd))?
            };
            x = (x + self.proj(li, lora::O, &y, &layer.o, None)?)?;
            let h = rms_norm(&x, &layer.ln2, cfg.rms_eps())?;
            let s = match (&layer.gate, &layer.up) {
                (Weight::Dense(g), Weight::Dense(u))
                    if !self.adapts(li, lora::GATE) && !self.adapts(li, lora::UP) =>
                {
                    super::fused::gate_up_swiglu(&h, g, u)?
                }
                (g, u) => super::fused::swiglu(
                    &self.proj(li, lora::GATE, &h, g, None)?,
                    &self.proj(li, lora::UP, &h, u, None)?,
                )?,
            };
            x = (x + self.proj(li, lora::DOWN, &s, &layer.down, None)?)?;
        }
        rms_norm(&x, &self.norm, cfg.rms_eps())
    }

    /// The output matrix (vocab, hidden): the embedding when tied.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// Logits (…, vocab) from hidden states (…, hidden).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.lm_head16 {
            Some(w) => w.linear(hidden, None),
            None => linear(hidden, &self.lm_head, None),
        }
    }

    /// The precision of the matrix products.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// This model with its matrix products in `dtype` (`model.dtype`). For bf16 (PyTorch's
    /// autocast): a trainable weight keeps its f32 master, which the optimizer updates, and
    /// gets a bf16 working copy made again after every change; a frozen base projection (with
    /// an adapter) is kept in bf16 only, half its f32 memory; a quantized one stays in its
    /// blocks. Embeddings, norms and biases stay f32. Put the adapter on first: the base's
    /// identity hash is of its f32 values.
    pub fn with_dtype(mut self, dtype: Dtype) -> Result<Self> {
        if dtype == self.dtype {
            return Ok(self);
        }
        if self.dtype == Dtype::Bf16 {
            return Err(Error::Model(
                "a bf16 model cannot be turned back to f32: its frozen weights were rounded".into(),
            ));
        }
        let frozen = self.adapter.is_some() || !self.frozen.is_empty();
        let to_bf16 = |w: &Weight| -> Result<Weight> {
            Ok(match w {
                Weight::Dense(t) if frozen => Weight::Bf16(Bf16Matrix::from_tensor(t)?),
                Weight::Dense(t) => Weight::Autocast(t.clone(), Arc::default()),
                other => other.clone(),
            })
        };
        // By key, so the frozen list shares the layers' bf16 matrices (the f32 ones are freed).
        let mut converted = HashMap::new();
        for (li, layer) in self.layers.iter_mut().enumerate() {
            for (suffix, w) in layer.projections_mut() {
                *w = to_bf16(w)?;
                converted.insert(format!("model.layers.{li}.{suffix}.weight"), w.clone());
            }
        }
        for (n, w) in self.frozen.iter_mut() {
            if let Some(c) = converted.get(n.as_str()) {
                *w = c.clone();
            }
        }
        self.lm_head16 = Some(to_bf16(&Weight::Dense(self.lm_head.clone()))?);
        self.dtype = dtype;
        Ok(self)
    }
}

pub(crate) fn rope_tables(cfg: &Config, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let theta = cfg.rope_theta();
    let n = cfg.max_positions();
    let inv: Vec<f64> = (0..hd / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / hd as f64))
        .collect();
    let mut cos = Vec::with_capacity(n * hd / 2);
    let mut sin = Vec::with_capacity(n * hd / 2);
    for p in 0..n {
        for f in &inv {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, hd / 2), device)?,
        Tensor::from_vec(sin, (n, hd / 2), device)?,
    ))
}

/// Additive attention mask (b, 1, t, offset + t) for queries at columns offset..offset+t.
/// A query sees a key when the key is not after it and the key is a real token.
/// Masked entries get −1e9, not −inf, so rows of padding queries stay finite.
pub fn attention_mask(
    key_valid: &[Vec<bool>],
    offset: usize,
    t: usize,
    device: &Device,
) -> Result<Tensor> {
    let b = key_valid.len();
    let s = offset + t;
    let mut m = Vec::with_capacity(b * t * s);
    for row in key_valid {
        if row.len() != s {
            return Err(Error::Model(format!(
                "attention mask: key_valid row has {} entries, expected offset + t = {s}",
                row.len()
            )));
        }
        for i in 0..t {
            for (j, &valid) in row.iter().enumerate() {
                m.push(if j <= offset + i && valid {
                    0.0f32
                } else {
                    -1e9
                });
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, t, s), device)?)
}
