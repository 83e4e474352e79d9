//! cuDNN's fused flash attention (`kernels/cudnn_attention.cpp`, through cudnn-frontend's
//! graph API), the GPU engine of `ops::attention` under the `cudnn` feature: causal, grouped-query
//! heads without repeating k and v, bf16 or f16 with f32 inside, nothing of size `[s, s]` in
//! memory; the forward keeps the log-sum-exp of each query's scores for the backward. A row of
//! examples laid end to end is one launch: its segments are cuDNN's ragged sequences, so no
//! example sees another.
//!
//! libcudnn.so.9 is opened at first use (`QLORAD_CUDNN_LIB`, else the library path). Where it is
//! absent, or cuDNN cannot run a shape, the calls answer `None` and the caller runs its blocked
//! attention; `QLORAD_ATTENTION=blocked` asks for that everywhere (to compare the two).

use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{bail, DType, Result, Tensor};
use half::{bf16, f16};

use super::cuda::{alloc, tensor, with_cuda};

/// One call's shape, as `kernels/cudnn_attention.cpp` takes it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Shape {
    b: i64,
    hq: i64,
    hkv: i64,
    s: i64,
    d: i64,
    ragged: i32,
    dtype: i32,
    device: i32,
    scale: f32,
}

/// One call's device pointers; a direction leaves those it does not use null.
#[repr(C)]
struct Ptrs {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    stats: u64,
    dout: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    seq_len: u64,
    off_q: u64,
    off_kv: u64,
    off_stats: u64,
}

extern "C" {
    fn qlorad_cudnn_open(path: *const c_char, err: *mut c_char, n: usize) -> i64;
    fn qlorad_sdpa_plan(p: *const Shape, backward: i32, err: *mut c_char, n: usize) -> i64;
    fn qlorad_sdpa_run(
        p: *const Shape,
        backward: i32,
        stream: *mut c_void,
        x: *const Ptrs,
        workspace: *mut c_void,
        err: *mut c_char,
        n: usize,
    ) -> i32;
}

const ERR: usize = 2048;

