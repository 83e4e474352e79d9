//! Peak heap memory of one forward + backward step, 4-bit base vs dense, with and without
//! gradient checkpointing. Heap bytes are counted by a global allocator wrapper; the model is a
//! random-weight Llama written to a temporary directory.
//!
//! cargo run --release --example step_memory [-- LAYERS SEQ]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use qlorad::lora::LoraConfig;
use qlorad::model::llama::{CausalLm, LoadOptions};
use qlorad::model::random::RandomLlama;
use qlorad::quant::QuantConfig;

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const HIDDEN: usize = 1024;
const INTER: usize = 2816;
const VOCAB: usize = 8192;

fn write_model(dir: &std::path::Path, layers: usize) -> anyhow::Result<()> {
    RandomLlama {
        vocab_size: VOCAB,
        hidden_size: HIDDEN,
        intermediate_size: INTER,
        num_hidden_layers: layers,
        num_attention_heads: 16,
        num_key_value_heads: 4,
        tie_word_embeddings: false,
        qk_norm: false,
        dtype: safetensors::Dtype::BF16,
        seed: 1,
    }
    .write(dir)?;
    Ok(())
}

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let layers = args.first().copied().unwrap_or(4);
    let seq = args.get(1).copied().unwrap_or(256);
    let tmp = tempfile::tempdir()?;
    write_model(tmp.path(), layers)?;
    println!("llama: {layers} layers, hidden {HIDDEN}, intermediate {INTER}, vocab {VOCAB}; batch 1 x seq {seq}; f32 compute; LoRA r=16 all-linear");
    println!(
        "{:<28} {:>12} {:>18} {:>14}",
        "base", "weights MiB", "fwd+bwd peak MiB", "over weights"
    );
    for (label, quant, ckpt) in [
        ("dense f32", None, false),
        ("dense f32 + checkpointing", None, true),
        ("nf4 (dq, 64)", Some(QuantConfig::default()), false),
        ("nf4 + checkpointing", Some(QuantConfig::default()), true),
    ] {
        let before = CURRENT.load(Ordering::Relaxed);
        let opts = LoadOptions {
            quant,
            dtype: DType::F32,
            device: Device::Cpu,
            gradient_checkpointing: ckpt,
        };
        let mut model = CausalLm::load(tmp.path(), &opts)?;
        model.add_lora(&LoraConfig::default(), 0)?;
        let weights = CURRENT.load(Ordering::Relaxed) - before;
        let ids: Vec<u32> = (0..seq as u32).map(|i| (i * 7919) % VOCAB as u32).collect();
        let ids = Tensor::from_vec(ids, (1, seq), &Device::Cpu)?;
        let labels = ids.to_dtype(DType::I64)?;
        let base = CURRENT.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let logits = model.forward(&ids, None, None)?;
        let loss = model.loss(&logits, &labels)?;
        drop(logits);
        let grads = model.backward(&loss)?;
        let peak = PEAK.load(Ordering::Relaxed);
        drop(grads);
        println!(
            "{label:<28} {:>12.1} {:>18.1} {:>14.1}",
            mib(weights),
            mib(peak - before),
            mib(peak - base)
        );
        drop(model);
    }
    Ok(())
}
