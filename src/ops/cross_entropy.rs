//! Cross-entropy of logits at targets, per row, and its backward (`kernels/cross_entropy.cu`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::profile::span;
use super::{input_grad, owned, slice, Float};

/// Negative log-likelihood per row, f32 `[n]`, of logits `[n, v]` (any float dtype) at u32
/// targets `[n]`. Backward recomputes the softmax from the logits, so no `[n, v]` f32 tensor
/// is ever kept.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    if targets.dims() != [n] || targets.dtype() != DType::U32 {
        candle_core::bail!(
            "cross_entropy: targets are {:?} {:?}, expected u32 [{n}]",
            targets.dtype(),
            targets.dims()
        );
    }
    let op = CrossEntropy {
        targets: targets.contiguous()?,
    };
    span("cross-entropy", || logits.contiguous()?.apply_op1(op))
}

/// dL/dlogits of `cross_entropy` given dL/dnll (f32 `[n]`), for hand-written backward passes.
pub fn cross_entropy_grad(logits: &Tensor, targets: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let op = CrossEntropy {
        targets: targets.contiguous()?,
    };
    input_grad(op.bwd(logits, logits, grad)?)
}

#[derive(Clone)]
struct CrossEntropy {
    targets: Tensor,
}

/// Max and log-sum-exp (after the shift) of a row.
fn row_lse<T: Float>(x: &[T]) -> (f32, f32) {
    let m = x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v.f32()));
    let sum: f32 = x.iter().map(|v| (v.f32() - m).exp()).sum();
    (m, sum.ln())
}

impl CrossEntropy {
    fn forward<T: Float>(&self, x: &[T], v: usize, t: &[u32]) -> Vec<f32> {
        x.par_chunks(v)
            .zip(t.par_iter())
            .map(|(row, &t)| {
                let (m, lse) = row_lse(row);
                lse - (row[t as usize].f32() - m)
            })
            .collect()
    }

    fn backward<T: Float>(&self, x: &[T], v: usize, t: &[u32], g: &[f32]) -> Vec<T> {
        let mut out = vec![T::of(0.0); x.len()];
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(t.par_iter().zip(g.par_iter()))
            .for_each(|((o, row), (&t, &g))| {
                let (m, lse) = row_lse(row);
                for (j, (o, x)) in o.iter_mut().zip(row).enumerate() {
                    let p = (x.f32() - m - lse).exp();
                    *o = T::of(g * (p - if j == t as usize { 1.0 } else { 0.0 }));
                }
            });
        out
    }

    fn check(&self, v: usize) -> Result<Vec<u32>> {
        let t = self.targets.to_vec1::<u32>()?;
        if let Some(bad) = t.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("cross_entropy: target {bad} is outside the vocabulary of {v}");
        }
        Ok(t)
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        let t = self.check(v)?;
        let out =
            float_dispatch!("fused op", s.dtype(), T => self.forward(slice::<T>(s, l)?, v, &t));
        Ok((CpuStorage::F32(out), n.into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, _) = l.shape().dims2()?;
        Ok((launch::cross_entropy(s, l, &self.targets)?, n.into()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_dtype(DType::F32)?.contiguous()?;
        span("cross-entropy", || {
            Ok(Some(
                arg.contiguous()?
                    .apply_op2_no_bwd(&g, &CrossEntropyBwd(self.clone()))?,
            ))
        })
    }
}

struct CrossEntropyBwd(CrossEntropy);

impl CustomOp2 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, v) = xl.shape().dims2()?;
        let t = self.0.check(v)?;
        let g = slice::<f32>(g, gl)?;
        let out = float_dispatch!("fused op", x.dtype(), T => owned(
            self.0.backward(slice::<T>(x, xl)?, v, &t, g)
        ));
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = launch::cross_entropy_bwd(x, xl, &self.0.targets, g, gl)?;
        Ok((out, xl.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod launch {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{Layout, Result, Tensor};

    use crate::ops::cuda::{alloc, func, rows, suffix, view, with_cuda};

    /// Per-row negative log-likelihood (f32 `[n]`) of logits `[n, v]` at u32 targets `[n]`.
    pub(super) fn cross_entropy(
        s: &CudaStorage,
        l: &Layout,
        targets: &Tensor,
    ) -> Result<CudaStorage> {
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
    pub(super) fn cross_entropy_bwd(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::max_diff;
    use candle_core::{Device, Var};

    #[test]
    fn cross_entropy_matches_log_softmax_and_its_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (4, 11), &dev).unwrap()).unwrap();
        let t = Tensor::new(&[3u32, 0, 10, 7], &dev).unwrap();
        let w = Tensor::new(&[1f32, -2.0, 0.5, 3.0], &dev).unwrap();
        let nll = cross_entropy(x.as_tensor(), &t).unwrap();
        let g = (&nll * &w).unwrap().sum_all().unwrap().backward().unwrap();

        let logp = crate::model::llama::log_softmax_last_dim(x.as_tensor()).unwrap();
        let r = logp
            .gather(&t.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        let gr = (&r * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(&nll, &r) < 1e-5);
        assert!(
            max_diff(
                g.get(x.as_tensor()).unwrap(),
                gr.get(x.as_tensor()).unwrap()
            ) < 1e-6
        );
        let bad = Tensor::new(&[11u32, 0, 0, 0], &dev).unwrap();
        let err = cross_entropy(x.as_tensor(), &bad).unwrap_err().to_string();
        assert!(err.contains("outside the vocabulary of 11"), "{err}");
    }
}
