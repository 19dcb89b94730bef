//! Tool calls in the Hermes/Qwen form the common chat templates emit,
//!
//! ```text
//! <tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>
//! ```
//!
//! parsed from the model's message and answered as `tool` messages. Built-in tools: the
//! calculator (exact rational arithmetic) and user commands speaking JSON lines. A malformed
//! call, an unknown tool or a failing command becomes an error observation (a `tool` message
//! starting with "error:"), never a crash; tools run within the step's deadline.
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::rational;
use super::Message;
use crate::compute::process::{quote, LineProcess};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Value,
}

/// Every `<tool_call>...</tool_call>` block of a message, in order: the call, or why it is
/// not one.
pub fn parse_tool_calls(text: &str) -> Vec<Result<ToolCall, String>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let body = &rest[start + OPEN.len()..];
        let Some(end) = body.find(CLOSE) else {
            out.push(Err(format!("{OPEN} without a closing {CLOSE}")));
            break;
        };
        out.push(parse_call(body[..end].trim()));
        rest = &body[end + CLOSE.len()..];
    }
    out
}

fn parse_call(body: &str) -> Result<ToolCall, String> {
    let v: Value = serde_json::from_str(body)
        .map_err(|e| format!("the tool call is not valid JSON ({e}): {}", quote(body)))?;
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("the tool call has no string \"name\": {}", quote(body)))?;
    let arguments: Value = match v.get("arguments") {
        None => json!({}),
        // Some models send the arguments as a JSON string.
        Some(Value::String(s)) => serde_json::from_str(s)
            .map_err(|e| format!("\"arguments\" is a string but not JSON ({e})"))?,
        Some(a @ Value::Object(_)) => a.clone(),
        Some(other) => return Err(format!("\"arguments\" must be an object, found {other}")),
    };
    Ok(ToolCall {
        name: name.to_string(),
        arguments,
    })
}

/// A tool the model may call.
pub trait Tool: Send {
    fn name(&self) -> &str;
    /// The OpenAI-style schema passed to the chat template's `tools`.
    fn schema(&self) -> Value;
    /// The result text, or an error message for the model.
    fn call(&mut self, arguments: &Value, deadline: Instant) -> Result<String, String>;
}

/// Exact rational arithmetic: `{"expression": "..."}` → the value (`7/3`, `-12`).
pub struct Calculator;

impl Tool for Calculator {
    fn name(&self) -> &str {
        "calculator"
    }
    fn schema(&self) -> Value {
        json!({"type": "function", "function": {
            "name": "calculator",
            "description": "Evaluates an arithmetic expression exactly (+ - * / and parentheses); \
                            fractions are kept exact, e.g. 7/3.",
            "parameters": {"type": "object",
                "properties": {"expression": {"type": "string", "description": "e.g. (12 + 30) * 7"}},
                "required": ["expression"]}}})
    }
    fn call(&mut self, arguments: &Value, _deadline: Instant) -> Result<String, String> {
        let expr = arguments
            .get("expression")
            .and_then(Value::as_str)
            .ok_or("calculator needs {\"expression\": \"...\"}")?;
        rational::evaluate(expr).map(|v| v.to_string())
    }
}

/// A user command as a tool (`[[env.tools]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandToolConfig {
    pub name: String,
    /// Program and arguments; started once and kept running.
    pub command: Vec<String>,
    #[serde(default)]
    pub description: String,
    /// JSON schema of the arguments (default: any object).
    #[serde(default)]
    pub parameters: Option<Value>,
}

/// Speaks JSON lines: `{"name": ..., "arguments": {...}}` in, `{"content": "..."}` or
/// `{"error": "..."}` out. Restarted after a crash, a hang or an unreadable answer.
pub struct CommandTool {
    cfg: CommandToolConfig,
    process: Option<LineProcess>,
}

impl CommandTool {
    pub fn new(cfg: CommandToolConfig) -> Self {
        CommandTool { cfg, process: None }
    }
}

impl Tool for CommandTool {
    fn name(&self) -> &str {
        &self.cfg.name
    }
    fn schema(&self) -> Value {
        json!({"type": "function", "function": {
            "name": self.cfg.name, "description": self.cfg.description,
            "parameters": self.cfg.parameters.clone().unwrap_or(json!({"type": "object"}))}})
    }
    fn call(&mut self, arguments: &Value, deadline: Instant) -> Result<String, String> {
        if self.process.is_none() {
            self.process = Some(LineProcess::spawn(&self.cfg.command)?);
        }
        let p = self.process.as_mut().expect("started above");
        let req = json!({"name": self.cfg.name, "arguments": arguments});
        let answer = match p.exchange(&req, deadline) {
            Ok(line) => line,
            Err(f) => {
                self.process = None;
                return Err(format!("tool command `{}` {f}", self.cfg.command.join(" ")));
            }
        };
        let v: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
        if let Some(c) = v.get("content").and_then(Value::as_str) {
            return Ok(c.to_string());
        }
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            return Err(e.to_string());
        }
        self.process = None;
        Err(format!(
            "tool command `{}` answered {:?}, expected {{\"content\": ...}} or {{\"error\": ...}}",
            self.cfg.command.join(" "),
            quote(&answer)
        ))
    }
}

/// The tools of an episode.
pub struct Toolbox {
    tools: Vec<Box<dyn Tool>>,
}

