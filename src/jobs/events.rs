//! A job's events: stored first (gapless `seq` per job), then broadcast to whoever follows the
//! job; [`follow`] replays from the store and goes on with the broadcast as one stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{Result, Status, Store};

/// What an event is about; the SSE `event:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// The job's status changed (`data.status`, and `data.error` for a failure).
    Status,
    /// A training step or an evaluation (`step`, `loss`, `learning_rate`, ...).
    Metrics,
    /// A checkpoint was written (`step`, `name`).
    Checkpoint,
    /// A downloadable file is complete (`name`, `bytes`, `sha256`).
    Artifact,
    /// Anything else worth telling (the datasets read, a resume, exporting).
    Log,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Status => "status",
            EventKind::Metrics => "metrics",
            EventKind::Checkpoint => "checkpoint",
            EventKind::Artifact => "artifact",
            EventKind::Log => "log",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "status" => EventKind::Status,
            "metrics" => EventKind::Metrics,
            "checkpoint" => EventKind::Checkpoint,
            "artifact" => EventKind::Artifact,
            "log" => EventKind::Log,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warning,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "info" => Level::Info,
            "warning" => Level::Warning,
            "error" => Level::Error,
            _ => return None,
        })
    }
}

/// A stored job event, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Event {
    /// Counts from 1 per job, without gaps; the SSE `id:`.
    pub seq: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// The SSE `event:`.
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub level: Level,
    pub message: String,
    /// Depends on `type`: `status`; `step`, `loss`, `learning_rate`, ...; `name`, `bytes`, `sha256`.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

impl Event {
    /// The status event that ends a job (succeeded, failed or cancelled).
    pub fn is_final(&self) -> bool {
        self.kind == EventKind::Status
            && self.data["status"]
                .as_str()
                .and_then(Status::parse)
                .is_some_and(Status::is_final)
    }
}

/// Live fan-out of events per job. A job's channel exists while someone follows it and goes
/// when its final event has been sent or its last follower leaves.
#[derive(Clone, Default)]
pub struct EventHub {
    channels: Arc<Mutex<HashMap<String, broadcast::Sender<Event>>>>,
}

/// A follower's receiver; leaving lets the hub drop a channel nobody follows.
pub struct Subscription {
    rx: broadcast::Receiver<Event>,
    hub: EventHub,
    job: String,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut m = self.hub.channels.lock().expect("hub lock");
        // This receiver is still counted until the struct's fields drop.
        if m.get(&self.job).is_some_and(|tx| tx.receiver_count() <= 1) {
            m.remove(&self.job);
        }
    }
}

impl EventHub {
    pub fn subscribe(&self, job: &str) -> Subscription {
        let mut m = self.channels.lock().expect("hub lock");
        let rx = m
            .entry(job.to_string())
            .or_insert_with(|| broadcast::channel(1024).0)
            .subscribe();
        Subscription {
            rx,
            hub: self.clone(),
            job: job.to_string(),
        }
    }

    pub fn publish(&self, job: &str, e: &Event) {
        let mut m = self.channels.lock().expect("hub lock");
        if let Some(tx) = m.get(job) {
            let _ = tx.send(e.clone());
        }
        // Nothing follows a final event: followers read what is buffered, then see the end.
        if e.is_final() {
            m.remove(job);
        }
    }

    /// Whether anyone follows `job`.
    pub fn is_followed(&self, job: &str) -> bool {
        self.channels.lock().expect("hub lock").contains_key(job)
    }

    /// The jobs someone follows.
    pub fn followed(&self) -> Vec<String> {
        self.channels
            .lock()
            .expect("hub lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Jobs with a live channel.
    pub fn channels(&self) -> usize {
        self.channels.lock().expect("hub lock").len()
    }
}

/// A job's events after `after`: the stored ones, then the live ones as they come (any gap, a
/// lagged receiver's say, filled from the store), ending with the job's final event. A job that
/// has ended yields only what is stored.
pub async fn follow(
    store: &Store,
    hub: &EventHub,
    id: &str,
    after: i64,
) -> Result<impl Stream<Item = Event> + Send + 'static> {
    // Subscribe before replaying so nothing falls between the two.
    let sub = hub.subscribe(id);
    let job = store.job(id, super::Scope::All).await?;
    let replay = store.events(id, after, i64::MAX).await?;
    let finished =
        replay.iter().any(Event::is_final) || (job.status.is_final() && replay.is_empty());
    let last = replay.last().map(|e| e.seq).unwrap_or(after);
    let live = if finished {
        drop(sub);
        stream::empty().left_stream()
    } else {
        let state = (sub, last, false, store.clone(), id.to_string());
        stream::unfold(state, |(mut sub, mut last, done, store, id)| async move {
            if done {
                return None;
            }
            loop {
                let batch = match sub.rx.recv().await {
                    Ok(e) if e.seq <= last => continue,
                    Ok(e) => {
                        let mut batch = if e.seq > last + 1 {
                            store
                                .events(&id, last, e.seq - last - 1)
                                .await
                                .unwrap_or_default()
                        } else {
                            vec![]
                        };
                        batch.push(e);
                        batch
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let batch = store.events(&id, last, i64::MAX).await.unwrap_or_default();
                        if batch.is_empty() {
                            continue;
                        }
                        batch
                    }
                    // The final event went out (or the hub let the channel go): whatever the
                    // store holds past `last` is the rest.
                    Err(broadcast::error::RecvError::Closed) => {
                        let batch = store.events(&id, last, i64::MAX).await.unwrap_or_default();
                        if batch.is_empty() {
                            return None;
                        }
                        batch
                    }
                };
                last = batch.last().map(|x| x.seq).unwrap_or(last);
                let end = batch.iter().any(Event::is_final);
                return Some((stream::iter(batch), (sub, last, end, store, id)));
            }
        })
        .flatten()
        .right_stream()
    };
    Ok(stream::iter(replay).chain(live))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: i64, status: &str) -> Event {
        Event {
            seq,
            created_at: 0,
            kind: EventKind::Status,
            level: Level::Info,
            message: status.into(),
            data: serde_json::json!({ "status": status }),
        }
    }

    #[tokio::test]
    async fn a_channel_lives_while_followed_and_goes_with_the_final_event() {
        let hub = EventHub::default();
        let mut a = hub.subscribe("job-a");
        let b = hub.subscribe("job-a");
        assert_eq!(hub.channels(), 1);
        drop(b);
        assert_eq!(hub.channels(), 1, "a still follows");
        hub.publish("job-a", &event(2, "running"));
        hub.publish("job-a", &event(3, "succeeded"));
        assert_eq!(hub.channels(), 0, "gone with the final event");
        assert_eq!(a.rx.recv().await.unwrap().seq, 2);
        assert_eq!(a.rx.recv().await.unwrap().seq, 3);
        assert!(matches!(
            a.rx.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
        drop(a);

        let c = hub.subscribe("job-b");
        drop(c);
        assert_eq!(hub.channels(), 0, "the last follower leaving drops it");
    }
}
