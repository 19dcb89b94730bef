//! Prompts with references: the built-in arithmetic generator, dataset loaders and the
//! pluggable [`Task`] a training run draws from.
pub mod arithmetic;
pub mod datasets;
pub mod kinds;

pub use arithmetic::{ArithmeticConfig, ArithmeticTask, Problem};
pub use kinds::{Task, TaskConfig, TaskKind};
