//! bitsandbytes' 8-bit AdamW (`bnb.optim.AdamW8bit`, as its CPU kernels compute it): each
//! moment of a parameter of at least 4,096 elements is kept as one byte per element, blocks of
//! 256 sharing an f32 absmax, the first moment in the signed dynamic map and the second in the
//! unsigned one. A step dequantizes both, updates them and the parameter in f32, and quantizes
//! them again. Smaller parameters keep f32 moments and take bitsandbytes' 32-bit update.

use candle_core::{Tensor, Var};
use rayon::prelude::*;

use super::optim::{AdamWConfig, Moments};
use super::Result;
use crate::quant::codebook::{dynamic_signed, dynamic_unsigned, ByteLut};

/// Parameters below this many elements keep f32 moments (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;
/// Elements sharing one absmax.
pub const BLOCK: usize = 256;

/// One parameter's moments.
#[derive(Debug, Clone, PartialEq)]
pub enum State8 {
    /// Under `MIN_8BIT_SIZE`: f32 moments.
    Full(Moments),
    /// Codes into the signed (`m`) and unsigned (`v`) dynamic maps, with each block's absmax.
    Blockwise {
        m: Vec<u8>,
        v: Vec<u8>,
        absmax_m: Vec<f32>,
        absmax_v: Vec<f32>,
    },
}

impl State8 {
    fn new(n: usize) -> State8 {
        if n < MIN_8BIT_SIZE {
            State8::Full(Moments {
                exp_avg: vec![0.0; n],
                exp_avg_sq: vec![0.0; n],
            })
        } else {
            let blocks = n.div_ceil(BLOCK);
            State8::Blockwise {
                m: vec![0; n],
                v: vec![0; n],
                absmax_m: vec![0.0; blocks],
                absmax_v: vec![0.0; blocks],
            }
        }
    }

    /// Elements of the parameter it belongs to.
    pub fn len(&self) -> usize {
        match self {
            State8::Full(m) => m.exp_avg.len(),
            State8::Blockwise { m, .. } => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bytes of optimizer state for a parameter of `n` elements.
pub fn state_bytes(n: usize) -> usize {
    if n < MIN_8BIT_SIZE {
        8 * n
    } else {
        2 * n + 8 * n.div_ceil(BLOCK)
    }
}

pub struct AdamW8bit {
    pub config: AdamWConfig,
    /// Optimizer steps taken.
    pub step: u64,
    state: Vec<State8>,
    /// The signed and unsigned dynamic maps (boxed: 2 KiB).
    codes: Box<([f32; 256], [f32; 256])>,
    luts: (ByteLut, ByteLut),
}

impl std::fmt::Debug for AdamW8bit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW8bit")
            .field("config", &self.config)
            .field("step", &self.step)
            .field("params", &self.state.len())
            .finish()
    }
}

impl AdamW8bit {
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> Self {
        let codes = Box::new((dynamic_signed(), dynamic_unsigned()));
        AdamW8bit {
            config,
            step: 0,
            state: sizes.iter().map(|&n| State8::new(n)).collect(),
            luts: (ByteLut::new(&codes.0), ByteLut::new(&codes.1)),
            codes,
        }
    }

    pub fn states(&self) -> &[State8] {
        &self.state
    }

    /// Replace the states (a resumed checkpoint).
    pub fn set_states(&mut self, state: Vec<State8>, step: u64) {
        self.state = state;
        self.step = step;
    }

