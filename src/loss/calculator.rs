//! The loss calculator behind the CLI: JSON in, `{"loss": x, "grad_logp": [[...]]}` out, through
//! exactly the same [`compute`] the trainer uses.
//!
//! Input (one row per sequence, one entry per token):
//! ```json
//! {"logp": [[...]], "logp_old": [[...]], "logp_ref": [[...]], "mask": [[...]], "adv": [...],
//!  "kl_weight": [...], "expert": [...]}
//! ```
//! `logp` and `logp_old` are required; `logp_ref` is optional; `mask` defaults to all 1; `adv`
//! has one scalar per sequence (broadcast to its tokens) or one row per sequence; `kl_weight`
//! (DADS, default 1) and `expert` (SFT mix, default false) have one entry per sequence.
//!
//! `--param key=value` sets any [`LossConfig`] field; the value is parsed as JSON when it can be
//! (numbers, booleans, null) and taken as a string otherwise (`rec_mask=one-side`). Without
//! `--agg` the aggregation is the config default, except `seq-mean-token-mean` for `topr` (the
//! only aggregation TOPR accepts).

use serde::Serialize;
use serde_json::{Map, Value};

use super::compute::{compute, SeqInput};
use super::config::{Aggregation, LossConfig, PolicyLoss};
use super::LossError;

/// Input keys, in the order the documentation lists them.
const INPUT_KEYS: &[&str] = &[
    "logp",
    "logp_old",
    "logp_ref",
    "mask",
    "adv",
    "kl_weight",
    "expert",
];

/// The calculator's output document (field order as printed).
#[derive(Serialize)]
struct CalcOutput<'a> {
    loss: f64,
    grad_logp: &'a [Vec<f64>],
}

/// Parses the input, builds the config from `loss`, `agg` and `params`, runs [`compute`] and
/// returns `{"loss": x, "grad_logp": [[...]]}` as one line of JSON.
pub fn run_calculator(
    input_json: &str,
    loss: &str,
    agg: Option<&str>,
    params: &[String],
) -> Result<String, LossError> {
    let cfg = build_config(loss, agg, params)?;
    let seqs = parse_input(input_json)?;
    let out = compute(&cfg, &seqs)?;
    let doc = CalcOutput {
        loss: out.loss,
        grad_logp: &out.grad_logp,
    };
    serde_json::to_string(&doc).map_err(|e| LossError::Input(format!("cannot print output: {e}")))
}

/// The config for `loss`, `agg` (default per loss, see module docs) and `key=value` params.
pub fn build_config(
    loss: &str,
    agg: Option<&str>,
    params: &[String],
) -> Result<LossConfig, LossError> {
    let loss = PolicyLoss::from_name(loss)?;
    let agg = match agg {
        Some(name) => Aggregation::from_name(name)?,
        None if loss == PolicyLoss::Topr => Aggregation::SeqMeanTokenMean,
        None => LossConfig::default().agg,
    };
    let mut cfg = LossConfig {
        loss,
        agg,
        ..Default::default()
    };
    for param in params {
        cfg = apply_param(&cfg, param)?;
    }
    Ok(cfg)
}

/// Sets one `key=value` on a copy of `cfg` through serde, so every field and its type checks
/// come from `LossConfig` itself.
fn apply_param(cfg: &LossConfig, param: &str) -> Result<LossConfig, LossError> {
    let Some((key, raw)) = param.split_once('=') else {
        return Err(LossError::BadParam {
            key: param.to_string(),
            value: String::new(),
            reason: "expected key=value".into(),
        });
    };
    let (key, raw) = (key.trim(), raw.trim());
    let mut fields = match serde_json::to_value(cfg) {
        Ok(Value::Object(map)) => map,
        _ => {
            return Err(LossError::Input(
                "loss config did not serialise to an object".into(),
            ))
        }
    };
    if !fields.contains_key(key) {
        return Err(LossError::UnknownParam {
            key: key.to_string(),
            known: fields.keys().cloned().collect::<Vec<_>>().join(", "),
        });
    }
    let value = serde_json::from_str::<Value>(raw).unwrap_or_else(|_| Value::String(raw.into()));
    fields.insert(key.to_string(), value);
    serde_json::from_value(Value::Object(fields)).map_err(|e| LossError::BadParam {
        key: key.to_string(),
        value: raw.to_string(),
        reason: e.to_string(),
    })
}

