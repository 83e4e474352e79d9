//! The trainable Llama-family graph (llama, mistral, qwen2, qwen3, phi3) over frozen, optionally 4-bit bases:
//! the model, its loading, and the forward through its decoder layers.
//!
//! Every op on the gradient path has a backward: RMSNorm, RoPE, the attention softmax, SwiGLU
//! and cross-entropy are the fused ops of `crate::ops`, the frozen linears the custom op in
//! `quant::linear`; each decoder layer (`layer`) and the LM head's loss (`head`) is one op whose
//! backward is written by hand. `generate` continues a prompt.

pub mod generate;
mod head;
mod layer;

pub use head::{causal_lm_loss, log_softmax_last_dim};

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::config::ModelConfig;
use super::source::BaseWeights;
use super::weights::view_to_tensor;
use super::{ModelError, Result};
use crate::lora::{peft, FrozenLinear, LoraAdapter, LoraConfig, LoraLinear};
use crate::quant::bnb::from_bnb_tensors;
use crate::quant::linear::FrozenWeight;
use crate::quant::{FloatSlice, Quant4Tensor, QuantConfig};
use crate::rng::Rng;
use layer::{decoder_layer, layer_op, DecoderLayer, GradSink, LayerCtx, Pass};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Quantize linear weights as they load (None keeps them dense). Ignored for checkpoints that
    /// are already bitsandbytes 4-bit, which load as stored.
    pub quant: Option<QuantConfig>,
    /// Compute dtype of activations, embeddings, norms and dense weights: F32 or BF16.
    pub dtype: DType,
    pub device: Device,
    /// Recompute each decoder layer in backward instead of keeping its activations.
    pub gradient_checkpointing: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            quant: Some(QuantConfig::default()),
            dtype: DType::F32,
            device: Device::Cpu,
            gradient_checkpointing: false,
        }
    }
}

/// A causal language model ready to train LoRA adapters.
pub struct CausalLm {
    pub config: ModelConfig,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// None when tied to the embedding.
    lm_head: Option<Tensor>,
    dtype: DType,
    device: Device,
    gradient_checkpointing: bool,
    /// Run the decoder layers through candle's autograd rather than their hand-written
    /// backward: the reference that backward is tested against.
    autograd_layers: bool,
    /// Adapter gradients computed in the decoder layers' hand-written backward.
    sink: GradSink,
}

fn bad(tensor: &str, message: impl Into<String>) -> ModelError {
    ModelError::BadTensor {
        tensor: tensor.to_string(),
        message: message.into(),
    }
}

fn check_shape(name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(bad(name, format!("has shape {got:?}, expected {want:?}")));
    }
    Ok(())
}

impl BaseWeights {
    /// A dense tensor, checked against the expected shape.
    fn dense(
        &self,
        config: &ModelConfig,
        name: &str,
        shape: &[usize],
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        match self {
            BaseWeights::Safetensors { files, .. } => {
                let v = files
                    .get(name)
                    .ok_or_else(|| bad(name, "missing from the checkpoint"))?;
                check_shape(name, v.shape(), shape)?;
                Ok(view_to_tensor(name, &v, dev)?.to_dtype(dtype)?)
            }
            BaseWeights::Gguf(g) => {
                let t = g.tensor(name, config)?;
                check_shape(name, t.dims(), shape)?;
                Ok(t.to_dtype(dtype)?.to_device(dev)?)
            }
        }
    }

    /// A frozen linear weight `[out, in]`: as stored when 4-bit, else quantized as it loads
    /// (or kept dense when `opts.quant` is None).
    fn linear(
        &self,
        config: &ModelConfig,
        name: &str,
        shape: [usize; 2],
        opts: &LoadOptions,
    ) -> Result<FrozenWeight> {
        let dev = &opts.device;
        match self {
            BaseWeights::Safetensors {
                files,
                prequantized: true,
            } => {
                let q = from_bnb_tensors(name, |k| files.get(k), dev).map_err(|source| {
                    ModelError::Tensor {
                        tensor: name.to_string(),
                        source,
                    }
                })?;
                check_shape(name, q.shape().dims(), &shape)?;
                Ok(FrozenWeight::Quant(Arc::new(q)))
            }
            BaseWeights::Safetensors { files, .. } => {
                let v = files
                    .get(name)
                    .ok_or_else(|| bad(name, "missing from the checkpoint"))?;
                check_shape(name, v.shape(), &shape)?;
                Ok(match &opts.quant {
                    Some(q) => FrozenWeight::Quant(Arc::new(quantize_view(name, &v, q, dev)?)),
                    None => {
                        FrozenWeight::Dense(view_to_tensor(name, &v, dev)?.to_dtype(opts.dtype)?)
                    }
                })
            }
            BaseWeights::Gguf(g) => {
                let t = g.tensor(name, config)?;
                check_shape(name, t.dims(), &shape)?;
                Ok(match &opts.quant {
                    Some(q) => {
                        let data = t.flatten_all()?.to_vec1::<f32>()?;
                        let q = Quant4Tensor::quantize_slice(
                            FloatSlice::F32(&data),
                            (shape[0], shape[1]),
                            q,
                            dev,
                        )
                        .map_err(|source| ModelError::Tensor {
                            tensor: name.to_string(),
                            source,
                        })?;
                        FrozenWeight::Quant(Arc::new(q))
                    }
                    None => FrozenWeight::Dense(t.to_dtype(opts.dtype)?.to_device(dev)?),
                })
            }
        }
    }
}

