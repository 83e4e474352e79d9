//! Export: adapters merged into the base (`W + scale·B·A`, in f32), written as a Hugging Face
//! safetensors directory or as a GGUF file llama.cpp loads, and the adapter alone as a GGUF LoRA.

pub mod gguf;
pub mod merge;
pub mod vocab;

use std::path::PathBuf;

pub use merge::{
    arch_name, export_gguf, export_gguf_lora, export_safetensors, GgufType, MergeBase, MergeSource,
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

/// What to write from a model and adapter.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub gguf: Vec<GgufType>,
    pub gguf_lora: bool,
    pub safetensors: bool,
    pub merge_base: MergeBase,
}

/// Write the requested outputs under `out`: `merged/` (safetensors), `<model>-<type>.gguf`,
/// `<model>-lora.gguf`. Returns the paths written.
pub fn export_all(
    model: &std::path::Path,
    adapter: Option<&std::path::Path>,
    out: &std::path::Path,
    outputs: &Outputs,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<PathBuf>> {
    if outputs.gguf.is_empty() && !outputs.gguf_lora && !outputs.safetensors {
        return Err(ExportError::Invalid(
            "nothing to write: pass --safetensors, --gguf TYPES and/or --gguf-lora".into(),
        ));
    }
    if outputs.gguf_lora && adapter.is_none() {
        return Err(ExportError::Invalid("a GGUF LoRA needs an adapter".into()));
    }
    let src = MergeSource::open(model, adapter, outputs.merge_base)?;
    std::fs::create_dir_all(out).map_err(|e| ExportError::Io {
        path: out.to_path_buf(),
        source: e,
    })?;
    let name = if crate::model::gguf::is_gguf(model) {
        model.file_stem()
    } else {
        model.file_name()
    };
    let name = name
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let mut written = Vec::new();
    if outputs.safetensors {
        let dir = out.join("merged");
        export_safetensors(&src, &dir, 5_000_000_000, progress)?;
        written.push(dir);
    }
    for ty in &outputs.gguf {
        let path = out.join(format!("{name}-{}.gguf", ty.as_str()));
        export_gguf(&src, &path, *ty, progress)?;
        written.push(path);
    }
    if outputs.gguf_lora {
        let path = out.join(format!("{name}-lora.gguf"));
        export_gguf_lora(&src, &path)?;
        written.push(path);
    }
    Ok(written)
}
