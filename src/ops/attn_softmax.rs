//! Masked, scaled attention softmax and its backward (`kernels/attn_softmax.cu`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::profile::span;
use super::{input_grad, owned, slice, Float};

/// Softmax of attention scores `[b, h, q, k]` scaled by `scale`, over keys that are visible:
/// `keep[b, j]` (u8 `[b, k]`, 1 for a real token) and, when causal, `j <= i + k - q`. Computed in
/// f32, returned in the scores' dtype. A row that sees no key is uniform, with zero gradient.
pub fn attn_softmax(scores: &Tensor, keep: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let (b, h, q, k) = scores.dims4()?;
    if keep.dims() != [b, k] || keep.dtype() != DType::U8 {
        candle_core::bail!(
            "attn_softmax: keep is {:?} {:?}, expected u8 [{b}, {k}]",
            keep.dtype(),
            keep.dims()
        );
    }
    let scores = scores.contiguous()?;
    span("attention softmax", || {
        scores.apply_op1(AttnSoftmax {
            keep: keep.contiguous()?,
            heads: h,
            q,
            k,
            scale: scale as f32,
            causal,
        })
    })
}

/// dL/dscores of `attn_softmax` from its output `probs` and dL/dprobs, for hand-written
/// backward passes (the scale included).
pub fn attn_softmax_bwd(
    probs: &Tensor,
    grad: &Tensor,
    keep: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let (_, h, q, k) = probs.dims4()?;
    let op = AttnSoftmax {
        keep: keep.contiguous()?,
        heads: h,
        q,
        k,
        scale: scale as f32,
        causal,
    };
    input_grad(op.bwd(probs, probs, grad)?)
}

#[derive(Clone)]
struct AttnSoftmax {
    keep: Tensor,
    heads: usize,
    q: usize,
    k: usize,
    scale: f32,
    causal: bool,
}

impl AttnSoftmax {
    /// The last visible key of query i, or None when the row sees none through causality.
    fn last(&self, i: usize) -> usize {
        if self.causal {
            (i + self.k - self.q).min(self.k - 1)
        } else {
            self.k - 1
        }
    }

    fn keep_host(&self) -> Result<Vec<u8>> {
        self.keep.flatten_all()?.to_vec1::<u8>()
    }

    fn rows(&self) -> impl Fn(usize) -> (usize, usize) + '_ {
        move |row| (row / self.q / self.heads, row % self.q)
    }

    #[cfg(feature = "cuda")]
    fn geometry(&self) -> launch::AttnRows {
        launch::AttnRows {
            heads: self.heads,
            q: self.q,
            k: self.k,
            scale: self.scale,
            causal: self.causal,
        }
    }

    fn forward<T: Float>(&self, s: &[T], keep: &[u8]) -> Vec<T> {
        let k = self.k;
        let at = self.rows();
        let mut out = vec![T::of(0.0); s.len()];
        out.par_chunks_mut(k)
            .zip(s.par_chunks(k))
            .enumerate()
            .for_each(|(row, (o, x))| {
                let (b, i) = at(row);
                let kb = &keep[b * k..(b + 1) * k];
                let last = self.last(i);
                let mut m = f32::NEG_INFINITY;
                for j in 0..=last {
                    if kb[j] != 0 {
                        m = m.max(x[j].f32() * self.scale);
                    }
                }
                if m == f32::NEG_INFINITY {
                    o.fill(T::of(1.0 / k as f32));
                    return;
                }
                let mut sum = 0f32;
                for j in 0..=last {
                    if kb[j] != 0 {
                        sum += (x[j].f32() * self.scale - m).exp();
                    }
                }
                for j in 0..k {
                    let e = if j <= last && kb[j] != 0 {
                        (x[j].f32() * self.scale - m).exp() / sum
                    } else {
                        0.0
                    };
                    o[j] = T::of(e);
                }
            });
        out
    }

    fn backward<T: Float>(&self, p: &[T], dp: &[T], keep: &[u8]) -> Vec<T> {
        let k = self.k;
        let at = self.rows();
        let mut out = vec![T::of(0.0); p.len()];
        out.par_chunks_mut(k)
            .zip(p.par_chunks(k).zip(dp.par_chunks(k)))
            .enumerate()
            .for_each(|(row, (o, (p, dp)))| {
                let (b, i) = at(row);
                let kb = &keep[b * k..(b + 1) * k];
                let last = self.last(i);
                if !kb[..=last].iter().any(|&v| v != 0) {
                    return;
                }
                let dot: f32 = (0..=last).map(|j| p[j].f32() * dp[j].f32()).sum();
                for j in 0..=last {
                    if kb[j] != 0 {
                        o[j] = T::of(self.scale * p[j].f32() * (dp[j].f32() - dot));
                    }
                }
            });
        out
    }
}

impl CustomOp1 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "attn-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let keep = self.keep_host()?;
        let out = float_dispatch!("fused op", s.dtype(), T => owned(self.forward(slice::<T>(s, l)?, &keep)));
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = launch::attn_softmax(s, l, &self.keep, self.geometry())?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.to_dtype(res.dtype())?.contiguous()?;
        span("attention softmax", || {
            Ok(Some(
                res.contiguous()?
                    .apply_op2_no_bwd(&grad, &AttnSoftmaxBwd(self.clone()))?,
            ))
        })
    }
}

