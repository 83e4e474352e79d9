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
use super::{now, EventHub, Result, Scope, Status, Store};
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
    let mut last_reap = std::time::Instant::now();
    loop {
        if handle.shutdown.is_cancelled() {
            break;
        }
        // A job whose worker stopped renewing its lease (a hung or dead worker) goes back to the
        // queue and resumes from its last checkpoint.
        if last_reap.elapsed() >= Duration::from_secs(cfg.workers.lease_seconds.max(1)) {
            last_reap = std::time::Instant::now();
            match store.requeue_stale(false).await {
                Ok(requeued) => {
                    for (id, e) in requeued {
                        warn!(job.id = %id, "lease expired; queued again");
                        hub.publish(&id, &e);
                    }
                }
                Err(e) => warn!(error = %e, "requeueing expired leases failed; retrying later"),
            }
        }
        match store.claim(&name, cfg.workers.lease_seconds as i64).await {
            Ok(Some((id, spec, running))) => {
                hub.publish(&id, &running);
                let span = info_span!("job", job.id = %id, worker = %name);
                let job = Claimed {
                    worker: &name,
                    device: &device,
                    id: &id,
                    cfg: &cfg,
                    store: &store,
                    hub: &hub,
                    handle: &handle,
                };
                run_claimed(&job, &spec).instrument(span).await;
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
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = handle.shutdown.cancelled() => break,
                }
            }
        }
    }
    info!(worker = %name, "worker stopped");
}

/// A job a worker has claimed, with what the worker runs it with.
struct Claimed<'a> {
    worker: &'a str,
    device: &'a str,
    id: &'a str,
    cfg: &'a Config,
    store: &'a Store,
    hub: &'a EventHub,
    handle: &'a WorkerHandle,
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

/// Run a claimed job to its end. Nothing here gives up on the job: a failure to record
/// progress stops the run and fails the job, and the final status is retried until the store
/// takes it (or the server shuts down, and the next start requeues the job).
async fn run_claimed(job: &Claimed<'_>, spec_text: &str) {
    let Claimed {
        worker,
        device,
        id,
        cfg,
        store,
        hub,
        handle,
    } = *job;
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
        Err(e) => return conclude(job, RunOutcome::Failed(e), false).await,
    };
    // A rerun (after a restart) produces the artifacts again: forget any listed before, so no
    // listing ever names a file being rewritten.
    if let Err(e) = store.clear_artifacts(id).await {
        let outcome = RunOutcome::Failed(format!("clearing earlier artifacts: {e}"));
        return conclude(job, outcome, false).await;
    }
    let cancel = runner::new_cancel();
    let (tx, mut rx) = mpsc::channel::<RunMsg>(256);
    let thread_cancel = cancel.clone();
    let span = tracing::Span::current();
    let thread = match std::thread::Builder::new()
        .name(format!("job-{id}"))
        .spawn(move || {
            let _g = span.enter();
            runner::run(&plan, &thread_cancel, &tx)
        }) {
        Ok(t) => t,
        Err(e) => {
            let outcome = RunOutcome::Failed(format!("starting the training thread: {e}"));
            return conclude(job, outcome, false).await;
        }
    };
    let mut meter = RunMeter::new(&handle.stats, &stats_name(worker), id);
    let mut heartbeat =
        tokio::time::interval(Duration::from_secs(cfg.workers.heartbeat_seconds.max(1)));
    let mut shutting_down = false;
    // The first progress record that could not be stored: the run stops and the job fails.
    let mut broken: Option<String> = None;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                if broken.is_some() {
                    continue; // drain until the thread stops
                }
                // Retry through brief faults (a locked or busy database): three tries.
                let mut result = handle_msg(store, hub, id, &mut meter, &msg).await;
                let mut pause = Duration::from_millis(200);
                for _ in 0..2 {
                    let Err(e) = &result else { break };
                    warn!(job.id = %id, error = %e, "recording progress failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                    result = handle_msg(store, hub, id, &mut meter, &msg).await;
                }
                if let Err(e) = result {
                    warn!(job.id = %id, error = %e, "recording progress failed; stopping the run");
                    broken = Some(format!("recording progress: {e}"));
                    cancel.store(true, Ordering::Relaxed);
                }
            }
            _ = heartbeat.tick() => {
                match store.heartbeat(id, worker, cfg.workers.lease_seconds as i64).await {
                    Ok(true) => cancel.store(true, Ordering::Relaxed),
                    Ok(false) => {}
                    // A busy or briefly unavailable database: the lease outlasts a few misses.
                    Err(e) => warn!(job.id = %id, error = %e, "lease renewal failed; retrying"),
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
    let outcome = join_run(thread).await;
    let outcome = match broken {
        Some(e) => RunOutcome::Failed(e),
        None => outcome,
    };
    conclude(job, outcome, shutting_down).await
}

/// Wait for the training thread without blocking the runtime; a panic becomes a failure that
/// carries the panic's message.
pub(crate) async fn join_run(thread: std::thread::JoinHandle<RunOutcome>) -> RunOutcome {
    match tokio::task::spawn_blocking(move || thread.join()).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(panic)) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            RunOutcome::Failed(format!("the training thread panicked: {what}"))
        }
        Err(e) => RunOutcome::Failed(format!("waiting for the training thread: {e}")),
    }
}

/// Record how the run ended, retrying until the store takes it: a full disk or an unavailable
/// database must not leave the job running forever. On shutdown the retries stop and the next
/// start requeues the job.
async fn conclude(job: &Claimed<'_>, outcome: RunOutcome, shutting_down: bool) {
    let (to, message, error) = match &outcome {
        RunOutcome::Succeeded => (Status::Succeeded, "succeeded".to_string(), None),
        // Shutdown: the job checkpointed and waits for the next start.
        RunOutcome::Stopped if shutting_down => (
            Status::Queued,
            "queued (server shutting down; resumes from its checkpoint)".to_string(),
            None,
        ),
        RunOutcome::Stopped => (Status::Cancelled, "cancelled".to_string(), None),
        RunOutcome::Failed(e) => {
            warn!(job.id = %job.id, error = %e, "job failed");
            (Status::Failed, format!("failed: {e}"), Some(e.as_str()))
        }
    };
    let mut pause = Duration::from_millis(200);
    loop {
        match job
            .store
            .finish(job.id, job.worker, to, error, &message)
            .await
        {
            Ok(Some(e)) => return job.hub.publish(job.id, &e),
            Ok(None) => return, // no longer ours (requeued after a lost lease)
            Err(e) => {
                warn!(job.id = %job.id, error = %e, "recording the job's end failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = job.handle.shutdown.cancelled() => return,
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn handle_msg(
    store: &Store,
    hub: &EventHub,
    id: &str,
    meter: &mut RunMeter,
    msg: &RunMsg,
) -> Result<()> {
    match msg.clone() {
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
                let loss = store.job(id, Scope::All).await?.progress.last_loss;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_training_thread_fails_the_run_with_its_message() {
        let t = std::thread::spawn(|| -> RunOutcome { panic!("device lost: {}", 7) });
        match join_run(t).await {
            RunOutcome::Failed(m) => {
                assert_eq!(m, "the training thread panicked: device lost: 7")
            }
            other => panic!("{other:?}"),
        }
        let t = std::thread::spawn(|| -> RunOutcome { std::panic::panic_any(3u8) });
        assert_eq!(
            join_run(t).await,
            RunOutcome::Failed("the training thread panicked: no message".into())
        );
        let t = std::thread::spawn(|| RunOutcome::Succeeded);
        assert_eq!(join_run(t).await, RunOutcome::Succeeded);
    }
}
