//! Checkpoint IO: safetensors in and out, HF model folders (single file or sharded), GGUF
//! files, and whole pretrained policies (weights, config and tokenizer) in and out.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::gguf;
use crate::model::llama::{Config, Llama};
use crate::model::Tokenizer;

/// Reads every tensor of a safetensors file. A truncated or corrupt file is an error naming it.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::checkpoint(path, "file does not exist"));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::checkpoint(
            path,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device)
            .map_err(|e| Error::checkpoint(path, format!("tensor `{name}`: {e}")))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Writes tensors to `path` (callers make the enclosing directory atomic).
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| Error::checkpoint(path, format!("cannot write: {e}")))
}

/// Loads an HF model folder: `config.json` plus `model.safetensors` or the shards listed in
/// `model.safetensors.index.json`.
pub fn load_hf_folder(dir: &Path, device: &Device) -> Result<Llama> {
    let cfg = Config::from_file(&dir.join("config.json"))?;
    let index = dir.join("model.safetensors.index.json");
    let mut tensors = HashMap::new();
    let files: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let shards = super::hub::listed_shards(&text, &index.display().to_string())?;
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    for f in &files {
        tensors.extend(load_safetensors(f, device)?);
    }
    Llama::from_tensors(&cfg, tensors, device, &dir.display().to_string())
}

/// Saves a model as an HF folder: config.json and model.safetensors.
pub fn save_hf_folder(model: &Llama, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = serde_json::to_string_pretty(&model.cfg)?;
    let p = dir.join("config.json");
    std::fs::write(&p, cfg).map_err(|e| Error::io(&p, e))?;
    save_safetensors(&model.named_tensors(), &dir.join("model.safetensors"))
}

// ---------------------------------------------------------------------------------------------
// Pretrained models: HF folders and GGUF files, with their tokenizers
// ---------------------------------------------------------------------------------------------

/// Whether `path` is a file that starts with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && u32::from_le_bytes(magic) == gguf::GGUF_MAGIC
}

/// Loads a model and its tokenizer from an HF folder (`config.json`, safetensors,
/// `tokenizer.json`, optional `tokenizer_config.json`), a grove checkpoint directory (same
/// files) or a GGUF file.
/// `path` may also name a Hugging Face Hub repository (`hf://ORG/NAME`, see [`super::hub`]).
pub fn load_pretrained(path: &Path, device: &Device) -> Result<(Llama, Tokenizer)> {
    let resolved = super::hub::resolve_path(path)?;
    let path = resolved.as_path();
    if is_gguf(path) {
        return load_gguf(path, device);
    }
    if path.is_dir() {
        if path.join(super::lora::ADAPTER_CONFIG).exists()
            && !path.join("model.safetensors").exists()
        {
            // A LoRA run's checkpoint: its base (by the recorded source) with the adapter.
            return super::lora::load_checkpoint(path, device);
        }
        let model = load_hf_folder(path, device)?;
        let tok = load_hf_tokenizer(path, &model.cfg)?;
        if tok.vocab_size() > model.cfg.vocab_size {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tokenizer.json has {} tokens but the model's vocab_size is {}",
                    tok.vocab_size(),
                    model.cfg.vocab_size
                ),
            ));
        }
        return Ok((model, tok));
    }
    let what = if path.exists() {
        "is neither a model folder nor a GGUF file"
    } else {
        "does not exist"
    };
    Err(Error::checkpoint(
        path,
        format!(
            "{what}: expected an HF model folder (config.json, model.safetensors, tokenizer.json), \
             a grove checkpoint directory or a .gguf file"
        ),
    ))
}

/// The model shape of an HF folder, a `config.json` file or a GGUF file, without the weights.
pub fn load_config(path: &Path) -> Result<Config> {
    let resolved = super::hub::resolve_path(path)?;
    let path = resolved.as_path();
    if is_gguf(path) {
        let (file, src) = read_gguf_file(path)?;
        let json = gguf::llama_config_json(&file)?;
        return Config::from_json(&json.to_string(), &src);
    }
    if path.is_dir() {
        return Config::from_file(&path.join("config.json"));
    }
    Config::from_file(path)
}

