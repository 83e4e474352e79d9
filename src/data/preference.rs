//! Preference pairs for DPO: OpenAI's records (`input.messages`, `preferred_output`,
//! `non_preferred_output`) and TRL's (`prompt`, `chosen`, `rejected`: strings or message lists,
//! the prompt implicit in the shared start of two conversations), checked field by field;
//! tokenized and truncated as TRL's `DPOTrainer` does.

use std::path::Path;

use serde_json::{Map, Value};

use super::encode::{EncodeOptions, Example, IGNORE};
use super::records::{kind, read_records, Ctx, Message, Sample};
use super::{DataError, DatasetSummary, Result, TextTokenizer};

/// One preference record: a prompt and two answers, the preferred one first.
#[derive(Debug, Clone, PartialEq)]
pub enum PreferenceSample {
    /// Rendered with the chat template; each side is the assistant turn(s) after the prompt.
    Chat {
        prompt: Vec<Message>,
        chosen: Vec<Message>,
        rejected: Vec<Message>,
    },
    /// Plain text: BOS as the tokenizer adds it, each answer ended by the EOS text.
    Text {
        prompt: String,
        chosen: String,
        rejected: String,
    },
}

/// Whether a record's keys are those of a preference pair.
pub fn is_preference(obj: &Map<String, Value>) -> bool {
    obj.contains_key("preferred_output")
        || obj.contains_key("non_preferred_output")
        || (obj.contains_key("chosen") || obj.contains_key("rejected"))
}

/// Parse and check one preference record.
pub(crate) fn parse(obj: &Map<String, Value>, ctx: &Ctx<'_>) -> Result<PreferenceSample> {
    if obj.contains_key("input")
        || obj.contains_key("preferred_output")
        || obj.contains_key("non_preferred_output")
    {
        return parse_openai(obj, ctx);
    }
    for side in ["chosen", "rejected"] {
        if !obj.contains_key(side) {
            return Err(ctx.field(side, "is missing"));
        }
    }
    match obj.get("prompt") {
        Some(Value::String(prompt)) => {
            let text = |side: &str| -> Result<String> {
                let s = ctx.string(obj, side, true)?;
                if s.is_empty() {
                    return Err(ctx.field(side, "is empty"));
                }
                Ok(s)
            };
            Ok(PreferenceSample::Text {
                prompt: prompt.clone(),
                chosen: text("chosen")?,
                rejected: text("rejected")?,
            })
        }
        Some(Value::Array(_)) => {
            let prompt = ctx.message_list(obj, "prompt", "role", "content")?;
            Ok(PreferenceSample::Chat {
                prompt,
                chosen: answer(obj, "chosen", ctx)?,
                rejected: answer(obj, "rejected", ctx)?,
            })
        }
        Some(v) => Err(ctx.field(
            "prompt",
            format!("must be a string or a list of messages, found {}", kind(v)),
        )),
        None => implicit_prompt(obj, ctx),
    }
}

/// OpenAI's preference record: the prompt under `input.messages`, each output one assistant
/// message.
fn parse_openai(obj: &Map<String, Value>, ctx: &Ctx<'_>) -> Result<PreferenceSample> {
    let input = match obj.get("input") {
        Some(Value::Object(i)) => i,
        Some(v) => return Err(ctx.field("input", format!("must be an object, found {}", kind(v)))),
        None => return Err(ctx.field("input", "is missing")),
    };
    if input
        .get("tools")
        .is_some_and(|t| !(t.is_null() || t.as_array().is_some_and(|a| a.is_empty())))
    {
        return Err(ctx.field("input.tools", "tools are not supported"));
    }
    let prompt = ctx
        .message_list(input, "messages", "role", "content")
        .map_err(|e| prefix_field(e, "input."))?;
    let output = |field: &str| -> Result<Vec<Message>> {
        let out = answer(obj, field, ctx)?;
        if out.len() != 1 {
            return Err(ctx.field(
                field,
                format!("must hold one assistant message, found {}", out.len()),
            ));
        }
        Ok(out)
    };
    Ok(PreferenceSample::Chat {
        prompt,
        chosen: output("preferred_output")?,
        rejected: output("non_preferred_output")?,
    })
}

