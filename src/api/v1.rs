//! `/v1`: OpenAI's fine-tuning API (files, fine-tuning jobs, events, checkpoints) over the same
//! store as the native routes. Objects carry OpenAI's names and fields (`created_at` in Unix
//! seconds, `object`, list envelopes with `has_more`); errors are OpenAI's error object. qlorad's
//! own job options ride along as extra request fields.

pub mod chat;
pub mod files;
pub mod fine_tuning;

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use serde::Serialize;
use utoipa::ToSchema;

use super::{ApiError, ApiResult};

/// `limit` as OpenAI takes it: 1 to `max`, `default` when absent.
fn page_limit(limit: Option<i64>, default: i64, max: i64) -> ApiResult<i64> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad(
            "invalid_limit",
            format!("limit must be between 1 and {max}, got {n}"),
            Some("limit"),
        )),
    }
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    super::jobs::query(q)
}

/// A cursor page: OpenAI's list envelope.
#[derive(Serialize, ToSchema)]
pub struct Page<T> {
    /// Always `list`.
    pub object: String,
    pub data: Vec<T>,
    /// Whether another page follows (pass `last_id` as `after`).
    pub has_more: bool,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
}

impl<T> Page<T> {
    /// `rows` holds up to `limit + 1` items; the extra one only says that more follow.
    fn new(mut rows: Vec<T>, limit: i64, id: impl Fn(&T) -> String) -> Self {
        let has_more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        Page {
            object: "list".into(),
            first_id: rows.first().map(&id),
            last_id: rows.last().map(&id),
            data: rows,
            has_more,
        }
    }
}
