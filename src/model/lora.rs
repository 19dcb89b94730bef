//! LoRA adapters (Hu et al., 2021) on the decoder's projections, in PEFT's conventions and
//! file format.
//!
//! For a frozen projection W (out, in) an adapter adds ΔW = s·B·A with A (r, in), B (out, r)
//! and s = α/r (α/√r with rsLoRA): y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ. A starts uniform in
//! ±1/√in (PEFT's `kaiming_uniform_(a=√5)`) from the run seed, B at zero, so a fresh adapter
//! leaves every output exactly as the base gives it. Only A and B are trainable: the base's
//! weights are plain tensors, not `Var`s, and the fused kernels compute no weight gradient
//! for a tensor that tracks none.
//!
//! On disk an adapter is PEFT's pair: `adapter_config.json` and `adapter_model.safetensors`
//! with keys `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (what
//! `get_peft_model_state_dict` writes for a `LlamaForCausalLM`). grove adds `grove_base.json`
//! (the base's source and content hash), so an adapter is never applied to a base it was not
//! trained on.
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::llama::{Config, Llama, Weight};
use crate::error::{Error, Result};

/// The projections an adapter may target: PEFT's module name and the block that holds it, in
/// the order a decoder layer runs them.
pub const TARGETS: [(&str, &str); 7] = [
    ("q_proj", "self_attn"),
    ("k_proj", "self_attn"),
    ("v_proj", "self_attn"),
    ("o_proj", "self_attn"),
    ("gate_proj", "mlp"),
    ("up_proj", "mlp"),
    ("down_proj", "mlp"),
];

/// Index into [`TARGETS`].
pub type Target = usize;
pub const Q: Target = 0;
pub const K: Target = 1;
pub const V: Target = 2;
pub const O: Target = 3;
pub const GATE: Target = 4;
pub const UP: Target = 5;
pub const DOWN: Target = 6;

/// `[model.lora]`: PEFT's `LoraConfig` fields under grove's names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// r: the rank of A and B.
    pub rank: usize,
    /// α: ΔW is scaled by α/r (α/√r with `rslora`).
    pub alpha: f64,
    /// Dropout on the adapter's input during the learner's gradient pass (PEFT's
    /// `lora_dropout`); sampling and scoring run without it.
    pub dropout: f64,
    /// PEFT module names (default: all seven projections).
    pub target_modules: Vec<String>,
    /// rsLoRA's scale α/√r instead of α/r.
    pub rslora: bool,
    /// A PEFT adapter folder to start from instead of a fresh adapter; its r, α, targets and
    /// rsLoRA must equal this section's.
    pub init_from: Option<String>,
    /// Keep a GGUF base in its ggml blocks (Q8_0, Q4_0, Q4_1, …), dequantized per matmul in
    /// the forward and backward passes instead of held as f32: QLoRA's memory saving.
    pub quantized_base: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TARGETS.iter().map(|t| t.0.to_string()).collect(),
            rslora: false,
            init_from: None,
            quantized_base: false,
        }
    }
}

impl LoraConfig {
    /// Field checks that need no model (the rank against layer shapes: [`Adapter::init`]).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.rank == 0 {
            return Err("model.lora.rank must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!(
                "model.lora.alpha must be a positive number, found {}",
                self.alpha
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!(
                "model.lora.dropout must be in [0, 1), found {}",
                self.dropout
            ));
        }
        self.targets().map(|_| ())
    }

    /// The targeted projections, in [`TARGETS`] order; an unknown or repeated name is an error
    /// that lists the known ones.
    pub fn targets(&self) -> std::result::Result<Vec<Target>, String> {
        if self.target_modules.is_empty() {
            return Err("model.lora.target_modules is empty: name at least one module".into());
        }
        let mut out = Vec::new();
        for name in &self.target_modules {
            let Some(t) = TARGETS.iter().position(|(n, _)| n == name) else {
                return Err(format!(
                    "model.lora.target_modules: unknown module {name:?} (known: {})",
                    TARGETS.map(|t| t.0).join(", ")
                ));
            };
            if out.contains(&t) {
                return Err(format!("model.lora.target_modules names {name:?} twice"));
            }
            out.push(t);
        }
        out.sort_unstable();
        Ok(out)
    }

    /// s = α/r, or α/√r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// (out, in) of a projection of `cfg`.
