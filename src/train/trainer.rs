//! The training loop. Runs on the caller's thread (the service gives it a dedicated one),
//! reports `TrainEvent`s through a callback and checks a cancel flag between optimizer steps.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Tensor, Var, D};
use serde::Serialize;

use super::checkpoint::{self, TrainState};
use super::dpo::{self, DpoConfig, PairSet, PreferenceMetrics, References};
use super::optim::{clip_grad_norm, AdamWConfig, Optimizer};
use super::Hyperparameters;
use super::{io_err, Result, TrainError};
use crate::data::batch::{collate, collate_packed, target_tokens};
use crate::data::encode::IGNORE;
use crate::data::{Batcher, Example};
use crate::lora::{peft, LoraConfig};
use crate::model::llama::CausalLm;
use crate::rng::Rng;

#[derive(Debug, Clone)]
pub struct TrainerOptions {
    pub hyper: Hyperparameters,
    /// The adapters' config, written with every saved adapter.
    pub lora: LoraConfig,
    pub shuffle: bool,
    pub group_by_length: bool,
    pub eval_every: Option<usize>,
    pub checkpoint_every: Option<usize>,
    pub keep_checkpoints: usize,
    /// Where checkpoints and the final adapter go; None keeps everything in memory.
    pub out_dir: Option<PathBuf>,
    /// Recorded as `base_model_name_or_path` in saved adapters.
    pub base_model: Option<String>,
    /// Pack examples into rows of `max_seq_len` tokens (`data::pack`); a micro-batch is then
    /// `batch_size` rows, and the loss is normalised over the label tokens of the whole step.
    /// Either way a micro-batch's examples lie end to end in one row, without padding.
    pub packing: bool,
    /// Stop when the validation loss has not improved for this many evaluations.
    pub early_stopping: Option<EarlyStopping>,
    /// The adapter at the lowest validation loss becomes the result, not the last one.
    pub load_best: bool,
}

/// When a run stops on its validation loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    /// Evaluations without improvement before stopping.
    pub patience: usize,
    /// An improvement smaller than this does not count.
    #[serde(default)]
    pub min_delta: f64,
}

