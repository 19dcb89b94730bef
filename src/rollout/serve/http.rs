//! The HTTP/1.1 transport of `grove serve`, written for what one misbehaving peer can do.
//!
//! - Every request has one deadline for its headers and body together (`request_timeout`), so
//!   a client that promises a body and never sends it, or sends it a byte at a time, is
//!   answered 408 and dropped when the deadline passes; answers are written with a write
//!   timeout, so a client that never reads cannot hold a worker either.
//! - Sizes are checked before anything is read into memory: headers over
//!   [`MAX_HEADER_BYTES`] are 431, a `Content-Length` over `max_body_bytes` is 413 before any
//!   of the body is read, a chunked body is 411 (grove's client always sends a length).
//! - With an API key, `Authorization: Bearer KEY` is checked (in constant time) before the
//!   body is read; only `GET /health` is open. Paths under `/admin/` need the admin token
//!   instead (403 when the server has none), also before the body is read.
//! - Connections are handled by a fixed pool of `workers` threads fed from a bounded queue;
//!   when every worker is busy and the queue is full, a new connection is answered 503 at
//!   once instead of waiting. Every 503 carries `Retry-After`. One request per connection
//!   (`Connection: close`), so an idle
//!   keep-alive client cannot hold a worker.
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Request line and headers larger than this are refused with 431.
pub const MAX_HEADER_BYTES: usize = 16 << 10;

/// Limits of the transport.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Deadline for reading one request's headers and body.
    pub request_timeout: Duration,
    /// Deadline for each write of the answer.
    pub write_timeout: Duration,
    pub max_body_bytes: usize,
    /// Connections handled at the same time.
    pub workers: usize,
    /// Accepted connections waiting for a worker; beyond this they are answered 503.
    pub queue: usize,
    /// Required `Authorization: Bearer` token; None: no authentication.
    pub api_key: Option<String>,
    /// The bearer token of `/admin/` paths; None: they are refused.
    pub admin_token: Option<String>,
}

/// Seconds a client is asked to wait after a 503.
pub const RETRY_AFTER_S: u32 = 1;

/// One parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub url: String,
    pub body: Vec<u8>,
}

/// The application: a request to (HTTP status, JSON body).
pub type App = dyn Fn(&Request) -> (u16, Value) + Send + Sync;

/// Called after each answer: (method, url, status, error message if any, elapsed).
pub type Log = dyn Fn(&str, &str, u16, &str, Duration) + Send + Sync;

/// A refusal made by the transport itself.
#[derive(Debug)]
struct Refusal {
    status: u16,
    message: String,
}

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// OpenAI's error body for a transport refusal.
pub fn error_json(status: u16, message: &str) -> Value {
    let kind = match status {
        401 | 403 => "authentication_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    json!({"error": {"message": message, "type": kind, "param": null, "code": status}})
}

/// Equal strings, compared in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads into `buf` from `stream` until `deadline`; Ok(0) at EOF.
fn read_until(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<usize, Refusal> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(refuse(408, "the request was not received in time"));
    }
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| refuse(400, format!("socket: {e}")))?;
    match stream.read(buf) {
        Ok(n) => Ok(n),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(refuse(408, "the request was not received in time"))
        }
        Err(e) => Err(refuse(400, format!("cannot read the request: {e}"))),
    }
}

