//! The store for several machines: `grove explore --buffer postgres://...` processes put,
//! `grove train --buffer postgres://...` takes. Same semantics as the SQLite store; `take` locks
//! the rows it returns with `FOR UPDATE SKIP LOCKED`, so concurrent trainers skip each other's
//! rows instead of waiting or receiving them twice. Puts serialize on an advisory lock so the
//! capacity check and the insert cannot interleave. Connections use no TLS (a trusted network).
//!
//! Nothing waits on the server without a deadline: the client lives on its own thread and each
//! call waits for its answer at most `startup_timeout` (connecting, including the startup
//! handshake) or `statement_timeout` (each operation; also set as the server's
//! `statement_timeout`, so a query stuck on a lock is cancelled by the server itself). A server
//! that accepts the connection and then says nothing gives a timeout error, and the connection
//! is abandoned: later calls fail at once instead of queueing behind it.
use super::sql::{self, StoredRow};
use super::{check_capacity, Buffer, BufferError, ExperienceGroup, TakeMode, Taken};
use ::postgres::{Client, Config, NoTls, Transaction};
use std::cell::Cell;
use std::sync::mpsc;
use std::time::Duration;

/// The table `open` uses; pass another to [`PostgresBuffer::connect`] to keep runs apart.
pub const DEFAULT_TABLE: &str = "grove_experience_groups";

/// Default deadline for connecting (TCP connect and startup handshake), seconds.
pub const DEFAULT_STARTUP_TIMEOUT_S: f64 = 30.0;
/// Default deadline for one operation (a put, a take, a count), seconds.
pub const DEFAULT_STATEMENT_TIMEOUT_S: f64 = 120.0;

/// Deadlines of a PostgreSQL buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    pub startup: Duration,
    pub statement: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            startup: Duration::from_secs_f64(DEFAULT_STARTUP_TIMEOUT_S),
            statement: Duration::from_secs_f64(DEFAULT_STATEMENT_TIMEOUT_S),
        }
    }
}

type Job = Box<dyn FnOnce(&mut Client) + Send>;

/// The client on its own thread; calls wait for their answer with a deadline.
struct Conn {
    jobs: mpsc::Sender<Job>,
    timeout: Duration,
    /// Set after a timeout: the thread may still be blocked on the server.
    abandoned: Cell<bool>,
    url: String,
}

impl Conn {
    /// Connects on a new thread, waiting at most `timeouts.startup`.
    fn open(config: Config, url: &str, timeouts: Timeouts) -> Result<Conn, BufferError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel();
        std::thread::Builder::new()
            .name("grove-postgres".into())
            .spawn(move || {
                let mut client = match config.connect(NoTls) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                for job in queue {
                    job(&mut client);
                }
            })
            .map_err(|e| BufferError::Config {
                field: "postgres",
                msg: format!("cannot start the connection thread: {e}"),
            })?;
        let conn = Conn {
            jobs,
            timeout: timeouts.statement,
            abandoned: Cell::new(false),
            url: url.to_string(),
        };
        match ready.recv_timeout(timeouts.startup) {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(source)) => Err(BufferError::Postgres {
                url: conn.url,
                source,
            }),
            Err(_) => Err(BufferError::Timeout {
                url: conn.url,
                what: "the connection and startup handshake".into(),
                timeout_s: timeouts.startup.as_secs_f64(),
                abandoned: true,
            }),
        }
    }

    /// Runs `f` on the client, waiting at most the statement timeout for it.
    fn call<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Client) -> Result<T, BufferError> + Send + 'static,
    ) -> Result<T, BufferError> {
        let timeout = |abandoned| BufferError::Timeout {
            url: self.url.clone(),
            what: what.to_string(),
            timeout_s: self.timeout.as_secs_f64(),
            abandoned,
        };
        if self.abandoned.get() {
            return Err(timeout(true));
        }
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |c| {
            let _ = tx.send(f(c));
        });
        if self.jobs.send(job).is_err() {
            return Err(BufferError::Config {
                field: "postgres",
                msg: format!("{}: the connection thread has ended", self.url),
            });
        }
        match rx.recv_timeout(self.timeout) {
            Ok(r) => r,
            Err(_) => {
                self.abandoned.set(true);
                Err(timeout(true))
            }
        }
    }
}

