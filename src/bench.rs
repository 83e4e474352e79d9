//! `qlorad bench kernels`: the 4-bit kernels' speed against a plain copy on the same device,
//! and their results against the CPU path, bit for bit; and the GPU memory meter of
//! `qlorad bench train`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::quant::{FloatSlice, Quant4Tensor, QuantConfig, QuantError};
use crate::rng::Rng;

/// Why `bench_kernels` failed: in the 4-bit codec or in candle.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Wait until the device has finished everything queued.
pub fn sync(device: &Device) -> candle_core::Result<()> {
    device.synchronize()
}

/// Open or close an external profiler's capture range (CUDA only; a no-op elsewhere).
pub fn profiler_range(device: &Device, on: bool) -> candle_core::Result<()> {
    sync(device)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        crate::ops::cuda::profiler_range(d, on)?;
    }
    let _ = on;
    Ok(())
}

/// The device's peak memory use while it runs, polled every millisecond from a thread:
/// everything allocated on the device beyond what was in use at the start (allocator pools,
/// cuBLAS workspaces and all), so it is an upper bound on what tensors alone held.
pub struct PeakMemory {
    #[cfg(feature = "cuda")]
    inner: Option<(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<u64>,
        u64,
    )>,
}

impl PeakMemory {
    pub fn start(device: &Device) -> Self {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            use std::sync::atomic::{AtomicBool, Ordering};
            use std::sync::Arc;
            let ctx = d.cuda_stream().context().clone();
            let used = |ctx: &candle_core::cuda_backend::cudarc::driver::CudaContext| {
                ctx.mem_get_info()
                    .map(|(free, total)| (total - free) as u64)
                    .unwrap_or(0)
            };
            let base = used(&ctx);
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let handle = std::thread::spawn(move || {
                let mut peak = 0;
                while !flag.load(Ordering::Relaxed) {
                    peak = peak.max(used(&ctx));
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                peak.max(used(&ctx))
            });
            return PeakMemory {
                inner: Some((stop, handle, base)),
            };
        }
        let _ = device;
        PeakMemory {
            #[cfg(feature = "cuda")]
            inner: None,
        }
    }

    /// GiB above the starting use; None on the CPU.
    pub fn finish(self) -> Option<f64> {
        #[cfg(feature = "cuda")]
        if let Some((stop, handle, base)) = self.inner {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let peak = handle.join().unwrap_or(0);
            return Some(peak.saturating_sub(base) as f64 / (1u64 << 30) as f64);
        }
        None
    }
}

