//! `/v1/fine_tuning/jobs`: create, list, retrieve, cancel, events and checkpoints in the shapes
//! of OpenAI's fine-tuning API. A request's OpenAI fields (`hyperparameters` with `"auto"`,
//! `method`, `seed`, `suffix`, `metadata`) are translated to a qlorad job spec; any other field is
//! a spec field (`lora`, `quantization`, `export`, ...) and is checked like one.

use std::collections::HashMap;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::{page_limit, query, Page};
use crate::api::auth::Principal;
use crate::api::jobs::{create_job, json_body};
use crate::api::{ApiError, ApiResult, AppState, ErrorBody};
use crate::jobs::store::{CheckpointRow, JobLabels, JobRow, MetadataFilter, Progress};
use crate::jobs::{Event, EventKind, Level, Status};
use crate::train::Hyperparameters;

/// OpenAI's `fine_tuning.job`, with qlorad's progress and full spec as extra fields.
#[derive(Serialize, ToSchema)]
pub struct V1Job {
    pub id: String,
    /// Always `fine_tuning.job`.
    pub object: String,
    /// The base model.
    pub model: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    pub finished_at: Option<i64>,
    /// `ft:<model>:qlorad:<suffix>:<job id>` once the job has succeeded.
    pub fine_tuned_model: Option<String>,
    pub organization_id: String,
    pub result_files: Vec<String>,
    /// queued, running, succeeded, failed or cancelled.
    pub status: Status,
    pub training_file: Option<String>,
    pub validation_file: Option<String>,
    pub hyperparameters: V1Hyperparameters,
    pub method: V1Method,
    /// Tokens trained on so far (each step counted once).
    pub trained_tokens: Option<i64>,
    pub error: Option<V1JobError>,
    pub seed: u64,
    /// Unix seconds, while running.
    pub estimated_finish: Option<i64>,
    pub integrations: Vec<Object>,
    pub user_provided_suffix: Option<String>,
    #[schema(value_type = Option<HashMap<String, String>>)]
    pub metadata: Option<Value>,
    /// qlorad: how far the job has got.
    pub progress: Progress,
    /// qlorad: the job spec with every default filled in.
    #[schema(value_type = crate::api::openapi::JobSpecSchema)]
    pub spec: Value,
}

/// A JSON object.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Object {}

/// The hyperparameters as run.
#[derive(Serialize, ToSchema)]
pub struct V1Hyperparameters {
    pub n_epochs: usize,
    pub batch_size: usize,
    /// The learning rate over qlorad's default (2e-4).
    pub learning_rate_multiplier: f64,
}

#[derive(Serialize, ToSchema)]
pub struct V1Method {
    /// `supervised` or `dpo`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supervised: Option<V1Supervised>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpo: Option<V1Dpo>,
}

#[derive(Serialize, ToSchema)]
pub struct V1Supervised {
    pub hyperparameters: V1Hyperparameters,
}

#[derive(Serialize, ToSchema)]
pub struct V1Dpo {
    pub hyperparameters: V1DpoHyperparameters,
}

/// DPO's hyperparameters as run.
#[derive(Serialize, ToSchema)]
pub struct V1DpoHyperparameters {
    pub beta: f64,
    pub n_epochs: usize,
    pub batch_size: usize,
    pub learning_rate_multiplier: f64,
}

/// Why a job failed.
#[derive(Serialize, ToSchema)]
pub struct V1JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

/// `fine_tuning.job.event`; `id` is `ftevent-<job>-<seq>`.
#[derive(Serialize, ToSchema)]
pub struct V1Event {
    pub id: String,
    /// Always `fine_tuning.job.event`.
    pub object: String,
    pub created_at: i64,
    /// info, warn or error.
    pub level: String,
    pub message: String,
    /// `metrics` for training metrics, else `message`.
    #[serde(rename = "type")]
    pub kind: String,
    /// For metrics: `step`, `train_loss`, `learning_rate`, `total_steps`, ...
    #[schema(value_type = Object)]
    pub data: Value,
}

