//! Jobs: create from a spec, list, get with progress, cancel, delete; events as JSON pages or
//! Server-Sent Events; checkpoints; artifact downloads with Range and ETag.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::StreamExt;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use utoipa::IntoParams;

use super::auth::Principal;
use super::{ApiError, ApiResult, AppState, ErrorBody};
use crate::jobs::store::{ArtifactRow, CheckpointRow, JobLabels, JobRow};
use crate::jobs::{Event, Status};

super::list_type!(
    /// A page of jobs, newest first.
    JobList,
    JobRow
);
super::list_type!(
    /// A page of a job's events, oldest first.
    EventList,
    Event
);
super::list_type!(
    /// A job's checkpoints by step.
    CheckpointList,
    CheckpointRow
);
super::list_type!(
    /// A job's artifacts by name.
    ArtifactList,
    ArtifactRow
);

/// A JSON body, or a 400/413 that says what is wrong with it.
pub(crate) fn json_body(
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let Json(body) = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                status: e.status(),
                code: "too_large",
                message: e.body_text(),
                param: None,
            }
        } else {
            ApiError::bad("invalid_json", e.body_text(), None)
        }
    })?;
    Ok(body)
}

#[derive(Deserialize, IntoParams, Default)]
#[into_params(parameter_in = Query)]
pub struct DryRunQuery {
    /// Check the spec and its files as a create does and answer the estimate (examples, tokens,
    /// steps, peak memory on each worker device, time), creating nothing.
    pub(crate) dry_run: Option<bool>,
}

/// `POST /jobs`: the spec with defaults filled is stored and echoed back; with `dry_run=true`,
/// the preflight instead.
#[utoipa::path(post, path = "/jobs", tag = "jobs", params(DryRunQuery),
    request_body(content = crate::api::openapi::JobSpecSchema, description = "the job spec; every field but `model` and `training_file` has a default"),
    responses((status = 201, body = JobRow), (status = 200, body = crate::jobs::Preflight, description = "with dry_run=true"),
        (status = 400, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn jobs_create(
    State(state): State<AppState>,
    who: Principal,
    q: Result<Query<DryRunQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<Response> {
    let body = json_body(body)?;
    if query(q)?.dry_run == Some(true) {
        let p = state.jobs.preflight_job(body, who.scope()).await?;
        return Ok(Json(p).into_response());
    }
    let job = create_job(&state, &who, body, JobLabels::default()).await?;
    Ok((StatusCode::CREATED, Json(job)).into_response())
}

/// Validate a spec (as JSON), check its model and files, queue it.
pub(crate) async fn create_job(
    state: &AppState,
    who: &Principal,
    body: serde_json::Value,
    labels: JobLabels,
) -> ApiResult<JobRow> {
    Ok(state
        .jobs
        .create_job(body, labels, who.owner(), who.scope())
        .await?)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs in this status.
    #[param(value_type = Option<Status>)]
    status: Option<String>,
    /// The id of the last job of the previous page.
    after: Option<String>,
    /// Jobs per page, 1 to 100 (default 20).
    limit: Option<i64>,
}

/// A query string, or a 400 naming what is wrong with it.
pub(crate) fn query<T>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<T> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad("invalid_query", e.body_text(), None))
}

/// Jobs, newest first.
#[utoipa::path(get, path = "/jobs", tag = "jobs", params(ListQuery),
    responses((status = 200, body = JobList), (status = 400, body = ErrorBody)))]
pub async fn jobs_list(
    State(state): State<AppState>,
    who: Principal,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<JobList>> {
    let q = query(q)?;
    let status = match &q.status {
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            ApiError::bad(
                "invalid_status",
                format!("unknown status {s:?}"),
                Some("status"),
            )
        })?),
        None => None,
    };
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let mut rows = state
        .jobs
        .store
        .jobs(status, q.after.as_deref(), limit + 1, who.scope())
        .await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok(Json(JobList::new(rows, has_more)))
}

/// One job with its progress.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobRow), (status = 404, body = ErrorBody)))]
pub async fn jobs_get(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<JobRow>> {
    Ok(Json(state.jobs.store.job(&id, who.scope()).await?))
}

/// Cancel: a queued job at once; a running one checkpoints and stops (its status follows).
#[utoipa::path(post, path = "/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobRow), (status = 404, body = ErrorBody)))]
pub async fn jobs_cancel(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<JobRow>> {
    Ok(Json(state.jobs.cancel_job(&id, who.scope()).await?))
}

/// Pause: a queued job at once; a running one writes a checkpoint and stops (status `paused`).
#[utoipa::path(post, path = "/jobs/{id}/pause", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobRow), (status = 404, body = ErrorBody),
        (status = 409, description = "the job has finished", body = ErrorBody)))]
pub async fn jobs_pause(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<JobRow>> {
    Ok(Json(state.jobs.pause_job(&id, who.scope()).await?))
}

/// Resume a paused job: queued again, it continues from its checkpoint as if never paused.
#[utoipa::path(post, path = "/jobs/{id}/resume", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobRow), (status = 404, body = ErrorBody),
        (status = 409, description = "the job is not paused", body = ErrorBody)))]
pub async fn jobs_resume(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<JobRow>> {
    Ok(Json(state.jobs.resume_job(&id, who.scope()).await?))
}

/// Delete a finished job with its files.
#[utoipa::path(delete, path = "/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 204, description = "deleted"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn jobs_delete(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.jobs.delete_job(&id, who.scope()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events after this `seq` (an SSE stream prefers the `Last-Event-ID` header).
    after: Option<i64>,
    /// Events per page, 1 to 1000 (default 100); JSON only.
    limit: Option<i64>,
}

