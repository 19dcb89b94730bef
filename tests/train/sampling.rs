//! Sampling methods end to end: Reinforce-Ada (its reduction to GRPO sampling, its baseline
//! over every drawn sample, exact resume), duration-weighted updates on the `bandit`
//! environment's asynchronous rollouts and its time-paced stream (`sampling.pace = "time"`),
//! checked against numbers recomputed from samples.jsonl.
use std::path::Path;

use crate::common::{quiet, resume_saved, rl_lines, run_stopped_after};
use crate::train_rewards::assert_resumes_exactly;
use grove::config;
use grove::train::run;

fn small(out: &Path, steps: usize, extra: &[&str]) -> config::ValidatedRun {
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
    sets.extend(extra.iter().map(|s| s.to_string()));
    config::load(None, &sets).unwrap()
}

/// The RL lines without Reinforce-Ada's own metrics.
fn without_ada_metrics(lines: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    lines
        .into_iter()
        .map(|mut l| {
            l.as_object_mut()
                .unwrap()
                .retain(|k, _| !k.starts_with("sampling/ada_"));
            l
        })
        .collect()
}

#[test]
fn reinforce_ada_with_one_round_of_n_is_plain_grpo_sampling() {
    let tmp = tempfile::tempdir().unwrap();
    let a = run(small(&tmp.path().join("a"), 3, &[]), &quiet()).unwrap();
    let b = run(
        small(
            &tmp.path().join("b"),
            3,
            &[
                "sampling.reinforce_ada.mode=\"balanced\"",
                "sampling.reinforce_ada.rounds=1",
                "sampling.reinforce_ada.samples_per_round=4",
            ],
        ),
        &quiet(),
    )
    .unwrap();
    let lb = rl_lines(&b.run_dir);
    for l in &lb[1..] {
        assert_eq!(l["sampling/ada_rounds"], 1.0, "{l}");
        assert_eq!(l["sampling/ada_samples_per_prompt"], 4.0, "{l}");
        assert_eq!(l["sampling/samples_drawn"], 24.0, "{l}");
    }
    assert_eq!(rl_lines(&a.run_dir), without_ada_metrics(lb));
    let last = "checkpoints/step-3/model.safetensors";
    let (wa, wb) = (
        std::fs::read(a.run_dir.join(last)).unwrap(),
        std::fs::read(b.run_dir.join(last)).unwrap(),
    );
    assert!(wa == wb, "final weights differ");
}

