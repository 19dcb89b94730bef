//! GGUF import for Llama-family models on candle's quantized module.
//!
//! candle (`candle_core::quantized`) reads the metadata (`gguf_file`), holds the tensors in
//! their ggml blocks (`QTensor`, every type it knows, k-quants included), dequantizes them and
//! multiplies by them (`QMatMul`). grove adds what a loader of untrusted files needs on top:
//! [`read_gguf`] first walks the whole header with bounds-checked reads, so that every length,
//! count and offset is checked before candle allocates anything and every error names the file,
//! the byte position and the field; it then maps llama.cpp tensor names and shapes to HF ones
//! (undoing llama.cpp's Q/K row permutation, on the quantized rows directly) and rebuilds an
//! HF `config.json` and `tokenizer.json` from the metadata ([`rebuild`]).
//!
//! Layout reference: ggml `docs/gguf.md` (docs/gguf.md in this repo has the summary).
use std::collections::{BTreeMap, HashSet};

use candle_core::quantized::{ggml_file, gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use thiserror::Error;

pub mod rebuild;
#[cfg(test)]
mod tests;

pub use rebuild::{llama_config_json, special_tokens, tokenizer_json, GgufSpecialTokens};

/// `"GGUF"` read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are rejected (keeps recursion bounded on hostile input).
const MAX_ARRAY_NESTING: usize = 8;
/// The ggml types candle's quantized module holds, as listed in error messages.
pub const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

#[derive(Debug, Error, Clone, PartialEq)]
pub enum GgufError {
    #[error(
        "{file}: not a GGUF file: first bytes are {found:02x?}, expected \"GGUF\" [47, 47, 55, 46]"
    )]
    BadMagic { file: String, found: Vec<u8> },
    #[error("{file}: unsupported GGUF version {version} (supported: 2, 3){hint}")]
    UnsupportedVersion {
        file: String,
        version: u32,
        hint: String,
    },
    #[error(
        "{file}: truncated at byte {offset} while reading {field}: need {needed} bytes, \
         only {available} left (file has {len} bytes)"
    )]
    Truncated {
        file: String,
        offset: usize,
        field: String,
        needed: u64,
        available: usize,
        len: usize,
    },
    #[error("{file}: invalid {field} at byte {offset}: {problem}")]
    Malformed {
        file: String,
        offset: usize,
        field: String,
        problem: String,
    },
    #[error(
        "{file}: data of tensor `{tensor}` is out of range: bytes {start}..{end} but the file \
         has {len} bytes"
    )]
    TensorOutOfRange {
        file: String,
        tensor: String,
        start: u64,
        end: u64,
        len: usize,
    },
    #[error("{file}: unsupported ggml type {dtype} for tensor `{tensor}` (supported: {SUPPORTED_TYPES})")]
    UnsupportedType {
        file: String,
        tensor: String,
        dtype: String,
    },
    #[error("{file}: tensor `{tensor}`: {problem}")]
    BadTensor {
        file: String,
        tensor: String,
        problem: String,
    },
    #[error("{file}: tensor `{tensor}` is missing (needed for {purpose})")]
    MissingTensor {
        file: String,
        tensor: String,
        purpose: String,
    },
    #[error("{file}: metadata key `{key}` is missing")]
    MissingKey { file: String, key: String },
    #[error("{file}: metadata key `{key}` holds {found}, expected {expected}")]
    WrongType {
        file: String,
        key: String,
        expected: String,
        found: String,
    },
    #[error("{file}: unsupported {what} `{found}` (supported: {supported})")]
    Unsupported {
        file: String,
        what: String,
        found: String,
        supported: String,
    },
    #[error("{file}: cannot rebuild tokenizer.json: {problem}")]
    Tokenizer { file: String, problem: String },
    #[error("{file}: candle could not read {what}: {problem}")]
    Candle {
        file: String,
        what: String,
        problem: String,
    },
    #[error("unpermute_qk: {problem}")]
    Permute { problem: String },
}

impl From<GgufError> for crate::error::Error {
    fn from(e: GgufError) -> Self {
        crate::error::Error::Gguf(Box::new(e))
    }
}