fn message(err: &[c_char; ERR]) -> String {
    // SAFETY: the shim writes a NUL-terminated string into the buffer (or leaves it zeroed).
    unsafe { CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// cuDNN's version (e.g. 91301) once libcudnn is open, `None` where it cannot be.
pub fn version() -> Option<i64> {
    static VERSION: OnceLock<Option<i64>> = OnceLock::new();
    *VERSION.get_or_init(|| {
        if std::env::var("QLORAD_ATTENTION").is_ok_and(|v| v == "blocked") {
            return None;
        }
        let path = CString::new(std::env::var("QLORAD_CUDNN_LIB").unwrap_or_default()).ok()?;
        let mut err = [0 as c_char; ERR];
        // SAFETY: a NUL-terminated path and an error buffer of the length given.
        let v = unsafe { qlorad_cudnn_open(path.as_ptr(), err.as_mut_ptr(), ERR) };
        if v == 0 {
            tracing::warn!(
                "cuDNN attention unavailable, blocked attention instead: {}",
                message(&err)
            );
            return None;
        }
        tracing::info!("attention through cuDNN {v}");
        Some(v)
    })
}

/// A packed row's segments on the device, as cuDNN's ragged sequences take them: lengths, and
/// element offsets of q (and the output), of k and v, and of the log-sum-exp.
struct Ragged {
    seq_len: Tensor,
    off_q: Tensor,
    off_kv: Tensor,
    off_stats: Tensor,
    count: usize,
    bound: usize,
}

impl Ragged {
    fn new(
        segments: &[(usize, usize)],
        (hq, hkv, d): (usize, usize, usize),
        dev: &candle_core::Device,
    ) -> Result<Self> {
        let plan = super::attention::RaggedPlan::new(segments);
        let off = |per: usize| -> Result<Tensor> {
            let v: Vec<u32> = plan.starts.iter().map(|&s| s * per as u32).collect();
            Tensor::from_vec(v, plan.count + 1, dev)
        };
        Ok(Ragged {
            seq_len: Tensor::from_vec(plan.lengths.clone(), plan.count, dev)?,
            off_q: off(hq * d)?,
            off_kv: off(hkv * d)?,
            off_stats: off(hq)?,
            count: plan.count,
            bound: plan.bound,
        })
    }
}

/// A contiguous CUDA tensor's device address.
fn address(t: &Tensor) -> Result<u64> {
    with_cuda(t, |s, l| {
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("cuDNN attention: input is not contiguous");
        };
        let stream = s.device.cuda_stream();
        Ok(match t.dtype() {
            DType::BF16 => {
                s.as_cuda_slice::<bf16>()?
                    .slice(start..end)
                    .device_ptr(&stream)
                    .0
            }
            DType::F16 => {
                s.as_cuda_slice::<f16>()?
                    .slice(start..end)
                    .device_ptr(&stream)
                    .0
            }
            DType::F32 => {
                s.as_cuda_slice::<f32>()?
                    .slice(start..end)
                    .device_ptr(&stream)
                    .0
            }
            DType::U32 => {
                s.as_cuda_slice::<u32>()?
                    .slice(start..end)
                    .device_ptr(&stream)
                    .0
            }
            other => bail!("cuDNN attention: dtype {other:?}"),
        })
    })
}

/// A fresh tensor of `shape` whose every element cuDNN writes.
fn fresh(dev: &CudaDevice, dtype: DType, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let storage = match dtype {
        DType::BF16 => CudaStorage::wrap_cuda_slice(alloc::<bf16>(dev, n)?, dev.clone()),
        DType::F16 => CudaStorage::wrap_cuda_slice(alloc::<f16>(dev, n)?, dev.clone()),
        DType::F32 => CudaStorage::wrap_cuda_slice(alloc::<f32>(dev, n)?, dev.clone()),
        other => bail!("cuDNN attention: dtype {other:?}"),
    };
    Ok(tensor(storage, shape.to_vec()))
}

/// What one call needs besides its tensors.
struct Call {
    dev: CudaDevice,
    shape: Shape,
    ragged: Option<Ragged>,
}

impl Call {
    /// The call for q `[b, nh, s, hd]` and k `[b, nkv, s, hd]` over `segments`, or `None` when
    /// cuDNN is not there or does not take these inputs.
    fn new(
        q: &Tensor,
        k: &Tensor,
        segments: &[(usize, usize)],
        scale: f64,
    ) -> Result<Option<Self>> {
        let candle_core::Device::Cuda(dev) = q.device() else {
            return Ok(None);
        };
        let dtype = match q.dtype() {
            DType::BF16 => 0,
            DType::F16 => 1,
            _ => return Ok(None),
        };
        let (b, nh, s, hd) = q.dims4()?;
        let nkv = k.dim(1)?;
        if version().is_none() || !matches!(hd, 64 | 128 | 256) || nh % nkv != 0 {
            return Ok(None);
        }
        let whole = segments.len() == 1 && segments[0] == (0, s);
        if !whole && b != 1 {
            return Ok(None);
        }
        let ragged = if whole {
            None
        } else {
            Some(Ragged::new(segments, (nh, nkv, hd), q.device())?)
        };
        let shape = Shape {
            b: ragged.as_ref().map_or(b, |r| r.count) as i64,
            hq: nh as i64,
            hkv: nkv as i64,
            s: ragged.as_ref().map_or(s, |r| r.bound) as i64,
            d: hd as i64,
            ragged: ragged.is_some() as i32,
            dtype,
            device: dev.cuda_stream().context().ordinal() as i32,
            scale: scale as f32,
        };
        Ok(Some(Call {
            dev: dev.clone(),
            shape,
            ragged,
        }))
    }

    /// Plan and queue one direction; `Ok(false)` when cuDNN cannot run this shape.
    fn run(&self, backward: bool, mut ptrs: Ptrs) -> Result<bool> {
        let mut err = [0 as c_char; ERR];
        // SAFETY: a valid shape and an error buffer of the length given.
        let ws = unsafe { qlorad_sdpa_plan(&self.shape, backward as i32, err.as_mut_ptr(), ERR) };
        if ws < 0 {
            warn_once(&self.shape, backward, &message(&err));
            return Ok(false);
        }
        if let Some(r) = &self.ragged {
            ptrs.seq_len = address(&r.seq_len)?;
            ptrs.off_q = address(&r.off_q)?;
            ptrs.off_kv = address(&r.off_kv)?;
            ptrs.off_stats = address(&r.off_stats)?;
        }
        let stream = self.dev.cuda_stream();
        stream.context().bind_to_thread().w()?;
        let workspace = (ws > 0)
            .then(|| alloc::<u8>(&self.dev, ws as usize))
            .transpose()?;
        let ws_ptr = match &workspace {
            Some(w) => w.device_ptr(&stream).0 as *mut c_void,
            None => std::ptr::null_mut(),
        };
        // SAFETY: every pointer addresses a live tensor of the shape the graph was built for,
        // on the stream given; the workspace is as large as the graph asked.
        let rc = unsafe {
            qlorad_sdpa_run(
                &self.shape,
                backward as i32,
                stream.cu_stream() as *mut c_void,
                &ptrs,
                ws_ptr,
                err.as_mut_ptr(),
                ERR,
            )
        };
        if rc != 0 {
            bail!("cuDNN attention: {}", message(&err));
        }
        Ok(true)
    }
}

/// Say once per shape and direction why cuDNN could not run it.
fn warn_once(shape: &Shape, backward: bool, why: &str) {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static SEEN: Mutex<Option<HashSet<(i64, i64, i64, i64, i64, i32, bool)>>> = Mutex::new(None);
    let key = (
        shape.b,
        shape.hq,
        shape.hkv,
        shape.s,
        shape.d,
        shape.ragged,
        backward,
    );
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if seen.get_or_insert_with(HashSet::new).insert(key) {
        tracing::warn!(
            "cuDNN attention cannot run b {} heads {}/{} s {} d {} ({}): {why}; blocked attention instead",
            shape.b,
            shape.hq,
            shape.hkv,
            shape.s,
            shape.d,
            if backward { "backward" } else { "forward" },
        );
    }
}

/// Token-major `[1, s, heads, hd]` of a `[1, heads, s, hd]` tensor, as ragged calls take it.
fn token_major(t: &Tensor) -> Result<Tensor> {
    t.transpose(1, 2)?.contiguous()
}

/// What the fused forward keeps for its backward: its output `[b, s, nh·hd]` and the log-sum-exp
/// of every query's scores (f32, `[b, nh, s]` or token-major `[s, nh]` for segments).
pub struct Saved {
    pub out: Tensor,
    pub lse: Tensor,
}

/// Causal attention of q `[b, nh, s, hd]` over k and v `[b, nkv, s, hd]` (contiguous), each
/// segment on its own: the output `[b, s, nh·hd]` and what the backward reads, or `None` when
/// cuDNN cannot run it.
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[(usize, usize)],
    scale: f64,
) -> Result<Option<Saved>> {
    let Some(call) = Call::new(q, k, segments, scale)? else {
        return Ok(None);
    };
    let (b, nh, s, hd) = q.dims4()?;
    let (q, k, v) = match call.ragged {
        Some(_) => (token_major(q)?, token_major(k)?, token_major(v)?),
        None => (q.contiguous()?, k.contiguous()?, v.contiguous()?),
    };
    let out = fresh(&call.dev, q.dtype(), &[b, s, nh * hd])?;
    let lse = fresh(&call.dev, DType::F32, &[b, nh, s])?;
    let ptrs = Ptrs {
        q: address(&q)?,
        k: address(&k)?,
        v: address(&v)?,
        o: address(&out)?,
        stats: address(&lse)?,
        dout: 0,
        dq: 0,
        dk: 0,
        dv: 0,
        seq_len: 0,
        off_q: 0,
        off_kv: 0,
        off_stats: 0,
    };
    Ok(call.run(false, ptrs)?.then_some(Saved { out, lse }))
}

