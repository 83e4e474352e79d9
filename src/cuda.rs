//! Launches of qlorad's own CUDA kernels (`kernels/qlorad.cu`, compiled to PTX by build.rs).
//!
//! Each function takes candle CUDA storage, checks what the kernel assumes (contiguity, dtype,
//! sizes) and returns fresh storage on the same stream. The kernels' CPU twins live beside the
//! ops that use them.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Layout, Result, Shape, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/qlorad.ptx"));
const MODULE: &str = "qlorad";

/// A kernel of qlorad's module, loaded on first use.
macro_rules! func {
    ($dev:expr, $name:expr) => {
        $dev.get_or_load_custom_func(&$name, MODULE, PTX)
    };
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => bail!("qlorad kernels: dtype {other:?} is not f32, bf16 or f16"),
    })
}

fn grid(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u64).div_ceil(block as u64).max(1) as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn rows(rows: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The contiguous elements of `s` under `l`.
fn view<'a, T: CudaDType + DeviceRepr>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("qlorad kernels: input is not contiguous");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// The CUDA storage of a tensor, which must be contiguous; call `f` with it and its layout.
fn with_cuda<R>(t: &Tensor, f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => f(c, l),
        _ => bail!("qlorad kernels: tensor is not on a CUDA device"),
    }
}

fn tensor(storage: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// One element type's fresh, uninitialized output; every element is written by the kernel.
fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: each kernel below writes all n elements before anything reads them.
    unsafe { dev.alloc::<T>(n) }
}

/// Where a 4-bit weight's absmax lives on the device.
pub enum DeviceAbsmax<'a> {
    Plain(&'a Tensor),
    Nested {
        codes: &'a Tensor,
        scales: &'a Tensor,
        code: &'a Tensor,
        offset: f32,
        block_size: usize,
    },
}

