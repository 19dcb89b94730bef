//! End-to-end training on the built-in task with a tiny budget: the run directory's
//! contract, and exact resume.
use std::path::Path;

use crate::common::{quiet, resume_saved, rl_lines, run_stopped_after};
use grove::config;
use grove::train::{run, TrainOptions};

fn small(out: &Path, steps: usize, extra: &[&str]) -> config::ValidatedRun {
    let mut sets: Vec<String> = vec![
        format!("output_dir={:?}", out.display().to_string()),
        "warmup.max_steps=30".into(),
        "warmup.eval_every=10".into(),
        "warmup.target_acc=1.0".into(),
        "rollout.prompts_per_step=8".into(),
        "rollout.group_size=4".into(),
        format!("train.steps={steps}"),
        "train.eval_every=2".into(),
        "train.eval_size=64".into(),
        "train.checkpoint_every=2".into(),
        "train.lr=1e-3".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    config::load(None, &sets).unwrap()
}

#[test]
fn run_directory_has_the_documented_contents() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small(tmp.path(), 3, &[]);
    let s = run(
        cfg,
        &TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.rl_steps_done, 3);
    for f in ["config.toml", "plan.json", "metrics.jsonl", "samples.jsonl"] {
        assert!(s.run_dir.join(f).exists(), "{f} missing");
    }
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
        "tokenizer.json",
        "config.json",
    ] {
        assert!(
            s.run_dir.join("checkpoints/step-3").join(f).exists(),
            "checkpoint {f} missing"
        );
    }
    let lines = rl_lines(&s.run_dir);
    assert_eq!(
        lines.len(),
        4,
        "step 0 (eval after warm-up) and steps 1..=3"
    );
    assert!(lines[0]["acc/eval"].is_number());
    assert!(lines[3]["acc/eval"].is_number(), "evaluated at the end");
    for key in [
        "reward/mean",
        "reward/std",
        "reward/frac_zero_std",
        "acc/train",
        "adv/mean",
        "adv/abs_mean",
        "loss/policy",
        "loss/kl",
        "loss/clipfrac",
        "loss/masked_frac",
        "is/ratio_mean",
        "is/ratio_max",
        "kl/k3",
        "entropy",
        "len/mean",
        "len/truncated_frac",
        "staleness/mean",
        "staleness/dropped",
        "grad/norm",
        "lr",
    ] {
        assert!(
            lines[1][key].is_number(),
            "metric {key} missing: {}",
            lines[1]
        );
    }
    // samples.jsonl: every response carries the verifier's reason (docs/metrics.md).
    let samples = grove::report::read_jsonl(&s.run_dir.join("samples.jsonl")).unwrap();
    assert!(!samples.is_empty());
    for line in &samples {
        for resp in line["responses"].as_array().unwrap() {
            let reason = resp["reason"].as_str().unwrap_or_else(|| panic!("{resp}"));
            assert!(!reason.is_empty(), "{resp}");
        }
    }
    // On-policy: the behaviour log-probs are the current policy's, so the ratio is 1.
    let r = lines[1]["is/ratio_mean"].as_f64().unwrap();
    assert!((r - 1.0).abs() < 1e-3, "on-policy ratio {r}");
    // A second run with the same name gets a new directory.
    let s2 = run(
        small(tmp.path(), 1, &[]),
        &TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_ne!(s.run_dir, s2.run_dir);
}