pub struct PostgresBuffer {
    // A buffer is used by one thread; the connection thread serves it.
    conn: Conn,
    /// The URL with its password hidden, for error messages.
    url: String,
    table: String,
    capacity: usize,
    mode: TakeMode,
}

impl std::fmt::Debug for PostgresBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBuffer")
            .field("url", &self.url)
            .field("table", &self.table)
            .field("capacity", &self.capacity)
            .field("mode", &self.mode)
            .finish()
    }
}

impl PostgresBuffer {
    /// Connects and creates `table` if it is missing, with the default `Timeouts`.
    pub fn connect(
        url: &str,
        table: &str,
        capacity: usize,
        mode: TakeMode,
    ) -> Result<Self, BufferError> {
        Self::connect_with(url, table, capacity, mode, Timeouts::default())
    }

    /// [`Self::connect`] with explicit deadlines.
    pub fn connect_with(
        url: &str,
        table: &str,
        capacity: usize,
        mode: TakeMode,
        timeouts: Timeouts,
    ) -> Result<Self, BufferError> {
        check_capacity(capacity)?;
        mode.validate()?;
        check_table_name(table)?;
        let shown = crate::error::redact_url(url);
        let error = |source| BufferError::Postgres {
            url: shown.clone(),
            source,
        };
        let mut config: Config = url.parse().map_err(error)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(timeouts.startup);
        }
        let server_side = format!(
            "-c statement_timeout={}",
            timeouts.statement.as_millis().max(1)
        );
        let options = match config.get_options() {
            Some(o) => format!("{o} {server_side}"),
            None => server_side,
        };
        config.options(&options);
        let conn = Conn::open(config, &shown, timeouts)?;
        let (name, url) = (table.to_string(), shown.clone());
        conn.call("creating the table", move |c| {
            create_table(c, &name).map_err(|source| BufferError::Postgres { url, source })
        })?;
        Ok(PostgresBuffer {
            conn,
            url: shown,
            table: table.to_string(),
            capacity,
            mode,
        })
    }

    fn location(&self) -> String {
        format!("postgres {} table {}", self.url, self.table)
    }

    fn put_row(&self, group: &ExperienceGroup, body: String) -> Result<(), BufferError> {
        let group_id = sql::to_i64("group_id", group.group_id)?;
        let version = sql::to_i64("policy_version", group.policy_version)?;
        let use_count = i64::from(group.use_count());
        let (url, table, capacity) = (self.url.clone(), self.table.clone(), self.capacity);
        self.conn.call("a put", move |client| {
            let error = |source| BufferError::Postgres {
                url: url.clone(),
                source,
            };
            let mut tx = client.transaction().map_err(error)?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1)",
                &[&lock_key("put", &table)],
            )
            .map_err(error)?;
            let stored: i64 = tx
                .query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
                .map_err(error)?
                .try_get(0)
                .map_err(error)?;
            if usize::try_from(stored).map_or(true, |stored| stored >= capacity) {
                return Err(BufferError::Full { capacity });
            }
            tx.execute(
                &format!(
                    "INSERT INTO {table} (group_id, policy_version, use_count, body)
                     VALUES ($1, $2, $3, $4)"
                ),
                &[&group_id, &version, &use_count, &body],
            )
            .map_err(error)?;
            tx.commit().map_err(error)
        })
    }

    fn take_rows(&self, n: usize, min_version: i64) -> Result<Taken, BufferError> {
        let (url, table, mode) = (self.url.clone(), self.table.clone(), self.mode);
        let location = self.location();
        self.conn.call("a take", move |client| {
            let error = |source| BufferError::Postgres {
                url: url.clone(),
                source,
            };
            let mut tx = client.transaction().map_err(error)?;
            // Stale rows another trainer has locked are left to that trainer, which drops them.
            // Each dropped row returns its responses (ExperienceGroup::samples_drawn in SQL),
            // which count in `sampling/samples_drawn`.
            let stale = tx
                .query(
                    &format!(
                        "DELETE FROM {table} WHERE seq IN (SELECT seq FROM {table}
                         WHERE policy_version < $1 FOR UPDATE SKIP LOCKED)
                         RETURNING GREATEST(json_array_length(body::json -> 'experiences'),
                             COALESCE(json_array_length(body::json -> 'drawn_rewards'), 0))"
                    ),
                    &[&min_version],
                )
                .map_err(error)?;
            let dropped_samples: i64 = stale.iter().map(|r| i64::from(r.get::<_, i32>(0))).sum();
            let rows =
                select_rows(&mut tx, &table, &mode, sql::limit(n), min_version).map_err(error)?;
            let mut groups = Vec::with_capacity(rows.len());
            let (mut leaving, mut staying) = (Vec::new(), Vec::new());
            for row in &rows {
                // On a corrupt row `?` returns and the dropped transaction rolls back.
                let (group, uses) = sql::decode_taken(&location, row)?;
                if sql::leaves_after_take(&mode, uses) {
                    leaving.push(row.seq);
                } else {
                    staying.push(row.seq);
                }
                groups.push(group);
            }
            tx.execute(
                &format!("DELETE FROM {table} WHERE seq = ANY($1)"),
                &[&leaving],
            )
            .map_err(error)?;
            tx.execute(
                &format!("UPDATE {table} SET use_count = use_count + 1 WHERE seq = ANY($1)"),
                &[&staying],
            )
            .map_err(error)?;
            tx.commit().map_err(error)?;
            Ok(Taken {
                groups,
                dropped: stale.len(),
                dropped_samples: usize::try_from(dropped_samples).unwrap_or(0),
            })
        })
    }
}

