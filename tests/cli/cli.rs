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

    // Resuming the finished run trains nothing and reports the run's real figures (it used to
    // print "X% -> X%, +0.0 points": the warm-up accuracy as the final one).
    let last_eval = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["phase"] == "rl")
        .find_map(|v| v["acc/eval"].as_f64())
        .unwrap();
    let (code, out, err) = grove(&["train", "--resume", run.to_str().unwrap()], dir);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("the run had already finished: 2 RL steps")
            && out.contains(&format!(
                "-> {:.1}% at the last evaluation",
                last_eval * 100.0
            )),
        "{out}"
    );

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

#[test]
fn failed_starts_are_caught_before_the_warm_up_and_leave_no_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let runs = dir.join("runs");
    let no_runs = |what: &str| {
        let left: Vec<_> = std::fs::read_dir(&runs)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{what}: left {left:?}");
    };

    // [remote] without remote.admin_token: a trainer could not keep the server on its policy.
    let (code, _, err) = grove(
        &["train", "--set", "remote.url=\"http://127.0.0.1:9\""],
        dir,
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("[remote]") && err.contains("grove explore"),
        "{err}"
    );
    no_runs("[remote]");

    // A buffer host that does not resolve: named at once, not after the warm-up.
    let t = std::time::Instant::now();
    let (code, _, err) = grove(
        &[
            "train",
            "--buffer",
            "postgres://grove@no-such-host.invalid:5432/grove",
            "--publish-dir",
            "weights",
        ],
        dir,
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("sync.buffer") && err.contains("no-such-host.invalid"),
        "{err}"
    );
    assert!(t.elapsed().as_secs() < 30, "took {:?}", t.elapsed());
    no_runs("unreachable buffer");

    // A reward model folder that does not exist.
    std::fs::write(
        dir.join("rm.toml"),
        "[[reward.pipeline.components]]\nname = \"rm\"\nkind = \"reward-model\"\npath = \"no-such-rm\"\n",
    )
    .unwrap();
    let (code, _, err) = grove(&["train", "rm.toml"], dir);
    assert_ne!(code, 0);
    assert!(
        err.contains("no-such-rm") && err.contains("config.json"),
        "{err}"
    );
    no_runs("missing reward model");

    // An I/O error names the path and its cause once.
    let (code, _, err) = grove(&["train", "missing.toml"], dir);
    assert_ne!(code, 0);
    let cause = "No such file or directory";
    assert_eq!(err.matches(cause).count(), 1, "{err}");
    assert!(err.contains("missing.toml"), "{err}");
    no_runs("missing config file");
}

#[test]
fn bench_defaults_fit_the_builtin_model() {
    let tmp = tempfile::tempdir().unwrap();
    // The default --train-seq (256) used to exceed the built-in model's 64 positions.
    let (code, out, err) = grove(
        &[
            "bench",
            "--reps",
            "1",
            "--sample-batch",
            "2",
            "--new-tokens",
            "4",
            "--train-batch",
            "2",
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["model"], "builtin");
    let (code, _, err) = grove(&["bench", "--train-seq", "256"], tmp.path());
    assert_ne!(code, 0);
    assert!(
        err.contains("--train-seq 256") && err.contains("64 positions"),
        "{err}"
    );
}
