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
//! The command runs under the one child-process supervisor (`compute::process`): `timeout_s`
//! covers the whole exchange (a command that never reads its input times out like one that
//! never answers), and a timeout or shutdown kills its whole process group, so the children of
//! a `sh -c` wrapper do not outlive it.
use std::time::{Duration, Instant};

use crate::compute::process::{quote, Failure, LineProcess, SpawnError};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Default per-request timeout, seconds.
pub const DEFAULT_TIMEOUT_S: f64 = 30.0;
/// Default number of failures in a row after which `fail-response` gives up.
pub const DEFAULT_MAX_CONSECUTIVE_FAILURES: u64 = 20;

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

/// A reward computed by a long-running external command (see the module docs).
pub struct ExternalCommandReward {
    cfg: ExternalConfig,
    display: String,
    running: Option<LineProcess>,
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

    fn spawn(&self) -> Result<LineProcess, ExternalError> {
        LineProcess::start(&self.cfg.command).map_err(|e| ExternalError::Spawn {
            command: self.display.clone(),
            msg: match e {
                SpawnError::EmptyCommand => "empty command".into(),
                SpawnError::Start(e) => e.to_string(),
            },
        })
    }

    /// One request/answer exchange on the running command.
    fn exchange(&mut self, index: u64, req: &RewardRequest) -> Result<f64, ExternalError> {
        if self.running.is_none() {
            self.running = Some(self.spawn()?);
            self.restarts += 1;
        }
        let running = self.running.as_mut().expect("started above");
        let line = serde_json::to_string(req).map_err(|e| ExternalError::Config {
            command: self.display.clone(),
            msg: format!("request {index} cannot be encoded as JSON: {e}"),
        })?;
        let deadline = Instant::now() + Duration::from_secs_f64(self.cfg.timeout_s);
        match running.exchange_line(line, deadline) {
            Ok(text) => parse_reward(&text).ok_or_else(|| ExternalError::Malformed {
                command: self.display.clone(),
                index,
                line: quote(&text),
            }),
            Err(Failure::Timeout) => Err(ExternalError::Timeout {
                command: self.display.clone(),
                index,
                timeout_s: self.cfg.timeout_s,
            }),
            Err(Failure::Exited { status, stderr }) => Err(ExternalError::Crashed {
                command: self.display.clone(),
                index,
                status,
                stderr,
            }),
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
                // The command's state is unknown after any failure: stop it (dropping it
                // kills its group); under fail-response the next request starts a fresh one.
                self.running = None;
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
        let (tx, rx) = std::sync::mpsc::channel();
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
