//! Frozen weights, dense or 4-bit, and their products as custom autograd ops: `y = x · Wᵀ` with a
//! gradient for x only.
//!
//! The op's only input is `x`. For a 4-bit W the graph keeps the packed weight and nothing
//! dense: forward dequantizes W into a temporary, backward dequantizes it again for `dx = dy · W`.
//! For a dense W the op spares what candle's matmul backward would do unasked: compute and store
//! a full-size gradient for the frozen weight. LoRA adapters beside it carry what trains.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

use super::Quant4Tensor;
use crate::ops::matmul_add;
use crate::ops::profile::span;

/// `x · Wᵀ` for x `[..., in]` and W `[out, in]`, as one 2-D matmul over the flattened leading
/// dimensions: a transposed 2-D operand needs no copy, a broadcast one does (and autograd would
/// keep that copy alive until backward).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner;
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let mut out = dims.to_vec();
    *out.last_mut().expect("x has a last dimension") = w.dim(0)?;
    y.reshape(out)
}

/// A base weight `[out, in]` that never trains: dense, or 4-bit (NF4 or FP4) and dequantized for
/// each product. Every product with a frozen weight goes through here.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    Dense(Tensor),
    Quant(Arc<Quant4Tensor>),
}

/// The profile span the decoder layers' frozen products count under.
const LINEAR: &str = "frozen linear matmuls";
/// The LM head's, counted apart.
const LM_HEAD: &str = "LM head matmuls";

impl FrozenWeight {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        let d = match self {
            FrozenWeight::Dense(w) => w.dims(),
            FrozenWeight::Quant(q) => q.shape().dims(),
        };
        (d[0], d[1])
    }

    /// W `[out, in]` dense in `dtype`: a 4-bit weight dequantized into a temporary.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        match self {
            FrozenWeight::Quant(q) => span("4-bit dequantize", || {
                q.dequantize(dtype).map_err(quant_err)
            }),
            FrozenWeight::Dense(w) => w.to_dtype(dtype),
        }
    }

    /// This weight dense in `dtype`, for several products in a row: a 4-bit weight is
    /// dequantized once.
    pub fn held(&self, dtype: DType) -> Result<FrozenWeight> {
        Ok(FrozenWeight::Dense(self.dequantize(dtype)?))
    }

    /// `x · Wᵀ` for x `[..., in]`, with a gradient for x only.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.product(x, LINEAR)
    }

    /// `acc + x · Wᵀ` for 2-D x, accumulating in place on a GPU (see `ops::matmul_add`): acc must
    /// not be shared. Nothing is tracked.
    pub fn forward_add(&self, acc: Tensor, x: &Tensor) -> Result<Tensor> {
        let w = self.dequantize(x.dtype())?; // [out, in]
        span(LINEAR, || matmul_add(acc, x, &w, true))
    }

    /// dL/dx `[..., in]` of `x · Wᵀ` given dL/dy `[..., out]`: `gy · W`, for hand-written
    /// backward passes.
    pub fn input_grad(&self, gy: &Tensor) -> Result<Tensor> {
        self.product_grad(gy, LINEAR)
    }

    /// `acc + gy · W` for 2-D acc `[rows, in]` and gy `[rows, out]`, accumulating in place on a
    /// GPU: acc must not be shared.
    pub fn input_grad_add(&self, acc: Tensor, gy: &Tensor) -> Result<Tensor> {
        let w = self.dequantize(gy.dtype())?; // [out, in]
        span(LINEAR, || matmul_add(acc, gy, &w, false))
    }

    /// `x · Wᵀ` as the custom op, its matmuls counted under `label`.
    fn product(&self, x: &Tensor, label: &'static str) -> Result<Tensor> {
        x.contiguous()?.apply_op1(FrozenMatmul {
            w: self.clone(),
            label,
        })
    }

    /// `gy · W`, its matmul counted under `label`.
    fn product_grad(&self, gy: &Tensor, label: &'static str) -> Result<Tensor> {
        let w = self.dequantize(gy.dtype())?; // [out, in]
        span(label, || matmul_t(gy, &w.t()?))
    }
}

/// `x · Wᵀ` for the LM head `[vocab, hidden]`: a dense frozen product, counted apart in profiles.
pub fn lm_head(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    FrozenWeight::Dense(w.detach()).product(x, LM_HEAD)
}

/// dL/dx of `lm_head(x, W)`: `gy · W`, for hand-written backward passes.
pub fn lm_head_input_grad(gy: &Tensor, w: &Tensor) -> Result<Tensor> {
    FrozenWeight::Dense(w.detach()).product_grad(gy, LM_HEAD)
}

/// The op: the input is x alone, so the weight never gets a gradient.
struct FrozenMatmul {
    w: FrozenWeight,
    /// The profile span its matmuls count under.
    label: &'static str,
}