pub fn target_shape(cfg: &Config, t: Target) -> (usize, usize) {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim(),
        cfg.num_kv_heads() * cfg.head_dim(),
    );
    match t {
        Q => (q, h),
        K | V => (kv, h),
        O => (h, q),
        GATE | UP => (i, h),
        _ => (h, i),
    }
}

/// The base weight's checkpoint key of layer `l`'s projection `t`.
pub fn base_key(l: usize, t: Target) -> String {
    let (name, block) = TARGETS[t];
    format!("model.layers.{l}.{block}.{name}.weight")
}

/// PEFT's key of layer `l`'s `lora_A` (`which` = "A") or `lora_B` weight.
pub fn peft_key(l: usize, t: Target, which: &str) -> String {
    let (name, block) = TARGETS[t];
    format!("base_model.model.model.layers.{l}.{block}.{name}.lora_{which}.weight")
}

/// Where a base came from and a digest of its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseIdentity {
    /// `model.source` as given ("builtin" for the built-in policy).
    pub source: String,
    /// [`content_hash`] of the base weights.
    pub hash: String,
}

/// 64-bit FNV-1a over every tensor's name and little-endian f32 values, in key order: the
/// same weights give the same digest however they were stored (GGUF, safetensors, built-in;
/// a quantized weight is dequantized one tensor at a time).
pub fn content_hash(tensors: &[(String, Weight)], device: &Device) -> Result<String> {
    let mut sorted: Vec<&(String, Weight)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (name, t) in sorted {
        feed(name.as_bytes());
        let v = t.to_dense(device)?.flatten_all()?.to_vec1::<f32>()?;
        for x in v {
            feed(&x.to_le_bytes());
        }
    }
    Ok(format!("{hash:016x}"))
}

/// One projection's A (r, in) and B (out, r).
pub struct Pair {
    pub a: Var,
    pub b: Var,
}

/// No dropout mask: sampling, scoring and the reference.
const NO_DROPOUT: u64 = u64::MAX;

/// The adapter of a whole decoder.
pub struct Adapter {
    pub cfg: LoraConfig,
    pub base: BaseIdentity,
    /// [layer][target]: None where the target is not adapted.
    pairs: Vec<Vec<Option<Pair>>>,
    scale: f64,
    /// Off: the model computes the base alone (the reference policy of a LoRA run).
    pub enabled: bool,
    seed: u64,
    /// The learner's step while its gradient pass runs (`NO_DROPOUT` otherwise): dropout
    /// masks are drawn from (seed, step, layer, target), so a resumed run draws the same.
    dropout_step: AtomicU64,
}

