//! Generation, for trying an adapter: greedy or sampled, the whole sequence recomputed per
//! token.

use candle_core::{DType, Tensor, D};

use super::CausalLm;
use crate::model::Result;
use crate::rng::Rng;

impl CausalLm {
    /// Continue `prompt` by up to `max_new` tokens: greedy when `temperature` is 0, sampled
    /// otherwise. Stops at any of `stop` ids. Recomputes the whole sequence per token (no KV
    /// cache): meant for trying an adapter, not for serving.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        temperature: f64,
        stop: &[u32],
        rng: &mut Rng,
    ) -> Result<Vec<u32>> {
        let mut ids = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..max_new {
            let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &self.device)?;
            let logits = self.forward(&input, None, None)?.detach();
            let last = logits
                .narrow(1, ids.len() - 1, 1)?
                .flatten_all()?
                .to_dtype(DType::F32)?;
            let next = if temperature <= 0.0 {
                last.argmax(0)?.to_scalar::<u32>()?
            } else {
                let p = softmax_last_dim(&(last / temperature)?)?.to_vec1::<f32>()?;
                let mut u = rng.next_f32();
                let mut pick = p.len() - 1;
                for (i, &pi) in p.iter().enumerate() {
                    if u < pi {
                        pick = i;
                        break;
                    }
                    u -= pi;
                }
                pick as u32
            };
            if stop.contains(&next) {
                break;
            }
            ids.push(next);
            out.push(next);
        }
        Ok(out)
    }
}

/// Softmax over the last dimension from differentiable primitives (the max shift is a constant).
fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}
