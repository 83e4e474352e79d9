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

impl BaseWeights {
    /// Open a model directory or GGUF file: its configuration and its (lazily read) tensors.
    pub fn open(path: &Path) -> Result<(ModelConfig, BaseWeights)> {
        if is_gguf(path) {
            let g = GgufModel::open(path)?;
            return Ok((g.config()?, BaseWeights::Gguf(g)));
        }
        let config = ModelConfig::load(path)?;
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
