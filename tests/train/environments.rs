//! Multi-turn environments through `grove train` (docs/environments.md): the built-in `guess`
//! game and the Python example program, end to end with the built-in model; episodes saved as
//! message lists; exact resume; programs from a run directory need --trust-commands.
use std::path::Path;

use crate::common::{quiet, rl_lines};
use grove::config;
use grove::train::{run, TrainOptions};

fn small(out: &Path, steps: usize, extra: &[&str]) -> config::ValidatedRun {
    let mut sets: Vec<String> = vec![
        format!("output_dir={:?}", out.display().to_string()),
        "rollout.prompts_per_step=4".into(),
        "rollout.group_size=4".into(),
        "rollout.max_new_tokens=3".into(),
        format!("train.steps={steps}"),
        "train.eval_every=1".into(),
        "train.checkpoint_every=1".into(),
        "train.log_samples=2".into(),
        "env.heldout_size=8".into(),
        "env.max_turns=4".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    config::load(None, &sets).unwrap()
}

/// The first logged episode's messages.
fn first_episode(run_dir: &Path) -> serde_json::Value {
    let samples = grove::report::read_jsonl(&run_dir.join("samples.jsonl")).unwrap();
    let rl = samples.iter().find(|s| s["phase"] == "rl").unwrap();
    rl["responses"][0]["episode"].clone()
}

#[test]
fn guess_trains_end_to_end_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let a = run(
        small(&tmp.path().join("a"), 2, &["env.kind=\"guess\""]),
        &quiet(),
    )
    .unwrap();
    assert_eq!((a.rl_steps_done, a.warmup_steps), (2, 0));
    let lines = rl_lines(&a.run_dir);
    assert_eq!(lines.len(), 3, "step 0 and two RL steps");
    for l in &lines[1..] {
        for key in ["reward/mean", "acc/eval", "loss/policy", "grad/norm"] {
            assert!(l[key].as_f64().is_some_and(f64::is_finite), "{key}: {l}");
        }
    }
    let ep = first_episode(&a.run_dir);
    let msgs = ep["messages"].as_array().unwrap();
    assert_eq!(msgs[0]["role"], "user");
    assert!(msgs[0]["content"]
        .as_str()
        .unwrap()
        .starts_with("guess my number"));
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(
        ep["rewards"].as_array().unwrap().len(),
        ep["infos"].as_array().unwrap().len()
    );
    // Stopped after one step and resumed from its saved config: the same run.
    let b = run(
        small(&tmp.path().join("b"), 2, &["env.kind=\"guess\""]),
        &TrainOptions {
            quiet: true,
            stop_after: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = config::load_for(
        Some(&b.run_dir.join("config.toml")),
        &[],
        config::Purpose::Resume,
    )
    .unwrap();
    let b2 = run(
        cfg,
        &TrainOptions {
            quiet: true,
            resume: Some(b.run_dir.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(b2.rl_steps_done, 2);
    assert_eq!(lines, rl_lines(&b.run_dir), "resumed run differs");
}

#[test]
fn the_python_example_environment_trains_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small(
        tmp.path(),
        1,
        &[
            "env.kind=\"program\"",
            "env.program=[\"python3\", \"examples/env_hangman.py\"]",
            "env.pool=2",
        ],
    );
    let s = run(cfg.clone(), &quiet()).unwrap();
    assert_eq!(s.rl_steps_done, 1);
    let ep = first_episode(&s.run_dir);
    let first = ep["messages"][0]["content"].as_str().unwrap();
    assert!(first.starts_with("hangman: _ _ _ _"), "{first}");
    // The hangman program's own info comes back with every step.
    assert!(ep["infos"][0].get("letter").is_some() || ep["infos"][0].get("error").is_some());
    // The plan names the program; resuming from the directory asks for --trust-commands.
    let plan = std::fs::read_to_string(s.run_dir.join("plan.json")).unwrap();
    assert!(plan.contains("examples/env_hangman.py"), "{plan}");
    let e = config::resume::check_trust(&s.run_dir, &cfg, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("env.program: python3 examples/env_hangman.py"),
        "{e}"
    );
    assert!(e.contains("--trust-commands"), "{e}");
}

#[test]
fn env_config_errors_name_the_field_and_the_known_kinds() {
    let e = config::load(None, &["env.kind=\"chess\"".to_string()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("chess") && e.contains("countdown") && e.contains("bandit"),
        "{e}"
    );
    let e = config::load(
        None,
        &[
            "env.kind=\"guess\"".to_string(),
            "sampling.inject_ground_truth=true".to_string(),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("[env] cannot be combined with sampling.inject_ground_truth"),
        "{e}"
    );
    let e = config::load(None, &["env.kind=\"program\"".to_string()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs env.program"), "{e}");
}
