//! `config.json` and `tokenizer.json` rebuilt from GGUF metadata.
use std::collections::HashMap;

use serde_json::{json, Value};

use super::{hf_shape, GgufError, GgufFile, GgufValue};

/// Architectures whose GGUF keys map onto grove's Llama/Qwen2/Qwen3 model, with HF class names.
const ARCHITECTURES: [(&str, &str); 3] = [
    ("llama", "LlamaForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
];

/// An HF `config.json` for the model in `file`, from the `{arch}.*` metadata keys.
pub fn llama_config_json(file: &GgufFile) -> Result<Value, GgufError> {
    let arch = file.architecture()?;
    let Some(&(_, class)) = ARCHITECTURES.iter().find(|a| a.0 == arch) else {
        return Err(GgufError::Unsupported {
            file: file.source.clone(),
            what: "general.architecture".to_string(),
            found: arch.to_string(),
            supported: ARCHITECTURES.map(|a| a.0).join(", "),
        });
    };
    let key = |k: &str| format!("{arch}.{k}");
    let embd = file
        .tensor("token_embd.weight")
        .ok_or_else(|| GgufError::MissingTensor {
            file: file.source.clone(),
            tensor: "token_embd.weight".to_string(),
            purpose: "vocab_size".to_string(),
        })?;
    // The embedding's row count is what the weights need, whatever the vocabulary says.
    let vocab_size = hf_shape(embd).first().copied().unwrap_or(0);
    let heads = file.get_u64(&key("attention.head_count"))?;
    let kv_heads = file
        .opt_u64(&key("attention.head_count_kv"))?
        .unwrap_or(heads);
    let rms_key = key("attention.layer_norm_rms_epsilon");
    let rms_norm_eps = file
        .opt_f64(&rms_key)?
        .ok_or_else(|| file.missing(&rms_key))?;
    let rope_theta = file.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0);
    let mut config = json!({
        "architectures": [class],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": file.get_u64(&key("embedding_length"))?,
        "intermediate_size": file.get_u64(&key("feed_forward_length"))?,
        "num_hidden_layers": file.get_u64(&key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "max_position_embeddings": file.get_u64(&key("context_length"))?,
        "tie_word_embeddings": file.tensor("output.weight").is_none(),
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": file.opt_u64("tokenizer.ggml.bos_token_id")?,
        "eos_token_id": file.opt_u64("tokenizer.ggml.eos_token_id")?,
    });
    if let Some(head_dim) = file.opt_u64(&key("attention.key_length"))? {
        config["head_dim"] = json!(head_dim);
    }
    if arch == "llama" || arch == "qwen3" {
        config["attention_bias"] = json!(file.tensor("blk.0.attn_q.bias").is_some());
    }
    Ok(config)
}

// ---------------------------------------------------------------------------------------------
// tokenizer.json
// ---------------------------------------------------------------------------------------------

/// llama.cpp token types (`llama_token_type`).
const TOKEN_NORMAL: i64 = 1;
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// Pre-tokenizer split patterns of byte-level BPE models, by `tokenizer.ggml.pre`
/// (the regexes of the models' own tokenizer.json files).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The vocabulary as read from `tokenizer.ggml.*`.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i64>,
}

fn tokenizer_error(file: &GgufFile, problem: String) -> GgufError {
    GgufError::Tokenizer {
        file: file.source.clone(),
        problem,
    }
}

