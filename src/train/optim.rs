//! AdamW with torch's semantics (`torch.optim.AdamW`, single-tensor path): decoupled weight
//! decay, bias correction, f32 state. On the CPU the state is host vectors; on a GPU it lives on
//! the device beside the parameters and one fused kernel per parameter updates all three.
//! [`Optimizer`] is what a run steps: this AdamW, or bitsandbytes' 8-bit one
//! (`train/adamw8bit.rs`), as `hyperparameters.optimizer` names it.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::adamw8bit::AdamW8bit;
use super::Result;

/// The optimizer of a run, by transformers' `optim` names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OptimizerKind {
    /// `torch.optim.AdamW` with f32 moments.
    #[default]
    #[serde(rename = "adamw_torch")]
    AdamwTorch,
    /// `bnb.optim.AdamW8bit`: 8-bit blockwise moments, a quarter of the memory.
    #[serde(rename = "adamw_bnb_8bit", alias = "adamw_8bit")]
    AdamwBnb8bit,
}

impl OptimizerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OptimizerKind::AdamwTorch => "adamw_torch",
            OptimizerKind::AdamwBnb8bit => "adamw_bnb_8bit",
        }
    }

    /// Bytes of optimizer state for a parameter of `n` elements.
    pub fn state_bytes(self, n: usize) -> usize {
        match self {
            OptimizerKind::AdamwTorch => 8 * n,
            OptimizerKind::AdamwBnb8bit => super::adamw8bit::state_bytes(n),
        }
    }
}

