//! `qlorad train`: one fine-tune job from the terminal, with a progress bar; checkpoints,
//! `metrics.jsonl`, `spec.json`, the adapter and the spec's exports in one output directory.
//! Ctrl-C writes a checkpoint and stops; `--resume` continues from it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::finetune::{self, io_err, FinetuneError, JobSpec, Outcome, Plan, RunEvent, Split};
use crate::train::{checkpoint, TrainError, TrainEvent};

/// What `qlorad train` needs beyond the spec.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// The base model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Training data: JSONL or a JSON array (alpaca, chat, sharegpt, completion or text; preference pairs with a spec whose method is dpo).
    #[arg(long)]
    pub data: PathBuf,
    /// Validation data, evaluated every `eval_every` steps and at the end.
    #[arg(long)]
    pub validation: Option<PathBuf>,
    /// Output directory: checkpoint-<step>/, adapter/, metrics.jsonl, spec.json, exports.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Start from an existing PEFT adapter instead of a fresh one.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
}

type Result<T> = std::result::Result<T, FinetuneError>;

/// Train an adapter; Ctrl-C checkpoints and stops. Returns the outcome.
pub fn train(args: &TrainArgs, spec: &JobSpec) -> Result<Outcome> {
    let out = &args.out;
    if checkpoint::latest(out).is_some() && !args.resume {
        return Err(TrainError::Checkpoint {
            path: out.clone(),
            message:
                "holds checkpoints already: pass --resume to continue, or choose another --out"
                    .into(),
        }
        .into());
    }
    let plan = Plan {
        spec: spec.clone(),
        model_dir: args.model.clone(),
        training_file: args.data.clone(),
        validation_file: args.validation.clone(),
        run_dir: out.clone(),
        artifacts_dir: out.clone(),
        init_adapter: args.init_adapter.clone(),
        resume: args.resume,
        base_model_name: Some(args.model.display().to_string()),
    };

    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        // A second handler cannot be installed in one process; training once per process is the CLI's case.
        let _ = ctrlc::set_handler(move || {
            eprintln!("\ninterrupted: writing a checkpoint, then stopping");
            cancel.store(true, Ordering::Relaxed);
        });
    }
    let mut progress = Progress::new(out, spec)?;
    let outcome = finetune::run(&plan, &cancel, &mut |e| progress.on_event(e));
    progress.bar.finish_and_clear();
    let outcome = outcome?;
    if let Some(err) = progress.io_error {
        return Err(err);
    }
    match &outcome {
        Outcome::Finished { step } => {
            eprintln!(
                "finished {step} steps; adapter in {}",
                out.join("adapter").display()
            )
        }
        Outcome::Stopped { step } => {
            eprintln!("stopped at step {step}; continue with --resume")
        }
    }
    Ok(outcome)
}

/// The progress bar, `spec.json` and `metrics.jsonl`, fed by the run's events. Nothing is
/// written into the output directory before the data and the model have loaded.
struct Progress {
    bar: ProgressBar,
    spec_path: PathBuf,
    spec_json: String,
    metrics_path: PathBuf,
    metrics: Option<std::fs::File>,
    /// The first failed write to `metrics.jsonl`; the run goes on, the command fails after it.
    io_error: Option<FinetuneError>,
}

