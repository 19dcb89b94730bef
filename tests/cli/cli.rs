//! The command line as a user meets it: bad input gives a clear error naming the file and
//! field, a non-zero exit, and leaves existing run directories untouched.
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

/// A fake existing run whose bytes we check afterwards.
fn existing_run(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let run = dir.join("runs").join("quickstart");
    std::fs::create_dir_all(run.join("checkpoints")).unwrap();
    std::fs::write(run.join("metrics.jsonl"), b"{\"step\":0}\n").unwrap();
    std::fs::write(run.join("config.toml"), b"name = \"quickstart\"\n").unwrap();
    snapshot(dir)
}

fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.join("runs")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.push((p.clone(), vec![]));
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn unknown_key_wrong_type_and_missing_file_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let before = existing_run(dir);

    std::fs::write(
        dir.join("bad_key.toml"),
        "seed = 1\n[train]\nsteps = 3\nlearning_rate = 0.1\n",
    )
    .unwrap();
    let (code, _, err) = grove(&["train", "bad_key.toml"], dir);
    assert_ne!(code, 0);
    assert!(
        err.contains("bad_key.toml") && err.contains("learning_rate") && err.contains("line 4"),
        "{err}"
    );

    std::fs::write(
        dir.join("bad_type.toml"),
        "[rollout]\ngroup_size = \"eight\"\n",
    )
    .unwrap();
    let (code, _, err) = grove(&["train", "bad_type.toml"], dir);
    assert_ne!(code, 0);
    assert!(
        err.contains("bad_type.toml") && err.contains("group_size") && err.contains("line 2"),
        "{err}"
    );

    let (code, _, err) = grove(&["train", "nope.toml"], dir);
    assert_ne!(code, 0);
    assert!(err.contains("nope.toml"), "{err}");

    let (code, _, err) = grove(&["train", "--set", "train.stepz=4"], dir);
    assert_ne!(code, 0);
    assert!(err.contains("stepz") && err.contains("--set"), "{err}");

    let (code, _, err) = grove(&["train", "--set", "advantage.estimator=gpro"], dir);
    assert_ne!(code, 0);
    assert!(
        err.contains("gpro") && err.contains("grpo"),
        "unknown name should list the known ones: {err}"
    );

    let (code, _, err) = grove(&["train", "--set", "loss.eps_low=1.5"], dir);
    assert_ne!(code, 0);
    assert!(err.contains("eps_low"), "{err}");

    assert_eq!(
        before,
        snapshot(dir),
        "an existing run directory was modified"
    );
}

#[test]
fn corrupt_checkpoint_on_resume_is_named_and_run_is_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (code, _, err) = grove(
        &[
            "train",
            "--quiet",
            "--set",
            "warmup.max_steps=4",
            "--set",
            "warmup.target_acc=1.0",
            "--set",
            "train.steps=2",
            "--set",
            "train.eval_size=32",
            "--set",
            "rollout.prompts_per_step=4",
        ],
        dir,
    );
    assert_eq!(code, 0, "{err}");
    let run = dir.join("runs").join("quickstart");
    let model = run
        .join("checkpoints")
        .join("step-2")
        .join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 3]).unwrap();
    let before = snapshot(dir);
    let (code, _, err) = grove(&["train", "--resume", run.to_str().unwrap()], dir);
    assert_ne!(code, 0);
    assert!(
        // The checkpoint's checksums catch the truncation before the safetensors reader does.
        err.contains("step-2/model.safetensors") && err.contains("checksum mismatch"),
        "{err}"
    );
    assert_eq!(
        before,
        snapshot(dir),
        "a failed resume modified the run directory"
    );

    let (code, _, err) = grove(&["train", "--resume", "runs/missing"], dir);
    assert_ne!(code, 0);
    assert!(err.contains("runs/missing"), "{err}");
}

#[test]
fn recipes_are_listed_with_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, out, _) = grove(&["recipes"], tmp.path());
    assert_eq!(code, 0);
    for name in ["quickstart", "grpo"] {
        assert!(
            out.lines().any(|l| l.starts_with(name)),
            "{name} missing from:\n{out}"
        );
    }
}

fn grove_stdin(args: &[&str], input: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_grove"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn advantage_calculator_prints_the_library_values() {
    let (code, out, err) = grove_stdin(
        &["advantage", "--estimator", "grpo"],
        r#"{"groups": [[1, 0], [1, 1, 1]]}"#,
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // G=2, rewards [1, 0]: mean 0.5, sample std 0.70711 → ±0.5/0.70711 = ±0.70711; all-equal → 0.
    let a = v["advantages"].as_array().unwrap();
    assert!((a[0][0].as_f64().unwrap() - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-5);
    assert!((a[0][1].as_f64().unwrap() + std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-5);
    assert_eq!(a[1], serde_json::json!([0.0, 0.0, 0.0]));
    let lib = grove::advantage::grpo(&[1.0, 0.0], grove::advantage::StdKind::Sample, 1e-6);
    assert_eq!(a[0][0].as_f64().unwrap(), lib[0]);

    let (code, _, err) = grove_stdin(
        &["advantage", "--estimator", "grpo"],
        r#"{"groups": [[1, "x"]]}"#,
    );
    assert_ne!(code, 0);
    assert!(err.contains("groups[0][1]"), "{err}");
    let (code, _, err) = grove_stdin(
        &["advantage", "--estimator", "nope"],
        r#"{"groups": [[1]]}"#,
    );
    assert_ne!(code, 0);
    assert!(err.contains("nope") && err.contains("rloo"), "{err}");
}

#[test]
fn loss_calculator_prints_loss_and_gradient() {
    let input = r#"{"logp": [[-1.0, -2.0]], "logp_old": [[-1.0, -2.0]], "adv": [2.0]}"#;
    let (code, out, err) = grove_stdin(&["loss", "--loss", "reinforce"], input);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // token-mean of −A·ℓ = −2·(−1 − 2)/2 = 3; d/dℓ_t = −A/2 = −1 for each token.
    assert!((v["loss"].as_f64().unwrap() - 3.0).abs() < 1e-12);
    assert_eq!(v["grad_logp"], serde_json::json!([[-1.0, -1.0]]));

    let ragged = r#"{"logp": [[-1.0, -2.0]], "logp_old": [[-1.0]], "adv": [2.0]}"#;
    let (code, _, err) = grove_stdin(&["loss", "--loss", "ppo-clip"], ragged);
    assert_ne!(code, 0);
    assert!(err.contains("logp_old[0]"), "{err}");
}
