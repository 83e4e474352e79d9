//! Worker tasks: one per device. Each claims a job, runs it on its own thread, records and
//! broadcasts its events, renews its lease, honours cancellation and shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use super::stats::{RunMeter, WorkerStats};
use super::store::{ArtifactRow, Progress, StopRequest};
use super::{now, EventKind, Level, Result, Scope, Service, Status};
use crate::finetune::{self, JobSpec, Plan, RunEvent, Split};
use crate::train::TrainEvent;

/// Shared by the API (to wake workers) and the server (to wait for them on shutdown).
#[derive(Clone)]
pub struct WorkerHandle {
    pub wake: Arc<Notify>,
    pub shutdown: CancellationToken,
    /// Live throughput per worker, for `/metrics`.
    pub stats: WorkerStats,
}

/// The stable part of a worker's name (`cpu#0`), for metrics labels.
fn stats_name(worker: &str) -> String {
    worker
        .rsplit_once('-')
        .map_or(worker, |(head, _)| head)
        .to_string()
}

/// Start one worker per configured device.
pub fn spawn_workers(svc: &Service) -> Vec<JoinHandle<()>> {
    svc.config
        .workers
        .devices
        .iter()
        .enumerate()
        .map(|(i, device)| {
            let name = format!("{device}#{i}-{}", uuid::Uuid::new_v4().simple());
            svc.workers.stats.register(&stats_name(&name), device);
            let (svc, device) = (svc.clone(), device.clone());
            tokio::spawn(async move { worker_task(name, device, svc).await })
        })
        .collect()
}

async fn worker_task(name: String, device: String, svc: Service) {
    let Service {
        config: cfg,
        store,
        hub,
        workers: handle,
        ..
    } = &svc;
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
                    svc: &svc,
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
    svc: &'a Service,
}