/// `fine_tuning.job.checkpoint`; `id` is `ftckpt-<job>-<step>`.
#[derive(Serialize, ToSchema)]
pub struct V1Checkpoint {
    pub id: String,
    /// Always `fine_tuning.job.checkpoint`.
    pub object: String,
    pub created_at: i64,
    /// `<fine-tuned model name>:ckpt-step-<step>`.
    pub fine_tuned_model_checkpoint: String,
    pub fine_tuning_job_id: String,
    pub step_number: i64,
    pub metrics: V1CheckpointMetrics,
    /// qlorad: the checkpoint directory's name in the job's directory.
    pub name: String,
}

#[derive(Serialize, ToSchema)]
pub struct V1CheckpointMetrics {
    pub step: i64,
    pub train_loss: Option<f64>,
}

/// OpenAI's create request. Any other field is a qlorad job-spec field (`lora`,
/// `quantization`, `export`, `data`, `checkpoint_every`, ...).
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct V1JobCreate {
    /// A name from `GET /models`.
    model: String,
    /// A file id from `POST /v1/files`.
    training_file: String,
    validation_file: Option<String>,
    /// `n_epochs`, `batch_size`, `learning_rate_multiplier`: each a number or `"auto"`; qlorad's
    /// own hyperparameters (`max_steps`, `learning_rate`, `lr_scheduler`, ...) are taken too.
    #[schema(value_type = Option<HashMap<String, Object>>)]
    hyperparameters: Option<Value>,
    /// `{"type": "supervised", "supervised": {"hyperparameters": {...}}}` or
    /// `{"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, ...}}}` (the training file then
    /// holds preference pairs).
    #[schema(value_type = Option<Object>)]
    method: Option<Value>,
    /// Up to 64 characters, in the fine-tuned model's name.
    suffix: Option<String>,
    seed: Option<u64>,
    /// Not supported: must be empty.
    integrations: Option<Vec<Object>>,
    /// Up to 16 pairs; keys up to 64 characters, values up to 512.
    metadata: Option<HashMap<String, String>>,
    lora: Option<crate::api::openapi::LoraSchema>,
    quantization: Option<crate::api::openapi::QuantizationSchema>,
    data: Option<crate::api::openapi::DataSchema>,
    export: Option<crate::api::openapi::ExportSchema>,
    checkpoint_every: Option<u64>,
    keep_checkpoints: Option<u64>,
    eval_every: Option<u64>,
    device: Option<String>,
    priority: Option<i64>,
}

/// qlorad's default learning rate, which `learning_rate_multiplier` scales.
fn default_learning_rate() -> f64 {
    Hyperparameters::default().learning_rate
}

fn hyper_view(spec: &Value) -> V1Hyperparameters {
    let h = &spec["hyperparameters"];
    V1Hyperparameters {
        n_epochs: h["n_epochs"].as_u64().unwrap_or_default() as usize,
        batch_size: h["batch_size"].as_u64().unwrap_or_default() as usize,
        learning_rate_multiplier: h["learning_rate"].as_f64().unwrap_or_default()
            / default_learning_rate(),
    }
}

fn method_view(spec: &Value) -> V1Method {
    let h = hyper_view(spec);
    match spec["method"]["type"].as_str() {
        Some("dpo") => V1Method {
            kind: "dpo".into(),
            supervised: None,
            dpo: Some(V1Dpo {
                hyperparameters: V1DpoHyperparameters {
                    beta: spec["method"]["beta"].as_f64().unwrap_or_default(),
                    n_epochs: h.n_epochs,
                    batch_size: h.batch_size,
                    learning_rate_multiplier: h.learning_rate_multiplier,
                },
            }),
        },
        _ => V1Method {
            kind: "supervised".into(),
            supervised: Some(V1Supervised { hyperparameters: h }),
            dpo: None,
        },
    }
}

