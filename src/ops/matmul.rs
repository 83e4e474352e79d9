//! `acc + a · op(b)`, accumulated in place on a GPU: how the hand-written backward passes sum
//! the products that meet in one gradient.

use candle_core::{Result, Tensor};

/// `acc + a · bᵀ` (`b_transposed`, b `[n, k]`) or `acc + a · b` (b `[k, n]`) for 2-D a and acc.
/// On a GPU cuBLAS accumulates into `acc` in place (no `[m, n]` product is made), so `acc`
/// must be contiguous and not shared.
pub fn matmul_add(acc: Tensor, a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if acc.device().is_cuda() && acc.is_contiguous() {
        launch::matmul_add(&acc, &a.contiguous()?, &b.contiguous()?, b_transposed)?;
        return Ok(acc);
    }
    let b = if b_transposed { b.t()? } else { b.clone() };
    acc + a.matmul(&b)?
}

#[cfg(feature = "cuda")]
mod launch {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{bail, DType, Result, Tensor};

    use crate::ops::cuda::{view, with_cuda};

    /// `acc += a · bᵀ` (b `[n, k]`, `b_transposed`) or `acc += a · b` (b `[k, n]`) in place through
    /// cuBLAS, accumulating in f32: a `[m, k]`, acc `[m, n]`, all contiguous and of one dtype.
    pub(super) fn matmul_add(
        acc: &Tensor,
        a: &Tensor,
        b: &Tensor,
        b_transposed: bool,
    ) -> Result<()> {
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
}
