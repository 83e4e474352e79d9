//! The run of one fine-tune job: tokenizer, datasets, the model with its adapter (fresh, or an
//! existing one to continue from), the trainer (resuming from the newest checkpoint when asked),
//! then the adapter and the exports the spec asks for, each reported with its size and sha256.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use sha2::{Digest, Sha256};

use super::{io_err, JobSpec, Result, SpecError};
use crate::data::pack::PackingSummary;
use crate::data::{
    encode_dataset, encode_preferences, DatasetSummary, EncodeOptions, Example, TextTokenizer,
};
use crate::export::{export_all, MergeBase, Outputs};
use crate::model::llama::{CausalLm, LoadOptions};
use crate::train::dpo::References;
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

/// One eval prompt and what the model answered.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SampleAnswer {
    pub messages: Vec<crate::data::Message>,
    pub answer: String,
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
    /// DPO's reference log-probabilities of `pairs` pairs (training and validation) are ready:
    /// computed from the starting model, or read from the run's earlier start.
    Reference {
        pairs: usize,
        computed: bool,
    },
    /// The model's greedy answers to the spec's `eval_prompts`, in order, at `step`.
    Samples {
        step: usize,
        samples: Vec<SampleAnswer>,
    },
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
    let data = Datasets::read(plan, &tok, on_event)?;
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
    let mut trainer = Trainer::new(&model, &data.train, data.eval.as_deref(), tok.pad_id, topts)?;
    if let (Some(cfg), Some(rejected)) = (spec.method.dpo(), &data.rejected) {
        // The reference is the model as the job first started: computed once and kept with
        // the run, so a resumed job neither recomputes it nor drifts from it.
        let path = plan.run_dir.join(REFERENCE_FILE);
        let fingerprint = data.fingerprint();
        let stored = read_references(&path, &fingerprint);
        let computed = stored.is_none();
        trainer = trainer.with_preferences(cfg, rejected, data.eval_rejected.as_deref(), stored)?;
        let refs = trainer.references().expect("set above");
        if computed {
            write_references(&path, &fingerprint, refs)?;
        }
        on_event(&RunEvent::Reference {
            pairs: refs.train.chosen.len() + refs.eval.as_ref().map_or(0, |r| r.chosen.len()),
            computed,
        });
    }
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
    // The eval prompts' answers at every evaluation, or at the end without a validation set.
    let sample_at = |e: &TrainEvent| match e {
        TrainEvent::Eval { step, .. } => Some(*step),
        TrainEvent::Finished { step, .. } if data.eval.is_none() => Some(*step),
        _ => None,
    };
    // The scalars as TensorBoard event files beside the checkpoints, a file per start.
    let board_dir = plan.run_dir.join(TENSORBOARD_DIR);
    let mut board = Some(
        super::tensorboard::EventWriter::create(&board_dir, wall_time())
            .map_err(io_err(&board_dir))?,
    );
    let outcome = trainer.run(cancel, &mut |e| {
        on_event(&RunEvent::Train(e.clone()));
        let scalars = super::tensorboard::scalars_of(e);
        if let (Some(w), false) = (board.as_mut(), scalars.is_empty()) {
            let t = wall_time();
            let written = scalars
                .iter()
                .try_for_each(|(tag, step, v)| w.scalar(tag, *step, *v, t))
                .and_then(|()| w.flush());
            if let Err(e) = written {
                tracing::warn!(error = %e, "writing the TensorBoard events failed; no more are written");
                board = None;
            }
        }
        if let Some(step) = sample_at(e).filter(|_| !spec.eval_prompts.is_empty()) {
            match crate::infer::answer_chats(&model, &tok, &spec.eval_prompts, SAMPLE_TOKENS) {
                Ok(answers) => {
                    let samples = spec
                        .eval_prompts
                        .iter()
                        .zip(answers)
                        .map(|(m, answer)| SampleAnswer {
                            messages: m.clone(),
                            answer,
                        })
                        .collect();
                    on_event(&RunEvent::Samples { step, samples })
                }
                Err(e) => tracing::warn!(error = %e, "answering the eval prompts failed"),
            }
        }
    })?;
    let step = match outcome {
        TrainOutcome::Cancelled { step } => return Ok(Outcome::Stopped { step }),
        TrainOutcome::Finished { step } => step,
    };
    export(plan, on_event)?;
    Ok(Outcome::Finished { step })
}

