//! HTTP: routes, uploads, SSE, downloads, errors, the OpenAI-shaped `/v1`, the dashboard,
//! metrics and the OpenAPI document. Handlers validate and call the store or the engine's
//! validators; training itself happens in `jobs`.

pub mod auth;
pub mod dashboard;
pub mod files;
pub mod jobs;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod paths;
pub mod v1;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Serialize;
use tower_http::trace::TraceLayer;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Config;
use crate::jobs::{IntakeError, JobsError, Service};

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    /// The service's operations and state (store, events, layout, workers).
    pub jobs: Service,
    /// Request counts and latencies, for `/metrics`.
    pub http_metrics: metrics::HttpMetrics,
    /// The API keys; empty: no keys, one anonymous owner.
    pub keys: Arc<auth::ApiKeys>,
    /// Open event streams per key.
    pub streams: limits::StreamSlots,
    /// Loaded models for `/v1/chat/completions` and `/v1/completions`.
    pub inference: Arc<crate::jobs::inference::Inference>,
}

/// `{"error": {"message", "type", "param", "code"}}` with a fitting status: the same object on
/// the native routes and on `/v1`, where it is OpenAI's error object.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
}

/// The error body.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// What went wrong, for a person.
    pub message: String,
    /// `invalid_request_error` for a 4xx, `server_error` for a 5xx.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault (dotted for nested fields), if one is.
    pub param: Option<String>,
    /// A stable code: `invalid_spec`, `unknown_file`, `not_found`, ...
    pub code: String,
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

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: "internal error; see the server log".into(),
            param: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind: kind.into(),
                param: self.param,
                code: self.code.into(),
            },
        };
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
            JobsError::Limit(m) => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                code: "too_many_queued",
                message: format!("{m} (limits.max_queued_jobs_per_key)"),
                param: None,
            },
            JobsError::Db(e) => ApiError::database(e),
            JobsError::Io(e) => ApiError::io("storage", e),
            other => ApiError::internal(other),
        }
    }
}

impl From<IntakeError> for ApiError {
    fn from(e: IntakeError) -> Self {
        let message = e.to_string();
        match e {
            IntakeError::NotAnObject => ApiError::bad("invalid_json", message, None),
            IntakeError::Spec(s) => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                code: "invalid_spec",
                message,
                param: Some(s.field),
            },
            IntakeError::Missing(field) => ApiError::bad("missing_field", message, Some(field)),
            IntakeError::UnknownModel { field, .. } => {
                ApiError::bad("unknown_model", message, Some(field))
            }
            IntakeError::UnknownFile { field, .. } => {
                ApiError::bad("unknown_file", message, Some(field))
            }
            IntakeError::InvalidFormat(_) => {
                ApiError::bad("invalid_format", message, Some("format"))
            }
            IntakeError::InvalidFile(_) => ApiError::bad("invalid_file", message, Some("file")),
            IntakeError::Hub(h) if h.retryable() => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "hub_unavailable",
                message,
                param: Some("model".into()),
            },
            IntakeError::Hub(_) => ApiError::bad("unknown_model", message, Some("model")),
            IntakeError::Continue(_) => ApiError::bad("invalid_model", message, Some("model")),
            IntakeError::TooLarge(_) => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                code: "exceeds_device_memory",
                message,
                param: Some("device".into()),
            },
            IntakeError::Jobs(e) => e.into(),
        }
    }
}

/// SQLite's primary result codes that mean "try again" and "the disk is full".
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_FULL: i32 = 13;

