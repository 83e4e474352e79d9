use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use qlorad::commands::{self, BenchArgs, GenerateArgs, TrainArgs};
use qlorad::export::{GgufType, MergeBase};
use qlorad::model::{quantize_model_dir, QuantizeOptions};
use qlorad::quant::{QuantConfig, QuantType};
use qlorad::train::{JobSpec, TrainOutcome};

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
    /// Train a LoRA adapter on a dataset.
    Train {
        /// The base model directory.
        #[arg(long)]
        model: PathBuf,
        /// Training data: JSONL or a JSON array (alpaca, chat, sharegpt, completion or text).
        #[arg(long)]
        data: PathBuf,
        /// Validation data, evaluated every `eval_every` steps and at the end.
        #[arg(long)]
        validation: Option<PathBuf>,
        /// Output directory: checkpoint-<step>/, adapter/, metrics.jsonl, spec.json.
        #[arg(long)]
        out: PathBuf,
        /// Continue from the newest checkpoint in --out.
        #[arg(long)]
        resume: bool,
        /// Start from an existing PEFT adapter instead of a fresh one.
        #[arg(long)]
        init_adapter: Option<PathBuf>,
        #[command(flatten)]
        spec: SpecArg,
    },
    /// Mean loss, tokens and token accuracy of a model (and adapter) on a dataset, as JSON.
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        data: PathBuf,
        #[command(flatten)]
        spec: SpecArg,
    },
    /// Complete a prompt with a model and optional adapter.
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        spec: SpecArg,
    },
    /// Merge an adapter into its base: a safetensors directory, GGUF files, a GGUF LoRA.
    Merge {
        /// The base model directory.
        #[arg(long)]
        model: PathBuf,
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
    },
    /// Run the fine-tuning service: HTTP API, SQLite queue, workers.
    Serve {
        /// A TOML file layered over the embedded defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on (e.g. 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<String>,
        /// Database, files, checkpoints and artifacts.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// A directory of base models (repeatable).
        #[arg(long)]
        model_root: Vec<PathBuf>,
        /// Workers, one per device: cpu,cuda:0,...
        #[arg(long, value_delimiter = ',')]
        workers: Option<Vec<String>>,
        /// API keys, one a line: NAME:SECRET or NAME:sha256:HEX, `:admin` at the end for a key
        /// that sees everything.
        #[arg(long)]
        api_keys_file: Option<PathBuf>,
        /// Serve without API keys on an address other than loopback.
        #[arg(long)]
        allow_anonymous: bool,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Fine-tune jobs on a running service.
    Jobs {
        /// The service's URL.
        #[arg(long, global = true, default_value = DEFAULT_SERVER)]
        server: String,
        /// The API key (default: the QLORAD_API_KEY environment variable).
        #[arg(long, global = true)]
        api_key: Option<String>,
        #[command(subcommand)]
        command: qlorad::client::JobsCommand,
    },
    /// Datasets on a running service.
    Files {
        /// The service's URL.
        #[arg(long, global = true, default_value = DEFAULT_SERVER)]
        server: String,
        /// The API key (default: the QLORAD_API_KEY environment variable).
        #[arg(long, global = true)]
        api_key: Option<String>,
        #[command(subcommand)]
        command: qlorad::client::FilesCommand,
    },
}

const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

#[derive(clap::Args)]
struct SpecArg {
    /// A job spec (JSON, the same object as `POST /jobs`); defaults fill what it leaves out.
    #[arg(long)]
    spec: Option<PathBuf>,
    /// Device: cpu or cuda:N (overrides the spec's).
    #[arg(long)]
    device: Option<String>,
}

