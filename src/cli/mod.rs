//! The subcommands' arguments and bodies; `main.rs` only parses and dispatches.
pub mod bench;
pub mod eval;
pub mod experiment;
pub mod explore;
pub mod rm_train;
pub mod train;

/// A TOML string literal for `--set` (paths may contain characters TOML would misread).
pub fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}
