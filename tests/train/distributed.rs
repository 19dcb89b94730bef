//! Learner and explorer as separate processes: through a PostgreSQL buffer (the several-machine
//! setup) and through an offline JSONL file.
use std::path::Path;
use std::process::{Command, Stdio};

fn grove() -> Command {
    Command::new(env!("CARGO_BIN_EXE_grove"))
}

const SMALL: [&str; 14] = [
    "--set",
    "warmup.max_steps=300",
    "--set",
    "rollout.prompts_per_step=16",
    "--set",
    "train.eval_size=200",
    "--set",
    "train.eval_every=10",
    "--set",
    "train.lr=3e-4",
    "--set",
    "sync.wait_timeout_s=900",
    "--set",
    "train.checkpoint_every=100",
];

/// RL steps of the two-process Postgres run (see the check on held-out accuracy).
const RL_STEPS: usize = 250;

fn rl_acc(run: &Path) -> Vec<(u64, f64)> {
    grove::report::read_jsonl(&run.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|v| v["phase"] == "rl" && v["acc/eval"].is_number())
        .map(|v| (v["step"].as_u64().unwrap(), v["acc/eval"].as_f64().unwrap()))
        .collect()
}

fn postgres_url() -> Option<String> {
    let url = std::env::var("GROVE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@localhost:5432/grove_test".to_string());
    match postgres::Client::connect(&url, postgres::NoTls) {
        Ok(_) => Some(url),
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("PostgreSQL at {url} is required in CI (run .ci/postgres.sh): {e}");
            }
            eprintln!(
                "******** SKIPPED: no PostgreSQL at {url} ({e}); run .ci/postgres.sh ********"
            );
            None
        }
    }
}

/// Waits for `child` to exit, killing it (and failing) after `limit_s` seconds.
fn wait_for_exit(child: &mut std::process::Child, limit_s: u64) -> std::process::ExitStatus {
    let t = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if t.elapsed().as_secs() > limit_s {
            let _ = child.kill();
            panic!("the explorer was still running {limit_s} s after the learner finished");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A verifier and a length penalty that every answer longer than one token pays.
const PIPELINE: &str = r#"reward.pipeline.components=[{name="correct", kind="verifier"}, {name="len", kind="length-penalty", coef=0.5, free_len=1}]"#;

/// Also: the shared-buffer mode's groups are scored by the learner's reward pipeline.
#[test]
fn an_explorer_stops_when_its_learner_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", tmp.path().join("buffer.db").display());
    let weights = tmp.path().join("weights");
    let small = [
        "--set",
        "warmup.max_steps=20",
        "--set",
        "warmup.target_acc=1.0",
        "--set",
        "rollout.prompts_per_step=4",
        "--set",
        "rollout.group_size=4",
        "--set",
        "train.eval_size=16",
        "--set",
        "train.eval_every=2",
    ];
    let mut explorer = grove()
        .args(["explore", "--buffer", &url, "--weights"])
        .arg(&weights)
        .args(small)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drained as it comes, so a full pipe never blocks the explorer.
    let mut stderr = explorer.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
        err
    });
    let learner = grove()
        .args(["train", "--quiet", "--buffer", &url, "--publish-dir"])
        .arg(&weights)
        .args(small)
        .args(["--set", "train.steps=3"])
        // The learner scores the explorer's groups with its [reward.pipeline].
        .args(["--set", PIPELINE])
        .args([
            "--set",
            &format!(
                "output_dir={:?}",
                tmp.path().join("runs").display().to_string()
            ),
        ])
        .output()
        .unwrap();
    assert!(
        learner.status.success(),
        "{}",
        String::from_utf8_lossy(&learner.stderr)
    );
    assert!(weights.join("finished.json").exists());
    let metrics =
        grove::report::read_jsonl(&tmp.path().join("runs/quickstart/metrics.jsonl")).unwrap();
    let rl: Vec<_> = metrics
        .iter()
        .filter(|m| m["phase"] == "rl" && m["step"].as_u64() > Some(0))
        .collect();
    assert_eq!(rl.len(), 3);
    for m in rl {
        let len = m["reward/len/mean"].as_f64();
        assert!(len.is_some_and(|l| l < 0.0), "no length penalty: {m}");
    }
    let status = wait_for_exit(&mut explorer, 60);
    let err = reader.join().unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("the learner has finished"), "{err}");
    // The explorer kept at most its bound (4 steps' worth) in the buffer.
    let left = grove::buffer::open(&url, 1 << 20).unwrap().len().unwrap();
    assert!(left <= 16, "{left} groups left");
    // The learner's config got the bounded default staleness.
    let cfg = std::fs::read_to_string(tmp.path().join("runs/quickstart/config.toml")).unwrap();
    assert!(cfg.contains("max_staleness = 4"), "{cfg}");
}

