//! User reward functions: a Rust trait, and rewards computed by an external command.
//!
//! The external-command protocol (docs/rewards.md): grove starts the command once and keeps it
//! running. For every response it writes one JSON object on a line to the command's stdin,
//!
//! ```json
//! {"prompt": "37+48=", "response": "85", "references": ["85"], "metadata": {...}}
//! ```
//!
//! and reads one line from its stdout: `{"reward": 0.5}` or a bare number `0.5`. Anything else
//! on that line, no line within `timeout_s`, or the command exiting is a failure. What a failure
//! does is configured by `on_error`:
//! - `stop`: the call returns an error naming the command, the request index and what was read;
//!   the run stops.
//! - `fail-response`: the response gets `failure_reward` (default 0), the failure is counted
//!   ([`ExternalCommandReward::failures`], logged as `reward/external_failures`) and the command
//!   is restarted before the next request, since after a hang or stray output its answers could
//!   no longer be matched to requests. After `max_consecutive_failures` failures in a row the
//!   call errors anyway: a command that never answers is a broken setup, not a noisy reward.
//!
//! Writes and reads happen on threads that talk to the trainer over channels, so
//! `timeout_s` covers the whole exchange: a command that never reads its input (the pipe
//! fills, the write blocks) times out like one that never answers. The command runs in its
//! own process group, and a timeout or shutdown kills the whole group, so the children of a
//! `sh -c` wrapper do not outlive it.
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Default per-request timeout, seconds.
pub const DEFAULT_TIMEOUT_S: f64 = 30.0;
/// Default number of failures in a row after which `fail-response` gives up.
pub const DEFAULT_MAX_CONSECUTIVE_FAILURES: u64 = 20;
/// Bytes of the command's stderr kept for error messages.
const STDERR_TAIL_BYTES: usize = 2048;
/// Characters of a malformed line quoted in an error.
const QUOTE_CHARS: usize = 200;

/// What one response is scored on; the JSON object sent to an external command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardRequest {
    pub prompt: String,
    pub response: String,
    /// Reference answers of the prompt (may be empty).
    pub references: Vec<String>,
    /// Anything else the caller knows (finished flag, token count, task fields).
    pub metadata: serde_json::Value,
}

/// A user reward function. Implement it in Rust and register it with
/// `RewardPipeline::with_function`, or use [`ExternalCommandReward`] for another language.
pub trait RewardFn {
    fn score(&mut self, req: &RewardRequest) -> crate::Result<f64>;
    /// Responses scored as failed so far (reward functions that never fail keep the default 0).
    fn failures(&self) -> u64 {
        0
    }
}

/// Any closure `FnMut(&RewardRequest) -> Result<f64>` is a reward function.
impl<F: FnMut(&RewardRequest) -> crate::Result<f64>> RewardFn for F {
    fn score(&mut self, req: &RewardRequest) -> crate::Result<f64> {
        self(req)
    }
}

/// What to do when the command fails on a response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Return the error: the run stops.
    #[default]
    Stop,
    /// Score the response `failure_reward`, count it, restart the command.
    FailResponse,
}

fn default_timeout_s() -> f64 {
    DEFAULT_TIMEOUT_S
}
fn default_max_consecutive_failures() -> u64 {
    DEFAULT_MAX_CONSECUTIVE_FAILURES
}

/// The `external` component's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalConfig {
    /// Program and arguments, e.g. `["python3", "examples/reward_length.py"]` (no shell).
    pub command: Vec<String>,
    /// Seconds one response may take before the command is killed and restarted.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// What a failed response (crash, timeout, unreadable answer) does: stop the run, or
    /// score that response with `failure_reward`.
    #[serde(default)]
    pub on_error: OnError,
    /// Reward of a failed response under `on_error = "fail-response"`.
    #[serde(default)]
    pub failure_reward: f64,
    /// Failures in a row after which the run stops with the command's last error.
    #[serde(default = "default_max_consecutive_failures")]
    pub max_consecutive_failures: u64,
    /// Copies of the command scoring a batch at once (`reward::external_pool`; default: the
    /// machine's cores). Each copy counts its own failures in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
}

