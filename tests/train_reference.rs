//! Training: loss parity with PEFT + torch over 20 steps, packed training against TRL's packing,
//! exact resume, and a model that learns. Fixtures: `scripts/gen_train_fixture.py` and
//! `scripts/gen_packed_train_fixture.py` (torch 2.15.0, transformers 5.24.0, peft 0.21.2,
//! trl 1.16.0).

mod common;

use common::rel;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use qlorad::data::{encode_dataset, EncodeOptions, Example, TextTokenizer};
use qlorad::lora::{LoraConfig, TargetModules};
use qlorad::model::llama::{CausalLm, LoadOptions};
use qlorad::rng::Rng;
use qlorad::train::{
    Hyperparameters, OptimizerKind, Schedule, TrainEvent, Trainer, TrainerOptions,
};
use serde_json::Value;

fn lm(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lm")
        .join(name)
}

fn parity_examples() -> Vec<Example> {
    let v: Value =
        serde_json::from_slice(&std::fs::read(lm("train-parity/examples.json")).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| Example {
            input_ids: e["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect(),
            labels: e["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect(),
        })
        .collect()
}

fn parity_hyper() -> Hyperparameters {
    Hyperparameters {
        max_steps: Some(20),
        batch_size: 2,
        gradient_accumulation_steps: 2,
        learning_rate: 1e-3,
        lr_scheduler: Schedule::Linear,
        warmup_steps: Some(2),
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        ..Hyperparameters::default()
    }
}

fn options(hyper: Hyperparameters, lora: LoraConfig, out: Option<PathBuf>) -> TrainerOptions {
    TrainerOptions {
        hyper,
        lora,
        shuffle: false,
        group_by_length: false,
        eval_every: None,
        checkpoint_every: None,
        keep_checkpoints: 3,
        out_dir: out,
        base_model: None,
        packing: false,
        early_stopping: None,
        load_best: false,
    }
}

fn step_losses(events: &[TrainEvent]) -> Vec<(usize, f32, f64, f32)> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step {
                step,
                loss,
                learning_rate,
                grad_norm,
                ..
            } => Some((*step, *loss, *learning_rate, *grad_norm)),
            _ => None,
        })
        .collect()
}

/// Each step's loss, learning rate and gradient norm, and the final adapter, against the
/// reference run in `lm(dir)` (`steps.json`, `final-adapter/`).
fn assert_matches_reference(model: &CausalLm, events: &[TrainEvent], dir: &str, steps: usize) {
    let ours = step_losses(events);
    let want: Value =
        serde_json::from_slice(&std::fs::read(lm(&format!("{dir}/steps.json"))).unwrap()).unwrap();
    let want = want["steps"].as_array().unwrap();
    assert_eq!(ours.len(), steps);
    for ((step, loss, lr, norm), w) in ours.iter().zip(want) {
        let wl = w["loss"].as_f64().unwrap() as f32;
        assert!(
            (loss - wl).abs() <= 1e-4 * wl,
            "step {step}: loss {loss} vs {wl}"
        );
        let wlr = w["learning_rate"].as_f64().unwrap();
        assert!(
            (lr - wlr).abs() <= 1e-12 + 1e-9 * wlr,
            "step {step}: lr {lr} vs {wlr}"
        );
        let wn = w["grad_norm"].as_f64().unwrap() as f32;
        assert!(
            (norm - wn).abs() <= 1e-3 * wn,
            "step {step}: grad norm {norm} vs {wn}"
        );
    }
    common::assert_adapter_close(
        model,
        &lm(&format!("{dir}/final-adapter/adapter_model.safetensors")),
        1e-3,
    );
}

