//! Per-request and per-key limits beyond the body sizes: how long a request may take to answer,
//! and how many event streams a key may hold open. Exceeding one is a 408 or 429 that says which
//! limit and how to stay under it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// Open SSE streams per owner.
#[derive(Clone, Default)]
pub struct StreamSlots {
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open stream; dropping it (the stream ends or the client goes away) frees the slot.
pub struct StreamSlot {
    slots: StreamSlots,
    owner: String,
}

impl StreamSlots {
    /// Take a slot for `owner`, or a 429 if it holds `max` already.
    pub fn acquire(&self, owner: &str, max: usize) -> Result<StreamSlot, ApiError> {
        let mut m = self.open.lock().expect("stream slots lock");
        let n = m.entry(owner.to_string()).or_default();
        if *n >= max {
            return Err(ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                code: "too_many_streams",
                message: format!(
                    "this key already has {max} event streams open (limits.max_event_streams_per_key); close one first"
                ),
                param: None,
            });
        }
        *n += 1;
        Ok(StreamSlot {
            slots: self.clone(),
            owner: owner.to_string(),
        })
    }

    /// Streams `owner` holds open now.
    pub fn open(&self, owner: &str) -> usize {
        let m = self.open.lock().expect("stream slots lock");
        m.get(owner).copied().unwrap_or(0)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut m = self.slots.open.lock().expect("stream slots lock");
        if let Some(n) = m.get_mut(&self.owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.owner);
            }
        }
    }
}

fn is_upload(req: &Request) -> bool {
    req.method() == Method::POST && matches!(req.uri().path(), "/files" | "/v1/files")
}

/// Middleware: a request that has not produced its response head in time gets a 408. Streams
/// and downloads are not cut off: their handlers answer at once and the body follows.
pub async fn time_limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limits = &state.config.limits;
    let generation = req.method() == Method::POST
        && matches!(req.uri().path(), "/v1/chat/completions" | "/v1/completions");
    let seconds = if is_upload(&req) {
        limits.upload_timeout_seconds
    } else if generation {
        // The handler answers 408 itself at inference.timeout_seconds, naming that setting.
        state.config.inference.timeout_seconds + 5
    } else {
        limits.request_timeout_seconds
    };
    match tokio::time::timeout(Duration::from_secs(seconds.max(1)), next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            code: "timeout",
            message: format!(
                "the request took longer than {seconds} s (limits.request_timeout_seconds); retry later"
            ),
            param: None,
        }
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_owner_and_freed_on_drop() {
        let slots = StreamSlots::default();
        let a1 = slots.acquire("a", 2).unwrap();
        let _a2 = slots.acquire("a", 2).unwrap();
        let e = slots.acquire("a", 2).err().unwrap();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(e.message.contains("max_event_streams_per_key"));
        let _b = slots.acquire("b", 2).unwrap();
        drop(a1);
        assert_eq!(slots.open("a"), 1);
        let _a3 = slots.acquire("a", 2).unwrap();
        assert_eq!(slots.open("a"), 2);
    }
}