/// One metadata value. Arrays hold their items as values of the array's item type.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }

    /// Any non-negative integer value (writers disagree on u32 vs i32 vs u64 for counts).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value as i64 (token types are i32 in llama.cpp files).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Floats as f64; f32 goes through its shortest decimal form so that 1e-5 stored as f32
    /// comes back as 1e-5, not 9.99999974737875e-6. Integers are accepted too.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => v.to_string().parse::<f64>().ok(),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(items) => Some(items),
            _ => None,
        }
    }

    /// A short description for error messages: the type, and the length of arrays.
    fn describe(&self) -> String {
        match self {
            GgufValue::Array(items) => format!("an array of {} items", items.len()),
            other => format!("a {}", other.type_name()),
        }
    }
}

impl From<gguf_file::Value> for GgufValue {
    fn from(v: gguf_file::Value) -> Self {
        use gguf_file::Value as V;
        match v {
            V::U8(x) => GgufValue::U8(x),
            V::I8(x) => GgufValue::I8(x),
            V::U16(x) => GgufValue::U16(x),
            V::I16(x) => GgufValue::I16(x),
            V::U32(x) => GgufValue::U32(x),
            V::I32(x) => GgufValue::I32(x),
            V::U64(x) => GgufValue::U64(x),
            V::I64(x) => GgufValue::I64(x),
            V::F32(x) => GgufValue::F32(x),
            V::F64(x) => GgufValue::F64(x),
            V::Bool(x) => GgufValue::Bool(x),
            V::String(x) => GgufValue::String(x),
            V::Array(items) => GgufValue::Array(items.into_iter().map(Into::into).collect()),
        }
    }
}

/// A ggml tensor type, by its id in GGUF files; only the ids of [`GGML_TYPES`] exist. candle
/// holds the ones with a [`GgmlType::candle`] type; the rest are known so that their sizes can
/// be checked and their names reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(u32);

/// (id, name, elements per block, bytes per block, candle's type), from ggml's `type_traits`.
#[rustfmt::skip]
pub const GGML_TYPES: [(u32, &str, u64, u64, Option<GgmlDType>); 32] = [
    (0, "F32", 1, 4, Some(GgmlDType::F32)), (1, "F16", 1, 2, Some(GgmlDType::F16)),
    (2, "Q4_0", 32, 18, Some(GgmlDType::Q4_0)), (3, "Q4_1", 32, 20, Some(GgmlDType::Q4_1)),
    (6, "Q5_0", 32, 22, Some(GgmlDType::Q5_0)), (7, "Q5_1", 32, 24, Some(GgmlDType::Q5_1)),
    (8, "Q8_0", 32, 34, Some(GgmlDType::Q8_0)), (9, "Q8_1", 32, 36, Some(GgmlDType::Q8_1)),
    (10, "Q2_K", 256, 84, Some(GgmlDType::Q2K)), (11, "Q3_K", 256, 110, Some(GgmlDType::Q3K)),
    (12, "Q4_K", 256, 144, Some(GgmlDType::Q4K)), (13, "Q5_K", 256, 176, Some(GgmlDType::Q5K)),
    (14, "Q6_K", 256, 210, Some(GgmlDType::Q6K)), (15, "Q8_K", 256, 292, Some(GgmlDType::Q8K)),
    (16, "IQ2_XXS", 256, 66, None), (17, "IQ2_XS", 256, 74, None), (18, "IQ3_XXS", 256, 98, None),
    (19, "IQ1_S", 256, 50, None), (20, "IQ4_NL", 32, 18, None), (21, "IQ3_S", 256, 110, None),
    (22, "IQ2_S", 256, 82, None), (23, "IQ4_XS", 256, 136, None), (24, "I8", 1, 1, None),
    (25, "I16", 1, 2, None), (26, "I32", 1, 4, None), (27, "I64", 1, 8, None),
    (28, "F64", 1, 8, None), (29, "IQ1_M", 256, 56, None), (30, "BF16", 1, 2, Some(GgmlDType::BF16)),
    (34, "TQ1_0", 256, 54, None), (35, "TQ2_0", 256, 66, None), (39, "MXFP4", 32, 17, None),
];

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GGML_TYPES.iter().any(|t| t.0 == id).then_some(GgmlType(id))
    }

    fn traits(self) -> (u32, &'static str, u64, u64, Option<GgmlDType>) {
        // Only from_id makes a GgmlType, so the row exists; the fallback is F32's.
        *GGML_TYPES
            .iter()
            .find(|t| t.0 == self.0)
            .unwrap_or(&GGML_TYPES[0])
    }

    pub fn id(self) -> u32 {
        self.0
    }

    pub fn name(self) -> &'static str {
        self.traits().1
    }

    /// Elements per quantization block (1 for plain types).
    pub fn block_elements(self) -> u64 {
        self.traits().2
    }

    /// Bytes per quantization block.
    pub fn block_bytes(self) -> u64 {
        self.traits().3
    }

    /// candle's type, for the types its quantized module holds.
    pub fn candle(self) -> Option<GgmlDType> {
        self.traits().4
    }

    pub fn is_supported(self) -> bool {
        self.candle().is_some()
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One entry of the tensor table. `dims` are in ggml order (fastest-varying first), `offset`
/// is relative to the start of the data section, as stored in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Product of the dims; saturates on overflow, which [`read_gguf`] rejects.
    pub fn n_elements(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .unwrap_or(u64::MAX)
    }

    /// Bytes of tensor data; saturates on overflow, which [`read_gguf`] rejects.
    pub fn n_bytes(&self) -> u64 {
        (self.n_elements() / self.dtype.block_elements()).saturating_mul(self.dtype.block_bytes())
    }
}