/// The dense `llama-gqa` model with the reference runs' initial adapter.
fn parity_model() -> (CausalLm, LoraConfig) {
    let mut model = CausalLm::load(
        &lm("llama-gqa"),
        &LoadOptions {
            quant: None,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let lora = model
        .load_adapter(&lm("train-parity/initial-adapter"))
        .unwrap();
    (model, lora)
}

#[test]
fn twenty_steps_match_peft_and_torch() {
    let (model, lora) = parity_model();
    let examples = parity_examples();
    let mut trainer = Trainer::new(
        &model,
        &examples,
        None,
        0,
        options(parity_hyper(), lora, None),
    )
    .unwrap();
    let mut events = Vec::new();
    trainer
        .run(&AtomicBool::new(false), &mut |e| events.push(e.clone()))
        .unwrap();
    assert_matches_reference(&model, &events, "train-parity", 20);
}

/// Sample packing against TRL + PEFT + torch (`scripts/gen_packed_train_fixture.py`): the same
/// rows (TRL's best-fit decreasing), attention kept inside each example by position ids alone,
/// each step's loss normalised over the label tokens of the whole step; 8 steps.
#[test]
fn packed_training_matches_trl_and_peft() {
    let (model, lora) = parity_model();
    let examples = parity_examples();
    let lengths: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();
    let rows: Vec<Vec<usize>> =
        serde_json::from_slice(&std::fs::read(lm("train-packed/rows.json")).unwrap()).unwrap();
    assert_eq!(qlorad::data::pack::pack_bfd(&lengths, 24), rows);
    let hyper = Hyperparameters {
        max_steps: Some(8),
        max_seq_len: 24,
        ..parity_hyper()
    };
    let opts = TrainerOptions {
        packing: true,
        early_stopping: None,
        load_best: false,
        ..options(hyper, lora, None)
    };
    let mut trainer = Trainer::new(&model, &examples, None, 0, opts).unwrap();
    let packing = trainer.packing().unwrap();
    assert_eq!(
        (packing.rows, packing.examples),
        (rows.len(), examples.len())
    );
    let mut events = Vec::new();
    trainer
        .run(&AtomicBool::new(false), &mut |e| events.push(e.clone()))
        .unwrap();
    assert_matches_reference(&model, &events, "train-packed", 8);
}

/// Examples laid end to end in one row give the padded batch's loss and gradients: positions
/// restart and attention stays inside each example.
#[test]
fn a_padding_free_row_equals_the_padded_batch() {
    let mut model = CausalLm::load(&lm("llama-gqa"), &LoadOptions::default()).unwrap();
    model
        .load_adapter(&lm("train-parity/initial-adapter"))
        .unwrap();
    let examples = parity_examples();
    let refs: Vec<&Example> = examples[..5].iter().collect();
    let padded = qlorad::data::batch::collate(&refs, 0, &Device::Cpu).unwrap();
    let packed = qlorad::data::batch::collate_packed(&refs, &Device::Cpu).unwrap();
    assert!(
        packed.tokens < 5 * padded.input_ids.dim(1).unwrap(),
        "no padding"
    );
    let a = model
        .forward_loss(
            &padded.input_ids,
            Some(&padded.attention_mask),
            &padded.labels,
            None,
        )
        .unwrap();
    let ga = model.backward(&a).unwrap();
    let b = model
        .forward_loss_packed(&packed.input_ids, &packed.lengths, &packed.labels, None)
        .unwrap();
    let gb = model.backward(&b).unwrap();
    let (a, b) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
    assert!((a - b).abs() <= 1e-6 * a, "loss {b} vs padded {a}");
    for (name, var) in model.trainable() {
        let (x, y) = (
            ga.get(var.as_tensor()).unwrap(),
            gb.get(var.as_tensor()).unwrap(),
        );
        let r = rel(y, x);
        assert!(r <= 1e-5, "{name}: gradient relative error {r}");
    }
}

#[test]
fn resuming_from_step_10_reproduces_steps_11_to_20_bit_for_bit() {
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        target_modules: TargetModules::all_linear(),
        use_rslora: false,
    };
    resume_reproduces(lora, OptimizerKind::AdamwTorch);
}

/// The same with bitsandbytes' 8-bit AdamW: at rank 64 the q/o/gate/up adapters have 4,096
/// elements or more and keep byte moments, the rest f32 ones; both come back from the
/// checkpoint exactly. A checkpoint of one optimizer does not resume another.
#[test]
fn an_8bit_adamw_run_resumes_bit_for_bit() {
    let lora = LoraConfig {
        r: 64,
        alpha: 16.0,
        dropout: 0.1,
        target_modules: TargetModules::all_linear(),
        use_rslora: false,
    };
    let dir = resume_reproduces(lora.clone(), OptimizerKind::AdamwBnb8bit);
    let ckpt = dir.path().join("full/checkpoint-10");
    let bytes = std::fs::read(ckpt.join("optimizer.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<String> = st.names().into_iter().map(String::from).collect();
    assert!(names.iter().any(|n| n.starts_with("state1.")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("exp_avg.")), "{names:?}");
    let mut m = CausalLm::load(&lm("llama-gqa"), &LoadOptions::default()).unwrap();
    m.add_lora(&lora, 9).unwrap();
    let examples = parity_examples();
    let mut t = Trainer::new(&m, &examples, None, 0, options(parity_hyper(), lora, None)).unwrap();
    let e = t.resume_from(&ckpt).unwrap_err().to_string();
    assert!(
        e.contains("adamw_bnb_8bit") && e.contains("hyperparameters.optimizer"),
        "{e}"
    );
}

/// Train 20 steps with a checkpoint at 10; a fresh model resumed from it reproduces steps 11
/// to 20 bit for bit. Returns the run's directory.
fn resume_reproduces(lora: LoraConfig, optimizer: OptimizerKind) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let examples = parity_examples();
    let hyper = Hyperparameters {
        lr_scheduler: Schedule::Cosine,
        optimizer,
        ..parity_hyper()
    };
    let load = || {
        let mut m = CausalLm::load(&lm("llama-gqa"), &LoadOptions::default()).unwrap();
        m.add_lora(&lora, 9).unwrap();
        m
    };
    let opts = |out: &Path| TrainerOptions {
        shuffle: true,
        checkpoint_every: Some(10),
        ..options(hyper.clone(), lora.clone(), Some(out.to_path_buf()))
    };

    let full_dir = tmp.path().join("full");
    let model = load();
    let mut t = Trainer::new(&model, &examples, None, 0, opts(&full_dir)).unwrap();
    let mut events = Vec::new();
    t.run(&AtomicBool::new(false), &mut |e| events.push(e.clone()))
        .unwrap();
    let full = step_losses(&events);
    assert!(full_dir.join("checkpoint-10/trainer_state.json").exists());
    assert!(full_dir.join("adapter/adapter_model.safetensors").exists());

    let model = load(); // fresh adapters: everything must come from the checkpoint
    let mut t = Trainer::new(
        &model,
        &examples,
        None,
        0,
        opts(&tmp.path().join("resumed")),
    )
    .unwrap();
    t.resume_from(&full_dir.join("checkpoint-10")).unwrap();
    let mut events = Vec::new();
    t.run(&AtomicBool::new(false), &mut |e| events.push(e.clone()))
        .unwrap();
    let resumed = step_losses(&events);
    assert_eq!(resumed.len(), 10);
    for (a, b) in resumed.iter().zip(&full[10..]) {
        assert_eq!(a.0, b.0);
        assert_eq!(
            a.1.to_bits(),
            b.1.to_bits(),
            "step {}: {} vs {}",
            a.0,
            a.1,
            b.1
        );
        assert_eq!(a.3.to_bits(), b.3.to_bits(), "step {}: grad norm", a.0);
    }
    tmp
}

#[test]
fn cancel_checkpoints_and_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let examples = parity_examples();
    let mut model = CausalLm::load(&lm("llama-gqa"), &LoadOptions::default()).unwrap();
    let lora = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: TargetModules::all_linear(),
        use_rslora: false,
    };
    model.add_lora(&lora, 1).unwrap();
    let cancel = AtomicBool::new(false);
    let mut t = Trainer::new(
        &model,
        &examples,
        None,
        0,
        options(parity_hyper(), lora, Some(tmp.path().into())),
    )
    .unwrap();
    let outcome = t
        .run(&cancel, &mut |e| {
            if matches!(e, TrainEvent::Step { step: 3, .. }) {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        })
        .unwrap();
    assert_eq!(outcome, qlorad::train::TrainOutcome::Cancelled { step: 3 });
    assert!(tmp
        .path()
        .join("checkpoint-3/adapter_model.safetensors")
        .exists());
}

#[test]
fn a_tiny_model_learns_a_fixed_mapping() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    common::tiny_model(&dir, "tok-chatml");
    let data = tmp.path().join("facts.jsonl");
    let facts = [
        ("Capital of France?", " Paris."),
        ("Boil time of the Zephyr 9?", " Ninety seconds."),
        ("Say hello.", " Hello!"),
    ];
    let lines: Vec<String> = facts
        .iter()
        .map(|(q, a)| serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a.trim()}]}).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let tok = TextTokenizer::load(&dir).unwrap();
    let (examples, _) = encode_dataset(&data, &tok, &EncodeOptions::default()).unwrap();
    let mut model = CausalLm::load(&dir, &LoadOptions::default()).unwrap();
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: TargetModules::all_linear(),
        use_rslora: false,
    };
    model.add_lora(&lora, 2).unwrap();
    let hyper = Hyperparameters {
        max_steps: Some(60),
        batch_size: 3,
        learning_rate: 1e-2,
        lr_scheduler: Schedule::Constant,
        warmup_ratio: 0.0,
        max_grad_norm: 1.0,
        ..Hyperparameters::default()
    };
    let mut t = Trainer::new(
        &model,
        &examples,
        None,
        tok.pad_id,
        options(hyper, lora, None),
    )
    .unwrap();
    let mut events = Vec::new();
    t.run(&AtomicBool::new(false), &mut |e| events.push(e.clone()))
        .unwrap();
    let losses = step_losses(&events);
    let (first, last) = (losses[0].1, losses.last().unwrap().1);
    assert!(last < 0.1 * first, "loss {first} -> {last}");
    let template = tok.template.as_ref().unwrap();
    let eos = tok.eos.as_ref().unwrap().1;
    for (q, a) in facts {
        let prompt = template
            .render(
                &[qlorad::data::Message {
                    role: "user".into(),
                    content: q.into(),
                }],
                true,
            )
            .unwrap();
        let (ids, _) = tok.encode(&prompt).unwrap();
        let out = model
            .generate(&ids, 12, 0.0, &[eos], &mut Rng::new(0))
            .unwrap();
        assert_eq!(tok.decode(&out).unwrap(), a.trim(), "completion of {q:?}");
    }
}

