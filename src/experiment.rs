//! `grove experiment NAME`: small-scale reproductions of the seed papers' claims, one command
//! each, writing a table and a plot into the runs folder (`runs/experiments/NAME/`), or into
//! docs/experiments/ when published (`--publish`), keeping the page's hand-written reading.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config;
use crate::error::{Error, Result};
use crate::report::plot::{line_chart, load_rl_metric, Series};
use crate::train::{run, TrainOptions};

pub struct Variant {
    pub label: &'static str,
    pub sets: &'static [&'static str],
}

pub struct Experiment {
    pub name: &'static str,
    pub claim: &'static str,
    /// Settings shared by every variant.
    pub common: &'static [&'static str],
    pub variants: &'static [Variant],
}

pub const EXPERIMENTS: &[Experiment] = &[REC_OFFPOLICY, NOISY_REWARDS];

const REC_OFFPOLICY: Experiment = Experiment {
    name: "rec-offpolicy",
    claim: "REC (Yao et al. 2025): with stale data (rollout weights synced every 8 steps), REC-OneSide \
            without importance sampling is about as good as GRPO; unclipped REINFORCE degrades; loose \
            clipping (0.6, 2.0) learns faster.",
    common: &["sync.mode=\"lagged\"", "sync.interval=8"],
    variants: &[
        Variant { label: "grpo", sets: &["recipe=\"grpo\""] },
        Variant { label: "rec-oneside-nois", sets: &["recipe=\"rec-oneside-nois\""] },
        Variant { label: "rec-oneside-is", sets: &["recipe=\"rec-oneside-is\""] },
        Variant {
            label: "rec-oneside-nois-loose",
            sets: &["recipe=\"rec-oneside-nois\"", "loss.eps_low=0.6", "loss.eps_high=2.0"],
        },
        Variant {
            label: "reinforce-noclip",
            sets: &["advantage.estimator=\"group-mean\"", "loss.loss=\"rec\"", "loss.rec_weight=\"none\"", "loss.rec_mask=\"none\""],
        },
    ],
};

/// The verifier's noise as in the noisy-rewards paper's headline setting: 10% of wrong answers
/// pass, 20% of right answers fail.
const NOISE: [&str; 2] = ["reward.noise_rho0=0.1", "reward.noise_rho1=0.2"];

const NOISY_REWARDS: Experiment = Experiment {
    name: "noisy-rewards",
    claim: "RL with verifiable yet noisy rewards (Cai et al. 2025): with a verifier that passes 10% of \
            wrong answers (ρ₀ = 0.1) and fails 20% of right ones (ρ₁ = 0.2), uncorrected REINFORCE with a \
            leave-one-out baseline learns less than on clean rewards; the backward (unbiased-reward) and \
            forward (false-negative) corrections recover most of the gap. GRPO on the same noisy rewards is \
            shown for reference: its per-group standardisation cancels any affine correction.",
    common: &[],
    variants: &[
        Variant {
            label: "clean",
            sets: &["recipe=\"noisy-backward\"", "advantage.noisy.rho0=0.0", "advantage.noisy.rho1=0.0"],
        },
        Variant {
            label: "uncorrected",
            sets: &["recipe=\"noisy-backward\"", "advantage.noisy.rho0=0.0", "advantage.noisy.rho1=0.0", NOISE[0], NOISE[1]],
        },
        Variant {
            label: "backward",
            sets: &["recipe=\"noisy-backward\"", "advantage.noisy.rho0=0.1", "advantage.noisy.rho1=0.2", NOISE[0], NOISE[1]],
        },
        Variant {
            label: "forward",
            sets: &["recipe=\"noisy-forward\"", "advantage.noisy.rho0=0.1", "advantage.noisy.rho1=0.2", NOISE[0], NOISE[1]],
        },
        Variant {
            label: "grpo-uncorrected",
            sets: &["recipe=\"grpo\"", NOISE[0], NOISE[1]],
        },
    ],
};

pub fn find(name: &str) -> Result<&'static Experiment> {
    EXPERIMENTS.iter().find(|e| e.name == name).ok_or_else(|| {
        let known: Vec<&str> = EXPERIMENTS.iter().map(|e| e.name).collect();
        Error::config(
            "grove experiment",
            format!("unknown experiment {name:?}; known: {}", known.join(", ")),
        )
    })
}

