//! The one-shot commands behind `qlorad train`, `eval`, `generate` and `bench`: the engine
//! driven from the terminal, with progress bars and files in an output directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::data::{encode_dataset, EncodeOptions, Example, Message, TextTokenizer};
use crate::model::llama::{CausalLm, LoadOptions};
use crate::rng::Rng;
use crate::train::checkpoint;
use crate::train::{
    evaluate, JobSpec, TrainError, TrainEvent, TrainOutcome, Trainer, TrainerOptions,
};

pub type Result<T> = std::result::Result<T, TrainError>;

/// `cpu` or `cuda:N`, as a candle device.
pub fn device(name: &str) -> Result<Device> {
    crate::model::parse_device(name).map_err(|message| TrainError::Spec {
        field: "device".into(),
        message,
    })
}

fn encode_options(spec: &JobSpec) -> EncodeOptions {
    EncodeOptions {
        format: spec.data.format,
        max_seq_len: spec.hyperparameters.max_seq_len,
        train_on_prompt: spec.data.train_on_prompt,
    }
}

fn load_model(model_dir: &Path, spec: &JobSpec) -> Result<CausalLm> {
    let opts = LoadOptions {
        quant: spec.quantization.config(),
        dtype: spec.quantization.dtype(),
        device: device(&spec.device)?,
        gradient_checkpointing: spec.hyperparameters.gradient_checkpointing,
    };
    Ok(CausalLm::load(model_dir, &opts)?)
}

/// What `qlorad train` needs beyond the spec.
pub struct TrainArgs {
    pub model: PathBuf,
    pub data: PathBuf,
    pub validation: Option<PathBuf>,
    pub out: PathBuf,
    pub resume: bool,
    pub init_adapter: Option<PathBuf>,
}

fn write_line(file: &mut std::fs::File, path: &Path, v: &serde_json::Value) -> Result<()> {
    writeln!(file, "{v}").map_err(crate::train::io_err(path))
}

