//! `qlorad bench`: training throughput on random tokens (`bench train`), generation throughput
//! (`bench generate`), the kernels on a device checked against the CPU (`bench kernels`) and
//! attention's engines against each other (`bench attention`).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use serde_json::json;

use super::{CliError, SpecArg};
use crate::data::Example;
use crate::finetune::{load_model, FinetuneError, JobSpec, SpecError};
use crate::rng::Rng;
use crate::train::{TrainEvent, Trainer, TrainerOptions};

type Result<T> = std::result::Result<T, FinetuneError>;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Training throughput on random tokens: tokens/s, step time, approximate TFLOP/s.
    Train {
        /// A model directory; a random 4-layer model (hidden 512) when absent.
        #[arg(long)]
        model: Option<PathBuf>,
        /// The random model's architecture, without --model: llama or qwen3.
        #[arg(long, default_value = "llama")]
        arch: String,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// Timed steps (after two warm-up steps).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Attribute the step time to kernel groups, synchronizing around each (slower steps).
        #[arg(long)]
        profile: bool,
        /// Bracket the first timed step with cuProfilerStart/Stop, for an external profiler
        /// run with --profile-from-start off (ncu, nsys).
        #[arg(long)]
        profiler_range: bool,
        /// Example lengths (a JSON array of token counts, as scripts/gen_lengths.py writes) to
        /// train on instead of --seq-len examples: with `"data": {"packing": true}` in the spec
        /// they are packed into rows of `max_seq_len`; tokens/s counts trained tokens.
        #[arg(long)]
        lengths: Option<PathBuf>,
        #[command(flatten)]
        spec: SpecArg,
    },
    /// Generation throughput with the KV cache: the prompt's pass and the one-token decode
    /// steps after it, greedy, on random prompts (`--spec` sets device, quantization, dtype).
    Generate {
        /// A model directory or GGUF file; a random 4-layer model (hidden 512) when absent.
        #[arg(long)]
        model: Option<PathBuf>,
        /// A PEFT adapter over the model, unmerged.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Streams decoded together.
        #[arg(long, default_value_t = 1)]
        batch_size: usize,
        #[command(flatten)]
        spec: SpecArg,
    },
    /// The 4-bit kernels on a device: quantize and dequantize checked bit for bit against the
    /// CPU, dequantization bandwidth against a plain copy, fused ops against the CPU.
    Kernels {
        /// cpu or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Rows of the test weight (columns: 4096).
        #[arg(long, default_value_t = 14336)]
        rows: usize,
        #[arg(long, default_value_t = 4096)]
        cols: usize,
        /// Timed repetitions (the median is reported).
        #[arg(long, default_value_t = 20)]
        iters: usize,
    },
    /// Causal attention on a device (Llama-3-8B heads: 32 query, 8 key, head dim 128; bf16 on a
    /// GPU, f32 on the CPU): the engine training uses checked against the blocked attention on
    /// the CPU (output and the three input gradients; whole rows, grouped heads, packed
    /// segments, head dims 64 to 256), then forward and backward TFLOP/s per sequence length.
    Attention {
        /// cpu or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Comma-separated sequence lengths to time.
        #[arg(long, default_value = "2048,8192,32768")]
        seqs: String,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Time the blocked attention too, up to this many tokens.
        #[arg(long, default_value_t = 8192)]
        blocked_up_to: usize,
    },
}