/// TRL's implicit prompt: two conversations, the prompt their shared start.
fn implicit_prompt(obj: &Map<String, Value>, ctx: &Ctx<'_>) -> Result<PreferenceSample> {
    let chosen = match obj.get("chosen") {
        Some(Value::Array(_)) => ctx.message_list(obj, "chosen", "role", "content")?,
        _ => return Err(ctx.field("prompt", "is missing")),
    };
    let rejected = ctx.message_list(obj, "rejected", "role", "content")?;
    let shared = chosen
        .iter()
        .zip(&rejected)
        .take_while(|(a, b)| a == b)
        .count();
    if shared == 0 {
        return Err(ctx.field(
            "prompt",
            "is missing, and chosen and rejected share no first message to take as the prompt",
        ));
    }
    let pick = |list: &[Message], side: &str| -> Result<Vec<Message>> {
        let rest = list[shared..].to_vec();
        check_answer(&rest, side, ctx)?;
        Ok(rest)
    };
    let (c, r) = (pick(&chosen, "chosen")?, pick(&rejected, "rejected")?);
    Ok(PreferenceSample::Chat {
        prompt: chosen[..shared].to_vec(),
        chosen: c,
        rejected: r,
    })
}

/// An answer: a non-empty list of assistant messages with content.
fn answer(obj: &Map<String, Value>, field: &str, ctx: &Ctx<'_>) -> Result<Vec<Message>> {
    let list = match obj.get(field) {
        Some(Value::Array(_)) => ctx.message_list(obj, field, "role", "content")?,
        Some(v) => {
            return Err(ctx.field(
                field,
                format!("must be a list of messages, found {}", kind(v)),
            ))
        }
        None => return Err(ctx.field(field, "is missing")),
    };
    check_answer(&list, field, ctx)?;
    Ok(list)
}

fn check_answer(list: &[Message], field: &str, ctx: &Ctx<'_>) -> Result<()> {
    if list.is_empty() {
        return Err(ctx.field(field, "is empty"));
    }
    for (i, m) in list.iter().enumerate() {
        if m.role != "assistant" {
            return Err(ctx.field(
                &format!("{field}[{i}].role"),
                format!("must be assistant, found {:?}", m.role),
            ));
        }
        if m.content.is_empty() {
            return Err(ctx.field(&format!("{field}[{i}].content"), "is empty"));
        }
    }
    Ok(())
}

fn prefix_field(e: DataError, prefix: &str) -> DataError {
    match e {
        DataError::Field {
            path,
            at,
            field,
            message,
        } => DataError::Field {
            path,
            at,
            field: format!("{prefix}{field}"),
            message,
        },
        other => other,
    }
}

/// A tokenized pair: the prompt with each answer, prompt tokens masked (`IGNORE`), truncated to
/// `max_seq_len` from the end as TRL's `keep_start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub chosen: Example,
    pub rejected: Example,
}

