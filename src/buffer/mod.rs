//! The experience buffer between explorers (rollout + reward) and trainers (docs/architecture.md).
//!
//! Groups of experiences (all responses to one prompt) go in with `put` and come out with
//! `take`. Three stores share one contract, the [`Buffer`] trait:
//! - `memory`: a bounded queue inside one process (async mode);
//! - `sqlite:PATH`: the embedded default; every put is its own committed transaction, so what
//!   was committed survives a `kill -9`;
//! - `postgres://...`: several explorer and trainer processes on several machines; takes lock
//!   rows with `FOR UPDATE SKIP LOCKED`, so no group is delivered twice.
//!
//! `take(n, min_version)` first drops (and counts) every group older than `min_version`, which
//! is how `max_staleness` works: see [`min_version`]. By default taken groups leave the buffer in
//! FIFO order; with [`TakeMode::PriorityReplay`] they stay and are re-served by priority
//! `policy_version − decay × use_count` until they have been used `max_uses` times.
//! Offline files (`grove explore --out FILE.jsonl`) are read and written by [`jsonl`].
mod experience;
pub mod jsonl;
mod memory;
mod postgres;
mod sql;
mod sqlite;

#[cfg(test)]
mod contract;

/// A valid group of `size` responses (rewards 0, 1, 2, ...), for tests outside `buffer`.
#[cfg(test)]
pub(crate) use experience::tests::sample_group;
pub use experience::{min_version, Experience, ExperienceError, ExperienceGroup};
pub use memory::MemoryBuffer;
pub use postgres::{PostgresBuffer, DEFAULT_TABLE};
pub use sqlite::SqliteBuffer;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The URL forms [`open`] understands, for error messages and `--help`.
pub const KNOWN_SCHEMES: &str =
    "memory, sqlite:PATH, postgres://USER[:PASSWORD]@HOST:PORT/DB (or postgresql://)";

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// The producer should wait for a trainer to take some groups, then retry.
    #[error("buffer is full ({capacity} groups); wait for a take before putting more")]
    Full { capacity: usize },
    #[error("buffer URL {url:?}: unknown scheme, expected one of: {known}")]
    UnknownScheme { url: String, known: &'static str },
    #[error("buffer config: {field} {msg}")]
    Config { field: &'static str, msg: String },
    #[error("cannot store group: {0}")]
    Invalid(#[from] ExperienceError),
    #[error("{field} = {value} does not fit the database's signed 64-bit column")]
    OutOfRange { field: &'static str, value: u64 },
    #[error("encoding group {group_id} as JSON: {source}")]
    Encode {
        group_id: u64,
        #[source]
        source: serde_json::Error,
    },
    #[error("{location}: stored row seq={seq} is not a valid experience group: {msg}")]
    Corrupt {
        location: String,
        seq: i64,
        msg: String,
    },
    #[error("sqlite {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The server accepted the connection but did not answer in time.
    #[error("postgres {url}: no answer to {what} within {timeout_s} s{}", if *.abandoned {         "; the connection was abandoned" } else { "" })]
    Timeout {
        url: String,
        what: String,
        timeout_s: f64,
        abandoned: bool,
    },
    /// `url` has its password replaced by `***`; the message includes the error's causes.
    #[error("postgres {url}: {}", error_chain(.source))]
    Postgres {
        url: String,
        #[source]
        source: ::postgres::Error,
    },
}

impl From<BufferError> for crate::error::Error {
    fn from(e: BufferError) -> Self {
        crate::error::Error::Buffer(Box::new(e))
    }
}

/// An error and its causes, joined by ": " (the postgres client keeps the cause, such as
/// "connection refused", out of its own message).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let inner_text = inner.to_string();
        if !text.ends_with(&inner_text) {
            text = format!("{text}: {inner_text}");
        }
        cause = inner.source();
    }
    text
}

/// What one `take` returned.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Taken {
    /// Up to n groups, oldest first (FIFO) or highest priority first (replay).
    pub groups: Vec<ExperienceGroup>,
    /// Groups removed because their policy version was below `min_version`
    /// (the `staleness/dropped` metric).
    pub dropped: usize,
    /// Responses sampled for those dropped groups ([`ExperienceGroup::samples_drawn`] summed):
    /// they count in `sampling/samples_drawn` like the ones trained on.
    pub dropped_samples: usize,
}

/// A store of experience groups shared by explorers (`put`) and trainers (`take`).
///
/// Every group handed out by `take` has its experiences' `use_count` set to the number of times
/// it has now been taken (1 on first delivery).
pub trait Buffer: Send {
    /// Stores one group, or returns [`BufferError::Full`] when `capacity` groups are stored.
    fn put(&mut self, group: ExperienceGroup) -> Result<(), BufferError>;
    /// Removes groups with `policy_version < min_version` (counted in `dropped`), then returns up
    /// to `n` groups: removed, oldest first, in FIFO mode; kept, by priority, in replay mode.
    fn take(&mut self, n: usize, min_version: u64) -> Result<Taken, BufferError>;
    /// Number of groups stored now.
    fn len(&self) -> Result<usize, BufferError>;
    fn is_empty(&self) -> Result<bool, BufferError> {
        Ok(self.len()? == 0)
    }
}

