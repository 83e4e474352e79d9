//! `qlorad serve`: the fine-tuning service (HTTP API, SQLite queue, workers) from the embedded
//! defaults, a config file, `QLORAD_*` variables and these flags, in that order.

use std::path::PathBuf;

use super::{runtime, Result};
use crate::config::{Config, Overrides};

#[derive(clap::Args)]
pub struct ServeCommand {
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
    /// A webhook endpoint told when jobs succeed, fail or are cancelled (with --webhook-secret;
    /// more in the config's `[[webhooks]]`).
    #[arg(long, requires = "webhook_secret")]
    webhook_url: Option<String>,
    /// Its signing secret, `whsec_…`.
    #[arg(long, requires = "webhook_url")]
    webhook_secret: Option<String>,
}

pub fn run(c: ServeCommand) -> Result<()> {
    let overrides = Overrides {
        listen: c.listen,
        data_dir: c.data_dir,
        model_roots: c.model_root,
        workers: c.workers,
        api_keys_file: c.api_keys_file,
        allow_anonymous_remote: c.allow_anonymous,
        webhook: c.webhook_url.zip(c.webhook_secret),
    };
    let cfg = Config::load(c.config.as_deref(), std::env::vars(), &overrides)?;
    runtime()?.block_on(async {
        let token = crate::server::signal_token();
        crate::server::serve(cfg, token).await
    })?;
    Ok(())
}
