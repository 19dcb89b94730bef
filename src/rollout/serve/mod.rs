//! `grove serve`: grove's own engine behind the OpenAI-compatible completions endpoint that
//! [`super::remote`] reads, so one machine can sample rollouts for explorers elsewhere.
//!
//! Endpoints:
//! - `POST /v1/completions`: `prompt` (a string, a list of strings, a list of token ids or a list
//!   of token-id lists), `max_tokens` (16), `temperature` (1), `top_p` (1), `n` (1), `logprobs`
//!   (null: none; an integer: the sampled tokens' log-probs, `top_logprobs` is not computed
//!   and is null), `seed`, `return_tokens_as_token_ids` (false: tokens are vocabulary strings).
//!   All prompts × `n` samples are decoded as one batch by [`crate::rollout::generate`] with a
//!   KV cache; choice `i·n + j` is sample `j` of prompt `i`. Text prompts are encoded with the
//!   BOS prepended, as `grove train` does; token-id prompts are used as given. A response that
//!   ends with EOS keeps it among its tokens (with its log-prob) and has `finish_reason` "stop";
//!   its `text` leaves it out. With a `seed` the answer is a function of the request alone.
//!   `stream`, `echo`, `stop`, `suffix`, `logit_bias` and penalties are refused with HTTP 400;
//!   other unknown fields are ignored, as OpenAI-compatible servers do.
//!   The answer also carries `weights_version` and `grove_policy_version` (below) of the
//!   weights that produced it.
//! - `GET /v1/models`: the served model, with `max_model_len`, `weights_version` (0 at start,
//!   +1 per load) and, when known, `grove_policy_version` (a grove checkpoint's `state.json`
//!   version, or the version a load named).
//! - `GET /metrics`: the batch counters (`forward_passes`, `decode_steps`, `requests`,
//!   `tokens`, `max_batch_rows`, `refused`, ...), the queue length and the served versions.
//! - `POST /admin/load` (bearer token `--admin-token`; off without one): new weights from a
//!   folder ([`admin`]); requests already in the batch finish on the old weights.
//! - `GET /health`: 200.
//!
//! Requests are decoded by continuous batching ([`batcher`]): one scheduler thread owns the
//! weights and one KV cache, requests join the running batch at the next decode step and
//! leave when done; at most `--max-queue` requests wait, more are answered 503 with
//! `Retry-After`. The transport ([`http`]) gives every request a deadline, checks sizes and
//! the keys before reading a body, and answers from a bounded pool of connection workers, so
//! that one slow or hostile client cannot hold the others (docs/reliability.md).
pub mod admin;
pub mod batcher;
pub mod http;
pub mod served;
pub mod throughput;

use std::io::Write;
use std::net::{IpAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::{Config, Tokenizer};
use crate::rollout::SamplingParams;
pub use served::{checkpoint_version, ServedModel};

/// Requests with more samples than this (prompts × n) are refused.
pub const MAX_BATCH: usize = 4096;
/// Request bodies larger than this are refused (before any of it is read).
pub const MAX_BODY_BYTES: usize = 64 << 20;
/// Default deadline for receiving one request (headers and body), seconds.
pub const DEFAULT_REQUEST_TIMEOUT_S: f64 = 30.0;
/// Default number of connections handled at the same time (each waits for its answer from
/// the batch, so they are cheap).
pub const DEFAULT_WORKERS: usize = 128;
/// Default number of sequences decoded together.
pub const DEFAULT_MAX_BATCH: usize = 256;
/// Default number of requests waiting for the batch before new ones are answered 503.
pub const DEFAULT_MAX_QUEUE: usize = 256;
/// The environment variable read for the API key when `--api-key` is not given.
pub const API_KEY_ENV: &str = "GROVE_API_KEY";
/// The environment variable read for the admin token when `--admin-token` is not given.
pub const ADMIN_TOKEN_ENV: &str = "GROVE_ADMIN_TOKEN";
/// The endpoints, (method, path): the 404 answer lists them.
const ENDPOINTS: &[(&str, &str)] = &[
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/metrics"),
    ("POST", "/admin/load"),
    ("GET", "/health"),
];

/// The batch's bounds.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Sequences decoded together at most (a larger request runs alone).
    pub max_batch: usize,
    /// Requests waiting for the batch at most; more are answered 503 with `Retry-After`.
    pub max_queue: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_batch: DEFAULT_MAX_BATCH,
            max_queue: DEFAULT_MAX_QUEUE,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    /// 0: any free port (the first stdout line says which).
    pub port: u16,
    /// The model name clients send; default: MODEL as given on the command line.
    pub name: Option<String>,
    /// No per-request log lines on stderr.
    pub quiet: bool,
    /// Clients must send `Authorization: Bearer KEY`; required for a non-loopback host.
    pub api_key: Option<String>,
    /// Deadline for receiving one request, seconds.
    pub request_timeout_s: f64,
    /// Connections handled at the same time.
    pub workers: usize,
    pub batch: BatchOptions,
    /// `POST /admin/load` needs `Authorization: Bearer TOKEN`; None: admin endpoints are off.
    pub admin_token: Option<String>,
}

