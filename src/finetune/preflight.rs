//! What a job will take, before it runs: its datasets tokenized as the run tokenizes them, its
//! steps as the trainer counts them, and its peak memory from the model's shapes, the spec and
//! what qlorad's training step holds (the model below, checked against measured peaks in
//! docs/perf.md), so a job that cannot fit its device is refused at create.

use std::path::Path;

use serde::Serialize;

use super::{JobSpec, Result};
use crate::data::{encode_dataset, encode_preferences, Example, TextTokenizer};
use crate::lora::LoraConfig;
use crate::model::config::ModelConfig;

/// Score elements of one block of the blocked attention (`model::llama::layer`'s
/// `ATTN_BLOCK`), and what a checkpoint's replay keeps of the probabilities (`REPLAY_KEEP`).
const ATTN_BLOCK: u64 = 1 << 27;
const REPLAY_KEEP: u64 = 1 << 32;
/// Logits of one block of the LM head's loss (`model::llama::head`).
const HEAD_BLOCK: u64 = 1 << 25;
/// What a device holds beyond the tensors: on a GPU the cuBLAS and cuDNN workspaces and loaded
/// kernels; on the CPU the process itself (binary, tokenizer, threads, allocator: a 64-token
/// step of the small random model peaks at 65 MB in all).
const GPU_OVERHEAD: u64 = 256 << 20;
const CPU_OVERHEAD: u64 = 32 << 20;

/// Where a job runs, as the memory model needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    /// A CUDA GPU; `fused_attention` when cuDNN's attention serves (the `cudnn` feature).
    Cuda {
        fused_attention: bool,
    },
}

impl DeviceKind {
    /// The kind of a spec's `device` string in this build.
    pub fn of(device: &str) -> DeviceKind {
        if device.starts_with("cuda") {
            DeviceKind::Cuda {
                fused_attention: cfg!(feature = "cudnn"),
            }
        } else {
            DeviceKind::Cpu
        }
    }
}

/// The largest micro-batch of a run: the one that sets the peak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StepShape {
    /// Tokens in it (chosen and rejected sides with DPO).
    pub tokens: u64,
    /// Σ len² over its sequences (attention never crosses one).
    pub square_tokens: u64,
    /// Its longest sequence.
    pub longest: u64,
}

/// The peak memory of a training step, by part, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    /// The frozen base: packed 4-bit linears with their absmax, embeddings, LM head, norms.
    pub weights: u64,
    /// The adapter's f32 weights and gradients, and the optimizer's two moments.
    pub adapter: u64,
    /// What the step holds for its backward, at its largest micro-batch.
    pub activations: u64,
    /// Dequantized weights, the LM head's loss blocks, attention scratch, device overhead.
    pub workspace: u64,
    pub total: u64,
}

/// Parameters of the frozen linears of every layer.
pub fn linear_params(c: &ModelConfig) -> u64 {
    let per_layer: usize = c.layer_linears().iter().map(|(_, i, o, _)| i * o).sum();
    (per_layer * c.num_hidden_layers) as u64
}

/// The adapter's tensors by element count: A `[r, in]` and B `[out, r]` of every targeted
/// linear.
fn adapter_tensors(c: &ModelConfig, lora: &LoraConfig) -> Vec<u64> {
    let mut out = Vec::new();
    for layer in 0..c.num_hidden_layers {
        for (name, i, o, _) in c.layer_linears() {
            if lora
                .target_modules
                .matches(&format!("model.layers.{layer}.{name}"))
            {
                out.push((lora.r * i) as u64);
                out.push((lora.r * o) as u64);
            }
        }
    }
    out
}

/// Trainable adapter parameters: r·(in + out) for every targeted linear.
pub fn adapter_params(c: &ModelConfig, lora: &LoraConfig) -> u64 {
    adapter_tensors(c, lora).iter().sum()
}

