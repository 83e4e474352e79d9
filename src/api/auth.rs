//! API keys: loaded from a file, checked on every request but the public ones (health, the
//! OpenAPI document, the dashboard's page and assets, metrics if configured). A request's key
//! becomes its `Principal`, which scopes every store query: a key sees only what it made, an
//! admin key sees everything. Secrets are kept only as SHA-256 digests, compared in constant
//! time, and never logged.

use std::fmt;
use std::path::{Path, PathBuf};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::config::Config;
use crate::jobs::Scope;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("API keys file {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("API keys file {path}, line {line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
}

/// One configured key. Debug shows the name only.
#[derive(Clone)]
struct ApiKey {
    name: String,
    digest: [u8; 32],
    admin: bool,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("secret", &"<redacted>")
            .field("admin", &self.admin)
            .finish()
    }
}

/// The configured keys; empty means the server has no keys (one anonymous owner).
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

/// Who is asking: a key's name (the owner of what it creates) and whether it sees everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub admin: bool,
}

impl Principal {
    /// A server without keys: one owner, `""`, who sees everything.
    pub fn anonymous() -> Self {
        Principal {
            name: String::new(),
            admin: true,
        }
    }

    /// The rows this principal may touch.
    pub fn scope(&self) -> Scope<'_> {
        if self.admin {
            Scope::All
        } else {
            Scope::Owner(&self.name)
        }
    }

    /// The owner recorded on what this principal creates.
    pub fn owner(&self) -> &str {
        &self.name
    }
}

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

fn parse_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl ApiKeys {
    /// Read a keys file.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| AuthError::Io(path.to_path_buf(), e))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parse a keys file: `NAME:SECRET`, `NAME:sha256:HEX`, either with `:admin` at the end;
    /// blank lines and `#` comments are skipped. Errors name the line, never the secret.
    pub fn parse(text: &str, source: &str) -> Result<Self, AuthError> {
        let mut keys: Vec<ApiKey> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |message: &str| AuthError::Line {
                path: source.to_string(),
                line: i + 1,
                message: message.to_string(),
            };
            let (name, rest) = line
                .split_once(':')
                .ok_or_else(|| bad("expected NAME:SECRET"))?;
            let name = name.trim();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
            {
                return Err(bad(
                    "the key's name must be letters, digits, '-', '_', '.' or '@'",
                ));
            }
            let (secret, admin) = match rest.strip_suffix(":admin") {
                Some(s) => (s, true),
                None => (rest, false),
            };
            let digest = match secret.strip_prefix("sha256:") {
                Some(hex) => parse_hex(hex)
                    .ok_or_else(|| bad("sha256: must be followed by 64 hex digits"))?,
                None if secret.is_empty() => return Err(bad("the secret is empty")),
                None => digest(secret.as_bytes()),
            };
            if keys.iter().any(|k| k.name == name) {
                return Err(bad(&format!("the name {name:?} is used twice")));
            }
            if keys.iter().any(|k| bool::from(k.digest.ct_eq(&digest))) {
                return Err(bad("this secret is also another key's"));
            }
            keys.push(ApiKey {
                name: name.to_string(),
                digest,
                admin,
            });
        }
        Ok(ApiKeys { keys })
    }

    /// The keys of the configuration, or none.
    pub fn from_config(cfg: &Config) -> Result<Self, AuthError> {
        match &cfg.auth.api_keys_file {
            Some(p) => Self::load(p),
            None => Ok(ApiKeys::default()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The key a presented secret belongs to. Every key is compared, each in constant time, so
    /// the time taken says nothing about which key (or how much of one) matched.
    pub fn find(&self, secret: &str) -> Option<Principal> {
        let d = digest(secret.as_bytes());
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.digest.ct_eq(&d)) {
                found = Some(Principal {
                    name: k.name.clone(),
                    admin: k.admin,
                });
            }
        }
        found
    }
}

