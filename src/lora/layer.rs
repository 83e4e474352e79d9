//! A frozen linear layer (dense or 4-bit) with an optional trainable LoRA adapter beside it.

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::ops::profile::span;
use crate::ops::{dropout, dropout_add, matmul_add};
use crate::quant::linear::{matmul_t, FrozenWeight};
use crate::rng::Rng;

/// A frozen linear layer: its weight and bias.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    pub weight: FrozenWeight,
    /// `[out]`, in the compute dtype.
    pub bias: Option<Tensor>,
}

impl FrozenLinear {
    /// `x · Wᵀ + b` for x `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.add_bias(self.weight.forward(x)?)
    }

    /// `acc + x · Wᵀ + b` for 2-D x, accumulating in place on a GPU: acc must not be shared.
    pub fn forward_add(&self, acc: Tensor, x: &Tensor) -> Result<Tensor> {
        self.add_bias(self.weight.forward_add(acc, x)?)
    }

    /// This linear with its weight dense in `dtype`, for several products in a row: a 4-bit
    /// weight is dequantized once into a temporary.
    pub fn held(&self, dtype: DType) -> Result<FrozenLinear> {
        Ok(FrozenLinear {
            weight: self.weight.held(dtype)?,
            bias: self.bias.clone(),
        })
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// The trainable low-rank update `B · A`, kept in f32.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[r, in]`, Kaiming-uniform as PEFT initialises it.
    pub a: Var,
    /// `[out, r]`, zeros.
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

impl LoraAdapter {
    /// PEFT's initialisation: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_ with a=sqrt(5)),
    /// B = 0, so the adapted layer starts equal to the base.
    pub fn new(
        (out, inp): (usize, usize),
        r: usize,
        scale: f64,
        dropout: f64,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (inp as f32).sqrt();
        let a: Vec<f32> = (0..r * inp).map(|_| rng.uniform(-bound, bound)).collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (r, inp), device)?)?;
        let b = Var::zeros((out, r), DType::F32, device)?;
        Ok(LoraAdapter {
            a,
            b,
            scale,
            dropout,
        })
    }

    pub fn from_weights(a: &Tensor, b: &Tensor, scale: f64, dropout: f64) -> Result<Self> {
        Ok(LoraAdapter {
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            scale,
            dropout,
        })
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `dropout(x) · Aᵀ · (scale · B)ᵀ`, in x's dtype: the scale goes on the small B, not on the
    /// `[tokens, out]` product.
    pub fn forward(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let x = self.dropped(x, self.seed(rng))?;
        let (a, b) = self.weights(x.dtype(), true)?;
        matmul_t(&matmul_t(&x, &a)?, &b)
    }

    /// `forward` for generation: no dropout, nothing tracked. A few f32 rows on the CPU run in
    /// plain loops, since a threaded matmul's start costs more than these rank-r products.
    pub fn infer(&self, x: &Tensor) -> Result<Tensor> {
        let inner = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / inner;
        if !(x.device().is_cpu() && x.dtype() == DType::F32 && rows <= INFER_ROWS) {
            let (a, b) = self.weights(x.dtype(), false)?;
            return matmul_t(&matmul_t(&x.detach(), &a)?, &b);
        }
        let r = self.rank();
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let a: Vec<f32> = self.a.as_tensor().flatten_all()?.to_vec1()?; // [r, in]
        let b: Vec<f32> = self.b.as_tensor().flatten_all()?.to_vec1()?; // [out, r]
        let out = b.len() / r.max(1);
        let scale = self.scale as f32;
        let mut y = vec![0f32; rows * out];
        for (xr, yr) in xs.chunks(inner).zip(y.chunks_mut(out)) {
            let u: Vec<f32> = a
                .chunks(inner)
                .map(|ar| ar.iter().zip(xr).map(|(p, q)| p * q).sum::<f32>())
                .collect();
            for (yo, bo) in yr.iter_mut().zip(b.chunks(r)) {
                *yo = scale * bo.iter().zip(&u).map(|(p, q)| p * q).sum::<f32>();
            }
        }
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("x has a last dimension") = out;
        Tensor::from_vec(y, shape, x.device())
    }

    /// The dropout seed a training forward draws (none without dropout).
    fn seed(&self, rng: Option<&mut Rng>) -> Option<u64> {
        match rng {
            Some(rng) if self.dropout > 0.0 => Some(rng.next_u64()),
            _ => None,
        }
    }

    fn dropped(&self, x: &Tensor, seed: Option<u64>) -> Result<Tensor> {
        match seed {
            Some(seed) => dropout(x, self.dropout, seed),
            None => Ok(x.clone()),
        }
    }

    /// A and scale·B in `dtype`; untracked for hand-written backward passes.
    fn weights(&self, dtype: DType, tracked: bool) -> Result<(Tensor, Tensor)> {
        let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
        let (a, b) = if tracked {
            (a.clone(), b.clone())
        } else {
            (a.detach(), b.detach())
        };
        Ok((
            a.to_dtype(dtype)?,
            b.affine(self.scale, 0.0)?.to_dtype(dtype)?,
        ))
    }

    /// The dense update `scale · B · A` `[out, in]` in f32.
    pub fn delta(&self) -> Result<Tensor> {
        self.b
            .as_tensor()
            .matmul(self.a.as_tensor())?
            .affine(self.scale, 0.0)
    }
}