impl Adapter {
    /// A fresh adapter (A uniform ±1/√in from `seed`, B = 0). The rank must fit every
    /// targeted projection.
    pub fn init(
        lora: &LoraConfig,
        cfg: &Config,
        seed: u64,
        base: BaseIdentity,
        device: &Device,
    ) -> Result<Self> {
        let targets = check_fits(lora, cfg)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(0x4c6f_5241); // "LoRA": apart from the model's own init stream
        let r = lora.rank;
        let mut pairs = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            let mut row: Vec<Option<Pair>> = (0..TARGETS.len()).map(|_| None).collect();
            for &t in &targets {
                let (out_f, in_f) = target_shape(cfg, t);
                let bound = 1.0 / (in_f as f32).sqrt();
                let a: Vec<f32> = (0..r * in_f)
                    .map(|_| rng.gen_range(-bound..bound))
                    .collect();
                row[t] = Some(Pair {
                    a: Var::from_tensor(&Tensor::from_vec(a, (r, in_f), device)?)?,
                    b: Var::zeros((out_f, r), DType::F32, device)?,
                });
            }
            pairs.push(row);
        }
        Ok(Self::assemble(lora.clone(), base, pairs, seed))
    }

    fn assemble(
        cfg: LoraConfig,
        base: BaseIdentity,
        pairs: Vec<Vec<Option<Pair>>>,
        seed: u64,
    ) -> Self {
        Adapter {
            scale: cfg.scale(),
            cfg,
            base,
            pairs,
            enabled: true,
            seed,
            dropout_step: AtomicU64::new(NO_DROPOUT),
        }
    }

    /// The adapter's tensors as named `Var`s, PEFT keys, layer by layer (A before B).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (l, row) in self.pairs.iter().enumerate() {
            for (t, p) in row.iter().enumerate() {
                if let Some(p) = p {
                    out.push((peft_key(l, t, "A"), p.a.clone()));
                    out.push((peft_key(l, t, "B"), p.b.clone()));
                }
            }
        }
        out
    }

    /// Whether layer `l`'s projection `t` is adapted (and the adapter on).
    pub fn adapts(&self, l: usize, t: Target) -> bool {
        self.enabled && self.pairs.get(l).is_some_and(|r| r[t].is_some())
    }

    /// (A, B, s) of layer `l`'s projection `t` for the one-node [`lora_linear`]: None where
    /// it is not adapted, the adapter is off, or dropout is active (then [`Adapter::delta`]).
    ///
    /// [`lora_linear`]: super::fused::lora_linear
    pub fn fused_parts(&self, l: usize, t: Target) -> Option<(&Tensor, &Tensor, f64)> {
        let dropping =
            self.cfg.dropout > 0.0 && self.dropout_step.load(Ordering::Relaxed) != NO_DROPOUT;
        match self.pairs.get(l).map(|r| &r[t]) {
            Some(Some(p)) if self.enabled && !dropping => {
                Some((p.a.as_tensor(), p.b.as_tensor(), self.scale))
            }
            _ => None,
        }
    }

    /// s·(drop(x)·Aᵀ)·Bᵀ for layer `l`'s projection `t`, x (…, in) → (…, out); None where
    /// the projection is not adapted or the adapter is off.
    pub fn delta(&self, l: usize, t: Target, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.enabled {
            return Ok(None);
        }
        let Some(Some(p)) = self.pairs.get(l).map(|r| &r[t]) else {
            return Ok(None);
        };
        let x = self.dropout(l, t, x)?;
        let h = super::fused::linear(&x, p.a.as_tensor())?;
        let y = super::fused::linear(&h, p.b.as_tensor())?;
        Ok(Some(y.affine(self.scale, 0.0)?))
    }

    /// The inverted-dropout mask on x while a learner step runs, else x itself.
    fn dropout(&self, l: usize, t: Target, x: &Tensor) -> Result<Tensor> {
        let step = self.dropout_step.load(Ordering::Relaxed);
        let p = self.cfg.dropout;
        if p <= 0.0 || step == NO_DROPOUT {
            return Ok(x.clone());
        }
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        rng.set_stream((l * TARGETS.len() + t) as u64);
        let keep = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.gen::<f64>() < p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
        Ok((x * mask)?)
    }

    /// Turns dropout on for the learner's gradient pass of `step` (None: off).
    pub fn set_dropout_step(&self, step: Option<u64>) {
        self.dropout_step
            .store(step.unwrap_or(NO_DROPOUT), Ordering::Relaxed);
    }

    /// An independent copy of A and B (same config, base and switch).
    pub fn deep_clone(&self) -> Result<Self> {
        let mut pairs = Vec::with_capacity(self.pairs.len());
        for row in &self.pairs {
            let mut r = Vec::with_capacity(row.len());
            for p in row {
                r.push(match p {
                    Some(p) => Some(Pair {
                        a: Var::from_tensor(&p.a.as_tensor().detach().copy()?)?,
                        b: Var::from_tensor(&p.b.as_tensor().detach().copy()?)?,
                    }),
                    None => None,
                });
            }
            pairs.push(r);
        }
        let mut a = Self::assemble(self.cfg.clone(), self.base.clone(), pairs, self.seed);
        a.enabled = self.enabled;
        Ok(a)
    }

    /// ΔW = s·B·A of every adapted projection, by base key.
    pub fn deltas(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (l, row) in self.pairs.iter().enumerate() {
            for (t, p) in row.iter().enumerate() {
                if let Some(p) = p {
                    let d = p.b.as_tensor().matmul(p.a.as_tensor())?;
                    out.push((base_key(l, t), d.affine(self.scale, 0.0)?));
                }
            }
        }
        Ok(out)
    }

    /// Writes `adapter_config.json`, `adapter_model.safetensors` and `grove_base.json` into
    /// `dir` (which exists).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        super::io::save_safetensors(&tensors, &dir.join(ADAPTER_WEIGHTS))?;
        let write = |name: &str, v: &serde_json::Value| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, serde_json::to_string_pretty(v)?).map_err(|e| Error::io(&p, e))
        };
        write(
            ADAPTER_CONFIG,
            &peft_config_json(&self.cfg, &self.base.source),
        )?;
        write(BASE_IDENTITY, &serde_json::to_value(&self.base)?)
    }

    /// Overwrites A and B from `tensors` (PEFT keys); every key must be present with its shape.
    pub fn load_values(&self, tensors: &HashMap<String, Tensor>, source: &str) -> Result<()> {
        for (name, var) in self.named_vars() {
            let t = tensors.get(&name).ok_or_else(|| {
                Error::checkpoint(source, format!("missing adapter tensor `{name}`"))
            })?;
            if t.dims() != var.as_tensor().dims() {
                return Err(Error::checkpoint(
                    source,
                    format!(
                        "adapter tensor `{name}` has shape {:?}, expected {:?}",
                        t.dims(),
                        var.as_tensor().dims()
                    ),
                ));
            }
            var.set(
                &t.to_dtype(DType::F32)?
                    .to_device(var.as_tensor().device())?,
            )?;
        }
        let expected = self.named_vars().len();
        if tensors.len() != expected {
            let known: std::collections::HashSet<String> =
                self.named_vars().into_iter().map(|(n, _)| n).collect();
            let extra = tensors.keys().filter(|k| !known.contains(*k)).min();
            return Err(Error::checkpoint(
                source,
                format!(
                    "unexpected adapter tensor `{}` for this adapter's rank and targets",
                    extra.map(String::as_str).unwrap_or("?")
                ),
            ));
        }
        Ok(())
    }
}

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const BASE_IDENTITY: &str = "grove_base.json";