fn quant_err(e: super::QuantError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl FrozenMatmul {
    /// One 2-D matmul straight on the input's storage: no copy of x, none of y. On a GPU the
    /// 4-bit weight is dequantized by qlorad's kernel and the product runs in cuBLAS.
    fn forward<S: BackendStorage>(
        &self,
        storage: &S,
        layout: &Layout,
        pick: fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let w = self.w.dequantize(storage.dtype())?.contiguous()?; // [out, in]
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
        let y = span(self.label, || {
            storage.matmul(ws, (1, rows, out, inner), &x2, &wl.transpose(0, 1)?)
        })?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("x has a last dimension") = out;
        Ok((y, shape.into()))
    }
}

/// Rows of x up to which a 4-bit product on the CPU decodes W block by block into the dot
/// products (generation's one token a step) rather than dequantizing it whole first.
const FEW_ROWS: usize = 8;

impl FrozenMatmul {
    /// A 4-bit W times a few f32 rows of x on the CPU, W never dense; None for any other case.
    fn few_rows_4bit(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> Result<Option<(CpuStorage, Shape)>> {
        let (FrozenWeight::Quant(q), CpuStorage::F32(x)) = (&self.w, storage) else {
            return Ok(None);
        };
        let dims = layout.shape().dims();
        let inner = dims[dims.len() - 1];
        let rows = layout.shape().elem_count() / inner;
        if rows > FEW_ROWS || !layout.is_contiguous() {
            return Ok(None);
        }
        let x = &x[layout.start_offset()..layout.start_offset() + rows * inner];
        let Some(y) = span(self.label, || q.matmul_rows_cpu(x, rows).map_err(quant_err))? else {
            return Ok(None);
        };
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("x has a last dimension") = self.w.dims().0;
        Ok(Some((CpuStorage::F32(y), shape.into())))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        if let Some(out) = self.few_rows_4bit(storage, layout)? {
            return Ok(out);
        }
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
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.forward(storage, layout, |s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.w.product_grad(grad_res, self.label)?))
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

    fn setup() -> (Tensor, FrozenWeight, Tensor) {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (24, 64), &dev).unwrap();
        let q = Arc::new(Quant4Tensor::quantize(&w, &QuantConfig::default()).unwrap());
        let wd = q.dequantize(DType::F32).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &dev).unwrap();
        (x, FrozenWeight::Quant(q), wd)
    }

    /// The CPU's few-rows product decodes W block by block; it equals the product with the
    /// dequantized W, for one row up to the most it takes, several blocks a row, NF4 and FP4,
    /// with and without double quantization; more rows take the dense path.
    #[test]
    fn few_rows_decode_blocks_into_the_product() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (40, 192), &dev).unwrap();
        for quant_type in [crate::quant::QuantType::Nf4, crate::quant::QuantType::Fp4] {
            for double_quant in [false, true] {
                let cfg = QuantConfig {
                    quant_type,
                    block_size: 64,
                    double_quant,
                };
                let q = Arc::new(Quant4Tensor::quantize(&w, &cfg).unwrap());
                let wd = q.dequantize(DType::F32).unwrap();
                let fw = FrozenWeight::Quant(q);
                for rows in [1, 3, FEW_ROWS, FEW_ROWS + 1] {
                    let x = Tensor::randn(0f32, 1.0, (rows, 192), &dev).unwrap();
                    let y = fw.forward(&x).unwrap();
                    let want = x.matmul(&wd.t().unwrap()).unwrap();
                    let diff = max_abs_diff(&y, &want);
                    assert!(
                        diff < 2e-5,
                        "{quant_type:?} dq {double_quant} rows {rows}: {diff}"
                    );
                }
            }
        }
    }

    #[test]
    fn forward_equals_dense_matmul_on_the_dequantized_weight() {
        let (x, w, wd) = setup();
        let y = w.forward(&x).unwrap();
        let want = x.broadcast_matmul(&wd.t().unwrap()).unwrap();
        // Six rows take the few-rows path, which sums in another order (values near 4).
        let diff = max_abs_diff(&y, &want);
        assert!(diff < 4e-6, "{diff}");
    }

    #[test]
    fn gradient_matches_the_dense_graph_and_finite_differences() {
        let (x, w, wd) = setup();
        let xv = Var::from_tensor(&x).unwrap();
        // loss = sum(y * c) for a fixed c, so dL/dx = c · W
        let c = Tensor::randn(0f32, 1.0, (2, 3, 24), &Device::Cpu).unwrap();
        let loss = (w.forward(xv.as_tensor()).unwrap() * &c)
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
            (w.forward(&t).unwrap() * &c)
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
        let (x, w, wd) = setup();
        let xt = x.transpose(0, 1).unwrap(); // [3, 2, 64], strided
        let y = w.forward(&xt).unwrap();
        let want = xt
            .contiguous()
            .unwrap()
            .broadcast_matmul(&wd.t().unwrap())
            .unwrap();
        let diff = max_abs_diff(&y, &want);
        assert!(diff < 4e-6, "{diff}");
    }
}