/// Whether a route (as the OpenAPI document names it) is served without a key: `Some(true)`
/// always, `Some(false)` if the configuration says so (`/metrics`), `None` never.
pub fn public_path(path: &str) -> Option<bool> {
    match path {
        "/" | "/healthz" | "/openapi.json" => Some(true),
        p if p.starts_with("/dashboard/") => Some(true),
        "/metrics" => Some(false),
        _ => None,
    }
}

/// Whether this request's path is served without a key.
fn is_public(path: &str, cfg: &Config) -> bool {
    match public_path(path) {
        Some(always) => always || cfg.auth.public_metrics,
        None => false,
    }
}

/// The secret of an `Authorization: Bearer SECRET` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn unauthorized(code: &'static str, message: &str) -> Response {
    let mut r = ApiError {
        status: StatusCode::UNAUTHORIZED,
        code,
        message: message.into(),
        param: None,
    }
    .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"qlorad\""),
    );
    r
}

/// Middleware: a request to a non-public route needs a valid key, else 401 before any handler
/// runs. The key's `Principal` goes into the request's extensions.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if state.keys.is_empty() {
        req.extensions_mut().insert(Principal::anonymous());
        return next.run(req).await;
    }
    if is_public(req.uri().path(), &state.config) {
        return next.run(req).await;
    }
    let principal = match bearer(req.headers()) {
        None => {
            return unauthorized(
                "missing_api_key",
                "an API key is required: send `Authorization: Bearer <key>`",
            )
        }
        Some(secret) => state.keys.find(secret),
    };
    match principal {
        Some(p) => {
            tracing::debug!(key = %p.name, "authenticated");
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        None => unauthorized("invalid_api_key", "the API key is not valid"),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // Only `authenticate` inserts one; a route it let through without a key has none.
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| unauthorized("missing_api_key", "an API key is required"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: [u8; 32]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn keys_parse_plain_hashed_and_admin() {
        let text = format!(
            "# team keys\n\nalice:s3cret-alpha\nbob:sha256:{}\nroot:rootpw:admin\n",
            hex(digest(b"bob-secret"))
        );
        let keys = ApiKeys::parse(&text, "keys").unwrap();
        assert_eq!(keys.len(), 3);
        let alice = keys.find("s3cret-alpha").unwrap();
        assert_eq!((alice.name.as_str(), alice.admin), ("alice", false));
        assert_eq!(alice.scope(), Scope::Owner("alice"));
        assert_eq!(keys.find("bob-secret").unwrap().name, "bob");
        let root = keys.find("rootpw").unwrap();
        assert!(root.admin && root.scope() == Scope::All);
        assert!(keys.find("s3cret-alph").is_none());
        assert!(keys.find("").is_none());
        assert!(keys.find(&hex(digest(b"bob-secret"))).is_none());
    }

    #[test]
    fn bad_lines_name_the_line_not_the_secret() {
        for (text, want) in [
            ("nocolon", "line 1: expected NAME:SECRET"),
            ("\na:x\na:y", "line 3: the name \"a\" is used twice"),
            (
                "a:same\nb:same",
                "line 2: this secret is also another key's",
            ),
            (
                "a:sha256:abcd",
                "line 1: sha256: must be followed by 64 hex digits",
            ),
            ("a:", "line 1: the secret is empty"),
            ("bad name:x", "line 1: the key's name"),
        ] {
            let e = ApiKeys::parse(text, "keys").unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains("same") || !text.contains("same\n"), "{e}");
        }
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let keys = ApiKeys::parse("alice:hunter2-hunter2", "keys").unwrap();
        let d = format!("{keys:?}");
        assert!(d.contains("alice") && d.contains("<redacted>"), "{d}");
        assert!(!d.contains("hunter2"), "{d}");
        let digest_hex = hex(digest(b"hunter2-hunter2"));
        assert!(!d.contains(&digest_hex[..16]), "{d}");
    }

    #[test]
    fn bearer_header_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
