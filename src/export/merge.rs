//! Merging adapters into base weights, tensor by tensor, and the writers that consume them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;

use super::gguf::{GgufWriter, TensorDecl, Value};
use super::{ExportError, Result};
use crate::lora::{peft, LoraConfig};
use crate::model::config::{Arch, ModelConfig};
use crate::model::gguf::{gguf_name, llama3_divisors, permute_rows, permuted_heads, GgufModel};
use crate::model::source::BaseWeights;
use crate::model::weights::view_to_tensor;
use crate::model::SafetensorsWriter;
use crate::quant::bnb::{from_bnb_tensors, is_aux_key, read_quant_state, QuantStateJson};
use crate::quant::{FloatDType, FloatSlice, Quant4Tensor, QuantConfig};

/// What the adapter is merged into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeBase {
    /// The model's own 16-bit (or 32-bit) weights.
    Original,
    /// The weights the adapter was trained against: quantized with this config, dequantized.
    Quantized(QuantConfig),
}

/// A base model and an optional adapter, producing merged tensors in Hugging Face names.
pub struct MergeSource {
    pub dir: PathBuf,
    pub config: ModelConfig,
    weights: BaseWeights,
    /// module path -> (A `[r, in]`, B `[out, r]`) in f32.
    adapter: BTreeMap<String, (Tensor, Tensor)>,
    pub lora: Option<LoraConfig>,
    base: MergeBase,
}

fn st_dtype(t: Dtype) -> Result<DType> {
    match t {
        Dtype::F32 => Ok(DType::F32),
        Dtype::F16 => Ok(DType::F16),
        Dtype::BF16 => Ok(DType::BF16),
        other => Err(ExportError::Invalid(format!(
            "unsupported tensor dtype {other:?}"
        ))),
    }
}

impl MergeSource {
    pub fn open(dir: &Path, adapter: Option<&Path>, base: MergeBase) -> Result<Self> {
        let (config, weights) = BaseWeights::open(dir)?;
        let mut source = MergeSource {
            dir: dir.to_path_buf(),
            config,
            weights,
            adapter: BTreeMap::new(),
            lora: None,
            base,
        };
        if let Some(a) = adapter {
            let loaded = peft::load(a, &Device::Cpu)?;
            for (module, (am, bm)) in &loaded.weights {
                let wname = format!("{module}.weight");
                let shape = source.weight_shape(&wname).ok_or_else(|| ExportError::Adapter {
                    path: a.to_path_buf(),
                    message: format!("{module}: the base model has no such linear (an adapter for another model?)"),
                })?;
                let (out, inp) = (shape[0], shape[1]);
                if am.dims() != [loaded.config.r, inp] || bm.dims() != [out, loaded.config.r] {
                    return Err(ExportError::Adapter {
                        path: a.to_path_buf(),
                        message: format!(
                            "{module}: lora_A {:?} / lora_B {:?} do not fit the base weight [{out}, {inp}]",
                            am.dims(),
                            bm.dims()
                        ),
                    });
                }
            }
            source.adapter = loaded.weights;
            source.lora = Some(loaded.config);
        }
        Ok(source)
    }

    /// The GGUF file the base model comes from, if it is one.
    pub fn gguf(&self) -> Option<&GgufModel> {
        match &self.weights {
            BaseWeights::Gguf(g) => Some(g),
            BaseWeights::Safetensors { .. } => None,
        }
    }

    /// The quant state of a 4-bit weight (read from its small JSON tensor only).
    fn quant_state(&self, name: &str) -> Result<Option<QuantStateJson>> {
        match &self.weights {
            BaseWeights::Safetensors { files, .. } => read_quant_state(name, |k| files.get(k))
                .map(|o| o.map(|(_, s)| s))
                .map_err(|e| ExportError::Invalid(e.to_string())),
            BaseWeights::Gguf(_) => Ok(None),
        }
    }

