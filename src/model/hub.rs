//! Model references: a local path (HF folder, GGUF file, grove checkpoint) or a Hugging Face
//! Hub repository, written `hf://ORG/NAME`, `hf://ORG/NAME@REVISION`,
//! `https://huggingface.co/ORG/NAME` or, when no such local path exists, a bare `ORG/NAME`.
//!
//! With the `hub` cargo feature a repository is downloaded once (config.json, tokenizer files,
//! safetensors, sharded or not) into `<cache>/ORG--NAME/REVISION/` and loaded from there;
//! `<cache>` is `$GROVE_HUB_CACHE`, else `$XDG_CACHE_HOME/grove/hub`, else
//! `~/.cache/grove/hub`; the server is `$HF_ENDPOINT` (default `https://huggingface.co`) and
//! `$HF_TOKEN`, when set, is sent as a bearer token for gated repositories. Without the feature
//! a repository reference is an error that says how to build with it.
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A parsed model reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    Local(PathBuf),
    Hub { repo: String, revision: String },
}

/// Files of a repository that grove reads, besides the weights.
pub const REQUIRED_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
pub const OPTIONAL_FILES: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(['.', '-'])
        && s.len() <= 96
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `ORG/NAME` with the characters the Hub allows in each part.
pub fn is_repo_id(s: &str) -> bool {
    match s.split_once('/') {
        Some((org, name)) => valid_part(org) && valid_part(name) && !name.contains('/'),
        None => false,
    }
}

fn hub_ref(spec: &str, rest: &str) -> Result<ModelRef> {
    let (repo, revision) = match rest.split_once('@') {
        Some((r, rev)) => (r, rev),
        None => (rest, "main"),
    };
    let repo = repo.trim_end_matches('/');
    if !is_repo_id(repo) {
        return Err(Error::config(
            "model",
            format!("`{spec}`: expected a Hub repository ORG/NAME (letters, digits, `-`, `_`, `.`), found `{repo}`"),
        ));
    }
    if revision.is_empty() || !revision.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
        return Err(Error::config(
            "model",
            format!("`{spec}`: revision `{revision}` is not a branch, tag or commit name"),
        ));
    }
    Ok(ModelRef::Hub {
        repo: repo.to_string(),
        revision: revision.to_string(),
    })
}

/// Parses a model reference. An existing local path always wins; `hf://` and
/// `https://huggingface.co/` always name the Hub; otherwise a string of the form `ORG/NAME`
/// that is not a local path names the Hub, and anything else is a (missing) local path.
pub fn parse(spec: &str) -> Result<ModelRef> {
    if let Some(rest) = spec.strip_prefix("hf://") {
        return hub_ref(spec, rest);
    }
    if let Some(rest) = spec.strip_prefix("https://huggingface.co/") {
        return hub_ref(spec, rest);
    }
    let p = Path::new(spec);
    if p.exists() || names_model_file(p) {
        return Ok(ModelRef::Local(p.to_path_buf()));
    }
    if is_repo_id(spec) {
        return hub_ref(spec, spec);
    }
    Ok(ModelRef::Local(p.to_path_buf()))
}

/// A path ending in a model file's extension (`models/x.gguf`) is a file the user means to
/// have, never a Hub repository, even when it is of the form ORG/NAME: its absence is then
/// reported as a missing file.
fn names_model_file(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["gguf", "safetensors"].contains(&e.to_ascii_lowercase().as_str()))
}

/// The download cache root (see the module docs).
pub fn cache_root() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("GROVE_HUB_CACHE") {
        return p;
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return p.join("grove/hub");
    }
    var("HOME")
        .map(|h| h.join(".cache/grove/hub"))
        .unwrap_or_else(|| std::env::temp_dir().join("grove-hub"))
}

/// Where a repository's files live in the cache: `<root>/ORG--NAME/REVISION`.
pub fn cache_dir(root: &Path, repo: &str, revision: &str) -> PathBuf {
    root.join(repo.replace('/', "--")).join(revision)
}

/// The error for a Hub reference in a build without the `hub` feature.
pub fn no_feature_error(spec: &str, repo: &str) -> Error {
    Error::config(
        "model",
        format!(
            "`{spec}` names the Hugging Face Hub repository {repo}, but this grove was built without \
             downloads: rebuild with `cargo build --release --features hub`, or download config.json, \
             tokenizer.json, tokenizer_config.json and the *.safetensors files yourself and pass \
             the folder"
        ),
    )
}