/// The tokenizer alone of an HF folder, grove checkpoint, GGUF file or Hub reference, as
/// [`load_pretrained`] would return it.
pub fn load_pretrained_tokenizer(path: &Path) -> Result<Tokenizer> {
    let resolved = super::hub::resolve_path(path)?;
    let path = resolved.as_path();
    if is_gguf(path) {
        let (file, src) = read_gguf_file(path)?;
        return gguf_tokenizer(&file, &src);
    }
    if path.is_dir() {
        let cfg = Config::from_file(&path.join("config.json"))?;
        return load_hf_tokenizer(path, &cfg);
    }
    // The same error as load_pretrained for anything else.
    load_pretrained(path, &Device::Cpu).map(|(_, t)| t)
}

/// A GGUF file's metadata and tensor table, with the path as errors name it (the bytes are
/// dropped: for config and tokenizer only).
fn read_gguf_file(path: &Path) -> Result<(gguf::GgufFile, String)> {
    let src = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let file = gguf::read_gguf(&bytes, &src)?;
    Ok((file, src))
}

/// Loads a Llama-family GGUF file for training: tensors dequantized by candle to trainable
/// f32 (see [`load_gguf_quantized`] for the rest).
pub fn load_gguf(path: &Path, device: &Device) -> Result<(Llama, Tokenizer)> {
    let (cfg, qtensors, tok) = load_gguf_quantized(path, device)?;
    let mut tensors = HashMap::new();
    for (name, q) in qtensors {
        tensors.insert(name, q.dequantize(device)?);
    }
    let model = Llama::from_tensors(&cfg, tensors, device, &path.display().to_string())?;
    Ok((model, tok))
}

/// A GGUF file as the frozen base of a LoRA run (`model.lora.quantized_base`): projections kept
/// in their ggml blocks, the rest f32.
pub fn load_gguf_frozen(path: &Path, device: &Device) -> Result<Llama> {
    if !is_gguf(path) {
        return Err(Error::config(
            "model.lora.quantized_base",
            format!(
                "needs a GGUF model.source, but {} is not a GGUF file",
                path.display()
            ),
        ));
    }
    let (cfg, qtensors, _) = load_gguf_quantized(path, device)?;
    Llama::frozen_quantized(&cfg, qtensors, device, &path.display().to_string())
}

/// A Llama-family GGUF file as candle `QTensor`s (still in their ggml blocks) under their HF
/// names, Q/K rows un-permuted for `llama` files; `config.json` and `tokenizer.json` rebuilt
/// from the metadata, BOS prepended when `tokenizer.ggml.add_bos_token` says so (default: yes
/// for SentencePiece vocabularies, no for byte-level BPE), and the `tokenizer.chat_template`.
pub fn load_gguf_quantized(
    path: &Path,
    device: &Device,
) -> Result<(Config, HashMap<String, QTensor>, Tokenizer)> {
    // The bytes stay alive here: tensors are copied out of them.
    let src = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let file = gguf::read_gguf(&bytes, &src)?;
    let cfg = Config::from_json(&gguf::llama_config_json(&file)?.to_string(), &src)?;
    let permuted = gguf::qk_permuted(&file);
    let mut tensors = HashMap::new();
    for info in &file.tensors {
        let name = gguf::hf_name(&info.name).ok_or_else(|| {
            Error::checkpoint(
                path,
                format!(
                    "tensor `{}` has no counterpart in grove's Llama/Qwen2 model \
                     (rope scaling tables and other architectures are not supported)",
                    info.name
                ),
            )
        })?;
        let heads = if name.contains(".self_attn.q_proj.") {
            Some(cfg.num_attention_heads)
        } else if name.contains(".self_attn.k_proj.") {
            Some(cfg.num_kv_heads())
        } else {
            None
        };
        let qk_heads = heads.filter(|_| permuted);
        tensors.insert(
            name,
            gguf::hf_qtensor(&file, &bytes, info, qk_heads, device)?,
        );
    }
    drop(bytes);
    let tok = gguf_tokenizer(&file, &src)?;
    Ok((cfg, tensors, tok))
}

