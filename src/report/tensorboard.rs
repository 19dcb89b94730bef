//! TensorBoard event files, written directly: TFRecord framing (length, masked CRC-32C of the
//! length, payload, masked CRC-32C of the payload) around hand-encoded `Event` protobufs
//! (tensorflow/core/util/event.proto, summary.proto). Scalars are `simple_value` (f32, what
//! PyTorch's SummaryWriter writes); text is a string tensor tagged for the `text` plugin.
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: a CRC of data that itself holds CRCs is weak, so it is rotated and
/// offset.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord: u64 length (LE), masked CRC of those 8 bytes, payload, masked CRC of payload.
pub fn frame_record(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
    out
}

/// Minimal protobuf encoding: the wire types the Event messages use.
mod pb {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
        varint(out, ((field as u64) << 3) | wire as u64);
    }
    pub fn uint(out: &mut Vec<u8>, field: u32, v: u64) {
        key(out, field, 0);
        varint(out, v);
    }
    pub fn double(out: &mut Vec<u8>, field: u32, v: f64) {
        key(out, field, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }
    pub fn float(out: &mut Vec<u8>, field: u32, v: f32) {
        key(out, field, 5);
        out.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
        key(out, field, 2);
        varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }
}

/// What one summary value holds.
pub enum Value<'a> {
    Scalar(f32),
    /// Markdown rendered by TensorBoard's Text tab.
    Text(&'a str),
}

/// `Summary.Value { tag = 1; simple_value = 2 | metadata = 9 + tensor = 8 }`.
fn encode_value(tag: &str, value: &Value) -> Vec<u8> {
    let mut v = Vec::new();
    pb::bytes(&mut v, 1, tag.as_bytes());
    match value {
        Value::Scalar(x) => pb::float(&mut v, 2, *x),
        Value::Text(text) => {
            // TensorProto { dtype = 1 (DT_STRING = 7); tensor_shape = 2 (scalar: empty);
            // string_val = 8 }
            let mut tensor = Vec::new();
            pb::uint(&mut tensor, 1, 7);
            pb::bytes(&mut tensor, 2, &[]);
            pb::bytes(&mut tensor, 8, text.as_bytes());
            // SummaryMetadata { plugin_data = 1: PluginData { plugin_name = 1 } }
            let mut plugin = Vec::new();
            pb::bytes(&mut plugin, 1, b"text");
            let mut meta = Vec::new();
            pb::bytes(&mut meta, 1, &plugin);
            pb::bytes(&mut v, 9, &meta);
            pb::bytes(&mut v, 8, &tensor);
        }
    }
    v
}

/// `Event { wall_time = 1; step = 2; file_version = 3 | summary = 5 }`.
pub fn encode_event(wall_time: f64, step: i64, values: &[(&str, Value)]) -> Vec<u8> {
    let mut e = Vec::new();
    pb::double(&mut e, 1, wall_time);
    pb::uint(&mut e, 2, step as u64);
    let mut summary = Vec::new();
    for (tag, value) in values {
        pb::bytes(&mut summary, 1, &encode_value(tag, value));
    }
    pb::bytes(&mut e, 5, &summary);
    e
}

fn version_event(wall_time: f64) -> Vec<u8> {
    let mut e = Vec::new();
    pb::double(&mut e, 1, wall_time);
    pb::bytes(&mut e, 3, b"brain.Event:2");
    e
}

pub fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One event file `events.out.tfevents.<unix seconds>.grove.<pid>` in `dir`; every write is
/// flushed so TensorBoard sees a training run live.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let now = now_s();
        // A resumed run opens a new file; the pid keeps two processes in one second apart,
        // the suffix two opens of one process.
        let stem = format!(
            "events.out.tfevents.{}.grove.{}",
            now as u64,
            std::process::id()
        );
        let mut path = dir.join(&stem);
        let mut n = 1;
        while path.exists() {
            path = dir.join(format!("{stem}.{n}"));
            n += 1;
        }
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter {
            path,
            file: BufWriter::new(file),
        };
        w.record(&version_event(now))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, event: &[u8]) -> Result<()> {
        self.file
            .write_all(&frame_record(event))
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Writes one event holding `values` at `step`.
    pub fn write(&mut self, step: i64, values: &[(&str, Value)]) -> Result<()> {
        self.record(&encode_event(now_s(), step, values))
    }
}

/// The event files in `dir` (none when it does not exist).
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        if p.is_file()
            && p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".tfevents."))
        {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // RFC 3720 B.4 / the CRC catalogue's check value for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    #[allow(clippy::manual_rotate)] // the spec's own shifts, written out
    fn masked_crc_rotates_and_offsets() {
        let c = crc32c(b"abc");
        let by_hand = ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc32c(b"abc"), by_hand);
    }

    #[test]
    fn record_framing_has_length_payload_and_both_checksums() {
        let r = frame_record(b"hello");
        assert_eq!(r.len(), 8 + 4 + 5 + 4);
        assert_eq!(u64::from_le_bytes(r[0..8].try_into().unwrap()), 5);
        assert_eq!(
            u32::from_le_bytes(r[8..12].try_into().unwrap()),
            masked_crc32c(&5u64.to_le_bytes())
        );
        assert_eq!(&r[12..17], b"hello");
        assert_eq!(
            u32::from_le_bytes(r[17..21].try_into().unwrap()),
            masked_crc32c(b"hello")
        );
    }

    #[test]
    fn scalar_event_bytes_match_a_hand_encoding() {
        let e = encode_event(1.5, 300, &[("a", Value::Scalar(2.0))]);
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        // step 300 = 0b10_0101100 → varint ac 02
        want.extend_from_slice(&[0x10, 0xac, 0x02]);
        // summary (field 5, 10 bytes) ⊃ value (field 1, 8 bytes) ⊃ tag "a" (field 1, 3 bytes),
        // simple_value (field 2, key + f32 = 5 bytes)
        want.extend_from_slice(&[0x2a, 10, 0x0a, 8, 0x0a, 1, b'a', 0x15]);
        want.extend_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(e, want);
    }
}
