//! What the service takes in, checked before anything is stored: job specs (validated, the
//! model resolved, the files the caller's own) and datasets (checked record by record, counted
//! with a model's tokenizer when asked). A refused request leaves nothing behind.

use std::path::PathBuf;

use super::store::{FileRow, JobLabels, JobRow};
use super::{now, FineTuned, JobsError, Scope, Service, Status};
use crate::finetune::{JobSpec, SpecError};

/// Why a request was refused; each names the field at fault where there is one.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("the body must be a JSON object")]
    NotAnObject,
    #[error("{}: {}", .0.field, .0.message)]
    Spec(SpecError),
    #[error("`{0}` is required")]
    Missing(&'static str),
    #[error("model {name:?} is not in the model roots (see GET /models)")]
    UnknownModel { field: &'static str, name: String },
    #[error("file {id:?} does not exist (see GET /files)")]
    UnknownFile { field: &'static str, id: String },
    #[error("{0}")]
    InvalidFormat(String),
    /// The dataset, with the uploaded file's name, line and field in the message.
    #[error("{0}")]
    InvalidFile(String),
    /// A fine-tuned model that cannot be continued yet or any more.
    #[error("{0}")]
    Continue(String),
    /// A hub id whose repository cannot be used (missing, gated, unreachable).
    #[error("model: {0}")]
    Hub(crate::model::hub::HubError),
    /// The job's estimated peak memory is more than any worker's device has.
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Jobs(#[from] JobsError),
}

/// What the base's architecture allows of the spec: a sequence length within a sliding window,
/// GGUF outputs only where llama.cpp's layout is written.
fn check_architecture(
    spec: &JobSpec,
    c: &crate::model::config::ModelConfig,
) -> Result<(), IntakeError> {
    let max = spec.hyperparameters.max_seq_len;
    if let Some(message) = c.window_exceeded(max) {
        return Err(IntakeError::Spec(SpecError::new(
            "hyperparameters.max_seq_len",
            message,
        )));
    }
    if !spec.export.gguf.is_empty() || spec.export.gguf_lora {
        if let Err(e) = crate::export::arch_name(c.arch) {
            let field = if spec.export.gguf.is_empty() {
                "export.gguf_lora"
            } else {
                "export.gguf"
            };
            return Err(IntakeError::Spec(SpecError::new(field, e.to_string())));
        }
    }
    Ok(())
}

/// A job spec checked as a create checks it, with what its estimate reads.
struct Checked {
    spec: JobSpec,
    /// The base model's path, when it is here (a hub model not yet downloaded is not).
    model_dir: Option<PathBuf>,
    /// Its configuration, read once for every estimate.
    config: Option<crate::model::config::ModelConfig>,
    lora: crate::lora::LoraConfig,
    /// Bytes of the training file.
    train_bytes: i64,
}

/// Training files up to this size are tokenized at create to check the job fits a device.
const PLAN_BYTES: i64 = 16 << 20;

/// What a job would take, answered by `POST /jobs?dry_run=true` without creating anything.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Preflight {
    /// `preflight`.
    pub object: &'static str,
    /// The spec as it would be stored, defaults filled.
    #[schema(value_type = crate::api::openapi::JobSpecSchema)]
    pub spec: serde_json::Value,
    /// Examples, tokens, rows, steps and epochs, as the run counts them; null when the base
    /// model is not here yet (a hub model downloads when the job runs).
    #[schema(value_type = Option<Object>)]
    pub data: Option<crate::finetune::preflight::DataPlan>,
    /// The estimated peak memory on each worker device, and whether it fits.
    pub memory: Vec<DeviceFit>,
    pub time: Option<TimeEstimate>,
    /// Why parts of the estimate are missing.
    pub notes: Vec<String>,
}

/// The estimated peak memory of a job on one device, by part.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct DeviceFit {
    pub device: String,
    pub estimated_peak_bytes: u64,
    pub weights_bytes: u64,
    pub adapter_bytes: u64,
    pub activation_bytes: u64,
    pub workspace_bytes: u64,
    /// What a job may use there (`workers.memory_gib`, or the device's total); null when
    /// unknown.
    pub available_bytes: Option<u64>,
    pub fits: Option<bool>,
}

/// How long the job's training should take.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct TimeEstimate {
    pub estimated_seconds: f64,
    pub tokens_per_second: f64,
    /// `measured`: the throughput of an earlier job on the same model (`from_job`); `shapes`:
    /// the model's FLOPs per token over a nominal device speed (a rough figure).
    pub basis: &'static str,
    pub from_job: Option<String>,
}

