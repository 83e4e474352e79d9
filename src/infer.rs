//! Trying a model: one loaded base that serves its fine-tuned models in turn (each adapter
//! loaded once and kept, the least recently used dropped), chat or text prompts, several
//! choices decoded as one batch, stop strings, and text handed out as it is decoded.

use std::path::{Path, PathBuf};

use crate::data::{DataError, Message, TextTokenizer};
use crate::lora::LoraAdapter;
use crate::model::llama::generate::{Finish, Next, Sampling};
use crate::model::llama::{CausalLm, LoadOptions};
use crate::model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The request cannot be served as asked: the field at fault and why.
    #[error("{field}: {message}")]
    Request { field: String, message: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
}

pub type Result<T> = std::result::Result<T, InferError>;

fn request(field: &str, message: impl Into<String>) -> InferError {
    InferError::Request {
        field: field.into(),
        message: message.into(),
    }
}

/// What to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Rendered with the model's chat template and its generation prompt.
    Chat(Vec<Message>),
    /// Used as it is, after BOS where the tokenizer adds one.
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// A PEFT adapter directory over the base, or the base alone.
    pub adapter: Option<PathBuf>,
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Text that ends a choice where it appears (not included).
    pub stop: Vec<String>,
    /// Choices, decoded together as one batch, each with its own seed.
    pub n: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub text: String,
    pub finish: Finish,
    pub tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub prompt_tokens: usize,
    pub choices: Vec<Choice>,
}

/// A loaded base model with its tokenizer and the adapters it has served.
pub struct Engine {
    model: CausalLm,
    tok: TextTokenizer,
    /// Token ids that end a turn: the tokenizer's EOS and the model's `eos_token_id`s.
    stop_ids: Vec<u32>,
    /// Loaded adapters, most recently used last.
    adapters: Vec<(PathBuf, Vec<(String, LoraAdapter)>)>,
    max_adapters: usize,
    /// The adapter on the model now.
    installed: Option<PathBuf>,
}

impl Engine {
    /// Load the base model at `dir` (a directory or GGUF file) as `opts` says, keeping up to
    /// `max_adapters` adapters loaded.
    pub fn load(dir: &Path, opts: &LoadOptions, max_adapters: usize) -> Result<Engine> {
        let tok = TextTokenizer::load(dir)?;
        let model = CausalLm::load(dir, opts)?;
        Ok(Engine::new(model, tok, max_adapters))
    }

    /// An engine over a loaded model (its adapters, if any, are taken off: a request names
    /// its own).
    pub fn new(mut model: CausalLm, tok: TextTokenizer, max_adapters: usize) -> Engine {
        model.take_adapters();
        let stop_ids = stop_ids(&model, &tok);
        Engine {
            model,
            tok,
            stop_ids,
            adapters: Vec::new(),
            max_adapters: max_adapters.max(1),
            installed: None,
        }
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tok
    }

    /// Put `adapter` (or none) on the model, loading it the first time.
    fn install(&mut self, adapter: Option<&Path>) -> Result<()> {
        if self.installed.as_deref() == adapter {
            return Ok(());
        }
        let set = match adapter {
            None => Vec::new(),
            Some(dir) => match self.adapters.iter().position(|(p, _)| p == dir) {
                Some(i) => {
                    let entry = self.adapters.remove(i);
                    let set = entry.1.clone();
                    self.adapters.push(entry);
                    set
                }
                None => {
                    // Whatever happens, the model is left bare and says so: a load that fails
                    // halfway leaves no stray adapter behind.
                    self.model.take_adapters();
                    self.installed = None;
                    let loaded = self.model.load_adapter(dir);
                    let set = self.model.take_adapters();
                    loaded?;
                    if self.adapters.len() == self.max_adapters {
                        self.adapters.remove(0);
                    }
                    self.adapters.push((dir.to_path_buf(), set.clone()));
                    set
                }
            },
        };
        self.model.set_adapters(&set)?;
        self.installed = adapter.map(Path::to_path_buf);
        Ok(())
    }

