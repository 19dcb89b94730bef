//! `grove train` on the user's own dataset files (docs/tasks.md): JSONL, CSV and Parquet with
//! non-default field names run a few steps on the built-in model; bad files stop before the
//! run directory is made, with the file, the row and the field in the message.
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn grove(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_grove"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// (prompt, answer) pairs in the built-in model's characters: `a+b=` and the sum.
fn sums() -> Vec<(String, String)> {
    (0..40)
        .map(|i| {
            let (a, b) = (10 + i, 31 + 2 * i);
            (format!("{a}+{b}="), (a + b).to_string())
        })
        .collect()
}

/// A short run on `file` with the must-show command line, plus settings that keep it fast.
fn train_on(dir: &Path, file: &str, prompt_field: &str, answer_field: &str) -> (i32, String) {
    let sets = [
        "task.kind=\"dataset\"".to_string(),
        format!("task.path={file}"),
        format!("task.prompt_field={prompt_field}"),
        format!("task.answer_field={answer_field}"),
        "task.reward=\"exact\"".to_string(),
        "warmup.max_steps=2".into(),
        "warmup.target_acc=1.0".into(),
        "warmup.batch_size=8".into(),
        "warmup.eval_every=2".into(),
        "train.steps=2".into(),
        "rollout.prompts_per_step=4".into(),
        "rollout.group_size=2".into(),
        format!("name={}", file.replace('.', "-")),
    ];
    let mut args = vec!["train", "--quiet"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let (code, _, err) = grove(&args, dir);
    (code, err)
}

/// The run trained 2 RL steps on prompts of the file.
fn assert_trained(dir: &Path, file: &str) {
    let run = dir.join("runs").join(file.replace('.', "-"));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"step\":2"), "{metrics}");
    let samples = std::fs::read_to_string(run.join("samples.jsonl")).unwrap();
    let known: Vec<String> = sums().into_iter().map(|(p, _)| p).collect();
    let first: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    let prompt = first["prompt"].as_str().unwrap();
    assert!(known.iter().any(|k| k == prompt), "{prompt:?}");
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        config.contains("kind = \"dataset\"") && config.contains("split_seed = 0"),
        "{config}"
    );
}

fn write_parquet(path: &Path) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    let schema = parse_message_type(
        "message rows { REQUIRED GROUP problem { REQUIRED BYTE_ARRAY text (UTF8); } \
         REQUIRED BYTE_ARRAY target (UTF8); }",
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let props = Arc::new(WriterProperties::builder().build());
    let mut w = SerializedFileWriter::new(file, Arc::new(schema), props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    for column in [0, 1] {
        let values: Vec<ByteArray> = sums()
            .into_iter()
            .map(|(p, a)| if column == 0 { p } else { a }.as_str().into())
            .collect();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&values, None, None)
            .unwrap();
        col.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn trains_on_jsonl_csv_and_parquet_with_custom_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let jsonl: String = sums()
        .iter()
        .map(|(p, a)| format!("{{\"q\": {{\"text\": \"{p}\"}}, \"sol\": \"{a}\"}}\n"))
        .collect();
    std::fs::write(dir.join("sums.jsonl"), jsonl).unwrap();
    let csv: String = std::iter::once("id,question_text,gold\n".to_string())
        .chain(
            sums()
                .iter()
                .enumerate()
                .map(|(i, (p, a))| format!("{i},{p},{a}\n")),
        )
        .collect();
    std::fs::write(dir.join("sums.csv"), csv).unwrap();
    write_parquet(&dir.join("sums.parquet"));

    for (file, prompt, answer) in [
        ("sums.jsonl", "q.text", "sol"),
        ("sums.csv", "question_text", "gold"),
        ("sums.parquet", "problem.text", "target"),
    ] {
        let (code, err) = train_on(dir, file, prompt, answer);
        assert_eq!(code, 0, "{file}: {err}");
        assert_trained(dir, file);
    }
}

#[test]
fn bad_files_stop_before_the_run_directory_with_file_row_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cases = [
        (
            "malformed.jsonl",
            "{\"q\": \"1+2=\", \"a\": \"3\"}\n{\"q\": \"2+2=\", \"a\": }\n",
            "malformed.jsonl: line 2: not valid JSON",
        ),
        (
            "missing.csv",
            "q,a\n1+2=,3\n2+2=,4\n",
            "missing.csv: line 2: missing field `question`",
        ),
        ("empty.jsonl", "\n", "empty.jsonl: no rows"),
        (
            "data.txt",
            "1+2=3\n",
            "data.txt: unknown dataset extension \"txt\"; known: .jsonl, .ndjson, .json, .csv, .parquet",
        ),
    ];
    for (file, text, want) in cases {
        std::fs::write(dir.join(file), text).unwrap();
        let (field_q, field_a) = if file == "missing.csv" {
            ("question", "a")
        } else {
            ("q", "a")
        };
        let (code, err) = train_on(dir, file, field_q, field_a);
        assert_ne!(code, 0, "{file}");
        assert!(err.contains(want), "{file}: {err}");
        assert!(
            !dir.join("runs").exists(),
            "{file}: a run directory was made"
        );
    }
}