/// dL/dq `[b, nh, s, hd]`, dL/dk and dL/dv `[b, nkv, s, hd]` of `forward`, given what it kept
/// and dL/dout `[b·s, nh·hd]`; `None` when cuDNN cannot run it.
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    saved: &Saved,
    g_out: &Tensor,
    segments: &[(usize, usize)],
    scale: f64,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let Some(call) = Call::new(q, k, segments, scale)? else {
        return Ok(None);
    };
    let (b, nh, s, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let ragged = call.ragged.is_some();
    let (qi, ki, vi) = if ragged {
        (token_major(q)?, token_major(k)?, token_major(v)?)
    } else {
        (q.contiguous()?, k.contiguous()?, v.contiguous()?)
    };
    let g_out = g_out.to_dtype(q.dtype())?.contiguous()?;
    let dtype = q.dtype();
    let (gq, gk, gv) = if ragged {
        (
            fresh(&call.dev, dtype, &[b, s, nh, hd])?,
            fresh(&call.dev, dtype, &[b, s, nkv, hd])?,
            fresh(&call.dev, dtype, &[b, s, nkv, hd])?,
        )
    } else {
        (
            fresh(&call.dev, dtype, &[b, nh, s, hd])?,
            fresh(&call.dev, dtype, &[b, nkv, s, hd])?,
            fresh(&call.dev, dtype, &[b, nkv, s, hd])?,
        )
    };
    let ptrs = Ptrs {
        q: address(&qi)?,
        k: address(&ki)?,
        v: address(&vi)?,
        o: address(&saved.out)?,
        stats: address(&saved.lse)?,
        dout: address(&g_out)?,
        dq: address(&gq)?,
        dk: address(&gk)?,
        dv: address(&gv)?,
        seq_len: 0,
        off_q: 0,
        off_kv: 0,
        off_stats: 0,
    };
    if !call.run(true, ptrs)? {
        return Ok(None);
    }
    Ok(Some(if ragged {
        (token_major(&gq)?, token_major(&gk)?, token_major(&gv)?)
    } else {
        (gq, gk, gv)
    }))
}
