//! Causal grouped-query attention in blocks of queries, over variable-length segments of a row,
//! forward and backward. Nothing of size `[s, s]` exists: a block of `bq` queries meets only
//! the keys it may see (its segment's, up to its last query), so the scores are
//! `[heads, bq, keys]` at a time, within a memory budget. Packed examples are segments and
//! never see each other. The backward recomputes a block's probabilities from q and k (as a
//! flash attention backward does) unless the forward kept them, which it may when they are
//! small. The softmax is the fused `attn_softmax` (f32 inside, rectangular causality `j <= i +
//! k - q`), and the products go through the device's GEMMs, so the same code runs on the CPU
//! and on a GPU. With the `cudnn` feature, bf16 and f16 on a GPU go through cuDNN's fused flash
//! attention instead (`ops::cudnn`), whole rows or ragged segments in one launch, when every key
//! is a real token; this blocked attention is its reference and its fallback.

use candle_core::{Result, Tensor};

use super::{attn_softmax, attn_softmax_bwd};

/// How to attend: the keys that are real tokens, the score scale, the segments of the row, and
/// the score elements one block may hold.
pub struct Attention<'a> {
    /// u8 `[b, s]`: 1 for a real token a query may see (with causality), 0 for padding.
    pub keep: &'a Tensor,
    pub scale: f64,
    /// `(start, len)` along the sequence, in order and covering it; one `(0, s)` for a batch of
    /// padded rows, one per example for examples laid end to end in one row.
    pub segments: &'a [(usize, usize)],
    /// Score elements (`heads · bq · keys`) a block may hold; the query block shrinks to fit.
    pub block_elements: usize,
    /// Keep the probabilities for the backward when all of them together hold at most this many
    /// elements; otherwise the backward recomputes them block by block.
    pub keep_elements: usize,
    /// Every key is a real token (`keep` is all ones): the fused engine may run.
    pub dense_keys: bool,
}

/// What the forward keeps for the backward.
pub enum Kept {
    /// The probabilities, one tensor `[b, nh, bq, keys]` per block in order.
    Probs(Vec<Tensor>),
    /// The fused engine's output and log-sum-exp.
    #[cfg(feature = "cudnn")]
    Fused(super::cudnn::Saved),
}

/// The query blocks of a segment of `len` tokens for `nh` heads: `(offset, rows)`.
fn blocks(len: usize, nh: usize, budget: usize) -> Vec<(usize, usize)> {
    let rows = (budget / (nh * len).max(1)).max(64).min(len).max(1);
    (0..len)
        .step_by(rows)
        .map(|i| (i, rows.min(len - i)))
        .collect()
}

/// One block's queries grouped by key head, `[b, nkv, group·bq, hd]`, and its keys and values
/// `[b, nkv, keys, hd]`.
struct Block {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor,
    rows: usize,
    keys: usize,
}

