//! `grove experiment NAME`: small-scale reproductions of the seed papers' claims, one command
//! each, writing a table and a plot into the runs folder (`runs/experiments/NAME/`), or into
//! docs/experiments/ when published (`--publish`), keeping the page's hand-written reading.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config;
use crate::error::{Error, Result};
use crate::eval::runner::{run_eval, EvalOptions, EvalTask};
use crate::report::plot::{line_chart, load_rl_metric, Series};
use crate::task::TaskKind;
use crate::train::{run, TrainOptions};

pub struct Variant {
    pub label: &'static str,
    pub sets: &'static [&'static str],
}

pub struct Experiment {
    pub name: &'static str,
    pub claim: &'static str,
    /// What the runs train on, as the page says it.
    pub setting: &'static str,
    /// Settings shared by every variant.
    pub common: &'static [&'static str],
    pub variants: &'static [Variant],
    /// Training metrics reported beside held-out accuracy: each run's mean over its last
    /// [`TAIL_STEPS`] RL steps, then mean ± sd over seeds; each gets its own plot.
    pub tail_metrics: &'static [&'static str],
    /// The x-axis of every plot: `None` for the RL step, or a per-step metric whose running sum
    /// is the x (e.g. `sampling/samples_drawn`, when variants draw different amounts per step);
    /// its total per run is then reported too.
    pub x_metric: Option<&'static str>,
    /// Offline experiments: the data every variant of a seed trains from (`sync.offline`).
    pub offline: Option<OfflineData>,
    /// Ends every run with a pass@k evaluation of its final policy on the held-out split.
    pub pass_at_k: Option<PassAtK>,
    /// Each seed's warm-up runs once (a run `<name>-warmup-s<seed>`: `common`, the extra
    /// `--set`s, `train.steps=0`) and every variant of the seed starts from its checkpoint
    /// (`model.source`, so no warm-up of its own): the variants share their starting policy
    /// exactly, and the warm-up is paid once per seed instead of once per run.
    pub shared_warmup: bool,
}

/// A pass@k evaluation of a run's final checkpoint, as `grove eval CKPT --task <task or env
/// kind> --n samples --k ks --temperature temperature` runs it: `samples` per held-out
/// prompt (or episode), the unbiased estimator per prompt, averaged; each run's per-prompt
/// results go to `<run>/pass-at-k.jsonl`.
pub struct PassAtK {
    pub samples: usize,
    pub ks: &'static [usize],
    pub temperature: f64,
}

/// Offline data sampled once per seed, before the variants: a behaviour run (`common`, then
/// the experiment's extra `--set`s, then `behaviour`) ends with a checkpoint whose policy
/// samples `groups` groups into `<runs>/<experiment>-data-s<seed>.jsonl` (as `grove explore
/// --policy CKPT --out FILE` does). The variants start from the same seed, so their own
/// warm-up ends at the behaviour policy: the data is on-policy at RL step 0 and grows stale.
pub struct OfflineData {
    pub behaviour: &'static [&'static str],
    pub groups: usize,
}

/// RL steps at the end of a run over which a tail metric is averaged.
pub const TAIL_STEPS: usize = 10;

