//! `grove train` with `[reward.pipeline.blend]` (learned blend weights, BARFI): exact resume,
//! and the weights learning what the primary reward wants on the built-in arithmetic task.
use std::path::Path;

use crate::common::{quiet, rl_lines};
use crate::train_rewards::assert_resumes_exactly;
use grove::config;
use grove::train::run;

/// A pipeline of the exact-answer verifier (primary) and `aux` (a component table) as the
/// auxiliary, blended from weights 1 and `aux`'s own.
fn blend(aux: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        format!(r#"reward.pipeline.components=[{{name="correct", kind="verifier"}}, {aux}]"#),
        r#"reward.pipeline.blend={primary="correct", auxiliary="aux"}"#.to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Pays +0.5 per response token: a length-penalty with a negative weight. Correct answers
/// are 2–3 digits and EOS, so this auxiliary pays for running on past the answer.
const LENGTH_BONUS: &str =
    r#"{name="aux", kind="length-penalty", coef=1.0, free_len=0, weight=-0.5}"#;
/// The primary's own check under another name: an auxiliary that agrees with it.
const SAME_CHECK: &str = r#"{name="aux", kind="verifier", weight=0.5}"#;

/// The weights move every step, they are in every checkpoint, and a resumed run continues
/// with them exactly (metrics and final weights bit for bit).
#[test]
fn blend_weights_are_checkpointed_and_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    // A warm-up that reaches some accuracy, so the primary's held-out advantages are not all 0.
    let extra = blend(
        LENGTH_BONUS,
        &[
            "warmup.max_steps=200",
            "warmup.eval_every=50",
            "warmup.target_acc=0.15",
            "rollout.prompts_per_step=8",
            "reward.pipeline.blend.heldout_groups=3",
            "reward.pipeline.blend.outer_lr=100.0",
        ],
    );
    let lines = assert_resumes_exactly(tmp.path(), 5, &extra);
    let weights: Vec<(f64, f64)> = lines[1..]
        .iter()
        .map(|m| {
            (
                m["reward/blend/correct"].as_f64().unwrap(),
                m["reward/blend/aux"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        weights[0],
        (1.0, -0.5),
        "step 1 uses the configured weights"
    );
    assert!(
        weights.windows(2).filter(|w| w[0] != w[1]).count() >= 3,
        "the weights must move: {weights:?}"
    );
    for m in &lines[1..] {
        assert!(m["reward/blend_grad/aux"].as_f64().unwrap().is_finite());
    }
    let st: serde_json::Value =
        serde_json::from_str(&find_state(&tmp.path().join("a"), 4)).unwrap();
    assert_eq!(
        st["blend"]["weights"]["aux"].as_f64().unwrap(),
        lines[5]["reward/blend/aux"].as_f64().unwrap(),
        "the checkpoint of step 4 holds the weights step 5 used"
    );
}

/// state.json of `step` in the one run directory under `root`.
fn find_state(root: &Path, step: usize) -> String {
    let run = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("checkpoints").exists())
        .unwrap();
    std::fs::read_to_string(run.join(format!("checkpoints/step-{step}/state.json"))).unwrap()
}

/// The final weights of a 12-step quickstart run with `aux` as the auxiliary.
fn final_weights(root: &Path, aux: &str) -> (f64, f64) {
    let sets = blend(
        aux,
        &[
            &format!("output_dir={:?}", root.display().to_string()),
            "rollout.prompts_per_step=16",
            "train.steps=12",
            "train.eval_every=12",
            "train.eval_size=32",
            "train.checkpoint_every=12",
            "reward.pipeline.blend.heldout_groups=4",
            "reward.pipeline.blend.outer_lr=300.0",
        ],
    );
    let s = run(config::load(None, &sets).unwrap(), &quiet()).unwrap();
    let last = rl_lines(&s.run_dir).pop().unwrap();
    (
        last["reward/blend/correct"].as_f64().unwrap(),
        last["reward/blend/aux"].as_f64().unwrap(),
    )
}

/// On the quickstart after its warm-up (about 20% correct), 12 steps: an auxiliary that pays
/// for length loses weight against the primary (its bonus shrinks from half the primary's
/// weight to under a quarter); one that agrees with the primary gains weight.
#[test]
fn blend_weights_learn_against_a_length_bonus_and_with_an_agreeing_check() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, a) = final_weights(&tmp.path().join("bonus"), LENGTH_BONUS);
    assert!(p > 0.0, "primary weight {p}");
    assert!(
        -a / p < 0.25,
        "the length bonus should fall relative to the primary: φ = ({p}, {a})"
    );
    let (p, a) = final_weights(&tmp.path().join("same"), SAME_CHECK);
    assert!(
        a > 0.5,
        "the agreeing check should not lose weight: φ = ({p}, {a})"
    );
}