    fn weight_shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.weights {
            BaseWeights::Safetensors { files, .. } => match self.quant_state(name) {
                Ok(Some(state)) => Some(state.shape),
                _ => files.get(name).map(|v| v.shape().to_vec()),
            },
            BaseWeights::Gguf(g) => g.shape(name),
        }
    }

    /// Hugging Face tensor names in file order, auxiliary 4-bit tensors folded into their weight.
    pub fn names(&self) -> Result<Vec<String>> {
        match &self.weights {
            BaseWeights::Safetensors { files, .. } => Ok(files
                .names()
                .filter(|n| !is_aux_key(n))
                .map(String::from)
                .collect()),
            BaseWeights::Gguf(g) => Ok(g.hf_names()?),
        }
    }

    /// The stored dtype of a tensor (for 4-bit weights, the dtype they were quantized from; for
    /// GGUF block types, f16).
    pub fn dtype(&self, name: &str) -> Result<DType> {
        match &self.weights {
            BaseWeights::Safetensors { files, .. } => {
                if let Some(state) = self.quant_state(name)? {
                    return FloatDType::from_torch_name(&state.dtype)
                        .map(FloatDType::to_candle)
                        .map_err(|e| ExportError::Invalid(format!("{name}: {e}")));
                }
                st_dtype(files.tensor(name)?.dtype())
            }
            BaseWeights::Gguf(g) => g
                .natural_dtype(name)
                .ok_or_else(|| ExportError::Invalid(format!("{name}: not in the model"))),
        }
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.weight_shape(name)
            .ok_or_else(|| ExportError::Invalid(format!("{name}: not in the model")))
    }

    /// The base tensor in f32, as stored (4-bit weights dequantized).
    fn base_tensor(&self, name: &str) -> Result<Tensor> {
        match &self.weights {
            BaseWeights::Safetensors { files, .. } => {
                if self.quant_state(name)?.is_some() {
                    let q = from_bnb_tensors(name, |k| files.get(k), &Device::Cpu)
                        .map_err(|e| ExportError::Invalid(format!("{name}: {e}")))?;
                    Ok(q.dequantize(DType::F32)
                        .map_err(|e| ExportError::Invalid(format!("{name}: {e}")))?)
                } else {
                    let v = files.tensor(name)?;
                    Ok(view_to_tensor(name, &v, &Device::Cpu)?.to_dtype(DType::F32)?)
                }
            }
            BaseWeights::Gguf(g) => Ok(g.tensor(name, &self.config)?),
        }
    }

    /// The tensor in f32 with the adapter merged if it has one.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let mut t = self.base_tensor(name)?;
        let module = name.strip_suffix(".weight");
        if let Some((a, b)) = module.and_then(|m| self.adapter.get(m)) {
            let prequantized = matches!(
                self.weights,
                BaseWeights::Safetensors {
                    prequantized: true,
                    ..
                }
            );
            if let (MergeBase::Quantized(cfg), false) = (self.base, prequantized) {
                let data = t.flatten_all()?.to_vec1::<f32>()?;
                let q = Quant4Tensor::quantize_slice(
                    FloatSlice::F32(&data),
                    t.shape().clone(),
                    &cfg,
                    &Device::Cpu,
                )
                .map_err(|e| ExportError::Invalid(format!("{name}: {e}")))?;
                t = q
                    .dequantize(DType::F32)
                    .map_err(|e| ExportError::Invalid(format!("{name}: {e}")))?;
            }
            let scale = self.lora.as_ref().expect("adapter has a config").scale();
            t = (t + (b.matmul(a)? * scale)?)?;
        }
        Ok(t)
    }
}

