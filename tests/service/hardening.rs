//! API keys and per-key isolation on every route, limits, hostile paths and faults (a locked
//! database, a failing device), over real HTTP with a real SQLite file and a tiny model.

use std::time::Duration;

use futures::StreamExt;
use qlorad::config::{Config, Overrides};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::harness::{Options, Server, ALICE, BOB, ROOT};

/// A server with alice, bob and an admin key (or none when `keys` is false), `env` layered
/// over the defaults as `QLORAD_*` variables.
async fn start(keys: bool, workers: &[&str], env: &[(&str, &str)]) -> Server {
    crate::harness::start_with(Options {
        keys,
        workers,
        env,
        data: None,
    })
    .await
}

const DATA: &str = concat!(
    r#"{"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}"#,
    "\n",
    r#"{"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]}"#,
    "\n",
);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn call(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    key: Option<&str>,
) -> (u16, Value) {
    let mut r = c.request(method, url);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn upload(c: &reqwest::Client, s: &Server, key: Option<&str>) -> Value {
    let mut r = c
        .post(format!("{}/files?filename=train.jsonl", s.base))
        .body(DATA);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let resp = r.send().await.unwrap();
    assert_eq!(resp.status(), 201);
    resp.json().await.unwrap()
}

async fn create_job(
    c: &reqwest::Client,
    s: &Server,
    key: Option<&str>,
    spec: Value,
) -> (u16, Value) {
    let mut r = c.post(format!("{}/jobs", s.base)).json(&spec);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let resp = r.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn wait_final(c: &reqwest::Client, s: &Server, key: Option<&str>, id: &str) -> Value {
    for _ in 0..1200 {
        let (_, j) = call(
            c,
            reqwest::Method::GET,
            format!("{}/jobs/{id}", s.base),
            key,
        )
        .await;
        if ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or("")) {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {id} did not finish");
}

fn ids(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap().to_string())
        .collect()
}

/// Every operation of the OpenAPI document, as (METHOD, path template).
async fn operations(c: &reqwest::Client, s: &Server) -> Vec<(String, String)> {
    let (status, doc) = call(
        c,
        reqwest::Method::GET,
        format!("{}/openapi.json", s.base),
        None,
    )
    .await;
    assert_eq!(status, 200, "the document is public");
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.push((method.to_uppercase(), path.clone()));
        }
    }
    ops.sort();
    ops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_cannot_reach_another_keys_files_jobs_events_checkpoints_or_artifacts() {
    let s = start(true, &["cpu"], &[]).await;
    let c = client();
    // Bob's finished job with checkpoints and artifacts, and a file of his.
    let file = upload(&c, &s, Some(BOB)).await;
    let fid = file["id"].as_str().unwrap().to_string();
    let spec = json!({"model": "tiny", "training_file": fid,
        "hyperparameters": {"max_steps": 2, "batch_size": 2}, "lora": {"r": 2}, "checkpoint_every": 1});
    let (status, job) = create_job(&c, &s, Some(BOB), spec.clone()).await;
    assert_eq!(status, 201, "{job}");
    let jid = job["id"].as_str().unwrap().to_string();
    let done = wait_final(&c, &s, Some(BOB), &jid).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (_, arts) = call(
        &c,
        reqwest::Method::GET,
        format!("{}/jobs/{jid}/artifacts", s.base),
        Some(BOB),
    )
    .await;
    let artifact = arts["data"][0]["name"].as_str().unwrap().to_string();
    let (_, cks) = call(
        &c,
        reqwest::Method::GET,
        format!("{}/jobs/{jid}/checkpoints", s.base),
        Some(BOB),
    )
    .await;
    assert!(!cks["data"].as_array().unwrap().is_empty());

    // Every operation with an id of Bob's, asked with Alice's key: 404, and nothing changes.
    let mut covered = Vec::new();
    for (method, path) in operations(&c, &s).await {
        if !path.contains('{') || path.starts_with("/dashboard/") {
            continue;
        }
        let url = path
            .replace(
                "{id}",
                if path.starts_with("/files") {
                    &fid
                } else {
                    &jid
                },
            )
            .replace("{file_id}", &fid)
            .replace("{fine_tuning_job_id}", &jid)
            .replace("{name}", &artifact);
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let (status, body) = call(&c, m.clone(), format!("{}{url}", s.base), Some(ALICE)).await;
        assert_eq!(status, 404, "{method} {url} as alice: {body}");
        assert_eq!(body["error"]["code"], "not_found", "{method} {url}");
        // The same with the SSE accept header for the events route.
        covered.push(format!("{method} {path}"));
    }
    let resp = c
        .get(format!("{}/jobs/{jid}/events", s.base))
        .header("accept", "text/event-stream")
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "SSE of another key's job");
    for want in [
        "GET /files/{id}",
        "DELETE /files/{id}",
        "GET /jobs/{id}",
        "DELETE /jobs/{id}",
        "POST /jobs/{id}/cancel",
        "GET /jobs/{id}/events",
        "GET /jobs/{id}/checkpoints",
        "GET /jobs/{id}/artifacts",
        "GET /jobs/{id}/artifacts/{name}",
        "GET /v1/files/{file_id}",
        "DELETE /v1/files/{file_id}",
        "GET /v1/files/{file_id}/content",
        "GET /v1/fine_tuning/jobs/{fine_tuning_job_id}",
        "POST /v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel",
        "GET /v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
        "GET /v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
    ] {
        assert!(
            covered.iter().any(|c| c == want),
            "{want} not covered: {covered:?}"
        );
    }

    // Lists show Alice nothing of Bob's; she cannot train on his file.
    for list in ["/files", "/jobs", "/v1/files", "/v1/fine_tuning/jobs"] {
        let (status, body) = call(
            &c,
            reqwest::Method::GET,
            format!("{}{list}", s.base),
            Some(ALICE),
        )
        .await;
        assert_eq!(status, 200);
        assert!(ids(&body).is_empty(), "{list} as alice: {body}");
        let (_, body) = call(
            &c,
            reqwest::Method::GET,
            format!("{}{list}", s.base),
            Some(BOB),
        )
        .await;
        // Bob's upload, or his job, and on the files lists his job's step metrics too.
        let want: Vec<String> = if list.ends_with("files") {
            let mut v = vec![fid.clone()];
            v.extend(
                done["result_files"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.as_str().map(String::from)),
            );
            v
        } else {
            vec![jid.clone()]
        };
        let mut got = ids(&body);
        got.sort();
        let mut want = want;
        want.sort();
        assert_eq!(got, want, "{list} as bob: {body}");
    }
    let (status, body) = create_job(&c, &s, Some(ALICE), spec.clone()).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("training_file")),
        "{body}"
    );

    // Bob's things are all still there; the admin sees them and Alice's too.
    let alice_file = upload(&c, &s, Some(ALICE)).await;
    for path in [
        format!("/files/{fid}"),
        format!("/jobs/{jid}"),
        format!("/jobs/{jid}/artifacts/{artifact}"),
    ] {
        let (status, _) = call(
            &c,
            reqwest::Method::GET,
            format!("{}{path}", s.base),
            Some(BOB),
        )
        .await;
        assert_eq!(status, 200, "{path}");
    }
    let (_, all) = call(
        &c,
        reqwest::Method::GET,
        format!("{}/files", s.base),
        Some(ROOT),
    )
    .await;
    let all = ids(&all);
    assert!(all.contains(&fid) && all.contains(&alice_file["id"].as_str().unwrap().to_string()));
    let (status, _) = call(
        &c,
        reqwest::Method::GET,
        format!("{}/jobs/{jid}/events", s.base),
        Some(ROOT),
    )
    .await;
    assert_eq!(status, 200);
    // Bob can delete his own.
    let (status, _) = call(
        &c,
        reqwest::Method::DELETE,
        format!("{}/jobs/{jid}", s.base),
        Some(BOB),
    )
    .await;
    assert_eq!(status, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_or_a_wrong_key_gets_401_on_every_route_but_the_public_ones() {
    let s = start(true, &[], &[]).await;
    let c = client();
    for (method, path) in operations(&c, &s).await {
        let url = path
            .replace("{id}", "x")
            .replace("{file_id}", "x")
            .replace("{fine_tuning_job_id}", "x")
            .replace("{name}", "app.js");
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let public = ["/", "/healthz", "/openapi.json", "/metrics"].contains(&path.as_str())
            || path.starts_with("/dashboard/");
        for key in [None, Some("wrong"), Some(&ALICE[..ALICE.len() - 1])] {
            let resp = c
                .request(m.clone(), format!("{}{url}", s.base))
                .header(
                    "authorization",
                    key.map(|k| format!("Bearer {k}")).unwrap_or_default(),
                )
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            if public {
                assert_ne!(status, 401, "{method} {path} is public");
            } else {
                assert_eq!(status, 401, "{method} {path} with {key:?}");
                assert_eq!(
                    resp.headers()["www-authenticate"],
                    "Bearer realm=\"qlorad\""
                );
                let body: Value = resp.json().await.unwrap();
                let want = if key.is_none() {
                    "missing_api_key"
                } else {
                    "invalid_api_key"
                };
                assert_eq!(body["error"]["code"], want);
            }
        }
    }
    // Unknown routes too, so probing learns nothing.
    let (status, _) = call(&c, reqwest::Method::GET, format!("{}/nope", s.base), None).await;
    assert_eq!(status, 401);
    let (status, _) = call(
        &c,
        reqwest::Method::GET,
        format!("{}/nope", s.base),
        Some(ALICE),
    )
    .await;
    assert_eq!(status, 404);
    // The document declares the scheme and which operations need it.
    let (_, doc) = call(
        &c,
        reqwest::Method::GET,
        format!("{}/openapi.json", s.base),
        None,
    )
    .await;
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        json!({"type": "http", "scheme": "bearer"})
    );
    assert_eq!(
        doc["paths"]["/jobs"]["get"]["security"],
        json!([{"bearer": []}])
    );
    assert!(doc["paths"]["/jobs"]["get"]["responses"]["401"].is_object());
    assert_eq!(doc["paths"]["/healthz"]["get"]["security"], json!([{}]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_the_server_refuses_to_listen_beyond_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let mut overrides = Overrides {
        data_dir: Some(tmp.path().join("data")),
        workers: Some(vec![]),
        ..Default::default()
    };
    let cfg = Config::load(None, Vec::<(String, String)>::new(), &overrides).unwrap();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let e = qlorad::server::serve_on(cfg, listener, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("refusing to listen") && e.contains("--allow-anonymous"),
        "{e}"
    );
    // Told explicitly, it serves.
    overrides.allow_anonymous_remote = true;
    let cfg = Config::load(None, Vec::<(String, String)>::new(), &overrides).unwrap();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let stop = CancellationToken::new();
    stop.cancel();
    qlorad::server::serve_on(cfg, listener, stop).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_413_and_429_naming_the_limit() {
    let env = [
        ("QLORAD_LIMITS__MAX_QUEUED_JOBS_PER_KEY", "2"),
        ("QLORAD_LIMITS__MAX_EVENT_STREAMS_PER_KEY", "1"),
        ("QLORAD_SERVER__MAX_BODY_BYTES", "2048"),
        ("QLORAD_SERVER__MAX_UPLOAD_BYTES", "400"),
    ];
    // No workers: jobs stay queued.
    let s = start(true, &[], &env).await;
    let c = client();
    let file = upload(&c, &s, Some(ALICE)).await;
    let spec = json!({"model": "tiny", "training_file": file["id"]});
    let mut jobs = Vec::new();
    for _ in 0..2 {
        let (status, j) = create_job(&c, &s, Some(ALICE), spec.clone()).await;
        assert_eq!(status, 201, "{j}");
        jobs.push(j["id"].as_str().unwrap().to_string());
    }
    let (status, body) = create_job(&c, &s, Some(ALICE), spec.clone()).await;
    assert_eq!(status, 429, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_queued_jobs_per_key"));
    // Another key has its own allowance; a cancelled job frees a place.
    let bob_file = upload(&c, &s, Some(BOB)).await;
    let (status, _) = create_job(
        &c,
        &s,
        Some(BOB),
        json!({"model": "tiny", "training_file": bob_file["id"]}),
    )
    .await;
    assert_eq!(status, 201);
    let (status, _) = call(
        &c,
        reqwest::Method::POST,
        format!("{}/jobs/{}/cancel", s.base, jobs[1]),
        Some(ALICE),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = create_job(&c, &s, Some(ALICE), spec.clone()).await;
    assert_eq!(status, 201);

    // One event stream per key.
    let sse = |key: &'static str| {
        c.get(format!("{}/jobs/{}/events", s.base, jobs[0]))
            .header("accept", "text/event-stream")
            .bearer_auth(key)
            .send()
    };
    let first = sse(ALICE).await.unwrap();
    assert_eq!(first.status(), 200);
    let mut first = first.bytes_stream();
    assert!(first.next().await.is_some(), "the stream replays");
    let second = sse(ALICE).await.unwrap();
    assert_eq!(second.status(), 429);
    let body: Value = second.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_event_streams_per_key"));
    drop(first);
    let mut freed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if sse(ALICE).await.unwrap().status() == 200 {
            freed = true;
            break;
        }
    }
    assert!(freed, "closing a stream frees its slot");

    // Body and upload sizes.
    let big = json!({"model": "tiny", "training_file": "x", "pad": "y".repeat(4096)});
    let (status, body) = create_job(&c, &s, Some(ALICE), big).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("too_large")),
        "{body}"
    );
    let resp = c
        .post(format!("{}/files", s.base))
        .bearer_auth(ALICE)
        .body(DATA.repeat(10))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["param"], "file");
    assert!(std::fs::read_dir(s.data.join("files")).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".partial")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_artifact_names_and_model_paths_are_refused() {
    let s = start(false, &["cpu"], &[]).await;
    let c = client();
    let file = upload(&c, &s, None).await;
    let spec = json!({"model": "tiny", "training_file": file["id"], "hyperparameters": {"max_steps": 1, "batch_size": 2}, "lora": {"r": 2}});
    let (_, job) = create_job(&c, &s, None, spec).await;
    let jid = job["id"].as_str().unwrap().to_string();
    assert_eq!(wait_final(&c, &s, None, &jid).await["status"], "succeeded");
    // A symlink planted among the artifacts, and a listed name pointing through it.
    let arts = s.data.join("jobs").join(&jid).join("artifacts");
    std::os::unix::fs::symlink(s.data.join("qlorad.db"), arts.join("db")).unwrap();
    let store = s.store().await;
    let row = qlorad::jobs::store::ArtifactRow {
        name: "db".into(),
        bytes: 10,
        sha256: "0".repeat(64),
        created_at: 0,
    };
    store.add_artifact(&jid, &row).await.unwrap();
    let (status, _) = call(
        &c,
        reqwest::Method::GET,
        format!("{}/jobs/{jid}/artifacts/db", s.base),
        None,
    )
    .await;
    assert_eq!(
        status, 404,
        "a symlink out of the artifacts is not followed"
    );
    for name in [
        "..%2F..%2Fqlorad.db",
        "%2Fetc%2Fpasswd",
        "adapter/..%2F..%2F..%2Fqlorad.db",
        ".hidden",
    ] {
        let (status, body) = call(
            &c,
            reqwest::Method::GET,
            format!("{}/jobs/{jid}/artifacts/{name}", s.base),
            None,
        )
        .await;
        assert!(status == 400 || status == 404, "{name}: {status} {body}");
    }
    // Models only from the roots: no `..`, no absolute paths elsewhere, no symlinks out.
    let outside = s.data.parent().unwrap().join("outside");
    crate::common::tiny_model(&outside, "tok-chatml");
    let root = s.data.parent().unwrap().join("models");
    std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
    for model in [
        "../outside",
        outside.to_str().unwrap(),
        "escape",
        "/etc",
        "tiny/../../outside",
    ] {
        let spec = json!({"model": model, "training_file": file["id"]});
        let (status, body) = create_job(&c, &s, None, spec).await;
        assert_eq!(
            (status, body["error"]["param"].as_str()),
            (400, Some("model")),
            "{model}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_delays_requests_then_a_timeout_answers_408_and_all_recovers() {
    let s = start(
        false,
        &["cpu"],
        &[("QLORAD_LIMITS__REQUEST_TIMEOUT_SECONDS", "2")],
    )
    .await;
    let c = client();
    let file = upload(&c, &s, None).await;
    let spec = json!({"model": "tiny", "training_file": file["id"], "hyperparameters": {"max_steps": 6, "batch_size": 2}, "lora": {"r": 2}, "checkpoint_every": 2});
    let (_, job) = create_job(&c, &s, None, spec).await;
    let jid = job["id"].as_str().unwrap().to_string();
    // Another process holds the write lock for 4 s while the job runs (on PostgreSQL, locks
    // on the tables that writes wait for and reads do not).
    let db = s.data.join("qlorad.db");
    let pg = s.database_url.clone();
    let locker = std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                use sqlx::Connection;
                sqlx::any::install_default_drivers();
                let lock = "LOCK TABLE jobs, files, job_events, checkpoints, artifacts \
                            IN EXCLUSIVE MODE";
                let (url, begin) = match pg {
                    Some(url) => (url, vec!["BEGIN", lock]),
                    None => (
                        format!("sqlite://{}", db.display()),
                        vec!["BEGIN EXCLUSIVE"],
                    ),
                };
                let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
                for q in begin {
                    sqlx::query(q).execute(&mut conn).await.unwrap();
                }
                tokio::time::sleep(Duration::from_secs(4)).await;
                sqlx::query("COMMIT").execute(&mut conn).await.unwrap();
            });
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A write that cannot finish in time is answered 408; an upload (longer limit) waits the
    // lock out and goes through. Reads go on (WAL).
    let t = std::time::Instant::now();
    let spec2 = json!({"model": "tiny", "training_file": file["id"]});
    let upload = c
        .post(format!("{}/files?filename=b.jsonl", s.base))
        .body(DATA)
        .send();
    let (up, (s2, b2), (s3, _)) = tokio::join!(
        upload,
        create_job(&c, &s, None, spec2),
        call(
            &c,
            reqwest::Method::GET,
            format!("{}/jobs/{jid}", s.base),
            None
        )
    );
    assert_eq!(s2, 408, "{b2}");
    assert!(b2["error"]["message"]
        .as_str()
        .unwrap()
        .contains("request_timeout_seconds"));
    assert_eq!(s3, 200, "reads are not blocked");
    let up = up.unwrap();
    assert_eq!(up.status(), 201);
    assert!(t.elapsed() >= Duration::from_secs(2));
    locker.join().unwrap();
    // The job rode it out; the server serves.
    let done = wait_final(&c, &s, None, &jid).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (status, events) = call(
        &c,
        reqwest::Method::GET,
        format!("{}/jobs/{jid}/events?limit=1000", s.base),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let seqs: Vec<i64> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_device_fails_the_job_clearly_and_the_service_keeps_serving() {
    // No cuda in this build: the worker's device cannot start.
    let s = start(false, &["cuda:0"], &[]).await;
    let c = client();
    let file = upload(&c, &s, None).await;
    let spec =
        json!({"model": "tiny", "training_file": file["id"], "hyperparameters": {"max_steps": 1}});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, job) = create_job(&c, &s, None, spec.clone()).await;
        assert_eq!(status, 201);
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let done = wait_final(&c, &s, None, id).await;
        assert_eq!(done["status"], "failed");
        let e = done["error"].as_str().unwrap();
        assert!(e.contains("cuda:0"), "{e}");
        let (_, ev) = call(
            &c,
            reqwest::Method::GET,
            format!("{}/jobs/{id}/events", s.base),
            None,
        )
        .await;
        let finals = ev["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "status" && e["data"]["status"] == "failed")
            .count();
        assert_eq!(finals, 1, "{ev}");
    }
    let (status, _) = call(
        &c,
        reqwest::Method::GET,
        format!("{}/healthz", s.base),
        None,
    )
    .await;
    assert_eq!(status, 200);
}
