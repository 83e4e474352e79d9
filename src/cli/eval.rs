//! `qlorad eval`: mean loss, tokens and token accuracy of a model (and adapter) on a dataset,
//! masked as in training.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::{Result, SpecArg};
use crate::data::{encode_dataset, TextTokenizer};
use crate::finetune::{encode_options, load_model, FinetuneError, JobSpec};
use crate::train::evaluate;

#[derive(clap::Args)]
pub struct EvalCommand {
    #[arg(long)]
    pub(super) model: PathBuf,
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    spec: SpecArg,
}

pub fn run(c: &EvalCommand) -> Result<serde_json::Value> {
    Ok(eval(
        &c.model,
        c.adapter.as_deref(),
        &c.data,
        &c.spec.load()?,
    )?)
}

/// Mean loss, tokens and token accuracy over a dataset.
pub fn eval(
    model_dir: &Path,
    adapter: Option<&Path>,
    data: &Path,
    spec: &JobSpec,
) -> std::result::Result<serde_json::Value, FinetuneError> {
    let tok = TextTokenizer::load(model_dir)?;
    let (examples, summary) = encode_dataset(data, &tok, &encode_options(spec))?;
    let mut model = load_model(model_dir, spec)?;
    if let Some(a) = adapter {
        model.load_adapter(a)?;
    }
    let r = evaluate(
        &model,
        &examples,
        spec.hyperparameters.batch_size,
        tok.pad_id,
    )?;
    Ok(
        json!({"loss": r.loss, "tokens": r.tokens, "accuracy": r.accuracy, "examples": summary.examples}),
    )
}
