//! Generation with a KV cache: a batch of prompts (left-padded) in one pass, then one token per
//! row at a time against the keys and values kept from the steps before, with no autograd.
//! Greedy or sampled (temperature, top-k, top-p, seeded), stopped per row by stop ids, a
//! caller's decision (stop strings, streaming) or the token budget.

use candle_core::{DType, Tensor, D};

use super::layer::DecoderLayer;
use super::CausalLm;
use crate::model::{ModelError, Result};
use crate::ops::{rms_norm, rope, swiglu};
use crate::rng::Rng;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 is greedy (the most likely token, as transformers' `do_sample=False`).
    pub temperature: f64,
    /// Keep the smallest set of most likely tokens whose probability reaches this (1: all).
    pub top_p: f64,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// What the caller says after each new token of a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// This row is done (a stop string, a client gone).
    Stop,
}

/// Why a row ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop id (the model's end of turn) or the caller stopped it.
    Stop,
    /// `max_new` tokens were generated.
    Length,
}

/// Keys and values of every layer for the positions seen so far: `[b, kv_heads, len, head_dim]`.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions filled (padding included).
    len: usize,
    /// Left padding of each row: keys before it are never attended to.
    pad: Vec<usize>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl CausalLm {
    /// An empty cache for `b` rows whose prompts are left-padded by `pad[row]` tokens.
    pub fn kv_cache(&self, pad: Vec<usize>) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            len: 0,
            pad,
        }
    }

    /// Feed `ids` `[b, s]` (u32) after what `cache` holds; the f32 logits `[b, vocab]` of each
    /// row's last position.
    pub fn decode_step(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        if b != cache.pad.len() {
            return Err(ModelError::Invalid {
                path: "input_ids".into(),
                message: format!("{b} rows for a cache of {}", cache.pad.len()),
            });
        }
        let c = &self.config;
        c.check_seq_len(cache.len + s)?;
        let mut x =
            self.embed
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, s, c.hidden_size))?;
        // Each row's positions count from its first real token.
        let rope: Vec<(Tensor, Tensor)> = cache
            .pad
            .iter()
            .map(|&p| {
                let positions: Vec<usize> = (cache.len..cache.len + s)
                    .map(|i| i.saturating_sub(p))
                    .collect();
                self.rope_tables(&positions)
            })
            .collect::<Result<_>>()?;
        let mask = self.decode_mask(cache, s)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.cached_layer(layer, &x, &rope, mask.as_ref(), &mut cache.layers[i])?;
        }
        cache.len += s;
        let last = x.narrow(1, s - 1, 1)?.squeeze(1)?;
        let h = rms_norm(&last, &self.norm, c.rms_norm_eps)?;
        Ok(crate::quant::linear::lm_head(&h, self.head())?.to_dtype(DType::F32)?)
    }

    /// The additive mask `[b, 1, s, len + s]` of a step of `s` queries: a query sees the keys up
    /// to its own position and none of its row's left padding (a padding query sees itself, so
    /// that its values stay finite). None when nothing is masked (one query per row, no
    /// padding).
    fn decode_mask(&self, cache: &KvCache, s: usize) -> Result<Option<Tensor>> {
        let total = cache.len + s;
        if s == 1 && cache.pad.iter().all(|&p| p == 0) {
            return Ok(None);
        }
        let b = cache.pad.len();
        let mut m = vec![0f32; b * s * total];
        for (r, &p) in cache.pad.iter().enumerate() {
            for q in 0..s {
                let at = cache.len + q;
                for k in 0..total {
                    if k > at || (k < p && k != at) {
                        m[(r * s + q) * total + k] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let m = Tensor::from_vec(m, (b, 1, s, total), &self.device)?;
        Ok(Some(m.to_dtype(self.dtype)?))
    }

    /// One decoder layer over the new positions, appending their keys and values to `kv`.
    fn cached_layer(
        &self,
        layer: &DecoderLayer,
        x: &Tensor,
        rope_rows: &[(Tensor, Tensor)],
        mask: Option<&Tensor>,
        kv: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, s, _) = x.dims3()?;
        let (hd, nh, nkv) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let h = rms_norm(x, &layer.input_norm, c.rms_norm_eps)?;
        let [q, k, v]: [Tensor; 3] = layer
            .qkv((hd, nh, nkv))
            .infer(&h)?
            .try_into()
            .expect("q, k and v");
        let q = q.reshape((b, s, nh, hd))?;
        let k = k.reshape((b, s, nkv, hd))?;
        let v = v.reshape((b, s, nkv, hd))?;
        let (q, k) = match &layer.qk_norm {
            Some((qn, kn)) => (
                rms_norm(&q, qn, c.rms_norm_eps)?,
                rms_norm(&k, kn, c.rms_norm_eps)?,
            ),
            None => (q, k),
        };
        // rope turns [b, s, n, hd] into heads [b, n, s, hd]; each row at its own positions.
        let rotate = |t: &Tensor| -> Result<Tensor> {
            if b == 1 {
                return Ok(rope(t, &rope_rows[0].0, &rope_rows[0].1)?);
            }
            let rows = (0..b)
                .map(|r| rope(&t.narrow(0, r, 1)?, &rope_rows[r].0, &rope_rows[r].1))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::cat(&rows, 0)?)
        };
        let (q, k) = (rotate(&q)?, rotate(&k)?);
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = match kv.take() {
            Some((k0, v0)) => (Tensor::cat(&[&k0, &k], 2)?, Tensor::cat(&[&v0, &v], 2)?),
            None => (k, v),
        };
        let total = k.dim(2)?;
        // The query heads of a group share one key/value head: q as [b, nkv, group·s, hd].
        let group = nh / nkv;
        let scores = q
            .reshape((b, nkv, group * s, hd))?
            .matmul(&k.t()?)?
            .reshape((b, nh, s, total))?;
        let scores = (scores * (1.0 / (hd as f64).sqrt()))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(self.dtype)?;
        let attn = probs
            .reshape((b, nkv, group * s, total))?
            .matmul(&v)?
            .reshape((b, nh, s, hd))?
            .transpose(1, 2)?
            .reshape((b, s, nh * hd))?;
        *kv = Some((k, v));
        let x = (x + layer.o().infer(&attn)?)?;
        let h = rms_norm(&x, &layer.post_norm, c.rms_norm_eps)?;
        let [gate, up]: [Tensor; 2] = layer.gate_up().infer(&h)?.try_into().expect("gate and up");
        Ok((&x + layer.down().infer(&swiglu(&gate, &up)?)?)?)
    }

    /// Continue each prompt by up to `max_new` tokens, all rows in one batch. `on_token(row,
    /// token)` hears every new token as it is chosen (a stop id is not passed on) and may stop
    /// its row. Returns each row's new tokens and why it ended.
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        max_new: usize,
        sampling: &Sampling,
        stop: &[u32],
        on_token: &mut dyn FnMut(usize, u32) -> Next,
    ) -> Result<Vec<(Vec<u32>, Finish)>> {
        let b = prompts.len();
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if b == 0 || prompts.iter().any(Vec::is_empty) {
            return Err(ModelError::Invalid {
                path: "prompt".into(),
                message: "every prompt needs at least one token".into(),
            });
        }
        let pad: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
        let mut ids = Vec::with_capacity(b * longest);
        for p in prompts {
            ids.extend(std::iter::repeat_n(p[0], longest - p.len()));
            ids.extend_from_slice(p);
        }
        let mut cache = self.kv_cache(pad);
        let mut logits = self.decode_step(
            &Tensor::from_vec(ids, (b, longest), &self.device)?,
            &mut cache,
        )?;
        let mut rngs: Vec<Rng> = (0..b)
            .map(|r| Rng::new(sampling.seed).fork(r as u64))
            .collect();
        let mut out: Vec<(Vec<u32>, Option<Finish>)> = vec![(Vec::new(), None); b];
        for _ in 0..max_new {
            let rows: Vec<Vec<f32>> = logits.to_vec2()?;
            let mut feed = Vec::with_capacity(b);
            for (r, row) in rows.iter().enumerate() {
                let (tokens, done) = &mut out[r];
                if done.is_some() {
                    feed.push(*tokens.last().unwrap_or(&prompts[r][0]));
                    continue;
                }
                let next = choose(row, sampling, &mut rngs[r]);
                feed.push(next);
                if stop.contains(&next) {
                    *done = Some(Finish::Stop);
                    continue;
                }
                tokens.push(next);
                if on_token(r, next) == Next::Stop {
                    *done = Some(Finish::Stop);
                }
            }
            if out.iter().all(|(_, d)| d.is_some()) {
                break;
            }
            if out.iter().any(|(t, d)| d.is_none() && t.len() == max_new) {
                break;
            }
            logits =
                self.decode_step(&Tensor::from_vec(feed, (b, 1), &self.device)?, &mut cache)?;
        }
        Ok(out
            .into_iter()
            .map(|(t, d)| (t, d.unwrap_or(Finish::Length)))
            .collect())
    }

    /// Continue `prompt` by up to `max_new` tokens: greedy when `temperature` is 0, sampled
    /// otherwise. Stops at any of `stop` ids.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        temperature: f64,
        stop: &[u32],
        rng: &mut Rng,
    ) -> Result<Vec<u32>> {
        let sampling = Sampling {
            temperature,
            seed: rng.next_u64(),
            ..Sampling::default()
        };
        let mut out =
            self.generate_batch(&[prompt.to_vec()], max_new, &sampling, stop, &mut |_, _| {
                Next::Continue
            })?;
        Ok(out.remove(0).0)
    }
}

/// The next token from one row's f32 logits.
pub fn choose(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    // Candidates by probability, most likely first, cut by top-k then top-p.
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let t = s.temperature as f32;
    let m = logits[idx[0]];
    let mut p: Vec<f32> = idx.iter().map(|&i| ((logits[i] - m) / t).exp()).collect();
    let sum: f32 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= sum);
    if s.top_p < 1.0 {
        let mut acc = 0f32;
        let keep = p
            .iter()
            .position(|&x| {
                acc += x;
                acc >= s.top_p as f32
            })
            .map_or(p.len(), |i| i + 1);
        idx.truncate(keep);
        p.truncate(keep);
        let sum: f32 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= sum);
    }
    let mut u = rng.next_f32();
    for (k, &pk) in p.iter().enumerate() {
        if u < pk {
            return idx[k] as u32;
        }
        u -= pk;
    }
    idx[p.len() - 1] as u32
}

/// Softmax over the last dimension (no row is all -inf: every query sees itself).
fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}