/// The targets, checked against the model: the rank may not exceed any targeted projection's
/// smaller side (B·A could not have that rank).
fn check_fits(lora: &LoraConfig, cfg: &Config) -> Result<Vec<Target>> {
    let targets = lora.targets().map_err(|m| Error::config("model.lora", m))?;
    for &t in &targets {
        let (out_f, in_f) = target_shape(cfg, t);
        if lora.rank > out_f.min(in_f) {
            return Err(Error::config(
                "model.lora",
                format!(
                    "rank {} is larger than the layer {} ({out_f}×{in_f}): the rank must be at \
                     most {}",
                    lora.rank,
                    base_key(0, t).replace("layers.0", "layers.N"),
                    out_f.min(in_f)
                ),
            ));
        }
    }
    Ok(targets)
}

/// PEFT's `adapter_config.json` for `cfg` (the fields `LoraConfig.from_pretrained` reads).
pub fn peft_config_json(cfg: &LoraConfig, base_source: &str) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_source,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "use_rslora": cfg.rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

/// A PEFT adapter folder read from disk: its config, tensors and (from grove) base identity.
pub struct PeftAdapter {
    pub cfg: LoraConfig,
    pub tensors: HashMap<String, Tensor>,
    pub base: Option<BaseIdentity>,
}

/// Reads a PEFT LoRA adapter folder. Features grove does not implement (bias training,
/// per-module ranks, layer subsets, Conv1D's fan_in_fan_out) are errors naming the field.
pub fn read_peft(dir: &Path, device: &Device) -> Result<PeftAdapter> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    if !cfg_path.exists() {
        return Err(Error::checkpoint(
            dir,
            format!("not a PEFT adapter folder: {ADAPTER_CONFIG} is missing"),
        ));
    }
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(&cfg_path, format!("not valid JSON: {e}")))?;
    let cfg = lora_config_from_peft(&v).map_err(|m| Error::checkpoint(&cfg_path, m))?;
    let w = dir.join(ADAPTER_WEIGHTS);
    if !w.exists() {
        return Err(Error::checkpoint(
            dir,
            format!(
                "{ADAPTER_WEIGHTS} is missing (an adapter_model.bin must be converted to \
                 safetensors first)"
            ),
        ));
    }
    let tensors = super::io::load_safetensors(&w, device)?;
    let bp = dir.join(BASE_IDENTITY);
    let base = if bp.exists() {
        let text = std::fs::read_to_string(&bp).map_err(|e| Error::io(&bp, e))?;
        Some(
            serde_json::from_str(&text)
                .map_err(|e| Error::checkpoint(&bp, format!("invalid base identity: {e}")))?,
        )
    } else {
        None
    };
    Ok(PeftAdapter { cfg, tensors, base })
}

