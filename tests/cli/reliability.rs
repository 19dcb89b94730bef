//! What a run directory, a file or a peer can make grove do (docs/reliability.md): each test
//! is one class of failure, driven through the `grove` binary as a user meets it.
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

/// A run directory whose config.toml was edited to name a reward command.
fn run_dir_with_command(dir: &Path, marker: &Path) -> std::path::PathBuf {
    let run = dir.join("runs").join("planted");
    std::fs::create_dir_all(run.join("checkpoints")).unwrap();
    std::fs::write(
        run.join("config.toml"),
        format!(
            "name = \"planted\"\n\n[[reward.pipeline.components]]\nname = \"exact\"\n\
             kind = \"verifier\"\n\n[[reward.pipeline.components]]\nname = \"judge\"\n\
             kind = \"external\"\ncommand = [\"sh\", \"-c\", \"touch {}\"]\n",
            marker.display()
        ),
    )
    .unwrap();
    run
}

#[test]
fn resume_never_starts_a_command_recorded_in_the_run_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("pwned");
    let run = run_dir_with_command(tmp.path(), &marker);
    let (code, _, err) = grove(&["train", "--resume", run.to_str().unwrap()], tmp.path());
    assert_ne!(code, 0);
    assert!(
        err.contains("--trust-commands") && err.contains("sh -c \"touch") && err.contains("judge"),
        "{err}"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!marker.exists(), "the recorded command ran");
    // --trust-commands needs --resume: it cannot be slipped into an ordinary run.
    let (code, _, err) = grove(&["train", "--trust-commands"], tmp.path());
    assert_ne!(code, 0);
    assert!(err.contains("--resume"), "{err}");
}

#[test]
fn unbounded_async_resume_is_refused_naming_the_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("runs").join("a");
    std::fs::create_dir_all(run.join("checkpoints")).unwrap();
    std::fs::write(
        run.join("config.toml"),
        "name = \"a\"\n[sync]\nmode = \"async\"\n",
    )
    .unwrap();
    let (code, _, err) = grove(&["train", "--resume", run.to_str().unwrap()], tmp.path());
    assert_ne!(code, 0);
    assert!(
        err.contains("sync.mode = \"async\" without sync.max_staleness cannot be resumed exactly"),
        "{err}"
    );
}

#[test]
fn impossible_sizes_are_refused_before_the_run_directory_exists() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, _, err) = grove(
        &["train", "--set", "rollout.group_size=1000000000"],
        tmp.path(),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("needs at least")
            && err.contains("32000000000 samples/step")
            && err.contains("is available"),
        "{err}"
    );
    assert!(
        !tmp.path().join("runs").exists(),
        "a run directory was created"
    );
    // A step count whose sample total wraps around is an error naming it.
    let (code, _, err) = grove(
        &["train", "--set", "train.steps=9223372036854775807"],
        tmp.path(),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("train.steps") && err.contains("does not fit"),
        "{err}"
    );
    assert!(!tmp.path().join("runs").exists());
}

#[test]
fn resume_with_a_different_config_is_refused_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("runs").join("a");
    std::fs::create_dir_all(run.join("checkpoints")).unwrap();
    std::fs::write(run.join("config.toml"), "name = \"a\"\n").unwrap();
    let mine = tmp.path().join("mine.toml");
    std::fs::write(&mine, "name = \"a\"\nseed = 5\n").unwrap();
    let (code, _, err) = grove(
        &[
            "train",
            "--resume",
            run.to_str().unwrap(),
            mine.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("`seed` (\"5\" vs recorded \"0\")"), "{err}");
}
