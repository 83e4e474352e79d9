//! Random-weight Llama (or Qwen3) directories of any shape: for benchmarks and tests, where the
//! values do not matter but the shapes and the file format do.

use std::path::Path;

use safetensors::Dtype;

use super::{io_err, Result, SafetensorsWriter};
use crate::rng::Rng;

#[derive(Debug, Clone)]
pub struct RandomLlama {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub tie_word_embeddings: bool,
    /// A Qwen3 (`q_norm`, `k_norm` on every head) rather than a Llama.
    pub qk_norm: bool,
    /// Stored dtype: F32 or BF16.
    pub dtype: Dtype,
    pub seed: u64,
}

impl RandomLlama {
    /// Write `config.json` and `model.safetensors` into `dir`, streaming tensor by tensor.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let head_dim = self.hidden_size / self.num_attention_heads;
        let (class, model_type) = if self.qk_norm {
            ("Qwen3ForCausalLM", "qwen3")
        } else {
            ("LlamaForCausalLM", "llama")
        };
        let config = serde_json::json!({
            "architectures": [class],
            "model_type": model_type,
            "head_dim": head_dim,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": if self.dtype == Dtype::BF16 { "bfloat16" } else { "float32" },
        });
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&config).expect("json"))
            .map_err(io_err(&path))?;
        let mut w = SafetensorsWriter::create(&dir.join("model.safetensors"), &[("format", "pt")])?;
        let mut rng = Rng::new(self.seed);
        let dtype = self.dtype;
        let mut add = |name: String, shape: &[usize], scale: Option<f32>| -> Result<()> {
            let n: usize = shape.iter().product();
            let mut bytes = Vec::with_capacity(n * 4);
            for _ in 0..n {
                let v = match scale {
                    Some(s) => rng.uniform(-s, s),
                    None => 1.0,
                };
                match dtype {
                    Dtype::BF16 => bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                    _ => bytes.extend_from_slice(&v.to_le_bytes()),
                }
            }
            w.add(
                &name,
                if dtype == Dtype::BF16 {
                    Dtype::BF16
                } else {
                    Dtype::F32
                },
                shape,
                &bytes,
            )
        };
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (
            self.num_attention_heads * head_dim,
            self.num_key_value_heads * head_dim,
        );
        let init = |fan_in: usize| Some(1.0 / (fan_in as f32).sqrt());
        add(
            "model.embed_tokens.weight".into(),
            &[self.vocab_size, h],
            Some(1.0),
        )?;
        if !self.tie_word_embeddings {
            add("lm_head.weight".into(), &[self.vocab_size, h], init(h))?;
        }
        add("model.norm.weight".into(), &[h], None)?;
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            add(format!("{p}.input_layernorm.weight"), &[h], None)?;
            add(format!("{p}.post_attention_layernorm.weight"), &[h], None)?;
            if self.qk_norm {
                add(format!("{p}.self_attn.q_norm.weight"), &[head_dim], None)?;
                add(format!("{p}.self_attn.k_norm.weight"), &[head_dim], None)?;
            }
            for (name, out, inp) in [
                ("self_attn.q_proj", q, h),
                ("self_attn.k_proj", kv, h),
                ("self_attn.v_proj", kv, h),
                ("self_attn.o_proj", h, q),
                ("mlp.gate_proj", i, h),
                ("mlp.up_proj", i, h),
                ("mlp.down_proj", h, i),
            ] {
                add(format!("{p}.{name}.weight"), &[out, inp], init(inp))?;
            }
        }
        w.finish()
    }
}