/// Train an adapter; Ctrl-C checkpoints and stops. Returns the outcome.
pub fn train(args: &TrainArgs, spec: &JobSpec) -> Result<TrainOutcome> {
    let out = &args.out;
    let existing = checkpoint::latest(out);
    if existing.is_some() && !args.resume {
        return Err(TrainError::Checkpoint {
            path: out.clone(),
            message:
                "holds checkpoints already: pass --resume to continue, or choose another --out"
                    .into(),
        });
    }
    let tok = TextTokenizer::load(&args.model)?;
    let opts = encode_options(spec);
    let (train_set, summary) = encode_dataset(&args.data, &tok, &opts)?;
    eprintln!(
        "training data: {}",
        serde_json::to_string(&summary).expect("json")
    );
    let eval_set: Option<Vec<Example>> = match &args.validation {
        Some(v) => {
            let (e, s) = encode_dataset(v, &tok, &opts)?;
            eprintln!(
                "validation data: {}",
                serde_json::to_string(&s).expect("json")
            );
            Some(e)
        }
        None => None,
    };
    let mut model = load_model(&args.model, spec)?;
    let lora = match &args.init_adapter {
        Some(dir) => model.load_adapter(dir)?,
        None => {
            let cfg = spec.lora.config();
            model.add_lora(&cfg, spec.hyperparameters.seed)?;
            cfg
        }
    };
    std::fs::create_dir_all(out).map_err(crate::train::io_err(out))?;
    let spec_path = out.join("spec.json");
    std::fs::write(
        &spec_path,
        serde_json::to_string_pretty(spec).expect("json") + "\n",
    )
    .map_err(crate::train::io_err(&spec_path))?;
    let topts = TrainerOptions {
        hyper: spec.hyperparameters.clone(),
        lora,
        shuffle: true,
        group_by_length: spec.data.group_by_length,
        eval_every: spec.eval_every,
        checkpoint_every: spec.checkpoint_every,
        keep_checkpoints: spec.keep_checkpoints,
        out_dir: Some(out.clone()),
        base_model: Some(args.model.display().to_string()),
    };
    let mut trainer = Trainer::new(&model, &train_set, eval_set.as_deref(), tok.pad_id, topts)?;
    let metrics_path = out.join("metrics.jsonl");
    if let Some(dir) = existing.filter(|_| args.resume) {
        trainer.resume_from(&dir)?;
        eprintln!(
            "resumed from {} at step {}",
            dir.display(),
            trainer.state.step
        );
        // Drop metrics the interrupted run wrote past the checkpoint.
        let kept: Vec<String> = std::fs::read_to_string(&metrics_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= trainer.state.step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&metrics_path, kept.concat())
            .map_err(crate::train::io_err(&metrics_path))?;
    } else {
        std::fs::write(&metrics_path, "").map_err(crate::train::io_err(&metrics_path))?;
    }
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(crate::train::io_err(&metrics_path))?;

    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        // A second handler cannot be installed in one process; training once per process is the CLI's case.
        let _ = ctrlc::set_handler(move || {
            eprintln!("\ninterrupted: writing a checkpoint, then stopping");
            cancel.store(true, Ordering::Relaxed);
        });
    }
    let bar = ProgressBar::new(trainer.total_steps() as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed} < {eta}]")
            .expect("static template"),
    );
    bar.set_position(trainer.state.step as u64);
    let mut io_error = None;
    let outcome = trainer.run(&cancel, &mut |e| {
        let line = match e {
            TrainEvent::Step { step, loss, learning_rate, grad_norm, tokens, tokens_per_second, epoch, .. } => {
                bar.set_position(*step as u64);
                bar.set_message(format!("loss {loss:.4}  lr {learning_rate:.2e}  {tokens_per_second:.0} tok/s"));
                Some(json!({"step": step, "loss": loss, "learning_rate": learning_rate, "grad_norm": grad_norm,
                            "tokens": tokens, "epoch": epoch}))
            }
            TrainEvent::Eval { step, eval_loss, eval_accuracy, eval_tokens } => {
                bar.println(format!("step {step}: eval loss {eval_loss:.4}, token accuracy {eval_accuracy:.3}"));
                Some(json!({"step": step, "eval_loss": eval_loss, "eval_accuracy": eval_accuracy, "eval_tokens": eval_tokens}))
            }
            TrainEvent::Checkpoint { path, .. } => {
                bar.println(format!("checkpoint {}", path.display()));
                None
            }
            _ => None,
        };
        if let Some(v) = line {
            if let Err(err) = write_line(&mut metrics, &metrics_path, &v) {
                io_error.get_or_insert(err);
            }
        }
    })?;
    bar.finish_and_clear();
    if let Some(err) = io_error {
        return Err(err);
    }
    match &outcome {
        TrainOutcome::Finished { step } => {
            eprintln!(
                "finished {step} steps; adapter in {}",
                out.join("adapter").display()
            )
        }
        TrainOutcome::Cancelled { step } => {
            eprintln!("stopped at step {step}; continue with --resume")
        }
    }
    Ok(outcome)
}

/// Mean loss, tokens and token accuracy over a dataset, masked as in training.
pub fn eval(
    model_dir: &Path,
    adapter: Option<&Path>,
    data: &Path,
    spec: &JobSpec,
) -> Result<serde_json::Value> {
    let tok = TextTokenizer::load(model_dir)?;
    let (examples, summary) = encode_dataset(data, &tok, &encode_options(spec))?;
    let mut model = load_model(model_dir, spec)?;
    if let Some(a) = adapter {
        model.load_adapter(a)?;
    }
    let r = evaluate(
        &model,
        &examples,
        spec.hyperparameters.batch_size,
        tok.pad_id,
    )?;
    Ok(
        json!({"loss": r.loss, "tokens": r.tokens, "accuracy": r.accuracy, "examples": summary.examples}),
    )
}

pub struct GenerateArgs {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub prompt: String,
    pub chat: bool,
    pub max_tokens: usize,
    pub temperature: f64,
    pub seed: u64,
}

