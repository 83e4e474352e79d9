//! The one test server: a temp directory with a tiny model under `models/`, the data directory,
//! optional API keys and `QLORAD_*` variables, bound to `127.0.0.1:0`. With `TEST_STORE=postgres`
//! every server keeps its queue in a fresh PostgreSQL database (on `TEST_DATABASE_URL`'s
//! server) instead of SQLite: the same suite on both stores.

use std::path::PathBuf;

use qlorad::config::{Config, Overrides};
use tokio_util::sync::CancellationToken;

pub const ALICE: &str = "alice-secret-0123456789";
pub const BOB: &str = "bob-secret-0123456789";
pub const ROOT: &str = "root-secret-0123456789";

/// Three chat examples.
pub const DATA: &str = concat!(
    r#"{"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}"#,
    "\n",
    r#"{"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]}"#,
    "\n",
    r#"{"messages": [{"role": "user", "content": "Boil time?"}, {"role": "assistant", "content": "Ninety seconds."}]}"#,
    "\n",
);

pub struct Server {
    pub base: String,
    pub data: PathBuf,
    /// The PostgreSQL database under `TEST_STORE=postgres`; None on SQLite.
    pub database_url: Option<String>,
    pub stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    _tmp: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Server {
    /// The server's store, opened beside it (its SQLite file or its PostgreSQL database).
    pub async fn store(&self) -> qlorad::jobs::Store {
        qlorad::jobs::Store::connect(self.database_url.as_deref(), &self.data)
            .await
            .unwrap()
    }

    /// Stop as SIGINT/SIGTERM would, and wait until the server and its workers have.
    pub async fn shutdown(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// What a test server runs with.
#[derive(Default)]
pub struct Options<'a> {
    /// alice, bob (by digest) and an admin key; none when false.
    pub keys: bool,
    pub workers: &'a [&'a str],
    /// `QLORAD_*` variables layered over the defaults.
    pub env: &'a [(&'a str, &'a str)],
    /// The data directory of an earlier server (a restart); a fresh one when None.
    pub data: Option<&'a std::path::Path>,
}

/// A server without keys and with these workers.
pub async fn start(workers: &[&str]) -> Server {
    start_with(Options {
        workers,
        ..Default::default()
    })
    .await
}

pub async fn start_with(o: Options<'_>) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    crate::common::tiny_model(&models.join("tiny"), "tok-chatml");
    let data = o
        .data
        .map(|d| d.to_path_buf())
        .unwrap_or_else(|| tmp.path().join("data"));
    let keys_file = tmp.path().join("keys");
    let bob_digest: String = {
        use sha2::Digest;
        sha2::Sha256::digest(BOB.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    std::fs::write(
        &keys_file,
        format!("# test keys\nalice:{ALICE}\nbob:sha256:{bob_digest}\nroot:{ROOT}:admin\n"),
    )
    .unwrap();
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        data_dir: Some(data.clone()),
        model_roots: vec![models],
        workers: Some(o.workers.iter().map(|s| s.to_string()).collect()),
        api_keys_file: o.keys.then_some(keys_file),
        ..Default::default()
    };
    let database_url = database_url(&data).await;
    let overrides = Overrides {
        database_url: database_url.clone(),
        ..overrides
    };
    let env = o.env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    let cfg = Config::load(None, env, &overrides).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task =
        tokio::spawn(async move { qlorad::server::serve_on(cfg, listener, s).await.unwrap() });
    Server {
        base,
        data,
        database_url,
        stop,
        task: Some(task),
        _tmp: tmp,
    }
}

/// The PostgreSQL database of a server's data directory under `TEST_STORE=postgres`: a fresh
/// one, remembered in the directory so a restarted server finds its queue again.
async fn database_url(data: &std::path::Path) -> Option<String> {
    match std::env::var("TEST_STORE").as_deref() {
        Ok("postgres") => {}
        Ok("sqlite") | Err(_) => return None,
        Ok(other) => panic!("TEST_STORE={other}: sqlite or postgres"),
    }
    let remembered = data.join(".test-database-url");
    if let Ok(url) = std::fs::read_to_string(&remembered) {
        return Some(url);
    }
    let url = qlorad::jobs::store::testing::postgres()
        .await
        .expect("TEST_STORE=postgres needs TEST_DATABASE_URL");
    std::fs::create_dir_all(data).unwrap();
    std::fs::write(&remembered, &url).unwrap();
    Some(url)
}
