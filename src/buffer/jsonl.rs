//! Offline experience files: one [`ExperienceGroup`] as JSON per line
//! (schema: `docs/experience-schema.md`). `grove explore --out FILE.jsonl` appends with
//! [`write_groups`]; `grove train --offline FILE.jsonl` loads with [`read_groups`].
//! Each line is written with one `write` call and flushed, so a killed explorer leaves at most
//! one partial last line, which `read_groups` reports by line number.
use super::{ExperienceError, ExperienceGroup};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `field` is a path such as `experiences[1].reward`, or `group` / `json` when the problem
    /// is the line as a whole.
    #[error("{path} line {line}, {field}: {msg}", path = path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        field: String,
        msg: String,
    },
    #[error("{path} line {line}, {source}", path = path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        #[source]
        source: ExperienceError,
    },
    #[error("writing {path}: group #{index} (0-based) not written: {source}", path = path.display())]
    InvalidWrite {
        path: PathBuf,
        index: usize,
        #[source]
        source: ExperienceError,
    },
}

impl From<JsonlError> for crate::error::Error {
    fn from(e: JsonlError) -> Self {
        crate::error::Error::Buffer(Box::new(e))
    }
}

/// Appends `groups` to `path` (created if missing), one JSON line each, flushed per line.
/// Every group is validated first, so nothing is written if any is unfit (NaN would become null).
pub fn write_groups(path: &Path, groups: &[ExperienceGroup]) -> Result<(), JsonlError> {
    let io_error = |source| JsonlError::Io {
        path: path.to_path_buf(),
        source,
    };
    for (index, group) in groups.iter().enumerate() {
        group
            .validate()
            .map_err(|source| JsonlError::InvalidWrite {
                path: path.to_path_buf(),
                index,
                source,
            })?;
    }
    // A partial last line left by a killed writer would fuse with the next group.
    if let Some(t) = crate::report::torn::repair_torn_tail(path).map_err(io_error)? {
        eprintln!("warning: {t}");
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_error)?;
    for group in groups {
        let mut line = serde_json::to_string(group)
            .map_err(|e| io_error(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        line.push('\n');
        file.write_all(line.as_bytes()).map_err(io_error)?;
        file.flush().map_err(io_error)?;
    }
    Ok(())
}

/// Reads every group of `path`; blank lines are skipped. The first bad line stops the read with
/// an error naming the file, the 1-based line number and the field.
pub fn read_groups(path: &Path) -> Result<Vec<ExperienceGroup>, JsonlError> {
    let io_error = |source| JsonlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_error)?;
    let mut groups = Vec::new();
    for (index, text) in BufReader::new(file).lines().enumerate() {
        let text = text.map_err(io_error)?;
        let line = index + 1;
        if text.trim().is_empty() {
            continue;
        }
        let group = parse_line(&text).map_err(|(field, msg)| JsonlError::Parse {
            path: path.to_path_buf(),
            line,
            field,
            msg,
        })?;
        group.validate().map_err(|source| JsonlError::Invalid {
            path: path.to_path_buf(),
            line,
            source,
        })?;
        groups.push(group);
    }
    Ok(groups)
}

/// [`read_groups`] for training: also checks every token id against the policy's vocabulary
/// and that the file holds at least `groups_per_step` groups (one step), so nothing trains on
/// data that cannot be used. Errors name the file and line.
pub fn read_offline(
    path: &Path,
    vocab_size: usize,
    groups_per_step: usize,
) -> Result<Vec<ExperienceGroup>, JsonlError> {
    let groups = read_groups(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| JsonlError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // Line numbers of the non-blank lines, in the order read_groups returned their groups.
    let lines: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, t)| !t.trim().is_empty())
        .map(|(i, _)| i + 1)
        .collect();
    for (group, &line) in groups.iter().zip(&lines) {
        for (index, e) in group.experiences.iter().enumerate() {
            for (field, ids) in [
                ("prompt_ids", &e.prompt_ids),
                ("response_ids", &e.response_ids),
            ] {
                if let Some((j, id)) = ids
                    .iter()
                    .enumerate()
                    .find(|(_, &t)| t as usize >= vocab_size)
                {
                    return Err(JsonlError::Parse {
                        path: path.to_path_buf(),
                        line,
                        field: format!("experiences[{index}].{field}[{j}]"),
                        msg: format!(
                            "token id {id} is outside the policy's vocabulary of {vocab_size}"
                        ),
                    });
                }
            }
        }
    }
    if groups.len() < groups_per_step {
        return Err(JsonlError::Parse {
            path: path.to_path_buf(),
            line: lines.last().copied().unwrap_or(0),
            field: "file".into(),
            msg: format!(
                "{} groups, fewer than one step needs (rollout.prompts_per_step = \
                 {groups_per_step}): nothing would be trained",
                groups.len()
            ),
        });
    }
    Ok(groups)
}