/// Complete a prompt (or a one-message chat) with the model and optional adapter.
pub fn generate(args: &GenerateArgs, spec: &JobSpec) -> Result<String> {
    let tok = TextTokenizer::load(&args.model)?;
    let mut model = load_model(&args.model, spec)?;
    if let Some(a) = &args.adapter {
        model.load_adapter(a)?;
    }
    let text = if args.chat {
        let template = tok
            .template
            .as_ref()
            .ok_or_else(|| crate::data::DataError::File {
                path: args.model.join("tokenizer_config.json"),
                message: "--chat needs a chat template, and this model has none".into(),
            })?;
        template.render(
            &[Message {
                role: "user".into(),
                content: args.prompt.clone(),
            }],
            true,
        )?
    } else {
        format!("{}{}", tok.bos_text(), args.prompt)
    };
    let (ids, _) = tok.encode(&text)?;
    let stop: Vec<u32> = tok.eos.iter().map(|e| e.1).collect();
    let out = model.generate(
        &ids,
        args.max_tokens,
        args.temperature,
        &stop,
        &mut Rng::new(args.seed),
    )?;
    Ok(tok.decode(&out)?)
}

/// What `qlorad bench train` measures.
pub struct BenchArgs {
    pub model: Option<PathBuf>,
    pub seq_len: usize,
    pub batch_size: usize,
    pub steps: usize,
    pub spec: JobSpec,
    /// Attribute step time to kernel groups (synchronizing around each; slower).
    pub profile: bool,
    /// Bracket the first timed step with the CUDA profiler's start and stop, for
    /// `ncu --profile-from-start off` and the like.
    pub profiler_range: bool,
}

/// The process's peak resident memory in GiB, loading included: Linux's VmHWM, None elsewhere.
/// On the CPU it is what training takes; `bench train` reports it beside the GPU's peak.
fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb / (1024.0 * 1024.0))
}

