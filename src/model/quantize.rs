//! `qlorad quantize`: a Hugging Face causal-LM directory to a bitsandbytes 4-bit directory that
//! `AutoModelForCausalLM.from_pretrained` loads, one tensor at a time.
//!
//! As transformers' `replace_with_bnb_linear`, every linear layer inside the decoder blocks is
//! quantized; embeddings, norms and `lm_head` keep their dtype. Output shards mirror the input's.

use std::path::{Path, PathBuf};

use candle_core::Device;
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use super::weights::{WeightFiles, INDEX_FILE};
use super::writer::SafetensorsWriter;
use super::{io_err, read_json, ModelError, Result};
use crate::quant::bnb::{quantization_config, to_bnb_tensors};
use crate::quant::{FloatDType, FloatSlice, Quant4Tensor, QuantConfig};

#[derive(Debug, Clone, Default)]
pub struct QuantizeOptions {
    pub config: QuantConfig,
}

/// What a quantization run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuantizeReport {
    pub quantized: usize,
    pub copied: usize,
    pub bytes_in: usize,
    pub bytes_out: usize,
}

/// Progress through the tensors of a model.
#[derive(Debug, Clone)]
pub struct Progress<'a> {
    pub done: usize,
    pub total: usize,
    pub tensor: &'a str,
    pub quantized: bool,
}

/// Whether `name` is the weight of a linear layer transformers would replace with `Linear4bit`.
/// Decoder-block weights that are not norms; `embed_tokens` and `lm_head` sit outside the blocks.
pub fn is_linear_weight(name: &str) -> bool {
    let Some(module) = name.strip_suffix(".weight") else {
        return false;
    };
    let in_blocks = [".layers.", ".h.", ".blocks."]
        .iter()
        .any(|p| module.contains(p));
    let leaf = module.rsplit('.').next().unwrap_or(module);
    in_blocks && !leaf.contains("norm") && !leaf.contains("embed") && !leaf.starts_with("ln")
}

