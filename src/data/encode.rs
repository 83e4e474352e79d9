//! Samples to token ids and labels: loss on completions and assistant turns only (unless
//! `train_on_prompt`), truncation to `max_seq_len`, and a summary of what was kept.

use std::path::Path;

use super::records::{read_records, DataFormat, Sample};
use super::{DataError, Position, Result, TextTokenizer};

/// Label value that the loss ignores.
pub const IGNORE: i64 = -100;

/// One tokenized training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// `IGNORE` where no loss is taken.
    pub labels: Vec<i64>,
}

impl Example {
    pub fn trainable_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

/// Whether text and prompt/completion records start with the BOS token. Chat records get
/// what their template writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BosRule {
    /// Where the model's tokenizer adds one itself, as transformers, TRL and llama.cpp
    /// tokenize a text.
    #[default]
    Auto,
    /// Always, as artidoro/qlora does.
    Always,
    Never,
}

#[derive(Debug, Clone)]
pub struct EncodeOptions {
    pub format: Option<DataFormat>,
    pub max_seq_len: usize,
    pub train_on_prompt: bool,
    pub bos: BosRule,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            format: None,
            max_seq_len: 2048,
            train_on_prompt: false,
            bos: BosRule::Auto,
        }
    }
}

impl EncodeOptions {
    /// The BOS text to put before a text or prompt with this tokenizer, if any.
    pub(crate) fn bos_text<'a>(&self, tok: &'a TextTokenizer) -> &'a str {
        let add = match self.bos {
            BosRule::Auto => tok.adds_bos,
            BosRule::Always => true,
            BosRule::Never => false,
        };
        if add {
            tok.bos_text()
        } else {
            ""
        }
    }
}

/// Counts reported after validation.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DatasetSummary {
    pub format: String,
    pub examples: usize,
    pub tokens: usize,
    pub trainable_tokens: usize,
    pub truncated: usize,
    /// Preference pairs left out because the prompt alone fills `max_seq_len`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped: Option<usize>,
}

/// Tokenize one sample.
pub fn encode_sample(
    tok: &TextTokenizer,
    sample: &Sample,
    opts: &EncodeOptions,
) -> Result<Example> {
    let (mut ids, mut labels) =
        match sample {
            Sample::Prompted { prompt, completion } => {
                // As artidoro/qlora: bos + prompt, then completion + eos, tokenized separately.
                let (p, _) = tok.encode(&format!("{}{prompt}", opts.bos_text(tok)))?;
                let (c, _) = tok.encode(&format!("{completion}{}", tok.eos_text()))?;
                let mut labels: Vec<i64> = if opts.train_on_prompt {
                    p.iter().map(|&t| t as i64).collect()
                } else {
                    vec![IGNORE; p.len()]
                };
                labels.extend(c.iter().map(|&t| t as i64));
                ([p, c].concat(), labels)
            }
            Sample::Text(text) => {
                let (ids, _) =
                    tok.encode(&format!("{}{text}{}", opts.bos_text(tok), tok.eos_text()))?;
                let labels = ids.iter().map(|&t| t as i64).collect();
                (ids, labels)
            }
            Sample::Chat { messages } => encode_chat(tok, messages, opts.train_on_prompt)?,
            Sample::Preference(_) => return Err(DataError::Tokenizer {
                path: tok.dir.clone(),
                message:
                    "a preference pair (chosen and rejected) trains with method dpo, not supervised"
                        .into(),
            }),
        };
    if ids.len() > opts.max_seq_len {
        ids.truncate(opts.max_seq_len);
        labels.truncate(opts.max_seq_len);
    }
    Ok(Example {
        input_ids: ids,
        labels,
    })
}

/// Render the conversation, then mark the tokens of each assistant turn. The turn's span is
/// what rendering up to it adds beyond the generation prompt before it, so whatever the
/// template wraps around a reply (end-of-turn tokens included) is learned with it.
fn encode_chat(
    tok: &TextTokenizer,
    messages: &[super::Message],
    train_on_prompt: bool,
) -> Result<(Vec<u32>, Vec<i64>)> {
    let template = tok.template.as_ref().ok_or_else(|| DataError::File {
        path: tok.dir.join("tokenizer_config.json"),
        message: "chat data needs a chat template, and this model has none (chat_template)".into(),
    })?;
    let full = template.render(messages, false)?;
    let mut spans = Vec::new();
    for (k, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let prefix = template.render(&messages[..k], true)?;
        let upto = template.render(&messages[..=k], false)?;
        if !upto.starts_with(&prefix) || !full.starts_with(&upto) {
            return Err(DataError::Template {
                path: template.source.clone(),
                message: "the template does not render conversations incrementally, so assistant turns cannot be located; set train_on_prompt".into(),
            });
        }
        spans.push((prefix.len(), upto.len()));
    }
    let (ids, offsets) = tok.encode(&full)?;
    let labels = ids
        .iter()
        .zip(&offsets)
        .map(|(&id, &(start, end))| {
            let inside = spans
                .iter()
                .any(|&(s, e)| start >= s && end <= e && end > start);
            if train_on_prompt || inside {
                id as i64
            } else {
                IGNORE
            }
        })
        .collect();
    Ok((ids, labels))
}

/// Read, check and tokenize a dataset file. Every record is validated before any is used.
pub fn encode_dataset(
    path: &Path,
    tok: &TextTokenizer,
    opts: &EncodeOptions,
) -> Result<(Vec<Example>, DatasetSummary)> {
    let (format, samples) = read_records(path, opts.format)?;
    let mut summary = DatasetSummary {
        format: format.as_str().to_string(),
        ..Default::default()
    };
    let mut examples = Vec::with_capacity(samples.len());
    for (at, sample) in &samples {
        if let Sample::Preference(_) = sample {
            return Err(DataError::Record {
                path: path.to_path_buf(),
                at: *at,
                message:
                    "a preference pair (chosen and rejected) trains with method dpo, not supervised"
                        .into(),
            });
        }
        let full_len = {
            let ex = encode_sample(
                tok,
                sample,
                &EncodeOptions {
                    max_seq_len: usize::MAX,
                    ..opts.clone()
                },
            )
            .map_err(|e| at_record(e, path, *at))?;
            ex.input_ids.len()
        };
        let ex = encode_sample(tok, sample, opts).map_err(|e| at_record(e, path, *at))?;
        if full_len > ex.input_ids.len() {
            summary.truncated += 1;
        }
        summary.examples += 1;
        summary.tokens += ex.input_ids.len();
        summary.trainable_tokens += ex.trainable_tokens();
        examples.push(ex);
    }
    if summary.trainable_tokens == 0 {
        return Err(DataError::File {
            path: path.to_path_buf(),
            message: "no example has a token to learn from (all prompt, or truncated away)".into(),
        });
    }
    Ok((examples, summary))
}

/// Attach the record position to template and tokenizer errors.
pub(crate) fn at_record(e: DataError, path: &Path, at: Position) -> DataError {
    match e {
        DataError::Template {
            message,
            path: tpath,
        } => DataError::Record {
            path: path.to_path_buf(),
            at,
            message: format!("chat template {}: {message}", tpath.display()),
        },
        DataError::Tokenizer { message, .. } => DataError::Record {
            path: path.to_path_buf(),
            at,
            message: format!("tokenizer: {message}"),
        },
        other => other,
    }
}