mod catalog;
pub use catalog::EXPERIMENTS;

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
/// `extra` are `--set` overrides applied to all runs (e.g. a shorter `train.steps`). With
/// `reuse`, a run whose folder already exists is resumed instead (see `train_or_resume`).
#[allow(clippy::too_many_arguments)]
pub fn run_experiment(
    exp: &Experiment,
    seeds: &[u64],
    extra: &[String],
    runs_dir: &Path,
    out: &Path,
    command: &str,
    reuse: bool,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut rows = Vec::new();
    let mut series = Vec::new();
    // Per tail metric: one mean curve per variant, and each variant's per-seed tail means.
    let mut tail_series: Vec<Vec<Series>> = vec![Vec::new(); exp.tail_metrics.len()];
    let mut tails: Vec<Vec<Vec<f64>>> = Vec::new();
    // Per variant, per seed: pass@k for each k (empty without a pass@k evaluation).
    let mut pass: Vec<Vec<Vec<f64>>> = Vec::new();
    let data_files = match &exp.offline {
        Some(data) => seeds
            .iter()
            .map(|&seed| sample_offline_data(exp.name, data, exp.common, seed, extra, runs_dir))
            .collect::<Result<Vec<_>>>()?,
        None => vec![],
    };
    let warm_starts = match exp.shared_warmup {
        true => seeds
            .iter()
            .map(|&seed| shared_warmup(exp.name, exp.common, seed, extra, runs_dir))
            .collect::<Result<Vec<_>>>()?,
        false => vec![],
    };
    // Per variant: each seed's total of the x metric.
    let mut totals: Vec<Vec<f64>> = Vec::new();
    let x_label = match exp.x_metric {
        Some(m) => format!("{m} (running sum)"),
        None => "RL step".to_string(),
    };
    for v in exp.variants {
        let mut finals = Vec::new();
        let mut curves: Vec<Vec<(f64, f64)>> = Vec::new();
        let mut t0s = Vec::new();
        let mut tail_curves: Vec<Vec<Vec<(f64, f64)>>> = vec![Vec::new(); exp.tail_metrics.len()];
        let mut x_totals = Vec::new();
        // Per seed: pass@k for each k of the experiment's evaluation.
        let mut seed_pass: Vec<Vec<f64>> = Vec::new();
        for (i, &seed) in seeds.iter().enumerate() {
            let mut sets: Vec<String> = exp
                .common
                .iter()
                .chain(v.sets)
                .map(|s| s.to_string())
                .collect();
            if let Some(file) = data_files.get(i) {
                sets.push(format!("sync.offline={:?}", file.display().to_string()));
            }
            if let Some(ckpt) = warm_starts.get(i) {
                sets.push(format!("model.source={:?}", ckpt.display().to_string()));
            }
            sets.push(format!("seed={seed}"));
            sets.push(format!("name=\"{}-{}-s{seed}\"", exp.name, v.label));
            sets.push(format!("output_dir={:?}", runs_dir.display().to_string()));
            sets.extend(extra.iter().cloned());
            let task = pass_at_k_task(&config::load(None, &sets)?)?;
            eprintln!("[{}] {} seed {seed}", exp.name, v.label);
            let dir = runs_dir.join(format!("{}-{}-s{seed}", exp.name, v.label));
            let s = train_or_resume(&sets, &dir, reuse)?;
            finals.push(s.acc_final);
            t0s.push(s.acc_after_warmup);
            if let Some(spec) = &exp.pass_at_k {
                seed_pass.push(pass_at_k_of_run(spec, task, &s.run_dir, seed)?);
            }
            let per_step = match exp.x_metric {
                Some(m) => Some(load_rl_metric(&s.run_dir, m)?),
                None => None,
            };
            let x_axis = |curve: Vec<(f64, f64)>| match &per_step {
                Some(ps) => against_running_sum(&curve, ps),
                None => curve,
            };
            curves.push(x_axis(load_rl_metric(&s.run_dir, "acc/eval")?));
            for (k, metric) in exp.tail_metrics.iter().enumerate() {
                tail_curves[k].push(x_axis(load_rl_metric(&s.run_dir, metric)?));
            }
            if let Some(ps) = &per_step {
                x_totals.push(ps.iter().map(|p| p.1).sum::<f64>());
            }
        }
        let (m, sd) = mean_sd(&finals);
        let (m0, _) = mean_sd(&t0s);
        rows.push((v.label, m0, m, sd, finals.clone()));
        totals.push(x_totals);
        series.push(Series {
            label: v.label.to_string(),
            points: mean_curve(&curves),
        });
        let mut variant_tails = Vec::new();
        for (k, per_seed) in tail_curves.iter().enumerate() {
            variant_tails.push(per_seed.iter().map(|c| tail_mean(c)).collect());
            tail_series[k].push(Series {
                label: v.label.to_string(),
                points: mean_curve(per_seed),
            });
        }
        tails.push(variant_tails);
        pass.push(seed_pass);
    }
    for (metric, s) in exp.tail_metrics.iter().zip(&tail_series) {
        line_chart(
            &out.join(tail_png(exp.name, metric)),
            &format!("{}: {metric} (mean over {} seeds)", exp.name, seeds.len()),
            &x_label,
            metric,
            s,
        )?;
    }
    if let Some(spec) = &exp.pass_at_k {
        plot_pass_at_k(exp, spec, &pass, seeds.len(), out)?;
    }
    let png = out.join(format!("{}.png", exp.name));
    line_chart(
        &png,
        &format!(
            "{}: held-out accuracy (mean over {} seeds)",
            exp.name,
            seeds.len()
        ),
        &x_label,
        "accuracy",
        &series,
    )?;
    let md = page(
        exp,
        &Results {
            seeds,
            extra,
            command,
            rows: &rows,
            tails: &tails,
            totals: &totals,
            pass: &pass,
        },
    );
    let path = out.join(format!("{}.md", exp.name));
    let md = match std::fs::read_to_string(&path) {
        Ok(old) => keep_reading(&old, md),
        Err(_) => md,
    };
    std::fs::write(&path, md).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// Trains the run `sets` describe, whose folder is `dir`. With `reuse` and `dir` already
/// there, resumes it as `grove train --resume` does: a finished run is read back, not trained
/// again (so seeds run as separate processes can be gathered into one page, with the same
/// numbers a single invocation writes: runs are deterministic), and an unfinished one goes on
/// from its last checkpoint (an unfinished async run is an error: it cannot resume exactly). Its recorded config must be the one `sets` give; the error names
/// the keys that differ.
fn train_or_resume(sets: &[String], dir: &Path, reuse: bool) -> Result<crate::train::Summary> {
    let quiet = TrainOptions {
        quiet: true,
        ..Default::default()
    };
    if !(reuse && dir.exists()) {
        return run(config::load(None, sets)?, &quiet);
    }
    let raw = config::resume::resume_config(dir, None, sets, false)?;
    let source = dir.join("config.toml").display().to_string();
    // An async run cannot be resumed exactly: only a finished one is read back.
    let purpose = match raw.sync.mode {
        config::SyncMode::Async => config::Purpose::ReadBack,
        _ => config::Purpose::Resume,
    };
    let cfg = config::validate(raw, &source, purpose)?;
    run(
        cfg,
        &TrainOptions {
            resume: Some(dir.to_path_buf()),
            ..quiet
        },
    )
}

/// What [`run_experiment`] measured, for its page.
struct Results<'a> {
    seeds: &'a [u64],
    extra: &'a [String],
    command: &'a str,
    /// Per variant: label, held-out accuracy after warm-up (mean), final (mean, sd, per seed).
    rows: &'a [(&'static str, f64, f64, f64, Vec<f64>)],
    /// Per variant, per tail metric: each seed's tail mean.
    tails: &'a [Vec<Vec<f64>>],
    /// Per variant: each seed's total of the x metric (empty without one).
    totals: &'a [Vec<f64>],
    /// Per variant, per seed: pass@k for each k of the experiment's evaluation.
    pass: &'a [Vec<Vec<f64>>],
}