/// Dequantize `n` packed 4-bit values to `dtype`.
pub fn dequant_4bit(
    packed: &Tensor,
    absmax: &DeviceAbsmax<'_>,
    fp4: bool,
    block_size: usize,
    shape: &Shape,
    dtype: DType,
) -> Result<Tensor> {
    let n = shape.elem_count();
    if !block_size.is_power_of_two() || block_size < 8 {
        bail!("dequant_4bit: block size {block_size} is not a power of two of at least 8");
    }
    let name = match absmax {
        DeviceAbsmax::Plain(_) => format!("dequant_4bit_{}", suffix(dtype)?),
        DeviceAbsmax::Nested { .. } => format!("dequant_4bit_nested_{}", suffix(dtype)?),
    };
    let (a, codes, scales, code, offset, nested_shift) = match absmax {
        DeviceAbsmax::Plain(a) => (*a, *a, *a, *a, 0f32, 0i32),
        DeviceAbsmax::Nested {
            codes,
            scales,
            code,
            offset,
            block_size,
        } => {
            if !block_size.is_power_of_two() {
                bail!("dequant_4bit: nested block size {block_size} is not a power of two");
            }
            let shift = block_size.trailing_zeros() as i32;
            (*scales, *codes, *scales, *code, *offset, shift)
        }
    };
    let (ps, pl) = packed.storage_and_layout();
    let (as_, al) = a.storage_and_layout();
    let (cs, cl) = codes.storage_and_layout();
    let (ss, sl) = scales.storage_and_layout();
    let (ks, kl) = code.storage_and_layout();
    let (
        Storage::Cuda(ps),
        Storage::Cuda(as_),
        Storage::Cuda(cs),
        Storage::Cuda(ss),
        Storage::Cuda(ks),
    ) = (&*ps, &*as_, &*cs, &*ss, &*ks)
    else {
        bail!("dequant_4bit: quant state is not on a CUDA device");
    };
    let dev = ps.device().clone();
    let packed_v = view::<u8>(ps, pl)?;
    if packed_v.len() != n.div_ceil(2) {
        bail!(
            "dequant_4bit: {} packed bytes for {n} values",
            packed_v.len()
        );
    }
    let absmax_v = view::<f32>(as_, al)?;
    // Plain absmax: the kernel never reads codes, scales or code; any pointer will do.
    let codes_v = match absmax {
        DeviceAbsmax::Plain(_) => view::<u8>(ps, pl)?,
        DeviceAbsmax::Nested { .. } => view::<u8>(cs, cl)?,
    };
    let scales_v = view::<f32>(ss, sl)?;
    let code_v = view::<f32>(ks, kl)?;
    let cfg = grid(n.div_ceil(16), 256); // two chunks of 8 values per thread
    let f = func!(dev, &name)?;
    let (fp4, shift, n64) = (fp4 as i32, block_size.trailing_zeros() as i32, n as i64);
    let out = float_dispatch!("qlorad kernels", dtype, T => {
        let out = alloc::<T>(&dev, n)?;
        let mut b = f.builder();
        b.arg(&packed_v)
            .arg(&absmax_v)
            .arg(&codes_v)
            .arg(&scales_v)
            .arg(&code_v)
            .arg(&offset)
            .arg(&nested_shift)
            .arg(&fp4)
            .arg(&shift)
            .arg(&n64)
            .arg(&out);
        // SAFETY: argument types and counts match the kernel's signature.
        unsafe { b.launch(cfg) }.w()?;
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok(tensor(out, shape.clone()))
}

/// Quantize a dense contiguous tensor to 4 bits: the packed codes stay on the device, the f32
/// absmax per block comes back to the host. `tables`: 15 midpoints then the 16 codes by rank.
/// Err(Some(index)) names the first non-finite element.
pub fn quantize_4bit(
    x: &Tensor,
    block_size: usize,
    tables: &[f32; 31],
) -> Result<std::result::Result<(Tensor, Vec<f32>), u64>> {
    let n = x.elem_count();
    let blocks = n.div_ceil(block_size);
    let dev = match x.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        _ => bail!("quantize_4bit: tensor is not on a CUDA device"),
    };
    let tables = dev.clone_htod(tables.as_slice())?;
    let bad = dev.clone_htod(&[u64::MAX])?;
    let packed = alloc::<u8>(&dev, n.div_ceil(2))?;
    let absmax = alloc::<f32>(&dev, blocks)?;
    let f = func!(dev, &format!("quantize_4bit_{}", suffix(x.dtype())?))?;
    let cfg = grid(blocks * 32, 256);
    let (n64, bs) = (n as i64, block_size as i32);
    with_cuda(&x.contiguous()?, |s, l| {
        float_dispatch!("qlorad kernels", x.dtype(), T => {
            let xv = view::<T>(s, l)?;
            let mut b = f.builder();
            b.arg(&xv)
                .arg(&n64)
                .arg(&bs)
                .arg(&tables)
                .arg(&packed)
                .arg(&absmax)
                .arg(&bad);
            // SAFETY: argument types and counts match the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
        });
        Ok(())
    })?;
    let bad = dev.clone_dtoh(&bad)?[0];
    if bad != u64::MAX {
        return Ok(Err(bad));
    }
    let absmax = dev.clone_dtoh(&absmax)?;
    let packed = tensor(
        CudaStorage::wrap_cuda_slice(packed, dev.clone()),
        n.div_ceil(2),
    );
    Ok(Ok((packed, absmax)))
}

/// Inverted dropout by counter hash (see `crate::ops::dropout`).
pub fn dropout(
    s: &CudaStorage,
    l: &Layout,
    seed: u64,
    threshold: u32,
    keep_scale: f32,
) -> Result<CudaStorage> {
    let dev = s.device().clone();
    let n = l.shape().elem_count();
    let f = func!(dev, &format!("dropout_{}", suffix(s.dtype())?))?;
    let n64 = n as i64;
    Ok(float_dispatch!("qlorad kernels", s.dtype(), T => {
        let x = view::<T>(s, l)?;
        let out = alloc::<T>(&dev, n)?;
        let mut b = f.builder();
        b.arg(&x)
            .arg(&out)
            .arg(&n64)
            .arg(&seed)
            .arg(&threshold)
            .arg(&keep_scale);
        // SAFETY: argument types and counts match the kernel's signature.
        unsafe { b.launch(grid(n, 256)) }.w()?;
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    }))
}

/// `acc += dropout(x)` in place; both contiguous, of one shape and dtype.
pub fn dropout_add(
    acc: &Tensor,
    x: &Tensor,
    seed: u64,
    threshold: u32,
    keep_scale: f32,
) -> Result<()> {
    let n = acc.elem_count();
    if x.shape() != acc.shape() || x.dtype() != acc.dtype() || !acc.is_contiguous() {
        bail!(
            "dropout_add: accumulator {:?} and input {:?} differ",
            acc.dims(),
            x.dims()
        );
    }
    let n64 = n as i64;
    with_cuda(acc, |accs, accl| {
        with_cuda(x, |xs, xl| {
            let dev = accs.device().clone();
            let f = func!(dev, &format!("dropout_add_{}", suffix(acc.dtype())?))?;
            float_dispatch!("dropout_add", acc.dtype(), T => {
                let (a, xv) = (view::<T>(accs, accl)?, view::<T>(xs, xl)?);
                let mut b = f.builder();
                b.arg(&a)
                    .arg(&xv)
                    .arg(&n64)
                    .arg(&seed)
                    .arg(&threshold)
                    .arg(&keep_scale);
                // SAFETY: argument types and counts match the kernel's signature; the kernel
                // updates acc in place on the device's one stream.
                unsafe { b.launch(grid(n, 256)) }.w()?;
            });
            Ok(())
        })
    })
}

/// `acc += a · bᵀ` (b `[n, k]`, `b_transposed`) or `acc += a · b` (b `[k, n]`) in place through
/// cuBLAS, accumulating in f32: a `[m, k]`, acc `[m, n]`, all contiguous and of one dtype.
pub fn matmul_add(acc: &Tensor, a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::sys as cublas;
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (m, k) = a.dims2()?;
    let n = if b_transposed { b.dim(0)? } else { b.dim(1)? };
    let kb = if b_transposed { b.dim(1)? } else { b.dim(0)? };
    let dt = acc.dtype();
    if kb != k
        || acc.dims() != [m, n]
        || a.dtype() != dt
        || b.dtype() != dt
        || !(acc.is_contiguous() && a.is_contiguous() && b.is_contiguous())
    {
        bail!(
            "matmul_add: {:?} += {:?} · {:?}{} does not fit",
            acc.dims(),
            a.dims(),
            b.dims(),
            if b_transposed { "ᵀ" } else { "" }
        );
    }
    let ty = match dt {
        DType::F32 => cublas::cudaDataType::CUDA_R_32F,
        DType::BF16 => cublas::cudaDataType::CUDA_R_16BF,
        DType::F16 => cublas::cudaDataType::CUDA_R_16F,
        other => bail!("matmul_add: dtype {other:?}"),
    };
    with_cuda(acc, |cs, cl| {
        with_cuda(a, |as_, al| {
            with_cuda(b, |bs, bl| {
                let dev = cs.device().clone();
                let stream = dev.cuda_stream();
                let blas = dev.cublas_handle();
                float_dispatch!("matmul_add", dt, T => {
                    let (cv, av, bv) = (view::<T>(cs, cl)?, view::<T>(as_, al)?, view::<T>(bs, bl)?);
                    let (cp, _c) = cv.device_ptr(&stream);
                    let (ap, _a) = av.device_ptr(&stream);
                    let (bp, _b) = bv.device_ptr(&stream);
                    // Row-major C = A·op(B) is column-major Cᵀ = op(B)ᵀ·Aᵀ: cuBLAS gets B first.
                    let (op_b, ldb) = if b_transposed {
                        (cublas::cublasOperation_t::CUBLAS_OP_T, k)
                    } else {
                        (cublas::cublasOperation_t::CUBLAS_OP_N, n)
                    };
                    let (alpha, beta) = (1f32, 1f32);
                    // SAFETY: the pointers are live device allocations of the sizes checked
                    // above, on the stream the handle is bound to; alpha and beta outlive it.
                    unsafe {
                        cublas::cublasGemmEx(
                            *blas.handle(),
                            op_b,
                            cublas::cublasOperation_t::CUBLAS_OP_N,
                            n as i32,
                            m as i32,
                            k as i32,
                            &alpha as *const f32 as *const std::ffi::c_void,
                            bp as *const std::ffi::c_void,
                            ty,
                            ldb as i32,
                            ap as *const std::ffi::c_void,
                            ty,
                            k as i32,
                            &beta as *const f32 as *const std::ffi::c_void,
                            cp as *mut std::ffi::c_void,
                            ty,
                            n as i32,
                            cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                            cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                        )
                        .result()
                        .w()?;
                    }
                });
                Ok(())
            })
        })
    })
}

/// Row geometry of attention scores `[b, h, q, k]`.
#[derive(Debug, Clone, Copy)]
pub struct AttnRows {
    pub heads: usize,
    pub q: usize,
    pub k: usize,
    pub scale: f32,
    pub causal: bool,
}

fn row_block(k: usize) -> u32 {
    (k.div_ceil(32) * 32).clamp(32, 1024) as u32
}

fn keep_layout<R>(keep: &Tensor, f: impl FnOnce(&Layout) -> R) -> Result<R> {
    with_cuda(keep, |_, kl| Ok(f(kl)))
}

/// Rows the register-resident softmax kernels take: 16-byte aligned, at most 256 threads × 4
/// chunks of 8 values.
fn vectorizable(l: &Layout, k: usize) -> bool {
    k.is_multiple_of(8) && k <= 256 * 8 * 4 && l.start_offset().is_multiple_of(8)
}

/// Which softmax kernel takes these rows: one warp per row with `c` register chunks per lane
/// (k ≤ 2048), a block per row with registers (k ≤ 8192), or the general one.
enum SoftmaxKernel {
    Warp(usize),
    Vec,
    Plain,
}

impl SoftmaxKernel {
    fn pick(layouts: &[&Layout], keep: &Layout, k: usize) -> Self {
        if !layouts.iter().all(|l| vectorizable(l, k)) {
            return SoftmaxKernel::Plain;
        }
        if k <= 2048 && keep.start_offset().is_multiple_of(8) {
            return SoftmaxKernel::Warp(k.div_ceil(256).next_power_of_two());
        }
        SoftmaxKernel::Vec
    }

    fn name(&self, base: &str) -> String {
        match self {
            SoftmaxKernel::Warp(c) => format!("{base}_warp{c}"),
            SoftmaxKernel::Vec => format!("{base}_vec"),
            SoftmaxKernel::Plain => base.to_string(),
        }
    }

    fn config(&self, rows: usize, k: usize) -> LaunchConfig {
        match self {
            SoftmaxKernel::Warp(_) => grid(rows * 32, 256),
            SoftmaxKernel::Vec => self::rows(rows, 256),
            SoftmaxKernel::Plain => self::rows(rows, row_block(k)),
        }
    }
}

/// Masked, scaled softmax of attention scores; `keep` is u8 `[b, k]`.
pub fn attn_softmax(
    s: &CudaStorage,
    l: &Layout,
    keep: &Tensor,
    r: AttnRows,
) -> Result<CudaStorage> {
    launch_softmax("attn_softmax", &[(s, l)], keep, r)
}

/// The gradient of `attn_softmax` given its output `p` and the output's gradient `dp`.
pub fn attn_softmax_bwd(
    p: &CudaStorage,
    pl: &Layout,
    dp: &CudaStorage,
    dl: &Layout,
    keep: &Tensor,
    r: AttnRows,
) -> Result<CudaStorage> {
    if p.dtype() != dp.dtype() {
        bail!(
            "attn_softmax_bwd: dtypes {:?} and {:?}",
            p.dtype(),
            dp.dtype()
        );
    }
    launch_softmax("attn_softmax_bwd", &[(p, pl), (dp, dl)], keep, r)
}

/// A softmax kernel (forward or backward) over rows of `r.k`: the kernels take their inputs,
/// the key mask, the output, then the row geometry (and the row count, one warp per row).
fn launch_softmax(
    base: &str,
    inputs: &[(&CudaStorage, &Layout)],
    keep: &Tensor,
    r: AttnRows,
) -> Result<CudaStorage> {
    let (s0, l0) = inputs[0];
    let dev = s0.device().clone();
    let n = l0.shape().elem_count();
    let layouts: Vec<&Layout> = inputs.iter().map(|(_, l)| *l).collect();
    let kind = keep_layout(keep, |kl| SoftmaxKernel::pick(&layouts, kl, r.k))?;
    let f = func!(dev, &kind.name(&format!("{base}_{}", suffix(s0.dtype())?)))?;
    let nrows = (n / r.k) as i32;
    let (h, q, k, c) = (r.heads as i32, r.q as i32, r.k as i32, r.causal as i32);
    with_cuda(keep, |ks, kl| {
        let keep = view::<u8>(ks, kl)?;
        Ok(float_dispatch!("qlorad kernels", s0.dtype(), T => {
            let views = inputs
                .iter()
                .map(|(s, l)| view::<T>(s, l))
                .collect::<Result<Vec<_>>>()?;
            let out = alloc::<T>(&dev, n)?;
            let mut b = f.builder();
            for v in &views {
                b.arg(v);
            }
            b.arg(&keep)
                .arg(&out)
                .arg(&h)
                .arg(&q)
                .arg(&k)
                .arg(&r.scale)
                .arg(&c);
            if let SoftmaxKernel::Warp(_) = kind {
                b.arg(&nrows);
            }
            // SAFETY: argument types and counts match the kernels' signatures.
            unsafe { b.launch(kind.config(n / r.k, r.k)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }))
    })
}

/// Per-row negative log-likelihood (f32 `[n]`) of logits `[n, v]` at u32 targets `[n]`.
pub fn cross_entropy(s: &CudaStorage, l: &Layout, targets: &Tensor) -> Result<CudaStorage> {
    let dev = s.device().clone();
    let dims = l.shape().dims();
    let (n, v) = (dims[0], dims[1]);
    let f = func!(dev, &format!("cross_entropy_{}", suffix(s.dtype())?))?;
    let v32 = v as i32;
    with_cuda(targets, |ts, tl| {
        let t = view::<u32>(ts, tl)?;
        let out = alloc::<f32>(&dev, n)?;
        float_dispatch!("qlorad kernels", s.dtype(), T => {
            let x = view::<T>(s, l)?;
            let mut b = f.builder();
            b.arg(&x).arg(&t).arg(&out).arg(&v32);
            // SAFETY: argument types and counts match the kernel's signature.
            unsafe { b.launch(rows(n, 1024)) }.w()?;
        });
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    })
}

/// The gradient of the logits given the per-row loss gradient `g` (f32 `[n]`).
pub fn cross_entropy_bwd(
    s: &CudaStorage,
    l: &Layout,
    targets: &Tensor,
    g: &CudaStorage,
    gl: &Layout,
) -> Result<CudaStorage> {
    let dev = s.device().clone();
    let dims = l.shape().dims();
    let (n, v) = (dims[0], dims[1]);
    let f = func!(dev, &format!("cross_entropy_bwd_{}", suffix(s.dtype())?))?;
    let v32 = v as i32;
    let gv = view::<f32>(g, gl)?;
    with_cuda(targets, |ts, tl| {
        let t = view::<u32>(ts, tl)?;
        Ok(float_dispatch!("qlorad kernels", s.dtype(), T => {
            let x = view::<T>(s, l)?;
            let out = alloc::<T>(&dev, n * v)?;
            let mut b = f.builder();
            b.arg(&x).arg(&t).arg(&gv).arg(&out).arg(&v32);
            // SAFETY: argument types and counts match the kernel's signature.
            unsafe { b.launch(rows(n, 1024)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }))
    })
}

/// RMSNorm of rows of `h` with weight `w` (same dtype).
pub fn rms_norm(s: &CudaStorage, l: &Layout, w: &Tensor, eps: f32) -> Result<CudaStorage> {
    let dev = s.device().clone();
    let n = l.shape().elem_count();
    let h = l.shape().dims().last().copied().unwrap_or(1);
    let f = func!(dev, &format!("rms_norm_{}", suffix(s.dtype())?))?;
    let h32 = h as i32;
    with_cuda(w, |ws, wl| {
        float_dispatch!("qlorad kernels", s.dtype(), T => {
            let (x, w) = (view::<T>(s, l)?, view::<T>(ws, wl)?);
            let out = alloc::<T>(&dev, n)?;
            let mut b = f.builder();
            b.arg(&x).arg(&w).arg(&out).arg(&h32).arg(&eps);
            // SAFETY: argument types and counts match the kernel's signature.
            unsafe { b.launch(rows(n / h, row_block(h).min(512))) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        })
    })
}

/// The input gradient of `rms_norm`.
pub fn rms_norm_bwd(
    x: &CudaStorage,
    xl: &Layout,
    dy: &CudaStorage,
    dl: &Layout,
    w: &Tensor,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let n = xl.shape().elem_count();
    let h = xl.shape().dims().last().copied().unwrap_or(1);
    let f = func!(dev, &format!("rms_norm_bwd_{}", suffix(x.dtype())?))?;
    let h32 = h as i32;
    with_cuda(w, |ws, wl| {
        float_dispatch!("qlorad kernels", x.dtype(), T => {
            let (xv, dv, wv) = (view::<T>(x, xl)?, view::<T>(dy, dl)?, view::<T>(ws, wl)?);
            let out = alloc::<T>(&dev, n)?;
            let mut b = f.builder();
            b.arg(&xv).arg(&wv).arg(&dv).arg(&out).arg(&h32).arg(&eps);
            // SAFETY: argument types and counts match the kernel's signature.
            unsafe { b.launch(rows(n / h, row_block(h).min(512))) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        })
    })
}

/// Rotary embedding with the move to heads, `[b, s, n, d]` -> `[b, n, s, d]` (or back, for
/// the gradient, when `backward`).
pub fn rope(
    x: &CudaStorage,
    l: &Layout,
    cos: &Tensor,
    sin: &Tensor,
    (b, s, n, d): (usize, usize, usize, usize),
    backward: bool,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let total = b * s * n * d;
    let name = if backward { "rope_bwd" } else { "rope" };
    let f = func!(dev, &format!("{name}_{}", suffix(x.dtype())?))?;
    let dims = [b as i32, s as i32, n as i32, d as i32];
    with_cuda(cos, |cs, cl| {
        with_cuda(sin, |ss, sl| {
            float_dispatch!("qlorad kernels", x.dtype(), T => {
                let (xv, cv, sv) = (view::<T>(x, l)?, view::<T>(cs, cl)?, view::<T>(ss, sl)?);
                let out = alloc::<T>(&dev, total)?;
                let mut bld = f.builder();
                bld.arg(&xv).arg(&cv).arg(&sv).arg(&out);
                for v in &dims {
                    bld.arg(v);
                }
                // SAFETY: argument types and counts match the kernel's signature.
                unsafe { bld.launch(grid(total, 256)) }.w()?;
                Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
            })
        })
    })
}

/// `silu(g) * u`, or for the gradient (`dy` given) dg and du one after the other.
pub fn swiglu(
    g: &CudaStorage,
    gl: &Layout,
    u: &CudaStorage,
    ul: &Layout,
    dy: Option<(&CudaStorage, &Layout)>,
) -> Result<CudaStorage> {
    let dev = g.device().clone();
    let n = gl.shape().elem_count();
    let n64 = n as i64;
    let name = if dy.is_some() { "swiglu_bwd" } else { "swiglu" };
    let f = func!(dev, &format!("{name}_{}", suffix(g.dtype())?))?;
    float_dispatch!("qlorad kernels", g.dtype(), T => {
        let (gv, uv) = (view::<T>(g, gl)?, view::<T>(u, ul)?);
        let mut b = f.builder();
        b.arg(&gv).arg(&uv);
        let dv;
        if let Some((d, dl)) = dy {
            dv = view::<T>(d, dl)?;
            b.arg(&dv);
        }
        let out = alloc::<T>(&dev, if dy.is_some() { 2 * n } else { n })?;
        b.arg(&out).arg(&n64);
        // SAFETY: argument types and counts match the kernel's signature.
        unsafe { b.launch(grid(n, 256)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    })
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