/// Merged model as a Hugging Face directory: config without quantization, tokenizer files,
/// safetensors in the base's dtype (shards of at most `max_shard_bytes`, indexed).
pub fn export_safetensors(
    src: &MergeSource,
    out: &Path,
    max_shard_bytes: usize,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<()> {
    let staging = out.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| ExportError::Io {
        path: staging.clone(),
        source: e,
    })?;
    let result = (|| -> Result<()> {
        let names = src.names()?;
        // Plan shards by size, as transformers' save_pretrained does.
        let mut shards: Vec<Vec<(String, DType)>> = vec![vec![]];
        let mut size = 0;
        for n in &names {
            let dtype = src.dtype(n)?;
            let bytes = src.shape(n)?.iter().product::<usize>() * dtype.size_in_bytes();
            if size > 0 && size + bytes > max_shard_bytes {
                shards.push(vec![]);
                size = 0;
            }
            size += bytes;
            shards
                .last_mut()
                .expect("non-empty")
                .push((n.clone(), dtype));
        }
        let count = shards.len();
        let mut weight_map = serde_json::Map::new();
        let mut total = 0usize;
        let mut done = 0;
        for (i, shard) in shards.iter().enumerate() {
            let file = if count == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{count:05}.safetensors", i + 1)
            };
            let mut w = SafetensorsWriter::create(&staging.join(&file), &[("format", "pt")])?;
            for (name, dtype) in shard {
                let t = src.tensor(name)?.to_dtype(*dtype)?;
                let bytes = tensor_bytes(&t)?;
                let st = match dtype {
                    DType::F16 => Dtype::F16,
                    DType::BF16 => Dtype::BF16,
                    _ => Dtype::F32,
                };
                w.add(name, st, t.dims(), &bytes)?;
                total += bytes.len();
                weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
                done += 1;
                progress(done, names.len(), name);
            }
            w.finish()?;
        }
        if count > 1 {
            let index =
                serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            let p = staging.join("model.safetensors.index.json");
            std::fs::write(&p, serde_json::to_string_pretty(&index).expect("json"))
                .map_err(|e| ExportError::Io { path: p, source: e })?;
        }
        let mut config = src.config.raw.clone();
        if let Some(o) = config.as_object_mut() {
            o.remove("quantization_config");
        }
        let p = staging.join("config.json");
        std::fs::write(
            &p,
            serde_json::to_string_pretty(&config).expect("json") + "\n",
        )
        .map_err(|e| ExportError::Io { path: p, source: e })?;
        if let Some(g) = src.gguf() {
            super::vocab::write_hf_tokenizer(g, &staging)?;
            return Ok(());
        }
        for entry in std::fs::read_dir(&src.dir)
            .map_err(|e| ExportError::Io {
                path: src.dir.clone(),
                source: e,
            })?
            .flatten()
        {
            let n = entry.file_name().to_string_lossy().into_owned();
            let is_side = n.starts_with("tokenizer")
                || n.ends_with(".jinja")
                || n == "generation_config.json"
                || n == "special_tokens_map.json";
            if is_side && entry.path().is_file() {
                std::fs::copy(entry.path(), staging.join(&n)).map_err(|e| ExportError::Io {
                    path: entry.path(),
                    source: e,
                })?;
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            if out.exists() {
                std::fs::remove_dir_all(out).map_err(|e| ExportError::Io {
                    path: out.to_path_buf(),
                    source: e,
                })?;
            }
            std::fs::rename(&staging, out).map_err(|e| ExportError::Io {
                path: out.to_path_buf(),
                source: e,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => {
            return Err(ExportError::Invalid(format!(
                "cannot write dtype {other:?}"
            )))
        }
    })
}

/// GGUF file types qlorad writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4KM,
}

impl FromStr for GgufType {
    type Err = ExportError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => GgufType::F32,
            "f16" => GgufType::F16,
            "bf16" => GgufType::Bf16,
            "q8_0" => GgufType::Q8_0,
            "q4_0" => GgufType::Q4_0,
            "q4_k_m" => GgufType::Q4KM,
            other => {
                return Err(ExportError::Invalid(format!(
                    "unknown GGUF type {other:?} (f32, f16, bf16, q8_0, q4_0, q4_k_m)"
                )))
            }
        })
    }
}

impl GgufType {
    pub fn as_str(self) -> &'static str {
        match self {
            GgufType::F32 => "f32",
            GgufType::F16 => "f16",
            GgufType::Bf16 => "bf16",
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4_0 => "q4_0",
            GgufType::Q4KM => "q4_k_m",
        }
    }

    /// `general.file_type` (llama_ftype).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q4_0 => 2,
            GgufType::Q8_0 => 7,
            GgufType::Q4KM => 15,
            GgufType::Bf16 => 32,
        }
    }

    /// The type of one tensor, as llama.cpp's converter and `llama-quantize` choose it.
    fn tensor_type(
        self,
        gguf_name: &str,
        shape: &[usize],
        layer: Option<usize>,
        n_layers: usize,
    ) -> GgmlDType {
        if shape.len() == 1 {
            return GgmlDType::F32;
        }
        let ne0 = shape[shape.len() - 1];
        let fits = |t: GgmlDType| ne0.is_multiple_of(t.block_size());
        let fallback = |t: GgmlDType| {
            if fits(t) {
                t
            } else if t.block_size() == 256 && fits(GgmlDType::Q8_0) {
                if t == GgmlDType::Q6K {
                    GgmlDType::Q8_0
                } else {
                    GgmlDType::Q5_0
                }
            } else {
                GgmlDType::F16
            }
        };
        match self {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::Bf16 => GgmlDType::BF16,
            GgufType::Q8_0 => fallback(GgmlDType::Q8_0),
            GgufType::Q4_0 => fallback(GgmlDType::Q4_0),
            GgufType::Q4KM => {
                let more_bits = |i: usize| {
                    i < n_layers / 8 || i >= 7 * n_layers / 8 || (i - n_layers / 8) % 3 == 2
                };
                let more_bits_layer = (gguf_name.ends_with("attn_v.weight")
                    || gguf_name.ends_with("ffn_down.weight"))
                    && layer.is_some_and(more_bits);
                let t = if gguf_name == "output.weight" || more_bits_layer {
                    GgmlDType::Q6K
                } else {
                    GgmlDType::Q4K
                };
                fallback(t)
            }
        }
    }
}