#[test]
fn explorer_and_learner_processes_through_postgres() {
    let Some(base) = postgres_url() else { return };
    let table = format!("grove_e2e_{}", std::process::id());
    let url = format!("{base}#{table}");
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("weights");
    let out = tmp.path().join("runs");

    let mut explorer = grove()
        .args([
            "explore",
            "--buffer",
            &url,
            "--weights",
            weights.to_str().unwrap(),
        ])
        .args(SMALL)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The explorer reports "explorer 1: N groups written" after each committed batch.
    let stderr = explorer.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(|l| l.ok())
            .collect::<Vec<String>>()
    });
    let learner = grove()
        .args([
            "train",
            "--quiet",
            "--buffer",
            &url,
            "--publish-dir",
            weights.to_str().unwrap(),
        ])
        .args(SMALL)
        .args(["--set", &format!("train.steps={RL_STEPS}")])
        .args(["--set", "sync.max_staleness=2"])
        .args([
            "--set",
            &format!("output_dir={:?}", out.display().to_string()),
        ])
        .output()
        .unwrap();
    // The explorer stops by itself once the learner has finished (publish_dir/finished.json).
    let status = wait_for_exit(&mut explorer, 120);
    assert!(status.success(), "explorer failed: {status}");
    let committed: usize = reader
        .join()
        .unwrap()
        .iter()
        .filter_map(|l| {
            l.strip_prefix("explorer 1: ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0);
    assert!(
        learner.status.success(),
        "learner failed: {}",
        String::from_utf8_lossy(&learner.stderr)
    );

    let acc = rl_acc(&out.join("quickstart"));
    // Held-out accuracy on 200 problems moves by about ±3 points between evaluations, and the
    // explorer/learner interleaving (hence the data) depends on process timing, so the check is
    // on the best evaluation and on the mean of the last three, over RL_STEPS steps. At 40 steps
    // a CI run stayed within 0.28 (from 0.255); at 120 steps one fresh-clone run reached only
    // 0.305 with a last-three mean of 0.268 (from 0.24) while most reached 0.38-0.48: hence
    // RL_STEPS = 250. Five local runs at 250 steps (two pinned to one core), all from 0.24:
    // best 0.555-0.60, last-three mean 0.52-0.57.
    eprintln!("held-out accuracy through the buffer: {acc:?}");
    let first = acc.first().unwrap().1;
    let best = acc.iter().map(|a| a.1).fold(0.0, f64::max);
    let tail: Vec<f64> = acc.iter().rev().take(3).map(|a| a.1).collect();
    let tail_mean = tail.iter().sum::<f64>() / tail.len() as f64;
    assert!(
        best >= first + 0.10 && tail_mean >= first + 0.08,
        "held-out accuracy did not rise through the buffer: {acc:?}"
    );
    let lines = grove::report::read_jsonl(&out.join("quickstart/metrics.jsonl")).unwrap();
    let rl: Vec<_> = lines
        .iter()
        .filter(|v| v["phase"] == "rl" && v["step"].as_u64().unwrap() > 0)
        .collect();
    assert_eq!(rl.len(), RL_STEPS);
    let mean = |r: &[&serde_json::Value], key: &str| {
        r.iter().map(|v| v[key].as_f64().unwrap()).sum::<f64>() / r.len() as f64
    };
    // The training reward over 20 steps (2560 samples) is far less noisy than the evaluation:
    // local runs rose from about 0.10 by 0.04-0.07 at 120 steps and by 0.13-0.19 at 250.
    let (early, late) = (
        mean(&rl[..20], "reward/mean"),
        mean(&rl[RL_STEPS - 20..], "reward/mean"),
    );
    eprintln!(
        "reward/mean: first 20 steps {early:.3}, last 20 {late:.3}; mean staleness {:.2}",
        mean(&rl, "staleness/mean")
    );
    assert!(
        late >= early + 0.05,
        "training reward did not rise: {early:.3} -> {late:.3}"
    );
    let mut dropped = 0usize;
    for v in &rl {
        let s = v["staleness/mean"].as_f64().unwrap();
        assert!(
            (0.0..=2.0).contains(&s),
            "staleness {s} beyond sync.max_staleness = 2: {v}"
        );
        dropped += v["staleness/dropped"].as_f64().unwrap() as usize;
    }

    // Whatever the explorer committed before it was killed is still there, minus what was used.
    let mut b = grove::buffer::open(&url, 1 << 30).unwrap();
    let left = b.len().unwrap();
    // Taken from the buffer: the groups trained on plus the stale ones dropped.
    let consumed = RL_STEPS * 16 + dropped;
    let taken = b.take(left, 0).unwrap();
    assert_eq!(taken.groups.len(), left);
    let mut client = postgres::Client::connect(&base, postgres::NoTls).unwrap();
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .unwrap();
    assert!(
        committed >= consumed,
        "explorer reported {committed} groups, learner used {consumed}"
    );
    assert!(
        consumed + left >= committed,
        "lost experiences: {committed} committed, {consumed} consumed, {left} left in the buffer"
    );
}

#[test]
fn offline_file_from_explore_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("exp.jsonl");
    let out = tmp.path().join("runs");
    let ex = grove()
        .args([
            "explore",
            "--quiet",
            "--out",
            data.to_str().unwrap(),
            "--groups",
            "32",
        ])
        .args(SMALL)
        .output()
        .unwrap();
    assert!(
        ex.status.success(),
        "{}",
        String::from_utf8_lossy(&ex.stderr)
    );
    let groups = grove::buffer::jsonl::read_groups(&data).unwrap();
    assert_eq!(groups.len(), 32);
    assert!(groups
        .iter()
        .all(|g| g.experiences.len() == 8 && g.policy_version == 0));
    let tr = grove()
        .args(["train", "--quiet", "--offline", data.to_str().unwrap()])
        .args(SMALL)
        .args([
            "--set",
            "train.steps=5",
            "--set",
            &format!("output_dir={:?}", out.display().to_string()),
        ])
        .output()
        .unwrap();
    assert!(
        tr.status.success(),
        "{}",
        String::from_utf8_lossy(&tr.stderr)
    );
    // 32 groups at 16 per step: the file is exhausted after 2 of the 5 steps.
    let steps: Vec<u64> = grove::report::read_jsonl(&out.join("quickstart/metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|v| v["phase"] == "rl")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![0, 1, 2]);
    // The last step is evaluated and its held-out accuracy recorded (it used to be printed
    // only), and the plan says 2 RL steps, not train.steps = 5.
    let last = grove::report::read_jsonl(&out.join("quickstart/metrics.jsonl"))
        .unwrap()
        .into_iter()
        .rfind(|v| v["phase"] == "rl")
        .unwrap();
    assert!(last["acc/eval"].is_number(), "{last}");
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("quickstart/plan.json")).unwrap())
            .unwrap();
    assert_eq!(plan["rl_steps"], 2);
    assert!(
        plan["rl_steps_limited_by"]
            .as_str()
            .unwrap()
            .contains("offline data: 32 groups"),
        "{plan}"
    );

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"group_id\": 1}\n").unwrap();
    let tr = grove()
        .args(["train", "--quiet", "--offline", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!tr.status.success());
    let err = String::from_utf8_lossy(&tr.stderr);
    assert!(err.contains("bad.jsonl") && err.contains("line 1"), "{err}");
}
