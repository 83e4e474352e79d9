//! Where a base model's configuration and tensors come from: a Hugging Face directory of
//! safetensors (dense or bitsandbytes 4-bit) or a GGUF file.

use std::path::Path;

use super::config::ModelConfig;
use super::gguf::{is_gguf, GgufModel};
use super::{Result, WeightFiles};
use crate::quant::bnb::parse_quantization_config;

pub enum BaseWeights {
    Safetensors {
        files: WeightFiles,
        /// A bitsandbytes 4-bit checkpoint: linears load as stored.
        prequantized: bool,
    },
    Gguf(GgufModel),
}

impl ModelConfig {
    /// The configuration of a model directory (`config.json`) or a GGUF file (its metadata).
    pub fn load(path: &Path) -> Result<Self> {
        Ok(open_config(path)?.0)
    }
}

/// A model path's configuration, and the GGUF file it came from when it is one: the one place
/// that tells a GGUF file from a Hugging Face directory.
fn open_config(path: &Path) -> Result<(ModelConfig, Option<GgufModel>)> {
    if is_gguf(path) {
        let g = GgufModel::open(path)?;
        return Ok((g.config()?, Some(g)));
    }
    Ok((ModelConfig::from_dir(path)?, None))
}

impl BaseWeights {
    /// Open a model directory or GGUF file: its configuration and its (lazily read) tensors.
    pub fn open(path: &Path) -> Result<(ModelConfig, BaseWeights)> {
        let (config, gguf) = open_config(path)?;
        if let Some(g) = gguf {
            return Ok((config, BaseWeights::Gguf(g)));
        }
        let prequantized = config
            .raw
            .get("quantization_config")
            .and_then(parse_quantization_config)
            .is_some();
        let files = WeightFiles::open(path)?;
        Ok((
            config,
            BaseWeights::Safetensors {
                files,
                prequantized,
            },
        ))
    }
}