impl ExternalConfig {
    pub fn new(command: Vec<String>) -> Self {
        ExternalConfig {
            command,
            timeout_s: DEFAULT_TIMEOUT_S,
            on_error: OnError::Stop,
            failure_reward: 0.0,
            max_consecutive_failures: DEFAULT_MAX_CONSECUTIVE_FAILURES,
            concurrency: None,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err("`command`: expected [program, args...], found an empty list".into());
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            return Err(format!(
                "`timeout_s`: expected a finite number > 0, found {}",
                self.timeout_s
            ));
        }
        if !self.failure_reward.is_finite() {
            return Err(format!(
                "`failure_reward`: expected a finite number, found {}",
                self.failure_reward
            ));
        }
        if self.max_consecutive_failures == 0 {
            return Err("`max_consecutive_failures`: expected >= 1, found 0".into());
        }
        if self.concurrency == Some(0) {
            return Err("`concurrency`: expected >= 1 copies of the command, found 0".into());
        }
        Ok(())
    }
}

/// Why a request to the command failed.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ExternalError {
    #[error("reward command `{command}`: invalid config: {msg}")]
    Config { command: String, msg: String },
    #[error("reward command `{command}`: cannot start it: {msg}")]
    Spawn { command: String, msg: String },
    #[error(
        "reward command `{command}`, request {index}: no answer within {timeout_s} s \
         (no complete line read); the command was killed"
    )]
    Timeout {
        command: String,
        index: u64,
        timeout_s: f64,
    },
    #[error(
        "reward command `{command}`, request {index}: the command exited ({status}) without \
         answering; its stderr ended with: {stderr:?}"
    )]
    Crashed {
        command: String,
        index: u64,
        status: String,
        stderr: String,
    },
    #[error(
        "reward command `{command}`, request {index}: expected one line `{{\"reward\": <number>}}` \
         or a number, read {line:?}"
    )]
    Malformed {
        command: String,
        index: u64,
        line: String,
    },
    #[error(
        "reward command `{command}`: {count} failures in a row (max_consecutive_failures), \
         last: {last}"
    )]
    TooManyFailures {
        command: String,
        count: u64,
        last: String,
    },
}

impl From<ExternalError> for crate::Error {
    fn from(e: ExternalError) -> Self {
        crate::Error::Reward(e.to_string())
    }
}

/// The running child with its reader threads.
struct Running {
    child: Child,
    /// Lines for the writer thread, which owns the command's stdin; dropping it closes stdin.
    stdin: Option<mpsc::Sender<Vec<u8>>>,
    lines: Receiver<String>,
    stderr_tail: Arc<Mutex<VecDeque<u8>>>,
    /// Disconnects when the stderr reader reaches EOF.
    stderr_done: Receiver<()>,
}

impl Running {
    fn stderr_tail(&self) -> String {
        let tail = self
            .stderr_tail
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        let bytes: Vec<u8> = tail.into_iter().collect();
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// Closes stdin, gives the command a moment to exit, then kills it. The reader threads are
    /// not joined: they end at EOF, which a grandchild holding the pipe could delay.
    fn shutdown(mut self) {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_millis(200);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    kill_group(&mut self.child);
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        // Whatever the command started and left behind goes with it.
        kill_group(&mut self.child);
    }
}

/// A reward computed by a long-running external command (see the module docs).
pub struct ExternalCommandReward {
    cfg: ExternalConfig,
    display: String,
    running: Option<Running>,
    /// Requests sent so far, over all restarts; the next request's index.
    next_index: u64,
    failures: u64,
    consecutive_failures: u64,
    restarts: u64,
}

impl ExternalCommandReward {
    /// Validates the config and starts the command.
    pub fn new(cfg: ExternalConfig) -> Result<Self, ExternalError> {
        let display = cfg.command.join(" ");
        cfg.validate().map_err(|msg| ExternalError::Config {
            command: display.clone(),
            msg,
        })?;
        let mut me = ExternalCommandReward {
            cfg,
            display,
            running: None,
            next_index: 0,
            failures: 0,
            consecutive_failures: 0,
            restarts: 0,
        };
        me.running = Some(me.spawn()?);
        Ok(me)
    }