/// One line → a group, or (field path, serde's message).
fn parse_line(text: &str) -> Result<ExperienceGroup, (String, String)> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| ("json".to_string(), e.to_string()))?;
    ExperienceGroup::deserialize(&value).map_err(|e| (locate_error(&value), e.to_string()))
}

/// Finds where a line that failed to deserialize went wrong: serde's message names a missing or
/// unknown field but not where a wrongly typed value sits, so each part is re-checked alone.
fn locate_error(value: &Value) -> String {
    let Some(object) = value.as_object() else {
        return "group".to_string();
    };
    for (name, field) in object {
        if !group_field_fits(name, field) {
            return name.clone();
        }
    }
    let experiences = object.get("experiences").and_then(Value::as_array);
    for (index, experience) in experiences.into_iter().flatten().enumerate() {
        if fits::<super::Experience>(experience) {
            continue;
        }
        let bad_field = experience.as_object().and_then(|fields| {
            fields
                .iter()
                .find(|(name, field)| !experience_field_fits(name, field))
        });
        return match bad_field {
            Some((name, _)) => format!("experiences[{index}].{name}"),
            None => format!("experiences[{index}]"),
        };
    }
    "group".to_string()
}

fn fits<T: DeserializeOwned>(value: &Value) -> bool {
    T::deserialize(value).is_ok()
}

/// Mirrors the field types of `ExperienceGroup`; unknown names pass (serde names those itself).
fn group_field_fits(name: &str, value: &Value) -> bool {
    match name {
        "group_id" | "policy_version" => fits::<u64>(value),
        "experiences" => fits::<Vec<Value>>(value),
        _ => true,
    }
}