struct AttnSoftmaxBwd(AttnSoftmax);

impl CustomOp2 for AttnSoftmaxBwd {
    fn name(&self) -> &'static str {
        "attn-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        dp: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let keep = self.0.keep_host()?;
        let out = float_dispatch!("fused op", p.dtype(), T => owned(
            self.0.backward(slice::<T>(p, pl)?, slice::<T>(dp, dl)?, &keep)
        ));
        Ok((out, pl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        dp: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = launch::attn_softmax_bwd(p, pl, dp, dl, &self.0.keep, self.0.geometry())?;
        Ok((out, pl.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod launch {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{bail, Layout, Result, Tensor};

    use crate::ops::cuda::{alloc, func, grid, row_block, rows, suffix, view, with_cuda};

    /// Row geometry of attention scores `[b, h, q, k]`.
    #[derive(Debug, Clone, Copy)]
    pub(super) struct AttnRows {
        pub heads: usize,
        pub q: usize,
        pub k: usize,
        pub scale: f32,
        pub causal: bool,
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
    pub(super) fn attn_softmax(
        s: &CudaStorage,
        l: &Layout,
        keep: &Tensor,
        r: AttnRows,
    ) -> Result<CudaStorage> {
        launch_softmax("attn_softmax", &[(s, l)], keep, r)
    }

    /// The gradient of `attn_softmax` given its output `p` and the output's gradient `dp`.
    pub(super) fn attn_softmax_bwd(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::max_diff;
    use candle_core::{Device, Var, D};

    /// The composed reference: additive mask, then softmax from differentiable primitives.
    fn reference_softmax(s: &Tensor, keep: &[u8], scale: f64) -> Tensor {
        let (b, _, q, k) = s.dims4().unwrap();
        let mut bias = vec![0f32; b * q * k];
        for bi in 0..b {
            for i in 0..q {
                for j in 0..k {
                    if j > i + k - q || keep[bi * k + j] == 0 {
                        bias[(bi * q + i) * k + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (b, 1, q, k), &Device::Cpu).unwrap();
        let x = (s * scale).unwrap().broadcast_add(&bias).unwrap();
        let m = x.max_keepdim(D::Minus1).unwrap().detach();
        let e = x.broadcast_sub(&m).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
    }

    #[test]
    fn attn_softmax_matches_the_composed_softmax_and_its_gradient() {
        let dev = Device::Cpu;
        let (b, h, q, k) = (2, 3, 5, 5);
        let s = Var::from_tensor(&Tensor::randn(0f32, 2.0, (b, h, q, k), &dev).unwrap()).unwrap();
        let keep_v: Vec<u8> = vec![1, 1, 1, 1, 1, 0, 0, 1, 1, 1];
        let keep = Tensor::from_vec(keep_v.clone(), (b, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (b, h, q, k), &dev).unwrap();
        let p = attn_softmax(s.as_tensor(), &keep, 0.7, true).unwrap();
        let g = (&p * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = g.get(s.as_tensor()).unwrap().clone();

        let r = reference_softmax(s.as_tensor(), &keep_v, 0.7);
        // Rows of batch 1 whose visible keys are all padding: uniform here, NaN in the reference.
        let p1 = p.narrow(0, 1, 1).unwrap().narrow(2, 0, 2).unwrap();
        assert!(max_diff(&p1, &Tensor::full(0.2f32, p1.shape(), &dev).unwrap()) < 1e-7);
        let (pv, rv) = (p.narrow(2, 2, 3).unwrap(), r.narrow(2, 2, 3).unwrap());
        assert!(max_diff(&pv, &rv) < 1e-6);
        let p0 = p.narrow(0, 0, 1).unwrap();
        assert!(max_diff(&p0, &r.narrow(0, 0, 1).unwrap()) < 1e-6);

        let gr = (&r.narrow(2, 2, 3).unwrap() * &w.narrow(2, 2, 3).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grs = gr.get(s.as_tensor()).unwrap();
        assert!(max_diff(&gs.narrow(2, 2, 3).unwrap(), &grs.narrow(2, 2, 3).unwrap()) < 1e-6);
        // No gradient through rows that see nothing.
        let dead = gs.narrow(0, 1, 1).unwrap().narrow(2, 0, 2).unwrap();
        assert_eq!(
            dead.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn attn_softmax_bf16_is_the_f32_result_rounded() {
        let dev = Device::Cpu;
        let s = Tensor::randn(0f32, 1.0, (1, 2, 4, 4), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let keep = Tensor::ones((1, 4), DType::U8, &dev).unwrap();
        let p16 = attn_softmax(&s, &keep, 0.5, true).unwrap();
        let p32 = attn_softmax(&s.to_dtype(DType::F32).unwrap(), &keep, 0.5, true).unwrap();
        assert_eq!(
            p16.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            p32.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
}