    pub fn config(&self) -> &ExternalConfig {
        &self.cfg
    }

    /// Responses scored as failed so far.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Times the command was started again after a failure.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    fn spawn(&self) -> Result<Running, ExternalError> {
        let mut command = Command::new(&self.cfg.command[0]);
        command
            .args(&self.cfg.command[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().map_err(|e| ExternalError::Spawn {
            command: self.display.clone(),
            msg: e.to_string(),
        })?;
        let stdin = child.stdin.take().map(|mut pipe| {
            let (tx, rx) = mpsc::channel::<Vec<u8>>();
            // Blocks in write_all when the command does not read; the trainer does not wait
            // for it, only for the answer. Ends when the sender is dropped or the pipe breaks.
            std::thread::spawn(move || {
                for line in rx {
                    if pipe.write_all(&line).and_then(|_| pipe.flush()).is_err() {
                        return;
                    }
                }
            });
            tx
        });
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (tx, rx) = mpsc::channel();
        if let Some(out) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    match line {
                        Ok(l) => {
                            if tx.send(l).is_err() {
                                return;
                            }
                        }
                        // Invalid UTF-8 or a read error: forward it as a line so the caller
                        // reports it as malformed output instead of waiting for a timeout.
                        Err(e) => {
                            let _ = tx.send(format!("<unreadable output: {e}>"));
                            return;
                        }
                    }
                }
            });
        }
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_BYTES)));
        let (done_tx, stderr_done) = mpsc::channel::<()>();
        if let Some(mut err) = stderr {
            let tail = Arc::clone(&tail);
            std::thread::spawn(move || {
                // Dropped (disconnecting `stderr_done`) when this thread ends.
                let _done = done_tx;
                let mut buf = [0u8; 1024];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    if let Ok(mut t) = tail.lock() {
                        t.extend(&buf[..n]);
                        while t.len() > STDERR_TAIL_BYTES {
                            t.pop_front();
                        }
                    }
                }
            });
        }
        Ok(Running {
            child,
            stdin,
            lines: rx,
            stderr_tail: tail,
            stderr_done,
        })
    }

    /// One request/answer exchange on the running command.
    fn exchange(&mut self, index: u64, req: &RewardRequest) -> Result<f64, ExternalError> {
        if self.running.is_none() {
            self.running = Some(self.spawn()?);
            self.restarts += 1;
        }
        let running = self.running.as_mut().expect("started above");
        let mut line = serde_json::to_string(req).map_err(|e| ExternalError::Config {
            command: self.display.clone(),
            msg: format!("request {index} cannot be encoded as JSON: {e}"),
        })?;
        line.push('\n');
        let write_ok = match running.stdin.as_ref() {
            Some(stdin) => stdin.send(line.into_bytes()).is_ok(),
            None => false,
        };
        // A failed send means the writer saw a broken pipe: the command has exited, and the
        // channel then reports it as gone.
        let answer = if write_ok {
            running
                .lines
                .recv_timeout(Duration::from_secs_f64(self.cfg.timeout_s))
        } else {
            running
                .lines
                .recv_timeout(Duration::from_millis(100))
                .map_err(|_| RecvTimeoutError::Disconnected)
        };
        match answer {
            Ok(text) => parse_reward(&text).ok_or_else(|| ExternalError::Malformed {
                command: self.display.clone(),
                index,
                line: quote(&text),
            }),
            Err(RecvTimeoutError::Timeout) => Err(ExternalError::Timeout {
                command: self.display.clone(),
                index,
                timeout_s: self.cfg.timeout_s,
            }),
            Err(RecvTimeoutError::Disconnected) => {
                let status = wait_briefly(&mut running.child);
                // Let the stderr reader drain what the command wrote before exiting (it ends at
                // EOF; a grandchild holding the pipe open could delay that, hence the bound).
                let _ = running.stderr_done.recv_timeout(Duration::from_millis(500));
                Err(ExternalError::Crashed {
                    command: self.display.clone(),
                    index,
                    status,
                    stderr: running.stderr_tail(),
                })
            }
        }
    }
}

