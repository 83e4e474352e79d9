//! The LM head and the loss: next-token cross-entropy over the positions whose label counts,
//! the head's logits made and dropped a block of rows at a time.

use candle_core::{DType, Tensor, D};

use super::CausalLm;
use crate::model::{ModelError, Result};
use crate::ops::{cross_entropy, cross_entropy_grad, hand_written, Backward};
use crate::quant::linear::{lm_head, lm_head_input_grad};
use crate::rng::Rng;

impl CausalLm {
    /// The training loss without the full logits: the same mean next-token cross-entropy as
    /// `loss(forward(..), labels)`, but the LM head runs only at positions whose next label
    /// counts. With prompt tokens masked and a large vocabulary, most of the head's FLOPs and
    /// the `[batch, seq, vocab]` logits never happen.
    pub fn forward_loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let (rows, targets): (Vec<u32>, Vec<u32>) =
            next_token_targets(labels, (b, s), self.config.vocab_size)?
                .into_iter()
                .filter_map(|(row, t)| Some((row, t?)))
                .unzip();
        let x = self.hidden(input_ids, attention_mask, None, rng)?;
        self.mean_nll(&x, rows, targets)
    }

    /// The loss of examples laid end to end in one row (`data::batch::collate_packed`):
    /// input_ids and labels `[1, total]`, the examples' `lengths` in order. Positions restart at
    /// each example, attention stays inside it and its first label is not predicted from the
    /// example before, so the loss and gradients are those of the same examples padded.
    pub fn forward_loss_packed(
        &self,
        input_ids: &Tensor,
        lengths: &[usize],
        labels: &Tensor,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let (rows, targets, _) = self.packed_targets(input_ids, lengths, labels)?;
        let x = self.hidden(input_ids, None, Some(lengths), rng)?;
        self.mean_nll(&x, rows, targets)
    }

    /// The summed log-probability of each example's label tokens, f32 `[examples]`, for
    /// examples laid end to end in one row as `forward_loss_packed` takes them: DPO's
    /// `log π(y | x)`, with a backward. An example without a label token gets 0.
    pub fn sequence_logps_packed(
        &self,
        input_ids: &Tensor,
        lengths: &[usize],
        labels: &Tensor,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let (rows, targets, segment) = self.packed_targets(input_ids, lengths, labels)?;
        let m = lengths.len();
        let dev = &self.device;
        if rows.is_empty() {
            return Ok(Tensor::zeros(m, DType::F32, dev)?);
        }
        let x = self.hidden(input_ids, None, Some(lengths), rng)?;
        let (b, s, h) = x.dims3()?;
        let n = rows.len();
        let picked = x
            .reshape((b * s, h))?
            .index_select(&Tensor::from_vec(rows, n, dev)?, 0)?;
        let targets = Tensor::from_vec(targets, n, dev)?;
        let nll = head_loss(&picked, self.head(), &targets, HEAD_BLOCK)?; // [n], f32
                                                                          // Summed per example by a one-hot matmul, whose backward spreads each sum's gradient
                                                                          // back over its tokens.
        let mut onehot = vec![0f32; n * m];
        for (i, &k) in segment.iter().enumerate() {
            onehot[i * m + k] = 1.0;
        }
        let onehot = Tensor::from_vec(onehot, (n, m), dev)?;
        Ok(nll.unsqueeze(0)?.matmul(&onehot)?.squeeze(0)?.neg()?)
    }

    /// The positions of a packed row that predict a label: each position's row, its target and
    /// the example it belongs to. An example's first label is never predicted from the example
    /// before it.
    fn packed_targets(
        &self,
        input_ids: &Tensor,
        lengths: &[usize],
        labels: &Tensor,
    ) -> Result<(Vec<u32>, Vec<u32>, Vec<usize>)> {
        let (b, s) = input_ids.dims2()?;
        if b != 1 || lengths.iter().sum::<usize>() != s {
            return Err(ModelError::Invalid {
                path: "input_ids".into(),
                message: format!("a [{b}, {s}] batch is not one row of examples {lengths:?}"),
            });
        }
        let mut segment_of = Vec::with_capacity(s);
        let mut starts = vec![false; s];
        for (k, &(start, len)) in crate::ops::attention::segments(lengths).iter().enumerate() {
            starts[start] = true;
            segment_of.extend(std::iter::repeat_n(k, len));
        }
        let mut out = (Vec::new(), Vec::new(), Vec::new());
        for (row, t) in next_token_targets(labels, (b, s), self.config.vocab_size)? {
            let next = row as usize + 1;
            if let (false, Some(t)) = (starts[next], t) {
                out.0.push(row);
                out.1.push(t);
                out.2.push(segment_of[next]);
            }
        }
        Ok(out)
    }

    /// Mean negative log-likelihood of `targets` at `rows` of hidden states `[b, s, hidden]`.
    fn mean_nll(&self, x: &Tensor, rows: Vec<u32>, targets: Vec<u32>) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        if rows.is_empty() {
            return Ok((x.sum_all()? * 0.0)?.to_dtype(DType::F32)?);
        }
        let n = rows.len();
        let dev = &self.device;
        let flat = x.reshape((b * s, h))?;
        // One run of consecutive rows (every label counts, one sequence) is a narrow, whose
        // backward is a copy rather than a scatter.
        let picked = if rows.windows(2).all(|w| w[1] == w[0] + 1) {
            flat.narrow(0, rows[0] as usize, n)?
        } else {
            flat.index_select(&Tensor::from_vec(rows, n, dev)?, 0)?
        }; // [n, hidden]
        let targets = Tensor::from_vec(targets, n, dev)?;
        let nll = head_loss(&picked, self.head(), &targets, HEAD_BLOCK)?; // [n], f32
        Ok((nll.sum_all()? * (1.0 / n as f64))?)
    }

    /// Mean cross-entropy of next-token prediction: logits `[b, s, V]`, labels `[b, s]` (i64, -100
    /// ignored), shifted by one as transformers' causal-LM loss.
    pub fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        causal_lm_loss(logits, labels)
    }
}