/// An upload being received: its id, and where its bytes go until it is checked.
#[derive(Debug)]
pub struct StagedUpload {
    pub id: String,
    pub path: PathBuf,
}

impl Service {
    /// Validate a spec (as JSON), check its model and files, queue it and wake the workers.
    pub async fn create_job(
        &self,
        body: serde_json::Value,
        labels: JobLabels,
        owner: &str,
        scope: Scope<'_>,
    ) -> Result<JobRow, IntakeError> {
        let checked = self.check_job(body, scope).await?;
        // A job no worker's device can hold is refused now, not an hour into its queue. Files
        // up to `PLAN_BYTES` are tokenized for the estimate (well under a second); past that the
        // check counts what any step holds (weights, adapter, optimizer) and leaves the
        // activations to the dry run, so a create stays quick.
        let step = if checked.train_bytes <= PLAN_BYTES {
            self.plan_data(&checked).await?.map(|p| p.largest_step)
        } else {
            Some(Default::default())
        };
        if let Some(step) = step {
            let fits = self.memory_fits(&checked, &step);
            if !fits.is_empty() && fits.iter().all(|f| f.fits == Some(false)) {
                return Err(IntakeError::TooLarge(too_large(&fits)));
            }
        }
        let spec = checked.spec;
        let id = format!("job-{}", uuid::Uuid::new_v4().simple());
        let spec_json = serde_json::to_value(&spec).expect("spec serializes");
        let job = self
            .store
            .insert_job(
                &id,
                &spec_json,
                spec.priority,
                &labels,
                owner,
                self.config.limits.max_queued_jobs_per_key as i64,
            )
            .await?;
        self.workers.wake.notify_waiters();
        Ok(job)
    }

    /// Check a spec exactly as a create does and estimate what it takes, creating nothing.
    pub async fn preflight_job(
        &self,
        body: serde_json::Value,
        scope: Scope<'_>,
    ) -> Result<Preflight, IntakeError> {
        let checked = self.check_job(body, scope).await?;
        let mut notes = Vec::new();
        let plan = self.plan_data(&checked).await?;
        let (memory, time) = match &plan {
            Some(plan) => (
                self.memory_fits(&checked, &plan.largest_step),
                Some(self.time_estimate(&checked, plan).await?),
            ),
            None => {
                notes.push("the base model downloads from the hub when the job runs: its tokens, steps, memory and time are known then".into());
                (Vec::new(), None)
            }
        };
        if plan.is_some() && memory.is_empty() {
            notes.push("this server runs no workers: no device to fit".into());
        }
        Ok(Preflight {
            object: "preflight",
            spec: serde_json::to_value(&checked.spec).expect("spec serializes"),
            data: plan,
            memory,
            time,
            notes,
        })
    }

    /// The job's datasets read as its run reads them; None when the base model is not here.
    async fn plan_data(
        &self,
        checked: &Checked,
    ) -> Result<Option<crate::finetune::preflight::DataPlan>, IntakeError> {
        let Some(model_dir) = checked.model_dir.clone() else {
            return Ok(None);
        };
        let spec = checked.spec.clone();
        let train = self
            .local_file(spec.training_file.as_deref().unwrap_or_default())
            .await
            .map_err(JobsError::from)?;
        let valid = match spec.validation_file.as_deref() {
            Some(f) => Some(self.local_file(f).await.map_err(JobsError::from)?),
            None => None,
        };
        let plan = blocking(move || {
            crate::finetune::preflight::plan_data(&model_dir, &spec, &train, valid.as_deref())
        })
        .await?;
        // Files were checked at upload; what fails here is the model's tokenizer or template.
        plan.map(Some).map_err(|e| {
            IntakeError::InvalidFile(format!(
                "reading the job's files with the model's tokenizer: {e}"
            ))
        })
    }