impl Attention<'_> {
    fn block(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        start: usize,
        (q0, rows): (usize, usize),
    ) -> Result<Block> {
        let (b, nh, _, hd) = q.dims4()?;
        let nkv = k.dim(1)?;
        let keys = q0 + rows;
        let qb =
            q.narrow(2, start + q0, rows)?
                .contiguous()?
                .reshape((b, nkv, nh / nkv * rows, hd))?;
        Ok(Block {
            q: qb,
            k: k.narrow(2, start, keys)?.contiguous()?,
            v: v.narrow(2, start, keys)?.contiguous()?,
            keep: self.keep.narrow(1, start, keys)?.contiguous()?,
            rows,
            keys,
        })
    }

    fn probs(&self, blk: &Block, nh: usize) -> Result<Tensor> {
        let (b, _, _, _) = blk.q.dims4()?;
        let scores = super::profile::span("attention matmuls (forward)", || {
            blk.q.matmul(&blk.k.t()?.contiguous()?)
        })?;
        attn_softmax(
            &scores.reshape((b, nh, blk.rows, blk.keys))?,
            &blk.keep,
            self.scale,
            true,
        )
    }

    /// q `[b, nh, s, hd]`, k and v `[b, nkv, s, hd]`: the output `[b, s, nh·hd]`, and the
    /// probabilities when `keep` and they fit `keep_elements`.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        keep: bool,
    ) -> Result<(Tensor, Option<Kept>)> {
        #[cfg(feature = "cudnn")]
        if self.dense_keys {
            let fused = super::profile::span("attention (cuDNN forward)", || {
                super::cudnn::forward(q, k, v, self.segments, self.scale)
            })?;
            if let Some(saved) = fused {
                let out = saved.out.clone();
                return Ok((out, keep.then_some(Kept::Fused(saved))));
            }
        }
        let (b, nh, s, hd) = q.dims4()?;
        let nkv = k.dim(1)?;
        let kept_size: usize = self.segments.iter().map(|&(_, n)| nh * n * n).sum();
        let keep = keep && kept_size <= self.keep_elements;
        let mut outs = Vec::new();
        let mut kept = Vec::new();
        for &(start, len) in self.segments {
            for blk in blocks(len, nh, self.block_elements) {
                let bl = self.block((q, k, v), start, blk)?;
                let probs = self.probs(&bl, nh)?;
                let out = super::profile::span("attention matmuls (forward)", || {
                    probs
                        .reshape((b, nkv, nh / nkv * bl.rows, bl.keys))?
                        .matmul(&bl.v)
                })?; // [b, nkv, group·bq, hd]
                outs.push(out.reshape((b, nh, bl.rows, hd))?);
                if keep {
                    kept.push(probs);
                }
            }
        }
        let out = Tensor::cat(&outs, 2)?; // [b, nh, s, hd]
        let out = out.transpose(1, 2)?.reshape((b, s, nh * hd))?;
        Ok((out, keep.then_some(Kept::Probs(kept))))
    }

    /// dL/dq `[b, nh, s, hd]`, dL/dk and dL/dv `[b, nkv, s, hd]`, given dL/dout `[b·s, nh·hd]`.
    /// A group's key gradient sums inside the matmul; a key's, over the blocks that saw it.
    pub fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        kept: Option<Kept>,
        g_out: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let kept = match kept {
            #[cfg(feature = "cudnn")]
            Some(Kept::Fused(saved)) => {
                let fused = super::profile::span("attention (cuDNN backward)", || {
                    super::cudnn::backward(q, k, v, &saved, g_out, self.segments, self.scale)
                })?;
                if let Some(grads) = fused {
                    return Ok(grads);
                }
                None
            }
            Some(Kept::Probs(p)) => Some(p),
            None => None,
        };
        let (b, nh, s, hd) = q.dims4()?;
        let nkv = k.dim(1)?;
        let span = |f: &mut dyn FnMut() -> Result<Tensor>| {
            super::profile::span("attention matmuls (backward)", f)
        };
        let go = g_out
            .reshape((b, s, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?; // [b, nh, s, hd]
        let mut kept = kept.map(|k| k.into_iter());
        let (mut gqs, mut gks, mut gvs) = (Vec::new(), Vec::new(), Vec::new());
        for &(start, len) in self.segments {
            let plan = blocks(len, nh, self.block_elements);
            // Key gradients by key block: block j's keys are seen by query blocks j and later.
            let mut gk_acc: Vec<Option<Tensor>> = vec![None; plan.len()];
            let mut gv_acc: Vec<Option<Tensor>> = vec![None; plan.len()];
            for &(q0, rows) in &plan {
                let bl = self.block((q, k, v), start, (q0, rows))?;
                let probs = match kept.as_mut().and_then(|k| k.next()) {
                    Some(p) => p,
                    None => self.probs(&bl, nh)?,
                };
                let gs = nh / nkv * rows;
                let gob = go
                    .narrow(2, start + q0, rows)?
                    .contiguous()?
                    .reshape((b, nkv, gs, hd))?;
                let pg = probs.reshape((b, nkv, gs, bl.keys))?;
                let g_probs = span(&mut || gob.matmul(&bl.v.t()?))?; // [b, nkv, gs, keys]
                let gv = span(&mut || pg.t()?.matmul(&gob))?; // [b, nkv, keys, hd]
                drop(pg);
                let g_scores = attn_softmax_bwd(
                    &probs,
                    &g_probs.reshape((b, nh, rows, bl.keys))?,
                    &bl.keep,
                    self.scale,
                    true,
                )?
                .reshape((b, nkv, gs, bl.keys))?;
                drop((probs, g_probs));
                gqs.push(span(&mut || {
                    g_scores.matmul(&bl.k)?.reshape((b, nh, rows, hd))
                })?);
                let gk = span(&mut || g_scores.t()?.matmul(&bl.q))?; // [b, nkv, keys, hd]
                for (j, &(k0, krows)) in plan.iter().enumerate() {
                    if k0 >= bl.keys {
                        break;
                    }
                    for (acc, g) in [(&mut gk_acc[j], &gk), (&mut gv_acc[j], &gv)] {
                        let part = g.narrow(2, k0, krows)?;
                        *acc = Some(match acc.take() {
                            Some(a) => (a + part)?,
                            None => part.contiguous()?,
                        });
                    }
                }
            }
            for acc in gk_acc {
                gks.push(acc.expect("every key block is seen by its own query block"));
            }
            for acc in gv_acc {
                gvs.push(acc.expect("every key block is seen by its own query block"));
            }
        }
        Ok((
            Tensor::cat(&gqs, 2)?,
            Tensor::cat(&gks, 2)?,
            Tensor::cat(&gvs, 2)?,
        ))
    }
}

