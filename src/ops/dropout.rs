//! Hash dropout, and its backward accumulated into a gradient (`kernels/dropout.cu`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::profile::span;
use super::{owned, slice, Float};

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Inverted dropout: element i is zeroed when the top 24 bits of a counter hash of (seed, i)
/// fall below p·2²⁴, the rest are scaled by 1/(1−p). The same on every device, and
/// reproducible from the seed, so backward and checkpoint replays need no stored mask.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    seed: u64,
    threshold: u32,
    keep_scale: f32,
}

impl Dropout {
    pub fn new(p: f64, seed: u64) -> Self {
        Dropout {
            seed,
            threshold: (p.clamp(0.0, 1.0) * (1u64 << 24) as f64).round() as u32,
            keep_scale: (1.0 / (1.0 - p)) as f32,
        }
    }

    fn keep(&self, i: usize) -> bool {
        let h = splitmix64(self.seed.wrapping_add((i as u64 + 1).wrapping_mul(GOLDEN)));
        ((h >> 40) as u32) >= self.threshold
    }

    fn apply<T: Float>(&self, x: &[T]) -> Vec<T> {
        x.par_iter()
            .enumerate()
            .map(|(i, &v)| {
                if self.keep(i) {
                    T::of(v.f32() * self.keep_scale)
                } else {
                    T::of(0.0)
                }
            })
            .collect()
    }
}

pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Dropout::new(p, seed))
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "hash-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!("fused op", s.dtype(), T => owned(self.apply(slice::<T>(s, l)?)));
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = launch::dropout(s, l, self.seed, self.threshold, self.keep_scale)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        span("LoRA dropout backward", || {
            Ok(Some(grad.contiguous()?.apply_op1(*self)?))
        })
    }
}

/// `acc + dropout(x, p, seed)`: a dropout's backward accumulated into the gradient beside it.
/// On a GPU one kernel updates `acc` in place, so `acc` must be contiguous and not shared.
pub fn dropout_add(acc: Tensor, x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if acc.device().is_cuda() && acc.is_contiguous() {
        let d = Dropout::new(p, seed);
        launch::dropout_add(&acc, &x.contiguous()?, d.seed, d.threshold, d.keep_scale)?;
        return Ok(acc);
    }
    acc + dropout(x, p, seed)?
}

#[cfg(feature = "cuda")]
mod launch {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{bail, Layout, Result, Tensor};

    use crate::ops::cuda::{alloc, func, grid, suffix, view, with_cuda};

    /// Inverted dropout by counter hash (see `Dropout`).
    pub(super) fn dropout(
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
    pub(super) fn dropout_add(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn dropout_backward_reuses_the_forward_mask() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::ones((64, 64), DType::F32, &dev).unwrap()).unwrap();
        let y = dropout(x.as_tensor(), 0.25, 42).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        // d(sum y)/dx is the mask itself: the forward's values at x = 1.
        assert_eq!(
            g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
            y.to_vec2::<f32>().unwrap()
        );
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((dropped - 0.25).abs() < 0.03, "{dropped}");
        assert!(v.iter().all(|&x| x == 0.0 || x == 1.0 / 0.75));
        // Another seed, another mask; the same seed, the same mask.
        let other = dropout(x.as_tensor(), 0.25, 43).unwrap();
        assert_ne!(other.to_vec2::<f32>().unwrap(), y.to_vec2::<f32>().unwrap());
        let again = dropout(x.as_tensor(), 0.25, 42).unwrap();
        assert_eq!(again.to_vec2::<f32>().unwrap(), y.to_vec2::<f32>().unwrap());
    }
}
