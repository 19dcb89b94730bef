//! Secrets in a run config: the fields that can hold a password or key, declared once.
//!
//! What a run writes (config.toml, the TensorBoard and MLflow copies of it) is the config with
//! every secret replaced by `***` ([`redacted`]), so a run directory can be shared and read by
//! anyone without leaking a database password or an API key. A resumed run needs the secret
//! again: `grove train --resume DIR CONFIG` (the run's config file) or `--set`/`--buffer` with
//! the full value; [`missing`] names what is still hidden.
use super::RunConfig;
use crate::error::{redact_url, REDACTED};

/// How a field holds its secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holds {
    /// A URL whose userinfo password or `password=` parameter is secret.
    UrlPassword,
    /// The whole value is secret.
    Whole,
}

/// One config field that can hold a secret.
struct SecretField {
    /// Dotted config key, as in `--set`.
    key: &'static str,
    holds: Holds,
    value: fn(&mut RunConfig) -> Option<&mut String>,
}

fn sync_buffer(c: &mut RunConfig) -> Option<&mut String> {
    c.sync.buffer.as_mut()
}
fn report_mlflow(c: &mut RunConfig) -> Option<&mut String> {
    c.report.mlflow.as_mut()
}
fn remote_url(c: &mut RunConfig) -> Option<&mut String> {
    c.remote.as_mut().map(|r| &mut r.url)
}
fn remote_api_key(c: &mut RunConfig) -> Option<&mut String> {
    c.remote.as_mut().and_then(|r| r.api_key.as_mut())
}
fn remote_admin_token(c: &mut RunConfig) -> Option<&mut String> {
    c.remote.as_mut().and_then(|r| r.admin_token.as_mut())
}

/// Every field that can hold a secret.
const SECRET_FIELDS: &[SecretField] = &[
    SecretField {
        key: "sync.buffer",
        holds: Holds::UrlPassword,
        value: sync_buffer,
    },
    SecretField {
        key: "report.mlflow",
        holds: Holds::UrlPassword,
        value: report_mlflow,
    },
    SecretField {
        key: "remote.url",
        holds: Holds::UrlPassword,
        value: remote_url,
    },
    SecretField {
        key: "remote.api_key",
        holds: Holds::Whole,
        value: remote_api_key,
    },
    SecretField {
        key: "remote.admin_token",
        holds: Holds::Whole,
        value: remote_admin_token,
    },
];

fn hide(holds: Holds, value: &str) -> String {
    match holds {
        Holds::UrlPassword => redact_url(value),
        Holds::Whole => REDACTED.to_string(),
    }
}

/// The config with every secret replaced by `***` (what is written to disk and to trackers).
pub fn redacted(cfg: &RunConfig) -> RunConfig {
    let mut out = cfg.clone();
    for f in SECRET_FIELDS {
        if let Some(v) = (f.value)(&mut out) {
            *v = hide(f.holds, v);
        }
    }
    out
}

/// The keys whose value is (or holds) a hidden secret, e.g. a config read back from a run
/// directory: such a config cannot reach its services until the secret is given again.
pub fn missing(cfg: &RunConfig) -> Vec<&'static str> {
    let mut cfg = cfg.clone();
    SECRET_FIELDS
        .iter()
        .filter(|f| {
            (f.value)(&mut cfg).is_some_and(|v| match f.holds {
                Holds::Whole => v == REDACTED,
                Holds::UrlPassword => {
                    v.contains(&format!(":{REDACTED}@")) || v.contains(&format!("={REDACTED}"))
                }
            })
        })
        .map(|f| f.key)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::remote::RemoteConfig;

    fn with_secrets() -> RunConfig {
        let mut cfg = RunConfig::default();
        cfg.sync.buffer = Some("postgres://grove:hunter2@db:5432/runs#t".into());
        cfg.sync.publish_dir = Some("pub".into());
        cfg.report.mlflow = Some("http://me:tok3n@127.0.0.1:5000".into());
        let mut remote = RemoteConfig::new("http://127.0.0.1:8000");
        remote.api_key = Some("sk-live-1234".into());
        remote.admin_token = Some("adm-5678".into());
        cfg.remote = Some(remote);
        cfg
    }

    #[test]
    fn saved_config_holds_no_secret() {
        let cfg = with_secrets();
        let text = cfg.to_toml().unwrap();
        for secret in ["hunter2", "tok3n", "sk-live-1234", "adm-5678"] {
            assert!(!text.contains(secret), "{secret} written in clear:\n{text}");
        }
        assert!(
            text.contains("postgres://grove:***@db:5432/runs#t"),
            "{text}"
        );
        assert!(text.contains("api_key = \"***\""), "{text}");
        // Everything else is kept: the URL without a password is unchanged.
        assert!(text.contains("http://127.0.0.1:8000"), "{text}");
    }

    #[test]
    fn missing_names_the_hidden_fields() {
        let cfg = with_secrets();
        assert!(missing(&cfg).is_empty());
        assert_eq!(
            missing(&redacted(&cfg)),
            vec![
                "sync.buffer",
                "report.mlflow",
                "remote.api_key",
                "remote.admin_token"
            ]
        );
        // Redacting is idempotent: a config read back from a run redacts to itself.
        assert_eq!(redacted(&redacted(&cfg)), redacted(&cfg));
    }
}