fn input_error(msg: impl Into<String>) -> LossError {
    LossError::Input(msg.into())
}

/// The JSON type of `v` and a short rendering, for "found ..." messages.
fn describe(v: &Value) -> String {
    let kind = crate::error::json_kind(v);
    let mut text = v.to_string();
    if text.len() > 40 {
        text = format!("{}…", text.chars().take(40).collect::<String>());
    }
    format!("{kind} ({text})")
}

/// Parses the calculator input into one [`SeqInput`] per row of `logp`.
pub fn parse_input(input_json: &str) -> Result<Vec<SeqInput>, LossError> {
    let doc: Value = serde_json::from_str(input_json)
        .map_err(|e| input_error(format!("malformed JSON: {e}")))?;
    let Value::Object(obj) = doc else {
        return Err(input_error(format!(
            "expected a JSON object with keys {}, found {}",
            INPUT_KEYS.join(", "),
            describe(&doc)
        )));
    };
    if let Some(key) = obj.keys().find(|k| !INPUT_KEYS.contains(&k.as_str())) {
        return Err(input_error(format!(
            "unknown key '{key}'; valid keys: {}",
            INPUT_KEYS.join(", ")
        )));
    }
    let logp = required_matrix(&obj, "logp")?;
    let lens: Vec<usize> = logp.iter().map(Vec::len).collect();
    let logp_old = required_matrix(&obj, "logp_old")?;
    check_rows("logp_old", &logp_old, &lens)?;
    let logp_ref = optional_matrix(&obj, "logp_ref")?;
    if let Some(r) = &logp_ref {
        check_rows("logp_ref", r, &lens)?;
    }
    let mask = match optional_matrix(&obj, "mask")? {
        Some(m) => {
            check_rows("mask", &m, &lens)?;
            m
        }
        None => lens.iter().map(|&n| vec![1.0; n]).collect(),
    };
    let adv = parse_adv(&obj, &lens)?;
    let kl_weight = per_sequence(
        &obj,
        "kl_weight",
        lens.len(),
        1.0,
        Value::as_f64,
        "a number",
    )?;
    let expert = per_sequence(
        &obj,
        "expert",
        lens.len(),
        false,
        Value::as_bool,
        "a boolean",
    )?;

    let mut logp_ref = logp_ref.map(Vec::into_iter);
    let seqs = logp
        .into_iter()
        .zip(logp_old)
        .zip(mask)
        .zip(adv)
        .zip(kl_weight.into_iter().zip(expert))
        .map(
            |((((logp, logp_old), mask), adv), (kl_weight, expert))| SeqInput {
                logp_ref: logp_ref.as_mut().and_then(Iterator::next),
                kl_weight,
                expert,
                ..SeqInput::new(logp, logp_old, mask, adv)
            },
        )
        .collect();
    Ok(seqs)
}

fn required_matrix(obj: &Map<String, Value>, key: &str) -> Result<Vec<Vec<f64>>, LossError> {
    optional_matrix(obj, key)?.ok_or_else(|| {
        input_error(format!(
            "{key} is missing (expected an array with one array of numbers per sequence)"
        ))
    })
}