#[test]
fn stopped_and_resumed_run_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let a = run(
        small(&tmp.path().join("a"), 5, &[]),
        &TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    let b_cfg = small(&tmp.path().join("b"), 5, &[]);
    let b = run_stopped_after(b_cfg, 3);
    assert_eq!(b.rl_steps_done, 3);
    // Resume reads the run's saved config, as `grove train --resume` does.
    let b2 = resume_saved(&b.run_dir);
    assert_eq!(b2.rl_steps_done, 5);
    let (la, lb) = (rl_lines(&a.run_dir), rl_lines(&b.run_dir));
    assert_eq!(la.len(), 6);
    assert_eq!(
        la, lb,
        "metrics differ between the uninterrupted and the resumed run"
    );
    let wa = std::fs::read(a.run_dir.join("checkpoints/step-5/model.safetensors")).unwrap();
    let wb = std::fs::read(b.run_dir.join("checkpoints/step-5/model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ");
    // The checkpointed counters agree too (loss/skipped_steps is in the metrics compared above).
    let state = |dir: &Path| grove::train::checkpoint::read_state(&dir.join("checkpoints/step-5"));
    let (sa, sb) = (state(&a.run_dir).unwrap(), state(&b.run_dir).unwrap());
    assert_eq!(
        (sa.version, sa.optimizer_t, sa.skipped_steps),
        (sb.version, sb.optimizer_t, sb.skipped_steps)
    );
}

/// `loss/skipped_steps` counts over the run, not the process: a resume continues from the
/// checkpoint's count (here set to 2 in the step-3 checkpoint, as if two updates had been
/// skipped before it).
#[test]
fn a_resumed_run_continues_the_skipped_step_count() {
    let tmp = tempfile::tempdir().unwrap();
    let b = run_stopped_after(small(tmp.path(), 5, &[]), 3);
    let ckpt = b.run_dir.join("checkpoints/step-3");
    let path = ckpt.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(state["skipped_steps"], 0);
    state["skipped_steps"] = 2.into();
    std::fs::write(&path, state.to_string()).unwrap();
    grove::train::checkpoint::write_checksums(&ckpt).unwrap();
    resume_saved(&b.run_dir);
    let skipped: Vec<(u64, f64)> = rl_lines(&b.run_dir)
        .iter()
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss/skipped_steps"].as_f64()?)))
        .collect();
    assert_eq!(
        skipped,
        vec![(1, 0.0), (2, 0.0), (3, 0.0), (4, 2.0), (5, 2.0)]
    );
    let last = grove::train::checkpoint::read_state(&b.run_dir.join("checkpoints/step-5"));
    assert_eq!(last.unwrap().skipped_steps, 2);
}

#[test]
fn refill_samples_up_to_the_cap_when_every_group_is_all_equal() {
    // rollout.group_size = 1: every group has one reward, so every group is all-equal
    // whatever the policy does. Each step then draws its first round of 8 prompts plus the 2
    // extra rounds the cap allows (16 prompts), and all 8 slots stay all-equal (short), which
    // the filter drops.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small(
        tmp.path(),
        2,
        &[
            "rollout.group_size=1",
            "advantage.estimator=\"reinforce\"",
            "sampling.filter_zero_std=true",
            "sampling.refill_max_rounds=2",
        ],
    );
    let s = run(
        cfg,
        &TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    let lines = rl_lines(&s.run_dir);
    let steps: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["loss/policy"].is_number())
        .collect();
    assert_eq!(steps.len(), 2, "{lines:?}");
    for l in steps {
        assert_eq!(l["sampling/refill_rounds"], 2.0, "{l}");
        assert_eq!(l["sampling/refill_prompts"], 16.0, "{l}");
        assert_eq!(l["sampling/refill_short"], 8.0, "{l}");
        assert_eq!(l["sampling/dropped_frac"], 1.0, "{l}");
    }
}

