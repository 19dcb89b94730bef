//! Tests that drive the `grove` binary as a user does: subcommands, evaluation, reward
//! tools, trackers and failure handling.
//!
//! One binary per group (each test binary links the whole crate), one module per topic.
mod cli;
mod dataset_cli;
mod docs_commands;
mod eval_cli;
mod observability;
mod reliability;
mod reward_cli;
