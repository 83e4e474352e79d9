//! Models by Hugging Face Hub id, against a hub-shaped server on loopback: the routes
//! huggingface_hub's `snapshot_download` uses (`/api/models/<repo>/revision/<rev>`,
//! `/api/models/<repo>/tree/<rev>`, `/<repo>/resolve/<rev>/<file>` with `ETag`,
//! `X-Repo-Commit`, `Content-Length` and `Range`), serving a tiny Qwen3 with its tokenizer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use qlorad::model::hub::{Hub, HubError, HubRef};
use serde_json::{json, Value};
use sha2::Digest;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const TOKEN: &str = "hf_reader";

struct Repo {
    files: Vec<(String, Vec<u8>)>,
    gated: bool,
    /// Serve other bytes than the tree lists for this file.
    corrupt: Option<&'static str>,
}

/// `(path, range header)` of every download.
type Downloads = Arc<Mutex<Vec<(String, Option<String>)>>>;

#[derive(Clone)]
struct Hubby {
    repos: Arc<HashMap<String, Repo>>,
    log: Downloads,
    /// The first download of a `.safetensors` file stops half way.
    cut: Arc<AtomicBool>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn lfs(path: &str) -> bool {
    path.ends_with(".safetensors") || path.ends_with(".gguf")
}

fn git_sha1(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    format!("{:x}", h.finalize())
}

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(bytes))
}

fn tiny_qwen3() -> Vec<(String, Vec<u8>)> {
    let dir = fixtures().join("export/qwen3");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    // What a repository also holds and a download leaves behind.
    files.push(("README.md".into(), b"# tiny\n".to_vec()));
    files.push(("pytorch_model.bin".into(), vec![0u8; 64]));
    files.sort();
    files
}

impl Hubby {
    fn new() -> Hubby {
        let mut repos = HashMap::new();
        repos.insert(
            "org/tiny".to_string(),
            Repo {
                files: tiny_qwen3(),
                gated: false,
                corrupt: None,
            },
        );
        repos.insert(
            "org/gated".to_string(),
            Repo {
                files: tiny_qwen3(),
                gated: true,
                corrupt: None,
            },
        );
        repos.insert(
            "org/corrupt".to_string(),
            Repo {
                files: tiny_qwen3(),
                gated: false,
                corrupt: Some("model.safetensors"),
            },
        );
        repos.insert(
            "org/tiny-GGUF".to_string(),
            Repo {
                files: vec![(
                    "tiny-f32.gguf".into(),
                    std::fs::read(fixtures().join("export/qwen3.f32.gguf")).unwrap(),
                )],
                gated: false,
                corrupt: None,
            },
        );
        Hubby {
            repos: Arc::new(repos),
            log: Arc::default(),
            cut: Arc::new(AtomicBool::new(true)),
        }
    }

    /// The repository, or the status and `X-Error-Code` the hub answers instead.
    fn repo(
        &self,
        org: &str,
        name: &str,
        headers: &HeaderMap,
    ) -> Result<&Repo, (StatusCode, &'static str)> {
        let Some(repo) = self.repos.get(&format!("{org}/{name}")) else {
            return Err((StatusCode::NOT_FOUND, "RepoNotFound"));
        };
        if repo.gated {
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
            match auth {
                None => return Err((StatusCode::UNAUTHORIZED, "GatedRepo")),
                Some(a) if a != format!("Bearer {TOKEN}") => {
                    return Err((StatusCode::FORBIDDEN, "GatedRepo"))
                }
                Some(_) => {}
            }
        }
        Ok(repo)
    }
}

fn error(status: StatusCode, code: &str) -> Response {
    (
        status,
        [("x-error-code", code.to_string())],
        json!({"error": code}).to_string(),
    )
        .into_response()
}

fn revision_ok(rev: &str) -> bool {
    rev == "main" || rev == COMMIT
}