/// The generated part of the page: claim, command, settings, tables and plot links.
fn page(exp: &Experiment, r: &Results<'_>) -> String {
    let Results {
        seeds,
        extra,
        command,
        rows,
        tails,
        totals,
        pass,
    } = *r;
    let mut md = String::new();
    let _ = writeln!(md, "# Experiment `{}`\n\nClaim: {}\n", exp.name, exp.claim);
    let _ = writeln!(md, "Command:\n\n```sh\n{command}\n```\n");
    let _ = writeln!(
        md,
        "Shared settings: {} on {}; seeds {:?}; extra: {}.\n",
        code_or_none(&exp.common.join(" ")),
        exp.setting,
        seeds,
        code_or_none(&extra.join(" "))
    );
    if let Some(data) = &exp.offline {
        let _ = writeln!(
            md,
            "Offline data: per seed, {} groups sampled by the policy of a behaviour run ({}), \
             written to `<runs>/{}-data-s<seed>.jsonl`; every variant trains from that file.\n",
            data.groups,
            code_or_none(&data.behaviour.join(" ")),
            exp.name
        );
    }
    let _ = writeln!(
        md,
        "| variant | held-out acc after warm-up | final held-out acc (mean ± sd) | per seed |"
    );
    let _ = writeln!(md, "|---|---|---|---|");
    for (label, m0, m, sd, finals) in rows {
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
    if let Some(m) = exp.x_metric {
        let _ = writeln!(
            md,
            "\n| variant | total `{m}` over the run (mean ± sd) | per seed |\n|---|---|---|"
        );
        for (v, per_seed) in exp.variants.iter().zip(totals) {
            let (m, sd) = mean_sd(per_seed);
            let per: Vec<String> = per_seed.iter().map(|t| format!("{t:.0}")).collect();
            let _ = writeln!(
                md,
                "| {} | {m:.0} ± {sd:.0} | {} |",
                v.label,
                per.join(", ")
            );
        }
        let _ = writeln!(md, "\nThe plots' x-axis is the running sum of `{m}`.");
    }
    let _ = writeln!(md, "\n![accuracy]({}.png)", exp.name);
    if let Some(spec) = &exp.pass_at_k {
        md.push_str(&pass_at_k_table(exp, spec, pass));
    }
    if !exp.tail_metrics.is_empty() {
        let _ = writeln!(
            md,
            "\nTraining metrics, each run's mean over its last {TAIL_STEPS} RL steps (mean ± sd \
             over seeds):\n"
        );
        let _ = writeln!(md, "| variant | {} |", exp.tail_metrics.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(exp.tail_metrics.len()));
        for (v, per_metric) in exp.variants.iter().zip(tails) {
            let cells: Vec<String> = per_metric.iter().map(|xs| tail_cell(xs)).collect();
            let _ = writeln!(md, "| {} | {} |", v.label, cells.join(" | "));
        }
        for metric in exp.tail_metrics {
            let _ = writeln!(md, "\n![{metric}]({})", tail_png(exp.name, metric));
        }
    }
    md
}

/// What a pass@k evaluation of the run samples: its environment's held-out episodes, or the
/// built-in arithmetic task's held-out split.
fn pass_at_k_task(cfg: &config::ValidatedRun) -> Result<EvalTask> {
    match (&cfg.env, cfg.task.kind) {
        (Some(env), _) => Ok(EvalTask::Env(env.kind)),
        (None, TaskKind::Arithmetic) => Ok(EvalTask::Builtin),
        (None, other) => Err(Error::config(
            "grove experiment",
            format!(
                "a pass@k evaluation runs on an environment or the built-in arithmetic task, \
                 not task.kind = {other:?}"
            ),
        )),
    }
}

/// pass@k of a finished run's last checkpoint for each k of `spec` (see [`PassAtK`]).
fn pass_at_k_of_run(spec: &PassAtK, task: EvalTask, run_dir: &Path, seed: u64) -> Result<Vec<f64>> {
    let policy = last_checkpoint(&run_dir.join("checkpoints"))?;
    let opts = EvalOptions {
        task,
        n: spec.samples,
        ks: spec.ks.to_vec(),
        temperature: spec.temperature,
        out: Some(run_dir.join("pass-at-k.jsonl")),
        batch_size: PASS_AT_K_BATCH,
        seed,
        ..Default::default()
    };
    let report = run_eval(&policy, &opts)?;
    eprintln!(
        "  pass@k of {}: {} ({:.0} s)",
        policy.display(),
        report
            .summary
            .pass_at_k
            .iter()
            .map(|(k, v)| format!("{k}: {v:.3}"))
            .collect::<Vec<_>>()
            .join(", "),
        report.wall_s
    );
    Ok(report.summary.pass_at_k.iter().map(|p| p.1).collect())
}

/// Episodes (or responses) a pass@k evaluation decodes together.
const PASS_AT_K_BATCH: usize = 256;

/// The page's pass@k table: one row per variant, mean ± sd over seeds for each k.
fn pass_at_k_table(exp: &Experiment, spec: &PassAtK, pass: &[Vec<Vec<f64>>]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\npass@k of each run's final policy: {} samples per held-out prompt at temperature {}, \
         the unbiased estimator per prompt, averaged over prompts; mean ± sd over seeds \
         (each run's per-prompt counts: `<run>/pass-at-k.jsonl`).\n",
        spec.samples, spec.temperature
    );
    let heads: Vec<String> = spec.ks.iter().map(|k| format!("pass@{k}")).collect();
    let _ = writeln!(md, "| variant | {} |", heads.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(spec.ks.len()));
    for (v, per_seed) in exp.variants.iter().zip(pass) {
        let cells: Vec<String> = (0..spec.ks.len())
            .map(|i| {
                let xs: Vec<f64> = per_seed.iter().map(|p| p[i]).collect();
                let (m, sd) = mean_sd(&xs);
                format!("{:.1}% ± {:.1}", m * 100.0, sd * 100.0)
            })
            .collect();
        let _ = writeln!(md, "| {} | {} |", v.label, cells.join(" | "));
    }
    let _ = writeln!(md, "\n![pass@k]({})", pass_at_k_png(exp.name));
    md
}