/// The peak memory of training `c` with `spec` (and `lora`, the adapter's shape) on `device`,
/// at the micro-batch `step`.
///
/// A checkpointed step keeps every layer's input, then replays one layer at a time: that
/// layer's saved activations, its dequantized weights and its backward's gradients are the
/// step's peak. Without checkpointing every layer keeps what its backward reads until the
/// backward reaches it (`model::llama::layer`'s `LayerSaved`).
pub fn estimate_memory(
    c: &ModelConfig,
    spec: &JobSpec,
    lora: &LoraConfig,
    device: DeviceKind,
    step: &StepShape,
) -> MemoryEstimate {
    let d = spec.quantization.dtype().size_in_bytes() as u64;
    let (h, i, v) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
    );
    let layers = c.num_hidden_layers as u64;
    let heads = c.num_attention_heads as u64;
    let q = heads * c.head_dim as u64;
    let kv = (c.num_key_value_heads * c.head_dim) as u64;
    let linears = linear_params(c);

    let quantized = match spec.quantization.config() {
        Some(qc) => {
            let blocks = linears.div_ceil(qc.block_size as u64);
            // Packed codes, then one absmax per block: f32, or with double quantization a byte
            // per block and an f32 absmax (and offset) per 256 blocks.
            let absmax = if qc.double_quant {
                blocks + blocks.div_ceil(256) * 4 + 64
            } else {
                blocks * 4
            };
            linears.div_ceil(2) + absmax
        }
        None => linears * d,
    };
    let embed = v * h * d;
    let head = if c.tie_word_embeddings { 0 } else { v * h * d };
    let norms = (2 * layers + 1) * h * d;
    let weights = quantized + embed + head + norms;

    // f32 weights and gradients, and the optimizer's moments (f32, or bitsandbytes' bytes).
    // On a GPU the 8-bit moments stay in host memory (`Optimizer::step_device`).
    let optimizer = spec.hyperparameters.optimizer;
    let host_moments = matches!(device, DeviceKind::Cuda { .. })
        && optimizer == crate::train::OptimizerKind::AdamwBnb8bit;
    let adapter = adapter_tensors(c, lora)
        .iter()
        .map(|&n| {
            8 * n
                + if host_moments {
                    0
                } else {
                    optimizer.state_bytes(n as usize) as u64
                }
        })
        .sum::<u64>();

    let t = step.tokens;
    let r = lora.r as u64;
    let fused = matches!(
        device,
        DeviceKind::Cuda {
            fused_attention: true
        }
    );
    // Per token, what one layer's backward reads: h1, x2, h2; q, k, v and the attention's
    // output; gate, up and their product; each adapter's rank-r product, and with dropout
    // the dropped input of every linear; the fused attention's output.
    let dropped = if lora.dropout > 0.0 { 5 * h + q + i } else { 0 };
    let saved_elems = 3 * h + 2 * q + 2 * kv + 3 * i + 7 * r + dropped + if fused { q } else { 0 };
    // The MLP backward's gradients beside them: the output's, the product's, gate's and up's.
    let grad_elems = 2 * h + 3 * i;
    // The probabilities the blocked attention keeps (one layer in a replay, every layer
    // without checkpointing when they fit one block), and its score blocks.
    let probs = heads * step.square_tokens;
    let checkpointing = spec.hyperparameters.gradient_checkpointing;
    let kept_probs = if fused {
        0
    } else if checkpointing {
        if probs <= REPLAY_KEEP {
            probs * d
        } else {
            0
        }
    } else if probs <= ATTN_BLOCK {
        layers * probs * d
    } else {
        0
    };
    // What the whole step holds: with checkpointing every layer's input, without it every
    // layer's saved activations (and the probabilities each kept).
    let held = if checkpointing {
        t * layers * h * d
    } else {
        t * layers * (h + saved_elems) * d + kept_probs
    };
    // Then two moments make the peak, never at once. A layer's backward: a replay's saved
    // activations and probabilities (or without checkpointing the gradients alone), the
    // attention backward's score blocks and the layer's dense weights; a replay holds its
    // layer's weights dense, while without checkpointing the backward dequantizes one at a
    // time.
    let layer_act = if checkpointing {
        t * (saved_elems + grad_elems) * d + kept_probs
    } else {
        t * grad_elems * d
    };
    let dense = if spec.quantization.config().is_none() {
        0
    } else if checkpointing {
        linears / layers.max(1) * d
    } else {
        h * i * d
    };
    let scores = if fused {
        0
    } else {
        (heads * step.longest * step.longest).min(ATTN_BLOCK) * (4 + d)
    };
    // And the LM head's loss at the end of the forward: one block of logits, their f32
    // softmax and gradient.
    let head_block = (t * v).min(HEAD_BLOCK) * (2 * d + 4);
    let (phase_act, phase_rest) = if layer_act + dense + scores >= head_block {
        (layer_act, dense + scores)
    } else {
        (0, head_block)
    };
    // A GPU holds more than the tensors named here: its memory pool keeps about one and a half
    // layers' dense weights of the replays before, and the step some 0.5 bytes a token a layer
    // a hidden unit beyond them (both fitted to nine H200 peaks, docs/perf.md, within 4%).
    let (overhead, pool_slack, gpu_extra) = match device {
        DeviceKind::Cpu => (CPU_OVERHEAD, 0, 0),
        DeviceKind::Cuda { .. } => (GPU_OVERHEAD, dense * 3 / 2, t * layers * h / 2),
    };
    let activations = held + phase_act + gpu_extra;
    let workspace = phase_rest + overhead + pool_slack;
    MemoryEstimate {
        weights,
        adapter,
        activations,
        workspace,
        total: weights + adapter + activations + workspace,
    }
}

