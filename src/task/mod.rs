//! Prompts with references: the built-in arithmetic generator and dataset loaders.
pub mod arithmetic;
pub mod datasets;

pub use arithmetic::{ArithmeticConfig, ArithmeticTask, Problem};
