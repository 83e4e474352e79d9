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
