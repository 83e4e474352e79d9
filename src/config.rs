//! Service configuration: the embedded `config/default.toml`, then `--config FILE`, then
//! `QLORAD_*` environment variables (`__` between levels), then command-line flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub models: ModelsConfig,
    pub workers: WorkersConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub inference: InferenceConfig,
    /// Endpoints told when a job ends (`[[webhooks]]`, any number).
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    /// `QLORAD_*` variables that name no section of the config, ignored (`serve` warns of them).
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

/// One webhook endpoint: OpenAI's payload and Standard Webhooks signature headers.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where events are POSTed.
    pub url: String,
    /// The signing secret, `whsec_` and base64, as OpenAI's dashboard gives one.
    pub secret: String,
    /// Event types sent: `fine_tuning.job.succeeded`, `…failed`, `…cancelled` (the default
    /// three) and `…paused`.
    #[serde(default = "default_webhook_events")]
    pub events: Vec<String>,
    /// Seconds an attempt may take before it counts as failed.
    #[serde(default = "default_webhook_timeout")]
    pub timeout_seconds: u64,
}

fn default_webhook_events() -> Vec<String> {
    WEBHOOK_EVENTS[..3].iter().map(|s| s.to_string()).collect()
}

fn default_webhook_timeout() -> u64 {
    10
}

/// Every event type a webhook may ask for.
pub const WEBHOOK_EVENTS: [&str; 4] = [
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
    "fine_tuning.job.paused",
];

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("events", &self.events)
            .finish()
    }
}

