//! OpenAI's `/v1/chat/completions`, `/v1/completions` and `/v1/models`: a base model or a
//! fine-tuned one (a succeeded job's `fine_tuned_model` or a checkpoint's; another key's is a
//! 404) answers, streamed as Server-Sent Event chunks or whole, with usage counts.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::api::auth::Principal;
use crate::api::jobs::json_body;
use crate::api::{ApiError, ApiResult, AppState, ErrorBody};
use crate::data::Message;
use crate::infer::{InferError, Prompt, Request, Response as Generated};
use crate::jobs::inference::ServeError;
use crate::model::llama::generate::{Finish, Sampling};

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        let message = e.to_string();
        match e {
            ServeError::UnknownModel(_) => ApiError {
                code: "model_not_found",
                param: Some("model".into()),
                ..ApiError::not_found(message)
            },
            ServeError::Infer(InferError::Request { field, .. }) => {
                ApiError::bad("invalid_value", message, Some(&field))
            }
            // A model or adapter that does not load or run is the server's trouble.
            ServeError::Infer(other) => ApiError::internal(other),
            ServeError::Internal(m) => ApiError::internal(m),
        }
    }
}

/// Which endpoint a request came to: the shapes differ, the generation does not.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// A request's fields after checking.
struct Parsed {
    model: String,
    prompt: Prompt,
    max_tokens: usize,
    sampling: Sampling,
    stop: Vec<String>,
    n: usize,
    stream: bool,
    include_usage: bool,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad("invalid_value", message, Some(param))
}

/// A message's content: a string, or OpenAI's list of parts of which only text is taken.
fn content(v: &Value, param: &str) -> ApiResult<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(i, p)| match (p["type"].as_str(), p["text"].as_str()) {
                (Some("text"), Some(t)) => Ok(t.to_string()),
                _ => Err(bad(
                    &format!("{param}[{i}]"),
                    "only text parts are supported",
                )),
            })
            .collect::<ApiResult<Vec<_>>>()
            .map(|t| t.concat()),
        Value::Null => Ok(String::new()),
        _ => Err(bad(param, "must be a string or a list of text parts")),
    }
}

fn number(body: &Map<String, Value>, key: &str, default: f64, range: (f64, f64)) -> ApiResult<f64> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| (range.0..=range.1).contains(x))
            .ok_or_else(|| {
                bad(
                    key,
                    format!("must be a number from {} to {}", range.0, range.1),
                )
            }),
    }
}

fn count(body: &Map<String, Value>, key: &str) -> ApiResult<Option<usize>> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&n| n >= 1)
            .map(|n| Some(n as usize))
            .ok_or_else(|| bad(key, "must be a positive integer")),
    }
}

/// Whether a value of an OpenAI option qlorad does not implement is its harmless default.
type Accepts = fn(&Value) -> bool;

fn parse(state: &AppState, body: Value, kind: Kind) -> ApiResult<Parsed> {
    let Value::Object(body) = body else {
        return Err(ApiError::bad(
            "invalid_json",
            "the body must be a JSON object",
            None,
        ));
    };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => {
            return Err(ApiError::bad(
                "missing_field",
                "`model` is required",
                Some("model"),
            ))
        }
    };
    let prompt = match kind {
        Kind::Chat => {
            let Some(Value::Array(list)) = body.get("messages") else {
                return Err(ApiError::bad(
                    "missing_field",
                    "`messages` must be a list",
                    Some("messages"),
                ));
            };
            if list.is_empty() {
                return Err(bad("messages", "is empty"));
            }
            let mut messages = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                let role = match m["role"].as_str() {
                    Some("developer") => "system",
                    Some(r @ ("system" | "user" | "assistant")) => r,
                    _ => {
                        return Err(bad(
                            &format!("messages[{i}].role"),
                            "must be system, developer, user or assistant",
                        ))
                    }
                };
                messages.push(Message {
                    role: role.into(),
                    content: content(&m["content"], &format!("messages[{i}].content"))?,
                });
            }
            Prompt::Chat(messages)
        }
        Kind::Text => match body.get("prompt") {
            Some(Value::String(p)) => Prompt::Text(p.clone()),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                Prompt::Text(a[0].as_str().unwrap_or_default().to_string())
            }
            _ => return Err(bad("prompt", "must be a string (one prompt a request)")),
        },
    };
    let supported: [(&str, Accepts); 4] = [
        ("tools", |v| v.as_array().is_some_and(|a| a.is_empty())),
        ("logprobs", |v| v == &json!(false)),
        ("echo", |v| v == &json!(false)),
        ("response_format", |v| v["type"] == "text"),
    ];
    for (key, ok) in supported {
        if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
            if !ok(v) {
                return Err(bad(key, format!("{key} is not supported")));
            }
        }
    }
    let cap = state.config.inference.max_tokens;
    let asked = match kind {
        Kind::Chat => match count(&body, "max_completion_tokens")? {
            Some(n) => Some(n),
            None => count(&body, "max_tokens")?,
        },
        Kind::Text => Some(count(&body, "max_tokens")?.unwrap_or(16)),
    };
    let max_tokens = asked.unwrap_or(cap.min(1024));
    if max_tokens > cap {
        let key = if body.contains_key("max_completion_tokens") {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        return Err(bad(key, format!("at most {cap} (inference.max_tokens)")));
    }
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a))
            if a.len() <= 4 && a.iter().all(|s| s.as_str().is_some_and(|s| !s.is_empty())) =>
        {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        }
        Some(_) => return Err(bad("stop", "must be a string or up to 4 non-empty strings")),
    };
    let seed = match body.get("seed") {
        None | Some(Value::Null) => crate::jobs::now() as u64,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bad("seed", "must be a non-negative integer"))?,
    };
    // 0 (or absent) keeps every token.
    let top_k = match body.get("top_k") {
        None | Some(Value::Null) => 0,
        Some(v) => {
            v.as_u64()
                .ok_or_else(|| bad("top_k", "must be a non-negative integer"))? as usize
        }
    };
    let sampling = Sampling {
        temperature: number(&body, "temperature", 1.0, (0.0, 2.0))?,
        top_p: number(&body, "top_p", 1.0, (0.0, 1.0))?,
        top_k,
        seed,
    };
    let n = count(&body, "n")?.unwrap_or(1);
    if n > 16 {
        return Err(bad("n", "at most 16"));
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("stream", "must be a boolean")),
    };
    let include_usage = body
        .get("stream_options")
        .is_some_and(|o| o["include_usage"] == json!(true));
    Ok(Parsed {
        model,
        prompt,
        max_tokens,
        sampling,
        stop,
        n,
        stream,
        include_usage,
    })
}

fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

/// Token counts of a request: `prompt_tokens`, `completion_tokens`, `total_tokens`.
fn usage(r: &Generated) -> Value {
    let completion: usize = r.choices.iter().map(|c| c.tokens).sum();
    json!({"prompt_tokens": r.prompt_tokens, "completion_tokens": completion,
           "total_tokens": r.prompt_tokens + completion})
}

/// One streamed piece: a choice's text delta, its end, or a failure.
enum Piece {
    Delta(usize, String),
    Done(Result<Generated, ApiError>),
}

async fn serve(state: AppState, who: Principal, body: Value, kind: Kind) -> ApiResult<Response> {
    let p = parse(&state, body, kind)?;
    let target = state.jobs.inference_target(&p.model, who.scope()).await?;
    let engine = state.inference.engine(target.base).await?;
    let req = Request {
        adapter: target.adapter,
        prompt: p.prompt,
        max_tokens: p.max_tokens,
        sampling: p.sampling,
        stop: p.stop,
        n: p.n,
    };
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        uuid::Uuid::new_v4().simple()
    );
    let created = crate::jobs::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(64);
    let streaming = p.stream;
    let worker = tokio::task::spawn_blocking(move || {
        let mut engine = engine.lock().unwrap_or_else(|e| e.into_inner());
        let out = engine.run(&req, &mut |i, text| {
            !streaming || tx.blocking_send(Piece::Delta(i, text.to_string())).is_ok()
        });
        let _ = tx.blocking_send(Piece::Done(out.map_err(|e| ServeError::from(e).into())));
    });
    drop(worker);
    let object = if kind == Kind::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    if !p.stream {
        let seconds = state.config.inference.timeout_seconds.max(1);
        let done = tokio::time::timeout(Duration::from_secs(seconds), async {
            loop {
                match rx.recv().await {
                    Some(Piece::Done(r)) => return r,
                    Some(Piece::Delta(..)) => continue,
                    None => return Err(ApiError::internal("the generation thread ended")),
                }
            }
        })
        .await
        .map_err(|_| ApiError {
            status: axum::http::StatusCode::REQUEST_TIMEOUT,
            code: "timeout",
            message: format!("generation took longer than {seconds} s (inference.timeout_seconds)"),
            param: None,
        })??;
        let choices: Vec<Value> = done
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| match kind {
                Kind::Chat => json!({"index": i, "message": {"role": "assistant", "content": c.text, "refusal": null},
                    "logprobs": null, "finish_reason": finish_reason(c.finish)}),
                Kind::Text => json!({"index": i, "text": c.text, "logprobs": null,
                    "finish_reason": finish_reason(c.finish)}),
            })
            .collect();
        let body = json!({"id": id, "object": object, "created": created, "model": p.model,
            "choices": choices, "usage": usage(&done), "system_fingerprint": null});
        return Ok(Json(body).into_response());
    }
    let chunk_object = if kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let (model, include_usage, n) = (p.model, p.include_usage, p.n);
    let chunk = move |choices: Value, usage: Option<Value>| {
        let mut c = json!({"id": id, "object": chunk_object, "created": created, "model": model,
            "system_fingerprint": null, "choices": choices});
        if let Some(u) = usage {
            c["usage"] = u;
        }
        SseEvent::default().data(c.to_string())
    };
    let stream = stream_chunks(rx, chunk, kind, n, include_usage);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// The chunks of a streamed answer: each choice's role first (chat), its text deltas, its