async fn revision(
    State(h): State<Hubby>,
    UrlPath((org, name, rev)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = match h.repo(&org, &name, &headers) {
        Ok(r) => r,
        Err((status, code)) => return error(status, code),
    };
    if !revision_ok(&rev) {
        return error(StatusCode::NOT_FOUND, "RevisionNotFound");
    }
    let siblings: Vec<Value> = repo
        .files
        .iter()
        .map(|(p, _)| json!({"rfilename": p}))
        .collect();
    axum::Json(json!({"id": format!("{org}/{name}"), "sha": COMMIT, "siblings": siblings}))
        .into_response()
}

async fn tree(
    State(h): State<Hubby>,
    UrlPath((org, name, rev)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = match h.repo(&org, &name, &headers) {
        Ok(r) => r,
        Err((status, code)) => return error(status, code),
    };
    if !revision_ok(&rev) {
        return error(StatusCode::NOT_FOUND, "RevisionNotFound");
    }
    let entries: Vec<Value> = repo
        .files
        .iter()
        .map(|(p, b)| {
            let mut e = json!({"type": "file", "path": p, "size": b.len(), "oid": git_sha1(b)});
            if lfs(p) {
                e["lfs"] = json!({"oid": sha256(b), "size": b.len(), "pointerSize": 134});
            }
            e
        })
        .collect();
    axum::Json(Value::Array(entries)).into_response()
}

async fn resolve(
    State(h): State<Hubby>,
    UrlPath((org, name, rev, path)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = match h.repo(&org, &name, &headers) {
        Ok(r) => r,
        Err((status, code)) => return error(status, code),
    };
    if !revision_ok(&rev) {
        return error(StatusCode::NOT_FOUND, "RevisionNotFound");
    }
    let Some((_, bytes)) = repo.files.iter().find(|(p, _)| *p == path) else {
        return error(StatusCode::NOT_FOUND, "EntryNotFound");
    };
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    h.log.lock().unwrap().push((path.clone(), range.clone()));
    let mut bytes = bytes.clone();
    if repo.corrupt == Some(path.as_str()) {
        bytes[0] ^= 0xff;
    }
    let etag = if lfs(&path) {
        sha256(&bytes)
    } else {
        git_sha1(&bytes)
    };
    let total = bytes.len();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|s| s.parse::<usize>().ok());
    let common = [
        ("etag", format!("\"{etag}\"")),
        ("x-repo-commit", COMMIT.to_string()),
        ("accept-ranges", "bytes".to_string()),
    ];
    if let Some(start) = start.filter(|&s| s < total) {
        let body = bytes[start..].to_vec();
        let mut r = (StatusCode::PARTIAL_CONTENT, body).into_response();
        for (k, v) in common {
            r.headers_mut().insert(k, v.parse().unwrap());
        }
        r.headers_mut().insert(
            "content-range",
            format!("bytes {start}-{}/{total}", total - 1)
                .parse()
                .unwrap(),
        );
        return r;
    }
    let body = if path.ends_with(".safetensors") && h.cut.swap(false, Ordering::SeqCst) {
        // Half the file, then the connection drops: Content-Length promised more.
        let half = bytes[..total / 2].to_vec();
        use futures::StreamExt;
        let stream = futures::stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from(
            half,
        ))])
        .chain(futures::stream::once(async {
            // Let the client read the first half before the connection goes.
            tokio::time::sleep(Duration::from_millis(300)).await;
            Err(std::io::Error::other("connection lost"))
        }));
        Body::from_stream(stream)
    } else {
        Body::from(bytes)
    };
    let mut r = Response::new(body);
    for (k, v) in common {
        r.headers_mut().insert(k, v.parse().unwrap());
    }
    r.headers_mut()
        .insert("content-length", total.to_string().parse().unwrap());
    r
}

/// The hub on `127.0.0.1:0`: its base URL and its state.
async fn start_hub() -> (String, Hubby) {
    let h = Hubby::new();
    let app = Router::new()
        .route("/api/models/{org}/{name}/revision/{rev}", get(revision))
        .route("/api/models/{org}/{name}/tree/{rev}", get(tree))
        .route("/{org}/{name}/resolve/{rev}/{*path}", get(resolve))
        .with_state(h.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, h)
}