/// Hugging Face name -> (GGUF name, layer).
/// Rows of `module`'s output in the order llama.cpp expects: Q and K permuted for llama.
fn llama_cpp_row_order(c: &ModelConfig, module: &str, t: Tensor) -> candle_core::Result<Tensor> {
    match permuted_heads(c, module) {
        Some(heads) => permute_rows(&t, heads),
        None => Ok(t),
    }
}

/// llama.cpp's name for the architecture, for the ones GGUF export writes.
pub fn arch_name(a: Arch) -> Result<&'static str> {
    match a {
        Arch::Llama | Arch::Mistral => Ok("llama"),
        Arch::Qwen2 => Ok("qwen2"),
        Arch::Qwen3 => Ok("qwen3"),
        Arch::Phi3 => Err(ExportError::Invalid(format!(
            "GGUF export of {} models is not supported (safetensors and the PEFT adapter are)",
            a.as_str()
        ))),
    }
}

fn model_metadata(src: &MergeSource, ty: GgufType, name: &str) -> Result<Vec<(String, Value)>> {
    let c = &src.config;
    let a = arch_name(c.arch)?;
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.into())),
        (
            format!("{a}.block_count"),
            Value::U32(c.num_hidden_layers as u32),
        ),
        (
            format!("{a}.context_length"),
            Value::U32(c.max_position_embeddings as u32),
        ),
        (
            format!("{a}.embedding_length"),
            Value::U32(c.hidden_size as u32),
        ),
        (
            format!("{a}.feed_forward_length"),
            Value::U32(c.intermediate_size as u32),
        ),
        (
            format!("{a}.attention.head_count"),
            Value::U32(c.num_attention_heads as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(c.num_key_value_heads as u32),
        ),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(c.rope_theta as f32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
    ];
    if c.raw.get("head_dim").is_some_and(|h| !h.is_null()) {
        m.push((
            format!("{a}.attention.key_length"),
            Value::U32(c.head_dim as u32),
        ));
        m.push((
            format!("{a}.attention.value_length"),
            Value::U32(c.head_dim as u32),
        ));
    }
    m.push(("general.file_type".into(), Value::U32(ty.file_type())));
    if a == "llama" {
        m.push((format!("{a}.vocab_size"), Value::U32(c.vocab_size as u32)));
        m.push((
            format!("{a}.rope.dimension_count"),
            Value::U32(c.head_dim as u32),
        ));
    }
    m.push(("general.quantization_version".into(), Value::U32(2)));
    match src.gguf() {
        // A GGUF base carries its tokenizer as llama.cpp wants it already.
        Some(g) => m.extend(super::vocab::copy_tokenizer_metadata(g)?),
        None => m.extend(super::vocab::tokenizer_metadata(&src.dir, c.vocab_size)?),
    }
    Ok(m)
}

/// llama3 RoPE scaling travels as a `rope_freqs.weight` tensor of per-frequency divisors.
fn rope_freqs(c: &ModelConfig) -> Option<Vec<f32>> {
    c.rope_scaling.map(|_| llama3_divisors(c))
}