fn optional_matrix(
    obj: &Map<String, Value>,
    key: &str,
) -> Result<Option<Vec<Vec<f64>>>, LossError> {
    let Some(v) = obj.get(key) else {
        return Ok(None);
    };
    let Value::Array(rows) = v else {
        return Err(input_error(format!(
            "{key} must be an array of rows (one per sequence), found {}",
            describe(v)
        )));
    };
    rows.iter()
        .enumerate()
        .map(|(i, row)| number_row(row, &format!("{key}[{i}]")))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// An array of numbers; `at` names it in errors, e.g. `logp[1]`.
fn number_row(row: &Value, at: &str) -> Result<Vec<f64>, LossError> {
    let Value::Array(items) = row else {
        return Err(input_error(format!(
            "{at} must be an array of numbers, found {}",
            describe(row)
        )));
    };
    items
        .iter()
        .enumerate()
        .map(|(t, x)| {
            x.as_f64().ok_or_else(|| {
                input_error(format!("{at}[{t}] must be a number, found {}", describe(x)))
            })
        })
        .collect()
}

/// `rows` has one row per sequence, each as long as the matching `logp` row.
fn check_rows(key: &str, rows: &[Vec<f64>], lens: &[usize]) -> Result<(), LossError> {
    if rows.len() != lens.len() {
        return Err(input_error(format!(
            "{key} has {} rows but logp has {}",
            rows.len(),
            lens.len()
        )));
    }
    for (i, (row, &n)) in rows.iter().zip(lens).enumerate() {
        if row.len() != n {
            return Err(input_error(format!(
                "{key}[{i}] has {} entries but logp[{i}] has {n}",
                row.len()
            )));
        }
    }
    Ok(())
}

/// `adv`: one entry per sequence, each a scalar (broadcast) or a row as long as `logp`'s.
fn parse_adv(obj: &Map<String, Value>, lens: &[usize]) -> Result<Vec<Vec<f64>>, LossError> {
    let Some(v) = obj.get("adv") else {
        return Err(input_error(
            "adv is missing (expected one number, or one array of numbers, per sequence)",
        ));
    };
    let Value::Array(entries) = v else {
        return Err(input_error(format!(
            "adv must be an array with one entry per sequence, found {}",
            describe(v)
        )));
    };
    if entries.len() != lens.len() {
        return Err(input_error(format!(
            "adv has {} entries but logp has {} rows",
            entries.len(),
            lens.len()
        )));
    }
    entries
        .iter()
        .zip(lens)
        .enumerate()
        .map(|(i, (e, &n))| match e {
            Value::Number(_) => Ok(vec![e.as_f64().unwrap_or(f64::NAN); n]),
            Value::Array(_) => {
                let row = number_row(e, &format!("adv[{i}]"))?;
                if row.len() != n {
                    return Err(input_error(format!(
                        "adv[{i}] has {} entries but logp[{i}] has {n}",
                        row.len()
                    )));
                }
                Ok(row)
            }
            other => Err(input_error(format!(
                "adv[{i}] must be a number or an array of numbers, found {}",
                describe(other)
            ))),
        })
        .collect()
}

/// An optional per-sequence array (`kl_weight`, `expert`) with a default for every sequence.
fn per_sequence<T: Copy>(
    obj: &Map<String, Value>,
    key: &str,
    n: usize,
    default: T,
    read: fn(&Value) -> Option<T>,
    expected: &str,
) -> Result<Vec<T>, LossError> {
    let Some(v) = obj.get(key) else {
        return Ok(vec![default; n]);
    };
    let Value::Array(items) = v else {
        return Err(input_error(format!(
            "{key} must be an array with one entry per sequence, found {}",
            describe(v)
        )));
    };
    if items.len() != n {
        return Err(input_error(format!(
            "{key} has {} entries but logp has {n} rows",
            items.len()
        )));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, x)| {
            read(x).ok_or_else(|| {
                input_error(format!(
                    "{key}[{i}] must be {expected}, found {}",
                    describe(x)
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::compute::LossOutput;
    use super::super::config::{RecMask, RecWeight};
    use super::*;

    const INPUT: &str = r#"{
        "logp":     [[-1.0, -0.5, -2.0], [-0.3, -1.2]],
        "logp_old": [[-1.2, -0.5, -1.0], [-0.6, -1.0]],
        "adv": [1.0, -0.5]
    }"#;

    fn err_text(r: Result<String, LossError>) -> String {
        r.expect_err("should fail").to_string()
    }

    fn expected_seqs() -> Vec<SeqInput> {
        vec![
            SeqInput::new(
                vec![-1.0, -0.5, -2.0],
                vec![-1.2, -0.5, -1.0],
                vec![1.0; 3],
                vec![1.0; 3],
            ),
            SeqInput::new(
                vec![-0.3, -1.2],
                vec![-0.6, -1.0],
                vec![1.0; 2],
                vec![-0.5; 2],
            ),
        ]
    }

    fn printed(out: &LossOutput) -> String {
        serde_json::to_string(&CalcOutput {
            loss: out.loss,
            grad_logp: &out.grad_logp,
        })
        .expect("json")
    }

    #[test]
    fn prints_exactly_what_compute_returns() {
        let text = run_calculator(INPUT, "ppo-clip", None, &[]).expect("run");
        let out = compute(&LossConfig::default(), &expected_seqs()).expect("compute");
        assert_eq!(text, printed(&out));
        assert!(text.starts_with("{\"loss\":"), "{text}");
        let parsed: Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(parsed["loss"].as_f64(), Some(out.loss));
        assert_eq!(
            parsed["grad_logp"][1][0].as_f64(),
            Some(out.grad_logp[1][0])
        );
    }

    #[test]
    fn parses_broadcast_and_per_token_advantages_alike() {
        let rows = r#"{"logp": [[-1.0, -0.5, -2.0], [-0.3, -1.2]],
                       "logp_old": [[-1.2, -0.5, -1.0], [-0.6, -1.0]],
                       "adv": [[1.0, 1.0, 1.0], -0.5]}"#;
        assert_eq!(parse_input(rows), Ok(expected_seqs()));
        assert_eq!(parse_input(INPUT), Ok(expected_seqs()));
    }

    #[test]
    fn optional_fields_are_read() {
        let text = r#"{"logp": [[-1.0, -2.0]], "logp_old": [[-1.0, -2.0]], "adv": [1],
                       "logp_ref": [[-1.5, -1.5]], "mask": [[1, 0]], "kl_weight": [0.5],
                       "expert": [false]}"#;
        let seqs = parse_input(text).expect("parse");
        assert_eq!(seqs[0].logp_ref, Some(vec![-1.5, -1.5]));
        assert_eq!(seqs[0].mask, vec![1.0, 0.0]);
        assert_eq!(seqs[0].kl_weight, 0.5);
        // reinforce + k2 with β = 0.1 on the one valid token: 1 + 0.5·0.1·0.125 = 1.00625
        let params = ["kl_coef=0.1".to_string(), "kl_estimator=k2".to_string()];
        let out = run_calculator(text, "reinforce", None, &params).expect("run");
        assert_eq!(out, r#"{"loss":1.00625,"grad_logp":[[-0.975,0.0]]}"#);
    }

    #[test]
    fn ragged_rows_are_named() {
        let text = r#"{"logp": [[-1, -1], [-1, -1, -1, -1]], "logp_old": [[-1, -1], [-1, -1, -1]], "adv": [1, 1]}"#;
        assert_eq!(
            err_text(run_calculator(text, "ppo-clip", None, &[])),
            "calculator input: logp_old[1] has 3 entries but logp[1] has 4"
        );
        let text = r#"{"logp": [[-1, -1]], "logp_old": [[-1, -1]], "adv": [[1, 1, 1]]}"#;
        assert_eq!(
            err_text(run_calculator(text, "ppo-clip", None, &[])),
            "calculator input: adv[0] has 3 entries but logp[0] has 2"
        );
        let text = r#"{"logp": [[-1], [-1]], "logp_old": [[-1], [-1]], "adv": [1]}"#;
        assert_eq!(
            err_text(run_calculator(text, "ppo-clip", None, &[])),
            "calculator input: adv has 1 entries but logp has 2 rows"
        );
    }

    #[test]
    fn malformed_json_and_wrong_types_are_named() {
        let e = err_text(run_calculator("{\"logp\": [[-1,]]", "ppo-clip", None, &[]));
        assert!(e.starts_with("calculator input: malformed JSON:"), "{e}");
        let text = r#"{"logp": [[-1, "x"]], "logp_old": [[-1, -1]], "adv": [1]}"#;
        assert_eq!(
            err_text(run_calculator(text, "ppo-clip", None, &[])),
            "calculator input: logp[0][1] must be a number, found a string (\"x\")"
        );
        let text = r#"{"logp": [-1], "logp_old": [[-1]], "adv": [1]}"#;
        assert_eq!(
            err_text(run_calculator(text, "ppo-clip", None, &[])),
            "calculator input: logp[0] must be an array of numbers, found a number (-1)"
        );
        let text = r#"{"logp": [[-1]], "logp_old": [[-1]], "adv": ["big"]}"#;
        assert!(err_text(run_calculator(text, "ppo-clip", None, &[]))
            .contains("adv[0] must be a number or an array of numbers"));
        let e = err_text(run_calculator("[1, 2]", "ppo-clip", None, &[]));
        assert!(e.contains("expected a JSON object"), "{e}");
    }

    #[test]
    fn missing_and_unknown_keys_are_named() {
        let e = err_text(run_calculator(
            r#"{"logp_old": [[-1]], "adv": [1]}"#,
            "ppo-clip",
            None,
            &[],
        ));
        assert!(e.contains("logp is missing"), "{e}");
        let e = err_text(run_calculator(
            r#"{"logp": [[-1]], "logp_old": [[-1]], "adv": [1], "advantage": 1}"#,
            "ppo-clip",
            None,
            &[],
        ));
        assert!(
            e.contains("unknown key 'advantage'; valid keys: logp, logp_old"),
            "{e}"
        );
    }

    #[test]
    fn params_set_config_fields() {
        let cfg = build_config(
            "rec",
            None,
            &[
                "rec_mask=one-side".into(),
                "rec_weight=is".into(),
                "eps_high=0.28".into(),
                "dual_clip=null".into(),
            ],
        )
        .expect("cfg");
        assert_eq!(cfg.rec_mask, RecMask::OneSide);
        assert_eq!(cfg.rec_weight, RecWeight::Is);
        assert_eq!(cfg.eps_high, 0.28);
        let cfg = build_config(
            "ppo-clip",
            Some("seq-mean-token-sum-norm"),
            &["max_len=512".into(), "dual_clip=3".into()],
        )
        .expect("cfg");
        assert_eq!((cfg.max_len, cfg.dual_clip), (Some(512), Some(3.0)));
        // a changed clip changes the result: ρ = exp(0.2) = 1.2214 > 1.2 is clipped at 0.2 only
        let clipped = run_calculator(INPUT, "ppo-clip", None, &[]).expect("run");
        let wider =
            run_calculator(INPUT, "ppo-clip", None, &["eps_high=0.28".into()]).expect("run");
        assert_ne!(clipped, wider);
    }

    #[test]
    fn bad_params_are_rejected_with_the_valid_keys() {
        let e = err_text(run_calculator(
            INPUT,
            "ppo-clip",
            None,
            &["epsilon=0.2".into()],
        ));
        assert!(
            e.starts_with("unknown --param key 'epsilon'; valid keys: "),
            "{e}"
        );
        assert!(e.contains("eps_low") && e.contains("kl_estimator"), "{e}");
        let e = err_text(run_calculator(
            INPUT,
            "ppo-clip",
            None,
            &["eps_low=wide".into()],
        ));
        assert!(
            e.starts_with("--param eps_low=wide: invalid type: string"),
            "{e}"
        );
        let e = err_text(run_calculator(INPUT, "ppo-clip", None, &["eps_low".into()]));
        assert!(e.contains("expected key=value"), "{e}");
        let e = err_text(run_calculator(
            INPUT,
            "ppo-clip",
            None,
            &["eps_low=1.5".into()],
        ));
        assert!(e.contains("eps_low must be in (0, 1), found 1.5"), "{e}");
    }

    #[test]
    fn names_of_loss_and_aggregation_are_checked() {
        let e = err_text(run_calculator(INPUT, "grpo", None, &[]));
        assert!(
            e.contains("unknown policy loss 'grpo'; known names: reinforce, ppo-clip"),
            "{e}"
        );
        let e = err_text(run_calculator(INPUT, "ppo-clip", Some("mean"), &[]));
        assert!(e.contains("unknown aggregation 'mean'"), "{e}");
    }

    #[test]
    fn topr_defaults_to_its_per_sequence_aggregation() {
        assert!(run_calculator(INPUT, "topr", None, &[]).is_ok());
        let e = err_text(run_calculator(INPUT, "topr", Some("token-mean"), &[]));
        assert!(
            e.contains("agg must be seq-mean-token-mean for loss = topr"),
            "{e}"
        );
    }
}