impl SpecArg {
    fn load(&self) -> anyhow::Result<JobSpec> {
        let mut spec = match &self.spec {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                JobSpec::from_json(&text).with_context(|| format!("in {}", p.display()))?
            }
            None => JobSpec::default(),
        };
        if let Some(d) = &self.device {
            spec.device = d.clone();
        }
        spec.validate()?;
        Ok(spec)
    }
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Training throughput on random tokens: tokens/s, step time, approximate TFLOP/s.
    Train {
        /// A model directory; a random 4-layer Llama (hidden 512) when absent.
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// Timed steps (after two warm-up steps).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Attribute the step time to kernel groups, synchronizing around each (slower steps).
        #[arg(long)]
        profile: bool,
        /// Bracket the first timed step with cuProfilerStart/Stop, for an external profiler
        /// run with --profile-from-start off (ncu, nsys).
        #[arg(long)]
        profiler_range: bool,
        #[command(flatten)]
        spec: SpecArg,
    },
    /// The 4-bit kernels on a device: quantize and dequantize checked bit for bit against the
    /// CPU, dequantization bandwidth against a plain copy, fused ops against the CPU.
    Kernels {
        /// cpu or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Rows of the test weight (columns: 4096).
        #[arg(long, default_value_t = 14336)]
        rows: usize,
        #[arg(long, default_value_t = 4096)]
        cols: usize,
        /// Timed repetitions (the median is reported).
        #[arg(long, default_value_t = 20)]
        iters: usize,
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
        Command::Train {
            model,
            data,
            validation,
            out,
            resume,
            init_adapter,
            spec,
        } => {
            let spec = spec.load()?;
            let args = TrainArgs {
                model,
                data,
                validation,
                out,
                resume,
                init_adapter,
            };
            if let TrainOutcome::Cancelled { .. } = commands::train(&args, &spec)? {
                std::process::exit(130);
            }
        }
        Command::Eval {
            model,
            adapter,
            data,
            spec,
        } => {
            let r = commands::eval(&model, adapter.as_deref(), &data, &spec.load()?)?;
            println!("{r}");
        }
        Command::Generate {
            model,
            adapter,
            prompt,
            chat,
            max_tokens,
            temperature,
            seed,
            spec,
        } => {
            let args = GenerateArgs {
                model,
                adapter,
                prompt,
                chat,
                max_tokens,
                temperature,
                seed,
            };
            println!("{}", commands::generate(&args, &spec.load()?)?);
        }
        Command::Merge {
            model,
            adapter,
            out,
            gguf,
            gguf_lora,
            safetensors,
            merge_base,
            quant,
            block_size,
        } => {
            let gguf = gguf
                .iter()
                .map(|t| t.parse())
                .collect::<Result<Vec<GgufType>, _>>()?;
            let merge_base = if merge_base == "quantized" {
                MergeBase::Quantized(QuantConfig {
                    quant_type: quant,
                    block_size,
                    double_quant: true,
                })
            } else {
                MergeBase::Original
            };
            let args = commands::MergeArgs {
                model,
                adapter,
                out,
                gguf,
                gguf_lora,
                safetensors,
                merge_base,
            };
            for path in commands::merge(&args)? {
                println!("{}", path.display());
            }
        }
        Command::Serve {
            config,
            listen,
            data_dir,
            model_root,
            workers,
            api_keys_file,
            allow_anonymous,
        } => {
            let overrides = qlorad::config::Overrides {
                listen,
                data_dir,
                model_roots: model_root,
                workers,
                api_keys_file,
                allow_anonymous_remote: allow_anonymous,
            };
            let cfg =
                qlorad::config::Config::load(config.as_deref(), std::env::vars(), &overrides)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let token = qlorad::server::signal_token();
                qlorad::server::serve(cfg, token).await
            })?;
        }
        Command::Jobs {
            server,
            api_key,
            command,
        } => {
            let key = api_key.or_else(|| std::env::var("QLORAD_API_KEY").ok());
            tokio::runtime::Runtime::new()?
                .block_on(qlorad::client::jobs(&server, key, command))?;
        }
        Command::Files {
            server,
            api_key,
            command,
        } => {
            let key = api_key.or_else(|| std::env::var("QLORAD_API_KEY").ok());
            tokio::runtime::Runtime::new()?
                .block_on(qlorad::client::files(&server, key, command))?;
        }
        Command::Bench(BenchCommand::Train {
            model,
            seq_len,
            batch_size,
            steps,
            profile,
            profiler_range,
            spec,
        }) => {
            let args = BenchArgs {
                model,
                seq_len,
                batch_size,
                steps: steps.max(1),
                spec: spec.load()?,
                profile,
                profiler_range,
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&commands::bench_train(&args)?)?
            );
        }
        Command::Bench(BenchCommand::Kernels {
            device,
            rows,
            cols,
            iters,
        }) => {
            let dev = qlorad::model::parse_device(&device).map_err(anyhow::Error::msg)?;
            let report = qlorad::bench::bench_kernels(&dev, rows, cols, iters.max(1))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}
