//! The trainable Llama-family graph (llama, mistral, qwen2) over frozen, optionally 4-bit bases.
//!
//! Every op on the gradient path has a backward: RMSNorm, RoPE, softmax and cross-entropy are
//! composed from candle's differentiable primitives (its fused kernels record no backward), and
//! the 4-bit linears are the custom op in `quant::linear`.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::config::ModelConfig;
use super::source::BaseWeights;
use super::weights::view_to_tensor;
use super::{ModelError, Result};
use crate::lora::layer::LinearSaved;
use crate::lora::{peft, FrozenLinear, FrozenWeight, LoraAdapter, LoraConfig, LoraLinear};
use crate::quant::bnb::from_bnb_tensors;
use crate::quant::{FloatSlice, Nf4Tensor, QuantConfig};
use crate::rng::Rng;

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

/// The seven linear layers of a decoder block, in PEFT's names.
pub const LINEARS: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];

#[derive(Clone)]
pub(crate) struct DecoderLayer {
    input_norm: Tensor,
    post_norm: Tensor,
    /// In `LINEARS` order.
    linears: Vec<LoraLinear>,
}

/// A causal language model ready to train LoRA adapters.
pub struct CausalLm {
    pub config: ModelConfig,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// None when tied to the embedding.
    lm_head: Option<Tensor>,
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
    gradient_checkpointing: bool,
    /// Run the decoder layers through candle's autograd rather than their hand-written
    /// backward: the reference that backward is tested against.
    autograd_layers: bool,
    /// Adapter gradients computed in the decoder layers' hand-written backward.
    sink: GradSink,
}

