//! Dataset files as rows of JSON values, the format chosen by the file's extension
//! ([`FORMATS`]): JSON lines, a JSON array, CSV with a header row, or Parquet.
//!
//! Every row keeps where it came from ([`RowAt`]: the 1-based line of a JSONL or CSV file,
//! the 1-based element or row of a JSON array or Parquet file), so that any later error can
//! name the file and the row. CSV cells are strings; Parquet rows become JSON objects through
//! the `parquet` crate's record API (nested groups are objects, lists are arrays).
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// How a file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    JsonArray,
    Csv,
    Parquet,
}

/// The known extensions, the format each selects and what the file must hold. Errors and
/// docs list these.
pub const FORMATS: &[(&str, Format, &str)] = &[
    ("jsonl", Format::Jsonl, "one JSON object per line"),
    ("ndjson", Format::Jsonl, "one JSON object per line"),
    ("json", Format::JsonArray, "a JSON array of objects"),
    ("csv", Format::Csv, "a header row, then one row per line"),
    (
        "parquet",
        Format::Parquet,
        "Parquet rows (snappy, lz4, gzip or uncompressed)",
    ),
];

impl Format {
    /// The format of `path` by its extension (case-insensitive); the error lists the known ones.
    pub fn of(path: &Path) -> Result<Format, RowError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        FORMATS
            .iter()
            .find(|(e, _, _)| *e == ext)
            .map(|(_, f, _)| *f)
            .ok_or_else(|| RowError::UnknownExtension {
                path: path.to_path_buf(),
                found: ext,
            })
    }

    /// What a row's position counts: lines of text files, rows or elements otherwise.
    fn unit(self) -> &'static str {
        match self {
            Format::Jsonl | Format::Csv => "line",
            Format::JsonArray => "element",
            Format::Parquet => "row",
        }
    }
}

/// The known extensions as `.jsonl, .json, ...`.
pub fn known_extensions() -> String {
    FORMATS
        .iter()
        .map(|(e, _, _)| format!(".{e}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The format table of docs/tasks.md (between its `formats` markers), from [`FORMATS`].
pub fn formats_markdown() -> String {
    let mut out = String::from("| extension | the file holds |\n|---|---|\n");
    for (ext, _, what) in FORMATS {
        out.push_str(&format!("| `.{ext}` | {what} |\n"));
    }
    out
}

/// Where a row is: `file:line 3`, `file: element 2`, `file: row 7`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowAt {
    pub path: PathBuf,
    pub unit: &'static str,
    /// 1-based.
    pub number: usize,
}

impl fmt::Display for RowAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} {}", self.path.display(), self.unit, self.number)
    }
}

/// One row of a dataset file.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRow {
    pub at: RowAt,
    pub value: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: unknown dataset extension {found:?}; known: {}",
        known_extensions()
    )]
    UnknownExtension { path: PathBuf, found: String },
    #[error("{at}: {message}")]
    Row { at: RowAt, message: String },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: no rows (expected {expected})")]
    Empty {
        path: PathBuf,
        expected: &'static str,
    },
}

/// Reads every row of `path`; an empty file is an error.
pub fn read_rows(path: &Path) -> Result<Vec<RawRow>, RowError> {
    let format = Format::of(path)?;
    let rows = match format {
        Format::Parquet => parquet_rows(path)?,
        text_format => {
            let text = std::fs::read_to_string(path).map_err(|source| RowError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            parse_text(&text, path, text_format)?
        }
    };
    if rows.is_empty() {
        let expected = FORMATS
            .iter()
            .find(|(_, f, _)| *f == format)
            .map_or("rows", |(_, _, what)| *what);
        return Err(RowError::Empty {
            path: path.to_path_buf(),
            expected,
        });
    }
    Ok(rows)
}

/// Rows of a text format (JSONL, JSON array, CSV); `path` names the file in errors.
pub fn parse_text(text: &str, path: &Path, format: Format) -> Result<Vec<RawRow>, RowError> {
    let at = |number: usize| RowAt {
        path: path.to_path_buf(),
        unit: format.unit(),
        number,
    };
    match format {
        Format::Jsonl => jsonl_rows(text, at),
        Format::JsonArray => json_array_rows(text, path, at),
        Format::Csv => csv_rows(text, path, at),
        Format::Parquet => Err(RowError::File {
            path: path.to_path_buf(),
            message: "Parquet is a binary format, not text".into(),
        }),
    }
}

fn jsonl_rows(text: &str, at: impl Fn(usize) -> RowAt) -> Result<Vec<RawRow>, RowError> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(line).map_err(|e| RowError::Row {
            at: at(i + 1),
            message: format!("not valid JSON: {e}"),
        })?;
        rows.push(RawRow {
            at: at(i + 1),
            value,
        });
    }
    Ok(rows)
}

