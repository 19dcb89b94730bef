//! GGUF import for Llama-family models, in pure Rust: parses the header, metadata and tensor
//! table of a GGUF v2/v3 file, dequantizes F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors to f32, maps
//! llama.cpp tensor names and shapes to HF ones (undoing llama.cpp's Q/K row permutation), and
//! rebuilds an HF `config.json` and `tokenizer.json` from the metadata.
//!
//! Layout reference: ggml `docs/gguf.md`. Everything read from the file is untrusted: every
//! length, count and offset is checked before use and errors name the file, the byte position
//! and the field being read.
use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{json, Value};
use thiserror::Error;

/// `"GGUF"` read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are rejected (keeps recursion bounded on hostile input).
const MAX_ARRAY_NESTING: usize = 8;
/// The ggml types [`dequantize`] handles, as listed in error messages.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

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
    #[error("unpermute_qk: {problem}")]
    Permute { problem: String },
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

impl From<GgufError> for crate::error::Error {
    fn from(e: GgufError) -> Self {
        crate::error::Error::Gguf(Box::new(e))
    }
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

/// ggml tensor element types, with the ids used in GGUF files. Only some can be dequantized
/// (see [`GgmlType::is_supported`]); the rest are known so that their sizes can be checked
/// and their names reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// (type, id, name, elements per block, bytes per block), from ggml's `type_traits`.
const GGML_TYPES: [(GgmlType, u32, &str, u64, u64); 32] = [
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
    (GgmlType::Q2_K, 10, "Q2_K", 256, 84),
    (GgmlType::Q3_K, 11, "Q3_K", 256, 110),
    (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
    (GgmlType::Q5_K, 13, "Q5_K", 256, 176),
    (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
    (GgmlType::Q8_K, 15, "Q8_K", 256, 292),
    (GgmlType::IQ2_XXS, 16, "IQ2_XXS", 256, 66),
    (GgmlType::IQ2_XS, 17, "IQ2_XS", 256, 74),
    (GgmlType::IQ3_XXS, 18, "IQ3_XXS", 256, 98),
    (GgmlType::IQ1_S, 19, "IQ1_S", 256, 50),
    (GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 18),
    (GgmlType::IQ3_S, 21, "IQ3_S", 256, 110),
    (GgmlType::IQ2_S, 22, "IQ2_S", 256, 82),
    (GgmlType::IQ4_XS, 23, "IQ4_XS", 256, 136),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::IQ1_M, 29, "IQ1_M", 256, 56),
    (GgmlType::BF16, 30, "BF16", 1, 2),
    (GgmlType::TQ1_0, 34, "TQ1_0", 256, 54),
    (GgmlType::TQ2_0, 35, "TQ2_0", 256, 66),
    (GgmlType::MXFP4, 39, "MXFP4", 32, 17),
];

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GGML_TYPES.iter().find(|t| t.1 == id).map(|t| t.0)
    }

    fn traits(self) -> (u32, &'static str, u64, u64) {
        // Every variant has a row in GGML_TYPES (checked by a test); the fallback is F32's.
        GGML_TYPES
            .iter()
            .find(|t| t.0 == self)
            .map_or((0, "F32", 1, 4), |t| (t.1, t.2, t.3, t.4))
    }

    pub fn id(self) -> u32 {
        self.traits().0
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

    /// Whether [`dequantize`] handles this type.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q8_0
                | GgmlType::Q4_0
                | GgmlType::Q4_1
        )
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