/// The parsed head: method, url, headers (lower-case names), and body bytes already read.
struct Head {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    rest: Vec<u8>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn read_head(stream: &mut TcpStream, deadline: Instant) -> Result<Head, Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEADER_BYTES + 4 {
            return Err(refuse(
                431,
                format!("request line and headers over {MAX_HEADER_BYTES} bytes"),
            ));
        }
        let n = read_until(stream, &mut chunk, deadline)?;
        if n == 0 {
            return Err(refuse(
                400,
                "the connection closed before the headers ended",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if end > MAX_HEADER_BYTES {
        return Err(refuse(
            431,
            format!("request line and headers over {MAX_HEADER_BYTES} bytes"),
        ));
    }
    let text = std::str::from_utf8(&buf[..end])
        .map_err(|_| refuse(400, "the request headers are not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("");
    let parts: Vec<&str> = first.split(' ').collect();
    if parts.len() != 3 || !parts[2].starts_with("HTTP/1.") {
        return Err(refuse(
            400,
            format!(
                "not an HTTP/1.x request line: {:?}",
                first.chars().take(100).collect::<String>()
            ),
        ));
    }
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| refuse(400, format!("malformed header line {line:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok(Head {
        method: parts[0].to_string(),
        url: parts[1].to_string(),
        headers,
        rest: buf[end + 4..].to_vec(),
    })
}

/// Reads one request, enforcing the deadline, the size limits and the API key.
fn read_request(stream: &mut TcpStream, limits: &HttpLimits) -> Result<Request, Refusal> {
    let deadline = Instant::now() + limits.request_timeout;
    let head = read_head(stream, deadline)?;
    let path = head
        .url
        .split('?')
        .next()
        .unwrap_or("")
        .trim_end_matches('/');
    let open = head.method == "GET" && path == "/health";
    let given = head
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim();
    if path.starts_with("/admin/") {
        let Some(token) = &limits.admin_token else {
            return Err(refuse(
                403,
                "admin endpoints are off: start grove serve with --admin-token TOKEN (or \
                 GROVE_ADMIN_TOKEN) and send `Authorization: Bearer TOKEN`",
            ));
        };
        if !same_secret(given.as_bytes(), token.as_bytes()) {
            return Err(refuse(
                401,
                "missing or wrong admin token: send `Authorization: Bearer TOKEN` with the \
                 token grove serve was started with (--admin-token or GROVE_ADMIN_TOKEN)",
            ));
        }
    } else if let (Some(key), false) = (&limits.api_key, open) {
        if !same_secret(given.as_bytes(), key.as_bytes()) {
            return Err(refuse(
                401,
                "missing or wrong API key: send `Authorization: Bearer KEY` with the key \
                 grove serve was started with (--api-key or GROVE_API_KEY)",
            ));
        }
    }
    if head.header("transfer-encoding").is_some() {
        return Err(refuse(
            411,
            "chunked request bodies are not accepted: send Content-Length",
        ));
    }
    let len = match head.header("content-length") {
        None => 0,
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| refuse(400, format!("Content-Length {v:?} is not a byte count")))?,
    };
    if len > limits.max_body_bytes as u64 {
        return Err(refuse(
            413,
            format!(
                "request body of {len} bytes is over the limit of {} bytes",
                limits.max_body_bytes
            ),
        ));
    }
    let len = len as usize;
    let mut body = head.rest;
    if body.len() > len {
        return Err(refuse(
            400,
            "more bytes than Content-Length (pipelining is not supported)",
        ));
    }
    body.reserve(len - body.len());
    let mut chunk = [0u8; 16 << 10];
    while body.len() < len {
        let want = (len - body.len()).min(chunk.len());
        let n = read_until(stream, &mut chunk[..want], deadline)?;
        if n == 0 {
            return Err(refuse(
                400,
                format!(
                    "the connection closed after {} of {len} body bytes",
                    body.len()
                ),
            ));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(Request {
        method: head.method,
        url: head.url,
        body,
    })
}

fn write_answer(stream: &mut TcpStream, status: u16, body: &Value, write_timeout: Duration) {
    let body = body.to_string();
    let retry = if status == 503 {
        format!("Retry-After: {RETRY_AFTER_S}\r\n")
    } else {
        String::new()
    };
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         {retry}Connection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    let _ = stream.set_write_timeout(Some(write_timeout));
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|_| stream.write_all(body.as_bytes()))
        .and_then(|_| stream.flush());
    let _ = stream.shutdown(Shutdown::Write);
    // A client still sending a refused body would see a reset instead of the answer if the
    // socket closed now: read (and drop) a little of it first, briefly.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut sink = [0u8; 8192];
    for _ in 0..8 {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

fn handle_connection(mut stream: TcpStream, limits: &HttpLimits, app: &App, log: &Log) {
    let t = Instant::now();
    let (method, url, status, answer) = match read_request(&mut stream, limits) {
        Ok(req) => {
            let (status, answer) = app(&req);
            (req.method, req.url, status, answer)
        }
        Err(r) => (
            "-".into(),
            "-".into(),
            r.status,
            error_json(r.status, &r.message),
        ),
    };
    write_answer(&mut stream, status, &answer, limits.write_timeout);
    let message = answer["error"]["message"].as_str().unwrap_or("");
    log(&method, &url, status, message, t.elapsed());
}

/// Queues `stream`, waiting up to [`QUEUE_GRACE`] for a free slot: a worker that was just
/// handed a connection may not have taken it off the queue yet.
fn send_with_grace(
    tx: &SyncSender<TcpStream>,
    stream: TcpStream,
) -> Result<(), TrySendError<TcpStream>> {
    let deadline = Instant::now() + QUEUE_GRACE;
    let mut stream = stream;
    loop {
        match tx.try_send(stream) {
            Err(TrySendError::Full(s)) if Instant::now() < deadline => {
                stream = s;
                std::thread::sleep(Duration::from_millis(2));
            }
            other => return other,
        }
    }
}

/// How long a new connection may wait for a queue slot before it is answered 503.
const QUEUE_GRACE: Duration = Duration::from_millis(100);

/// A running server: its address; its threads end with the process.
pub struct Server {
    pub addr: SocketAddr,
}

/// Starts the acceptor and the worker pool on `listener`.
pub fn start(
    listener: TcpListener,
    limits: HttpLimits,
    app: Arc<App>,
    log: Arc<Log>,
) -> std::io::Result<Server> {
    let addr = listener.local_addr()?;
    let workers = limits.workers.max(1);
    let (tx, rx): (SyncSender<TcpStream>, Receiver<TcpStream>) = mpsc::sync_channel(limits.queue);
    let rx = Arc::new(Mutex::new(rx));
    let limits = Arc::new(limits);
    // Connections are accepted only once every worker waits for one.
    let ready = Arc::new(std::sync::Barrier::new(workers + 1));
    for i in 0..workers {
        let rx = Arc::clone(&rx);
        let ready = Arc::clone(&ready);
        let (limits, app, log) = (Arc::clone(&limits), Arc::clone(&app), Arc::clone(&log));
        std::thread::Builder::new()
            .name(format!("grove-serve-{i}"))
            .spawn(move || {
                ready.wait();
                loop {
                    // The lock is held only while waiting for the next connection.
                    let next = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match next {
                        Ok(stream) => handle_connection(stream, &limits, &*app, &*log),
                        Err(_) => return,
                    }
                }
            })?;
    }
    ready.wait();
    let busy_timeout = Duration::from_secs(1);
    std::thread::Builder::new()
        .name("grove-serve-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                match send_with_grace(&tx, stream) {
                    Ok(()) => {}
                    Err(TrySendError::Full(mut s)) => {
                        let msg = format!(
                            "all {workers} workers are busy and the queue is full; retry later"
                        );
                        write_answer(&mut s, 503, &error_json(503, &msg), busy_timeout);
                    }
                    Err(TrySendError::Disconnected(_)) => return,
                }
            }
        })?;
    Ok(Server { addr })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Condvar;

    fn limits() -> HttpLimits {
        HttpLimits {
            request_timeout: Duration::from_millis(1000),
            write_timeout: Duration::from_secs(2),
            max_body_bytes: 1000,
            workers: 2,
            queue: 1,
            api_key: None,
            admin_token: None,
        }
    }

    /// Counts requests to `/hold` and lets them finish when `open` is set.
    #[derive(Default)]
    struct Gate {
        state: Mutex<(usize, bool)>,
        cv: Condvar,
    }

    /// Echoes method, url and body length; `/hold` waits (up to 10 s) for the gate to open.
    fn server(limits: HttpLimits) -> (SocketAddr, Arc<Gate>) {
        let gate = Arc::new(Gate::default());
        let g = Arc::clone(&gate);
        let app: Arc<App> = Arc::new(move |r: &Request| {
            if r.url == "/hold" {
                let mut s = g.state.lock().unwrap();
                s.0 += 1;
                g.cv.notify_all();
                let (s, t) =
                    g.cv.wait_timeout_while(s, Duration::from_secs(10), |s| !s.1)
                        .unwrap();
                if t.timed_out() && !s.1 {
                    return (504, json!({}));
                }
            }
            (
                200,
                json!({"method": r.method, "url": r.url, "len": r.body.len()}),
            )
        });
        let log: Arc<Log> = Arc::new(|_: &str, _: &str, _: u16, _: &str, _: Duration| {});
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        (start(l, limits, app, log).unwrap().addr, gate)
    }

    /// Sends `raw`, reads the answer until the server closes: (status, body).
    fn exchange(addr: SocketAddr, raw: &[u8]) -> (u16, Value) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(raw).unwrap();
        read_answer(&mut s)
    }

    fn read_answer(s: &mut TcpStream) -> (u16, Value) {
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let status = text[9..12].parse().unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        (status, serde_json::from_str(body).unwrap())
    }

    #[test]
    fn a_body_that_never_arrives_times_out_without_blocking_others() {
        let (addr, _) = server(limits());
        // Promises 500 bytes, sends 3, then waits.
        let mut stalled = TcpStream::connect(addr).unwrap();
        stalled
            .write_all(b"POST /x HTTP/1.1\r\nContent-Length: 500\r\n\r\nabc")
            .unwrap();
        // Another client is answered while the stalled one is still waiting.
        let (s, v) = exchange(addr, b"POST /y HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi");
        assert_eq!((s, v["len"].as_u64()), (200, Some(2)));
        stalled
            .set_read_timeout(Some(Duration::from_millis(1)))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(
            stalled.read(&mut b).is_err(),
            "no answer yet to the stalled client"
        );
        // It gets 408 once its deadline (1 s) passes.
        stalled
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (s, v) = read_answer(&mut stalled);
        assert_eq!(s, 408, "{v}");
        // A slowloris sending a header byte every 50 ms (each read succeeds, so a per-read
        // timeout alone would never fire) is cut at the same deadline for the whole request.
        let mut slow = TcpStream::connect(addr).unwrap();
        let mut writer = slow.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = writer.write_all(b"GET /health HTTP/1.1\r\nX-Pad: ");
            for _ in 0..200 {
                if writer.write_all(b"a").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        slow.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        assert_eq!(read_answer(&mut slow).0, 408);
    }

    #[test]
    fn sizes_are_refused_before_the_body_is_read() {
        let (addr, _) = server(limits());
        // 413 without sending a byte of the body.
        let (s, v) = exchange(addr, b"POST /x HTTP/1.1\r\nContent-Length: 1001\r\n\r\n");
        assert_eq!(s, 413);
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains("1001") && m.contains("1000"), "{m}");
        let (s, _) = exchange(
            addr,
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        );
        assert_eq!(s, 411);
        let mut big = b"GET /x HTTP/1.1\r\nX-Pad: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEADER_BYTES + 10));
        big.extend(b"\r\n\r\n");
        assert_eq!(exchange(addr, &big).0, 431);
        assert_eq!(exchange(addr, b"GARBAGE\r\n\r\n").0, 400);
        let (s, _) = exchange(addr, b"POST /x HTTP/1.1\r\nContent-Length: -4\r\n\r\n");
        assert_eq!(s, 400);
    }

    #[test]
    fn requests_run_concurrently_and_overflow_is_503() {
        let (addr, gate) = server(limits());
        // Two requests held inside the app at once: only possible with two workers.
        let held: Vec<_> = (0..2)
            .map(|_| std::thread::spawn(move || exchange(addr, b"GET /hold HTTP/1.1\r\n\r\n").0))
            .collect();
        {
            let s = gate.state.lock().unwrap();
            let (s, _) = gate
                .cv
                .wait_timeout_while(s, Duration::from_secs(10), |s| s.0 < 2)
                .unwrap();
            assert_eq!(s.0, 2, "both requests are inside the app at the same time");
        }
        // Both workers are busy: one more connection waits in the queue (capacity 1), the
        // next one is refused at once instead of waiting.
        let queued = std::thread::spawn(move || exchange(addr, b"GET /q HTTP/1.1\r\n\r\n").0);
        std::thread::sleep(Duration::from_millis(200));
        let mut r = TcpStream::connect(addr).unwrap();
        r.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        r.write_all(b"GET /r HTTP/1.1\r\n\r\n").unwrap();
        let mut raw = String::new();
        r.read_to_string(&mut raw).unwrap();
        assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
        assert!(raw.contains("\r\nRetry-After: 1\r\n"), "{raw}");
        gate.state.lock().unwrap().1 = true;
        gate.cv.notify_all();
        for h in held {
            assert_eq!(h.join().unwrap(), 200);
        }
        assert_eq!(queued.join().unwrap(), 200);
    }

    #[test]
    fn the_api_key_is_checked_before_the_body() {
        let (addr, _) = server(HttpLimits {
            api_key: Some("s3cret".into()),
            ..limits()
        });
        // No key, a wrong key of the same length, a short one: 401 without sending the body.
        for auth in [
            "",
            "Authorization: Bearer s3creT\r\n",
            "Authorization: Bearer x\r\n",
        ] {
            let raw = format!("POST /x HTTP/1.1\r\n{auth}Content-Length: 900\r\n\r\n");
            let (s, v) = exchange(addr, raw.as_bytes());
            assert_eq!(s, 401, "{auth}: {v}");
            assert_eq!(v["error"]["type"], "authentication_error");
        }
        let ok = b"POST /x HTTP/1.1\r\nAuthorization: Bearer s3cret\r\nContent-Length: 2\r\n\r\nhi";
        assert_eq!(exchange(addr, ok).0, 200);
        assert_eq!(exchange(addr, b"GET /health HTTP/1.1\r\n\r\n").0, 200);
        assert!(same_secret(b"abc", b"abc") && !same_secret(b"abc", b"abd"));
    }

    #[test]
    fn admin_paths_need_the_admin_token_not_the_api_key() {
        let (addr, _) = server(HttpLimits {
            api_key: Some("k".into()),
            admin_token: Some("adm".into()),
            ..limits()
        });
        let post = |auth: &str| {
            let raw = format!("POST /admin/load HTTP/1.1\r\n{auth}Content-Length: 900\r\n\r\n");
            exchange(addr, raw.as_bytes())
        };
        for auth in [
            "",
            "Authorization: Bearer k\r\n",
            "Authorization: Bearer adx\r\n",
        ] {
            let (s, v) = post(auth);
            assert_eq!(s, 401, "{auth}: {v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("admin token"),
                "{v}"
            );
        }
        let ok = b"POST /admin/load HTTP/1.1\r\nAuthorization: Bearer adm\r\nContent-Length: 2\r\n\r\nhi";
        assert_eq!(exchange(addr, ok).0, 200);
        // The admin token is not an API key.
        let raw = b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer adm\r\n\r\n";
        assert_eq!(exchange(addr, raw).0, 401);
        // Without an admin token the admin paths are off, whatever is sent.
        let (addr, _) = server(limits());
        let (s, v) = exchange(addr, ok);
        assert_eq!(s, 403, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--admin-token"),
            "{v}"
        );
    }
}
