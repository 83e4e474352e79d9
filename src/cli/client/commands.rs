//! `qlorad jobs create|list|get|watch|cancel|download` and `qlorad files upload|list`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::sse::SseParser;
use super::{io_err, segment, Client, ClientError, Result};

#[derive(Debug, clap::Subcommand)]
pub enum JobsCommand {
    /// Create a fine-tune job (uploading the training file first if it is a local path).
    Create {
        /// A base model name from `GET /models`.
        #[arg(long)]
        model: String,
        /// A file id (`file-...`) or a local dataset to upload.
        #[arg(long)]
        training_file: String,
        /// A file id or a local dataset to upload.
        #[arg(long)]
        validation_file: Option<String>,
        /// A job spec (JSON) to start from; the flags below override it.
        #[arg(long)]
        spec: Option<PathBuf>,
        #[arg(long)]
        max_steps: Option<u64>,
        #[arg(long)]
        epochs: Option<u64>,
        #[arg(long)]
        batch_size: Option<u64>,
        #[arg(long)]
        learning_rate: Option<f64>,
        /// LoRA rank.
        #[arg(long)]
        lora_r: Option<u64>,
        #[arg(long)]
        checkpoint_every: Option<u64>,
        /// GGUF types to export when done, comma-separated (f16, q8_0, q4_k_m, ...).
        #[arg(long, value_delimiter = ',')]
        gguf: Vec<String>,
        /// Follow the job until it ends.
        #[arg(long)]
        watch: bool,
        /// Check the job as a create does and print its estimate (examples, tokens, steps, peak
        /// memory on each worker device, time) without creating it.
        #[arg(long, conflicts_with = "watch")]
        dry_run: bool,
    },
    /// List jobs, newest first.
    List {
        /// queued, running, succeeded, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// The last job id of the previous page.
        #[arg(long)]
        after: Option<String>,
    },
    /// Show a job as JSON.
    Get { id: String },
    /// Follow a job's events with a progress bar until it ends.
    Watch { id: String },
    /// Cancel a queued, running or paused job.
    Cancel { id: String },
    /// Pause a queued or running job: it checkpoints and releases its worker.
    Pause { id: String },
    /// Queue a paused job again; it continues from its checkpoint.
    Resume { id: String },
    /// Download a job's artifacts (all, or those named), resuming partial files.
    Download {
        id: String,
        /// Artifact names (as `jobs get` lists them); all when none are given.
        names: Vec<String>,
        /// Directory to write into.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum FilesCommand {
    /// Upload a dataset (JSONL or a JSON array); it is validated before it is stored.
    Upload {
        path: PathBuf,
        /// alpaca, chat, sharegpt, completion or text (detected when absent).
        #[arg(long)]
        format: Option<String>,
        /// Count tokens with this model's tokenizer.
        #[arg(long)]
        model: Option<String>,
    },
    /// List uploaded files.
    List,
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn opt_num(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// A file id as is; a local path is uploaded first.
async fn file_id(client: &Client, arg: &str) -> Result<String> {
    let path = Path::new(arg);
    if arg.starts_with("file-") && !path.exists() {
        return Ok(arg.to_string());
    }
    if !path.is_file() {
        return Err(ClientError::Invalid(format!(
            "{arg:?} is neither a file id (file-...) nor a local file"
        )));
    }
    let f = client.upload(path, None, None).await?;
    eprintln!(
        "uploaded {} as {} ({} examples, {})",
        path.display(),
        f["id"].as_str().unwrap_or_default(),
        f["examples"],
        f["format"].as_str().unwrap_or_default()
    );
    Ok(f["id"].as_str().unwrap_or_default().to_string())
}

/// Run a `qlorad jobs` command against `server`.
pub async fn jobs(server: &str, api_key: Option<String>, cmd: JobsCommand) -> Result<()> {
    let client = Client::new(server).with_api_key(api_key);
    match cmd {
        JobsCommand::Create {
            model,
            training_file,
            validation_file,
            spec,
            max_steps,
            epochs,
            batch_size,
            learning_rate,
            lora_r,
            checkpoint_every,
            gguf,
            watch,
            dry_run,
        } => {
            let mut body: Value = match &spec {
                Some(p) => {
                    let text = std::fs::read_to_string(p).map_err(io_err(p))?;
                    serde_json::from_str(&text)
                        .map_err(|e| ClientError::Invalid(format!("{}: {e}", p.display())))?
                }
                None => json!({}),
            };
            if !body.is_object() {
                return Err(ClientError::Invalid(
                    "the spec must be a JSON object".into(),
                ));
            }
            body["model"] = json!(model);
            body["training_file"] = json!(file_id(&client, &training_file).await?);
            if let Some(v) = &validation_file {
                body["validation_file"] = json!(file_id(&client, v).await?);
            }
            let mut set = |section: &str, key: &str, v: Option<Value>| {
                if let Some(v) = v {
                    if !body[section].is_object() {
                        body[section] = json!({});
                    }
                    body[section][key] = v;
                }
            };
            set("hyperparameters", "max_steps", max_steps.map(Value::from));
            set("hyperparameters", "n_epochs", epochs.map(Value::from));
            set("hyperparameters", "batch_size", batch_size.map(Value::from));
            set(
                "hyperparameters",
                "learning_rate",
                learning_rate.map(Value::from),
            );
            set("lora", "r", lora_r.map(Value::from));
            set(
                "export",
                "gguf",
                (!gguf.is_empty()).then(|| Value::from(gguf.clone())),
            );
            if let Some(n) = checkpoint_every {
                body["checkpoint_every"] = json!(n);
            }
            if dry_run {
                let p: Value = client
                    .json(client.post("/jobs?dry_run=true").json(&body))
                    .await?;
                println!("{}", pretty(&p));
                return Ok(());
            }
            let job: Value = client.json(client.post("/jobs").json(&body)).await?;
            let id = job["id"].as_str().unwrap_or_default().to_string();
            println!("{id}");
            if watch {
                finish(watch_job(&client, &id).await?)?;
            }
        }
        JobsCommand::List {
            status,
            limit,
            after,
        } => {
            let mut q = vec![("limit", limit.to_string())];
            q.extend(status.map(|s| ("status", s)));
            q.extend(after.map(|a| ("after", a)));
            let page: Value = client.json(client.get("/jobs").query(&q)).await?;
            println!(
                "{:<38} {:<10} {:<16} {:>13} {:>9}",
                "ID", "STATUS", "MODEL", "STEP", "LOSS"
            );
            for j in page["data"].as_array().into_iter().flatten() {
                let p = &j["progress"];
                let steps = format!(
                    "{}/{}",
                    p["step"],
                    p["total_steps"]
                        .as_i64()
                        .map_or("?".into(), |t| t.to_string())
                );
                println!(
                    "{:<38} {:<10} {:<16} {:>13} {:>9}",
                    j["id"].as_str().unwrap_or_default(),
                    j["status"].as_str().unwrap_or_default(),
                    j["spec"]["model"].as_str().unwrap_or_default(),
                    steps,
                    opt_num(&p["last_loss"], 4)
                );
            }
            if page["has_more"] == json!(true) {
                let last = page["data"]
                    .as_array()
                    .and_then(|d| d.last())
                    .and_then(|j| j["id"].as_str())
                    .unwrap_or_default();
                eprintln!("more: --after {last}");
            }
        }
        JobsCommand::Get { id } => {
            let job: Value = client
                .json(client.get(&format!("/jobs/{}", segment(&id))))
                .await?;
            let arts: Value = client
                .json(client.get(&format!("/jobs/{}/artifacts", segment(&id))))
                .await?;
            let mut job = job;
            job["artifacts"] = arts["data"].clone();
            println!("{}", pretty(&job));
        }
        JobsCommand::Watch { id } => finish(watch_job(&client, &id).await?)?,
        JobsCommand::Cancel { id } => post_action(&client, &id, "cancel").await?,
        JobsCommand::Pause { id } => post_action(&client, &id, "pause").await?,
        JobsCommand::Resume { id } => post_action(&client, &id, "resume").await?,
        JobsCommand::Download { id, names, out } => download(&client, &id, &names, &out).await?,
    }
    Ok(())
}

/// A job that did not succeed is an error (a non-zero exit).
/// `POST /jobs/{id}/<action>` (cancel, pause, resume), printing the job's status after it.
async fn post_action(client: &Client, id: &str, action: &str) -> Result<()> {
    let job: Value = client
        .json(client.post(&format!("/jobs/{}/{action}", segment(id))))
        .await?;
    println!("{} {}", id, job["status"].as_str().unwrap_or_default());
    Ok(())
}

fn finish(status: String) -> Result<()> {
    if status == "succeeded" {
        Ok(())
    } else {
        Err(ClientError::Invalid(format!("the job ended {status}")))
    }
}

fn is_final(s: &str) -> bool {
    matches!(s, "succeeded" | "failed" | "cancelled")
}

/// Follow the job's SSE stream (reconnecting from the last event seen) until it ends; returns
/// the final status.
pub async fn watch_job(client: &Client, id: &str) -> Result<String> {
    let path = format!("/jobs/{}", segment(id));
    let job: Value = client.json(client.get(&path)).await?;
    let bar = ProgressBar::new(job["progress"]["total_steps"].as_u64().unwrap_or(0)).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .expect("static template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut last: Option<String> = None;
    let mut status = job["status"].as_str().unwrap_or_default().to_string();
    let mut drained = false;
    loop {
        let mut req = client
            .get(&format!("{path}/events"))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(l) = &last {
            req = req.header("Last-Event-ID", l.as_str());
        }
        let resp = client.send(req).await?;
        let mut stream = resp.bytes_stream();
        let mut parser = SseParser::default();
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { break };
            for m in parser.push(&chunk) {
                last = m.id.clone().or(last);
                let Ok(e) = serde_json::from_str::<Value>(&m.data) else {
                    continue;
                };
                let d = &e["data"];
                match e["type"].as_str().unwrap_or_default() {
                    "metrics" if d["loss"].is_number() => {
                        if let Some(t) = d["total_steps"].as_u64() {
                            bar.set_length(t);
                        }
                        bar.set_position(d["step"].as_u64().unwrap_or(0));
                        bar.set_message(format!(
                            "loss {}  lr {:.2e}  {} tok/s",
                            opt_num(&d["loss"], 4),
                            d["learning_rate"].as_f64().unwrap_or(0.0),
                            opt_num(&d["tokens_per_second"], 0)
                        ));
                    }
                    "status" => {
                        status = d["status"].as_str().unwrap_or_default().to_string();
                        bar.println(e["message"].as_str().unwrap_or_default());
                    }
                    _ => bar.println(format!(
                        "[{}] {}",
                        e["type"].as_str().unwrap_or_default(),
                        e["message"].as_str().unwrap_or_default()
                    )),
                }
            }
        }
        if is_final(&status) {
            break;
        }
        // The stream broke off (a restart, the network): look, then pick up where it left. A
        // job that has ended gets one more pass to drain its last events.
        let job: Value = client.json(client.get(&path)).await?;
        if is_final(job["status"].as_str().unwrap_or_default()) {
            if drained {
                status = job["status"].as_str().unwrap_or_default().to_string();
                break;
            }
            drained = true;
        } else {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    bar.finish_and_clear();
    println!("{id} {status}");
    Ok(status)
}

async fn sha256_of(path: &Path) -> Result<String> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<String> {
        let mut f = std::fs::File::open(&p).map_err(io_err(&p))?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h).map_err(io_err(&p))?;
        Ok(format!("{:x}", h.finalize()))
    })
    .await
    .map_err(|e| ClientError::Invalid(e.to_string()))?
}

/// Download artifacts into `out`, resuming a shorter local copy with a Range request and
/// checking every file's sha256.
async fn download(client: &Client, id: &str, names: &[String], out: &Path) -> Result<()> {
    let list: Value = client
        .json(client.get(&format!("/jobs/{}/artifacts", segment(id))))
        .await?;
    let all = list["data"].as_array().cloned().unwrap_or_default();
    for n in names {
        if !all.iter().any(|a| a["name"] == json!(n)) {
            return Err(ClientError::Invalid(format!(
                "job {id} has no artifact {n:?}"
            )));
        }
    }
    for a in all
        .iter()
        .filter(|a| names.is_empty() || names.iter().any(|n| a["name"] == json!(n)))
    {
        let name = a["name"].as_str().unwrap_or_default();
        let bytes = a["bytes"].as_u64().unwrap_or(0);
        let sha = a["sha256"].as_str().unwrap_or_default();
        if name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(ClientError::Invalid(format!(
                "unsafe artifact name {name:?}"
            )));
        }
        let dest = out.join(name);
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io_err(parent))?;
        }
        let have = tokio::fs::metadata(&dest)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if have == bytes && sha256_of(&dest).await? == sha {
            println!("{} (already here)", dest.display());
            continue;
        }
        let start = if have < bytes { have } else { 0 };
        let url_path = format!(
            "/jobs/{}/artifacts/{}",
            segment(id),
            name.split('/').map(segment).collect::<Vec<_>>().join("/")
        );
        let mut req = client.get(&url_path);
        if start > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={start}-"));
        }
        let resp = client.send(req).await?;
        let resumed = resp.status() == reqwest::StatusCode::PARTIAL_CONTENT;
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(&dest)
            .await
            .map_err(io_err(&dest))?;
        let bar = ProgressBar::new(bytes).with_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}")
                .expect("static template"),
        );
        bar.set_message(name.to_string());
        bar.set_position(if resumed { start } else { 0 });
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| ClientError::Http {
                url: url_path.clone(),
                source,
            })?;
            f.write_all(&chunk).await.map_err(io_err(&dest))?;
            bar.inc(chunk.len() as u64);
        }
        f.flush().await.map_err(io_err(&dest))?;
        bar.finish_and_clear();
        if sha256_of(&dest).await? != sha {
            return Err(ClientError::Invalid(format!(
                "{}: sha256 does not match the server's; delete it and download again",
                dest.display()
            )));
        }
        println!("{}", dest.display());
    }
    Ok(())
}

/// Run a `qlorad files` command against `server`.
pub async fn files(server: &str, api_key: Option<String>, cmd: FilesCommand) -> Result<()> {
    let client = Client::new(server).with_api_key(api_key);
    match cmd {
        FilesCommand::Upload {
            path,
            format,
            model,
        } => {
            let f = client
                .upload(&path, format.as_deref(), model.as_deref())
                .await?;
            println!("{}", pretty(&f));
        }
        FilesCommand::List => {
            let page: Value = client.json(client.get("/files")).await?;
            println!(
                "{:<38} {:<10} {:>9} {:>11}  NAME",
                "ID", "FORMAT", "EXAMPLES", "BYTES"
            );
            for f in page["data"].as_array().into_iter().flatten() {
                println!(
                    "{:<38} {:<10} {:>9} {:>11}  {}",
                    f["id"].as_str().unwrap_or_default(),
                    f["format"].as_str().unwrap_or_default(),
                    f["examples"].to_string(),
                    f["bytes"].to_string(),
                    f["filename"].as_str().unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}