impl RewardFn for ExternalCommandReward {
    fn score(&mut self, req: &RewardRequest) -> crate::Result<f64> {
        let index = self.next_index;
        self.next_index += 1;
        match self.exchange(index, req) {
            Ok(r) => {
                self.consecutive_failures = 0;
                Ok(r)
            }
            Err(e @ (ExternalError::Spawn { .. } | ExternalError::Config { .. })) => Err(e.into()),
            Err(e) => {
                // The command's state is unknown after any failure: stop it; under
                // fail-response the next request starts a fresh one.
                if let Some(r) = self.running.take() {
                    r.shutdown();
                }
                match self.cfg.on_error {
                    OnError::Stop => Err(e.into()),
                    OnError::FailResponse => {
                        self.failures += 1;
                        self.consecutive_failures += 1;
                        if self.consecutive_failures >= self.cfg.max_consecutive_failures {
                            return Err(ExternalError::TooManyFailures {
                                command: self.display.clone(),
                                count: self.consecutive_failures,
                                last: e.to_string(),
                            }
                            .into());
                        }
                        Ok(self.cfg.failure_reward)
                    }
                }
            }
        }
    }

    fn failures(&self) -> u64 {
        self.failures
    }
}

impl Drop for ExternalCommandReward {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
        }
    }
}

/// `{"reward": x}` or a bare number, x finite; surrounding whitespace is allowed.
pub fn parse_reward(line: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let x = match &v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::Object(map) => map.get("reward")?.as_f64()?,
        _ => return None,
    };
    x.is_finite().then_some(x)
}

fn quote(text: &str) -> String {
    let mut s: String = text.chars().take(QUOTE_CHARS).collect();
    if text.chars().count() > QUOTE_CHARS {
        s.push('…');
    }
    s
}

/// Kills the child's process group (it leads one: see `spawn`), or the child alone elsewhere.
fn kill_group(child: &mut Child) {
    #[cfg(unix)]
    {
        // The child is a group leader, so its pid is the group id; a reaped child's group
        // lives on as long as any process it started does.
        if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) with a negative pid signals that process group; no memory is
            // touched.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
    let _ = child.kill();
}