fn gguf_tokenizer(file: &gguf::GgufFile, src: &str) -> Result<Tokenizer> {
    let json = gguf::tokenizer_json(file)?;
    let sp = gguf::special_tokens(file)?;
    let mut tok = Tokenizer::from_json(json, src, sp.bos.as_deref(), &sp.eos, sp.pad.as_deref())?;
    let spm = file.get_str("tokenizer.ggml.model")? == "llama";
    let add_bos = match file.get("tokenizer.ggml.add_bos_token") {
        None => spm,
        Some(gguf::GgufValue::Bool(b)) => *b,
        Some(other) => {
            return Err(Error::checkpoint(
                src,
                format!(
                    "metadata `tokenizer.ggml.add_bos_token` should be a bool, found {}",
                    other.type_name()
                ),
            ))
        }
    };
    if !add_bos {
        tok.bos = None;
    }
    tok.chat_template = file
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .map(String::from);
    Ok(tok)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::checkpoint(path, format!("not valid JSON: {e}")))
}

/// A special token of `tokenizer_config.json`: a string or an `AddedToken` object.
fn config_token(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// A token id of `config.json` / `generation_config.json`: an integer or a list (first wins).
fn config_id(v: Option<&serde_json::Value>) -> Option<u32> {
    match v? {
        serde_json::Value::Array(a) => a.first()?.as_u64(),
        other => other.as_u64(),
    }
    .and_then(|id| u32::try_from(id).ok())
}

/// The tokenizer of an HF folder or grove checkpoint. Special tokens come from
/// `tokenizer_config.json` (`eos_token`, `bos_token`, `pad_token`, `add_bos_token`,
/// `chat_template`), then `config.json` / `generation_config.json` ids, then the usual names
/// (`<eos>`, `</s>`, `<|endoftext|>`; grove's built-in vocabulary uses `<bos>`/`<eos>`/`<pad>`).
/// BOS is prepended to prompts when `add_bos_token` says so or when the tokenizer's own
/// post-processor would add it.
pub fn load_hf_tokenizer(dir: &Path, cfg: &Config) -> Result<Tokenizer> {
    let tj = dir.join("tokenizer.json");
    if !tj.is_file() {
        return Err(Error::checkpoint(
            dir,
            "no tokenizer.json (grove reads the HF fast-tokenizer file)",
        ));
    }
    let src = tj.display().to_string();
    let json = std::fs::read_to_string(&tj).map_err(|e| Error::io(&tj, e))?;
    let inner = super::tokenizer::parse(&json, &src)?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.is_file() {
        Some(read_json(&tc_path)?)
    } else {
        None
    };
    let gen_path = dir.join("generation_config.json");
    let gen = if gen_path.is_file() {
        Some(read_json(&gen_path)?)
    } else {
        None
    };
    let by_text = |key: &str| -> Result<Option<u32>> {
        let Some(text) = tc.as_ref().and_then(|c| config_token(c, key)) else {
            return Ok(None);
        };
        inner.token_to_id(&text).map(Some).ok_or_else(|| {
            Error::checkpoint(
                &tc_path,
                format!("`{key}` {text:?} is not in the vocabulary of {src}"),
            )
        })
    };
    let by_name = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
    let eos = match by_text("eos_token")? {
        Some(id) => id,
        None => config_id(cfg.eos_token_id.as_ref())
            .or_else(|| config_id(gen.as_ref().and_then(|g| g.get("eos_token_id"))))
            .or_else(|| by_name(&["<eos>", "</s>", "<|endoftext|>", "<|im_end|>"]))
            .ok_or_else(|| {
                Error::checkpoint(
                    dir,
                    "cannot tell the EOS token: no `eos_token` in tokenizer_config.json, no \
                     `eos_token_id` in config.json or generation_config.json, and none of \
                     <eos>, </s>, <|endoftext|> in tokenizer.json",
                )
            })?,
    };
    let bos_id = match by_text("bos_token")? {
        Some(id) => Some(id),
        None => config_id(cfg.bos_token_id.as_ref())
            .or_else(|| config_id(gen.as_ref().and_then(|g| g.get("bos_token_id"))))
            .or_else(|| by_name(&["<bos>", "<s>"])),
    };
    // What the tokenizer's post-processor puts in front of a text, if anything.
    let post_bos = match (inner.encode("a", true), inner.encode("a", false)) {
        (Ok(with), Ok(without)) if with.get_ids().len() > without.get_ids().len() => {
            with.get_ids().first().copied()
        }
        _ => None,
    };
    let add_bos = match tc.as_ref().and_then(|c| c.get("add_bos_token")) {
        Some(serde_json::Value::Bool(b)) => *b,
        _ => {
            post_bos.is_some()
                || (tc.is_none() && inner.token_to_id("<bos>") == bos_id && bos_id.is_some())
        }
    };
    let prepend = if add_bos { post_bos.or(bos_id) } else { None };
    let pad = match by_text("pad_token")? {
        Some(id) => Some(id),
        None => config_id(cfg_pad(dir)?.as_ref()).or_else(|| by_name(&["<pad>"])),
    };
    let mut tok = Tokenizer::from_parsed(inner, json, &src, prepend, eos, pad)?;
    tok.bos_token = bos_id.and_then(|b| tok.id_to_token(b));
    tok.chat_template = match &tc {
        Some(c) => crate::model::chat::template_from_config(c, &tc_path.display().to_string())?,
        None => None,
    };
    if tok.chat_template.is_none() {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            tok.chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
    }
    Ok(tok)
}

/// `pad_token_id` of config.json, which `Config` does not keep.
fn cfg_pad(dir: &Path) -> Result<Option<serde_json::Value>> {
    let p = dir.join("config.json");
    Ok(read_json(&p)?.get("pad_token_id").cloned())
}

fn hf_architecture(cfg: &Config) -> (&'static str, &'static str) {
    match cfg.model_type.as_deref() {
        Some("qwen2") => ("qwen2", "Qwen2ForCausalLM"),
        Some("qwen3") => ("qwen3", "Qwen3ForCausalLM"),
        _ => ("llama", "LlamaForCausalLM"),
    }
}

/// Saves a policy as an HF folder that grove and `transformers` both load: `config.json`
/// (explicit values, no nulls), `model.safetensors` (f32; with tied embeddings only the
/// embedding, as HF does), `tokenizer.json`, `tokenizer_config.json` (special tokens,
/// `add_bos_token`, the chat template when known) and `generation_config.json`. When grove
/// prepends a BOS that the tokenizer's own post-processor would not add, the saved
/// tokenizer.json gets a `TemplateProcessing` post-processor so that `transformers` encodes
/// prompts the same way.
/// A model with a LoRA adapter is saved merged (W + s·B·A).
pub fn save_pretrained(model: &Llama, tok: &Tokenizer, dir: &Path) -> Result<()> {
    let merged;
    let model = if model.adapter().is_some() {
        merged = model.merged()?;
        &merged
    } else {
        model
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = &model.cfg;
    let (model_type, class) = hf_architecture(cfg);
    let mut v = serde_json::to_value(cfg)?;
    if let Some(obj) = v.as_object_mut() {
        obj.retain(|_, x| !x.is_null());
        let mut set = |k: &str, x: serde_json::Value| {
            obj.insert(k.to_string(), x);
        };
        set("model_type", model_type.into());
        set("architectures", serde_json::json!([class]));
        set("num_key_value_heads", cfg.num_kv_heads().into());
        set("head_dim", cfg.head_dim().into());
        set("rms_norm_eps", cfg.rms_eps().into());
        set("rope_theta", cfg.rope_theta().into());
        set("max_position_embeddings", cfg.max_positions().into());
        set("tie_word_embeddings", cfg.tied().into());
        set("hidden_act", "silu".into());
        set("torch_dtype", "float32".into());
        if model_type == "llama" || model_type == "qwen3" {
            set("attention_bias", cfg.qkv_bias().into());
        }
        if model_type == "llama" {
            set("mlp_bias", false.into());
        }
        let bos_id = tok
            .bos
            .or_else(|| tok.bos_token.as_deref().and_then(|b| tok.token_to_id(b)));
        set("bos_token_id", bos_id.into());
        set("eos_token_id", tok.eos.into());
        set("pad_token_id", tok.pad.into());
    }
    let write = |name: &str, text: &str| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    write("config.json", &serde_json::to_string_pretty(&v)?)?;

    let tensors = model.named_tensors();
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let st_path = dir.join("model.safetensors");
    safetensors::serialize_to_file(tensors.iter(), Some(metadata), &st_path)
        .map_err(|e| Error::checkpoint(&st_path, format!("cannot write: {e}")))?;

    write("tokenizer.json", &tokenizer_json_for_hf(tok)?)?;
    let tc = tokenizer_config_json(tok, cfg.max_positions());
    write("tokenizer_config.json", &serde_json::to_string_pretty(&tc)?)?;
    let gen = serde_json::json!({
        "bos_token_id": v.get("bos_token_id"),
        "eos_token_id": tok.eos,
        "pad_token_id": tok.pad,
    });
    write(
        "generation_config.json",
        &serde_json::to_string_pretty(&gen)?,
    )?;
    Ok(())
}

/// A `tokenizer_config.json` for `tok`: special tokens, `add_bos_token` and the chat template
/// when known, which [`load_hf_tokenizer`] reads back to the same prompts.
pub fn tokenizer_config_json(tok: &Tokenizer, max_positions: usize) -> serde_json::Value {
    let text = |id: u32| tok.id_to_token(id);
    let mut tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tok.bos.is_some(),
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": max_positions,
        "eos_token": text(tok.eos),
        "pad_token": text(tok.pad),
    });
    let bos_text = tok.bos.and_then(text).or_else(|| tok.bos_token.clone());
    tc["bos_token"] = bos_text.into();
    if let Some(t) = &tok.chat_template {
        tc["chat_template"] = t.clone().into();
    }
    tc
}

