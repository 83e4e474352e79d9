//! Chat templates from `tokenizer_config.json` (or `chat_template.jinja`), rendered with
//! minijinja the way transformers' `apply_chat_template` renders them with jinja2: blocks trimmed,
//! `raise_exception`, Python string methods, `bos_token`/`eos_token` in scope.

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind};
use serde_json::Value;

use super::{DataError, Message, Result};

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for error messages.
    pub source: PathBuf,
    pub bos_token: String,
    pub eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub fn new(template: &str, source: &Path, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // jinja2 as transformers configures it: trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", template.to_string())
            .map_err(|e| DataError::Template {
                path: source.to_path_buf(),
                message: describe(&e),
            })?;
        Ok(ChatTemplate {
            env,
            source: source.to_path_buf(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template a model directory ships: `chat_template.jinja`, else `chat_template` in
    /// `tokenizer_config.json` (a string, or a list of named templates of which `default`).
    pub fn find(dir: &Path, tokenizer_config: &Value) -> Result<Option<(String, PathBuf)>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let t = std::fs::read_to_string(&jinja).map_err(|source| DataError::Io {
                path: jinja.clone(),
                source,
            })?;
            return Ok(Some((t, jinja)));
        }
        let path = dir.join("tokenizer_config.json");
        match tokenizer_config.get("chat_template") {
            Some(Value::String(s)) => Ok(Some((s.clone(), path))),
            Some(Value::Array(list)) => {
                let named = list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
                Ok(named
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(|s| (s.to_string(), path)))
            }
            _ => Ok(None),
        }
    }

    /// Render a conversation.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| DataError::Template {
            path: self.source.clone(),
            message: describe(&e),
        })
    }
}

fn describe(e: &minijinja::Error) -> String {
    let mut s = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_exception_becomes_a_clear_error() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}ok",
            Path::new("tokenizer_config.json"),
            "<s>",
            "</s>",
        )
        .unwrap();
        let m = [Message {
            role: "assistant".into(),
            content: "x".into(),
        }];
        let err = t.render(&m, false).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("must start with user"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = ChatTemplate::new(
            "{% for m in messages %}\n{{ m.content ",
            Path::new("t.jinja"),
            "",
            "",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("t.jinja") && err.contains("line"), "{err}");
    }
}
