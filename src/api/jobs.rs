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
use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use utoipa::IntoParams;

use super::auth::Principal;
use super::{ApiError, ApiResult, AppState, ErrorBody};
use crate::jobs::store::{ArtifactRow, CheckpointRow, JobLabels, JobRow};
use crate::jobs::worker::{job_dir, resolve_model};
use crate::jobs::{Event, Status};
use crate::train::{JobSpec, TrainError};

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

/// `POST /jobs`: the spec with defaults filled is stored and echoed back.
#[utoipa::path(post, path = "/jobs", tag = "jobs",
    request_body(content = crate::api::openapi::JobSpecSchema, description = "the job spec; every field but `model` and `training_file` has a default"),
    responses((status = 201, body = JobRow), (status = 400, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn jobs_create(
    State(state): State<AppState>,
    who: Principal,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<JobRow>)> {
    let job = create_job(&state, &who, json_body(body)?, JobLabels::default()).await?;
    Ok((StatusCode::CREATED, Json(job)))
}

/// Validate a spec (as JSON), check its model and files, queue it.
pub(crate) async fn create_job(
    state: &AppState,
    who: &Principal,
    body: serde_json::Value,
    labels: JobLabels,
) -> ApiResult<JobRow> {
    let Some(body) = body.as_object() else {
        return Err(ApiError::bad(
            "invalid_json",
            "the body must be a JSON object",
            None,
        ));
    };
    // Every spec field has a default, so an explicit null means the default.
    let body = without_nulls(body);
    let spec: JobSpec = serde_json::from_value(body).map_err(|e| {
        let msg = e.to_string();
        let param = msg.split('`').nth(1).map(String::from);
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_spec",
            message: msg,
            param,
        }
    })?;
    spec.validate().map_err(|e| match e {
        TrainError::Spec { field, message } => ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_spec",
            message: format!("{field}: {message}"),
            param: Some(field),
        },
        other => ApiError::bad("invalid_spec", other.to_string(), None),
    })?;
    let model = spec
        .model
        .as_deref()
        .ok_or_else(|| ApiError::bad("missing_field", "`model` is required", Some("model")))?;
    if resolve_model(&state.config, model).is_none() {
        return Err(ApiError::bad(
            "unknown_model",
            format!("model {model:?} is not in the model roots (see GET /models)"),
            Some("model"),
        ));
    }
    let train = spec.training_file.as_deref().ok_or_else(|| {
        ApiError::bad(
            "missing_field",
            "`training_file` is required",
            Some("training_file"),
        )
    })?;
    for (field, id) in [
        ("training_file", Some(train)),
        ("validation_file", spec.validation_file.as_deref()),
    ] {
        if let Some(id) = id {
            // Another key's file is as unknown as a missing one.
            if state.store.file(id, who.scope()).await.is_err() {
                return Err(ApiError::bad(
                    "unknown_file",
                    format!("file {id:?} does not exist (see GET /files)"),
                    Some(field),
                ));
            }
        }
    }
    let id = format!("job-{}", uuid::Uuid::new_v4().simple());
    let spec_json = serde_json::to_value(&spec).expect("spec serializes");
    let job = state
        .store
        .insert_job(
            &id,
            &spec_json,
            spec.priority,
            &labels,
            who.owner(),
            state.config.limits.max_queued_jobs_per_key as i64,
        )
        .await?;
    state.workers.wake.notify_waiters();
    Ok(job)
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
    Ok(Json(state.store.job(&id, who.scope()).await?))
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
    // A queued job is cancelled here and now, its event recorded with it.
    if let Some(e) = state.store.request_cancel(&id, who.scope()).await? {
        state.hub.publish(&id, &e);
    }
    Ok(Json(state.store.job(&id, who.scope()).await?))
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
    state.store.delete_job(&id, who.scope()).await?;
    let _ = tokio::fs::remove_dir_all(job_dir(&state.config, &id)).await;
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

fn is_final_event(e: &Event) -> bool {
    e.kind == "status"
        && e.data["status"]
            .as_str()
            .and_then(Status::parse)
            .is_some_and(Status::is_final)
}

fn sse(e: &Event) -> SseEvent {
    SseEvent::default()
        .id(e.seq.to_string())
        .event(e.kind.clone())
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
    let job = state.store.job(&id, who.scope()).await?;
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
        let mut data = state.store.events(&id, after, limit + 1).await?;
        let has_more = data.len() as i64 > limit;
        data.truncate(limit as usize);
        return Ok(Json(EventList::new(data, has_more)).into_response());
    }
    let slot = state
        .streams
        .acquire(who.owner(), state.config.limits.max_event_streams_per_key)?;
    // Subscribe before replaying so nothing falls between the two.
    let rx = state.hub.subscribe(&id);
    let replay = state.store.events(&id, after, i64::MAX).await?;
    let finished =
        replay.iter().any(is_final_event) || (job.status.is_final() && replay.is_empty());
    let last = replay.last().map(|e| e.seq).unwrap_or(after);
    let store = state.store.clone();
    let replayed = stream::iter(
        replay
            .clone()
            .into_iter()
            .map(|e| Ok::<_, Infallible>(sse(&e))),
    );
    let live: std::pin::Pin<Box<dyn Stream<Item = Result<SseEvent, Infallible>> + Send>> =
        if finished {
            Box::pin(stream::empty())
        } else {
            let id2 = id.clone();
            Box::pin(
                stream::unfold(
                    (rx, last, false, store, id2),
                    |(mut rx, mut last, done, store, id)| async move {
                        if done {
                            return None;
                        }
                        loop {
                            match rx.recv().await {
                                Ok(e) if e.seq <= last => continue,
                                Ok(e) => {
                                    // Fill any gap from the store (e.g. after a lagged receiver).
                                    let mut batch = if e.seq > last + 1 {
                                        store
                                            .events(&id, last, e.seq - last - 1)
                                            .await
                                            .unwrap_or_default()
                                    } else {
                                        vec![]
                                    };
                                    batch.push(e);
                                    last = batch.last().map(|x| x.seq).unwrap_or(last);
                                    let end = batch.iter().any(is_final_event);
                                    let items: Vec<Result<SseEvent, Infallible>> =
                                        batch.iter().map(|x| Ok(sse(x))).collect();
                                    return Some((stream::iter(items), (rx, last, end, store, id)));
                                }
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                                    let batch =
                                        store.events(&id, last, i64::MAX).await.unwrap_or_default();
                                    if batch.is_empty() {
                                        continue;
                                    }
                                    last = batch.last().map(|x| x.seq).unwrap_or(last);
                                    let end = batch.iter().any(is_final_event);
                                    let items: Vec<Result<SseEvent, Infallible>> =
                                        batch.iter().map(|x| Ok(sse(x))).collect();
                                    return Some((stream::iter(items), (rx, last, end, store, id)));
                                }
                                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                                    return None
                                }
                            }
                        }
                    },
                )
                .flatten(),
            )
        };
    // The stream holds its slot until it ends or the client goes away.
    let body = replayed.chain(live).map(move |e| {
        let _held = &slot;
        e
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
    state.store.job(&id, who.scope()).await?;
    Ok(Json(CheckpointList::new(
        state.store.checkpoints(&id).await?,
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
    state.store.job(&id, who.scope()).await?;
    Ok(Json(ArtifactList::new(
        state.store.artifacts(&id).await?,
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
    state.store.job(&id, who.scope()).await?;
    let art = state
        .store
        .artifacts(&id)
        .await?
        .into_iter()
        .find(|a| a.name == name)
        .ok_or_else(|| ApiError::not_found(format!("artifact {name} of job {id} not found")))?;
    let dir = job_dir(&state.config, &id).join("artifacts");
    // A symlink planted in the directory must not lead out of it.
    let path = super::paths::contained(&dir, &name)
        .ok_or_else(|| ApiError::not_found(format!("artifact {name} is gone")))?;
    let etag = format!("\"{}\"", art.sha256);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        == Some(etag.as_str())
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::not_found(format!("artifact {name} is gone")))?;
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
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(ApiError::internal)?;
    let stream = tokio_util::io::ReaderStream::new(file.take(count));
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, count)
        .header(header::ETAG, etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
    }
    Ok(resp
        .body(Body::from_stream(stream))
        .expect("valid response"))
}
