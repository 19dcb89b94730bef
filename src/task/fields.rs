//! Reading a dataset row's fields by dotted path (`a.b.0.c`: object keys, and array indices
//! where the value is an array), and what a prompt or answer field may hold.
use serde_json::Value;

use crate::model::chat::Message;
use crate::task::rows::json_type_name;

/// The value at `path` in `row`. A key that itself contains dots is found when written whole
/// (`"a.b"` as one column name) before the path is split.
pub fn lookup<'a>(row: &'a Value, path: &str) -> Result<&'a Value, String> {
    if let Some(v) = row.as_object().and_then(|o| o.get(path)) {
        return Ok(v);
    }
    let mut at = row;
    let mut walked = String::new();
    for segment in path.split('.') {
        let next = match at {
            Value::Object(o) => o.get(segment),
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        let Some(v) = next else {
            let inside = if walked.is_empty() {
                "the row".to_string()
            } else {
                format!("`{walked}`")
            };
            let what = match at {
                Value::Array(items) => format!(
                    "no element {segment:?} in {inside} (an array of {})",
                    items.len()
                ),
                Value::Object(_) => format!("no `{segment}` in {inside}"),
                other => format!("{inside} is {}, not an object", json_type_name(other)),
            };
            return Err(format!("missing field `{path}`: {what}"));
        };
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(segment);
        at = v;
    }
    Ok(at)
}

/// What a prompt field holds: text, or an OpenAI-style message list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptValue {
    Text(String),
    Messages(Vec<Message>),
}

impl PromptValue {
    /// The question the user asks: the text, or the last user message's content.
    pub fn question(&self) -> Option<String> {
        match self {
            PromptValue::Text(t) => Some(t.clone()),
            PromptValue::Messages(m) => m
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| m.content.clone()),
        }
    }
}

/// A prompt field's value: a string, or a non-empty list of `{"role", "content"}` objects with
/// string values (other keys are ignored).
pub fn prompt_value(v: &Value, field: &str) -> Result<PromptValue, String> {
    match v {
        Value::String(s) => Ok(PromptValue::Text(s.clone())),
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, m)| message(m, &format!("{field}.{i}")))
            .collect::<Result<Vec<_>, _>>()
            .map(PromptValue::Messages),
        other => Err(format!(
            "field `{field}`: expected a string or a non-empty list of {{\"role\", \"content\"}} \
             messages, found {}",
            describe(other)
        )),
    }
}

fn message(v: &Value, at: &str) -> Result<Message, String> {
    let text = |key: &str| match v.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!(
            "field `{at}.{key}`: expected a string, found {}",
            json_type_name(other)
        )),
        None => Err(format!(
            "field `{at}`: expected a {{\"role\", \"content\"}} message, found {}",
            describe(v)
        )),
    };
    Ok(Message {
        role: text("role")?,
        content: text("content")?,
    })
}

/// A text field's value: a string, or a number written as JSON writes it (CSV cells are
/// always strings; JSON and Parquet answers are often numbers).
pub fn text_value(v: &Value, field: &str) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!(
            "field `{field}`: expected a string or a number, found {}",
            describe(other)
        )),
    }
}

/// The JSON type, with an empty string or array said as such.
fn describe(v: &Value) -> String {
    match v {
        Value::Array(a) if a.is_empty() => "an empty array".into(),
        other => json_type_name(other).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dotted_paths_walk_objects_and_arrays() {
        let row = json!({"a": {"b": [{"c": "x"}, {"c": 5}]}, "d.e": "whole", "top": "t"});
        assert_eq!(lookup(&row, "top").unwrap(), "t");
        assert_eq!(lookup(&row, "a.b.0.c").unwrap(), "x");
        assert_eq!(lookup(&row, "a.b.1.c").unwrap(), 5);
        assert_eq!(lookup(&row, "d.e").unwrap(), "whole");
        assert_eq!(
            lookup(&row, "a.x").unwrap_err(),
            "missing field `a.x`: no `x` in `a`"
        );
        assert_eq!(
            lookup(&row, "a.b.2.c").unwrap_err(),
            "missing field `a.b.2.c`: no element \"2\" in `a.b` (an array of 2)"
        );
        assert_eq!(
            lookup(&row, "top.x").unwrap_err(),
            "missing field `top.x`: `top` is a string, not an object"
        );
        assert_eq!(
            lookup(&row, "q").unwrap_err(),
            "missing field `q`: no `q` in the row"
        );
    }

    #[test]
    fn prompt_values_are_text_or_message_lists() {
        assert_eq!(
            prompt_value(&json!("hi"), "p").unwrap(),
            PromptValue::Text("hi".into())
        );
        let m = prompt_value(
            &json!([{"role": "system", "content": "s", "name": "x"}, {"role": "user", "content": "u"}]),
            "p",
        )
        .unwrap();
        assert_eq!(
            m,
            PromptValue::Messages(vec![
                Message {
                    role: "system".into(),
                    content: "s".into()
                },
                Message::user("u")
            ])
        );
        assert_eq!(
            prompt_value(&json!([{"role": "user"}]), "p").unwrap_err(),
            "field `p.0`: expected a {\"role\", \"content\"} message, found an object"
        );
        assert_eq!(
            prompt_value(&json!([{"role": "user", "content": 3}]), "p").unwrap_err(),
            "field `p.0.content`: expected a string, found a number"
        );
        assert!(prompt_value(&json!([]), "p")
            .unwrap_err()
            .ends_with("found an empty array"));
        assert!(prompt_value(&json!(3), "p")
            .unwrap_err()
            .ends_with("found a number"));
    }

    #[test]
    fn text_values_take_strings_and_numbers() {
        assert_eq!(text_value(&json!("46"), "a").unwrap(), "46");
        assert_eq!(text_value(&json!(46), "a").unwrap(), "46");
        assert_eq!(text_value(&json!(-0.5), "a").unwrap(), "-0.5");
        assert_eq!(
            text_value(&json!(null), "sol").unwrap_err(),
            "field `sol`: expected a string or a number, found null"
        );
    }
}