fn json_array_rows(
    text: &str,
    path: &Path,
    at: impl Fn(usize) -> RowAt,
) -> Result<Vec<RawRow>, RowError> {
    let value: Value = serde_json::from_str(text).map_err(|e| RowError::File {
        path: path.to_path_buf(),
        message: format!("not valid JSON: {e}"),
    })?;
    match value {
        Value::Array(items) => Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, value)| RawRow {
                at: at(i + 1),
                value,
            })
            .collect()),
        other => Err(RowError::File {
            path: path.to_path_buf(),
            message: format!(
                "expected a JSON array of rows, found {}",
                json_type_name(&other)
            ),
        }),
    }
}

fn csv_rows(text: &str, path: &Path, at: impl Fn(usize) -> RowAt) -> Result<Vec<RawRow>, RowError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| RowError::File {
            path: path.to_path_buf(),
            message: format!("cannot read the CSV header row: {e}"),
        })?
        .clone();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| csv_error(e, path, &at))?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        let object = headers
            .iter()
            .zip(record.iter())
            .map(|(h, v)| (h.to_string(), Value::String(v.to_string())))
            .collect();
        rows.push(RawRow {
            at: at(line),
            value: Value::Object(object),
        });
    }
    Ok(rows)
}

/// A CSV error at its line when the parser knows it (a row with the wrong number of fields).
fn csv_error(e: csv::Error, path: &Path, at: &impl Fn(usize) -> RowAt) -> RowError {
    match e.position() {
        Some(p) => RowError::Row {
            at: at(p.line() as usize),
            message: format!("not a valid CSV row: {}", csv_message(&e)),
        },
        None => RowError::File {
            path: path.to_path_buf(),
            message: format!("not valid CSV: {e}"),
        },
    }
}

fn csv_message(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("expected {expected_len} fields (as in the header row), found {len}"),
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".into(),
        _ => e.to_string(),
    }
}

fn parquet_rows(path: &Path) -> Result<Vec<RawRow>, RowError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file_err = |message: String| RowError::File {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|source| RowError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| file_err(format!("not a readable Parquet file: {e}")))?;
    let iter = reader
        .get_row_iter(None)
        .map_err(|e| file_err(format!("cannot read Parquet rows: {e}")))?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let at = RowAt {
            path: path.to_path_buf(),
            unit: Format::Parquet.unit(),
            number: i + 1,
        };
        let row = row.map_err(|e| RowError::Row {
            at: at.clone(),
            message: format!("cannot decode the row: {e}"),
        })?;
        rows.push(RawRow {
            at,
            value: row.to_json_value(),
        });
    }
    Ok(rows)
}