/// The pass@k plot file: `nsr-passk-pass-at-k.png`.
fn pass_at_k_png(experiment: &str) -> String {
    format!("{experiment}-pass-at-k.png")
}

/// pass@k against log2 k, one line per variant (the mean over seeds).
fn plot_pass_at_k(
    exp: &Experiment,
    spec: &PassAtK,
    pass: &[Vec<Vec<f64>>],
    seeds: usize,
    out: &Path,
) -> Result<()> {
    let series: Vec<Series> = exp
        .variants
        .iter()
        .zip(pass)
        .map(|(v, per_seed)| Series {
            label: v.label.to_string(),
            points: spec
                .ks
                .iter()
                .enumerate()
                .map(|(i, &k)| {
                    let xs: Vec<f64> = per_seed.iter().map(|p| p[i]).collect();
                    ((k as f64).log2(), mean_sd(&xs).0)
                })
                .collect(),
        })
        .collect();
    line_chart(
        &out.join(pass_at_k_png(exp.name)),
        &format!(
            "{}: pass@k of the final policy (mean over {seeds} seeds)",
            exp.name
        ),
        "log2 k",
        "pass@k",
        &series,
    )?;
    Ok(())
}

/// Runs the warm-up of one seed (see [`Experiment::shared_warmup`]); returns its checkpoint.
fn shared_warmup(
    name: &str,
    common: &[&str],
    seed: u64,
    extra: &[String],
    runs_dir: &Path,
) -> Result<PathBuf> {
    let mut sets: Vec<String> = common.iter().map(|s| s.to_string()).collect();
    sets.extend(extra.iter().cloned());
    sets.push("train.steps=0".into());
    sets.push(format!("seed={seed}"));
    sets.push(format!("output_dir={:?}", runs_dir.display().to_string()));
    sets.push(format!("name=\"{name}-warmup-s{seed}\""));
    eprintln!("[{name}] warm-up, seed {seed}");
    let summary = run(
        config::load(None, &sets)?,
        &TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )?;
    last_checkpoint(&summary.run_dir.join("checkpoints"))
}