impl ServeOptions {
    /// `--api-key`, else the [`API_KEY_ENV`] environment variable; an empty key is none.
    pub fn with_env_api_key(mut self) -> Self {
        if self.api_key.is_none() {
            self.api_key = std::env::var(API_KEY_ENV).ok();
        }
        self.api_key = self.api_key.filter(|k| !k.is_empty());
        if self.admin_token.is_none() {
            self.admin_token = std::env::var(ADMIN_TOKEN_ENV).ok();
        }
        self.admin_token = self.admin_token.filter(|k| !k.is_empty());
        self
    }

    /// Refuses settings that would expose the model or hang: a non-loopback host without an
    /// API key, a timeout that is not a positive number, zero workers.
    pub fn validate(&self) -> Result<()> {
        if !(self.request_timeout_s.is_finite() && self.request_timeout_s > 0.0) {
            return Err(Error::config(
                "grove serve",
                format!(
                    "--request-timeout-s must be a positive number of seconds, found {}",
                    self.request_timeout_s
                ),
            ));
        }
        if self.workers == 0 || self.workers > 1024 {
            return Err(Error::config(
                "grove serve",
                format!("--workers must be in 1..=1024, found {}", self.workers),
            ));
        }
        if self.batch.max_batch == 0 || self.batch.max_batch > MAX_BATCH {
            return Err(Error::config(
                "grove serve",
                format!(
                    "--max-batch must be in 1..={MAX_BATCH}, found {}",
                    self.batch.max_batch
                ),
            ));
        }
        if self.batch.max_queue == 0 {
            return Err(Error::config(
                "grove serve",
                "--max-queue must be positive, found 0",
            ));
        }
        if self.api_key.is_none() && !is_loopback_host(&self.host) {
            return Err(Error::config(
                "grove serve",
                format!(
                    "--host {} is reachable from other machines, so an API key is required: \
                 pass --api-key KEY or set {API_KEY_ENV} (clients send `Authorization: Bearer \
                 KEY`), or bind 127.0.0.1",
                    self.host
                ),
            ));
        }
        Ok(())
    }
}

/// True when every address `host` resolves to is a loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    match (host, 0u16).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 8000,
            name: None,
            quiet: false,
            api_key: None,
            request_timeout_s: DEFAULT_REQUEST_TIMEOUT_S,
            workers: DEFAULT_WORKERS,
            batch: BatchOptions::default(),
            admin_token: None,
        }
    }
}

/// An error answer: HTTP status, message and the request field it concerns.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    fn field(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            param: Some(param.to_string()),
        }
    }
    fn status(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
        }
    }
    /// OpenAI's error body.
    pub fn to_json(&self) -> Value {
        let kind = match self.status {
            400 => "invalid_request_error",
            404 => "not_found_error",
            _ => "server_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param,
                         "code": self.status}})
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// A validated completions request.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub prompts: Vec<Vec<u32>>,
    pub params: SamplingParams,
    pub n: usize,
    pub logprobs: bool,
    pub seed: Option<u64>,
    pub token_ids: bool,
}