/// finish reason, the usage when asked, then `[DONE]`. A failure mid-stream is an `error`
/// event with OpenAI's error object. A client that leaves stops the generation: the chunks'
/// channel closes, and with it the one the generation writes to.
fn stream_chunks(
    mut rx: tokio::sync::mpsc::Receiver<Piece>,
    chunk: impl Fn(Value, Option<Value>) -> SseEvent + Send + 'static,
    kind: Kind,
    n: usize,
    include_usage: bool,
) -> impl futures::Stream<Item = Result<SseEvent, Infallible>> {
    let (tx, out) = tokio::sync::mpsc::channel::<SseEvent>(16);
    tokio::spawn(async move {
        let choice = |i: usize, delta: Value, text: &str, finish: Option<&str>| match kind {
            Kind::Chat => {
                json!([{"index": i, "delta": delta, "logprobs": null, "finish_reason": finish}])
            }
            Kind::Text => {
                json!([{"index": i, "text": text, "logprobs": null, "finish_reason": finish}])
            }
        };
        if kind == Kind::Chat {
            for i in 0..n {
                let first = choice(i, json!({"role": "assistant", "content": ""}), "", None);
                if tx.send(chunk(first, None)).await.is_err() {
                    return;
                }
            }
        }
        loop {
            let event = match rx.recv().await {
                Some(Piece::Delta(i, text)) => {
                    chunk(choice(i, json!({"content": text}), &text, None), None)
                }
                Some(Piece::Done(Ok(r))) => {
                    for (i, c) in r.choices.iter().enumerate() {
                        let end = choice(i, json!({}), "", Some(finish_reason(c.finish)));
                        if tx.send(chunk(end, None)).await.is_err() {
                            return;
                        }
                    }
                    if include_usage {
                        let _ = tx.send(chunk(json!([]), Some(usage(&r)))).await;
                    }
                    break;
                }
                Some(Piece::Done(Err(e))) => {
                    let body = json!({"error": {"message": e.message, "type": "server_error", "param": e.param, "code": e.code}});
                    let _ = tx
                        .send(SseEvent::default().event("error").data(body.to_string()))
                        .await;
                    break;
                }
                None => break,
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
    });
    tokio_stream::wrappers::ReceiverStream::new(out).map(Ok)
}

use futures::StreamExt;

/// A chat completion: `messages` in the model's chat template; `max_completion_tokens` (or
/// `max_tokens`), `temperature` (default 1), `top_p`, `top_k`, `n`, `stop`, `seed`, `stream`
/// with `stream_options.include_usage`.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    request_body(content = Object, description = "OpenAI's chat completion request"),
    responses((status = 200, description = "a chat.completion, or with stream a text/event-stream of chat.completion.chunk"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    who: Principal,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult<Response> {
    serve(state, who, json_body(body)?, Kind::Chat).await
}

/// A text completion of `prompt` (one string), as OpenAI's legacy completions.
#[utoipa::path(post, path = "/v1/completions", tag = "openai",
    request_body(content = Object, description = "OpenAI's completion request"),
    responses((status = 200, description = "a text_completion, or with stream a text/event-stream of them"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn completions(
    State(state): State<AppState>,
    who: Principal,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult<Response> {
    serve(state, who, json_body(body)?, Kind::Text).await
}

/// A model: a base in the model roots (`owned_by: qlorad`) or one of the caller's fine-tuned
/// models (`owned_by` the key).
#[derive(Serialize, ToSchema)]
pub struct V1Model {
    pub id: String,
    /// Always `model`.
    pub object: String,
    pub created: i64,
    pub owned_by: String,
}

/// `{"object": "list", "data": [...]}`.
#[derive(Serialize, ToSchema)]
pub struct V1ModelList {
    pub object: String,
    pub data: Vec<V1Model>,
}

/// The bases and the caller's fine-tuned models.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, body = V1ModelList)))]
pub async fn models(State(state): State<AppState>, who: Principal) -> ApiResult<Json<V1ModelList>> {
    let roots = state.config.models.roots.clone();
    let bases = tokio::task::spawn_blocking(move || crate::model::list_models(&roots))
        .await
        .unwrap_or_default();
    let mut data: Vec<V1Model> = bases
        .into_iter()
        .map(|m| V1Model {
            created: std::fs::metadata(&m.path)
                .and_then(|md| md.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs() as i64),
            id: m.name,
            object: "model".into(),
            owned_by: "qlorad".into(),
        })
        .collect();
    for (id, created) in state.jobs.fine_tuned_models(who.scope()).await? {
        data.push(V1Model {
            id,
            object: "model".into(),
            created,
            owned_by: who.owner().to_string(),
        });
    }
    Ok(Json(V1ModelList {
        object: "list".into(),
        data,
    }))
}