fn job_view(job: JobRow) -> V1Job {
    let spec = &job.spec;
    let text = |k: &str| spec[k].as_str().map(String::from);
    let estimated_finish = match (job.status, job.progress.eta_seconds) {
        (Status::Running, Some(eta)) if eta.is_finite() => {
            Some(crate::jobs::now() + eta.round() as i64)
        }
        _ => None,
    };
    V1Job {
        object: "fine_tuning.job".into(),
        model: text("model"),
        created_at: job.created_at,
        finished_at: job.finished_at,
        fine_tuned_model: (job.status == Status::Succeeded)
            .then(|| crate::jobs::fine_tuned_name(&job)),
        organization_id: "qlorad".into(),
        result_files: job.result_files.clone(),
        status: job.status,
        training_file: text("training_file"),
        validation_file: text("validation_file"),
        hyperparameters: hyper_view(spec),
        method: method_view(spec),
        trained_tokens: Some(job.progress.trained_tokens),
        error: job.error.as_ref().map(|e| V1JobError {
            code: "training_failed".into(),
            message: e.clone(),
            param: None,
        }),
        seed: spec["hyperparameters"]["seed"].as_u64().unwrap_or_default(),
        estimated_finish,
        integrations: Vec::new(),
        user_provided_suffix: job.suffix.clone(),
        metadata: job.metadata.clone(),
        progress: job.progress.clone(),
        spec: job.spec.clone(),
        id: job.id,
    }
}