impl Buffer for PostgresBuffer {
    fn put(&mut self, group: ExperienceGroup) -> Result<(), BufferError> {
        group.validate()?;
        let body = sql::encode(&group)?;
        self.put_row(&group, body)
    }

    fn take(&mut self, n: usize, min_version: u64) -> Result<Taken, BufferError> {
        let min_version = sql::to_i64("min_version", min_version)?;
        self.take_rows(n, min_version)
    }

    fn len(&self) -> Result<usize, BufferError> {
        let (url, table) = (self.url.clone(), self.table.clone());
        let stored: i64 = self.conn.call("a count", move |client| {
            let error = |source| BufferError::Postgres {
                url: url.clone(),
                source,
            };
            client
                .query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
                .map_err(error)?
                .try_get(0)
                .map_err(error)
        })?;
        Ok(usize::try_from(stored).unwrap_or(0))
    }
}

/// The next groups to hand out, locked for this transaction; rows locked by another trainer are
/// skipped. Replay order is the same expression as `super::priority`, in doubles.
fn select_rows(
    tx: &mut Transaction<'_>,
    table: &str,
    mode: &TakeMode,
    limit: i64,
    min_version: i64,
) -> Result<Vec<StoredRow>, ::postgres::Error> {
    let rows = match mode {
        TakeMode::Fifo => tx.query(
            &format!(
                "SELECT seq, use_count, body FROM {table} WHERE policy_version >= $2
                 ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED"
            ),
            &[&limit, &min_version],
        )?,
        TakeMode::PriorityReplay(replay) => tx.query(
            &format!(
                "SELECT seq, use_count, body FROM {table} WHERE policy_version >= $2
                 ORDER BY policy_version - $3::float8 * use_count DESC, seq ASC
                 LIMIT $1 FOR UPDATE SKIP LOCKED"
            ),
            &[&limit, &min_version, &replay.decay],
        )?,
    };
    // try_get: a same-named table with other column types must give an error, not a panic.
    rows.iter()
        .map(|row| {
            Ok(StoredRow {
                seq: row.try_get(0)?,
                use_count: row.try_get(1)?,
                body: row.try_get(2)?,
            })
        })
        .collect()
}

/// Creates the table under an advisory lock: concurrent `CREATE TABLE IF NOT EXISTS` from
/// several processes can otherwise fail on the type catalogue's unique index.
fn create_table(client: &mut Client, table: &str) -> Result<(), ::postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&lock_key("create", table)],
    )?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (
             seq            BIGSERIAL PRIMARY KEY,
             group_id       BIGINT NOT NULL,
             policy_version BIGINT NOT NULL,
             use_count      BIGINT NOT NULL DEFAULT 0,
             body           TEXT   NOT NULL
         );
         CREATE INDEX IF NOT EXISTS {table}_version ON {table} (policy_version);"
    ))?;
    tx.commit()
}

