//! Hugging Face model directories: sharded safetensors in and out, and 4-bit quantization of a
//! whole causal LM the way transformers + bitsandbytes do it.

pub mod config;
pub mod gguf;
pub mod hub;
pub mod llama;
pub mod quantize;
pub mod random;
pub mod source;
pub mod weights;
pub mod writer;

use std::path::PathBuf;

use crate::quant::QuantError;

pub use quantize::{quantize_model_dir, QuantizeOptions, QuantizeReport};
pub use weights::WeightFiles;
pub use writer::SafetensorsWriter;

/// Errors of the model layer; each names the file or tensor it is about.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not found")]
    Missing { path: PathBuf },
    #[error("{path}: invalid JSON at line {line}, column {column}: {source}", line = source.line(), column = source.column())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: not a valid safetensors file: {source}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("tensor {tensor}: {source}")]
    Tensor {
        tensor: String,
        #[source]
        source: QuantError,
    },
    #[error("tensor {tensor}: {message}")]
    BadTensor { tensor: String, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Quant(#[from] QuantError),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// A base model found under a model root.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    /// The file or directory name, which a job's `model` uses.
    pub name: String,
    pub path: std::path::PathBuf,
    /// `model_type` from config.json, or a GGUF file's `general.architecture`.
    pub model_type: Option<String>,
    /// `safetensors` (a Hugging Face directory) or `gguf`.
    pub format: &'static str,
}

/// Models directly under each root, sorted by name: Hugging Face directories (with a
/// config.json) and GGUF files. Unreadable entries are listed without a model type.
pub fn list_models(roots: &[std::path::PathBuf]) -> Vec<ModelEntry> {
    let mut found = Vec::new();
    for root in roots {
        let mut here: Vec<ModelEntry> = std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| model_entry(e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        here.sort_by(|a, b| a.name.cmp(&b.name));
        found.extend(here);
    }
    found
}

/// `path` as a listed model named `name`, if it is one.
pub fn model_entry(name: String, path: PathBuf) -> Option<ModelEntry> {
    if gguf::is_gguf(&path) && path.is_file() {
        let model_type = gguf::GgufModel::open(&path)
            .ok()
            .and_then(|g| g.architecture().ok().map(String::from));
        Some(ModelEntry {
            name,
            path,
            model_type,
            format: "gguf",
        })
    } else if path.join("config.json").is_file() {
        let model_type = read_json(&path.join("config.json"))
            .ok()
            .and_then(|v| v.get("model_type")?.as_str().map(String::from));
        Some(ModelEntry {
            name,
            path,
            model_type,
            format: "safetensors",
        })
    } else {
        None
    }
}

/// Whether `path` is something a model loads from: a Hugging Face directory (with a
/// `config.json`) or a GGUF file.
pub fn is_model_path(path: &std::path::Path) -> bool {
    if gguf::is_gguf(path) {
        path.is_file()
    } else {
        path.join("config.json").is_file()
    }
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.into();
    move |source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::Missing { path }
        } else {
            ModelError::Io { path, source }
        }
    }
}

/// Read and parse a JSON file; errors name the file, line and column.
pub(crate) fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// `cpu` or `cuda:N` as a candle device; CUDA only in builds with the `cuda` feature.
pub fn parse_device(name: &str) -> std::result::Result<candle_core::Device, String> {
    if name == "cpu" {
        return Ok(candle_core::Device::Cpu);
    }
    let ordinal = name
        .strip_prefix("cuda:")
        .and_then(|n| n.parse::<usize>().ok())
        .ok_or_else(|| format!("{name:?}: expected cpu or cuda:N"))?;
    if !cfg!(feature = "cuda") {
        return Err(format!(
            "{name}: this qlorad was built without the cuda feature"
        ));
    }
    let device = candle_core::Device::new_cuda(ordinal).map_err(|e| format!("{name}: {e}"))?;
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = &device {
        // One stream per thread, and a job's tensors live and die on its one thread: the
        // cross-stream events candle records around every kernel would only cost time.
        // SAFETY: nothing has been allocated on this device yet; see above for the streams.
        unsafe { d.disable_event_tracking() };
        crate::ops::cuda::keep_freed_memory(d).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_models_finds_directories_and_gguf_files_by_name() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("b-model");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("config.json"), r#"{"model_type": "qwen2"}"#).unwrap();
        std::fs::write(root.path().join("a-model.gguf"), b"not a gguf").unwrap();
        std::fs::write(root.path().join("notes.txt"), b"ignored").unwrap();
        std::fs::create_dir(root.path().join("empty-dir")).unwrap();
        let found = list_models(&[root.path().to_path_buf()]);
        let summary: Vec<_> = found
            .iter()
            .map(|m| (m.name.as_str(), m.format, m.model_type.as_deref()))
            .collect();
        assert_eq!(
            summary,
            [
                ("a-model.gguf", "gguf", None),
                ("b-model", "safetensors", Some("qwen2"))
            ]
        );
        assert!(found
            .iter()
            .all(|m| is_model_path(&m.path) || m.format == "gguf"));
    }
}