    /// The estimated peak on each worker device, against what a job may use there.
    fn memory_fits(
        &self,
        checked: &Checked,
        step: &crate::finetune::preflight::StepShape,
    ) -> Vec<DeviceFit> {
        use crate::finetune::preflight::{device_memory, estimate_memory, DeviceKind};
        let Some(config) = &checked.config else {
            return Vec::new();
        };
        let mut devices = self.config.workers.devices.clone();
        devices.dedup();
        devices
            .into_iter()
            .map(|device| {
                let m = estimate_memory(
                    config,
                    &checked.spec,
                    &checked.lora,
                    DeviceKind::of(&device),
                    step,
                );
                let available = match self.config.workers.memory_gib {
                    Some(gib) => Some((gib * (1u64 << 30) as f64) as u64),
                    None => device_memory(&device),
                };
                DeviceFit {
                    fits: available.map(|a| m.total <= a),
                    device,
                    estimated_peak_bytes: m.total,
                    weights_bytes: m.weights,
                    adapter_bytes: m.adapter,
                    activation_bytes: m.activations,
                    workspace_bytes: m.workspace,
                    available_bytes: available,
                }
            })
            .collect()
    }

    /// Seconds of training: at the throughput an earlier job on the same model measured, or
    /// from the model's FLOPs per token.
    async fn time_estimate(
        &self,
        checked: &Checked,
        plan: &crate::finetune::preflight::DataPlan,
    ) -> Result<TimeEstimate, IntakeError> {
        let work = plan.tokens as f64 * plan.epochs;
        let model = checked.spec.model.clone().unwrap_or_default();
        if let Some((job, tps)) = self.store.measured_throughput(&model).await? {
            return Ok(TimeEstimate {
                estimated_seconds: work / tps,
                tokens_per_second: tps,
                basis: "measured",
                from_job: Some(job),
            });
        }
        let seq = plan.largest_step.longest;
        let flops = checked.config.as_ref().map_or(0.0, |c| {
            crate::finetune::preflight::flops_per_token(c, &checked.spec, seq)
        });
        // Nominal speeds: an H200-class GPU in bf16 (qlorad's measured 8B rate), and
        // 30 GFLOP/s per core in f32 on the CPU.
        let gpu = self
            .config
            .workers
            .devices
            .iter()
            .any(|d| d.starts_with("cuda"));
        let speed = if gpu {
            400e12
        } else {
            30e9 * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
        };
        let tps = if flops > 0.0 { speed / flops } else { 0.0 };
        Ok(TimeEstimate {
            estimated_seconds: if tps > 0.0 { work / tps } else { 0.0 },
            tokens_per_second: tps,
            basis: "shapes",
            from_job: None,
        })
    }