impl WebhookConfig {
    /// The HMAC key: the base64 after `whsec_`, decoded.
    pub fn key(&self) -> Result<Vec<u8>, ConfigError> {
        use base64::Engine;
        let bad = |message: &str| ConfigError::Parse {
            source_name: "webhooks".into(),
            message: format!("{}: secret {message}", self.url),
        };
        let b64 = self
            .secret
            .strip_prefix("whsec_")
            .ok_or_else(|| bad("must start with whsec_"))?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad("must be whsec_ followed by base64"))?;
        if key.is_empty() {
            return Err(bad("is empty"));
        }
        Ok(key)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |message: String| ConfigError::Parse {
            source_name: "webhooks".into(),
            message,
        };
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(bad(format!(
                "url {:?} must be http:// or https://",
                self.url
            )));
        }
        self.key()?;
        if let Some(e) = self
            .events
            .iter()
            .find(|e| !WEBHOOK_EVENTS.contains(&e.as_str()))
        {
            return Err(bad(format!(
                "{}: event {e:?} is not one of {}",
                self.url,
                WEBHOOK_EVENTS.join(", ")
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest JSON request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest dataset upload, in bytes.
    pub max_upload_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Files, checkpoints and artifacts; the SQLite database too unless `database_url` names
    /// another.
    pub data_dir: PathBuf,
    /// `postgres://user:pass@host/db` for a queue that several hosts share; unset, SQLite in
    /// `data_dir`.
    pub database_url: Option<String>,
    /// `s3://bucket/prefix` (credentials and endpoint from `AWS_*`) for files, checkpoints and
    /// artifacts that every host reads; unset, `data_dir` alone.
    pub object_store: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// Directories whose subdirectories are base models.
    pub roots: Vec<PathBuf>,
    /// Where models named by Hugging Face Hub id (`org/name`) are downloaded from; unset,
    /// `HF_ENDPOINT` or `https://huggingface.co`. `HF_TOKEN` authenticates, `HF_HUB_OFFLINE`
    /// uses the cache alone.
    pub hub_endpoint: Option<String>,
    /// Their cache, in the hub's own layout; unset, `hub/` in the first model root.
    pub hub_cache: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    /// One worker per device: `cpu`, `cuda:0`, ...
    pub devices: Vec<String>,
    /// Seconds a job's lease lasts without renewal.
    pub lease_seconds: u64,
    /// Seconds between lease renewals and cancellation checks.
    pub heartbeat_seconds: u64,
    /// Runs a job gets when it fails for a reason another attempt could change (a full disk,
    /// memory or the device lost); then it fails for good.
    pub max_attempts: u32,
    /// GiB a job may use on a worker's device (default: the device's whole memory). A job whose
    /// estimated peak is over it on every worker is refused at create.
    pub memory_gib: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// API keys, one a line: `NAME:SECRET` or `NAME:sha256:HEX`, `:admin` at the end for a key
    /// that sees everything. Without it the server has one anonymous owner and listens only on
    /// loopback (unless `allow_anonymous_remote`). The file's contents are never logged.
    pub api_keys_file: Option<PathBuf>,
    /// Serve without keys on an address other than loopback.
    pub allow_anonymous_remote: bool,
    /// Whether `GET /metrics` is served without a key (for a Prometheus scraper).
    pub public_metrics: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Seconds a request may take to produce its response head (streams and downloads then
    /// run as long as they need); over it the answer is 408.
    pub request_timeout_seconds: u64,
    /// The same for dataset uploads, which read their whole body first.
    pub upload_timeout_seconds: u64,
    /// Jobs one key may have waiting in the queue; one more is refused with 429.
    pub max_queued_jobs_per_key: u64,
    /// Server-Sent Event streams one key may hold open; one more is refused with 429.
    pub max_event_streams_per_key: usize,
}

/// How `/v1/chat/completions` and `/v1/completions` run models.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    /// Where generation runs: `cpu` or `cuda:N`. A GPU that workers train on is shared with
    /// them; `cpu` keeps every GPU for training.
    pub device: String,
    /// How a base loads for generation: `nf4` (as jobs train on it), `fp4` or `none` (dense).
    pub quantization: String,
    /// Base models kept loaded; the least recently used is dropped for another.
    pub max_models: usize,
    /// Adapters kept loaded per base model.
    pub max_adapters: usize,
    /// The most tokens one request may ask for.
    pub max_tokens: usize,
    /// Seconds a non-streamed generation may take before the answer is 408.
    pub timeout_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{source_name}: {message}")]
    Parse {
        source_name: String,
        message: String,
    },
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Overrides given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub model_roots: Vec<PathBuf>,
    /// `none` (an empty list) runs no workers: an API process.
    pub workers: Option<Vec<String>>,
    pub database_url: Option<String>,
    pub object_store: Option<String>,
    pub api_keys_file: Option<PathBuf>,
    /// Serve without keys on a non-loopback address.
    pub allow_anonymous_remote: bool,
    /// One more webhook endpoint, with its secret (`--webhook-url`, `--webhook-secret`).
    pub webhook: Option<(String, String)>,
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn parse(text: &str, source_name: &str) -> Result<toml::Value, ConfigError> {
    text.parse::<toml::Table>()
        .map(toml::Value::Table)
        .map_err(|e| ConfigError::Parse {
            source_name: source_name.to_string(),
            message: e.to_string(),
        })
}

impl Config {
    /// Layer the sources; `env` is the process environment (passed in so tests control it).
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut value = parse(DEFAULTS, "config/default.toml")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Io(path.to_path_buf(), e))?;
            merge(&mut value, parse(&text, &path.display().to_string())?);
        }
        let sections: Vec<String> = match &value {
            toml::Value::Table(t) => t.keys().cloned().collect(),
            _ => vec![],
        };
        let mut ignored_env = vec![];
        for (k, v) in env {
            let Some(rest) = k.strip_prefix("QLORAD_") else {
                continue;
            };
            let keys: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            // Kubernetes gives every pod `QLORAD_PORT=tcp://…`, `QLORAD_SERVICE_HOST=…` for a
            // Service named qlorad, and scripts set `QLORAD_BIN`: names outside the config's
            // sections are someone else's. An unknown key inside a section stays an error.
            if !sections.contains(&keys[0]) && keys[0] != "webhooks" {
                ignored_env.push(k.clone());
                continue;
            }
            // The value as a TOML literal if it is one (numbers, arrays, booleans), else a string.
            let literal = format!("x = {v}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("x"))
                .unwrap_or(toml::Value::String(v.clone()));
            let mut nested = literal;
            for key in keys.iter().rev() {
                let mut t = toml::Table::new();
                t.insert(key.clone(), nested);
                nested = toml::Value::Table(t);
            }
            merge(&mut value, nested);
        }
        let mut cfg: Config =
            value
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    source_name: "configuration".into(),
                    message: e.to_string(),
                })?;
        if let Some(l) = &overrides.listen {
            cfg.server.listen = l.parse().map_err(|e| ConfigError::Parse {
                source_name: "--listen".into(),
                message: format!("{l:?}: {e}"),
            })?;
        }
        if let Some(d) = &overrides.data_dir {
            cfg.storage.data_dir = d.clone();
        }
        if !overrides.model_roots.is_empty() {
            cfg.models.roots = overrides.model_roots.clone();
        }
        if let Some(w) = &overrides.workers {
            cfg.workers.devices = w.clone();
        }
        if let Some(u) = &overrides.database_url {
            cfg.storage.database_url = Some(u.clone());
        }
        if let Some(u) = &overrides.object_store {
            cfg.storage.object_store = Some(u.clone());
        }
        if cfg.workers.devices.iter().any(|d| d == "none") {
            if cfg.workers.devices.len() > 1 {
                return Err(ConfigError::Parse {
                    source_name: "workers.devices".into(),
                    message: "`none` runs no workers and goes alone".into(),
                });
            }
            cfg.workers.devices.clear();
        }
        if let Some(u) = &cfg.storage.database_url {
            let scheme = u.split_once("://").map(|(s, _)| s);
            if !matches!(scheme, Some("postgres" | "postgresql" | "sqlite")) {
                return Err(ConfigError::Parse {
                    source_name: "storage.database_url".into(),
                    message: "must be postgres://… (or sqlite://…)".into(),
                });
            }
        }
        cfg.ignored_env = ignored_env;
        if let Some(k) = &overrides.api_keys_file {
            cfg.auth.api_keys_file = Some(k.clone());
        }
        if overrides.allow_anonymous_remote {
            cfg.auth.allow_anonymous_remote = true;
        }
        if let Some((url, secret)) = &overrides.webhook {
            cfg.webhooks.push(WebhookConfig {
                url: url.clone(),
                secret: secret.clone(),
                events: default_webhook_events(),
                timeout_seconds: default_webhook_timeout(),
            });
        }
        for w in &cfg.webhooks {
            w.validate()?;
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order() {
        let env = vec![
            (
                "QLORAD_SERVER__MAX_BODY_BYTES".to_string(),
                "2048".to_string(),
            ),
            ("QLORAD_STORAGE__DATA_DIR".to_string(), "/tmp/q".to_string()),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let o = Overrides {
            listen: Some("127.0.0.1:9000".into()),
            ..Default::default()
        };
        let c = Config::load(None, env, &o).unwrap();
        assert_eq!(c.server.max_body_bytes, 2048);
        assert_eq!(c.storage.data_dir, PathBuf::from("/tmp/q"));
        assert_eq!(c.server.listen.port(), 9000);
        assert_eq!(c.workers.devices, vec!["cpu"]);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let env = vec![("QLORAD_SERVER__LISTN".to_string(), "x".to_string())];
        let e = Config::load(None, env, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("listn"), "{e}");
    }

    #[test]
    fn variables_outside_the_sections_are_ignored_and_named() {
        // What Kubernetes injects for a Service named qlorad, and a script's own variable.
        let env = [
            ("QLORAD_PORT", "tcp://10.0.0.1:8080"),
            ("QLORAD_PORT_8080_TCP_ADDR", "10.0.0.1"),
            ("QLORAD_SERVICE_HOST", "10.0.0.1"),
            ("QLORAD_BIN", "target/release/qlorad"),
            ("QLORAD_WORKERS__LEASE_SECONDS", "12"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let c = Config::load(None, env, &Overrides::default()).unwrap();
        assert_eq!(c.workers.lease_seconds, 12);
        assert_eq!(
            c.ignored_env,
            [
                "QLORAD_PORT",
                "QLORAD_PORT_8080_TCP_ADDR",
                "QLORAD_SERVICE_HOST",
                "QLORAD_BIN"
            ]
        );
        // A section given a plain value is still wrong.
        let env = [("QLORAD_SERVER".to_string(), "x".to_string())];
        assert!(Config::load(None, env, &Overrides::default()).is_err());
    }

    #[test]
    fn no_workers_and_a_database_url() {
        let o = Overrides {
            workers: Some(vec!["none".into()]),
            database_url: Some("postgres://q@db/qlorad".into()),
            ..Default::default()
        };
        let c = Config::load(None, [], &o).unwrap();
        assert!(c.workers.devices.is_empty());
        assert_eq!(
            c.storage.database_url.as_deref(),
            Some("postgres://q@db/qlorad")
        );
        let o = Overrides {
            workers: Some(vec!["none".into(), "cpu".into()]),
            ..Default::default()
        };
        assert!(Config::load(None, [], &o).is_err());
        let o = Overrides {
            database_url: Some("mysql://db".into()),
            ..Default::default()
        };
        let e = Config::load(None, [], &o).unwrap_err().to_string();
        assert!(e.contains("storage.database_url"), "{e}");
    }
}