/// A parsed GGUF file. Tensor data stays in the caller's byte buffer; `data_offset` is where
/// the data section starts in it.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    /// Path or name of the file, used in every error message.
    pub source: String,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
}

impl GgufFile {
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn missing(&self, key: &str) -> GgufError {
        GgufError::MissingKey {
            file: self.source.clone(),
            key: key.to_string(),
        }
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &GgufValue) -> GgufError {
        GgufError::WrongType {
            file: self.source.clone(),
            key: key.to_string(),
            expected: expected.to_string(),
            found: found.describe(),
        }
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.get(key).ok_or_else(|| self.missing(key))
    }

    /// A required non-negative integer.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// An optional non-negative integer: absent is `None`, present with another type is an error.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.get_u64(key).map(Some),
        }
    }

    /// An optional number (float or integer).
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a number", v)),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    pub fn get_array(&self, key: &str) -> Result<&[GgufValue], GgufError> {
        let v = self.require(key)?;
        v.as_array()
            .ok_or_else(|| self.wrong_type(key, "an array", v))
    }

    /// `general.architecture`, e.g. "llama" or "qwen2"; model keys are prefixed with it.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }

    /// The bytes of a tensor's data inside `bytes` (the whole file).
    pub fn tensor_data<'a>(
        &self,
        bytes: &'a [u8],
        tensor: &GgufTensorInfo,
    ) -> Result<&'a [u8], GgufError> {
        let out_of_range = |start: u64, end: u64| GgufError::TensorOutOfRange {
            file: self.source.clone(),
            tensor: tensor.name.clone(),
            start,
            end,
            len: bytes.len(),
        };
        let start = self.data_offset.saturating_add(tensor.offset);
        let end = start.saturating_add(tensor.n_bytes());
        let (Ok(s), Ok(e)) = (usize::try_from(start), usize::try_from(end)) else {
            return Err(out_of_range(start, end));
        };
        bytes.get(s..e).ok_or_else(|| out_of_range(start, end))
    }
}

