//! Many SSE subscribers on one job: server memory per subscriber and fan-out delay.
//!
//! qlorad serve ... & ; then, with a running job:
//! cargo run --release --example sse_load -- http://127.0.0.1:8080 JOB_ID SERVER_PID [SUBSCRIBERS]
//!
//! Prints the server's resident memory before and after the subscribers connect, and for each
//! event the spread between the first and the last subscriber receiving it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;

fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (base, job, pid) = (args[0].clone(), args[1].clone(), args[2].clone());
    let n: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    // Subscribe from the current end of the log, so only live events are timed.
    let page: serde_json::Value = client
        .get(format!("{base}/jobs/{job}/events?limit=1000"))
        .send()
        .await?
        .json()
        .await?;
    let last = page["data"]
        .as_array()
        .and_then(|a| a.last())
        .and_then(|e| e["seq"].as_i64())
        .unwrap_or(0);
    let before = rss_kib(&pid);
    let seen: Arc<Mutex<HashMap<i64, Vec<Instant>>>> = Arc::default();
    let connected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (client, url, seen, connected) = (
            client.clone(),
            format!("{base}/jobs/{job}/events"),
            seen.clone(),
            connected.clone(),
        );
        let last = last.to_string();
        tasks.push(tokio::spawn(async move {
            let resp = client
                .get(url)
                .header("accept", "text/event-stream")
                .header("last-event-id", last)
                .send()
                .await?;
            connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut body = resp.bytes_stream();
            let mut buf = String::new();
            while let Some(chunk) = body.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk?));
                while let Some(i) = buf.find("\n\n") {
                    let frame: String = buf.drain(..i + 2).collect();
                    if let Some(id) = frame
                        .lines()
                        .find_map(|l| l.strip_prefix("id: "))
                        .and_then(|s| s.parse::<i64>().ok())
                    {
                        seen.lock()
                            .unwrap()
                            .entry(id)
                            .or_default()
                            .push(Instant::now());
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    while connected.load(std::sync::atomic::Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(&pid);
    println!(
        "{n} subscribers: server RSS {} KiB -> {} KiB, {:.1} KiB per subscriber",
        before,
        after,
        (after as f64 - before as f64) / n as f64
    );
    for t in tasks {
        let _ = t.await;
    }
    let seen = seen.lock().unwrap();
    let mut spreads: Vec<f64> = seen
        .values()
        .filter(|v| v.len() == n)
        .map(|v| (*v.iter().max().unwrap() - *v.iter().min().unwrap()).as_secs_f64() * 1000.0)
        .collect();
    spreads.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if !spreads.is_empty() {
        let p = |q: f64| spreads[((spreads.len() - 1) as f64 * q) as usize];
        println!("{} events delivered to all {n}: fan-out spread p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms", spreads.len(), p(0.5), p(0.99), p(1.0));
    }
    Ok(())
}
