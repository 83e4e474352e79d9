//! The job queue and its workers: a SQLite store, claiming, running the trainer on a dedicated
//! thread, events (stored, then broadcast), leases, cancellation, resume, artifacts.

pub mod runner;
pub mod stats;
pub mod store;
pub mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

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
}

pub type Result<T> = std::result::Result<T, JobsError>;

/// The one status enum, stored as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub const ALL: [Status; 5] = [
        Status::Queued,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Cancelled,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Status::Queued,
            "running" => Status::Running,
            "succeeded" => Status::Succeeded,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }
}

/// A stored job event, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Event {
    /// Counts from 1 per job, without gaps; the SSE `id:`.
    pub seq: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// status, metrics, checkpoint, artifact or log; the SSE `event:`.
    #[serde(rename = "type")]
    pub kind: String,
    /// info, warning or error.
    pub level: String,
    pub message: String,
    /// Depends on `type`: `status`; `step`, `loss`, `learning_rate`, ...; `name`, `bytes`, `sha256`.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// Live fan-out of events per job; subscribers replay from the store first.
#[derive(Clone, Default)]
pub struct EventHub {
    channels: Arc<Mutex<HashMap<String, broadcast::Sender<Event>>>>,
}

impl EventHub {
    pub fn subscribe(&self, job: &str) -> broadcast::Receiver<Event> {
        let mut m = self.channels.lock().expect("hub lock");
        m.entry(job.to_string())
            .or_insert_with(|| broadcast::channel(1024).0)
            .subscribe()
    }

    pub fn publish(&self, job: &str, e: &Event) {
        let m = self.channels.lock().expect("hub lock");
        if let Some(tx) = m.get(job) {
            let _ = tx.send(e.clone());
        }
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