/// Time forward + backward + optimizer steps on random tokens and report throughput.
pub fn bench_train(args: &BenchArgs) -> Result<serde_json::Value> {
    let tmp;
    let model_dir = match &args.model {
        Some(m) => m.clone(),
        None => {
            tmp = tempfile_dir()?;
            crate::model::random::RandomLlama {
                vocab_size: 4096,
                hidden_size: 512,
                intermediate_size: 1408,
                num_hidden_layers: 4,
                num_attention_heads: 8,
                num_key_value_heads: 2,
                tie_word_embeddings: false,
                dtype: safetensors::Dtype::BF16,
                seed: 1,
            }
            .write(&tmp.0)?;
            tmp.0.clone()
        }
    };
    let dev = device(&args.spec.device)?;
    let meter = crate::bench::PeakMemory::start(&dev);
    let loaded = Instant::now();
    let mut model = load_model(&model_dir, &args.spec)?;
    model.add_lora(&args.spec.lora.config(), 0)?;
    crate::bench::sync(model.device())?;
    let load_s = loaded.elapsed().as_secs_f64();
    let vocab = model.config.vocab_size as u32;
    let mut rng = Rng::new(7);
    // Two warm-up steps (allocator pools, kernel loading), then the timed ones.
    let warmup = 2;
    let examples: Vec<Example> = (0..args.batch_size * (args.steps + warmup))
        .map(|_| {
            let ids: Vec<u32> = (0..args.seq_len)
                .map(|_| (rng.next_u64() % vocab as u64) as u32)
                .collect();
            Example {
                labels: ids.iter().map(|&t| t as i64).collect(),
                input_ids: ids,
            }
        })
        .collect();
    let hyper = crate::train::Hyperparameters {
        max_steps: Some(args.steps + warmup),
        batch_size: args.batch_size,
        ..args.spec.hyperparameters.clone()
    };
    let opts = TrainerOptions {
        hyper,
        lora: args.spec.lora.config(),
        shuffle: false,
        group_by_length: false,
        eval_every: None,
        checkpoint_every: None,
        keep_checkpoints: 1,
        out_dir: None,
        base_model: None,
    };
    let mut trainer = Trainer::new(&model, &examples, None, 0, opts)?;
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let mut last = Instant::now();
    trainer.run(&AtomicBool::new(false), &mut |e| {
        if let TrainEvent::Step { loss, .. } = e {
            times.push(last.elapsed().as_secs_f64());
            losses.push(*loss);
            if args.profile && times.len() == warmup {
                crate::profile::start(model.device());
            }
            if args.profiler_range && (times.len() == warmup || times.len() == warmup + 1) {
                // Errors here only lose the capture, never the benchmark.
                let _ = crate::bench::profiler_range(model.device(), times.len() == warmup);
            }
            last = Instant::now();
        }
        if let TrainEvent::Started { .. } = e {
            last = Instant::now();
        }
    })?;
    let peak = meter.finish();
    let spans = crate::profile::stop();
    let mut steady = times[warmup.min(times.len() - 1)..].to_vec();
    steady.sort_by(f64::total_cmp);
    let step_s = steady[steady.len() / 2];
    let tokens = (args.batch_size * args.seq_len) as f64;
    let c = &model.config;
    // Per token: 4·N_linear (forward and input gradient of the frozen linears, LM head
    // included) plus attention, 6·layers·seq·hidden (QKᵀ and PV forward, twice that backward,
    // halved by causality). Checkpointing's recomputation is not counted.
    let linear = c.num_hidden_layers
        * (c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
            + c.num_attention_heads * c.head_dim * c.hidden_size
            + 3 * c.hidden_size * c.intermediate_size)
        + c.vocab_size * c.hidden_size;
    let flops_per_token =
        4.0 * linear as f64 + 6.0 * (c.num_hidden_layers * args.seq_len * c.hidden_size) as f64;
    let tps = tokens / step_s;
    Ok(json!({
        "device": args.spec.device,
        "compute_dtype": format!("{:?}", args.spec.quantization.dtype()).to_lowercase(),
        "quantization": args.spec.quantization.config().map(|q| q.quant_type.as_str()).unwrap_or("none"),
        "gradient_checkpointing": args.spec.hyperparameters.gradient_checkpointing,
        "lora_r": args.spec.lora.r,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps_timed": steady.len(),
        "step_seconds_median": step_s,
        "tokens_per_second": tps,
        "peak_gpu_memory_gib": peak,
        "peak_rss_gib": peak_rss_gib(),
        "mfu": tps * flops_per_token / 989e12,
        "load_quantize_seconds": load_s,
        "losses": losses,
        "profile_seconds_per_step": args.profile.then(|| {
            let steps = steady.len() as f64;
            let mut m = serde_json::Map::new();
            for (name, calls, secs) in &spans {
                m.insert(name.to_string(), json!({"seconds": secs / steps, "calls": *calls as f64 / steps}));
            }
            let attributed: f64 = spans.iter().map(|s| s.2).sum::<f64>() / steps;
            m.insert("everything else (autograd's own ops, launches)".into(), json!({"seconds": step_s - attributed}));
            m
        }),
    }))
}

/// A temporary directory removed on drop (no extra dependency in the library).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> Result<TempDir> {
    let p = std::env::temp_dir().join(format!("qlorad-bench-{}", std::process::id()));
    std::fs::create_dir_all(&p).map_err(crate::train::io_err(&p))?;
    Ok(TempDir(p))
}

/// What `qlorad merge` writes.
pub struct MergeArgs {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub out: PathBuf,
    pub gguf: Vec<crate::export::GgufType>,
    pub gguf_lora: bool,
    pub safetensors: bool,
    pub merge_base: crate::export::MergeBase,
}

/// Merge an adapter into its base and write the requested files under `out`; returns their paths.
pub fn merge(args: &MergeArgs) -> std::result::Result<Vec<PathBuf>, crate::export::ExportError> {
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("static template"),
    );
    let outputs = crate::export::Outputs {
        gguf: args.gguf.clone(),
        gguf_lora: args.gguf_lora,
        safetensors: args.safetensors,
        merge_base: args.merge_base,
    };
    let written = crate::export::export_all(
        &args.model,
        args.adapter.as_deref(),
        &args.out,
        &outputs,
        &mut |done, total, what| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(what.to_string());
        },
    )?;
    bar.finish_and_clear();
    Ok(written)
}
