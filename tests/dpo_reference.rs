//! DPO against TRL's `DPOTrainer` with a PEFT adapter: the tokenization of preference records,
//! six steps' losses, gradient norms and reward metrics, and the final adapter; the records'
//! checks; a DPO job run end to end, resumed from a checkpoint. Fixture:
//! `scripts/gen_dpo_fixture.py` (torch 2.15.0, transformers 5.24.0, peft 0.21.2, trl 1.16.0).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use qlorad::data::preference::tokenize_pair;
use qlorad::data::{encode_preferences, read_records, EncodeOptions, Sample, TextTokenizer};
use qlorad::finetune::{JobSpec, Plan, RunEvent};
use qlorad::model::llama::{CausalLm, LoadOptions};
use qlorad::train::dpo::DpoConfig;
use qlorad::train::{Hyperparameters, Schedule, TrainEvent, Trainer, TrainerOptions};
use serde_json::{json, Value};

fn dpo(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lm/dpo")
        .join(name)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn opts(max_seq_len: usize) -> EncodeOptions {
    EncodeOptions {
        max_seq_len,
        ..EncodeOptions::default()
    }
}

/// Every record of `file` tokenized as (prompt, chosen, rejected).
fn tokenized(file: &Path, tok: &TextTokenizer) -> Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> {
    let (_, samples) = read_records(file, None).unwrap();
    samples
        .iter()
        .map(|(_, s)| {
            let Sample::Preference(p) = s else {
                panic!("{s:?} is not a pair")
            };
            let t = tokenize_pair(tok, p, &opts(usize::MAX)).unwrap();
            (t.prompt, t.chosen, t.rejected)
        })
        .collect()
}

#[test]
fn preference_records_tokenize_as_trl() {
    let tok = TextTokenizer::load(&dpo("model")).unwrap();
    let want = read_json(&dpo("tokens.json"));
    for name in ["pairs", "strings"] {
        let ours = tokenized(&dpo(&format!("{name}.jsonl")), &tok);
        let want = want[name].as_array().unwrap();
        assert_eq!(ours.len(), want.len());
        for (i, ((p, c, r), w)) in ours.iter().zip(want).enumerate() {
            assert_eq!(p, &ids(&w["prompt_ids"]), "{name} {i}: prompt");
            assert_eq!(c, &ids(&w["chosen_ids"]), "{name} {i}: chosen");
            assert_eq!(r, &ids(&w["rejected_ids"]), "{name} {i}: rejected");
        }
    }
}

/// OpenAI's preference records and TRL's implicit-prompt ones are the same pairs as TRL's
/// explicit form.
#[test]
fn openai_and_implicit_prompt_records_are_the_same_pairs() {
    let tok = TextTokenizer::load(&dpo("model")).unwrap();
    let trl = tokenized(&dpo("pairs.jsonl"), &tok);
    let tmp = tempfile::tempdir().unwrap();
    let (mut openai, mut implicit) = (String::new(), String::new());
    for line in std::fs::read_to_string(dpo("pairs.jsonl")).unwrap().lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        let rec = json!({"input": {"messages": r["prompt"], "tools": []},
            "preferred_output": r["chosen"], "non_preferred_output": r["rejected"]});
        openai += &format!("{rec}\n");
        let whole = |side: &str| {
            let mut m = r["prompt"].as_array().unwrap().clone();
            m.extend(r[side].as_array().unwrap().iter().cloned());
            Value::Array(m)
        };
        implicit += &format!(
            "{}\n",
            json!({"chosen": whole("chosen"), "rejected": whole("rejected")})
        );
    }
    for (name, text) in [("openai.jsonl", openai), ("implicit.jsonl", implicit)] {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        assert_eq!(tokenized(&path, &tok), trl, "{name}");
    }
}