fn sse(e: &Event) -> SseEvent {
    SseEvent::default()
        .id(e.seq.to_string())
        .event(e.kind.as_str())
        .data(serde_json::to_string(e).expect("event serializes"))
}

/// `GET /jobs/{id}/events`: a JSON page, or with `Accept: text/event-stream` an SSE stream that
/// replays from `Last-Event-ID` (or `after`) and ends when the job ends.
#[utoipa::path(get, path = "/jobs/{id}/events", tag = "jobs",
    params(("id" = String, Path, description = "job id"), EventsQuery),
    responses((status = 200, description = "a page of events, or with `Accept: text/event-stream` a stream of them",
            content((EventList = "application/json"), (String = "text/event-stream"))),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn events_list(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    q: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let q = query(q)?;
    state.jobs.store.job(&id, who.scope()).await?; // 404 for another key's job
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .or(q.after)
        .unwrap_or(0);
    if !wants_sse {
        let limit = q.limit.unwrap_or(100).clamp(1, 1000);
        let mut data = state.jobs.store.events(&id, after, limit + 1).await?;
        let has_more = data.len() as i64 > limit;
        data.truncate(limit as usize);
        return Ok(Json(EventList::new(data, has_more)).into_response());
    }
    let slot = state
        .streams
        .acquire(who.owner(), state.config.limits.max_event_streams_per_key)?;
    let events = state.jobs.follow_events(&id, after).await?;
    // The stream holds its slot until it ends or the client goes away.
    let body = events.map(move |e| {
        let _held = &slot;
        Ok::<_, Infallible>(sse(&e))
    });
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

#[utoipa::path(get, path = "/jobs/{id}/checkpoints", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = CheckpointList), (status = 404, body = ErrorBody)))]
pub async fn checkpoints_list(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<CheckpointList>> {
    state.jobs.store.job(&id, who.scope()).await?;
    Ok(Json(CheckpointList::new(
        state.jobs.store.checkpoints(&id).await?,
        false,
    )))
}

#[utoipa::path(get, path = "/jobs/{id}/artifacts", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = ArtifactList), (status = 404, body = ErrorBody)))]
pub async fn artifacts_list(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<ArtifactList>> {
    state.jobs.store.job(&id, who.scope()).await?;
    Ok(Json(ArtifactList::new(
        state.jobs.store.artifacts(&id).await?,
        false,
    )))
}

/// An artifact name is a relative path of plain components: no `..`, no absolute paths.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.starts_with('.'))
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "._-/".contains(ch))
}

fn parse_range(h: &str, len: u64) -> Option<(u64, u64)> {
    let spec = h.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        (len.saturating_sub(n), len.checked_sub(1)?)
    } else {
        let s: u64 = a.parse().ok()?;
        let e: u64 = if b.is_empty() {
            len.checked_sub(1)?
        } else {
            b.parse::<u64>().ok()?.min(len.checked_sub(1)?)
        };
        (s, e)
    };
    (start <= end && end < len).then_some((start, end))
}

/// `GET /jobs/{id}/artifacts/{name}` with `Range`, `ETag` (the sha256) and `Content-Length`.
/// `name` may contain `/` (files of the merged safetensors directory).
#[utoipa::path(get, path = "/jobs/{id}/artifacts/{name}", tag = "jobs",
    params(("id" = String, Path, description = "job id"),
        ("name" = String, Path, description = "artifact name, as listed", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$"),
        ("Range" = Option<String>, Header, description = "bytes=START-END"),
        ("If-None-Match" = Option<String>, Header, description = "the ETag of a copy you hold")),
    responses((status = 200, description = "the file", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "the requested range", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 304, description = "not modified"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 416, description = "range not satisfiable")))]
pub async fn artifacts_get(
    State(state): State<AppState>,
    who: Principal,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if !safe_name(&name) {
        return Err(ApiError::bad(
            "invalid_name",
            format!("artifact name {name:?} is not a plain relative path"),
            Some("name"),
        ));
    }
    state.jobs.store.job(&id, who.scope()).await?;
    let art = state
        .jobs
        .store
        .artifacts(&id)
        .await?
        .into_iter()
        .find(|a| a.name == name)
        .ok_or_else(|| ApiError::not_found(format!("artifact {name} of job {id} not found")))?;
    let dir = state.jobs.layout.artifacts_dir(&id);
    // A symlink planted in the directory must not lead out of it.
    let path = super::paths::contained(&dir, &name);
    let etag = format!("\"{}\"", art.sha256);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        == Some(etag.as_str())
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let len = art.bytes as u64;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match range {
        Some(r) => match parse_range(r, len) {
            Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e),
            None => {
                return Ok((
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{len}"))],
                )
                    .into_response());
            }
        },
        None => (StatusCode::OK, 0, len.saturating_sub(1)),
    };
    let count = if len == 0 { 0 } else { end - start + 1 };
    let gone = || ApiError::not_found(format!("artifact {name} is gone"));
    // Here, or (written on another host) from the object store.
    let file = match &path {
        Some(p) => tokio::fs::File::open(p).await.ok(),
        None => None,
    };
    let body = match file {
        Some(mut file) => {
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(ApiError::internal)?;
            Body::from_stream(tokio_util::io::ReaderStream::new(file.take(count)))
        }
        None if count == 0 && state.jobs.objects.is_some() => Body::empty(),
        None => {
            let shared = state.jobs.shared_range(&dir.join(&name), start, end).await;
            Body::from_stream(shared.ok_or_else(gone)?)
        }
    };
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, count)
        .header(header::ETAG, etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
    }
    Ok(resp.body(body).expect("valid response"))
}