impl Progress {
    fn new(out: &Path, spec: &JobSpec) -> Result<Self> {
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed} < {eta}]")
                .expect("static template"),
        );
        Ok(Progress {
            bar,
            spec_path: out.join("spec.json"),
            spec_json: serde_json::to_string_pretty(spec).expect("json") + "\n",
            metrics_path: out.join("metrics.jsonl"),
            metrics: None,
            io_error: None,
        })
    }

    /// Write `spec.json` and open `metrics.jsonl` once training starts at `start_step`: lines
    /// past it (written by an interrupted run after its checkpoint) are dropped.
    fn open_metrics(&mut self, start_step: usize) -> Result<std::fs::File> {
        std::fs::write(&self.spec_path, &self.spec_json).map_err(io_err(&self.spec_path))?;
        let path = &self.metrics_path;
        let kept: Vec<String> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|_| start_step > 0)
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= start_step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(path, kept.concat()).map_err(io_err(path))?;
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io_err(path))
    }

    fn on_event(&mut self, e: &RunEvent) {
        let bar = &self.bar;
        let line = match e {
            RunEvent::Data { split, summary } => {
                let which = match split {
                    Split::Training => "training",
                    Split::Validation => "validation",
                };
                let summary = serde_json::to_string(summary).expect("json");
                bar.suspend(|| eprintln!("{which} data: {summary}"));
                None
            }
            RunEvent::Samples { step, samples } => {
                bar.suspend(|| {
                    for s in samples {
                        let q = s.messages.last().map_or("", |m| m.content.as_str());
                        eprintln!("step {step}: {q:?} -> {:?}", s.answer);
                    }
                });
                Some(json!({"step": step, "samples": samples}))
            }
            RunEvent::Reference { pairs, computed } => {
                let how = if *computed {
                    "computed"
                } else {
                    "read from the run directory"
                };
                bar.suspend(|| eprintln!("DPO reference log-probabilities of {pairs} pairs {how}"));
                None
            }
            RunEvent::Resumed { step, checkpoint } => {
                bar.suspend(|| eprintln!("resumed from {} at step {step}", checkpoint.display()));
                None
            }
            RunEvent::Packed(p) => {
                let summary = serde_json::to_string(p).expect("json");
                bar.suspend(|| eprintln!("packing: {summary}"));
                None
            }
            RunEvent::Exporting => {
                bar.suspend(|| eprintln!("exporting"));
                None
            }
            RunEvent::Artifact { name, bytes, .. } => {
                bar.suspend(|| eprintln!("wrote {name} ({bytes} bytes)"));
                None
            }
            RunEvent::Train(TrainEvent::Started {
                total_steps,
                start_step,
                ..
            }) => {
                bar.set_length(*total_steps as u64);
                bar.set_position(*start_step as u64);
                match self.open_metrics(*start_step) {
                    Ok(f) => self.metrics = Some(f),
                    Err(err) => {
                        self.io_error.get_or_insert(err);
                    }
                }
                None
            }
            RunEvent::Train(TrainEvent::Step {
                step,
                loss,
                learning_rate,
                grad_norm,
                tokens,
                tokens_per_second,
                epoch,
                preference,
                ..
            }) => {
                bar.set_position(*step as u64);
                bar.set_message(format!(
                    "loss {loss:.4}  lr {learning_rate:.2e}  {tokens_per_second:.0} tok/s"
                ));
                let mut line = json!({"step": step, "loss": loss, "learning_rate": learning_rate, "grad_norm": grad_norm,
                            "tokens": tokens, "epoch": epoch});
                if let (Some(m), Some(obj)) = (preference, line.as_object_mut()) {
                    obj.extend(m.fields(""));
                }
                Some(line)
            }
            RunEvent::Train(TrainEvent::Eval {
                step,
                eval_loss,
                eval_accuracy,
                eval_tokens,
                preference,
            }) => {
                let what = if preference.is_some() {
                    "reward accuracy"
                } else {
                    "token accuracy"
                };
                bar.println(format!(
                    "step {step}: eval loss {eval_loss:.4}, {what} {eval_accuracy:.3}"
                ));
                let mut line = json!({"step": step, "eval_loss": eval_loss, "eval_accuracy": eval_accuracy, "eval_tokens": eval_tokens});
                if let (Some(m), Some(obj)) = (preference, line.as_object_mut()) {
                    obj.extend(m.fields("eval_"));
                }
                Some(line)
            }
            RunEvent::Train(TrainEvent::Checkpoint { path, .. }) => {
                bar.println(format!("checkpoint {}", path.display()));
                None
            }
            RunEvent::Train(_) => None,
        };
        if let (Some(v), Some(f)) = (line, self.metrics.as_mut()) {
            if let Err(source) = writeln!(f, "{v}") {
                self.io_error.get_or_insert(FinetuneError::Io {
                    path: self.metrics_path.clone(),
                    source,
                });
            }
        }
    }
}