/// What every decoder layer of one forward pass shares.
pub(crate) struct LayerCtx {
    head_dim: usize,
    heads: usize,
    kv_heads: usize,
    eps: f64,
    /// `[seq, head_dim]` each.
    cos: Tensor,
    sin: Tensor,
    /// u8 `[batch, seq]`: 1 for a real token a query may see (with causality), 0 for padding.
    keep: Tensor,
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
                        let q = Nf4Tensor::quantize_slice(
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
) -> Result<Nf4Tensor> {
    use super::weights::cast_bytes as cast;
    let d = v.data();
    let r = match v.dtype() {
        Dtype::F32 => Nf4Tensor::quantize_slice(FloatSlice::F32(&cast(d)), v.shape(), cfg, dev),
        Dtype::BF16 => Nf4Tensor::quantize_slice(FloatSlice::BF16(&cast(d)), v.shape(), cfg, dev),
        Dtype::F16 => Nf4Tensor::quantize_slice(FloatSlice::F16(&cast(d)), v.shape(), cfg, dev),
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
        let q_out = c.num_attention_heads * c.head_dim;
        let kv_out = c.num_key_value_heads * c.head_dim;
        let shapes = [
            (q_out, c.hidden_size, c.qkv_bias),
            (kv_out, c.hidden_size, c.qkv_bias),
            (kv_out, c.hidden_size, c.qkv_bias),
            (c.hidden_size, q_out, c.o_bias),
            (c.intermediate_size, c.hidden_size, c.mlp_bias),
            (c.intermediate_size, c.hidden_size, c.mlp_bias),
            (c.hidden_size, c.intermediate_size, c.mlp_bias),
        ];
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut linears = Vec::with_capacity(7);
            for (&(group, name), &(out, inp, has_bias)) in LINEARS.iter().zip(&shapes) {
                let wname = format!("{p}.{group}.{name}.weight");
                let weight = weights.linear(c, &wname, [out, inp], opts)?;
                let bias = if has_bias {
                    Some(weights.dense(
                        &config,
                        &format!("{p}.{group}.{name}.bias"),
                        &[out],
                        dt,
                        dev,
                    )?)
                } else {
                    None
                };
                linears.push(LoraLinear {
                    base: FrozenLinear { weight, bias },
                    adapter: None,
                });
            }
            layers.push(DecoderLayer {
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
            });
        }
        Ok(CausalLm {
            inv_freq: config.inv_freq(),
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

    /// `(module path, layer)` for every linear of the decoder blocks.
    pub fn linears(&self) -> impl Iterator<Item = (String, &LoraLinear)> {
        self.layers.iter().enumerate().flat_map(|(i, l)| {
            LINEARS
                .iter()
                .zip(&l.linears)
                .map(move |(&(g, n), lin)| (format!("model.layers.{i}.{g}.{n}"), lin))
        })
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = (String, &mut LoraLinear)> {
        self.layers.iter_mut().enumerate().flat_map(|(i, l)| {
            LINEARS
                .iter()
                .zip(l.linears.iter_mut())
                .map(move |(&(g, n), lin)| (format!("model.layers.{i}.{g}.{n}"), lin))
        })
    }

    /// Attach fresh adapters (A Kaiming-uniform, B zero) to the targeted linears.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        cfg.validate()?;
        let mut rng = Rng::new(seed);
        let dev = self.device.clone();
        for (path, lin) in self.linears_mut() {
            if cfg.target_modules.matches(&path) {
                let dims = lin.base.dims();
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
                let (out, inp) = lin.base.dims();
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
        let x = self.hidden(input_ids, attention_mask, rng)?;
        Ok(crate::quant::linear::lm_head(&x, self.head())?)
    }

    fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The training loss without the full logits: the same mean next-token cross-entropy as
    /// `loss(forward(..), labels)`, but the LM head runs only at positions whose next label
    /// counts. With prompt tokens masked and a large vocabulary, most of the head's FLOPs and
    /// the `[batch, seq, vocab]` logits never happen.
    pub fn forward_loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let v = self.config.vocab_size;
        let flat: Vec<i64> = labels.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
        if flat.len() != b * s {
            return Err(ModelError::Invalid {
                path: "labels".into(),
                message: format!("has {} values for a [{b}, {s}] batch", flat.len()),
            });
        }
        // Position i predicts label i + 1.
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for bi in 0..b {
            for i in 1..s {
                let t = flat[bi * s + i];
                if t == -100 {
                    continue;
                }
                if t < 0 || t as usize >= v {
                    return Err(ModelError::Invalid {
                        path: "labels".into(),
                        message: format!(
                            "label {t} at [{bi}, {i}] is outside the vocabulary of {v}"
                        ),
                    });
                }
                rows.push((bi * s + i - 1) as u32);
                targets.push(t as u32);
            }
        }
        let x = self.hidden(input_ids, attention_mask, rng)?;
        let h = x.dim(2)?;
        if rows.is_empty() {
            return Ok((x.sum_all()? * 0.0)?.to_dtype(DType::F32)?);
        }
        let n = rows.len();
        let dev = &self.device;
        let flat = x.reshape((b * s, h))?;
        // One run of consecutive rows (every label counts, one sequence) is a narrow, whose
        // backward is a copy rather than a scatter.
        let picked = if rows.windows(2).all(|w| w[1] == w[0] + 1) {
            flat.narrow(0, rows[0] as usize, n)?
        } else {
            flat.index_select(&Tensor::from_vec(rows, n, dev)?, 0)?
        }; // [n, hidden]
        let targets = Tensor::from_vec(targets, n, dev)?;
        let nll = head_loss(&picked, self.head(), &targets, HEAD_BLOCK)?; // [n], f32
        Ok((nll.sum_all()? * (1.0 / n as f64))?)
    }

    /// Final-norm hidden states `[batch, seq, hidden]`.
    fn hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let c = &self.config;
        let mut x = self
            .embed
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, s, c.hidden_size))?;
        let (cos, sin) = self.rope_tables(s)?;
        let ctx = Arc::new(LayerCtx {
            head_dim: c.head_dim,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            eps: c.rms_norm_eps,
            cos,
            sin,
            keep: self.key_mask(b, s, attention_mask)?,
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
        Ok(rms_norm(&x, &self.norm, c.rms_norm_eps)?)
    }

    /// cos and sin `[seq, head_dim]` for positions 0..seq, computed in f32 as transformers does.
    fn rope_tables(&self, s: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut freqs = Vec::with_capacity(s * half * 2);
        for p in 0..s {
            let row: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
            freqs.extend_from_slice(&row);
            freqs.extend_from_slice(&row);
        }
        let freqs = Tensor::from_vec(freqs, (s, half * 2), &self.device)?;
        Ok((
            freqs.cos()?.to_dtype(self.dtype)?,
            freqs.sin()?.to_dtype(self.dtype)?,
        ))
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

    /// Mean cross-entropy of next-token prediction: logits `[b, s, V]`, labels `[b, s]` (i64, -100
    /// ignored), shifted by one as transformers' causal-LM loss.
    pub fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        causal_lm_loss(logits, labels)
    }
}

/// Logits `head_loss` computes at a time: 2^25 values, 64 MiB in bf16.
const HEAD_BLOCK: usize = 1 << 25;

/// Negative log-likelihood per row, f32 `[n]`, of the LM head `head` `[vocab, hidden]` over
/// hidden states `h` `[n, hidden]` at u32 targets `[n]`: `cross_entropy(lm_head(h), targets)`
/// for blocks of rows of at most `block` logits, in the forward and again in the backward. The
/// `[n, vocab]` logits are never whole, and none are kept for the backward: with a 128k
/// vocabulary they would outweigh the activations the layers keep.
fn head_loss(h: &Tensor, head: &Tensor, targets: &Tensor, block: usize) -> Result<Tensor> {
    use crate::quant::linear::{lm_head, lm_head_input_grad};
    let (n, _) = h.dims2()?;
    let rows = (block / head.dim(0)?).max(1);
    let blocks: Vec<(usize, usize)> = (0..n).step_by(rows).map(|i| (i, rows.min(n - i))).collect();
    let (head, targets) = (head.detach(), targets.detach());
    let hd = h.detach();
    let nll = blocks
        .iter()
        .map(|&(i, len)| {
            let logits = lm_head(&hd.narrow(0, i, len)?, &head)?;
            crate::ops::cross_entropy(&logits, &targets.narrow(0, i, len)?)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let nll = Tensor::cat(&nll, 0)?;
    let backward: crate::ops::Backward = Box::new(move |h: &Tensor, g: &Tensor| {
        let (h, g) = (h.detach(), g.detach());
        let gh = blocks
            .iter()
            .map(|&(i, len)| {
                let logits = lm_head(&h.narrow(0, i, len)?, &head)?;
                let gl = crate::ops::cross_entropy_grad(
                    &logits,
                    &targets.narrow(0, i, len)?,
                    &g.narrow(0, i, len)?,
                )?;
                lm_head_input_grad(&gl, &head)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&gh, 0)?))
    });
    Ok(crate::ops::hand_written(
        "lm-head-loss",
        h,
        None,
        nll,
        backward,
    )?)
}

/// One pre-norm decoder block: attention then SwiGLU MLP, each with a residual, through
/// candle's autograd. Training runs `layer_op`, whose backward is written by hand; this is its
/// reference.
pub(crate) fn decoder_layer(
    layer: &DecoderLayer,
    ctx: &LayerCtx,
    x: &Tensor,
    mut rng: Option<&mut Rng>,
) -> candle_core::Result<Tensor> {
    let (b, s, _) = x.dims3()?;
    let (hd, nh, nkv) = (ctx.head_dim, ctx.heads, ctx.kv_heads);
    let l = &layer.linears;
    let h = rms_norm(x, &layer.input_norm, ctx.eps)?;
    // Projections come out as [b, s, n*hd]; rope moves q and k to heads [b, n, s, hd] as it
    // rotates them.
    let split = |t: Tensor, n: usize| t.reshape((b, s, n, hd));
    let q = crate::ops::rope(
        &split(l[0].forward(&h, rng.as_deref_mut())?, nh)?,
        &ctx.cos,
        &ctx.sin,
    )?;
    let k = crate::ops::rope(
        &split(l[1].forward(&h, rng.as_deref_mut())?, nkv)?,
        &ctx.cos,
        &ctx.sin,
    )?;
    let v = split(l[2].forward(&h, rng.as_deref_mut())?, nkv)?
        .transpose(1, 2)?
        .contiguous()?;
    let (_, attn) = attention(&q, &k, &v, ctx)?;
    let x = (x + l[3].forward(&attn, rng.as_deref_mut())?)?;
    let h = rms_norm(&x, &layer.post_norm, ctx.eps)?;
    let gate = l[4].forward(&h, rng.as_deref_mut())?;
    let up = l[5].forward(&h, rng.as_deref_mut())?;
    let mlp = l[6].forward(&crate::ops::swiglu(&gate, &up)?, rng)?;
    x + mlp
}

/// Attention on heads: q `[b, nh, s, hd]`, k and v `[b, nkv, s, hd]`, all contiguous. The
/// nh/nkv query heads of a group share one key/value head, so q is viewed as
/// `[b, nkv, group·s, hd]` and no key or value is repeated. Returns the probabilities
/// `[b, nh, s, s]` and the output `[b, s, nh·hd]`.
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    ctx: &LayerCtx,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, nh, s, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let grouped = (b, nkv, nh / nkv * s);
    let scores = crate::ops::profile::span("attention matmuls (forward)", || {
        q.reshape((b, nkv, nh / nkv * s, hd))?
            .matmul(&k.t()?.contiguous()?)
    })?;
    let probs = crate::ops::attn_softmax(
        &scores.reshape((b, nh, s, s))?,
        &ctx.keep,
        1.0 / (hd as f64).sqrt(),
        true,
    )?;
    let out = crate::ops::profile::span("attention matmuls (forward)", || {
        probs
            .reshape((grouped.0, grouped.1, grouped.2, s))?
            .matmul(v)
    })?;
    let attn = out
        .reshape((b, nh, s, hd))?
        .transpose(1, 2)?
        .reshape((b, s, nh * hd))?;
    Ok((probs, attn))
}

/// dL/dq `[b, nh, s, hd]`, dL/dk and dL/dv `[b, nkv, s, hd]` of `attention`, given its
/// probabilities and dL/dout `[b·s, nh·hd]`. A group's key gradient sums inside the matmul.
fn attention_bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    g_out: &Tensor,
    ctx: &LayerCtx,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (b, nh, s, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let gs = nh / nkv * s;
    let span = |f: &mut dyn FnMut() -> candle_core::Result<Tensor>| {
        crate::ops::profile::span("attention matmuls (backward)", f)
    };
    let go = g_out
        .reshape((b, s, nh, hd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, nkv, gs, hd))?;
    let pg = probs.reshape((b, nkv, gs, s))?;
    let g_probs = span(&mut || go.matmul(&v.t()?))?; // [b, nkv, gs, s]
    let gv = span(&mut || pg.t()?.matmul(&go))?; // [b, nkv, s, hd]
    let g_scores = crate::ops::attn_softmax_bwd(
        probs,
        &g_probs.reshape((b, nh, s, s))?,
        &ctx.keep,
        1.0 / (hd as f64).sqrt(),
        true,
    )?
    .reshape((b, nkv, gs, s))?;
    let gq = span(&mut || g_scores.matmul(k)?.reshape((b, nh, s, hd)))?;
    let gk = span(&mut || g_scores.t()?.matmul(&q.reshape((b, nkv, gs, hd))?))?;
    Ok((gq, gk, gv))
}

/// What a decoder layer's hand-written backward reads from its forward.
struct LayerSaved {
    h1: Tensor,
    sq: LinearSaved,
    sk: LinearSaved,
    sv: LinearSaved,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Tensor,
    attn: Tensor,
    so: LinearSaved,
    x2: Tensor,
    h2: Tensor,
    gate: Tensor,
    up: Tensor,
    sg: LinearSaved,
    su: LinearSaved,
    m: Tensor,
    sd: LinearSaved,
}

/// What `layer_forward` computes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pass {
    /// The output alone, keeping nothing (a checkpointed layer's forward): the last projection
    /// and the adapters accumulate into the residual in place.
    Output,
    /// What the backward reads and not the output (a checkpointed layer's replay). Dequantized
    /// weights are held for the backward, which follows at once.
    Replay,
    /// The output and what the backward reads (training without checkpointing). What is kept
    /// lives until the backward reaches the layer, so weights stay packed in it.
    Keep,
}

/// A decoder layer's forward with nothing tracked, x `[b·s, hidden]`: the output, what
/// `layer_backward` reads, or both, as `pass` says. Draws from `rng` as `decoder_layer` does.
fn layer_forward(
    layer: &DecoderLayer,
    ctx: &LayerCtx,
    x: &Tensor,
    (b, s): (usize, usize),
    mut rng: Option<&mut Rng>,
    pass: Pass,
) -> candle_core::Result<(Option<Tensor>, Option<LayerSaved>)> {
    use crate::ops::{rope, swiglu};
    let (hd, nh, nkv, eps) = (ctx.head_dim, ctx.heads, ctx.kv_heads, ctx.eps);
    let l = &layer.linears;
    let rows = b * s;
    let hold = pass == Pass::Replay;
    let h1 = rms_norm(x, &layer.input_norm, eps)?;
    let (qp, sq) = l[0].forward_saving(&h1, rng.as_deref_mut(), hold)?;
    let (kp, sk) = l[1].forward_saving(&h1, rng.as_deref_mut(), hold)?;
    let (vp, sv) = l[2].forward_saving(&h1, rng.as_deref_mut(), hold)?;
    let q = rope(&qp.reshape((b, s, nh, hd))?, &ctx.cos, &ctx.sin)?;
    let k = rope(&kp.reshape((b, s, nkv, hd))?, &ctx.cos, &ctx.sin)?;
    let v = vp.reshape((b, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let (probs, attn) = attention(&q, &k, &v, ctx)?;
    let attn = attn.reshape((rows, nh * hd))?;
    let (o, so) = l[3].forward_saving(&attn, rng.as_deref_mut(), hold)?;
    let x2 = (x + o)?;
    let h2 = rms_norm(&x2, &layer.post_norm, eps)?;
    let (gate, sg) = l[4].forward_saving(&h2, rng.as_deref_mut(), hold)?;
    let (up, su) = l[5].forward_saving(&h2, rng.as_deref_mut(), hold)?;
    let m = swiglu(&gate, &up)?;
    let (y, sd) = match pass {
        Pass::Output => return Ok((Some(l[6].forward_add(x2, &m, rng)?), None)),
        Pass::Replay => (None, l[6].saving_only(&m, rng)?),
        Pass::Keep => {
            let (d, sd) = l[6].forward_saving(&m, rng, false)?;
            (Some((d + &x2)?), sd)
        }
    };
    let saved = LayerSaved {
        h1,
        sq,
        sk,
        sv,
        q,
        k,
        v,
        probs,
        attn,
        so,
        x2,
        h2,
        gate,
        up,
        sg,
        su,
        m,
        sd,
    };
    Ok((y, Some(saved)))
}

/// A decoder layer's backward by hand, from what its forward kept (`saved`, or a replay of
/// the forward with the same dropout draws from `rng` when it kept nothing). x is the layer's
/// input `[b, s, hidden]`. Returns dL/dx and `(var, gradient)` for every adapter weight.
/// candle's autograd would add a zero-initialised full-size accumulation for every edge of
/// the layer's graph.
fn layer_backward(
    layer: &DecoderLayer,
    ctx: &LayerCtx,
    x: &Tensor,
    saved: Option<LayerSaved>,
    rng: Option<&mut Rng>,
    gy: &Tensor,
) -> candle_core::Result<(Tensor, Vec<(Tensor, Tensor)>)> {
    use crate::ops::{rms_norm_bwd, rope_bwd, swiglu_bwd};
    let (b, s, hidden) = x.dims3()?;
    let (hd, nh, nkv, eps) = (ctx.head_dim, ctx.heads, ctx.kv_heads, ctx.eps);
    let l = &layer.linears;
    let rows = b * s;
    let x = x.reshape((rows, hidden))?;
    let gy = gy.to_dtype(x.dtype())?.reshape((rows, hidden))?;
    let fwd = match saved {
        Some(saved) => saved,
        None => layer_forward(layer, ctx, &x, (b, s), rng, Pass::Replay)?
            .1
            .expect("a replay saves"),
    };

    let mut grads = Vec::new();
    let mut keep = |i: usize, g: Option<(Tensor, Tensor)>| {
        if let (Some(a), Some((ga, gb))) = (&l[i].adapter, g) {
            grads.push((a.a.as_tensor().clone(), ga));
            grads.push((a.b.as_tensor().clone(), gb));
        }
    };
    // Each part lets go of what it read, and of its own temporaries, before the next: the
    // attention backward's [s, s] buffers make the layer's peak, and the MLP's weights and
    // activations need not be held beside them.
    let gx2 = {
        let (gm, g) = l[6].backward(&fwd.m, &fwd.sd, &gy, None)?;
        keep(6, g);
        let (g_gate, g_up) = swiglu_bwd(&fwd.gate, &fwd.up, &gm)?;
        drop(gm);
        let (gh2, g) = l[4].backward(&fwd.h2, &fwd.sg, &g_gate, None)?;
        keep(4, g);
        drop(g_gate);
        let (gh2, g) = l[5].backward(&fwd.h2, &fwd.su, &g_up, Some(gh2))?;
        keep(5, g);
        (&gy + rms_norm_bwd(&fwd.x2, &layer.post_norm, eps, &gh2)?)?
    };
    drop((
        fwd.m, fwd.sd, fwd.gate, fwd.up, fwd.h2, fwd.sg, fwd.su, fwd.x2, gy,
    ));
    let (gq, gk, gv) = {
        let (g_attn, g) = l[3].backward(&fwd.attn, &fwd.so, &gx2, None)?;
        keep(3, g);
        attention_bwd(&fwd.q, &fwd.k, &fwd.v, &fwd.probs, &g_attn, ctx)?
    };
    drop((fwd.probs, fwd.attn, fwd.so, fwd.q, fwd.k, fwd.v));
    let gqp = rope_bwd(&gq, &ctx.cos, &ctx.sin)?.reshape((rows, nh * hd))?;
    let gkp = rope_bwd(&gk, &ctx.cos, &ctx.sin)?.reshape((rows, nkv * hd))?;
    let gvp = gv.transpose(1, 2)?.reshape((rows, nkv * hd))?;
    let (gh1, g) = l[0].backward(&fwd.h1, &fwd.sq, &gqp, None)?;
    keep(0, g);
    let (gh1, g) = l[1].backward(&fwd.h1, &fwd.sk, &gkp, Some(gh1))?;
    keep(1, g);
    let (gh1, g) = l[2].backward(&fwd.h1, &fwd.sv, &gvp, Some(gh1))?;
    keep(2, g);
    let gx = (gx2 + rms_norm_bwd(&x, &layer.input_norm, eps, &gh1)?)?;
    Ok((gx.reshape((b, s, hidden))?, grads))
}

/// Adapter gradients produced in decoder layers' hand-written backward, merged after the outer
/// pass.
#[derive(Clone, Default)]
pub(crate) struct GradSink(Arc<std::sync::Mutex<Vec<(Tensor, Tensor)>>>);

impl GradSink {
    fn push(&self, var: Tensor, grad: Tensor) {
        self.0.lock().expect("grad sink lock").push((var, grad));
    }

    fn drain_into(&self, grads: &mut candle_core::backprop::GradStore) -> candle_core::Result<()> {
        let pending = std::mem::take(&mut *self.0.lock().expect("grad sink lock"));
        for (var, g) in pending {
            let total = match grads.get(&var) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert(&var, total);
        }
        Ok(())
    }
}

/// One decoder layer as a single autograd op with a hand-written backward: the gradient of its
/// input is returned, its adapters' go into `sink`. `pass` is `Output` for gradient
/// checkpointing (the layer's activations are not kept; backward replays the layer with the
/// same dropout masks) or `Keep` (they are kept until backward reaches the layer).
fn layer_op(
    layer: DecoderLayer,
    ctx: Arc<LayerCtx>,
    x: &Tensor,
    rng: Option<&mut Rng>,
    sink: &GradSink,
    pass: Pass,
) -> candle_core::Result<Tensor> {
    let start = rng.as_ref().map(|r| **r);
    let mut fwd_rng = start;
    let (b, sq, hidden) = x.dims3()?;
    let (y, kept) = layer_forward(
        &layer,
        &ctx,
        &x.detach().reshape((b * sq, hidden))?,
        (b, sq),
        fwd_rng.as_mut(),
        pass,
    )?;
    let y = y
        .expect("an output unless replaying")
        .reshape((b, sq, hidden))?;
    if let (Some(outer), Some(after)) = (rng, fwd_rng) {
        *outer = after;
    }
    // The first layer's input (embeddings) is not tracked, so one of the layer's adapter
    // weights anchors the op; with no adapter nothing of this layer trains, and an untracked x
    // needs no gradient.
    let anchor = layer
        .linears
        .iter()
        .find_map(|l| l.adapter.as_ref().map(|a| a.a.as_tensor().clone()));
    // What the forward kept, taken by the backward; None for a checkpointed layer, whose
    // backward replays the forward from the dropout stream as it began.
    let kept = std::sync::Mutex::new(kept);
    let sink = sink.clone();
    let backward: crate::ops::Backward = Box::new(move |x: &Tensor, gy: &Tensor| {
        let mut rng = start;
        let kept = kept.lock().expect("decoder layer lock").take();
        let (gx, grads) =
            layer_backward(&layer, &ctx, &x.detach(), kept, rng.as_mut(), &gy.detach())?;
        for (var, g) in grads {
            sink.push(var, g);
        }
        Ok(Some(gx))
    });
    crate::ops::hand_written("decoder-layer", x, anchor.as_ref(), y, backward)
}

/// RMSNorm with its weight (the fused op; see `crate::ops::rms_norm`).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    crate::ops::rms_norm(x, w, eps)
}

fn rotate_half(x: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// x `[b, h, s, d]`, cos/sin `[s, d]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

/// Softmax over the last dimension from differentiable primitives (the max shift is a constant).
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// log-softmax over the last dimension, in f32.
pub fn log_softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Mean cross-entropy over positions whose (shifted) label is not -100.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    let labels: Vec<i64> = labels.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
    if labels.len() != b * s {
        return Err(ModelError::Invalid {
            path: "labels".into(),
            message: format!("has {} values for a [{b}, {s}] batch", labels.len()),
        });
    }
    let mut targets = Vec::with_capacity(b * (s - 1));
    let mut weights = Vec::with_capacity(b * (s - 1));
    for bi in 0..b {
        for i in 1..s {
            let t = labels[bi * s + i];
            if t == -100 {
                targets.push(0u32);
                weights.push(0f32);
            } else if t < 0 || t as usize >= v {
                return Err(ModelError::Invalid {
                    path: "labels".into(),
                    message: format!("label {t} at [{bi}, {i}] is outside the vocabulary of {v}"),
                });
            } else {
                targets.push(t as u32);
                weights.push(1.0);
            }
        }
    }
    let count: f32 = weights.iter().sum();
    let dev = logits.device();
    let n = b * (s - 1);
    let logp = log_softmax_last_dim(&logits.narrow(1, 0, s - 1)?.reshape((n, v))?)?;
    let targets = Tensor::from_vec(targets, (n, 1), dev)?;
    let picked = logp.gather(&targets, 1)?.squeeze(1)?; // [n]
    let weights = Tensor::from_vec(weights, n, dev)?;
    Ok(((picked * weights)?.sum_all()? * (-1.0 / count.max(1.0) as f64))?)
}

impl CausalLm {
    /// Continue `prompt` by up to `max_new` tokens: greedy when `temperature` is 0, sampled
    /// otherwise. Stops at any of `stop` ids. Recomputes the whole sequence per token (no KV
    /// cache): meant for trying an adapter, not for serving.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        temperature: f64,
        stop: &[u32],
        rng: &mut Rng,
    ) -> Result<Vec<u32>> {
        let mut ids = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..max_new {
            let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &self.device)?;
            let logits = self.forward(&input, None, None)?.detach();
            let last = logits
                .narrow(1, ids.len() - 1, 1)?
                .flatten_all()?
                .to_dtype(DType::F32)?;
            let next = if temperature <= 0.0 {
                last.argmax(0)?.to_scalar::<u32>()?
            } else {
                let p = softmax_last_dim(&(last / temperature)?)?.to_vec1::<f32>()?;
                let mut u = rng.next_f32();
                let mut pick = p.len() - 1;
                for (i, &pi) in p.iter().enumerate() {
                    if u < pi {
                        pick = i;
                        break;
                    }
                    u -= pi;
                }
                pick as u32
            };
            if stop.contains(&next) {
                break;
            }
            ids.push(next);
            out.push(next);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/lm")
            .join(name)
    }

    /// The LM head's loss a block of rows at a time equals the whole logits' cross-entropy, in
    /// value and in the hidden states' gradient, with a ragged last block.
    #[test]
    fn head_loss_in_blocks_equals_the_whole() {
        use crate::quant::linear::lm_head;
        let dev = Device::Cpu;
        let (n, hidden, vocab) = (10, 16, 37);
        let h =
            candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, hidden), &dev).unwrap())
                .unwrap();
        let head = Tensor::randn(0f32, 1.0, (vocab, hidden), &dev).unwrap();
        let targets = Tensor::from_vec(
            (0..n as u32).map(|i| i * 7 % vocab as u32).collect(),
            n,
            &dev,
        )
        .unwrap();
        // Rows weighted apart, so that a gradient landing on the wrong row shows.
        let weights = Tensor::arange(1f32, n as f32 + 1.0, &dev).unwrap();
        let run = |nll: Tensor| {
            let g = (&nll * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g = g.get(h.as_tensor()).expect("a gradient for h").clone();
            (
                nll.to_vec1::<f32>().unwrap(),
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        };
        let whole = run(crate::ops::cross_entropy(
            &lm_head(h.as_tensor(), &head).unwrap(),
            &targets,
        )
        .unwrap());
        // Three rows per block: 3 + 3 + 3 + 1.
        let blocks = run(head_loss(h.as_tensor(), &head, &targets, 3 * vocab + 2).unwrap());
        for (a, b) in [(&whole.0, &blocks.0), (&whole.1, &blocks.1)] {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                scale > 0.0 && diff <= 1e-6 * scale,
                "differs by {diff} (scale {scale})"
            );
        }
    }

