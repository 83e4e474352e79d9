//! `/v1/chat/completions`, `/v1/completions` and `/v1/models` over real HTTP: OpenAI's shapes,
//! streamed and whole, usage counts, a fine-tuned model answering its owner only.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{Options, Server, ALICE, BOB, DATA};

async fn start() -> Server {
    crate::harness::start_with(Options {
        keys: true,
        workers: &["cpu"],
        ..Default::default()
    })
    .await
}

async fn post(c: &reqwest::Client, s: &Server, path: &str, key: &str, body: Value) -> (u16, Value) {
    let r = c
        .post(format!("{}{path}", s.base))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn get(c: &reqwest::Client, s: &Server, path: &str, key: &str) -> (u16, Value) {
    let r = c
        .get(format!("{}{path}", s.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The `data:` payloads of a Server-Sent Event body, `[DONE]` included.
async fn stream(
    c: &reqwest::Client,
    s: &Server,
    path: &str,
    key: &str,
    body: Value,
) -> Vec<String> {
    let r = c
        .post(format!("{}{path}", s.base))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").map(String::from))
        .collect()
}

fn ask() -> Value {
    json!([{"role": "user", "content": "Capital of France?"}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_have_openai_shapes_streamed_and_whole() {
    let s = start().await;
    let c = reqwest::Client::new();
    let (status, models) = get(&c, &s, "/v1/models", ALICE).await;
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "tiny" && m["object"] == "model" && m["owned_by"] == "qlorad"));

    let body = json!({"model": "tiny", "messages": ask(), "max_tokens": 8, "temperature": 0});
    let (status, whole) = post(&c, &s, "/v1/chat/completions", ALICE, body.clone()).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(whole["model"], "tiny");
    let choice = &whole["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
    let u = &whole["usage"];
    let (p, n) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 5 && (1..=8).contains(&n), "{u}");
    assert_eq!(u["total_tokens"].as_u64().unwrap(), p + n);
    // Greedy is deterministic.
    let (_, again) = post(&c, &s, "/v1/chat/completions", ALICE, body.clone()).await;
    assert_eq!(again["choices"][0]["message"], choice["message"]);

    // Streamed: the role first, then the same text in pieces, the finish reason, the usage.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let chunks = stream(&c, &s, "/v1/chat/completions", ALICE, sbody).await;
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, choice["message"]["content"].as_str().unwrap());
    let n_chunks = chunks.len();
    assert_eq!(
        chunks[n_chunks - 2]["choices"][0]["finish_reason"],
        choice["finish_reason"]
    );
    assert_eq!(chunks[n_chunks - 1]["choices"], json!([]));
    assert_eq!(chunks[n_chunks - 1]["usage"], whole["usage"]);

    // Two sampled choices in one request, seeded: the same seed gives the same answers.
    let sampled = json!({"model": "tiny", "messages": ask(), "max_tokens": 6, "n": 2, "seed": 5, "temperature": 0.9});
    let (_, a) = post(&c, &s, "/v1/chat/completions", ALICE, sampled.clone()).await;
    let (_, b) = post(&c, &s, "/v1/chat/completions", ALICE, sampled).await;
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    assert_eq!(a["choices"], b["choices"]);

    // A stop string ends the answer before it.
    let full = choice["message"]["content"].as_str().unwrap().to_string();
    if let Some(cut) = full.char_indices().nth(2).map(|(i, _)| i) {
        let stop = full[cut..].chars().take(1).collect::<String>();
        let mut b = body.clone();
        b["stop"] = json!([stop]);
        let (_, r) = post(&c, &s, "/v1/chat/completions", ALICE, b).await;
        let got = r["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            !got.contains(&stop) && full.starts_with(got),
            "{got:?} from {full:?} stop {stop:?}"
        );
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
    }

    // The legacy completions endpoint.
    let (status, t) = post(
        &c,
        &s,
        "/v1/completions",
        ALICE,
        json!({"model": "tiny", "prompt": "Paris is", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["object"], "text_completion");
    assert!(t["choices"][0]["text"].is_string());

    // Bad requests name the field.
    for (body, param) in [
        (json!({"model": "nope", "messages": ask()}), "model"),
        (json!({"model": "tiny", "messages": []}), "messages"),
        (
            json!({"model": "tiny", "messages": ask(), "temperature": 3}),
            "temperature",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "tiny", "messages": ask(), "max_tokens": 100000}),
            "max_tokens",
        ),
        (
            json!({"model": "tiny", "messages": ask(), "tools": [{"type": "function"}]}),
            "tools",
        ),
    ] {
        let (status, e) = post(&c, &s, "/v1/chat/completions", ALICE, body).await;
        assert!(status == 400 || status == 404, "{status} {e}");
        assert_eq!(e["error"]["param"], param, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fine_tuned_model_answers_its_owner_only() {
    let s = start().await;
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{}/files?filename=train.jsonl", s.base))
        .bearer_auth(ALICE)
        .body(DATA)
        .send()
        .await
        .unwrap();
    let file: Value = r.json().await.unwrap();
    let (status, job) = post(
        &c,
        &s,
        "/v1/fine_tuning/jobs",
        ALICE,
        json!({"model": "tiny", "training_file": file["id"], "hyperparameters": {"max_steps": 2, "learning_rate": 1e-2},
               "lora": {"r": 4}, "suffix": "chat", "eval_prompts": [ask()]}),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let mut ft = Value::Null;
    for _ in 0..600 {
        let (_, j) = get(&c, &s, &format!("/v1/fine_tuning/jobs/{id}"), ALICE).await;
        if j["status"] == "succeeded" {
            ft = j["fine_tuned_model"].clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ft = ft.as_str().expect("the job succeeded").to_string();
    let body = json!({"model": ft, "messages": ask(), "max_tokens": 6, "temperature": 0});
    let (status, mine) = post(&c, &s, "/v1/chat/completions", ALICE, body.clone()).await;
    assert_eq!(status, 200, "{mine}");
    assert_eq!(mine["model"], ft);
    // The job answered its eval prompt at the end with the model it made: the same answer.
    let (_, events) = get(
        &c,
        &s,
        &format!("/v1/fine_tuning/jobs/{id}/events?limit=100"),
        ALICE,
    )
    .await;
    let samples = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|e| e["data"].get("samples").cloned())
        .expect("a samples event");
    assert_eq!(samples[0]["messages"], ask());
    let (_, long) = post(
        &c,
        &s,
        "/v1/chat/completions",
        ALICE,
        json!({"model": ft, "messages": ask(), "max_tokens": 64, "temperature": 0}),
    )
    .await;
    assert_eq!(
        samples[0]["answer"],
        long["choices"][0]["message"]["content"]
    );
    // Another key's fine-tuned model does not exist for it.
    let (_, theirs) = post(&c, &s, "/v1/chat/completions", BOB, body).await;
    assert_eq!(theirs["error"]["code"], "model_not_found", "{theirs}");
    let (_, alice_models) = get(&c, &s, "/v1/models", ALICE).await;
    let (_, bob_models) = get(&c, &s, "/v1/models", BOB).await;
    let has = |m: &Value| {
        m["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == ft.as_str())
    };
    assert!(has(&alice_models) && !has(&bob_models));
    // A checkpoint's model answers too.
    let (status, _) = post(
        &c,
        &s,
        "/v1/chat/completions",
        ALICE,
        json!({"model": format!("{ft}:ckpt-step-2"), "messages": ask(), "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, 200);
}