/// What happened, for progress displays, logs and the service's event stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TrainEvent {
    Started {
        total_steps: usize,
        start_step: usize,
        examples: usize,
    },
    Step {
        step: usize,
        total_steps: usize,
        loss: f32,
        learning_rate: f64,
        grad_norm: f32,
        tokens: usize,
        tokens_per_second: f64,
        eta_seconds: f64,
        epoch: f64,
        /// DPO's rewards and log-probabilities (TRL's names).
        #[serde(skip_serializing_if = "Option::is_none")]
        preference: Option<PreferenceMetrics>,
    },
    Eval {
        step: usize,
        eval_loss: f32,
        /// Next-token accuracy; with DPO, `rewards/accuracies`.
        eval_accuracy: f32,
        eval_tokens: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        preference: Option<PreferenceMetrics>,
    },
    Checkpoint {
        step: usize,
        path: PathBuf,
    },
    Finished {
        step: usize,
        loss: Option<f32>,
    },
    Cancelled {
        step: usize,
    },
    /// The validation loss stopped improving: training ends here, `best_step` won.
    EarlyStopped {
        step: usize,
        best_step: usize,
        best_eval_loss: f32,
        patience: usize,
    },
    /// The adapter of the lowest validation loss is the run's result.
    BestAdapter {
        step: usize,
        eval_loss: f32,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum TrainOutcome {
    Finished { step: usize },
    Cancelled { step: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalResult {
    pub loss: f32,
    pub accuracy: f32,
    pub tokens: usize,
}

pub struct Trainer<'a> {
    model: &'a CausalLm,
    train: &'a [Example],
    eval: Option<&'a [Example]>,
    pad_id: u32,
    opts: TrainerOptions,
    batcher: Batcher,
    names: Vec<String>,
    params: Vec<Var>,
    optimizer: Optimizer,
    pub state: TrainState,
    /// DPO: `train` (and `eval`) hold each pair's chosen side.
    preferences: Option<Preferences<'a>>,
}

/// What a DPO run adds to the trainer: the rejected side of each pair, index for index with
/// the chosen sides in `train` and `eval`, and the reference log-probabilities.
struct Preferences<'a> {
    config: DpoConfig,
    rejected: &'a [Example],
    eval_rejected: Option<&'a [Example]>,
    references: References,
}

impl<'a> Trainer<'a> {
    pub fn new(
        model: &'a CausalLm,
        train: &'a [Example],
        eval: Option<&'a [Example]>,
        pad_id: u32,
        opts: TrainerOptions,
    ) -> Result<Self> {
        let h = &opts.hyper;
        if train.is_empty() {
            return Err(TrainError::Spec {
                field: "training_file".into(),
                message: "has no examples".into(),
            });
        }
        let (names, params): (Vec<String>, Vec<Var>) = model.trainable().into_iter().unzip();
        if params.is_empty() {
            return Err(TrainError::Spec {
                field: "lora.target_modules".into(),
                message: "no adapter to train".into(),
            });
        }
        let sizes: Vec<usize> = params.iter().map(|p| p.elem_count()).collect();
        let adam = AdamWConfig {
            weight_decay: h.weight_decay,
            ..AdamWConfig::default()
        };
        let batcher = Batcher {
            batch_size: h.batch_size,
            shuffle: opts.shuffle,
            group_by_length: opts.group_by_length,
            seed: h.seed,
            packed_rows: opts.packing.then(|| {
                let lengths: Vec<usize> = train.iter().map(|e| e.input_ids.len()).collect();
                crate::data::pack::pack_bfd(&lengths, h.max_seq_len)
            }),
        };
        let per_epoch = batcher.batches_per_epoch(train.len());
        let total_steps = match h.max_steps {
            Some(n) => n,
            None => (per_epoch * h.n_epochs).div_ceil(h.gradient_accumulation_steps),
        };
        let state = TrainState {
            step: 0,
            total_steps,
            epoch: 0,
            batch_in_epoch: 0,
            rng_state: Rng::new(h.seed).fork(0xd20f).state,
            tokens_seen: 0,
            examples: train.len(),
            batch_size: h.batch_size,
            gradient_accumulation_steps: h.gradient_accumulation_steps,
            seed: h.seed,
            last_loss: None,
            best_eval: None,
            evals_since_best: 0,
        };
        Ok(Trainer {
            model,
            train,
            eval,
            pad_id,
            batcher,
            names,
            optimizer: Optimizer::new(h.optimizer, adam, &sizes),
            params,
            opts,
            state,
            preferences: None,
        })
    }

    /// Train on preference pairs with DPO: `rejected` (and `eval_rejected`) are the other side
    /// of the pairs whose chosen side the trainer was made with. The reference log-probabilities
    /// are `references` when given (stored by an earlier start of the same run), else computed
    /// now from the model as it is: the training pairs in the first epoch's micro-batches, the
    /// validation pairs in evaluation's.
    pub fn with_preferences(
        mut self,
        config: DpoConfig,
        rejected: &'a [Example],
        eval_rejected: Option<&'a [Example]>,
        references: Option<References>,
    ) -> Result<Self> {
        let eval_pairs = self.eval.map(<[Example]>::len);
        if rejected.len() != self.train.len() || eval_rejected.map(<[Example]>::len) != eval_pairs {
            return Err(TrainError::Spec {
                field: "training_file".into(),
                message: "every chosen answer needs its rejected one".into(),
            });
        }
        if self.opts.packing {
            return Err(TrainError::Spec {
                field: "data.packing".into(),
                message: "DPO lays each micro-batch's pairs end to end already; packing is for supervised data".into(),
            });
        }
        let references = match references {
            Some(r) => r,
            None => {
                let first = self.batcher.epoch_batches(self.train, 0);
                let train = dpo::reference_logps(self.model, self.train, rejected, &first)?;
                let eval = match (self.eval, eval_rejected) {
                    (Some(c), Some(r)) => {
                        let batches = dpo::in_order(c.len(), self.opts.hyper.batch_size);
                        Some(dpo::reference_logps(self.model, c, r, &batches)?)
                    }
                    _ => None,
                };
                References { train, eval }
            }
        };
        let fits = |r: &dpo::Reference, n: usize| r.chosen.len() == n && r.rejected.len() == n;
        if !fits(&references.train, rejected.len())
            || references
                .eval
                .as_ref()
                .map(|r| fits(r, eval_pairs.unwrap_or(0)))
                == Some(false)
        {
            return Err(TrainError::Spec {
                field: "training_file".into(),
                message: "the stored reference log-probabilities are for other pairs".into(),
            });
        }
        self.preferences = Some(Preferences {
            config,
            rejected,
            eval_rejected,
            references,
        });
        Ok(self)
    }

    /// The reference log-probabilities of a DPO run.
    pub fn references(&self) -> Option<&References> {
        self.preferences.as_ref().map(|p| &p.references)
    }

    pub fn total_steps(&self) -> usize {
        self.state.total_steps
    }

    /// How full the packed rows are, when packing.
    pub fn packing(&self) -> Option<crate::data::pack::PackingSummary> {
        let rows = self.batcher.packed_rows.as_ref()?;
        let lengths: Vec<usize> = self.train.iter().map(|e| e.input_ids.len()).collect();
        Some(crate::data::pack::summarize(
            rows,
            &lengths,
            self.opts.hyper.max_seq_len,
        ))
    }

    fn warmup_steps(&self) -> usize {
        let h = &self.opts.hyper;
        h.warmup_steps
            .unwrap_or_else(|| (self.state.total_steps as f64 * h.warmup_ratio).ceil() as usize)
    }

    /// Learning rate of optimizer step `step` (0-based).
    pub fn learning_rate(&self, step: usize) -> f64 {
        let h = &self.opts.hyper;
        h.learning_rate
            * h.lr_scheduler
                .factor(step, self.warmup_steps(), self.state.total_steps)
    }

    /// Continue from a checkpoint directory: adapter weights, moments, step, data position, RNG.
    pub fn resume_from(&mut self, dir: &Path) -> Result<()> {
        let state = checkpoint::read_state(dir, &self.names, &mut self.optimizer)?;
        let mismatch = |what: &str, was: String, now: String| TrainError::Checkpoint {
            path: dir.to_path_buf(),
            message: format!("cannot resume: {what} was {was}, is now {now}"),
        };
        if state.examples != self.train.len() {
            return Err(mismatch(
                "the number of training examples",
                state.examples.to_string(),
                self.train.len().to_string(),
            ));
        }
        let h = &self.opts.hyper;
        if state.batch_size != h.batch_size
            || state.gradient_accumulation_steps != h.gradient_accumulation_steps
        {
            return Err(mismatch(
                "batch_size x gradient_accumulation_steps",
                format!(
                    "{} x {}",
                    state.batch_size, state.gradient_accumulation_steps
                ),
                format!("{} x {}", h.batch_size, h.gradient_accumulation_steps),
            ));
        }
        if state.seed != h.seed {
            return Err(mismatch("seed", state.seed.to_string(), h.seed.to_string()));
        }
        let adapter = peft::load(dir, self.model.device())?;
        for (name, var) in self.names.iter().zip(&self.params) {
            let stem = name.strip_prefix("base_model.model.").unwrap_or(name);
            let (module, which) = match stem.strip_suffix(".lora_A.weight") {
                Some(m) => (m, 0),
                None => (stem.strip_suffix(".lora_B.weight").unwrap_or(stem), 1),
            };
            let (a, b) = adapter
                .weights
                .get(module)
                .ok_or_else(|| TrainError::Checkpoint {
                    path: dir.to_path_buf(),
                    message: format!("the checkpoint has no adapter for {module}"),
                })?;
            let t = if which == 0 { a } else { b };
            if t.dims() != var.dims() {
                return Err(TrainError::Checkpoint {
                    path: dir.to_path_buf(),
                    message: format!("{name}: shape differs"),
                });
            }
            var.set(t)?;
        }
        self.state = TrainState {
            total_steps: self.state.total_steps,
            ..state
        };
        Ok(())
    }

    /// Write `checkpoint-<step>` under the output directory, atomically, then prune old ones.
    /// Clip and apply the summed gradients on the GPU; returns the norm before clipping.
    #[cfg(feature = "cuda")]
    fn device_step(&mut self, grads: Vec<Option<Tensor>>, lr: f64) -> Result<f32> {
        let grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&self.params)
            .map(|(g, p)| match g {
                Some(g) => g.contiguous(),
                None => p.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        // torch's clip_grad_norm_: the norm of the per-parameter norms, one sync for all.
        let squares = grads
            .iter()
            .map(|g| g.sqr()?.sum_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = Tensor::stack(&squares, 0)?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()?;
        let max_norm = self.opts.hyper.max_grad_norm;
        let scale = if max_norm > 0.0 {
            (max_norm as f32 / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        self.optimizer
            .step_device(&self.params, &grads, scale, lr)?;
        Ok(norm)
    }

    #[cfg(not(feature = "cuda"))]
    fn device_step(&mut self, _grads: Vec<Option<Tensor>>, _lr: f64) -> Result<f32> {
        unreachable!("no GPU device exists without the cuda feature")
    }

    /// Write a checkpoint under a temporary name; [`Trainer::checkpoint`] renames it into place.
    fn write_checkpoint(&self) -> Result<Option<(PathBuf, PathBuf)>> {
        let Some(out) = &self.opts.out_dir else {
            return Ok(None);
        };
        let dir = checkpoint::checkpoint_dir(out, self.state.step);
        let partial = out.join(format!(".checkpoint-{}.partial", self.state.step));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(io_err(&partial))?;
        self.model
            .save_adapter(&partial, &self.opts.lora, self.opts.base_model.as_deref())?;
        checkpoint::write_state(&partial, &self.state, &self.names, &self.optimizer)?;
        Ok(Some((partial, dir)))
    }

    /// Save a checkpoint and report it. The checkpoint's event goes out while it still has its
    /// temporary name: a watcher that records events (the service's worker) has every event up
    /// to this one stored before the checkpoint can be resumed from, so a resume never skips a
    /// step that nobody heard of.
    fn checkpoint(&self, on_event: &mut dyn FnMut(&TrainEvent)) -> Result<()> {
        let Some((partial, dir)) = self.write_checkpoint()? else {
            return Ok(());
        };
        on_event(&TrainEvent::Checkpoint {
            step: self.state.step,
            path: dir.clone(),
        });
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        std::fs::rename(&partial, &dir).map_err(io_err(&dir))?;
        let out = self.opts.out_dir.as_ref().expect("written above");
        checkpoint::prune(out, self.opts.keep_checkpoints)?;
        Ok(())
    }

    /// Train until the last step or until `cancel` is set (then checkpoint and stop).
    pub fn run(
        &mut self,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(&TrainEvent),
    ) -> Result<TrainOutcome> {
        let total = self.state.total_steps;
        let per_epoch = self.batcher.batches_per_epoch(self.train.len());
        let accum = self.opts.hyper.gradient_accumulation_steps;
        on_event(&TrainEvent::Started {
            total_steps: total,
            start_step: self.state.step,
            examples: self.train.len(),
        });
        let started = Instant::now();
        let start_step = self.state.step;
        let mut run_tokens = 0usize;
        let mut epoch_batches: Option<(usize, Vec<Vec<usize>>)> = None;
        let dropout = self.opts.lora.dropout > 0.0;
        let mut stop_early = false;
        while self.state.step < total {
            if cancel.load(Ordering::Relaxed) {
                self.checkpoint(on_event)?;
                on_event(&TrainEvent::Cancelled {
                    step: self.state.step,
                });
                return Ok(TrainOutcome::Cancelled {
                    step: self.state.step,
                });
            }
            let on_gpu = self.model.device().is_cuda();
            // Gradients summed over the micro-batches: host vectors on the CPU, f32 tensors on
            // a GPU (where the optimizer runs too).
            let mut grads: Vec<Vec<f32>> = if on_gpu {
                Vec::new()
            } else {
                self.params
                    .iter()
                    .map(|p| vec![0f32; p.elem_count()])
                    .collect()
            };
            let mut device_grads: Vec<Option<Tensor>> = vec![None; self.params.len()];
            let mut loss_sum = 0f32;
            let mut step_tokens = 0;
            // The step's micro-batches up front: with packing, each one's loss is weighted by
            // its share of the whole step's label tokens, so accumulation equals one big batch.
            let mut step_batches = Vec::with_capacity(accum);
            for _ in 0..accum {
                if self.state.batch_in_epoch == per_epoch {
                    self.state.epoch += 1;
                    self.state.batch_in_epoch = 0;
                }
                if epoch_batches.as_ref().map(|(e, _)| *e) != Some(self.state.epoch) {
                    epoch_batches = Some((
                        self.state.epoch,
                        self.batcher.epoch_batches(self.train, self.state.epoch),
                    ));
                }
                let idx = &epoch_batches.as_ref().expect("set above").1[self.state.batch_in_epoch];
                step_batches.push(idx.clone());
                self.state.batch_in_epoch += 1;
            }
            let step_targets: usize = step_batches
                .iter()
                .flatten()
                .map(|&i| target_tokens(&self.train[i]))
                .sum();
            let mut step_metrics = Vec::new();
            for idx in &step_batches {
                let weight = if self.opts.packing {
                    let targets: usize = idx.iter().map(|&i| target_tokens(&self.train[i])).sum();
                    targets as f64 / step_targets.max(1) as f64
                } else {
                    1.0 / accum as f64
                };
                let (objective, loss, tokens) = match &self.preferences {
                    Some(p) => {
                        let set = PairSet {
                            chosen: self.train,
                            rejected: p.rejected,
                            reference: &p.references.train,
                        };
                        let mb = set.micro_batch(self.model, &p.config, idx)?;
                        step_metrics.push(mb.metrics);
                        (mb.objective, mb.loss as f32, mb.tokens)
                    }
                    None => {
                        let examples: Vec<&Example> = idx.iter().map(|&i| &self.train[i]).collect();
                        let batch = collate_packed(&examples, self.model.device())?;
                        let mut rng = Rng {
                            state: self.state.rng_state,
                        };
                        let loss = self.model.forward_loss_packed(
                            &batch.input_ids,
                            &batch.lengths,
                            &batch.labels,
                            if dropout { Some(&mut rng) } else { None },
                        )?;
                        self.state.rng_state = rng.state;
                        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                        (loss, value, batch.tokens)
                    }
                };
                let scaled = (&objective * weight)?;
                let g = self.model.backward(&scaled)?;
                if on_gpu {
                    for (acc, p) in device_grads.iter_mut().zip(&self.params) {
                        if let Some(gp) = g.get(p.as_tensor()) {
                            let gp = gp.to_dtype(DType::F32)?;
                            *acc = Some(match acc.take() {
                                Some(a) => (a + gp)?,
                                None => gp,
                            });
                        }
                    }
                } else {
                    for (acc, p) in grads.iter_mut().zip(&self.params) {
                        if let Some(gp) = g.get(p.as_tensor()) {
                            let v = gp.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                            for (a, x) in acc.iter_mut().zip(v) {
                                *a += x;
                            }
                        }
                    }
                }
                loss_sum += loss * weight as f32;
                step_tokens += tokens;
            }
            let loss = loss_sum;
            if !loss.is_finite() {
                return Err(TrainError::Diverged(loss));
            }
            let lr = self.learning_rate(self.state.step);
            let grad_norm = crate::ops::profile::span("optimizer (clip + AdamW)", || {
                if on_gpu {
                    self.device_step(device_grads, lr)
                } else {
                    let grad_norm = clip_grad_norm(&mut grads, self.opts.hyper.max_grad_norm);
                    self.optimizer.step(&self.params, &grads, lr)?;
                    Ok(grad_norm)
                }
            })?;
            self.state.step += 1;
            self.state.tokens_seen += step_tokens;
            self.state.last_loss = Some(loss);
            run_tokens += step_tokens;
            let elapsed = started.elapsed().as_secs_f64().max(1e-9);
            let done = self.state.step - start_step;
            on_event(&TrainEvent::Step {
                step: self.state.step,
                total_steps: total,
                loss,
                learning_rate: lr,
                grad_norm,
                tokens: step_tokens,
                tokens_per_second: run_tokens as f64 / elapsed,
                eta_seconds: elapsed / done as f64 * (total - self.state.step) as f64,
                epoch: self.state.epoch as f64
                    + self.state.batch_in_epoch as f64 / per_epoch as f64,
                preference: (!step_metrics.is_empty())
                    .then(|| PreferenceMetrics::mean(&step_metrics)),
            });
            let last = self.state.step == total;
            if let Some(eval) = self.eval {
                if last
                    || self
                        .opts
                        .eval_every
                        .is_some_and(|n| self.state.step.is_multiple_of(n))
                {
                    let (r, preference) = self.evaluate(eval)?;
                    on_event(&TrainEvent::Eval {
                        step: self.state.step,
                        eval_loss: r.loss,
                        eval_accuracy: r.accuracy,
                        eval_tokens: r.tokens,
                        preference,
                    });
                    stop_early = self.judge(r.loss)?;
                }
            }
            if let Some((best_step, best_eval_loss)) = self.state.best_eval.filter(|_| stop_early) {
                on_event(&TrainEvent::EarlyStopped {
                    step: self.state.step,
                    best_step,
                    best_eval_loss,
                    patience: self.opts.early_stopping.map_or(0, |e| e.patience),
                });
                self.checkpoint(on_event)?;
                break;
            }
            if last
                || self
                    .opts
                    .checkpoint_every
                    .is_some_and(|n| self.state.step.is_multiple_of(n))
            {
                self.checkpoint(on_event)?;
            }
        }
        if let Some(out) = &self.opts.out_dir {
            let adapter = out.join("adapter");
            match self.state.best_eval.filter(|_| self.opts.load_best) {
                Some((step, eval_loss)) => {
                    copy_adapter(&out.join(BEST_ADAPTER), &adapter)?;
                    on_event(&TrainEvent::BestAdapter { step, eval_loss });
                }
                None => self.model.save_adapter(
                    &adapter,
                    &self.opts.lora,
                    self.opts.base_model.as_deref(),
                )?,
            }
        }
        on_event(&TrainEvent::Finished {
            step: self.state.step,
            loss: self.state.last_loss,
        });
        Ok(TrainOutcome::Finished {
            step: self.state.step,
        })
    }
}

/// Where the adapter of the lowest validation loss so far is kept, with `load_best`.
const BEST_ADAPTER: &str = "best-adapter";

fn copy_adapter(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(crate::train::io_err(to))?;
    for e in std::fs::read_dir(from).map_err(crate::train::io_err(from))? {
        let e = e.map_err(crate::train::io_err(from))?;
        std::fs::copy(e.path(), to.join(e.file_name())).map_err(crate::train::io_err(to))?;
    }
    Ok(())
}

impl Trainer<'_> {
    /// Evaluate on the validation set: token loss and accuracy, or with DPO the pairs' loss and
    /// reward accuracy with their metrics.
    fn evaluate(&self, eval: &[Example]) -> Result<(EvalResult, Option<PreferenceMetrics>)> {
        let batch_size = self.opts.hyper.batch_size;
        match &self.preferences {
            Some(Preferences {
                config,
                eval_rejected: Some(rejected),
                references:
                    References {
                        eval: Some(reference),
                        ..
                    },
                ..
            }) => {
                let set = PairSet {
                    chosen: eval,
                    rejected,
                    reference,
                };
                let (r, m) = set.evaluate(self.model, config, batch_size)?;
                Ok((r, Some(m)))
            }
            _ => Ok((evaluate(self.model, eval, batch_size, self.pad_id)?, None)),
        }
    }

    /// Record an evaluation's loss against the best so far; with `load_best` a new best's
    /// adapter is kept. Returns whether early stopping says to stop.
    fn judge(&mut self, loss: f32) -> Result<bool> {
        let min_delta = self.opts.early_stopping.map_or(0.0, |e| e.min_delta);
        let improved = match self.state.best_eval {
            None => true,
            Some((_, best)) => (loss as f64) < best as f64 - min_delta,
        };
        if improved {
            self.state.best_eval = Some((self.state.step, loss));
            self.state.evals_since_best = 0;
            if let (true, Some(out)) = (self.opts.load_best, &self.opts.out_dir) {
                self.model.save_adapter(
                    &out.join(BEST_ADAPTER),
                    &self.opts.lora,
                    self.opts.base_model.as_deref(),
                )?;
            }
        } else {
            self.state.evals_since_best += 1;
        }
        Ok(self
            .opts
            .early_stopping
            .is_some_and(|e| self.state.evals_since_best >= e.patience))
    }
}

/// Token-weighted mean loss and next-token accuracy over `examples`, masked as in training.
pub fn evaluate(
    model: &CausalLm,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
) -> Result<EvalResult> {
    let mut loss_sum = 0f64;
    let mut tokens = 0usize;
    let mut correct = 0usize;
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = collate(&refs, pad_id, model.device())?;
        if batch.target_tokens == 0 {
            continue;
        }
        let logits = model
            .forward(&batch.input_ids, Some(&batch.attention_mask), None)?
            .detach();
        let loss = model
            .loss(&logits, &batch.labels)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        loss_sum += loss as f64 * batch.target_tokens as f64;
        tokens += batch.target_tokens;
        let pred: Vec<Vec<u32>> = logits.argmax(D::Minus1)?.to_vec2()?;
        let labels: Vec<Vec<i64>> = batch.labels.to_vec2()?;
        for (p, l) in pred.iter().zip(&labels) {
            for i in 1..l.len() {
                if l[i] != IGNORE && p[i - 1] as i64 == l[i] {
                    correct += 1;
                }
            }
        }
    }
    if tokens == 0 {
        return Ok(EvalResult {
            loss: f32::NAN,
            accuracy: 0.0,
            tokens: 0,
        });
    }
    Ok(EvalResult {
        loss: (loss_sum / tokens as f64) as f32,
        accuracy: correct as f32 / tokens as f32,
        tokens,
    })
}