fn quantize_view(
    name: &str,
    v: &TensorView<'_>,
    cfg: &QuantConfig,
    dev: &Device,
) -> Result<Quant4Tensor> {
    use super::weights::cast_bytes as cast;
    let d = v.data();
    let r = match v.dtype() {
        Dtype::F32 => Quant4Tensor::quantize_slice(FloatSlice::F32(&cast(d)), v.shape(), cfg, dev),
        Dtype::BF16 => {
            Quant4Tensor::quantize_slice(FloatSlice::BF16(&cast(d)), v.shape(), cfg, dev)
        }
        Dtype::F16 => Quant4Tensor::quantize_slice(FloatSlice::F16(&cast(d)), v.shape(), cfg, dev),
        other => return Err(bad(name, format!("dtype {other:?} is not a float type"))),
    };
    r.map_err(|source| ModelError::Tensor {
        tensor: name.to_string(),
        source,
    })
}

impl CausalLm {
    /// Load a Hugging Face model directory (dense or bitsandbytes 4-bit) or a GGUF file.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        if !matches!(opts.dtype, DType::F32 | DType::BF16) {
            return Err(ModelError::Invalid {
                path: dir.to_path_buf(),
                message: format!(
                    "compute dtype {:?} is not supported (f32, bf16)",
                    opts.dtype
                ),
            });
        }
        let (config, weights) = BaseWeights::open(dir)?;
        let (dt, dev) = (opts.dtype, &opts.device);
        let c = &config;
        let embed = weights.dense(
            &config,
            "model.embed_tokens.weight",
            &[c.vocab_size, c.hidden_size],
            dt,
            dev,
        )?;
        let norm = weights.dense(&config, "model.norm.weight", &[c.hidden_size], dt, dev)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(weights.dense(
                &config,
                "lm_head.weight",
                &[c.vocab_size, c.hidden_size],
                dt,
                dev,
            )?)
        };
        if c.rotary_dim != c.head_dim {
            return Err(ModelError::Config {
                path: dir.join("config.json"),
                field: "partial_rotary_factor".into(),
                message: format!(
                    "rotary embeddings over {} of {} head dimensions are not supported",
                    c.rotary_dim, c.head_dim
                ),
            });
        }
        let shapes = c.layer_linears();
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut linears = Vec::with_capacity(shapes.len());
            for &(name, inp, out, has_bias) in &shapes {
                let wname = format!("{p}.{name}.weight");
                let weight = weights.linear(c, &wname, [out, inp], opts)?;
                let bias = if has_bias {
                    Some(weights.dense(&config, &format!("{p}.{name}.bias"), &[out], dt, dev)?)
                } else {
                    None
                };
                linears.push(LoraLinear {
                    base: FrozenLinear { weight, bias },
                    adapter: None,
                });
            }
            let head_norm = |name: &str| {
                weights.dense(
                    &config,
                    &format!("{p}.self_attn.{name}.weight"),
                    &[c.head_dim],
                    dt,
                    dev,
                )
            };
            let qk_norm = if c.qk_norm {
                Some((head_norm("q_norm")?, head_norm("k_norm")?))
            } else {
                None
            };
            layers.push(DecoderLayer {
                qk_norm,
                input_norm: weights.dense(
                    &config,
                    &format!("{p}.input_layernorm.weight"),
                    &[c.hidden_size],
                    dt,
                    dev,
                )?,
                post_norm: weights.dense(
                    &config,
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[c.hidden_size],
                    dt,
                    dev,
                )?,
                linears,
                fused: c.arch.fused_projections(),
            });
        }
        Ok(CausalLm {
            config,
            embed,
            layers,
            norm,
            lm_head,
            dtype: dt,
            device: dev.clone(),
            gradient_checkpointing: opts.gradient_checkpointing,
            autograd_layers: false,
            sink: GradSink::default(),
        })
    }

    /// Gradients of `loss` for every tensor, including adapter gradients computed in the
    /// decoder layers' hand-written backward. Use this instead of `loss.backward()`.
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        let mut grads = loss.backward()?;
        self.sink.drain_into(&mut grads)?;
        Ok(grads)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    #[cfg(test)]
    fn set_autograd_layers(&mut self, on: bool) {
        self.autograd_layers = on;
    }

    /// The module names of a decoder layer's linears, in the layer's order.
    fn linear_names(&self) -> Vec<&'static str> {
        self.config
            .layer_linears()
            .into_iter()
            .map(|(n, ..)| n)
            .collect()
    }

    /// `(module path, layer)` for every linear of the decoder blocks.
    pub fn linears(&self) -> impl Iterator<Item = (String, &LoraLinear)> {
        let names = self.linear_names();
        self.layers.iter().enumerate().flat_map(move |(i, l)| {
            names
                .clone()
                .into_iter()
                .zip(&l.linears)
                .map(move |(n, lin)| (format!("model.layers.{i}.{n}"), lin))
        })
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = (String, &mut LoraLinear)> {
        let names = self.linear_names();
        self.layers.iter_mut().enumerate().flat_map(move |(i, l)| {
            names
                .clone()
                .into_iter()
                .zip(l.linears.iter_mut())
                .map(move |(n, lin)| (format!("model.layers.{i}.{n}"), lin))
        })
    }

    /// Attach fresh adapters (A Kaiming-uniform, B zero) to the targeted linears.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        cfg.validate()?;
        let mut rng = Rng::new(seed);
        let dev = self.device.clone();
        for (path, lin) in self.linears_mut() {
            if cfg.target_modules.matches(&path) {
                let dims = lin.base.weight.dims();
                lin.adapter = Some(LoraAdapter::new(
                    dims,
                    cfg.r,
                    cfg.scale(),
                    cfg.dropout,
                    &mut rng,
                    &dev,
                )?);
            }
        }
        if self.adapters().is_empty() {
            return Err(crate::lora::LoraError::Config {
                field: "target_modules",
                message: "matches no linear layer of the model".into(),
            }
            .into());
        }
        Ok(())
    }

    /// Load a PEFT adapter; every tensor must fit a linear of this model.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<LoraConfig> {
        let adapter = peft::load(dir, &self.device)?;
        let cfg = adapter.config.clone();
        let mut weights = adapter.weights;
        for (path, lin) in self.linears_mut() {
            if let Some((a, b)) = weights.remove(&path) {
                let (out, inp) = lin.base.weight.dims();
                if a.dims() != [cfg.r, inp] || b.dims() != [out, cfg.r] {
                    return Err(bad(
                        &format!("{path}.lora_A/lora_B"),
                        format!(
                            "shapes {:?}/{:?} do not fit a [{out}, {inp}] layer",
                            a.dims(),
                            b.dims()
                        ),
                    ));
                }
                lin.adapter = Some(LoraAdapter::from_weights(&a, &b, cfg.scale(), cfg.dropout)?);
            }
        }
        if let Some(path) = weights.keys().next() {
            return Err(bad(
                path,
                "the adapter names a module this model does not have",
            ));
        }
        Ok(cfg)
    }

    /// Remove every adapter, returning them by module path (to install again with
    /// [`CausalLm::set_adapters`]).
    pub fn take_adapters(&mut self) -> Vec<(String, LoraAdapter)> {
        self.linears_mut()
            .filter_map(|(path, lin)| lin.adapter.take().map(|a| (path, a)))
            .collect()
    }

    /// Make `set` the model's adapters (none elsewhere): the way one loaded base serves several
    /// fine-tuned models in turn. The tensors are shared, not copied.
    pub fn set_adapters(&mut self, set: &[(String, LoraAdapter)]) -> Result<()> {
        let mut by_path: std::collections::HashMap<&str, &LoraAdapter> =
            set.iter().map(|(p, a)| (p.as_str(), a)).collect();
        for (path, lin) in self.linears_mut() {
            lin.adapter = by_path.remove(path.as_str()).cloned();
        }
        match by_path.keys().next() {
            Some(path) => Err(bad(
                path,
                "the adapter names a module this model does not have",
            )),
            None => Ok(()),
        }
    }

    /// Save the adapters in PEFT format.
    pub fn save_adapter(
        &self,
        dir: &Path,
        cfg: &LoraConfig,
        base_model: Option<&str>,
    ) -> Result<()> {
        let adapters = self.adapters();
        Ok(peft::save(dir, cfg, &adapters, base_model)?)
    }

    pub fn adapters(&self) -> Vec<(String, &LoraAdapter)> {
        self.linears()
            .filter_map(|(p, l)| l.adapter.as_ref().map(|a| (p, a)))
            .collect()
    }

    /// The trainable parameters, with their PEFT tensor names.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.adapters()
            .into_iter()
            .flat_map(|(p, a)| {
                [
                    (format!("base_model.model.{p}.lora_A.weight"), a.a.clone()),
                    (format!("base_model.model.{p}.lora_B.weight"), a.b.clone()),
                ]
            })
            .collect()
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]` (u32). `attention_mask` is
    /// `[batch, seq]` with 1 for real tokens and 0 for padding. `rng` enables dropout (training).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let x = self.hidden(input_ids, attention_mask, None, rng)?;
        Ok(crate::quant::linear::lm_head(&x, self.head())?)
    }

    fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Final-norm hidden states `[batch, seq, hidden]`; with `lengths`, of examples laid end to
    /// end in the row (positions restart and attention stays inside each).
    fn hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        lengths: Option<&[usize]>,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let c = &self.config;
        let mut x = self
            .embed
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, s, c.hidden_size))?;
        let segments = match lengths {
            Some(l) => crate::ops::attention::segments(l),
            None => vec![(0, s)],
        };
        let longest = segments.iter().map(|&(_, n)| n).max().unwrap_or(0);
        c.check_seq_len(longest)?;
        let positions: Vec<usize> = segments.iter().flat_map(|&(_, n)| 0..n).collect();
        let (cos, sin) = self.rope_tables(&positions)?;
        let ctx = Arc::new(LayerCtx {
            head_dim: c.head_dim,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            eps: c.rms_norm_eps,
            cos,
            sin,
            keep: self.key_mask(b, s, attention_mask)?,
            dense_keys: attention_mask.is_none(),
            segments,
        });
        let pass = if self.gradient_checkpointing {
            Pass::Output
        } else {
            Pass::Keep
        };
        for layer in &self.layers {
            x = if self.autograd_layers {
                decoder_layer(layer, &ctx, &x, rng.as_deref_mut())?
            } else {
                layer_op(
                    layer.clone(),
                    ctx.clone(),
                    &x,
                    rng.as_deref_mut(),
                    &self.sink,
                    pass,
                )?
            };
        }
        Ok(crate::ops::rms_norm(&x, &self.norm, c.rms_norm_eps)?)
    }

    /// cos and sin `[seq, rotary_dim]` at these positions, computed in f32 as transformers
    /// does: the frequencies for the longest sequence the positions belong to (LongRoPE picks
    /// its set by it), cos and sin times the scaling's attention factor.
    fn rope_tables(&self, positions: &[usize]) -> Result<(Tensor, Tensor)> {
        let longest = positions.iter().max().map_or(0, |p| p + 1);
        let (inv_freq, scale) = self.config.rope_freqs(longest);
        let half = inv_freq.len();
        let s = positions.len();
        let mut freqs = Vec::with_capacity(s * half * 2);
        for &p in positions {
            let row: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
            freqs.extend_from_slice(&row);
            freqs.extend_from_slice(&row);
        }
        let freqs = Tensor::from_vec(freqs, (s, half * 2), &self.device)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        let (cos, sin) = if scale == 1.0 {
            (cos, sin)
        } else {
            ((cos * scale as f64)?, (sin * scale as f64)?)
        };
        Ok((cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?))
    }

    /// Which keys are real tokens, u8 `[batch, seq]`; causality is applied in the softmax. A
    /// query that sees no real key (left padding) gets a uniform row and no gradient.
    fn key_mask(&self, b: usize, s: usize, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let keep: Vec<u8> = match attention_mask {
            Some(m) => m
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|&v| (v != 0.0) as u8)
                .collect(),
            None => vec![1; b * s],
        };
        if keep.len() != b * s {
            return Err(ModelError::Invalid {
                path: "attention_mask".into(),
                message: format!("has {} values for a [{b}, {s}] batch", keep.len()),
            });
        }
        Ok(Tensor::from_vec(keep, (b, s), &self.device)?)
    }
}
