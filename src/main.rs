//! `qlorad`: parse the command line, set up tracing, run the command.

use std::process::ExitCode;

use clap::Parser;
use qlorad::cli::{self, Cli};

fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    Ok(cli::run(Cli::parse())?)
}
