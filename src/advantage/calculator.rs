//! The `grove advantage --estimator NAME [--param key=value]...` calculator.
//!
//! Input JSON: `{"groups": [[r, ...], ...]}` plus, optionally, with the same nesting (one entry
//! per response): `"correct"` (booleans or 0/1), `"lengths"` (non-negative integers),
//! `"durations"` (seconds; `null` or a negative number = unparsable), `"ground_truth"` (booleans
//! or 0/1), `"components"` (a list of numbers per response); and `"all_rewards"` (one list per
//! group, any length). Output: `{"advantages": [[...], ...]}`.
//!
//! `--param key=value` sets an [`AdvantageConfig`] field by its name, dotted for sub-tables
//! (`eps=1e-8`, `std=population`, `bnpo.alpha=1`, `stcr.enabled=true`). The value is read as a
//! JSON number, boolean or null, else as a string. The calculator prints exactly what
//! [`compute`] returns.

use serde_json::{json, Value};

use super::{compute, AdvantageConfig, AdvantageError, AdvantageOutput, Estimator, Group};

/// Fields the input JSON may have.
pub const INPUT_FIELDS: [&str; 7] = [
    "groups",
    "correct",
    "lengths",
    "durations",
    "ground_truth",
    "components",
    "all_rewards",
];

/// Parses the input and parameters, runs [`compute`], and renders its advantages as JSON.
pub fn run_calculator(
    input_json: &str,
    estimator: &str,
    params: &[String],
) -> Result<String, AdvantageError> {
    let estimator = Estimator::from_name(estimator)?;
    let cfg = config_from_params(estimator, params)?;
    let groups = parse_input(input_json)?;
    let out = compute(&cfg, &groups)?;
    render_output(&out)
}

/// `{"advantages": [[...], ...]}` for an output of [`compute`].
pub fn render_output(out: &AdvantageOutput) -> Result<String, AdvantageError> {
    serde_json::to_string(&json!({ "advantages": out.advantages })).map_err(|e| {
        AdvantageError::Input {
            at: "output".to_string(),
            message: format!("could not be written as JSON: {e}"),
        }
    })
}

/// Every key `--param` accepts (dotted paths of the config's leaves).
pub fn param_keys() -> Vec<String> {
    let value = serde_json::to_value(AdvantageConfig::default()).unwrap_or(Value::Null);
    let mut keys = Vec::new();
    collect_leaf_keys(&value, "", &mut keys);
    keys
}

fn collect_leaf_keys(value: &Value, prefix: &str, keys: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                collect_leaf_keys(v, &path, keys);
            }
        }
        _ => keys.push(prefix.to_string()),
    }
}

/// The default config with `estimator` and each `key=value` applied in order.
pub fn config_from_params(
    estimator: Estimator,
    params: &[String],
) -> Result<AdvantageConfig, AdvantageError> {
    let mut cfg = AdvantageConfig {
        estimator,
        ..AdvantageConfig::default()
    };
    let valid = param_keys();
    for param in params {
        let (key, raw) = param
            .split_once('=')
            .ok_or_else(|| AdvantageError::InvalidParam {
                param: param.clone(),
                message: "expected key=value".to_string(),
            })?;
        let key = key.trim();
        if !valid.iter().any(|k| k == key) {
            return Err(AdvantageError::UnknownParam {
                key: key.to_string(),
                valid: valid.join(", "),
            });
        }
        let mut value = serde_json::to_value(&cfg).map_err(|e| AdvantageError::InvalidParam {
            param: param.clone(),
            message: e.to_string(),
        })?;
        set_path(&mut value, key, parse_param_value(raw));
        cfg = serde_json::from_value(value).map_err(|e| AdvantageError::InvalidParam {
            param: param.clone(),
            message: e.to_string(),
        })?;
    }
    Ok(cfg)
}

/// A JSON number, boolean or null when the text is one, else the text as a string.
fn parse_param_value(raw: &str) -> Value {
    match serde_json::from_str::<Value>(raw.trim()) {
        Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::Null)) => v,
        _ => Value::String(raw.trim().to_string()),
    }
}

fn set_path(root: &mut Value, dotted: &str, new: Value) {
    let mut node = root;
    for part in dotted.split('.') {
        match node.get_mut(part) {
            Some(next) => node = next,
            None => return,
        }
    }
    *node = new;
}

fn input_error(at: impl Into<String>, message: impl Into<String>) -> AdvantageError {
    AdvantageError::Input {
        at: at.into(),
        message: message.into(),
    }
}

/// A short description of a JSON value for error messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

