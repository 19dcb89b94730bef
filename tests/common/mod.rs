//! Helpers shared by the training test modules of several test binaries (each group's
//! `main.rs` includes this file as `mod common`).
use std::path::Path;

use grove::train::TrainOptions;

/// The RL lines of a run's metrics.jsonl, without the wall-clock figures (`timing/*`,
/// `throughput/*`), which differ between any two runs; everything else must not.
pub fn rl_lines(run_dir: &Path) -> Vec<serde_json::Value> {
    grove::report::read_jsonl(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|v| v["phase"] == "rl")
        .map(|mut v| {
            let obj = v.as_object_mut().unwrap();
            obj.retain(|k, _| !k.starts_with("timing/") && !k.starts_with("throughput/"));
            v
        })
        .collect()
}

/// Training options that print nothing.
pub fn quiet() -> TrainOptions {
    TrainOptions {
        quiet: true,
        ..Default::default()
    }
}
