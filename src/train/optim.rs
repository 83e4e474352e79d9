//! AdamW with torch's semantics (`torch.optim.AdamW`, single-tensor path): decoupled weight
//! decay, bias correction, f32 state. State lives on the host next to the parameters' copies.

use candle_core::{Tensor, Var};

use super::Result;

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
    /// In the order of the parameters passed to `step`.
    pub state: Vec<Moments>,
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
        }
    }

    /// One update of every parameter with its (already accumulated and clipped) gradient.
    pub fn step(&mut self, params: &[Var], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - c.beta1.powi(t);
        let bias_correction2 = 1.0 - c.beta2.powi(t);
        let step_size = (lr / bias_correction1) as f32;
        let bc2_sqrt = bias_correction2.sqrt() as f32;
        let decay = (1.0 - lr * c.weight_decay) as f32;
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
