//! Dataset uploads: streamed to disk (multipart `file` field or a raw body), validated record by
//! record, then recorded. An invalid upload leaves nothing behind.

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::Json;
use futures::{Stream, StreamExt, TryStreamExt};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use utoipa::IntoParams;

use super::auth::Principal;
use super::{ApiError, ApiResult, AppState, ErrorBody};
use crate::jobs::store::FileRow;

super::list_type!(
    /// Uploaded datasets.
    FileList,
    FileRow
);

#[derive(Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// The file's name (a multipart part's own filename wins).
    pub filename: Option<String>,
    /// Detected from the first record when absent.
    #[param(value_type = Option<crate::api::openapi::DataFormat>)]
    pub format: Option<String>,
    /// A model (as in `GET /models`) whose tokenizer counts the upload's tokens.
    pub model: Option<String>,
}

/// Multipart text fields other than `file` (at most this many bytes each are kept).
const FIELD_LIMIT: usize = 4096;

async fn write_stream<S, E>(path: &std::path::Path, mut stream: S, limit: u64) -> ApiResult<u64>
where
    S: Stream<Item = Result<bytes_like::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut f = tokio::fs::File::create(path).await.map_err(internal_io)?;
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::bad("invalid_body", format!("reading the upload: {e}"), None))?;
        n += chunk.len() as u64;
        if n > limit {
            return Err(ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: "too_large",
                message: format!("the upload exceeds {limit} bytes"),
                param: Some("file".into()),
            });
        }
        f.write_all(&chunk).await.map_err(internal_io)?;
    }
    f.flush().await.map_err(internal_io)?;
    // The bytes are on disk before the upload is recorded (a crash never lists a short file).
    f.sync_all().await.map_err(internal_io)?;
    Ok(n)
}

mod bytes_like {
    pub type Bytes = axum::body::Bytes;
}

/// A filesystem error while storing an upload: a full disk is a 507 the client can retry.
fn internal_io(e: std::io::Error) -> ApiError {
    ApiError::io("upload", e)
}

/// `POST /files`: multipart with a `file` field, or the raw body (`?filename=`).
#[utoipa::path(post, path = "/files", tag = "files", params(UploadQuery),
    request_body(description = "JSONL or a JSON array; raw, or the `file` part of multipart/form-data",
        content(("application/octet-stream"), ("multipart/form-data"))),
    responses((status = 201, description = "stored and validated", body = FileRow),
        (status = 400, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn files_create(
    State(state): State<AppState>,
    who: Principal,
    q: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> ApiResult<(StatusCode, Json<FileRow>)> {
    let Query(q) = q.map_err(|e| ApiError::bad("invalid_query", e.body_text(), None))?;
    let row = receive_upload(&state, &who, q, req, |_| Ok(())).await?;
    Ok((StatusCode::CREATED, Json(row)))
}

/// Stream an upload to disk, then hand it to the service's intake to check and record. `check`
/// sees the multipart text fields before anything is recorded; an error from it (or any other)
/// leaves nothing behind.
pub(crate) async fn receive_upload(
    state: &AppState,
    who: &Principal,
    q: UploadQuery,
    req: Request,
    check: impl FnOnce(&[(String, String)]) -> ApiResult<()>,
) -> ApiResult<FileRow> {
    let up = state.jobs.stage_upload().await?;
    let received = receive_body(state, &up.path, &q, req, check).await;
    let (filename, bytes) = match received {
        Ok(r) => r,
        Err(e) => {
            state.jobs.discard_upload(&up).await;
            return Err(e);
        }
    };
    let row = state
        .jobs
        .ingest_file(
            up,
            filename,
            bytes,
            q.format.as_deref(),
            q.model.as_deref(),
            who.owner(),
        )
        .await?;
    Ok(row)
}

/// The upload's bytes into `partial` (a multipart `file` part or the raw body): its file name
/// and size.
async fn receive_body(
    state: &AppState,
    partial: &std::path::Path,
    q: &UploadQuery,
    req: Request,
    check: impl FnOnce(&[(String, String)]) -> ApiResult<()>,
) -> ApiResult<(String, u64)> {
    let limit = state.config.server.max_upload_bytes;
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let mut filename = q.filename.clone().unwrap_or_else(|| "upload.jsonl".into());
    if !is_multipart {
        check(&[])?;
        let stream = Body::into_data_stream(req.into_body());
        return Ok((filename, write_stream(partial, stream, limit).await?));
    }
    let mut mp = Multipart::from_request(req, state)
        .await
        .map_err(|e| ApiError::bad("invalid_body", e.body_text(), None))?;
    let mut written = None;
    let mut fields = Vec::new();
    while let Some(mut field) = mp
        .next_field()
        .await
        .map_err(|e| ApiError::bad("invalid_body", e.body_text(), None))?
    {
        let name = field.name().unwrap_or_default().to_string();
        if name == "file" {
            if written.is_some() {
                return Err(ApiError::bad(
                    "invalid_body",
                    "the multipart body has more than one `file` field",
                    Some("file"),
                ));
            }
            if let Some(n) = field.file_name() {
                filename = n.to_string();
            }
            let stream = field.map_err(|e| e.body_text());
            written = Some(write_stream(partial, Box::pin(stream), limit).await?);
        } else {
            let mut value = Vec::new();
            while let Some(chunk) = field
                .chunk()
                .await
                .map_err(|e| ApiError::bad("invalid_body", e.body_text(), Some(&name)))?
            {
                if value.len() + chunk.len() > FIELD_LIMIT {
                    return Err(ApiError::bad(
                        "invalid_body",
                        format!("the multipart field `{name}` exceeds {FIELD_LIMIT} bytes"),
                        Some(&name),
                    ));
                }
                value.extend_from_slice(&chunk);
            }
            fields.push((name, String::from_utf8_lossy(&value).into_owned()));
        }
    }
    check(&fields)?;
    let bytes = written.ok_or_else(|| {
        ApiError::bad(
            "missing_field",
            "the multipart body has no `file` field",
            Some("file"),
        )
    })?;
    Ok((filename, bytes))
}

/// Every uploaded file of the key, newest first.
#[utoipa::path(get, path = "/files", tag = "files", responses((status = 200, body = FileList),
    (status = 401, body = ErrorBody)))]
pub async fn files_list(
    State(state): State<AppState>,
    who: Principal,
) -> ApiResult<Json<FileList>> {
    Ok(Json(FileList::new(
        state.jobs.store.files(who.scope()).await?,
        false,
    )))
}

#[utoipa::path(get, path = "/files/{id}", tag = "files",
    params(("id" = String, Path, description = "file id")),
    responses((status = 200, body = FileRow), (status = 404, body = ErrorBody)))]
pub async fn files_get(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<FileRow>> {
    Ok(Json(state.jobs.store.file(&id, who.scope()).await?))
}

/// Delete a file that no queued or running job uses.
#[utoipa::path(delete, path = "/files/{id}", tag = "files",
    params(("id" = String, Path, description = "file id")),
    responses((status = 204, description = "deleted"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn files_delete(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.jobs.delete_file(&id, who.scope()).await?;
    Ok(StatusCode::NO_CONTENT)
}
