//! grove: reinforcement-learning post-training of language models, in Rust.
//!
//! The modules follow the data flow (docs/architecture.md):
//! `task → sampling → rollout → reward → advantage → loss → train`, with `config` turning
//! files into a validated plan and `report` writing what a run leaves behind.
pub mod advantage;
pub mod bench;
pub mod buffer;
pub mod compute;
pub mod config;
pub mod env;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod loss;
pub mod model;
pub mod report;
pub mod reward;
pub mod rollout;
pub mod sampling;
pub mod task;
#[cfg(test)]
pub mod testing;
pub mod train;
pub mod view;

pub use error::{Error, Result};
