//! `grove view runs/`: a local page for watching and comparing runs. grove serves the page
//! (HTML, JavaScript and CSS compiled in; no external assets) and a small JSON API over the
//! run directories; the page polls it, so curves and samples grow while a run trains.
//!
//! API (all GET):
//! - `/api/runs`: `[{"name", "metrics_lines", "samples_lines"}]`, the folders of the root that
//!   hold a metrics.jsonl (or the root itself when it is a run directory).
//! - `/api/metrics?run=NAME&from=N`, `/api/samples?run=NAME&from=N`: the parsed JSON lines from
//!   line N on, `{"lines": [...], "next": M}`; a line still being written waits for the next
//!   poll.
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");

pub struct ViewOptions {
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    pub quiet: bool,
}

/// One HTTP answer: status, content type, body.
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

fn json(status: u16, v: serde_json::Value) -> Answer {
    Answer {
        status,
        content_type: "application/json",
        body: v.to_string(),
    }
}

fn error(status: u16, msg: String) -> Answer {
    json(status, serde_json::json!({ "error": msg }))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

/// The run directories under `root`, sorted by name.
pub fn list_runs(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    if root.join("metrics.jsonl").exists() {
        let name = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        return Ok(vec![(name, root.to_path_buf())]);
    }
    let mut runs = Vec::new();
    for e in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
        let e = e.map_err(|e| Error::io(root, e))?;
        let p = e.path();
        if p.join("metrics.jsonl").is_file() {
            runs.push((e.file_name().to_string_lossy().into_owned(), p));
        }
    }
    runs.sort();
    Ok(runs)
}

/// The complete lines of a JSONL file from line `from` on, parsed, and the next line number.
pub fn read_lines_from(path: &Path, from: usize) -> Result<(Vec<serde_json::Value>, usize)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((vec![], from)),
        Err(e) => return Err(Error::io(path, e)),
    };
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => return Ok((vec![], from)),
    };
    let mut out = Vec::new();
    let mut n = 0;
    for (i, line) in complete.split('\n').enumerate() {
        n = i + 1;
        if i < from || line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(line).map_err(|e| Error::RunDir {
            path: path.to_path_buf(),
            msg: format!("line {}: not valid JSON: {e}", i + 1),
        })?);
    }
    Ok((out, n.max(from)))
}

