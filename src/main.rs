use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use qlorad::model::{quantize_model_dir, QuantizeOptions};
use qlorad::quant::{QuantConfig, QuantType};

/// qlorad: QLoRA fine-tuning with bitsandbytes-exact 4-bit bases.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Quantize a Hugging Face model directory to a bitsandbytes 4-bit directory.
    Quantize {
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
    },
}

fn parse_quant_type(s: &str) -> Result<QuantType, String> {
    s.parse()
        .map_err(|e: qlorad::quant::QuantError| e.to_string())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Quantize {
            model,
            out,
            quant,
            block_size,
            double_quant,
        } => {
            let options = QuantizeOptions {
                config: QuantConfig {
                    quant_type: quant,
                    block_size,
                    double_quant,
                },
            };
            let bar = ProgressBar::new(0).with_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {elapsed} {msg}")
                    .expect("static template"),
            );
            let report = quantize_model_dir(&model, &out, &options, |p| {
                bar.set_length(p.total as u64);
                bar.set_position(p.done as u64);
                bar.set_message(p.tensor.to_string());
            })
            .with_context(|| format!("quantizing {}", model.display()))?;
            bar.finish_and_clear();
            println!(
                "quantized {} linear weights, copied {} tensors: {:.1} MB -> {:.1} MB in {}",
                report.quantized,
                report.copied,
                report.bytes_in as f64 / 1e6,
                report.bytes_out as f64 / 1e6,
                out.display()
            );
        }
    }
    Ok(())
}
