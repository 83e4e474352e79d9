//! The command line end to end: train (with checkpoints, metrics and resume), eval, generate.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn qlorad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qlorad"))
        .args(args)
        .output()
        .expect("qlorad runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn setup(dir: &Path) {
    common::tiny_model(&dir.join("model"), "tok-chatml");
    let rows = [
        ("Capital of France?", "Paris."),
        ("Say hello.", "Hello!"),
        ("Boil time?", "Ninety seconds."),
    ];
    let lines: Vec<String> = rows
        .iter()
        .map(|(q, a)| serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string())
        .collect();
    std::fs::write(dir.join("data.jsonl"), lines.join("\n")).unwrap();
    let spec = serde_json::json!({
        "hyperparameters": {"max_steps": 6, "batch_size": 3, "learning_rate": 0.01, "warmup_ratio": 0.0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "checkpoint_every": 3
    });
    std::fs::write(dir.join("spec.json"), spec.to_string()).unwrap();
}

#[test]
fn train_eval_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    let p = |n: &str| d.join(n).display().to_string();
    let train = [
        "train",
        "--model",
        &p("model"),
        "--data",
        &p("data.jsonl"),
        "--validation",
        &p("data.jsonl"),
        "--out",
        &p("out"),
        "--spec",
        &p("spec.json"),
    ];
    let o = qlorad(&train);
    assert!(o.status.success(), "{}", text(&o));
    for f in [
        "out/checkpoint-3/adapter_model.safetensors",
        "out/checkpoint-6/trainer_state.json",
        "out/adapter/adapter_config.json",
        "out/spec.json",
    ] {
        assert!(d.join(f).exists(), "{f}");
    }
    let metrics = std::fs::read_to_string(d.join("out/metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<&serde_json::Value> = rows.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 6);
    for key in [
        "step",
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens",
        "epoch",
    ] {
        assert!(steps[0].get(key).is_some(), "metrics row has {key}");
    }
    assert!(rows.iter().any(|r| r.get("eval_loss").is_some()));

    // checkpoints exist: a plain rerun refuses, --resume continues (nothing left to do)
    let o = qlorad(&train);
    assert!(
        !o.status.success() && text(&o).contains("--resume"),
        "{}",
        text(&o)
    );
    let mut resume = train.to_vec();
    resume.push("--resume");
    let o = qlorad(&resume);
    assert!(
        o.status.success() && text(&o).contains("resumed"),
        "{}",
        text(&o)
    );
    let again = std::fs::read_to_string(d.join("out/metrics.jsonl")).unwrap();
    assert_eq!(again.lines().filter(|l| l.contains("\"loss\"")).count(), 6);

    let o = qlorad(&[
        "eval",
        "--model",
        &p("model"),
        "--adapter",
        &p("out/adapter"),
        "--data",
        &p("data.jsonl"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        r["loss"].as_f64().unwrap() > 0.0
            && r["tokens"].as_u64().unwrap() > 0
            && r.get("accuracy").is_some()
    );

    let o = qlorad(&[
        "generate",
        "--model",
        &p("model"),
        "--adapter",
        &p("out/adapter"),
        "--prompt",
        "Say hello.",
        "--chat",
        "--max-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn bad_specs_and_data_fail_with_the_field_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    let p = |n: &str| d.join(n).display().to_string();
    std::fs::write(
        d.join("bad.json"),
        r#"{"hyperparameters": {"learning_rat": 0.1}}"#,
    )
    .unwrap();
    let o = qlorad(&[
        "train",
        "--model",
        &p("model"),
        "--data",
        &p("data.jsonl"),
        "--out",
        &p("o"),
        "--spec",
        &p("bad.json"),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("learning_rat"),
        "{}",
        text(&o)
    );
    std::fs::write(d.join("bad.jsonl"), "{\"messages\": 3}\n").unwrap();
    let o = qlorad(&[
        "train",
        "--model",
        &p("model"),
        "--data",
        &p("bad.jsonl"),
        "--out",
        &p("o"),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("line 1") && text(&o).contains("messages"),
        "{}",
        text(&o)
    );
    assert!(
        !d.join("o").exists(),
        "nothing written before the data is valid"
    );
}