#[test]
fn every_recipe_runs_three_rl_steps() {
    let tmp = tempfile::tempdir().unwrap();
    for r in grove::config::recipes::RECIPES {
        if r.needs_model_file() {
            // Trains a downloaded model (gsm8k-smollm2); covered by tests/train/pretrained_train.rs
            // with a tiny model.
            continue;
        }
        let mut sets = vec![
            format!("recipe={:?}", r.name),
            "warmup.max_steps=10".into(),
            "rollout.prompts_per_step=4".into(),
            format!("name={:?}", r.name),
        ];
        if r.name == "barfi" {
            // Its held-out groups (8) must be fewer than the 4 prompts of this short step.
            sets.push("reward.pipeline.blend.heldout_groups=1".into());
        }
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let cfg = small(tmp.path(), 3, &sets);
        let s = run(
            cfg,
            &TrainOptions {
                quiet: true,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("recipe {} failed: {e}", r.name));
        assert_eq!(s.rl_steps_done, 3, "recipe {}", r.name);
        let lines = rl_lines(&s.run_dir);
        assert!(
            lines[3]["loss/policy"].is_number(),
            "recipe {}: {}",
            r.name,
            lines[3]
        );
    }
}

#[test]
fn async_with_zero_staleness_equals_on_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let a = run(
        small(&tmp.path().join("a"), 4, &[]),
        &TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    let b = run(
        small(
            &tmp.path().join("b"),
            4,
            &[
                "sync.mode=\"async\"",
                "sync.max_staleness=0",
                "sync.interval=1",
            ],
        ),
        &TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(rl_lines(&a.run_dir), rl_lines(&b.run_dir));
}

/// With a staleness bound the explorer samples batch b by a version fixed by b alone
/// (`sampling_version`), so async runs repeat bit for bit: max_staleness = interval − 1 is
/// lagged mode's schedule at offset 0, and with interval 1 max_staleness = k is lagged mode's at
/// offset k, computed on another thread. Before, the explorer took the newest
/// weights when it started a batch: here batch 2 by version 0 (the learner at version 1
/// publishes nothing), a group the learner then dropped as stale, so the runs differed.
#[test]
fn async_with_bounded_staleness_equals_lagged_mode() {
    let tmp = tempfile::tempdir().unwrap();
    for (staleness, interval, offset) in [(1, 2, 0), (2, 1, 2)] {
        let sets_lagged = [
            "sync.mode=\"lagged\"".to_string(),
            format!("sync.interval={interval}"),
            format!("sync.offset={offset}"),
        ];
        let sets_async = [
            "sync.mode=\"async\"".to_string(),
            format!("sync.interval={interval}"),
            format!("sync.max_staleness={staleness}"),
        ];
        let dir = tmp.path().join(format!("k{staleness}i{interval}"));
        let run_with = |name: &str, sets: &[String]| {
            let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
            run(small(&dir.join(name), 6, &sets), &quiet()).unwrap()
        };
        let lagged = rl_lines(&run_with("lagged", &sets_lagged).run_dir);
        let asynchronous = rl_lines(&run_with("async", &sets_async).run_dir);
        assert_eq!(lagged.len(), 7);
        assert!(
            lagged
                .iter()
                .any(|l| l["staleness/mean"].as_f64().is_some_and(|s| s > 0.0)),
            "k = {staleness}: the schedule should train on older versions"
        );
        assert_eq!(lagged, asynchronous, "k = {staleness}, interval {interval}");
    }
}

/// A bounded async run stopped after 3 steps and resumed equals the uninterrupted run: the
/// checkpoint keeps the explorer's state at the learner's next batch and the older published
/// weights the following batches are sampled by (`sampler-v<N>.safetensors`).
#[test]
fn async_with_bounded_staleness_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    for (staleness, interval) in [(1, 2), (2, 1)] {
        let sets = [
            "sync.mode=\"async\"".to_string(),
            format!("sync.interval={interval}"),
            format!("sync.max_staleness={staleness}"),
        ];
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let dir = tmp.path().join(format!("k{staleness}i{interval}"));
        let whole = run(small(&dir.join("whole"), 6, &sets), &quiet()).unwrap();
        let parts = run_stopped_after(small(&dir.join("parts"), 6, &sets), 3);
        // Resuming at step 3 needs the older weights that sample batches 3, 4, ...: version 2
        // (k = 1, interval 2), versions 1 and 2 (k = 2).
        let mut saved: Vec<String> = std::fs::read_dir(parts.run_dir.join("checkpoints/step-3"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("sampler-v"))
            .collect();
        saved.sort();
        let want: &[&str] = match staleness {
            1 => &["sampler-v2.safetensors"],
            _ => &["sampler-v1.safetensors", "sampler-v2.safetensors"],
        };
        assert_eq!(saved, want, "k = {staleness}, interval {interval}");
        resume_saved(&parts.run_dir);
        assert_eq!(
            rl_lines(&whole.run_dir),
            rl_lines(&parts.run_dir),
            "k = {staleness}, interval {interval}"
        );
    }
}

#[test]
fn async_with_staleness_trains_on_older_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let b = run(
        small(
            tmp.path(),
            6,
            &[
                "sync.mode=\"async\"",
                "sync.max_staleness=2",
                "sync.interval=2",
                "sync.capacity=24",
            ],
        ),
        &TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    let lines = rl_lines(&b.run_dir);
    assert_eq!(lines.len(), 7);
    for l in &lines[1..] {
        let s = l["staleness/mean"].as_f64().unwrap();
        assert!(
            (0.0..=2.0).contains(&s),
            "staleness {s} outside [0, max_staleness]"
        );
    }
}

#[test]
fn lagged_mode_trains_on_genuinely_older_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let s = run(
        small(
            tmp.path(),
            6,
            &["sync.mode=\"lagged\"", "sync.interval=3", "sync.offset=1"],
        ),
        &TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    let lines = rl_lines(&s.run_dir);
    let stale: f64 = lines[1..]
        .iter()
        .map(|l| l["staleness/mean"].as_f64().unwrap())
        .sum();
    assert!(stale > 0.0, "staleness should be positive in lagged mode");
    // Step 1 trains on version-0 data with version-0 weights (ratio 1); later steps do not.
    let off: Vec<f64> = lines[2..]
        .iter()
        .map(|l| (l["is/ratio_mean"].as_f64().unwrap() - 1.0).abs())
        .collect();
    assert!(
        off.iter().any(|&d| d > 1e-4),
        "importance ratios stayed at 1: {off:?}"
    );
}

#[test]
fn lagged_mode_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = ["sync.mode=\"lagged\"", "sync.interval=2", "sync.offset=1"];
    let a = run(
        small(&tmp.path().join("a"), 5, &extra),
        &TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    let b = run_stopped_after(small(&tmp.path().join("b"), 5, &extra), 3);
    resume_saved(&b.run_dir);
    assert_eq!(rl_lines(&a.run_dir), rl_lines(&b.run_dir));
}
