//! `GET /metrics` in the Prometheus text format: jobs by status, queue depth, per-worker
//! throughput, GPU memory (with the `cuda` feature), and HTTP request counts and latency
//! histograms by route template, method and status.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiResult, AppState, ErrorBody};
use crate::jobs::stats::WorkerStat;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default, Clone)]
struct Series {
    count: u64,
    sum: f64,
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    buckets: [u64; BUCKETS.len() + 1],
}

/// (route template, method, status).
type SeriesKey = (String, String, u16);

/// Request counts and latencies by (route template, method, status).
#[derive(Clone, Default)]
pub struct HttpMetrics {
    series: Arc<Mutex<BTreeMap<SeriesKey, Series>>>,
}

/// A per-worker metric: name, type, help, and the value of one worker's numbers.
type WorkerMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&WorkerStat) -> String,
);

impl HttpMetrics {
    pub fn observe(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let mut m = self.series.lock().expect("metrics lock");
        let s = m
            .entry((route.to_string(), method.to_string(), status))
            .or_default();
        s.count += 1;
        s.sum += seconds;
        let i = BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BUCKETS.len());
        s.buckets[i] += 1;
    }

    fn render(&self, out: &mut String) {
        let m = self.series.lock().expect("metrics lock").clone();
        header(
            out,
            "qlorad_http_requests_total",
            "counter",
            "HTTP requests.",
        );
        for ((route, method, status), s) in &m {
            let labels = format!(
                "route=\"{}\",method=\"{}\",status=\"{status}\"",
                escape(route),
                escape(method)
            );
            let _ = writeln!(out, "qlorad_http_requests_total{{{labels}}} {}", s.count);
        }
        header(
            out,
            "qlorad_http_request_duration_seconds",
            "histogram",
            "Time to the response head (a stream's body is not counted).",
        );
        for ((route, method, status), s) in &m {
            let labels = format!(
                "route=\"{}\",method=\"{}\",status=\"{status}\"",
                escape(route),
                escape(method)
            );
            let mut cumulative = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cumulative += s.buckets[i];
                let _ = writeln!(
                    out,
                    "qlorad_http_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "qlorad_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                s.count
            );
            let _ = writeln!(
                out,
                "qlorad_http_request_duration_seconds_sum{{{labels}}} {}",
                s.sum
            );
            let _ = writeln!(
                out,
                "qlorad_http_request_duration_seconds_count{{{labels}}} {}",
                s.count
            );
        }
    }
}

/// Middleware: time every request and count it under its route template (`/jobs/{id}`), so
/// ids do not explode the label space; requests no route matched count as `unmatched`.
pub async fn track_requests(
    State(metrics): State<HttpMetrics>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let t0 = Instant::now();
    let resp = next.run(req).await;
    metrics.observe(
        &route,
        &method,
        resp.status().as_u16(),
        t0.elapsed().as_secs_f64(),
    );
    resp
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The service's metrics.
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String),
        (status = 500, body = ErrorBody)))]
pub async fn metrics_get(State(state): State<AppState>) -> ApiResult<Response> {
    let mut out = String::new();
    let counts = state.jobs.store.count_by_status().await?;
    header(&mut out, "qlorad_jobs", "gauge", "Jobs by status.");
    for (status, n) in &counts {
        let _ = writeln!(out, "qlorad_jobs{{status=\"{}\"}} {n}", status.as_str());
    }
    let queued = counts
        .iter()
        .find(|(s, _)| *s == crate::jobs::Status::Queued)
        .map_or(0, |c| c.1);
    header(
        &mut out,
        "qlorad_queue_depth",
        "gauge",
        "Jobs waiting for a worker.",
    );
    let _ = writeln!(out, "qlorad_queue_depth {queued}");

    let workers = state.jobs.workers.stats.snapshot();
    let per_worker: [WorkerMetric; 5] = [
        (
            "qlorad_worker_busy",
            "gauge",
            "1 while the worker runs a job.",
            |s| u8::from(s.job.is_some()).to_string(),
        ),
        (
            "qlorad_worker_steps_per_second",
            "gauge",
            "Optimizer steps per second of the worker's current run.",
            |s| s.steps_per_second.to_string(),
        ),
        (
            "qlorad_worker_tokens_per_second",
            "gauge",
            "Training tokens per second of the worker's current run.",
            |s| s.tokens_per_second.to_string(),
        ),
        (
            "qlorad_worker_steps_total",
            "counter",
            "Optimizer steps the worker has run.",
            |s| s.steps_total.to_string(),
        ),
        (
            "qlorad_worker_tokens_total",
            "counter",
            "Training tokens the worker has processed.",
            |s| s.tokens_total.to_string(),
        ),
    ];
    for (name, kind, help, value) in per_worker {
        header(&mut out, name, kind, help);
        for (worker, s) in &workers {
            let _ = writeln!(
                out,
                "{name}{{worker=\"{}\",device=\"{}\"}} {}",
                escape(worker),
                escape(&s.device),
                value(s)
            );
        }
    }
    #[cfg(feature = "cuda")]
    gpu_memory(&state, &mut out);
    state.http_metrics.render(&mut out);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response())
}

/// Used and total memory of each CUDA device a worker uses.
#[cfg(feature = "cuda")]
fn gpu_memory(state: &AppState, out: &mut String) {
    let mut ordinals: Vec<usize> = state
        .config
        .workers
        .devices
        .iter()
        .filter_map(|d| d.strip_prefix("cuda:")?.parse().ok())
        .collect();
    ordinals.sort_unstable();
    ordinals.dedup();
    let readings: Vec<(usize, (u64, u64))> = ordinals
        .into_iter()
        .filter_map(|o| Some((o, crate::jobs::stats::gpu_memory(o)?)))
        .collect();
    header(
        out,
        "qlorad_gpu_memory_used_bytes",
        "gauge",
        "GPU memory in use.",
    );
    for (o, (used, _)) in &readings {
        let _ = writeln!(
            out,
            "qlorad_gpu_memory_used_bytes{{device=\"cuda:{o}\"}} {used}"
        );
    }
    header(
        out,
        "qlorad_gpu_memory_total_bytes",
        "gauge",
        "GPU memory in all.",
    );
    for (o, (_, total)) in &readings {
        let _ = writeln!(
            out,
            "qlorad_gpu_memory_total_bytes{{device=\"cuda:{o}\"}} {total}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let m = HttpMetrics::default();
        m.observe("/jobs/{id}", "GET", 200, 0.003);
        m.observe("/jobs/{id}", "GET", 200, 0.2);
        m.observe("/x\"y", "GET", 404, 20.0);
        let mut out = String::new();
        m.render(&mut out);
        let l = r#"route="/jobs/{id}",method="GET",status="200""#;
        assert!(
            out.contains(&format!("qlorad_http_requests_total{{{l}}} 2")),
            "{out}"
        );
        assert!(
            out.contains(&format!("_bucket{{{l},le=\"0.001\"}} 0")),
            "{out}"
        );
        assert!(
            out.contains(&format!("_bucket{{{l},le=\"0.005\"}} 1")),
            "{out}"
        );
        assert!(
            out.contains(&format!("_bucket{{{l},le=\"0.25\"}} 2")),
            "{out}"
        );
        assert!(
            out.contains(&format!("_bucket{{{l},le=\"+Inf\"}} 2")),
            "{out}"
        );
        assert!(out.contains(r#"route="/x\"y""#), "{out}");
        assert!(out.contains(r#"status="404",le="10"} 0"#), "{out}");
    }
}