/// Mean seconds per run of `f` over `iters` runs queued back to back after a warm-up, with one
/// synchronization at the end (so launch latency and allocation overlap the kernels, as in
/// training).
fn time(
    device: &Device,
    iters: usize,
    mut f: impl FnMut() -> Result<(), BenchError>,
) -> Result<f64, BenchError> {
    f()?;
    sync(device)?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    sync(device)?;
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Quantize and dequantize a random `[rows, cols]` bf16 weight on `device`; check both against
/// the CPU path and time dequantization against a device-to-device copy of its bf16 output.
/// Also checks the fused training ops against the CPU on small random inputs.
pub fn bench_kernels(
    device: &Device,
    rows: usize,
    cols: usize,
    iters: usize,
) -> Result<serde_json::Value, BenchError> {
    let n = rows * cols;
    let mut rng = Rng::new(11);
    let host: Vec<half::bf16> = (0..n)
        .map(|_| half::bf16::from_f32(rng.uniform(-1.0, 1.0) * 0.05))
        .collect();
    let cfg = QuantConfig::default(); // NF4, blocks of 64, double quantization
    let cpu =
        Quant4Tensor::quantize_slice(FloatSlice::BF16(&host), (rows, cols), &cfg, &Device::Cpu)?;
    let x = Tensor::from_slice(&host, (rows, cols), device)?;

    let t = Instant::now();
    let q = Quant4Tensor::quantize(&x, &cfg)?;
    sync(device)?;
    let quantize_s = t.elapsed().as_secs_f64();
    let quantize_matches = q.packed_bytes()? == cpu.packed_bytes()? && q.absmax() == cpu.absmax();

    let deq = q.dequantize(DType::BF16)?;
    let deq_cpu = cpu.dequantize(DType::BF16)?;
    let dequantize_matches = deq
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<half::bf16>()?
        .iter()
        .map(|v| v.to_bits())
        .eq(deq_cpu
            .flatten_all()?
            .to_vec1::<half::bf16>()?
            .iter()
            .map(|v| v.to_bits()));

    let dequant_s = time(device, iters, || {
        q.dequantize(DType::BF16)?;
        Ok(())
    })?;
    let copy_s = time(device, iters, || {
        copy(&deq)?;
        Ok(())
    })?;
    // Bytes moved: packed codes and absmax read, bf16 written; a copy reads and writes.
    let dequant_bytes = (q.storage_bytes() + 2 * n) as f64;
    let copy_bytes = (2 * 2 * n) as f64;
    let (dequant_bw, copy_bw) = (dequant_bytes / dequant_s, copy_bytes / copy_s);

    Ok(json!({
        "device": format!("{device:?}"),
        "weight": [rows, cols],
        "quantize_seconds": quantize_s,
        "quantize_matches_cpu": quantize_matches,
        "dequantize_matches_cpu": dequantize_matches,
        "dequantize_bf16_seconds_mean": dequant_s,
        "dequantize_gb_per_s": dequant_bw / 1e9,
        "copy_gb_per_s": copy_bw / 1e9,
        "dequantize_over_copy": dequant_bw / copy_bw,
        "fused_ops_max_abs_diff_vs_cpu": fused_ops_vs_cpu(device)?,
    }))
}

/// A device-to-device copy into fresh memory.
fn copy(t: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() {
        return crate::ops::cuda::copy(t);
    }
    t.copy()
}

/// The fused ops on `device` against the same ops on the CPU, in f32 and bf16.
fn fused_ops_vs_cpu(device: &Device) -> candle_core::Result<serde_json::Value> {
    let cpu = Device::Cpu;
    let mut out = serde_json::Map::new();
    for dtype in [DType::F32, DType::BF16] {
        let name = format!("{dtype:?}").to_lowercase();
        // Keys of 64 and 2048 take the warp-per-row kernels, 2056 the block-per-row one, 100
        // the general one.
        for (q, k) in [(64, 64), (16, 2048), (16, 2056), (24, 100)] {
            let s = Tensor::randn(0f32, 2.0, (2, 4, q, k), &cpu)?.to_dtype(dtype)?;
            let keep = Tensor::from_vec(
                (0..2 * k).map(|i| (i % 17 != 3) as u8).collect::<Vec<u8>>(),
                (2, k),
                &cpu,
            )?;
            let w = Tensor::randn(0f32, 1.0, (2, 4, q, k), &cpu)?.to_dtype(dtype)?;
            let run = |dev: &Device| -> candle_core::Result<(Tensor, Tensor)> {
                let s = candle_core::Var::from_tensor(&s.to_device(dev)?)?;
                let p =
                    crate::ops::attn_softmax(s.as_tensor(), &keep.to_device(dev)?, 0.125, true)?;
                let g = (&p * w.to_device(dev)?)?.sum_all()?.backward()?;
                Ok((p, g.get(s.as_tensor()).expect("gradient").clone()))
            };
            let ((p0, g0), (p1, g1)) = (run(&cpu)?, run(device)?);
            out.insert(
                format!("attn_softmax_k{k}_{name}"),
                json!(max_abs_diff(&p0, &p1)?),
            );
            out.insert(
                format!("attn_softmax_grad_k{k}_{name}"),
                json!(max_abs_diff(&g0, &g1)?),
            );
        }

        let logits = Tensor::randn(0f32, 3.0, (8, 1000), &cpu)?.to_dtype(dtype)?;
        let targets = Tensor::from_vec((0..8u32).map(|i| i * 97).collect::<Vec<_>>(), 8, &cpu)?;
        let run = |dev: &Device| -> candle_core::Result<(Tensor, Tensor)> {
            let x = candle_core::Var::from_tensor(&logits.to_device(dev)?)?;
            let nll = crate::ops::cross_entropy(x.as_tensor(), &targets.to_device(dev)?)?;
            let g = nll.sum_all()?.backward()?;
            Ok((nll, g.get(x.as_tensor()).expect("gradient").clone()))
        };
        let ((l0, g0), (l1, g1)) = (run(&cpu)?, run(device)?);
        out.insert(
            format!("cross_entropy_{name}"),
            json!(max_abs_diff(&l0, &l1)?),
        );
        out.insert(
            format!("cross_entropy_grad_{name}"),
            json!(max_abs_diff(&g0, &g1)?),
        );

        // RMSNorm, rope and SwiGLU, forward and input gradient.
        let x = Tensor::randn(0f32, 1.0, (2, 16, 4, 64), &cpu)?.to_dtype(dtype)?;
        let w = Tensor::randn(1f32, 0.1, 64, &cpu)?.to_dtype(dtype)?;
        let ang = Tensor::randn(0f32, 1.0, (16, 64), &cpu)?;
        let (cos, sin) = (ang.cos()?.to_dtype(dtype)?, ang.sin()?.to_dtype(dtype)?);
        type Op<'a> = Box<dyn Fn(&Tensor, &Device) -> candle_core::Result<Tensor> + 'a>;
        let cases: [(&str, Op); 3] = [
            (
                "rms_norm",
                Box::new(|x, d| crate::ops::rms_norm(x, &w.to_device(d)?, 1e-5)),
            ),
            (
                "rope",
                Box::new(|x, d| crate::ops::rope(x, &cos.to_device(d)?, &sin.to_device(d)?)),
            ),
            (
                "swiglu",
                Box::new(|x, _| crate::ops::swiglu(x, &(x * 0.5)?)),
            ),
        ];
        for (op, f) in cases {
            let run = |dev: &Device| -> candle_core::Result<(Tensor, Tensor)> {
                let v = candle_core::Var::from_tensor(&x.to_device(dev)?)?;
                let y = f(v.as_tensor(), dev)?;
                let g = y.sqr()?.sum_all()?.backward()?;
                Ok((y, g.get(v.as_tensor()).expect("gradient").clone()))
            };
            let ((y0, g0), (y1, g1)) = (run(&cpu)?, run(device)?);
            out.insert(format!("{op}_{name}"), json!(max_abs_diff(&y0, &y1)?));
            out.insert(format!("{op}_grad_{name}"), json!(max_abs_diff(&g0, &g1)?));
        }

        let x = Tensor::randn(0f32, 1.0, (64, 256), &cpu)?.to_dtype(dtype)?;
        let d0 = crate::ops::dropout(&x, 0.1, 5)?;
        let d1 = crate::ops::dropout(&x.to_device(device)?, 0.1, 5)?;
        out.insert(format!("dropout_{name}"), json!(max_abs_diff(&d0, &d1)?));

        // In-place accumulations of the hand-written backward.
        let acc = Tensor::randn(0f32, 1.0, (64, 256), &cpu)?.to_dtype(dtype)?;
        let a = Tensor::randn(0f32, 1.0, (64, 48), &cpu)?.to_dtype(dtype)?;
        let b = Tensor::randn(0f32, 1.0, (256, 48), &cpu)?.to_dtype(dtype)?;
        let on = |t: &Tensor| t.to_device(device);
        let d0 = crate::ops::dropout_add(acc.copy()?, &x, 0.1, 5)?;
        let d1 = crate::ops::dropout_add(on(&acc)?.copy()?, &on(&x)?, 0.1, 5)?;
        out.insert(
            format!("dropout_add_{name}"),
            json!(max_abs_diff(&d0, &d1)?),
        );
        let m0 = crate::ops::matmul_add(acc.copy()?, &a, &b, true)?;
        let m1 = crate::ops::matmul_add(on(&acc)?.copy()?, &on(&a)?, &on(&b)?, true)?;
        out.insert(
            format!("matmul_add_t_{name}"),
            json!(max_abs_diff(&m0, &m1)?),
        );
        let bt = b.t()?.contiguous()?;
        let m0 = crate::ops::matmul_add(acc.copy()?, &a, &bt, false)?;
        let m1 = crate::ops::matmul_add(on(&acc)?.copy()?, &on(&a)?, &on(&bt)?, false)?;
        out.insert(format!("matmul_add_{name}"), json!(max_abs_diff(&m0, &m1)?));
    }
    Ok(serde_json::Value::Object(out))
}

/// ‖a − b‖ / ‖b‖, on the CPU in f32.
fn rel_err(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let n = |t: &Tensor| -> candle_core::Result<f32> { t.sqr()?.sum_all()?.sqrt()?.to_scalar() };
    Ok(n(&(&a - &b)?)? / n(&b)?)
}

/// One attention problem: q `[b, nh, s, hd]`, k and v `[b, nkv, s, hd]`, dL/dout `[b·s, nh·hd]`.
struct AttnCase {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_out: Tensor,
    segments: Vec<(usize, usize)>,
    scale: f64,
}

impl AttnCase {
    fn random(
        (b, nh, nkv, hd): (usize, usize, usize, usize),
        lengths: &[usize],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let s: usize = lengths.iter().sum();
        let r = |shape: &[usize]| -> candle_core::Result<Tensor> {
            Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)
        };
        Ok(AttnCase {
            q: r(&[b, nh, s, hd])?,
            k: r(&[b, nkv, s, hd])?,
            v: r(&[b, nkv, s, hd])?,
            g_out: r(&[b * s, nh * hd])?,
            segments: crate::ops::attention::segments(lengths),
            scale: 1.0 / (hd as f64).sqrt(),
        })
    }

    fn to(&self, device: &Device, dtype: DType) -> candle_core::Result<Self> {
        let m = |t: &Tensor| t.to_device(device)?.to_dtype(dtype);
        Ok(AttnCase {
            q: m(&self.q)?,
            k: m(&self.k)?,
            v: m(&self.v)?,
            g_out: m(&self.g_out)?,
            segments: self.segments.clone(),
            scale: self.scale,
        })
    }

    /// Output and dq, dk, dv, through the fused engine where it runs (`fused`), else blocked.
    fn run(&self, fused: bool) -> candle_core::Result<[Tensor; 4]> {
        let (b, _, s, _) = self.q.dims4()?;
        let keep = Tensor::ones((b, s), DType::U8, self.q.device())?;
        let att = crate::ops::attention::Attention {
            keep: &keep,
            scale: self.scale,
            segments: &self.segments,
            block_elements: 1 << 27,
            keep_elements: 1 << 27,
            dense_keys: fused,
        };
        let (out, kept) = att.forward(&self.q, &self.k, &self.v, true)?;
        let (gq, gk, gv) = att.backward(&self.q, &self.k, &self.v, kept, &self.g_out)?;
        Ok([out, gq, gk, gv])
    }

    /// Causal score FLOPs of the forward (sdpa_bench's count: 4·n²·d·h/2 per sequence).
    fn flops(&self) -> candle_core::Result<f64> {
        let (_, nh, _, hd) = self.q.dims4()?;
        Ok(self
            .segments
            .iter()
            .map(|&(_, n)| 4.0 * (n * n) as f64 * (hd * nh) as f64 / 2.0)
            .sum())
    }
}

