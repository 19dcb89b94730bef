//! GSM8K and MATH-500 JSONL loaders and their prompt templates.
//!
//! Both files hold one JSON object per line (blank lines are skipped):
//! - GSM8K: `question`, `answer`; the answer is a worked solution ending in `#### N`, and the
//!   final answer is the text after the last `#### `.
//! - MATH-500: `problem`, `solution`, `answer` (other fields are ignored).
//!
//! Errors name the file, the 1-based line number and the field. `MathProblem::index` is the
//! 0-based position among the non-blank rows of the file.

use std::path::{Path, PathBuf};

/// One math problem with its reference solution and final answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MathProblem {
    /// 0-based position among the file's non-blank rows.
    pub index: usize,
    pub question: String,
    /// The full worked solution (GSM8K `answer`, MATH `solution`).
    pub reference_solution: String,
    /// The final answer only (GSM8K: after `#### `; MATH: the `answer` field).
    pub answer: String,
}

/// Which dataset a problem comes from; decides the answer format the prompt asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    /// Final answer after `####`.
    Gsm8k,
    /// Final answer in `\boxed{}`.
    Math500,
}

/// Prompt for a base (completion) model or for a chat model (the chat template is applied
/// elsewhere; this is the user message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptStyle {
    Base,
    Chat,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not valid JSON: {message}")]
    InvalidJson {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}:{line}: expected a JSON object, found {found}")]
    NotAnObject {
        path: PathBuf,
        line: usize,
        found: &'static str,
    },
    #[error("{path}:{line}: missing field `{field}`")]
    MissingField {
        path: PathBuf,
        line: usize,
        field: &'static str,
    },
    #[error("{path}:{line}: field `{field}` should be a string, found {found}")]
    FieldNotString {
        path: PathBuf,
        line: usize,
        field: &'static str,
        found: &'static str,
    },
    #[error("{path}:{line}: field `{field}` has no `#### ` final answer")]
    NoFinalAnswer {
        path: PathBuf,
        line: usize,
        field: &'static str,
    },
    #[error("{path}: no rows (expected one JSON object per line)")]
    Empty { path: PathBuf },
}

impl From<DatasetError> for crate::error::Error {
    fn from(e: DatasetError) -> Self {
        crate::error::Error::Dataset(Box::new(e))
    }
}

/// Loads a GSM8K JSONL file (`question`, `answer` with `#### N`).
pub fn load_gsm8k(path: &Path) -> Result<Vec<MathProblem>, DatasetError> {
    parse_gsm8k(&read(path)?, path)
}

/// Loads a MATH-500 JSONL file (`problem`, `solution`, `answer`).
pub fn load_math500(path: &Path) -> Result<Vec<MathProblem>, DatasetError> {
    parse_math500(&read(path)?, path)
}

/// Loads either dataset by kind.
pub fn load(kind: DatasetKind, path: &Path) -> Result<Vec<MathProblem>, DatasetError> {
    match kind {
        DatasetKind::Gsm8k => load_gsm8k(path),
        DatasetKind::Math500 => load_math500(path),
    }
}

fn read(path: &Path) -> Result<String, DatasetError> {
    std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses GSM8K JSONL text; `path` is only used in error messages.
pub fn parse_gsm8k(text: &str, path: &Path) -> Result<Vec<MathProblem>, DatasetError> {
    parse_rows(text, path, |row, index| {
        let question = row.string("question")?;
        let solution = row.string("answer")?;
        let answer = gsm8k_final_answer(&solution).ok_or_else(|| DatasetError::NoFinalAnswer {
            path: row.path.to_path_buf(),
            line: row.line,
            field: "answer",
        })?;
        Ok(MathProblem {
            index,
            question,
            answer: answer.to_string(),
            reference_solution: solution,
        })
    })
}

/// Parses MATH-500 JSONL text; `path` is only used in error messages.
pub fn parse_math500(text: &str, path: &Path) -> Result<Vec<MathProblem>, DatasetError> {
    parse_rows(text, path, |row, index| {
        Ok(MathProblem {
            index,
            question: row.string("problem")?,
            reference_solution: row.string("solution")?,
            answer: row.string("answer")?,
        })
    })
}

/// The text after the last `#### `, trimmed; `None` when absent or empty.
pub fn gsm8k_final_answer(solution: &str) -> Option<&str> {
    let (_, tail) = solution.rsplit_once("#### ")?;
    let answer = tail.trim();
    (!answer.is_empty()).then_some(answer)
}

/// The reference solution as a model would write it, for TempSamp ground-truth injection:
/// GSM8K's calculator annotations (`<<48/2=24>>`) removed, since no model is asked to write
/// them (the `#### N` line stays: it is the marked answer the verifier reads); MATH solutions
/// as written (they end in `\boxed{}`).
pub fn reference_response(problem: &MathProblem, task: DatasetKind) -> String {
    let solution = problem.reference_solution.trim();
    match task {
        DatasetKind::Gsm8k => {
            let mut out = String::with_capacity(solution.len());
            let mut rest = solution;
            while let Some(start) = rest.find("<<") {
                match rest[start..].find(">>") {
                    Some(len) => {
                        out.push_str(&rest[..start]);
                        rest = &rest[start + len + 2..];
                    }
                    None => break,
                }
            }
            out.push_str(rest);
            out
        }
        DatasetKind::Math500 => solution.to_string(),
    }
}

/// One parsed line with the context needed for error messages.
struct Row<'a> {
    object: serde_json::Map<String, serde_json::Value>,
    path: &'a Path,
    line: usize,
}

