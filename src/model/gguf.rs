//! GGUF files as base models: llama.cpp's llama, qwen2 and qwen3 architectures, read through candle's
//! GGUF reader, configured from the metadata and dequantized tensor by tensor into Hugging Face
//! names and row order.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::config::{Arch, ModelConfig};
use super::{io_err, ModelError, Result};

/// Whether `path` names a GGUF file (by extension) rather than a model directory.
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// An open GGUF file: its metadata and tensor index; tensor data is read on demand.
pub struct GgufModel {
    pub path: PathBuf,
    pub content: Content,
    reader: Mutex<BufReader<File>>,
}

impl std::fmt::Debug for GgufModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufModel")
            .field("path", &self.path)
            .finish()
    }
}

/// GGUF tensor name -> Hugging Face name and, for decoder tensors, the layer.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    let layer: usize = n.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = GGUF_MODULES.iter().find(|(_, g)| *g == module)?.0;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Hugging Face name -> GGUF name and, for decoder tensors, the layer.
pub fn gguf_name(hf: &str) -> Option<(String, Option<usize>)> {
    match hf {
        "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), None)),
        "model.norm.weight" => return Some(("output_norm.weight".into(), None)),
        "lm_head.weight" => return Some(("output.weight".into(), None)),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (n, rest) = rest.split_once('.')?;
    let layer: usize = n.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = GGUF_MODULES.iter().find(|(h, _)| *h == module)?.1;
    Some((format!("blk.{layer}.{g}.{kind}"), Some(layer)))
}

/// Decoder-layer modules: Hugging Face path, GGUF name.
const GGUF_MODULES: [(&str, &str); 11] = [
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// llama.cpp's converter reorders Q and K rows of llama-architecture models (rotary halves
/// interleaved): `w.reshape(heads, 2, rows/heads/2, ...).swapaxes(1, 2)`.
pub fn permute_rows(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let mut shape = vec![heads, 2, dims[0] / heads / 2];
    shape.extend_from_slice(&dims[1..]);
    t.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The inverse of [`permute_rows`]: llama.cpp's row order back to Hugging Face's.
pub fn unpermute_rows(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let mut shape = vec![heads, dims[0] / heads / 2, 2];
    shape.extend_from_slice(&dims[1..]);
    t.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// Whether a module's rows are stored in llama.cpp's permuted order, and with how many heads.
pub fn permuted_heads(c: &ModelConfig, module: &str) -> Option<usize> {
    if !matches!(c.arch, Arch::Llama | Arch::Mistral) {
        return None;
    }
    if module.ends_with("self_attn.q_proj") {
        Some(c.num_attention_heads)
    } else if module.ends_with("self_attn.k_proj") {
        Some(c.num_key_value_heads)
    } else {
        None
    }
}

impl GgufModel {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| ModelError::Invalid {
            path: path.to_path_buf(),
            message: format!("not a readable GGUF file: {e}"),
        })?;
        Ok(GgufModel {
            path: path.to_path_buf(),
            content,
            reader: Mutex::new(reader),
        })
    }

    fn invalid(&self, message: impl Into<String>) -> ModelError {
        ModelError::Invalid {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Result<Option<&str>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.invalid(format!("metadata {key}: expected a string, found {v:?}"))),
        }
    }

    pub fn meta_u64(&self, key: &str) -> Result<Option<u64>> {
        let n = match self.meta(key) {
            None => return Ok(None),
            Some(Value::U8(x)) => Some(*x as u64),
            Some(Value::U16(x)) => Some(*x as u64),
            Some(Value::U32(x)) => Some(*x as u64),
            Some(Value::U64(x)) => Some(*x),
            Some(Value::I8(x)) => u64::try_from(*x).ok(),
            Some(Value::I16(x)) => u64::try_from(*x).ok(),
            Some(Value::I32(x)) => u64::try_from(*x).ok(),
            Some(Value::I64(x)) => u64::try_from(*x).ok(),
            Some(_) => None,
        };
        n.map(Some).ok_or_else(|| {
            self.invalid(format!(
                "metadata {key}: expected a non-negative integer, found {:?}",
                self.meta(key)
            ))
        })
    }

    pub fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.invalid(format!("metadata {key}: expected a number, found {v:?}"))),
        }
    }

    pub fn meta_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.invalid(format!("metadata {key}: expected a bool, found {v:?}"))),
        }
    }

    /// The llama.cpp architecture name (`llama`, `qwen2` or `qwen3`).
    pub fn architecture(&self) -> Result<&str> {
        let a = self
            .meta_str("general.architecture")?
            .ok_or_else(|| self.invalid("metadata general.architecture is missing"))?;
        match a {
            "llama" | "qwen2" | "qwen3" => Ok(a),
            other => Err(self.invalid(format!(
                "general.architecture {other:?} is not supported (llama, qwen2, qwen3)"
            ))),
        }
    }

    /// The model's configuration, as the `config.json` transformers would write for it.
    pub fn config(&self) -> Result<ModelConfig> {
        let a = self.architecture()?;
        if self.meta_str("general.type")? == Some("adapter") {
            return Err(self.invalid("this GGUF is a LoRA adapter, not a base model"));
        }
        let need = |k: &str| -> Result<u64> {
            self.meta_u64(&format!("{a}.{k}"))?
                .ok_or_else(|| self.invalid(format!("metadata {a}.{k} is missing")))
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let kv_heads = self
            .meta_u64(&format!("{a}.attention.head_count_kv"))?
            .unwrap_or(heads);
        let head_dim = match self.meta_u64(&format!("{a}.attention.key_length"))? {
            Some(d) => d,
            None if heads > 0 => hidden / heads,
            None => return Err(self.invalid(format!("metadata {a}.attention.head_count is 0"))),
        };
        if let Some(rot) = self.meta_u64(&format!("{a}.rope.dimension_count"))? {
            if rot != head_dim {
                return Err(self.invalid(format!(
                    "{a}.rope.dimension_count {rot} differs from the head size {head_dim}: partial rotary embeddings are not supported"
                )));
            }
        }
        if let Some(kind) = self.meta_str(&format!("{a}.rope.scaling.type"))? {
            if kind != "none" {
                return Err(
                    self.invalid(format!("{a}.rope.scaling.type {kind:?} is not supported"))
                );
            }
        }
        let embd = self.info("token_embd.weight")?;
        let vocab = match self.meta_u64(&format!("{a}.vocab_size"))? {
            Some(v) => v,
            None => embd.shape.dims()[0] as u64,
        };
        let has = |n: &str| self.content.tensor_infos.contains_key(n);
        let (model_type, class) = match a {
            "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
            "qwen3" => ("qwen3", "Qwen3ForCausalLM"),
            _ => ("llama", "LlamaForCausalLM"),
        };
        let mut cfg = json!({
            "architectures": [class],
            "model_type": model_type,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": need("feed_forward_length")?,
            "num_hidden_layers": need("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "rms_norm_eps": self.meta_f64(&format!("{a}.attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            "rope_theta": self.meta_f64(&format!("{a}.rope.freq_base"))?.unwrap_or(if a == "llama" { 1e4 } else { 1e6 }),
            "max_position_embeddings": need("context_length")?,
            "tie_word_embeddings": !has("output.weight"),
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if a != "qwen2" {
            cfg["attention_bias"] = json!(has("blk.0.attn_q.bias"));
            cfg["mlp_bias"] = json!(has("blk.0.ffn_gate.bias"));
        }
        if let Some(eos) = self.meta_u64("tokenizer.ggml.eos_token_id")? {
            cfg["eos_token_id"] = json!(eos);
        }
        if let Some(bos) = self.meta_u64("tokenizer.ggml.bos_token_id")? {
            cfg["bos_token_id"] = json!(bos);
        }
        let mut config = ModelConfig::from_json(cfg, &self.path)?;
        if has("rope_freqs.weight") {
            self.match_llama3_scaling(&mut config)?;
        }
        Ok(config)
    }

    /// GGUF keeps llama3 RoPE scaling only as per-frequency divisors; find the llama3 scaling
    /// that produces them so the config (and anything exported) carries it.
    fn match_llama3_scaling(&self, config: &mut ModelConfig) -> Result<()> {
        let stored: Vec<f32> = self
            .tensor_raw("rope_freqs.weight")?
            .flatten_all()?
            .to_vec1()?;
        // Llama 3.x scale by the largest divisor with low/high frequency factors 1 and 4; the
        // original context is a power of two (8192 for the released models).
        let factor = stored.iter().copied().fold(1f32, f32::max) as f64;
        let (lo, hi) = (1.0, 4.0);
        for old in (4..=20).map(|p| (1u64 << p) as f64) {
            let mut raw = config.raw.clone();
            raw["rope_scaling"] = json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": lo,
                "high_freq_factor": hi,
                "original_max_position_embeddings": old,
            });
            let candidate = ModelConfig::from_json(raw, &self.path)?;
            let ours = llama3_divisors(&candidate);
            if ours.len() == stored.len()
                && ours
                    .iter()
                    .zip(&stored)
                    .all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0))
            {
                *config = candidate;
                return Ok(());
            }
        }
        Err(self.invalid("rope_freqs.weight holds RoPE factors that match no known llama3 scaling"))
    }

    fn info(&self, name: &str) -> Result<&candle_core::quantized::gguf_file::TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::BadTensor {
                tensor: name.to_string(),
                message: format!("missing from {}", self.path.display()),
            })
    }

    /// A GGUF tensor dequantized to f32 on the CPU, in GGUF names and row order.
    fn tensor_raw(&self, name: &str) -> Result<Tensor> {
        let info = self.info(name)?;
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let q = info
            .read(&mut *reader, self.content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| ModelError::BadTensor {
                tensor: name.to_string(),
                message: format!("{}: {e}", self.path.display()),
            })?;
        Ok(q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?)
    }

    /// Hugging Face names of the model's tensors, in the file's order of layers.
    pub fn hf_names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for g in self.content.tensor_infos.keys() {
            if g == "rope_freqs.weight" {
                continue;
            }
            let hf = hf_name(g).ok_or_else(|| ModelError::BadTensor {
                tensor: g.clone(),
                message: format!(
                    "{}: not a tensor of a llama-family model",
                    self.path.display()
                ),
            })?;
            names.push(hf);
        }
        names.sort_by_key(|n| sort_key(n));
        Ok(names)
    }

    /// Shape of a tensor by its Hugging Face name.
    pub fn shape(&self, hf: &str) -> Option<Vec<usize>> {
        let (g, _) = gguf_name(hf)?;
        self.content
            .tensor_infos
            .get(&g)
            .map(|i| i.shape.dims().to_vec())
    }

    /// The dtype a dequantized tensor is best kept in: its own for float types, f16 for the
    /// block types (whose scales are f16).
    pub fn natural_dtype(&self, hf: &str) -> Option<DType> {
        use candle_core::quantized::GgmlDType;
        let (g, _) = gguf_name(hf)?;
        let info = self.content.tensor_infos.get(&g)?;
        Some(match info.ggml_dtype {
            GgmlDType::F32 => DType::F32,
            GgmlDType::BF16 => DType::BF16,
            _ => DType::F16,
        })
    }

    /// A tensor by its Hugging Face name: dequantized to f32 on the CPU, Q and K rows back in
    /// Hugging Face order.
    pub fn tensor(&self, hf: &str, config: &ModelConfig) -> Result<Tensor> {
        let (g, _) = gguf_name(hf).ok_or_else(|| ModelError::BadTensor {
            tensor: hf.to_string(),
            message: "has no GGUF name".into(),
        })?;
        let t = self.tensor_raw(&g)?;
        let module = hf
            .strip_suffix(".weight")
            .or_else(|| hf.strip_suffix(".bias"))
            .unwrap_or(hf);
        Ok(match permuted_heads(config, module) {
            Some(heads) => unpermute_rows(&t, heads)?,
            None => t,
        })
    }
}

