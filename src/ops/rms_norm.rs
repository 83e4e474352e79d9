//! transformers' LlamaRMSNorm with a frozen weight, and its input gradient
//! (`kernels/rms_norm.cu`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::profile::span;
use super::{input_grad, owned, slice, Float};

/// transformers' LlamaRMSNorm over the last dimension: `x · 1/sqrt(mean(x²) + eps)` in f32,
/// rounded to x's dtype, times the frozen weight `w` `[hidden]`. Gradient for x only.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dim(candle_core::D::Minus1)?;
    if w.dims() != [h] {
        candle_core::bail!("rms_norm: weight {:?} for rows of {h}", w.dims());
    }
    let op = RmsNorm {
        w: w.to_dtype(x.dtype())?.contiguous()?.detach(),
        eps: eps as f32,
    };
    span("rmsnorm", || x.contiguous()?.apply_op1(op))
}

/// dL/dx of `rms_norm(x, w, eps)` given dL/dy.
pub fn rms_norm_bwd(x: &Tensor, w: &Tensor, eps: f64, grad: &Tensor) -> Result<Tensor> {
    let op = RmsNorm {
        w: w.to_dtype(x.dtype())?.contiguous()?.detach(),
        eps: eps as f32,
    };
    input_grad(op.bwd(x, x, grad)?)
}

#[derive(Clone)]
struct RmsNorm {
    w: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward<T: Float>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let h = w.len();
        let mut out = vec![T::of(0.0); x.len()];
        out.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(o, x)| {
                let ss: f32 = x.iter().map(|v| v.f32() * v.f32()).sum();
                let r = 1.0 / (ss / h as f32 + self.eps).sqrt();
                for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                    *o = T::of(T::of(x.f32() * r).f32() * w.f32());
                }
            });
        out
    }

    fn backward<T: Float>(&self, x: &[T], dy: &[T], w: &[T]) -> Vec<T> {
        let h = w.len();
        let mut out = vec![T::of(0.0); x.len()];
        out.par_chunks_mut(h)
            .zip(x.par_chunks(h).zip(dy.par_chunks(h)))
            .for_each(|(o, (x, dy))| {
                let ss: f32 = x.iter().map(|v| v.f32() * v.f32()).sum();
                let gx: f32 = x
                    .iter()
                    .zip(dy)
                    .zip(w)
                    .map(|((x, d), w)| d.f32() * w.f32() * x.f32())
                    .sum();
                let r = 1.0 / (ss / h as f32 + self.eps).sqrt();
                let c = r * gx / h as f32;
                for (((o, x), d), w) in o.iter_mut().zip(x).zip(dy).zip(w) {
                    let g = d.f32() * w.f32();
                    *o = T::of(r * (g - x.f32() * r * c));
                }
            });
        out
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!("fused op", s.dtype(), T => {
            let w = self.w.to_vec1::<T>()?;
            owned(self.forward(slice::<T>(s, l)?, &w))
        });
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            launch::rms_norm(s, l, &self.w, self.eps)?,
            l.shape().clone(),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.to_dtype(arg.dtype())?.contiguous()?;
        span("rmsnorm", || {
            Ok(Some(
                arg.contiguous()?
                    .apply_op2_no_bwd(&grad, &RmsNormBwd(self.clone()))?,
            ))
        })
    }
}

struct RmsNormBwd(RmsNorm);

impl CustomOp2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        dy: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!("fused op", x.dtype(), T => {
            let w = self.0.w.to_vec1::<T>()?;
            owned(self.0.backward(slice::<T>(x, xl)?, slice::<T>(dy, dl)?, &w))
        });
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        dy: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = launch::rms_norm_bwd(x, xl, dy, dl, &self.0.w, self.0.eps)?;
        Ok((out, xl.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod launch {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{Layout, Result, Tensor};

    use crate::ops::cuda::{alloc, func, row_block, rows, suffix, view, with_cuda};

    /// RMSNorm of rows of `h` with weight `w` (same dtype).
    pub(super) fn rms_norm(
        s: &CudaStorage,
        l: &Layout,
        w: &Tensor,
        eps: f32,
    ) -> Result<CudaStorage> {
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
    pub(super) fn rms_norm_bwd(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::same_values_and_grads;
    use candle_core::{Device, D};

    #[test]
    fn rms_norm_matches_transformers_arithmetic_and_its_gradient() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 3, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
        let reference = |x: &Tensor| {
            let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let r = (var + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
            x.broadcast_mul(&r).unwrap().broadcast_mul(&w).unwrap()
        };
        let (dv, dg) = same_values_and_grads(&x, |x| rms_norm(x, &w, 1e-5).unwrap(), reference);
        assert!(dv < 1e-5 && dg < 1e-5, "{dv} {dg}");
    }
}
