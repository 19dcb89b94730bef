//! `grove verify`: score existing model outputs with the math verifier, so outputs of any
//! system can be judged the way grove judges its own.
//!
//! - responses mode: one JSON object per line with the dataset row `index` and the `response`
//!   text, judged against that row's reference answer (GSM8K: after `#### `; MATH-500: the
//!   `answer` field);
//! - pairs mode: one JSON object per line with `response` and `reference` (a final answer).
//!
//! Blank lines are skipped; every error names the file and the 1-based line.
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::reward::math::MathVerifier;
use crate::reward::Verdict;
use crate::task::datasets::{self, DatasetKind};

/// Where the datasets live by default, relative to the current directory (the layout of a
/// grove checkout next to `shared/data`).
pub fn default_data_path(kind: DatasetKind) -> PathBuf {
    match kind {
        DatasetKind::Gsm8k => PathBuf::from("../shared/data/gsm8k/test.jsonl"),
        DatasetKind::Math500 => PathBuf::from("../shared/data/math500/test.jsonl"),
    }
}

/// Parses a task name: `gsm8k` or `math500`.
pub fn parse_dataset(name: &str) -> Result<DatasetKind> {
    match name {
        "gsm8k" => Ok(DatasetKind::Gsm8k),
        "math500" | "math-500" => Ok(DatasetKind::Math500),
        other => Err(Error::UnknownName {
            kind: "task",
            name: other.to_string(),
            known: "gsm8k or math500".into(),
        }),
    }
}

/// Loads a dataset, with a hint about `--data` when the file is missing.
pub fn load_dataset(kind: DatasetKind, path: &Path) -> Result<Vec<datasets::MathProblem>> {
    if !path.exists() {
        return Err(Error::Input {
            at: path.display().to_string(),
            msg: "the dataset file does not exist (pass --data PATH)".into(),
        });
    }
    Ok(datasets::load(kind, path)?)
}

/// The accuracy over all judged lines.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifySummary {
    pub total: usize,
    pub correct: usize,
    pub accuracy: f64,
}

impl VerifySummary {
    fn of(verdicts: &[Verdict]) -> Self {
        let correct = verdicts.iter().filter(|v| v.score > 0.5).count();
        let total = verdicts.len();
        VerifySummary {
            total,
            correct,
            accuracy: if total == 0 {
                0.0
            } else {
                correct as f64 / total as f64
            },
        }
    }
}

impl std::fmt::Display for VerifySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accuracy: {:.4} ({}/{})",
            self.accuracy, self.correct, self.total
        )
    }
}

/// One line's verdict as printed in pairs mode: the verdict and its audit (what was
/// extracted and by which rule, how both sides were parsed, which rule decided and why).
#[derive(Debug, Clone, Serialize)]
pub struct LineVerdict {
    pub line: usize,
    pub correct: bool,
    pub score: f64,
    /// The equivalence rule that decided (docs/verifier.md lists them).
    pub rule: &'static str,
    pub reason: String,
    /// The answer found in the response.
    pub extracted: Option<String>,
    /// The extraction rule that found it (`boxed`, `hashes`, `answer-marker`, ...).
    pub extracted_by: Option<&'static str>,
    pub parsed_response: Option<String>,
    pub parsed_reference: String,
}

/// Non-blank lines of a JSONL file as (1-based line number, JSON object).
fn jsonl_objects(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, serde_json::Value>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let file = path.display();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Input {
            at: format!("{file}:{n}"),
            msg: format!("not valid JSON: {e}"),
        })?;
        match v {
            serde_json::Value::Object(o) => out.push((n, o)),
            other => {
                return Err(Error::Input {
                    at: format!("{file}:{n}"),
                    msg: format!(
                        "expected a JSON object, found {}",
                        crate::error::json_kind(&other)
                    ),
                })
            }
        }
    }
    if out.is_empty() {
        return Err(Error::Input {
            at: file.to_string(),
            msg: "no lines (expected one JSON object per line)".into(),
        });
    }
    Ok(out)
}

fn string_field<'a>(
    o: &'a serde_json::Map<String, serde_json::Value>,
    field: &str,
    path: &Path,
    line: usize,
) -> Result<&'a str> {
    match o.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(Error::Input {
            at: format!("{}:{line}", path.display()),
            msg: format!(
                "field `{field}` should be a string, found {}",
                crate::error::json_kind(other)
            ),
        }),
        None => Err(Error::Input {
            at: format!("{}:{line}", path.display()),
            msg: format!("missing field `{field}`"),
        }),
    }
}