/// Training FLOPs per token: the frozen linears' forward and input gradient (4 per weight, LM
/// head included) and causal attention at `seq` tokens, as `qlorad bench train` counts them
/// for its MFU, plus a checkpoint's replay (2 per weight), which takes time too.
pub fn flops_per_token(c: &ModelConfig, spec: &JobSpec, seq: u64) -> f64 {
    let linear = (linear_params(c) + (c.vocab_size * c.hidden_size) as u64) as f64;
    let replay = if spec.hyperparameters.gradient_checkpointing {
        2.0 * linear_params(c) as f64
    } else {
        0.0
    };
    4.0 * linear + replay + 6.0 * (c.num_hidden_layers as u64 * seq * c.hidden_size as u64) as f64
}

/// What a job's datasets hold once tokenized, and how its run goes through them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataPlan {
    pub examples: usize,
    pub validation_examples: Option<usize>,
    /// Tokens of the training set, and of them those that train (labelled).
    pub tokens: u64,
    pub trained_tokens_per_epoch: u64,
    /// Packed rows, when the spec packs.
    pub rows: Option<usize>,
    pub steps: usize,
    /// Epochs the steps amount to (fractional when `max_steps` stops early).
    pub epochs: f64,
    /// Tokens over every step: what the run trains in all.
    pub trained_tokens: u64,
    /// The largest micro-batch.
    pub largest_step: StepShape,
}