/// Exit status if the child has exited (waiting up to 200 ms for it), else "still running".
fn wait_briefly(child: &mut Child) -> String {
    for _ in 0..40 {
        if let Ok(Some(status)) = child.try_wait() {
            return status.to_string();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    "stdout closed, process still running".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn example() -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/reward_length.py"
        ))
    }

    fn req(prompt: &str, response: &str, refs: &[&str]) -> RewardRequest {
        RewardRequest {
            prompt: prompt.into(),
            response: response.into(),
            references: refs.iter().map(|s| s.to_string()).collect(),
            metadata: serde_json::json!({}),
        }
    }

    /// A Python script in a temp dir, run with `python3`.
    fn script(dir: &tempfile::TempDir, name: &str, body: &str) -> Vec<String> {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        vec!["python3".into(), p.display().to_string()]
    }

    fn cfg(command: Vec<String>, on_error: OnError) -> ExternalConfig {
        ExternalConfig {
            timeout_s: 3.0,
            on_error,
            ..ExternalConfig::new(command)
        }
    }

    #[test]
    fn parse_reward_forms() {
        assert_eq!(parse_reward(r#"{"reward": 0.5}"#), Some(0.5));
        assert_eq!(parse_reward("  -2 \r"), Some(-2.0));
        assert_eq!(parse_reward(r#"{"reward": 1, "why": "ok"}"#), Some(1.0));
        assert_eq!(parse_reward("hello"), None);
        assert_eq!(parse_reward(r#"{"score": 1}"#), None);
        assert_eq!(parse_reward(r#"{"reward": "1"}"#), None);
        assert_eq!(parse_reward("[1]"), None);
        assert_eq!(parse_reward(""), None);
        // JSON has no NaN/inf literals, so non-finite rewards cannot parse.
        assert_eq!(parse_reward("NaN"), None);
        assert_eq!(parse_reward("1e999"), None);
    }

    #[test]
    fn shipped_python_example_scores_requests() {
        let mut r = ExternalCommandReward::new(cfg(
            vec!["python3".into(), example().display().to_string()],
            OnError::Stop,
        ))
        .unwrap();
        // Correct and short: 1.0
        assert_eq!(r.score(&req("37+48=", "85", &["85"])).unwrap(), 1.0);
        // Wrong: 0.0
        assert_eq!(r.score(&req("37+48=", "84", &["85"])).unwrap(), 0.0);
        // Correct after trimming whitespace, 25 characters long: 1 − 0.01·(25 − 20) = 0.95
        let long = format!("{}85", " ".repeat(23));
        assert_eq!(long.len(), 25);
        let v = r.score(&req("37+48=", &long, &["85"])).unwrap();
        assert!((v - 0.95).abs() < 1e-12, "{v}");
        // Metadata max_chars = 30 overrides the default 20: 1 − 0.01·(25 − 30)⁺ = 1
        let mut with_meta = req("37+48=", &long, &["85"]);
        with_meta.metadata = serde_json::json!({"max_chars": 30});
        assert_eq!(r.score(&with_meta).unwrap(), 1.0);
        assert_eq!(r.failures(), 0);
        assert_eq!(r.restarts(), 0, "the command is started once");
    }

    #[test]
    fn a_hanging_command_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = script(
            &dir,
            "hang.py",
            "import sys, time\nfor line in sys.stdin:\n    time.sleep(100)\n",
        );
        let mut stop = ExternalCommandReward::new(ExternalConfig {
            timeout_s: 0.3,
            ..cfg(cmd.clone(), OnError::Stop)
        })
        .unwrap();
        let t = std::time::Instant::now();
        let err = stop.score(&req("p", "r", &[])).unwrap_err().to_string();
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(
            err.contains("hang.py") && err.contains("request 0") && err.contains("0.3 s"),
            "{err}"
        );

        let mut fail = ExternalCommandReward::new(ExternalConfig {
            timeout_s: 0.3,
            failure_reward: -1.0,
            ..cfg(cmd, OnError::FailResponse)
        })
        .unwrap();
        assert_eq!(fail.score(&req("p", "r", &[])).unwrap(), -1.0);
        assert_eq!(fail.failures(), 1);
    }

    /// Runs `f` on a thread; fails the test instead of hanging it when `f` takes over `limit`.
    fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit)
            .unwrap_or_else(|_| panic!("still blocked after {limit:?}"))
    }

    #[test]
    fn a_command_that_never_reads_times_out_in_the_write() {
        // 1 MB of request: far more than a pipe holds, so a blocking write would never return.
        let cmd = vec!["sh".into(), "-c".into(), "sleep 30".into()];
        let err = within(Duration::from_secs(10), move || {
            let mut r = ExternalCommandReward::new(ExternalConfig {
                timeout_s: 0.3,
                ..cfg(cmd, OnError::Stop)
            })
            .unwrap();
            let big = "x".repeat(1 << 20);
            r.score(&req("p", &big, &[])).unwrap_err().to_string()
        });
        assert!(err.contains("no answer within 0.3 s"), "{err}");
    }

    /// True when `pid` is gone or a zombie, waiting up to 5 s for it to go.
    fn gone(pid: u32) -> bool {
        for _ in 0..500 {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return true,
                Ok(s)
                    if s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z') =>
                {
                    return true
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        false
    }

    #[test]
    fn a_timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // A shell wrapper whose child (the sleep) would hold on after the shell is killed.
        let script = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
        let mut r = ExternalCommandReward::new(ExternalConfig {
            timeout_s: 0.5,
            ..cfg(vec!["sh".into(), "-c".into(), script], OnError::Stop)
        })
        .unwrap();
        let err = r.score(&req("p", "r", &[])).unwrap_err().to_string();
        assert!(err.contains("no answer within"), "{err}");
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(gone(pid), "the wrapper's child {pid} still runs");
    }

    #[test]
    fn a_crashing_command_is_reported_or_restarted() {
        let dir = tempfile::tempdir().unwrap();
        // Answers 1 except for the response "crash", on which it dies with exit code 3.
        let cmd = script(
            &dir,
            "crash.py",
            "import sys, json\nfor line in sys.stdin:\n    req = json.loads(line)\n    \
             if req['response'] == 'crash':\n        sys.stderr.write('boom\\n')\n        \
             sys.exit(3)\n    print(json.dumps({'reward': 1.0}), flush=True)\n",
        );
        let mut stop = ExternalCommandReward::new(cfg(cmd.clone(), OnError::Stop)).unwrap();
        assert_eq!(stop.score(&req("p", "fine", &[])).unwrap(), 1.0);
        let err = stop.score(&req("p", "crash", &[])).unwrap_err().to_string();
        assert!(
            err.contains("crash.py")
                && err.contains("request 1")
                && err.contains("exit")
                && err.contains("boom"),
            "{err}"
        );

        let mut fail = ExternalCommandReward::new(cfg(cmd, OnError::FailResponse)).unwrap();
        assert_eq!(fail.score(&req("p", "crash", &[])).unwrap(), 0.0);
        assert_eq!(fail.failures(), 1);
        // Restarted: the next request is answered by a fresh process.
        assert_eq!(fail.score(&req("p", "fine", &[])).unwrap(), 1.0);
        assert_eq!(fail.restarts(), 1);
        assert_eq!(fail.failures(), 1);
    }

    #[test]
    fn garbage_output_is_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = script(
            &dir,
            "garbage.py",
            "import sys\nfor line in sys.stdin:\n    print('hello, the reward is high', flush=True)\n",
        );
        let mut stop = ExternalCommandReward::new(cfg(cmd.clone(), OnError::Stop)).unwrap();
        let err = stop.score(&req("p", "r", &[])).unwrap_err().to_string();
        assert!(
            err.contains("garbage.py")
                && err.contains("request 0")
                && err.contains("hello, the reward is high"),
            "{err}"
        );

        let mut fail = ExternalCommandReward::new(ExternalConfig {
            max_consecutive_failures: 3,
            ..cfg(cmd, OnError::FailResponse)
        })
        .unwrap();
        assert_eq!(fail.score(&req("p", "r", &[])).unwrap(), 0.0);
        assert_eq!(fail.score(&req("p", "r", &[])).unwrap(), 0.0);
        assert_eq!(fail.failures(), 2);
        // Third failure in a row reaches max_consecutive_failures = 3: an error.
        let err = fail.score(&req("p", "r", &[])).unwrap_err().to_string();
        assert!(err.contains("3 failures in a row"), "{err}");
    }

    #[test]
    fn missing_program_and_bad_config_are_errors() {
        let err = ExternalCommandReward::new(ExternalConfig::new(vec![
            "/nonexistent/grove-reward".into(),
        ]))
        .err()
        .unwrap();
        assert!(matches!(err, ExternalError::Spawn { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/grove-reward"));
        let err = ExternalCommandReward::new(ExternalConfig {
            timeout_s: 0.0,
            ..ExternalConfig::new(vec!["python3".into()])
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("timeout_s"), "{err}");
        assert!(ExternalCommandReward::new(ExternalConfig::new(vec![]))
            .err()
            .unwrap()
            .to_string()
            .contains("command"));
    }

    #[test]
    fn closures_are_reward_functions() {
        let mut calls = 0;
        let mut f = |r: &RewardRequest| -> crate::Result<f64> {
            calls += 1;
            Ok(r.response.len() as f64)
        };
        assert_eq!(RewardFn::score(&mut f, &req("", "abc", &[])).unwrap(), 3.0);
        assert_eq!(RewardFn::failures(&f), 0);
        assert_eq!(calls, 1);
    }
}