    /// The prompt's token ids.
    pub fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let text = match prompt {
            Prompt::Chat(messages) => {
                let template = self.tok.template.as_ref().ok_or_else(|| {
                    request(
                        "messages",
                        "this model has no chat template; use /v1/completions",
                    )
                })?;
                template.render(messages, true)?
            }
            Prompt::Text(t) => format!("{}{t}", self.tok.bos_text()),
        };
        Ok(self.tok.encode(&text)?.0)
    }

    /// Generate the request's choices. `on_text(choice, delta)` hears each piece of text as
    /// soon as it is certain (no stop string can still begin in it, no character is half
    /// decoded); returning false stops every choice (the client left).
    pub fn run(
        &mut self,
        req: &Request,
        on_text: &mut dyn FnMut(usize, &str) -> bool,
    ) -> Result<Response> {
        if req.n == 0 {
            return Err(request("n", "must be at least 1"));
        }
        if req.stop.iter().any(String::is_empty) {
            return Err(request("stop", "a stop string is empty"));
        }
        let ids = self.encode(&req.prompt)?;
        let limit = self.model.config.max_position_embeddings;
        if ids.len() + req.max_tokens > limit {
            return Err(request(
                "max_tokens",
                format!(
                    "the prompt's {} tokens and max_tokens {} exceed the model's context of {limit}",
                    ids.len(),
                    req.max_tokens
                ),
            ));
        }
        self.install(req.adapter.as_deref())?;
        let mut rows: Vec<Row> = (0..req.n).map(|_| Row::default()).collect();
        let tok = &self.tok;
        let stop = &req.stop;
        let mut gone = false;
        let out = self.model.generate_batch(
            &vec![ids.clone(); req.n],
            req.max_tokens,
            &req.sampling,
            &self.stop_ids,
            &mut |r, t| {
                let row = &mut rows[r];
                row.tokens.push(t);
                let step = row.advance(tok, stop, false);
                if !step.delta.is_empty() && !on_text(r, &step.delta) {
                    gone = true;
                }
                if gone || step.stopped {
                    Next::Stop
                } else {
                    Next::Continue
                }
            },
        )?;
        let mut choices = Vec::with_capacity(req.n);
        for (r, (tokens, finish)) in out.into_iter().enumerate() {
            let row = &mut rows[r];
            let stopped = row.stopped;
            let last = row.advance(tok, stop, true);
            if !last.delta.is_empty() && !gone {
                on_text(r, &last.delta);
            }
            choices.push(Choice {
                text: row.text.clone(),
                finish: if stopped { Finish::Stop } else { finish },
                tokens: tokens.len(),
            });
        }
        Ok(Response {
            prompt_tokens: ids.len(),
            choices,
        })
    }
}

/// Token ids that end a turn: the tokenizer's EOS and the model config's `eos_token_id`s.
pub fn stop_ids(model: &CausalLm, tok: &TextTokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = tok.eos.iter().map(|e| e.1).collect();
    let listed: Vec<u64> = match &model.config.raw["eos_token_id"] {
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_u64()).collect(),
        v => v.as_u64().into_iter().collect(),
    };
    ids.extend(listed.into_iter().map(|i| i as u32));
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Greedy answers of `model` as it is (its adapters on) to each conversation, all in one
/// batch, at most `max_tokens` each: the samples a job records at its evaluations.
pub fn answer_chats(
    model: &CausalLm,
    tok: &TextTokenizer,
    chats: &[Vec<Message>],
    max_tokens: usize,
) -> Result<Vec<String>> {
    let template = tok
        .template
        .as_ref()
        .ok_or_else(|| request("eval_prompts", "this model has no chat template"))?;
    let prompts = chats
        .iter()
        .map(|m| Ok(tok.encode(&template.render(m, true)?)?.0))
        .collect::<Result<Vec<_>>>()?;
    let out = model.generate_batch(
        &prompts,
        max_tokens,
        &Sampling::default(),
        &stop_ids(model, tok),
        &mut |_, _| Next::Continue,
    )?;
    out.iter()
        .map(|(t, _)| Ok(tok.decode(t)?))
        .collect::<Result<Vec<_>>>()
}

/// One choice's decoding: its tokens, the text kept (cut at a stop string) and how much of it
/// has been handed out.
#[derive(Default)]
struct Row {
    tokens: Vec<u32>,
    text: String,
    sent: usize,
    stopped: bool,
}

struct Step {
    delta: String,
    stopped: bool,
}

impl Row {
    /// Decode the tokens so far, cut at the first stop string, and return the text that is now
    /// certain; `last` hands out everything left.
    fn advance(&mut self, tok: &TextTokenizer, stop: &[String], last: bool) -> Step {
        if !self.stopped {
            let text = tok.decode(&self.tokens).unwrap_or_default();
            let cut = stop.iter().filter_map(|s| text.find(s.as_str())).min();
            self.text = match cut {
                Some(i) => {
                    self.stopped = true;
                    text[..i].to_string()
                }
                None => text,
            };
        }
        let mut end = self.text.len();
        if !last && !self.stopped {
            // Hold back what a stop string could still begin with, and a character the next
            // token may finish (decoded as U+FFFD for now).
            let hold = stop
                .iter()
                .flat_map(|s| {
                    (1..s.len())
                        .filter(|&k| s.is_char_boundary(k))
                        .map(move |k| &s[..k])
                })
                .filter(|p| self.text.ends_with(p))
                .map(str::len)
                .max()
                .unwrap_or(0);
            end -= hold;
            while self.text[..end].ends_with('\u{FFFD}') {
                end -= '\u{FFFD}'.len_utf8();
            }
        }
        // A later decode can rewrite the end of what was sent (rare); what was sent stays sent.
        if self.sent > self.text.len() || !self.text.is_char_boundary(self.sent) {
            return Step {
                delta: String::new(),
                stopped: self.stopped,
            };
        }
        let end = end.max(self.sent);
        let delta = self.text[self.sent..end].to_string();
        self.sent = end;
        Step {
            delta,
            stopped: self.stopped,
        }
    }
}
