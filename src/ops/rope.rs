//! Rotary embedding fused with the move to heads, and its backward (`kernels/rope.cu`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::profile::span;
use super::{input_grad, owned, slice, Float};

/// Rotary embedding fused with the move to heads: x `[b, s, n, d]` (as a projection's output
/// reshapes) to `[b, n, s, d]`, `x·cos + rotate_half(x)·sin` with each product and the sum
/// rounded to x's dtype as transformers computes it. cos and sin are `[s, d]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, s, _, d) = x.dims4()?;
    if cos.dims() != [s, d] || sin.dims() != [s, d] || d % 2 != 0 {
        candle_core::bail!("rope: cos/sin {:?} for x {:?}", cos.dims(), x.dims());
    }
    let op = Rope {
        cos: cos.to_dtype(x.dtype())?.contiguous()?,
        sin: sin.to_dtype(x.dtype())?.contiguous()?,
        dims: x.dims4()?,
    };
    span("rope", || x.contiguous()?.apply_op1(op))
}

/// dL/dx `[b, s, n, d]` of `rope(x, cos, sin)` given dL/dy `[b, n, s, d]`.
pub fn rope_bwd(grad: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, n, s, d) = grad.dims4()?;
    let op = Rope {
        cos: cos.to_dtype(grad.dtype())?.contiguous()?,
        sin: sin.to_dtype(grad.dtype())?.contiguous()?,
        dims: (b, s, n, d),
    };
    input_grad(op.bwd(grad, grad, grad)?)
}

#[derive(Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// `(b, s, n, d)` of the input.
    dims: (usize, usize, usize, usize),
}

impl Rope {
    fn forward<T: Float>(&self, x: &[T], cos: &[T], sin: &[T]) -> Vec<T> {
        let (_, s, n, d) = self.dims;
        let half = d / 2;
        let mut out = vec![T::of(0.0); x.len()];
        // out [b, n, s, d], one (b, n, s) row per chunk.
        out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
            let (bh, p) = (row / s, row % s);
            let (bb, hh) = (bh / n, bh % n);
            let xr = &x[((bb * s + p) * n + hh) * d..][..d];
            for j in 0..d {
                let rh = if j < half {
                    -xr[j + half].f32()
                } else {
                    xr[j - half].f32()
                };
                let a = T::of(xr[j].f32() * cos[p * d + j].f32()).f32();
                let c = T::of(rh * sin[p * d + j].f32()).f32();
                o[j] = T::of(a + c);
            }
        });
        out
    }

    fn backward<T: Float>(&self, dy: &[T], cos: &[T], sin: &[T]) -> Vec<T> {
        let (_, s, n, d) = self.dims;
        let half = d / 2;
        let mut out = vec![T::of(0.0); dy.len()];
        // out [b, s, n, d], one (b, s, n) row per chunk.
        out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
            let (bs, hh) = (row / n, row % n);
            let (bb, p) = (bs / s, bs % s);
            let g = &dy[((bb * n + hh) * s + p) * d..][..d];
            for j in 0..d {
                let mut v = g[j].f32() * cos[p * d + j].f32();
                if j < half {
                    v += g[j + half].f32() * sin[p * d + j + half].f32();
                } else {
                    v -= g[j - half].f32() * sin[p * d + j - half].f32();
                }
                o[j] = T::of(v);
            }
        });
        out
    }

    fn out_shape(&self, backward: bool) -> Shape {
        let (b, s, n, d) = self.dims;
        if backward {
            (b, s, n, d).into()
        } else {
            (b, n, s, d).into()
        }
    }

    fn run_cpu(&self, st: &CpuStorage, l: &Layout, backward: bool) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!("fused op", st.dtype(), T => {
            let cos = self.cos.flatten_all()?.to_vec1::<T>()?;
            let sin = self.sin.flatten_all()?.to_vec1::<T>()?;
            let x = slice::<T>(st, l)?;
            owned(if backward { self.backward(x, &cos, &sin) } else { self.forward(x, &cos, &sin) })
        });
        Ok((out, self.out_shape(backward)))
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run_cpu(s, l, false)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = launch::rope(s, l, &self.cos, &self.sin, self.dims, false)?;
        Ok((out, self.out_shape(false)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.to_dtype(arg.dtype())?.contiguous()?;
        span("rope", || {
            Ok(Some(grad.apply_op1_no_bwd(&RopeBwd(self.clone()))?))
        })
    }
}

struct RopeBwd(Rope);

impl CustomOp1 for RopeBwd {
    fn name(&self) -> &'static str {
        "rope-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.run_cpu(s, l, true)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = launch::rope(s, l, &self.0.cos, &self.0.sin, self.0.dims, true)?;
        Ok((out, self.0.out_shape(true)))
    }
}

#[cfg(feature = "cuda")]
mod launch {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{Layout, Result, Tensor};

    use crate::ops::cuda::{alloc, func, grid, suffix, view, with_cuda};

    /// Rotary embedding with the move to heads, `[b, s, n, d]` -> `[b, n, s, d]` (or back, for
    /// the gradient, when `backward`).
    pub(super) fn rope(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::same_values_and_grads;
    use candle_core::{Device, D};

    /// The composed reference from differentiable primitives: x `[b, h, s, d]`, cos/sin `[s, d]`.
    fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
    }

    fn rotate_half(x: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
    }

    #[test]
    fn rope_matches_the_composed_rotation_and_its_gradient() {
        let dev = Device::Cpu;
        let (b, s, n, d) = (2, 5, 3, 8);
        let x = Tensor::randn(0f32, 1.0, (b, s, n, d), &dev).unwrap();
        let ang = Tensor::randn(0f32, 1.0, (s, d), &dev).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let reference = |x: &Tensor| {
            let x = x.transpose(1, 2).unwrap().contiguous().unwrap();
            apply_rope(&x, &cos, &sin).unwrap()
        };
        let (dv, dg) = same_values_and_grads(&x, |x| rope(x, &cos, &sin).unwrap(), reference);
        assert!(dv < 1e-6 && dg < 1e-6, "{dv} {dg}");
    }
}