impl ApiError {
    /// A database error: busy or locked is a 503 to retry, a full disk a 507, the rest a 500.
    /// PostgreSQL says so with SQLSTATE classes: 53 (out of disk or memory), 40 (a conflict to
    /// retry), 57P (shutting down), 08 (the connection).
    pub fn database(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(d) = &e {
            if d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                let code = d.code().unwrap_or_default();
                return match &code[..code.len().min(2)] {
                    "53" => ApiError::storage_full(&e),
                    "40" | "57" | "08" => ApiError::unavailable(&e),
                    _ => ApiError::internal(e),
                };
            }
        }
        let code = match &e {
            sqlx::Error::Database(d) => d.code().and_then(|c| c.parse::<i32>().ok()),
            _ => None,
        };
        match code.map(|c| c & 0xff) {
            Some(SQLITE_BUSY | SQLITE_LOCKED) => ApiError::unavailable(&e),
            Some(SQLITE_FULL) => ApiError::storage_full(&e),
            _ if matches!(
                e,
                sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
            ) =>
            {
                ApiError::unavailable(&e)
            }
            _ => ApiError::internal(e),
        }
    }

    /// A filesystem error: a full disk is a 507, the rest a 500.
    pub fn io(context: &str, e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
            ApiError::storage_full(&format!("{context}: {e}"))
        } else {
            ApiError::internal(format!("{context}: {e}"))
        }
    }

    fn unavailable(e: &dyn std::fmt::Display) -> Self {
        tracing::warn!(error = %e, "database busy");
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "database_busy",
            message: "the database is busy; retry shortly".into(),
            param: None,
        }
    }

    fn storage_full(e: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %e, "storage full");
        ApiError {
            status: StatusCode::INSUFFICIENT_STORAGE,
            code: "storage_full",
            message: "the server's storage is full; retry once space is freed".into(),
            param: None,
        }
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// A page of a list: `{"object": "list", "data": [...], "has_more": bool}`.
macro_rules! list_type {
    ($(#[$doc:meta])* $name:ident, $item:ty) => {
        $(#[$doc])*
        #[derive(serde::Serialize, utoipa::ToSchema)]
        pub struct $name {
            /// Always `list`.
            pub object: String,
            pub data: Vec<$item>,
            /// Whether another page follows (pass the last id as `after`).
            pub has_more: bool,
        }

        impl $name {
            pub fn new(data: Vec<$item>, has_more: bool) -> Self {
                $name {
                    object: "list".into(),
                    data,
                    has_more,
                }
            }
        }
    };
}
pub(crate) use list_type;

list_type!(
    /// Base models under the model roots.
    ModelList,
    ModelInfo
);

/// A base model a job can name.
#[derive(Serialize, ToSchema)]
pub struct ModelInfo {
    /// The name a job's `model` uses.
    pub id: String,
    pub path: String,
    /// `model_type` from its config.json, or a GGUF file's `general.architecture`.
    pub model_type: Option<String>,
    /// `safetensors` (a Hugging Face directory) or `gguf` (a GGUF file).
    pub format: String,
}

/// `{"status": "ok"}`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: String,
}

/// Every documented route; `router` adds the state and the layers, `openapi` the document.
fn routes(upload_limit: usize, body_limit: usize) -> OpenApiRouter<AppState> {
    let uploads = OpenApiRouter::new()
        .routes(routes!(files::files_create, files::files_list))
        .routes(routes!(
            v1::files::v1_files_create,
            v1::files::v1_files_list
        ))
        .layer(DefaultBodyLimit::max(upload_limit));
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(files::files_get, files::files_delete))
        .routes(routes!(jobs::jobs_create, jobs::jobs_list))
        .routes(routes!(jobs::jobs_get, jobs::jobs_delete))
        .routes(routes!(jobs::jobs_cancel))
        .routes(routes!(jobs::jobs_pause))
        .routes(routes!(jobs::jobs_resume))
        .routes(routes!(jobs::events_list))
        .routes(routes!(jobs::checkpoints_list))
        .routes(routes!(jobs::artifacts_list))
        .routes(routes!(models_list))
        .routes(routes!(healthz))
        .routes(routes!(metrics::metrics_get))
        .routes(routes!(openapi::openapi_get))
        .routes(routes!(dashboard::dashboard_get))
        .routes(routes!(dashboard::assets_get))
        .routes(routes!(v1::files::v1_files_get, v1::files::v1_files_delete))
        .routes(routes!(v1::files::v1_files_content))
        .routes(routes!(
            v1::fine_tuning::fine_tuning_jobs_create,
            v1::fine_tuning::fine_tuning_jobs_list
        ))
        .routes(routes!(v1::chat::chat_completions))
        .routes(routes!(v1::chat::completions))
        .routes(routes!(v1::chat::models))
        .routes(routes!(v1::fine_tuning::fine_tuning_jobs_get))
        .routes(routes!(v1::fine_tuning::fine_tuning_jobs_cancel))
        .routes(routes!(v1::fine_tuning::fine_tuning_jobs_pause))
        .routes(routes!(v1::fine_tuning::fine_tuning_jobs_resume))
        .routes(routes!(v1::fine_tuning::fine_tuning_events_list))
        .routes(routes!(v1::fine_tuning::fine_tuning_checkpoints_list))
        .layer(DefaultBodyLimit::max(body_limit))
        .merge(uploads)
}