/// A run's optimizer.
#[derive(Debug)]
pub enum Optimizer {
    Torch(AdamW),
    Bnb8bit(AdamW8bit),
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, config: AdamWConfig, sizes: &[usize]) -> Self {
        match kind {
            OptimizerKind::AdamwTorch => Optimizer::Torch(AdamW::new(config, sizes)),
            OptimizerKind::AdamwBnb8bit => Optimizer::Bnb8bit(AdamW8bit::new(config, sizes)),
        }
    }

    pub fn kind(&self) -> OptimizerKind {
        match self {
            Optimizer::Torch(_) => OptimizerKind::AdamwTorch,
            Optimizer::Bnb8bit(_) => OptimizerKind::AdamwBnb8bit,
        }
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        match self {
            Optimizer::Torch(o) => o.step,
            Optimizer::Bnb8bit(o) => o.step,
        }
    }

    /// One update on the CPU, gradients as host vectors (accumulated and clipped).
    pub fn step(&mut self, params: &[Var], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        match self {
            Optimizer::Torch(o) => o.step(params, grads, lr),
            Optimizer::Bnb8bit(o) => o.step(params, grads, lr),
        }
    }

    /// One update of parameters on a GPU, gradients scaled by `grad_scale` (clipping). The
    /// 8-bit moments live on the host: the gradients come over, the parameters go back.
    #[cfg(feature = "cuda")]
    pub fn step_device(
        &mut self,
        params: &[Var],
        grads: &[Tensor],
        grad_scale: f32,
        lr: f64,
    ) -> Result<()> {
        match self {
            Optimizer::Torch(o) => o.step_device(params, grads, grad_scale, lr),
            Optimizer::Bnb8bit(o) => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    tracing::warn!(
                        "adamw_bnb_8bit keeps its moments in host memory on a GPU: each step \
                         copies the adapter's gradients over and its weights back (slower steps, \
                         no moments on the device)"
                    )
                });
                let host = grads
                    .iter()
                    .map(|g| {
                        let mut v = g.flatten_all()?.to_vec1::<f32>()?;
                        v.iter_mut().for_each(|x| *x *= grad_scale);
                        Ok(v)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                o.step(params, &host, lr)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Moments for one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// In the order of the parameters passed to `step`. Stale while `device` holds the state.
    state: Vec<Moments>,
    /// `(exp_avg, exp_avg_sq)` per parameter on its GPU, once a device step has run.
    device: Option<Vec<(Tensor, Tensor)>>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> Self {
        let state = sizes
            .iter()
            .map(|&n| Moments {
                exp_avg: vec![0.0; n],
                exp_avg_sq: vec![0.0; n],
            })
            .collect();
        AdamW {
            config,
            step: 0,
            state,
            device: None,
        }
    }

    /// The moments, fetched from the GPU when they live there.
    pub fn moments(&self) -> Result<std::borrow::Cow<'_, [Moments]>> {
        match &self.device {
            None => Ok(std::borrow::Cow::Borrowed(&self.state)),
            Some(d) => Ok(std::borrow::Cow::Owned(
                d.iter()
                    .map(|(m, v)| {
                        Ok(Moments {
                            exp_avg: m.to_vec1::<f32>()?,
                            exp_avg_sq: v.to_vec1::<f32>()?,
                        })
                    })
                    .collect::<candle_core::Result<_>>()?,
            )),
        }
    }

    /// Replace the moments (a resumed checkpoint); a GPU copy is made at the next device step.
    pub fn set_moments(&mut self, state: Vec<Moments>, step: u64) {
        self.state = state;
        self.step = step;
        self.device = None;
    }

    /// The scalars of step `self.step` at learning rate `lr`: step size, sqrt of the second
    /// bias correction, and the decay factor.
    fn scalars(&self, lr: f64) -> (f32, f32, f32) {
        let c = self.config;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - c.beta1.powi(t);
        let bias_correction2 = 1.0 - c.beta2.powi(t);
        (
            (lr / bias_correction1) as f32,
            bias_correction2.sqrt() as f32,
            (1.0 - lr * c.weight_decay) as f32,
        )
    }

    /// One update on the GPU holding the parameters: gradients (f32, contiguous, any shape) are
    /// scaled by `grad_scale` (clipping) inside the kernel. The same arithmetic as `step`.
    #[cfg(feature = "cuda")]
    pub fn step_device(
        &mut self,
        params: &[Var],
        grads: &[Tensor],
        grad_scale: f32,
        lr: f64,
    ) -> Result<()> {
        if self.device.is_none() {
            let d = params
                .iter()
                .zip(&self.state)
                .map(|(p, m)| {
                    Ok((
                        Tensor::from_slice(&m.exp_avg, m.exp_avg.len(), p.device())?,
                        Tensor::from_slice(&m.exp_avg_sq, m.exp_avg_sq.len(), p.device())?,
                    ))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            self.device = Some(d);
        }
        self.step += 1;
        let (step_size, bc2_sqrt, decay) = self.scalars(lr);
        let c = self.config;
        let a = crate::ops::cuda::AdamWStep {
            grad_scale,
            decay,
            w1: (1.0 - c.beta1) as f32,
            b2: c.beta2 as f32,
            w2: (1.0 - c.beta2) as f32,
            step_size,
            bc2_sqrt,
            eps: c.eps as f32,
        };
        let state = self.device.as_ref().expect("made above");
        for ((p, g), (m, v)) in params.iter().zip(grads).zip(state) {
            crate::ops::cuda::adamw(p.as_tensor(), m, v, &g.flatten_all()?, a)?;
        }
        Ok(())
    }

    /// One update of every parameter with its (already accumulated and clipped) gradient.
    pub fn step(&mut self, params: &[Var], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let (step_size, bc2_sqrt, decay) = self.scalars(lr);
        let (w1, b2, w2, eps) = (
            (1.0 - c.beta1) as f32,
            c.beta2 as f32,
            (1.0 - c.beta2) as f32,
            c.eps as f32,
        );
        for ((var, g), m) in params.iter().zip(grads).zip(self.state.iter_mut()) {
            let shape = var.shape().clone();
            let mut p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            for i in 0..p.len() {
                p[i] *= decay;
                // exp_avg.lerp_(grad, 1 - beta1)
                m.exp_avg[i] += w1 * (g[i] - m.exp_avg[i]);
                m.exp_avg_sq[i] = m.exp_avg_sq[i] * b2 + w2 * g[i] * g[i];
                let denom = m.exp_avg_sq[i].sqrt() / bc2_sqrt + eps;
                p[i] += -step_size * (m.exp_avg[i] / denom);
            }
            var.set(&Tensor::from_vec(p, shape, var.device())?)?;
        }
        Ok(())
    }
}

/// Scale gradients so their global L2 norm is at most `max_norm` (torch's `clip_grad_norm_`).
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f32 {
    let norms: Vec<f32> = grads
        .iter()
        .map(|g| g.iter().map(|x| x * x).sum::<f32>().sqrt())
        .collect();
    let total = norms.iter().map(|n| n * n).sum::<f32>().sqrt();
    if max_norm > 0.0 {
        let coef = (max_norm as f32 / (total + 1e-6)).min(1.0);
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x *= coef;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_step_moves_each_weight_by_lr() {
        // With bias correction the first Adam step is lr * sign(g) (up to eps).
        let v =
            Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(AdamWConfig::default(), &[3]);
        opt.step(std::slice::from_ref(&v), &[vec![0.5, -0.1, 2.0]], 0.01)
            .unwrap();
        let p = v.as_tensor().to_vec1::<f32>().unwrap();
        for (a, b) in p.iter().zip([0.99f32, -1.99, 2.99]) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn decoupled_weight_decay_shrinks_without_gradient() {
        let v = Var::from_tensor(&Tensor::new(&[2.0f32], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(
            AdamWConfig {
                weight_decay: 0.1,
                ..Default::default()
            },
            &[1],
        );
        opt.step(std::slice::from_ref(&v), &[vec![0.0]], 0.5)
            .unwrap();
        assert_eq!(
            v.as_tensor().to_vec1::<f32>().unwrap(),
            vec![2.0 * (1.0 - 0.05)]
        );
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0f32]];
        let n = clip_grad_norm(&mut g, 1.0);
        assert_eq!(n, 5.0);
        assert!((g[0][0] - 0.6).abs() < 1e-6 && (g[1][0] - 0.8).abs() < 1e-6);
        let mut g = vec![vec![0.3f32]];
        clip_grad_norm(&mut g, 1.0);
        assert_eq!(g[0][0], 0.3);
    }
}