impl Toolbox {
    pub fn new(tools: Vec<Box<dyn Tool>>) -> Self {
        Toolbox { tools }
    }

    pub fn schemas(&self) -> Vec<Value> {
        self.tools.iter().map(|t| t.schema()).collect()
    }

    fn known(&self) -> String {
        let names: Vec<&str> = self.tools.iter().map(|t| t.name()).collect();
        names.join(", ")
    }

    /// Runs every call in `text`: one `tool` message per call (results or "error: ..."), and
    /// how many calls succeeded. No calls: no messages.
    pub fn run(&mut self, text: &str, deadline: Instant) -> (Vec<Message>, usize) {
        let mut out = Vec::new();
        let mut ok = 0;
        for call in parse_tool_calls(text) {
            let result = call.and_then(|c| {
                if Instant::now() >= deadline {
                    return Err("the step's time ran out before this call".into());
                }
                let known = self.known();
                match self.tools.iter_mut().find(|t| t.name() == c.name) {
                    Some(t) => t.call(&c.arguments, deadline),
                    None => Err(format!("unknown tool {:?}; known tools: {known}", c.name)),
                }
            });
            let content = match result {
                Ok(r) => {
                    ok += 1;
                    r
                }
                Err(e) => format!("error: {e}"),
            };
            out.push(Message {
                role: "tool".into(),
                content,
            });
        }
        (out, ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[test]
    fn calls_are_parsed_and_bad_ones_become_error_observations() {
        let mut tb = Toolbox::new(vec![Box::new(Calculator)]);
        let text = "Let me compute.\n<tool_call>{\"name\": \"calculator\", \"arguments\": \
                    {\"expression\": \"123456789 * 1000 + 1/4\"}}</tool_call>\n\
                    <tool_call>{\"name\": \"search\", \"arguments\": {}}</tool_call>\
                    <tool_call>{\"name\": calculator}</tool_call>\
                    <tool_call>{\"name\": \"calculator\", \"arguments\": \"{\\\"expression\\\": \\\"1/0\\\"}\"}</tool_call>\
                    <tool_call>{\"name\": \"calculator\"";
        let (msgs, ok) = tb.run(text, soon());
        let contents: Vec<&str> = msgs.iter().map(|m| m.content.as_str()).collect();
        assert!(msgs.iter().all(|m| m.role == "tool"));
        // 123456789000 + 1/4 = 493827156001/4
        assert_eq!(contents[0], "493827156001/4");
        assert_eq!(
            contents[1],
            "error: unknown tool \"search\"; known tools: calculator"
        );
        assert!(
            contents[2].starts_with("error: the tool call is not valid JSON"),
            "{}",
            contents[2]
        );
        assert_eq!(contents[3], "error: division by zero");
        assert_eq!(
            contents[4],
            "error: <tool_call> without a closing </tool_call>"
        );
        assert_eq!((msgs.len(), ok), (5, 1));
        // No calls, no messages; a past deadline stops calls.
        assert_eq!(tb.run("the answer is 4", soon()).0.len(), 0);
        let (late, ok) = tb.run(
            "<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"1\"}}</tool_call>",
            Instant::now(),
        );
        assert_eq!(ok, 0);
        assert!(late[0].content.contains("time ran out"));
    }

    #[test]
    fn a_command_tool_answers_and_its_failures_are_observations() {
        let py = "import sys, json\n\
                  for line in sys.stdin:\n    \
                  r = json.loads(line)\n    a = r['arguments']\n    \
                  if a.get('mode') == 'hang':\n        import time; time.sleep(60)\n    \
                  if a.get('mode') == 'crash':\n        sys.exit(3)\n    \
                  if a.get('mode') == 'garbage':\n        print('not json', flush=True); continue\n    \
                  print(json.dumps({'content': a['word'].upper()}), flush=True)\n";
        let cfg = CommandToolConfig {
            name: "upper".into(),
            command: vec!["python3".into(), "-c".into(), py.into()],
            description: "upper-cases a word".into(),
            parameters: None,
        };
        let mut tb = Toolbox::new(vec![Box::new(CommandTool::new(cfg)), Box::new(Calculator)]);
        assert_eq!(tb.schemas()[0]["function"]["name"], "upper");
        let call = |args: &str| {
            format!("<tool_call>{{\"name\": \"upper\", \"arguments\": {args}}}</tool_call>")
        };
        let (m, _) = tb.run(&call("{\"word\": \"grove\"}"), soon());
        assert_eq!(m[0].content, "GROVE");
        let (m, _) = tb.run(&call("{\"mode\": \"garbage\"}"), soon());
        assert!(
            m[0].content.contains("answered \"not json\""),
            "{}",
            m[0].content
        );
        let (m, _) = tb.run(&call("{\"mode\": \"crash\"}"), soon());
        assert!(
            m[0].content.contains("exited (exit status: 3)"),
            "{}",
            m[0].content
        );
        let t0 = Instant::now();
        let (m, _) = tb.run(
            &call("{\"mode\": \"hang\"}"),
            Instant::now() + Duration::from_millis(300),
        );
        assert!(m[0].content.contains("no answer line before the deadline"));
        assert!(t0.elapsed() < Duration::from_secs(5));
        // Restarted after each failure.
        let (m, _) = tb.run(&call("{\"word\": \"ok\"}"), soon());
        assert_eq!(m[0].content, "OK");
    }
}