fn unsupported_type(file: &str, t: &GgufTensorInfo) -> GgufError {
    GgufError::UnsupportedType {
        file: file.to_string(),
        tensor: t.name.clone(),
        dtype: t.dtype.name().to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// The pre-check: a bounds-checked walk over the header, before candle reads it
// ---------------------------------------------------------------------------------------------

/// A bounds-checked little-endian reader over the file bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn truncated(&self, field: &str, needed: u64) -> GgufError {
        GgufError::Truncated {
            file: self.file.to_string(),
            offset: self.pos,
            field: field.to_string(),
            needed,
            available: self.remaining(),
            len: self.bytes.len(),
        }
    }

    fn malformed(&self, offset: usize, field: &str, problem: String) -> GgufError {
        GgufError::Malformed {
            file: self.file.to_string(),
            offset,
            field: field.to_string(),
            problem,
        }
    }

    fn take(&mut self, n: u64, field: &str) -> Result<&'a [u8], GgufError> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.truncated(field, n))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &str) -> Result<u8, GgufError> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u32(&mut self, field: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn string(&mut self, field: &str) -> Result<String, GgufError> {
        // Strictly UTF-8 (candle would read invalid bytes lossily).
        let len = self.u64(&format!("length of {field}"))?;
        let start = self.pos;
        let raw = self.take(len, field)?;
        String::from_utf8(raw.to_vec())
            .map_err(|e| self.malformed(start, field, format!("not valid UTF-8 ({e})")))
    }

    /// Fails early when `count` items of at least `min_item_bytes` each cannot fit in the
    /// rest of the file, so hostile counts never drive allocations or long loops.
    fn check_count(&self, count: u64, min_item_bytes: u64, field: &str) -> Result<(), GgufError> {
        let needed = count.saturating_mul(min_item_bytes);
        if needed > self.remaining() as u64 {
            return Err(self.truncated(field, needed));
        }
        Ok(())
    }
}

/// Smallest encoded size of one value of a metadata type, or None for unknown type ids.
fn min_value_bytes(type_id: u32) -> Option<u64> {
    match type_id {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        8 => Some(8),
        9 => Some(12),
        10..=12 => Some(8),
        _ => None,
    }
}

fn unknown_value_type(r: &Reader, at: usize, field: &str, type_id: u32) -> GgufError {
    r.malformed(
        at,
        field,
        format!("unknown metadata value type {type_id} (known: 0..=12)"),
    )
}

/// Steps over one metadata value, checking it as candle will read it: known types, bools
/// 0 or 1, UTF-8 strings, array lengths that fit in the file, bounded nesting.
fn skip_value(r: &mut Reader, type_id: u32, field: &str, depth: usize) -> Result<(), GgufError> {
    match type_id {
        7 => {
            let at = r.pos;
            let b = r.u8(field)?;
            if b > 1 {
                return Err(r.malformed(at, field, format!("bool byte is {b}, expected 0 or 1")));
            }
        }
        8 => {
            r.string(field)?;
        }
        9 => {
            let type_pos = r.pos;
            let item_field = format!("array item type of {field}");
            let item_type = r.u32(&item_field)?;
            let min_bytes = min_value_bytes(item_type)
                .ok_or_else(|| unknown_value_type(r, type_pos, &item_field, item_type))?;
            if item_type == 9 && depth >= MAX_ARRAY_NESTING {
                return Err(r.malformed(
                    type_pos,
                    field,
                    format!("arrays nested deeper than {MAX_ARRAY_NESTING} levels"),
                ));
            }
            let count = r.u64(&format!("array length of {field}"))?;
            r.check_count(count, min_bytes, &format!("{count} array items of {field}"))?;
            if matches!(item_type, 0..=6 | 10..=12) {
                r.take(count * min_bytes, field)?; // fixed-size items: one step
            } else {
                for _ in 0..count {
                    skip_value(r, item_type, field, depth + 1)?;
                }
            }
        }
        other => {
            let n = min_value_bytes(other).ok_or_else(|| {
                unknown_value_type(
                    r,
                    r.pos.saturating_sub(4),
                    &format!("type of {field}"),
                    other,
                )
            })?;
            r.take(n, field)?;
        }
    }
    Ok(())
}