/// The run's TensorBoard log directory, under `run_dir` and then under `artifacts_dir`.
pub const TENSORBOARD_DIR: &str = "tensorboard";

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A run's examples: supervised ones, or with DPO each pair's chosen side in `train` and
/// `eval` and its rejected side, index for index, in `rejected` and `eval_rejected`.
struct Datasets {
    train: Vec<Example>,
    eval: Option<Vec<Example>>,
    rejected: Option<Vec<Example>>,
    eval_rejected: Option<Vec<Example>>,
}

impl Datasets {
    /// Read, check and tokenize the plan's files, reporting each.
    fn read(
        plan: &Plan,
        tok: &TextTokenizer,
        on_event: &mut dyn FnMut(&RunEvent),
    ) -> Result<Datasets> {
        let spec = &plan.spec;
        let opts = encode_options(spec);
        let dpo = spec.method.dpo().is_some();
        let mut read = |path: &Path, split| -> Result<(Vec<Example>, Option<Vec<Example>>)> {
            let (chosen, rejected, summary) = if dpo {
                let (pairs, summary) = encode_preferences(path, tok, &opts)?;
                let (c, r) = pairs.into_iter().map(|p| (p.chosen, p.rejected)).unzip();
                (c, Some(r), summary)
            } else {
                let (set, summary) = encode_dataset(path, tok, &opts)?;
                (set, None, summary)
            };
            on_event(&RunEvent::Data { split, summary });
            Ok((chosen, rejected))
        };
        let (train, rejected) = read(&plan.training_file, Split::Training)?;
        let (eval, eval_rejected) = match &plan.validation_file {
            Some(v) => {
                let (e, r) = read(v, Split::Validation)?;
                (Some(e), r)
            }
            None => (None, None),
        };
        Ok(Datasets {
            train,
            eval,
            rejected,
            eval_rejected,
        })
    }

    /// A digest of every token of every example, in order: what the stored reference
    /// log-probabilities were computed for.
    fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        let sets = [
            Some(self.train.as_slice()),
            self.rejected.as_deref(),
            self.eval.as_deref(),
            self.eval_rejected.as_deref(),
        ];
        for set in sets {
            for e in set.into_iter().flatten() {
                for &t in &e.input_ids {
                    h.update(t.to_le_bytes());
                }
                for &l in &e.labels {
                    h.update(l.to_le_bytes());
                }
                h.update(b"|");
            }
            h.update(b"#");
        }
        format!("{:x}", h.finalize())
    }
}

/// Tokens each eval prompt's answer may take.
const SAMPLE_TOKENS: usize = 64;

/// The reference log-probabilities of a DPO run, in its run directory.
/// The run directory's reference log-probabilities of a DPO job.
pub const REFERENCE_FILE: &str = "reference_logps.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredReferences {
    /// `Datasets::fingerprint` of the pairs.
    pairs_sha256: String,
    #[serde(flatten)]
    references: References,
}

/// The stored references, when they exist and are for these pairs.
fn read_references(path: &Path, fingerprint: &str) -> Option<References> {
    let text = std::fs::read_to_string(path).ok()?;
    let stored: StoredReferences = serde_json::from_str(&text).ok()?;
    (stored.pairs_sha256 == fingerprint).then_some(stored.references)
}

fn write_references(path: &Path, fingerprint: &str, references: &References) -> Result<()> {
    let stored = StoredReferences {
        pairs_sha256: fingerprint.to_string(),
        references: references.clone(),
    };
    let partial = path.with_extension("json.partial");
    let text = serde_json::to_string(&stored).expect("numbers and strings");
    std::fs::write(&partial, text).map_err(io_err(&partial))?;
    std::fs::rename(&partial, path).map_err(io_err(path))?;
    Ok(())
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
    let board = plan.run_dir.join(TENSORBOARD_DIR);
    if board.is_dir() {
        let to = plan.artifacts_dir.join(TENSORBOARD_DIR);
        if to != board {
            copy_dir(&board, &to).map_err(io_err(&to))?;
        }
        written.push(to);
    }
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