fn as_array<'a>(v: &'a Value, at: &str) -> Result<&'a Vec<Value>, AdvantageError> {
    v.as_array()
        .ok_or_else(|| input_error(at, format!("is not an array (found {})", describe(v))))
}

fn number(v: &Value, at: &str) -> Result<f64, AdvantageError> {
    v.as_f64()
        .ok_or_else(|| input_error(at, format!("is not a number (found {})", describe(v))))
}

fn flag(v: &Value, at: &str) -> Result<bool, AdvantageError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) if n.as_f64() == Some(0.0) => Ok(false),
        Value::Number(n) if n.as_f64() == Some(1.0) => Ok(true),
        _ => Err(input_error(
            at,
            format!("is not a boolean or 0/1 (found {})", describe(v)),
        )),
    }
}

fn count(v: &Value, at: &str) -> Result<usize, AdvantageError> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            input_error(
                at,
                format!("is not a non-negative integer (found {})", describe(v)),
            )
        })
}

/// A duration in seconds; `null` is an unparsable action (NaN).
fn duration(v: &Value, at: &str) -> Result<f64, AdvantageError> {
    match v {
        Value::Null => Ok(f64::NAN),
        _ => v.as_f64().ok_or_else(|| {
            input_error(
                at,
                format!("is not a number or null (found {})", describe(v)),
            )
        }),
    }
}

fn number_list(v: &Value, at: &str) -> Result<Vec<f64>, AdvantageError> {
    as_array(v, at)?
        .iter()
        .enumerate()
        .map(|(k, x)| number(x, &format!("{at}[{k}]")))
        .collect()
}

/// `field` as a list of lists, each element read by `parse`.
fn nested<T>(
    v: &Value,
    field: &str,
    parse: impl Fn(&Value, &str) -> Result<T, AdvantageError>,
) -> Result<Vec<Vec<T>>, AdvantageError> {
    as_array(v, field)?
        .iter()
        .enumerate()
        .map(|(g, inner)| {
            let at = format!("{field}[{g}]");
            as_array(inner, &at)?
                .iter()
                .enumerate()
                .map(|(i, x)| parse(x, &format!("{at}[{i}]")))
                .collect()
        })
        .collect()
}

/// An optional field with one entry per response, checked against the group sizes.
fn per_response<T>(
    root: &serde_json::Map<String, Value>,
    field: &str,
    sizes: &[usize],
    parse: impl Fn(&Value, &str) -> Result<T, AdvantageError>,
) -> Result<Vec<Option<Vec<T>>>, AdvantageError> {
    let Some(v) = root.get(field) else {
        return Ok(sizes.iter().map(|_| None).collect());
    };
    let lists = nested(v, field, parse)?;
    if lists.len() != sizes.len() {
        return Err(input_error(
            field,
            format!("has {} groups but groups has {}", lists.len(), sizes.len()),
        ));
    }
    for (g, (list, &size)) in lists.iter().zip(sizes).enumerate() {
        if list.len() != size {
            return Err(input_error(
                format!("{field}[{g}]"),
                format!("has {} entries but groups[{g}] has {size}", list.len()),
            ));
        }
    }
    Ok(lists.into_iter().map(Some).collect())
}