/// Table names are spliced into SQL, so only plain lower-case identifiers are accepted.
fn check_table_name(table: &str) -> Result<(), BufferError> {
    let mut chars = table.chars();
    let starts_well = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    // 63 bytes is PostgreSQL's identifier limit; leave room for the "_version" index suffix.
    if starts_well && rest_ok && table.len() <= 55 {
        Ok(())
    } else {
        Err(BufferError::Config {
            field: "table",
            msg: format!("{table:?} is not a plain identifier, expected [a-z_][a-z0-9_]{{0,54}}"),
        })
    }
}

/// A stable 64-bit advisory-lock key per purpose and table (FNV-1a).
fn lock_key(purpose: &str, table: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("grove:{purpose}:{table}").bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::super::contract;
    use super::super::experience::tests::sample_group;
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};

    const DEFAULT_TEST_URL: &str = "postgres://postgres@localhost:5432/grove_test";

    fn in_ci() -> bool {
        std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"))
    }

    /// The test server's URL, or None (with a loud message) when it is unreachable outside CI.
    /// In CI an unreachable server fails the test: `.ci/postgres.sh` must have started it.
    fn test_url() -> Option<String> {
        let url =
            std::env::var("GROVE_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.into());
        match Client::connect(&url, NoTls) {
            Ok(_) => Some(url),
            Err(e) if in_ci() => panic!(
                "PostgreSQL at {} is unreachable in CI ({e}); run .ci/postgres.sh first",
                crate::error::redact_url(&url)
            ),
            Err(e) => {
                eprintln!(
                    "\n******** SKIPPED: no PostgreSQL at {} ({e}); run .ci/postgres.sh \
                     or set GROVE_TEST_POSTGRES_URL ********\n",
                    crate::error::redact_url(&url)
                );
                None
            }
        }
    }

    /// A per-test table, dropped before use (leftovers of a crashed run) and after.
    struct TestTable {
        url: String,
        name: String,
    }

    impl TestTable {
        fn new(url: &str, test: &str) -> Self {
            let table = TestTable {
                url: url.to_string(),
                name: format!("grove_test_{test}_{}", std::process::id()),
            };
            table.drop_table();
            table
        }

        fn buffer(&self, capacity: usize, mode: TakeMode) -> PostgresBuffer {
            PostgresBuffer::connect(&self.url, &self.name, capacity, mode).unwrap()
        }

        fn drop_table(&self) {
            if let Ok(mut client) = Client::connect(&self.url, NoTls) {
                let _ = client.batch_execute(&format!("DROP TABLE IF EXISTS {}", self.name));
            }
        }
    }

    impl Drop for TestTable {
        fn drop(&mut self) {
            self.drop_table();
        }
    }

    /// Runs `body` against a fresh table, or skips.
    fn with_table(test: &str, body: impl FnOnce(&TestTable)) {
        if let Some(url) = test_url() {
            body(&TestTable::new(&url, test));
        }
    }

    #[test]
    fn fifo_order() {
        with_table("fifo", |t| {
            contract::fifo_order(&mut t.buffer(8, TakeMode::Fifo))
        });
    }

    #[test]
    fn stale_groups_are_dropped_and_counted() {
        with_table("stale", |t| {
            contract::drops_stale(&mut t.buffer(8, TakeMode::Fifo))
        });
    }

    #[test]
    fn full_at_capacity() {
        with_table("full", |t| {
            contract::full_at_capacity(&mut t.buffer(contract::SMALL_CAPACITY, TakeMode::Fifo))
        });
    }

    #[test]
    fn replay_priorities_and_eviction() {
        with_table("replay", |t| {
            contract::replay_priorities(&mut t.buffer(8, contract::replay_mode()))
        });
    }

    #[test]
    fn content_round_trips() {
        with_table("content", |t| {
            contract::content_round_trips(&mut t.buffer(8, TakeMode::Fifo))
        });
    }

    #[test]
    fn invalid_groups_are_refused() {
        with_table("invalid", |t| {
            contract::invalid_groups_are_refused(&mut t.buffer(8, TakeMode::Fifo))
        });
    }

    #[test]
    fn concurrent_explorers_and_trainers_never_share_a_group() {
        const PER_PRODUCER: u64 = 30;
        with_table("concurrent", |t| {
            let seen = Arc::new(Mutex::new(Vec::new()));
            // Every party has its own connection, as separate processes would; all four
            // connect (and create the table) at once.
            let buffers: Vec<PostgresBuffer> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| s.spawn(|| t.buffer(8, TakeMode::Fifo)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            std::thread::scope(|s| {
                for (index, mut buffer) in buffers.into_iter().enumerate() {
                    let seen = Arc::clone(&seen);
                    let producer = index as u64; // 0, 1 produce; 2, 3 consume
                    s.spawn(move || {
                        if producer < 2 {
                            for i in 0..PER_PRODUCER {
                                let id = producer * 1000 + i;
                                contract::put_waiting(&mut buffer, sample_group(id, 0, 1));
                            }
                        } else {
                            let total = 2 * PER_PRODUCER as usize;
                            contract::drain_until(&mut buffer, &seen, total);
                        }
                    });
                }
            });
            let seen = seen.lock().unwrap();
            let distinct: BTreeSet<u64> = seen.iter().copied().collect();
            assert_eq!(
                seen.len(),
                2 * PER_PRODUCER as usize,
                "a group was delivered twice"
            );
            let expected: BTreeSet<u64> =
                (0..PER_PRODUCER).chain(1000..1000 + PER_PRODUCER).collect();
            assert_eq!(distinct, expected);
        });
    }

    #[test]
    fn opened_through_the_url() {
        let Some(url) = test_url() else { return };
        // `open` uses the shared default table: only check that it connects and counts.
        let buffer = super::super::open(&url, 4).unwrap();
        buffer.len().unwrap();
    }

    #[test]
    fn unreachable_server_names_the_url_without_password() {
        let url = "postgres://grove:hunter2@127.0.0.1:1/none?connect_timeout=2";
        let message = PostgresBuffer::connect(url, DEFAULT_TABLE, 4, TakeMode::Fifo)
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("postgres postgres://grove:***@127.0.0.1:1/none"),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
        assert!(message.contains("refused"), "the cause is shown: {message}");
    }

    /// A server that accepts connections and then reads forever without answering, or (with
    /// `handshake`) completes the startup handshake and then never answers a query.
    fn silent_server(handshake: bool) -> std::net::SocketAddr {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    if handshake {
                        // StartupMessage: length-prefixed; an SSLRequest (code 80877103)
                        // first is declined with 'N'.
                        let mut len = [0u8; 4];
                        loop {
                            if s.read_exact(&mut len).is_err() {
                                return;
                            }
                            let mut rest = vec![0u8; u32::from_be_bytes(len) as usize - 4];
                            if s.read_exact(&mut rest).is_err() {
                                return;
                            }
                            if rest[..4] == 80877103u32.to_be_bytes() {
                                let _ = s.write_all(b"N");
                            } else {
                                break;
                            }
                        }
                        // AuthenticationOk, ReadyForQuery (idle).
                        let _ =
                            s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z', 0, 0, 0, 5, b'I']);
                    }
                    let mut sink = [0u8; 4096];
                    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                });
            }
        });
        addr
    }

    #[test]
    fn a_server_that_never_answers_times_out() {
        let short = Timeouts {
            startup: Duration::from_millis(500),
            statement: Duration::from_millis(500),
        };
        // Silent from the first byte: the startup handshake times out.
        let url = format!("postgres://grove:pw@{}/db", silent_server(false));
        let e = PostgresBuffer::connect_with(&url, "t", 4, TakeMode::Fifo, short)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no answer to the connection and startup handshake within 0.5 s")
                && e.contains("grove:***@")
                && !e.contains(":pw@"),
            "{e}"
        );
        // Handshake done, then silence: the first statement (CREATE TABLE) times out.
        let url = format!("postgres://grove@{}/db", silent_server(true));
        let e = PostgresBuffer::connect_with(&url, "t", 4, TakeMode::Fifo, short)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no answer to creating the table within 0.5 s"),
            "{e}"
        );
    }

    #[test]
    fn table_names_must_be_plain_identifiers() {
        assert!(check_table_name("grove_run_7").is_ok());
        for bad in [
            "",
            "7runs",
            "Runs",
            "a;drop table x",
            "a-b",
            &"x".repeat(56),
        ] {
            assert!(check_table_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn lock_keys_differ_by_purpose_and_table() {
        assert_ne!(lock_key("put", "a"), lock_key("create", "a"));
        assert_ne!(lock_key("put", "a"), lock_key("put", "b"));
        assert_eq!(lock_key("put", "a"), lock_key("put", "a"));
    }
}