/// "a string", "a number", ... for messages.
pub fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> PathBuf {
        PathBuf::from(name)
    }

    #[test]
    fn format_by_extension_and_unknown_lists_the_known() {
        assert_eq!(Format::of(&p("a.JSONL")).unwrap(), Format::Jsonl);
        assert_eq!(Format::of(&p("a.json")).unwrap(), Format::JsonArray);
        assert_eq!(Format::of(&p("x/a.csv")).unwrap(), Format::Csv);
        assert_eq!(Format::of(&p("a.parquet")).unwrap(), Format::Parquet);
        let e = Format::of(&p("data.txt")).unwrap_err().to_string();
        assert_eq!(
            e,
            "data.txt: unknown dataset extension \"txt\"; known: .jsonl, .ndjson, .json, .csv, .parquet"
        );
        assert!(Format::of(&p("noext"))
            .unwrap_err()
            .to_string()
            .contains("\"\""));
    }

    #[test]
    fn jsonl_rows_keep_their_line_and_errors_name_it() {
        let rows = parse_text("\n{\"a\":1}\n\n{\"a\":2}\n", &p("d.jsonl"), Format::Jsonl).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].at.to_string(), "d.jsonl: line 4");
        assert_eq!(rows[1].value["a"], 2);
        let e = parse_text("{\"a\":1}\n{\"a\": oops}\n", &p("d.jsonl"), Format::Jsonl)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("d.jsonl: line 2: not valid JSON: "), "{e}");
    }

    #[test]
    fn json_array_rows_are_numbered_elements() {
        let rows = parse_text("[{\"a\":1},{\"b\":2}]", &p("d.json"), Format::JsonArray).unwrap();
        assert_eq!(rows[1].at.to_string(), "d.json: element 2");
        let e = parse_text("{\"a\":1}", &p("d.json"), Format::JsonArray)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "d.json: expected a JSON array of rows, found an object");
    }

    #[test]
    fn csv_rows_are_string_objects_at_their_line() {
        let text = "q,sol\n12+34=,46\n\"1,2\",3\n";
        let rows = parse_text(text, &p("d.csv"), Format::Csv).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0].value,
            serde_json::json!({"q": "12+34=", "sol": "46"})
        );
        assert_eq!(rows[1].at.to_string(), "d.csv: line 3");
        assert_eq!(rows[1].value["q"], "1,2");
        let e = parse_text("q,sol\n1,2\n3\n", &p("d.csv"), Format::Csv)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "d.csv: line 3: not a valid CSV row: expected 2 fields (as in the header row), found 1"
        );
    }

    #[test]
    fn empty_files_are_errors_naming_what_was_expected() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("e.jsonl", "\n  \n"),
            ("e.json", "[]"),
            ("e.csv", "q,sol\n"),
        ] {
            let f = dir.path().join(name);
            std::fs::write(&f, text).unwrap();
            let e = read_rows(&f).unwrap_err();
            assert!(matches!(e, RowError::Empty { .. }), "{name}: {e}");
            assert!(e.to_string().contains("no rows"), "{e}");
        }
        let e = read_rows(&dir.path().join("missing.csv"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read ") && e.contains("missing.csv"),
            "{e}"
        );
    }

    #[test]
    fn parquet_rows_with_nested_groups_read_back_as_objects() {
        use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        use std::sync::Arc;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.parquet");
        let schema = parse_message_type(
            "message m { REQUIRED GROUP q { REQUIRED BYTE_ARRAY text (UTF8); } \
             REQUIRED INT64 n; }",
        )
        .unwrap();
        let file = std::fs::File::create(&path).unwrap();
        let props = Arc::new(WriterProperties::builder().build());
        let mut w = SerializedFileWriter::new(file, Arc::new(schema), props).unwrap();
        let mut rg = w.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let texts: Vec<ByteArray> = ["1+2=", "3+4="].iter().map(|s| (*s).into()).collect();
        col.typed::<ByteArrayType>()
            .write_batch(&texts, None, None)
            .unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<Int64Type>()
            .write_batch(&[3, 7], None, None)
            .unwrap();
        col.close().unwrap();
        rg.close().unwrap();
        w.close().unwrap();

        let rows = read_rows(&path).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[1].value,
            serde_json::json!({"q": {"text": "3+4="}, "n": 7})
        );
        assert_eq!(rows[1].at.number, 2);
        assert!(rows[1].at.to_string().ends_with("d.parquet: row 2"));

        std::fs::write(&path, b"not parquet").unwrap();
        let e = read_rows(&path).unwrap_err().to_string();
        assert!(e.contains("d.parquet: not a readable Parquet file"), "{e}");
    }
}