/// Runs the behaviour run of one seed and samples its offline data (see [`OfflineData`]);
/// returns the data file. An existing file is replaced: `grove explore --out` appends.
fn sample_offline_data(
    name: &str,
    data: &OfflineData,
    common: &[&str],
    seed: u64,
    extra: &[String],
    runs_dir: &Path,
) -> Result<PathBuf> {
    let mut sets: Vec<String> = common.iter().map(|s| s.to_string()).collect();
    sets.extend(extra.iter().cloned());
    sets.extend(data.behaviour.iter().map(|s| s.to_string()));
    sets.push(format!("seed={seed}"));
    sets.push(format!("output_dir={:?}", runs_dir.display().to_string()));
    let run_name = format!("{name}-behaviour-s{seed}");
    eprintln!("[{name}] behaviour policy, seed {seed}");
    let summary = run(
        config::load(
            None,
            &[sets.clone(), vec![format!("name={run_name:?}")]].concat(),
        )?,
        &TrainOptions {
            quiet: true,
            ..Default::default()
        },
    )?;
    let policy = last_checkpoint(&summary.run_dir.join("checkpoints"))?;
    let file = runs_dir.join(format!("{name}-data-s{seed}.jsonl"));
    match std::fs::remove_file(&file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&file, e)),
        _ => {}
    }
    eprintln!(
        "[{name}] sampling {} groups into {}",
        data.groups,
        file.display()
    );
    let cfg = config::load_for(None, &sets, config::Purpose::Explore)?;
    crate::train::explorer::run_explorer(
        cfg,
        &crate::train::explorer::ExploreOptions {
            out: Some(file.clone()),
            buffer: None,
            weights: None,
            policy: Some(policy),
            groups: Some(data.groups),
            explorer_id: 1,
            quiet: true,
        },
    )?;
    Ok(file)
}

