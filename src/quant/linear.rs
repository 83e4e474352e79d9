//! Frozen linears as custom autograd ops: `y = x · Wᵀ` with a gradient for x only.
//!
//! The op's only input is `x`. For a 4-bit W the graph keeps the packed weight and nothing
//! dense: forward dequantizes W into a temporary, backward dequantizes it again for `dx = dy · W`.
//! For a dense W the op spares what candle's matmul backward would do unasked: compute and store
//! a full-size gradient for the frozen weight. LoRA adapters beside it carry what trains.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

use super::Nf4Tensor;
use crate::ops::profile::span;

/// `x · Wᵀ` for x `[..., in]` and W `[out, in]`, as one 2-D matmul over the flattened leading
/// dimensions: a transposed 2-D operand needs no copy, a broadcast one does (and autograd would
/// keep that copy alive until backward).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner;
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let mut out = dims.to_vec();
    *out.last_mut().expect("x has a last dimension") = w.dim(0)?;
    y.reshape(out)
}

/// `x · Wᵀ` for a 4-bit W of shape `[out, in]`; x is `[..., in]`.
pub fn linear_4bit(x: &Tensor, w: &Arc<Nf4Tensor>) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenMatmul {
        w: Frozen::Packed(w.clone()),
        label: LINEAR,
    })
}

/// `x · Wᵀ` for a dense frozen W `[out, in]`, with no gradient computed for W.
pub fn linear_frozen(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenMatmul {
        w: Frozen::Dense(w.detach()),
        label: LINEAR,
    })
}

/// `acc + x · Wᵀ` for a 4-bit W and 2-D x, accumulating in place on a GPU (see
/// `ops::matmul_add`); nothing is tracked.
pub fn linear_4bit_add(acc: Tensor, x: &Tensor, w: &Arc<Nf4Tensor>) -> candle_core::Result<Tensor> {
    FrozenMatmul {
        w: Frozen::Packed(w.clone()),
        label: LINEAR,
    }
    .forward_add(acc, x)
}

/// `acc + x · Wᵀ` for a dense frozen W.
pub fn linear_frozen_add(acc: Tensor, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    FrozenMatmul {
        w: Frozen::Dense(w.detach()),
        label: LINEAR,
    }
    .forward_add(acc, x)
}

/// dL/dx of `x · Wᵀ` for a 4-bit W: `gy · W`, for hand-written backward passes.
pub fn linear_4bit_input_grad(gy: &Tensor, w: &Arc<Nf4Tensor>) -> candle_core::Result<Tensor> {
    FrozenMatmul {
        w: Frozen::Packed(w.clone()),
        label: LINEAR,
    }
    .input_grad(gy)
}

/// `acc + gy · W` for a 4-bit W, accumulating in place on a GPU (see `ops::matmul_add`).
pub fn linear_4bit_input_grad_add(
    acc: Tensor,
    gy: &Tensor,
    w: &Arc<Nf4Tensor>,
) -> candle_core::Result<Tensor> {
    FrozenMatmul {
        w: Frozen::Packed(w.clone()),
        label: LINEAR,
    }
    .input_grad_add(acc, gy)
}

/// `acc + gy · W` for a dense frozen W.
pub fn linear_frozen_input_grad_add(
    acc: Tensor,
    gy: &Tensor,
    w: &Tensor,
) -> candle_core::Result<Tensor> {
    FrozenMatmul {
        w: Frozen::Dense(w.detach()),
        label: LINEAR,
    }
    .input_grad_add(acc, gy)
}

/// dL/dx of `x · Wᵀ` for a dense frozen W: `gy · W`.
pub fn linear_frozen_input_grad(gy: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    FrozenMatmul {
        w: Frozen::Dense(w.detach()),
        label: LINEAR,
    }
    .input_grad(gy)
}

/// `x · Wᵀ` for the LM head `[vocab, hidden]`: `linear_frozen`, counted apart in profiles.
pub fn lm_head(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(lm_head_op(w))
}

/// dL/dx of `lm_head(x, W)`: `gy · W`, for hand-written backward passes.
pub fn lm_head_input_grad(gy: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    lm_head_op(w).input_grad(gy)
}

fn lm_head_op(w: &Tensor) -> FrozenMatmul {
    FrozenMatmul {
        w: Frozen::Dense(w.detach()),
        label: "LM head matmuls",
    }
}

enum Frozen {
    Packed(Arc<Nf4Tensor>),
    Dense(Tensor),
}

struct FrozenMatmul {
    w: Frozen,
    /// The profile span its matmuls count under.
    label: &'static str,
}

const LINEAR: &str = "frozen linear matmuls";

