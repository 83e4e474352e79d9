//! The native routes: uploads, jobs, events, cancel, artifacts, restarts and shutdown.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

use crate::harness::{start, Server, DATA};

fn tiny_model(root: &Path) {
    crate::common::tiny_model(&root.join("tiny"), "tok-chatml");
}

async fn upload(c: &reqwest::Client, s: &Server, body: &str) -> reqwest::Response {
    c.post(format!("{}/files?filename=train.jsonl", s.base))
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn job_status(c: &reqwest::Client, s: &Server, id: &str) -> Value {
    c.get(format!("{}/jobs/{id}", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Start a job that runs far longer than any test and wait until it has taken two steps.
async fn running_job(c: &reqwest::Client, s: &Server) -> String {
    let file: Value = upload(c, s, DATA).await.json().await.unwrap();
    let spec = json!({"model": "tiny", "training_file": file["id"], "hyperparameters": {"max_steps": 100000, "batch_size": 3}});
    let job: Value = c
        .post(format!("{}/jobs", s.base))
        .json(&spec)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    for _ in 0..600 {
        if job_status(c, s, &id).await["progress"]["step"]
            .as_i64()
            .unwrap_or(0)
            >= 2
        {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_upload_train_stream_download() {
    let mut s = start(&["cpu"]).await;
    let c = reqwest::Client::new();
    let health: Value = c
        .get(format!("{}/healthz", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let models: Value = c
        .get(format!("{}/models", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");

    let r = upload(&c, &s, DATA).await;
    assert_eq!(r.status(), 201);
    let file: Value = r.json().await.unwrap();
    assert_eq!(
        (file["format"].as_str(), file["examples"].as_i64()),
        (Some("chat"), Some(3))
    );

    let spec = json!({
        "model": "tiny", "training_file": file["id"],
        "hyperparameters": {"max_steps": 4, "batch_size": 3, "learning_rate": 0.01, "warmup_ratio": 0.0},
        "lora": {"r": 4, "dropout": 0.0}, "checkpoint_every": 2,
        "export": {"gguf": ["q8_0"], "gguf_lora": true}
    });
    let r = c
        .post(format!("{}/jobs", s.base))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let job: Value = r.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["status"], "queued");
    assert_eq!(
        job["spec"]["hyperparameters"]["gradient_accumulation_steps"], 1,
        "defaults are filled in"
    );

    // SSE: every event in order, ending with succeeded.
    let resp = c
        .get(format!("{}/jobs/{id}/events", s.base))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut events: Vec<Value> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(i) = buf.find("\n\n") {
            let frame: String = buf.drain(..i + 2).collect();
            if let Some(d) = frame.lines().find_map(|l| l.strip_prefix("data: ")) {
                events.push(serde_json::from_str(d).unwrap());
            }
        }
    }
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "gapless, in order: {events:?}"
    );
    let steps: Vec<i64> = events
        .iter()
        .filter(|e| e["type"] == "metrics")
        .filter_map(|e| e["data"]["step"].as_i64())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert_eq!(
        events.last().unwrap()["data"]["status"],
        "succeeded",
        "{events:?}"
    );

    let j = job_status(&c, &s, &id).await;
    assert_eq!(j["status"], "succeeded");
    assert_eq!(j["progress"]["step"], 4);
    let cps: Value = c
        .get(format!("{}/jobs/{id}/checkpoints", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cp_steps: Vec<i64> = cps["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_i64().unwrap())
        .collect();
    assert_eq!(cp_steps, vec![2, 4]);
    let arts: Value = c
        .get(format!("{}/jobs/{id}/artifacts", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = arts["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    for want in [
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "tiny-q8_0.gguf",
        "tiny-lora.gguf",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }

    // Ranged download returns exactly those bytes; ETag is the sha256.
    let on_disk = std::fs::read(
        s.data
            .join("jobs")
            .join(&id)
            .join("artifacts/tiny-q8_0.gguf"),
    )
    .unwrap();
    let r = c
        .get(format!("{}/jobs/{id}/artifacts/tiny-q8_0.gguf", s.base))
        .header("range", "bytes=10-99")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-length"], "90");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(&r.bytes().await.unwrap()[..], &on_disk[10..100]);
    let r = c
        .get(format!("{}/jobs/{id}/artifacts/tiny-q8_0.gguf", s.base))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);

    // The downloaded adapter loads.
    let dl = tempfile::tempdir().unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let b = c
            .get(format!("{}/jobs/{id}/artifacts/adapter/{f}", s.base))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        std::fs::write(dl.path().join(f), b).unwrap();
    }
    let models_dir = s.data.parent().unwrap().join("models/tiny");
    let mut m = qlorad::model::llama::CausalLm::load(&models_dir, &Default::default()).unwrap();
    let cfg = m.load_adapter(dl.path()).unwrap();
    assert_eq!(cfg.r, 4);

    // Finished jobs can be deleted with their artifacts.
    let r = c
        .delete(format!("{}/jobs/{id}", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(!s.data.join("jobs").join(&id).exists());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_4xx_naming_the_problem() {
    let mut s = start(&["cpu"]).await;
    let c = reqwest::Client::new();
    let err = |v: &Value| v["error"].clone();

    let r = c
        .post(format!("{}/jobs", s.base))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(err(&r.json().await.unwrap())["code"], "invalid_json");

    let r = c
        .post(format!("{}/jobs", s.base))
        .json(&json!({"model": "tiny", "hyperparameters": {"lr": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let e = err(&r.json().await.unwrap());
    assert_eq!(e["param"], "lr", "{e}");

    let r = c
        .post(format!("{}/jobs", s.base))
        .json(&json!({"model": "tiny", "hyperparameters": {"batch_size": "four"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);

    // An optimizer qlorad does not have is named with the ones it has.
    let r = c
        .post(format!("{}/jobs", s.base))
        .json(&json!({"model": "tiny", "hyperparameters": {"optimizer": "sgd"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let e = err(&r.json().await.unwrap());
    assert_eq!(e["param"], "hyperparameters.optimizer", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("adamw_bnb_8bit"),
        "{e}"
    );

    let r = c
        .post(format!("{}/jobs", s.base))
        .json(&json!({"model": "nope", "training_file": "file-x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(err(&r.json().await.unwrap())["param"], "model");

    let r = c
        .post(format!("{}/jobs", s.base))
        .json(&json!({"model": "tiny", "training_file": "file-missing"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(err(&r.json().await.unwrap())["param"], "training_file");

    let r = upload(&c, &s, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"x\"}]}\n{\"messages\": 7}\n").await;
    assert_eq!(r.status(), 400);
    let e = err(&r.json().await.unwrap());
    assert!(e["message"].as_str().unwrap().contains("line 2"), "{e}");
    let files: Value = c
        .get(format!("{}/files", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        files["data"].as_array().unwrap().len(),
        0,
        "nothing recorded"
    );
    let leftovers: Vec<_> = std::fs::read_dir(s.data.join("files")).unwrap().collect();
    assert!(leftovers.is_empty(), "nothing left on disk");

    let big = "x".repeat(2 * 1024 * 1024);
    // The server answers 413 without reading the rest and closes that connection, so the
    // oversized request goes on a client of its own rather than poisoning the shared pool.
    let r = reqwest::Client::new()
        .post(format!("{}/jobs", s.base))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    let r = c
        .get(format!(
            "{}/jobs/job-none/artifacts/..%2F..%2Fqlorad.db",
            s.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(err(&r.json().await.unwrap())["code"], "invalid_name");

    let r = c
        .get(format!("{}/jobs/job-none", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_and_keeps_its_checkpoints() {
    let mut s = start(&["cpu"]).await;
    let c = reqwest::Client::new();
    let id = running_job(&c, &s).await;
    let r = c
        .post(format!("{}/jobs/{id}/cancel", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut status = Value::Null;
    for _ in 0..600 {
        status = job_status(&c, &s, &id).await;
        if status["status"] == "cancelled" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status["status"], "cancelled", "{status}");
    let cps: Value = c
        .get(format!("{}/jobs/{id}/checkpoints", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        cps["data"].as_array().unwrap().len(),
        1,
        "the stop wrote a checkpoint: {cps}"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_run_fifty_concurrent_jobs_exactly_once() {
    let mut s = start(&["cpu", "cpu"]).await;
    let c = reqwest::Client::new();
    let file: Value = upload(&c, &s, DATA).await.json().await.unwrap();
    let spec = json!({"model": "tiny", "training_file": file["id"], "hyperparameters": {"max_steps": 1, "batch_size": 3}, "lora": {"r": 2}});
    let posts = (0..50).map(|_| {
        let c = c.clone();
        let url = format!("{}/jobs", s.base);
        let spec = spec.clone();
        async move {
            c.post(url)
                .json(&spec)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    });
    let jobs: Vec<Value> = futures::future::join_all(posts).await;
    let ids: Vec<String> = jobs
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let list: Value = c
            .get(format!("{}/jobs?status=succeeded&limit=100", s.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if list["data"].as_array().unwrap().len() == 50 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "jobs did not all finish"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut workers = std::collections::HashSet::new();
    for id in &ids {
        let ev: Value = c
            .get(format!("{}/jobs/{id}/events?limit=1000", s.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ev = ev["data"].as_array().unwrap();
        let running: Vec<&Value> = ev
            .iter()
            .filter(|e| e["type"] == "status" && e["data"]["status"] == "running")
            .collect();
        assert_eq!(running.len(), 1, "{id} ran exactly once");
        workers.insert(running[0]["data"]["worker"].as_str().unwrap().to_string());
        assert_eq!(
            ev.iter().filter(|e| e["type"] == "metrics").count(),
            1,
            "{id}: one step"
        );
    }
    assert_eq!(workers.len(), 2, "both workers took jobs");
    s.shutdown().await;
}

/// The server as a child process, so it can be killed with SIGKILL.
struct Child {
    child: std::process::Child,
    base: String,
}

fn spawn_server(port: u16, data: &Path, models: &Path) -> Child {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_qlorad"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(data)
        .arg("--model-root")
        .arg(models)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Child {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

async fn wait_healthy(c: &reqwest::Client, base: &str) {
    for _ in 0..200 {
        if c.get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server at {base} did not come up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_resumes_its_job_from_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    tiny_model(&models);
    let data = tmp.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = reqwest::Client::new();

    let mut server = spawn_server(port, &data, &models);
    wait_healthy(&c, &server.base).await;
    let file: Value = c
        .post(format!("{}/files", server.base))
        .body(DATA)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let spec = json!({"model": "tiny", "training_file": file["id"], "checkpoint_every": 5,
        "hyperparameters": {"max_steps": 40, "batch_size": 3}, "lora": {"r": 4}});
    let job: Value = c
        .post(format!("{}/jobs", server.base))
        .json(&spec)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    let mut first_checkpoint = 0;
    for _ in 0..2000 {
        let cps: Value = c
            .get(format!("{}/jobs/{id}/checkpoints", server.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(cp) = cps["data"].as_array().unwrap().first() {
            first_checkpoint = cp["step"].as_i64().unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(first_checkpoint > 0, "a checkpoint was written");
    // Its event is stored before the checkpoint takes its final name: kill once it has.
    let dir = data.join(format!("jobs/{id}/run/checkpoint-{first_checkpoint}"));
    for _ in 0..500 {
        if dir.is_dir() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(dir.is_dir(), "{} is in place", dir.display());
    server.child.kill().unwrap(); // SIGKILL: no chance to checkpoint or requeue
    server.child.wait().unwrap();

    let mut server = spawn_server(port, &data, &models);
    wait_healthy(&c, &server.base).await;
    let mut status = Value::Null;
    for _ in 0..1200 {
        status = c
            .get(format!("{}/jobs/{id}", server.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["status"] == "succeeded" || status["status"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["attempts"], 2);
    let ev: Value = c
        .get(format!("{}/jobs/{id}/events?limit=1000", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ev = ev["data"].as_array().unwrap();
    let seqs: Vec<i64> = ev.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "events have no gap and no duplicate"
    );
    let at = ev
        .iter()
        .position(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("resumed from checkpoint"))
        })
        .expect("a resume event");
    let resumed_at = ev[at]["data"]["step"].as_i64().unwrap();
    assert!(resumed_at >= first_checkpoint);
    let steps: Vec<i64> = ev
        .iter()
        .filter(|e| e["type"] == "metrics")
        .filter_map(|e| e["data"]["step"].as_i64())
        .collect();
    for s in 1..=resumed_at {
        assert_eq!(
            steps.iter().filter(|&&x| x == s).count(),
            1,
            "step {s} (before the checkpoint) ran once: {steps:?}"
        );
    }
    let after: Vec<i64> = ev[at..]
        .iter()
        .filter(|e| e["type"] == "metrics")
        .filter_map(|e| e["data"]["step"].as_i64())
        .collect();
    assert_eq!(
        after,
        (resumed_at + 1..=40).collect::<Vec<_>>(),
        "the restarted run continues from the checkpoint"
    );
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_checkpoints_and_requeues_running_jobs() {
    let mut s = start(&["cpu"]).await;
    let c = reqwest::Client::new();
    let id = running_job(&c, &s).await;
    s.shutdown().await; // what SIGINT/SIGTERM do
    let store = s.store().await;
    let j = store.job(&id, qlorad::jobs::Scope::All).await.unwrap();
    assert_eq!(j.status, qlorad::jobs::Status::Queued, "back in the queue");
    assert_eq!(
        store.checkpoints(&id).await.unwrap().len(),
        1,
        "checkpointed on the way out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_is_cancelled_at_once_and_only_once() {
    let mut s = start(&[]).await; // no workers: the job stays queued
    let c = reqwest::Client::new();
    let file: Value = upload(&c, &s, DATA).await.json().await.unwrap();
    let spec = json!({"model": "tiny", "training_file": file["id"]});
    let job: Value = c
        .post(format!("{}/jobs", s.base))
        .json(&spec)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    for _ in 0..2 {
        let r: Value = c
            .post(format!("{}/jobs/{id}/cancel", s.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["status"], "cancelled");
    }
    let ev: Value = c
        .get(format!("{}/jobs/{id}/events", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let statuses: Vec<&str> = ev["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["data"]["status"].as_str())
        .collect();
    assert_eq!(statuses, vec!["queued", "cancelled"]);
    let r = c
        .post(format!("{}/jobs/job-none/cancel", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    s.shutdown().await;
}

/// Per-step losses of a job, from its metrics events.
async fn step_losses(c: &reqwest::Client, s: &Server, id: &str) -> Vec<(i64, f64)> {
    let ev: Value = c
        .get(format!("{}/jobs/{id}/events?limit=1000", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    ev["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "metrics")
        .map(|e| {
            (
                e["data"]["step"].as_i64().unwrap(),
                e["data"]["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

async fn wait_for(c: &reqwest::Client, s: &Server, id: &str, want: &[&str]) -> Value {
    for _ in 0..1200 {
        let j = job_status(c, s, id).await;
        if want.contains(&j["status"].as_str().unwrap_or("")) {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} never reached {want:?}");
}

/// A paused job releases its worker at a checkpoint and, resumed, trains exactly as a run
/// that was never paused: the same loss at every step. Only a paused job resumes; a finished
/// one does not pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_job_resumes_to_the_losses_of_an_uninterrupted_run() {
    let s = start(&["cpu"]).await;
    let c = reqwest::Client::new();
    let file: Value = upload(&c, &s, DATA).await.json().await.unwrap();
    let spec = json!({"model": "tiny", "training_file": file["id"],
        "hyperparameters": {"max_steps": 150, "batch_size": 1, "learning_rate": 0.01, "warmup_ratio": 0.0},
        "lora": {"r": 4, "dropout": 0.1}});
    let create = || async {
        let j: Value = c
            .post(format!("{}/jobs", s.base))
            .json(&spec)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        j["id"].as_str().unwrap().to_string()
    };
    let paused = create().await;
    for _ in 0..600 {
        if job_status(&c, &s, &paused).await["progress"]["step"]
            .as_i64()
            .unwrap_or(0)
            >= 3
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = c
        .post(format!("{}/jobs/{paused}/pause", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let j = wait_for(&c, &s, &paused, &["paused", "succeeded"]).await;
    assert_eq!(j["status"], "paused", "{j}");
    let at = j["progress"]["step"].as_i64().unwrap();
    assert!(at < 150, "paused before the end, at step {at}");
    // Nothing runs while paused; resuming twice is a conflict the second time.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(job_status(&c, &s, &paused).await["progress"]["step"], at);
    let r = c
        .post(format!("{}/jobs/{paused}/resume", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let again = c
        .post(format!("{}/jobs/{paused}/resume", s.base))
        .send()
        .await
        .unwrap();
    assert!(matches!(again.status().as_u16(), 409), "{}", again.status());
    assert_eq!(
        wait_for(&c, &s, &paused, &["succeeded", "failed"]).await["status"],
        "succeeded"
    );

    let straight = create().await;
    assert_eq!(
        wait_for(&c, &s, &straight, &["succeeded", "failed"]).await["status"],
        "succeeded"
    );
    let (a, b) = (
        step_losses(&c, &s, &paused).await,
        step_losses(&c, &s, &straight).await,
    );
    assert_eq!(a.len(), 150, "every step once: {a:?}");
    assert_eq!(a, b, "paused at step {at}, then resumed");
    let finished = c
        .post(format!("{}/jobs/{straight}/pause", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(finished.status(), 409);
}

/// POST a JSON body; the status and the JSON answer.
async fn post_json(c: &reqwest::Client, url: String, body: &Value) -> (u16, Value) {
    let r = c.post(url).json(body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// The ids `GET /jobs` lists.
async fn job_ids(c: &reqwest::Client, s: &Server) -> Vec<String> {
    let list: Value = c
        .get(format!("{}/jobs", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect()
}

/// `POST /jobs?dry_run=true` checks a spec as a create does and answers examples, tokens,
/// steps, the peak memory on each worker device and the time, creating nothing; once a job on
/// the model has run, the time comes from its throughput. A job over every worker's memory is
/// refused at create, naming the estimate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preflight_estimates_without_creating_and_create_refuses_what_cannot_fit() {
    let mut s = start(&["cpu"]).await;
    let c = reqwest::Client::new();
    let file: Value = upload(&c, &s, DATA).await.json().await.unwrap();
    let spec = json!({"model": "tiny", "training_file": file["id"],
        "hyperparameters": {"n_epochs": 2, "batch_size": 2}, "lora": {"r": 4}});
    let dry = format!("{}/jobs?dry_run=true", s.base);
    let (status, p) = post_json(&c, dry.clone(), &spec).await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["object"], "preflight");
    assert_eq!(p["spec"]["hyperparameters"]["batch_size"], 2);
    let data = &p["data"];
    assert_eq!(data["examples"], 3, "{p}");
    // Three examples in batches of two, twice: four steps.
    assert_eq!((&data["steps"], &data["epochs"]), (&json!(4), &json!(2.0)));
    let tokens = data["tokens"].as_u64().unwrap();
    let trained = data["trained_tokens_per_epoch"].as_u64().unwrap();
    assert!(trained > 0 && trained < tokens, "{p}");
    assert_eq!(data["trained_tokens"].as_u64().unwrap(), 2 * trained);
    let largest = data["largest_step"]["tokens"].as_u64().unwrap();
    assert!(largest > tokens / 3 && largest < tokens, "{p}");
    let m = &p["memory"][0];
    assert_eq!(m["device"], "cpu");
    let peak = m["estimated_peak_bytes"].as_u64().unwrap();
    let parts: u64 = [
        "weights_bytes",
        "adapter_bytes",
        "activation_bytes",
        "workspace_bytes",
    ]
    .iter()
    .map(|k| m[k].as_u64().unwrap())
    .sum();
    assert_eq!(peak, parts);
    assert!(m["adapter_bytes"].as_u64().unwrap() > 0);
    assert_eq!(m["fits"], true, "{p}");
    assert_eq!(p["time"]["basis"], "shapes");
    assert!(p["time"]["estimated_seconds"].as_f64().unwrap() > 0.0);
    assert!(job_ids(&c, &s).await.is_empty(), "nothing was created");
    // A dry run refuses what a create refuses, naming the field.
    let bad = json!({"model": "tiny", "training_file": "file-nope"});
    let (status, e) = post_json(&c, dry.clone(), &bad).await;
    assert_eq!(
        (status, &e["error"]["param"]),
        (400, &json!("training_file"))
    );
    // The same answer on /v1, from OpenAI's shape.
    let v1_spec = json!({"model": "tiny", "training_file": file["id"],
        "hyperparameters": {"batch_size": 2, "n_epochs": 2}});
    let url = format!("{}/v1/fine_tuning/jobs?dry_run=true", s.base);
    let (status, v1) = post_json(&c, url, &v1_spec).await;
    assert_eq!(status, 200);
    assert_eq!(v1["data"]["steps"], 4, "{v1}");

    // After a run on the model, the time is that run's throughput.
    let (_, job) = post_json(&c, format!("{}/jobs", s.base), &spec).await;
    let id = job["id"].as_str().unwrap().to_string();
    wait_for(&c, &s, &id, &["succeeded"]).await;
    let (_, p) = post_json(&c, dry, &spec).await;
    assert_eq!(
        (&p["time"]["basis"], &p["time"]["from_job"]),
        (&json!("measured"), &json!(id))
    );
    s.shutdown().await;

    // A worker that may use almost nothing refuses the job at create.
    let mut s = crate::harness::start_with(crate::harness::Options {
        workers: &["cpu"],
        env: &[("QLORAD_WORKERS__MEMORY_GIB", "0.001")],
        ..Default::default()
    })
    .await;
    let file: Value = upload(&c, &s, DATA).await.json().await.unwrap();
    let spec = json!({"model": "tiny", "training_file": file["id"]});
    let (status, e) = post_json(&c, format!("{}/jobs", s.base), &spec).await;
    assert_eq!(status, 422);
    assert_eq!(e["error"]["code"], "exceeds_device_memory", "{e}");
    assert_eq!(e["error"]["param"], "device");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("GiB on cpu") && msg.contains("dry_run"),
        "{msg}"
    );
    let (_, p) = post_json(&c, format!("{}/jobs?dry_run=true", s.base), &spec).await;
    assert_eq!(p["memory"][0]["fits"], false, "{p}");
    assert!(job_ids(&c, &s).await.is_empty(), "nothing was created");
    s.shutdown().await;
}