#[test]
fn reinforce_ada_balances_groups_uses_every_draw_as_baseline_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let lines = assert_resumes_exactly(
        tmp.path(),
        4,
        &[
            "recipe=\"reinforce-ada\"".into(),
            "rollout.group_size=4".into(),
            "train.log_samples=6".into(),
        ],
    );
    for l in &lines[1..] {
        let per_prompt = l["sampling/ada_samples_per_prompt"].as_f64().unwrap();
        assert_eq!(
            l["sampling/samples_drawn"].as_f64().unwrap(),
            per_prompt * 6.0
        );
        assert!((8.0..=32.0).contains(&per_prompt), "{l}");
        let rounds = l["sampling/ada_rounds"].as_f64().unwrap();
        assert!((per_prompt - rounds * 8.0).abs() < 1e-9, "{l}");
    }
    // The uninterrupted run's directory, the only entry under a/.
    let run_dir = std::fs::read_dir(tmp.path().join("a"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let samples = grove::report::read_jsonl(&run_dir.join("samples.jsonl")).unwrap();
    let mut checked = 0;
    for g in samples.iter().filter(|s| s["phase"] == "rl") {
        let drawn: Vec<f64> = g["drawn_rewards"]
            .as_array()
            .unwrap_or_else(|| panic!("no drawn_rewards: {g}"))
            .iter()
            .map(|r| r.as_f64().unwrap())
            .collect();
        assert!(drawn.len().is_multiple_of(8) && (8..=32).contains(&drawn.len()));
        let responses = g["responses"].as_array().unwrap();
        assert_eq!(responses.len(), 4);
        let mean = drawn.iter().sum::<f64>() / drawn.len() as f64;
        let all_equal = drawn.iter().all(|&r| r == drawn[0]);
        let pos_drawn = drawn.iter().filter(|&&r| r > 0.7).count();
        let pos_kept = responses
            .iter()
            .filter(|r| r["reward"].as_f64().unwrap() > 0.7)
            .count();
        // balanced: 2 positives and 2 negatives; a short kind is filled with the other
        let neg_drawn = drawn.len() - pos_drawn;
        let want_neg = (4 - pos_drawn.min(2)).min(neg_drawn);
        assert_eq!(pos_kept, (4 - want_neg).min(pos_drawn), "{g}");
        for r in responses {
            let reward = r["reward"].as_f64().unwrap();
            let want = if all_equal { 0.0 } else { reward - mean };
            let got = r["advantage"].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-9,
                "advantage {got}, want {want}: {g}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 4 * 6 * 4, "checked {checked} responses");
}

fn bandit(out: &Path, steps: usize, extra: &[&str]) -> config::ValidatedRun {
    let mut sets: Vec<String> = vec![
        format!("output_dir={:?}", out.display().to_string()),
        "env.kind=\"bandit\"".into(),
        "env.max_turns=1".into(),
        "env.heldout_size=4".into(),
        "rollout.prompts_per_step=8".into(),
        "rollout.group_size=4".into(),
        "rollout.max_new_tokens=2".into(),
        "advantage.estimator=\"group-mean\"".into(),
        format!("train.steps={steps}"),
        "train.eval_every=2".into(),
        "train.checkpoint_every=2".into(),
        "train.log_samples=8".into(),
        "train.lr=3e-3".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    config::load(None, &sets).unwrap()
}

#[test]
fn duration_weights_scale_each_bandit_pull_by_its_time_in_async_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let s = run(
        bandit(
            tmp.path(),
            3,
            &[
                "advantage.duration.enabled=true",
                "sync.mode=\"async\"",
                "sync.interval=1",
                "sync.max_staleness=1",
            ],
        ),
        &quiet(),
    )
    .unwrap();
    let samples = grove::report::read_jsonl(&s.run_dir.join("samples.jsonl")).unwrap();
    let mut timed = 0;
    for step in 1..=3u64 {
        let groups: Vec<&serde_json::Value> = samples
            .iter()
            .filter(|g| g["phase"] == "rl" && g["step"] == step)
            .collect();
        assert_eq!(groups.len(), 8, "every group of step {step} is logged");
        // Δt per pull: the step's duration_s (1 or 3 s), or the fixed unparsable 1.0 s
        // (defaults t_min = 0, t_floor = 0.001); w = Δt / mean Δt over the batch.
        let dt = |r: &serde_json::Value| match r["episode"]["infos"][0]["duration_s"].as_f64() {
            Some(d) => d.max(0.001),
            None => 1.0,
        };
        let all: Vec<f64> = groups
            .iter()
            .flat_map(|g| g["responses"].as_array().unwrap().iter().map(dt))
            .collect();
        let mean_dt = all.iter().sum::<f64>() / all.len() as f64;
        for g in &groups {
            let rs = g["responses"].as_array().unwrap();
            let rewards: Vec<f64> = rs.iter().map(|r| r["reward"].as_f64().unwrap()).collect();
            let mean_r = rewards.iter().sum::<f64>() / rewards.len() as f64;
            let all_equal = rewards.iter().all(|&r| r == rewards[0]);
            for (r, &reward) in rs.iter().zip(&rewards) {
                if r["episode"]["infos"][0]["duration_s"].is_number() {
                    timed += 1;
                }
                let base = if all_equal { 0.0 } else { reward - mean_r };
                let want = base * dt(r) / mean_dt;
                let got = r["advantage"].as_f64().unwrap();
                assert!(
                    (got - want).abs() < 1e-9,
                    "step {step}: {got} vs {want}: {r}"
                );
            }
        }
    }
    // some pulls parsed, so the weights were not all 1
    assert!(timed > 0, "no parsable pull in 3 steps");
}

const PACED: [&str; 5] = [
    "sampling.pace=\"time\"",
    "sampling.pace_window_s=1.0",
    "env.bandit_arm_durations_s=[1.0, 3.0]",
    "env.bandit_arm_payoffs=[1.0, 2.0]",
    "advantage.estimator=\"reinforce\"",
];

/// The time-paced bandit: every batch holds 8 × 4 kept episodes drawn from more; each group
/// that discarded some carries every drawn reward, its kept rewards a subsequence of them; the
/// pace metrics are recomputed from samples.jsonl; a run stopped after 3 steps and resumed
/// equals the uninterrupted one (the pace stream is saved with the checkpoint).
#[test]
fn the_time_paced_bandit_keeps_full_groups_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let a = run(bandit(&tmp.path().join("a"), 5, &PACED), &quiet()).unwrap();
    let b = run_stopped_after(bandit(&tmp.path().join("b"), 5, &PACED), 3);
    resume_saved(&b.run_dir);
    let lines = rl_lines(&a.run_dir);
    assert_eq!(lines.len(), 6);
    assert_eq!(lines, rl_lines(&b.run_dir), "resumed run differs");
    let samples = grove::report::read_jsonl(&a.run_dir.join("samples.jsonl")).unwrap();
    let mut discarded = 0.0;
    for (step, line) in lines.iter().enumerate().skip(1) {
        let groups: Vec<&serde_json::Value> = samples
            .iter()
            .filter(|g| g["phase"] == "rl" && g["step"] == step as u64)
            .collect();
        assert_eq!(groups.len(), 8);
        let (mut drawn, mut sum) = (0.0, 0.0);
        for g in &groups {
            let kept: Vec<f64> = g["responses"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["reward"].as_f64().unwrap())
                .collect();
            assert_eq!(kept.len(), 4);
            let all: Vec<f64> = match g["drawn_rewards"].as_array() {
                Some(d) => d.iter().map(|r| r.as_f64().unwrap()).collect(),
                None => kept.clone(),
            };
            assert!(all.len() >= 4, "{g}");
            // The kept rewards appear among the drawn ones, in order.
            let mut it = all.iter();
            assert!(kept.iter().all(|k| it.any(|d| d == k)), "{g}");
            drawn += all.len() as f64;
            sum += all.iter().sum::<f64>();
        }
        let m = |k: &str| line[k].as_f64().unwrap_or_else(|| panic!("{k}: {line}"));
        assert_eq!(m("sampling/samples_drawn"), drawn);
        assert!((m("sampling/pace_kept_frac") - 32.0 / drawn).abs() < 1e-12);
        assert!((m("sampling/pace_drawn_reward_mean") - sum / drawn).abs() < 1e-9);
        discarded += drawn - 32.0;
    }
    assert!(discarded > 0.0, "no episode was thinned out in 5 steps");
}

/// Reduction: when every episode takes the window (both arms 1 s, an unparsable reply 1 s),
/// every episode is kept and the paced run is the unpaced run, metric for metric, plus the
/// pace metrics (kept fraction 1).
#[test]
fn a_pace_that_keeps_everything_is_the_unpaced_run() {
    let tmp = tempfile::tempdir().unwrap();
    let equal = ["env.bandit_arm_durations_s=[1.0, 1.0]"];
    let a = run(bandit(&tmp.path().join("a"), 3, &equal), &quiet()).unwrap();
    let paced: Vec<&str> = equal
        .iter()
        .chain(&["sampling.pace=\"time\"", "sampling.pace_window_s=1.0"])
        .copied()
        .collect();
    let b = run(bandit(&tmp.path().join("b"), 3, &paced), &quiet()).unwrap();
    let mut lb = rl_lines(&b.run_dir);
    for l in &mut lb[1..] {
        let obj = l.as_object_mut().unwrap();
        assert_eq!(obj.remove("sampling/pace_kept_frac"), Some(1.0.into()));
        assert!(obj.remove("sampling/pace_drawn_reward_mean").is_some());
    }
    assert_eq!(rl_lines(&a.run_dir), lb);
}

/// eva's creator on a pool of 8 prompts, a round every 2 steps: the pool grows by exactly what
/// each round adds, evolved prompts reach later batches, every prompt trained on is in the
/// pool the checkpoint saved (the first rounds' prompts among the initial 8), each with its
/// exact answer; a run stopped after 3 steps and resumed equals the uninterrupted one.
#[test]
fn eva_grows_its_pool_saves_it_with_checkpoints_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let lines = assert_resumes_exactly(
        tmp.path(),
        5,
        &[
            "recipe=\"eva\"".into(),
            "rollout.group_size=4".into(),
            "sampling.eva.pool_size=8".into(),
            "sampling.eva.every=2".into(),
            "train.log_samples=6".into(),
        ],
    );
    let metric = |s: usize, k: &str| {
        lines[s][k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} at step {s}"))
    };
    let mut pool = 8.0;
    let mut evolved_seen = 0.0;
    for (s, line) in lines.iter().enumerate().skip(1) {
        let m = |k: &str| metric(s, k);
        let added = m("eva/added");
        assert_eq!(added > 0.0, s % 2 == 0, "step {s}: {line}");
        pool += added;
        assert_eq!(m("eva/pool_size"), pool);
        assert_eq!(m("eva/evolved"), pool - 8.0);
        let frac = m("eva/frac_evolved_in_batch");
        if s <= 2 {
            assert_eq!(frac, 0.0, "no evolved prompt exists before the first round");
        }
        evolved_seen += frac;
        assert!((0.0..=1.0).contains(&m("eva/informativeness_mean")));
    }
    assert!(evolved_seen > 0.0, "no evolved prompt was ever drawn");
    let run_dir = std::fs::read_dir(tmp.path().join("a"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    // The evolved prompt set as the step-4 checkpoint saved it.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("checkpoints/step-4/state.json")).unwrap(),
    )
    .unwrap();
    let saved = state["explore"]["eva"]["prompts"].as_array().unwrap();
    assert_eq!(saved.len() as f64, metric(4, "eva/pool_size"));
    let round_of = |prompt: &str| -> u64 {
        let p = saved
            .iter()
            .find(|p| p["problem"]["prompt"] == prompt)
            .unwrap_or_else(|| panic!("{prompt} is not in the saved pool"));
        p["round"].as_u64().unwrap()
    };
    let samples = grove::report::read_jsonl(&run_dir.join("samples.jsonl")).unwrap();
    for g in samples.iter().filter(|g| g["phase"] == "rl") {
        let step = g["step"].as_u64().unwrap();
        if step > 4 {
            continue;
        }
        let prompt = g["prompt"].as_str().unwrap();
        // rounds run after steps 2 and 4: steps 1-2 see round-0 prompts, 3-4 up to round 1
        assert!(round_of(prompt) <= (step - 1) / 2, "{g}");
        let (a, b) = prompt.trim_end_matches('=').split_once('+').unwrap();
        let sum = a.parse::<u64>().unwrap() + b.parse::<u64>().unwrap();
        assert_eq!(g["answer"], sum.to_string(), "{g}");
    }
}

#[test]
fn eva_refuses_what_it_cannot_do_before_any_step() {
    let refused = |extra: &[&str]| {
        let mut sets: Vec<String> = vec!["recipe=\"eva\"".into()];
        sets.extend(extra.iter().map(|s| s.to_string()));
        config::load(None, &sets).unwrap_err().to_string()
    };
    let e = refused(&["sync.mode=\"lagged\""]);
    assert!(e.contains("sampling.eva") && e.contains("on-policy"), "{e}");
    let e = refused(&["sampling.eva.select_fraction=1.5"]);
    assert!(e.contains("select_fraction") && e.contains("1.5"), "{e}");
    let e = refused(&["sampling.eva.informativeness=\"entropy\""]);
    assert!(e.contains("max-min") && e.contains("variance"), "{e}");
    let e = refused(&["sampling.reinforce_ada.mode=\"balanced\""]);
    assert!(e.contains("reinforce_ada"), "{e}");
}

/// A group of `size` responses to `37+48=` (built-in vocabulary ids) sampled by `version`.
fn buffered_group(group_id: u64, version: u64, size: usize) -> grove::buffer::ExperienceGroup {
    let experiences = (0..size)
        .map(|i| grove::buffer::Experience {
            group_id,
            prompt: "37+48=".into(),
            prompt_ids: vec![3, 7, 11, 4, 8, 12],
            response_ids: vec![8, 5, 1],
            logprobs: vec![-0.25, -1.5, -0.125],
            reward: (i % 2) as f64,
            components: [("correct".to_string(), (i % 2) as f64)].into(),
            answer: "85".into(),
            finished: true,
            policy_version: version,
            use_count: 0,
            trainable: vec![],
            episode: None,
            hidden: None,
        })
        .collect();
    grove::buffer::ExperienceGroup {
        group_id,
        policy_version: version,
        experiences,
        drawn_rewards: vec![],
    }
}

/// A learner on a shared buffer with `sync.max_staleness = 0`: step 1 (at version 0) takes two
/// v0 groups; step 2 (at version 1) drops the three v0 groups left and takes the two v1 groups.
/// `sampling/samples_drawn` counts every response read, the dropped ones included.
#[test]
fn a_shared_buffer_counts_the_stale_groups_it_dropped_as_drawn() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", tmp.path().join("buffer.db").display());
    let mut buffer = grove::buffer::open(&url, 100).unwrap();
    for (id, version) in [(1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (6, 1), (7, 1)] {
        buffer.put(buffered_group(id, version, 4)).unwrap();
    }
    drop(buffer);
    let publish = format!(
        "sync.publish_dir={:?}",
        tmp.path().join("weights").display().to_string()
    );
    let cfg = small(
        &tmp.path().join("run"),
        2,
        &[
            &format!("sync.buffer={url:?}"),
            &publish,
            "sync.max_staleness=0",
            "rollout.prompts_per_step=2",
        ],
    );
    let s = run(cfg, &quiet()).unwrap();
    let lines = rl_lines(&s.run_dir);
    let got: Vec<(f64, f64)> = lines[1..]
        .iter()
        .map(|l| {
            (
                l["sampling/samples_drawn"].as_f64().unwrap(),
                l["staleness/dropped"].as_f64().unwrap(),
            )
        })
        .collect();
    // Step 1: 2 groups × 4; step 2: (3 dropped + 2 taken) × 4.
    assert_eq!(got, vec![(8.0, 0.0), (20.0, 3.0)]);
}