pub fn run(c: BenchCommand) -> std::result::Result<(), CliError> {
    let report = match c {
        BenchCommand::Train {
            model,
            arch,
            seq_len,
            batch_size,
            steps,
            profile,
            profiler_range,
            lengths,
            spec,
        } => {
            let lengths = match lengths {
                Some(path) => {
                    let text = std::fs::read_to_string(&path).map_err(|source| CliError::Io {
                        path: path.clone(),
                        source,
                    })?;
                    let v: Vec<usize> = serde_json::from_str(&text).map_err(|e| {
                        CliError::Usage(format!(
                            "--lengths {}: not a JSON array of token counts: {e}",
                            path.display()
                        ))
                    })?;
                    if v.is_empty() || v.contains(&0) {
                        return Err(CliError::Usage(format!(
                            "--lengths {}: needs at least one length, none of them 0",
                            path.display()
                        )));
                    }
                    Some(v)
                }
                None => None,
            };
            let qk_norm = match arch.as_str() {
                "llama" => false,
                "qwen3" => true,
                other => {
                    return Err(CliError::Usage(format!(
                        "--arch {other:?}: the random model is llama or qwen3"
                    )))
                }
            };
            bench_train(&BenchArgs {
                model,
                qk_norm,
                seq_len,
                batch_size,
                steps: steps.max(1),
                spec: spec.load()?,
                profile,
                profiler_range,
                lengths,
            })?
        }
        BenchCommand::Generate {
            model,
            adapter,
            prompt_len,
            new_tokens,
            batch_size,
            spec,
        } => bench_generate(&GenerateBench {
            model,
            adapter,
            prompt_len,
            new_tokens,
            batch_size,
            spec: spec.load()?,
        })?,
        BenchCommand::Kernels {
            device,
            rows,
            cols,
            iters,
        } => {
            let dev = crate::model::parse_device(&device)
                .map_err(|message| SpecError::new("device", message))?;
            crate::bench::bench_kernels(&dev, rows, cols, iters.max(1))?
        }
        BenchCommand::Attention {
            device,
            seqs,
            iters,
            blocked_up_to,
        } => {
            let dev = crate::model::parse_device(&device)
                .map_err(|message| SpecError::new("device", message))?;
            let seqs = seqs
                .split(',')
                .map(|s| s.trim().parse::<usize>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| SpecError::new("seqs", format!("not a list of lengths: {e}")))?;
            crate::bench::bench_attention(&dev, &seqs, iters.max(1), blocked_up_to)?
        }
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("a report serializes")
    );
    Ok(())
}

/// What `qlorad bench train` measures.
pub struct BenchArgs {
    pub model: Option<PathBuf>,
    /// Without `model`: the random model is a Qwen3 (q/k norms) rather than a Llama.
    pub qk_norm: bool,
    pub seq_len: usize,
    pub batch_size: usize,
    pub steps: usize,
    pub spec: JobSpec,
    /// Attribute step time to kernel groups (synchronizing around each; slower).
    pub profile: bool,
    /// Bracket the first timed step with the CUDA profiler's start and stop, for
    /// `ncu --profile-from-start off` and the like.
    pub profiler_range: bool,
    /// Example lengths to train on instead of `seq_len` (cycled as needed).
    pub lengths: Option<Vec<usize>>,
}

/// The process's peak resident memory in GiB, loading included: Linux's VmHWM, None elsewhere.
/// On the CPU it is what training takes; `bench train` reports it beside the GPU's peak.
fn peak_rss_gib() -> Option<f64> {
    status_kb("VmHWM:").map(|kb| kb as f64 / (1024.0 * 1024.0))
}

/// A `/proc/self/status` figure in kB (Linux).
fn status_kb(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// The peak of the process's anonymous resident memory (`RssAnon`), polled every millisecond
/// from a thread: what the CPU run itself holds, without the memory-mapped model files whose
/// pages VmHWM also counts.
struct AnonPeak {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl AnonPeak {
    fn start() -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(status_kb("RssAnon:").unwrap_or(0));
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            peak.max(status_kb("RssAnon:").unwrap_or(0))
        });
        AnonPeak { stop, thread }
    }

    /// GiB; None where the kernel does not say.
    fn finish(self) -> Option<f64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let kb = self.thread.join().unwrap_or(0);
        (kb > 0).then(|| kb as f64 / (1024.0 * 1024.0))
    }
}