/// The blocking client runs off the async workers, as the service runs it.
async fn fetch(hub: &Hub, id: &str) -> Result<PathBuf, HubError> {
    let (hub, r) = (hub.clone(), HubRef::parse(id).unwrap());
    tokio::task::spawn_blocking(move || hub.fetch(&r, &mut |_, _, _| {}))
        .await
        .unwrap()
}

fn logits(path: &Path) -> Vec<f32> {
    use candle_core::{Device, Tensor};
    use qlorad::model::llama::{CausalLm, LoadOptions};
    let m = CausalLm::load(
        path,
        &LoadOptions {
            quant: None,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let ids = Tensor::new(&[[1u32, 17, 99, 250, 3]], &Device::Cpu).unwrap();
    m.forward(&ids, None, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_models_download_resume_verify_and_cache_as_the_hub_does() {
    let (base, h) = start_hub().await;
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let hub = Hub::new(base.clone(), None, false, cache.clone());

    let snap = fetch(&hub, "org/tiny").await.unwrap();
    let repo = cache.join("models--org--tiny");
    assert_eq!(snap, repo.join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    // The cut download resumed with a Range request instead of starting over.
    let log = h.log.lock().unwrap().clone();
    let st: Vec<_> = log
        .iter()
        .filter(|(p, _)| p == "model.safetensors")
        .collect();
    assert_eq!(st.len(), 2, "{log:?}");
    assert!(st[1].1.as_deref().is_some_and(|r| r.starts_with("bytes=")));
    // Only what a model needs; blobs by hash, snapshot files linking to them.
    let names: Vec<String> = std::fs::read_dir(&snap)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"tokenizer.json".to_string()));
    assert!(!names
        .iter()
        .any(|n| n == "README.md" || n.ends_with(".bin")));
    let weights = std::fs::read(fixtures().join("export/qwen3/model.safetensors")).unwrap();
    assert_eq!(
        std::fs::read_link(snap.join("model.safetensors")).unwrap(),
        PathBuf::from("../../blobs").join(sha256(&weights))
    );
    let blobs: Vec<String> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !blobs.iter().any(|b| b.ends_with(".incomplete")),
        "{blobs:?}"
    );
    // The downloaded model is the served one.
    assert_eq!(logits(&snap), logits(&fixtures().join("export/qwen3")));
    qlorad::data::TextTokenizer::load(&snap).unwrap();

    // A second fetch is the cache alone; so is an offline client.
    let before = h.log.lock().unwrap().len();
    assert_eq!(fetch(&hub, "org/tiny").await.unwrap(), snap);
    let offline = Hub::new(base.clone(), None, true, cache.clone());
    assert_eq!(fetch(&offline, "org/tiny").await.unwrap(), snap);
    assert_eq!(h.log.lock().unwrap().len(), before);
    assert!(matches!(
        fetch(&offline, "org/tiny-GGUF:tiny-f32.gguf").await,
        Err(HubError::Offline { .. })
    ));

    // One file of a GGUF repository.
    let gguf = fetch(&hub, "org/tiny-GGUF:tiny-f32.gguf").await.unwrap();
    assert!(gguf.ends_with("tiny-f32.gguf"));
    assert_eq!(
        logits(&gguf),
        logits(&fixtures().join("export/qwen3.f32.gguf"))
    );
    let listed: Vec<String> = hub.list_cached().into_iter().map(|(id, _)| id).collect();
    assert_eq!(listed, ["org/tiny", "org/tiny-GGUF:tiny-f32.gguf"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_errors_name_the_repository_and_leave_no_file() {
    let (base, _h) = start_hub().await;
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let hub = Hub::new(base.clone(), None, false, cache.clone());
    let e = fetch(&hub, "org/missing").await.unwrap_err();
    assert!(
        matches!(e, HubError::NotFound { .. }) && !e.retryable(),
        "{e}"
    );
    let e = fetch(&hub, "org/tiny@v9").await.unwrap_err();
    assert!(matches!(e, HubError::Revision { .. }), "{e}");
    let e = fetch(&hub, "org/tiny-GGUF:other.gguf").await.unwrap_err();
    assert!(matches!(e, HubError::NoFile { .. }), "{e}");
    let e = fetch(&hub, "org/tiny-GGUF").await.unwrap_err();
    assert!(e.to_string().contains("name the file"), "{e}");
    let e = fetch(&hub, "org/gated").await.unwrap_err();
    assert!(e.to_string().contains("HF_TOKEN"), "{e}");
    let wrong = Hub::new(base.clone(), Some("hf_other".into()), false, cache.clone());
    let e = fetch(&wrong, "org/gated").await.unwrap_err();
    assert!(
        matches!(e, HubError::Gated { .. }) && e.to_string().contains("403"),
        "{e}"
    );
    let right = Hub::new(base.clone(), Some(TOKEN.into()), false, cache.clone());
    fetch(&right, "org/gated").await.unwrap();
    // Bytes that do not hash to what the hub lists never take a blob's name.
    let e = fetch(&hub, "org/corrupt").await.unwrap_err();
    assert!(matches!(e, HubError::Checksum { .. }), "{e}");
    let blobs = cache.join("models--org--corrupt/blobs");
    for b in std::fs::read_dir(&blobs).unwrap() {
        let b = b.unwrap();
        let bytes = std::fs::read(b.path()).unwrap();
        let name = b.file_name().to_string_lossy().into_owned();
        assert!(name == sha256(&bytes) || name == git_sha1(&bytes), "{name}");
    }
    assert!(!cache
        .join("models--org--corrupt/snapshots")
        .join(COMMIT)
        .join("config.json")
        .exists());
    // Nothing listens here: a network error, worth retrying.
    let gone = Hub::new("http://127.0.0.1:9".into(), None, false, cache);
    let e = fetch(&gone, "org/other").await.unwrap_err();
    assert!(e.retryable(), "{e}");
}

/// A job names a model by hub id: the service checks it at create, downloads it into the
/// model root's cache and trains; `GET /models` lists it. A missing repository is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_a_model_named_by_hub_id() {
    let (base, _h) = start_hub().await;
    let env = [("QLORAD_MODELS__HUB_ENDPOINT", base.as_str())];
    let s = crate::harness::start_with(crate::harness::Options {
        workers: &["cpu"],
        env: &env,
        ..Default::default()
    })
    .await;
    let c = reqwest::Client::new();
    let file: Value = c
        .post(format!("{}/files?filename=train.jsonl", s.base))
        .body(crate::harness::DATA)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let missing = c
        .post(format!("{}/jobs", s.base))
        .json(&json!({"model": "org/missing", "training_file": file["id"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 400);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["param"], "model", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("org/missing"));

    let spec = json!({"model": "org/tiny", "training_file": file["id"],
        "hyperparameters": {"max_steps": 2, "batch_size": 3}, "lora": {"r": 4}});
    let r = c
        .post(format!("{}/jobs", s.base))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut last = Value::Null;
    for _ in 0..600 {
        last = c
            .get(format!("{}/jobs/{id}", s.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ["succeeded", "failed"].contains(&last["status"].as_str().unwrap_or("")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last["status"], "succeeded", "{last}");
    let models: Value = c
        .get(format!("{}/models", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"org/tiny") && ids.contains(&"tiny"),
        "{ids:?}"
    );
}

/// The command line takes a hub id too, caching where huggingface_hub does (`HF_HUB_CACHE`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_take_a_hub_id() {
    let (base, _h) = start_hub().await;
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hf-cache");
    let c = cache.clone();
    let run = move |model: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_qlorad"));
        cmd.args([
            "generate",
            "--model",
            model,
            "--prompt",
            "Hello",
            "--max-tokens",
            "3",
        ])
        .env("HF_ENDPOINT", &base)
        .env("HF_HUB_CACHE", &c)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
        cmd
    };
    let out = tokio::task::spawn_blocking(move || {
        let ok = run("org/tiny").output().unwrap();
        let missing = run("org/missing").output().unwrap();
        (ok, missing)
    })
    .await
    .unwrap();
    let (ok, missing) = out;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(cache
        .join("models--org--tiny/snapshots")
        .join(COMMIT)
        .join("config.json")
        .exists());
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("org/missing") && err.contains("no such model"),
        "{err}"
    );
}