/// Read and tokenize a job's files as its run will, and count its steps as the trainer does.
pub fn plan_data(
    model_dir: &Path,
    spec: &JobSpec,
    training_file: &Path,
    validation_file: Option<&Path>,
) -> Result<DataPlan> {
    let tok = TextTokenizer::load(model_dir)?;
    let opts = super::encode_options(spec);
    let dpo = spec.method.dpo().is_some();
    // With DPO a micro-batch holds each pair's two sides.
    let read = |path: &Path| -> Result<Vec<Vec<usize>>> {
        Ok(if dpo {
            encode_preferences(path, &tok, &opts)?
                .0
                .into_iter()
                .map(|p| vec![p.chosen.input_ids.len(), p.rejected.input_ids.len()])
                .collect()
        } else {
            let (set, _) = encode_dataset(path, &tok, &opts)?;
            set.iter()
                .map(|e: &Example| vec![e.input_ids.len()])
                .collect()
        })
    };
    let (train, trained_tokens_per_epoch) = if dpo {
        let t = read(training_file)?;
        let n = t.iter().flatten().sum::<usize>() as u64;
        (t, n)
    } else {
        let (set, _) = encode_dataset(training_file, &tok, &opts)?;
        let trained = set
            .iter()
            .map(crate::data::batch::target_tokens)
            .sum::<usize>() as u64;
        (
            set.iter().map(|e| vec![e.input_ids.len()]).collect(),
            trained,
        )
    };
    let validation_examples = validation_file.map(read).transpose()?.map(|v| v.len());
    let h = &spec.hyperparameters;
    let tokens = train.iter().flatten().sum::<usize>() as u64;
    // Units of one batch slot: an example (its sides), or with packing a row of examples.
    let units: Vec<Vec<usize>> = if spec.data.packing && !dpo {
        let lengths: Vec<usize> = train.iter().map(|e| e[0]).collect();
        crate::data::pack::pack_bfd(&lengths, h.max_seq_len)
            .into_iter()
            .map(|row| row.iter().map(|&e| lengths[e]).collect())
            .collect()
    } else {
        train.clone()
    };
    let rows = (spec.data.packing && !dpo).then_some(units.len());
    let per_epoch = units.len().div_ceil(h.batch_size.max(1));
    let steps = match h.max_steps {
        Some(n) => n,
        None => (per_epoch * h.n_epochs).div_ceil(h.gradient_accumulation_steps.max(1)),
    };
    let micro_batches = steps * h.gradient_accumulation_steps.max(1);
    let epochs = micro_batches as f64 / per_epoch.max(1) as f64;
    // The batch_size largest units make the largest micro-batch any order can draw.
    let mut by_size: Vec<&Vec<usize>> = units.iter().collect();
    by_size.sort_by_key(|u| std::cmp::Reverse(u.iter().sum::<usize>()));
    let mut largest = StepShape::default();
    for u in by_size.iter().take(h.batch_size.max(1)) {
        for &n in u.iter() {
            let n = n as u64;
            largest.tokens += n;
            largest.square_tokens += n * n;
            largest.longest = largest.longest.max(n);
        }
    }
    Ok(DataPlan {
        examples: train.len(),
        validation_examples,
        tokens,
        trained_tokens_per_epoch,
        rows,
        steps,
        epochs,
        trained_tokens: (trained_tokens_per_epoch as f64 * epochs).round() as u64,
        largest_step: largest,
    })
}