fn read_vocab(file: &GgufFile) -> Result<Vocab, GgufError> {
    let key = "tokenizer.ggml.tokens";
    let tokens = file
        .get_array(key)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().map(str::to_string).ok_or_else(|| {
                tokenizer_error(
                    file,
                    format!("`{key}` item {i} is {}, expected a string", v.describe()),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let types = match file.get("tokenizer.ggml.token_type") {
        None => vec![TOKEN_NORMAL; tokens.len()],
        Some(_) => int_array(file, "tokenizer.ggml.token_type", tokens.len())?,
    };
    Ok(Vocab { tokens, types })
}

/// An integer array that must have one item per token.
fn int_array(file: &GgufFile, key: &str, len: usize) -> Result<Vec<i64>, GgufError> {
    let items = file.get_array(key)?;
    if items.len() != len {
        return Err(tokenizer_error(
            file,
            format!(
                "`{key}` has {} items but there are {len} tokens",
                items.len()
            ),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_i64().ok_or_else(|| {
                tokenizer_error(
                    file,
                    format!("`{key}` item {i} is {}, expected an integer", v.describe()),
                )
            })
        })
        .collect()
}

/// A float array that must have one item per token.
fn float_array(file: &GgufFile, key: &str, len: usize) -> Result<Vec<f64>, GgufError> {
    let items = file.get_array(key)?;
    if items.len() != len {
        return Err(tokenizer_error(
            file,
            format!(
                "`{key}` has {} items but there are {len} tokens",
                items.len()
            ),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            // Scores are f32 in llama.cpp files; widen exactly (their order is what matters).
            let x = match v {
                GgufValue::F32(x) => Some(f64::from(*x)),
                other => other.as_f64(),
            };
            x.ok_or_else(|| {
                tokenizer_error(
                    file,
                    format!("`{key}` item {i} is {}, expected a number", v.describe()),
                )
            })
        })
        .collect()
}

/// Unknown, control and user-defined tokens become HF added tokens; the first two are special.
fn added_tokens(vocab: &Vocab) -> Vec<Value> {
    vocab
        .tokens
        .iter()
        .zip(&vocab.types)
        .enumerate()
        .filter(|(_, (_, &ty))| matches!(ty, TOKEN_UNKNOWN | TOKEN_CONTROL | TOKEN_USER_DEFINED))
        .map(|(id, (content, &ty))| {
            let special = ty != TOKEN_USER_DEFINED;
            json!({
                "id": id,
                "content": content,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": !special,
                "special": special,
            })
        })
        .collect()
}

/// token → id, keeping the first id of a duplicated token (HF vocabularies are maps).
fn vocab_map(tokens: &[String]) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    for (id, t) in tokens.iter().enumerate() {
        map.entry(t.clone()).or_insert_with(|| json!(id));
    }
    map
}

fn unknown_token(file: &GgufFile, vocab: &Vocab) -> Result<Option<String>, GgufError> {
    let id = match file.opt_u64("tokenizer.ggml.unknown_token_id")? {
        Some(id) => Some(id),
        None => vocab
            .types
            .iter()
            .position(|&t| t == TOKEN_UNKNOWN)
            .map(|i| i as u64),
    };
    id.map(|id| token_by_id(file, vocab, id, "tokenizer.ggml.unknown_token_id"))
        .transpose()
}

fn token_by_id(file: &GgufFile, vocab: &Vocab, id: u64, key: &str) -> Result<String, GgufError> {
    usize::try_from(id)
        .ok()
        .and_then(|i| vocab.tokens.get(i))
        .cloned()
        .ok_or_else(|| {
            tokenizer_error(
                file,
                format!("`{key}` = {id} but there are {} tokens", vocab.tokens.len()),
            )
        })
}

/// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`): GPT-2, Llama 3, Qwen2, ...
fn gpt2_tokenizer(file: &GgufFile, vocab: &Vocab) -> Result<Value, GgufError> {
    let merges = file
        .get_array("tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let text = v.as_str().ok_or_else(|| {
                tokenizer_error(file, format!("`tokenizer.ggml.merges` item {i} is {}, expected a string", v.describe()))
            })?;
            split_merge(text).ok_or_else(|| {
                tokenizer_error(file, format!("`tokenizer.ggml.merges` item {i} {text:?} is not two tokens separated by a space"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]})
    };
    let (normalizer, pre_tokenizer) = match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" => (Value::Null, split(LLAMA3_PATTERN)),
        "qwen2" => (json!({"type": "NFC"}), split(QWEN2_PATTERN)),
        // GPT-2's own pattern, built into the ByteLevel pre-tokenizer.
        _ => (Value::Null, byte_level(true)),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(vocab),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unknown_token(file, vocab)?,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": pre == "llama3" || pre == "llama-v3" || pre == "llama-bpe",
            "vocab": vocab_map(&vocab.tokens),
            "merges": merges,
        },
    }))
}

