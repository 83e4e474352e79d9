//! SwiGLU, `silu(gate) · up`, and both its gradients (`kernels/swiglu.cu`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::profile::span;
use super::{input_grad, owned, slice, Float};

/// `silu(gate) · up`, the activation rounded to the inputs' dtype first as torch's
/// `act_fn(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() || gate.dtype() != up.dtype() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        );
    }
    span("swiglu", || {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
    })
}

/// dL/dgate and dL/dup of `swiglu(gate, up)` given dL/dy.
pub fn swiglu_bwd(gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let (dg, du) = SwiGlu.bwd(gate, up, grad, grad)?;
    Ok((input_grad(dg)?, input_grad(du)?))
}

struct SwiGlu;

fn silu_parts(g: f32) -> (f32, f32) {
    let sig = 1.0 / (1.0 + (-g).exp());
    (g / (1.0 + (-g).exp()), sig)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!("fused op", g.dtype(), T => {
            let (g, u) = (slice::<T>(g, gl)?, slice::<T>(u, ul)?);
            owned(g.par_iter().zip(u.par_iter()).map(|(g, u)| {
                T::of(T::of(silu_parts(g.f32()).0).f32() * u.f32())
            }).collect::<Vec<T>>())
        });
        Ok((out, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((launch::swiglu(g, gl, u, ul, None)?, gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(g.dtype())?.contiguous()?;
        let both = span("swiglu", || {
            g.contiguous()?
                .apply_op3_no_bwd(&u.contiguous()?, &grad, &SwiGluBwd)
        })?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// dgate and dup stacked as `[2, ...]`.
struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
        dy: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!("fused op", g.dtype(), T => {
            let (g, u, dy) = (slice::<T>(g, gl)?, slice::<T>(u, ul)?, slice::<T>(dy, dl)?);
            let n = g.len();
            let mut out = vec![T::of(0.0); 2 * n];
            let (dg, du) = out.split_at_mut(n);
            dg.par_iter_mut().zip(du.par_iter_mut()).enumerate().for_each(|(i, (dg, du))| {
                let gv = g[i].f32();
                let (act, sig) = silu_parts(gv);
                let d = dy[i].f32();
                *dg = T::of(d * u[i].f32() * sig * (1.0 + gv * (1.0 - sig)));
                *du = T::of(d * act);
            });
            owned(out)
        });
        Ok((out, stacked(gl.shape())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
        dy: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = launch::swiglu(g, gl, u, ul, Some((dy, dl)))?;
        Ok((out, stacked(gl.shape())))
    }
}

fn stacked(shape: &Shape) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(shape.dims());
    dims.into()
}

#[cfg(feature = "cuda")]
mod launch {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{Layout, Result};

    use crate::ops::cuda::{alloc, func, grid, suffix, view};

    /// `silu(g) * u`, or for the gradient (`dy` given) dg and du one after the other.
    pub(super) fn swiglu(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, same_values_and_grads};
    use candle_core::{Device, Var};

    #[test]
    fn swiglu_matches_silu_times_up_and_both_gradients() {
        let dev = Device::Cpu;
        let g = Tensor::randn(0f32, 2.0, (3, 7), &dev).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap()).unwrap();
        let (dv, dg) = same_values_and_grads(
            &g,
            |g| swiglu(g, u.as_tensor()).unwrap(),
            |g| (g.silu().unwrap() * u.as_tensor()).unwrap(),
        );
        assert!(dv < 1e-6 && dg < 1e-5, "{dv} {dg}");
        // The gradient of up is silu(gate) · dy.
        let gv = Var::from_tensor(&g).unwrap();
        let grads = swiglu(gv.as_tensor(), u.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_diff(grads.get(u.as_tensor()).unwrap(), &g.silu().unwrap()) < 1e-6);
    }
}
