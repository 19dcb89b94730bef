//! Throughput of `grove serve` under concurrent clients (`grove bench --serve`). The server
//! runs in this process on 127.0.0.1 (random weights of the benchmarked shape); `c` client
//! threads share 64 completion requests (one 8-token prompt each, `new_tokens` sampled tokens,
//! seeded), each client sending its requests one after another; tokens/s is completion tokens
//! answered over the wall time. Every concurrency runs twice: with the continuous batch, and
//! with a batch of one sequence (`--max-batch 1`), where requests are decoded one at a time:
//! the single-request path.
use std::net::TcpListener;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::json;

use super::{start, BatchOptions, Handler, ServeOptions, ServedModel};
use crate::error::{Error, Result};
use crate::model::{Llama, Tokenizer};

/// Requests sent at every concurrency.
pub const REQUESTS: usize = 64;
/// Prompt tokens per request.
const PROMPT_TOKENS: usize = 8;

/// One concurrency's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRow {
    pub clients: usize,
    pub batched_tokens_per_s: f64,
    pub single_tokens_per_s: f64,
    /// Forward passes the batched server took for the 64 requests.
    pub batched_forward_passes: u64,
    pub single_forward_passes: u64,
}

/// Sends `REQUESTS` requests from `clients` threads to a server on `model`; returns
/// (completion tokens per second, forward passes).
fn one_run(
    model: Llama,
    tok: Tokenizer,
    clients: usize,
    max_batch: usize,
    new_tokens: usize,
) -> Result<(f64, u64)> {
    let vocab = model.cfg.vocab_size as u32;
    let served = ServedModel {
        model,
        tok,
        name: "bench".into(),
        version: None,
        dir: None,
    };
    let opts = ServeOptions {
        quiet: true,
        workers: clients.max(1) + 4,
        batch: BatchOptions {
            max_batch,
            max_queue: REQUESTS,
        },
        request_timeout_s: 600.0,
        ..ServeOptions::default()
    };
    let handler = Handler::new(served, opts.batch)?;
    let scheduler = std::sync::Arc::clone(&handler.scheduler);
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Remote(format!("cannot listen on 127.0.0.1: {e}")))?;
    let url = format!(
        "http://{}/v1/completions",
        start(listener, handler, &opts)?.addr
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into();
    let t = Instant::now();
    let per_client: Vec<Vec<usize>> = (0..clients)
        .map(|c| (0..REQUESTS).filter(|r| r % clients == c).collect())
        .collect();
    let tokens: Result<Vec<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = per_client
            .iter()
            .map(|reqs| {
                let (agent, url) = (agent.clone(), url.clone());
                s.spawn(move || -> Result<u64> {
                    let mut n = 0;
                    for &r in reqs {
                        let mut rng = ChaCha8Rng::seed_from_u64(r as u64);
                        let prompt: Vec<u32> = (0..PROMPT_TOKENS)
                            .map(|_| rng.gen_range(0..vocab))
                            .collect();
                        let body = json!({"prompt": prompt, "max_tokens": new_tokens,
                                          "seed": r, "return_tokens_as_token_ids": true});
                        let text = agent
                            .post(&url)
                            .header("Content-Type", "application/json")
                            .send(body.to_string())
                            .and_then(|mut a| a.body_mut().read_to_string())
                            .map_err(|e| Error::Remote(format!("bench request {r}: {e}")))?;
                        let v: serde_json::Value = serde_json::from_str(&text)?;
                        n += v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                    }
                    Ok(n)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().map_err(|_| Error::Thread {
                    thread: "grove bench --serve client",
                    msg: "panicked".into(),
                })?
            })
            .collect()
    });
    let secs = t.elapsed().as_secs_f64();
    let total: u64 = tokens?.iter().sum();
    let passes = scheduler
        .counters
        .forward_passes
        .load(std::sync::atomic::Ordering::Relaxed);
    scheduler.close();
    Ok((total as f64 / secs, passes))
}

/// Tokens/s of the batched server and of the single-request path at each concurrency in
/// `clients`, on fresh random weights from `make_model` for every run.
pub fn measure(
    make_model: &dyn Fn() -> Result<Llama>,
    make_tok: &dyn Fn() -> Result<Tokenizer>,
    clients: &[usize],
    new_tokens: usize,
) -> Result<Vec<ThroughputRow>> {
    clients
        .iter()
        .map(|&c| {
            let (batched, bp) = one_run(
                make_model()?,
                make_tok()?,
                c,
                super::DEFAULT_MAX_BATCH,
                new_tokens,
            )?;
            let (single, sp) = one_run(make_model()?, make_tok()?, c, 1, new_tokens)?;
            Ok(ThroughputRow {
                clients: c,
                batched_tokens_per_s: batched,
                single_tokens_per_s: single,
                batched_forward_passes: bp,
                single_forward_passes: sp,
            })
        })
        .collect()
}

/// The rows as a markdown table (docs/performance.md).
pub fn table(rows: &[ThroughputRow], new_tokens: usize) -> String {
    let mut s = format!(
        "| clients | batched (tokens/s) | single-request path (tokens/s) | ratio | forward passes, batched / single ({REQUESTS} requests × {new_tokens} tokens) |\n|---|---|---|---|---|\n"
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2}× | {} / {} |\n",
            r.clients,
            r.batched_tokens_per_s,
            r.single_tokens_per_s,
            r.batched_tokens_per_s / r.single_tokens_per_s,
            r.batched_forward_passes,
            r.single_forward_passes
        ));
    }
    s
}