/// "a b" → ["a", "b"], splitting at the first space after the first character as llama.cpp
/// does (so a merge whose left token is a space still parses).
fn split_merge(text: &str) -> Option<[String; 2]> {
    let first = text.chars().next()?;
    let at = text[first.len_utf8()..].find(' ')? + first.len_utf8();
    let (left, right) = (&text[..at], &text[at + 1..]);
    if right.is_empty() {
        return None;
    }
    Some([left.to_string(), right.to_string()])
}

/// SentencePiece BPE merges recovered from scores: every way of splitting a token into two
/// tokens is a merge, ranked by the merged token's score (best first), as llama.cpp's SPM
/// tokenizer ranks candidate pairs. Ties keep the order of the parts' ids.
fn spm_merges(tokens: &[String], scores: &[f64], types: &[i64]) -> Vec<[String; 2]> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .rev() // first id wins for duplicates
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut ranked: Vec<(f64, usize, usize)> = Vec::new();
    for ((token, &score), &ty) in tokens.iter().zip(scores).zip(types) {
        // Only normal and user-defined pieces are built by merging characters.
        if ty != TOKEN_NORMAL && ty != TOKEN_USER_DEFINED {
            continue;
        }
        for (at, _) in token.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&token[..at]), ids.get(&token[at..])) {
                ranked.push((score, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked
        .into_iter()
        .map(|(_, l, r)| [tokens[l].clone(), tokens[r].clone()])
        .collect()
}

/// SentencePiece (`tokenizer.ggml.model = "llama"`): Llama 1/2, Mistral, TinyLlama, ...
fn spm_tokenizer(file: &GgufFile, vocab: &Vocab) -> Result<Value, GgufError> {
    let scores = float_array(file, "tokenizer.ggml.scores", vocab.tokens.len())?;
    let add_space_prefix = match file.get("tokenizer.ggml.add_space_prefix") {
        Some(GgufValue::Bool(b)) => *b,
        Some(other) => {
            return Err(file.wrong_type("tokenizer.ggml.add_space_prefix", "a bool", other))
        }
        None => true,
    };
    let replace = |from: &str, to: &str| json!({"type": "Replace", "pattern": {"String": from}, "content": to});
    let mut normalizers = Vec::new();
    let mut decoders = vec![
        replace("▁", " "),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    normalizers.push(replace(" ", "▁"));
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(vocab),
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unknown_token(file, vocab)?,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab_map(&vocab.tokens),
            "merges": spm_merges(&vocab.tokens, &scores, &vocab.types),
        },
    }))
}

/// An HF `tokenizer.json` rebuilt from the `tokenizer.ggml.*` metadata. No post-processor:
/// grove adds BOS/EOS itself.
pub fn tokenizer_json(file: &GgufFile) -> Result<String, GgufError> {
    let model = file.get_str("tokenizer.ggml.model")?;
    let vocab = read_vocab(file)?;
    let value = match model {
        "gpt2" => gpt2_tokenizer(file, &vocab)?,
        "llama" => spm_tokenizer(file, &vocab)?,
        other => {
            return Err(GgufError::Unsupported {
                file: file.source.clone(),
                what: "tokenizer.ggml.model".to_string(),
                found: other.to_string(),
                supported: "gpt2, llama".to_string(),
            })
        }
    };
    serde_json::to_string(&value)
        .map_err(|e| tokenizer_error(file, format!("cannot serialize: {e}")))
}

/// Texts of the special tokens named by `tokenizer.ggml.{bos,eos,padding}_token_id`, in the
/// form grove's `Tokenizer::from_json` takes them.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufSpecialTokens {
    pub bos: Option<String>,
    pub eos: String,
    pub pad: Option<String>,
}