/// `[model.lora]` from PEFT's adapter_config.json fields.
fn lora_config_from_peft(v: &serde_json::Value) -> std::result::Result<LoraConfig, String> {
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    if let Some(t) = field("peft_type").and_then(|x| x.as_str()) {
        if t != "LORA" {
            return Err(format!(
                "peft_type is {t:?}; grove reads LORA adapters only"
            ));
        }
    }
    let rank = field("r")
        .and_then(|x| x.as_u64())
        .ok_or("field `r` missing or not a positive integer")? as usize;
    let alpha = field("lora_alpha")
        .and_then(|x| x.as_f64())
        .ok_or("field `lora_alpha` missing or not a number")?;
    let dropout = field("lora_dropout")
        .and_then(|x| x.as_f64())
        .unwrap_or(0.0);
    let rslora = field("use_rslora")
        .and_then(|x| x.as_bool())
        .unwrap_or(false);
    let target_modules: Vec<String> = match field("target_modules") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(String::from))
            .collect::<Option<_>>()
            .ok_or("field `target_modules` must be a list of names")?,
        Some(other) => {
            return Err(format!(
                "target_modules {other} is a pattern; grove reads a list of module names"
            ))
        }
        None => return Err("field `target_modules` is missing".into()),
    };
    type Check = fn(&serde_json::Value) -> bool;
    let unsupported: [(&str, Check); 10] = [
        ("bias", |x: &serde_json::Value| x.as_str() != Some("none")),
        ("fan_in_fan_out", |x: &serde_json::Value| {
            x.as_bool() == Some(true)
        }),
        ("rank_pattern", |x: &serde_json::Value| {
            x.as_object().is_some_and(|o| !o.is_empty())
        }),
        ("alpha_pattern", |x: &serde_json::Value| {
            x.as_object().is_some_and(|o| !o.is_empty())
        }),
        ("layers_to_transform", |_: &serde_json::Value| true),
        ("modules_to_save", |x: &serde_json::Value| {
            x.as_array().is_some_and(|a| !a.is_empty())
        }),
        ("use_dora", |x: &serde_json::Value| {
            x.as_bool() == Some(true)
        }),
        ("lora_bias", |x: &serde_json::Value| {
            x.as_bool() == Some(true)
        }),
        ("trainable_token_indices", |_: &serde_json::Value| true),
        ("target_parameters", |x: &serde_json::Value| {
            x.as_array().is_some_and(|a| !a.is_empty())
        }),
    ];
    for (k, bad) in unsupported {
        if let Some(x) = field(k) {
            if bad(x) {
                return Err(format!("field `{k}` = {x} is not supported by grove"));
            }
        }
    }
    let mut cfg = LoraConfig {
        rank,
        alpha,
        dropout,
        target_modules,
        rslora,
        init_from: None,
        quantized_base: false,
    };
    // PEFT lists targets in any order (it saves a set); grove keeps layer order.
    let targets = cfg.targets()?;
    cfg.target_modules = targets.iter().map(|&t| TARGETS[t].0.to_string()).collect();
    cfg.validate()?;
    Ok(cfg)
}

/// An adapter built from a PEFT folder for a model of shape `cfg` whose base is `base`: the
/// recorded base hash (when the folder has one) must match.
pub fn adapter_from_peft(
    peft: &PeftAdapter,
    dir: &Path,
    cfg: &Config,
    seed: u64,
    base: BaseIdentity,
    device: &Device,
) -> Result<Adapter> {
    if let Some(b) = &peft.base {
        if b.hash != base.hash {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "adapter was trained on base {} (content hash {}), but the base loaded from \
                     {} has content hash {}: load the adapter onto the base it was trained on",
                    b.source, b.hash, base.source, base.hash
                ),
            ));
        }
    }
    let adapter = Adapter::init(&peft.cfg, cfg, seed, base, device)?;
    adapter.load_values(&peft.tensors, &dir.display().to_string())?;
    Ok(adapter)
}