    /// Validate a spec (as JSON) and check its model and files, as a create does.
    async fn check_job(
        &self,
        body: serde_json::Value,
        scope: Scope<'_>,
    ) -> Result<Checked, IntakeError> {
        let Some(body) = body.as_object() else {
            return Err(IntakeError::NotAnObject);
        };
        // Every spec field has a default, so an explicit null means the default.
        let mut spec = JobSpec::from_value(without_nulls(body)).map_err(IntakeError::Spec)?;
        let named = spec.model.as_deref().ok_or(IntakeError::Missing("model"))?;
        let source = self.model_source(named, scope).await?;
        if let Some(adapter) = &source.adapter {
            same_lora_shape(body, adapter, named)?;
            // The stored spec says the shape the job trains: its adapter's.
            if let Ok(cfg) = crate::lora::peft::read_config(adapter) {
                spec.lora.r = cfg.r;
                spec.lora.alpha = cfg.alpha;
                spec.lora.target_modules = cfg.target_modules;
                spec.lora.use_rslora = cfg.use_rslora;
            }
        }
        let model = source.base.as_str();
        let mut model_dir = self.layout.model(model);
        if model_dir.is_none() {
            let Some((hub, r)) = self.layout.hub_model(model) else {
                return Err(IntakeError::UnknownModel {
                    field: "model",
                    name: model.into(),
                });
            };
            // Asked now, so a missing or gated repository is this request's error and not a
            // failed job; the download is the worker's.
            model_dir = hub.cached(&r);
            let (hub, r) = (hub.clone(), r.clone());
            blocking(move || hub.check(&r))
                .await?
                .map_err(IntakeError::Hub)?;
        }
        let train = spec
            .training_file
            .as_deref()
            .ok_or(IntakeError::Missing("training_file"))?;
        let mut train_bytes = 0;
        for (field, id) in [
            ("training_file", Some(train)),
            ("validation_file", spec.validation_file.as_deref()),
        ] {
            if let Some(id) = id {
                // Another key's file is as unknown as a missing one.
                let Ok(file) = self.store.file(id, scope).await else {
                    return Err(IntakeError::UnknownFile {
                        field,
                        id: id.into(),
                    });
                };
                if field == "training_file" {
                    train_bytes = file.bytes;
                }
                let pairs = file.format == crate::data::DataFormat::Preference.as_str();
                let dpo = spec.method.dpo().is_some();
                if pairs != dpo {
                    let message = if dpo {
                        format!(
                            "method dpo trains on preference pairs, and {id} holds {} records",
                            file.format
                        )
                    } else {
                        format!("{id} holds preference pairs, which train with method dpo")
                    };
                    return Err(IntakeError::Spec(SpecError::new(field, message)));
                }
            }
        }
        let lora = spec.lora.config();
        // A config that cannot be read leaves the estimate out; the run reports why.
        let config = match model_dir.clone() {
            Some(dir) => {
                blocking(move || crate::model::config::ModelConfig::load(&dir).ok()).await?
            }
            None => None,
        };
        if let Some(c) = &config {
            check_architecture(&spec, c)?;
        }
        Ok(Checked {
            spec,
            model_dir,
            config,
            lora,
            train_bytes,
        })
    }

    /// A fresh upload id and its staging path (the files directory created).
    pub async fn stage_upload(&self) -> Result<StagedUpload, JobsError> {
        let id = format!("file-{}", uuid::Uuid::new_v4().simple());
        tokio::fs::create_dir_all(self.layout.files_dir()).await?;
        let path = self.layout.staged_file(&id);
        Ok(StagedUpload { id, path })
    }

    /// Drop an upload that will not be ingested.
    pub async fn discard_upload(&self, up: &StagedUpload) {
        let _ = tokio::fs::remove_file(&up.path).await;
    }

    /// Check a received upload record by record (as `format`, or detected), count its tokens
    /// with `model`'s tokenizer when asked, and record it. The file is removed on any error.
    pub async fn ingest_file(
        &self,
        up: StagedUpload,
        filename: String,
        bytes: u64,
        format: Option<&str>,
        model: Option<&str>,
        owner: &str,
    ) -> Result<FileRow, IntakeError> {
        let result = self
            .check_upload(&up, filename, bytes, format, model, owner)
            .await;
        if result.is_err() {
            self.discard_upload(&up).await;
        }
        result
    }