fn check_header(r: &mut Reader) -> Result<(u32, u64, u64), GgufError> {
    let magic = r.take(4, "magic").map_err(|_| GgufError::BadMagic {
        file: r.file.to_string(),
        found: r.bytes.iter().take(4).copied().collect(),
    })?;
    if magic != GGUF_MAGIC.to_le_bytes() {
        return Err(GgufError::BadMagic {
            file: r.file.to_string(),
            found: magic.to_vec(),
        });
    }
    let version = r.u32("version")?;
    if version != 2 && version != 3 {
        let hint = match version {
            1 => "; version 1 files use 32-bit lengths and must be re-converted".to_string(),
            v if v.swap_bytes() <= 3 => {
                "; the file looks big-endian, which is not supported".to_string()
            }
            _ => String::new(),
        };
        return Err(GgufError::UnsupportedVersion {
            file: r.file.to_string(),
            version,
            hint,
        });
    }
    let tensor_count = r.u64("tensor_count")?;
    let kv_count = r.u64("metadata_kv_count")?;
    Ok((version, tensor_count, kv_count))
}

/// Walks the metadata; returns the data alignment (`general.alignment`, checked here because
/// candle divides by it).
fn check_metadata(r: &mut Reader, kv_count: u64) -> Result<u64, GgufError> {
    // Each entry is at least a key length (8), a type (4) and a 1-byte value.
    r.check_count(kv_count, 13, &format!("{kv_count} metadata entries"))?;
    let mut keys = HashSet::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..kv_count {
        let key_pos = r.pos;
        let key = r.string(&format!("key of metadata entry #{i}"))?;
        let field = format!("metadata `{key}`");
        let type_id = r.u32(&format!("type of {field}"))?;
        let value_pos = r.pos;
        skip_value(r, type_id, &field, 0)?;
        // candle drops trailing NULs from keys: "k" and "k\0" would collide there.
        if !keys.insert(key.trim_end_matches('\0').to_string()) {
            return Err(r.malformed(key_pos, &field, "duplicate key".to_string()));
        }
        if key == "general.alignment" {
            alignment = alignment_value(&r.bytes[value_pos..r.pos], type_id)
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| {
                    r.malformed(
                        value_pos,
                        &field,
                        "expected a power-of-two u8/u16/u32 or non-negative i8/i16/i32".into(),
                    )
                })?;
        }
    }
    Ok(alignment)
}

/// The integer types candle reads `general.alignment` from (it falls back to 32 on others,
/// so those are refused rather than read differently from candle).
fn alignment_value(raw: &[u8], type_id: u32) -> Option<u64> {
    let le = |n: usize| -> Option<u64> {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(raw.get(..n)?);
        Some(u64::from_le_bytes(b))
    };
    let signed_ok = |v: u64, bits: u32| (v >> (bits - 1)) & 1 == 0;
    match type_id {
        0 => le(1),
        2 => le(2),
        4 => le(4),
        1 => le(1).filter(|&v| signed_ok(v, 8)),
        3 => le(2).filter(|&v| signed_ok(v, 16)),
        5 => le(4).filter(|&v| signed_ok(v, 32)),
        _ => None,
    }
}

fn read_tensor_info(r: &mut Reader, index: u64) -> Result<GgufTensorInfo, GgufError> {
    let name = r.string(&format!("name of tensor #{index}"))?;
    let field = format!("tensor info of `{name}`");
    let dims_pos = r.pos;
    let n_dims = r.u32(&format!("n_dims of {field}"))?;
    if n_dims > MAX_DIMS {
        return Err(r.malformed(
            dims_pos,
            &format!("n_dims of {field}"),
            format!("{n_dims} dimensions, ggml allows at most {MAX_DIMS}"),
        ));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        dims.push(r.u64(&format!("dim {d} of {field}"))?);
    }
    let type_pos = r.pos;
    let type_id = r.u32(&format!("ggml type of {field}"))?;
    let dtype = GgmlType::from_id(type_id).ok_or_else(|| {
        r.malformed(
            type_pos,
            &format!("ggml type of {field}"),
            format!("unknown ggml type id {type_id}"),
        )
    })?;
    if !dtype.is_supported() {
        return Err(GgufError::UnsupportedType {
            file: r.file.to_string(),
            tensor: name,
            dtype: dtype.name().to_string(),
        });
    }
    let offset = r.u64(&format!("data offset of {field}"))?;
    let info = GgufTensorInfo {
        name,
        dims,
        dtype,
        offset,
    };
    check_tensor_shape(&info).map_err(|problem| r.malformed(dims_pos, &field, problem))?;
    Ok(info)
}

