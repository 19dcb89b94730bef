//! Multi-turn environments through `grove train` (docs/environments.md): the built-in `guess`
//! game and the Python example program, end to end with the built-in model; episodes saved as
//! message lists; exact resume; programs from a run directory need --trust-commands.
use std::path::Path;

use crate::common::{quiet, resume_saved, rl_lines, run_stopped_after};
use grove::config;
use grove::train::run;

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
    let b = run_stopped_after(small(&tmp.path().join("b"), 2, &["env.kind=\"guess\""]), 1);
    let b2 = resume_saved(&b.run_dir);
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

/// `[env]` + `[reward.pipeline]` end to end: a pipeline of one `turns` component (the return,
/// γ = 1) trains exactly like the run without a pipeline; the G-RA pipeline logs its
/// components.
#[test]
fn per_turn_rewards_feed_the_reward_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let guess = "env.kind=\"guess\"";
    let valid = "env.guess_valid_reward=0.25";
    let plain = run(
        small(&tmp.path().join("plain"), 2, &[guess, valid]),
        &quiet(),
    )
    .unwrap();
    let ret = r#"reward.pipeline.components=[{name="ret", kind="turns"}]"#;
    let piped = run(
        small(&tmp.path().join("piped"), 2, &[guess, valid, ret]),
        &quiet(),
    )
    .unwrap();
    let (a, b) = (rl_lines(&plain.run_dir), rl_lines(&piped.run_dir));
    for (x, y) in a.iter().zip(&b).skip(1) {
        for key in ["reward/mean", "loss/policy", "grad/norm", "acc/train"] {
            assert_eq!(x[key], y[key], "{key}");
        }
        assert_eq!(y["reward/ret/mean"], x["reward/mean"]);
    }
    let gra = r#"reward.pipeline.components=[{name="outcome", kind="turns", part="outcome", weight=0}, {name="steps", kind="turns", part="steps", weight=0}, {name="gra", kind="gated", channels=[{component="outcome", threshold=1.0}, {component="steps"}]}]"#;
    let g = run(
        small(&tmp.path().join("gra"), 1, &[guess, valid, gra]),
        &quiet(),
    )
    .unwrap();
    let l = &rl_lines(&g.run_dir)[1];
    // Outcome + steps is the return; the gated reward is at most that.
    let (o, s) = (
        l["reward/outcome/mean"].as_f64().unwrap(),
        l["reward/steps/mean"].as_f64().unwrap(),
    );
    let r = l["reward/gra/mean"].as_f64().unwrap();
    assert!(r <= o + s + 1e-12 && r >= o - 1e-12, "{l}");
    // What the gate paid of each channel: the channels sum to the gated reward, and the paid
    // step reward is at most the steps component's own (ungated) value.
    let paid = l["reward/gra/steps/mean"].as_f64().unwrap();
    assert!(paid <= s + 1e-12, "{l}");
    let gra_outcome = l["reward/gra/outcome/mean"].as_f64().unwrap();
    assert!((gra_outcome - o).abs() < 1e-12, "{l}");
    assert!((gra_outcome + paid - r).abs() < 1e-12, "{l}");
    assert_eq!(l["reward/mean"], l["reward/gra/mean"]);
}

/// `env.data`: the program's reset receives a row of the user's file.
#[test]
fn a_program_environment_plays_the_rows_of_a_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("words.csv");
    std::fs::write(&data, "word\nox\nox\n").unwrap();
    let d = format!("env.data={:?}", data.display().to_string());
    let h = format!("env.heldout_data={:?}", data.display().to_string());
    let cfg = small(
        &tmp.path().join("run"),
        1,
        &[
            "env.kind=\"program\"",
            "env.program=[\"python3\", \"examples/env_hangman.py\"]",
            "env.pool=2",
            &d,
            &h,
        ],
    );
    let s = run(cfg, &quiet()).unwrap();
    let ep = first_episode(&s.run_dir);
    let first = ep["messages"][0]["content"].as_str().unwrap();
    assert_eq!(first, "hangman: _ _. guess one letter.");
    assert!(
        ep["row"].as_str().unwrap().contains("words.csv: line "),
        "{ep}"
    );
}

/// A one-turn program whose reward and info depend on the episode number grove hands it, so
/// a resumed run that restarted the numbering would score differently.
const NUMBERED_ENV: &str = r#"import json, sys
for line in sys.stdin:
    r = json.loads(line)
    if r["op"] == "reset":
        out = {"messages": [{"role": "user", "content": "say a number."}]}
    elif r["op"] == "step":
        e = r["episode"]
        out = {"messages": [], "reward": (e % 3) / 2, "done": True,
               "info": {"episode": e, "success": e % 3 == 2}}
    else:
        out = {}
    print(json.dumps(out), flush=True)
"#;

