//! `qlorad serve`: the fine-tuning service (HTTP API, queue, workers), and `qlorad worker`:
//! workers alone against the same database and storage. Both layer the embedded defaults, a
//! config file, `QLORAD_*` variables and these flags, in that order.

use std::path::PathBuf;

use super::{runtime, Result};
use crate::config::{Config, Overrides};

/// What an API process and a worker process share: where the queue and the files are, the
/// models, the workers.
#[derive(clap::Args)]
pub struct ProcessArgs {
    /// A TOML file layered over the embedded defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Files, checkpoints and artifacts (and the SQLite database without --database-url).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The queue's database: postgres://user:pass@host/db, shared by every process and host.
    #[arg(long)]
    database_url: Option<String>,
    /// Files, checkpoints and artifacts in s3://bucket/prefix, shared by every host
    /// (credentials and endpoint from AWS_*).
    #[arg(long)]
    object_store: Option<String>,
    /// A directory of base models (repeatable).
    #[arg(long)]
    model_root: Vec<PathBuf>,
    /// Workers, one per device: cpu,cuda:0,... or `none`.
    #[arg(long, value_delimiter = ',')]
    workers: Option<Vec<String>>,
}

impl ProcessArgs {
    fn overrides(self) -> (Option<PathBuf>, Overrides) {
        let overrides = Overrides {
            data_dir: self.data_dir,
            database_url: self.database_url,
            object_store: self.object_store,
            model_roots: self.model_root,
            workers: self.workers,
            ..Default::default()
        };
        (self.config, overrides)
    }
}

#[derive(clap::Args)]
pub struct ServeCommand {
    #[command(flatten)]
    process: ProcessArgs,
    /// Address to listen on (e.g. 127.0.0.1:8080).
    #[arg(long)]
    listen: Option<String>,
    /// API keys, one a line: NAME:SECRET or NAME:sha256:HEX, `:admin` at the end for a key
    /// that sees everything.
    #[arg(long)]
    api_keys_file: Option<PathBuf>,
    /// Serve without API keys on an address other than loopback.
    #[arg(long)]
    allow_anonymous: bool,
    /// A webhook endpoint told when jobs succeed, fail or are cancelled (with --webhook-secret;
    /// more in the config's `[[webhooks]]`).
    #[arg(long, requires = "webhook_secret")]
    webhook_url: Option<String>,
    /// Its signing secret, `whsec_…`.
    #[arg(long, requires = "webhook_url")]
    webhook_secret: Option<String>,
}

#[derive(clap::Args)]
pub struct WorkerCommand {
    #[command(flatten)]
    process: ProcessArgs,
}

pub fn run(c: ServeCommand) -> Result<()> {
    let (file, mut overrides) = c.process.overrides();
    overrides.listen = c.listen;
    overrides.api_keys_file = c.api_keys_file;
    overrides.allow_anonymous_remote = c.allow_anonymous;
    overrides.webhook = c.webhook_url.zip(c.webhook_secret);
    let cfg = Config::load(file.as_deref(), std::env::vars(), &overrides)?;
    runtime()?.block_on(async {
        let token = crate::server::signal_token();
        crate::server::serve(cfg, token).await
    })?;
    Ok(())
}

pub fn run_worker(c: WorkerCommand) -> Result<()> {
    let (file, overrides) = c.process.overrides();
    let cfg = Config::load(file.as_deref(), std::env::vars(), &overrides)?;
    runtime()?.block_on(async {
        let token = crate::server::signal_token();
        crate::server::work(cfg, token).await
    })?;
    Ok(())
}
