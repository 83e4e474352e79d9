//! The command-line client of a running service (`qlorad jobs ...`, `qlorad files ...`): a thin
//! HTTP client over the native API, SSE following with a progress bar, resumable downloads.

pub mod commands;
pub mod sse;

use std::path::{Path, PathBuf};

use reqwest::{RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use commands::{files, jobs, FilesCommand, JobsCommand};

const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// Where the service is and the key to it, for `qlorad jobs` and `qlorad files`.
#[derive(clap::Args)]
pub struct ServerArgs {
    /// The service's URL.
    #[arg(long, global = true, default_value = DEFAULT_SERVER)]
    pub server: String,
    /// The API key (default: the QLORAD_API_KEY environment variable).
    #[arg(long, global = true)]
    pub api_key: Option<String>,
}

impl ServerArgs {
    pub fn key(&self) -> Option<String> {
        self.api_key
            .clone()
            .or_else(|| std::env::var("QLORAD_API_KEY").ok())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: {source}")]
    Http { url: String, source: reqwest::Error },
    /// The server's error object.
    #[error("{status}: {message}{}", param.as_ref().map(|p| format!(" (param: {p})")).unwrap_or_default())]
    Api {
        status: StatusCode,
        message: String,
        param: Option<String>,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ClientError>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A connection to one qlorad server.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer`; never printed.
    api_key: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Client {
    /// `base` is the server's URL, e.g. `http://127.0.0.1:8080`.
    pub fn new(base: &str) -> Self {
        Client {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            api_key: None,
        }
    }

    /// Send `key` with every request.
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key.filter(|k| !k.is_empty());
        self
    }

    fn authorized(&self, req: RequestBuilder) -> RequestBuilder {
        match &self.api_key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.authorized(self.http.get(self.url(path)))
    }

    pub fn post(&self, path: &str) -> RequestBuilder {
        self.authorized(self.http.post(self.url(path)))
    }

    /// Send; a non-2xx answer becomes `ClientError::Api` with the server's message.
    pub async fn send(&self, req: RequestBuilder) -> Result<Response> {
        let (client, req) = req.build_split();
        let req = req.map_err(|source| ClientError::Http {
            url: self.base.clone(),
            source,
        })?;
        let url = req.url().to_string();
        let resp = client
            .execute(req)
            .await
            .map_err(|source| ClientError::Http {
                url: url.clone(),
                source,
            })?;
        if resp.status().is_success() || resp.status() == StatusCode::NOT_MODIFIED {
            return Ok(resp);
        }
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let e = &body["error"];
        Err(ClientError::Api {
            status,
            message: e["message"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| format!("{url} answered {status}")),
            param: e["param"].as_str().map(String::from),
        })
    }

    /// Send and decode a JSON answer.
    pub async fn json<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T> {
        let resp = self.send(req).await?;
        let url = resp.url().to_string();
        resp.json()
            .await
            .map_err(|source| ClientError::Http { url, source })
    }

    /// Upload a dataset as the raw body, streamed from disk.
    pub async fn upload(
        &self,
        path: &Path,
        format: Option<&str>,
        model: Option<&str>,
    ) -> Result<Value> {
        let file = tokio::fs::File::open(path).await.map_err(io_err(path))?;
        let len = file.metadata().await.map_err(io_err(path))?.len();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "upload.jsonl".into());
        let mut query = vec![("filename", name)];
        query.extend(format.map(|f| ("format", f.to_string())));
        query.extend(model.map(|m| ("model", m.to_string())));
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        let req = self
            .post("/files")
            .query(&query)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body);
        self.json(req).await
    }
}

/// Percent-encode one path segment.
pub fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