/// Priority replay settings: priority = policy_version − decay × use_count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// Priority lost per use, in policy versions (≥ 0).
    pub decay: f64,
    /// A group is evicted once it has been taken this many times (≥ 1).
    pub max_uses: u32,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            decay: 1.0,
            max_uses: 4,
        }
    }
}

impl ReplayConfig {
    pub fn validate(&self) -> Result<(), BufferError> {
        if !(self.decay.is_finite() && self.decay >= 0.0) {
            return Err(BufferError::Config {
                field: "replay.decay",
                msg: format!("is {}, expected a finite number >= 0", self.decay),
            });
        }
        if self.max_uses == 0 {
            return Err(BufferError::Config {
                field: "replay.max_uses",
                msg: "is 0, expected at least 1".to_string(),
            });
        }
        Ok(())
    }
}

/// How `take` chooses and retires groups.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum TakeMode {
    /// Oldest first; taken groups leave the buffer.
    #[default]
    Fifo,
    /// Highest priority first (ties: oldest first); groups stay until used `max_uses` times.
    PriorityReplay(ReplayConfig),
}

impl TakeMode {
    pub fn validate(&self) -> Result<(), BufferError> {
        match self {
            TakeMode::Fifo => Ok(()),
            TakeMode::PriorityReplay(replay) => replay.validate(),
        }
    }
}

/// The `[buffer]` table of the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// "memory", "sqlite:PATH" or "postgres://..." (see [`KNOWN_SCHEMES`]).
    pub url: String,
    /// Most groups stored at once; a put beyond it returns [`BufferError::Full`].
    pub capacity: usize,
    /// Priority replay; absent means FIFO.
    pub replay: Option<ReplayConfig>,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            url: "memory".to_string(),
            capacity: 1024,
            replay: None,
        }
    }
}

impl BufferConfig {
    pub fn mode(&self) -> TakeMode {
        match self.replay {
            Some(replay) => TakeMode::PriorityReplay(replay),
            None => TakeMode::Fifo,
        }
    }

    pub fn open(&self) -> Result<Box<dyn Buffer>, BufferError> {
        open_with_mode(&self.url, self.capacity, self.mode())
    }
}

/// Opens a FIFO buffer by URL: "memory", "sqlite:PATH" or "postgres://...".
pub fn open(url: &str, capacity: usize) -> Result<Box<dyn Buffer>, BufferError> {
    open_with_mode(url, capacity, TakeMode::Fifo)
}

/// Opens a buffer by URL with the given take mode.
pub fn open_with_mode(
    url: &str,
    capacity: usize,
    mode: TakeMode,
) -> Result<Box<dyn Buffer>, BufferError> {
    Ok(match parse_url(url)? {
        Location::Memory => Box::new(MemoryBuffer::new(capacity, mode)?),
        Location::Sqlite(path) => Box::new(SqliteBuffer::open(path, capacity, mode)?),
        Location::Postgres(url) => {
            // "postgres://...#name" selects a table other than the default.
            let (url, table) = match url.split_once('#') {
                Some((u, t)) => (u, t),
                None => (url, DEFAULT_TABLE),
            };
            if table.is_empty()
                || !table
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(BufferError::Config {
                    field: "url",
                    msg: format!(
                        "table name {table:?} after '#' must be lowercase letters, digits and '_'"
                    ),
                });
            }
            Box::new(PostgresBuffer::connect(url, table, capacity, mode)?)
        }
    })
}

/// Where a buffer URL points.
#[derive(Debug, PartialEq)]
enum Location<'a> {
    Memory,
    Sqlite(&'a str),
    Postgres(&'a str),
}

fn parse_url(url: &str) -> Result<Location<'_>, BufferError> {
    if url == "memory" || url == "memory:" {
        return Ok(Location::Memory);
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Location::Postgres(url));
    }
    if let Some(rest) = url.strip_prefix("sqlite:") {
        // "sqlite:///abs/path" and "sqlite://rel" are common spellings of "sqlite:PATH".
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if path.is_empty() {
            return Err(BufferError::Config {
                field: "url",
                msg: format!("{url:?} has no file path, expected sqlite:PATH"),
            });
        }
        return Ok(Location::Sqlite(path));
    }
    Err(BufferError::UnknownScheme {
        url: url.to_string(),
        known: KNOWN_SCHEMES,
    })
}

fn check_capacity(capacity: usize) -> Result<(), BufferError> {
    if capacity == 0 {
        return Err(BufferError::Config {
            field: "capacity",
            msg: "is 0, expected at least 1 group".to_string(),
        });
    }
    Ok(())
}