/// The segments of a row as a fused engine's ragged sequences: a power-of-two count (empty
/// ones at the end, starting where the row ends) and a power-of-two bound on their length
/// (at least 64), so that a few shapes serve every step of a packed run.
#[derive(Debug, PartialEq, Eq)]
pub struct RaggedPlan {
    pub count: usize,
    pub bound: usize,
    /// `count` lengths.
    pub lengths: Vec<u32>,
    /// `count + 1` token offsets: where each segment starts, then where the row ends.
    pub starts: Vec<u32>,
}

impl RaggedPlan {
    pub fn new(segments: &[(usize, usize)]) -> Self {
        let count = segments.len().next_power_of_two();
        let total: usize = segments.iter().map(|s| s.1).sum();
        let longest = segments.iter().map(|s| s.1).max().unwrap_or(1);
        let mut lengths: Vec<u32> = segments.iter().map(|s| s.1 as u32).collect();
        lengths.resize(count, 0);
        let mut starts: Vec<u32> = segments.iter().map(|s| s.0 as u32).collect();
        starts.resize(count + 1, total as u32);
        RaggedPlan {
            count,
            bound: longest.next_power_of_two().max(64),
            lengths,
            starts,
        }
    }
}

/// `(start, len)` of examples of these lengths laid end to end.
pub fn segments(lengths: &[usize]) -> Vec<(usize, usize)> {
    let mut at = 0;
    lengths
        .iter()
        .map(|&n| {
            let s = (at, n);
            at += n;
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// ‖a − b‖ / ‖b‖.
    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let n = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
        let d = n(&(a - b).unwrap()).to_scalar::<f32>().unwrap();
        d / n(b).to_scalar::<f32>().unwrap()
    }

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.next_u64() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Attention as plain autograd ops, one segment at a time, all keys at once.
    fn naive(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        keep: &Tensor,
        segs: &[(usize, usize)],
        scale: f64,
    ) -> Tensor {
        let (b, nh, _, hd) = q.dims4().unwrap();
        let nkv = k.dim(1).unwrap();
        let g = nh / nkv;
        let outs: Vec<Tensor> = segs
            .iter()
            .map(|&(st, n)| {
                let (q, k, v) = (
                    q.narrow(2, st, n).unwrap(),
                    k.narrow(2, st, n).unwrap(),
                    v.narrow(2, st, n).unwrap(),
                );
                // Repeat each key head for its group of query heads.
                let rep = |t: &Tensor| {
                    let heads: Vec<Tensor> =
                        (0..nh).map(|h| t.narrow(1, h / g, 1).unwrap()).collect();
                    Tensor::cat(&heads, 1).unwrap()
                };
                let scores = q
                    .matmul(&rep(&k).t().unwrap().contiguous().unwrap())
                    .unwrap();
                let p =
                    attn_softmax(&scores, &keep.narrow(1, st, n).unwrap(), scale, true).unwrap();
                p.matmul(&rep(&v).contiguous().unwrap()).unwrap()
            })
            .collect();
        let out = Tensor::cat(&outs, 2).unwrap();
        out.transpose(1, 2)
            .unwrap()
            .reshape((b, (), nh * hd))
            .unwrap()
    }

    fn check(b: usize, nh: usize, nkv: usize, hd: usize, segs: &[(usize, usize)], budget: usize) {
        let s: usize = segs.iter().map(|x| x.1).sum();
        let q = Var::from_tensor(&rand(&[b, nh, s, hd], 1)).unwrap();
        let k = Var::from_tensor(&rand(&[b, nkv, s, hd], 2)).unwrap();
        let v = Var::from_tensor(&rand(&[b, nkv, s, hd], 3)).unwrap();
        let mut keep = vec![1u8; b * s];
        if b > 1 {
            // Right padding of the second row, as batches are padded. (A left-padded query that
            // sees no real key gets a uniform row over its block's keys: only padding differs.)
            keep[2 * s - 3..].fill(0);
        }
        let keep = Tensor::from_vec(keep, (b, s), &Device::Cpu).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        let g_out = rand(&[b * s, nh * hd], 4);
        let want = naive(&q, &k, &v, &keep, segs, scale);
        let loss = (want.reshape((b * s, nh * hd)).unwrap() * &g_out)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        for keep_probs in [false, true] {
            let att = Attention {
                keep: &keep,
                scale,
                segments: segs,
                block_elements: budget,
                keep_elements: if keep_probs { usize::MAX } else { 0 },
                dense_keys: false,
            };
            let (out, kept) = att.forward(&q, &k, &v, true).unwrap();
            assert_eq!(kept.is_some(), keep_probs);
            let r = rel(&out, &want);
            assert!(
                r < 1e-6,
                "output {r} ({b}, {nh}, {nkv}, {hd}, {segs:?}, {budget})"
            );
            let (gq, gk, gv) = att.backward(&q, &k, &v, kept, &g_out).unwrap();
            for (name, ours, var) in [("q", gq, &q), ("k", gk, &k), ("v", gv, &v)] {
                let r = rel(&ours, grads.get(var.as_tensor()).unwrap());
                assert!(r < 1e-5, "d{name}: {r}");
            }
        }
    }

    #[test]
    fn blocks_of_queries_equal_whole_attention_forward_and_backward() {
        // One segment in one block; several blocks (budget for 64 query rows at a time);
        // grouped heads; ragged packed segments; a padded batch of two rows.
        check(1, 4, 4, 8, &[(0, 40)], 1 << 20);
        check(1, 4, 2, 8, &[(0, 200)], 4 * 64 * 200);
        check(1, 4, 1, 16, &segments(&[70, 3, 1, 130, 9]), 4 * 64 * 130);
        check(2, 4, 2, 8, &[(0, 150)], 4 * 64 * 150);
    }

    #[test]
    fn block_plans_cover_each_segment_once() {
        assert_eq!(blocks(10, 4, 1 << 20), vec![(0, 10)]);
        assert_eq!(
            blocks(200, 4, 4 * 64 * 200),
            vec![(0, 64), (64, 64), (128, 64), (192, 8)]
        );
        assert_eq!(segments(&[3, 1, 2]), vec![(0, 3), (3, 1), (4, 2)]);
    }

    #[test]
    fn ragged_plans_round_up_count_and_bound() {
        let p = RaggedPlan::new(&segments(&[70, 3, 1, 130, 9]));
        assert_eq!((p.count, p.bound), (8, 256));
        assert_eq!(p.lengths, vec![70, 3, 1, 130, 9, 0, 0, 0]);
        assert_eq!(p.starts, vec![0, 70, 73, 74, 204, 213, 213, 213, 213]);
        let p = RaggedPlan::new(&[(0, 10), (10, 20)]);
        assert_eq!((p.count, p.bound), (2, 64));
        assert_eq!(p.starts, vec![0, 10, 30]);
    }
}
