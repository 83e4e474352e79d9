//! The command line: engine commands (`quantize`, `train`, `eval`, `generate`, `merge`,
//! `bench`), the service (`serve`, `worker`) and the HTTP client of a running one (`jobs`, `files`). Each
//! command's clap arguments sit beside its code; [`run`] dispatches.

pub mod bench;
pub mod client;
pub mod eval;
pub mod generate;
pub mod merge;
pub mod quantize;
pub mod serve;
pub mod train;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::finetune::{FinetuneError, JobSpec, SpecError};

/// qlorad: QLoRA fine-tuning with bitsandbytes-exact 4-bit bases.
#[derive(Parser)]
#[command(name = "qlorad", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Quantize a Hugging Face model directory to a bitsandbytes 4-bit directory.
    Quantize(quantize::QuantizeCommand),
    /// Train a LoRA adapter on a dataset.
    Train {
        #[command(flatten)]
        args: train::TrainArgs,
        #[command(flatten)]
        spec: SpecArg,
    },
    /// Mean loss, tokens and token accuracy of a model (and adapter) on a dataset, as JSON.
    Eval(eval::EvalCommand),
    /// Complete a prompt with a model and optional adapter.
    Generate {
        #[command(flatten)]
        args: generate::GenerateArgs,
        #[command(flatten)]
        spec: SpecArg,
    },
    /// Merge an adapter into its base: a safetensors directory, GGUF files, a GGUF LoRA.
    Merge(merge::MergeCommand),
    /// Run the fine-tuning service: HTTP API, queue (SQLite, or PostgreSQL), workers.
    Serve(serve::ServeCommand),
    /// Run workers alone, claiming from the queue of --database-url (no HTTP).
    Worker(serve::WorkerCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Fine-tune jobs on a running service.
    Jobs {
        #[command(flatten)]
        remote: client::ServerArgs,
        #[command(subcommand)]
        command: client::JobsCommand,
    },
    /// Datasets on a running service.
    Files {
        #[command(flatten)]
        remote: client::ServerArgs,
        #[command(subcommand)]
        command: client::FilesCommand,
    },
}

/// Why a command failed; `main` prints it.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Finetune(Box<FinetuneError>),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Export(Box<crate::export::ExportError>),
    #[error("quantizing {path}: {source}")]
    Quantize {
        path: PathBuf,
        #[source]
        source: Box<crate::model::ModelError>,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Server(#[from] crate::server::ServeError),
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error(transparent)]
    Bench(#[from] crate::bench::BenchError),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Hub(#[from] crate::model::hub::HubError),
}

pub type Result<T> = std::result::Result<T, CliError>;

impl From<FinetuneError> for CliError {
    fn from(e: FinetuneError) -> Self {
        CliError::Finetune(Box::new(e))
    }
}

impl From<crate::export::ExportError> for CliError {
    fn from(e: crate::export::ExportError) -> Self {
        CliError::Export(Box::new(e))
    }
}

/// The job spec of an engine command: a file, or the defaults; `--device` overrides its device.
#[derive(clap::Args)]
pub struct SpecArg {
    /// A job spec (JSON, the same object as `POST /jobs`); defaults fill what it leaves out.
    #[arg(long)]
    spec: Option<PathBuf>,
    /// Device: cpu or cuda:N (overrides the spec's).
    #[arg(long)]
    device: Option<String>,
}

impl SpecArg {
    pub fn load(&self) -> Result<JobSpec> {
        let mut spec = match &self.spec {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| CliError::Io {
                    path: p.clone(),
                    source,
                })?;
                JobSpec::from_json(&text).map_err(|e| {
                    SpecError::new(&e.field, format!("{} (in {})", e.message, p.display()))
                })?
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().map_err(CliError::Runtime)
}

/// Run a parsed command line. A training run stopped by Ctrl-C exits with 130.
/// A `--model` argument: a local path as it is, or a Hugging Face Hub id (`org/name`,
/// `org/name@revision`, `org/name-GGUF:file.gguf`) fetched into the hub's own cache
/// (`HF_HUB_CACHE`, `HF_HOME/hub` or `~/.cache/huggingface/hub`) and loaded from there.
fn model_arg(arg: &Path) -> Result<PathBuf> {
    let hub_ref = arg
        .to_str()
        .filter(|_| !arg.exists())
        .and_then(crate::model::hub::HubRef::parse);
    let Some(r) = hub_ref else {
        return Ok(arg.to_path_buf());
    };
    let hub = crate::model::hub::Hub::from_env(crate::model::hub::Hub::default_cache());
    if hub.cached(&r).is_none() {
        eprintln!("fetching {r} into {}", hub.cache_dir().display());
    }
    let path = hub.fetch(&r, &mut |file, done, total| {
        if done == total {
            eprintln!("  {file}: {:.1} MB", total as f64 / 1e6);
        }
    })?;
    Ok(path)
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Quantize(c) => quantize::run(&c)?,
        Command::Train { mut args, spec } => {
            let spec = spec.load()?;
            args.model = model_arg(&args.model)?;
            if let crate::finetune::Outcome::Stopped { .. } = train::train(&args, &spec)? {
                return Ok(ExitCode::from(130));
            }
        }
        Command::Eval(mut c) => {
            c.model = model_arg(&c.model)?;
            println!("{}", eval::run(&c)?)
        }
        Command::Generate { mut args, spec } => {
            args.model = model_arg(&args.model)?;
            generate::generate(&args, &spec.load()?)?
        }
        Command::Merge(mut c) => {
            c.model = model_arg(&c.model)?;
            for path in merge::run(&c)? {
                println!("{}", path.display());
            }
        }
        Command::Serve(c) => serve::run(c)?,
        Command::Worker(c) => serve::run_worker(c)?,
        Command::Bench(c) => bench::run(c)?,
        Command::Jobs { remote, command } => {
            runtime()?.block_on(client::jobs(&remote.server, remote.key(), command))?
        }
        Command::Files { remote, command } => {
            runtime()?.block_on(client::files(&remote.server, remote.key(), command))?
        }
    }
    Ok(ExitCode::SUCCESS)
}
