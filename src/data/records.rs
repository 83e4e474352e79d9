//! Reading dataset files: JSONL or a JSON array, format detected or given, every record checked.

use std::path::Path;
use std::str::FromStr;

use serde_json::Value;

use super::{DataError, Position, Result};

/// The record shapes qlorad reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// `instruction`, optional `input`, `output`: the Stanford Alpaca form.
    Alpaca,
    /// `messages` with `role` and `content`: OpenAI's fine-tuning file format.
    Chat,
    /// `conversations` with `from` (human/gpt/system) and `value`.
    Sharegpt,
    /// `prompt` and `completion`.
    Completion,
    /// `text`: trained on every token.
    Text,
}

impl DataFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DataFormat::Alpaca => "alpaca",
            DataFormat::Chat => "chat",
            DataFormat::Sharegpt => "sharegpt",
            DataFormat::Completion => "completion",
            DataFormat::Text => "text",
        }
    }
}

impl FromStr for DataFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "alpaca" => Ok(DataFormat::Alpaca),
            "chat" => Ok(DataFormat::Chat),
            "sharegpt" => Ok(DataFormat::Sharegpt),
            "completion" => Ok(DataFormat::Completion),
            "text" => Ok(DataFormat::Text),
            other => Err(format!(
                "unknown data format {other:?} (alpaca, chat, sharegpt, completion, text)"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One training record, normalized.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    /// Loss on the completion only (by default).
    Prompted {
        prompt: String,
        completion: String,
    },
    /// Loss on the assistant turns only (by default).
    Chat {
        messages: Vec<Message>,
    },
    Text(String),
}

/// The prompt artidoro/qlora builds for alpaca records.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: "
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
        )
    }
}

struct Ctx<'a> {
    path: &'a Path,
    at: Position,
}

