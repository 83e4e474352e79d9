//! `/v1/files`: OpenAI's file object over qlorad's uploads. Only `purpose=fine-tune` is taken;
//! uploads are validated as training data before they are stored.

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{page_limit, query, Page};
use crate::api::auth::Principal;
use crate::api::files::{receive_upload, UploadQuery};
use crate::api::{ApiError, ApiResult, AppState, ErrorBody};
use crate::jobs::store::FileRow;

/// OpenAI's file object (`object: "file"`), with qlorad's counts as extra fields.
#[derive(Serialize, ToSchema)]
pub struct V1File {
    pub id: String,
    /// Always `file`.
    pub object: String,
    pub bytes: i64,
    /// Unix seconds.
    pub created_at: i64,
    pub filename: String,
    /// `fine-tune` for an upload, `fine-tune-results` for a job's step metrics CSV.
    pub purpose: String,
    /// Always `processed`: uploads are validated before they are stored.
    pub status: String,
    pub status_details: Option<String>,
    pub expires_at: Option<i64>,
    /// The record shape detected: alpaca, chat, sharegpt, completion or text.
    pub format: String,
    /// Records in the file.
    pub examples: i64,
    /// Tokens, when counted.
    pub tokens: Option<i64>,
}

impl From<FileRow> for V1File {
    fn from(f: FileRow) -> Self {
        V1File {
            id: f.id,
            object: "file".into(),
            bytes: f.bytes,
            created_at: f.created_at,
            filename: f.filename,
            // A job's step metrics CSV; every upload is a dataset.
            purpose: if f.format == "csv" {
                "fine-tune-results"
            } else {
                "fine-tune"
            }
            .into(),
            status: "processed".into(),
            status_details: None,
            expires_at: None,
            format: f.format,
            examples: f.examples,
            tokens: f.tokens,
        }
    }
}

/// `{"id", "object": "file", "deleted": true}`.
#[derive(Serialize, ToSchema)]
pub struct V1FileDeleted {
    pub id: String,
    pub object: String,
    pub deleted: bool,
}

/// The multipart form of `POST /v1/files`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct V1FileUpload {
    /// The dataset: JSONL (OpenAI's chat format, or alpaca, sharegpt, completion, text).
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// Must be `fine-tune`.
    purpose: String,
}

fn purpose_check(fields: &[(String, String)]) -> ApiResult<()> {
    match fields.iter().find(|(k, _)| k == "purpose") {
        Some((_, p)) if p == "fine-tune" => Ok(()),
        Some((_, p)) => Err(ApiError::bad(
            "invalid_purpose",
            format!("purpose {p:?} is not supported; qlorad takes \"fine-tune\""),
            Some("purpose"),
        )),
        None => Err(ApiError::bad(
            "missing_field",
            "`purpose` is required (a multipart/form-data field beside `file`)",
            Some("purpose"),
        )),
    }
}

/// Upload a dataset (multipart `file` and `purpose=fine-tune`).
#[utoipa::path(post, path = "/v1/files", tag = "openai", operation_id = "v1_files_create",
    request_body(content = V1FileUpload, content_type = "multipart/form-data"),
    responses((status = 200, body = V1File), (status = 400, body = ErrorBody),
        (status = 413, body = ErrorBody)))]
pub async fn v1_files_create(
    State(state): State<AppState>,
    who: Principal,
    req: Request,
) -> ApiResult<Json<V1File>> {
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if !is_multipart {
        return Err(ApiError::bad(
            "invalid_body",
            "expected multipart/form-data with `file` and `purpose` fields",
            Some("file"),
        ));
    }
    let row = receive_upload(&state, &who, UploadQuery::default(), req, purpose_check).await?;
    Ok(Json(row.into()))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FilesQuery {
    /// Only files of this purpose: `fine-tune` (uploads) or `fine-tune-results`.
    purpose: Option<String>,
    /// The id of the last file of the previous page.
    after: Option<String>,
    /// 1 to 10000 (default 10000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<i64>,
}

/// Files, newest first.
#[utoipa::path(get, path = "/v1/files", tag = "openai", operation_id = "v1_files_list",
    params(FilesQuery),
    responses((status = 200, body = Page<V1File>), (status = 400, body = ErrorBody)))]
pub async fn v1_files_list(
    State(state): State<AppState>,
    who: Principal,
    q: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Page<V1File>>> {
    let q = query(q)?;
    let limit = page_limit(q.limit, 10_000, 10_000)?;
    let rows = state
        .jobs
        .store
        .files_page(q.after.as_deref(), limit + 1, who.scope())
        .await?;
    let rows: Vec<V1File> = rows
        .into_iter()
        .map(V1File::from)
        .filter(|f| q.purpose.as_deref().is_none_or(|p| f.purpose == p))
        .collect();
    Ok(Json(Page::new(rows, limit, |f| f.id.clone())))
}

async fn file(state: &AppState, who: &Principal, id: &str) -> ApiResult<FileRow> {
    state
        .jobs
        .store
        .file(id, who.scope())
        .await
        .map_err(|e| ApiError::from(e).with_param("file_id"))
}

#[utoipa::path(get, path = "/v1/files/{file_id}", tag = "openai", operation_id = "v1_files_get",
    params(("file_id" = String, Path)),
    responses((status = 200, body = V1File), (status = 404, body = ErrorBody)))]
pub async fn v1_files_get(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<V1File>> {
    Ok(Json(file(&state, &who, &id).await?.into()))
}

/// Delete a file no queued or running job uses.
#[utoipa::path(delete, path = "/v1/files/{file_id}", tag = "openai", operation_id = "v1_files_delete",
    params(("file_id" = String, Path)),
    responses((status = 200, body = V1FileDeleted), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn v1_files_delete(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<V1FileDeleted>> {
    file(&state, &who, &id).await?;
    state.jobs.delete_file(&id, who.scope()).await?;
    Ok(Json(V1FileDeleted {
        id,
        object: "file".into(),
        deleted: true,
    }))
}

/// The file's bytes as uploaded.
#[utoipa::path(get, path = "/v1/files/{file_id}/content", tag = "openai", operation_id = "v1_files_content",
    params(("file_id" = String, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, body = ErrorBody)))]
pub async fn v1_files_content(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let row = file(&state, &who, &id).await?;
    let local = state
        .jobs
        .local_file(&id)
        .await
        .map_err(|e| ApiError::io("fetching the file", e))?;
    let f = tokio::fs::File::open(local)
        .await
        .map_err(|_| ApiError::not_found(format!("the content of file {id} is gone")))?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(f));
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, row.bytes.to_string()),
        ],
        body,
    )
        .into_response())
}