/// The artifact download, whose wildcard route cannot be an OpenAPI parameter: documented by
/// hand beside the routes.
#[derive(utoipa::OpenApi)]
#[openapi(paths(jobs::artifacts_get))]
struct ArtifactDoc;

/// The routes' document with what the routes cannot say themselves: the artifact download,
/// the bearer scheme, the spec's schema.
fn complete(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::OpenApi as _;
    doc.merge(ArtifactDoc::openapi());
    openapi::secure(doc);
    openapi::spec_schema(doc);
}

/// The OpenAPI document of every route, as `GET /openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = routes(0, 0).into_openapi();
    complete(&mut doc);
    doc
}

/// The application: every route, with the state attached.
pub fn router(state: AppState) -> Router {
    let upload_limit = state.config.server.max_upload_bytes as usize;
    let body_limit = state.config.server.max_body_bytes;
    let (app, mut doc) = routes(upload_limit, body_limit).split_for_parts();
    complete(&mut doc);
    // The artifact route's wildcard cannot be an OpenAPI parameter; it is documented by hand.
    app.route(
        "/jobs/{id}/artifacts/{*name}",
        get(jobs::artifacts_get).layer(DefaultBodyLimit::max(body_limit)),
    )
    .fallback(route_missing)
    .method_not_allowed_fallback(method_missing)
    .layer(Extension(Arc::new(doc)))
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        limits::time_limit,
    ))
    // Before any handler, the fallbacks included: no request without a valid key reaches one.
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        auth::authenticate,
    ))
    .layer(axum::middleware::from_fn_with_state(
        state.http_metrics.clone(),
        metrics::track_requests,
    ))
    .layer(TraceLayer::new_for_http())
    .with_state(state)
}

async fn route_missing(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

async fn method_missing(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        message: format!("{method} is not allowed on {}", uri.path()),
        param: None,
    }
}

/// Health: the database answers.
#[utoipa::path(get, path = "/healthz", tag = "service",
    responses((status = 200, body = Health), (status = 500, body = ErrorBody)))]
pub async fn healthz(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    sqlx::query("SELECT 1")
        .execute(&state.jobs.store.pool)
        .await
        .map_err(JobsError::from)?;
    Ok(Json(Health {
        status: "ok".into(),
    }))
}

/// Models directly under each configured root: directories with a config.json, GGUF files.
#[utoipa::path(get, path = "/models", tag = "service", responses((status = 200, body = ModelList)))]
pub async fn models_list(State(state): State<AppState>) -> Json<ModelList> {
    // Reading GGUF headers is file I/O: keep it off the async workers.
    let roots = state.config.models.roots.clone();
    let hub = state.jobs.layout.hub().cloned();
    let found = tokio::task::spawn_blocking(move || {
        let mut found = crate::model::list_models(&roots);
        // Hub downloads, by the id a job names them with.
        for (id, path) in hub.map(|h| h.list_cached()).unwrap_or_default() {
            found.extend(crate::model::model_entry(id, path));
        }
        found
    })
    .await
    .unwrap_or_default();
    let data = found
        .into_iter()
        .map(|m| ModelInfo {
            id: m.name,
            path: m.path.display().to_string(),
            model_type: m.model_type,
            format: m.format.into(),
        })
        .collect();
    Json(ModelList::new(data, false))
}
