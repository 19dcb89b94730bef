//! Helpers shared by the training test modules of several test binaries (each group's
//! `main.rs` includes this file as `mod common`).
use std::path::Path;

use grove::config::{self, ValidatedRun};
use grove::train::{run, Summary, TrainOptions};

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

/// Trains `cfg` quietly and stops after `steps` RL steps (their checkpoint written), as a
/// killed run would have.
#[allow(dead_code)] // tests/train only; tests/model includes this file too
pub fn run_stopped_after(cfg: ValidatedRun, steps: usize) -> Summary {
    let opts = TrainOptions {
        stop_after: Some(steps),
        ..quiet()
    };
    run(cfg, &opts).unwrap()
}

/// Resumes the run in `run_dir` from its saved config, as `grove train --resume` does.
#[allow(dead_code)] // tests/train only
pub fn resume_saved(run_dir: &Path) -> Summary {
    let cfg = config::load_for(
        Some(&run_dir.join("config.toml")),
        &[],
        config::Purpose::Resume,
    )
    .unwrap();
    let opts = TrainOptions {
        resume: Some(run_dir.to_path_buf()),
        ..quiet()
    };
    run(cfg, &opts).unwrap()
}
