//! The dashboard at `GET /`: a page of plain HTML, CSS and JavaScript embedded in the binary. It
//! lists jobs with their progress, shows a job's live loss and learning-rate chart (fed by the
//! job's SSE stream), its events, checkpoints and artifacts, and uploads datasets and starts jobs
//! through the native API.

use axum::extract::Path;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

use super::{ApiError, ErrorBody};

const INDEX: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// The dashboard page.
#[utoipa::path(get, path = "/", tag = "service",
    responses((status = 200, description = "the dashboard", content_type = "text/html", body = String)))]
pub async fn dashboard_get() -> Html<&'static str> {
    Html(INDEX)
}

/// The dashboard's script and stylesheet.
#[utoipa::path(get, path = "/dashboard/{name}", tag = "service",
    params(("name" = String, Path, description = "app.js or style.css")),
    responses((status = 200, description = "the asset", content_type = "text/plain", body = String),
        (status = 404, body = ErrorBody)))]
pub async fn assets_get(Path(name): Path<String>) -> Result<Response, ApiError> {
    let (body, kind) = match name.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        _ => return Err(ApiError::not_found(format!("no dashboard asset {name:?}"))),
    };
    Ok((
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}
