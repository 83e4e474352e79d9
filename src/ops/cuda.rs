//! qlorad's CUDA module (`kernels/qlorad.cu`, compiled to PTX by build.rs) and what every
//! launch shares: loading a kernel, launch shapes, views of candle's CUDA storage.
//!
//! Each launch lives beside its kernel's CPU twin: the fused ops' in their files here, the 4-bit
//! kernels' in `quant::tensor`. What stays is no autograd op: AdamW's update, a plain copy to
//! measure against, and the device's settings.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Layout, Result, Shape, Storage, Tensor};

pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/qlorad.ptx"));
pub(crate) const MODULE: &str = "qlorad";

/// A kernel of qlorad's module, loaded on first use.
macro_rules! func {
    ($dev:expr, $name:expr) => {
        $dev.get_or_load_custom_func(&$name, $crate::ops::cuda::MODULE, $crate::ops::cuda::PTX)
    };
}
pub(crate) use func;

pub(crate) fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => bail!("qlorad kernels: dtype {other:?} is not f32, bf16 or f16"),
    })
}

pub(crate) fn grid(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u64).div_ceil(block as u64).max(1) as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn rows(rows: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The contiguous elements of `s` under `l`.
pub(crate) fn view<'a, T: CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("qlorad kernels: input is not contiguous");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// The CUDA storage of a tensor, which must be contiguous; call `f` with it and its layout.
pub(crate) fn with_cuda<R>(
    t: &Tensor,
    f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>,
) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => f(c, l),
        _ => bail!("qlorad kernels: tensor is not on a CUDA device"),
    }
}

pub(crate) fn tensor(storage: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// One element type's fresh, uninitialized output; every element is written by the kernel.
pub(crate) fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: a kernel given this output writes all n elements before anything reads them.
    unsafe { dev.alloc::<T>(n) }
}

/// Threads per block for rows of `k` values: whole warps, at most 1024.
pub(crate) fn row_block(k: usize) -> u32 {
    (k.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// AdamW hyperparameters of one step, as the kernel takes them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub grad_scale: f32,
    pub decay: f32,
    pub w1: f32,
    pub b2: f32,
    pub w2: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
}

/// One AdamW update in place of f32 parameter `p` and moments `m`, `v` from gradient `g`.
pub fn adamw(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, a: AdamWStep) -> Result<()> {
    let n = p.elem_count();
    for t in [m, v, g] {
        if t.elem_count() != n || t.dtype() != DType::F32 || !t.is_contiguous() {
            bail!("adamw: moments and gradient must be contiguous f32 of {n} elements");
        }
    }
    let n64 = n as i64;
    with_cuda(p, |ps, pl| {
        with_cuda(m, |ms, ml| {
            with_cuda(v, |vs, vl| {
                with_cuda(g, |gs, gl| {
                    let dev = ps.device().clone();
                    let f = func!(dev, "adamw_f32")?;
                    let (pv, mv, vv, gv) = (
                        view::<f32>(ps, pl)?,
                        view::<f32>(ms, ml)?,
                        view::<f32>(vs, vl)?,
                        view::<f32>(gs, gl)?,
                    );
                    let mut b = f.builder();
                    b.arg(&pv)
                        .arg(&mv)
                        .arg(&vv)
                        .arg(&gv)
                        .arg(&n64)
                        .arg(&a.grad_scale)
                        .arg(&a.decay)
                        .arg(&a.w1)
                        .arg(&a.b2)
                        .arg(&a.w2)
                        .arg(&a.step_size)
                        .arg(&a.bc2_sqrt)
                        .arg(&a.eps);
                    // SAFETY: argument types and counts match the kernel's signature; the
                    // kernel updates p, m and v in place on the device's one stream.
                    unsafe { b.launch(grid(n, 256)) }.w()?;
                    Ok(())
                })
            })
        })
    })
}

/// A device-to-device copy of `t` into fresh memory (for bandwidth comparisons).
pub fn copy(t: &Tensor) -> Result<Tensor> {
    with_cuda(t, |s, l| {
        let out = s.try_clone(l)?;
        Ok(tensor(out, t.shape().clone()))
    })
}

/// Let the device's stream-ordered allocator keep freed memory for reuse instead of returning
/// it to the driver at every synchronization (torch's caching allocator does the same): a
/// training step then allocates from the pool, not from the driver.
pub fn keep_freed_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().w()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: plain driver calls on the context bound above, with valid out-pointers.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .w()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
        .w()?;
    }
    Ok(())
}

/// Open (`true`) or close the range a profiler started with `--profile-from-start off`
/// (`ncu`, `nsys`) records.
pub fn profiler_range(dev: &CudaDevice, on: bool) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    dev.cuda_stream().context().bind_to_thread().w()?;
    // SAFETY: argument-free driver calls on the context bound above.
    unsafe {
        if on {
            sys::cuProfilerStart().result().w()
        } else {
            sys::cuProfilerStop().result().w()
        }
    }
}