/// The field of `[model.lora]` that differs from the adapter file's, as an error.
pub fn check_same_shape(want: &LoraConfig, file: &LoraConfig, dir: &Path) -> Result<()> {
    let mismatch = |k: &str, a: String, b: String| {
        Err(Error::config(
            "model.lora.init_from",
            format!(
                "{} has {k} = {b} but [model.lora] says {a}: set model.lora.{k} = {b}",
                dir.display()
            ),
        ))
    };
    if want.rank != file.rank {
        return mismatch("rank", want.rank.to_string(), file.rank.to_string());
    }
    if want.alpha != file.alpha {
        return mismatch("alpha", want.alpha.to_string(), file.alpha.to_string());
    }
    if want.rslora != file.rslora {
        return mismatch("rslora", want.rslora.to_string(), file.rslora.to_string());
    }
    let (a, b) = (
        want.targets().unwrap_or_default(),
        file.targets().unwrap_or_default(),
    );
    if a != b {
        return mismatch(
            "target_modules",
            format!("{:?}", want.target_modules),
            format!("{:?}", file.target_modules),
        );
    }
    Ok(())
}

/// `base` with the adapter `[model.lora]` asks for: a fresh one drawn from `seed`, or the PEFT
/// folder `init_from` (whose shape must match the section's). `source` names the base.
pub fn apply(base: Llama, lora: &LoraConfig, seed: u64, source: &str) -> Result<Llama> {
    let Some(dir) = &lora.init_from else {
        return base.with_lora(lora, seed, source);
    };
    let dir = Path::new(dir);
    let peft = read_peft(dir, base.device())?;
    check_same_shape(lora, &peft.cfg, dir)?;
    let mut cfg = peft.cfg.clone();
    cfg.dropout = lora.dropout;
    let peft = PeftAdapter { cfg, ..peft };
    let identity = base.base_identity(source)?;
    let adapter = adapter_from_peft(&peft, dir, &base.cfg, seed, identity, base.device())?;
    base.with_adapter(adapter)
}

/// `base` (loaded from `source`) with the PEFT adapter in `dir`, as the file describes it.
pub fn load_onto(base: Llama, dir: &Path, source: &str) -> Result<Llama> {
    let peft = read_peft(dir, base.device())?;
    let identity = base.base_identity(source)?;
    let adapter = adapter_from_peft(&peft, dir, &base.cfg, 0, identity, base.device())?;
    base.with_adapter(adapter)
}

/// A LoRA checkpoint folder (adapter files, `grove_base.json`, tokenizer): the base loaded
/// from its recorded source, with the adapter on.
pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<(Llama, super::Tokenizer)> {
    let peft = read_peft(dir, device)?;
    let Some(base) = &peft.base else {
        return Err(Error::checkpoint(
            dir,
            format!(
                "a PEFT adapter without {BASE_IDENTITY}: give the base model and --adapter {}",
                dir.display()
            ),
        ));
    };
    if base.source == "builtin" {
        return Err(Error::checkpoint(
            dir,
            "the adapter's base is grove's built-in model, which a LoRA checkpoint does not \
             hold: train with a pretrained model.source to evaluate the adapter elsewhere",
        ));
    }
    let (model, tok) = super::io::load_pretrained(Path::new(&base.source), device)?;
    Ok((load_onto(model, dir, &base.source)?, tok))
}

/// `grove merge`: the base at `base_path` with the adapter in `adapter_dir` merged in, saved
/// as an HF folder at `out`. Returns the merged model's parameter count.
pub fn merge_to_folder(base_path: &Path, adapter_dir: &Path, out: &Path) -> Result<usize> {
    let device = Device::Cpu;
    let (base, tok) = super::io::load_pretrained(base_path, &device)?;
    let m = load_onto(base, adapter_dir, &base_path.display().to_string())?;
    let merged = m.merged()?;
    super::io::save_pretrained(&merged, &tok, out)?;
    Ok(merged.num_params())
}

#[cfg(test)]
#[path = "lora_tests.rs"]
mod tests;