    /// The decoder layers' hand-written backward, from kept activations and from a
    /// checkpoint's replay, against candle's autograd through the plain layers, with dropout on
    /// (the same draws), left padding and trained, non-zero adapters.
    #[test]
    fn hand_written_layer_backward_equals_autograd_with_dropout() {
        for name in ["llama-gqa", "qwen2"] {
            let mut m = CausalLm::load(&fixture(name), &LoadOptions::default()).unwrap();
            m.load_adapter(&fixture(&format!("{name}-lora"))).unwrap();
            for (_, lin) in m.linears_mut() {
                if let Some(a) = lin.adapter.as_mut() {
                    a.dropout = 0.2;
                }
            }
            let ids = Tensor::from_vec(
                (0..24u32).map(|i| i * 7 % 50).collect(),
                (2, 12),
                &Device::Cpu,
            )
            .unwrap();
            let mut mask = vec![1i64; 24];
            mask[12] = 0; // left padding in the second row
            let mask = Tensor::from_vec(mask, (2, 12), &Device::Cpu).unwrap();
            let labels = ids.to_dtype(DType::I64).unwrap();
            let no_dropout = m
                .forward_loss(&ids, Some(&mask), &labels, None)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let mut run = |autograd: bool, checkpointing: bool| {
                m.set_autograd_layers(autograd);
                m.set_gradient_checkpointing(checkpointing);
                let mut rng = Rng::new(11);
                let loss = m
                    .forward_loss(&ids, Some(&mask), &labels, Some(&mut rng))
                    .unwrap();
                let grads = m.backward(&loss).unwrap();
                let out: Vec<(String, Vec<f32>)> = m
                    .trainable()
                    .into_iter()
                    .map(|(k, v)| {
                        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{k}"));
                        (k, g.flatten_all().unwrap().to_vec1().unwrap())
                    })
                    .collect();
                (loss.to_scalar::<f32>().unwrap(), out)
            };
            let (loss_plain, plain) = run(true, false);
            assert_ne!(loss_plain, no_dropout, "{name}: dropout is on");
            assert_eq!(plain.len(), 28);
            for checkpointing in [false, true] {
                let (loss, hand) = run(false, checkpointing);
                assert!(
                    (loss_plain - loss).abs() <= 1e-6 * loss_plain,
                    "{name}, checkpointing {checkpointing}: forward {loss_plain} vs {loss}"
                );
                for ((key, a), (_, b)) in plain.iter().zip(&hand) {
                    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                    assert!(scale > 0.0, "{name}: {key} has a zero gradient");
                    assert!(
                        diff <= 1e-5 * scale,
                        "{name}, checkpointing {checkpointing}: {key} differs by {diff} \
                         (scale {scale})"
                    );
                }
            }
        }
    }
}