/// The request handler, without the HTTP transport (tested directly). Completions go to the
/// batch scheduler ([`batcher`]), which owns the weights.
pub struct Handler {
    pub name: String,
    pub tok: Tokenizer,
    /// The served model's shape (fixed: a load must keep the vocabulary and context length).
    pub cfg: Config,
    /// The folder the server started from (the base of adapter loads).
    pub dir: Option<PathBuf>,
    pub scheduler: Arc<batcher::Scheduler>,
    /// Draws the seeds of requests that give none.
    rng: Mutex<ChaCha8Rng>,
    counter: AtomicU64,
    created: u64,
    /// UTF-8 bytes of the longest vocabulary entry: a text of B bytes encodes to at least
    /// B / this many tokens, which bounds its length before it is tokenized.
    max_token_bytes: usize,
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.scheduler.close();
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn opt<'a>(req: &'a Value, key: &str) -> Option<&'a Value> {
    req.get(key).filter(|v| !v.is_null())
}

fn get_uint(req: &Value, key: &str, default: u64, min: u64, max: u64) -> ApiResult<u64> {
    match opt(req, key) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|x| (min..=max).contains(x))
            .ok_or_else(|| {
                let range = if max >= u32::MAX as u64 {
                    format!("an integer >= {min}")
                } else {
                    format!("an integer in {min}..={max}")
                };
                ApiError::field(key, format!("field `{key}` must be {range}, found {v}"))
            }),
    }
}

fn get_f64(req: &Value, key: &str, default: f64) -> ApiResult<f64> {
    match opt(req, key) {
        None => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| {
            ApiError::field(key, format!("field `{key}` must be a number, found {v}"))
        }),
    }
}

fn get_bool(req: &Value, key: &str) -> ApiResult<bool> {
    match opt(req, key) {
        None => Ok(false),
        Some(v) => v.as_bool().ok_or_else(|| {
            ApiError::field(
                key,
                format!("field `{key}` must be true or false, found {v}"),
            )
        }),
    }
}

impl Handler {
    /// The handler for `served`, with its scheduler thread started.
    pub fn new(served: ServedModel, limits: BatchOptions) -> Result<Self> {
        let max_token_bytes = (0..served.tok.vocab_size() as u32)
            .filter_map(|t| served.tok.id_to_token(t))
            .map(|s| s.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let weights = batcher::Weights {
            version: batcher::VersionTag {
                weights_version: 0,
                policy_version: served.version,
            },
            source: served
                .dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| served.name.clone()),
            model: served.model,
        };
        let cfg = weights.model.cfg.clone();
        let scheduler = batcher::Scheduler::new(
            weights,
            batcher::BatchLimits {
                max_queue: limits.max_queue,
                max_rows: limits.max_batch,
                eos: served.tok.eos,
                pad: served.tok.pad,
            },
        );
        scheduler
            .spawn()
            .map_err(|e| Error::Remote(format!("cannot start the batch scheduler: {e}")))?;
        Ok(Handler {
            name: served.name,
            tok: served.tok,
            cfg,
            dir: served.dir,
            scheduler,
            rng: Mutex::new(ChaCha8Rng::from_entropy()),
            counter: AtomicU64::new(0),
            created: unix_now(),
            max_token_bytes,
        })
    }