/// A local path for `spec`: itself when local, else the repository's cache folder, downloaded
/// first when needed (feature `hub`).
pub fn resolve(spec: &str) -> Result<PathBuf> {
    match parse(spec)? {
        ModelRef::Local(p) => Ok(p),
        ModelRef::Hub { repo, revision } => {
            #[cfg(feature = "hub")]
            {
                let endpoint = std::env::var("HF_ENDPOINT")
                    .ok()
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "https://huggingface.co".to_string());
                let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
                download(&endpoint, &repo, &revision, &cache_root(), token.as_deref())
            }
            #[cfg(not(feature = "hub"))]
            {
                let _ = revision;
                Err(no_feature_error(spec, &repo))
            }
        }
    }
}

/// [`resolve`] for a path argument (non-UTF-8 paths are local).
pub fn resolve_path(path: &Path) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    match path.to_str() {
        Some(s) => resolve(s),
        None => Ok(path.to_path_buf()),
    }
}

/// Shard file names listed in a `model.safetensors.index.json`, sorted and deduplicated, each
/// a plain file name (a download must not write outside its folder).
pub fn index_shards(index_json: &str, source: &str) -> Result<Vec<String>> {
    let shards = listed_shards(index_json, source)?;
    if let Some(bad) = shards.iter().find(|s| !valid_part(s)) {
        return Err(Error::checkpoint(
            source,
            format!("shard name `{bad}` is not a plain file name"),
        ));
    }
    Ok(shards)
}

/// Shard file names listed in a `model.safetensors.index.json`, sorted and deduplicated.
pub fn listed_shards(index_json: &str, source: &str) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(index_json)
        .map_err(|e| Error::checkpoint(source, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::checkpoint(source, "field `weight_map` missing or not an object"))?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str().map(String::from))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// Downloads `repo` at `revision` from `endpoint` into its cache folder under `root` and