    /// Fails on the first tensor whose type [`dequantize`] cannot handle, so that a loader can
    /// reject a file before doing any work.
    pub fn ensure_supported_types(&self) -> Result<(), GgufError> {
        match self.tensors.iter().find(|t| !t.dtype.is_supported()) {
            None => Ok(()),
            Some(t) => Err(unsupported_type(&self.source, t)),
        }
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
// Parsing
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
    fn u16(&mut self, field: &str) -> Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn string(&mut self, field: &str) -> Result<String, GgufError> {
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

fn read_value(
    r: &mut Reader,
    type_id: u32,
    field: &str,
    depth: usize,
) -> Result<GgufValue, GgufError> {
    Ok(match type_id {
        0 => GgufValue::U8(r.u8(field)?),
        1 => GgufValue::I8(i8::from_le_bytes(r.array(field)?)),
        2 => GgufValue::U16(r.u16(field)?),
        3 => GgufValue::I16(i16::from_le_bytes(r.array(field)?)),
        4 => GgufValue::U32(r.u32(field)?),
        5 => GgufValue::I32(i32::from_le_bytes(r.array(field)?)),
        6 => GgufValue::F32(f32::from_le_bytes(r.array(field)?)),
        7 => GgufValue::Bool(r.u8(field)? != 0),
        8 => GgufValue::String(r.string(field)?),
        9 => read_array(r, field, depth)?,
        10 => GgufValue::U64(r.u64(field)?),
        11 => GgufValue::I64(i64::from_le_bytes(r.array(field)?)),
        12 => GgufValue::F64(f64::from_le_bytes(r.array(field)?)),
        other => {
            return Err(r.malformed(
                r.pos.saturating_sub(4),
                &format!("type of {field}"),
                format!("unknown metadata value type {other} (known: 0..=12)"),
            ))
        }
    })
}

fn read_array(r: &mut Reader, field: &str, depth: usize) -> Result<GgufValue, GgufError> {
    let type_pos = r.pos;
    let item_type = r.u32(&format!("array item type of {field}"))?;
    let min_bytes = min_value_bytes(item_type).ok_or_else(|| {
        r.malformed(
            type_pos,
            &format!("array item type of {field}"),
            format!("unknown metadata value type {item_type} (known: 0..=12)"),
        )
    })?;
    if item_type == 9 && depth >= MAX_ARRAY_NESTING {
        return Err(r.malformed(
            type_pos,
            field,
            format!("arrays nested deeper than {MAX_ARRAY_NESTING} levels"),
        ));
    }
    let count = r.u64(&format!("array length of {field}"))?;
    r.check_count(count, min_bytes, &format!("{count} array items of {field}"))?;
    let mut items = Vec::with_capacity(count as usize);
    for _ in 0..count {
        items.push(read_value(r, item_type, field, depth + 1)?);
    }
    Ok(GgufValue::Array(items))
}

fn read_header(r: &mut Reader) -> Result<(u32, u64, u64), GgufError> {
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

fn read_metadata(r: &mut Reader, kv_count: u64) -> Result<BTreeMap<String, GgufValue>, GgufError> {
    // Each entry is at least a key length (8), a type (4) and a 1-byte value.
    r.check_count(kv_count, 13, &format!("{kv_count} metadata entries"))?;
    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key_pos = r.pos;
        let key = r.string(&format!("key of metadata entry #{i}"))?;
        let field = format!("metadata `{key}`");
        let type_id = r.u32(&format!("type of {field}"))?;
        let value = read_value(r, type_id, &field, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.malformed(key_pos, &field, "duplicate key".to_string()));
        }
    }
    Ok(metadata)
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

fn alignment_of(metadata: &BTreeMap<String, GgufValue>, file: &str) -> Result<u64, GgufError> {
    let Some(v) = metadata.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match v.as_u64() {
        Some(a) if a.is_power_of_two() => Ok(a),
        _ => Err(GgufError::WrongType {
            file: file.to_string(),
            key: "general.alignment".to_string(),
            expected: "a power-of-two integer".to_string(),
            found: format!("{v:?}"),
        }),
    }
}

/// Parses a whole GGUF v2/v3 file held in memory. `source` (a path or name) appears in every
/// error. Tensor data is range-checked but not read; see [`dequantize`].
pub fn read_gguf(bytes: &[u8], source: &str) -> Result<GgufFile, GgufError> {
    let mut r = Reader {
        bytes,
        pos: 0,
        file: source,
    };
    let (version, tensor_count, kv_count) = read_header(&mut r)?;
    let metadata = read_metadata(&mut r, kv_count)?;
    // Each tensor info is at least a name length, n_dims, type and offset: 8 + 4 + 4 + 8 bytes.
    r.check_count(tensor_count, 24, &format!("{tensor_count} tensor infos"))?;
    let mut tensors = Vec::with_capacity(tensor_count as usize);
    let mut names = HashSet::new();
    for i in 0..tensor_count {
        let pos = r.pos;
        let info = read_tensor_info(&mut r, i)?;
        if !names.insert(info.name.clone()) {
            return Err(r.malformed(
                pos,
                &format!("tensor #{i}"),
                format!("duplicate tensor name `{}`", info.name),
            ));
        }
        tensors.push(info);
    }
    let alignment = alignment_of(&metadata, source)?;
    let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
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
// Dequantization
// ---------------------------------------------------------------------------------------------

/// IEEE half → f32, exact for every input (subnormals, infinities and NaN included).
pub fn f16_to_f32(h: u16) -> f32 {
    let negative = h & 0x8000 != 0;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let sign = if negative { 1u32 << 31 } else { 0 };
    match exp {
        // Zero or subnormal: man · 2⁻²⁴, exactly representable in f32.
        0 => {
            let v = man as f32 * (1.0 / 16_777_216.0);
            if negative {
                -v
            } else {
                v
            }
        }
        31 => f32::from_bits(sign | 0x7f80_0000 | (man << 13)),
        // Rebias the exponent from 15 to 127.
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

/// bfloat16 → f32: the high half of an f32.
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(&[lo, hi]) => u16::from_le_bytes([lo, hi]),
        _ => 0, // callers pass whole blocks; unreachable for valid slices
    }
}

/// Q8_0 block: f16 scale d, then 32 i8 quants; value = q·d.
fn dequant_q8_0_block(block: &[u8], out: &mut Vec<f32>) {
    let d = f16_to_f32(le_u16(block, 0));
    out.extend(block[2..34].iter().map(|&q| f32::from(q as i8) * d));
}

/// Q4_0 block: f16 scale d, then 16 bytes; byte j holds element j (low nibble) and element
/// j+16 (high nibble); value = (nibble − 8)·d.
fn dequant_q4_0_block(block: &[u8], out: &mut Vec<f32>) {
    let d = f16_to_f32(le_u16(block, 0));
    let qs = &block[2..18];
    out.extend(qs.iter().map(|&q| (f32::from(q & 0x0f) - 8.0) * d));
    out.extend(qs.iter().map(|&q| (f32::from(q >> 4) - 8.0) * d));
}

/// Q4_1 block: f16 scale d, f16 minimum m, then 16 bytes laid out as in Q4_0; value = nibble·d + m.
fn dequant_q4_1_block(block: &[u8], out: &mut Vec<f32>) {
    let d = f16_to_f32(le_u16(block, 0));
    let m = f16_to_f32(le_u16(block, 2));
    let qs = &block[4..20];
    out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
    out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
}

/// Dequantizes raw tensor data of type `dtype` (whole blocks) into f32, in file order.
pub fn dequantize_raw(dtype: GgmlType, data: &[u8]) -> Option<Vec<f32>> {
    let block_bytes = usize::try_from(dtype.block_bytes()).ok()?;
    if !data.len().is_multiple_of(block_bytes) {
        return None;
    }
    let blocks = data.chunks_exact(block_bytes);
    let n = data.len() / block_bytes * usize::try_from(dtype.block_elements()).ok()?;
    let mut out = Vec::with_capacity(n);
    match dtype {
        GgmlType::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(blocks.map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))),
        GgmlType::BF16 => out.extend(blocks.map(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]])))),
        GgmlType::Q8_0 => blocks.for_each(|b| dequant_q8_0_block(b, &mut out)),
        GgmlType::Q4_0 => blocks.for_each(|b| dequant_q4_0_block(b, &mut out)),
        GgmlType::Q4_1 => blocks.for_each(|b| dequant_q4_1_block(b, &mut out)),
        _ => return None,
    }
    Some(out)
}

