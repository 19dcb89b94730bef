//! Remote rollouts: prompts go to an OpenAI-compatible completions server (vLLM, SGLang,
//! llama.cpp's server, `grove serve`) and come back as the same [`Generation`]s the local engine
//! returns, sampled tokens with their per-token log-probs.
//!
//! One `POST {url}/v1/completions` per prompt asks for `n` samples:
//!
//! ```json
//! {"model": "...", "prompt": [1, 5, 9], "max_tokens": 4, "temperature": 1.0, "top_p": 1.0,
//!  "n": 8, "logprobs": 1, "seed": 12345, "return_tokens_as_token_ids": true}
//! ```
//!
//! and reads `choices[i].logprobs.tokens` / `token_logprobs` and `choices[i].finish_reason`.
//! Token ids come from vLLM's `"token_id:N"` strings when the server sends them; otherwise each
//! token string is looked up in grove's tokenizer vocabulary (exactly, then as byte-level BPE
//! `Ġ…` and SentencePiece `▁…` spellings, then as a `<0xNN>` byte token) and a token that is
//! not there is an error, never a guess.
//!
//! **EOS.** `finish_reason: "stop"` means the response ended with EOS (grove sends no stop
//! strings). vLLM and `grove serve` include the EOS among the returned tokens, with its
//! log-prob; servers that leave it out (llama.cpp) get the EOS id appended with log-prob 0.0,
//! since they never reported it (`append_eos = false` keeps the tokens exactly as sent).
//!
//! **Log-probs.** They are whatever the server computes. `grove serve` reports them exactly as
//! the local engine does (under the tempered distribution, top-p not renormalised). vLLM by
//! default reports log-probs of the raw, untempered model distribution; with a temperature
//! other than 1 the learner's importance ratios then compare different distributions.
//!
//! Failures: connection errors, timeouts, HTTP 429 and 5xx are retried `retries` times with
//! doubling back-off; other HTTP errors, malformed answers and missing log-probs fail at once
//! with a message naming the field.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::Tokenizer;
use crate::rollout::vllm::{self, Pushed};
use crate::rollout::{Generation, SamplingParams};

/// Largest response body read (a completion with many long samples is a few MB).
const MAX_BODY_BYTES: u64 = 256 << 20;
/// Back-off between attempts never exceeds this.
const MAX_BACKOFF_S: f64 = 30.0;

fn default_timeout_s() -> f64 {
    300.0
}
fn default_retries() -> u32 {
    3
}
fn default_backoff_s() -> f64 {
    0.5
}
fn default_launch_timeout_s() -> f64 {
    600.0
}
fn default_concurrency() -> usize {
    8
}
fn yes() -> bool {
    true
}

/// The kind of server behind `[remote]`: it decides how `grove train` pushes its policy there
/// and where an answer's policy version comes from (docs/remote-rollouts.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// `grove serve`: pushes by `POST /admin/load` (`admin_token`); every answer carries
    /// `grove_policy_version`.
    #[default]
    Grove,
    /// vLLM: an adapter by `POST /v1/load_lora_adapter` under a name carrying the version
    /// (answers echo it in `model`); full weights by the `reload_weights` RPC of a server
    /// started with `VLLM_SERVER_DEV_MODE=1` (its success confirms the version: grove has no
    /// request in flight while it pushes).
    Vllm,
}

/// A server grove starts and stops itself (`remote.launch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Launch {
    /// vLLM's OpenAI server (`launch_command`), with the weight-reload RPC and runtime
    /// adapter loading enabled.
    Vllm,
}

/// What a push hands the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Every weight: an HF folder.
    Full,
    /// A LoRA adapter for the weights the server started with: a PEFT folder.
    Adapter,
}