/// What a LoRA linear's hand-written backward keeps from its forward.
pub(crate) struct LoraSaved {
    /// The dropout seed, when dropout ran: backward regenerates the mask from it.
    seed: Option<u64>,
    /// `dropout(x)` when dropout ran (A's gradient reads it); x itself otherwise.
    dropped: Option<Tensor>,
    /// `dropout(x) · Aᵀ`, `[rows, r]` in x's dtype.
    u: Tensor,
}

/// What a linear's hand-written backward reads: the frozen part (its weight held dense when the
/// forward already dequantized it) and the adapter's saved inputs.
pub(crate) struct LinearSaved {
    base: FrozenLinear,
    lora: Option<LoraSaved>,
}

/// dL/dx of one linear, and the f32 gradients of its adapter's A and B when it has one.
pub(crate) type LinearGrads = (Tensor, Option<(Tensor, Tensor)>);

/// A frozen linear and, if this module is targeted, its adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub base: FrozenLinear,
    pub adapter: Option<LoraAdapter>,
}

/// Rows up to which `LoraAdapter::infer` loops by hand on the CPU.
const INFER_ROWS: usize = 8;

impl LoraLinear {
    /// `base(x) + adapter(x)` for generation: no dropout, nothing tracked.
    pub fn infer(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        match &self.adapter {
            Some(a) => y + span("LoRA adapter forwards", || a.infer(x))?,
            None => Ok(y),
        }
    }

    /// `base(x) + adapter(x)`; `rng` is given in training, for dropout.
    pub fn forward(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        match &self.adapter {
            Some(a) => y + span("LoRA adapter forwards", || a.forward(x, rng))?,
            None => Ok(y),
        }
    }

    /// `forward` for a hand-written backward: the same output and the same draws from `rng`,
    /// and what `backward` needs. x is `[rows, in]`; nothing is tracked. With `hold`, the
    /// weight dequantized for this product is kept for the backward's (a replay's backward
    /// follows at once); without it the backward dequantizes again, so that a whole model's
    /// saved layers do not hold every weight dense.
    pub(crate) fn forward_saving(
        &self,
        x: &Tensor,
        rng: Option<&mut Rng>,
        hold: bool,
    ) -> Result<(Tensor, LinearSaved)> {
        let base = if hold {
            self.base.held(x.dtype())?
        } else {
            self.base.clone()
        };
        let Some(lora) = self.adapter_input(x, rng)? else {
            let y = base.forward(x)?;
            return Ok((y, LinearSaved { base, lora: None }));
        };
        let a = self.adapter.as_ref().expect("saved implies an adapter");
        // The thin product first, then the frozen GEMM accumulates onto it: its epilogue reads
        // the output almost for free, where an add after it would be a pass of its own.
        let y = span("LoRA adapter forwards", || {
            matmul_t(&lora.u, &a.weights(x.dtype(), false)?.1)
        })?;
        let y = base.forward_add(y, x)?;
        Ok((
            y,
            LinearSaved {
                base,
                lora: Some(lora),
            },
        ))
    }