    async fn check_upload(
        &self,
        up: &StagedUpload,
        filename: String,
        bytes: u64,
        format: Option<&str>,
        model: Option<&str>,
        owner: &str,
    ) -> Result<FileRow, IntakeError> {
        let format = match format {
            Some(f) => Some(f.parse().map_err(IntakeError::InvalidFormat)?),
            None => None,
        };
        // Messages name the user's file, not the staging path.
        let staged = up.path.display().to_string();
        let named = |e: String| IntakeError::InvalidFile(e.replace(&staged, &filename));
        let path = up.path.clone();
        let (format, examples) = blocking(move || {
            crate::data::visit_records(&path, format, |_, _| Ok(())).map_err(|e| e.to_string())
        })
        .await?
        .map_err(named)?;
        let tokens = match model {
            Some(m) => {
                let dir = self
                    .layout
                    .model(m)
                    .ok_or_else(|| IntakeError::UnknownModel {
                        field: "model",
                        name: m.into(),
                    })?;
                let path = up.path.clone();
                let counted = blocking(move || -> Result<usize, String> {
                    let tok = crate::data::TextTokenizer::load(&dir).map_err(|e| e.to_string())?;
                    let opts = crate::data::EncodeOptions {
                        format: Some(format),
                        max_seq_len: usize::MAX,
                        ..Default::default()
                    };
                    let summary = if format == crate::data::DataFormat::Preference {
                        crate::data::encode_preferences(&path, &tok, &opts).map(|r| r.1)
                    } else {
                        crate::data::encode_dataset(&path, &tok, &opts).map(|r| r.1)
                    };
                    Ok(summary.map_err(|e| e.to_string())?.tokens)
                })
                .await?
                .map_err(named)?;
                Some(counted as i64)
            }
            None => None,
        };
        let row = FileRow {
            id: up.id.clone(),
            filename,
            bytes: bytes as i64,
            format: format.as_str().into(),
            examples: examples as i64,
            tokens,
            created_at: now(),
        };
        let file = self.layout.file(&up.id);
        tokio::fs::rename(&up.path, &file)
            .await
            .map_err(JobsError::from)?;
        // Shared before it is listed: a job on another host never names a file it cannot read.
        if let Err(e) = self.share_file(&file).await {
            let _ = tokio::fs::remove_file(&file).await;
            return Err(JobsError::from(e).into());
        }
        if let Err(e) = self.store.insert_file(&row, owner).await {
            let _ = self.unshare_file(&row.id).await;
            let _ = tokio::fs::remove_file(&file).await;
            return Err(e.into());
        }
        Ok(row)
    }

    /// Delete a finished job of `scope`, with its directory.
    pub async fn delete_job(&self, id: &str, scope: Scope<'_>) -> Result<(), JobsError> {
        self.store.delete_job(id, scope).await?;
        let _ = tokio::fs::remove_dir_all(self.layout.job_dir(id)).await;
        if let Err(e) = self.unshare_job(id).await {
            tracing::warn!(job.id = %id, error = %e, "removing the job's shared files");
        }
        Ok(())
    }

    /// Delete a dataset of `scope` that no queued or running job uses, with its file.
    pub async fn delete_file(&self, id: &str, scope: Scope<'_>) -> Result<(), JobsError> {
        self.store.delete_file(id, scope).await?;
        let _ = tokio::fs::remove_file(self.layout.file(id)).await;
        if let Err(e) = self.unshare_file(id).await {
            tracing::warn!(file.id = %id, error = %e, "removing the file's shared copy");
        }
        Ok(())
    }

    /// Cancel a job: a queued one at once, a running one at its next checkpoint.
    pub async fn cancel_job(&self, id: &str, scope: Scope<'_>) -> Result<JobRow, JobsError> {
        if let Some(e) = self.store.request_cancel(id, scope).await? {
            self.hub.publish(id, &e);
        }
        self.store.job(id, scope).await
    }

    /// What a job's `model` trains: the base by name and, for a fine-tuned model or one of its
    /// checkpoints (`ft:…:<job>[:ckpt-step-N]`, another job of the caller's), the adapter it
    /// continues from.
    pub async fn model_source(
        &self,
        model: &str,
        scope: Scope<'_>,
    ) -> Result<ModelSource, IntakeError> {
        let Some(ft) = FineTuned::parse(model) else {
            return Ok(ModelSource {
                base: model.to_string(),
                adapter: None,
            });
        };
        let unknown = || IntakeError::UnknownModel {
            field: "model",
            name: model.into(),
        };
        let Ok(src) = self.store.job(ft.job, scope).await else {
            return Err(unknown());
        };
        let base = src.spec["model"].as_str().unwrap_or_default();
        // The source's own base: a continued job names the model it started from.
        let base = FineTuned::parse(base).map_or(base, |f| f.base).to_string();
        if base != ft.base {
            return Err(unknown());
        }
        let adapter = match ft.step {
            None if src.status != Status::Succeeded => {
                return Err(IntakeError::Continue(format!(
                    "model {model:?}: job {} is {}; only a succeeded job's model continues (or name one of its checkpoints)",
                    ft.job,
                    src.status.as_str()
                )))
            }
            None => self.layout.artifacts_dir(ft.job).join("adapter"),
            Some(step) => crate::train::checkpoint::checkpoint_dir(&self.layout.run_dir(ft.job), step),
        };
        self.local_dir(&adapter).await.map_err(JobsError::from)?;
        if !adapter.join("adapter_config.json").is_file() {
            return Err(IntakeError::Continue(format!(
                "model {model:?}: the adapter of job {} is no longer kept{}",
                ft.job,
                ft.step
                    .map(|s| format!(" at step {s} (see its checkpoints)"))
                    .unwrap_or_default()
            )));
        }
        Ok(ModelSource {
            base,
            adapter: Some(adapter),
        })
    }

