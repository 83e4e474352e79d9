//! `qlorad merge`: an adapter merged into its base, written as a Hugging Face safetensors
//! directory, GGUF files and/or the adapter alone as a GGUF LoRA.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};

use super::{quantize::parse_quant_type, CliError, Result};
use crate::export::{GgufType, MergeBase, Outputs};
use crate::quant::{QuantConfig, QuantType};

#[derive(clap::Args)]
pub struct MergeCommand {
    /// The base model directory.
    #[arg(long)]
    pub(super) model: PathBuf,
    /// A PEFT adapter directory (e.g. runs/first/adapter).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// GGUF types to write, comma-separated: f32, f16, bf16, q8_0, q4_0, q4_k_m.
    #[arg(long, value_delimiter = ',')]
    gguf: Vec<String>,
    /// Also write the adapter alone as a GGUF LoRA (llama.cpp --lora).
    #[arg(long)]
    gguf_lora: bool,
    /// Write the merged model as a Hugging Face safetensors directory (OUT/merged).
    #[arg(long)]
    safetensors: bool,
    /// Merge into the original weights, or into the 4-bit weights the adapter trained against.
    #[arg(long, default_value = "original", value_parser = ["original", "quantized"])]
    merge_base: String,
    /// 4-bit type of --merge-base quantized.
    #[arg(long, default_value = "nf4", value_parser = parse_quant_type)]
    quant: QuantType,
    #[arg(long, default_value_t = 64)]
    block_size: usize,
}

/// Write the requested files under `out`; returns their paths.
pub fn run(c: &MergeCommand) -> Result<Vec<PathBuf>> {
    let gguf = c
        .gguf
        .iter()
        .map(|t| t.parse())
        .collect::<std::result::Result<Vec<GgufType>, _>>()
        .map_err(|e| CliError::Usage(format!("--gguf: {e}")))?;
    let merge_base = if c.merge_base == "quantized" {
        MergeBase::Quantized(QuantConfig {
            quant_type: c.quant,
            block_size: c.block_size,
            double_quant: true,
        })
    } else {
        MergeBase::Original
    };
    let outputs = Outputs {
        gguf,
        gguf_lora: c.gguf_lora,
        safetensors: c.safetensors,
        merge_base,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("static template"),
    );
    let written = crate::export::export_all(
        &c.model,
        c.adapter.as_deref(),
        &c.out,
        &outputs,
        &mut |done, total, what| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(what.to_string());
        },
    )?;
    bar.finish_and_clear();
    Ok(written)
}
