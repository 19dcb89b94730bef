//! `grove train` with a `[reward.pipeline]`: component metrics, verified accuracy, exact
//! resume, and a trained reward model as the reward.
use std::path::Path;

use crate::common::{quiet, rl_lines};
use grove::config;
use grove::train::{run, TrainOptions};

fn small(out: &Path, steps: usize, extra: &[String]) -> config::ValidatedRun {
    let mut sets: Vec<String> = vec![
        format!("output_dir={:?}", out.display().to_string()),
        "warmup.max_steps=30".into(),
        "warmup.eval_every=10".into(),
        "warmup.target_acc=1.0".into(),
        "rollout.prompts_per_step=6".into(),
        "rollout.group_size=4".into(),
        format!("train.steps={steps}"),
        "train.eval_every=2".into(),
        "train.eval_size=32".into(),
        "train.checkpoint_every=2".into(),
        "train.lr=1e-3".into(),
    ];
    sets.extend(extra.iter().cloned());
    config::load(None, &sets).unwrap()
}

/// Runs `steps` steps straight, and again stopped after 3 and resumed from the saved config;
/// asserts identical metrics and final weights, returns the RL metric lines.
pub(crate) fn assert_resumes_exactly(
    root: &Path,
    steps: usize,
    extra: &[String],
) -> Vec<serde_json::Value> {
    let a = run(small(&root.join("a"), steps, extra), &quiet()).unwrap();
    let b = run(
        small(&root.join("b"), steps, extra),
        &TrainOptions {
            quiet: true,
            stop_after: Some(3),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(b.rl_steps_done, 3);
    let cfg = config::load_for(
        Some(&b.run_dir.join("config.toml")),
        &[],
        config::Purpose::Resume,
    )
    .unwrap();
    assert_eq!(
        cfg.reward.pipeline,
        small(root, steps, extra).reward.pipeline
    );
    run(
        cfg,
        &TrainOptions {
            quiet: true,
            resume: Some(b.run_dir.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let (la, lb) = (rl_lines(&a.run_dir), rl_lines(&b.run_dir));
    assert_eq!(la.len(), steps + 1);
    assert_eq!(
        la, lb,
        "metrics differ between the uninterrupted and the resumed run"
    );
    let last = format!("checkpoints/step-{steps}/model.safetensors");
    let wa = std::fs::read(a.run_dir.join(&last)).unwrap();
    let wb = std::fs::read(b.run_dir.join(&last)).unwrap();
    assert!(wa == wb, "final weights differ");
    la
}

#[test]
fn pipeline_with_sar_and_par_logs_components_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = vec![
        r#"reward.pipeline.components=[{name="verified", kind="verifier"}, {name="sar", kind="sar"}]"#
            .to_string(),
        r#"reward.pipeline.shaping={kind="par"}"#.to_string(),
        "reward.pipeline.reference_samples=3".to_string(),
    ];
    let lines = assert_resumes_exactly(tmp.path(), 5, &extra);
    for m in &lines[1..] {
        let f = |k: &str| m[k].as_f64().unwrap_or_else(|| panic!("no {k} in {m}"));
        // The verifier component on the same responses is the verified correctness, and
        // acc/train is that accuracy, not the shaped reward.
        assert_eq!(f("reward/verified/mean"), f("reward/correct/mean"));
        assert_eq!(f("acc/train"), f("reward/correct/mean"));
        // R_SA ∈ [−1, 1); PAR is a mean of sigmoids, in (0, 1).
        assert!((-1.0..1.0).contains(&f("reward/sar/mean")), "{m}");
        assert!(f("reward/mean") > 0.0 && f("reward/mean") < 1.0, "{m}");
        assert_eq!(f("reward/external_failures"), 0.0);
    }
    // The shaped reward is not the accuracy.
    assert!(lines[1..]
        .iter()
        .any(|m| m["reward/mean"] != m["reward/correct/mean"]));
}

#[test]
fn lagged_pipeline_with_a_reward_model_resumes_exactly() {
    use grove::reward::rm_train::{train_reward_model, write_pairs, RmTrainOptions};
    use grove::task::arithmetic::arithmetic_preferences;
    let tmp = tempfile::tempdir().unwrap();
    // A tiny reward model, a few steps on the project's arithmetic preferences.
    let task = grove::task::ArithmeticTask::new(Default::default()).unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs, &arithmetic_preferences(&task, 64, 0)).unwrap();
    let rm_dir = tmp.path().join("rm");
    let mut o = RmTrainOptions::new(pairs, rm_dir.clone());
    o.steps = 3;
    o.batch_size = 8;
    o.eval_every = 3;
    o.shape.hidden_size = 32;
    o.shape.intermediate_size = 48;
    train_reward_model(&o, &candle_core::Device::Cpu, |_| {}).unwrap();

    let extra = vec![
        format!(
            r#"reward.pipeline.components=[{{name="correct", kind="verifier", weight=0.5}}, {{name="rm", kind="reward-model", path={:?}, shaping={{kind="running-norm"}}}}]"#,
            rm_dir.display().to_string()
        ),
        "sync.mode=\"lagged\"".to_string(),
        "sync.interval=2".to_string(),
        "sync.offset=1".to_string(),
    ];
    let lines = assert_resumes_exactly(tmp.path(), 4, &extra);
    for m in &lines[1..] {
        let f = |k: &str| m[k].as_f64().unwrap_or_else(|| panic!("no {k} in {m}"));
        assert!(f("reward/rm/mean").is_finite());
        assert_eq!(f("acc/train"), f("reward/correct/mean"));
    }
}

/// The pipeline of the sync-mode tests: the verifier, a length penalty that makes rewards
/// differ within a group, and running-norm shaping, whose statistics must survive a resume.
fn length_pipeline() -> Vec<String> {
    vec![
        r#"reward.pipeline.components=[{name="correct", kind="verifier"}, {name="len", kind="length-penalty", coef=0.25, free_len=1}]"#
            .to_string(),
        r#"reward.pipeline.shaping={kind="running-norm"}"#.to_string(),
    ]
}

#[test]
fn offline_groups_are_scored_by_the_pipeline_and_resume_exactly() {
    use grove::train::explore::{collect, Env, ExploreState};
    let tmp = tempfile::tempdir().unwrap();
    // 30 groups sampled by the untrained built-in model: 5 steps of 6 prompts.
    let env = Env::new(small(&tmp.path().join("gen"), 5, &[])).unwrap();
    let model = env.initial_policy(&candle_core::Device::Cpu).unwrap();
    let mut st = ExploreState::new(&env.cfg, 0).unwrap();
    let mut groups = Vec::new();
    for _ in 0..5 {
        groups.extend(collect(&env, &model, 0, &mut st).unwrap());
    }
    let data = tmp.path().join("exp.jsonl");
    grove::buffer::jsonl::write_groups(&data, &groups).unwrap();
    let mut extra = length_pipeline();
    extra.push(format!("sync.offline={:?}", data.display().to_string()));
    let lines = assert_resumes_exactly(tmp.path(), 5, &extra);
    for m in &lines[1..] {
        let f = |k: &str| m[k].as_f64().unwrap_or_else(|| panic!("no {k} in {m}"));
        // The length penalty was computed (every response is at least 1 token long, so it
        // is <= 0), and the running-norm reward is not the file's verifier reward.
        assert!(f("reward/len/mean") <= 0.0, "{m}");
        assert_eq!(f("acc/train"), f("reward/correct/mean"));
    }
    assert!(lines[1..]
        .iter()
        .any(|m| m["reward/mean"] != m["reward/correct/mean"]));
}

#[test]
fn async_explorer_groups_are_scored_by_the_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let mut extra = length_pipeline();
    extra.push("sync.mode=\"async\"".to_string());
    let s = run(small(&tmp.path().join("a"), 3, &extra), &quiet()).unwrap();
    let lines = rl_lines(&s.run_dir);
    assert_eq!(lines.len(), 4);
    for m in &lines[1..] {
        let len = m["reward/len/mean"]
            .as_f64()
            .unwrap_or_else(|| panic!("{m}"));
        assert!(len <= 0.0, "{m}");
    }
}