/// Time forward + backward + optimizer steps on random tokens and report throughput.
pub fn bench_train(args: &BenchArgs) -> Result<serde_json::Value> {
    let (model_dir, _tmp) = model_or_random(&args.model, args.qk_norm)?;
    let dev = crate::model::parse_device(&args.spec.device)
        .map_err(|message| SpecError::new("device", message))?;
    let meter = crate::bench::PeakMemory::start(&dev);
    let anon = AnonPeak::start();
    let loaded = Instant::now();
    let mut model = load_model(&model_dir, &args.spec)?;
    model.add_lora(&args.spec.lora.config(), 0)?;
    crate::bench::sync(model.device())?;
    let load_s = loaded.elapsed().as_secs_f64();
    let vocab = model.config.vocab_size as u32;
    let mut rng = Rng::new(7);
    // Two warm-up steps (allocator pools, kernel loading), then the timed ones.
    let warmup = 2;
    // Uniform examples of seq_len, enough for every step; or the given lengths, repeated
    // until there are as many tokens as uniform steps would take (packing needs the whole set).
    let lengths: Vec<usize> = match &args.lengths {
        None => vec![args.seq_len; args.batch_size * (args.steps + warmup)],
        Some(l) => {
            let want = args.batch_size * (args.steps + warmup) * args.seq_len;
            let mut out = Vec::new();
            let mut total = 0;
            for &n in l.iter().cycle() {
                if total >= want && out.len() >= l.len() {
                    break;
                }
                out.push(n);
                total += n;
            }
            out
        }
    };
    let examples: Vec<Example> = lengths
        .iter()
        .map(|&n| {
            let ids: Vec<u32> = (0..n)
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
        packing: args.spec.data.packing,
        early_stopping: None,
        load_best: false,
    };
    let mut trainer = Trainer::new(&model, &examples, None, 0, opts)?;
    let packing = trainer.packing();
    let mut times = Vec::new();
    let mut step_tokens = Vec::new();
    let mut losses = Vec::new();
    let mut last = Instant::now();
    trainer.run(&AtomicBool::new(false), &mut |e| {
        if let TrainEvent::Step { loss, tokens, .. } = e {
            times.push(last.elapsed().as_secs_f64());
            step_tokens.push(*tokens);
            losses.push(*loss);
            if args.profile && times.len() == warmup {
                crate::ops::profile::start(model.device());
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
    let anon = anon.finish();
    let spans = crate::ops::profile::stop();
    let first = warmup.min(times.len() - 1);
    let mut steady = times[first..].to_vec();
    steady.sort_by(f64::total_cmp);
    let step_s = steady[steady.len() / 2];
    // Uneven steps (given lengths) count their trained tokens over their time.
    let tps = match &args.lengths {
        None => (args.batch_size * args.seq_len) as f64 / step_s,
        Some(_) => {
            step_tokens[first..].iter().sum::<usize>() as f64 / times[first..].iter().sum::<f64>()
        }
    };
    let c = &model.config;
    // Per token: 4·N_linear (forward and input gradient of the frozen linears, LM head
    // included) plus attention, 6·layers·seq·hidden (QKᵀ and PV forward, twice that backward,
    // halved by causality). Checkpointing's recomputation is not counted.
    let linear =
        crate::finetune::preflight::linear_params(c) as usize + c.vocab_size * c.hidden_size;
    let flops_per_token =
        4.0 * linear as f64 + 6.0 * (c.num_hidden_layers * args.seq_len * c.hidden_size) as f64;
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
        "packing": packing,
        "examples": examples.len(),
        "peak_gpu_memory_gib": peak,
        "peak_rss_gib": peak_rss_gib(),
        "peak_anon_rss_gib": anon,
        // What a preflight estimates for this step (uniform lengths only), beside the peaks.
        "estimated_peak_gib": args.lengths.is_none().then(|| {
            use crate::finetune::preflight::{estimate_memory, DeviceKind, StepShape};
            let (b, s) = (args.batch_size as u64, args.seq_len as u64);
            let step = StepShape { tokens: b * s, square_tokens: b * s * s, longest: s };
            let lora = args.spec.lora.config();
            let m = estimate_memory(c, &args.spec, &lora, DeviceKind::of(&args.spec.device), &step);
            m.total as f64 / (1u64 << 30) as f64
        }),
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

/// The model to benchmark: `model`, or a random 4-layer one (hidden 512, bf16; a Qwen3 with
/// `qk_norm`) written to a temporary directory that lives as long as the returned guard.
fn model_or_random(model: &Option<PathBuf>, qk_norm: bool) -> Result<(PathBuf, Option<TempDir>)> {
    if let Some(m) = model {
        return Ok((m.clone(), None));
    }
    let tmp = tempfile_dir()?;
    crate::model::random::RandomLlama {
        vocab_size: 4096,
        hidden_size: 512,
        intermediate_size: 1408,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        tie_word_embeddings: false,
        qk_norm,
        dtype: safetensors::Dtype::BF16,
        seed: 1,
    }
    .write(&tmp.0)?;
    Ok((tmp.0.clone(), Some(tmp)))
}

fn tempfile_dir() -> Result<TempDir> {
    // Unique per call: benchmarks may run side by side in one process (tests do).
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("qlorad-bench-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&p).map_err(crate::finetune::io_err(&p))?;
    Ok(TempDir(p))
}

/// What `qlorad bench generate` measures.
pub struct GenerateBench {
    pub model: Option<PathBuf>,
    pub adapter: Option<PathBuf>,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub batch_size: usize,
    pub spec: JobSpec,
}

/// Time the prompt's pass and the one-token decode steps after it (KV cache, greedy) on random
/// prompts; report prompt and decode tokens/s over all rows.
pub fn bench_generate(args: &GenerateBench) -> Result<serde_json::Value> {
    let (model_dir, _tmp) = model_or_random(&args.model, false)?;
    let loaded = Instant::now();
    let mut model = load_model(&model_dir, &args.spec)?;
    if let Some(a) = &args.adapter {
        model.load_adapter(a)?;
    }
    crate::bench::sync(model.device())?;
    let load_s = loaded.elapsed().as_secs_f64();
    let vocab = model.config.vocab_size as u64;
    let mut rng = Rng::new(7);
    let (b, p) = (args.batch_size.max(1), args.prompt_len.max(1));
    let prompt: Vec<u32> = (0..b * p)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();
    let dev = model.device().clone();
    let run = |timed: bool| -> Result<(f64, f64)> {
        let mut cache = model.kv_cache(vec![0; b]);
        let t0 = Instant::now();
        let mut logits = model.decode_step(
            &candle_core::Tensor::from_vec(prompt.clone(), (b, p), &dev)?,
            &mut cache,
        )?;
        let next: Vec<u32> = logits.argmax(candle_core::D::Minus1)?.to_vec1()?;
        let prompt_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut next = next;
        let steps = if timed { args.new_tokens.max(1) } else { 2 };
        for _ in 0..steps {
            logits = model.decode_step(
                &candle_core::Tensor::from_vec(next, (b, 1), &dev)?,
                &mut cache,
            )?;
            next = logits.argmax(candle_core::D::Minus1)?.to_vec1()?;
        }
        Ok((prompt_s, t1.elapsed().as_secs_f64()))
    };
    run(false)?; // warm-up: allocator pools, kernel loading
    let (prompt_s, decode_s) = run(true)?;
    let c = &model.config;
    Ok(json!({
        "bench": "generate",
        "device": args.spec.device,
        "model": model_dir.display().to_string(),
        "adapter": args.adapter.as_ref().map(|a| a.display().to_string()),
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "quantization": format!("{:?}", args.spec.quantization.kind).to_lowercase(),
        "dtype": format!("{:?}", args.spec.quantization.dtype()).to_lowercase(),
        "batch_size": b,
        "prompt_len": p,
        "new_tokens": args.new_tokens.max(1),
        "load_seconds": load_s,
        "prompt_tokens_per_second": (b * p) as f64 / prompt_s,
        "decode_tokens_per_second": (b * args.new_tokens.max(1)) as f64 / decode_s,
        "decode_ms_per_step": decode_s * 1000.0 / args.new_tokens.max(1) as f64,
    }))
}
