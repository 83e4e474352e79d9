//! `config.json` of a Llama-family causal LM (llama, mistral, qwen2, qwen3, phi3), validated
//! field by field.

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
    /// Phi-3 and Phi-4: q, k and v in one linear (`qkv_proj`), gate and up in one
    /// (`gate_up_proj`), partial rotary embeddings and LongRoPE where the config says so.
    Phi3,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
        }
    }

    /// q, k and v come out of one linear, gate and up out of another.
    pub fn fused_projections(self) -> bool {
        self == Arch::Phi3
    }
}

/// LongRoPE (`rope_type: longrope`, Phi-3 and Phi-4): per-frequency divisors, the short set
/// for sequences up to the pretraining length, the long set beyond it, and one factor on cos
/// and sin either way.
#[derive(Debug, Clone, PartialEq)]
pub struct LongRope {
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: usize,
    pub attention_factor: f64,
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
    pub long_rope: Option<LongRope>,
    /// Dimensions of each head that rotate (the first ones): `head_dim` unless the config's
    /// `partial_rotary_factor` says fewer.
    pub rotary_dim: usize,
    /// Keys a query may look back over, itself included (Mistral's and Phi-3's
    /// `sliding_window`). The graph
    /// attends to the whole sequence, so longer sequences are refused (`check_seq_len`).
    pub sliding_window: Option<usize>,
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
    /// The frozen linears of one decoder layer, by their module names, in the graph's order:
    /// (name, in, out, bias).
    pub fn layer_linears(&self) -> Vec<(&'static str, usize, usize, bool)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let (qkv, o, mlp) = (self.qkv_bias, self.o_bias, self.mlp_bias);
        if self.arch.fused_projections() {
            return vec![
                ("self_attn.qkv_proj", h, q + 2 * kv, qkv),
                ("self_attn.o_proj", q, h, o),
                ("mlp.gate_up_proj", h, 2 * i, mlp),
                ("mlp.down_proj", i, h, mlp),
            ];
        }
        vec![
            ("self_attn.q_proj", h, q, qkv),
            ("self_attn.k_proj", h, kv, qkv),
            ("self_attn.v_proj", h, kv, qkv),
            ("self_attn.o_proj", q, h, o),
            ("mlp.gate_proj", h, i, mlp),
            ("mlp.up_proj", h, i, mlp),
            ("mlp.down_proj", i, h, mlp),
        ]
    }

    /// The longest sequence the graph computes as transformers does: a sliding window
    /// changes nothing up to its width, and is not implemented beyond it.
    pub fn check_seq_len(&self, len: usize) -> Result<()> {
        match self.window_exceeded(len) {
            Some(message) => Err(ModelError::Config {
                path: "config.json".into(),
                field: "sliding_window".into(),
                message,
            }),
            None => Ok(()),
        }
    }

