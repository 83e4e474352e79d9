//! Webhooks when jobs end: OpenAI's payload, Standard Webhooks signatures, an outbox that
//! retries a failing or silent endpoint and survives a restart, each event accepted once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use base64::Engine;
use hmac::Mac;
use serde_json::{json, Value};

use crate::harness::{start_with, Options, DATA};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One POST the receiver saw: its headers of interest, body and what it answered.
#[derive(Debug, Clone)]
struct Seen {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
    accepted: bool,
}

#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// The first attempt of every delivery fails with a 500, the second gets no answer in time,
/// the third is accepted.
async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let id = h("webhook-id");
    let attempt = r.seen.lock().unwrap().iter().filter(|s| s.id == id).count();
    let accepted = attempt >= 2;
    r.seen.lock().unwrap().push(Seen {
        id,
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        body,
        accepted,
    });
    match attempt {
        0 => StatusCode::INTERNAL_SERVER_ERROR,
        1 => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            StatusCode::OK
        }
        _ => StatusCode::OK,
    }
}

async fn start_receiver() -> (String, Receiver) {
    let r = Receiver::default();
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, r)
}

fn verifies(s: &Seen) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.{}", s.id, s.timestamp, s.body).as_bytes());
    let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    s.signature == format!("v1,{want}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_and_survive_a_restart() {
    let (url, recv) = start_receiver().await;
    let hooks = format!(
        r#"[{{url = "{url}", secret = "{SECRET}", timeout_seconds = 1, events = ["fine_tuning.job.succeeded", "fine_tuning.job.cancelled"]}}]"#
    );
    let env = [("QLORAD_WEBHOOKS", hooks.as_str())];
    let mut s = start_with(Options {
        workers: &["cpu"],
        env: &env,
        ..Default::default()
    })
    .await;
    let c = reqwest::Client::new();
    let file: Value = c
        .post(format!("{}/files?filename=train.jsonl", s.base))
        .body(DATA)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let create = |steps: u64| {
        let (c, url) = (c.clone(), format!("{}/jobs", s.base));
        let body = json!({"model": "tiny", "training_file": file["id"],
            "hyperparameters": {"max_steps": steps, "batch_size": 3}, "lora": {"r": 4}});
        async move {
            let j: Value = c
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            j["id"].as_str().unwrap().to_string()
        }
    };
    let done = create(2).await;
    for _ in 0..600 {
        let j: Value = c
            .get(format!("{}/jobs/{done}", s.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if j["status"] == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The first attempt fails; stop the server before the retries and start it again on the
    // same data directory: the outbox carries on.
    for _ in 0..100 {
        if !recv.seen.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let data = s.data.clone();
    s.shutdown().await;
    let s = start_with(Options {
        workers: &["cpu"],
        env: &env,
        data: Some(&data),
        ..Default::default()
    })
    .await;
    let cancelled = {
        let (c, url) = (c.clone(), format!("{}/jobs", s.base));
        let body = json!({"model": "tiny", "training_file": file["id"],
            "hyperparameters": {"max_steps": 100000, "batch_size": 3}, "lora": {"r": 4}});
        let j: Value = c
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        j["id"].as_str().unwrap().to_string()
    };
    let r = c
        .post(format!("{}/jobs/{cancelled}/cancel", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let accepted = |n: usize| {
        recv.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.accepted)
            .count()
            >= n
    };
    for _ in 0..400 {
        if accepted(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A little longer: nothing more may arrive once an event is accepted.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = recv.seen.lock().unwrap().clone();
    let mut ids: Vec<&str> = seen.iter().map(|s| s.id.as_str()).collect();
    ids.dedup();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2, "one event per job: {seen:#?}");
    for id in ids {
        let attempts: Vec<&Seen> = seen.iter().filter(|s| s.id == id).collect();
        assert_eq!(
            attempts.len(),
            3,
            "failed, timed out, accepted: {attempts:#?}"
        );
        assert!(attempts[2].accepted && !attempts[0].accepted && !attempts[1].accepted);
        assert!(attempts
            .iter()
            .all(|a| a.body == attempts[0].body && verifies(a)));
        let event: Value = serde_json::from_str(&attempts[0].body).unwrap();
        assert_eq!(event["object"], "event");
        assert_eq!(event["id"], id);
        let (kind, job) = (
            event["type"].as_str().unwrap(),
            event["data"]["id"].as_str().unwrap(),
        );
        match kind {
            "fine_tuning.job.succeeded" => assert_eq!(job, done),
            "fine_tuning.job.cancelled" => assert_eq!(job, cancelled),
            other => panic!("unexpected event {other}"),
        }
    }
}
