//! Tokenizers through the HF `tokenizers` crate. The built-in task's character vocabulary is
//! itself a `tokenizer.json` built in code, so every model goes through the same interface.
use std::path::Path;

use crate::error::{Error, Result};

/// Characters of the built-in arithmetic vocabulary, after the special tokens.
pub const BUILTIN_CHARS: &str = "0123456789+-*= ";
pub const BUILTIN_SPECIALS: [&str; 4] = ["<pad>", "<bos>", "<eos>", "<unk>"];
/// Characters the built-in model gets besides [`BUILTIN_CHARS`] when it plays an environment
/// (plain-text transcripts); the arithmetic vocabulary and its ids stay as they are.
pub const BUILTIN_TEXT_CHARS: &str = "abcdefghijklmnopqrstuvwxyz.,:;?!()/<>_\n";
/// Characters the built-in model gets besides [`BUILTIN_TEXT_CHARS`] in environments that
/// offer tools: what a `<tool_call>{"name": ...}</tool_call>` needs (JSON).
pub const BUILTIN_TOOL_CHARS: &str = "{}\"";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    json: String,
    /// Prepended to every prompt (None: the model's tokenizer adds no BOS).
    pub bos: Option<u32>,
    pub eos: u32,
    pub pad: u32,
    /// Text of the BOS token for chat templates (`bos_token`), also when none is prepended.
    pub bos_token: Option<String>,
    /// Jinja chat template of the model (`tokenizer_config.json` or GGUF metadata).
    pub chat_template: Option<String>,
}

impl Tokenizer {
    /// Loads a `tokenizer.json`; special tokens are looked up by name and must exist.
    pub fn from_json(
        json: String,
        source: &str,
        bos: Option<&str>,
        eos: &str,
        pad: Option<&str>,
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| Error::Tokenizer(format!("{source}: not a valid tokenizer.json: {e}")))?;
        let id = |tok: &str| {
            inner.token_to_id(tok).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{source}: special token `{tok}` is not in the vocabulary"
                ))
            })
        };
        let eos_id = id(eos)?;
        let bos_id = bos.map(id).transpose()?;
        let pad_id = match pad {
            Some(p) => id(p)?,
            None => eos_id,
        };
        Ok(Tokenizer {
            inner,
            json,
            bos: bos_id,
            eos: eos_id,
            pad: pad_id,
            bos_token: bos.map(String::from),
            chat_template: None,
        })
    }

    /// Loads a `tokenizer.json` with special tokens given by id; ids must be in the vocabulary.
    pub fn from_json_ids(
        json: String,
        source: &str,
        bos: Option<u32>,
        eos: u32,
        pad: Option<u32>,
    ) -> Result<Self> {
        let inner = parse(&json, source)?;
        Self::from_parsed(inner, json, source, bos, eos, pad)
    }

    /// As [`Tokenizer::from_json_ids`], for a `tokenizer.json` already parsed by the caller.
    pub(crate) fn from_parsed(
        inner: tokenizers::Tokenizer,
        json: String,
        source: &str,
        bos: Option<u32>,
        eos: u32,
        pad: Option<u32>,
    ) -> Result<Self> {
        let check = |what: &str, id: u32| {
            inner.id_to_token(id).map(|_| id).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{source}: {what} token id {id} is not in the vocabulary of {} tokens",
                    inner.get_vocab_size(true)
                ))
            })
        };
        let eos = check("eos", eos)?;
        let bos = bos.map(|b| check("bos", b)).transpose()?;
        let pad = pad.map(|p| check("pad", p)).transpose()?.unwrap_or(eos);
        let bos_token = bos.and_then(|b| inner.id_to_token(b));
        Ok(Tokenizer {
            inner,
            json,
            bos,
            eos,
            pad,
            bos_token,
            chat_template: None,
        })
    }

    /// The token text of an id, special tokens included.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token text, special tokens included.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn from_file(path: &Path, bos: Option<&str>, eos: &str, pad: Option<&str>) -> Result<Self> {
        let json = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(json, &path.display().to_string(), bos, eos, pad)
    }

    /// The character-level vocabulary of the built-in arithmetic task.
    pub fn builtin_arithmetic() -> Self {
        Self::builtin_with(builtin_tokenizer_json())
    }

    /// The built-in vocabulary plus lower-case text ([`BUILTIN_TEXT_CHARS`]), for
    /// environments.
    pub fn builtin_text() -> Self {
        Self::builtin_with(builtin_tokenizer_json_with(BUILTIN_TEXT_CHARS))
    }

    /// [`Self::builtin_text`] plus the JSON characters of tool calls ([`BUILTIN_TOOL_CHARS`]),
    /// for environments that offer tools; the text ids stay as they are.
    pub fn builtin_tool_text() -> Self {
        Self::builtin_with(builtin_tokenizer_json_with(&format!(
            "{BUILTIN_TEXT_CHARS}{BUILTIN_TOOL_CHARS}"
        )))
    }

    fn builtin_with(json: String) -> Self {
        // The JSON is generated here and covered by tests; failure would be a programming error.
        Self::from_json(
            json,
            "built-in tokenizer",
            Some("<bos>"),
            "<eos>",
            Some("<pad>"),
        )
        .expect("built-in tokenizer.json is valid")
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("encode {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `[BOS] text`: the text's ids after the BOS id when the tokenizer has one (how every
    /// prompt is fed to a model).
    pub fn encode_with_bos(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() + 1);
        ids.extend(self.bos);
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Text of `ids`, special tokens dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    /// The tokenizer.json text, saved next to checkpoints.
    pub fn to_json(&self) -> &str {
        &self.json
    }
}

/// Parses a `tokenizer.json`; errors name `source`.
pub(crate) fn parse(json: &str, source: &str) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_bytes(json.as_bytes())
        .map_err(|e| Error::Tokenizer(format!("{source}: not a valid tokenizer.json: {e}")))
}

