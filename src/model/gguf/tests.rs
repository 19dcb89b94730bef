//! Parsing, pre-check and tensor tests; the helpers here also serve `rebuild`'s tests.
use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::path::PathBuf;

// ---- helpers -----------------------------------------------------------------------------

/// `CARGO_MANIFEST_DIR/../shared/data` in the project checkout, else the shared copy.
pub(super) fn data_dir() -> PathBuf {
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if local.is_dir() {
        local
    } else {
        PathBuf::from("/work/shared/data")
    }
}

pub(super) const TINY: &str = "models/llama-tiny-random-gguf/llama-2-tiny-random.gguf";

pub(super) fn tiny_bytes() -> Vec<u8> {
    let path = data_dir().join(TINY);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub(super) fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Test-side GGUF encoder for one value: (type id, bytes).
pub(super) fn encode(v: &GgufValue) -> (u32, Vec<u8>) {
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
pub(super) struct RawTensor {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
}

pub(super) fn raw(name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> RawTensor {
    RawTensor {
        name: name.to_string(),
        dims: dims.to_vec(),
        type_id,
        data,
    }
}

/// Writes a GGUF v3 file with data aligned to 32 bytes.
pub(super) fn build(meta: &[(&str, GgufValue)], tensors: &[RawTensor]) -> Vec<u8> {
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

pub(super) fn f16_bytes(h: &[u16]) -> Vec<u8> {
    h.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub(super) fn err_text<T: std::fmt::Debug>(r: Result<T, GgufError>) -> String {
    r.expect_err("expected an error").to_string()
}

/// Minimal metadata of a 1-layer llama, for config tests.
pub(super) fn llama_meta() -> Vec<(&'static str, GgufValue)> {
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

// ---- block dequantization (candle's, through a file as the loader reads it) --------------

/// Dequantizes a one-row tensor of `n` elements of ggml type `type_id`.
fn deq(type_id: u32, n: u64, data: Vec<u8>) -> Vec<f32> {
    let b = build(&[], &[raw("t", &[n], type_id, data)]);
    let f = read_gguf(&b, "t.gguf").unwrap();
    dequantize(&f, &b, &f.tensors[0]).unwrap()
}

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
    let v = deq(8, 32, block);
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
    let v = deq(2, 32, block);
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
    let v = deq(3, 32, block);
    assert_eq!(v.len(), 32);
    assert_eq!((v[0], v[16]), (6.5, 0.0));
    assert_eq!((v[7], v[23]), (-1.0, 6.5));
    assert_eq!((v[3], v[30]), (-1.0, -1.0));
}

#[test]
fn ggml_type_table_is_consistent() {
    for (id, name, block, bytes, _) in GGML_TYPES {
        let ty = GgmlType::from_id(id).unwrap();
        assert_eq!(
            (ty.id(), ty.name(), ty.block_elements(), ty.block_bytes()),
            (id, name, block, bytes)
        );
        assert_eq!(ty.to_string(), name);
    }
    assert_eq!(GgmlType::from_id(4), None); // Q4_2, removed from ggml
                                            // Where candle holds a type, its block geometry is ggml's.
    let supported: Vec<&str> = GGML_TYPES
        .iter()
        .filter_map(|&(id, name, block, bytes, _)| {
            let c = GgmlType::from_id(id)?.candle()?;
            assert_eq!(
                (c.block_size() as u64, c.type_size() as u64),
                (block, bytes),
                "{name}"
            );
            Some(name)
        })
        .collect();
    assert_eq!(supported.len(), 15);
    assert!(supported.iter().all(|n| SUPPORTED_TYPES.contains(n)));
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
            dtype: GgmlType::from_id(0).unwrap(),
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
    assert_eq!(f.tensor("q41").unwrap().dtype.name(), "Q4_1");
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
        msg.contains("x.bin") && msg.contains("not a GGUF file") && msg.contains("47, 47, 4d, 4c"),
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
    assert!(
        err_text(read_gguf(&five_dims, "t.gguf")).contains("5 dimensions, ggml allows at most 4")
    );
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
    assert!(
        err_text(read_gguf(&misaligned, "m.gguf")).contains("not a multiple of the alignment 32")
    );
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
    // IQ4_XS (id 23): ggml has it, candle does not; refused before candle reads the file.
    let b = build(&[], &[raw("blk.0.attn_q.weight", &[256], 23, vec![0; 136])]);
    let expected = "iq.gguf: unsupported ggml type IQ4_XS for tensor `blk.0.attn_q.weight` \
                    (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, \
                    Q4_K, Q5_K, Q6_K, Q8_K)";
    assert_eq!(err_text(read_gguf(&b, "iq.gguf")), expected);
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
        dtype: GgmlType::from_id(1).unwrap(),
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
pub(super) fn permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
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
    assert!(err_text(unpermute_qk(&[0.; 6], 6, 1, 2)).contains("6 rows do not split into 2 heads"));
    assert!(unpermute_qk(&[0.; 4], 4, 1, 0).is_err());
    assert!(unpermute_qk(&[0.; 4], 4, 1, usize::MAX).is_err()); // 2·n_head overflows
    assert!(err_text(unpermute_qk(&[0.; 5], 4, 1, 1)).contains("5 values do not form a 4×1 matrix"));
    assert_eq!(
        unpermute_qk::<f32>(&[], 0, 5, 1).unwrap(),
        Vec::<f32>::new()
    );
}

// ---- the real tiny file ------------------------------------------------------------------

#[test]
fn real_tiny_llama_file() {
    let bytes = tiny_bytes();
    let f = read_gguf(&bytes, TINY).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.tensors.len(), 12);
    assert_eq!(f.data_offset, 724_416); // header ends at 724 398, rounded up to 32
    for t in &f.tensors {
        let v = dequantize(&f, &bytes, t).unwrap();
        assert_eq!(v.len() as u64, t.n_elements(), "{}", t.name);
        assert!(v.iter().all(|x| x.is_finite()), "{}", t.name);
        assert!(hf_name(&t.name).is_some(), "{}", t.name);
    }
    let q = f.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.dtype.name(), hf_shape(q)), ("F16", vec![8, 8]));
    assert_eq!(
        hf_shape(f.tensor("blk.0.ffn_gate.weight").unwrap()),
        vec![32, 8]
    );
    assert_eq!(
        hf_shape(f.tensor("blk.0.ffn_down.weight").unwrap()),
        vec![8, 32]
    );
    assert_eq!(
        f.tensor("blk.0.attn_norm.weight").unwrap().dtype.name(),
        "F32"
    );
    // The embedding's last element is the file's last two bytes (it ends exactly at EOF).
    let embd = dequantize(&f, &bytes, f.tensor("output.weight").unwrap()).unwrap();
    let last = bytes[bytes.len() - 2..].to_vec();
    assert_eq!(embd.last().copied(), Some(deq(1, 1, last)[0]));

    let c = llama_config_json(&f).unwrap();
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

// ---- robustness --------------------------------------------------------------------------

pub(super) fn exercise(bytes: &[u8], with_tokenizer: bool) {
    if let Ok(f) = read_gguf(bytes, "fuzz.gguf") {
        for t in &f.tensors {
            let _ = dequantize(&f, bytes, t);
            let _ = hf_name(&t.name);
            let _ = hf_shape(t);
        }
        let _ = llama_config_json(&f);
        let _ = special_tokens(&f);
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
