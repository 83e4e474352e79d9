//! Runs one job on a dedicated thread: data, model, training (resuming from the job's newest
//! checkpoint), then the exports the spec asks for. Progress goes out over a bounded channel.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::data::{encode_dataset, EncodeOptions, TextTokenizer};
use crate::export::{export_all, MergeBase, Outputs};
use crate::train::{checkpoint, JobSpec, TrainEvent, TrainOutcome, Trainer, TrainerOptions};

/// Everything a run needs, resolved by the worker.
pub struct RunPlan {
    pub job_dir: PathBuf,
    pub model_dir: PathBuf,
    pub training_file: PathBuf,
    pub validation_file: Option<PathBuf>,
    pub spec: JobSpec,
}

/// What the run thread reports.
#[derive(Debug, Clone)]
pub enum RunMsg {
    Log {
        message: String,
        data: serde_json::Value,
    },
    Train(TrainEvent),
    Artifact {
        name: String,
        bytes: u64,
        sha256: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    Succeeded,
    /// Stopped by the cancel flag after writing a checkpoint.
    Stopped,
    Failed(String),
}

pub fn run(plan: &RunPlan, cancel: &AtomicBool, tx: &mpsc::Sender<RunMsg>) -> RunOutcome {
    match run_inner(plan, cancel, tx) {
        Ok(o) => o,
        Err(e) => {
            // A failed write (a full disk) leaves half-written checkpoints and exports behind:
            // remove them so they take no space and nothing mistakes them for complete ones.
            remove_partials(&plan.job_dir.join("run"));
            remove_partials(&plan.job_dir.join("artifacts"));
            RunOutcome::Failed(e)
        }
    }
}

/// Remove `*.partial` files and directories directly under `dir`.
fn remove_partials(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".partial") {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

fn send(tx: &mpsc::Sender<RunMsg>, m: RunMsg) {
    // The worker holds the receiver for the whole run; a send fails only if it is gone.
    let _ = tx.blocking_send(m);
}

fn run_inner(
    plan: &RunPlan,
    cancel: &AtomicBool,
    tx: &mpsc::Sender<RunMsg>,
) -> Result<RunOutcome, String> {
    let spec = &plan.spec;
    let run_dir = plan.job_dir.join("run");
    let tok = TextTokenizer::load(&plan.model_dir).map_err(|e| e.to_string())?;
    let opts = EncodeOptions {
        format: spec.data.format,
        max_seq_len: spec.hyperparameters.max_seq_len,
        train_on_prompt: spec.data.train_on_prompt,
    };
    let (train_set, summary) =
        encode_dataset(&plan.training_file, &tok, &opts).map_err(|e| e.to_string())?;
    send(
        tx,
        RunMsg::Log {
            message: "training data".into(),
            data: serde_json::to_value(&summary).unwrap_or_default(),
        },
    );
    let eval_set = match &plan.validation_file {
        Some(v) => Some(encode_dataset(v, &tok, &opts).map_err(|e| e.to_string())?.0),
        None => None,
    };
    let load = crate::model::llama::LoadOptions {
        quant: spec.quantization.config(),
        dtype: spec.quantization.dtype(),
        device: crate::model::parse_device(&spec.device)?,
        gradient_checkpointing: spec.hyperparameters.gradient_checkpointing,
    };
    let mut model =
        crate::model::llama::CausalLm::load(&plan.model_dir, &load).map_err(|e| e.to_string())?;
    let lora = spec.lora.config();
    model
        .add_lora(&lora, spec.hyperparameters.seed)
        .map_err(|e| e.to_string())?;
    let topts = TrainerOptions {
        hyper: spec.hyperparameters.clone(),
        lora: lora.clone(),
        shuffle: true,
        group_by_length: spec.data.group_by_length,
        eval_every: spec.eval_every,
        checkpoint_every: spec.checkpoint_every,
        keep_checkpoints: spec.keep_checkpoints,
        out_dir: Some(run_dir.clone()),
        base_model: spec.model.clone(),
    };
    let mut trainer = Trainer::new(&model, &train_set, eval_set.as_deref(), tok.pad_id, topts)
        .map_err(|e| e.to_string())?;
    if let Some(dir) = checkpoint::latest(&run_dir) {
        trainer.resume_from(&dir).map_err(|e| e.to_string())?;
        send(
            tx,
            RunMsg::Log {
                message: format!("resumed from checkpoint at step {}", trainer.state.step),
                data: serde_json::json!({"step": trainer.state.step}),
            },
        );
    }
    let outcome = trainer
        .run(cancel, &mut |e| send(tx, RunMsg::Train(e.clone())))
        .map_err(|e| e.to_string())?;
    if let TrainOutcome::Cancelled { .. } = outcome {
        return Ok(RunOutcome::Stopped);
    }
    let artifacts = plan.job_dir.join("artifacts");
    copy_dir(&run_dir.join("adapter"), &artifacts.join("adapter"))
        .map_err(|e| format!("copying the adapter: {e}"))?;
    let gguf = spec
        .export
        .gguf
        .iter()
        .map(|t| t.parse())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{e}"))?;
    if !gguf.is_empty() || spec.export.gguf_lora || spec.export.merged_safetensors {
        let outputs = Outputs {
            gguf,
            gguf_lora: spec.export.gguf_lora,
            safetensors: spec.export.merged_safetensors,
            merge_base: MergeBase::Original,
        };
        send(
            tx,
            RunMsg::Log {
                message: "exporting".into(),
                data: serde_json::json!({}),
            },
        );
        export_all(
            &plan.model_dir,
            Some(&run_dir.join("adapter")),
            &artifacts,
            &outputs,
            &mut |_, _, _| {},
        )
        .map_err(|e| format!("export: {e}"))?;
    }
    for (name, path) in list_files(&artifacts, &artifacts) {
        let (bytes, sha256) = digest(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        send(
            tx,
            RunMsg::Artifact {
                name,
                bytes,
                sha256,
            },
        );
    }
    Ok(RunOutcome::Succeeded)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let tmp = to.join(format!(".{}.partial", e.file_name().to_string_lossy()));
        std::fs::copy(e.path(), &tmp)?;
        std::fs::rename(&tmp, to.join(e.file_name()))?;
    }
    Ok(())
}

/// Complete files under `dir` (no partial or hidden names), as (relative name, path).
pub fn list_files(root: &Path, dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.ends_with(".partial") {
            continue;
        }
        let path = e.path();
        if path.is_dir() {
            out.extend(list_files(root, &path));
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push((rel.to_string_lossy().replace('\\', "/"), path.clone()));
        }
    }
    out.sort();
    out
}

fn digest(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h)?;
    Ok((n, format!("{:x}", h.finalize())))
}

pub fn new_cancel() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}