/// Store an event, then broadcast it.
async fn record(
    svc: &Service,
    id: &str,
    kind: EventKind,
    message: &str,
    data: serde_json::Value,
) -> Result<()> {
    let e = svc
        .store
        .append_event(id, kind, Level::Info, message, data)
        .await?;
    svc.hub.publish(id, &e);
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
        svc,
    } = *job;
    let Service {
        config: cfg,
        store,
        layout,
        workers: handle,
        ..
    } = svc;
    // A fine-tuned model continues its job's adapter on that job's base.
    let named = serde_json::from_str::<JobSpec>(spec_text)
        .ok()
        .and_then(|s| s.model)
        .unwrap_or_default();
    let source = match svc.model_source(&named, Scope::All).await {
        Ok(s) => s,
        Err(e) => return conclude(job, Ended::fatal(e.to_string()), false).await,
    };
    let model = source.base.clone();
    // A model named by hub id is downloaded first (once: later jobs find it in the cache).
    let downloaded = match layout.hub_model(&model) {
        Some((hub, r)) => {
            let data = serde_json::json!({"model": model});
            if let Err(e) = record(svc, id, EventKind::Log, "downloading the model", data).await {
                return conclude(job, Ended::retryable(e.to_string()), false).await;
            }
            let hub = hub.clone();
            match tokio::task::spawn_blocking(move || hub.fetch(&r, &mut |_, _, _| {})).await {
                Ok(Ok(path)) => Some(path),
                Ok(Err(e)) if e.retryable() => {
                    return conclude(job, Ended::retryable(e.to_string()), false).await
                }
                Ok(Err(e)) => return conclude(job, Ended::fatal(e.to_string()), false).await,
                Err(e) => return conclude(job, Ended::retryable(e.to_string()), false).await,
            }
        }
        None => None,
    };
    // Files and the newest checkpoint another host shared, before the run reads them.
    let fetched = async {
        let spec: JobSpec = serde_json::from_str(spec_text).map_err(std::io::Error::other)?;
        for f in spec.training_file.iter().chain(&spec.validation_file) {
            svc.local_file(f).await?;
        }
        svc.fetch_run(id).await
    };
    match fetched.await {
        Ok(Some(step)) => info!(step, "fetched the newest checkpoint from the object store"),
        Ok(None) => {}
        Err(e) => {
            let ended = Ended::retryable(format!("fetching the job's files: {e}"));
            return conclude(job, ended, false).await;
        }
    }
    let plan = (|| -> std::result::Result<Plan, String> {
        let mut spec: JobSpec =
            serde_json::from_str(spec_text).map_err(|e| format!("stored spec: {e}"))?;
        if spec.device == "cpu" || spec.device.is_empty() {
            spec.device = device.to_string();
        }
        let model_dir = match downloaded {
            Some(path) => path,
            None => layout
                .model(&model)
                .ok_or_else(|| format!("model {model:?} is not in the model roots"))?,
        };
        let training_file = layout.file(spec.training_file.as_deref().unwrap_or_default());
        let validation_file = spec.validation_file.as_deref().map(|f| layout.file(f));
        Ok(Plan {
            run_dir: layout.run_dir(id),
            artifacts_dir: layout.artifacts_dir(id),
            model_dir,
            training_file,
            validation_file,
            init_adapter: source.adapter,
            resume: true,
            base_model_name: Some(model),
            spec,
        })
    })();
    let plan = match plan {
        Ok(p) => p,
        Err(e) => return conclude(job, Ended::fatal(e), false).await,
    };
    // A rerun (after a restart) produces the artifacts again: forget any listed before, so no
    // listing ever names a file being rewritten.
    if let Err(e) = store.clear_artifacts(id).await {
        let ended = Ended::retryable(format!("clearing earlier artifacts: {e}"));
        return conclude(job, ended, false).await;
    }
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Events, each with an acknowledgement the thread waits for when it must know the event
    // is stored (a checkpoint: it becomes resumable only once its history is recorded).
    let (tx, mut rx) = mpsc::channel::<(RunEvent, Option<oneshot::Sender<()>>)>(256);
    let thread_cancel = cancel.clone();
    let span = tracing::Span::current();
    let thread = match std::thread::Builder::new()
        .name(format!("job-{id}"))
        .spawn(move || {
            let _g = span.enter();
            // The worker holds the receiver for the whole run; a send fails only if it is gone.
            let outcome = finetune::run(&plan, &thread_cancel, &mut |e| {
                if let RunEvent::Train(TrainEvent::Checkpoint { .. }) = e {
                    let (ack, stored) = oneshot::channel();
                    if tx.blocking_send((e.clone(), Some(ack))).is_ok() {
                        // An error: the worker gave up recording; the cancel flag stops the run.
                        let _ = stored.blocking_recv();
                    }
                } else {
                    let _ = tx.blocking_send((e.clone(), None));
                }
            });
            match outcome {
                Ok(finetune::Outcome::Finished { .. }) => Ended::Finished,
                Ok(finetune::Outcome::Stopped { .. }) => Ended::Stopped,
                Err(e) => Ended::Failed {
                    retryable: e.retryable(),
                    message: e.to_string(),
                },
            }
        }) {
        Ok(t) => t,
        Err(e) => {
            let ended = Ended::retryable(format!("starting the training thread: {e}"));
            return conclude(job, ended, false).await;
        }
    };
    let mut meter = RunMeter::new(&handle.stats, &stats_name(worker), id);
    let mut heartbeat =
        tokio::time::interval(Duration::from_secs(cfg.workers.heartbeat_seconds.max(1)));
    let mut shutting_down = false;
    // A pause was asked for: a stop at a checkpoint is recorded as `paused`, not `cancelled`.
    let mut pausing = false;
    // The first progress record that could not be stored: the run stops and the job fails.
    let mut broken: Option<String> = None;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some((msg, ack)) = msg else { break };
                if broken.is_some() {
                    continue; // drain until the thread stops
                }
                // Retry through brief faults (a locked or busy database): three tries.
                let mut result = handle_msg(svc, id, &mut meter, &msg).await;
                let mut pause = Duration::from_millis(200);
                for _ in 0..2 {
                    let Err(e) = &result else { break };
                    warn!(job.id = %id, error = %e, "recording progress failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                    result = handle_msg(svc, id, &mut meter, &msg).await;
                }
                match result {
                    Ok(()) => {
                        if let Some(ack) = ack {
                            let _ = ack.send(());
                        }
                    }
                    Err(e) => {
                        warn!(job.id = %id, error = %e, "recording progress failed; stopping the run");
                        broken = Some(format!("recording progress: {e}"));
                        cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
            _ = heartbeat.tick() => {
                match store.heartbeat(id, worker, cfg.workers.lease_seconds as i64).await {
                    Ok(StopRequest::Cancel) => cancel.store(true, Ordering::Relaxed),
                    Ok(StopRequest::Pause) => {
                        pausing = true;
                        cancel.store(true, Ordering::Relaxed);
                    }
                    Ok(StopRequest::None) => {}
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
    let ended = join_run(thread).await;
    let ended = match broken {
        // The store refused progress records: likely a full disk or a busy database.
        Some(e) => Ended::retryable(e),
        None if pausing && ended == Ended::Stopped => Ended::Paused,
        None => ended,
    };
    let ended = match ended {
        Ended::Finished => match write_result_file(svc, id).await {
            Ok(()) => Ended::Finished,
            Err(e) => Ended::retryable(format!("writing the result file: {e}")),
        },
        other => other,
    };
    conclude(job, ended, shutting_down).await
}

/// OpenAI's step metrics file of a finished run, as a file of the job's owner listed in the
/// job's `result_files`: `step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy`,
/// a row per step, the validation columns where an evaluation ran. qlorad measures no accuracy
/// on training batches, so that column stays empty.
async fn write_result_file(svc: &Service, id: &str) -> Result<()> {
    let mut rows: std::collections::BTreeMap<i64, [Option<f64>; 3]> = Default::default();
    for e in svc.store.events(id, 0, i64::MAX).await? {
        let (Some(step), EventKind::Metrics) = (e.data["step"].as_i64(), e.kind) else {
            continue;
        };
        let row = rows.entry(step).or_default();
        if let Some(loss) = e.data["loss"].as_f64() {
            row[0] = Some(loss);
        }
        if let Some(loss) = e.data["eval_loss"].as_f64() {
            row[1] = Some(loss);
            row[2] = e.data["eval_accuracy"].as_f64();
        }
    }
    let cell = |v: Option<f64>| v.map(|x| format!("{x:.5}")).unwrap_or_default();
    let mut csv =
        String::from("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n");
    for (step, [train, valid, valid_acc]) in &rows {
        csv.push_str(&format!(
            "{step},{},,{},{}\n",
            cell(*train),
            cell(*valid),
            cell(*valid_acc)
        ));
    }
    let file_id = format!("file-{}", uuid::Uuid::new_v4().simple());
    let (staged, path) = (svc.layout.staged_file(&file_id), svc.layout.file(&file_id));
    tokio::fs::create_dir_all(svc.layout.files_dir()).await?;
    tokio::fs::write(&staged, csv.as_bytes()).await?;
    tokio::fs::rename(&staged, &path).await?;
    svc.share_file(&path).await?;
    let row = super::store::FileRow {
        id: file_id,
        filename: "step_metrics.csv".into(),
        bytes: csv.len() as i64,
        format: "csv".into(),
        examples: rows.len() as i64,
        tokens: None,
        created_at: now(),
    };
    svc.store.add_result_file(id, &row).await
}

/// How a run ended, as the worker records it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ended {
    Finished,
    /// Stopped by the cancel flag (a cancel, or shutdown) after writing a checkpoint.
    Stopped,
    /// Stopped at a checkpoint because a pause was asked for.
    Paused,
    /// `retryable`: another attempt could succeed (see `FinetuneError::retryable`).
    Failed {
        message: String,
        retryable: bool,
    },
}

impl Ended {
    fn fatal(message: String) -> Self {
        Ended::Failed {
            message,
            retryable: false,
        }
    }

    fn retryable(message: String) -> Self {
        Ended::Failed {
            message,
            retryable: true,
        }
    }
}

/// Wait for the training thread without blocking the runtime; a panic becomes a failure that
/// carries the panic's message.
pub(crate) async fn join_run(thread: std::thread::JoinHandle<Ended>) -> Ended {
    match tokio::task::spawn_blocking(move || thread.join()).await {
        Ok(Ok(ended)) => ended,
        Ok(Err(panic)) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Ended::fatal(format!("the training thread panicked: {what}"))
        }
        Err(e) => Ended::fatal(format!("waiting for the training thread: {e}")),
    }
}

/// Record how the run ended, retrying until the store takes it: a full disk or an unavailable
/// database must not leave the job running forever. On shutdown the retries stop and the next
/// start requeues the job. A retryable failure queues the job again while it has attempts left;
/// it resumes from its last checkpoint.
async fn conclude(job: &Claimed<'_>, ended: Ended, shutting_down: bool) {
    let attempts = match &ended {
        Ended::Failed {
            retryable: true, ..
        } => job
            .svc
            .store
            .job(job.id, Scope::All)
            .await
            .map(|j| j.attempts)
            .unwrap_or(i64::MAX),
        _ => 0,
    };
    let max_attempts = i64::from(job.svc.config.workers.max_attempts.max(1));
    let (to, message, error) = match &ended {
        Ended::Finished => (Status::Succeeded, "succeeded".to_string(), None),
        // Shutdown: the job checkpointed and waits for the next start.
        Ended::Stopped if shutting_down => (
            Status::Queued,
            "queued (server shutting down; resumes from its checkpoint)".to_string(),
            None,
        ),
        Ended::Stopped => (Status::Cancelled, "cancelled".to_string(), None),
        Ended::Paused => (
            Status::Paused,
            "paused at its checkpoint; resume to continue".to_string(),
            None,
        ),
        Ended::Failed {
            message: e,
            retryable: true,
        } if attempts < max_attempts => {
            warn!(job.id = %job.id, error = %e, attempts, "run failed; queued again");
            let message = format!(
                "queued again after attempt {attempts} of {max_attempts} failed: {e}; resumes from its last checkpoint"
            );
            (Status::Queued, message, None)
        }
        Ended::Failed { message: e, .. } => {
            warn!(job.id = %job.id, error = %e, "job failed");
            (Status::Failed, format!("failed: {e}"), Some(e.as_str()))
        }
    };
    let mut pause = Duration::from_millis(200);
    loop {
        match job
            .svc
            .store
            .finish(job.id, job.worker, to, error, &message)
            .await
        {
            Ok(Some(e)) => return job.svc.hub.publish(job.id, &e),
            Ok(None) => return, // no longer ours (requeued after a lost lease)
            Err(e) => {
                warn!(job.id = %job.id, error = %e, "recording the job's end failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = job.svc.workers.shutdown.cancelled() => return,
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn handle_msg(svc: &Service, id: &str, meter: &mut RunMeter, msg: &RunEvent) -> Result<()> {
    match msg.clone() {
        RunEvent::Data { split, summary } => {
            let message = match split {
                Split::Training => "training data",
                Split::Validation => "validation data",
            };
            let data = serde_json::to_value(&summary).unwrap_or_default();
            record(svc, id, EventKind::Log, message, data).await
        }
        RunEvent::Packed(summary) => {
            let message = format!(
                "packed {} examples into {} rows ({:.1} a row, {:.0}% full)",
                summary.examples,
                summary.rows,
                summary.examples_per_row,
                summary.fill * 100.0
            );
            let data = serde_json::to_value(summary).unwrap_or_default();
            record(svc, id, EventKind::Log, &message, data).await
        }
        RunEvent::Samples { step, samples } => {
            let message = format!("answers to {} eval prompts at step {step}", samples.len());
            let data = serde_json::json!({"step": step, "samples": samples});
            record(svc, id, EventKind::Log, &message, data).await
        }
        RunEvent::Reference { pairs, computed } => {
            let message = if computed {
                format!(
                    "reference log-probabilities of {pairs} pairs computed from the starting model"
                )
            } else {
                format!(
                    "reference log-probabilities of {pairs} pairs read from the run's first start"
                )
            };
            if computed {
                let file = svc.layout.run_dir(id).join(finetune::run::REFERENCE_FILE);
                svc.share_file(&file).await?;
            }
            let data = serde_json::json!({"pairs": pairs, "computed": computed});
            record(svc, id, EventKind::Log, &message, data).await
        }
        RunEvent::Resumed { step, .. } => {
            let message = format!("resumed from checkpoint at step {step}");
            let data = serde_json::json!({"step": step});
            record(svc, id, EventKind::Log, &message, data).await
        }
        RunEvent::Exporting => {
            let data = serde_json::json!({});
            record(svc, id, EventKind::Log, "exporting", data).await
        }
        RunEvent::Artifact {
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
            svc.share_file(&svc.layout.artifacts_dir(id).join(&name))
                .await?;
            svc.store.add_artifact(id, &row).await?;
            record(
                svc,
                id,
                EventKind::Artifact,
                &format!("artifact {name}"),
                serde_json::json!({"name": name, "bytes": bytes, "sha256": sha256}),
            )
            .await
        }
        RunEvent::Train(e) => match e {
            TrainEvent::Started {
                total_steps,
                start_step,
                examples,
            } => {
                meter.started(start_step);
                svc.store
                    .reset_trained_tokens(id, start_step as i64)
                    .await?;
                record(svc, id, EventKind::Log, "training started", serde_json::json!({"total_steps": total_steps, "start_step": start_step, "examples": examples})).await
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
                preference,
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
                svc.store.update_progress(id, &p, tokens as i64).await?;
                let mut data = serde_json::json!({"step": step, "total_steps": total_steps, "loss": loss, "learning_rate": learning_rate,
                    "grad_norm": grad_norm, "tokens": tokens, "tokens_per_second": tokens_per_second, "eta_seconds": eta_seconds, "epoch": epoch});
                if let (Some(m), Some(obj)) = (preference, data.as_object_mut()) {
                    obj.extend(m.fields(""));
                }
                record(
                    svc,
                    id,
                    EventKind::Metrics,
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
                preference,
            } => {
                let mut data = serde_json::json!({"step": step, "eval_loss": eval_loss, "eval_accuracy": eval_accuracy, "eval_tokens": eval_tokens});
                if let (Some(m), Some(obj)) = (preference, data.as_object_mut()) {
                    obj.extend(m.fields("eval_"));
                }
                record(
                    svc,
                    id,
                    EventKind::Metrics,
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
                svc.share_checkpoint(&path).await?;
                let loss = svc.store.job(id, Scope::All).await?.progress.last_loss;
                svc.store
                    .add_checkpoint(id, step as i64, &name, loss)
                    .await?;
                record(
                    svc,
                    id,
                    EventKind::Checkpoint,
                    &format!("checkpoint {name}"),
                    serde_json::json!({"step": step, "name": name}),
                )
                .await
            }
            TrainEvent::Finished { step, loss } => {
                record(
                    svc,
                    id,
                    EventKind::Log,
                    "training finished",
                    serde_json::json!({"step": step, "loss": loss}),
                )
                .await
            }
            TrainEvent::Cancelled { step } => {
                record(
                    svc,
                    id,
                    EventKind::Log,
                    "training stopped",
                    serde_json::json!({"step": step}),
                )
                .await
            }
            TrainEvent::EarlyStopped {
                step,
                best_step,
                best_eval_loss,
                patience,
            } => {
                let message = format!(
                    "stopped early at step {step}: the validation loss did not improve for {patience} evaluations; step {best_step} was best ({best_eval_loss:.4})"
                );
                let data = serde_json::json!({"step": step, "best_step": best_step, "best_eval_loss": best_eval_loss});
                record(svc, id, EventKind::Log, &message, data).await
            }
            TrainEvent::BestAdapter { step, eval_loss } => {
                let message = format!(
                    "the adapter of step {step} (validation loss {eval_loss:.4}) is the result"
                );
                let data = serde_json::json!({"best_step": step, "best_eval_loss": eval_loss});
                record(svc, id, EventKind::Log, &message, data).await
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_training_thread_fails_the_run_with_its_message() {
        let t = std::thread::spawn(|| -> Ended { panic!("device lost: {}", 7) });
        match join_run(t).await {
            Ended::Failed { message, .. } => {
                assert_eq!(message, "the training thread panicked: device lost: 7")
            }
            other => panic!("{other:?}"),
        }
        let t = std::thread::spawn(|| -> Ended { std::panic::panic_any(3u8) });
        assert_eq!(
            join_run(t).await,
            Ended::fatal("the training thread panicked: no message".into())
        );
        let t = std::thread::spawn(|| Ended::Finished);
        assert_eq!(join_run(t).await, Ended::Finished);
    }

    async fn service(data_dir: &std::path::Path) -> Service {
        let overrides = crate::config::Overrides {
            data_dir: Some(data_dir.to_path_buf()),
            ..Default::default()
        };
        let config = crate::config::Config::load(None, [], &overrides).unwrap();
        assert_eq!(config.workers.max_attempts, 3);
        Service {
            layout: super::super::Layout::new(&config),
            config: Arc::new(config),
            store: super::super::Store::open(data_dir).await.unwrap(),
            hub: Default::default(),
            objects: None,
            workers: WorkerHandle {
                wake: Default::default(),
                shutdown: CancellationToken::new(),
                stats: Default::default(),
            },
        }
    }

    #[tokio::test]
    async fn a_retryable_failure_requeues_until_the_attempts_run_out() {
        let tmp = tempfile::tempdir().unwrap();
        let svc = service(tmp.path()).await;
        let spec = serde_json::json!({});
        svc.store
            .insert_job("job-a", &spec, 0, &Default::default(), "", 10)
            .await
            .unwrap();
        // Claim the next job and end its run as `ended`.
        let run = |ended: Ended| {
            let svc = &svc;
            async move {
                let (id, _, _) = svc.store.claim("w", 30).await.unwrap().unwrap();
                let job = Claimed {
                    worker: "w",
                    device: "cpu",
                    id: &id,
                    svc,
                };
                conclude(&job, ended, false).await;
            }
        };
        for attempt in 1..=3 {
            run(Ended::retryable("disk full".into())).await;
            let row = svc.store.job("job-a", Scope::All).await.unwrap();
            assert_eq!(row.attempts, attempt);
            let last = svc.store.events_desc("job-a", None, 1).await.unwrap();
            if attempt < 3 {
                assert_eq!(row.status, Status::Queued);
                assert!(last[0].message.starts_with(&format!(
                    "queued again after attempt {attempt} of 3 failed: disk full"
                )));
            } else {
                assert_eq!(row.status, Status::Failed);
                assert_eq!(row.error.as_deref(), Some("disk full"));
            }
        }

        // A failure that would repeat ends the job at its first attempt.
        svc.store
            .insert_job("job-b", &spec, 0, &Default::default(), "", 10)
            .await
            .unwrap();
        run(Ended::fatal("bad data".into())).await;
        let row = svc.store.job("job-b", Scope::All).await.unwrap();
        assert_eq!((row.status, row.attempts), (Status::Failed, 1));
    }
}
