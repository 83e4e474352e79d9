//! The run of one fine-tune job: tokenizer, datasets, the model with its adapter (fresh, or an
//! existing one to continue from), the trainer (resuming from the newest checkpoint when asked),
//! then the adapter and the exports the spec asks for, each reported with its size and sha256.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use sha2::{Digest, Sha256};

use super::{io_err, JobSpec, Result, SpecError};
use crate::data::pack::PackingSummary;
use crate::data::{encode_dataset, DatasetSummary, EncodeOptions, TextTokenizer};
use crate::export::{export_all, MergeBase, Outputs};
use crate::model::llama::{CausalLm, LoadOptions};
use crate::train::{checkpoint, TrainEvent, TrainOutcome, Trainer, TrainerOptions};

/// Everything a run needs, resolved by its caller (the command line or a worker).
#[derive(Debug, Clone)]
pub struct Plan {
    pub spec: JobSpec,
    pub model_dir: PathBuf,
    pub training_file: PathBuf,
    pub validation_file: Option<PathBuf>,
    /// Checkpoints, `metrics` and the trained `adapter/` (the trainer's directory).
    pub run_dir: PathBuf,
    /// Where the finished adapter and the exports go; may be `run_dir` itself.
    pub artifacts_dir: PathBuf,
    /// Continue training this PEFT adapter instead of a fresh one.
    pub init_adapter: Option<PathBuf>,
    /// Resume from the newest checkpoint in `run_dir` when there is one.
    pub resume: bool,
    /// Recorded as `base_model_name_or_path` in saved adapters.
    pub base_model_name: Option<String>,
}

/// Which dataset a [`RunEvent::Data`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Training,
    Validation,
}

