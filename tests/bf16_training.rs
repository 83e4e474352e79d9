//! bf16 compute (the GPU recipe) tracks the f32 run: the fused ops' CPU twins compute what the
//! CUDA kernels do, so this checks the bf16 training path in CI, where no GPU is.

use qlorad::cli::bench::{bench_train, BenchArgs};
use qlorad::finetune::JobSpec;

fn losses(dtype: &str, qk_norm: bool) -> Vec<f64> {
    let spec = JobSpec::from_json(&format!(
        r#"{{"hyperparameters": {{"gradient_checkpointing": true, "warmup_ratio": 0.0,
             "learning_rate": 1e-3}},
            "lora": {{"r": 8, "alpha": 16, "dropout": 0.05}},
            "quantization": {{"compute_dtype": "{dtype}"}}}}"#
    ))
    .unwrap();
    let report = bench_train(&BenchArgs {
        model: None,
        qk_norm,
        seq_len: 48,
        batch_size: 2,
        steps: 3,
        spec,
        profile: false,
        profiler_range: false,
        lengths: None,
    })
    .unwrap();
    assert_eq!(report["compute_dtype"], dtype);
    assert!(report["tokens_per_second"].as_f64().unwrap() > 0.0);
    if cfg!(target_os = "linux") {
        let rss = report["peak_rss_gib"].as_f64().expect("peak RSS on Linux");
        assert!(rss > 0.0 && rss < 64.0, "peak RSS {rss} GiB");
    }
    report["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[test]
fn bf16_losses_track_f32_step_by_step() {
    for (arch, qk_norm) in [("llama", false), ("qwen3", true)] {
        let (f32_run, bf16_run) = (losses("f32", qk_norm), losses("bf16", qk_norm));
        assert_eq!(f32_run.len(), 5, "two warm-up steps and three timed");
        for (i, (a, b)) in f32_run.iter().zip(&bf16_run).enumerate() {
            assert!(a.is_finite() && b.is_finite());
            assert!(
                (a - b).abs() < 0.02 * a.abs(),
                "{arch}, step {i}: f32 {a}, bf16 {b}"
            );
        }
        // Training moved the loss (the same way in both).
        assert_ne!(f32_run[0], f32_run[4], "{arch}");
    }
}

/// `bench train --lengths` with packing: uneven examples packed into rows of `max_seq_len`,
/// throughput counted in trained tokens.
#[test]
fn bench_train_packs_uneven_lengths() {
    let spec = JobSpec::from_json(
        r#"{"hyperparameters": {"max_seq_len": 96, "warmup_ratio": 0.0}, "data": {"packing": true},
            "lora": {"r": 4}}"#,
    )
    .unwrap();
    let report = bench_train(&BenchArgs {
        model: None,
        qk_norm: false,
        seq_len: 96,
        batch_size: 1,
        steps: 2,
        spec,
        profile: false,
        profiler_range: false,
        lengths: Some(vec![10, 70, 25, 60, 33, 5, 90]),
    })
    .unwrap();
    let packing = &report["packing"];
    let (rows, examples) = (packing["rows"].as_u64().unwrap(), &packing["examples"]);
    assert_eq!(examples, &report["examples"]);
    assert!(
        rows >= 4 && packing["fill"].as_f64().unwrap() > 0.7,
        "{report}"
    );
    assert!(report["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(report["losses"].as_array().unwrap().len(), 4);
}