/// Reads the calculator's input JSON into groups; errors name the field and position.
pub fn parse_input(input_json: &str) -> Result<Vec<Group>, AdvantageError> {
    let root: Value = serde_json::from_str(input_json)
        .map_err(|e| input_error("input", format!("is not valid JSON: {e}")))?;
    let obj = root.as_object().ok_or_else(|| {
        input_error(
            "input",
            format!(
                "is not a JSON object like {{\"groups\": [[1, 0], ...]}} (found {})",
                describe(&root)
            ),
        )
    })?;
    if let Some(unknown) = obj.keys().find(|k| !INPUT_FIELDS.contains(&k.as_str())) {
        return Err(input_error(
            format!("input field `{unknown}`"),
            format!("is not known; known fields: {}", INPUT_FIELDS.join(", ")),
        ));
    }
    let groups_value = obj.get("groups").ok_or_else(|| {
        input_error(
            "groups",
            "is missing; expected {\"groups\": [[r, ...], ...]}",
        )
    })?;
    let rewards = nested(groups_value, "groups", number)?;
    let sizes: Vec<usize> = rewards.iter().map(|r| r.len()).collect();
    let correct = per_response(obj, "correct", &sizes, flag)?;
    let lengths = per_response(obj, "lengths", &sizes, count)?;
    let durations = per_response(obj, "durations", &sizes, duration)?;
    let ground_truth = per_response(obj, "ground_truth", &sizes, flag)?;
    let components = per_response(obj, "components", &sizes, number_list)?;
    let all_rewards: Vec<Option<Vec<f64>>> = match obj.get("all_rewards") {
        None => sizes.iter().map(|_| None).collect(),
        Some(v) => {
            let lists = nested(v, "all_rewards", number)?;
            if lists.len() != sizes.len() {
                return Err(input_error(
                    "all_rewards",
                    format!("has {} groups but groups has {}", lists.len(), sizes.len()),
                ));
            }
            lists.into_iter().map(Some).collect()
        }
    };
    let mut groups = Vec::with_capacity(rewards.len());
    let fields = correct
        .into_iter()
        .zip(lengths)
        .zip(durations)
        .zip(ground_truth)
        .zip(components)
        .zip(all_rewards);
    for (rewards, (((((correct, lengths), durations), ground_truth), components), all_rewards)) in
        rewards.into_iter().zip(fields)
    {
        groups.push(Group {
            rewards,
            correct,
            lengths,
            durations,
            all_rewards,
            components,
            ground_truth,
        });
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    fn advantages_of(output: &str) -> Vec<Vec<f64>> {
        let v: Value = serde_json::from_str(output).unwrap();
        serde_json::from_value(v["advantages"].clone()).unwrap()
    }

    #[test]
    fn prints_exactly_what_compute_returns() {
        let input = r#"{"groups": [[1, 0, 0.5], [0.2, 0.2], [1]],
                        "lengths": [[10, 30, 5], [4, 4], [7]],
                        "correct": [[1, 0, true], [false, false], [true]]}"#;
        let cases: Vec<(&str, Vec<String>)> = vec![
            ("grpo", vec![]),
            ("grpo", params(&["std=population", "eps=1e-8"])),
            ("rloo", vec![]),
            ("opmd", params(&["opmd.tau=0.5"])),
            ("w-reinforce", params(&["w_reinforce.lambda=1"])),
            ("bnpo", vec![]),
            (
                "group-mean",
                params(&[
                    "stcr.enabled=true",
                    "stcr.base=2",
                    "red_weight.enabled=true",
                ]),
            ),
            (
                "noisy-backward",
                params(&["noisy.rho0=0.1", "noisy.rho1=0.2"]),
            ),
        ];
        let groups = parse_input(input).unwrap();
        for (estimator, p) in cases {
            let printed = run_calculator(input, estimator, &p).unwrap();
            let cfg = config_from_params(Estimator::from_name(estimator).unwrap(), &p).unwrap();
            let expected = compute(&cfg, &groups).unwrap();
            // the printed text is the rendering of compute's output, character for character
            assert_eq!(
                printed,
                render_output(&expected).unwrap(),
                "{estimator} {p:?}"
            );
            // and reads back as those numbers (serde_json's default float parser may differ in
            // the last bit, hence the 1e-15 relative tolerance)
            let read = advantages_of(&printed);
            assert_eq!(read.len(), expected.advantages.len());
            for (r, e) in read.iter().zip(&expected.advantages) {
                assert_eq!(r.len(), e.len());
                for (x, y) in r.iter().zip(e) {
                    assert!(
                        (x - y).abs() <= 1e-15 * y.abs().max(1.0),
                        "{estimator}: {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn grpo_two_samples_output() {
        // ±0.5/(0.7071068 + 1e-6) = ±0.7071058
        let out = run_calculator(r#"{"groups": [[1, 0]]}"#, "grpo", &[]).unwrap();
        let a = advantages_of(&out);
        assert!((a[0][0] - 0.707_105_8).abs() < 1e-6 && (a[0][1] + 0.707_105_8).abs() < 1e-6);
        assert!(out.starts_with("{\"advantages\":[["), "{out}");
    }

    #[test]
    fn params_reach_nested_fields() {
        let cfg = config_from_params(
            Estimator::Bnpo,
            &params(&[
                "bnpo.alpha=1",
                "bnpo.beta=1.5",
                "std=population",
                "stcr.enabled=true",
            ]),
        )
        .unwrap();
        assert_eq!(
            (cfg.params.bnpo.alpha, cfg.params.bnpo.beta),
            (Some(1.0), Some(1.5))
        );
        assert_eq!(cfg.std, super::super::StdKind::Population);
        assert!(cfg.stcr.enabled);
        assert_eq!(cfg.estimator, Estimator::Bnpo);
        let cfg = config_from_params(Estimator::Bnpo, &params(&["bnpo.alpha=null"])).unwrap();
        assert_eq!(cfg.params.bnpo.alpha, None);
    }

    #[test]
    fn unknown_param_lists_valid_keys() {
        let err = config_from_params(Estimator::Grpo, &params(&["lambda=1"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`lambda`"), "{msg}");
        for key in [
            "w_reinforce.lambda",
            "eps",
            "bnpo.alpha",
            "noisy.rho0",
            "stcr.base",
            "duration.t_floor",
        ] {
            assert!(msg.contains(key), "{msg} lacks {key}");
        }
    }

    #[test]
    fn bad_param_values_name_the_param() {
        let err = config_from_params(Estimator::Grpo, &params(&["eps=abc"])).unwrap_err();
        assert!(
            matches!(&err, AdvantageError::InvalidParam { param, .. } if param == "eps=abc"),
            "{err}"
        );
        let err = config_from_params(Estimator::Grpo, &params(&["std=median"])).unwrap_err();
        assert!(err.to_string().contains("std=median"), "{err}");
        let err = config_from_params(Estimator::Grpo, &params(&["eps"])).unwrap_err();
        assert!(err.to_string().contains("expected key=value"), "{err}");
        // a value that parses but is out of range is caught by validate() inside compute
        let err =
            run_calculator(r#"{"groups": [[1, 0]]}"#, "grpo", &params(&["eps=-1"])).unwrap_err();
        assert!(matches!(err, AdvantageError::InvalidConfig { .. }), "{err}");
    }

    #[test]
    fn unknown_estimator_lists_the_known_ones() {
        let msg = run_calculator(r#"{"groups": [[1]]}"#, "ppo", &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("group-mean") && msg.contains("noisy-forward"),
            "{msg}"
        );
    }

    #[test]
    fn malformed_json_and_missing_groups() {
        let err = parse_input("{\"groups\": [[1, 0]").unwrap_err().to_string();
        assert!(err.starts_with("input is not valid JSON"), "{err}");
        let err = parse_input(r#"{"correct": [[true]]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("groups is missing"), "{err}");
        let err = parse_input("[1, 2]").unwrap_err().to_string();
        assert!(err.contains("not a JSON object"), "{err}");
        let err = parse_input(r#"{"groups": [[1]], "lenghts": [[1]]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`lenghts`") && err.contains("lengths"),
            "{err}"
        );
    }

    #[test]
    fn non_number_is_named_by_position() {
        let err = parse_input(r#"{"groups": [[1, 0], [0, 1, "x"]]}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "groups[1][2] is not a number (found string \"x\")"
        );
        let err = parse_input(r#"{"groups": [[1, 0], 3]}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "groups[1] is not an array (found number 3)"
        );
    }

    #[test]
    fn ragged_optional_fields_are_named() {
        let err = parse_input(r#"{"groups": [[1, 0], [0, 1, 1]], "lengths": [[3, 4], [5, 6]]}"#)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "lengths[1] has 2 entries but groups[1] has 3"
        );
        let err = parse_input(r#"{"groups": [[1, 0], [0, 1]], "correct": [[1, 0]]}"#).unwrap_err();
        assert_eq!(err.to_string(), "correct has 1 groups but groups has 2");
        let err = parse_input(r#"{"groups": [[1, 0]], "lengths": [[3, 2.5]]}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "lengths[0][1] is not a non-negative integer (found number 2.5)"
        );
        let err = parse_input(r#"{"groups": [[1, 0]], "correct": [[1, 2]]}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "correct[0][1] is not a boolean or 0/1 (found number 2)"
        );
    }

    #[test]
    fn optional_fields_are_read() {
        let g = parse_input(
            r#"{"groups": [[1, 0]], "correct": [[1, false]], "durations": [[0.5, null]],
                "ground_truth": [[0, 1]], "components": [[[1, 0], [0, 0]]], "all_rewards": [[1, 0, 0]]}"#,
        )
        .unwrap();
        assert_eq!(g[0].correct, Some(vec![true, false]));
        let d = g[0].durations.clone().unwrap();
        assert!(d[0] == 0.5 && d[1].is_nan());
        assert_eq!(g[0].ground_truth, Some(vec![false, true]));
        assert_eq!(g[0].components, Some(vec![vec![1.0, 0.0], vec![0.0, 0.0]]));
        assert_eq!(g[0].all_rewards, Some(vec![1.0, 0.0, 0.0]));
        assert_eq!(g[0].lengths, None);
    }

    #[test]
    fn library_errors_pass_through() {
        // stcr needs lengths: compute's error reaches the caller unchanged
        let err = run_calculator(
            r#"{"groups": [[1, 0]]}"#,
            "grpo",
            &params(&["stcr.enabled=true"]),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                AdvantageError::MissingField {
                    field: "lengths",
                    ..
                }
            ),
            "{err}"
        );
    }
}