/// A device's memory as the memory model compares with it: a CUDA device's total, or this
/// machine's (Linux's `MemTotal`); None where it cannot be told.
pub fn device_memory(device: &str) -> Option<u64> {
    if device.starts_with("cuda") {
        return cuda_memory(device);
    }
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(feature = "cuda")]
fn cuda_memory(device: &str) -> Option<u64> {
    let dev = crate::model::parse_device(device).ok()?;
    match dev {
        candle_core::Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(_, total)| total as u64),
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_memory(_device: &str) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Llama-3 shape: 128,256 tokens, 32 heads of 8 key/value heads.
    fn llama3(hidden: usize, intermediate: usize, layers: usize, tied: bool) -> ModelConfig {
        let raw = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 128256, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
            "tie_word_embeddings": tied
        });
        ModelConfig::from_json(raw, Path::new("config.json")).unwrap()
    }

    fn llama_3_8b() -> ModelConfig {
        llama3(4096, 14336, 32, false)
    }

    /// The recipe of the H200 figures in docs/perf.md (`side_by_side.sh`): NF4 + DQ, bf16,
    /// LoRA on all linears without dropout, batch 1, cuDNN's attention.
    fn recipe(r: usize, checkpointing: bool) -> JobSpec {
        let mut spec = JobSpec::default();
        spec.quantization.compute_dtype = super::super::ComputeDType::Bf16;
        spec.hyperparameters.gradient_checkpointing = checkpointing;
        spec.lora.r = r;
        spec.lora.dropout = 0.0;
        spec
    }

    #[test]
    fn the_estimate_is_within_a_twentieth_of_the_measured_h200_peaks() {
        let c8 = llama_3_8b();
        let lora = recipe(16, true).lora.config();
        // 6.98 B frozen linear weights; 42 M adapter parameters at r16.
        assert_eq!(linear_params(&c8), 6_979_321_856);
        assert_eq!(adapter_params(&c8, &lora), 41_943_040);
        let c1 = llama3(2048, 8192, 16, true);
        let dev = DeviceKind::Cuda {
            fused_attention: true,
        };
        // Measured with `side_by_side.sh` on one H200 (docs/perf.md, 2026-12-02): shape, seq,
        // rank, checkpointing, 8-bit AdamW, GiB.
        let cases = [
            (&c1, 2048u64, 16, true, false, 2.07),
            (&c1, 8192, 16, true, false, 3.29),
            (&c1, 2048, 16, false, false, 4.07),
            (&c1, 4096, 16, false, false, 6.47),
            (&c8, 2048, 16, true, false, 8.60),
            (&c8, 8192, 16, true, false, 11.79),
            (&c8, 32768, 16, true, false, 24.3),
            (&c8, 2048, 64, true, false, 10.16),
            (&c8, 2048, 64, true, true, 8.72),
        ];
        for (c, seq, r, ckpt, eight, measured) in cases {
            let mut spec = recipe(r, ckpt);
            if eight {
                spec.hyperparameters.optimizer = crate::train::OptimizerKind::AdamwBnb8bit;
            }
            let step = StepShape {
                tokens: seq,
                square_tokens: seq * seq,
                longest: seq,
            };
            let m = estimate_memory(c, &spec, &spec.lora.config(), dev, &step);
            let est = m.total as f64 / (1u64 << 30) as f64;
            assert!(
                (est / measured - 1.0).abs() < 0.05,
                "{} layers, {seq}, r{r}, checkpointing {ckpt}, 8-bit {eight}: estimated {est:.2} GiB, measured {measured}",
                c.num_hidden_layers
            );
        }
    }

    #[test]
    fn memory_grows_with_tokens_and_without_checkpointing() {
        let c = llama_3_8b();
        let mut spec = recipe(16, true);
        spec.lora.dropout = 0.05;
        let lora = spec.lora.config();
        let dev = DeviceKind::Cpu;
        let at = |spec: &JobSpec, t: u64| {
            let step = StepShape {
                tokens: t,
                square_tokens: t * t,
                longest: t,
            };
            estimate_memory(&c, spec, &lora, dev, &step)
        };
        let (small, large) = (at(&spec, 512), at(&spec, 4096));
        assert_eq!(small.weights, large.weights);
        assert!(large.activations > 7 * small.activations);
        spec.hyperparameters.gradient_checkpointing = false;
        assert!(at(&spec, 4096).activations > 5 * large.activations);
        // 8-bit moments: the adapter's 16 bytes a parameter become about 10.
        let mut eight = spec.clone();
        eight.hyperparameters.optimizer = crate::train::OptimizerKind::AdamwBnb8bit;
        let a8 = at(&eight, 512).adapter as f64 / small.adapter as f64;
        assert!((a8 - 10.0 / 16.0).abs() < 0.01, "{a8}");
        // Unquantized weights take their dtype's bytes: 2 for every 0.5 of NF4.
        spec.quantization.kind = super::super::QuantSpecType::None;
        assert!(at(&spec, 512).weights > 2 * small.weights);
    }
}