/// The tensor's values as f32 in file order, which is row-major for [`hf_shape`].
/// `bytes` is the whole file the `file` was parsed from.
pub fn dequantize(
    file: &GgufFile,
    bytes: &[u8],
    tensor: &GgufTensorInfo,
) -> Result<Vec<f32>, GgufError> {
    if !tensor.dtype.is_supported() {
        return Err(unsupported_type(&file.source, tensor));
    }
    check_tensor_shape(tensor).map_err(|problem| GgufError::BadTensor {
        file: file.source.clone(),
        tensor: tensor.name.clone(),
        problem,
    })?;
    let data = file.tensor_data(bytes, tensor)?;
    dequantize_raw(tensor.dtype, data).ok_or_else(|| GgufError::BadTensor {
        file: file.source.clone(),
        tensor: tensor.name.clone(),
        problem: format!("{} bytes are not whole {} blocks", data.len(), tensor.dtype),
    })
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
/// Also works on biases with `cols = 1`.
pub fn unpermute_qk(
    data: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<Vec<f32>, GgufError> {
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
    let mut out = vec![0.0f32; data.len()];
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

// ---------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------

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
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::path::PathBuf;

    // ---- helpers -----------------------------------------------------------------------------

    /// `CARGO_MANIFEST_DIR/../shared/data` in the project checkout, else the shared copy.
    fn data_dir() -> PathBuf {
        let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
        if local.is_dir() {
            local
        } else {
            PathBuf::from("/work/shared/data")
        }
    }

    const TINY: &str = "models/llama-tiny-random-gguf/llama-2-tiny-random.gguf";

    fn tiny_bytes() -> Vec<u8> {
        let path = data_dir().join(TINY);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// Test-side GGUF encoder for one value: (type id, bytes).
    fn encode(v: &GgufValue) -> (u32, Vec<u8>) {
        let mut b = Vec::new();
        let ty = match v {
            GgufValue::U8(x) => {
                b.push(*x);
                0
            }
            GgufValue::I8(x) => {
                b.extend(x.to_le_bytes());
                1
            }
            GgufValue::U16(x) => {
                b.extend(x.to_le_bytes());
                2
            }
            GgufValue::I16(x) => {
                b.extend(x.to_le_bytes());
                3
            }
            GgufValue::U32(x) => {
                b.extend(x.to_le_bytes());
                4
            }
            GgufValue::I32(x) => {
                b.extend(x.to_le_bytes());
                5
            }
            GgufValue::F32(x) => {
                b.extend(x.to_le_bytes());
                6
            }
            GgufValue::Bool(x) => {
                b.push(u8::from(*x));
                7
            }
            GgufValue::String(s) => {
                put_str(&mut b, s);
                8
            }
            GgufValue::Array(items) => {
                let item_ty = items.first().map_or(4, |i| encode(i).0);
                b.extend(item_ty.to_le_bytes());
                b.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    b.extend(encode(i).1);
                }
                9
            }
            GgufValue::U64(x) => {
                b.extend(x.to_le_bytes());
                10
            }
            GgufValue::I64(x) => {
                b.extend(x.to_le_bytes());
                11
            }
            GgufValue::F64(x) => {
                b.extend(x.to_le_bytes());
                12
            }
        };
        (ty, b)
    }

    /// A tensor to write: name, ggml dims, ggml type id, raw data.
    struct RawTensor {
        name: String,
        dims: Vec<u64>,
        type_id: u32,
        data: Vec<u8>,
    }

    fn raw(name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> RawTensor {
        RawTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            type_id,
            data,
        }
    }

    /// Writes a GGUF v3 file with data aligned to 32 bytes.
    fn build(meta: &[(&str, GgufValue)], tensors: &[RawTensor]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            put_str(&mut out, k);
            let (ty, b) = encode(v);
            out.extend(ty.to_le_bytes());
            out.extend(b);
        }
        let mut offset = 0u64;
        let mut data = Vec::new();
        for t in tensors {
            put_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.type_id.to_le_bytes());
            out.extend(offset.to_le_bytes());
            data.extend(&t.data);
            while data.len() % 32 != 0 {
                data.push(0);
            }
            offset = data.len() as u64;
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        out.extend(data);
        out
    }

    fn f16_bytes(h: &[u16]) -> Vec<u8> {
        h.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn err_text<T: std::fmt::Debug>(r: Result<T, GgufError>) -> String {
        r.expect_err("expected an error").to_string()
    }

    /// Minimal metadata of a 1-layer llama, for config tests.
    fn llama_meta() -> Vec<(&'static str, GgufValue)> {
        vec![
            ("general.architecture", GgufValue::String("llama".into())),
            ("llama.context_length", GgufValue::U32(2048)),
            ("llama.embedding_length", GgufValue::U32(4)),
            ("llama.block_count", GgufValue::U32(1)),
            ("llama.feed_forward_length", GgufValue::U32(16)),
            ("llama.attention.head_count", GgufValue::U32(2)),
            ("llama.attention.head_count_kv", GgufValue::U32(1)),
            (
                "llama.attention.layer_norm_rms_epsilon",
                GgufValue::F32(1e-6),
            ),
            ("llama.rope.freq_base", GgufValue::F32(500000.0)),
            ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
            ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
        ]
    }

    // ---- scalar conversions ------------------------------------------------------------------

    #[test]
    fn f16_conversion_hand_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0); // exp 15 → 2⁰, mantissa 0
        assert_eq!(f16_to_f32(0xc000), -2.0); // sign, exp 16 → 2¹
        assert_eq!(f16_to_f32(0x3800), 0.5); // exp 14 → 2⁻¹
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95); // 2⁻² · (1 + 341/1024)
        assert_eq!(f16_to_f32(0x7bff), 65504.0); // largest normal: 2¹⁵ · (2 − 2⁻¹⁰)
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8); // smallest subnormal 2⁻²⁴
        assert_eq!(f16_to_f32(0x0200), 3.051_757_8e-5); // subnormal 512 · 2⁻²⁴ = 2⁻¹⁵
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn bf16_conversion_hand_values() {
        assert_eq!(bf16_to_f32(0x3f80), 1.0); // 0x3f800000
        assert_eq!(bf16_to_f32(0xc040), -3.0); // 0xc0400000 = −1.5 · 2¹
        assert_eq!(bf16_to_f32(0x3e80), 0.25); // 0x3e800000 = 2⁻²
    }

    // ---- block dequantization ----------------------------------------------------------------

    #[test]
    fn q8_0_block_by_hand() {
        // d = 0.5 (f16 0x3800); quants q_j = j − 16 except q_0 = −128, q_31 = 127.
        let mut block = f16_bytes(&[0x3800]);
        let qs: Vec<i8> = (0..32)
            .map(|j| match j {
                0 => -128,
                31 => 127,
                _ => j as i8 - 16,
            })
            .collect();
        block.extend(qs.iter().map(|&q| q as u8));
        let v = dequantize_raw(GgmlType::Q8_0, &block).unwrap();
        assert_eq!(v.len(), 32);
        assert_eq!(v[0], -64.0); // −128 · 0.5
        assert_eq!(v[1], -7.5); // (1 − 16) · 0.5
        assert_eq!(v[16], 0.0); // (16 − 16) · 0.5
        assert_eq!(v[17], 0.5); // (17 − 16) · 0.5
        assert_eq!(v[31], 63.5); // 127 · 0.5
    }

    #[test]
    fn q4_0_block_by_hand() {
        // d = 2.0 (f16 0x4000); byte 0 = 0x0F: element 0 = (15 − 8)·2 = 14, element 16 = (0 − 8)·2 = −16;
        // byte 1 = 0x81: element 1 = (1 − 8)·2 = −14, element 17 = (8 − 8)·2 = 0;
        // byte 15 = 0xA3: element 15 = (3 − 8)·2 = −10, element 31 = (10 − 8)·2 = 4; other bytes 0x88 → 0.
        let mut block = f16_bytes(&[0x4000]);
        let mut qs = [0x88u8; 16];
        qs[0] = 0x0F;
        qs[1] = 0x81;
        qs[15] = 0xA3;
        block.extend(qs);
        let v = dequantize_raw(GgmlType::Q4_0, &block).unwrap();
        assert_eq!(v.len(), 32);
        assert_eq!((v[0], v[16]), (14.0, -16.0));
        assert_eq!((v[1], v[17]), (-14.0, 0.0));
        assert_eq!((v[15], v[31]), (-10.0, 4.0));
        assert_eq!((v[2], v[18]), (0.0, 0.0));
    }

    #[test]
    fn q4_1_block_by_hand() {
        // d = 0.5 (0x3800), m = −1.0 (0xbc00); byte 0 = 0x2F: element 0 = 15·0.5 − 1 = 6.5,
        // element 16 = 2·0.5 − 1 = 0; byte 7 = 0xF0: element 7 = 0·0.5 − 1 = −1, element 23 = 15·0.5 − 1 = 6.5;
        // other bytes 0x00 → −1.
        let mut block = f16_bytes(&[0x3800, 0xbc00]);
        let mut qs = [0u8; 16];
        qs[0] = 0x2F;
        qs[7] = 0xF0;
        block.extend(qs);
        let v = dequantize_raw(GgmlType::Q4_1, &block).unwrap();
        assert_eq!(v.len(), 32);
        assert_eq!((v[0], v[16]), (6.5, 0.0));
        assert_eq!((v[7], v[23]), (-1.0, 6.5));
        assert_eq!((v[3], v[30]), (-1.0, -1.0));
    }

    #[test]
    fn partial_blocks_and_unsupported_types_are_refused_by_raw_dequant() {
        assert!(dequantize_raw(GgmlType::Q8_0, &[0u8; 33]).is_none()); // 33 is not a multiple of 34
        assert!(dequantize_raw(GgmlType::Q5_K, &[0u8; 176]).is_none());
        assert_eq!(
            dequantize_raw(GgmlType::F32, &[]).unwrap(),
            Vec::<f32>::new()
        );
    }

    #[test]
    fn ggml_type_table_is_consistent() {
        for (ty, id, name, block, bytes) in GGML_TYPES {
            assert_eq!(GgmlType::from_id(id), Some(ty));
            assert_eq!(
                (ty.id(), ty.name(), ty.block_elements(), ty.block_bytes()),
                (id, name, block, bytes)
            );
            assert_eq!(format!("{ty:?}"), name);
        }
        assert_eq!(GgmlType::from_id(4), None); // Q4_2, removed from ggml
        assert_eq!(GgmlType::BF16.id(), 30);
    }

    // ---- whole-file parsing ------------------------------------------------------------------

    #[test]
    fn hand_written_minimal_file_parses() {
        // Header, one u32 KV, one F32 tensor [2] at offset 0, data at byte 96.
        let mut b = Vec::new();
        b.extend(b"GGUF");
        b.extend(2u32.to_le_bytes()); // version 2
        b.extend(1u64.to_le_bytes()); // 1 tensor
        b.extend(1u64.to_le_bytes()); // 1 kv
        b.extend(5u64.to_le_bytes());
        b.extend(b"n.key");
        b.extend(4u32.to_le_bytes()); // u32
        b.extend(7u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(b"t");
        b.extend(1u32.to_le_bytes()); // n_dims
        b.extend(2u64.to_le_bytes());
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(0u64.to_le_bytes());
        // header = 4+4+8+8 + (8+5+4+4) + (8+1+4+8+4+8) = 24 + 21 + 33 = 78 → data at 96
        assert_eq!(b.len(), 78);
        b.resize(96, 0);
        b.extend(1.5f32.to_le_bytes());
        b.extend((-2.0f32).to_le_bytes());
        let f = read_gguf(&b, "mini.gguf").unwrap();
        assert_eq!(f.version, 2);
        assert_eq!(f.data_offset, 96);
        assert_eq!(f.metadata["n.key"], GgufValue::U32(7));
        assert_eq!(
            f.tensors[0],
            GgufTensorInfo {
                name: "t".into(),
                dims: vec![2],
                dtype: GgmlType::F32,
                offset: 0
            }
        );
        assert_eq!(dequantize(&f, &b, &f.tensors[0]).unwrap(), vec![1.5, -2.0]);
    }

    #[test]
    fn every_metadata_type_round_trips() {
        let meta = vec![
            ("a.u8", GgufValue::U8(200)),
            ("a.i8", GgufValue::I8(-5)),
            ("a.u16", GgufValue::U16(60000)),
            ("a.i16", GgufValue::I16(-30000)),
            ("a.u32", GgufValue::U32(4_000_000_000)),
            ("a.i32", GgufValue::I32(-2_000_000_000)),
            ("a.f32", GgufValue::F32(0.25)),
            ("a.bool", GgufValue::Bool(true)),
            ("a.str", GgufValue::String("héllo ▁".into())),
            (
                "a.arr",
                GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(-2)]),
            ),
            (
                "a.nested",
                GgufValue::Array(vec![
                    GgufValue::Array(vec![GgufValue::String("x".into())]),
                    GgufValue::Array(vec![
                        GgufValue::String("y".into()),
                        GgufValue::String("".into()),
                    ]),
                ]),
            ),
            ("a.empty", GgufValue::Array(vec![])),
            ("a.u64", GgufValue::U64(u64::MAX)),
            ("a.i64", GgufValue::I64(i64::MIN)),
            ("a.f64", GgufValue::F64(-1e300)),
        ];
        let bytes = build(&meta, &[]);
        let f = read_gguf(&bytes, "types.gguf").unwrap();
        assert_eq!(f.metadata.len(), meta.len());
        for (k, v) in &meta {
            assert_eq!(&f.metadata[*k], v, "{k}");
        }
        assert!(f.tensors.is_empty());
    }

    #[test]
    fn value_accessors_convert_and_describe() {
        assert_eq!(GgufValue::I32(7).as_u64(), Some(7));
        assert_eq!(GgufValue::I32(-7).as_u64(), None);
        assert_eq!(GgufValue::U64(u64::MAX).as_i64(), None);
        // f32 1e-5 is 9.99999974737875e-6 exactly; its shortest decimal is 1e-5.
        assert_eq!(GgufValue::F32(1e-5).as_f64(), Some(1e-5));
        assert_eq!(GgufValue::U32(3).as_f64(), Some(3.0));
        assert_eq!(GgufValue::String("x".into()).as_f64(), None);
        assert_eq!(
            GgufValue::Array(vec![GgufValue::U8(1)]).describe(),
            "an array of 1 items"
        );
    }

    #[test]
    fn tensors_of_every_supported_type_dequantize_from_a_file() {
        // F32 [2]: 1.5, −2; F16 [2]: 1, −2; BF16 [2]: 1, −3; Q8_0 [32]: d = 1, q_j = j;
        // Q4_0 [32] (all nibbles 9, d = 0.5) → (9 − 8)·0.5 = 0.5; Q4_1 [32] (nibbles 1, d = 2, m = 1) → 3.
        let q8: Vec<u8> = f16_bytes(&[0x3c00]).into_iter().chain(0..32u8).collect();
        let q40: Vec<u8> = f16_bytes(&[0x3800])
            .into_iter()
            .chain([0x99u8; 16])
            .collect();
        let q41: Vec<u8> = f16_bytes(&[0x4000, 0x3c00])
            .into_iter()
            .chain([0x11u8; 16])
            .collect();
        let tensors = [
            raw(
                "f32",
                &[2],
                0,
                [1.5f32, -2.0]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            raw("f16", &[2], 1, f16_bytes(&[0x3c00, 0xc000])),
            raw("bf16", &[2], 30, f16_bytes(&[0x3f80, 0xc040])),
            raw("q8", &[32], 8, q8),
            raw("q40", &[32], 2, q40),
            raw("q41", &[32], 3, q41),
        ];
        let bytes = build(&[], &tensors);
        let f = read_gguf(&bytes, "all.gguf").unwrap();
        let get = |name: &str| dequantize(&f, &bytes, f.tensor(name).unwrap()).unwrap();
        assert_eq!(get("f32"), vec![1.5, -2.0]);
        assert_eq!(get("f16"), vec![1.0, -2.0]);
        assert_eq!(get("bf16"), vec![1.0, -3.0]);
        assert_eq!(get("q8"), (0..32).map(|j| j as f32).collect::<Vec<_>>());
        assert_eq!(get("q40"), vec![0.5; 32]);
        assert_eq!(get("q41"), vec![3.0; 32]);
        assert_eq!(f.tensor("q41").unwrap().dtype, GgmlType::Q4_1);
    }

    #[test]
    fn multi_block_q8_0_matrix_keeps_block_order() {
        // ggml dims [32, 2]: 2 rows of one block each; row 0 has d = 1, row 1 has d = −1, q_j = 1.
        let mut data = f16_bytes(&[0x3c00]);
        data.extend([1u8; 32]);
        data.extend(f16_bytes(&[0xbc00]));
        data.extend([1u8; 32]);
        let bytes = build(&[], &[raw("m", &[32, 2], 8, data)]);
        let f = read_gguf(&bytes, "m.gguf").unwrap();
        let v = dequantize(&f, &bytes, &f.tensors[0]).unwrap();
        assert_eq!(hf_shape(&f.tensors[0]), vec![2, 32]);
        assert_eq!(&v[..32], &[1.0; 32]);
        assert_eq!(&v[32..], &[-1.0; 32]);
    }

    #[test]
    fn bad_magic_is_named() {
        let msg = err_text(read_gguf(b"GGML\x03\0\0\0", "x.bin"));
        assert!(
            msg.contains("x.bin")
                && msg.contains("not a GGUF file")
                && msg.contains("47, 47, 4d, 4c"),
            "{msg}"
        );
        let msg = err_text(read_gguf(b"GG", "short.bin"));
        assert!(msg.contains("not a GGUF file"), "{msg}");
        assert!(read_gguf(&[], "empty").is_err());
    }

    #[test]
    fn unsupported_versions_are_named() {
        let mut b = build(&[], &[]);
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        let msg = err_text(read_gguf(&b, "v1.gguf"));
        assert!(
            msg.contains("v1.gguf: unsupported GGUF version 1 (supported: 2, 3)"),
            "{msg}"
        );
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        let msg = err_text(read_gguf(&b, "be.gguf"));
        assert!(
            msg.contains("version 50331648") && msg.contains("big-endian"),
            "{msg}"
        );
    }

    #[test]
    fn truncation_names_byte_and_field() {
        let meta = [("general.name", GgufValue::String("tiny".into()))];
        let b = build(&meta, &[]);
        // Cut inside the string value: header 24 + key (8 + 12) + type 4 + length 8 = byte 56.
        let msg = err_text(read_gguf(&b[..58], "cut.gguf"));
        assert!(
            msg.contains("cut.gguf: truncated at byte 56 while reading metadata `general.name`: need 4 bytes, only 2 left"),
            "{msg}"
        );
        let msg = err_text(read_gguf(&b[..20], "cut.gguf"));
        assert!(
            msg.contains("truncated at byte 16 while reading metadata_kv_count"),
            "{msg}"
        );
    }

    #[test]
    fn hostile_counts_fail_without_allocating() {
        // kv_count = 2⁶³ in an otherwise empty file.
        let mut b = build(&[], &[]);
        b[16..24].copy_from_slice(&(1u64 << 63).to_le_bytes());
        let msg = err_text(read_gguf(&b, "huge.gguf"));
        assert!(msg.contains("metadata entries"), "{msg}");
        // An array claiming 2⁶⁰ u64 items.
        let mut b = build(&[("k", GgufValue::Array(vec![GgufValue::U64(1)]))], &[]);
        let count_at = 24 + 8 + 1 + 4 + 4;
        b[count_at..count_at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let msg = err_text(read_gguf(&b, "huge.gguf"));
        assert!(msg.contains("array items of metadata `k`"), "{msg}");
        // A string claiming u64::MAX bytes.
        let mut b = build(&[("k", GgufValue::String("v".into()))], &[]);
        b[24 + 8 + 1 + 4..24 + 8 + 1 + 4 + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err_text(read_gguf(&b, "huge.gguf")).contains("truncated"));
    }

    #[test]
    fn deeply_nested_arrays_are_rejected() {
        let mut v = GgufValue::Array(vec![GgufValue::U8(1)]);
        for _ in 0..MAX_ARRAY_NESTING + 1 {
            v = GgufValue::Array(vec![v]);
        }
        let msg = err_text(read_gguf(&build(&[("deep", v)], &[]), "deep.gguf"));
        assert!(msg.contains("nested deeper than 8"), "{msg}");
    }

    #[test]
    fn unknown_value_type_and_duplicate_key_are_rejected() {
        let mut b = build(&[("k", GgufValue::U8(1))], &[]);
        b[24 + 9..24 + 13].copy_from_slice(&13u32.to_le_bytes());
        let msg = err_text(read_gguf(&b, "t.gguf"));
        assert!(msg.contains("unknown metadata value type 13"), "{msg}");
        let b = build(&[("k", GgufValue::U8(1)), ("k", GgufValue::U8(2))], &[]);
        let msg = err_text(read_gguf(&b, "t.gguf"));
        assert!(
            msg.contains("metadata `k`") && msg.contains("duplicate key"),
            "{msg}"
        );
    }

    #[test]
    fn bad_tensor_tables_are_rejected() {
        let five_dims = build(&[], &[raw("t", &[1, 1, 1, 1, 1], 0, vec![0; 4])]);
        assert!(err_text(read_gguf(&five_dims, "t.gguf"))
            .contains("5 dimensions, ggml allows at most 4"));
        let unknown = build(&[], &[raw("t", &[1], 99, vec![0; 4])]);
        assert!(err_text(read_gguf(&unknown, "t.gguf")).contains("unknown ggml type id 99"));
        let partial_block = build(&[], &[raw("t", &[16], 8, vec![0; 34])]);
        assert!(err_text(read_gguf(&partial_block, "t.gguf"))
            .contains("not a multiple of the Q8_0 block size 32"));
        let overflow = build(&[], &[raw("t", &[u64::MAX, 2], 0, vec![])]);
        assert!(err_text(read_gguf(&overflow, "t.gguf")).contains("overflow"));
        let dup = build(
            &[],
            &[raw("t", &[1], 0, vec![0; 4]), raw("t", &[1], 0, vec![0; 4])],
        );
        assert!(err_text(read_gguf(&dup, "t.gguf")).contains("duplicate tensor name `t`"));
    }

    #[test]
    fn tensor_data_out_of_range_is_named() {
        let b = build(&[], &[raw("blk.0.attn_q.weight", &[4], 0, vec![0; 16])]);
        // The data (16 bytes) is followed by 16 bytes of padding; cut into the data itself.
        let cut = &b[..b.len() - 17];
        let msg = err_text(read_gguf(cut, "short.gguf"));
        // 24-byte header + name (8 + 19) + n_dims 4 + dim 8 + type 4 + offset 8 = 75 → data at 96, ends at 112.
        assert!(
            msg.contains("short.gguf: data of tensor `blk.0.attn_q.weight` is out of range: bytes 96..112 but the file has 111 bytes"),
            "{msg}"
        );
        let misaligned = {
            let mut b = b.clone();
            let off_at = 24 + 8 + 19 + 4 + 8 + 4;
            b[off_at..off_at + 8].copy_from_slice(&4u64.to_le_bytes());
            b
        };
        assert!(err_text(read_gguf(&misaligned, "m.gguf"))
            .contains("not a multiple of the alignment 32"));
    }

    #[test]
    fn custom_alignment_moves_the_data_section() {
        let meta = [("general.alignment", GgufValue::U32(64))];
        let mut b = build(&meta, &[]);
        let header_end = b.len(); // build pads to 32; the data must start at the next multiple of 64
        b.resize(header_end.div_ceil(64) * 64, 0);
        let f = read_gguf(&b, "a.gguf").unwrap();
        assert_eq!(f.alignment, 64);
        assert_eq!(f.data_offset % 64, 0);
        let bad = build(&[("general.alignment", GgufValue::U32(24))], &[]);
        assert!(err_text(read_gguf(&bad, "a.gguf")).contains("general.alignment"));
    }

    #[test]
    fn unsupported_type_error_lists_supported_types() {
        let b = build(&[], &[raw("blk.0.attn_q.weight", &[256], 13, vec![0; 176])]);
        let f = read_gguf(&b, "q5k.gguf").unwrap();
        let expected = "q5k.gguf: unsupported ggml type Q5_K for tensor `blk.0.attn_q.weight` \
                        (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)";
        assert_eq!(err_text(dequantize(&f, &b, &f.tensors[0])), expected);
        assert_eq!(err_text(f.ensure_supported_types()), expected);
    }

    #[test]
    fn dequantize_rechecks_the_range_against_the_given_bytes() {
        let b = build(&[], &[raw("t", &[2], 0, vec![0; 8])]);
        let f = read_gguf(&b, "t.gguf").unwrap();
        // 8 data bytes at 64..72, then 24 bytes of padding: cut inside the data.
        assert_eq!(f.data_offset, 64);
        assert!(err_text(dequantize(&f, &b[..70], &f.tensors[0]))
            .contains("bytes 64..72 but the file has 70 bytes"));
    }

    // ---- names, shapes, permutation ----------------------------------------------------------

    #[test]
    fn hf_names_cover_llama_tensors() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "blk.12.ffn_norm.weight",
                "model.layers.12.post_attention_layernorm.weight",
            ),
            (
                "blk.3.attn_q.weight",
                "model.layers.3.self_attn.q_proj.weight",
            ),
            ("blk.3.attn_k.bias", "model.layers.3.self_attn.k_proj.bias"),
            (
                "blk.3.attn_v.weight",
                "model.layers.3.self_attn.v_proj.weight",
            ),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.3.ffn_gate.weight",
                "model.layers.3.mlp.gate_proj.weight",
            ),
            ("blk.3.ffn_up.weight", "model.layers.3.mlp.up_proj.weight"),
            (
                "blk.3.attn_q_norm.weight",
                "model.layers.3.self_attn.q_norm.weight",
            ),
            (
                "blk.3.attn_k_norm.weight",
                "model.layers.3.self_attn.k_norm.weight",
            ),
            (
                "blk.3.ffn_down.weight",
                "model.layers.3.mlp.down_proj.weight",
            ),
        ];
        for (g, h) in cases {
            assert_eq!(hf_name(g).as_deref(), Some(h), "{g}");
        }
        for g in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk..attn_q.weight",
            "blk.0.attn_q.scale",
            "blk.0.attn_qkv.weight",
            "blk.0",
            "",
        ] {
            assert_eq!(hf_name(g), None, "{g}");
        }
    }

    #[test]
    fn hf_shape_reverses_ggml_dims() {
        let t = GgufTensorInfo {
            name: "t".into(),
            dims: vec![8, 32],
            dtype: GgmlType::F16,
            offset: 0,
        };
        assert_eq!(hf_shape(&t), vec![32, 8]); // ffn_gate: ggml [in=8, out=32] → HF [out, in]
        let v = GgufTensorInfo {
            dims: vec![8],
            ..t.clone()
        };
        assert_eq!(hf_shape(&v), vec![8]);
        let s = GgufTensorInfo { dims: vec![], ..t };
        assert_eq!(hf_shape(&s), Vec::<usize>::new());
    }

    /// llama.cpp's `permute`, written out: reshape(n_head, 2, rows/n_head/2, cols), swapaxes(1, 2).
    fn permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let hd = rows / n_head;
        let half = hd / 2;
        let mut out = Vec::with_capacity(w.len());
        for h in 0..n_head {
            for i in 0..half {
                for t in 0..2 {
                    // output row (h, i, t) reads input row (h, t, i)
                    let src = h * hd + t * half + i;
                    out.extend_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_tiny_hand_example() {
        // One head of 4 rows: HF rows [a0, a1, b0, b1] (two rotary halves) are stored as
        // [a0, b0, a1, b1]. The file rows 0, 1, 2, 3 are therefore a0, b0, a1, b1 → HF [0, 2, 1, 3].
        assert_eq!(
            unpermute_qk(&[0., 1., 2., 3.], 4, 1, 1).unwrap(),
            vec![0., 2., 1., 3.]
        );
        // Two heads of 4: each head is unpermuted on its own.
        let file: Vec<f32> = (0..8).map(|x| x as f32).collect();
        assert_eq!(
            unpermute_qk(&file, 8, 1, 2).unwrap(),
            vec![0., 2., 1., 3., 4., 6., 5., 7.]
        );
        // Rows move whole: 2 columns.
        assert_eq!(
            unpermute_qk(&[0., 0.5, 1., 1.5, 2., 2.5, 3., 3.5], 4, 2, 1).unwrap(),
            vec![0., 0.5, 2., 2.5, 1., 1.5, 3., 3.5]
        );
        assert_eq!(permute(&[0., 2., 1., 3.], 4, 1, 1), vec![0., 1., 2., 3.]);
    }

    #[test]
    fn permute_then_unpermute_is_identity() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (rows, cols, n_head) in [(8, 8, 2), (12, 3, 3), (16, 5, 2), (4, 1, 1), (64, 4, 8)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let p = permute(&w, rows, cols, n_head);
            assert_ne!(
                p, w,
                "permutation must move something for {rows}x{cols}/{n_head}"
            );
            assert_eq!(unpermute_qk(&p, rows, cols, n_head).unwrap(), w);
            assert_eq!(
                permute(
                    &unpermute_qk(&w, rows, cols, n_head).unwrap(),
                    rows,
                    cols,
                    n_head
                ),
                w
            );
        }
    }

    #[test]
    fn unpermuted_weights_make_rotate_half_rope_match_llama_cpp_rope() {
        // q = W x for one head of 8; position 3, θ_i = 10000^(−2i/8).
        let (hd, pos) = (8usize, 3.0f32);
        let theta = |i: usize| pos * 10000f32.powf(-2.0 * i as f32 / hd as f32);
        let q_hf: Vec<f32> = (0..hd).map(|j| 0.1 * j as f32 - 0.3).collect();
        // HF: rotate pairs (i, i + hd/2).
        let mut rope_hf = q_hf.clone();
        for i in 0..hd / 2 {
            let (c, s) = (theta(i).cos(), theta(i).sin());
            let (a, b) = (q_hf[i], q_hf[i + hd / 2]);
            rope_hf[i] = a * c - b * s;
            rope_hf[i + hd / 2] = a * s + b * c;
        }
        // llama.cpp: the file's rows give q in permuted order, rotated in adjacent pairs (2i, 2i+1).
        let q_gguf = permute(&q_hf, hd, 1, 1);
        let mut rope_gguf = q_gguf.clone();
        for i in 0..hd / 2 {
            let (c, s) = (theta(i).cos(), theta(i).sin());
            let (a, b) = (q_gguf[2 * i], q_gguf[2 * i + 1]);
            rope_gguf[2 * i] = a * c - b * s;
            rope_gguf[2 * i + 1] = a * s + b * c;
        }
        assert_eq!(unpermute_qk(&rope_gguf, hd, 1, 1).unwrap(), rope_hf);
    }

    #[test]
    fn unpermute_rejects_bad_shapes() {
        assert!(
            err_text(unpermute_qk(&[0.; 6], 6, 1, 2)).contains("6 rows do not split into 2 heads")
        );
        assert!(unpermute_qk(&[0.; 4], 4, 1, 0).is_err());
        assert!(unpermute_qk(&[0.; 4], 4, 1, usize::MAX).is_err()); // 2·n_head overflows
        assert!(
            err_text(unpermute_qk(&[0.; 5], 4, 1, 1)).contains("5 values do not form a 4×1 matrix")
        );
        assert_eq!(unpermute_qk(&[], 0, 5, 1).unwrap(), Vec::<f32>::new());
    }

    // ---- config.json -------------------------------------------------------------------------

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

    // ---- tokenizer.json ----------------------------------------------------------------------

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
    fn real_tiny_llama_file() {
        let bytes = tiny_bytes();
        let f = read_gguf(&bytes, TINY).unwrap();
        assert_eq!(f.version, 3);
        for (k, v) in &f.metadata {
            match v {
                GgufValue::Array(items) => println!("{k}: array of {}", items.len()),
                other => println!("{k}: {other:?}"),
            }
        }
        assert_eq!(f.architecture().unwrap(), "llama");
        assert_eq!(f.tensors.len(), 12);
        assert_eq!(f.data_offset, 724_416); // header ends at 724 398, rounded up to 32
        for t in &f.tensors {
            let v = dequantize(&f, &bytes, t).unwrap();
            assert_eq!(v.len() as u64, t.n_elements(), "{}", t.name);
            assert!(v.iter().all(|x| x.is_finite()), "{}", t.name);
            assert!(hf_name(&t.name).is_some(), "{}", t.name);
            println!(
                "{} {:?} {} → {:?} {:?}",
                t.name,
                t.dims,
                t.dtype,
                hf_name(&t.name).unwrap(),
                hf_shape(t)
            );
        }
        let q = f.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!((q.dtype, hf_shape(q)), (GgmlType::F16, vec![8, 8]));
        assert_eq!(
            hf_shape(f.tensor("blk.0.ffn_gate.weight").unwrap()),
            vec![32, 8]
        );
        assert_eq!(
            hf_shape(f.tensor("blk.0.ffn_down.weight").unwrap()),
            vec![8, 32]
        );
        assert_eq!(
            f.tensor("blk.0.attn_norm.weight").unwrap().dtype,
            GgmlType::F32
        );
        // The embedding's last element is the file's last two bytes (it ends exactly at EOF).
        let embd = dequantize(&f, &bytes, f.tensor("output.weight").unwrap()).unwrap();
        let last = u16::from_le_bytes([bytes[bytes.len() - 2], bytes[bytes.len() - 1]]);
        assert_eq!(embd.last().copied(), Some(f16_to_f32(last)));

        let c = llama_config_json(&f).unwrap();
        println!("{c}");
        let expected = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
            "hidden_size": 8, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": false,
            "hidden_act": "silu", "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
            "attention_bias": false,
        });
        assert_eq!(c, expected);
        assert_eq!(
            special_tokens(&f).unwrap(),
            GgufSpecialTokens {
                bos: Some("<s>".into()),
                eos: "</s>".into(),
                pad: None
            }
        );
    }

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

    // ---- robustness --------------------------------------------------------------------------

    /// Everything downstream of a successful parse must also return instead of panicking.
    fn exercise(bytes: &[u8], with_tokenizer: bool) {
        if let Ok(f) = read_gguf(bytes, "fuzz.gguf") {
            for t in &f.tensors {
                let _ = dequantize(&f, bytes, t);
                let _ = hf_name(&t.name);
                let _ = hf_shape(t);
            }
            let _ = llama_config_json(&f);
            let _ = special_tokens(&f);
            let _ = f.ensure_supported_types();
            if with_tokenizer {
                let _ = tokenizer_json(&f);
            }
        }
    }

    #[test]
    fn truncated_real_file_always_errors() {
        let bytes = tiny_bytes();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut cuts: Vec<usize> = (0..100).collect();
        cuts.extend(724_350..724_420); // around the end of the tensor table and the padding
        cuts.extend((0..150).map(|_| rng.gen_range(0..bytes.len())));
        cuts.push(bytes.len() - 1);
        for cut in cuts {
            let r = read_gguf(&bytes[..cut], "cut.gguf");
            assert!(r.is_err(), "a file cut at {cut} bytes must not parse");
        }
    }

    #[test]
    fn random_byte_flips_never_panic() {
        let bytes = tiny_bytes();
        let header_end = 724_416;
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut parsed = 0;
        for round in 0..300 {
            let mut b = bytes.clone();
            for _ in 0..rng.gen_range(1..=4) {
                // Bias flips towards the fixed header and the tensor table, where structure lives.
                let at = match rng.gen_range(0..3) {
                    0 => rng.gen_range(0..400),
                    1 => rng.gen_range(header_end - 700..header_end),
                    _ => rng.gen_range(0..header_end),
                };
                b[at] ^= 1 << rng.gen_range(0..8);
            }
            parsed += usize::from(read_gguf(&b, "flip.gguf").is_ok());
            exercise(&b, round % 25 == 0);
        }
        assert!(
            parsed > 0,
            "some flips (inside strings, values) should still parse"
        );
    }
}
