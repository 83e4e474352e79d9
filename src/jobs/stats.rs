//! Live worker throughput for `/metrics`: what each worker is running and how fast, updated by
//! the worker as steps arrive; GPU memory of the configured CUDA devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One worker's current numbers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerStat {
    /// `cpu`, `cuda:0`, ...
    pub device: String,
    /// The job it runs, if any.
    pub job: Option<String>,
    /// Optimizer steps per second over the current run (0 when idle).
    pub steps_per_second: f64,
    /// Training tokens per second over the current run (0 when idle).
    pub tokens_per_second: f64,
    /// Steps and tokens since the process started.
    pub steps_total: u64,
    pub tokens_total: u64,
}

/// Every worker's numbers by worker name (`cpu#0`), shared by the workers and the API.
#[derive(Clone, Default)]
pub struct WorkerStats {
    inner: Arc<Mutex<BTreeMap<String, WorkerStat>>>,
}

impl WorkerStats {
    pub fn register(&self, worker: &str, device: &str) {
        let mut m = self.inner.lock().expect("stats lock");
        m.entry(worker.to_string()).or_default().device = device.to_string();
    }

    pub fn snapshot(&self) -> Vec<(String, WorkerStat)> {
        let m = self.inner.lock().expect("stats lock");
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn update(&self, worker: &str, f: impl FnOnce(&mut WorkerStat)) {
        let mut m = self.inner.lock().expect("stats lock");
        f(m.entry(worker.to_string()).or_default());
    }
}

/// Tracks one run of one job on one worker and keeps its `WorkerStat` current.
pub struct RunMeter {
    stats: WorkerStats,
    worker: String,
    started: Option<(Instant, usize)>,
}

impl RunMeter {
    pub fn new(stats: &WorkerStats, worker: &str, job: &str) -> Self {
        stats.update(worker, |s| {
            s.job = Some(job.to_string());
            s.steps_per_second = 0.0;
            s.tokens_per_second = 0.0;
        });
        RunMeter {
            stats: stats.clone(),
            worker: worker.to_string(),
            started: None,
        }
    }

    /// Training began at `start_step` (after a resume, not 0).
    pub fn started(&mut self, start_step: usize) {
        self.started = Some((Instant::now(), start_step));
    }

    pub fn step(&mut self, step: usize, tokens: usize, tokens_per_second: f64) {
        let (t0, first) = *self
            .started
            .get_or_insert((Instant::now(), step.saturating_sub(1)));
        let elapsed = t0.elapsed().as_secs_f64();
        let steps_per_second = if elapsed > 0.0 {
            step.saturating_sub(first) as f64 / elapsed
        } else {
            0.0
        };
        self.stats.update(&self.worker, |s| {
            s.steps_per_second = steps_per_second;
            s.tokens_per_second = tokens_per_second;
            s.steps_total += 1;
            s.tokens_total += tokens as u64;
        });
    }
}

impl Drop for RunMeter {
    fn drop(&mut self) {
        self.stats.update(&self.worker, |s| {
            s.job = None;
            s.steps_per_second = 0.0;
            s.tokens_per_second = 0.0;
        });
    }
}

/// `(used, total)` bytes of a CUDA device, or None when it cannot be queried.
#[cfg(feature = "cuda")]
pub fn gpu_memory(ordinal: usize) -> Option<(u64, u64)> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    let ctx = CudaContext::new(ordinal).ok()?;
    let (free, total) = ctx.mem_get_info().ok()?;
    Some(((total - free) as u64, total as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_reports_while_it_lasts() {
        let stats = WorkerStats::default();
        stats.register("cpu#0", "cpu");
        {
            let mut m = RunMeter::new(&stats, "cpu#0", "job-1");
            m.started(0);
            m.step(1, 100, 50.0);
            m.step(2, 120, 55.0);
            let (_, s) = &stats.snapshot()[0];
            assert_eq!(s.job.as_deref(), Some("job-1"));
            assert_eq!((s.steps_total, s.tokens_total), (2, 220));
            assert_eq!(s.tokens_per_second, 55.0);
            assert!(s.steps_per_second > 0.0);
        }
        let (name, s) = &stats.snapshot()[0];
        assert_eq!((name.as_str(), s.device.as_str()), ("cpu#0", "cpu"));
        assert_eq!((s.job.as_ref(), s.steps_per_second), (None, 0.0));
        assert_eq!(s.steps_total, 2);
    }
}