    /// One update of every parameter with its (already accumulated and clipped) gradient.
    pub fn step(&mut self, params: &[Var], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let correction1 = 1.0 - c.beta1.powi(t);
        let correction2 = (1.0 - c.beta2.powi(t)).sqrt();
        // Python floats become f32 as torch's scalar arguments do.
        let (b1, w1, b2, w2) = (
            c.beta1 as f32,
            (1.0 - c.beta1) as f32,
            c.beta2 as f32,
            (1.0 - c.beta2) as f32,
        );
        let decay = (c.weight_decay > 0.0).then_some((1.0 - lr * c.weight_decay) as f32);
        // torch's `add_(x, alpha=a)` is one fused multiply-add, and so is `addcmul_`'s last
        // step: `self + (value·t1)·t2`.
        let moments = |m: f32, v: f32, g: f32| (g.mul_add(w1, m * b1), (w2 * g).mul_add(g, v * b2));
        for ((var, g), state) in params.iter().zip(grads).zip(self.state.iter_mut()) {
            let shape = var.shape().clone();
            let mut p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            if let Some(d) = decay {
                p.iter_mut().for_each(|x| *x *= d);
            }
            let codes = &*self.codes;
            let luts = &self.luts;
            match state {
                State8::Full(mo) => {
                    // bitsandbytes' 32-bit update: m / (√v + eps·c2), times -lr·c2/c1.
                    let step_size = (-lr * correction2 / correction1) as f32;
                    let eps = (c.eps * correction2) as f32;
                    p.par_chunks_mut(BLOCK)
                        .zip(mo.exp_avg.par_chunks_mut(BLOCK))
                        .zip(mo.exp_avg_sq.par_chunks_mut(BLOCK))
                        .zip(g.par_chunks(BLOCK))
                        .for_each(|(((p, ms), vs), g)| {
                            for i in 0..p.len() {
                                let (m, v) = moments(ms[i], vs[i], g[i]);
                                ms[i] = m;
                                vs[i] = v;
                                let update = m / (v.sqrt() + eps);
                                p[i] = update.mul_add(step_size, p[i]);
                            }
                        });
                }
                State8::Blockwise {
                    m: qm,
                    v: qv,
                    absmax_m,
                    absmax_v,
                } => {
                    // The 8-bit update: p + (-lr/c1 · m) / (√v / c2 + eps), block by block
                    // (a block's moments come back, update and go out by their own absmax).
                    let value = (-lr / correction1) as f32;
                    let (c2, eps) = (correction2 as f32, c.eps as f32);
                    p.par_chunks_mut(BLOCK)
                        .zip(g.par_chunks(BLOCK))
                        .zip(qm.par_chunks_mut(BLOCK))
                        .zip(qv.par_chunks_mut(BLOCK))
                        .zip(absmax_m.par_iter_mut())
                        .zip(absmax_v.par_iter_mut())
                        .for_each(|(((((p, g), qm), qv), am), av)| {
                            let mut ms = [0f32; BLOCK];
                            let mut vs = [0f32; BLOCK];
                            let n = p.len();
                            for i in 0..n {
                                let m0 = codes.0[qm[i] as usize] * *am;
                                let v0 = codes.1[qv[i] as usize] * *av;
                                let (m, v) = moments(m0, v0, g[i]);
                                ms[i] = m;
                                vs[i] = v;
                                let denom = v.sqrt() / c2 + eps;
                                p[i] += (value * m) / denom;
                            }
                            *am = quantize_block(&ms[..n], &luts.0, qm);
                            *av = quantize_block(&vs[..n], &luts.1, qv);
                        });
                }
            }
            var.set(&Tensor::from_vec(p, shape, var.device())?)?;
        }
        Ok(())
    }
}

/// One block's 8-bit codes as bitsandbytes' CPU `quantize_blockwise` writes them; returns its
/// absmax.
fn quantize_block(x: &[f32], lut: &ByteLut, out: &mut [u8]) -> f32 {
    let m = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if m == 0.0 {
        out.fill(0);
        return m;
    }
    let inv = 1.0 / m;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = lut.code_index(v * inv);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn small_parameters_keep_f32_moments_and_large_ones_bytes() {
        let opt = AdamW8bit::new(AdamWConfig::default(), &[4095, 4096, 4097]);
        assert!(matches!(opt.states()[0], State8::Full(_)));
        match &opt.states()[2] {
            State8::Blockwise { m, absmax_m, .. } => {
                assert_eq!((m.len(), absmax_m.len()), (4097, 17))
            }
            _ => panic!("4097 elements are 8-bit"),
        }
        assert_eq!(state_bytes(4095), 8 * 4095);
        assert_eq!(state_bytes(4096), 2 * 4096 + 8 * 16);
    }

    #[test]
    fn the_first_step_moves_each_weight_by_about_lr() {
        let n = 5000;
        let p0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 0.01).collect();
        let var = Var::from_tensor(&Tensor::new(p0.as_slice(), &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW8bit::new(AdamWConfig::default(), &[n]);
        opt.step(std::slice::from_ref(&var), std::slice::from_ref(&g), 1e-3)
            .unwrap();
        let p1 = var.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..n {
            let moved = p0[i] - p1[i];
            if g[i].abs() > 1e-4 {
                // The moments come back from 8 bits, so the step is lr·sign(g) within a few %.
                assert!(
                    (moved - 1e-3 * g[i].signum()).abs() < 1e-4,
                    "{i}: moved {moved} for g {}",
                    g[i]
                );
            }
        }
    }
}
