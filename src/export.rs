//! Export: adapters merged into the base (`W + scale·B·A`, in f32), written as a Hugging Face
//! safetensors directory or as a GGUF file llama.cpp loads, and the adapter alone as a GGUF LoRA.

pub mod gguf;
pub mod merge;
pub mod vocab;

use std::path::PathBuf;

pub use merge::{
    export_gguf, export_gguf_lora, export_safetensors, GgufType, MergeBase, MergeSource,
};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("adapter {path}: {message}")]
    Adapter { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ExportError>;
