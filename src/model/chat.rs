//! Chat templates: the Jinja `chat_template` of a model's `tokenizer_config.json` (or GGUF
//! metadata) rendered with minijinja the way `transformers`' `apply_chat_template` does:
//! `trim_blocks` and `lstrip_blocks` on, loop controls, Python string methods (`strip`,
//! `startswith`, ...), a `raise_exception(msg)` function, and the variables `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Tokenizer;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn user(content: impl Into<String>) -> Self {
        Message {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the special-token texts it may refer to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    /// Where the template came from, for error messages.
    pub source: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

fn template_error(source: &str, e: minijinja::Error) -> Error {
    // minijinja's Display carries the kind, detail and template line.
    let mut msg = format!("chat template {source}: {e}");
    let mut inner = std::error::Error::source(&e);
    while let Some(s) = inner {
        msg.push_str(&format!(": {s}"));
        inner = s.source();
    }
    Error::Tokenizer(msg)
}

/// A special-token entry of `tokenizer_config.json`: a string, an `AddedToken` object with
/// `content`, or null.
fn special_text(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// The `chat_template` of a parsed `tokenizer_config.json`: a string, or a list of
/// `{name, template}` (the one named "default", else the first). `Ok(None)` when absent.
pub fn template_from_config(cfg: &serde_json::Value, file: &str) -> Result<Option<String>> {
    match cfg.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(items)) => {
            let named = |name: &str| {
                items
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
            };
            let pick = named("default").or_else(|| items.first());
            match pick.and_then(|t| t.get("template")).and_then(|t| t.as_str()) {
                Some(t) => Ok(Some(t.to_string())),
                None => Err(Error::Tokenizer(format!(
                    "{file}: field `chat_template` is a list without a {{\"name\", \"template\"}} entry"
                ))),
            }
        }
        Some(other) => Err(Error::Tokenizer(format!(
            "{file}: field `chat_template` should be a string or a list, found {other}"
        ))),
    }
}

impl ChatTemplate {
    /// Compiles `template`; syntax errors name `source` and the template line.
    pub fn new(
        template: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
        source: &str,
    ) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error(source, e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<minijinja::Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!("raise_exception: {msg}"),
                ))
            },
        );
        env.add_template_owned("chat_template", template.to_string())
            .map_err(|e| template_error(source, e))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token,
            eos_token,
        })
    }

    /// Reads `chat_template`, `bos_token` and `eos_token` from a `tokenizer_config.json`; a
    /// `chat_template.jinja` file beside it is used when the field is absent (transformers ≥ 4.43
    /// saves templates that way).
    pub fn from_tokenizer_config(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Tokenizer(format!("{file}: not valid JSON: {e}")))?;
        let template = match template_from_config(&cfg, &file)? {
            Some(t) => t,
            None => {
                let jinja = path.with_file_name("chat_template.jinja");
                if jinja.is_file() {
                    std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?
                } else {
                    return Err(Error::Tokenizer(format!(
                        "{file}: no `chat_template` field (and no chat_template.jinja beside it)"
                    )));
                }
            }
        };
        Self::new(
            &template,
            special_text(&cfg, "bos_token"),
            special_text(&cfg, "eos_token"),
            &file,
        )
    }

    /// The template a tokenizer carries, if any (from `load_pretrained` / `load_gguf`).
    pub fn from_tokenizer(tok: &Tokenizer, source: &str) -> Option<Result<Self>> {
        let template = tok.chat_template.as_ref()?;
        Some(Self::new(
            template,
            tok.bos_token.clone(),
            tok.id_to_token(tok.eos),
            source,
        ))
    }

    /// Renders a conversation; `add_generation_prompt` appends the assistant header.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, &[], add_generation_prompt)
    }

    /// [`ChatTemplate::render`] with tool schemas (OpenAI style) as the template's `tools`
    /// (none: `tools` is undefined, as transformers passes it).
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat_template")
            .map_err(|e| template_error(&self.source, e))?;
        let ctx = minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            tools => (!tools.is_empty()).then(|| minijinja::Value::from(minijinja::value::Serde(tools))),
        };
        tmpl.render(ctx)
            .map_err(|e| template_error(&self.source, e))
    }

    /// The prompt for one user message, ready for the assistant's reply.
    pub fn render_user(&self, content: &str) -> Result<String> {
        self.render(&[Message::user(content)], true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-Instruct's template without the tool-calling branches (same structure: a default
    /// system prompt when the first message is not a system message, ChatML turns).
    const QWEN_STYLE: &str = r#"{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "system" and loop.first %}
    {%- elif (message.role == "user") or (message.role == "system") or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\n' + message.content.strip() + '<|im_end|>' + '\n' }}
    {%- else %}
        {{- raise_exception('Unsupported role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

    #[test]
    fn chatml_user_prompt_with_generation_prompt() {
        let t = ChatTemplate::new(QWEN_STYLE, None, Some("<|im_end|>".into()), "test").unwrap();
        let out = t.render_user("  What is 2+3?  ").unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
        );
        let no_gen = t
            .render(
                &[
                    Message {
                        role: "system".into(),
                        content: "Be brief.".into(),
                    },
                    Message::user("Hi"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            no_gen,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error_with_its_message() {
        let t = ChatTemplate::new(QWEN_STYLE, None, None, "tokenizer_config.json").unwrap();
        let e = t
            .render(
                &[Message {
                    role: "tool".into(),
                    content: "x".into(),
                }],
                true,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("Unsupported role: tool"), "{e}");
        assert!(e.contains("tokenizer_config.json"), "{e}");
    }

    #[test]
    fn bos_and_eos_variables_and_trim_blocks() {
        // Llama-2 style: bos before each user turn, eos after each assistant turn. With
        // trim_blocks the newline after a block tag is dropped, as in transformers.
        let tmpl = "{% for m in messages %}\n{% if m.role == 'user' %}\n{{ bos_token }}[INST] {{ m.content }} [/INST]\n{% else %}\n {{ m.content }}{{ eos_token }}\n{% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(tmpl, Some("<s>".into()), Some("</s>".into()), "t").unwrap();
        let msgs = [
            Message::user("a"),
            Message {
                role: "assistant".into(),
                content: "b".into(),
            },
            Message::user("c"),
        ];
        assert_eq!(
            t.render(&msgs, false).unwrap(),
            "<s>[INST] a [/INST]\n b</s>\n<s>[INST] c [/INST]\n"
        );
    }

    #[test]
    fn reads_tokenizer_config_with_added_token_objects() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer_config.json");
        let cfg = serde_json::json!({
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"}
            ]
        });
        std::fs::write(&p, cfg.to_string()).unwrap();
        let t = ChatTemplate::from_tokenizer_config(&p).unwrap();
        assert_eq!(t.render_user("hey").unwrap(), "<s>hey</s>");

        std::fs::write(&p, r#"{"eos_token": "</s>"}"#).unwrap();
        let e = ChatTemplate::from_tokenizer_config(&p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no `chat_template`"), "{e}");
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "[{{ messages[0].content }}]",
        )
        .unwrap();
        let t = ChatTemplate::from_tokenizer_config(&p).unwrap();
        assert_eq!(t.render_user("x").unwrap(), "[x]");

        std::fs::write(&p, r#"{"chat_template": "{% if %}"}"#).unwrap();
        let e = ChatTemplate::from_tokenizer_config(&p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tokenizer_config.json") && e.contains("syntax"),
            "{e}"
        );
    }
}