/// `text` as inline code, or "none" (an empty code span renders as two backticks).
fn code_or_none(text: &str) -> String {
    if text.is_empty() {
        "none".into()
    } else {
        format!("`{text}`")
    }
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let sd = if xs.len() > 1 {
        (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, sd)
}

/// Runs every variant for every seed and writes `<out>/<name>.md` and `<out>/<name>.png`.
/// `extra` are `--set` overrides applied to all runs (e.g. a shorter `train.steps`).
pub fn run_experiment(
    exp: &Experiment,
    seeds: &[u64],
    extra: &[String],
    runs_dir: &Path,
    out: &Path,
    command: &str,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut rows = Vec::new();
    let mut series = Vec::new();
    for v in exp.variants {
        let mut finals = Vec::new();
        let mut curves: Vec<Vec<(f64, f64)>> = Vec::new();
        let mut t0s = Vec::new();
        for &seed in seeds {
            let mut sets: Vec<String> = exp
                .common
                .iter()
                .chain(v.sets)
                .map(|s| s.to_string())
                .collect();
            sets.push(format!("seed={seed}"));
            sets.push(format!("name=\"{}-{}-s{seed}\"", exp.name, v.label));
            sets.push(format!("output_dir={:?}", runs_dir.display().to_string()));
            sets.extend(extra.iter().cloned());
            let cfg = config::load(None, &sets)?;
            eprintln!("[{}] {} seed {seed}", exp.name, v.label);
            let s = run(
                cfg,
                &TrainOptions {
                    quiet: true,
                    ..Default::default()
                },
            )?;
            finals.push(s.acc_final);
            t0s.push(s.acc_after_warmup);
            curves.push(load_rl_metric(&s.run_dir, "acc/eval")?);
        }
        // Mean curve over seeds (the eval steps are the same for every seed).
        let n = curves.iter().map(|c| c.len()).min().unwrap_or(0);
        let mean_curve: Vec<(f64, f64)> = (0..n)
            .map(|k| {
                (
                    curves[0][k].0,
                    curves.iter().map(|c| c[k].1).sum::<f64>() / curves.len() as f64,
                )
            })
            .collect();
        let (m, sd) = mean_sd(&finals);
        let (m0, _) = mean_sd(&t0s);
        rows.push((v.label, m0, m, sd, finals.clone()));
        series.push(Series {
            label: v.label.to_string(),
            points: mean_curve,
        });
    }
    let png = out.join(format!("{}.png", exp.name));
    line_chart(
        &png,
        &format!(
            "{}: held-out accuracy (mean over {} seeds)",
            exp.name,
            seeds.len()
        ),
        "RL step",
        "accuracy",
        &series,
    )?;
    let mut md = String::new();
    let _ = writeln!(md, "# Experiment `{}`\n\nClaim: {}\n", exp.name, exp.claim);
    let _ = writeln!(md, "Command:\n\n```sh\n{command}\n```\n");
    let _ = writeln!(
        md,
        "Shared settings: {} on the quickstart task; seeds {:?}; extra: {}.\n",
        code_or_none(&exp.common.join(" ")),
        seeds,
        code_or_none(&extra.join(" "))
    );
    let _ = writeln!(
        md,
        "| variant | held-out acc after warm-up | final held-out acc (mean ± sd) | per seed |"
    );
    let _ = writeln!(md, "|---|---|---|---|");
    for (label, m0, m, sd, finals) in &rows {
        let per: Vec<String> = finals.iter().map(|f| format!("{:.1}", f * 100.0)).collect();
        let _ = writeln!(
            md,
            "| {label} | {:.1}% | {:.1}% ± {:.1} | {} |",
            m0 * 100.0,
            m * 100.0,
            sd * 100.0,
            per.join(", ")
        );
    }
    let _ = writeln!(md, "\n![accuracy]({}.png)", exp.name);
    let path = out.join(format!("{}.md", exp.name));
    let md = match std::fs::read_to_string(&path) {
        Ok(old) => keep_reading(&old, md),
        Err(_) => md,
    };
    std::fs::write(&path, md).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// The folder where the command writes the table and plot: `--out`, docs/experiments with
/// `--publish`, else `<runs_dir>/<name>` (next to its runs, so a plain run never rewrites the
/// committed page).
pub fn output_dir(runs_dir: &Path, name: &str, out: Option<&Path>, publish: bool) -> PathBuf {
    match (out, publish) {
        (Some(o), _) => o.to_path_buf(),
        (None, true) => PathBuf::from(PUBLISHED_DIR),
        (None, false) => runs_dir.join(name),
    }
}

/// Where `--publish` writes: the committed pages.
pub const PUBLISHED_DIR: &str = "docs/experiments";

/// The heading from which a page is written by hand; regenerating keeps it and what follows.
pub const READING_HEADING: &str = "## Reading";

/// `generated` followed by the hand-written part of `old` (from [`READING_HEADING`] on).
pub fn keep_reading(old: &str, generated: String) -> String {
    let at = old
        .match_indices(READING_HEADING)
        .find(|(i, _)| *i == 0 || old.as_bytes()[i - 1] == b'\n')
        .map(|(i, _)| i);
    match at {
        Some(i) => format!("{}\n\n{}", generated.trim_end(), &old[i..]),
        None => generated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_of_every_experiment_is_a_valid_config() {
        for exp in EXPERIMENTS {
            for v in exp.variants {
                let sets: Vec<String> = exp
                    .common
                    .iter()
                    .chain(v.sets)
                    .map(|s| s.to_string())
                    .collect();
                if let Err(e) = config::load(None, &sets) {
                    panic!("{} / {}: {e}", exp.name, v.label);
                }
            }
        }
    }

    #[test]
    fn a_plain_run_writes_next_to_its_runs_and_only_publish_writes_docs() {
        let runs = Path::new("runs/experiments");
        assert_eq!(
            output_dir(runs, "rec-offpolicy", None, false),
            Path::new("runs/experiments/rec-offpolicy")
        );
        assert_eq!(
            output_dir(runs, "rec-offpolicy", None, true),
            Path::new("docs/experiments")
        );
        assert_eq!(
            output_dir(runs, "x", Some(Path::new("elsewhere")), false),
            Path::new("elsewhere")
        );
    }

    #[test]
    fn regenerating_a_page_keeps_its_hand_written_reading() {
        let old = "# Experiment\n\n| old table |\n\n## Reading (by hand)\n\nIt holds.\n";
        let new = keep_reading(old, "# Experiment\n\n| new table |\n".to_string());
        assert_eq!(
            new,
            "# Experiment\n\n| new table |\n\n## Reading (by hand)\n\nIt holds.\n"
        );
        assert_eq!(keep_reading("no reading\n", "gen\n".into()), "gen\n");
    }
}