    /// What `backward` needs where the output itself is not: the adapter's inputs (the same
    /// draws from `rng`), the weight left packed.
    pub(crate) fn saving_only(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<LinearSaved> {
        Ok(LinearSaved {
            base: self.base.clone(),
            lora: self.adapter_input(x, rng)?,
        })
    }

    /// `acc + forward(x)` for 2-D x with nothing tracked, accumulating in place on a GPU: acc
    /// must not be shared. The same draws from `rng` as `forward`.
    pub(crate) fn forward_add(
        &self,
        acc: Tensor,
        x: &Tensor,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let y = self.base.forward_add(acc, x)?;
        let Some(saved) = self.adapter_input(x, rng)? else {
            return Ok(y);
        };
        let a = self.adapter.as_ref().expect("saved implies an adapter");
        span("LoRA adapter forwards", || {
            matmul_add(y, &saved.u, &a.weights(x.dtype(), false)?.1, true)
        })
    }

    /// The adapter's saved inputs (the same draws from `rng` as `forward`).
    fn adapter_input(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Option<LoraSaved>> {
        let Some(a) = &self.adapter else {
            return Ok(None);
        };
        span("LoRA adapter forwards", || {
            let seed = a.seed(rng);
            let d = a.dropped(x, seed)?;
            let u = matmul_t(&d, &a.weights(x.dtype(), false)?.0)?;
            let dropped = seed.map(|_| d);
            Ok(Some(LoraSaved { seed, dropped, u }))
        })
    }

    /// dL/dx `[rows, in]` (added to `acc` when given, in place on a GPU) and the adapter's
    /// gradients, given x `[rows, in]` as the forward saw it, what `forward_saving` kept, and
    /// dL/dy `[rows, out]`. The products run in x's dtype as autograd would; A's and B's
    /// gradients come back in f32.
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        saved: &LinearSaved,
        gy: &Tensor,
        acc: Option<Tensor>,
    ) -> Result<LinearGrads> {
        let base = &saved.base;
        let (Some(a), Some(saved)) = (&self.adapter, &saved.lora) else {
            let gx = match acc {
                Some(acc) => base.weight.input_grad_add(acc, gy)?,
                None => base.weight.input_grad(gy)?,
            };
            return Ok((gx, None));
        };
        // The adapter's part first, the frozen GEMM accumulating onto it last (see
        // `forward_saving`).
        let (gx, grads) = span("LoRA adapter backward", || {
            let (wa, wb) = a.weights(x.dtype(), false)?;
            let gu = gy.matmul(&wb)?; // [rows, r]
            let gb = (gy.t()?.matmul(&saved.u)?.to_dtype(DType::F32)? * a.scale)?;
            let d = saved.dropped.as_ref().unwrap_or(x);
            let ga = gu.t()?.matmul(d)?.to_dtype(DType::F32)?;
            // Dropout's backward is the same mask and scale, regenerated from the seed.
            let gx = match (saved.seed, acc) {
                (Some(seed), Some(acc)) => dropout_add(acc, &gu.matmul(&wa)?, a.dropout, seed)?,
                (Some(seed), None) => dropout(&gu.matmul(&wa)?, a.dropout, seed)?,
                (None, Some(acc)) => matmul_add(acc, &gu, &wa, false)?,
                (None, None) => gu.matmul(&wa)?,
            };
            Ok::<_, candle_core::Error>((gx, (ga, gb)))
        })?;
        Ok((base.weight.input_grad_add(gx, gy)?, Some(grads)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generation's adapter product (plain loops for a few rows) equals the training forward.
    #[test]
    fn infer_equals_forward() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 0.3, (4, 48), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, (20, 4), &dev).unwrap();
        let lora = LoraAdapter::from_weights(&a, &b, 2.0, 0.1).unwrap();
        for rows in [1, 5, INFER_ROWS, INFER_ROWS + 3] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 48), &dev).unwrap();
            let (y, want) = (lora.infer(&x).unwrap(), lora.forward(&x, None).unwrap());
            assert_eq!(y.dims(), want.dims());
            let d = (y - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5, "rows {rows}");
        }
    }

    #[test]
    fn starts_equal_to_the_base_and_trains_only_a_and_b() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.3, (8, 16), &dev).unwrap();
        let base = FrozenLinear {
            weight: FrozenWeight::Dense(w.clone()),
            bias: None,
        };
        let mut rng = Rng::new(3);
        let adapter = LoraAdapter::new((8, 16), 4, 2.0, 0.0, &mut rng, &dev).unwrap();
        let a_max = adapter
            .a
            .as_tensor()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(a_max > 0.0 && a_max <= 0.25, "A within 1/sqrt(16): {a_max}");
        let layer = LoraLinear {
            base,
            adapter: Some(adapter.clone()),
        };
        let x = Tensor::randn(0f32, 1.0, (3, 16), &dev).unwrap();
        let y = layer.forward(&x, None).unwrap();
        let y0 = x.matmul(&w.t().unwrap()).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), y0.to_vec2::<f32>().unwrap());

        let loss = y.sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        // dL/dB = scale * dyᵀ (x Aᵀ) is non-zero; dL/dA is zero while B = 0.
        let gb = grads.get(adapter.b.as_tensor()).unwrap();
        assert!(
            gb.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
        assert!(grads.get(adapter.a.as_tensor()).is_some());
        assert!(grads.get(&w).is_none(), "the base weight gets no gradient");
    }
}
