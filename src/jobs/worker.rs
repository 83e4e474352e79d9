//! Worker tasks: one per device. Each claims a job, runs it on its own thread, records and
//! broadcasts its events, renews its lease, honours cancellation and shutdown.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use super::runner::{self, RunMsg, RunOutcome, RunPlan};
use super::stats::{RunMeter, WorkerStats};
use super::store::{ArtifactRow, Progress};
use super::{now, EventHub, Result, Status, Store};
use crate::config::Config;
use crate::train::{JobSpec, TrainEvent};

/// Shared by the API (to wake workers) and the server (to wait for them on shutdown).
#[derive(Clone)]
pub struct WorkerHandle {
    pub wake: Arc<Notify>,
    pub shutdown: CancellationToken,
    /// Live throughput per worker, for `/metrics`.
    pub stats: WorkerStats,
}

/// Resolve a spec's `model` inside the configured roots: a name or a path below a root.
pub fn resolve_model(cfg: &Config, model: &str) -> Option<PathBuf> {
    if model.is_empty() || model.contains("..") {
        return None;
    }
    for root in &cfg.models.roots {
        let candidate = if Path::new(model).is_absolute() {
            PathBuf::from(model)
        } else {
            root.join(model)
        };
        let (Ok(c), Ok(r)) = (candidate.canonicalize(), root.canonicalize()) else {
            continue;
        };
        if c.starts_with(&r) && crate::model::is_model_path(&c) {
            return Some(c);
        }
    }
    None
}

pub fn file_path(cfg: &Config, id: &str) -> PathBuf {
    cfg.storage
        .data_dir
        .join("files")
        .join(format!("{id}.jsonl"))
}

pub fn job_dir(cfg: &Config, id: &str) -> PathBuf {
    cfg.storage.data_dir.join("jobs").join(id)
}

/// The stable part of a worker's name (`cpu#0`), for metrics labels.
fn stats_name(worker: &str) -> String {
    worker
        .rsplit_once('-')
        .map_or(worker, |(head, _)| head)
        .to_string()
}

/// Start one worker per configured device.
pub fn spawn_workers(
    cfg: Arc<Config>,
    store: Store,
    hub: EventHub,
    handle: WorkerHandle,
) -> Vec<JoinHandle<()>> {
    cfg.workers
        .devices
        .iter()
        .enumerate()
        .map(|(i, device)| {
            let name = format!("{device}#{i}-{}", uuid::Uuid::new_v4().simple());
            handle.stats.register(&stats_name(&name), device);
            let (cfg, store, hub, handle, device) = (
                cfg.clone(),
                store.clone(),
                hub.clone(),
                handle.clone(),
                device.clone(),
            );
            tokio::spawn(async move { worker_task(name, device, cfg, store, hub, handle).await })
        })
        .collect()
}