/// Quantize the model in `src` into the new directory `dst`. Nothing is left at `dst` on error.
pub fn quantize_model_dir(
    src: &Path,
    dst: &Path,
    options: &QuantizeOptions,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<QuantizeReport> {
    let cfg = &options.config;
    cfg.validate()?;
    let config_path = src.join("config.json");
    let mut config = read_json(&config_path)?;
    if !config.is_object() {
        return Err(ModelError::Invalid {
            path: config_path,
            message: "not a JSON object".into(),
        });
    }
    if config.get("quantization_config").is_some() {
        return Err(ModelError::Invalid {
            path: config_path,
            message: "the model is already quantized (config.json has quantization_config)".into(),
        });
    }
    let weights = WeightFiles::open(src)?;
    check_linears(&weights)?;
    if dst.exists()
        && std::fs::read_dir(dst)
            .map_err(io_err(dst))?
            .next()
            .is_some()
    {
        return Err(ModelError::Invalid {
            path: dst.to_path_buf(),
            message: "exists and is not empty".into(),
        });
    }

    let staging = staging_dir(dst);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io_err(&staging))?;
    let result = write_quantized(src, &staging, &weights, cfg, &mut config, &mut progress);
    match result {
        Ok(report) => {
            if dst.exists() {
                std::fs::remove_dir(dst).map_err(io_err(dst))?;
            }
            std::fs::rename(&staging, dst).map_err(io_err(dst))?;
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

fn staging_dir(dst: &Path) -> PathBuf {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dst.with_file_name(format!(".{name}.partial"))
}

/// Every linear weight must be a 2-D float matrix; fail before writing anything.
fn check_linears(weights: &WeightFiles) -> Result<()> {
    for name in weights.names() {
        if !is_linear_weight(name) {
            continue;
        }
        let view = weights.tensor(name)?;
        if view.shape().len() != 2 {
            return Err(ModelError::BadTensor {
                tensor: name.to_string(),
                message: format!(
                    "a linear weight must be 2-D, found shape {:?}",
                    view.shape()
                ),
            });
        }
        if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(ModelError::BadTensor {
                tensor: name.to_string(),
                message: format!(
                    "cannot quantize dtype {:?}: expected F32, F16 or BF16",
                    view.dtype()
                ),
            });
        }
    }
    Ok(())
}

fn write_quantized(
    src: &Path,
    dst: &Path,
    weights: &WeightFiles,
    cfg: &QuantConfig,
    config: &mut Value,
    progress: &mut impl FnMut(Progress<'_>),
) -> Result<QuantizeReport> {
    let total = weights.names().count();
    let mut report = QuantizeReport::default();
    let mut weight_map = serde_json::Map::new();
    let mut done = 0;
    for shard in weights.shards() {
        let file_name = shard.path.file_name().expect("shards are files").to_owned();
        let out_path = dst.join(&file_name);
        let mut writer = SafetensorsWriter::create(&out_path, &[("format", "pt")])?;
        for name in shard.names() {
            let view = shard.view(&name).expect("listed by the shard");
            report.bytes_in += view.data().len();
            let quantize = is_linear_weight(&name);
            if quantize {
                let q = quantize_view(&name, &view, cfg)?;
                for t in to_bnb_tensors(&name, &q)? {
                    writer.add(&t.name, t.dtype, &t.shape, &t.data)?;
                }
                report.quantized += 1;
            } else {
                writer.add(&name, view.dtype(), view.shape(), view.data())?;
                report.copied += 1;
            }
            done += 1;
            progress(Progress {
                done,
                total,
                tensor: &name,
                quantized: quantize,
            });
        }
        for t in writer.sizes().keys() {
            weight_map.insert(
                t.clone(),
                Value::String(file_name.to_string_lossy().into_owned()),
            );
        }
        report.bytes_out += writer.data_bytes();
        writer.finish()?;
    }
    if weights.is_sharded() {
        let index =
            json!({ "metadata": { "total_size": report.bytes_out }, "weight_map": weight_map });
        write_json(&dst.join(INDEX_FILE), &index)?;
    }

    let compute = match weights.dominant_float_dtype() {
        Some(Dtype::F16) => FloatDType::F16,
        Some(Dtype::F32) => FloatDType::F32,
        _ => FloatDType::BF16,
    };
    config["quantization_config"] = quantization_config(cfg, compute);
    write_json(&dst.join("config.json"), config)?;
    copy_side_files(src, dst)?;
    Ok(report)
}

fn quantize_view(name: &str, view: &TensorView<'_>, cfg: &QuantConfig) -> Result<Quant4Tensor> {
    let bytes = view.data();
    let wrap = |source| ModelError::Tensor {
        tensor: name.to_string(),
        source,
    };
    // Memory-mapped data is usually aligned; copy only when it is not.
    let q = match view.dtype() {
        Dtype::F32 => {
            let data = super::weights::cast_bytes::<f32>(bytes);
            Quant4Tensor::quantize_slice(FloatSlice::F32(&data), view.shape(), cfg, &Device::Cpu)
        }
        Dtype::F16 => {
            let data = super::weights::cast_bytes::<f16>(bytes);
            Quant4Tensor::quantize_slice(FloatSlice::F16(&data), view.shape(), cfg, &Device::Cpu)
        }
        Dtype::BF16 => {
            let data = super::weights::cast_bytes::<bf16>(bytes);
            Quant4Tensor::quantize_slice(FloatSlice::BF16(&data), view.shape(), cfg, &Device::Cpu)
        }
        other => {
            return Err(ModelError::BadTensor {
                tensor: name.to_string(),
                message: format!("cannot quantize dtype {other:?}"),
            })
        }
    };
    q.map_err(wrap)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).expect("JSON values serialize");
    text.push('\n');
    std::fs::write(path, text).map_err(io_err(path))
}

/// Tokenizer, generation config, chat template and the like travel with the weights.
fn copy_side_files(src: &Path, dst: &Path) -> Result<()> {
    for entry in std::fs::read_dir(src).map_err(io_err(src))? {
        let entry = entry.map_err(io_err(src))?;
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        let skip = name_str == "config.json"
            || name_str.ends_with(".safetensors")
            || name_str == INDEX_FILE
            || name_str.starts_with('.');
        if skip || !entry.file_type().map_err(io_err(entry.path()))?.is_file() {
            continue;
        }
        std::fs::copy(entry.path(), dst.join(&name)).map_err(io_err(entry.path()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_weights_are_recognised() {
        assert!(is_linear_weight("model.layers.0.self_attn.q_proj.weight"));
        assert!(is_linear_weight("model.layers.11.mlp.down_proj.weight"));
        assert!(!is_linear_weight("model.layers.0.input_layernorm.weight"));
        assert!(!is_linear_weight("model.layers.0.self_attn.q_proj.bias"));
        assert!(!is_linear_weight("model.embed_tokens.weight"));
        assert!(!is_linear_weight("lm_head.weight"));
        assert!(!is_linear_weight("model.norm.weight"));
    }
}
