//! Datasets: JSON/JSONL records in alpaca, chat, sharegpt, completion or text form, chat
//! templates, tokenization with loss masks, and padded batches.

pub mod batch;
pub mod encode;
pub mod gguf_vocab;
pub mod pack;
pub mod preference;
pub mod records;
pub mod template;
pub mod tokenizer;

use std::fmt;
use std::path::PathBuf;

pub use batch::{Batch, Batcher};
pub use encode::{encode_dataset, DatasetSummary, EncodeOptions, Example};
pub use preference::{encode_preferences, Pair, PreferenceSample};
pub use records::{read_records, visit_records, DataFormat, Message, Sample};
pub use template::ChatTemplate;
pub use tokenizer::TextTokenizer;

/// Where in a dataset file something is: a JSONL line or a JSON array index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Line(usize),
    Index(usize),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Line(n) => write!(f, "line {n}"),
            Position::Index(i) => write!(f, "record {i}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {at}: {message}")]
    Record {
        path: PathBuf,
        at: Position,
        message: String,
    },
    #[error("{path}: {at}: field `{field}`: {message}")]
    Field {
        path: PathBuf,
        at: Position,
        field: String,
        message: String,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: chat template error: {message}")]
    Template { path: PathBuf, message: String },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DataError>;