/// The three token sequences TRL makes of a record, untruncated: the prompt is the longest start
/// the prompt alone shares with both prompt + answer renderings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairTokens {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// Tokenize a record as TRL does: a chat is rendered three times (the prompt with the
/// generation prompt, then the prompt with each answer); text gets BOS as the tokenizer adds it
/// and the EOS text after each answer.
pub fn tokenize_pair(
    tok: &TextTokenizer,
    sample: &PreferenceSample,
    opts: &EncodeOptions,
) -> Result<PairTokens> {
    let (p, pc, pr) = match sample {
        PreferenceSample::Chat {
            prompt,
            chosen,
            rejected,
        } => {
            let template = tok.template.as_ref().ok_or_else(|| DataError::File {
                path: tok.dir.join("tokenizer_config.json"),
                message: "chat data needs a chat template, and this model has none (chat_template)"
                    .into(),
            })?;
            let with = |answer: &[Message]| [prompt.as_slice(), answer].concat();
            (
                template.render(prompt, true)?,
                template.render(&with(chosen), false)?,
                template.render(&with(rejected), false)?,
            )
        }
        PreferenceSample::Text {
            prompt,
            chosen,
            rejected,
        } => {
            let bos = opts.bos_text(tok);
            let eos = tok.eos_text();
            let ended = |s: &str| {
                if s.ends_with(eos) {
                    s.to_string()
                } else {
                    format!("{s}{eos}")
                }
            };
            (
                format!("{bos}{prompt}"),
                format!("{bos}{prompt}{}", ended(chosen)),
                format!("{bos}{prompt}{}", ended(rejected)),
            )
        }
    };
    let (p, pc, pr) = (tok.encode(&p)?.0, tok.encode(&pc)?.0, tok.encode(&pr)?.0);
    let shared = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let n = shared(&p, &pc).min(shared(&p, &pr));
    Ok(PairTokens {
        prompt: p[..n].to_vec(),
        chosen: pc[n..].to_vec(),
        rejected: pr[n..].to_vec(),
    })
}

impl PairTokens {
    /// The pair as two examples cut to `max_len` tokens from the start, or None when the prompt
    /// alone fills `max_len` (TRL drops those: no answer token would be left). Also whether
    /// either side was cut.
    pub fn truncate(&self, max_len: usize) -> Option<(Pair, bool)> {
        if self.prompt.len() >= max_len {
            return None;
        }
        let side = |answer: &[u32]| {
            let mut input_ids = [self.prompt.as_slice(), answer].concat();
            let mut labels: Vec<i64> = vec![IGNORE; self.prompt.len()];
            labels.extend(answer.iter().map(|&t| t as i64));
            let cut = input_ids.len() > max_len;
            input_ids.truncate(max_len);
            labels.truncate(max_len);
            (Example { input_ids, labels }, cut)
        };
        let ((chosen, a), (rejected, b)) = (side(&self.chosen), side(&self.rejected));
        Some((Pair { chosen, rejected }, a || b))
    }
}

/// Read, check and tokenize a preference file; every record is checked before any is used.
/// Pairs whose prompt fills `max_seq_len` are left out and counted (`dropped`).
pub fn encode_preferences(
    path: &Path,
    tok: &TextTokenizer,
    opts: &EncodeOptions,
) -> Result<(Vec<Pair>, DatasetSummary)> {
    let (format, samples) = read_records(path, opts.format)?;
    let mut summary = DatasetSummary {
        format: format.as_str().to_string(),
        dropped: Some(0),
        ..Default::default()
    };
    let mut pairs = Vec::with_capacity(samples.len());
    for (at, sample) in &samples {
        let Sample::Preference(sample) = sample else {
            return Err(DataError::Record {
                path: path.to_path_buf(),
                at: *at,
                message: "DPO trains on preference pairs: expected input/preferred_output/non_preferred_output or prompt/chosen/rejected".into(),
            });
        };
        let tokens =
            tokenize_pair(tok, sample, opts).map_err(|e| super::encode::at_record(e, path, *at))?;
        let Some((pair, cut)) = tokens.truncate(opts.max_seq_len) else {
            *summary.dropped.as_mut().expect("set above") += 1;
            continue;
        };
        summary.examples += 1;
        summary.truncated += cut as usize;
        for side in [&pair.chosen, &pair.rejected] {
            summary.tokens += side.input_ids.len();
            summary.trainable_tokens += side.trainable_tokens();
        }
        pairs.push(pair);
    }
    if pairs.is_empty() {
        return Err(DataError::File {
            path: path.to_path_buf(),
            message: format!(
                "no pair is left: every prompt fills max_seq_len ({} tokens)",
                opts.max_seq_len
            ),
        });
    }
    Ok((pairs, summary))
}