/// What a run reports as it goes.
#[derive(Debug, Clone)]
pub enum RunEvent {
    /// A dataset was read, checked and tokenized.
    Data {
        split: Split,
        summary: DatasetSummary,
    },
    /// The training set packed into rows: how many, how full.
    Packed(PackingSummary),
    /// Training continues from a checkpoint.
    Resumed {
        step: usize,
        checkpoint: PathBuf,
    },
    Train(TrainEvent),
    /// Training finished; the exports are being written.
    Exporting,
    /// A complete file under `artifacts_dir` (name relative to it).
    Artifact {
        name: String,
        bytes: u64,
        sha256: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Trained to the end; the adapter and exports are written.
    Finished { step: usize },
    /// Stopped by the cancel flag after writing a checkpoint.
    Stopped { step: usize },
}

/// The encoding of a spec's datasets.
pub fn encode_options(spec: &JobSpec) -> EncodeOptions {
    EncodeOptions {
        format: spec.data.format,
        max_seq_len: spec.hyperparameters.max_seq_len,
        train_on_prompt: spec.data.train_on_prompt,
        bos: spec.data.bos,
    }
}

/// Load a spec's base model: its quantization, compute dtype, device and checkpointing.
pub fn load_model(model_dir: &Path, spec: &JobSpec) -> Result<CausalLm> {
    let device = crate::model::parse_device(&spec.device)
        .map_err(|message| SpecError::new("device", message))?;
    let opts = LoadOptions {
        quant: spec.quantization.config(),
        dtype: spec.quantization.dtype(),
        device,
        gradient_checkpointing: spec.hyperparameters.gradient_checkpointing,
    };
    Ok(CausalLm::load(model_dir, &opts)?)
}

/// Run a job to its end or to the cancel flag. A failed run removes the half-written files it
/// leaves (`*.partial` checkpoints and exports), so nothing mistakes them for complete ones.
pub fn run(
    plan: &Plan,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(&RunEvent),
) -> Result<Outcome> {
    let result = run_inner(plan, cancel, on_event);
    if result.is_err() {
        remove_partials(&plan.run_dir);
        remove_partials(&plan.artifacts_dir);
    }
    result
}

fn run_inner(
    plan: &Plan,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(&RunEvent),
) -> Result<Outcome> {
    let spec = &plan.spec;
    let tok = TextTokenizer::load(&plan.model_dir)?;
    let opts = encode_options(spec);
    let (train_set, summary) = encode_dataset(&plan.training_file, &tok, &opts)?;
    on_event(&RunEvent::Data {
        split: Split::Training,
        summary,
    });
    let eval_set = match &plan.validation_file {
        Some(v) => {
            let (set, summary) = encode_dataset(v, &tok, &opts)?;
            on_event(&RunEvent::Data {
                split: Split::Validation,
                summary,
            });
            Some(set)
        }
        None => None,
    };
    let mut model = load_model(&plan.model_dir, spec)?;
    let lora = match &plan.init_adapter {
        Some(dir) => model.load_adapter(dir)?,
        None => {
            let cfg = spec.lora.config();
            model.add_lora(&cfg, spec.hyperparameters.seed)?;
            cfg
        }
    };
    std::fs::create_dir_all(&plan.run_dir).map_err(io_err(&plan.run_dir))?;
    let topts = TrainerOptions {
        hyper: spec.hyperparameters.clone(),
        lora,
        shuffle: true,
        group_by_length: spec.data.group_by_length,
        eval_every: spec.eval_every,
        checkpoint_every: spec.checkpoint_every,
        keep_checkpoints: spec.keep_checkpoints,
        out_dir: Some(plan.run_dir.clone()),
        base_model: plan.base_model_name.clone(),
        packing: spec.data.packing,
        early_stopping: spec.early_stopping,
        load_best: spec.load_best,
    };
    let mut trainer = Trainer::new(&model, &train_set, eval_set.as_deref(), tok.pad_id, topts)?;
    if let Some(summary) = trainer.packing() {
        on_event(&RunEvent::Packed(summary));
    }
    if let Some(dir) = checkpoint::latest(&plan.run_dir).filter(|_| plan.resume) {
        trainer.resume_from(&dir)?;
        on_event(&RunEvent::Resumed {
            step: trainer.state.step,
            checkpoint: dir,
        });
    }
    let outcome = trainer.run(cancel, &mut |e| on_event(&RunEvent::Train(e.clone())))?;
    let step = match outcome {
        TrainOutcome::Cancelled { step } => return Ok(Outcome::Stopped { step }),
        TrainOutcome::Finished { step } => step,
    };
    export(plan, on_event)?;
    Ok(Outcome::Finished { step })
}

/// The trained adapter and the spec's exports under `artifacts_dir`, each file reported.
fn export(plan: &Plan, on_event: &mut dyn FnMut(&RunEvent)) -> Result<()> {
    let spec = &plan.spec;
    let trained = plan.run_dir.join("adapter");
    let adapter = plan.artifacts_dir.join("adapter");
    if adapter != trained {
        copy_dir(&trained, &adapter).map_err(io_err(&adapter))?;
    }
    let mut written = vec![adapter];
    let gguf = spec
        .export
        .gguf
        .iter()
        .map(|t| t.parse())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| SpecError::new("export.gguf", format!("{e}")))?;
    if !gguf.is_empty() || spec.export.gguf_lora || spec.export.merged_safetensors {
        let outputs = Outputs {
            gguf,
            gguf_lora: spec.export.gguf_lora,
            safetensors: spec.export.merged_safetensors,
            merge_base: MergeBase::Original,
        };
        on_event(&RunEvent::Exporting);
        written.extend(export_all(
            &plan.model_dir,
            Some(&trained),
            &plan.artifacts_dir,
            &outputs,
            &mut |_, _, _| {},
        )?);
    }
    let mut files: Vec<(String, PathBuf)> = written
        .iter()
        .flat_map(|p| {
            if p.is_dir() {
                list_files(&plan.artifacts_dir, p)
            } else {
                relative(&plan.artifacts_dir, p).into_iter().collect()
            }
        })
        .collect();
    files.sort();
    files.dedup();
    for (name, path) in files {
        let (bytes, sha256) = digest(&path).map_err(io_err(&path))?;
        on_event(&RunEvent::Artifact {
            name,
            bytes,
            sha256,
        });
    }
    Ok(())
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

fn relative(root: &Path, path: &Path) -> Option<(String, PathBuf)> {
    let rel = path.strip_prefix(root).ok()?;
    Some((rel.to_string_lossy().replace('\\', "/"), path.to_path_buf()))
}

/// Complete files under `dir` (no partial or hidden names), as (name relative to `root`, path).
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
        } else {
            out.extend(relative(root, &path));
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