/// The `step-N` folder with the largest N.
fn last_checkpoint(dir: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse::<u64>()
                .ok()?;
            Some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
        .ok_or_else(|| Error::RunDir {
            path: dir.to_path_buf(),
            msg: "no step-N checkpoint to sample offline data with".into(),
        })
}

/// Mean curve over seeds, point by point (the shortest run bounds it). Both coordinates are
/// averaged: with RL steps on x every seed has the same x; with a running sum on x (samples
/// drawn) the point is the seeds' mean position.
fn mean_curve(curves: &[Vec<(f64, f64)>]) -> Vec<(f64, f64)> {
    let n = curves.iter().map(|c| c.len()).min().unwrap_or(0);
    let k_seeds = curves.len() as f64;
    (0..n)
        .map(|k| {
            (
                curves.iter().map(|c| c[k].0).sum::<f64>() / k_seeds,
                curves.iter().map(|c| c[k].1).sum::<f64>() / k_seeds,
            )
        })
        .collect()
}

/// `curve` (step, value) with each step replaced by the sum of `per_step` (step, amount) over
/// the steps up to and including it (0 before the first).
fn against_running_sum(curve: &[(f64, f64)], per_step: &[(f64, f64)]) -> Vec<(f64, f64)> {
    curve
        .iter()
        .map(|&(step, v)| {
            let x: f64 = per_step.iter().filter(|p| p.0 <= step).map(|p| p.1).sum();
            (x, v)
        })
        .collect()
}

/// Mean of the last [`TAIL_STEPS`] points of a curve (all when fewer; NaN when empty: a
/// variant that does not log the metric, shown as "not logged" rather than as a 0).
fn tail_mean(curve: &[(f64, f64)]) -> f64 {
    let tail = &curve[curve.len().saturating_sub(TAIL_STEPS)..];
    if tail.is_empty() {
        return f64::NAN;
    }
    tail.iter().map(|p| p.1).sum::<f64>() / tail.len() as f64
}

/// A tail-metric cell: mean ± sd over the seeds that logged the metric, or "not logged".
fn tail_cell(per_seed: &[f64]) -> String {
    let logged: Vec<f64> = per_seed.iter().copied().filter(|x| !x.is_nan()).collect();
    if logged.is_empty() {
        return "not logged".into();
    }
    let (m, sd) = mean_sd(&logged);
    format!("{m:.3} ± {sd:.3}")
}