/// The dims must not overflow and the rows must be whole quantization blocks (as ggml requires).
fn check_tensor_shape(t: &GgufTensorInfo) -> Result<(), String> {
    let elements = t
        .dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("dims {:?} overflow", t.dims))?;
    let block = t.dtype.block_elements();
    let row = t.dims.first().copied().unwrap_or(1);
    if row % block != 0 {
        return Err(format!(
            "first dim {row} is not a multiple of the {} block size {block}",
            t.dtype
        ));
    }
    (elements / block)
        .checked_mul(t.dtype.block_bytes())
        .ok_or_else(|| format!("byte size of dims {:?} overflows", t.dims))?;
    Ok(())
}

/// Parses a whole GGUF v2/v3 file held in memory. `source` (a path or name) appears in every
/// error. The pre-check walks and checks the header; candle then reads the metadata values.
/// Tensor data is range-checked but not read; see [`hf_qtensor`].
pub fn read_gguf(bytes: &[u8], source: &str) -> Result<GgufFile, GgufError> {
    let mut r = Reader {
        bytes,
        pos: 0,
        file: source,
    };
    let (version, tensor_count, kv_count) = check_header(&mut r)?;
    let alignment = check_metadata(&mut r, kv_count)?;
    // Each tensor info is at least a name length, n_dims, type and offset: 8 + 4 + 4 + 8 bytes.
    r.check_count(tensor_count, 24, &format!("{tensor_count} tensor infos"))?;
    let mut tensors = Vec::with_capacity(tensor_count as usize);
    let mut names = HashSet::new();
    for i in 0..tensor_count {
        let pos = r.pos;
        let info = read_tensor_info(&mut r, i)?;
        if !names.insert(info.name.trim_end_matches('\0').to_string()) {
            return Err(r.malformed(
                pos,
                &format!("tensor #{i}"),
                format!("duplicate tensor name `{}`", info.name),
            ));
        }
        tensors.push(info);
    }
    let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
    let content = gguf_file::Content::read(&mut std::io::Cursor::new(bytes)).map_err(|e| {
        GgufError::Candle {
            file: source.to_string(),
            what: "the metadata".into(),
            problem: e.to_string(),
        }
    })?;
    let metadata: BTreeMap<String, GgufValue> = content
        .metadata
        .into_iter()
        .map(|(k, v)| (k, v.into()))
        .collect();
    let file = GgufFile {
        source: source.to_string(),
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    };
    for t in &file.tensors {
        if t.offset % alignment != 0 {
            return Err(GgufError::BadTensor {
                file: source.to_string(),
                tensor: t.name.clone(),
                problem: format!(
                    "data offset {} is not a multiple of the alignment {alignment}",
                    t.offset
                ),
            });
        }
        file.tensor_data(bytes, t)?;
    }
    Ok(file)
}

// ---------------------------------------------------------------------------------------------
// Tensors: candle QTensors in HF layout
// ---------------------------------------------------------------------------------------------