    /// Why sequences of `len` tokens are refused, if they are (`check_seq_len`).
    pub fn window_exceeded(&self, len: usize) -> Option<String> {
        match self.sliding_window {
            Some(w) if len > w => Some(format!(
                "sequences of {len} tokens exceed the model's sliding window of {w}, which is \
                 not supported: use sequences of at most {w} tokens"
            )),
            _ => None,
        }
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
            "phi3" => Arch::Phi3,
            other => {
                return Err(f.err(
                    "model_type",
                    format!(
                        "{other:?} is not supported (supported: llama, mistral, qwen2, qwen3, phi3)"
                    ),
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
        let mut long_rope = None;
        // As transformers reads it: the rope parameters' own, else the config's.
        let partial = match rope.and_then(|r| r.get("partial_rotary_factor")) {
            Some(p) if !p.is_null() => p.as_f64(),
            _ => Some(f.f64_or("partial_rotary_factor", 1.0)?),
        }
        .filter(|p| *p > 0.0 && *p <= 1.0)
        .ok_or_else(|| f.err("partial_rotary_factor", "must be a number in (0, 1]"))?;
        let rotary_dim = (head_dim as f64 * partial) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(f.err(
                "partial_rotary_factor",
                format!("{partial} of head_dim {head_dim} leaves {rotary_dim} rotary dimensions, which must be even and positive"),
            ));
        }
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
                // Phi3Config reads the older names "su" and "yarn" as longrope.
                "longrope" | "su" | "yarn" if arch == Arch::Phi3 || kind == "longrope" => {
                    long_rope = Some(long_rope_of(&f, &rf, rope_field, rotary_dim)?);
                }
                other => {
                    return Err(f.err(
                        rope_field,
                        format!("rope type {other:?} is not supported (default, llama3, longrope)"),
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
            long_rope,
            rotary_dim,
            sliding_window: match arch {
                Arch::Phi3 | Arch::Mistral => match f.get("sliding_window") {
                    Some(_) => Some(f.usize("sliding_window")?),
                    None => None,
                },
                _ => None,
            },
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            mlp_bias: f.bool_or("mlp_bias", false)?,
            qk_norm: arch == Arch::Qwen3,
            max_position_embeddings: f.usize_or("max_position_embeddings", 4096)?,
            raw: v.clone(),
        })
    }

    /// RoPE inverse frequencies for a forward whose longest sequence is `seq_len` tokens, and
    /// the factor cos and sin are multiplied by, as transformers computes them (f32): llama3
    /// scaling, or LongRoPE's short or long set with its attention factor.
    pub fn rope_freqs(&self, seq_len: usize) -> (Vec<f32>, f32) {
        let dim = self.rotary_dim;
        let base = self.rope_theta as f32;
        let inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
            .collect();
        if let Some(l) = &self.long_rope {
            let ext = if seq_len > l.original_max_position_embeddings {
                &l.long_factor
            } else {
                &l.short_factor
            };
            let inv = (0..dim)
                .step_by(2)
                .zip(ext)
                .map(|(i, &e)| 1.0 / (e as f32 * base.powf(i as f32 / dim as f32)))
                .collect();
            return (inv, l.attention_factor as f32);
        }
        let Some(s) = self.rope_scaling else {
            return (inv, 1.0);
        };
        let (factor, lo, hi, old) = (
            s.factor as f32,
            s.low_freq_factor as f32,
            s.high_freq_factor as f32,
            s.original_max_position_embeddings as f32,
        );
        let low_freq_wavelen = old / lo;
        let high_freq_wavelen = old / hi;
        let inv = inv
            .into_iter()
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
            .collect();
        (inv, 1.0)
    }
}

/// LongRoPE's parameters as transformers reads them: both factor lists one per rotary
/// frequency; Phi-3's top-level `original_max_position_embeddings` before the rope
/// parameters' own; the attention factor given, or `sqrt(1 + ln(factor) / ln(original))` with
/// `factor` given or `max_position_embeddings / original`.
fn long_rope_of(
    f: &Fields<'_>,
    rf: &Fields<'_>,
    rope_field: &str,
    rotary_dim: usize,
) -> Result<LongRope> {
    let list = |k: &str| -> Result<Vec<f64>> {
        let v = rf
            .get(k)
            .and_then(Value::as_array)
            .ok_or_else(|| f.err(rope_field, format!("longrope needs a `{k}` list")))?;
        let xs: Option<Vec<f64>> = v
            .iter()
            .map(|x| x.as_f64().filter(|x| x.is_finite() && *x > 0.0))
            .collect();
        match xs {
            Some(xs) if xs.len() == rotary_dim / 2 => Ok(xs),
            Some(xs) => Err(f.err(
                rope_field,
                format!(
                    "`{k}` has {} values; the {rotary_dim} rotary dimensions need {}",
                    xs.len(),
                    rotary_dim / 2
                ),
            )),
            None => Err(f.err(rope_field, format!("`{k}` must hold positive numbers"))),
        }
    };
    let max = f.usize_or("max_position_embeddings", 4096)?;
    let original = if f.get("original_max_position_embeddings").is_some() {
        f.usize("original_max_position_embeddings")?
    } else if f.get("model_type").and_then(Value::as_str) == Some("phi3") {
        // Phi3Config's default, which takes precedence over the rope parameters' own.
        4096
    } else if rf.get("original_max_position_embeddings").is_some() {
        rf.usize("original_max_position_embeddings")
            .map_err(|e| f.err(rope_field, e.to_string()))?
    } else {
        max
    };
    let factor = match rf.get("factor") {
        Some(_) => rf
            .f64_or("factor", 1.0)
            .map_err(|_| f.err(rope_field, "factor must be a positive number"))?,
        None => max as f64 / original as f64,
    };
    let attention_factor = match rf.get("attention_factor") {
        Some(_) => rf
            .f64_or("attention_factor", 1.0)
            .map_err(|_| f.err(rope_field, "attention_factor must be a positive number"))?,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(LongRope {
        short_factor: list("short_factor")?,
        long_factor: list("long_factor")?,
        original_max_position_embeddings: original,
        attention_factor,
    })
}