fn count_lines(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

/// Answers one GET request for `url` (path and query) over the runs under `root`.
pub fn handle(root: &Path, url: &str) -> Answer {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let page = |content_type, body: &str| Answer {
        status: 200,
        content_type,
        body: body.to_string(),
    };
    match path {
        "/" | "/index.html" => page("text/html; charset=utf-8", INDEX_HTML),
        "/app.js" => page("text/javascript; charset=utf-8", APP_JS),
        "/style.css" => page("text/css; charset=utf-8", STYLE_CSS),
        "/api/runs" => match list_runs(root) {
            Ok(runs) => json(
                200,
                runs.iter()
                    .map(|(name, dir)| {
                        serde_json::json!({
                            "name": name,
                            "metrics_lines": count_lines(&dir.join("metrics.jsonl")),
                            "samples_lines": count_lines(&dir.join("samples.jsonl")),
                        })
                    })
                    .collect(),
            ),
            Err(e) => error(500, e.to_string()),
        },
        "/api/metrics" | "/api/samples" => {
            let Some(run) = query_param(query, "run") else {
                return error(400, "missing query parameter `run`".into());
            };
            let from = match query_param(query, "from").map(|f| f.parse::<usize>()) {
                None => 0,
                Some(Ok(n)) => n,
                Some(Err(_)) => {
                    return error(400, "`from`: expected a line number".into());
                }
            };
            let runs = match list_runs(root) {
                Ok(r) => r,
                Err(e) => return error(500, e.to_string()),
            };
            let Some((_, dir)) = runs.iter().find(|(n, _)| *n == run) else {
                let known: Vec<&str> = runs.iter().map(|(n, _)| n.as_str()).collect();
                return error(
                    404,
                    format!("no run {run:?} under {} (runs: {known:?})", root.display()),
                );
            };
            let file = if path == "/api/metrics" {
                "metrics.jsonl"
            } else {
                "samples.jsonl"
            };
            match read_lines_from(&dir.join(file), from) {
                Ok((lines, next)) => json(200, serde_json::json!({"lines": lines, "next": next})),
                Err(e) => error(500, e.to_string()),
            }
        }
        _ => error(404, format!("no page {path}")),
    }
}

/// Binds, prints `listening on http://HOST:PORT/` as the first stdout line, then serves until
/// the process is stopped.
pub fn serve(root: &Path, opts: &ViewOptions) -> Result<()> {
    if !root.is_dir() {
        return Err(Error::RunDir {
            path: root.to_path_buf(),
            msg: "not a directory (expected a folder of runs, e.g. runs/)".into(),
        });
    }
    let listener =
        TcpListener::bind((opts.host.as_str(), opts.port)).map_err(|e| Error::RunDir {
            path: root.to_path_buf(),
            msg: format!("cannot listen on {}:{}: {e}", opts.host, opts.port),
        })?;
    let addr = listener.local_addr().map_err(|e| Error::io(root, e))?;
    let server = tiny_http::Server::from_listener(listener, None).map_err(|e| Error::RunDir {
        path: root.to_path_buf(),
        msg: format!("cannot serve on {addr}: {e}"),
    })?;
    let mut out = std::io::stdout();
    writeln!(out, "listening on http://{addr}/")
        .and_then(|_| out.flush())
        .map_err(|e| Error::io("stdout", e))?;
    for request in server.incoming_requests() {
        let url = request.url().to_string();
        let a = if request.method() == &tiny_http::Method::Get {
            handle(root, &url)
        } else {
            error(405, "only GET".into())
        };
        if !opts.quiet && a.status != 200 {
            eprintln!("GET {url} {}: {}", a.status, a.body);
        }
        let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], a.content_type.as_bytes())
            .map_err(|_| Error::RunDir {
                path: root.to_path_buf(),
                msg: "bad content type".into(),
            })?;
        let response = tiny_http::Response::from_string(a.body)
            .with_status_code(a.status)
            .with_header(header);
        // A client that went away is its own problem, not the server's.
        let _ = request.respond(response);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_dir(root: &Path, name: &str, metrics: &str) -> PathBuf {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("metrics.jsonl"), metrics).unwrap();
        d
    }

    #[test]
    fn runs_are_the_folders_with_metrics() {
        let t = tempfile::tempdir().unwrap();
        run_dir(t.path(), "b", "");
        run_dir(t.path(), "a", "");
        std::fs::create_dir_all(t.path().join("not-a-run")).unwrap();
        let a = handle(t.path(), "/api/runs");
        assert_eq!(a.status, 200);
        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(v[0]["name"], "a");
        assert_eq!(v[1]["name"], "b");
        assert_eq!(v.as_array().unwrap().len(), 2);
    }

    #[test]
    fn metrics_come_from_a_line_on_and_a_partial_line_waits() {
        let t = tempfile::tempdir().unwrap();
        let d = run_dir(t.path(), "r", "{\"step\":0}\n{\"step\":1}\n{\"step\":");
        let get = |from: usize| -> serde_json::Value {
            let a = handle(t.path(), &format!("/api/metrics?run=r&from={from}"));
            assert_eq!(a.status, 200, "{}", a.body);
            serde_json::from_str(&a.body).unwrap()
        };
        let v = get(0);
        assert_eq!(v["lines"].as_array().unwrap().len(), 2);
        assert_eq!(v["next"], 2);
        let v = get(2);
        assert!(v["lines"].as_array().unwrap().is_empty());
        std::fs::write(
            d.join("metrics.jsonl"),
            "{\"step\":0}\n{\"step\":1}\n{\"step\":2}\n",
        )
        .unwrap();
        let v = get(2);
        assert_eq!(v["lines"][0]["step"], 2);
        assert_eq!(v["next"], 3);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let t = tempfile::tempdir().unwrap();
        let d = run_dir(t.path(), "r", "{\"step\":0}\nnot json\n");
        let a = handle(t.path(), "/api/metrics?run=zz");
        assert_eq!(a.status, 404);
        assert!(
            a.body.contains("zz") && a.body.contains("[\\\"r\\\"]"),
            "{}",
            a.body
        );
        let a = handle(t.path(), "/api/metrics");
        assert_eq!(a.status, 400);
        let a = handle(t.path(), "/api/metrics?run=r&from=x");
        assert_eq!(a.status, 400);
        let a = handle(t.path(), "/api/metrics?run=r");
        assert_eq!(a.status, 500);
        assert!(a.body.contains("line 2"), "{}", a.body);
        assert!(a
            .body
            .contains(&d.join("metrics.jsonl").display().to_string()));
        assert_eq!(handle(t.path(), "/../etc/passwd").status, 404);
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            query_param("run=my%20run&from=3", "run").as_deref(),
            Some("my run")
        );
        assert_eq!(query_param("from=3", "run"), None);
        assert_eq!(percent_decode("a%2Fb%"), "a/b%");
    }

    #[test]
    fn the_page_and_its_assets_are_served() {
        let t = tempfile::tempdir().unwrap();
        let a = handle(t.path(), "/");
        assert!(a.content_type.starts_with("text/html"));
        assert!(a.body.contains("app.js") && a.body.contains("style.css"));
        assert!(!a.body.contains("http://") && !a.body.contains("https://"));
        assert!(handle(t.path(), "/app.js").body.contains("fetch("));
    }
}