/// The tensor as a candle `QTensor` in HF layout: shape [`hf_shape`], and for `Some(n_head)`
/// the Q/K rows un-permuted ([`unpermute_qk`] on whole rows of quantized blocks, so the
/// weights never leave their blocks). `bytes` is the whole file `file` was parsed from.
pub fn hf_qtensor(
    file: &GgufFile,
    bytes: &[u8],
    tensor: &GgufTensorInfo,
    qk_heads: Option<usize>,
    device: &Device,
) -> Result<QTensor, GgufError> {
    let bad = |problem: String| GgufError::BadTensor {
        file: file.source.clone(),
        tensor: tensor.name.clone(),
        problem,
    };
    let dtype = tensor
        .dtype
        .candle()
        .ok_or_else(|| unsupported_type(&file.source, tensor))?;
    check_tensor_shape(tensor).map_err(bad)?;
    let data = file.tensor_data(bytes, tensor)?;
    let shape = hf_shape(tensor);
    // A fresh, exactly sized buffer: candle reinterprets it as blocks without a length check.
    let data: Vec<u8> = match qk_heads {
        None => data.to_vec(),
        Some(n_head) => {
            let rows = shape.first().copied().unwrap_or(1).max(1);
            unpermute_qk(data, rows, data.len() / rows, n_head).map_err(|e| bad(e.to_string()))?
        }
    };
    ggml_file::qtensor_from_ggml(dtype, &data, shape, device).map_err(|e| GgufError::Candle {
        file: file.source.clone(),
        what: format!("tensor `{}`", tensor.name),
        problem: e.to_string(),
    })
}

/// The tensor's values as f32 in file order (row-major for [`hf_shape`]), dequantized by
/// candle. `bytes` is the whole file the `file` was parsed from.
pub fn dequantize(
    file: &GgufFile,
    bytes: &[u8],
    tensor: &GgufTensorInfo,
) -> Result<Vec<f32>, GgufError> {
    let candle_err = |e: candle_core::Error| GgufError::Candle {
        file: file.source.clone(),
        what: format!("tensor `{}`", tensor.name),
        problem: e.to_string(),
    };
    hf_qtensor(file, bytes, tensor, None, &Device::Cpu)?
        .dequantize(&Device::Cpu)
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .map_err(candle_err)
}

// ---------------------------------------------------------------------------------------------
// Names, shapes and the Q/K permutation
// ---------------------------------------------------------------------------------------------

/// Row-major shape: ggml dims reversed, so a `[in, out]` ggml matrix becomes HF's `[out, in]`.
pub fn hf_shape(info: &GgufTensorInfo) -> Vec<usize> {
    // GGUF is only read on 64-bit hosts in practice; saturate rather than wrap elsewhere.
    info.dims
        .iter()
        .rev()
        .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
        .collect()
}

/// HF parameter name for a llama.cpp tensor name, or None for tensors HF has no name for
/// (e.g. `rope_freqs.weight`).
pub fn hf_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".to_string()),
        "output_norm.weight" => return Some("model.norm.weight".to_string()),
        "output.weight" => return Some("lm_head.weight".to_string()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf_part = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_part}.{suffix}"))
}

/// Whether llama.cpp permuted the Q/K rows of this architecture when converting from HF
/// (its `LlamaModel` does; Qwen2 keeps HF's layout).
pub fn qk_permuted(file: &GgufFile) -> bool {
    file.architecture().is_ok_and(|a| a == "llama")
}

/// Inverts llama.cpp's `permute` of a Q or K weight (`rows × cols`, row-major; `n_head` is the
/// KV head count for K). The converter does
/// `w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)`, which interleaves the two
/// rotary halves of each head; this puts them back so HF's "rotate half" RoPE applies.
/// Row `h·hd + 2i + t` of the file is HF row `h·hd + t·hd/2 + i` (hd = rows / n_head).
/// Also works on biases with `cols = 1`, and on quantized rows (`T = u8`, `cols` = bytes per row).
pub fn unpermute_qk<T: Copy>(
    data: &[T],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<Vec<T>, GgufError> {
    let fail = |problem: String| Err(GgufError::Permute { problem });
    let pair_rows = n_head.checked_mul(2).filter(|&p| p > 0);
    if !pair_rows.is_some_and(|p| rows.is_multiple_of(p)) {
        return fail(format!(
            "{rows} rows do not split into {n_head} heads of an even size"
        ));
    }
    if rows.checked_mul(cols) != Some(data.len()) {
        return fail(format!(
            "{} values do not form a {rows}×{cols} matrix",
            data.len()
        ));
    }
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = data.to_vec();
    for h in 0..n_head {
        for i in 0..half {
            for t in 0..2 {
                let src = (h * head_dim + 2 * i + t) * cols;
                let dst = (h * head_dim + t * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    Ok(out)
}
