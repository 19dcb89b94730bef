//! The library's error type. Every variant says what was wrong and where (file, field, shape),
//! so the CLI can print it as is.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {file}: {msg}")]
    Config { file: String, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("model: {0}")]
    Model(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("task: {0}")]
    Task(String),
    /// A remote rollout server (or `grove serve`) failed or answered something unusable.
    #[error("remote rollout: {0}")]
    Remote(String),

    /// A reward component failed (external command, reward model, pipeline input).
    #[error("reward: {0}")]
    Reward(String),
    #[error("run directory {path}: {msg}")]
    RunDir { path: PathBuf, msg: String },
    /// An advantage estimator refused its input (`advantage::AdvantageError`). This and the
    /// boxed variants below keep the error's source while this bottom layer depends on no
    /// layer above it; each module converts its own error type (`impl From` next to it).
    #[error(transparent)]
    Advantage(Box<dyn std::error::Error + Send + Sync>),
    /// A loss refused its input (`loss::LossError`).
    #[error(transparent)]
    Loss(Box<dyn std::error::Error + Send + Sync>),
    /// Drawing a plot failed (`report::plot::PlotError`).
    #[error(transparent)]
    Plot(Box<dyn std::error::Error + Send + Sync>),
    /// A malformed GGUF file (`model::gguf::GgufError`: file, byte offset and field).
    #[error(transparent)]
    Gguf(Box<dyn std::error::Error + Send + Sync>),
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn config(file: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config {
            file: file.into(),
            msg: msg.into(),
        }
    }
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// An error and its causes on one line, each cause once: a message that already quotes its
/// source (`{path}: {source}`) is not followed by the source again.
pub fn render_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_prints_its_cause_once() {
        let e = Error::io(
            "runs/x/metrics.jsonl",
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied"),
        );
        assert_eq!(
            render_chain(&e),
            "runs/x/metrics.jsonl: permission denied",
            "was printed as `...: permission denied: permission denied`"
        );
    }

    #[test]
    fn a_cause_the_message_does_not_quote_is_appended() {
        #[derive(Debug, thiserror::Error)]
        #[error("reading stdin")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("broken pipe"));
        assert_eq!(render_chain(&e), "reading stdin: broken pipe");
    }
}