/// Mirrors the field types of `Experience`; unknown names pass (serde names those itself).
fn experience_field_fits(name: &str, value: &Value) -> bool {
    match name {
        "group_id" | "policy_version" => fits::<u64>(value),
        "prompt" | "answer" => fits::<String>(value),
        "prompt_ids" | "response_ids" => fits::<Vec<u32>>(value),
        "logprobs" => fits::<Vec<f32>>(value),
        "reward" => fits::<f64>(value),
        "components" => fits::<BTreeMap<String, f64>>(value),
        "finished" => fits::<bool>(value),
        "use_count" => fits::<u32>(value),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::super::experience::tests::sample_group;
    use super::*;

    /// A unique file path under the system temp dir, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            TempFile(std::env::temp_dir().join(format!(
                "grove-jsonl-{name}-{}-{nanos}.jsonl",
                std::process::id()
            )))
        }

        fn with_text(name: &str, text: &str) -> Self {
            let file = TempFile::new(name);
            std::fs::write(&file.0, text).unwrap();
            file
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn good_line() -> String {
        serde_json::to_string(&sample_group(1, 0, 2)).unwrap()
    }

    /// The error of reading a file whose second line is `bad` (first line valid).
    fn error_for_second_line(bad: &str) -> String {
        let file = TempFile::with_text("bad", &format!("{}\n{bad}\n", good_line()));
        let message = read_groups(&file.0).unwrap_err().to_string();
        let prefix = format!("{} line 2, ", file.0.display());
        assert!(message.starts_with(&prefix), "{message}");
        message[prefix.len()..].to_string()
    }

    #[test]
    fn round_trip_appends_across_calls() {
        let file = TempFile::new("round");
        let first = vec![sample_group(1, 0, 3), sample_group(2, 0, 1)];
        let second = vec![sample_group(3, 1, 2)];
        write_groups(&file.0, &first).unwrap();
        write_groups(&file.0, &second).unwrap();
        let read = read_groups(&file.0).unwrap();
        assert_eq!(read, [first, second].concat());
        let text = std::fs::read_to_string(&file.0).unwrap();
        assert_eq!(text.lines().count(), 3); // one group per line
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn empty_file_and_blank_lines_are_fine() {
        let file = TempFile::with_text("blank", &format!("\n{}\n\n", good_line()));
        assert_eq!(read_groups(&file.0).unwrap().len(), 1);
        let empty = TempFile::with_text("empty", "");
        assert_eq!(read_groups(&empty.0).unwrap(), vec![]);
    }

    #[test]
    fn missing_file_names_the_path() {
        let file = TempFile::new("missing");
        let message = read_groups(&file.0).unwrap_err().to_string();
        assert!(
            message.starts_with(&file.0.display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn wrong_type_names_the_nested_field() {
        let bad = good_line().replacen("\"reward\":1.0", "\"reward\":\"high\"", 1);
        assert_eq!(
            error_for_second_line(&bad),
            "experiences[1].reward: invalid type: string \"high\", expected f64"
        );
        let bad = good_line().replacen("\"response_ids\":[8,5,1]", "\"response_ids\":[8,-5,1]", 1);
        assert_eq!(
            error_for_second_line(&bad),
            "experiences[0].response_ids: invalid value: integer `-5`, expected u32"
        );
        let bad = good_line().replacen("\"policy_version\":0", "\"policy_version\":\"v0\"", 1);
        assert_eq!(
            error_for_second_line(&bad),
            "policy_version: invalid type: string \"v0\", expected u64"
        );
    }

    #[test]
    fn missing_and_unknown_fields_are_named_by_serde() {
        let bad = good_line().replacen("\"answer\":\"85\",", "", 1);
        assert_eq!(
            error_for_second_line(&bad),
            "experiences[0]: missing field `answer`"
        );
        let bad = good_line().replacen("\"group_id\":1,", "\"group_id\":1,\"grup\":2,", 1);
        let message = error_for_second_line(&bad);
        assert!(
            message.starts_with("group: unknown field `grup`, expected one of"),
            "{message}"
        );
    }

    #[test]
    fn appending_after_a_killed_writer_starts_a_fresh_line() {
        let line = good_line();
        // A writer killed mid-line left half a group without its newline.
        let file = TempFile::with_text("torn", &format!("{line}\n{}", &line[..line.len() / 2]));
        write_groups(&file.0, &[sample_group(7, 0, 2)]).unwrap();
        let read = read_groups(&file.0).unwrap();
        assert_eq!(
            read.len(),
            2,
            "the new group is not fused into the torn line"
        );
        assert_eq!(read[1].group_id, 7);
        let torn = crate::report::torn::torn_path(&file.0);
        assert_eq!(
            std::fs::read_to_string(&torn).unwrap(),
            format!("{}\n", &line[..line.len() / 2])
        );
        let _ = std::fs::remove_file(torn);
    }

    #[test]
    fn offline_data_is_checked_against_the_vocabulary_and_the_step() {
        let line = good_line();
        let file = TempFile::with_text("offline", &format!("{line}\n\n{line}\n"));
        assert_eq!(read_offline(&file.0, 100, 2).unwrap().len(), 2);
        let e = read_offline(&file.0, 100, 3).unwrap_err().to_string();
        assert!(
            e.contains("line 3, file: 2 groups, fewer than one step"),
            "{e}"
        );
        let empty = TempFile::with_text("offline-empty", "");
        let e = read_offline(&empty.0, 100, 1).unwrap_err().to_string();
        assert!(e.contains("0 groups"), "{e}");
        // sample_group's prompt ids hold 11 at index 2: a vocabulary of 8 does not.
        let e = read_offline(&file.0, 8, 1).unwrap_err().to_string();
        assert!(
            e.contains(
                "line 1, experiences[0].prompt_ids[2]: token id 11 is outside the \
                        policy's vocabulary of 8"
            ),
            "{e}"
        );
        // Empty responses and positive log-probs are refused on every read.
        let bad = line.replacen("\"response_ids\":[8,5,1]", "\"response_ids\":[]", 1);
        let bad = bad.replacen("\"logprobs\":[-0.25,-1.5,-0.125]", "\"logprobs\":[]", 1);
        assert!(error_for_second_line(&bad).contains("response_ids is empty"));
        let bad = good_line().replacen("\"logprobs\":[", "\"logprobs\":[0.5,", 1);
        let bad = bad.replacen("\"response_ids\":[8,5,1]", "\"response_ids\":[8,5,1,2]", 1);
        let m = error_for_second_line(&bad);
        assert!(
            m.contains("logprobs[0] is 0.5, expected a log probability <= 0"),
            "{m}"
        );
    }

    #[test]
    fn truncated_last_line_is_reported() {
        let line = good_line();
        let truncated = &line[..line.len() / 2]; // a kill mid-write
        let message = error_for_second_line(truncated);
        assert!(message.starts_with("json: EOF while parsing"), "{message}");
        assert_eq!(
            error_for_second_line("42"),
            "group: invalid type: integer `42`, expected struct ExperienceGroup"
        );
    }

    #[test]
    fn semantically_invalid_groups_are_reported_with_the_line() {
        let mut group = sample_group(1, 0, 2);
        group.experiences[1].logprobs.pop();
        let bad = serde_json::to_string(&group).unwrap();
        assert_eq!(
            error_for_second_line(&bad),
            "group 1: experiences[1].logprobs has 2 entries, expected 3 (one per response token)"
        );
    }

    #[test]
    fn unfit_groups_are_not_written() {
        let file = TempFile::new("unfit");
        let mut bad = sample_group(2, 0, 1);
        bad.experiences[0].logprobs[0] = f32::NAN;
        let message = write_groups(&file.0, &[sample_group(1, 0, 1), bad])
            .unwrap_err()
            .to_string();
        assert!(
            message.ends_with(
                "group #1 (0-based) not written: group 2: experiences[0].logprobs[0] is NaN, \
                 expected a finite number (JSON cannot store NaN or infinity)"
            ),
            "{message}"
        );
        assert!(!file.0.exists()); // validated before anything was written
    }

    #[test]
    fn field_tables_accept_every_field_of_a_valid_group() {
        // Guards the mirrored type tables against drifting from the structs.
        let value = serde_json::to_value(sample_group(1, 0, 1)).unwrap();
        let object = value.as_object().unwrap();
        assert!(object.iter().all(|(n, v)| group_field_fits(n, v)));
        let experience = value["experiences"][0].as_object().unwrap();
        assert_eq!(experience.len(), 11);
        assert!(experience.iter().all(|(n, v)| experience_field_fits(n, v)));
        assert!(!experience_field_fits("reward", &Value::from("x")));
    }

    #[test]
    fn documented_example_line_parses() {
        let doc = include_str!("../../docs/experience-schema.md");
        let example = doc
            .split("```json\n")
            .nth(1)
            .and_then(|rest| rest.split("\n```").next())
            .expect("docs/experience-schema.md has a ```json example");
        let file = TempFile::with_text("doc", example);
        let groups = read_groups(&file.0).unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].experiences.len(), 2);
        assert_eq!(
            groups[0].experiences[1].logprobs,
            vec![-0.105, -1.609, -0.020]
        );
    }
}
