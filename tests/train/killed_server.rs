//! What every "the rollout server dies mid-run" test checks, for `grove serve` and vLLM alike:
//! the run stops after its retries with an error naming the server, and what it wrote before
//! the server died (metrics, samples, the step-1 checkpoint) is intact.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `OUT/RUN/checkpoints/step-1`, once the run under `out` has written it (at most 120 s).
pub fn wait_for_step1_checkpoint(out: &Path) -> PathBuf {
    let t = Instant::now();
    loop {
        let found = std::fs::read_dir(out).ok().and_then(|rd| {
            rd.flatten()
                .map(|e| e.path().join("checkpoints/step-1"))
                .find(|p| p.exists())
        });
        if let Some(p) = found {
            return p;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no checkpoint of step 1 under {}",
            out.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The run that wrote `step1` stopped with `err` because the server at `url` died: the error
/// names the server and its two attempts (`remote.retries = 1`), and the run's metrics,
/// samples and step-1 checkpoint survive.
pub fn assert_stopped_by_dead_server(err: &str, url: &str, step1: &Path, max_steps: usize) {
    assert!(err.contains(url) && err.contains("2 attempt(s)"), "{err}");
    let run_dir = step1.parent().unwrap().parent().unwrap();
    let lines = super::common::rl_lines(run_dir);
    assert!(
        !lines.is_empty() && lines.len() < max_steps,
        "{} rl lines",
        lines.len()
    );
    assert!(
        lines.iter().all(|l| l["step"].is_u64()),
        "metrics.jsonl intact"
    );
    let samples = grove::report::read_jsonl(&run_dir.join("samples.jsonl")).unwrap();
    assert!(
        samples.iter().all(|s| s["policy_version"].is_u64()),
        "samples.jsonl intact"
    );
    assert!(
        step1.join("adapter_model.safetensors").exists()
            || step1.join("model.safetensors").exists(),
        "step-1 checkpoint intact"
    );
}