    /// Answers one HTTP request: (status, JSON body).
    pub fn handle(&self, method: &str, url: &str, body: &[u8]) -> (u16, Value) {
        let path = url.split('?').next().unwrap_or("");
        let path = path.trim_end_matches('/');
        let r = match (method, path) {
            ("POST", "/v1/completions") => self.completions(body),
            ("GET", "/v1/models") => Ok(self.models()),
            ("GET", "/health") => Ok(json!({"status": "ok"})),
            ("GET", "/metrics") => Ok(self.metrics()),
            ("POST", "/admin/load") => admin::load(self, body),
            (_, p) if ENDPOINTS.iter().any(|(_, e)| *e == p) => Err(ApiError::status(
                405,
                format!("method {method} is not allowed on {path}"),
            )),
            _ => Err(ApiError::status(
                404,
                format!(
                    "no endpoint {path}: grove serve answers {}",
                    ENDPOINTS
                        .iter()
                        .map(|(m, e)| format!("{m} {e}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        };
        match r {
            Ok(v) => (200, v),
            Err(e) => (e.status, e.to_json()),
        }
    }

    /// `GET /metrics`: the batch counters, the queue and the served version.
    pub fn metrics(&self) -> Value {
        let mut m = self.scheduler.counters.to_json();
        m["queued"] = json!(self.scheduler.queued());
        let v = self.scheduler.current().version;
        m["weights_version"] = json!(v.weights_version);
        m["grove_policy_version"] = json!(v.policy_version);
        m
    }

    pub fn models(&self) -> Value {
        let version = self.scheduler.current().version;
        let mut m = json!({
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "grove",
            "max_model_len": self.cfg.max_positions(),
        });
        if let Some(v) = version.policy_version {
            m["grove_policy_version"] = json!(v);
        }
        m["weights_version"] = json!(version.weights_version);
        json!({"object": "list", "data": [m]})
    }

    fn encode_text(&self, text: &str, field: &str) -> ApiResult<Vec<u32>> {
        let tok = &self.tok;
        // Refused before tokenizing: a long text would hold this worker for nothing.
        let max_pos = self.cfg.max_positions();
        let fewest = text.len() / self.max_token_bytes;
        if fewest >= max_pos {
            return Err(ApiError::field(
                field,
                format!(
                    "`{field}` has {} bytes, so at least {fewest} tokens (the longest \
                     vocabulary entry has {} bytes): over the model's {max_pos} positions",
                    text.len(),
                    self.max_token_bytes
                ),
            ));
        }
        let mut ids: Vec<u32> = tok.bos.into_iter().collect();
        ids.extend(
            tok.encode(text)
                .map_err(|e| ApiError::field(field, format!("`{field}`: {e}")))?,
        );
        if ids.is_empty() {
            return Err(ApiError::field(
                field,
                format!("`{field}` encodes to no tokens"),
            ));
        }
        Ok(ids)
    }

    fn ids(&self, v: &[Value], field: &str) -> ApiResult<Vec<u32>> {
        let vocab = self.cfg.vocab_size;
        if v.is_empty() {
            return Err(ApiError::field(
                "prompt",
                format!("`{field}` is an empty token list"),
            ));
        }
        v.iter()
            .enumerate()
            .map(|(j, x)| {
                x.as_u64()
                    .filter(|&t| (t as usize) < vocab)
                    .map(|t| t as u32)
                    .ok_or_else(|| {
                        ApiError::field(
                            "prompt",
                            format!(
                                "`{field}[{j}]` = {x} is not a token id (an integer below the \
                                 vocabulary size {vocab})"
                            ),
                        )
                    })
            })
            .collect()
    }

    fn prompts(&self, v: Option<&Value>) -> ApiResult<Vec<Vec<u32>>> {
        const SHAPE: &str = "a string, a list of strings, a list of token ids or a list of \
                             token-id lists";
        let v = v.ok_or_else(|| ApiError::field("prompt", "field `prompt` is required"))?;
        match v {
            Value::String(s) => Ok(vec![self.encode_text(s, "prompt")?]),
            Value::Array(a) if a.is_empty() => {
                Err(ApiError::field("prompt", "field `prompt` is an empty list"))
            }
            Value::Array(a) if a.iter().all(|x| x.is_number()) => Ok(vec![self.ids(a, "prompt")?]),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    let f = format!("prompt[{i}]");
                    match x {
                        Value::String(s) => self.encode_text(s, &f),
                        Value::Array(ids) => self.ids(ids, &f),
                        other => Err(ApiError::field(
                            "prompt",
                            format!("`{f}` is {other}; `prompt` must be {SHAPE}"),
                        )),
                    }
                })
                .collect(),
            other => Err(ApiError::field(
                "prompt",
                format!("field `prompt` is {other}; it must be {SHAPE}"),
            )),
        }
    }

    /// Validates a completions request body.
    pub fn parse_request(&self, body: &[u8]) -> ApiResult<CompletionRequest> {
        let req: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::status(400, format!("the request body is not valid JSON: {e}"))
        })?;
        if !req.is_object() {
            return Err(ApiError::status(
                400,
                format!("the request body must be a JSON object, found {req}"),
            ));
        }
        if let Some(m) = opt(&req, "model") {
            if m.as_str() != Some(self.name.as_str()) {
                return Err(ApiError {
                    status: 404,
                    message: format!(
                        "model {m} is not served here; this server serves {:?}",
                        self.name
                    ),
                    param: Some("model".into()),
                });
            }
        }
        for key in ["stream", "echo"] {
            if get_bool(&req, key)? {
                return Err(ApiError::field(
                    key,
                    format!("field `{key}`: true is not supported by grove serve"),
                ));
            }
        }
        let unsupported = |key: &str, empty: bool| -> ApiResult<()> {
            if !empty {
                return Err(ApiError::field(
                    key,
                    format!("field `{key}` is not supported by grove serve"),
                ));
            }
            Ok(())
        };
        if let Some(s) = opt(&req, "stop") {
            unsupported("stop", s.as_array().map(|a| a.is_empty()).unwrap_or(false))?;
        }
        if let Some(s) = opt(&req, "suffix") {
            unsupported("suffix", s.as_str() == Some(""))?;
        }
        if let Some(b) = opt(&req, "logit_bias") {
            unsupported(
                "logit_bias",
                b.as_object().map(|o| o.is_empty()).unwrap_or(false),
            )?;
        }
        for key in ["presence_penalty", "frequency_penalty"] {
            unsupported(key, get_f64(&req, key, 0.0)? == 0.0)?;
        }
        let prompts = self.prompts(req.get("prompt"))?;
        let max_pos = self.cfg.max_positions() as u64;
        let max_tokens = get_uint(&req, "max_tokens", 16, 1, u32::MAX as u64)? as usize;
        let temperature = get_f64(&req, "temperature", 1.0)?;
        let top_p = get_f64(&req, "top_p", 1.0)?;
        let n = get_uint(&req, "n", 1, 1, MAX_BATCH as u64)? as usize;
        if let Some(b) = opt(&req, "best_of") {
            if b.as_u64() != Some(n as u64) {
                return Err(ApiError::field(
                    "best_of",
                    format!("field `best_of` = {b}: only best_of = n ({n}) is supported"),
                ));
            }
        }
        let logprobs = match opt(&req, "logprobs") {
            None => false,
            Some(v) => {
                get_uint(&req, "logprobs", 0, 0, 20)?;
                v.as_u64().is_some()
            }
        };
        let seed = match opt(&req, "seed") {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                ApiError::field(
                    "seed",
                    format!("field `seed` must be a non-negative integer, found {v}"),
                )
            })?),
        };
        let token_ids = get_bool(&req, "return_tokens_as_token_ids")?;
        let params = SamplingParams {
            temperature,
            top_p,
            max_new_tokens: max_tokens,
        };
        if let Err(m) = params.validate() {
            let field = if m.starts_with("temperature") {
                "temperature"
            } else {
                "top_p"
            };
            return Err(ApiError::field(field, format!("field `{field}`: {m}")));
        }
        if prompts.len() * n > MAX_BATCH {
            return Err(ApiError::field(
                "n",
                format!(
                    "{} prompts × n = {n} is more than {MAX_BATCH} samples in one request",
                    prompts.len()
                ),
            ));
        }
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        if longest as u64 + max_tokens as u64 > max_pos {
            return Err(ApiError::field(
                "max_tokens",
                format!(
                    "field `max_tokens` = {max_tokens} plus the longest prompt's {longest} tokens \
                     exceeds the model's {max_pos} positions"
                ),
            ));
        }
        Ok(CompletionRequest {
            prompts,
            params,
            n,
            logprobs,
            seed,
            token_ids,
        })
    }

    fn completions(&self, body: &[u8]) -> ApiResult<Value> {
        let req = self.parse_request(body)?;
        let seed = match req.seed {
            Some(s) => s,
            None => {
                let mut rng = self
                    .rng
                    .lock()
                    .map_err(|_| ApiError::status(500, "seed generator poisoned"))?;
                rand::Rng::gen(&mut *rng)
            }
        };
        // Every prompt repeated n times, prompt-major, from one generator: the answer is what
        // `LocalEngine::generate_n` gives for the request alone.
        let repeated: Vec<Vec<u32>> = req
            .prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), req.n))
            .collect();
        let rx = self
            .scheduler
            .submit(
                repeated,
                req.params.clone(),
                ChaCha8Rng::seed_from_u64(seed),
            )
            .map_err(|r| match r {
                batcher::Refused::Invalid(m) => ApiError::status(400, m),
                other => ApiError::status(503, other.to_string()),
            })?;
        let outcome = rx
            .recv()
            .map_err(|_| ApiError::status(500, "the batch scheduler stopped"))?;
        let version = outcome.version;
        let gens = outcome.result.map_err(|m| ApiError::status(500, m))?;
        let tok = &self.tok;
        let mut choices = Vec::with_capacity(gens.len());
        let mut completion_tokens = 0;
        for (index, g) in gens.iter().enumerate() {
            completion_tokens += g.tokens.len();
            let text = tok
                .decode(
                    &g.tokens
                        .iter()
                        .copied()
                        .filter(|&t| t != tok.eos)
                        .collect::<Vec<_>>(),
                )
                .map_err(|e| ApiError::status(500, e.to_string()))?;
            let logprobs = if req.logprobs {
                let names: Vec<String> = g
                    .tokens
                    .iter()
                    .map(|&t| match (req.token_ids, tok.id_to_token(t)) {
                        (false, Some(s)) => s,
                        _ => format!("token_id:{t}"),
                    })
                    .collect();
                json!({"tokens": names, "token_logprobs": g.logprobs, "top_logprobs": null})
            } else {
                Value::Null
            };
            choices.push(json!({
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": if g.finished { "stop" } else { "length" },
            }));
        }
        let id = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        let prompt_tokens: usize = req.prompts.iter().map(|p| p.len()).sum();
        Ok(json!({
            "id": format!("cmpl-grove-{id}"),
            "object": "text_completion",
            "created": unix_now(),
            "model": self.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "grove_seed": seed,
            "weights_version": version.weights_version,
            "grove_policy_version": version.policy_version,
        }))
    }
}