/// Fold OpenAI's hyperparameters into qlorad's: `"auto"` means qlorad's default, and
/// `learning_rate_multiplier` scales the learning rate (given or default).
fn merge_hyperparameters(into: &mut Map<String, Value>, h: &Value, param: &str) -> ApiResult<()> {
    let Some(h) = h.as_object() else {
        return Err(ApiError::bad(
            "invalid_type",
            format!("{param} must be an object"),
            Some(param),
        ));
    };
    for (k, v) in h {
        if v == "auto" {
            into.remove(k);
            continue;
        }
        let field = format!("{param}.{k}");
        match k.as_str() {
            "learning_rate_multiplier" => {
                let m = v
                    .as_f64()
                    .filter(|m| m.is_finite() && *m > 0.0)
                    .ok_or_else(|| {
                        ApiError::bad(
                            "invalid_value",
                            format!("{field} must be a positive number or \"auto\""),
                            Some(&field),
                        )
                    })?;
                into.insert(k.clone(), json!(m));
            }
            "n_epochs" | "batch_size" => {
                if v.as_u64().is_none_or(|n| n < 1) {
                    return Err(ApiError::bad(
                        "invalid_value",
                        format!("{field} must be a positive integer or \"auto\""),
                        Some(&field),
                    ));
                }
                into.insert(k.clone(), v.clone());
            }
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(())
}

/// Translate an OpenAI create request into a qlorad spec (as JSON) and the job's labels.
fn translate(body: Value) -> ApiResult<(Value, JobLabels)> {
    let Value::Object(mut body) = body else {
        return Err(ApiError::bad(
            "invalid_json",
            "the body must be a JSON object",
            None,
        ));
    };
    for field in ["model", "training_file"] {
        match body.get(field) {
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(_) => {
                return Err(ApiError::bad(
                    "invalid_type",
                    format!("`{field}` must be a non-empty string"),
                    Some(field),
                ))
            }
            None => {
                return Err(ApiError::bad(
                    "missing_field",
                    format!("`{field}` is required"),
                    Some(field),
                ))
            }
        }
    }
    let mut hyper = Map::new();
    if let Some(h) = body.remove("hyperparameters") {
        if !h.is_null() {
            merge_hyperparameters(&mut hyper, &h, "hyperparameters")?;
        }
    }
    let mut method_spec = None;
    if let Some(method) = body.remove("method").filter(|m| !m.is_null()) {
        let kind = method.get("type").and_then(Value::as_str);
        let kind = match kind {
            Some(k @ ("supervised" | "dpo")) => k,
            _ => {
                return Err(ApiError::bad(
                    "unsupported_method",
                    format!(
                        "method.type {}: qlorad runs supervised and dpo",
                        kind.map_or("missing".into(), |k| format!("{k:?}"))
                    ),
                    Some("method.type"),
                ))
            }
        };
        let mut spec = json!({"type": kind});
        if let Some(h) = method
            .get(kind)
            .and_then(|s| s.get("hyperparameters"))
            .filter(|h| !h.is_null())
        {
            let param = format!("method.{kind}.hyperparameters");
            let mut h = h.clone();
            if kind == "dpo" {
                let beta = h.as_object_mut().and_then(|h| h.remove("beta"));
                match beta {
                    None | Some(Value::Null) => {}
                    Some(b) if b == "auto" => {}
                    Some(b) if b.as_f64().is_some_and(|b| b.is_finite() && b > 0.0) => {
                        spec["beta"] = b;
                    }
                    Some(_) => {
                        return Err(ApiError::bad(
                            "invalid_value",
                            format!("{param}.beta must be a positive number or \"auto\""),
                            Some(&format!("{param}.beta")),
                        ))
                    }
                }
            }
            merge_hyperparameters(&mut hyper, &h, &param)?;
        }
        method_spec = Some(spec);
    }
    if let Some(seed) = body.remove("seed").filter(|s| !s.is_null()) {
        if !seed.is_u64() {
            return Err(ApiError::bad(
                "invalid_value",
                "seed must be a non-negative integer",
                Some("seed"),
            ));
        }
        hyper.insert("seed".into(), seed);
    }
    if let Some(m) = hyper.remove("learning_rate_multiplier") {
        let base = hyper
            .get("learning_rate")
            .and_then(Value::as_f64)
            .unwrap_or_else(default_learning_rate);
        hyper.insert(
            "learning_rate".into(),
            json!(base * m.as_f64().unwrap_or(1.0)),
        );
    }
    if let Some(i) = body.remove("integrations") {
        if !(i.is_null() || i.as_array().is_some_and(|a| a.is_empty())) {
            return Err(ApiError::bad(
                "unsupported_integrations",
                "integrations are not supported",
                Some("integrations"),
            ));
        }
    }
    let suffix = match body.remove("suffix") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= 64 && !s.contains(':') => Some(s),
        Some(_) => {
            return Err(ApiError::bad(
                "invalid_value",
                "suffix must be a string of at most 64 characters without `:`",
                Some("suffix"),
            ))
        }
    };
    let metadata = match body.remove("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            if m.len() > 16 {
                return Err(ApiError::bad(
                    "invalid_value",
                    "metadata holds at most 16 pairs",
                    Some("metadata"),
                ));
            }
            for (k, v) in &m {
                let ok =
                    k.chars().count() <= 64 && v.as_str().is_some_and(|v| v.chars().count() <= 512);
                if !ok {
                    return Err(ApiError::bad(
                        "invalid_value",
                        format!("metadata.{k}: keys are strings of at most 64 characters, values of at most 512"),
                        Some(&format!("metadata.{k}")),
                    ));
                }
            }
            Some(Value::Object(m))
        }
        Some(_) => {
            return Err(ApiError::bad(
                "invalid_type",
                "metadata must be an object of strings",
                Some("metadata"),
            ))
        }
    };
    body.insert("hyperparameters".into(), Value::Object(hyper));
    if let Some(m) = method_spec {
        body.insert("method".into(), m);
    }
    Ok((Value::Object(body), JobLabels { suffix, metadata }))
}

