//! PPO with a critic (`recipe = "ppo"`): critic metrics, the critic in checkpoints, exact
//! resume with an asymmetric critic and a critic warm-up.
use crate::train_rewards::assert_resumes_exactly;

#[test]
fn ppo_with_an_asymmetric_critic_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let extra: Vec<String> = [
        r#"recipe="ppo""#,
        r#"critic.privileged="answer""#,
        "critic.warmup_steps=1",
        "critic.lr=1e-3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let lines = assert_resumes_exactly(tmp.path(), 5, &extra);
    for m in &lines[1..] {
        for key in [
            "critic/value_loss",
            "critic/vf_clipfrac",
            "critic/values_mean",
            "critic/grad_norm",
        ] {
            assert!(m[key].as_f64().is_some_and(f64::is_finite), "{key} in {m}");
        }
    }
    assert!(lines[1]["critic/value_loss"].as_f64().unwrap() > 0.0);
    let root = tmp.path();
    for run in ["a", "b"] {
        let dir = std::fs::read_dir(root.join(run))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let ckpt = dir.join("checkpoints/step-5");
        for f in ["critic.safetensors", "critic_optimizer.safetensors"] {
            assert!(ckpt.join(f).exists(), "{f} missing in {}", ckpt.display());
        }
    }
    let critic = |run: &str| {
        let dir = std::fs::read_dir(root.join(run))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::read(dir.join("checkpoints/step-5/critic.safetensors")).unwrap()
    };
    assert!(critic("a") == critic("b"), "final critic weights differ");
}
