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
    /// The model's output is NaN or +∞ while sampling: its weights hold NaN, or its
    /// activations overflowed.
    #[error(
        "model: non-finite logits ({value}) for sequence {sequence} at new token {new_token}: the \
         weights hold NaN or infinity, or the activations overflowed; sampling would return \
         arbitrary tokens (check the model file, or its training run's loss)"
    )]
    NonFiniteLogits {
        sequence: usize,
        new_token: usize,
        value: f32,
    },
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
    /// An experience buffer failed (`buffer::BufferError`: file or redacted URL, and what).
    #[error(transparent)]
    Buffer(Box<dyn std::error::Error + Send + Sync>),
    /// A data set could not be read (`task::datasets::DatasetError`: file, line and field).
    #[error(transparent)]
    Dataset(Box<dyn std::error::Error + Send + Sync>),
    /// A line of an input file is not what was expected; `at` is `file:line` or `file`.
    #[error("{at}: {msg}")]
    Input { at: String, msg: String },
    /// A command-line option has a value that cannot be used.
    #[error("{option}: {msg}")]
    Usage { option: String, msg: String },
    /// A name that is not one of the known ones (the message lists them).
    #[error("unknown {kind} {name:?} (expected {known})")]
    UnknownName {
        kind: &'static str,
        name: String,
        known: String,
    },
    /// Waited the configured time for another process, and nothing came.
    #[error("{what}: nothing after {waited_s} s; {hint}")]
    Timeout {
        what: String,
        waited_s: f64,
        hint: String,
    },
    /// A worker thread (the async explorer) failed; its error or panic.
    #[error("{thread}: {msg}")]
    Thread { thread: &'static str, msg: String },
    /// A broken internal invariant: a bug in grove, not in the input.
    #[error("internal error (please report it): {0}")]
    Internal(String),
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

/// The JSON type of a value with its article ("a string", "null"), for "expected ..., found
/// ..." messages.
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// What a hidden secret is shown as (in saved configs, plans and messages).
pub const REDACTED: &str = "***";

/// A URL with its password hidden: `postgres://user:secret@host/db` →
/// `postgres://user:***@host/db`, and a `password=...` parameter (query string or libpq
/// key-value form) → `password=***`. Text without a password is returned unchanged.
pub fn redact_url(url: &str) -> String {
    redact_password_params(&redact_userinfo(url))
}

fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    // '@' may occur inside the password: the host starts after the last one.
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:{REDACTED}@{host}{path}"),
        None => url.to_string(),
    }
}

/// `password=VALUE` → `password=***`, VALUE ending at `&`, `#` or white space.
fn redact_password_params(text: &str) -> String {
    const KEY: &str = "password=";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.to_ascii_lowercase().find(KEY) {
        let at_word_start = i == 0 || !rest.as_bytes()[i - 1].is_ascii_alphanumeric();
        let value_start = i + KEY.len();
        out.push_str(&rest[..value_start]);
        rest = &rest[value_start..];
        if at_word_start {
            let end = rest
                .find(|c: char| c == '&' || c == '#' || c.is_whitespace())
                .unwrap_or(rest.len());
            out.push_str(REDACTED);
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
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
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact_url("postgres://postgres@localhost/grove_test"),
            "postgres://postgres@localhost/grove_test"
        );
        // '@' inside the password: the host starts after the last '@'.
        assert_eq!(
            redact_url("postgresql://u:p@ss@h/db"),
            "postgresql://u:***@h/db"
        );
        assert_eq!(redact_url("postgres://h/db?x=a@b"), "postgres://h/db?x=a@b");
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=s3cr3t&x=1#t"),
            "postgres://u@h/db?sslmode=require&password=***&x=1#t"
        );
        assert_eq!(
            redact_url("host=h user=u password=s3cr3t dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        assert_eq!(redact_url("http://h:1/v1"), "http://h:1/v1");
        // Redacting twice changes nothing more.
        let once = redact_url("https://u:k@h/x?password=p");
        assert_eq!(once, "https://u:***@h/x?password=***");
        assert_eq!(redact_url(&once), once);
    }

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