/// Create a fine-tuning job; with `dry_run=true` (qlorad's), answer its preflight instead.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs", tag = "openai",
    params(crate::api::jobs::DryRunQuery),
    request_body = V1JobCreate,
    responses((status = 200, body = V1Job), (status = 400, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn fine_tuning_jobs_create(
    State(state): State<AppState>,
    who: Principal,
    q: Result<Query<crate::api::jobs::DryRunQuery>, QueryRejection>,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let (spec, labels) = translate(json_body(body)?)?;
    if query(q)?.dry_run == Some(true) {
        let p = state.jobs.preflight_job(spec, who.scope()).await?;
        return Ok(Json(p).into_response());
    }
    let job = create_job(&state, &who, spec, labels).await?;
    Ok(Json(job_view(job)).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CursorQuery {
    /// The id of the last item of the previous page.
    after: Option<String>,
    /// Items per page, 1 to 100.
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
}

/// Jobs, newest first; `metadata[k]=v` (any number) keeps the jobs whose metadata has those
/// values, `metadata=null` those without metadata.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs", tag = "openai", params(CursorQuery,
        ("metadata[<key>]" = Option<String>, Query, description = "keep jobs whose metadata has this value at <key>; `metadata=null`: jobs without metadata")),
    responses((status = 200, body = Page<V1Job>), (status = 400, body = ErrorBody)))]
pub async fn fine_tuning_jobs_list(
    State(state): State<AppState>,
    who: Principal,
    q: Result<Query<CursorQuery>, QueryRejection>,
    pairs: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<Page<V1Job>>> {
    let q = query(q)?;
    let limit = page_limit(q.limit, 20, 100)?;
    let filter = metadata_filter(&query(pairs)?)?;
    let rows = state
        .jobs
        .store
        .jobs_where(None, &filter, q.after.as_deref(), limit + 1, who.scope())
        .await?;
    let rows: Vec<V1Job> = rows.into_iter().map(job_view).collect();
    Ok(Json(Page::new(rows, limit, |j| j.id.clone())))
}

/// `metadata[k]=v` pairs, or `metadata=null`, from a query string's pairs.
fn metadata_filter(pairs: &[(String, String)]) -> ApiResult<MetadataFilter> {
    let mut has = Vec::new();
    for (k, v) in pairs {
        if k == "metadata" {
            if v != "null" {
                return Err(ApiError::bad(
                    "invalid_metadata",
                    format!("metadata={v:?}: filter with metadata[key]=value, or metadata=null"),
                    Some("metadata"),
                ));
            }
            return Ok(MetadataFilter::None);
        }
        if let Some(key) = k
            .strip_prefix("metadata[")
            .and_then(|k| k.strip_suffix(']'))
        {
            has.push((key.to_string(), v.clone()));
        }
    }
    Ok(if has.is_empty() {
        MetadataFilter::Any
    } else {
        MetadataFilter::Has(has)
    })
}

async fn job(state: &AppState, who: &Principal, id: &str) -> ApiResult<JobRow> {
    state
        .jobs
        .store
        .job(id, who.scope())
        .await
        .map_err(|e| ApiError::from(e).with_param("fine_tuning_job_id"))
}

#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}", tag = "openai",
    params(("fine_tuning_job_id" = String, Path)),
    responses((status = 200, body = V1Job), (status = 404, body = ErrorBody)))]
pub async fn fine_tuning_jobs_get(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<V1Job>> {
    Ok(Json(job_view(job(&state, &who, &id).await?)))
}

/// Cancel a queued or running job; cancelling a cancelled job returns it as it is.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel", tag = "openai",
    params(("fine_tuning_job_id" = String, Path)),
    responses((status = 200, body = V1Job), (status = 404, body = ErrorBody),
        (status = 409, description = "the job has already succeeded or failed", body = ErrorBody)))]
pub async fn fine_tuning_jobs_cancel(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<V1Job>> {
    let current = job(&state, &who, &id).await?;
    if matches!(current.status, Status::Succeeded | Status::Failed) {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            code: "job_finished",
            message: format!("job {id} has already {}", current.status.as_str()),
            param: Some("fine_tuning_job_id".into()),
        });
    }
    if let Some(e) = state.jobs.store.request_cancel(&id, who.scope()).await? {
        state.jobs.hub.publish(&id, &e);
    }
    Ok(Json(job_view(job(&state, &who, &id).await?)))
}

/// Pause a queued or running job (it checkpoints first), as OpenAI's `jobs.pause`.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause", tag = "openai",
    params(("fine_tuning_job_id" = String, Path)),
    responses((status = 200, body = V1Job), (status = 404, body = ErrorBody),
        (status = 409, description = "the job has finished", body = ErrorBody)))]