/// Loads MODEL, binds, prints `listening on HOST:PORT` as the first stdout line, then answers
/// requests until the process is stopped.
pub fn run(model_dir: &Path, opts: &ServeOptions) -> Result<()> {
    opts.validate()?;
    let dev = crate::compute::device();
    let served = ServedModel::load(model_dir, opts.name.clone(), &dev)?;
    let listener = TcpListener::bind((opts.host.as_str(), opts.port))
        .map_err(|e| Error::Remote(format!("cannot listen on {}:{}: {e}", opts.host, opts.port)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Remote(format!("listening socket: {e}")))?;
    if !opts.quiet {
        eprintln!(
            "serving {:?} ({} parameters{}) at http://{addr}/v1, batches of up to {} sequences, \
             {}{}",
            served.name,
            served.model.num_params(),
            served
                .version
                .map(|v| format!(", policy version {v}"))
                .unwrap_or_default(),
            opts.batch.max_batch,
            if opts.api_key.is_some() {
                "API key required"
            } else {
                "no API key (loopback only)"
            },
            if opts.admin_token.is_some() {
                ", POST /admin/load enabled"
            } else {
                ""
            }
        );
    }
    let server = start(listener, Handler::new(served, opts.batch)?, opts)?;
    let mut out = std::io::stdout();
    writeln!(out, "listening on {}", server.addr)
        .and_then(|_| out.flush())
        .map_err(|e| Error::Remote(format!("stdout: {e}")))?;
    loop {
        std::thread::park();
    }
}

/// Serves `handler` on `listener` with the limits of `opts` (the threads live as long as the
/// process); `run` without the model loading, for tests.
pub fn start(listener: TcpListener, handler: Handler, opts: &ServeOptions) -> Result<http::Server> {
    let limits = http::HttpLimits {
        request_timeout: Duration::from_secs_f64(opts.request_timeout_s),
        write_timeout: Duration::from_secs_f64(opts.request_timeout_s),
        max_body_bytes: MAX_BODY_BYTES,
        workers: opts.workers,
        queue: 4 * opts.workers,
        api_key: opts.api_key.clone(),
        admin_token: opts.admin_token.clone(),
    };
    let handler = Arc::new(handler);
    let app: Arc<http::App> =
        Arc::new(move |r: &http::Request| handler.handle(&r.method, &r.url, &r.body));
    let quiet = opts.quiet;
    let log: Arc<http::Log> = Arc::new(
        move |method: &str, url: &str, status: u16, message: &str, took: Duration| {
            if !quiet {
                let detail = if message.is_empty() {
                    String::new()
                } else {
                    format!(": {message}")
                };
                eprintln!(
                    "{method} {url} {status} in {:.0} ms{detail}",
                    took.as_secs_f64() * 1e3
                );
            }
        },
    );
    http::start(listener, limits, app, log)
        .map_err(|e| Error::Remote(format!("cannot start the server threads: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Llama;

    fn served() -> ServedModel {
        let tok = Tokenizer::builtin_arithmetic();
        let cfg = Config::builtin_tiny(tok.vocab_size());
        let model = Llama::init(&cfg, 3, &candle_core::Device::Cpu).unwrap();
        ServedModel {
            model,
            tok,
            name: "tiny".into(),
            version: Some(7),
            dir: None,
        }
    }

    fn handler() -> Handler {
        Handler::new(served(), BatchOptions::default()).unwrap()
    }

    fn post(h: &Handler, body: &str) -> (u16, Value) {
        h.handle("POST", "/v1/completions", body.as_bytes())
    }

    #[test]
    fn a_model_producing_nan_is_a_500_naming_it() {
        let s = served();
        s.model.poison_with_nan();
        let h = Handler::new(s, BatchOptions::default()).unwrap();
        let (s, v) = post(&h, r#"{"prompt": "1+1=", "max_tokens": 2}"#);
        assert_eq!(s, 500, "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("non-finite logits (NaN)"), "{v}");
    }

    #[test]
    fn bad_requests_are_400_naming_the_field() {
        let h = handler();
        let (s, v) = post(&h, "{\"prompt\": \"1+1=\", ");
        assert_eq!(s, 400);
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"));
        for (body, field, text) in [
            ("{}", "prompt", "field `prompt` is required"),
            ("{\"prompt\": 5}", "prompt", "field `prompt` is 5"),
            (
                "{\"prompt\": [[1, 99]]}",
                "prompt",
                "`prompt[0][1]` = 99 is not a token id",
            ),
            (
                "{\"prompt\": \"1\", \"max_tokens\": \"4\"}",
                "max_tokens",
                "field `max_tokens` must be an integer",
            ),
            (
                "{\"prompt\": \"1\", \"temperature\": -1}",
                "temperature",
                "temperature must be >= 0",
            ),
            (
                "{\"prompt\": \"1\", \"top_p\": 0}",
                "top_p",
                "top_p must be in (0, 1]",
            ),
            (
                "{\"prompt\": \"1\", \"n\": 0}",
                "n",
                "field `n` must be an integer in 1..=4096",
            ),
            (
                "{\"prompt\": \"1\", \"stream\": true}",
                "stream",
                "not supported",
            ),
            (
                "{\"prompt\": \"1\", \"stop\": [\"=\"]}",
                "stop",
                "not supported",
            ),
            (
                "{\"prompt\": \"1\", \"seed\": -3}",
                "seed",
                "non-negative integer",
            ),
        ] {
            let (s, v) = post(&h, body);
            assert_eq!(s, 400, "{body}");
            assert_eq!(v["error"]["param"], field, "{body}: {v}");
            let m = v["error"]["message"].as_str().unwrap();
            assert!(m.contains(text), "{body}: {m}");
        }
        let (s, v) = post(&h, "{\"prompt\": \"1\", \"model\": \"other\"}");
        assert_eq!(s, 404);
        assert!(v["error"]["message"].as_str().unwrap().contains("\"tiny\""));
        assert_eq!(h.handle("GET", "/nope", b"").0, 404);
        assert_eq!(h.handle("GET", "/v1/completions", b"").0, 405);
    }

    #[test]
    fn n_samples_per_prompt_deterministic_given_seed() {
        let h = handler();
        let body = r#"{"model": "tiny", "prompt": ["1+2=", [1, 5, 14, 6]], "n": 3,
                       "max_tokens": 4, "logprobs": 1, "seed": 11,
                       "return_tokens_as_token_ids": true}"#;
        let (s, a) = post(&h, body);
        assert_eq!(s, 200, "{a}");
        let choices = a["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 6, "2 prompts × n = 3");
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i);
            let toks = c["logprobs"]["tokens"].as_array().unwrap();
            let lps = c["logprobs"]["token_logprobs"].as_array().unwrap();
            assert_eq!(toks.len(), lps.len());
            assert!(!toks.is_empty() && toks.len() <= 4);
            assert!(toks[0].as_str().unwrap().starts_with("token_id:"));
            assert!(lps.iter().all(|x| x.as_f64().unwrap() <= 0.0));
        }
        // Text "1+2=" is BOS 1, '1' 5, '+' 14, '2' 6, '=' 17: prompt 1 is a prefix of it, so
        // the two prompts differ, yet the same request gives the same answer.
        let (_, b) = post(&h, body);
        assert_eq!(a["choices"], b["choices"]);
        let (_, c) = post(&h, &body.replace("\"seed\": 11", "\"seed\": 12"));
        assert_ne!(a["choices"], c["choices"], "another seed, other samples");
        // Without logprobs the field is null, as in OpenAI's API.
        let (_, d) = post(&h, r#"{"prompt": "1+2=", "max_tokens": 2}"#);
        assert!(d["choices"][0]["logprobs"].is_null());
        assert_eq!(d["usage"]["prompt_tokens"], 5);
    }

    #[test]
    fn a_public_bind_needs_an_api_key() {
        let opts = |host: &str, key: Option<&str>| ServeOptions {
            host: host.into(),
            api_key: key.map(String::from),
            ..ServeOptions::default()
        };
        let e = opts("0.0.0.0", None).validate().unwrap_err().to_string();
        assert!(e.contains("0.0.0.0") && e.contains("--api-key"), "{e}");
        assert!(opts("0.0.0.0", Some("k")).validate().is_ok());
        assert!(opts("127.0.0.1", None).validate().is_ok());
        assert!(opts("::1", None).validate().is_ok());
        assert!(opts("localhost", None).validate().is_ok());
        let e = ServeOptions {
            request_timeout_s: 0.0,
            ..ServeOptions::default()
        };
        assert!(e
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--request-timeout-s"));
    }

    #[test]
    fn a_huge_text_prompt_is_refused_before_tokenizing() {
        let h = handler();
        // The built-in vocabulary's longest entry has 5 bytes ("<bos>"), the tiny model 64
        // positions: 5 MB is at least a million tokens.
        assert_eq!(h.max_token_bytes, 5);
        let body = json!({"prompt": "1".repeat(5 << 20)}).to_string();
        let (s, v) = post(&h, &body);
        assert_eq!(s, 400);
        let m = v["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("5242880 bytes, so at least 1048576 tokens"),
            "{m}"
        );
        // Just under the bound, the text is tokenized and refused by the exact count.
        let max_pos = h.cfg.max_positions();
        let body = json!({"prompt": "1".repeat(5 * max_pos - 1)}).to_string();
        let (s, v) = post(&h, &body);
        assert_eq!(s, 400);
        assert!(v["error"]["param"] == "max_tokens", "{v}");
    }

    #[test]
    fn completions_over_http_with_an_api_key() {
        let opts = ServeOptions {
            api_key: Some("k1".into()),
            quiet: true,
            ..ServeOptions::default()
        };
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = start(l, handler(), &opts).unwrap().addr;
        let send = |auth: &str| {
            use std::io::Read;
            let body = r#"{"prompt": "1+2=", "max_tokens": 3, "seed": 1}"#;
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let raw = format!(
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: \
                 application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(raw.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        assert!(send("").starts_with("HTTP/1.1 401"));
        let ok = send("Authorization: Bearer k1\r\n");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("\"choices\""), "{ok}");
    }

    #[test]
    fn models_lists_the_served_model() {
        let h = handler();
        let (s, v) = h.handle("GET", "/v1/models", b"");
        assert_eq!(s, 200);
        assert_eq!(v["data"][0]["id"], "tiny");
        assert_eq!(v["data"][0]["grove_policy_version"], 7);
        assert_eq!(v["data"][0]["weights_version"], 0);
        let (s, a) = post(&h, r#"{"prompt": "1+2=", "max_tokens": 2}"#);
        assert_eq!(s, 200);
        assert_eq!(
            (&a["weights_version"], &a["grove_policy_version"]),
            (&json!(0), &json!(7))
        );
        let (s, m) = h.handle("GET", "/metrics", b"");
        assert_eq!(s, 200);
        assert_eq!(m["requests"], 1, "{m}");
        assert!(m["forward_passes"].as_u64().unwrap() >= 1, "{m}");
    }
}