/// The per-frequency divisors llama.cpp's converter writes as `rope_freqs.weight`.
pub fn llama3_divisors(c: &ModelConfig) -> Vec<f32> {
    let Some(s) = c.rope_scaling else {
        return vec![1.0; c.head_dim / 2];
    };
    let dim = c.head_dim;
    let (factor, lo, hi, old) = (
        s.factor,
        s.low_freq_factor,
        s.high_freq_factor,
        s.original_max_position_embeddings,
    );
    let (low_wl, high_wl) = (old / lo, old / hi);
    (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / (c.rope_theta as f32).powf(i as f32 / dim as f32) as f64;
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wl {
                1.0
            } else if wavelen > low_wl {
                factor as f32
            } else {
                let smooth = (old / wavelen - lo) / (hi - lo);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

/// Order tensors as transformers lays them out: embeddings, layers by number, final norm, head.
fn sort_key(hf: &str) -> (usize, usize, String) {
    match hf {
        "model.embed_tokens.weight" => (0, 0, String::new()),
        "model.norm.weight" => (2, 0, String::new()),
        "lm_head.weight" => (3, 0, String::new()),
        _ => {
            let layer = hf
                .strip_prefix("model.layers.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(n, _)| n.parse().ok())
                .unwrap_or(usize::MAX);
            (1, layer, hf.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.3.self_attn.k_proj.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.11.mlp.down_proj.weight",
            "model.layers.2.post_attention_layernorm.weight",
            "model.layers.4.self_attn.k_norm.weight",
        ] {
            let (g, _) = gguf_name(hf).unwrap();
            assert_eq!(hf_name(&g).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(hf_name("blk.1.attn_post_norm.weight"), None);
    }

    #[test]
    fn unpermute_inverts_permute() {
        let t = Tensor::arange(0f32, 48.0, &Device::Cpu)
            .unwrap()
            .reshape((12, 4))
            .unwrap();
        let p = permute_rows(&t, 3).unwrap();
        assert_ne!(p.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        let back = unpermute_rows(&p, 3).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    }
}
