//! The one supervisor of the user programs grove talks to in JSON lines — reward commands
//! (`reward::external`), environment programs and command tools (`env`): one request line on
//! stdin, one answer line on stdout, each exchange bounded by a deadline.
//!
//! The program runs in its own process group, so a timeout or shutdown kills the whole group
//! and the children of a `sh -c` wrapper do not outlive it. Writes and reads happen on threads
//! that talk to the caller over channels, so the deadline covers the whole exchange: a program
//! that never reads its input (the pipe fills, the write blocks) times out like one that never
//! answers. The last bytes of its stderr are kept for error messages.
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes of the program's stderr kept for error messages.
pub const STDERR_TAIL_BYTES: usize = 2048;
/// Characters of a malformed line quoted in an error.
pub const QUOTE_CHARS: usize = 200;
/// How long a program may take to exit on its own once its stdin is closed.
const EXIT_GRACE: Duration = Duration::from_millis(200);

/// Why a program could not be started.
#[derive(Debug)]
pub enum SpawnError {
    /// No program named.
    EmptyCommand,
    /// The operating system refused (no such file, not executable, ...).
    Start(std::io::Error),
}

/// Why an exchange failed; the program is dead or out of step afterwards in every case.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// No complete line before the deadline (the program was killed).
    Timeout,
    /// The program exited (or closed stdout) without answering.
    Exited { status: String, stderr: String },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout => write!(f, "no answer line before the deadline; killed"),
            Failure::Exited { status, stderr } => write!(
                f,
                "exited ({status}) without answering; its stderr ended with: {stderr:?}"
            ),
        }
    }
}

/// A running program with its writer and reader threads. Dropping it closes stdin, gives
/// the program a moment to exit, then kills its process group.
pub struct LineProcess {
    child: Child,
    /// Lines for the writer thread, which owns the program's stdin; dropping it closes stdin.
    stdin: Option<Sender<Vec<u8>>>,
    lines: Receiver<String>,
    stderr_tail: Arc<Mutex<VecDeque<u8>>>,
    /// Disconnects when the stderr reader reaches EOF.
    stderr_done: Receiver<()>,
    /// The command line, for messages.
    pub display: String,
}

impl LineProcess {
    /// Starts `command` (program and arguments) in its own process group.
    pub fn start(command: &[String]) -> Result<Self, SpawnError> {
        let Some(program) = command.first().filter(|p| !p.is_empty()) else {
            return Err(SpawnError::EmptyCommand);
        };
        let mut cmd = Command::new(program);
        cmd.args(&command[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(SpawnError::Start)?;
        let stdin = child.stdin.take().map(writer_thread);
        let lines = match child.stdout.take() {
            Some(out) => line_reader_thread(out),
            // Never the case with a piped stdout; a closed channel reads as "exited".
            None => mpsc::channel().1,
        };
        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_BYTES)));
        let (done_tx, stderr_done) = mpsc::channel::<()>();
        if let Some(err) = child.stderr.take() {
            stderr_tail_thread(err, Arc::clone(&stderr_tail), done_tx);
        }
        Ok(LineProcess {
            child,
            stdin,
            lines,
            stderr_tail,
            stderr_done,
            display: command.join(" "),
        })
    }

    /// [`LineProcess::start`] with the failure as a message naming the command.
    pub fn spawn(command: &[String]) -> Result<Self, String> {
        Self::start(command).map_err(|e| match e {
            SpawnError::EmptyCommand => "empty command: expected [program, args...]".into(),
            SpawnError::Start(e) => format!("`{}`: cannot start it: {e}", command.join(" ")),
        })
    }

    /// Sends one JSON value as a line and reads one line back before `deadline`.
    pub fn exchange(
        &mut self,
        request: &serde_json::Value,
        deadline: Instant,
    ) -> Result<String, Failure> {
        self.exchange_line(request.to_string(), deadline)
    }

    /// Sends `line` (a newline is added) and reads one line back before `deadline`. On a
    /// timeout the program is killed.
    pub fn exchange_line(
        &mut self,
        mut line: String,
        deadline: Instant,
    ) -> Result<String, Failure> {
        line.push('\n');
        // A failed send means the writer saw a broken pipe: the program has exited, and the
        // channel then reports it as gone.
        let written = match self.stdin.as_ref() {
            Some(s) => s.send(line.into_bytes()).is_ok(),
            None => false,
        };
        let answer = if written {
            self.lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        } else {
            self.lines
                .recv_timeout(Duration::from_millis(100))
                .map_err(|_| RecvTimeoutError::Disconnected)
        };
        match answer {
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) => {
                self.kill();
                Err(Failure::Timeout)
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.wait_briefly();
                // Let the stderr reader drain what the program wrote before exiting (it ends
                // at EOF; a grandchild holding the pipe open could delay that, hence the bound).
                let _ = self.stderr_done.recv_timeout(Duration::from_millis(500));
                Err(Failure::Exited {
                    status,
                    stderr: self.stderr_tail(),
                })
            }
        }
    }

    fn stderr_tail(&self) -> String {
        let bytes: Vec<u8> = self
            .stderr_tail
            .lock()
            .map(|t| t.iter().copied().collect())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// Exit status if the program has exited (waiting up to 200 ms for it), else "still
    /// running".
    fn wait_briefly(&mut self) -> String {
        for _ in 0..40 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.to_string();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        "stdout closed, process still running".into()
    }

    /// Kills the program's process group (it leads one: see `start`) and reaps the program.
    fn kill(&mut self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // The program is a group leader, so its pid is the group id; a reaped program's
            // group lives on as long as any process it started does.
            if let Ok(pgid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: kill(2) on the program's own process group; no memory is touched.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LineProcess {
    /// Closes stdin, gives the program 200 ms to exit, then kills what is left of its
    /// group. The reader threads are not joined: they end at EOF, which a grandchild holding
    /// the pipe could delay.
    fn drop(&mut self) {
        drop(self.stdin.take());
        let until = Instant::now() + EXIT_GRACE;
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill();
    }
}

/// The thread that owns the program's stdin: it blocks in `write_all` when the program does
/// not read, while the caller waits only for the answer. Ends when the sender is dropped or
/// the pipe breaks.
fn writer_thread(mut pipe: std::process::ChildStdin) -> Sender<Vec<u8>> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        for line in rx {
            if pipe.write_all(&line).and_then(|_| pipe.flush()).is_err() {
                return;
            }
        }
    });
    tx
}