fn ggml_bytes(t: &Tensor, ty: GgmlDType) -> Result<Vec<u8>> {
    Ok(match ty {
        GgmlDType::F32 => tensor_bytes(&t.to_dtype(DType::F32)?)?,
        GgmlDType::F16 => tensor_bytes(&t.to_dtype(DType::F16)?)?,
        GgmlDType::BF16 => tensor_bytes(&t.to_dtype(DType::BF16)?)?,
        q => QTensor::quantize(&t.to_dtype(DType::F32)?, q)?
            .data()?
            .into_owned(),
    })
}

/// The merged model as one GGUF file, written tensor by tensor.
pub fn export_gguf(
    src: &MergeSource,
    out: &Path,
    ty: GgufType,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<()> {
    let c = &src.config;
    let stem = if src.gguf().is_some() {
        src.dir.file_stem()
    } else {
        src.dir.file_name()
    };
    let name = stem
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let metadata = model_metadata(src, ty, &name)?;
    let mut plan: Vec<(Option<String>, TensorDecl)> = Vec::new();
    if let Some(f) = rope_freqs(c) {
        plan.push((
            None,
            TensorDecl {
                name: "rope_freqs.weight".into(),
                dtype: GgmlDType::F32,
                shape: vec![f.len()],
            },
        ));
    }
    for hf in src.names()? {
        let (g, layer) = gguf_name(&hf)
            .ok_or_else(|| ExportError::Invalid(format!("{hf}: no GGUF name for this tensor")))?;
        let shape = src.shape(&hf)?;
        let dtype = ty.tensor_type(&g, &shape, layer, c.num_hidden_layers);
        plan.push((
            Some(hf),
            TensorDecl {
                name: g,
                dtype,
                shape,
            },
        ));
    }
    let total = plan.len();
    let mut w = GgufWriter::create(
        out,
        &metadata,
        plan.iter().map(|(_, d)| d.clone()).collect(),
    )?;
    for (i, (hf, decl)) in plan.iter().enumerate() {
        let bytes = match hf {
            None => rope_freqs(c)
                .expect("planned")
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            Some(hf) => {
                let module = hf.strip_suffix(".weight").unwrap_or(hf);
                let t = llama_cpp_row_order(c, module, src.tensor(hf)?)?;
                ggml_bytes(&t, decl.dtype)?
            }
        };
        w.write_tensor(&bytes)?;
        progress(i + 1, total, &decl.name);
    }
    w.finish()
}

/// The adapter alone as a GGUF LoRA for llama.cpp's `--lora` (rsLoRA folded into alpha).
pub fn export_gguf_lora(src: &MergeSource, out: &Path) -> Result<()> {
    let c = &src.config;
    let lora = src
        .lora
        .as_ref()
        .ok_or_else(|| ExportError::Invalid("no adapter to export".into()))?;
    let a = arch_name(c.arch)?;
    // llama.cpp scales by alpha / r; rsLoRA's alpha / sqrt(r) becomes alpha * sqrt(r) / r.
    let alpha = if lora.use_rslora {
        lora.alpha * (lora.r as f64).sqrt()
    } else {
        lora.alpha
    };
    let metadata = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.type".into(), Value::String("adapter".into())),
        ("adapter.type".into(), Value::String("lora".into())),
        ("adapter.lora.alpha".into(), Value::F32(alpha as f32)),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    let mut plan = Vec::new();
    for (module, (am, bm)) in &src.adapter {
        let (g, _) = gguf_name(&format!("{module}.weight"))
            .ok_or_else(|| ExportError::Invalid(format!("{module}: no GGUF name")))?;
        // B's rows are the layer's output rows, so they take the same order as the weight.
        let b = llama_cpp_row_order(c, module, bm.clone())?;
        plan.push((
            TensorDecl {
                name: format!("{g}.lora_a"),
                dtype: GgmlDType::F32,
                shape: am.dims().to_vec(),
            },
            am.clone(),
        ));
        plan.push((
            TensorDecl {
                name: format!("{g}.lora_b"),
                dtype: GgmlDType::F32,
                shape: b.dims().to_vec(),
            },
            b,
        ));
    }
    let mut w = GgufWriter::create(
        out,
        &metadata,
        plan.iter().map(|(d, _)| d.clone()).collect(),
    )?;
    for (_, t) in &plan {
        w.write_tensor(&tensor_bytes(&t.to_dtype(DType::F32)?)?)?;
    }
    w.finish()
}