/// Judges every line of `responses` against the reference answers of `problems`.
pub fn verify_responses(
    problems: &[datasets::MathProblem],
    data_path: &Path,
    responses: &Path,
    verifier: &MathVerifier,
) -> Result<VerifySummary> {
    let mut verdicts = Vec::new();
    for (line, o) in jsonl_objects(responses)? {
        let file = responses.display();
        let index = match o.get("index") {
            Some(v) => v.as_u64().ok_or_else(|| Error::Input {
                at: format!("{file}:{line}"),
                msg: format!("field `index` should be a non-negative integer, found {v}"),
            })?,
            None => {
                return Err(Error::Input {
                    at: format!("{file}:{line}"),
                    msg: "missing field `index`".into(),
                })
            }
        };
        let problem = usize::try_from(index)
            .ok()
            .and_then(|i| problems.get(i))
            .ok_or_else(|| Error::Input {
                at: format!("{file}:{line}"),
                msg: format!(
                    "index {index} is out of range: {} has {} rows (0..{})",
                    data_path.display(),
                    problems.len(),
                    problems.len()
                ),
            })?;
        let response = string_field(&o, "response", responses, line)?;
        verdicts.push(verifier.verify(response, &problem.answer));
    }
    Ok(VerifySummary::of(&verdicts))
}

/// Judges `response` against `reference` on every line, writing each verdict as a JSON line.
pub fn verify_pairs(
    pairs: &Path,
    verifier: &MathVerifier,
    out: &mut dyn Write,
) -> Result<VerifySummary> {
    let mut verdicts = Vec::new();
    for (line, o) in jsonl_objects(pairs)? {
        let response = string_field(&o, "response", pairs, line)?;
        let reference = string_field(&o, "reference", pairs, line)?;
        let d = verifier.decide(response, reference);
        let v = d.verdict();
        let printed = LineVerdict {
            line,
            correct: d.correct,
            score: v.score,
            rule: d.rule,
            reason: d.reason,
            extracted: v.extracted.clone(),
            extracted_by: d.extracted.map(|e| e.source.name()),
            parsed_response: d.parsed_response,
            parsed_reference: d.parsed_reference,
        };
        writeln!(out, "{}", serde_json::to_string(&printed)?)
            .map_err(|e| Error::io("<stdout>", e))?;
        verdicts.push(v);
    }
    Ok(VerifySummary::of(&verdicts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn pairs_print_verdicts_and_accuracy() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "pairs.jsonl",
            "{\"response\": \"so the answer is \\\\boxed{\\\\frac{1}{3}}\", \"reference\": \"12/36\"}\n\n\
             {\"response\": \"#### 7\", \"reference\": \"8\"}\n",
        );
        let mut out = Vec::new();
        let s = verify_pairs(&p, &MathVerifier::default(), &mut out).unwrap();
        assert_eq!((s.correct, s.total), (1, 2));
        assert_eq!(s.to_string(), "accuracy: 0.5000 (1/2)");
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["score"], 1.0);
        assert_eq!(lines[0]["correct"], true);
        assert_eq!(lines[1]["correct"], false);
        assert_eq!(lines[0]["extracted"], "\\frac{1}{3}");
        assert_eq!(lines[0]["extracted_by"], "boxed");
        assert_eq!(lines[0]["rule"], "exact-rational");
        assert_eq!(lines[0]["parsed_response"], "expr 1/3");
        assert_eq!(lines[0]["parsed_reference"], "expr 12/36 = 1/3");
        assert_eq!(lines[1]["extracted_by"], "hashes");
        assert_eq!(lines[1]["line"], 3); // the blank line 2 is skipped but counted
        assert!(lines[1]["reason"].as_str().unwrap().contains("mismatch"));
    }

    #[test]
    fn errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let problems = datasets::parse_gsm8k(
            "{\"question\":\"q\",\"answer\":\"x #### 5\"}\n",
            Path::new("data.jsonl"),
        )
        .unwrap();
        let v = MathVerifier::default();
        let cases = [
            (
                "{\"index\": 0, \"response\": \"5\"}\n{\"index\": 1, \"response\": \"5\"}",
                ":2: index 1 is out of range: data.jsonl has 1 rows",
            ),
            (
                "{\"index\": -1, \"response\": \"5\"}",
                ":1: field `index` should be a non-negative integer, found -1",
            ),
            ("{\"response\": \"5\"}", ":1: missing field `index`"),
            (
                "{\"index\": 0, \"response\": 5}",
                ":1: field `response` should be a string, found a number",
            ),
            ("\n{\"index\": 0,", ":2: not valid JSON"),
            ("[1]", ":1: expected a JSON object, found an array"),
            ("\n\n", "no lines"),
        ];
        for (text, expected) in cases {
            let p = write(dir.path(), "r.jsonl", text);
            let e = verify_responses(&problems, Path::new("data.jsonl"), &p, &v)
                .unwrap_err()
                .to_string();
            assert!(e.contains("r.jsonl") && e.contains(expected), "{e}");
        }
        let p = write(
            dir.path(),
            "r.jsonl",
            "{\"index\": 0, \"response\": \"it is 5\"}",
        );
        let s = verify_responses(&problems, Path::new("data.jsonl"), &p, &v).unwrap();
        assert_eq!((s.correct, s.total), (1, 1));
    }
}