/// `qlorad bench attention`: the engine training runs on `device` against the blocked attention
/// on the CPU in f32, then forward and backward speed per sequence length.
pub fn bench_attention(
    device: &Device,
    seqs: &[usize],
    iters: usize,
    blocked_up_to: usize,
) -> Result<serde_json::Value, BenchError> {
    let dtype = if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    #[cfg(feature = "cudnn")]
    let engine = match crate::ops::cudnn::version() {
        Some(v) if device.is_cuda() => format!("cudnn {v}"),
        _ => "blocked".to_string(),
    };
    #[cfg(not(feature = "cudnn"))]
    let engine = "blocked".to_string();

    // Whole rows, a batch of two, grouped heads, packed segments of ragged lengths.
    type Heads = (usize, usize, usize, usize);
    let cases: [(&str, Heads, &[usize]); 6] = [
        ("row_h8_kv2_d128", (1, 8, 2, 128), &[300]),
        ("batch2_h4_kv4_d128", (2, 4, 4, 128), &[256]),
        ("row_h4_kv1_d64", (1, 4, 1, 64), &[200]),
        ("row_h4_kv2_d256", (1, 4, 2, 256), &[160]),
        (
            "packed_h8_kv2_d128",
            (1, 8, 2, 128),
            &[70, 3, 1, 130, 9, 257],
        ),
        ("packed_h4_kv2_d64", (1, 4, 2, 64), &[64, 64, 1, 500]),
    ];
    let mut checks = serde_json::Map::new();
    for (name, dims, lengths) in cases {
        let case = AttnCase::random(dims, lengths, DType::F32, &Device::Cpu)?;
        let want = case.run(false)?;
        let got = case.to(device, dtype)?.run(true)?;
        let errs: Vec<f32> = got
            .iter()
            .zip(&want)
            .map(|(g, w)| rel_err(g, w))
            .collect::<candle_core::Result<_>>()?;
        checks.insert(
            name.to_string(),
            json!({"out": errs[0], "dq": errs[1], "dk": errs[2], "dv": errs[3]}),
        );
    }

    let mut timings = Vec::new();
    for &s in seqs {
        for (layout, lengths) in [
            ("row", vec![s]),
            // Alpaca-like examples packed into the row: 100 to 1,500 tokens.
            ("packed", packed_lengths(s)),
        ] {
            let case = AttnCase::random((1, 32, 8, 128), &lengths, dtype, device)?;
            let mut row = serde_json::Map::new();
            row.insert("seq".into(), json!(s));
            row.insert("layout".into(), json!(layout));
            row.insert("examples".into(), json!(lengths.len()));
            let fl = case.flops()?;
            let engines: &[bool] = if s <= blocked_up_to {
                &[true, false]
            } else {
                &[true]
            };
            for &fused in engines {
                let label = if fused { "engine" } else { "blocked" };
                let (b, _, sq, _) = case.q.dims4()?;
                let keep = Tensor::ones((b, sq), DType::U8, device)?;
                let att = crate::ops::attention::Attention {
                    keep: &keep,
                    scale: case.scale,
                    segments: &case.segments,
                    block_elements: 1 << 27,
                    keep_elements: 1 << 32,
                    dense_keys: fused,
                };
                let fwd = time(device, iters, || {
                    att.forward(&case.q, &case.k, &case.v, false)?;
                    Ok(())
                })?;
                let both = time(device, iters, || {
                    let (_, kept) = att.forward(&case.q, &case.k, &case.v, true)?;
                    att.backward(&case.q, &case.k, &case.v, kept, &case.g_out)?;
                    Ok(())
                })?;
                let bwd = (both - fwd).max(1e-9);
                row.insert(format!("{label}_fwd_ms"), json!(fwd * 1e3));
                row.insert(format!("{label}_bwd_ms"), json!(bwd * 1e3));
                row.insert(format!("{label}_fwd_tflops"), json!(fl / fwd / 1e12));
                row.insert(format!("{label}_bwd_tflops"), json!(2.5 * fl / bwd / 1e12));
            }
            timings.push(serde_json::Value::Object(row));
        }
    }
    Ok(json!({
        "device": format!("{device:?}"),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "engine": engine,
        "heads": [32, 8],
        "head_dim": 128,
        "relative_error_vs_cpu_blocked_f32": checks,
        "timings": timings,
    }))
}

/// Example lengths filling `total` tokens, drawn as Alpaca-style instruction data (100 to
/// 1,500 tokens, most of them short), the last one cut to fit.
fn packed_lengths(total: usize) -> Vec<usize> {
    let mut rng = Rng::new(7);
    let mut out = Vec::new();
    let mut left = total;
    while left > 0 {
        // A skewed draw: the square of a uniform number puts most examples near the short end.
        let u = rng.uniform(0.0, 1.0);
        let n = (100.0 + 1400.0 * u * u) as usize;
        let n = n.min(left);
        out.push(n);
        left -= n;
    }
    out
}
