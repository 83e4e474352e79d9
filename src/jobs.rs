//! The job queue and its workers: a SQLite store, claiming, running the trainer on a dedicated
//! thread, events (stored, then broadcast), leases, cancellation, resume, artifacts.

pub mod events;
pub mod inference;
pub mod intake;
pub mod layout;
pub mod objects;
pub mod stats;
pub mod store;
pub mod webhooks;
pub mod worker;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::Config;

pub use events::{Event, EventHub, EventKind, Level};
pub use intake::{DeviceFit, IntakeError, Preflight, TimeEstimate};
pub use layout::Layout;
pub use stats::WorkerStats;
pub use store::{Scope, Store};
pub use worker::{spawn_workers, WorkerHandle};

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A per-key limit (queued jobs) is reached.
    #[error("{0}")]
    Limit(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("configuration: {0}")]
    Config(String),
    /// A stored row the code cannot read back: a bug or a hand-edited database, never the
    /// caller's fault.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, JobsError>;

/// The service below HTTP: the store, the live events, where things are kept, and the workers'
/// handle. The API's handlers parse a request, call one of its operations and map the result.
#[derive(Clone)]
pub struct Service {
    pub config: Arc<Config>,
    pub store: Store,
    pub hub: EventHub,
    pub layout: Layout,
    /// Where files, checkpoints and artifacts are shared between hosts, if anywhere.
    pub objects: Option<objects::Objects>,
    pub workers: WorkerHandle,
}

impl Service {
    /// A job's events after `after` as one stream: stored, then live (see [`events::follow`]).
    /// It ends when this process shuts down: its followers reconnect (to another API process,
    /// or to this one restarted) and resume after the last event they saw.
    pub async fn follow_events(
        &self,
        id: &str,
        after: i64,
    ) -> Result<impl futures::Stream<Item = Event> + Send + 'static> {
        use futures::StreamExt;
        let events = events::follow(&self.store, &self.hub, id, after).await?;
        Ok(events.take_until(self.workers.shutdown.clone().cancelled_owned()))
    }
}

/// The one status enum, stored as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Stopped at a checkpoint on request; `resume` queues it again.
    Paused,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Paused => "paused",
        }
    }

    pub const ALL: [Status; 6] = [
        Status::Queued,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Cancelled,
        Status::Paused,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Status::Queued,
            "running" => Status::Running,
            "succeeded" => Status::Succeeded,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            "paused" => Status::Paused,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }
}

/// A fine-tuned model's name as `/v1` gives it: `ft:<base>:qlorad:<suffix>:<job>`, with
/// `:ckpt-step-<N>` for one of its checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FineTuned<'a> {
    pub base: &'a str,
    pub job: &'a str,
    pub step: Option<usize>,
}

impl<'a> FineTuned<'a> {
    pub fn parse(model: &'a str) -> Option<Self> {
        let (base, tail) = model.strip_prefix("ft:")?.rsplit_once(":qlorad:")?;
        let (tail, step) = match tail.rsplit_once(":ckpt-step-") {
            Some((t, n)) => (t, Some(n.parse().ok()?)),
            None => (tail, None),
        };
        let (_suffix, job) = tail.rsplit_once(':')?;
        (!base.is_empty() && job.starts_with("job-")).then_some(FineTuned { base, job, step })
    }
}

/// A succeeded job's fine-tuned model name. A job that continued a fine-tuned model is named
/// after the base it started from.
pub fn fine_tuned_name(job: &store::JobRow) -> String {
    let model = job.spec["model"].as_str().unwrap_or_default();
    let base = FineTuned::parse(model).map_or(model, |f| f.base);
    format!(
        "ft:{}:qlorad:{}:{}",
        base,
        job.suffix.as_deref().unwrap_or_default(),
        job.id
    )
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