/// returns that folder. Files already there are kept (each is written under a temporary
/// name and renamed, so a present file is complete).
#[cfg(feature = "hub")]
pub fn download(
    endpoint: &str,
    repo: &str,
    revision: &str,
    root: &Path,
    token: Option<&str>,
) -> Result<PathBuf> {
    use std::io::Write;
    let dir = cache_dir(root, repo, revision);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let base = endpoint.trim_end_matches('/');
    // Ok(true): downloaded or cached; Ok(false): the server has no such file (404).
    let fetch = |name: &str| -> Result<bool> {
        let dst = dir.join(name);
        if dst.is_file() {
            return Ok(true);
        }
        let url = format!("{base}/{repo}/resolve/{revision}/{name}");
        let mut req = agent.get(&url);
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = req
            .call()
            .map_err(|e| Error::Model(format!("downloading {url}: {e}")))?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Ok(false),
            401 | 403 => {
                return Err(Error::Model(format!(
                    "downloading {url}: HTTP {} (a gated or private repository needs HF_TOKEN)",
                    resp.status().as_u16()
                )))
            }
            s => return Err(Error::Model(format!("downloading {url}: HTTP {s}"))),
        }
        let tmp = dir.join(format!(".{name}.part-{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut reader = resp.body_mut().as_reader();
        std::io::copy(&mut reader, &mut f)
            .map_err(|e| Error::Model(format!("downloading {url}: {e}")))?;
        f.flush().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        Ok(true)
    };
    for name in REQUIRED_FILES {
        if !fetch(name)? {
            return Err(Error::Model(format!(
                "{repo}@{revision} on {base} has no {name} (grove loads Llama/Qwen2/Qwen3 \
                 safetensors repositories with a fast tokenizer)"
            )));
        }
    }
    for name in OPTIONAL_FILES {
        fetch(name)?;
    }
    if fetch("model.safetensors.index.json")? {
        let index = dir.join("model.safetensors.index.json");
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        for shard in index_shards(&text, &index.display().to_string())? {
            if !fetch(&shard)? {
                return Err(Error::Model(format!(
                    "{repo}@{revision}: shard {shard} listed in model.safetensors.index.json is missing"
                )));
            }
        }
    } else if !fetch("model.safetensors")? {
        return Err(Error::Model(format!(
            "{repo}@{revision} on {base} has neither model.safetensors nor \
             model.safetensors.index.json"
        )));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(repo: &str, rev: &str) -> ModelRef {
        ModelRef::Hub {
            repo: repo.into(),
            revision: rev.into(),
        }
    }

    #[test]
    fn references_parse() {
        assert_eq!(
            parse("hf://HuggingFaceTB/SmolLM2-135M-Instruct").unwrap(),
            hub("HuggingFaceTB/SmolLM2-135M-Instruct", "main")
        );
        assert_eq!(
            parse("hf://Qwen/Qwen3-0.6B@v1.0").unwrap(),
            hub("Qwen/Qwen3-0.6B", "v1.0")
        );
        assert_eq!(
            parse("https://huggingface.co/Qwen/Qwen2.5-0.5B/").unwrap(),
            hub("Qwen/Qwen2.5-0.5B", "main")
        );
        // A bare ORG/NAME is the Hub only when no such local path exists.
        assert_eq!(
            parse("no-such-org-xyz/no-such-model").unwrap(),
            hub("no-such-org-xyz/no-such-model", "main")
        );
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("org/name");
        std::fs::create_dir_all(&local).unwrap();
        let s = local.to_str().unwrap();
        assert_eq!(parse(s).unwrap(), ModelRef::Local(local.clone()));
        // Paths that cannot be repo ids stay local, existing or not.
        for p in [
            "./org/name",
            "/abs/missing",
            "model.gguf",
            "a/b/c",
            "runs/x/checkpoints/step-3",
        ] {
            assert_eq!(parse(p).unwrap(), ModelRef::Local(PathBuf::from(p)), "{p}");
        }
        for bad in [
            "hf://",
            "hf://justname",
            "hf://a/b/c",
            "hf://a/b@",
            "hf://a b/c",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn cache_layout_and_shard_index() {
        let root = Path::new("/cache");
        assert_eq!(
            cache_dir(root, "Qwen/Qwen3-0.6B", "main"),
            PathBuf::from("/cache/Qwen--Qwen3-0.6B/main")
        );
        let idx = r#"{"metadata": {"total_size": 10}, "weight_map": {
            "a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
            "c": "model-00001-of-00002.safetensors"}}"#;
        assert_eq!(
            index_shards(idx, "i").unwrap(),
            vec![
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        let e = index_shards(r#"{"weight_map": {"a": "../../etc/passwd"}}"#, "i")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a plain file name"), "{e}");
        assert!(index_shards("{}", "idx.json")
            .unwrap_err()
            .to_string()
            .contains("weight_map"));
    }

    #[test]
    fn local_paths_resolve_to_themselves() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(resolve_path(dir.path()).unwrap(), dir.path());
        assert_eq!(
            resolve("/definitely/missing/model.gguf").unwrap(),
            PathBuf::from("/definitely/missing/model.gguf")
        );
    }

    #[cfg(not(feature = "hub"))]
    #[test]
    fn hub_references_need_the_feature() {
        for spec in ["hf://Qwen/Qwen3-0.6B", "no-such-org-xyz/no-such-model"] {
            let e = resolve(spec).unwrap_err().to_string();
            assert!(e.contains("--features hub") && e.contains(spec), "{e}");
        }
    }

    /// Serves a local HF folder over plain HTTP in the Hub's URL layout.
    #[cfg(feature = "hub")]
    #[test]
    fn downloads_a_repository_from_a_local_server() {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data/models/gpt2-tiny-random");
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let port = server.server_addr().to_ip().unwrap().port();
        let served = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = served.clone();
        let handle = std::thread::spawn(move || {
            for req in server.incoming_requests() {
                let url = req.url().to_string();
                let name = url.rsplit('/').next().unwrap_or("").to_string();
                if url == "/stop" {
                    let _ = req.respond(tiny_http::Response::empty(200));
                    break;
                }
                log.lock().unwrap().push(url.clone());
                let ok = url.starts_with("/org/tiny/resolve/main/");
                match std::fs::read(src.join(&name)) {
                    Ok(bytes) if ok => {
                        let _ = req.respond(tiny_http::Response::from_data(bytes));
                    }
                    _ => {
                        let _ = req.respond(tiny_http::Response::empty(404));
                    }
                }
            }
        });
        let cache = tempfile::tempdir().unwrap();
        let endpoint = format!("http://127.0.0.1:{port}");
        let dir = download(&endpoint, "org/tiny", "main", cache.path(), None).unwrap();
        assert_eq!(dir, cache.path().join("org--tiny/main"));
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            assert!(dir.join(f).is_file(), "{f}");
        }
        let n = served.lock().unwrap().len();
        // A second call finds every present file in the cache and asks only for absent ones.
        download(&endpoint, "org/tiny", "main", cache.path(), None).unwrap();
        let again = served.lock().unwrap().len() - n;
        assert!(again < n, "{again} requests on a warm cache vs {n} cold");
        let e = download(&endpoint, "org/missing", "main", cache.path(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no config.json"), "{e}");
        let _ = ureq::get(&format!("{endpoint}/stop")).call();
        handle.join().unwrap();
    }
}
