//! The OpenAI-shaped `/v1` API, `/metrics`, `/openapi.json` and the dashboard, over real HTTP
//! with a tiny generated model.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{Server, DATA};

async fn start() -> Server {
    crate::harness::start(&["cpu"]).await
}

/// A multipart/form-data body as the openai client sends it: text fields, then the file.
fn multipart(fields: &[(&str, &str)], file: &str) -> (String, Vec<u8>) {
    let boundary = "qloradtestboundary";
    let mut body = String::new();
    for (k, v) in fields {
        body +=
            &format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n");
    }
    body += &format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{file}\r\n--{boundary}--\r\n"
    );
    (
        format!("multipart/form-data; boundary={boundary}"),
        body.into_bytes(),
    )
}

async fn upload(c: &reqwest::Client, s: &Server, fields: &[(&str, &str)]) -> reqwest::Response {
    let (ct, body) = multipart(fields, DATA);
    c.post(format!("{}/v1/files", s.base))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn get(c: &reqwest::Client, url: String) -> (u16, Value) {
    let r = c.get(url).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn post(c: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// `{"error": {"message", "type", "param", "code"}}` naming `param`.
fn assert_error(body: &Value, param: Option<&str>) {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(e["type"], "invalid_request_error", "{body}");
    assert!(e["code"].is_string(), "{body}");
    assert_eq!(e["param"].as_str(), param, "{body}");
}

async fn wait_status(c: &reqwest::Client, s: &Server, id: &str, want: &str) -> Value {
    for _ in 0..600 {
        let (_, job) = get(c, format!("{}/v1/fine_tuning/jobs/{id}", s.base)).await;
        if job["status"] == want {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} never reached {want}");
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_and_fine_tuning_jobs_have_openai_shapes() {
    let s = start().await;
    let c = reqwest::Client::new();

    let r = upload(&c, &s, &[("purpose", "fine-tune")]).await;
    assert_eq!(r.status(), 200);
    let file: Value = r.json().await.unwrap();
    assert_eq!(
        (&file["object"], &file["purpose"], &file["status"]),
        (&json!("file"), &json!("fine-tune"), &json!("processed"))
    );
    assert_eq!(file["bytes"], DATA.len());
    assert!((file["created_at"].as_i64().unwrap() - now()).abs() < 60);
    let fid = file["id"].as_str().unwrap().to_string();
    let (status, list) = get(&c, format!("{}/v1/files", s.base)).await;
    assert_eq!(
        (status, &list["object"], &list["has_more"]),
        (200, &json!("list"), &json!(false))
    );
    assert_eq!(list["data"][0]["id"], fid.as_str());
    let content = c
        .get(format!("{}/v1/files/{fid}/content", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(content, DATA);

    let (status, job) = post(
        &c,
        format!("{}/v1/fine_tuning/jobs", s.base),
        json!({
            "model": "tiny", "training_file": fid, "suffix": "t", "seed": 3,
            "hyperparameters": {"n_epochs": "auto", "batch_size": 3, "learning_rate_multiplier": 2, "max_steps": 4},
            "metadata": {"team": "search"},
            "lora": {"r": 4}, "checkpoint_every": 2
        }),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["object"], "fine_tuning.job");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["model"], "tiny");
    assert_eq!(job["training_file"], fid.as_str());
    assert_eq!(job["hyperparameters"]["batch_size"], 3);
    assert_eq!(job["hyperparameters"]["n_epochs"], 3);
    assert_eq!(job["hyperparameters"]["learning_rate_multiplier"], 2.0);
    assert_eq!(job["method"]["type"], "supervised");
    assert_eq!(
        (&job["seed"], &job["user_provided_suffix"]),
        (&json!(3), &json!("t"))
    );
    assert_eq!(job["metadata"], json!({"team": "search"}));
    assert_eq!(job["spec"]["hyperparameters"]["learning_rate"], 4e-4);
    assert!(job["fine_tuned_model"].is_null() && job["error"].is_null());
    assert!((job["created_at"].as_i64().unwrap() - now()).abs() < 60);
    let id = job["id"].as_str().unwrap().to_string();

    let done = wait_status(&c, &s, &id, "succeeded").await;
    assert_eq!(
        done["fine_tuned_model"],
        format!("ft:tiny:qlorad:t:{id}").as_str()
    );
    assert!(done["trained_tokens"].as_i64().unwrap() > 0, "{done}");
    assert!(done["finished_at"].as_i64().unwrap() >= done["created_at"].as_i64().unwrap());

    // A step metrics CSV as OpenAI writes it, one row per step.
    let results = done["result_files"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{done}");
    let rid = results[0].as_str().unwrap();
    let (status, meta) = get(&c, format!("{}/v1/files/{rid}", s.base)).await;
    assert_eq!(status, 200);
    assert_eq!(
        (&meta["purpose"], &meta["filename"]),
        (&json!("fine-tune-results"), &json!("step_metrics.csv"))
    );
    let csv = c
        .get(format!("{}/v1/files/{rid}/content", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    );
    assert_eq!(lines.len(), 5, "{csv}");
    let first: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(first[0], "1");
    assert!(first[1].parse::<f64>().unwrap() > 0.0, "{csv}");
    // The same losses as TensorBoard events among the job's artifacts.
    let (_, arts) = get(&c, format!("{}/jobs/{id}/artifacts", s.base)).await;
    let board: Vec<&str> = arts["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["name"].as_str())
        .filter(|n| n.starts_with("tensorboard/events.out.tfevents."))
        .collect();
    assert_eq!(board.len(), 1, "{arts}");
    let bytes = c
        .get(format!("{}/jobs/{id}/artifacts/{}", s.base, board[0]))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &bytes).unwrap();
    let scalars = qlorad::finetune::tensorboard::read_scalars(tmp.path()).unwrap();
    let losses: Vec<(i64, String)> = scalars
        .iter()
        .filter(|x| x.tag == "train/loss")
        .map(|x| (x.step, format!("{:.5}", x.value)))
        .collect();
    let csv_losses: Vec<(i64, String)> = lines[1..]
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].parse().unwrap(), f[1].to_string())
        })
        .collect();
    assert_eq!(losses, csv_losses);
    for tag in ["train/learning_rate", "train/grad_norm", "train/epoch"] {
        assert_eq!(scalars.iter().filter(|x| x.tag == tag).count(), 4, "{tag}");
    }
    let (_, listed) = get(&c, format!("{}/v1/files?purpose=fine-tune-results", s.base)).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");

    // The list filters by metadata as OpenAI's does.
    let listed = |q: &'static str| {
        let (c, url) = (c.clone(), format!("{}/v1/fine_tuning/jobs?{q}", s.base));
        async move {
            let (status, page) = get(&c, url).await;
            let ids: Vec<String> = page["data"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .map(|j| j["id"].as_str().unwrap().to_string())
                        .collect()
                })
                .unwrap_or_default();
            (status, ids, page)
        }
    };
    assert_eq!(
        listed("metadata%5Bteam%5D=search").await.1,
        vec![id.clone()]
    );
    assert!(listed("metadata[team]=ads").await.1.is_empty());
    assert!(listed("metadata[team]=search&metadata[x]=1")
        .await
        .1
        .is_empty());
    assert!(!listed("metadata=null").await.1.contains(&id));
    let (status, _, e) = listed("metadata=team").await;
    assert_eq!(status, 400);
    assert_error(&e, Some("metadata"));

    // Events: newest first, paged with `after`. The status changes a moment before its event
    // is written, so wait for the event.
    let mut page = Value::Null;
    for _ in 0..100 {
        page = get(
            &c,
            format!("{}/v1/fine_tuning/jobs/{id}/events?limit=2", s.base),
        )
        .await
        .1;
        if page["data"][0]["message"] == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        (&page["object"], &page["has_more"]),
        (&json!("list"), &json!(true))
    );
    let first = &page["data"][0];
    assert_eq!(first["object"], "fine_tuning.job.event");
    assert_eq!(
        (&first["message"], &first["level"]),
        (&json!("succeeded"), &json!("info"))
    );
    let last_id = page["last_id"].as_str().unwrap();
    let (_, all) = get(
        &c,
        format!("{}/v1/fine_tuning/jobs/{id}/events?limit=100", s.base),
    )
    .await;
    let (_, next) = get(
        &c,
        format!(
            "{}/v1/fine_tuning/jobs/{id}/events?limit=100&after={last_id}",
            s.base
        ),
    )
    .await;
    assert_eq!(next["data"][0]["id"], all["data"][2]["id"]);
    let metrics: Vec<&Value> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "metrics")
        .collect();
    assert_eq!(metrics.len(), 4);
    assert_eq!(metrics[0]["data"]["step"], 4);
    assert!(metrics[0]["data"]["train_loss"].is_number());

    // Checkpoints: newest first.
    let (_, ck) = get(
        &c,
        format!("{}/v1/fine_tuning/jobs/{id}/checkpoints", s.base),
    )
    .await;
    let steps: Vec<i64> = ck["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["step_number"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, vec![4, 2]);
    assert_eq!(ck["data"][0]["object"], "fine_tuning.job.checkpoint");
    assert_eq!(ck["data"][0]["fine_tuning_job_id"], id.as_str());
    assert!(ck["data"][0]["metrics"]["train_loss"].is_number());
    assert_eq!(
        ck["data"][0]["fine_tuned_model_checkpoint"],
        format!("ft:tiny:qlorad:t:{id}:ckpt-step-4").as_str()
    );

    // A finished job cannot be cancelled; a running one can.
    let (status, body) = post(
        &c,
        format!("{}/v1/fine_tuning/jobs/{id}/cancel", s.base),
        json!({}),
    )
    .await;
    assert_eq!(status, 409);
    assert_error(&body, Some("fine_tuning_job_id"));
    let (_, long) = post(
        &c,
        format!("{}/v1/fine_tuning/jobs", s.base),
        json!({"model": "tiny", "training_file": fid, "hyperparameters": {"max_steps": 100000, "batch_size": 3}}),
    )
    .await;
    let long_id = long["id"].as_str().unwrap().to_string();
    wait_status(&c, &s, &long_id, "running").await;
    let (status, _) = post(
        &c,
        format!("{}/v1/fine_tuning/jobs/{long_id}/cancel", s.base),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    wait_status(&c, &s, &long_id, "cancelled").await;

    // Jobs list: newest first, paged.
    let (_, p1) = get(&c, format!("{}/v1/fine_tuning/jobs?limit=1", s.base)).await;
    assert_eq!(
        (&p1["data"][0]["id"], &p1["has_more"]),
        (&json!(long_id), &json!(true))
    );
    let (_, p2) = get(
        &c,
        format!("{}/v1/fine_tuning/jobs?limit=1&after={long_id}", s.base),
    )
    .await;
    assert_eq!(
        (&p2["data"][0]["id"], &p2["has_more"]),
        (&json!(id), &json!(false))
    );

    let (status, del) = c
        .delete(format!("{}/v1/files/{fid}", s.base))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .unwrap();
    assert_eq!(status, 200);
    let del: Value = del.json().await.unwrap();
    assert_eq!(
        (&del["deleted"], &del["object"]),
        (&json!(true), &json!("file"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_v1_requests_get_the_openai_error_object() {
    let s = start().await;
    let c = reqwest::Client::new();
    let r = upload(&c, &s, &[]).await;
    assert_eq!(r.status(), 400);
    assert_error(&r.json().await.unwrap(), Some("purpose"));
    let r = upload(&c, &s, &[("purpose", "assistants")]).await;
    assert_eq!(r.status(), 400);
    assert_error(&r.json().await.unwrap(), Some("purpose"));
    let r = c
        .post(format!("{}/v1/files", s.base))
        .body(DATA)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_error(&r.json().await.unwrap(), Some("file"));
    let fid = upload(&c, &s, &[("purpose", "fine-tune")])
        .await
        .json::<Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let jobs = format!("{}/v1/fine_tuning/jobs", s.base);
    for (body, status, param) in [
        (json!({"training_file": fid}), 400, Some("model")),
        (json!({"model": "tiny"}), 400, Some("training_file")),
        (
            json!({"model": "nope", "training_file": fid}),
            400,
            Some("model"),
        ),
        (
            json!({"model": "tiny", "training_file": "file-nope"}),
            400,
            Some("training_file"),
        ),
        (
            json!({"model": "tiny", "training_file": fid, "hyperparameters": {"n_epochs": 0}}),
            400,
            Some("hyperparameters.n_epochs"),
        ),
        (
            json!({"model": "tiny", "training_file": fid, "hyperparameters": {"batch_size": "big"}}),
            400,
            Some("hyperparameters.batch_size"),
        ),
        (
            json!({"model": "tiny", "training_file": fid, "hyperparameters": {"learning_rate_multiplier": 0}}),
            400,
            Some("hyperparameters.learning_rate_multiplier"),
        ),
        (
            json!({"model": "tiny", "training_file": fid, "method": {"type": "orpo"}}),
            400,
            Some("method.type"),
        ),
        (
            json!({"model": "tiny", "training_file": fid, "method": {"type": "dpo"}}),
            422,
            Some("training_file"),
        ),
        (
            json!({"model": "tiny", "training_file": fid, "lora": {"r": 0}}),
            422,
            Some("lora.r"),
        ),
        (
            json!({"model": "tiny", "training_file": fid, "lora": {"rank": 8}}),
            422,
            Some("rank"),
        ),
        (
            json!({"model": "tiny", "training_file": fid, "suffix": 7}),
            400,
            Some("suffix"),
        ),
        (json!([1, 2]), 400, None),
    ] {
        let (got, err) = post(&c, jobs.clone(), body.clone()).await;
        assert_eq!(got, status, "{body} -> {err}");
        assert_error(&err, param);
    }
    let r = c
        .post(&jobs)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_error(&r.json().await.unwrap(), None);

    let (status, body) = get(&c, format!("{jobs}/job-nope")).await;
    assert_eq!(status, 404);
    assert_error(&body, Some("fine_tuning_job_id"));
    let (status, body) = get(&c, format!("{jobs}?limit=0")).await;
    assert_eq!(status, 400);
    assert_error(&body, Some("limit"));
    let (status, body) = get(&c, format!("{jobs}?limit=ten")).await;
    assert_eq!(status, 400);
    assert_error(&body, None);
    let (status, body) = get(&c, format!("{}/v1/files/file-nope", s.base)).await;
    assert_eq!(status, 404);
    assert_error(&body, Some("file_id"));
    let (status, body) = get(&c, format!("{}/v1/nothing", s.base)).await;
    assert_eq!(status, 404);
    assert_error(&body, None);
    let r = c.put(&jobs).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_error(&r.json().await.unwrap(), None);
}

/// The value of the one sample line that starts with `series ` (name and labels).
fn sample(text: &str, series: &str) -> f64 {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{series} ")))
        .collect();
    assert_eq!(lines.len(), 1, "{series} in\n{text}");
    lines[0].rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_openapi_and_dashboard() {
    let s = start().await;
    let c = reqwest::Client::new();
    let fid = upload(&c, &s, &[("purpose", "fine-tune")])
        .await
        .json::<Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, job) = post(
        &c,
        format!("{}/v1/fine_tuning/jobs", s.base),
        json!({"model": "tiny", "training_file": fid, "hyperparameters": {"max_steps": 3, "batch_size": 3}}),
    )
    .await;
    let id = job["id"].as_str().unwrap().to_string();
    wait_status(&c, &s, &id, "succeeded").await;
    let (status, _) = get(&c, format!("{}/jobs/job-nope", s.base)).await;
    assert_eq!(status, 404);

    let r = c.get(format!("{}/metrics", s.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = r.text().await.unwrap();
    assert_eq!(sample(&text, r#"qlorad_jobs{status="succeeded"}"#), 1.0);
    assert_eq!(sample(&text, r#"qlorad_jobs{status="queued"}"#), 0.0);
    assert_eq!(sample(&text, "qlorad_queue_depth"), 0.0);
    let w = r#"{worker="cpu#0",device="cpu"}"#;
    assert_eq!(sample(&text, &format!("qlorad_worker_steps_total{w}")), 3.0);
    assert!(sample(&text, &format!("qlorad_worker_tokens_total{w}")) > 0.0);
    assert_eq!(sample(&text, &format!("qlorad_worker_busy{w}")), 0.0);
    assert!(text.contains(&format!("qlorad_worker_steps_per_second{w} ")));
    assert!(!text.contains("qlorad_gpu_memory"));
    let route = r#"route="/v1/fine_tuning/jobs/{fine_tuning_job_id}",method="GET",status="200""#;
    let polls = sample(&text, &format!("qlorad_http_requests_total{{{route}}}"));
    assert!(polls >= 1.0);
    assert_eq!(
        sample(
            &text,
            &format!("qlorad_http_request_duration_seconds_bucket{{{route},le=\"+Inf\"}}")
        ),
        polls
    );
    assert_eq!(
        sample(
            &text,
            &format!("qlorad_http_request_duration_seconds_count{{{route}}}")
        ),
        polls
    );
    assert_eq!(
        sample(
            &text,
            r#"qlorad_http_requests_total{route="/jobs/{id}",method="GET",status="404"}"#
        ),
        1.0
    );
    assert!(text.contains("# TYPE qlorad_http_request_duration_seconds histogram"));

    let (status, doc) = get(&c, format!("{}/openapi.json", s.base)).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for (path, method) in [
        ("/files", "post"),
        ("/jobs", "post"),
        ("/jobs/{id}/events", "get"),
        ("/jobs/{id}/artifacts/{name}", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/", "get"),
        ("/v1/files", "post"),
        ("/v1/files/{file_id}/content", "get"),
        ("/v1/fine_tuning/jobs", "post"),
        ("/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel", "post"),
        ("/v1/fine_tuning/jobs/{fine_tuning_job_id}/events", "get"),
        (
            "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
            "get",
        ),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
    let schemas = &doc["components"]["schemas"];
    for name in [
        "JobSpec",
        "JobRow",
        "V1Job",
        "V1File",
        "V1Event",
        "V1Checkpoint",
        "ErrorBody",
    ] {
        assert!(schemas[name].is_object(), "{name}");
    }
    // A stored job's spec is documented as the spec itself.
    assert_eq!(
        schemas["JobRow"]["properties"]["spec"]["$ref"],
        "#/components/schemas/JobSpec"
    );

    let page = c.get(format!("{}/", s.base)).send().await.unwrap();
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("/dashboard/app.js"));
    let js = c
        .get(format!("{}/dashboard/app.js", s.base))
        .send()
        .await
        .unwrap();
    assert!(js.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    // The event stream is read with fetch, so the API key can go in a header.
    let js = js.text().await.unwrap();
    assert!(js.contains("text/event-stream") && js.contains("Bearer"));
    // The winning checkpoint is marked and each checkpoint can start a new job
    // (scripts/check_dashboard.py clicks through it in Chromium).
    assert!(js.contains("best_step") && js.contains("#/new?from="));
    // The new-job form estimates through the dry run.
    assert!(js.contains("/jobs?dry_run=true"));
    let (status, _) = get(&c, format!("{}/dashboard/nope.js", s.base)).await;
    assert_eq!(status, 404);
}

/// Per-step training losses of a job, from `/v1/.../events` (oldest first).
async fn v1_losses(c: &reqwest::Client, s: &Server, id: &str) -> Vec<f64> {
    let (_, ev) = get(
        c,
        format!("{}/v1/fine_tuning/jobs/{id}/events?limit=100", s.base),
    )
    .await;
    let mut steps: Vec<(i64, f64)> = ev["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "metrics" && e["data"]["train_loss"].is_number())
        .map(|e| {
            (
                e["data"]["step"].as_i64().unwrap(),
                e["data"]["train_loss"].as_f64().unwrap(),
            )
        })
        .collect();
    steps.sort_by_key(|s| s.0);
    steps.into_iter().map(|s| s.1).collect()
}

/// A job's `model` may be a succeeded job's `fine_tuned_model` or one of its checkpoints':
/// it trains on that job's base from that adapter. From the step-2 checkpoint of a run that
/// sees the whole dataset every step, the first loss is the source run's third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_continue_from_a_fine_tuned_model_or_its_checkpoint() {
    let s = start().await;
    let c = reqwest::Client::new();
    let file: Value = upload(&c, &s, &[("purpose", "fine-tune")])
        .await
        .json()
        .await
        .unwrap();
    let hp = json!({"max_steps": 3, "batch_size": 3, "learning_rate": 0.02, "warmup_ratio": 0.0});
    let create = |model: String, lora: Value| {
        let body = json!({"model": model, "training_file": file["id"], "hyperparameters": hp,
            "lora": lora, "checkpoint_every": 1});
        let (c, url) = (c.clone(), format!("{}/jobs", s.base));
        async move {
            let r = c.post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, a) = create("tiny".into(), json!({"r": 4, "alpha": 8, "dropout": 0.0})).await;
    assert_eq!(status, 201, "{a}");
    let a_id = a["id"].as_str().unwrap().to_string();
    let a_job = wait_status(&c, &s, &a_id, "succeeded").await;
    let a_losses = v1_losses(&c, &s, &a_id).await;
    assert_eq!(a_losses.len(), 3);
    let (_, ckpts) = get(
        &c,
        format!("{}/v1/fine_tuning/jobs/{a_id}/checkpoints", s.base),
    )
    .await;
    let step2 = ckpts["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["step_number"] == 2)
        .expect("a checkpoint at step 2");
    let from_ckpt = step2["fine_tuned_model_checkpoint"].as_str().unwrap();
    let (status, b) = create(from_ckpt.into(), json!({"dropout": 0.0})).await;
    assert_eq!(status, 201, "{b}");
    let b_id = b["id"].as_str().unwrap().to_string();
    let b_job = wait_status(&c, &s, &b_id, "succeeded").await;
    let b_losses = v1_losses(&c, &s, &b_id).await;
    assert!(
        (b_losses[0] - a_losses[2]).abs() <= 1e-5 * a_losses[2],
        "continued from step 2: {b_losses:?} vs the source's {a_losses:?}"
    );
    // Named after the base it started from, not the chain.
    let b_name = b_job["fine_tuned_model"].as_str().unwrap();
    assert!(
        b_name.starts_with("ft:tiny:qlorad:") && b_name.ends_with(&b_id),
        "{b_name}"
    );

    // The whole fine-tuned model continues too, past where its job stopped.
    let from_final = a_job["fine_tuned_model"].as_str().unwrap().to_string();
    let (status, d) = create(from_final.clone(), json!({"dropout": 0.0})).await;
    assert_eq!(status, 201, "{d}");
    let d_id = d["id"].as_str().unwrap().to_string();
    wait_status(&c, &s, &d_id, "succeeded").await;
    let d_losses = v1_losses(&c, &s, &d_id).await;
    assert!(d_losses[0] < a_losses[2], "{d_losses:?} vs {a_losses:?}");

    // A changed LoRA shape, a checkpoint no longer kept and an unknown job are clear errors.
    let (status, e) = create(from_final.clone(), json!({"r": 8})).await;
    assert_eq!(status, 422, "{e}");
    assert_eq!(e["error"]["param"], "lora.r", "{e}");
    let gone = format!(
        "{}:ckpt-step-99",
        a_job["fine_tuned_model"].as_str().unwrap()
    );
    let (status, e) = create(gone, json!({})).await;
    assert_eq!(status, 400, "{e}");
    assert_error(&e, Some("model"));
    assert!(
        e["error"]["message"].as_str().unwrap().contains("step 99"),
        "{e}"
    );
    let (status, e) = create("ft:tiny:qlorad::job-nope".into(), json!({})).await;
    assert_eq!(status, 400, "{e}");
    assert_error(&e, Some("model"));
}

/// Two OpenAI preference records: a house style ("..., sir.") preferred over a plain answer.
const PAIRS: &str = concat!(
    r#"{"input": {"messages": [{"role": "user", "content": "Capital of France?"}]}, "preferred_output": [{"role": "assistant", "content": "Paris, sir."}], "non_preferred_output": [{"role": "assistant", "content": "paris"}]}"#,
    "\n",
    r#"{"input": {"messages": [{"role": "user", "content": "Say hello."}]}, "preferred_output": [{"role": "assistant", "content": "Good day, sir."}], "non_preferred_output": [{"role": "assistant", "content": "hi"}]}"#,
    "\n",
);

/// The common flow: supervised fine-tuning, then DPO from its fine-tuned model on OpenAI's
/// preference records, with `method` as OpenAI writes it; the metrics are TRL's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dpo_job_continues_a_supervised_one_from_openai_preference_records() {
    let s = start().await;
    let c = reqwest::Client::new();
    let r = upload(&c, &s, &[("purpose", "fine-tune")]).await;
    let sft_file = r.json::<Value>().await.unwrap()["id"].clone();
    let (ct, body) = multipart(&[("purpose", "fine-tune")], PAIRS);
    let r = c
        .post(format!("{}/v1/files", s.base))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let pairs_file = r.json::<Value>().await.unwrap()["id"].clone();

    // Pairs in a supervised job, chat records in a DPO job: refused up front, naming the field.
    let jobs = format!("{}/v1/fine_tuning/jobs", s.base);
    let dpo = json!({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 2}}});
    let (status, body) = post(
        &c,
        jobs.clone(),
        json!({"model": "tiny", "training_file": pairs_file}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_error(&body, Some("training_file"));
    let (status, body) = post(
        &c,
        jobs.clone(),
        json!({"model": "tiny", "training_file": sft_file, "method": dpo}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_error(&body, Some("training_file"));

    let (status, sft) = post(
        &c,
        jobs.clone(),
        json!({"model": "tiny", "training_file": sft_file, "suffix": "sft",
               "hyperparameters": {"max_steps": 2}, "lora": {"r": 4}}),
    )
    .await;
    assert_eq!(status, 200, "{sft}");
    let sft = wait_status(&c, &s, sft["id"].as_str().unwrap(), "succeeded").await;
    let (status, job) = post(
        &c,
        jobs.clone(),
        json!({"model": sft["fine_tuned_model"], "training_file": pairs_file, "method": dpo,
               "hyperparameters": {"max_steps": 3}}),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(
        job["method"],
        json!({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 1.0}}})
    );
    let id = job["id"].as_str().unwrap().to_string();
    let done = wait_status(&c, &s, &id, "succeeded").await;
    assert!(done["fine_tuned_model"]
        .as_str()
        .unwrap()
        .starts_with("ft:tiny:"));
    let (_, events) = get(&c, format!("{jobs}/{id}/events?limit=100")).await;
    let events = events["data"].as_array().unwrap();
    let metrics: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "metrics")
        .map(|e| &e["data"])
        .collect();
    assert_eq!(metrics.len(), 3, "{events:?}");
    // The first step's policy is its reference: loss log 2, no reward yet.
    let first = metrics.iter().find(|m| m["step"] == 1).unwrap();
    assert!((first["train_loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-5);
    assert_eq!(first["rewards/margins"], 0.0);
    for m in &metrics {
        for k in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ] {
            assert!(m[k].is_number(), "{k} missing in {m}");
        }
    }
    assert!(events.iter().any(|e| e["message"]
        == "reference log-probabilities of 2 pairs computed from the starting model"));
}