/// Early stopping ends a run whose validation loss stops improving, saying which step won;
/// `load_best` makes that step's adapter the result.
#[test]
fn early_stopping_and_the_best_adapter() {
    use qlorad::train::trainer::EarlyStopping;
    let tmp = tempfile::tempdir().unwrap();
    let examples = parity_examples();
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: TargetModules::all_linear(),
        use_rslora: false,
    };
    let load = || {
        let mut m = CausalLm::load(&lm("llama-gqa"), &LoadOptions::default()).unwrap();
        m.add_lora(&lora, 3).unwrap();
        m
    };
    let run = |out: &Path, early: Option<EarlyStopping>, hyper: Hyperparameters| {
        let model = load();
        let opts = TrainerOptions {
            eval_every: Some(1),
            early_stopping: early,
            load_best: true,
            ..options(hyper, lora.clone(), Some(out.to_path_buf()))
        };
        let mut t = Trainer::new(&model, &examples, Some(&examples), 0, opts).unwrap();
        let mut events = Vec::new();
        t.run(&AtomicBool::new(false), &mut |e| events.push(e.clone()))
            .unwrap();
        events
    };
    // No improvement ever counts: the run stops after `patience` evaluations past the first.
    let events = run(
        &tmp.path().join("stop"),
        Some(EarlyStopping {
            patience: 2,
            min_delta: 100.0,
        }),
        parity_hyper(),
    );
    let stopped = events
        .iter()
        .find_map(|e| match e {
            TrainEvent::EarlyStopped {
                step, best_step, ..
            } => Some((*step, *best_step)),
            _ => None,
        })
        .expect("an early stop");
    assert_eq!(stopped, (3, 1));
    assert!(matches!(
        events.last(),
        Some(TrainEvent::Finished { step: 3, .. })
    ));

    // A learning rate that overshoots: the best evaluation is not the last, and the result
    // computes that evaluation's loss.
    let out = tmp.path().join("best");
    let events = run(
        &out,
        None,
        Hyperparameters {
            learning_rate: 0.5,
            max_grad_norm: 100.0,
            max_steps: Some(4),
            ..parity_hyper()
        },
    );
    let evals: Vec<(usize, f32)> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Eval {
                step, eval_loss, ..
            } => Some((*step, *eval_loss)),
            _ => None,
        })
        .collect();
    let best = evals
        .iter()
        .copied()
        .fold((0, f32::INFINITY), |b, e| if e.1 < b.1 { e } else { b });
    let chosen = events
        .iter()
        .find_map(|e| match e {
            TrainEvent::BestAdapter { step, eval_loss } => Some((*step, *eval_loss)),
            _ => None,
        })
        .expect("the best adapter is reported");
    assert_eq!(chosen, best, "evaluations {evals:?}");
    assert!(best.0 < 4, "the last step is not the best: {evals:?}");
    let mut m = CausalLm::load(&lm("llama-gqa"), &LoadOptions::default()).unwrap();
    m.load_adapter(&out.join("adapter")).unwrap();
    let r = qlorad::train::evaluate(&m, &examples, parity_hyper().batch_size, 0).unwrap();
    assert!(
        (r.loss - best.1).abs() <= 1e-6 * best.1,
        "the result's loss {} vs the best evaluation {}",
        r.loss,
        best.1
    );
}