/// Logits `head_loss` computes at a time: 2^25 values, 64 MiB in bf16.
const HEAD_BLOCK: usize = 1 << 25;

/// Negative log-likelihood per row, f32 `[n]`, of the LM head `head` `[vocab, hidden]` over
/// hidden states `h` `[n, hidden]` at u32 targets `[n]`: `cross_entropy(lm_head(h), targets)`
/// for blocks of rows of at most `block` logits, in the forward and again in the backward. The
/// `[n, vocab]` logits are never whole, and none are kept for the backward: with a 128k
/// vocabulary they would outweigh the activations the layers keep.
fn head_loss(h: &Tensor, head: &Tensor, targets: &Tensor, block: usize) -> Result<Tensor> {
    let (n, _) = h.dims2()?;
    let rows = (block / head.dim(0)?).max(1);
    let blocks: Vec<(usize, usize)> = (0..n).step_by(rows).map(|i| (i, rows.min(n - i))).collect();
    let (head, targets) = (head.detach(), targets.detach());
    let hd = h.detach();
    let nll = blocks
        .iter()
        .map(|&(i, len)| {
            let logits = lm_head(&hd.narrow(0, i, len)?, &head)?;
            cross_entropy(&logits, &targets.narrow(0, i, len)?)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let nll = Tensor::cat(&nll, 0)?;
    let backward: Backward = Box::new(move |h: &Tensor, g: &Tensor| {
        let (h, g) = (h.detach(), g.detach());
        let gh = blocks
            .iter()
            .map(|&(i, len)| {
                let logits = lm_head(&h.narrow(0, i, len)?, &head)?;
                let gl = cross_entropy_grad(
                    &logits,
                    &targets.narrow(0, i, len)?,
                    &g.narrow(0, i, len)?,
                )?;
                lm_head_input_grad(&gl, &head)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&gh, 0)?))
    });
    Ok(hand_written("lm-head-loss", h, None, nll, backward)?)
}

/// The next-token target of every position that predicts one (all but each row's last), in
/// order: the position's row in `[b·s]`, and label i + 1 of its sequence, None where that is
/// -100 (ignored). labels are `[b, s]`, integer ids below `vocab`.
fn next_token_targets(
    labels: &Tensor,
    (b, s): (usize, usize),
    vocab: usize,
) -> Result<Vec<(u32, Option<u32>)>> {
    let flat: Vec<i64> = labels.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
    if flat.len() != b * s {
        return Err(ModelError::Invalid {
            path: "labels".into(),
            message: format!("has {} values for a [{b}, {s}] batch", flat.len()),
        });
    }
    let mut out = Vec::with_capacity(b * s.saturating_sub(1));
    for bi in 0..b {
        for i in 1..s {
            let t = flat[bi * s + i];
            let target = match t {
                -100 => None,
                t if t < 0 || t as usize >= vocab => {
                    return Err(ModelError::Invalid {
                        path: "labels".into(),
                        message: format!(
                            "label {t} at [{bi}, {i}] is outside the vocabulary of {vocab}"
                        ),
                    })
                }
                t => Some(t as u32),
            };
            out.push(((bi * s + i - 1) as u32, target));
        }
    }
    Ok(out)
}

/// log-softmax over the last dimension, in f32.
pub fn log_softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Mean cross-entropy over positions whose (shifted) label is not -100.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    let next = next_token_targets(labels, (b, s), v)?;
    let targets: Vec<u32> = next.iter().map(|&(_, t)| t.unwrap_or(0)).collect();
    let weights: Vec<f32> = next.iter().map(|(_, t)| t.map_or(0.0, |_| 1.0)).collect();
    let count: f32 = weights.iter().sum();
    let dev = logits.device();
    let n = b * (s - 1);
    let logp = log_softmax_last_dim(&logits.narrow(1, 0, s - 1)?.reshape((n, v))?)?;
    let targets = Tensor::from_vec(targets, (n, 1), dev)?;
    let picked = logp.gather(&targets, 1)?.squeeze(1)?; // [n]
    let weights = Tensor::from_vec(weights, n, dev)?;
    Ok(((picked * weights)?.sum_all()? * (-1.0 / count.max(1.0) as f64))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The LM head's loss a block of rows at a time equals the whole logits' cross-entropy, in
    /// value and in the hidden states' gradient, with a ragged last block.
    #[test]
    fn head_loss_in_blocks_equals_the_whole() {
        let dev = Device::Cpu;
        let (n, hidden, vocab) = (10, 16, 37);
        let h =
            candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, hidden), &dev).unwrap())
                .unwrap();
        let head = Tensor::randn(0f32, 1.0, (vocab, hidden), &dev).unwrap();
        let targets = Tensor::from_vec(
            (0..n as u32).map(|i| i * 7 % vocab as u32).collect(),
            n,
            &dev,
        )
        .unwrap();
        // Rows weighted apart, so that a gradient landing on the wrong row shows.
        let weights = Tensor::arange(1f32, n as f32 + 1.0, &dev).unwrap();
        let run = |nll: Tensor| {
            let g = (&nll * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g = g.get(h.as_tensor()).expect("a gradient for h").clone();
            (
                nll.to_vec1::<f32>().unwrap(),
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        };
        let whole = run(cross_entropy(&lm_head(h.as_tensor(), &head).unwrap(), &targets).unwrap());
        // Three rows per block: 3 + 3 + 3 + 1.
        let blocks = run(head_loss(h.as_tensor(), &head, &targets, 3 * vocab + 2).unwrap());
        for (a, b) in [(&whole.0, &blocks.0), (&whole.1, &blocks.1)] {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                scale > 0.0 && diff <= 1e-6 * scale,
                "differs by {diff} (scale {scale})"
            );
        }
    }
}