/// Where and how to reach a completions server (`[remote]` in a run config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// Base URL: `http://host:port` (a trailing `/v1` is accepted). `https://` needs grove
    /// built with `--features remote-tls`.
    pub url: String,
    /// Model name sent with each request; empty: the first model `GET /v1/models` lists.
    #[serde(default)]
    pub model: String,
    /// Limit for one request (connect, send, generate and read together), in seconds.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// Retries after a connection error, a timeout, HTTP 429 or a 5xx answer.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Sent as `Authorization: Bearer KEY`.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Pause before the first retry, in seconds; doubled for each further one (at most 30 s).
    #[serde(default = "default_backoff_s")]
    pub backoff_s: f64,
    /// Send prompts as token-id lists (exact: no re-tokenisation on the server). False sends
    /// the prompt's text, without special tokens (the server adds its BOS).
    #[serde(default = "yes")]
    pub prompt_token_ids: bool,
    /// Ask for `"token_id:N"` token strings (vLLM's `return_tokens_as_token_ids`; other servers
    /// ignore the field and the strings are looked up in the vocabulary).
    #[serde(default = "yes")]
    pub return_token_ids: bool,
    /// Ask for the `n` samples of a prompt in `n` requests of one sample each (with different
    /// seeds), for servers that ignore `n`.
    #[serde(default)]
    pub split_n: bool,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Append the EOS id (log-prob 0.0) to a `"stop"`-finished response that lacks it.
    #[serde(default = "yes")]
    pub append_eos: bool,
    /// Bearer token of the server's `POST /admin/load` (`grove serve --admin-token`): with it
    /// `grove train` and `grove explore --weights DIR` push each new policy to the server
    /// (docs/remote-rollouts.md).
    #[serde(default)]
    pub admin_token: Option<String>,
    /// The server's kind: "grove" (`grove serve`) or "vllm"; it decides how `grove train`
    /// pushes its policy and how each answer's policy version is known
    /// (docs/remote-rollouts.md).
    #[serde(default)]
    pub engine: Engine,
    /// Start and stop the server itself: "vllm" runs `launch_command` with `--model FOLDER
    /// --served-model-name NAME --host 127.0.0.1 --port PORT` added (PORT from `url`, which
    /// must be `http://127.0.0.1:PORT`), and starts it again on each new folder when full
    /// weights with tied embeddings are pushed. Unset: the server is run by someone else.
    #[serde(default)]
    pub launch: Option<Launch>,
    /// With `launch`: the program that starts the server and its first arguments, e.g.
    /// `["python", "-m", "vllm.entrypoints.openai.api_server", "--dtype", "float32"]`.
    #[serde(default)]
    pub launch_command: Vec<String>,
    /// With `launch`: seconds a started server has to answer `GET /health`.
    #[serde(default = "default_launch_timeout_s")]
    pub launch_timeout_s: f64,
}

impl RemoteConfig {
    /// Defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> Self {
        RemoteConfig {
            url: url.into(),
            model: String::new(),
            timeout_s: default_timeout_s(),
            retries: default_retries(),
            api_key: None,
            backoff_s: default_backoff_s(),
            prompt_token_ids: true,
            return_token_ids: true,
            split_n: false,
            concurrency: default_concurrency(),
            append_eos: true,
            admin_token: None,
            engine: Engine::Grove,
            launch: None,
            launch_command: vec![],
            launch_timeout_s: default_launch_timeout_s(),
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let u = self.url.trim();
        if u.starts_with("https://") && !cfg!(feature = "remote-tls") {
            return Err(format!(
                "url {u:?}: https needs grove built with `--features remote-tls`"
            ));
        }
        if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() <= "https://".len() {
            return Err(format!(
                "url {u:?} must be http://HOST:PORT (the server's base URL)"
            ));
        }
        if !(self.timeout_s > 0.0 && self.timeout_s.is_finite()) {
            return Err(format!(
                "timeout_s must be a positive number of seconds, found {}",
                self.timeout_s
            ));
        }
        if !(self.backoff_s >= 0.0 && self.backoff_s.is_finite()) {
            return Err(format!("backoff_s must be >= 0, found {}", self.backoff_s));
        }
        if self.concurrency == 0 {
            return Err("concurrency must be positive, found 0".into());
        }
        self.validate_launch()
    }

    fn validate_launch(&self) -> std::result::Result<(), String> {
        let Some(launch) = self.launch else {
            if !self.launch_command.is_empty() {
                return Err(
                    "launch_command is set but launch is not: set launch = \"vllm\" \
                            to have grove start the server"
                        .into(),
                );
            }
            return Ok(());
        };
        if launch == Launch::Vllm && self.engine != Engine::Vllm {
            return Err(format!(
                "launch = \"vllm\" starts a vLLM server: set engine = \"vllm\" too (found \
                 engine = {:?})",
                self.engine
            ));
        }
        if self
            .launch_command
            .first()
            .is_none_or(|p| p.trim().is_empty())
        {
            return Err(
                "launch needs launch_command, the program that starts the server and \
                        its first arguments"
                    .into(),
            );
        }
        if !self.model.is_empty() {
            return Err(format!(
                "model = {:?}: grove names the model of a server it launches; leave model unset",
                self.model
            ));
        }
        if !(self.launch_timeout_s > 0.0 && self.launch_timeout_s.is_finite()) {
            return Err(format!(
                "launch_timeout_s must be a positive number of seconds, found {}",
                self.launch_timeout_s
            ));
        }
        super::launch::local_port(&self.url).map(|_| ())
    }

    /// `…/v1`, from a base URL given with or without it.
    pub fn api_base(&self) -> String {
        let u = self.url.trim().trim_end_matches('/');
        if u.ends_with("/v1") {
            u.to_string()
        } else {
            format!("{u}/v1")
        }
    }
}