impl Ctx<'_> {
    fn field(&self, field: &str, message: impl Into<String>) -> DataError {
        DataError::Field {
            path: self.path.to_path_buf(),
            at: self.at,
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn string(
        &self,
        obj: &serde_json::Map<String, Value>,
        field: &str,
        required: bool,
    ) -> Result<String> {
        match obj.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            None | Some(Value::Null) if !required => Ok(String::new()),
            None => Err(self.field(field, "is missing")),
            Some(v) => Err(self.field(field, format!("must be a string, found {}", kind(v)))),
        }
    }

    fn messages(
        &self,
        obj: &serde_json::Map<String, Value>,
        field: &str,
        role_key: &str,
        content_key: &str,
    ) -> Result<Vec<Message>> {
        let list = match obj.get(field) {
            Some(Value::Array(a)) => a,
            None => return Err(self.field(field, "is missing")),
            Some(v) => return Err(self.field(field, format!("must be a list, found {}", kind(v)))),
        };
        if list.is_empty() {
            return Err(self.field(field, "is empty"));
        }
        let mut out = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let name = |k: &str| format!("{field}[{i}].{k}");
            let Value::Object(m) = m else {
                return Err(self.field(
                    &format!("{field}[{i}]"),
                    format!("must be an object, found {}", kind(m)),
                ));
            };
            let role = match m.get(role_key) {
                Some(Value::String(s)) => s.clone(),
                None => return Err(self.field(&name(role_key), "is missing")),
                Some(v) => {
                    return Err(self.field(
                        &name(role_key),
                        format!("must be a string, found {}", kind(v)),
                    ))
                }
            };
            let role = if field == "conversations" {
                match role.as_str() {
                    "human" | "user" => "user".to_string(),
                    "gpt" | "assistant" | "model" => "assistant".to_string(),
                    "system" => "system".to_string(),
                    other => {
                        return Err(self.field(
                            &name(role_key),
                            format!("{other:?} is not human, gpt or system"),
                        ))
                    }
                }
            } else {
                if !matches!(role.as_str(), "system" | "user" | "assistant" | "tool") {
                    return Err(self.field(
                        &name(role_key),
                        format!("{role:?} is not system, user or assistant"),
                    ));
                }
                role
            };
            let content = match m.get(content_key) {
                Some(Value::String(s)) => s.clone(),
                None => return Err(self.field(&name(content_key), "is missing")),
                Some(v) => {
                    return Err(self.field(
                        &name(content_key),
                        format!("must be a string, found {}", kind(v)),
                    ))
                }
            };
            out.push(Message { role, content });
        }
        if !out.iter().any(|m| m.role == "assistant") {
            return Err(self.field(field, "has no assistant message to learn from"));
        }
        Ok(out)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Guess the format from a record's keys.
pub fn detect(obj: &serde_json::Map<String, Value>) -> Option<DataFormat> {
    if obj.contains_key("messages") {
        Some(DataFormat::Chat)
    } else if obj.contains_key("conversations") {
        Some(DataFormat::Sharegpt)
    } else if obj.contains_key("instruction") {
        Some(DataFormat::Alpaca)
    } else if obj.contains_key("prompt") && obj.contains_key("completion") {
        Some(DataFormat::Completion)
    } else if obj.contains_key("text") {
        Some(DataFormat::Text)
    } else {
        None
    }
}

fn parse_sample(
    obj: &serde_json::Map<String, Value>,
    format: DataFormat,
    ctx: &Ctx<'_>,
) -> Result<Sample> {
    Ok(match format {
        DataFormat::Alpaca => {
            let instruction = ctx.string(obj, "instruction", true)?;
            let input = ctx.string(obj, "input", false)?;
            let output = ctx.string(obj, "output", true)?;
            Sample::Prompted {
                prompt: alpaca_prompt(&instruction, &input),
                completion: output,
            }
        }
        DataFormat::Completion => Sample::Prompted {
            prompt: ctx.string(obj, "prompt", true)?,
            completion: ctx.string(obj, "completion", true)?,
        },
        DataFormat::Chat => Sample::Chat {
            messages: ctx.messages(obj, "messages", "role", "content")?,
        },
        DataFormat::Sharegpt => Sample::Chat {
            messages: ctx.messages(obj, "conversations", "from", "value")?,
        },
        DataFormat::Text => {
            let t = ctx.string(obj, "text", true)?;
            if t.is_empty() {
                return Err(ctx.field("text", "is empty"));
            }
            Sample::Text(t)
        }
    })
}

/// Read and check every record of a dataset file. Returns the format used and the samples with
/// their positions in the file.
pub fn read_records(
    path: &Path,
    format: Option<DataFormat>,
) -> Result<(DataFormat, Vec<(Position, Sample)>)> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut raw: Vec<(Position, Value)> = Vec::new();
    if text.trim_start().starts_with('[') {
        let v: Value = serde_json::from_str(&text).map_err(|e| DataError::Record {
            path: path.to_path_buf(),
            at: Position::Line(e.line()),
            message: format!("invalid JSON: {e}"),
        })?;
        let Value::Array(items) = v else {
            unreachable!("starts with [")
        };
        raw.extend(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (Position::Index(i), v)),
        );
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| DataError::Record {
                path: path.to_path_buf(),
                at: Position::Line(i + 1),
                message: format!("invalid JSON: {e}"),
            })?;
            raw.push((Position::Line(i + 1), v));
        }
    }
    if raw.is_empty() {
        return Err(DataError::File {
            path: path.to_path_buf(),
            message: "the dataset has no records".into(),
        });
    }
    let mut format = format;
    let mut samples = Vec::with_capacity(raw.len());
    for (at, v) in raw {
        let ctx = Ctx { path, at };
        let Value::Object(obj) = v else {
            return Err(DataError::Record {
                path: path.to_path_buf(),
                at,
                message: format!("must be a JSON object, found {}", kind(&v)),
            });
        };
        let f = match format {
            Some(f) => f,
            None => {
                let f = detect(&obj).ok_or_else(|| DataError::Record {
                    path: path.to_path_buf(),
                    at,
                    message: format!(
                        "cannot tell the format from keys {:?}: expected messages, conversations, instruction, prompt/completion or text",
                        obj.keys().collect::<Vec<_>>()
                    ),
                })?;
                format = Some(f);
                f
            }
        };
        samples.push((at, parse_sample(&obj, f, &ctx)?));
    }
    Ok((format.expect("set by the first record"), samples))
}
