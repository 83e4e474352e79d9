//! HTTP: routes, uploads, SSE, downloads, errors. Handlers validate and call the store or the
//! engine's validators; training itself happens in `jobs`.

pub mod files;
pub mod jobs;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::jobs::{EventHub, JobsError, Store, WorkerHandle};

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub hub: EventHub,
    pub workers: WorkerHandle,
}

/// `{"error": {"code", "message", "param"}}` with a fitting status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn bad(code: &'static str, message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code,
            message: message.into(),
            param: param.map(String::from),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
            param: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"code": self.code, "message": self.message, "param": self.param}});
        (self.status, Json(body)).into_response()
    }
}

impl From<JobsError> for ApiError {
    fn from(e: JobsError) -> Self {
        match e {
            JobsError::NotFound(m) => ApiError::not_found(format!("{m} not found")),
            JobsError::Conflict(m) => ApiError {
                status: StatusCode::CONFLICT,
                code: "conflict",
                message: m,
                param: None,
            },
            other => {
                tracing::error!(error = %other, "internal error");
                ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    code: "internal",
                    message: "internal error; see the server log".into(),
                    param: None,
                }
            }
        }
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// The application: every route, with the state attached.
pub fn router(state: AppState) -> Router {
    let upload_limit = state.config.server.max_upload_bytes as usize;
    let body_limit = state.config.server.max_body_bytes;
    let uploads = Router::new()
        .route("/files", post(files::files_create).get(files::files_list))
        .layer(DefaultBodyLimit::max(upload_limit));
    Router::new()
        .route(
            "/files/{id}",
            get(files::files_get).delete(files::files_delete),
        )
        .route("/jobs", post(jobs::jobs_create).get(jobs::jobs_list))
        .route("/jobs/{id}", get(jobs::jobs_get).delete(jobs::jobs_delete))
        .route("/jobs/{id}/cancel", post(jobs::jobs_cancel))
        .route("/jobs/{id}/events", get(jobs::events_list))
        .route("/jobs/{id}/checkpoints", get(jobs::checkpoints_list))
        .route("/jobs/{id}/artifacts", get(jobs::artifacts_list))
        .route("/jobs/{id}/artifacts/{*name}", get(jobs::artifacts_get))
        .route("/models", get(models_list))
        .route("/healthz", get(healthz))
        .layer(DefaultBodyLimit::max(body_limit))
        .merge(uploads)
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn healthz(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    sqlx::query("SELECT 1")
        .execute(&state.store.pool)
        .await
        .map_err(JobsError::from)?;
    Ok(Json(json!({"status": "ok"})))
}

/// Models directly under each configured root: directories with a config.json, GGUF files.
async fn models_list(State(state): State<AppState>) -> Json<serde_json::Value> {
    let mut data = Vec::new();
    for root in &state.config.models.roots {
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let p = e.path();
            if crate::model::gguf::is_gguf(&p) && p.is_file() {
                let arch = crate::model::gguf::GgufModel::open(&p)
                    .ok()
                    .and_then(|g| g.architecture().ok().map(String::from));
                data.push(json!({
                    "id": e.file_name().to_string_lossy(),
                    "path": p.display().to_string(),
                    "model_type": arch,
                    "format": "gguf",
                }));
            } else if p.join("config.json").is_file() {
                let model_type = std::fs::read(p.join("config.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| {
                        v.get("model_type")
                            .and_then(|t| t.as_str())
                            .map(String::from)
                    });
                data.push(json!({
                    "id": e.file_name().to_string_lossy(),
                    "path": p.display().to_string(),
                    "model_type": model_type,
                    "format": "safetensors",
                }));
            }
        }
    }
    Json(json!({"object": "list", "data": data}))
}