/// A bad record is refused before anything trains, naming the file, the line and the field.
#[test]
fn bad_preference_records_name_line_and_field() {
    let tok = TextTokenizer::load(&dpo("model")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let good = r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "Good day."}], "rejected": [{"role": "assistant", "content": "hey"}]}"#;
    let user = r#"[{"role": "user", "content": "hi"}]"#;
    let cases = [
        (
            format!(r#"{{"prompt": {user}, "chosen": [{{"role": "assistant", "content": "a"}}]}}"#),
            "line 2: field `rejected`: is missing",
        ),
        (
            format!(r#"{{"prompt": {user}, "chosen": [], "rejected": [{{"role": "assistant", "content": "a"}}]}}"#),
            "line 2: field `chosen`: is empty",
        ),
        (
            format!(r#"{{"prompt": {user}, "chosen": [{{"role": "user", "content": "a"}}], "rejected": [{{"role": "assistant", "content": "b"}}]}}"#),
            "line 2: field `chosen[0].role`: must be assistant, found \"user\"",
        ),
        (
            format!(r#"{{"prompt": {user}, "chosen": [{{"role": "assistant", "content": ""}}], "rejected": [{{"role": "assistant", "content": "b"}}]}}"#),
            "line 2: field `chosen[0].content`: is empty",
        ),
        (
            r#"{"prompt": "Q", "chosen": "", "rejected": "b"}"#.to_string(),
            "line 2: field `chosen`: is empty",
        ),
        (
            r#"{"input": {"messages": []}, "preferred_output": [{"role": "assistant", "content": "a"}], "non_preferred_output": [{"role": "assistant", "content": "b"}]}"#.to_string(),
            "line 2: field `input.messages`: is empty",
        ),
        (
            format!(r#"{{"input": {{"messages": {user}}}, "preferred_output": [{{"role": "assistant", "content": "a"}}, {{"role": "assistant", "content": "b"}}], "non_preferred_output": [{{"role": "assistant", "content": "b"}}]}}"#),
            "line 2: field `preferred_output`: must hold one assistant message, found 2",
        ),
        (
            format!(r#"{{"input": {{"messages": {user}, "tools": [{{"type": "function"}}]}}, "preferred_output": [{{"role": "assistant", "content": "a"}}], "non_preferred_output": [{{"role": "assistant", "content": "b"}}]}}"#),
            "line 2: field `input.tools`: tools are not supported",
        ),
        (
            format!(r#"{{"input": {{"messages": {user}}}, "preferred_output": {{"role": "assistant", "content": "a"}}, "non_preferred_output": [{{"role": "assistant", "content": "b"}}]}}"#),
            "line 2: field `preferred_output`: must be a list of messages, found an object",
        ),
    ];
    for (i, (bad, want)) in cases.iter().enumerate() {
        let path = tmp.path().join(format!("bad{i}.jsonl"));
        std::fs::write(&path, format!("{good}\n{bad}\n")).unwrap();
        let err = encode_preferences(&path, &tok, &opts(64))
            .unwrap_err()
            .to_string();
        assert_eq!(err, format!("{}: {want}", path.display()), "case {i}");
    }
    // A supervised file in a DPO job, and a pair in a supervised one.
    let sft = tmp.path().join("sft.jsonl");
    std::fs::write(
        &sft,
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#,
    )
    .unwrap();
    let err = encode_preferences(&sft, &tok, &opts(64))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 1: DPO trains on preference pairs"),
        "{err}"
    );
    let pairs = tmp.path().join("pairs.jsonl");
    std::fs::write(&pairs, format!("{good}\n")).unwrap();
    let err = qlorad::data::encode_dataset(&pairs, &tok, &opts(64))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 1: a preference pair (chosen and rejected) trains with method dpo"),
        "{err}"
    );
}

fn hyper() -> Hyperparameters {
    Hyperparameters {
        max_steps: Some(6),
        batch_size: 3,
        gradient_accumulation_steps: 1,
        learning_rate: 1e-3,
        lr_scheduler: Schedule::Linear,
        warmup_steps: Some(0),
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        max_seq_len: 48,
        ..Hyperparameters::default()
    }
}

const METRICS: [&str; 6] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
];

/// Each step's loss, gradient norm, learning rate and reward metrics, and the final adapter,
/// against TRL's run.
fn assert_matches_trl(events: &[TrainEvent], model: &CausalLm) {
    let want = read_json(&dpo("steps.json"));
    let want = want["steps"].as_array().unwrap();
    let ours: Vec<&TrainEvent> = events
        .iter()
        .filter(|e| matches!(e, TrainEvent::Step { .. }))
        .collect();
    assert_eq!(ours.len(), want.len());
    for (e, w) in ours.iter().zip(want) {
        let TrainEvent::Step {
            step,
            loss,
            learning_rate,
            grad_norm,
            preference: Some(m),
            ..
        } = e
        else {
            panic!("{e:?} has no preference metrics")
        };
        let close = |what: &str, ours: f64, tol: f64| {
            let w = w[what].as_f64().unwrap();
            assert!(
                (ours - w).abs() <= tol * w.abs() + 1e-6,
                "step {step}: {what} {ours} vs TRL {w}"
            );
        };
        close("loss", *loss as f64, 1e-4);
        close("learning_rate", *learning_rate, 1e-9);
        close("grad_norm", *grad_norm as f64, 1e-3);
        let fields = m.fields("");
        for k in METRICS {
            close(k, fields[k].as_f64().unwrap(), 1e-4);
        }
    }
    common::assert_adapter_close(model, &dpo("final-adapter/adapter_model.safetensors"), 1e-3);
}

#[test]
fn six_dpo_steps_match_trl() {
    let tok = TextTokenizer::load(&dpo("model")).unwrap();
    let (pairs, summary) = encode_preferences(&dpo("pairs.jsonl"), &tok, &opts(48)).unwrap();
    let kept = read_json(&dpo("steps.json"))["pairs_kept"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!((summary.examples, summary.dropped), (kept, Some(2)));
    assert_eq!(summary.truncated, 2);
    let (chosen, rejected): (Vec<_>, Vec<_>) =
        pairs.into_iter().map(|p| (p.chosen, p.rejected)).unzip();
    let mut model = CausalLm::load(
        &dpo("model"),
        &LoadOptions {
            quant: None,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let lora = model.load_adapter(&dpo("initial-adapter")).unwrap();
    let topts = TrainerOptions {
        hyper: hyper(),
        lora,
        shuffle: false,
        group_by_length: false,
        eval_every: None,
        checkpoint_every: None,
        keep_checkpoints: 3,
        out_dir: None,
        base_model: None,
        packing: false,
        early_stopping: None,
        load_best: false,
    };
    let cfg = DpoConfig {
        beta: 0.5,
        label_smoothing: 0.0,
    };
    let mut trainer = Trainer::new(&model, &chosen, None, tok.pad_id, topts)
        .unwrap()
        .with_preferences(cfg, &rejected, None, None)
        .unwrap();
    let mut events = Vec::new();
    trainer
        .run(&AtomicBool::new(false), &mut |e| events.push(e.clone()))
        .unwrap();
    assert_matches_trl(&events, &model);
}

/// A DPO job from its spec, as the service runs it: the reference is stored with the run, and
/// a job resumed from its step-3 checkpoint reads it back and ends exactly as the whole run.
#[test]
fn a_dpo_job_resumes_from_its_checkpoint_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let h = hyper();
    let spec = JobSpec::from_value(json!({
        "model": "dpo", "training_file": "pairs",
        "method": {"type": "dpo", "beta": 0.5},
        "hyperparameters": serde_json::to_value(&h).unwrap(),
        "quantization": {"type": "none"},
        "checkpoint_every": 3,
    }))
    .unwrap();
    let plan = |run: &str| Plan {
        spec: spec.clone(),
        model_dir: dpo("model"),
        training_file: dpo("pairs.jsonl"),
        validation_file: Some(dpo("pairs.jsonl")),
        run_dir: tmp.path().join(run),
        artifacts_dir: tmp.path().join(run),
        init_adapter: Some(dpo("initial-adapter")),
        resume: true,
        base_model_name: None,
    };
    let run = |plan: &Plan| {
        let mut events = Vec::new();
        qlorad::finetune::run(plan, &AtomicBool::new(false), &mut |e| {
            events.push(e.clone())
        })
        .unwrap();
        events
    };
    let whole = run(&plan("whole"));
    let reference = |events: &[RunEvent]| {
        events.iter().find_map(|e| match e {
            RunEvent::Reference { pairs, computed } => Some((*pairs, *computed)),
            _ => None,
        })
    };
    assert_eq!(reference(&whole), Some((16, true)));
    let steps = |events: &[RunEvent]| -> Vec<(usize, f32)> {
        events
            .iter()
            .filter_map(|e| match e {
                RunEvent::Train(TrainEvent::Step { step, loss, .. }) => Some((*step, *loss)),
                _ => None,
            })
            .collect()
    };
    // A job shuffles the pairs, so only its first step (policy = reference) is TRL's.
    assert_eq!(steps(&whole).len(), 6);
    assert!((steps(&whole)[0].1 - std::f32::consts::LN_2).abs() < 1e-6);
    // Resume a copy of the run directory as it was after step 3.
    let (from, to) = (tmp.path().join("whole"), tmp.path().join("resumed"));
    std::fs::create_dir_all(to.join("checkpoint-3")).unwrap();
    let stored = "reference_logps.json";
    std::fs::copy(from.join(stored), to.join(stored)).unwrap();
    for f in std::fs::read_dir(from.join("checkpoint-3")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), to.join("checkpoint-3").join(f.file_name())).unwrap();
    }
    let resumed = run(&plan("resumed"));
    assert_eq!(reference(&resumed), Some((16, false)));
    assert_eq!(steps(&resumed), steps(&whole)[3..].to_vec());
    let evals = |events: &[RunEvent]| -> Vec<Value> {
        events
            .iter()
            .filter_map(|e| match e {
                RunEvent::Train(TrainEvent::Eval { .. }) => {
                    Some(serde_json::to_value(e_train(e)).unwrap())
                }
                _ => None,
            })
            .collect()
    };
    assert_eq!(evals(&resumed), evals(&whole));
    let adapter = |run: &str| {
        std::fs::read(
            tmp.path()
                .join(run)
                .join("adapter/adapter_model.safetensors"),
        )
        .unwrap()
    };
    assert_eq!(adapter("resumed"), adapter("whole"));
}

fn e_train(e: &RunEvent) -> &TrainEvent {
    match e {
        RunEvent::Train(t) => t,
        _ => unreachable!(),
    }
}
