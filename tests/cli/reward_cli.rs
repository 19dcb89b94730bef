//! `grove rm-data` and `grove rm-train` as a user runs them.
use std::path::Path;
use std::process::Command;

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

#[test]
fn rm_data_then_a_short_rm_train_writes_a_reward_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (code, out, err) = grove(&["rm-data", "--out", "pairs.jsonl", "--pairs", "60"], dir);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("wrote 60 preference pairs"), "{out}");
    let lines = std::fs::read_to_string(dir.join("pairs.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 60);

    let (code, out, err) = grove(
        &[
            "rm-train",
            "--data",
            "pairs.jsonl",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--eval-every",
            "1",
            "--out",
            "rm",
            "--loss",
            "scaled-bt",
        ],
        dir,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("held-out acc") && out.contains("held-out pairwise accuracy"),
        "{out}"
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "reward_model.json",
    ] {
        assert!(dir.join("rm").join(f).exists(), "{f} missing");
    }
}

#[test]
fn rm_train_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("bad.jsonl"),
        "{\"prompt\":\"1+1=\",\"chosen\":\"2\",\"rejected\":\"3\"}\n{\"prompt\":\"1+2=\",\"chosen\":\"3\"}\n",
    )
    .unwrap();
    let (code, _, err) = grove(&["rm-train", "--data", "bad.jsonl"], dir);
    assert_ne!(code, 0);
    assert!(
        err.contains("bad.jsonl:2") && err.contains("rejected"),
        "{err}"
    );
    let (code, _, err) = grove(
        &["rm-train", "--data", "bad.jsonl", "--loss", "bradley"],
        dir,
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("bradley") && err.contains("margin-bt"),
        "{err}"
    );
    assert!(!dir.join("rm").exists(), "nothing written on error");
}
