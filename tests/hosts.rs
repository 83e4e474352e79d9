//! Several processes on one queue, as on several hosts: two API processes (`qlorad serve
//! --workers none`) and two worker processes (`qlorad worker`) of the real binary on one
//! PostgreSQL database and one S3 bucket (moto), each with a data directory of its own. Twenty
//! jobs from two keys; one worker killed with SIGKILL mid-job (its job resumes on the other from
//! a checkpoint that worker never had), one API process restarted; every job succeeds exactly
//! once, every follower sees its events gapless through either API process, and artifacts
//! download alike from both.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

const ALICE: &str = "alice-secret-0123456789";
const BOB: &str = "bob-secret-0123456789";
const JOBS: usize = 20;

/// A child process, killed when dropped; its output goes to `log`.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn start(dir: &Path, name: &str, args: &[&str], s3: &str) -> Proc {
        let log = dir.join(format!("{name}.log"));
        // Appended: a process restarted (the same host) goes on in the same log.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_qlorad"))
            .args(args)
            .env("QLORAD_WORKERS__LEASE_SECONDS", "3")
            .env("QLORAD_WORKERS__HEARTBEAT_SECONDS", "1")
            .env("RUST_LOG", "info,qlorad::server=debug")
            .env("NO_COLOR", "1")
            .env("AWS_ENDPOINT_URL", s3)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("qlorad starts");
        Proc { child, log }
    }

    fn signal(&mut self, signal: &str) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(ok.success(), "kill {signal} {pid}");
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Setup {
    dir: PathBuf,
    database_url: String,
    s3: String,
    bucket: String,
}

impl Setup {
    /// A process's arguments: its own data directory, like a host of its own.
    fn process(&self, role: &str, name: &str) -> Vec<String> {
        let d = |n: &str| self.dir.join(n).display().to_string();
        let mut args = vec![
            role.to_string(),
            "--database-url".into(),
            self.database_url.clone(),
            "--object-store".into(),
            format!("s3://{}/shared", self.bucket),
            "--data-dir".into(),
            d(&format!("data-{name}")),
            "--model-root".into(),
            d("models"),
        ];
        if role == "serve" {
            args.extend(["--workers".into(), "none".into()]);
            args.extend(["--api-keys-file".into(), d("keys")]);
        } else {
            args.extend(["--workers".into(), "cpu".into()]);
        }
        args
    }

