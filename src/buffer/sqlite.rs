//! The embedded default store: one SQLite file, one table. Every `put` is its own committed
//! transaction (WAL journal, `synchronous = FULL`), so a group whose `put` returned survives a
//! `kill -9` of the process (and a power cut). `take` runs in one write transaction that deletes
//! what it returns, so two processes sharing the file never receive the same group.
use super::sql::{self, StoredRow};
use super::{check_capacity, Buffer, BufferError, ExperienceGroup, TakeMode, Taken};
use rusqlite::{params, Connection, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a writer waits for another process's transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS experience_groups (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id       INTEGER NOT NULL,
    policy_version INTEGER NOT NULL,
    use_count      INTEGER NOT NULL DEFAULT 0,
    body           TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS experience_groups_version ON experience_groups (policy_version);";

#[derive(Debug)]
pub struct SqliteBuffer {
    conn: Connection,
    path: PathBuf,
    capacity: usize,
    mode: TakeMode,
}

impl SqliteBuffer {
    /// Opens (creating if needed) the file at `path`.
    pub fn open(
        path: impl AsRef<Path>,
        capacity: usize,
        mode: TakeMode,
    ) -> Result<Self, BufferError> {
        check_capacity(capacity)?;
        mode.validate()?;
        let path = path.as_ref().to_path_buf();
        let error = |source| BufferError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(error)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(error)?;
        let journal: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(error)?;
        if !journal.eq_ignore_ascii_case("wal") {
            return Err(BufferError::Config {
                field: "url",
                msg: format!(
                    "sqlite {}: journal_mode is {journal}, expected wal (is the file on a \
                     network filesystem?)",
                    path.display()
                ),
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(error)?;
        conn.execute_batch(CREATE_TABLE).map_err(error)?;
        Ok(SqliteBuffer {
            conn,
            path,
            capacity,
            mode,
        })
    }

    fn error(&self, source: rusqlite::Error) -> BufferError {
        BufferError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn location(&self) -> String {
        format!("sqlite {}", self.path.display())
    }
}

impl Buffer for SqliteBuffer {
    fn put(&mut self, group: ExperienceGroup) -> Result<(), BufferError> {
        group.validate()?;
        let group_id = sql::to_i64("group_id", group.group_id)?;
        let version = sql::to_i64("policy_version", group.policy_version)?;
        let body = sql::encode(&group)?;
        let capacity = self.capacity;
        let path = self.path.clone();
        let error = |source| BufferError::Sqlite {
            path: path.clone(),
            source,
        };
        // IMMEDIATE takes the write lock first, so the count and the insert see the same rows.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(error)?;
        let stored: i64 = tx
            .query_row("SELECT COUNT(*) FROM experience_groups", [], |row| {
                row.get(0)
            })
            .map_err(error)?;
        if usize::try_from(stored).map_or(true, |stored| stored >= capacity) {
            return Err(BufferError::Full { capacity });
        }
        tx.execute(
            "INSERT INTO experience_groups (group_id, policy_version, use_count, body)
             VALUES (?1, ?2, ?3, ?4)",
            params![group_id, version, i64::from(group.use_count()), body],
        )
        .map_err(error)?;
        tx.commit().map_err(error)
    }

    fn take(&mut self, n: usize, min_version: u64) -> Result<Taken, BufferError> {
        let min_version = sql::to_i64("min_version", min_version)?;
        let location = self.location();
        let mode = self.mode;
        let path = self.path.clone();
        let error = |source| BufferError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(error)?;
        // The stale groups' responses, read from their bodies before they go (the
        // `sampling/samples_drawn` count): ExperienceGroup::samples_drawn in SQL.
        let dropped_samples: i64 = tx
            .query_row(
                "SELECT COALESCE(SUM(max(json_array_length(body, '$.experiences'),
                                         COALESCE(json_array_length(body, '$.drawn_rewards'), 0))), 0)
                 FROM experience_groups WHERE policy_version < ?1",
                [min_version],
                |row| row.get(0),
            )
            .map_err(error)?;
        let dropped = tx
            .execute(
                "DELETE FROM experience_groups WHERE policy_version < ?1",
                [min_version],
            )
            .map_err(error)?;
        let rows = select_rows(&tx, &mode, sql::limit(n), min_version).map_err(error)?;
        let mut groups = Vec::with_capacity(rows.len());
        for row in &rows {
            let (group, uses) = sql::decode_taken(&location, row)?;
            retire_or_bump(&tx, &mode, row.seq, uses).map_err(error)?;
            groups.push(group);
        }
        tx.commit().map_err(error)?;
        Ok(Taken {
            groups,
            dropped,
            dropped_samples: usize::try_from(dropped_samples).unwrap_or(0),
        })
    }

    fn len(&self) -> Result<usize, BufferError> {
        let stored: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM experience_groups", [], |row| {
                row.get(0)
            })
            .map_err(|e| self.error(e))?;
        Ok(usize::try_from(stored).unwrap_or(0))
    }
}

