//! Dataset uploads: streamed to disk (multipart `file` field or a raw body), validated record by
//! record, then recorded. An invalid upload leaves nothing behind.

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::Json;
use futures::{Stream, StreamExt, TryStreamExt};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::{ApiError, ApiResult, AppState};
use crate::jobs::store::FileRow;
use crate::jobs::worker::file_path;

#[derive(Deserialize)]
pub struct UploadQuery {
    filename: Option<String>,
    format: Option<String>,
    /// A model (as in `GET /models`) whose tokenizer counts the upload's tokens.
    model: Option<String>,
}

async fn write_stream<S, E>(path: &std::path::Path, mut stream: S, limit: u64) -> ApiResult<u64>
where
    S: Stream<Item = Result<bytes_like::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut f = tokio::fs::File::create(path).await.map_err(internal)?;
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
        f.write_all(&chunk).await.map_err(internal)?;
    }
    f.flush().await.map_err(internal)?;
    Ok(n)
}

mod bytes_like {
    pub type Bytes = axum::body::Bytes;
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "upload failed");
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        code: "internal",
        message: "internal error; see the server log".into(),
        param: None,
    }
}

/// `POST /files`: multipart with a `file` field, or the raw body (`?filename=`).
pub async fn files_create(
    State(state): State<AppState>,
    Query(q): Query<UploadQuery>,
    req: Request,
) -> ApiResult<(StatusCode, Json<FileRow>)> {
    let id = format!("file-{}", uuid::Uuid::new_v4().simple());
    let dir = state.config.storage.data_dir.join("files");
    tokio::fs::create_dir_all(&dir).await.map_err(internal)?;
    let partial = dir.join(format!(".{id}.partial"));
    let limit = state.config.server.max_upload_bytes;
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let result = async {
        let mut filename = q.filename.clone().unwrap_or_else(|| "upload.jsonl".into());
        let bytes = if is_multipart {
            let mut mp = Multipart::from_request(req, &state)
                .await
                .map_err(|e| ApiError::bad("invalid_body", e.body_text(), None))?;
            let mut written = None;
            while let Some(field) = mp
                .next_field()
                .await
                .map_err(|e| ApiError::bad("invalid_body", e.body_text(), None))?
            {
                if field.name() == Some("file") {
                    if let Some(n) = field.file_name() {
                        filename = n.to_string();
                    }
                    let stream = field.map_err(|e| e.body_text());
                    written = Some(write_stream(&partial, Box::pin(stream), limit).await?);
                }
            }
            written.ok_or_else(|| {
                ApiError::bad(
                    "missing_field",
                    "the multipart body has no `file` field",
                    Some("file"),
                )
            })?
        } else {
            let stream = Body::into_data_stream(req.into_body());
            write_stream(&partial, stream, limit).await?
        };
        let format = match &q.format {
            Some(f) => Some(
                f.parse()
                    .map_err(|e: String| ApiError::bad("invalid_format", e, Some("format")))?,
            ),
            None => None,
        };
        let check = partial.clone();
        let (format, examples) = tokio::task::spawn_blocking(move || {
            crate::data::visit_records(&check, format, |_, _| Ok(()))
        })
        .await
        .map_err(internal)?
        .map_err(|e| {
            ApiError::bad(
                "invalid_file",
                e.to_string()
                    .replace(&partial.display().to_string(), &filename),
                Some("file"),
            )
        })?;
        let tokens = match &q.model {
            Some(m) => {
                let dir =
                    crate::jobs::worker::resolve_model(&state.config, m).ok_or_else(|| {
                        ApiError::bad(
                            "unknown_model",
                            format!("model {m:?} is not in the model roots"),
                            Some("model"),
                        )
                    })?;
                let check = partial.clone();
                let fmt = Some(format);
                let counted = tokio::task::spawn_blocking(move || -> Result<usize, String> {
                    let tok = crate::data::TextTokenizer::load(&dir).map_err(|e| e.to_string())?;
                    let opts = crate::data::EncodeOptions {
                        format: fmt,
                        max_seq_len: usize::MAX,
                        train_on_prompt: false,
                    };
                    Ok(crate::data::encode_dataset(&check, &tok, &opts)
                        .map_err(|e| e.to_string())?
                        .1
                        .tokens)
                })
                .await
                .map_err(internal)?
                .map_err(|e| {
                    ApiError::bad(
                        "invalid_file",
                        e.replace(&partial.display().to_string(), &filename),
                        Some("file"),
                    )
                })?;
                Some(counted as i64)
            }
            None => None,
        };
        let row = FileRow {
            id: id.clone(),
            filename,
            bytes: bytes as i64,
            format: format.as_str().into(),
            examples: examples as i64,
            tokens,
            created_at: crate::jobs::now(),
        };
        tokio::fs::rename(&partial, file_path(&state.config, &id))
            .await
            .map_err(internal)?;
        state.store.insert_file(&row).await?;
        Ok(row)
    }
    .await;
    match result {
        Ok(row) => Ok((StatusCode::CREATED, Json(row))),
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            Err(e)
        }
    }
}

pub async fn files_list(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(
        serde_json::json!({"object": "list", "data": state.store.files().await?}),
    ))
}

pub async fn files_get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<FileRow>> {
    Ok(Json(state.store.file(&id).await?))
}

pub async fn files_delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.store.delete_file(&id).await?;
    let _ = tokio::fs::remove_file(file_path(&state.config, &id)).await;
    Ok(StatusCode::NO_CONTENT)
}