    fn api(&self, name: &str, port: u16) -> Proc {
        let mut args = self.process("serve", name);
        args.extend(["--listen".into(), format!("127.0.0.1:{port}")]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::start(&self.dir, name, &args, &self.s3)
    }

    fn worker(&self, name: &str) -> Proc {
        let args = self.process("worker", name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::start(&self.dir, name, &args, &self.s3)
    }
}

async fn healthy(c: &reqwest::Client, base: &str, p: &Proc) {
    for _ in 0..600 {
        if let Ok(r) = c.get(format!("{base}/healthz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{base} did not come up:\n{}", p.output());
}

async fn get(c: &reqwest::Client, url: &str, key: &str) -> Value {
    let r = c.get(url).bearer_auth(key).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {url}");
    r.json().await.unwrap()
}

/// Follow a job's events over SSE until its final event, through whichever API process
/// answers, resuming after the last event seen (`Last-Event-ID`) when a stream breaks.
async fn follow(c: reqwest::Client, bases: [String; 2], key: &str, id: String) -> Vec<Value> {
    let mut seen: Vec<Value> = vec![];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    for attempt in 0.. {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id}: {} events seen",
            seen.len()
        );
        let base = &bases[attempt % 2];
        let mut req = c
            .get(format!("{base}/jobs/{id}/events"))
            .bearer_auth(key)
            .header("accept", "text/event-stream");
        if let Some(last) = seen.last() {
            req = req.header("last-event-id", last["seq"].to_string());
        }
        let Ok(resp) = req.send().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if resp.status() != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let mut body = resp.bytes_stream();
        let mut buf = String::new();
        while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, body.next()).await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(i) = buf.find("\n\n") {
                let frame: String = buf.drain(..i + 2).collect();
                if let Some(d) = frame.lines().find_map(|l| l.strip_prefix("data: ")) {
                    let e: Value = serde_json::from_str(d).unwrap();
                    let done = e["type"] == "status"
                        && matches!(
                            e["data"]["status"].as_str(),
                            Some("succeeded" | "failed" | "cancelled")
                        );
                    seen.push(e);
                    if done {
                        return seen;
                    }
                }
            }
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_and_worker_processes_share_one_postgres_queue() {
    let Some(database_url) = qlorad::jobs::store::testing::postgres().await else {
        return;
    };
    let s3 = std::env::var("TEST_S3_ENDPOINT")
        .expect("TEST_S3_ENDPOINT: source scripts/test_services.sh for an S3 server");
    let c = reqwest::Client::new();
    // A fresh bucket (moto answers unsigned requests).
    let bucket = format!("qlorad-test-{}", uuid::Uuid::new_v4().simple());
    let r = c.put(format!("{s3}/{bucket}")).send().await.unwrap();
    assert!(
        r.status().is_success(),
        "creating the bucket: {}",
        r.status()
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    common::tiny_model(&dir.join("models/tiny"), "tok-chatml");
    std::fs::write(dir.join("keys"), format!("alice:{ALICE}\nbob:{BOB}\n")).unwrap();
    let setup = Setup {
        dir,
        database_url,
        s3,
        bucket,
    };
    let ports = [free_port(), free_port()];
    let bases = ports.map(|p| format!("http://127.0.0.1:{p}"));
    let api_a = setup.api("api-a", ports[0]);
    let mut api_b = setup.api("api-b", ports[1]);
    healthy(&c, &bases[0], &api_a).await;
    healthy(&c, &bases[1], &api_b).await;
    let mut w1 = setup.worker("worker-1");
    let w2 = setup.worker("worker-2");

    // Twenty jobs, alternating keys and API processes; followers on the other process.
    let data = concat!(
        r#"{"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]}"#,
        "\n",
    );
    let mut files = vec![];
    for key in [ALICE, BOB] {
        let r = c
            .post(format!("{}/files?filename=train.jsonl", bases[0]))
            .bearer_auth(key)
            .body(data)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 201, "{body}");
        files.push(body["id"].clone());
    }
    let mut jobs: Vec<(String, &str)> = vec![];
    let mut followers = vec![];
    for i in 0..JOBS {
        let key = [ALICE, BOB][i % 2];
        let spec = json!({
            "model": "tiny", "training_file": files[i % 2],
            "hyperparameters": {"max_steps": 12, "batch_size": 2, "learning_rate": 0.01, "warmup_ratio": 0.0},
            "lora": {"r": 4, "dropout": 0.0}, "checkpoint_every": 3,
        });
        let r = c
            .post(format!("{}/jobs", bases[i % 2]))
            .bearer_auth(key)
            .json(&spec)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let id = r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let order = [bases[(i + 1) % 2].clone(), bases[i % 2].clone()];
        followers.push(tokio::spawn(follow(c.clone(), order, key, id.clone())));
        jobs.push((id, key));
    }

    // Kill worker 1 with SIGKILL once a job it runs is past a checkpoint.
    let w1_name = loop {
        let log = w1.output();
        if let Some(line) = log.lines().find(|l| l.contains("worker started")) {
            let name = line.split("worker=").nth(1).unwrap();
            break name.split_whitespace().next().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let killed = 'kill: loop {
        for (id, key) in &jobs {
            let j = get(&c, &format!("{}/jobs/{id}", bases[0]), key).await;
            if j["status"] != "running" || j["progress"]["step"].as_i64() < Some(4) {
                continue;
            }
            let events = get(
                &c,
                &format!("{}/jobs/{id}/events?limit=1000", bases[0]),
                key,
            )
            .await;
            let worker = events["data"]
                .as_array()
                .unwrap()
                .iter()
                .rev()
                .find_map(|e| e["data"]["worker"].as_str().map(str::to_string));
            if worker.as_deref() == Some(w1_name.as_str()) {
                w1.signal("-KILL");
                break 'kill id.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Restart API process B while the rest runs; its followers move to A and back.
    api_b.signal("-TERM");
    assert!(api_b.child.wait().unwrap().success(), "{}", api_b.output());
    let api_b = setup.api("api-b", ports[1]);
    healthy(&c, &bases[1], &api_b).await;

    let mut seen = vec![];
    for f in followers {
        match f.await {
            Ok(events) => seen.push(events),
            Err(e) => {
                for name in ["api-a", "api-b", "worker-1", "worker-2"] {
                    let log = setup.dir.join(format!("{name}.log"));
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    eprintln!("==== {name}\n{text}");
                }
                panic!("a follower failed: {e}");
            }
        }
    }
    for ((id, key), events) in jobs.iter().zip(&seen) {
        let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as i64).collect::<Vec<_>>(),
            "{id}: gapless as followed"
        );
        let stored = get(
            &c,
            &format!("{}/jobs/{id}/events?limit=1000", bases[1]),
            key,
        )
        .await;
        assert_eq!(
            stored["data"].as_array().unwrap().len(),
            events.len(),
            "{id}: the follower saw every stored event"
        );
        let succeeded = events
            .iter()
            .filter(|e| e["type"] == "status" && e["data"]["status"] == "succeeded")
            .count();
        assert_eq!(succeeded, 1, "{id}: succeeded exactly once: {events:?}");
        let j = get(&c, &format!("{}/jobs/{id}", bases[1]), key).await;
        assert_eq!(j["status"], "succeeded", "{id}");
        assert_eq!(j["progress"]["step"], 12, "{id}");
        let attempts = j["attempts"].as_i64().unwrap();
        assert_eq!(attempts, if *id == killed { 2 } else { 1 }, "{id}");

        // The same bytes from either API process, as the listing's sha256 says.
        let arts = get(&c, &format!("{}/jobs/{id}/artifacts", bases[0]), key).await;
        let adapter = arts["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "adapter/adapter_model.safetensors")
            .unwrap_or_else(|| panic!("{id}: {arts}"))
            .clone();
        for base in &bases {
            let url = format!("{base}/jobs/{id}/artifacts/adapter/adapter_model.safetensors");
            let r = c.get(url).bearer_auth(key).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let bytes = r.bytes().await.unwrap();
            let digest: String = {
                use sha2::Digest;
                sha2::Sha256::digest(&bytes)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            };
            assert_eq!(
                digest,
                adapter["sha256"].as_str().unwrap(),
                "{id} from {base}"
            );
        }
    }
    // The killed job went back to the queue and resumed on the surviving worker.
    let (_, key) = jobs.iter().find(|(id, _)| *id == killed).unwrap();
    let events = get(
        &c,
        &format!("{}/jobs/{killed}/events?limit=1000", bases[0]),
        key,
    )
    .await;
    let messages: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        messages.iter().any(|m| m.starts_with("queued again"))
            && messages
                .iter()
                .any(|m| m.starts_with("resumed from checkpoint")),
        "{messages:?}"
    );
    assert!(
        w2.output()
            .contains("fetched the newest checkpoint from the object store"),
        "the surviving worker never had the killed job's checkpoint on disk"
    );
    // Another key's job is not found through either process.
    let (id, _) = &jobs[0];
    let r = c
        .get(format!("{}/jobs/{id}", bases[1]))
        .bearer_auth(BOB)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    drop((api_a, api_b, w2));
}