    /// Pause a queued job at once, a running one at its next step (it checkpoints first).
    pub async fn pause_job(&self, id: &str, scope: Scope<'_>) -> Result<JobRow, JobsError> {
        if let Some(e) = self.store.request_pause(id, scope).await? {
            self.hub.publish(id, &e);
        }
        self.store.job(id, scope).await
    }

    /// Queue a paused job again; it continues from its checkpoint, exactly.
    pub async fn resume_job(&self, id: &str, scope: Scope<'_>) -> Result<JobRow, JobsError> {
        let e = self.store.resume(id, scope).await?;
        self.hub.publish(id, &e);
        self.workers.wake.notify_waiters();
        self.store.job(id, scope).await
    }
}

/// A base model and, when a job continues another's training, the adapter it starts from.
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub base: String,
    pub adapter: Option<PathBuf>,
}

/// A continued job keeps its adapter's shape: a `lora.r` or `lora.alpha` in the request that
/// differs from the adapter's is an error naming that field.
fn same_lora_shape(
    body: &serde_json::Map<String, serde_json::Value>,
    adapter: &std::path::Path,
    model: &str,
) -> Result<(), IntakeError> {
    let path = adapter.join("adapter_config.json");
    let Some(cfg) = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return Err(IntakeError::Continue(format!(
            "model {model:?}: its adapter configuration cannot be read"
        )));
    };
    let lora = body.get("lora").and_then(|l| l.as_object());
    for (field, key) in [("r", "r"), ("alpha", "lora_alpha")] {
        let (Some(asked), Some(has)) = (
            lora.and_then(|l| l.get(field)).and_then(|v| v.as_f64()),
            cfg.get(key).and_then(|v| v.as_f64()),
        ) else {
            continue;
        };
        if asked != has {
            return Err(IntakeError::Spec(SpecError::new(
                &format!("lora.{field}"),
                format!("{model} continues an adapter with {field} {has}; a continued job keeps its adapter's shape (leave lora.{field} out)"),
            )));
        }
    }
    Ok(())
}

/// Why no worker's device holds a job, with what would change that.
fn too_large(fits: &[DeviceFit]) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let each: Vec<String> = fits
        .iter()
        .map(|f| {
            format!(
                "{:.2} GiB on {} ({:.2} GiB available)",
                gib(f.estimated_peak_bytes),
                f.device,
                gib(f.available_bytes.unwrap_or(0))
            )
        })
        .collect();
    format!(
        "the job needs an estimated {}: fewer tokens a step (hyperparameters.batch_size, max_seq_len), gradient_checkpointing or a smaller model would fit (POST /jobs?dry_run=true shows the estimate)",
        each.join(", ")
    )
}

/// Run file work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, IntakeError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        JobsError::Io(std::io::Error::other(format!(
            "a checking task failed: {e}"
        )))
        .into()
    })
}

/// The object without its null members, at every level of nested objects.
fn without_nulls(o: &serde_json::Map<String, serde_json::Value>) -> serde_json::Value {
    serde_json::Value::Object(
        o.iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                serde_json::Value::Object(inner) => (k.clone(), without_nulls(inner)),
                other => (k.clone(), other.clone()),
            })
            .collect(),
    )
}