/// Program episode numbers are checkpointed: a program run stopped after one step and resumed
/// equals the uninterrupted run, episode numbers included.
#[test]
fn a_program_environment_run_resumes_with_its_episode_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("numbered.py");
    std::fs::write(&script, NUMBERED_ENV).unwrap();
    let prog = format!(
        "env.program=[\"python3\", {:?}]",
        script.display().to_string()
    );
    let sets = ["env.kind=\"program\"", prog.as_str(), "env.pool=2"];
    let whole = run(small(&tmp.path().join("whole"), 3, &sets), &quiet()).unwrap();
    let b = run_stopped_after(small(&tmp.path().join("cut"), 3, &sets), 1);
    let state = std::fs::read_to_string(b.run_dir.join("checkpoints/step-1/state.json")).unwrap();
    // 16 training episodes and 8 held-out ones at step 0 and at step 1.
    assert!(state.contains("\"env_episodes\": 32"), "{state}");
    let b2 = resume_saved(&b.run_dir);
    assert_eq!(b2.rl_steps_done, 3);
    assert_eq!(
        rl_lines(&whole.run_dir),
        rl_lines(&b.run_dir),
        "resumed run differs"
    );
    let numbers = |dir: &Path| -> Vec<serde_json::Value> {
        grove::report::read_jsonl(&dir.join("samples.jsonl"))
            .unwrap()
            .iter()
            .filter(|s| s["phase"] == "rl")
            .flat_map(|s| s["responses"].as_array().unwrap().clone())
            .map(|r| r["episode"]["infos"][0]["episode"].clone())
            .collect()
    };
    let (a, c) = (numbers(&whole.run_dir), numbers(&b.run_dir));
    assert!(
        !a.is_empty() && a.iter().all(|n| n.as_u64().is_some()),
        "{a:?}"
    );
    assert_eq!(a, c);
}

/// A one-turn program that crashes (exit status 3, a line on stderr) on the step of episode
/// 10, and on every step from episode 40 on.
const CRASHING_ENV: &str = r#"import json, sys
for line in sys.stdin:
    r = json.loads(line)
    e = r.get("episode", 0)
    if r["op"] == "step" and (e == 10 or e >= 40):
        sys.stderr.write("boom on episode %d\n" % e)
        sys.exit(3)
    if r["op"] == "reset":
        out = {"messages": [{"role": "user", "content": "say a number."}]}
    elif r["op"] == "step":
        out = {"messages": [], "reward": 1.0, "done": True, "info": {"success": True}}
    else:
        out = {}
    print(json.dumps(out), flush=True)
"#;

/// A program that crashes once: the episode ends with the reason and training goes on. One
/// that keeps crashing: the run stops with an error naming the program, its exit status and
/// its stderr, and what was already written (checkpoints, metrics) stays.
#[test]
fn a_crashing_program_environment_is_survived_then_stops_the_run_keeping_its_files() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("crashing.py");
    std::fs::write(&script, CRASHING_ENV).unwrap();
    let prog = format!(
        "env.program=[\"python3\", {:?}]",
        script.display().to_string()
    );
    let out = tmp.path().join("runs");
    let cfg = small(
        &out,
        3,
        &[
            "env.kind=\"program\"",
            prog.as_str(),
            "env.pool=2",
            "env.max_consecutive_failures=2",
        ],
    );
    let e = run(cfg, &quiet()).unwrap_err().to_string();
    assert!(
        e.contains("crashing.py` failed 2 times in a row (env.max_consecutive_failures)"),
        "{e}"
    );
    assert!(e.contains("boom on episode 4"), "{e}");
    // Episodes 8..24 are step 1's: the crash on episode 10 did not stop it.
    let dirs: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert_eq!(dirs.len(), 1, "one run directory");
    let run_dir = dirs[0].as_ref().unwrap().path();
    assert!(run_dir.join("checkpoints/step-1/state.json").exists());
    let lines = rl_lines(&run_dir);
    assert_eq!(lines.last().unwrap()["step"], 1, "{lines:?}");
    // The crashed episode and those that lost their process scored 0; the rest 1.
    let r = lines[1]["reward/mean"].as_f64().unwrap();
    assert!(r > 0.0 && r < 1.0, "{r}");
}

/// `calculator-arithmetic` through `grove::train::run`: a warm-up on reference plays (the
/// tool call, then the result), stopped by `warmup.max_steps`, with a falling loss; the RL
/// steps log the tool-call rate.
#[test]
fn calculator_arithmetic_warms_up_on_reference_plays_and_logs_the_tool_call_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small(
        tmp.path(),
        1,
        &[
            "env.kind=\"calculator-arithmetic\"",
            "env.digits=2",
            "env.max_tokens=200",
            "env.heldout_size=4",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "rollout.max_new_tokens=72",
            "warmup.max_steps=8",
            "warmup.eval_every=4",
            "warmup.batch_size=8",
            "warmup.lr=1e-3",
            "warmup.target_acc=1.0",
        ],
    );
    let s = run(cfg, &quiet()).unwrap();
    assert_eq!((s.warmup_steps, s.rl_steps_done), (8, 1));
    let lines = grove::report::read_jsonl(&s.run_dir.join("metrics.jsonl")).unwrap();
    let sft: Vec<f64> = lines
        .iter()
        .filter(|l| l["phase"] == "warmup")
        .map(|l| l["loss/sft"].as_f64().unwrap())
        .collect();
    assert_eq!(sft.len(), 2, "{lines:?}");
    assert!(sft[1] < sft[0], "the warm-up loss did not fall: {sft:?}");
    let rl = rl_lines(&s.run_dir);
    let rate = rl[1]["reward/tool_call/mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&rate), "{}", rl[1]);
    let plan = std::fs::read_to_string(s.run_dir.join("plan.json")).unwrap();
    assert!(plan.contains("\"warmup_max_steps\": 8"), "{plan}");
}