/// The next groups to hand out: oldest first, or by replay priority (ties oldest first).
fn select_rows(
    conn: &Connection,
    mode: &TakeMode,
    limit: i64,
    min_version: i64,
) -> Result<Vec<StoredRow>, rusqlite::Error> {
    let read = |row: &rusqlite::Row| {
        Ok(StoredRow {
            seq: row.get(0)?,
            use_count: row.get(1)?,
            body: row.get(2)?,
        })
    };
    match mode {
        TakeMode::Fifo => conn
            .prepare(
                "SELECT seq, use_count, body FROM experience_groups
                 WHERE policy_version >= ?2 ORDER BY seq LIMIT ?1",
            )?
            .query_map(params![limit, min_version], read)?
            .collect(),
        // Same expression as `super::priority`, evaluated in doubles.
        TakeMode::PriorityReplay(replay) => conn
            .prepare(
                "SELECT seq, use_count, body FROM experience_groups WHERE policy_version >= ?2
                 ORDER BY policy_version - ?3 * use_count DESC, seq ASC LIMIT ?1",
            )?
            .query_map(params![limit, min_version, replay.decay], read)?
            .collect(),
    }
}

fn retire_or_bump(
    conn: &Connection,
    mode: &TakeMode,
    seq: i64,
    uses: u32,
) -> Result<(), rusqlite::Error> {
    if sql::leaves_after_take(mode, uses) {
        conn.execute("DELETE FROM experience_groups WHERE seq = ?1", [seq])?;
    } else {
        conn.execute(
            "UPDATE experience_groups SET use_count = ?2 WHERE seq = ?1",
            params![seq, i64::from(uses)],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::contract;
    use super::super::experience::tests::sample_group;
    use super::*;
    use std::collections::BTreeSet;
    use std::io::Write;
    use std::process::Command;
    use std::sync::{Arc, Mutex};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let dir = std::env::temp_dir().join(format!(
                "grove-buffer-{name}-{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn db(&self) -> PathBuf {
            self.0.join("buffer.db")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fresh(dir: &TempDir, capacity: usize, mode: TakeMode) -> SqliteBuffer {
        SqliteBuffer::open(dir.db(), capacity, mode).unwrap()
    }

    #[test]
    fn fifo_order() {
        let dir = TempDir::new("fifo");
        contract::fifo_order(&mut fresh(&dir, 8, TakeMode::Fifo));
    }

    #[test]
    fn stale_groups_are_dropped_and_counted() {
        let dir = TempDir::new("stale");
        contract::drops_stale(&mut fresh(&dir, 8, TakeMode::Fifo));
    }

    #[test]
    fn full_at_capacity() {
        let dir = TempDir::new("full");
        contract::full_at_capacity(&mut fresh(&dir, contract::SMALL_CAPACITY, TakeMode::Fifo));
    }

    #[test]
    fn replay_priorities_and_eviction() {
        let dir = TempDir::new("replay");
        contract::replay_priorities(&mut fresh(&dir, 8, contract::replay_mode()));
    }

    #[test]
    fn content_round_trips() {
        let dir = TempDir::new("content");
        contract::content_round_trips(&mut fresh(&dir, 8, TakeMode::Fifo));
    }

    #[test]
    fn invalid_groups_are_refused() {
        let dir = TempDir::new("invalid");
        contract::invalid_groups_are_refused(&mut fresh(&dir, 8, TakeMode::Fifo));
    }

    #[test]
    fn opened_through_the_url_and_in_wal_mode() {
        let dir = TempDir::new("url");
        let url = format!("sqlite:{}", dir.db().display());
        let mut buffer = super::super::open(&url, 4).unwrap();
        buffer.put(sample_group(1, 0, 1)).unwrap();
        drop(buffer);
        // Reopening sees the committed group; the file is in WAL mode.
        let reopened = fresh(&dir, 4, TakeMode::Fifo);
        assert_eq!(reopened.len().unwrap(), 1);
        let mode: String = reopened
            .conn
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn unopenable_path_names_the_file() {
        let dir = TempDir::new("bad");
        let path = dir.0.join("missing-dir").join("buffer.db");
        let message = SqliteBuffer::open(&path, 4, TakeMode::Fifo)
            .unwrap_err()
            .to_string();
        assert!(message.starts_with("sqlite "), "{message}");
        assert!(message.contains("missing-dir"), "{message}");
    }

    const KILL_CHILD_ENV: &str = "GROVE_TEST_SQLITE_KILL_CHILD";
    const COMMITTED_BEFORE_ABORT: u64 = 5;
    // libtest may print its "test ... " prefix on the same line, so markers are searched for.
    const COMMITTED_MARK: &str = "<grove-committed>";
    const OPEN_TX_MARK: &str = "<grove-open-transaction>";

    /// Child half of `committed_groups_survive_abort`; does nothing in a normal test run.
    /// Puts groups 0..5, each reported on stdout after its put returned, then opens a second
    /// connection, inserts group 5 without committing, and aborts the process.
    #[test]
    fn kill_child_writer() {
        let Some(path) = std::env::var_os(KILL_CHILD_ENV) else {
            return;
        };
        let mut buffer = SqliteBuffer::open(&path, 100, TakeMode::Fifo).unwrap();
        let mut out = std::io::stdout();
        for id in 0..COMMITTED_BEFORE_ABORT {
            buffer.put(sample_group(id, id, 3)).unwrap();
            writeln!(out, "{COMMITTED_MARK}{id}").unwrap();
            out.flush().unwrap();
        }
        let mut conn = Connection::open(&path).unwrap();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        let body = sql::encode(&sample_group(COMMITTED_BEFORE_ABORT, 0, 3)).unwrap();
        tx.execute(
            "INSERT INTO experience_groups (group_id, policy_version, use_count, body)
             VALUES (?1, 0, 0, ?2)",
            params![COMMITTED_BEFORE_ABORT as i64, body],
        )
        .unwrap();
        writeln!(out, "{OPEN_TX_MARK}{COMMITTED_BEFORE_ABORT}").unwrap();
        out.flush().unwrap();
        std::process::abort();
    }

    #[test]
    fn committed_groups_survive_abort() {
        if std::env::var_os(KILL_CHILD_ENV).is_some() {
            return; // we are the child; only kill_child_writer acts
        }
        let dir = TempDir::new("kill");
        let output = Command::new(std::env::current_exe().unwrap())
            .args(["kill_child_writer", "--nocapture", "--test-threads=1"])
            .env(KILL_CHILD_ENV, dir.db())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            !output.status.success(),
            "child should have aborted: {stdout}"
        );
        assert!(
            stdout.contains(&format!("{OPEN_TX_MARK}5")),
            "child died before the open transaction: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let committed: Vec<u64> = stdout
            .lines()
            .filter_map(|line| line.split_once(COMMITTED_MARK).map(|(_, id)| id))
            .filter_map(|id| id.trim().parse().ok())
            .collect();
        assert_eq!(committed, vec![0, 1, 2, 3, 4]);

        let mut reopened = fresh(&dir, 100, TakeMode::Fifo);
        let taken = reopened.take(100, 0).unwrap();
        let ids: Vec<u64> = taken.groups.iter().map(|g| g.group_id).collect();
        assert_eq!(ids, committed); // every committed group, in order; not the uncommitted 5
        assert_eq!(taken.groups[2], {
            let mut g = sample_group(2, 2, 3);
            g.set_use_count(1);
            g
        });
    }

    #[test]
    fn two_processes_sharing_the_file_never_get_the_same_group() {
        // Threads with their own connections stand in for processes: SQLite locks the file.
        const GROUPS: u64 = 40;
        let dir = TempDir::new("shared");
        let path = dir.db();
        drop(fresh(&dir, 8, TakeMode::Fifo)); // create the table before the race
        let seen = Arc::new(Mutex::new(Vec::new()));
        let producer = {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut buffer = SqliteBuffer::open(&path, 8, TakeMode::Fifo).unwrap();
                for id in 0..GROUPS {
                    contract::put_waiting(&mut buffer, sample_group(id, 0, 1));
                }
            })
        };
        let consumers: Vec<_> = (0..2)
            .map(|_| {
                let (path, seen) = (path.clone(), Arc::clone(&seen));
                std::thread::spawn(move || {
                    let mut buffer = SqliteBuffer::open(&path, 8, TakeMode::Fifo).unwrap();
                    contract::drain_until(&mut buffer, &seen, GROUPS as usize);
                })
            })
            .collect();
        producer.join().unwrap();
        for consumer in consumers {
            consumer.join().unwrap();
        }
        let seen = seen.lock().unwrap();
        let distinct: BTreeSet<u64> = seen.iter().copied().collect();
        assert_eq!(seen.len(), GROUPS as usize, "a group was delivered twice");
        assert_eq!(distinct, (0..GROUPS).collect());
    }
}