/// HF `tokenizer.json` for the built-in vocabulary: WordLevel over single characters.
pub fn builtin_tokenizer_json() -> String {
    builtin_tokenizer_json_with("")
}

/// The built-in `tokenizer.json` with `extra` characters after the arithmetic ones.
pub fn builtin_tokenizer_json_with(extra: &str) -> String {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, s) in BUILTIN_SPECIALS.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
        added.push(serde_json::json!({
            "id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true
        }));
    }
    for (i, c) in BUILTIN_CHARS.chars().chain(extra.chars()).enumerate() {
        vocab.insert(c.to_string(), (BUILTIN_SPECIALS.len() + i).into());
    }
    let doc = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    serde_json::to_string_pretty(&doc).expect("json serialisation of a literal")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_text_extends_the_arithmetic_ids() {
        let a = Tokenizer::builtin_arithmetic();
        let t = Tokenizer::builtin_text();
        assert_eq!(
            t.vocab_size(),
            a.vocab_size() + BUILTIN_TEXT_CHARS.chars().count()
        );
        assert_eq!(t.encode("37+48=85").unwrap(), a.encode("37+48=85").unwrap());
        let text = "guess my number from 1 to 16. reply with a number.\nhigher\n";
        let ids = t.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        assert_eq!(t.decode(&ids).unwrap(), text);
        // Tool environments: the same ids plus `{`, `}` and `"`, one token each.
        let j = Tokenizer::builtin_tool_text();
        assert_eq!(j.vocab_size(), t.vocab_size() + 3);
        assert_eq!(j.encode(text).unwrap(), ids);
        let call =
            r#"<tool_call>{"arguments":{"expression":"12 * 34"},"name":"calculator"}</tool_call>"#;
        let ids = j.encode(call).unwrap();
        assert_eq!(ids.len(), call.len());
        assert!(!ids.contains(&j.token_to_id("<unk>").unwrap()));
        assert_eq!(j.decode(&ids).unwrap(), call);
    }

    #[test]
    fn builtin_round_trip() {
        let t = Tokenizer::builtin_arithmetic();
        assert_eq!(t.vocab_size(), 4 + BUILTIN_CHARS.len());
        let ids = t.encode("37+48=85").unwrap();
        // '3' is the 4th digit: 4 specials + 3 = 7
        assert_eq!(ids[0], 7);
        assert_eq!(ids.len(), 8);
        assert_eq!(t.decode(&ids).unwrap(), "37+48=85");
        let mut with_eos = ids.clone();
        with_eos.push(t.eos);
        assert_eq!(t.decode(&with_eos).unwrap(), "37+48=85");
    }

    #[test]
    fn unknown_special_is_an_error() {
        let err = Tokenizer::from_json(builtin_tokenizer_json(), "x.json", None, "</s>", None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("`</s>`"), "{err}");
    }
}