/// The tokenizer.json to save: unchanged, unless grove prepends a BOS that its post-processor
/// does not add; then a `TemplateProcessing` step adding it is appended.
fn tokenizer_json_for_hf(tok: &Tokenizer) -> Result<String> {
    let Some(bos) = tok.bos else {
        return Ok(tok.to_json().to_string());
    };
    let parsed = super::tokenizer::parse(tok.to_json(), "tokenizer")?;
    let adds_bos = parsed
        .encode("a", true)
        .ok()
        .is_some_and(|e| e.get_ids().first() == Some(&bos) && e.get_ids().len() > 1);
    if adds_bos {
        return Ok(tok.to_json().to_string());
    }
    let bos_text = tok
        .id_to_token(bos)
        .ok_or_else(|| Error::Tokenizer(format!("bos id {bos} is not in the vocabulary")))?;
    let template = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos_text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}
        ],
        "special_tokens": {bos_text.clone(): {"id": bos_text, "ids": [bos], "tokens": [bos_text]}}
    });
    let mut doc: serde_json::Value = serde_json::from_str(tok.to_json())?;
    let post = match doc.get("post_processor") {
        None | Some(serde_json::Value::Null) => template,
        Some(existing) => {
            serde_json::json!({"type": "Sequence", "processors": [existing.clone(), template]})
        }
    };
    doc["post_processor"] = post;
    Ok(serde_json::to_string(&doc)?)
}
