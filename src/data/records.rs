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
    /// Preference pairs for DPO: OpenAI's `input`/`preferred_output`/`non_preferred_output` or
    /// TRL's `prompt`/`chosen`/`rejected` (`data::preference`).
    Preference,
}

impl DataFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DataFormat::Alpaca => "alpaca",
            DataFormat::Chat => "chat",
            DataFormat::Sharegpt => "sharegpt",
            DataFormat::Completion => "completion",
            DataFormat::Text => "text",
            DataFormat::Preference => "preference",
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
            "preference" => Ok(DataFormat::Preference),
            other => Err(format!(
                "unknown data format {other:?} (alpaca, chat, sharegpt, completion, text, preference)"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// A prompt with a preferred and a rejected answer, for DPO.
    Preference(super::preference::PreferenceSample),
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

pub(crate) struct Ctx<'a> {
    pub(crate) path: &'a Path,
    pub(crate) at: Position,
}

impl Ctx<'_> {
    pub(crate) fn field(&self, field: &str, message: impl Into<String>) -> DataError {
        DataError::Field {
            path: self.path.to_path_buf(),
            at: self.at,
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn string(
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
        let out = self.message_list(obj, field, role_key, content_key)?;
        if !out.iter().any(|m| m.role == "assistant") {
            return Err(self.field(field, "has no assistant message to learn from"));
        }
        Ok(out)
    }

    /// A non-empty list of messages under `field`, each checked, roles normalized.
    pub(crate) fn message_list(
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
        Ok(out)
    }
}

pub(crate) fn kind(v: &Value) -> &'static str {
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
    if super::preference::is_preference(obj) {
        Some(DataFormat::Preference)
    } else if obj.contains_key("messages") {
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
        DataFormat::Preference => Sample::Preference(super::preference::parse(obj, ctx)?),
    })
}

/// Read and check every record of a dataset file. Returns the format used and the samples with
/// their positions in the file.
pub fn read_records(
    path: &Path,
    format: Option<DataFormat>,
) -> Result<(DataFormat, Vec<(Position, Sample)>)> {
    let mut samples = Vec::new();
    let (format, _) = visit_records(path, format, |at, s| {
        samples.push((at, s));
        Ok(())
    })?;
    Ok((format, samples))
}

/// Check every record, handing each to `f`, without holding the file in memory for JSONL (a JSON
/// array is parsed whole). Returns the format and the number of records.
pub fn visit_records(
    path: &Path,
    format: Option<DataFormat>,
    mut f: impl FnMut(Position, Sample) -> Result<()>,
) -> Result<(DataFormat, usize)> {
    let mut format = format;
    let count = visit_objects(path, |at, obj| {
        let fmt = match format {
            Some(fmt) => fmt,
            None => {
                let fmt = detect(&obj).ok_or_else(|| DataError::Record {
                    path: path.to_path_buf(),
                    at,
                    message: format!(
                        "cannot tell the format from keys {:?}: expected messages, conversations, instruction, prompt/completion, text, or a preference pair (preferred_output, chosen/rejected)",
                        obj.keys().collect::<Vec<_>>()
                    ),
                })?;
                format = Some(fmt);
                fmt
            }
        };
        f(at, parse_sample(&obj, fmt, &Ctx { path, at })?)
    })?;
    Ok((format.expect("set by the first record"), count))
}

/// Hand every record of a JSONL file or JSON array to `f` as an object, in order, with its
/// position; a record that is not an object, invalid JSON or an empty file is an error. JSONL is
/// read a line at a time. Returns the number of records.
pub fn visit_objects(
    path: &Path,
    mut f: impl FnMut(Position, serde_json::Map<String, Value>) -> Result<()>,
) -> Result<usize> {
    use std::io::{BufRead, Read};
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let starts_with_bracket = loop {
        let buf = reader.fill_buf().map_err(io)?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => {
                let c = buf[i];
                reader.consume(i);
                break c == b'[';
            }
            None if buf.is_empty() => break false,
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    };
    let mut count = 0usize;
    let mut handle = |at: Position, v: Value, count: &mut usize| -> Result<()> {
        let Value::Object(obj) = v else {
            return Err(DataError::Record {
                path: path.to_path_buf(),
                at,
                message: format!("must be a JSON object, found {}", kind(&v)),
            });
        };
        *count += 1;
        f(at, obj)
    };
    if starts_with_bracket {
        let mut text = String::new();
        reader.read_to_string(&mut text).map_err(io)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| DataError::Record {
            path: path.to_path_buf(),
            at: Position::Line(e.line()),
            message: format!("invalid JSON: {e}"),
        })?;
        let Value::Array(items) = v else {
            unreachable!("starts with [")
        };
        for (i, v) in items.into_iter().enumerate() {
            handle(Position::Index(i), v, &mut count)?;
        }
    } else {
        let mut line = String::new();
        let mut n = 0;
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(io)? == 0 {
                break;
            }
            n += 1;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| DataError::Record {
                path: path.to_path_buf(),
                at: Position::Line(n),
                message: format!("invalid JSON: {e}"),
            })?;
            handle(Position::Line(n), v, &mut count)?;
        }
    }
    if count == 0 {
        return Err(DataError::File {
            path: path.to_path_buf(),
            message: "the dataset has no records".into(),
        });
    }
    Ok(count)
}