pub fn special_tokens(file: &GgufFile) -> Result<GgufSpecialTokens, GgufError> {
    let vocab = read_vocab(file)?;
    let by_key = |key: &str| -> Result<Option<String>, GgufError> {
        file.opt_u64(key)?
            .map(|id| token_by_id(file, &vocab, id, key))
            .transpose()
    };
    let eos_key = "tokenizer.ggml.eos_token_id";
    Ok(GgufSpecialTokens {
        bos: by_key("tokenizer.ggml.bos_token_id")?,
        eos: by_key(eos_key)?.ok_or_else(|| file.missing(eos_key))?,
        pad: by_key("tokenizer.ggml.padding_token_id")?,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn config_from_synthetic_llama() {
        let embd = raw("token_embd.weight", &[4, 10], 0, vec![0; 160]);
        let b = build(&llama_meta(), &[embd]);
        let f = read_gguf(&b, "syn.gguf").unwrap();
        let c = llama_config_json(&f).unwrap();
        assert_eq!(c["model_type"], "llama");
        assert_eq!(c["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(c["vocab_size"], 10); // rows of token_embd ([4, 10] ggml → [10, 4])
        assert_eq!(c["hidden_size"], 4);
        assert_eq!(c["intermediate_size"], 16);
        assert_eq!(c["num_hidden_layers"], 1);
        assert_eq!(c["num_attention_heads"], 2);
        assert_eq!(c["num_key_value_heads"], 1);
        assert_eq!(c["rms_norm_eps"], 1e-6); // f32 1e-6 shown as its shortest decimal
        assert_eq!(c["rope_theta"], 500000.0);
        assert_eq!(c["max_position_embeddings"], 2048);
        assert_eq!(c["tie_word_embeddings"], true); // no output.weight
        assert_eq!(c["attention_bias"], false);
        assert_eq!(
            (c["bos_token_id"].clone(), c["eos_token_id"].clone()),
            (json!(1), json!(2))
        );
        assert!(c.get("head_dim").is_none());
        assert!(qk_permuted(&f));
    }

    #[test]
    fn config_defaults_and_missing_keys() {
        let embd = raw("token_embd.weight", &[4, 10], 0, vec![0; 160]);
        let out = raw("output.weight", &[4, 10], 0, vec![0; 160]);
        let keep = |skip: &[&str]| -> Vec<(&'static str, GgufValue)> {
            llama_meta()
                .into_iter()
                .filter(|(k, _)| !skip.contains(k))
                .collect()
        };
        let meta = keep(&["llama.rope.freq_base", "llama.attention.head_count_kv"]);
        let b = build(&meta, &[embd, out]);
        let c = llama_config_json(&read_gguf(&b, "d.gguf").unwrap()).unwrap();
        assert_eq!(c["rope_theta"], 10000.0);
        assert_eq!(c["num_key_value_heads"], 2); // defaults to head_count
        assert_eq!(c["tie_word_embeddings"], false);

        let b = build(
            &keep(&["llama.block_count"]),
            &[raw("token_embd.weight", &[4, 10], 0, vec![0; 160])],
        );
        assert_eq!(
            err_text(llama_config_json(&read_gguf(&b, "m.gguf").unwrap())),
            "m.gguf: metadata key `llama.block_count` is missing"
        );
        let b = build(&llama_meta(), &[]);
        assert!(
            err_text(llama_config_json(&read_gguf(&b, "m.gguf").unwrap()))
                .contains("tensor `token_embd.weight` is missing")
        );
        let mut meta = llama_meta();
        meta[0].1 = GgufValue::String("falcon".into());
        let b = build(&meta, &[]);
        assert!(
            err_text(llama_config_json(&read_gguf(&b, "m.gguf").unwrap())).contains(
                "unsupported general.architecture `falcon` (supported: llama, qwen2, qwen3)"
            )
        );
        let mut meta = llama_meta();
        meta[3].1 = GgufValue::String("one".into()); // llama.block_count
        let b = build(
            &meta,
            &[raw("token_embd.weight", &[4, 10], 0, vec![0; 160])],
        );
        assert!(
            err_text(llama_config_json(&read_gguf(&b, "m.gguf").unwrap()))
                .contains("`llama.block_count` holds a string, expected a non-negative integer")
        );
    }

    fn file_with_meta(meta: BTreeMap<String, GgufValue>) -> GgufFile {
        GgufFile {
            source: "mem.gguf".into(),
            version: 3,
            metadata: meta,
            tensors: vec![],
            alignment: 32,
            data_offset: 0,
        }
    }

    fn strings(items: &[&str]) -> GgufValue {
        GgufValue::Array(
            items
                .iter()
                .map(|s| GgufValue::String(s.to_string()))
                .collect(),
        )
    }

    fn load(json: &str) -> tokenizers::Tokenizer {
        tokenizers::Tokenizer::from_bytes(json.as_bytes()).expect("rebuilt tokenizer.json loads")
    }

    #[test]
    fn spm_merges_rank_by_merged_score() {
        // "ab" (score −1) is preferred over "bc" (−2); "abc" can be built as ab+c or a+bc.
        let toks: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0];
        let merges = spm_merges(&toks, &scores, &[1; 6]);
        let pairs: Vec<String> = merges.iter().map(|[l, r]| format!("{l} {r}")).collect();
        assert_eq!(pairs, ["a b", "b c", "a bc", "ab c"]); // abc: (id 0, id 4) before (id 3, id 2)
        assert_eq!(
            split_merge("Ġ t").unwrap(),
            ["Ġ".to_string(), "t".to_string()]
        );
        assert_eq!(
            split_merge("  x").unwrap(),
            [" ".to_string(), "x".to_string()]
        );
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge("a "), None);
    }

    #[test]
    fn tiny_spm_tokenizer_by_hand() {
        // Vocabulary: <unk>, <s>, </s>, byte tokens for 'h' (0x68) and '!' (0x21), ▁, h, i, ▁h, ▁hi.
        let toks = [
            "<unk>", "<s>", "</s>", "<0x68>", "<0x21>", "▁", "h", "i", "▁h", "▁hi",
        ];
        let meta = BTreeMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                GgufValue::String("llama".into()),
            ),
            ("tokenizer.ggml.tokens".to_string(), strings(&toks)),
            (
                "tokenizer.ggml.scores".to_string(),
                GgufValue::Array(
                    [0., 0., 0., 0., 0., -1., -2., -3., -4., -5.]
                        .map(GgufValue::F32)
                        .to_vec(),
                ),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                GgufValue::Array([2, 3, 3, 6, 6, 1, 1, 1, 1, 1].map(GgufValue::I32).to_vec()),
            ),
        ]);
        let f = file_with_meta(meta);
        let tok = load(&tokenizer_json(&f).unwrap());
        // "hi hi!" → "▁hi▁hi!": ▁+h → ▁h, ▁h+i → ▁hi twice; '!' is not a piece → byte <0x21>.
        let enc = tok.encode("hi hi!", false).unwrap();
        assert_eq!(enc.get_ids(), &[9, 9, 4]);
        assert_eq!(tok.decode(&[9, 9, 4], false).unwrap(), "hi hi!");
        // "<s>" is a special added token; decoding with skip drops it.
        assert_eq!(tok.token_to_id("<s>"), Some(1));
        assert_eq!(tok.decode(&[1, 9], true).unwrap(), "hi");
        // 'x' has neither a piece nor a byte token → <unk>.
        assert_eq!(tok.encode("x", false).unwrap().get_ids(), &[5, 0]);
    }

    #[test]
    fn tokenizer_errors_name_the_problem() {
        let base = BTreeMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                GgufValue::String("llama".into()),
            ),
            ("tokenizer.ggml.tokens".to_string(), strings(&["a", "b"])),
        ]);
        assert_eq!(
            err_text(tokenizer_json(&file_with_meta(base.clone()))),
            "mem.gguf: metadata key `tokenizer.ggml.scores` is missing"
        );
        let mut m = base.clone();
        m.insert(
            "tokenizer.ggml.scores".into(),
            GgufValue::Array(vec![GgufValue::F32(0.)]),
        );
        assert!(err_text(tokenizer_json(&file_with_meta(m)))
            .contains("`tokenizer.ggml.scores` has 1 items but there are 2 tokens"));
        let mut m = base.clone();
        m.insert(
            "tokenizer.ggml.model".into(),
            GgufValue::String("bert".into()),
        );
        assert!(err_text(tokenizer_json(&file_with_meta(m)))
            .contains("unsupported tokenizer.ggml.model `bert` (supported: gpt2, llama)"));
        let mut m = base.clone();
        m.insert(
            "tokenizer.ggml.model".into(),
            GgufValue::String("gpt2".into()),
        );
        m.insert("tokenizer.ggml.merges".into(), strings(&["ab"]));
        assert!(err_text(tokenizer_json(&file_with_meta(m)))
            .contains("item 0 \"ab\" is not two tokens"));
        let mut m = base;
        m.insert(
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(vec![GgufValue::U8(1)]),
        );
        assert!(err_text(tokenizer_json(&file_with_meta(m)))
            .contains("item 0 is a u8, expected a string"));
    }

    /// GPT-2's HF tokenizer.json, re-expressed as GGUF metadata the way llama.cpp's converter
    /// writes it, must rebuild into a tokenizer that encodes exactly like the original.
    #[test]
    fn gpt2_tokenizer_rebuilds_like_the_original() {
        let path = data_dir().join("models/gpt2-tiny-random/tokenizer.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let orig: Value = serde_json::from_str(&text).unwrap();
        let vocab = orig["model"]["vocab"].as_object().unwrap();
        let mut tokens = vec![String::new(); vocab.len()];
        for (t, id) in vocab {
            tokens[id.as_u64().unwrap() as usize] = t.clone();
        }
        let types: Vec<GgufValue> = tokens
            .iter()
            .map(|t| GgufValue::I32(if t == "<|endoftext|>" { 3 } else { 1 }))
            .collect();
        let merges: Vec<GgufValue> = orig["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                GgufValue::String(match m {
                    Value::String(s) => s.clone(),
                    other => format!(
                        "{} {}",
                        other[0].as_str().unwrap(),
                        other[1].as_str().unwrap()
                    ),
                })
            })
            .collect();
        let f = file_with_meta(BTreeMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                GgufValue::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                GgufValue::Array(
                    tokens
                        .iter()
                        .map(|t| GgufValue::String(t.clone()))
                        .collect(),
                ),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                GgufValue::Array(types),
            ),
            (
                "tokenizer.ggml.merges".to_string(),
                GgufValue::Array(merges),
            ),
            (
                "tokenizer.ggml.eos_token_id".to_string(),
                GgufValue::U32(50256),
            ),
        ]));
        let rebuilt = load(&tokenizer_json(&f).unwrap());
        let original = load(&text);
        for s in [
            "Hello world",
            "  two  spaces\tand tab\nnewline",
            "naïve café 日本語 🙂",
            "37+48=85<|endoftext|>",
            "It's 'quoted'",
            "",
        ] {
            let a = original.encode(s, false).unwrap();
            let b = rebuilt.encode(s, false).unwrap();
            assert_eq!(a.get_ids(), b.get_ids(), "{s:?}");
            assert_eq!(rebuilt.decode(b.get_ids(), false).unwrap(), s);
        }
        assert_eq!(
            special_tokens(&f).unwrap(),
            GgufSpecialTokens {
                bos: None,
                eos: "<|endoftext|>".into(),
                pad: None
            }
        );
    }

    #[test]
    fn byte_level_pre_tokenizer_follows_tokenizer_ggml_pre() {
        let base = BTreeMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                GgufValue::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                strings(&["1", "2", "3", "12", "123"]),
            ),
            (
                "tokenizer.ggml.merges".to_string(),
                strings(&["1 2", "12 3"]),
            ),
        ]);
        let ids = |pre: Option<&str>| {
            let mut m = base.clone();
            if let Some(p) = pre {
                m.insert("tokenizer.ggml.pre".into(), GgufValue::String(p.into()));
            }
            load(&tokenizer_json(&file_with_meta(m)).unwrap())
                .encode("123", false)
                .unwrap()
                .get_ids()
                .to_vec()
        };
        assert_eq!(ids(None), vec![4]); // GPT-2 regex keeps digit runs together → "123"
        assert_eq!(ids(Some("llama-bpe")), vec![4]); // \p{N}{1,3}
        assert_eq!(ids(Some("qwen2")), vec![0, 1, 2]); // \p{N}: one digit per piece
    }

    /// llama.cpp's SPM tokenizer, written out: escape spaces, prepend ▁, then repeatedly merge
    /// the adjacent pair whose concatenation is the best-scoring token (leftmost on ties);
    /// pieces left outside the vocabulary fall back to <0xXX> byte tokens.
    fn llama_cpp_spm(text: &str, tokens: &[String], scores: &[f64]) -> Vec<u32> {
        let mut ids: HashMap<&str, usize> = HashMap::new();
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.as_str()).or_insert(i);
        }
        let escaped = format!("▁{}", text.replace(' ', "▁"));
        let mut syms: Vec<String> = escaped.chars().map(String::from).collect();
        loop {
            let mut best: Option<(f64, usize)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                if let Some(&id) = ids.get(format!("{}{}", syms[i], syms[i + 1]).as_str()) {
                    if best.is_none_or(|(s, _)| scores[id] > s) {
                        best = Some((scores[id], i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let right = syms.remove(i + 1);
            syms[i].push_str(&right);
        }
        syms.iter()
            .flat_map(|s| match ids.get(s.as_str()) {
                Some(&id) => vec![id as u32],
                None => s
                    .bytes()
                    .map(|b| ids[format!("<0x{b:02X}>").as_str()] as u32)
                    .collect(),
            })
            .collect()
    }

    // ---- the real tiny file ------------------------------------------------------------------
    #[test]
    fn real_tiny_tokenizer_round_trips_and_matches_llama_cpp() {
        let bytes = tiny_bytes();
        let f = read_gguf(&bytes, TINY).unwrap();
        let json = tokenizer_json(&f).unwrap();
        let tok = load(&json);
        assert_eq!(tok.get_vocab_size(true), 32000);
        let tokens: Vec<String> = f
            .get_array("tokenizer.ggml.tokens")
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let scores: Vec<f64> = f
            .get_array("tokenizer.ggml.scores")
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let texts = [
            "Hello world",
            "The quick brown fox jumps over the lazy dog.",
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
            "37+48=85",
            "  two leading spaces and  double  gaps ",
            "tabs\tand\nnewlines\n\n",
            "naïve café, 日本語, emoji 🙂 and Ω≈ç√",
            "unbelievably antidisestablishmentarianism",
            "x",
        ];
        for s in texts {
            let enc = tok.encode(s, false).unwrap();
            assert_eq!(
                enc.get_ids(),
                llama_cpp_spm(s, &tokens, &scores).as_slice(),
                "{s:?}: {:?}",
                enc.get_tokens()
            );
            assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), s, "{s:?}");
        }
        // Hand check: "Hello world" is ▁Hello ▁world in Llama 2.
        let enc = tok.encode("Hello world", false).unwrap();
        assert_eq!(enc.get_tokens(), &["▁Hello", "▁world"]);
        assert_eq!(enc.get_ids(), &[15043, 3186]);
        // The emoji is not a piece: it falls back to its 4 UTF-8 bytes F0 9F 99 82.
        let emoji = tok.encode("🙂", false).unwrap();
        assert_eq!(
            emoji.get_tokens(),
            &["▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
        );
    }
}