pub async fn fine_tuning_jobs_pause(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<V1Job>> {
    job(&state, &who, &id).await?;
    let row = state.jobs.pause_job(&id, who.scope()).await?;
    Ok(Json(job_view(row)))
}

/// Resume a paused job from its checkpoint, as OpenAI's `jobs.resume`.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume", tag = "openai",
    params(("fine_tuning_job_id" = String, Path)),
    responses((status = 200, body = V1Job), (status = 404, body = ErrorBody),
        (status = 409, description = "the job is not paused", body = ErrorBody)))]
pub async fn fine_tuning_jobs_resume(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<V1Job>> {
    job(&state, &who, &id).await?;
    let row = state.jobs.resume_job(&id, who.scope()).await?;
    Ok(Json(job_view(row)))
}

/// The numeric tail of a cursor id (`ftevent-<job>-<n>` gives n).
fn cursor(after: Option<&str>) -> ApiResult<Option<i64>> {
    after
        .map(|a| {
            a.rsplit_once('-')
                .and_then(|(_, n)| n.parse::<i64>().ok())
                .ok_or_else(|| {
                    ApiError::bad(
                        "invalid_cursor",
                        format!("after {a:?} is not an id from this list"),
                        Some("after"),
                    )
                })
        })
        .transpose()
}

fn job_key(id: &str) -> &str {
    id.strip_prefix("job-").unwrap_or(id)
}

fn event_view(job: &str, e: Event) -> V1Event {
    let (kind, data) = if e.kind == EventKind::Metrics {
        let mut d = e.data;
        if let Some(loss) = d.get("loss").cloned() {
            d["train_loss"] = loss;
        }
        if let Some(loss) = d.get("eval_loss").cloned() {
            d["valid_loss"] = loss;
        }
        ("metrics", d)
    } else {
        let mut d = e.data;
        if d.is_object() {
            d["qlorad_type"] = json!(e.kind);
        }
        ("message", d)
    };
    V1Event {
        id: format!("ftevent-{}-{}", job_key(job), e.seq),
        object: "fine_tuning.job.event".into(),
        created_at: e.created_at,
        level: match e.level {
            Level::Warning => "warn".into(),
            other => other.as_str().into(),
        },
        message: e.message,
        kind: kind.into(),
        data,
    }
}

/// A job's events, newest first.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events", tag = "openai",
    params(("fine_tuning_job_id" = String, Path), CursorQuery),
    responses((status = 200, body = Page<V1Event>), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn fine_tuning_events_list(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    q: Result<Query<CursorQuery>, QueryRejection>,
) -> ApiResult<Json<Page<V1Event>>> {
    let q = query(q)?;
    let limit = page_limit(q.limit, 20, 100)?;
    let before = cursor(q.after.as_deref())?;
    job(&state, &who, &id).await?;
    let rows = state.jobs.store.events_desc(&id, before, limit + 1).await?;
    let rows: Vec<V1Event> = rows.into_iter().map(|e| event_view(&id, e)).collect();
    Ok(Json(Page::new(rows, limit, |e| e.id.clone())))
}

fn checkpoint_view(job: &JobRow, c: CheckpointRow) -> V1Checkpoint {
    V1Checkpoint {
        id: format!("ftckpt-{}-{}", job_key(&job.id), c.step),
        object: "fine_tuning.job.checkpoint".into(),
        created_at: c.created_at,
        fine_tuned_model_checkpoint: format!(
            "{}:ckpt-step-{}",
            crate::jobs::fine_tuned_name(job),
            c.step
        ),
        fine_tuning_job_id: job.id.clone(),
        step_number: c.step,
        metrics: V1CheckpointMetrics {
            step: c.step,
            train_loss: c.loss,
        },
        name: c.name,
    }
}

/// A job's checkpoints, newest first.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", tag = "openai",
    params(("fine_tuning_job_id" = String, Path), CursorQuery),
    responses((status = 200, body = Page<V1Checkpoint>), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn fine_tuning_checkpoints_list(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    q: Result<Query<CursorQuery>, QueryRejection>,
) -> ApiResult<Json<Page<V1Checkpoint>>> {
    let q = query(q)?;
    let limit = page_limit(q.limit, 10, 100)?;
    let before = cursor(q.after.as_deref())?;
    let job = job(&state, &who, &id).await?;
    let mut rows = state.jobs.store.checkpoints(&id).await?;
    rows.reverse();
    let rows: Vec<V1Checkpoint> = rows
        .into_iter()
        .filter(|c| before.is_none_or(|b| c.step < b))
        .take(limit as usize + 1)
        .map(|c| checkpoint_view(&job, c))
        .collect();
    Ok(Json(Page::new(rows, limit, |c| c.id.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_fields_become_a_spec() {
        let (spec, labels) = translate(json!({
            "model": "m", "training_file": "file-1", "suffix": "mine", "seed": 7,
            "hyperparameters": {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5, "max_steps": 9},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "auto"}}},
            "lora": {"r": 4}, "metadata": {"team": "a"}
        }))
        .unwrap();
        let h = &spec["hyperparameters"];
        assert_eq!(h["learning_rate"], json!(1e-4));
        assert_eq!(
            (h["seed"].clone(), h["max_steps"].clone()),
            (json!(7), json!(9))
        );
        assert!(h.get("n_epochs").is_none() && h.get("batch_size").is_none());
        assert_eq!(spec["lora"]["r"], 4);
        assert_eq!(labels.suffix.as_deref(), Some("mine"));
        assert_eq!(labels.metadata, Some(json!({"team": "a"})));
    }

    /// OpenAI's DPO method: beta to the spec's method, the rest as hyperparameters; the job
    /// reads back in the same shape.
    #[test]
    fn a_dpo_method_becomes_the_spec_method() {
        let (spec, _) = translate(json!({
            "model": "m", "training_file": "file-1",
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}}}
        }))
        .unwrap();
        assert_eq!(spec["method"], json!({"type": "dpo", "beta": 0.25}));
        assert_eq!(spec["hyperparameters"]["n_epochs"], 2);
        assert_eq!(spec["hyperparameters"]["learning_rate"], json!(1e-4));
        let full =
            serde_json::to_value(crate::finetune::JobSpec::from_value(spec).unwrap()).unwrap();
        let view = serde_json::to_value(method_view(&full)).unwrap();
        assert_eq!(
            view,
            json!({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}}})
        );
        let (auto, _) = translate(json!({"model": "m", "training_file": "f",
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto"}}}}))
        .unwrap();
        assert_eq!(auto["method"], json!({"type": "dpo"}));
    }

    #[test]
    fn bad_openai_fields_name_the_param() {
        let param = |body: Value| translate(body).unwrap_err().param;
        let base = |extra: Value| {
            let mut b = json!({"model": "m", "training_file": "f"});
            b.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            b
        };
        assert_eq!(
            param(json!({"training_file": "f"})).as_deref(),
            Some("model")
        );
        assert_eq!(
            param(base(json!({"hyperparameters": {"n_epochs": 0}}))).as_deref(),
            Some("hyperparameters.n_epochs")
        );
        assert_eq!(
            param(base(
                json!({"hyperparameters": {"learning_rate_multiplier": -1}})
            ))
            .as_deref(),
            Some("hyperparameters.learning_rate_multiplier")
        );
        assert_eq!(
            param(base(json!({"method": {"type": "orpo"}}))).as_deref(),
            Some("method.type")
        );
        assert_eq!(
            param(base(
                json!({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}})
            ))
            .as_deref(),
            Some("method.dpo.hyperparameters.beta")
        );
        assert_eq!(
            param(base(json!({"suffix": "x".repeat(65)}))).as_deref(),
            Some("suffix")
        );
        assert_eq!(
            param(base(json!({"integrations": [{"type": "wandb"}]}))).as_deref(),
            Some("integrations")
        );
        assert_eq!(
            param(base(json!({"metadata": {"k": 1}}))).as_deref(),
            Some("metadata.k")
        );
    }
}