fn quant_err(e: super::QuantError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl FrozenMatmul {
    /// W `[out, in]` in `dtype`: a temporary dequantization for a packed weight.
    fn weight(&self, dtype: candle_core::DType) -> candle_core::Result<Tensor> {
        match &self.w {
            Frozen::Packed(q) => span("4-bit dequantize", || {
                q.dequantize(dtype).map_err(quant_err)
            }),
            Frozen::Dense(w) => w.to_dtype(dtype),
        }
    }

    fn input_grad(&self, gy: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight(gy.dtype())?; // [out, in]
        span(self.matmul_name(), || matmul_t(gy, &w.t()?))
    }

    fn forward_add(&self, acc: Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight(x.dtype())?; // [out, in]
        span(self.matmul_name(), || {
            crate::ops::matmul_add(acc, x, &w, true)
        })
    }

    /// `acc + gy · W` for 2-D acc `[rows, in]` and gy `[rows, out]`.
    fn input_grad_add(&self, acc: Tensor, gy: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight(gy.dtype())?; // [out, in]
        span(self.matmul_name(), || {
            crate::ops::matmul_add(acc, gy, &w, false)
        })
    }

    fn matmul_name(&self) -> &'static str {
        self.label
    }
}

impl FrozenMatmul {
    /// One 2-D matmul straight on the input's storage: no copy of x, none of y. On a GPU the
    /// 4-bit weight is dequantized by qlorad's kernel and the product runs in cuBLAS.
    fn forward<S: BackendStorage>(
        &self,
        storage: &S,
        layout: &Layout,
        pick: fn(&Storage) -> Option<&S>,
    ) -> candle_core::Result<(S, Shape)> {
        let w = self.weight(storage.dtype())?.contiguous()?; // [out, in]
        let dims = layout.shape().dims();
        let inner = dims[dims.len() - 1];
        let rows = layout.shape().elem_count() / inner;
        let out = w.dim(0)?;
        if !layout.is_contiguous() || w.dim(1)? != inner {
            candle_core::bail!(
                "frozen-linear: input {:?} (contiguous: {}) does not fit weight {:?}",
                dims,
                layout.is_contiguous(),
                w.dims()
            );
        }
        let (ws, wl) = w.storage_and_layout();
        let Some(ws) = pick(&ws) else {
            candle_core::bail!("frozen-linear: weight and input are on different devices");
        };
        let x2 = Layout::contiguous_with_offset((rows, inner), layout.start_offset());
        let y = span(self.matmul_name(), || {
            storage.matmul(ws, (1, rows, out, inner), &x2, &wl.transpose(0, 1)?)
        })?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("x has a last dimension") = out;
        Ok((y, shape.into()))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(storage, layout, |s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.forward(storage, layout, |s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.input_grad(grad_res)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantConfig;
    use candle_core::{DType, Device, Var};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn setup() -> (Tensor, Arc<Nf4Tensor>, Tensor) {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (24, 64), &dev).unwrap();
        let q = Arc::new(Nf4Tensor::quantize(&w, &QuantConfig::default()).unwrap());
        let wd = q.dequantize(DType::F32).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &dev).unwrap();
        (x, q, wd)
    }

    #[test]
    fn forward_equals_dense_matmul_on_the_dequantized_weight() {
        let (x, q, wd) = setup();
        let y = linear_4bit(&x, &q).unwrap();
        let want = x.broadcast_matmul(&wd.t().unwrap()).unwrap();
        let diff = max_abs_diff(&y, &want);
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn gradient_matches_the_dense_graph_and_finite_differences() {
        let (x, q, wd) = setup();
        let xv = Var::from_tensor(&x).unwrap();
        // loss = sum(y * c) for a fixed c, so dL/dx = c · W
        let c = Tensor::randn(0f32, 1.0, (2, 3, 24), &Device::Cpu).unwrap();
        let loss = (linear_4bit(xv.as_tensor(), &q).unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let gx = g.get(xv.as_tensor()).expect("x has a gradient");
        let dense = (xv.as_tensor().broadcast_matmul(&wd.t().unwrap()).unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap();
        let gd = dense.backward().unwrap();
        let want = gd.get(xv.as_tensor()).unwrap();
        let diff = max_abs_diff(gx, want);
        assert!(diff < 1e-5, "{diff}");

        // central finite difference on one coordinate
        let eps = 1e-2f32;
        let mut xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let f = |xs: &[f32]| -> f32 {
            let t = Tensor::from_slice(xs, (2, 3, 64), &Device::Cpu).unwrap();
            (linear_4bit(&t, &q).unwrap() * &c)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let i = 77;
        xs[i] += eps;
        let up = f(&xs);
        xs[i] -= 2.0 * eps;
        let down = f(&xs);
        let fd = (up - down) / (2.0 * eps);
        let analytic = gx.flatten_all().unwrap().to_vec1::<f32>().unwrap()[i];
        assert!(
            (fd - analytic).abs() < 1e-2 * analytic.abs().max(1.0),
            "{fd} vs {analytic}"
        );
    }

    #[test]
    fn works_on_non_contiguous_input() {
        let (x, q, wd) = setup();
        let xt = x.transpose(0, 1).unwrap(); // [3, 2, 64], strided
        let y = linear_4bit(&xt, &q).unwrap();
        let want = xt
            .contiguous()
            .unwrap()
            .broadcast_matmul(&wd.t().unwrap())
            .unwrap();
        let diff = max_abs_diff(&y, &want);
        assert!(diff < 1e-6, "{diff}");
    }
}