/// Replay priority of a group. The SQL stores evaluate the same expression in IEEE doubles,
/// so ties break identically everywhere.
pub fn priority(policy_version: u64, use_count: u32, decay: f64) -> f64 {
    policy_version as f64 - decay * f64::from(use_count)
}

/// Indices of the `n` highest priorities; ties keep index (= age) order, oldest first.
fn top_by_priority(priorities: &[f64], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..priorities.len()).collect();
    // A stable sort keeps equal priorities in insertion order.
    order.sort_by(|&a, &b| priorities[b].total_cmp(&priorities[a]));
    order.truncate(n);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_dispatch_on_scheme() {
        assert_eq!(parse_url("memory").unwrap(), Location::Memory);
        assert_eq!(
            parse_url("sqlite:runs/a.db").unwrap(),
            Location::Sqlite("runs/a.db")
        );
        assert_eq!(
            parse_url("sqlite:///tmp/a.db").unwrap(),
            Location::Sqlite("/tmp/a.db")
        );
        let pg = "postgres://postgres@localhost:5432/grove_test";
        assert_eq!(parse_url(pg).unwrap(), Location::Postgres(pg));
        let pg = "postgresql://u:p@h/db";
        assert_eq!(parse_url(pg).unwrap(), Location::Postgres(pg));
    }

    #[test]
    fn unknown_scheme_lists_the_known_ones() {
        let message = parse_url("redis://localhost").unwrap_err().to_string();
        assert_eq!(
            message,
            "buffer URL \"redis://localhost\": unknown scheme, expected one of: memory, \
             sqlite:PATH, postgres://USER[:PASSWORD]@HOST:PORT/DB (or postgresql://)"
        );
        assert!(matches!(
            open("mem", 4),
            Err(BufferError::UnknownScheme { .. })
        ));
    }

    #[test]
    fn sqlite_url_needs_a_path() {
        let message = parse_url("sqlite:").unwrap_err().to_string();
        assert!(message.contains("no file path"), "{message}");
    }

    #[test]
    fn open_memory_gives_an_empty_fifo_buffer() {
        let mut buffer = open("memory", 4).unwrap();
        assert_eq!(buffer.len().unwrap(), 0);
        assert!(buffer.is_empty().unwrap());
        contract::fifo_order(buffer.as_mut());
    }

    #[test]
    fn zero_capacity_and_bad_replay_are_rejected() {
        let message = open("memory", 0).err().unwrap().to_string();
        assert_eq!(
            message,
            "buffer config: capacity is 0, expected at least 1 group"
        );
        let bad = |decay, max_uses| TakeMode::PriorityReplay(ReplayConfig { decay, max_uses });
        let message = open_with_mode("memory", 4, bad(-0.5, 2))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            message,
            "buffer config: replay.decay is -0.5, expected a finite number >= 0"
        );
        assert!(open_with_mode("memory", 4, bad(f64::NAN, 2)).is_err());
        assert!(open_with_mode("memory", 4, bad(1.0, 0)).is_err());
    }

    #[test]
    fn config_defaults_and_rejects_unknown_fields() {
        let config: BufferConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, BufferConfig::default());
        assert_eq!(config.mode(), TakeMode::Fifo);
        let config: BufferConfig =
            serde_json::from_str(r#"{"url":"sqlite:x.db","replay":{"decay":0.5}}"#).unwrap();
        assert_eq!(
            config.mode(),
            TakeMode::PriorityReplay(ReplayConfig {
                decay: 0.5,
                max_uses: 4
            })
        );
        let message = serde_json::from_str::<BufferConfig>(r#"{"capacty":3}"#)
            .unwrap_err()
            .to_string();
        assert!(message.contains("unknown field `capacty`"), "{message}");
    }

    #[test]
    fn error_chain_appends_causes_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let inner = std::io::Error::other("connection refused");
        assert_eq!(error_chain(&Outer(inner)), "outer: connection refused");
        let plain = std::io::Error::other("x");
        assert_eq!(error_chain(&plain), "x");
    }

    #[test]
    fn priority_is_version_minus_decayed_uses() {
        assert_eq!(priority(5, 0, 1.5), 5.0); // 5 - 1.5*0
        assert_eq!(priority(5, 2, 1.5), 2.0); // 5 - 1.5*2
        assert_eq!(priority(1, 3, 0.5), -0.5); // 1 - 0.5*3
    }

    #[test]
    fn top_by_priority_breaks_ties_oldest_first() {
        // priorities by index: [3, 2, 3, 5] -> order 3 (5), 0 (3, older), 2 (3), 1 (2)
        assert_eq!(top_by_priority(&[3.0, 2.0, 3.0, 5.0], 3), vec![3, 0, 2]);
        assert_eq!(top_by_priority(&[1.0], 0), Vec::<usize>::new());
        assert_eq!(top_by_priority(&[], 4), Vec::<usize>::new());
    }
}