/// The seed sent for prompt `prompt` (and sample `sample` with `split_n`) of a batch drawn
/// with `seed`: a SplitMix64 mix, kept below 2³¹ because some servers store seeds in 32 bits.
pub fn request_seed(seed: u64, prompt: usize, sample: Option<usize>) -> u64 {
    let mut z = seed
        ^ (prompt as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ sample
            .map(|s| (s as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED69))
            .unwrap_or(0);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z & 0x7FFF_FFFF
}

/// Generations with the policy version the server reported for them.
pub type Tagged = (Vec<Generation>, Option<u64>);

/// What one HTTP attempt came to.
enum Attempt {
    /// The answer's text (2xx).
    Done(String),
    /// Worth retrying: connection error, timeout, 429, 5xx.
    Retry(String),
    Fail(Error),
}

/// A client for one completions server. Cheap to share across threads.
pub struct RemoteEngine {
    cfg: RemoteConfig,
    base: String,
    agent: ureq::Agent,
    model: Mutex<Option<String>>,
    /// vLLM: the policy the last confirmed push installed (grove serve reports its own).
    pushed: Mutex<Option<Pushed>>,
}

impl RemoteEngine {
    /// Checks the config; contacts nothing yet.
    pub fn new(cfg: RemoteConfig) -> Result<Self> {
        cfg.validate().map_err(|m| Error::config("remote", m))?;
        // One connection per request, no idle pool: a completion request takes seconds, so the
        // TCP connect is noise, and no request goes out on a kept-alive connection the server
        // may be closing or no longer reading (suspected in one stall of tests/train/remote.rs that
        // lasted until the client's timeout; not confirmed).
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs_f64(cfg.timeout_s)))
            .http_status_as_error(false)
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .build()
            .into();
        let model = if cfg.model.is_empty() {
            None
        } else {
            Some(cfg.model.clone())
        };
        Ok(RemoteEngine {
            base: cfg.api_base(),
            cfg,
            agent,
            model: Mutex::new(model),
            pushed: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &RemoteConfig {
        &self.cfg
    }

    /// `GET /v1/models`, as sent.
    pub fn models(&self) -> Result<Value> {
        self.request("/models", None)
    }

    /// The model name requests carry: the configured one, else the first the server lists.
    pub fn model_name(&self) -> Result<String> {
        let mut guard = self.model.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = guard.as_ref() {
            return Ok(m.clone());
        }
        let v = self.models()?;
        let id = v
            .get("data")
            .and_then(|d| d.as_array())
            .and_then(|d| d.first())
            .and_then(|m| m.get("id"))
            .and_then(|i| i.as_str())
            .ok_or_else(|| {
                Error::Remote(format!(
                    "GET {}/models: no `data[0].id` in the answer, so the model name is unknown \
                     (set remote.model): {}",
                    self.base,
                    snippet(&v.to_string())
                ))
            })?
            .to_string();
        *guard = Some(id.clone());
        Ok(id)
    }

    /// The grove policy version `grove serve` reports for the served model
    /// (`grove_policy_version` in `/v1/models`); None for other servers.
    pub fn policy_version(&self) -> Result<Option<u64>> {
        let name = self.model_name()?;
        let v = self.models()?;
        Ok(v.get("data")
            .and_then(|d| d.as_array())
            .and_then(|d| {
                d.iter()
                    .find(|m| m.get("id").and_then(|i| i.as_str()) == Some(name.as_str()))
            })
            .and_then(|m| m.get("grove_policy_version"))
            .and_then(|x| x.as_u64()))
    }

    /// Samples `n` responses for each prompt (token ids, BOS included as the local engine
    /// expects them). Returns prompt 0's `n` samples, then prompt 1's, ...; requests for
    /// different prompts run concurrently. Seeds are [`request_seed`]`(seed, prompt, ...)`.
    pub fn generate(
        &self,
        tok: &Tokenizer,
        prompts: &[Vec<u32>],
        n: usize,
        params: &SamplingParams,
        seed: u64,
    ) -> Result<Vec<Generation>> {
        Ok(self.generate_tagged(tok, prompts, n, params, seed)?.0)
    }

    /// [`RemoteEngine::generate`], with the policy version the server reported in its
    /// answers (`grove_policy_version`; None when it reports none). Answers from different
    /// versions in one batch are an error.
    pub fn generate_tagged(
        &self,
        tok: &Tokenizer,
        prompts: &[Vec<u32>],
        n: usize,
        params: &SamplingParams,
        seed: u64,
    ) -> Result<(Vec<Generation>, Option<u64>)> {
        params.validate().map_err(Error::Model)?;
        if n == 0 || prompts.is_empty() {
            return Ok((vec![], None));
        }
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            return Err(Error::Model(format!(
                "prompt {i} is empty: nothing to condition on"
            )));
        }
        // Resolve the model name once, before the threads start.
        self.model_name()?;
        let jobs: Vec<(usize, Option<usize>)> = if self.cfg.split_n {
            (0..prompts.len())
                .flat_map(|i| (0..n).map(move |j| (i, Some(j))))
                .collect()
        } else {
            (0..prompts.len()).map(|i| (i, None)).collect()
        };
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let slots: Mutex<Vec<Option<Result<Tagged>>>> =
            Mutex::new((0..jobs.len()).map(|_| None).collect());
        let workers = self.cfg.concurrency.min(jobs.len());
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    if failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(i, j)) = jobs.get(k) else { break };
                    let want = if j.is_some() { 1 } else { n };
                    let r = self
                        .complete_tagged(tok, &prompts[i], want, params, request_seed(seed, i, j))
                        .map_err(|e| match e {
                            Error::Remote(m) => Error::Remote(format!("prompt {i}: {m}")),
                            e => e,
                        });
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    slots.lock().unwrap_or_else(|e| e.into_inner())[k] = Some(r);
                });
            }
        });
        let slots = slots.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(prompts.len() * n);
        let mut missing = None;
        let mut versions = std::collections::BTreeSet::new();
        for (k, slot) in slots.into_iter().enumerate() {
            match slot {
                Some(Ok((g, v))) => {
                    out.extend(g);
                    versions.insert(v);
                }
                Some(Err(e)) => return Err(e),
                // Skipped after another request failed; that error is returned above.
                None => missing = missing.or(Some(k)),
            }
        }
        if let Some(k) = missing {
            return Err(Error::Remote(format!("request {k} was not completed")));
        }
        if versions.len() > 1 {
            return Err(Error::Remote(format!(
                "{}: one batch was answered by policy versions {versions:?}: the server's \
                 weights changed while it was sampled",
                self.base
            )));
        }
        Ok((out, versions.into_iter().next().flatten()))
    }

    /// One completions request for `n` samples of one prompt.
    pub fn complete(
        &self,
        tok: &Tokenizer,
        prompt: &[u32],
        n: usize,
        params: &SamplingParams,
        seed: u64,
    ) -> Result<Vec<Generation>> {
        Ok(self.complete_tagged(tok, prompt, n, params, seed)?.0)
    }

    /// [`RemoteEngine::complete`] with the answer's `grove_policy_version`.
    pub fn complete_tagged(
        &self,
        tok: &Tokenizer,
        prompt: &[u32],
        n: usize,
        params: &SamplingParams,
        seed: u64,
    ) -> Result<Tagged> {
        let prompt_value = if self.cfg.prompt_token_ids {
            json!(prompt)
        } else {
            Value::String(tok.decode(prompt)?)
        };
        let model = self.request_model()?;
        let mut body = json!({
            "model": model,
            "prompt": prompt_value,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": n,
            "logprobs": 1,
            "seed": seed,
        });
        if self.cfg.return_token_ids {
            body["return_tokens_as_token_ids"] = Value::Bool(true);
        }
        let resp = self.request("/completions", Some(&body))?;
        let version = self.reported_version(&resp);
        Ok((
            parse_completion(&resp, n, tok, self.cfg.append_eos)?,
            version,
        ))
    }

    /// The model name a completion request carries: the pushed adapter's (vLLM), else
    /// [`RemoteEngine::model_name`].
    fn request_model(&self) -> Result<String> {
        match self.pushed().and_then(|p| p.adapter) {
            Some(name) => Ok(name),
            None => self.model_name(),
        }
    }

    /// The policy version an answer came from: `grove_policy_version` from `grove serve`;
    /// from vLLM, the version in the echoed `model` name, else the last full-weight push.
    fn reported_version(&self, resp: &Value) -> Option<u64> {
        match self.cfg.engine {
            Engine::Grove => resp.get("grove_policy_version").and_then(Value::as_u64),
            Engine::Vllm => vllm::reported_version(
                resp.get("model").and_then(Value::as_str),
                self.pushed().as_ref(),
            ),
        }
    }

    /// After grove (re)started the server: requests name `model`, and `pushed` is what the
    /// server was started with (None: the base of the adapters to come).
    pub fn serve_as(&self, model: String, pushed: Option<Pushed>) {
        *self.model.lock().unwrap_or_else(|e| e.into_inner()) = Some(model);
        *self.pushed.lock().unwrap_or_else(|e| e.into_inner()) = pushed;
    }

    /// The policy the last confirmed push installed (vLLM).
    pub fn pushed(&self) -> Option<Pushed> {
        self.pushed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Has the server serve the policy in `path` (an HF folder, or a PEFT folder when
    /// `payload` is an adapter) as `version`, and checks that it does: `grove serve` loads it
    /// by [`RemoteEngine::push_weights`], vLLM as [`vllm::push`] describes. Retried like any
    /// request.
    pub fn push_policy(
        &self,
        path: &std::path::Path,
        version: u64,
        payload: Payload,
    ) -> Result<()> {
        match self.cfg.engine {
            Engine::Grove => self.push_weights(path, version).map(|_| ()),
            Engine::Vllm => {
                let before = self.pushed();
                let now = vllm::push(self, path, version, payload)?;
                *self.pushed.lock().unwrap_or_else(|e| e.into_inner()) = Some(now.clone());
                // The previous adapter's name is retired, so that nothing can sample it.
                match before.and_then(|b| b.adapter) {
                    Some(old) if Some(&old) != now.adapter.as_ref() => {
                        vllm::unload_adapter(self, &old)
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// POST `body` to `path` under the server's root (not `/v1`), with retries; the answer's
    /// text (vLLM's admin endpoints answer plain text).
    pub(crate) fn post_root(&self, path: &str, body: &Value) -> Result<String> {
        let url = format!("{}{path}", self.root());
        self.request_text(&url, Some(body), None)
    }

    /// The server's root URL: the base without `/v1`.
    pub fn root(&self) -> &str {
        self.base.strip_suffix("/v1").unwrap_or(&self.base)
    }

    /// Has the server load the weights in `path` (a folder or file it can read: full
    /// weights, or a PEFT adapter) as policy `version` (`POST /admin/load` with
    /// `admin_token`, retried like any request), and checks that it then serves `version`.
    /// Returns the server's answer.
    pub fn push_weights(&self, path: &std::path::Path, version: u64) -> Result<Value> {
        let token = self.cfg.admin_token.as_deref().ok_or_else(|| {
            Error::config(
                "remote.admin_token",
                "pushing weights to the server needs the token it was started with \
                 (grove serve --admin-token)",
            )
        })?;
        let url = format!("{}/admin/load", self.root());
        let body = json!({"path": path.display().to_string(), "version": version});
        let v = self.request_url(&url, Some(&body), Some(token))?;
        let served = v.get("grove_policy_version").and_then(Value::as_u64);
        if served != Some(version) {
            return Err(Error::Remote(format!(
                "POST {url}: pushed policy version {version} ({}), but the server reports it \
                 serves version {}",
                path.display(),
                served.map_or("none".to_string(), |s| s.to_string())
            )));
        }
        Ok(v)
    }

    fn backoff(&self, retry: u32) -> Duration {
        let s = self.cfg.backoff_s * 2f64.powi(retry.min(30) as i32);
        Duration::from_secs_f64(s.min(MAX_BACKOFF_S))
    }

    /// GET (no body) or POST (JSON body) `path` under `…/v1`, with retries.
    fn request(&self, path: &str, body: Option<&Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        self.request_url(&url, body, None)
    }

    /// [`RemoteEngine::request`] to a whole URL; `token` replaces the API key.
    fn request_url(&self, url: &str, body: Option<&Value>, token: Option<&str>) -> Result<Value> {
        let method = if body.is_some() { "POST" } else { "GET" };
        let text = self.request_text(url, body, token)?;
        serde_json::from_str(&text).map_err(|e| {
            Error::Remote(format!(
                "{method} {url}: the answer is not JSON ({e}): {}",
                snippet(&text)
            ))
        })
    }

    /// [`RemoteEngine::request_url`], returning the answer's text.
    fn request_text(&self, url: &str, body: Option<&Value>, token: Option<&str>) -> Result<String> {
        let method = if body.is_some() { "POST" } else { "GET" };
        let attempts = self.cfg.retries + 1;
        let mut last = String::new();
        for attempt in 0..attempts {
            if attempt > 0 {
                std::thread::sleep(self.backoff(attempt - 1));
            }
            match self.attempt(url, body, token) {
                Attempt::Done(v) => return Ok(v),
                Attempt::Retry(m) => last = m,
                Attempt::Fail(e) => {
                    return Err(match e {
                        Error::Remote(m) => Error::Remote(format!("{method} {url}: {m}")),
                        e => e,
                    })
                }
            }
        }
        Err(Error::Remote(format!(
            "{method} {url}: no answer after {attempts} attempt(s) ({} retries, {} s timeout each); \
             last error: {last}",
            self.cfg.retries, self.cfg.timeout_s
        )))
    }

    fn attempt(&self, url: &str, body: Option<&Value>, token: Option<&str>) -> Attempt {
        let auth = token
            .or(self.cfg.api_key.as_deref())
            .map(|k| format!("Bearer {k}"));
        let sent = match body {
            Some(b) => {
                let mut r = self
                    .agent
                    .post(url)
                    .header("Content-Type", "application/json");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send(b.to_string())
            }
            None => {
                let mut r = self.agent.get(url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
        };
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => return transport_error(e, self.cfg.timeout_s),
        };
        let status = resp.status().as_u16();
        let text = match resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY_BYTES)
            .read_to_string()
        {
            Ok(t) => t,
            Err(e) => return transport_error(e, self.cfg.timeout_s),
        };
        if status == 429 || status >= 500 {
            return Attempt::Retry(format!("HTTP {status}: {}", error_message(&text)));
        }
        if !(200..300).contains(&status) {
            return Attempt::Fail(Error::Remote(format!(
                "the server rejected the request with HTTP {status}: {}",
                error_message(&text)
            )));
        }
        Attempt::Done(text)
    }
}

fn transport_error(e: ureq::Error, timeout_s: f64) -> Attempt {
    match e {
        ureq::Error::Timeout(t) => Attempt::Retry(format!("timed out after {timeout_s} s ({t})")),
        ureq::Error::BadUri(_) | ureq::Error::RequireHttpsOnly(_) | ureq::Error::TlsRequired => {
            Attempt::Fail(Error::Remote(e.to_string()))
        }
        e => Attempt::Retry(e.to_string()),
    }
}

/// The first 300 characters of a text, for error messages.
fn snippet(text: &str) -> String {
    let t: String = text.chars().take(300).collect();
    if t.len() < text.len() {
        format!("{t}…")
    } else {
        t
    }
}

/// The message of an OpenAI-style (`error.message`), vLLM/FastAPI-style (`message`, `detail`)
/// error body, else the body's start.
fn error_message(text: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        for m in [
            v.pointer("/error/message"),
            v.get("message"),
            v.get("detail"),
            v.get("error"),
        ]
        .into_iter()
        .flatten()
        {
            match m {
                Value::String(s) => return snippet(s),
                Value::Null => {}
                other => return snippet(&other.to_string()),
            }
        }
    }
    snippet(text)
}

/// GPT-2 byte-level BPE's printable stand-in for a byte (`bytes_to_unicode`).
fn byte_level_char(b: u8) -> char {
    let printable = |x: u8| (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || x >= 0xAE;
    if printable(b) {
        return b as char;
    }
    let k = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + k).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// The id of a token string a server sent: `"token_id:N"`, a vocabulary entry, its byte-level
/// BPE or SentencePiece spelling, or a `<0xNN>` byte token.
pub fn token_id(tok: &Tokenizer, s: &str) -> Option<u32> {
    if let Some(n) = s.strip_prefix("token_id:") {
        return n.trim().parse().ok();
    }
    if let Some(id) = tok.token_to_id(s) {
        return Some(id);
    }
    let byte_level: String = s.bytes().map(byte_level_char).collect();
    if let Some(id) = tok.token_to_id(&byte_level) {
        return Some(id);
    }
    if s.contains(' ') {
        if let Some(id) = tok.token_to_id(&s.replace(' ', "\u{2581}")) {
            return Some(id);
        }
    }
    if s.len() == 1 {
        return tok.token_to_id(&format!("<0x{:02X}>", s.as_bytes()[0]));
    }
    None
}

/// The missing-log-probs error, naming the field.
fn no_logprobs(field: &str, state: &str) -> Error {
    Error::Remote(format!(
        "the server returned no log-probs: `{field}` is {state}. grove needs the log-prob of \
         every sampled token (it sends `logprobs: 1`); enable them on the server: vLLM allows \
         them unless started with `--max-logprobs 0`, llama-cpp-python needs `--logits_all true`, \
         `grove serve` always returns them"
    ))
}

/// Reads a completions answer for `n` samples into generations, in `index` order.
pub fn parse_completion(
    resp: &Value,
    n: usize,
    tok: &Tokenizer,
    append_eos: bool,
) -> Result<Vec<Generation>> {
    let bad = |m: String| Error::Remote(m);
    let choices = resp
        .get("choices")
        .and_then(|c| c.as_array())
        .ok_or_else(|| {
            bad(format!(
                "the answer has no `choices` array: {}",
                snippet(&resp.to_string())
            ))
        })?;
    if choices.len() != n {
        return Err(bad(format!(
            "asked for n = {n} samples, the server returned {} choices (if it ignores `n`, \
             set remote.split_n = true)",
            choices.len()
        )));
    }
    let vocab = tok.vocab_size();
    let mut out: Vec<Option<Generation>> = vec![None; n];
    for (k, c) in choices.iter().enumerate() {
        let idx = match c.get("index") {
            None | Some(Value::Null) => k,
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .filter(|&x| x < n)
                .ok_or_else(|| {
                    bad(format!(
                        "`choices[{k}].index` = {v}: expected an integer in 0..{n}"
                    ))
                })?,
        };
        if out[idx].is_some() {
            return Err(bad(format!("`choices[{k}].index` = {idx} appears twice")));
        }
        let lp = match c.get("logprobs") {
            None => return Err(no_logprobs(&format!("choices[{k}].logprobs"), "missing")),
            Some(Value::Null) => {
                return Err(no_logprobs(&format!("choices[{k}].logprobs"), "null"))
            }
            Some(v) => v,
        };
        let field = |name: &str| -> Result<&Vec<Value>> {
            match lp.get(name) {
                Some(Value::Array(a)) => Ok(a),
                None => Err(no_logprobs(
                    &format!("choices[{k}].logprobs.{name}"),
                    "missing",
                )),
                Some(Value::Null) => Err(no_logprobs(
                    &format!("choices[{k}].logprobs.{name}"),
                    "null",
                )),
                Some(v) => Err(bad(format!(
                    "`choices[{k}].logprobs.{name}` is {v}, expected an array"
                ))),
            }
        };
        let strs = field("tokens")?;
        let lps = field("token_logprobs")?;
        if strs.len() != lps.len() {
            return Err(bad(format!(
                "`choices[{k}].logprobs`: {} tokens but {} token_logprobs",
                strs.len(),
                lps.len()
            )));
        }
        let mut tokens = Vec::with_capacity(strs.len() + 1);
        let mut logprobs = Vec::with_capacity(strs.len() + 1);
        for (t, (s, l)) in strs.iter().zip(lps).enumerate() {
            let s = s.as_str().ok_or_else(|| {
                bad(format!(
                    "`choices[{k}].logprobs.tokens[{t}]` is {s}, expected a string"
                ))
            })?;
            let id = token_id(tok, s).ok_or_else(|| {
                let hint = if s.is_empty() {
                    " (servers that drop partial UTF-8 send byte tokens such as <0xE5> as \"\")"
                } else {
                    ""
                };
                bad(format!(
                    "`choices[{k}].logprobs.tokens[{t}]` = {s:?} is not in grove's tokenizer \
                     vocabulary ({vocab} entries){hint}: serve a model with the same tokenizer, \
                     or use a server that returns token ids (vLLM: return_tokens_as_token_ids)"
                ))
            })?;
            if id as usize >= vocab {
                return Err(bad(format!(
                    "`choices[{k}].logprobs.tokens[{t}]` is token id {id}, outside grove's \
                     vocabulary of {vocab}: does the server serve the same model?"
                )));
            }
            let l = l.as_f64().ok_or_else(|| {
                bad(format!(
                    "`choices[{k}].logprobs.token_logprobs[{t}]` is {l}, expected a number"
                ))
            })?;
            tokens.push(id);
            logprobs.push(l as f32);
        }
        let finished = match c.get("finish_reason").and_then(|f| f.as_str()) {
            Some("stop") => true,
            Some("length") => false,
            _ => {
                return Err(bad(format!(
                    "`choices[{k}].finish_reason` is {}, expected \"stop\" or \"length\"",
                    c.get("finish_reason").unwrap_or(&Value::Null)
                )))
            }
        };
        let ends_with_eos = tokens.last() == Some(&tok.eos);
        if finished && !ends_with_eos && append_eos {
            tokens.push(tok.eos);
            logprobs.push(0.0);
        }
        out[idx] = Some(Generation {
            tokens,
            logprobs,
            finished: finished || ends_with_eos,
        });
    }
    // Every index in 0..n was filled exactly once (n distinct values checked above).
    Ok(out.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        Tokenizer::builtin_arithmetic()
    }

    #[test]
    fn parses_token_ids_and_strings_and_appends_missing_eos() {
        let t = tok();
        // Built-in ids: <pad> 0, <bos> 1, <eos> 2, <unk> 3, '0' 4, '1' 5, ...
        let resp = json!({"choices": [
            {"index": 1, "finish_reason": "stop",
             "logprobs": {"tokens": ["1", "2"], "token_logprobs": [-0.5, -0.25]}},
            {"index": 0, "finish_reason": "length",
             "logprobs": {"tokens": ["token_id:4", "token_id:5"], "token_logprobs": [-1.0, -2.0]}},
        ]});
        let g = parse_completion(&resp, 2, &t, true).unwrap();
        assert_eq!(g[0].tokens, vec![4, 5]);
        assert_eq!(g[0].logprobs, vec![-1.0, -2.0]);
        assert!(!g[0].finished);
        assert_eq!(g[1].tokens, vec![5, 6, 2], "EOS appended");
        assert_eq!(g[1].logprobs, vec![-0.5, -0.25, 0.0]);
        assert!(g[1].finished);
        let g = parse_completion(&resp, 2, &t, false).unwrap();
        assert_eq!(g[1].tokens, vec![5, 6], "kept as sent");
        // An EOS the server did send is not doubled.
        let resp = json!({"choices": [{"finish_reason": "stop",
            "logprobs": {"tokens": ["7", "<eos>"], "token_logprobs": [-0.1, -0.2]}}]});
        let g = parse_completion(&resp, 1, &t, true).unwrap();
        assert_eq!(g[0].tokens, vec![11, 2]);
        assert_eq!(g[0].logprobs, vec![-0.1, -0.2]);
    }

    #[test]
    fn missing_logprobs_name_the_field() {
        let t = tok();
        let resp = json!({"choices": [{"index": 0, "text": "12", "logprobs": null,
                                      "finish_reason": "length"}]});
        let e = parse_completion(&resp, 1, &t, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`choices[0].logprobs` is null"), "{e}");
        assert!(e.contains("--logits_all"), "{e}");
        let resp = json!({"choices": [{"logprobs": {"tokens": ["1"]}, "finish_reason": "length"}]});
        let e = parse_completion(&resp, 1, &t, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`choices[0].logprobs.token_logprobs` is missing"),
            "{e}"
        );
    }

    #[test]
    fn unknown_tokens_and_wrong_counts_are_errors() {
        let t = tok();
        let resp = json!({"choices": [{"finish_reason": "length",
            "logprobs": {"tokens": ["x"], "token_logprobs": [-1.0]}}]});
        let e = parse_completion(&resp, 1, &t, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`choices[0].logprobs.tokens[0]` = \"x\" is not in grove's tokenizer"),
            "{e}"
        );
        let resp = json!({"choices": [{"finish_reason": "length",
            "logprobs": {"tokens": ["1", ""], "token_logprobs": [-1.0, -2.0]}}]});
        let e = parse_completion(&resp, 1, &t, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`choices[0].logprobs.tokens[1]` = \"\"") && e.contains("<0xE5>"),
            "{e}"
        );
        let resp = json!({"choices": [{"finish_reason": "length",
            "logprobs": {"tokens": ["token_id:99"], "token_logprobs": [-1.0]}}]});
        let e = parse_completion(&resp, 1, &t, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("token id 99, outside grove's vocabulary of 19"),
            "{e}"
        );
        let resp = json!({"choices": []});
        let e = parse_completion(&resp, 2, &t, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("n = 2") && e.contains("split_n"), "{e}");
    }

    #[test]
    fn byte_level_and_sentencepiece_spellings() {
        // bytes_to_unicode: ' ' (0x20) is the 33rd non-printable byte → U+0120 'Ġ'; '\n' → 'Ċ'.
        assert_eq!(byte_level_char(b' '), '\u{120}');
        assert_eq!(byte_level_char(b'\n'), '\u{10A}');
        assert_eq!(byte_level_char(b'a'), 'a');
        assert_eq!(byte_level_char(0xAD), '\u{143}');
        let gpt2 = Tokenizer::from_file(
            std::path::Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../shared/data/tokenizers/gpt2/tokenizer.json"
            )),
            None,
            "<|endoftext|>",
            None,
        )
        .unwrap();
        // " the" is GPT-2 token 262 ("Ġthe").
        assert_eq!(token_id(&gpt2, " the"), Some(262));
        assert_eq!(token_id(&gpt2, "token_id:7"), Some(7));
        assert_eq!(token_id(&gpt2, "<|endoftext|>"), Some(50256));
    }

    #[test]
    fn request_seeds_differ_and_fit_31_bits() {
        let mut seen = std::collections::HashSet::new();
        for p in 0..50 {
            for s in [None, Some(0), Some(1)] {
                let r = request_seed(7, p, s);
                assert!(r < 1 << 31);
                assert!(seen.insert(r), "seed collision at prompt {p} sample {s:?}");
            }
        }
        assert_eq!(request_seed(7, 3, None), request_seed(7, 3, None));
    }

    #[test]
    fn config_rejects_bad_values_and_unknown_fields() {
        assert!(RemoteConfig::new("http://127.0.0.1:8000")
            .validate()
            .is_ok());
        assert!(RemoteConfig::new("localhost:8000").validate().is_err());
        let https = RemoteConfig::new("https://h:1").validate();
        if cfg!(feature = "remote-tls") {
            assert!(https.is_ok());
        } else {
            assert!(https.unwrap_err().contains("--features remote-tls"));
        }
        let mut c = RemoteConfig::new("http://h:1");
        c.timeout_s = 0.0;
        assert!(c.validate().unwrap_err().contains("timeout_s"));
        assert_eq!(
            RemoteConfig::new("http://h:1/v1/").api_base(),
            "http://h:1/v1"
        );
        assert_eq!(RemoteConfig::new("http://h:1").api_base(), "http://h:1/v1");
        let e = toml::from_str::<RemoteConfig>("url = \"http://h:1\"\nretry = 2\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `retry`"), "{e}");
        let c: RemoteConfig = toml::from_str("url = \"http://h:1\"\nretries = 5\n").unwrap();
        assert_eq!(c.retries, 5);
        assert_eq!(c.timeout_s, 300.0);
    }
}