impl Row<'_> {
    fn string(&self, field: &'static str) -> Result<String, DatasetError> {
        match self.object.get(field) {
            None => Err(DatasetError::MissingField {
                path: self.path.to_path_buf(),
                line: self.line,
                field,
            }),
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(DatasetError::FieldNotString {
                path: self.path.to_path_buf(),
                line: self.line,
                field,
                found: crate::error::json_kind(other),
            }),
        }
    }
}

fn parse_rows(
    text: &str,
    path: &Path,
    make: impl Fn(&Row<'_>, usize) -> Result<MathProblem, DatasetError>,
) -> Result<Vec<MathProblem>, DatasetError> {
    let mut problems = Vec::new();
    for (line_index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_number = line_index + 1;
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| DatasetError::InvalidJson {
                path: path.to_path_buf(),
                line: line_number,
                message: e.to_string(),
            })?;
        let object = match value {
            serde_json::Value::Object(map) => map,
            other => {
                return Err(DatasetError::NotAnObject {
                    path: path.to_path_buf(),
                    line: line_number,
                    found: crate::error::json_kind(&other),
                })
            }
        };
        let row = Row {
            object,
            path,
            line: line_number,
        };
        problems.push(make(&row, problems.len())?);
    }
    if problems.is_empty() {
        return Err(DatasetError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(problems)
}

/// The prompt text for one problem. Base: a short instruction, then `Question: ...\nAnswer:`.
/// Chat: the user message asking for step-by-step reasoning and the dataset's answer format.
pub fn render_prompt(problem: &MathProblem, style: PromptStyle, task: DatasetKind) -> String {
    let question = problem.question.trim();
    match (style, task) {
        (PromptStyle::Base, DatasetKind::Gsm8k) => format!(
            "Solve the problem. End with \"#### <answer>\".\n\nQuestion: {question}\nAnswer:"
        ),
        (PromptStyle::Base, DatasetKind::Math500) => format!(
            "Solve the problem. Put the final answer in \\boxed{{}}.\n\nQuestion: {question}\nAnswer:"
        ),
        (PromptStyle::Chat, DatasetKind::Gsm8k) => format!(
            "{question}\n\nPlease reason step by step, and put your final answer after \"####\"."
        ),
        (PromptStyle::Chat, DatasetKind::Math500) => format!(
            "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `../shared/data` beside the crate, else the shared folder of the workspace.
    fn data_dir() -> PathBuf {
        let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
        if beside.is_dir() {
            beside
        } else {
            PathBuf::from("/work/shared/data")
        }
    }

    fn p() -> &'static Path {
        Path::new("mem.jsonl")
    }

    #[test]
    fn reference_response_drops_calculator_annotations_only() {
        let p = |sol: &str| MathProblem {
            index: 0,
            question: "q".into(),
            reference_solution: sol.into(),
            answer: "5".into(),
        };
        assert_eq!(
            reference_response(&p("2+3 = <<2+3=5>>5 <<x>>and\n#### 5"), DatasetKind::Gsm8k),
            "2+3 = 5 and\n#### 5"
        );
        // An unclosed annotation is left as written; MATH solutions are kept whole.
        assert_eq!(
            reference_response(&p("a <<b\n#### 5"), DatasetKind::Gsm8k),
            "a <<b\n#### 5"
        );
        assert_eq!(
            reference_response(&p(" x <<y>> \\boxed{5} "), DatasetKind::Math500),
            "x <<y>> \\boxed{5}"
        );
    }

    #[test]
    fn loads_real_gsm8k_test_split() {
        let rows = load_gsm8k(&data_dir().join("gsm8k/test.jsonl")).unwrap();
        assert_eq!(rows.len(), 1319); // data/README.md: 1319 test rows
        let first = &rows[0];
        assert_eq!(first.index, 0);
        assert!(first
            .question
            .starts_with("Janet\u{2019}s ducks lay 16 eggs"));
        assert_eq!(first.answer, "18"); // "... #### 18"
        assert!(first.reference_solution.ends_with("#### 18"));
        assert_eq!(rows[1318].index, 1318);
        assert!(rows
            .iter()
            .all(|r| !r.answer.is_empty() && !r.answer.contains('#')));
    }

    #[test]
    fn loads_real_gsm8k_train_split() {
        let rows = load_gsm8k(&data_dir().join("gsm8k/train.jsonl")).unwrap();
        assert_eq!(rows.len(), 7473); // data/README.md: 7473 train rows
    }

    #[test]
    fn loads_real_math500() {
        let rows = load_math500(&data_dir().join("math500/test.jsonl")).unwrap();
        assert_eq!(rows.len(), 500);
        let first = &rows[0];
        assert!(first.question.starts_with("Convert the point $(0,3)$"));
        assert_eq!(first.answer, "\\left( 3, \\frac{\\pi}{2} \\right)");
        assert!(first.reference_solution.contains("\\boxed{"));
        let by_kind = load(DatasetKind::Math500, &data_dir().join("math500/test.jsonl")).unwrap();
        assert_eq!(by_kind, rows);
    }

    #[test]
    fn gsm8k_answer_is_text_after_last_hashes() {
        let text = "{\"question\":\"q\",\"answer\":\"a #### 3\\nmore\\n#### 1,000 \"}\n";
        let rows = parse_gsm8k(text, p()).unwrap();
        assert_eq!(rows[0].answer, "1,000");
        assert_eq!(gsm8k_final_answer("x #### "), None);
        assert_eq!(gsm8k_final_answer("x ####5"), None); // needs "#### " with the space
    }

    #[test]
    fn blank_lines_are_skipped_and_index_counts_rows() {
        let text = "\n{\"question\":\"a\",\"answer\":\"#### 1\"}\n\n  \n{\"question\":\"b\",\"answer\":\"#### 2\"}\n";
        let rows = parse_gsm8k(text, p()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[1].index, rows[1].answer.as_str()), (1, "2"));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let missing = "{\"question\":\"a\",\"answer\":\"#### 1\"}\n{\"question\":\"b\"}\n";
        let e = parse_gsm8k(missing, p()).unwrap_err();
        assert!(matches!(
            e,
            DatasetError::MissingField {
                line: 2,
                field: "answer",
                ..
            }
        ));
        assert_eq!(e.to_string(), "mem.jsonl:2: missing field `answer`");

        let e = parse_gsm8k("{\"question\":\"a\",\"answer\":\"just 5\"}", p()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mem.jsonl:1: field `answer` has no `#### ` final answer"
        );

        let e = parse_gsm8k("\n\n{\"question\": oops}", p()).unwrap_err();
        assert!(matches!(e, DatasetError::InvalidJson { line: 3, .. }));
        assert!(e.to_string().starts_with("mem.jsonl:3: not valid JSON: "));

        let e =
            parse_math500("{\"problem\":\"p\",\"solution\":\"s\",\"answer\":5}", p()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mem.jsonl:1: field `answer` should be a string, found a number"
        );

        let e = parse_math500("[1,2]", p()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mem.jsonl:1: expected a JSON object, found an array"
        );

        let e = parse_math500("{\"problem\":\"p\",\"answer\":\"1\"}", p()).unwrap_err();
        assert!(matches!(
            e,
            DatasetError::MissingField {
                field: "solution",
                ..
            }
        ));

        let e = parse_math500(" \n", p()).unwrap_err();
        assert!(matches!(e, DatasetError::Empty { .. }));
    }

    #[test]
    fn missing_file_is_an_io_error_naming_the_path() {
        let path = Path::new("/nonexistent/grove/gsm8k.jsonl");
        let e = load_gsm8k(path).unwrap_err();
        assert!(matches!(e, DatasetError::Io { .. }));
        assert!(e
            .to_string()
            .starts_with("cannot read /nonexistent/grove/gsm8k.jsonl: "));
    }

    #[test]
    fn prompt_templates() {
        let problem = MathProblem {
            index: 0,
            question: " What is 2+3? ".to_string(),
            reference_solution: "2+3=5\n#### 5".to_string(),
            answer: "5".to_string(),
        };
        assert_eq!(
            render_prompt(&problem, PromptStyle::Base, DatasetKind::Gsm8k),
            "Solve the problem. End with \"#### <answer>\".\n\nQuestion: What is 2+3?\nAnswer:"
        );
        assert_eq!(
            render_prompt(&problem, PromptStyle::Base, DatasetKind::Math500),
            "Solve the problem. Put the final answer in \\boxed{}.\n\nQuestion: What is 2+3?\nAnswer:"
        );
        assert_eq!(
            render_prompt(&problem, PromptStyle::Chat, DatasetKind::Gsm8k),
            "What is 2+3?\n\nPlease reason step by step, and put your final answer after \"####\"."
        );
        assert_eq!(
            render_prompt(&problem, PromptStyle::Chat, DatasetKind::Math500),
            "What is 2+3?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
        );
    }
}
