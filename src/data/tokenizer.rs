//! A model directory's tokenizer: `tokenizer.json` (the `tokenizers` crate), special tokens and
//! the chat template from `tokenizer_config.json`.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use super::{ChatTemplate, DataError, Result};

/// Token ids and the byte span of each token in the text.
pub type Encoded = (Vec<u32>, Vec<(usize, usize)>);

pub struct TextTokenizer {
    pub tokenizer: Tokenizer,
    pub bos: Option<(String, u32)>,
    pub eos: Option<(String, u32)>,
    pub pad_id: u32,
    /// Whether the tokenizer puts BOS before a text itself, as transformers and llama.cpp
    /// tokenize one: `tokenizer.json`'s post-processor (transformers 5 ignores
    /// `add_bos_token` in `tokenizer_config.json` beside a `tokenizer.json`), or a GGUF's
    /// `tokenizer.ggml.add_bos_token`.
    pub adds_bos: bool,
    pub template: Option<ChatTemplate>,
    pub dir: PathBuf,
}

/// A special token's text: a string, or an AddedToken object with `content`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

impl TextTokenizer {
    /// The tokenizer of a model directory, or of a GGUF file (rebuilt from its metadata).
    pub fn load(dir: &Path) -> Result<Self> {
        if crate::model::gguf::is_gguf(dir) {
            return Self::from_gguf(dir);
        }
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(DataError::File {
                path,
                message: "not found: the model directory needs a tokenizer.json (a fast tokenizer)"
                    .into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| DataError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text = std::fs::read(&cfg_path).map_err(|source| DataError::Io {
                path: cfg_path.clone(),
                source,
            })?;
            serde_json::from_slice(&text).map_err(|e| DataError::Record {
                path: cfg_path.clone(),
                at: super::Position::Line(e.line()),
                message: format!("invalid JSON: {e}"),
            })?
        } else {
            Value::Null
        };
        let lookup = |field: &str| -> Result<Option<(String, u32)>> {
            match token_text(cfg.get(field)) {
                None => Ok(None),
                Some(t) => match tokenizer.token_to_id(&t) {
                    Some(id) => Ok(Some((t, id))),
                    None => Err(DataError::Tokenizer {
                        path: cfg_path.clone(),
                        message: format!(
                            "{field} {t:?} is not in the vocabulary of tokenizer.json"
                        ),
                    }),
                },
            }
        };
        let bos = lookup("bos_token")?;
        let eos = lookup("eos_token")?;
        let pad = lookup("pad_token")?;
        let pad_id = pad.map(|p| p.1).or(eos.as_ref().map(|e| e.1)).unwrap_or(0);
        let adds_bos = match &bos {
            Some((_, id)) => {
                let with = tokenizer
                    .encode("", true)
                    .map_err(|e| DataError::Tokenizer {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                with.get_ids().first() == Some(id)
            }
            None => false,
        };
        let template = match ChatTemplate::find(dir, &cfg)? {
            Some((t, source)) => Some(ChatTemplate::new(
                &t,
                &source,
                bos.as_ref().map(|b| b.0.as_str()).unwrap_or(""),
                eos.as_ref().map(|e| e.0.as_str()).unwrap_or(""),
            )?),
            None => None,
        };
        Ok(TextTokenizer {
            tokenizer,
            bos,
            eos,
            pad_id,
            adds_bos,
            template,
            dir: dir.to_path_buf(),
        })
    }

    fn from_gguf(path: &Path) -> Result<Self> {
        let g = crate::model::gguf::GgufModel::open(path).map_err(|e| DataError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_gguf_model(&g)
    }

    /// The tokenizer of an already open GGUF file, rebuilt from its metadata.
    pub fn from_gguf_model(g: &crate::model::gguf::GgufModel) -> Result<Self> {
        let path = g.path.as_path();
        let v = super::gguf_vocab::gguf_vocab(g)?;
        let template = match &v.chat_template {
            Some(t) => Some(ChatTemplate::new(
                t,
                path,
                v.bos.as_ref().map(|b| b.0.as_str()).unwrap_or(""),
                v.eos.as_ref().map(|e| e.0.as_str()).unwrap_or(""),
            )?),
            None => None,
        };
        Ok(TextTokenizer {
            tokenizer: v.tokenizer,
            pad_id: v.pad_id.or(v.eos.as_ref().map(|e| e.1)).unwrap_or(0),
            adds_bos: v.add_bos && v.bos.is_some(),
            bos: v.bos,
            eos: v.eos,
            template,
            dir: path.to_path_buf(),
        })
    }

    /// Token ids of `text` with byte offsets; special tokens written in the text are recognised,
    /// none are added (`add_special_tokens=False`, as `apply_chat_template` tokenizes).
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer {
                path: self.dir.join("tokenizer.json"),
                message: e.to_string(),
            })?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| DataError::Tokenizer {
                path: self.dir.join("tokenizer.json"),
                message: e.to_string(),
            })
    }

    pub fn bos_text(&self) -> &str {
        self.bos.as_ref().map(|b| b.0.as_str()).unwrap_or("")
    }

    pub fn eos_text(&self) -> &str {
        self.eos.as_ref().map(|e| e.0.as_str()).unwrap_or("")
    }
}
