//! `config.json` of a Llama-family causal LM (llama, mistral, qwen2, qwen3), validated field by
//! field.

use std::path::Path;

use serde_json::Value;

use super::{read_json, ModelError, Result};

/// Architectures the graph implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    /// Qwen2's layout without q/k/v biases, with an RMSNorm over each head of q and k before
    /// RoPE (`q_norm`, `k_norm`).
    Qwen3,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// Llama 3.1's frequency-dependent RoPE scaling (`rope_type: llama3`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    pub tie_word_embeddings: bool,
    /// q/k/v (and for llama's `attention_bias`, o) projections have biases.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Each head of q and k is RMS-normalised (own weights, `head_dim` wide) before RoPE.
    pub qk_norm: bool,
    pub max_position_embeddings: usize,
    /// The raw JSON, written back beside exported models.
    pub raw: Value,
}

struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> ModelError {
        ModelError::Config {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.v.get(field).filter(|v| !v.is_null())
    }

    fn usize(&self, field: &str) -> Result<usize> {
        match self.get(field) {
            None => Err(self.err(field, "is missing")),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => Err(self.err(field, format!("must be a positive integer, found {v}"))),
            },
        }
    }

    fn usize_or(&self, field: &str, default: usize) -> Result<usize> {
        if self.get(field).is_some() {
            self.usize(field)
        } else {
            Ok(default)
        }
    }

    fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| self.err(field, format!("must be a positive number, found {v}"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, format!("must be true or false, found {v}"))),
        }
    }
}

/// Qwen's configs carry a sliding window that only applies with `use_sliding_window` (then to
/// the layers from `max_window_layers` on, as `layer_types` lists them). The graph attends to
/// every earlier key, so a config that turns the window on is refused rather than trained
/// differently from transformers.
fn sliding_window_unused(f: &Fields<'_>, arch: Arch) -> Result<()> {
    if !matches!(arch, Arch::Qwen2 | Arch::Qwen3) {
        return Ok(());
    }
    if f.bool_or("use_sliding_window", false)? {
        return Err(f.err(
            "use_sliding_window",
            "sliding-window attention layers are not supported; set it to false",
        ));
    }
    if let Some(types) = f.get("layer_types") {
        let sliding = types
            .as_array()
            .map(|a| a.iter().any(|t| t.as_str() != Some("full_attention")))
            .unwrap_or(true);
        if sliding {
            return Err(f.err(
                "layer_types",
                "only \"full_attention\" layers are supported",
            ));
        }
    }
    Ok(())
}

impl ModelConfig {
    /// The frozen linears of one decoder layer, by their module names: (name, in, out).
    pub fn layer_linears(&self) -> [(&'static str, usize, usize); 7] {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        [
            ("self_attn.q_proj", h, q),
            ("self_attn.k_proj", h, kv),
            ("self_attn.v_proj", h, kv),
            ("self_attn.o_proj", q, h),
            ("mlp.gate_proj", h, i),
            ("mlp.up_proj", h, i),
            ("mlp.down_proj", i, h),
        ]
    }

    /// The `config.json` of a Hugging Face model directory (`ModelConfig::load` reads a GGUF
    /// file's too).
    pub(super) fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let v = read_json(&path)?;
        Self::from_json(v, &path)
    }

    pub fn from_json(v: Value, path: &Path) -> Result<Self> {
        let f = Fields { v: &v, path };
        let model_type = f.get("model_type").and_then(Value::as_str).unwrap_or("");
        let arch = match model_type {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            other => {
                return Err(f.err(
                    "model_type",
                    format!("{other:?} is not supported (supported: llama, mistral, qwen2, qwen3)"),
                ))
            }
        };
        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        let num_key_value_heads = f.usize_or("num_key_value_heads", num_attention_heads)?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = match f.get("head_dim") {
            Some(_) => f.usize("head_dim")?,
            // Qwen3Config's own default, as transformers reads a config without the field.
            None if arch == Arch::Qwen3 => 128,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(f.err(
                        "num_attention_heads",
                        format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(f.err(
                "head_dim",
                format!("{head_dim} must be even for rotary embeddings"),
            ));
        }
        // transformers 5 nests rope settings in `rope_parameters`; 4.x used rope_theta + rope_scaling.
        let (rope_field, rope) = match f.get("rope_parameters") {
            Some(p) => ("rope_parameters", Some(p)),
            None => ("rope_scaling", f.get("rope_scaling")),
        };
        let default_theta = if matches!(arch, Arch::Qwen2 | Arch::Qwen3) {
            1_000_000.0
        } else {
            10_000.0
        };
        let mut rope_theta = f.f64_or("rope_theta", default_theta)?;
        let mut rope_scaling = None;
        if let Some(r) = rope {
            let rf = Fields { v: r, path };
            if rf.get("rope_theta").is_some() {
                rope_theta = rf
                    .f64_or("rope_theta", rope_theta)
                    .map_err(|_| f.err(rope_field, "rope_theta must be a positive number"))?;
            }
            let kind = rf
                .get("rope_type")
                .or_else(|| rf.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            match kind {
                "default" => {}
                "llama3" => {
                    let num = |k: &str| {
                        rf.get(k)
                            .and_then(Value::as_f64)
                            .filter(|x| *x > 0.0)
                            .ok_or_else(|| {
                                f.err(rope_field, format!("llama3 scaling needs a positive `{k}`"))
                            })
                    };
                    let s = Llama3Scaling {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?,
                    };
                    if s.high_freq_factor <= s.low_freq_factor {
                        return Err(
                            f.err(rope_field, "high_freq_factor must exceed low_freq_factor")
                        );
                    }
                    rope_scaling = Some(s);
                }
                other => {
                    return Err(f.err(
                        rope_field,
                        format!("rope type {other:?} is not supported (default, llama3)"),
                    ))
                }
            }
        }
        let attention_bias = f.bool_or("attention_bias", false)?;
        sliding_window_unused(&f, arch)?;
        Ok(ModelConfig {
            arch,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            mlp_bias: f.bool_or("mlp_bias", false)?,
            qk_norm: arch == Arch::Qwen3,
            max_position_embeddings: f.usize_or("max_position_embeddings", 4096)?,
            raw: v.clone(),
        })
    }

    /// RoPE inverse frequencies, as transformers computes them (f32), with llama3 scaling.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base = self.rope_theta as f32;
        let inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
            .collect();
        let Some(s) = self.rope_scaling else {
            return inv;
        };
        let (factor, lo, hi, old) = (
            s.factor as f32,
            s.low_freq_factor as f32,
            s.high_freq_factor as f32,
            s.original_max_position_embeddings as f32,
        );
        let low_freq_wavelen = old / lo;
        let high_freq_wavelen = old / hi;
        inv.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                let scaled = if wavelen > low_freq_wavelen {
                    f / factor
                } else {
                    f
                };
                if wavelen < high_freq_wavelen || wavelen > low_freq_wavelen {
                    scaled
                } else {
                    let smooth = (old / wavelen - lo) / (hi - lo);
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                }
            })
            .collect()
    }
}