/// The thread that reads stdout line by line. Invalid UTF-8 or a read error is forwarded as
/// a line, so the caller reports it as a malformed answer instead of waiting for a timeout.
fn line_reader_thread(out: std::process::ChildStdout) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let (l, stop) = match line {
                Ok(l) => (l, false),
                Err(e) => (format!("<unreadable output: {e}>"), true),
            };
            if tx.send(l).is_err() || stop {
                return;
            }
        }
    });
    rx
}

/// The thread that keeps the last [`STDERR_TAIL_BYTES`] of stderr; `done` disconnects at EOF.
fn stderr_tail_thread(
    mut err: std::process::ChildStderr,
    tail: Arc<Mutex<VecDeque<u8>>>,
    done: Sender<()>,
) {
    std::thread::spawn(move || {
        let _done = done;
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = err.read(&mut buf) {
            if let Ok(mut t) = tail.lock() {
                t.extend(&buf[..n]);
                let extra = t.len().saturating_sub(STDERR_TAIL_BYTES);
                t.drain(..extra);
            }
        }
    });
}

/// The first [`QUOTE_CHARS`] characters of a line, for error messages.
pub fn quote(line: &str) -> String {
    let mut q: String = line.chars().take(QUOTE_CHARS).collect();
    if line.chars().count() > QUOTE_CHARS {
        q.push('…');
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    fn soon(s: f64) -> Instant {
        Instant::now() + Duration::from_secs_f64(s)
    }

    #[test]
    fn a_line_in_gives_a_line_out() {
        let mut p = LineProcess::start(&sh("while read l; do echo \"got $l\"; done")).unwrap();
        let a = p
            .exchange(&serde_json::json!({"x": 1}), soon(10.0))
            .unwrap();
        assert_eq!(a, "got {\"x\":1}");
        assert_eq!(p.exchange_line("2".into(), soon(10.0)).unwrap(), "got 2");
    }

    #[test]
    fn a_silent_program_times_out_within_the_deadline_and_is_killed() {
        let mut p = LineProcess::start(&sh("sleep 30")).unwrap();
        let t = Instant::now();
        assert_eq!(
            p.exchange_line("x".into(), soon(0.3)),
            Err(Failure::Timeout)
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(p.child.try_wait().unwrap().is_some(), "still running");
    }

    #[test]
    fn an_exit_reports_the_status_and_the_end_of_stderr() {
        let mut p = LineProcess::start(&sh("read l; echo oops >&2; exit 3")).unwrap();
        match p.exchange_line("x".into(), soon(10.0)) {
            Err(Failure::Exited { status, stderr }) => {
                assert!(status.contains('3'), "{status}");
                assert_eq!(stderr, "oops");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn start_failures_name_the_command() {
        assert!(matches!(
            LineProcess::start(&[]),
            Err(SpawnError::EmptyCommand)
        ));
        let e = LineProcess::spawn(&["/nonexistent/prog".to_string(), "a".into()])
            .err()
            .unwrap();
        assert!(
            e.starts_with("`/nonexistent/prog a`: cannot start it:"),
            "{e}"
        );
    }

    #[test]
    fn long_lines_are_quoted_shortened() {
        let q = quote(&"x".repeat(QUOTE_CHARS + 5));
        assert_eq!(q.chars().count(), QUOTE_CHARS + 1);
        assert!(q.ends_with('…'));
        assert_eq!(quote("ab"), "ab");
    }
}