/// The plot file of a tail metric: `gated-reward-reward-steps-mean.png`.
fn tail_png(experiment: &str, metric: &str) -> String {
    format!("{experiment}-{}.png", metric.replace(['/', '_'], "-"))
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

    /// The offline stage end to end, shortened: one seed's behaviour run, its data file, and
    /// two variants that train from it. The file holds two steps' worth of groups and the
    /// variants ask for three steps, so a variant that stops after two read the file.
    #[test]
    fn offline_experiments_train_every_variant_from_each_seeds_sampled_data() {
        const EXP: Experiment = Experiment {
            name: "offline-test",
            claim: "",
            setting: "",
            common: &["recipe=\"topr\"", "loss.agg=\"seq-mean-token-mean\""],
            variants: &[
                Variant {
                    label: "topr",
                    sets: &[],
                },
                Variant {
                    label: "pos",
                    sets: &["advantage.estimator=\"psr\""],
                },
            ],
            tail_metrics: &[],
            x_metric: None,
            offline: Some(OfflineData {
                behaviour: &["train.steps=0"],
                groups: 8,
            }),
            pass_at_k: None,
            shared_warmup: false,
        };
        let tmp = tempfile::tempdir().unwrap();
        let (runs, out) = (tmp.path().join("runs"), tmp.path().join("out"));
        let extra: Vec<String> = [
            "warmup.max_steps=20",
            "warmup.eval_size=32",
            "train.steps=3",
            "train.eval_size=32",
            "train.eval_every=1",
            "rollout.prompts_per_step=4",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let page = run_experiment(&EXP, &[0], &extra, &runs, &out, "cmd", false).unwrap();
        let data = std::fs::read_to_string(runs.join("offline-test-data-s0.jsonl")).unwrap();
        assert_eq!(data.lines().count(), 8);
        for v in ["topr", "pos"] {
            let acc =
                load_rl_metric(&runs.join(format!("offline-test-{v}-s0")), "acc/eval").unwrap();
            let steps: Vec<f64> = acc.iter().map(|p| p.0).collect();
            assert_eq!(steps, [0.0, 1.0, 2.0], "{v}");
        }
        let md = std::fs::read_to_string(page).unwrap();
        assert!(md.contains("Offline data: per seed, 8 groups"), "{md}");
    }

    /// The pass@k stage end to end, shortened: each run's final checkpoint sampled n times
    /// per held-out countdown episode, the per-episode counts written next to the run, the
    /// table and the plot on the page; pass@k never falls as k grows.
    #[test]
    fn pass_at_k_experiments_evaluate_each_runs_final_policy() {
        const EXP: Experiment = Experiment {
            name: "passk-test",
            claim: "",
            setting: "",
            common: &[
                "env.kind=\"countdown\"",
                "env.countdown_numbers=3",
                "env.countdown_max_number=9",
                "env.countdown_max_target=30",
                "env.countdown_prompt=\"short\"",
                "env.max_tokens=40",
                "env.heldout_size=6",
                "rollout.max_new_tokens=8",
                "rollout.prompts_per_step=4",
                "rollout.group_size=4",
            ],
            variants: &[
                Variant {
                    label: "warm-up-only",
                    sets: &["train.steps=0"],
                },
                Variant {
                    label: "nsr",
                    sets: &["recipe=\"nsr\""],
                },
            ],
            tail_metrics: &[],
            x_metric: None,
            offline: None,
            pass_at_k: Some(PassAtK {
                samples: 4,
                ks: &[1, 2, 4],
                temperature: 1.0,
            }),
            shared_warmup: true,
        };
        let tmp = tempfile::tempdir().unwrap();
        let (runs, out) = (tmp.path().join("runs"), tmp.path().join("out"));
        let extra: Vec<String> = [
            "warmup.max_steps=10",
            "warmup.eval_every=10",
            "warmup.eval_size=6",
            "train.steps=2",
            "train.eval_every=1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let page = run_experiment(&EXP, &[0], &extra, &runs, &out, "cmd", false).unwrap();
        for v in ["warm-up-only", "nsr"] {
            let file = runs.join(format!("passk-test-{v}-s0/pass-at-k.jsonl"));
            let lines = std::fs::read_to_string(&file).unwrap();
            assert_eq!(lines.lines().count(), 6, "{v}");
        }
        assert!(out.join("passk-test-pass-at-k.png").is_file());
        let md = std::fs::read_to_string(page).unwrap();
        assert!(
            md.contains("| variant | pass@1 | pass@2 | pass@4 |"),
            "{md}"
        );
        for v in ["warm-up-only", "nsr"] {
            // The pass@k table comes after the accuracy table: its row is the last one.
            let row = md.lines().rfind(|l| l.starts_with(&format!("| {v} | ")));
            let cells: Vec<f64> = row
                .unwrap_or_else(|| panic!("no pass@k row for {v}: {md}"))
                .split('|')
                .filter_map(|c| c.trim().split('%').next()?.parse().ok())
                .collect();
            assert_eq!(cells.len(), 3, "{v}: {cells:?}");
            assert!(cells.windows(2).all(|w| w[0] <= w[1]), "{v}: {cells:?}");
        }
    }

    /// Seeds run as separate processes, gathered with `reuse`: the finished runs are read
    /// back (not trained again: their metrics files are untouched) into the page a single
    /// invocation writes, and a run whose recorded config differs is refused by name.
    #[test]
    fn reuse_gathers_finished_runs_into_the_same_page() {
        const EXP: Experiment = Experiment {
            name: "reuse-test",
            claim: "",
            setting: "",
            common: &["train.checkpoint_every=2"],
            variants: &[Variant {
                label: "grpo",
                sets: &[],
            }],
            tail_metrics: &[],
            x_metric: None,
            offline: None,
            pass_at_k: None,
            shared_warmup: false,
        };
        let tmp = tempfile::tempdir().unwrap();
        let runs = tmp.path().join("runs");
        let extra: Vec<String> = [
            "warmup.max_steps=10",
            "warmup.eval_size=16",
            "train.steps=2",
            "train.eval_size=16",
            "train.eval_every=1",
            "rollout.prompts_per_step=2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
        let page = run_experiment(&EXP, &[0], &extra, &runs, &one, "cmd", false).unwrap();
        let metrics = runs.join("reuse-test-grpo-s0/metrics.jsonl");
        let trained = std::fs::read_to_string(&metrics).unwrap();
        let again = run_experiment(&EXP, &[0], &extra, &runs, &two, "cmd", true).unwrap();
        assert_eq!(std::fs::read_to_string(&metrics).unwrap(), trained);
        assert_eq!(
            std::fs::read_to_string(page).unwrap(),
            std::fs::read_to_string(again).unwrap()
        );
        let mut other = extra.clone();
        other.push("train.lr=1e-3".into());
        let e = run_experiment(&EXP, &[0], &other, &runs, &two, "cmd", true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.lr"), "{e}");
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
    fn tail_metrics_average_the_last_steps() {
        let curve: Vec<(f64, f64)> = (1..=12).map(|s| (s as f64, s as f64)).collect();
        // Steps 3..=12: (3 + 12) / 2 = 7.5.
        assert_eq!(tail_mean(&curve), 7.5);
        assert_eq!(tail_mean(&curve[..2]), 1.5);
        assert!(tail_mean(&[]).is_nan());
        assert_eq!(tail_cell(&[f64::NAN, f64::NAN]), "not logged");
        assert_eq!(tail_cell(&[1.0, 3.0]), "2.000 ± 1.414");
        let mean = mean_curve(&[vec![(1.0, 0.0), (2.0, 1.0)], vec![(1.0, 1.0)]]);
        assert_eq!(mean, vec![(1.0, 0.5)]);
        // running sums of samples drawn: 10 at step 1, 30 at step 2; step 0 is before any
        let per_step = [(1.0, 10.0), (2.0, 20.0)];
        assert_eq!(
            against_running_sum(&[(0.0, 0.3), (2.0, 0.5)], &per_step),
            vec![(0.0, 0.3), (30.0, 0.5)]
        );
        // seeds at different positions: both coordinates averaged
        let mean = mean_curve(&[vec![(10.0, 0.0)], vec![(30.0, 1.0)]]);
        assert_eq!(mean, vec![(20.0, 0.5)]);
        assert_eq!(
            tail_png("gated-reward", "reward/steps/mean"),
            "gated-reward-reward-steps-mean.png"
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
