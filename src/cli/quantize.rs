//! `qlorad quantize`: a Hugging Face model directory to a bitsandbytes 4-bit directory.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};

use super::{CliError, Result};
use crate::model::{quantize_model_dir, QuantizeOptions};
use crate::quant::{QuantConfig, QuantType};

#[derive(clap::Args)]
pub struct QuantizeCommand {
    /// The model directory (config.json and safetensors, single or sharded).
    #[arg(long)]
    model: PathBuf,
    /// Where to write the quantized model (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    /// 4-bit data type.
    #[arg(long, default_value = "nf4", value_parser = parse_quant_type)]
    quant: QuantType,
    /// Elements per absmax block: 32, 64, ..., 4096.
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// Quantize the absmax values to 8 bits as well.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    double_quant: bool,
}

pub(crate) fn parse_quant_type(s: &str) -> std::result::Result<QuantType, String> {
    s.parse()
        .map_err(|e: crate::quant::QuantError| e.to_string())
}

pub fn run(c: &QuantizeCommand) -> Result<()> {
    let options = QuantizeOptions {
        config: QuantConfig {
            quant_type: c.quant,
            block_size: c.block_size,
            double_quant: c.double_quant,
        },
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {elapsed} {msg}")
            .expect("static template"),
    );
    let report = quantize_model_dir(&c.model, &c.out, &options, |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(p.tensor.to_string());
    })
    .map_err(|source| CliError::Quantize {
        path: c.model.clone(),
        source: Box::new(source),
    })?;
    bar.finish_and_clear();
    println!(
        "quantized {} linear weights, copied {} tensors: {:.1} MB -> {:.1} MB in {}",
        report.quantized,
        report.copied,
        report.bytes_in as f64 / 1e6,
        report.bytes_out as f64 / 1e6,
        c.out.display()
    );
    Ok(())
}
