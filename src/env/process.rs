//! A user program spoken to in JSON lines: one request line on stdin, one answer line on
//! stdout, each exchange bounded by a deadline. Environment programs and command tools use
//! it. The program runs in its own process group; dropping the handle kills the group.
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes of the program's stderr kept for error messages.
const STDERR_TAIL_BYTES: usize = 2048;
/// Characters of a malformed line quoted in an error.
pub const QUOTE_CHARS: usize = 200;

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

pub struct LineProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr_tail: Arc<Mutex<VecDeque<u8>>>,
    stderr_done: Receiver<()>,
    /// The command line, for messages.
    pub display: String,
}

impl LineProcess {
    /// Starts `command` (program and arguments).
    pub fn spawn(command: &[String]) -> Result<Self, String> {
        let display = command.join(" ");
        let Some(program) = command.first().filter(|p| !p.is_empty()) else {
            return Err("empty command: expected [program, args...]".into());
        };
        let mut cmd = Command::new(program);
        cmd.args(&command[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("`{display}`: cannot start it: {e}"))?;
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
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
        }
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let (done_tx, stderr_done) = mpsc::channel::<()>();
        if let Some(mut err) = child.stderr.take() {
            let tail = Arc::clone(&stderr_tail);
            std::thread::spawn(move || {
                let _done = done_tx;
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
        Ok(LineProcess {
            child,
            stdin,
            lines,
            stderr_tail,
            stderr_done,
            display,
        })
    }

    /// Sends one JSON value as a line and reads one line back before `deadline`. A program
    /// that does not read its stdin fills the pipe; the write then fails or the read times
    /// out, either way within the deadline's reach (requests are small).
    pub fn exchange(
        &mut self,
        request: &serde_json::Value,
        deadline: Instant,
    ) -> Result<String, Failure> {
        let mut line = request.to_string();
        line.push('\n');
        let written = match self.stdin.as_mut() {
            Some(s) => s.write_all(line.as_bytes()).and_then(|_| s.flush()).is_ok(),
            None => false,
        };
        let wait = if written {
            deadline.saturating_duration_since(Instant::now())
        } else {
            Duration::from_millis(100)
        };
        match self.lines.recv_timeout(wait) {
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) if written => {
                self.kill();
                Err(Failure::Timeout)
            }
            Err(_) => {
                let status = self.wait_briefly();
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

    fn wait_briefly(&mut self) -> String {
        for _ in 0..40 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.to_string();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        "stdout closed, process still running".into()
    }

    fn kill(&mut self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
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
    fn drop(&mut self) {
        drop(self.stdin.take());
        // A moment to exit on EOF (a `close` was sent before), then the group goes.
        for _ in 0..20 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill();
    }
}

/// The first characters of a line, for error messages.
pub fn quote(line: &str) -> String {
    let mut q: String = line.chars().take(QUOTE_CHARS).collect();
    if line.chars().count() > QUOTE_CHARS {
        q.push('…');
    }
    q
}
