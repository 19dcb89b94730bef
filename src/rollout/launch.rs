//! A server grove starts and stops itself (`remote.launch`): the user's `launch_command`
//! with the model folder, the served name and the address added, bound to 127.0.0.1 on the
//! port of `remote.url`. Its output goes to a log file whose end is quoted when it dies or
//! does not come up within `launch_timeout_s`. It runs in its own process group (vLLM forks
//! its engine), stopped as a whole: SIGTERM, then SIGKILL after a grace period.
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::remote::RemoteConfig;
use crate::error::{Error, Result};

/// How long a stopping server gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(10);
/// Lines of the server's log quoted in errors.
const TAIL_LINES: usize = 25;

/// Environment a launched vLLM needs: the weight-reload RPC and runtime adapter loading.
const VLLM_ENV: &[(&str, &str)] = &[
    ("VLLM_SERVER_DEV_MODE", "1"),
    ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True"),
];

/// The port of a `http://127.0.0.1:PORT` (or `localhost`) URL, the only address a launched
/// server may take.
pub fn local_port(url: &str) -> std::result::Result<u16, String> {
    let rest = url.trim().trim_end_matches('/');
    let rest = rest.strip_suffix("/v1").unwrap_or(rest);
    let hostport = rest.strip_prefix("http://").ok_or_else(|| {
        format!("url {url:?}: a launched server is reached by http://127.0.0.1:PORT")
    })?;
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| format!("url {url:?} names no port for the launched server"))?;
    if host != "127.0.0.1" && host != "localhost" {
        return Err(format!(
            "url {url:?}: grove binds a server it launches to 127.0.0.1, so the url's host must \
             be 127.0.0.1 (found {host:?})"
        ));
    }
    port.parse::<u16>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| format!("url {url:?}: port {port:?} is not a number in 1..=65535"))
}

/// The last `n` lines of a file (empty when unreadable).
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A server process grove runs.
pub struct Launched {
    command: Vec<String>,
    /// Arguments grove adds after the model and address (LoRA flags).
    extra: Vec<String>,
    port: u16,
    timeout_s: f64,
    log: PathBuf,
    child: Option<Child>,
}

impl Launched {
    /// Checks the config; starts nothing yet.
    pub fn new(cfg: &RemoteConfig, log: PathBuf, extra: Vec<String>) -> Result<Self> {
        let port = local_port(&cfg.url).map_err(|m| Error::config("remote.url", m))?;
        if cfg.launch_command.is_empty() {
            return Err(Error::config(
                "remote.launch_command",
                "remote.launch needs the command that starts the server, e.g. [\"python\", \
                 \"-m\", \"vllm.entrypoints.openai.api_server\", \"--dtype\", \"float32\"]",
            ));
        }
        Ok(Launched {
            command: cfg.launch_command.clone(),
            extra,
            port,
            timeout_s: cfg.launch_timeout_s,
            log,
            child: None,
        })
    }

    /// The root URL the server answers on.
    pub fn root(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts the server on `model` served as `served` (stopping a running one first) and
    /// waits until `GET /health` answers 200.
    pub fn start(&mut self, model: &Path, served: &str) -> Result<()> {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| Error::io(&self.log, e))?;
        let port = self.port.to_string();
        let args = [
            "--model".to_string(),
            model.display().to_string(),
            "--served-model-name".into(),
            served.into(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port,
        ];
        // The log says which start each part of it belongs to.
        writeln!(
            &log,
            "grove: starting {}",
            [&self.command[..], &args[..], &self.extra[..]]
                .concat()
                .join(" ")
        )
        .map_err(|e| Error::io(&self.log, e))?;
        let log2 = log.try_clone().map_err(|e| Error::io(&self.log, e))?;
        let mut cmd = Command::new(&self.command[0]);
        cmd.args(&self.command[1..])
            .args(args)
            .args(&self.extra)
            .envs(VLLM_ENV.iter().copied())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(|e| {
            Error::config(
                "remote.launch_command",
                format!("cannot start {:?}: {e}", self.command[0]),
            )
        })?;
        self.child = Some(child);
        self.wait_healthy()
    }

    fn wait_healthy(&mut self) -> Result<()> {
        let health = format!("{}/health", self.root());
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .http_status_as_error(false)
            .build()
            .into();
        let t = Instant::now();
        loop {
            if let Some(why) = self.exit_note() {
                return Err(Error::Remote(format!(
                    "{} did not come up at {}: {why}",
                    self.command[0],
                    self.root()
                )));
            }
            if agent.get(&health).call().is_ok_and(|r| r.status() == 200) {
                return Ok(());
            }
            if t.elapsed().as_secs_f64() > self.timeout_s {
                self.stop();
                return Err(Error::Remote(format!(
                    "{} did not answer {health} within remote.launch_timeout_s = {} s; it was \
                     stopped. The end of {}:\n{}",
                    self.command[0],
                    self.timeout_s,
                    self.log.display(),
                    tail(&self.log, TAIL_LINES)
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// When the server has exited: its status and the end of its log.
    pub fn exit_note(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        Some(format!(
            "the server grove launched exited ({status}); the end of {}:\n{}",
            self.log.display(),
            tail(&self.log, TAIL_LINES)
        ))
    }

    /// Stops the server's whole process group: SIGTERM, then SIGKILL after a grace period.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = -(child.id() as i32);
        // SAFETY: kill(2) on the process group this struct started; no memory is touched.
        unsafe {
            libc::kill(group, libc::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < GRACE {
            if matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The group's other processes (vLLM's engine) may outlive its leader.
        unsafe {
            libc::kill(group, libc::SIGKILL);
        }
        let _ = child.wait();
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launched_servers_take_a_local_port() {
        assert_eq!(local_port("http://127.0.0.1:8011"), Ok(8011));
        assert_eq!(local_port("http://localhost:9000/v1/"), Ok(9000));
        assert!(local_port("http://10.0.0.2:8000")
            .unwrap_err()
            .contains("127.0.0.1"));
        assert!(local_port("http://127.0.0.1")
            .unwrap_err()
            .contains("no port"));
        assert!(local_port("http://127.0.0.1:0")
            .unwrap_err()
            .contains("port"));
        assert!(local_port("https://127.0.0.1:8000").is_err());
    }

    /// A command that exits at once: the error quotes its output; one that never answers is
    /// stopped after the timeout.
    #[test]
    fn a_dying_or_silent_server_is_reported_with_its_log() {
        let tmp = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cfg = RemoteConfig::new(format!("http://127.0.0.1:{port}"));
        cfg.launch_command = vec![
            "sh".into(),
            "-c".into(),
            "echo 'no such model' >&2; exit 3".into(),
        ];
        let log = tmp.path().join("server.log");
        let mut l = Launched::new(&cfg, log.clone(), vec![]).unwrap();
        let e = l.start(tmp.path(), "m").unwrap_err().to_string();
        assert!(
            e.contains("exit status: 3") && e.contains("no such model"),
            "{e}"
        );
        cfg.launch_command = vec!["sh".into(), "-c".into(), "sleep 30".into()];
        cfg.launch_timeout_s = 0.5;
        let mut l = Launched::new(&cfg, log, vec![]).unwrap();
        let t = Instant::now();
        let e = l.start(tmp.path(), "m").unwrap_err().to_string();
        assert!(e.contains("launch_timeout_s = 0.5"), "{e}");
        assert!(!l.is_running());
        assert!(t.elapsed() < Duration::from_secs(8), "stopped promptly");
    }
}