async fn worker_task(
    name: String,
    device: String,
    cfg: Arc<Config>,
    store: Store,
    hub: EventHub,
    handle: WorkerHandle,
) {
    info!(worker = %name, "worker started");
    loop {
        if handle.shutdown.is_cancelled() {
            break;
        }
        match store.claim(&name, cfg.workers.lease_seconds as i64).await {
            Ok(Some((id, spec))) => {
                let span = info_span!("job", job.id = %id, worker = %name);
                if let Err(e) = run_claimed(&name, &device, &id, &spec, &cfg, &store, &hub, &handle)
                    .instrument(span)
                    .await
                {
                    warn!(job.id = %id, error = %e, "job bookkeeping failed");
                }
            }
            Ok(None) => {
                tokio::select! {
                    _ = handle.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = handle.shutdown.cancelled() => break,
                }
            }
            Err(e) => {
                warn!(error = %e, "claim failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    info!(worker = %name, "worker stopped");
}

async fn record(
    store: &Store,
    hub: &EventHub,
    id: &str,
    kind: &str,
    level: &str,
    message: &str,
    data: serde_json::Value,
) -> Result<()> {
    let e = store.append_event(id, kind, level, message, data).await?;
    hub.publish(id, &e);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_claimed(
    worker: &str,
    device: &str,
    id: &str,
    spec_text: &str,
    cfg: &Config,
    store: &Store,
    hub: &EventHub,
    handle: &WorkerHandle,
) -> Result<()> {
    record(
        store,
        hub,
        id,
        "status",
        "info",
        "running",
        serde_json::json!({"status": "running", "worker": worker}),
    )
    .await?;
    let plan = (|| -> std::result::Result<RunPlan, String> {
        let mut spec: JobSpec =
            serde_json::from_str(spec_text).map_err(|e| format!("stored spec: {e}"))?;
        if spec.device == "cpu" || spec.device.is_empty() {
            spec.device = device.to_string();
        }
        let model = spec.model.clone().unwrap_or_default();
        let model_dir = resolve_model(cfg, &model)
            .ok_or_else(|| format!("model {model:?} is not in the model roots"))?;
        let training_file = file_path(cfg, spec.training_file.as_deref().unwrap_or_default());
        let validation_file = spec.validation_file.as_deref().map(|f| file_path(cfg, f));
        Ok(RunPlan {
            job_dir: job_dir(cfg, id),
            model_dir,
            training_file,
            validation_file,
            spec,
        })
    })();
    let plan = match plan {
        Ok(p) => p,
        Err(e) => return fail(store, hub, id, worker, &e).await,
    };
    let cancel = runner::new_cancel();
    let (tx, mut rx) = mpsc::channel::<RunMsg>(256);
    let thread_cancel = cancel.clone();
    let span = tracing::Span::current();
    let thread = std::thread::Builder::new()
        .name(format!("job-{id}"))
        .spawn(move || {
            let _g = span.enter();
            runner::run(&plan, &thread_cancel, &tx)
        })
        .map_err(super::JobsError::Io)?;
    let mut meter = RunMeter::new(&handle.stats, &stats_name(worker), id);
    let mut heartbeat =
        tokio::time::interval(Duration::from_secs(cfg.workers.heartbeat_seconds.max(1)));
    let mut shutting_down = false;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                handle_msg(store, hub, id, &mut meter, msg).await?;
            }
            _ = heartbeat.tick() => {
                if store.heartbeat(id, worker, cfg.workers.lease_seconds as i64).await? {
                    cancel.store(true, Ordering::Relaxed);
                }
            }
            _ = handle.shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                cancel.store(true, Ordering::Relaxed);
            }
        }
    }
    // The worker is idle from here on; say so before the job's final status is visible.
    drop(meter);
    let outcome = tokio::task::spawn_blocking(move || thread.join())
        .await
        .map_err(|e| super::JobsError::Conflict(e.to_string()))?
        .unwrap_or_else(|_| RunOutcome::Failed("the training thread panicked".into()));
    match outcome {
        RunOutcome::Succeeded => {
            transition(store, hub, id, worker, Status::Succeeded, "succeeded", None).await
        }
        // Shutdown: the job checkpointed and waits for the next start.
        RunOutcome::Stopped if shutting_down => {
            let msg = "queued (server shutting down; resumes from its checkpoint)";
            transition(store, hub, id, worker, Status::Queued, msg, None).await
        }
        RunOutcome::Stopped => {
            transition(store, hub, id, worker, Status::Cancelled, "cancelled", None).await
        }
        RunOutcome::Failed(e) => fail(store, hub, id, worker, &e).await,
    }
}

async fn fail(store: &Store, hub: &EventHub, id: &str, worker: &str, error: &str) -> Result<()> {
    warn!(job.id = %id, error, "job failed");
    transition(
        store,
        hub,
        id,
        worker,
        Status::Failed,
        &format!("failed: {error}"),
        Some(error),
    )
    .await
}

/// Move the job out of `running` and, if it was still ours, record the status event.
async fn transition(
    store: &Store,
    hub: &EventHub,
    id: &str,
    worker: &str,
    to: Status,
    message: &str,
    error: Option<&str>,
) -> Result<()> {
    if store.finish(id, worker, to, error).await? {
        let mut data = serde_json::json!({"status": to.as_str()});
        if let Some(e) = error {
            data["error"] = e.into();
        }
        let level = if error.is_some() { "error" } else { "info" };
        record(store, hub, id, "status", level, message, data).await?;
    }
    Ok(())
}

async fn handle_msg(
    store: &Store,
    hub: &EventHub,
    id: &str,
    meter: &mut RunMeter,
    msg: RunMsg,
) -> Result<()> {
    match msg {
        RunMsg::Log { message, data } => {
            record(store, hub, id, "log", "info", &message, data).await
        }
        RunMsg::Artifact {
            name,
            bytes,
            sha256,
        } => {
            let row = ArtifactRow {
                name: name.clone(),
                bytes: bytes as i64,
                sha256: sha256.clone(),
                created_at: now(),
            };
            store.add_artifact(id, &row).await?;
            record(
                store,
                hub,
                id,
                "artifact",
                "info",
                &format!("artifact {name}"),
                serde_json::json!({"name": name, "bytes": bytes, "sha256": sha256}),
            )
            .await
        }
        RunMsg::Train(e) => match e {
            TrainEvent::Started {
                total_steps,
                start_step,
                examples,
            } => {
                meter.started(start_step);
                store.reset_trained_tokens(id, start_step as i64).await?;
                record(store, hub, id, "log", "info", "training started", serde_json::json!({"total_steps": total_steps, "start_step": start_step, "examples": examples})).await
            }
            TrainEvent::Step {
                step,
                total_steps,
                loss,
                learning_rate,
                grad_norm,
                tokens,
                tokens_per_second,
                eta_seconds,
                epoch,
            } => {
                let p = Progress {
                    step: step as i64,
                    total_steps: Some(total_steps as i64),
                    last_loss: Some(loss as f64),
                    tokens_per_second: Some(tokens_per_second),
                    eta_seconds: Some(eta_seconds),
                    trained_tokens: 0,
                };
                meter.step(step, tokens, tokens_per_second);
                store.update_progress(id, &p, tokens as i64).await?;
                let data = serde_json::json!({"step": step, "total_steps": total_steps, "loss": loss, "learning_rate": learning_rate,
                    "grad_norm": grad_norm, "tokens": tokens, "tokens_per_second": tokens_per_second, "eta_seconds": eta_seconds, "epoch": epoch});
                record(
                    store,
                    hub,
                    id,
                    "metrics",
                    "info",
                    &format!("step {step}/{total_steps} loss {loss:.4}"),
                    data,
                )
                .await
            }
            TrainEvent::Eval {
                step,
                eval_loss,
                eval_accuracy,
                eval_tokens,
            } => {
                let data = serde_json::json!({"step": step, "eval_loss": eval_loss, "eval_accuracy": eval_accuracy, "eval_tokens": eval_tokens});
                record(
                    store,
                    hub,
                    id,
                    "metrics",
                    "info",
                    &format!("step {step} eval loss {eval_loss:.4}"),
                    data,
                )
                .await
            }
            TrainEvent::Checkpoint { step, path } => {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let loss = store.job(id).await?.progress.last_loss;
                store.add_checkpoint(id, step as i64, &name, loss).await?;
                record(
                    store,
                    hub,
                    id,
                    "checkpoint",
                    "info",
                    &format!("checkpoint {name}"),
                    serde_json::json!({"step": step, "name": name}),
                )
                .await
            }
            TrainEvent::Finished { step, loss } => {
                record(
                    store,
                    hub,
                    id,
                    "log",
                    "info",
                    "training finished",
                    serde_json::json!({"step": step, "loss": loss}),
                )
                .await
            }
            TrainEvent::Cancelled { step } => {
                record(
                    store,
                    hub,
                    id,
                    "log",
                    "info",
                    "training stopped",
                    serde_json::json!({"step": step}),
                )
                .await
            }
        },
    }
}
