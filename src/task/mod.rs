//! Prompts with references: the built-in arithmetic generator, dataset files (the user's own
//! and the GSM8K / MATH-500 presets), the rewards they are scored with, and the pluggable
//! [`Task`] a training run draws from.
pub mod arithmetic;
pub mod dataset;
pub mod datasets;
pub mod eva_pool;
pub mod fields;
pub mod kinds;
pub mod rows;
pub mod scorers;

pub use arithmetic::{ArithmeticConfig, ArithmeticTask, Problem};
pub use kinds::{Task, TaskConfig, TaskKind};
