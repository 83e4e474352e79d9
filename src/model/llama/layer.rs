//! One decoder layer of the graph: pre-norm attention then a SwiGLU MLP, each with a residual.
//! Training records a layer as one op whose backward is written by hand (`layer_op`), keeping
//! what that backward reads or, with gradient checkpointing, replaying the forward for it;
//! `decoder_layer` is the same layer through candle's autograd, the reference it is tested
//! against. Attention runs each segment of a row (an example, when examples lie end to end)
//! on its own, in blocks of queries (`ops::attention`).

use std::sync::Arc;

use candle_core::{Result, Tensor, D};

use crate::lora::layer::LinearSaved;
use crate::lora::LoraLinear;
use crate::ops::{
    attn_softmax, hand_written, rms_norm, rms_norm_bwd, rope, rope_bwd, swiglu, swiglu_bwd,
    Backward,
};
use crate::rng::Rng;

/// A decoder block's norms and linears.
#[derive(Clone)]
pub(super) struct DecoderLayer {
    pub(super) input_norm: Tensor,
    pub(super) post_norm: Tensor,
    /// Qwen3's per-head RMSNorm weights `[head_dim]` for q and k, applied before RoPE.
    pub(super) qk_norm: Option<(Tensor, Tensor)>,
    /// In `ModelConfig::layer_linears` order: q, k, v, o, gate, up, down, or with `fused`
    /// qkv, o, gate_up, down.
    pub(super) linears: Vec<LoraLinear>,
    /// q, k and v come out of one linear, gate and up out of another (Phi-3).
    pub(super) fused: bool,
}

/// Linears that read one input: q, k and v, or gate and up. Each its own linear, or one fused
/// linear whose output is split by width (Phi-3's `qkv_proj`, `gate_up_proj`) and whose
/// output gradient is the parts' gradients side by side.
pub(super) struct Projections<'a> {
    linears: &'a [LoraLinear],
    /// The first one's place among the layer's linears.
    first: usize,
    widths: Vec<usize>,
}

impl DecoderLayer {
    fn attn_count(&self) -> usize {
        if self.fused {
            1
        } else {
            3
        }
    }

    /// q, k and v.
    pub(super) fn qkv(&self, ctx_heads: (usize, usize, usize)) -> Projections<'_> {
        let (hd, nh, nkv) = ctx_heads;
        let n = self.attn_count();
        Projections {
            linears: &self.linears[..n],
            first: 0,
            widths: vec![nh * hd, nkv * hd, nkv * hd],
        }
    }

    pub(super) fn o(&self) -> &LoraLinear {
        &self.linears[self.attn_count()]
    }

    /// gate and up.
    pub(super) fn gate_up(&self) -> Projections<'_> {
        let first = self.attn_count() + 1;
        let n = if self.fused { 1 } else { 2 };
        let linears = &self.linears[first..first + n];
        let i = linears[0].base.weight.dims().0 / (3 - n);
        Projections {
            linears,
            first,
            widths: vec![i, i],
        }
    }

    pub(super) fn down(&self) -> &LoraLinear {
        self.linears.last().expect("a layer has linears")
    }

    /// Where o sits among `linears`.
    fn o_index(&self) -> usize {
        self.attn_count()
    }
}

impl Projections<'_> {
    fn fused(&self) -> bool {
        self.linears.len() == 1
    }

    /// A fused output's parts along its last dimension, each contiguous.
    fn split(&self, y: Tensor) -> Result<Vec<Tensor>> {
        let mut at = 0;
        let mut parts = Vec::with_capacity(self.widths.len());
        for &w in &self.widths {
            parts.push(y.narrow(D::Minus1, at, w)?.contiguous()?);
            at += w;
        }
        Ok(parts)
    }

    /// The outputs through autograd.
    pub(super) fn forward(&self, h: &Tensor, mut rng: Option<&mut Rng>) -> Result<Vec<Tensor>> {
        if self.fused() {
            return self.split(self.linears[0].forward(h, rng)?);
        }
        self.linears
            .iter()
            .map(|l| l.forward(h, rng.as_deref_mut()))
            .collect()
    }

    /// The outputs with nothing tracked (generation).
    pub(super) fn infer(&self, h: &Tensor) -> Result<Vec<Tensor>> {
        if self.fused() {
            return self.split(self.linears[0].infer(h)?);
        }
        self.linears.iter().map(|l| l.infer(h)).collect()
    }

    /// The outputs and what `backward` reads (`LoraLinear::forward_saving`).
    fn forward_saving(
        &self,
        h: &Tensor,
        mut rng: Option<&mut Rng>,
        hold: bool,
    ) -> Result<(Vec<Tensor>, Vec<LinearSaved>)> {
        if self.fused() {
            let (y, saved) = self.linears[0].forward_saving(h, rng, hold)?;
            return Ok((self.split(y)?, vec![saved]));
        }
        let mut ys = Vec::with_capacity(self.linears.len());
        let mut saved = Vec::with_capacity(self.linears.len());
        for l in self.linears {
            let (y, sv) = l.forward_saving(h, rng.as_deref_mut(), hold)?;
            ys.push(y);
            saved.push(sv);
        }
        Ok((ys, saved))
    }

    /// dL/dh from the outputs' gradients; each linear's adapter gradients go to `keep` with
    /// its place in the layer.
    fn backward(
        &self,
        h: &Tensor,
        saved: &[LinearSaved],
        grads: Vec<Tensor>,
        keep: &mut dyn FnMut(usize, Option<(Tensor, Tensor)>),
    ) -> Result<Tensor> {
        let grads = if self.fused() {
            vec![Tensor::cat(&grads, D::Minus1)?]
        } else {
            grads
        };
        let mut acc = None;
        for (j, ((l, sv), g)) in self.linears.iter().zip(saved).zip(grads).enumerate() {
            let (gh, ga) = l.backward(h, sv, &g, acc)?;
            keep(self.first + j, ga);
            acc = Some(gh);
        }
        Ok(acc.expect("a projection has a linear"))
    }
}

/// What every decoder layer of one forward pass shares.
pub(super) struct LayerCtx {
    pub(super) head_dim: usize,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) eps: f64,
    /// `[seq, head_dim]` each.
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    /// u8 `[batch, seq]`: 1 for a real token a query may see (with causality), 0 for padding.
    pub(super) keep: Tensor,
    /// No padding: every key is a real token.
    pub(super) dense_keys: bool,
    /// `(start, len)` of the sequences along a row: `(0, seq)` for padded rows, one per example
    /// for examples laid end to end in one row. Attention never crosses a segment.
    pub(super) segments: Vec<(usize, usize)>,
}

/// Score elements one block of the hand-written attention holds: with 32 heads, 2048 keys for
/// 2048 queries at a time, fewer queries for longer sequences.
const ATTN_BLOCK: usize = 1 << 27;

/// Probabilities a checkpoint's replay keeps for the backward that follows at once (one layer
/// at a time): 8 GiB in bf16, so up to 8k tokens with 32 heads skip recomputing them.
const REPLAY_KEEP: usize = 1 << 32;

impl LayerCtx {
    /// The blocked attention of this pass. A layer that keeps its activations until the
    /// backward (no checkpointing; every layer at once) keeps probabilities only when they are
    /// as small as one block; a replay, whose backward follows at once, up to `REPLAY_KEEP`.
    fn attention(&self, pass: Pass) -> crate::ops::attention::Attention<'_> {
        crate::ops::attention::Attention {
            keep: &self.keep,
            scale: 1.0 / (self.head_dim as f64).sqrt(),
            segments: &self.segments,
            block_elements: ATTN_BLOCK,
            keep_elements: if pass == Pass::Replay {
                REPLAY_KEEP
            } else {
                ATTN_BLOCK
            },
            dense_keys: self.dense_keys,
        }
    }
}

/// One pre-norm decoder block: attention then SwiGLU MLP, each with a residual, through
/// candle's autograd. Training runs `layer_op`, whose backward is written by hand; this is its
/// reference.
pub(super) fn decoder_layer(
    layer: &DecoderLayer,
    ctx: &LayerCtx,
    x: &Tensor,
    mut rng: Option<&mut Rng>,
) -> Result<Tensor> {
    let (b, s, _) = x.dims3()?;
    let (hd, nh, nkv) = (ctx.head_dim, ctx.heads, ctx.kv_heads);
    let h = rms_norm(x, &layer.input_norm, ctx.eps)?;
    // Projections come out as [b, s, n*hd]; rope moves q and k to heads [b, n, s, hd] as it
    // rotates them.
    let split = |t: Tensor, n: usize| t.reshape((b, s, n, hd));
    let [q, k, v]: [Tensor; 3] = layer
        .qkv((hd, nh, nkv))
        .forward(&h, rng.as_deref_mut())?
        .try_into()
        .expect("q, k and v");
    let q = split(q, nh)?;
    let k = split(k, nkv)?;
    let (q, k) = match &layer.qk_norm {
        Some((qn, kn)) => (rms_norm(&q, qn, ctx.eps)?, rms_norm(&k, kn, ctx.eps)?),
        None => (q, k),
    };
    let q = rope(&q, &ctx.cos, &ctx.sin)?;
    let k = rope(&k, &ctx.cos, &ctx.sin)?;
    let v = split(v, nkv)?.transpose(1, 2)?.contiguous()?;
    let attn = attention(&q, &k, &v, ctx)?;
    let x = (x + layer.o().forward(&attn, rng.as_deref_mut())?)?;
    let h = rms_norm(&x, &layer.post_norm, ctx.eps)?;
    let [gate, up]: [Tensor; 2] = layer
        .gate_up()
        .forward(&h, rng.as_deref_mut())?
        .try_into()
        .expect("gate and up");
    let mlp = layer.down().forward(&swiglu(&gate, &up)?, rng)?;
    x + mlp
}

/// Attention on heads through autograd, the reference of `ops::attention`: q `[b, nh, s, hd]`,
/// k and v `[b, nkv, s, hd]`, all contiguous, each segment of `ctx` on its own with every score
/// at once. The nh/nkv query heads of a group share one key/value head, so q is viewed as
/// `[b, nkv, group·s, hd]` and no key or value is repeated. Returns the output `[b, s, nh·hd]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, ctx: &LayerCtx) -> Result<Tensor> {
    let (b, nh, s, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let mut outs = Vec::with_capacity(ctx.segments.len());
    for &(start, n) in &ctx.segments {
        let (q, k, v) = if n == s {
            (q.clone(), k.clone(), v.clone())
        } else {
            (
                q.narrow(2, start, n)?.contiguous()?,
                k.narrow(2, start, n)?.contiguous()?,
                v.narrow(2, start, n)?.contiguous()?,
            )
        };
        let scores = q
            .reshape((b, nkv, nh / nkv * n, hd))?
            .matmul(&k.t()?.contiguous()?)?;
        let probs = attn_softmax(
            &scores.reshape((b, nh, n, n))?,
            &ctx.keep.narrow(1, start, n)?,
            1.0 / (hd as f64).sqrt(),
            true,
        )?;
        let out = probs.reshape((b, nkv, nh / nkv * n, n))?.matmul(&v)?;
        outs.push(out.reshape((b, nh, n, hd))?);
    }
    Tensor::cat(&outs, 2)?
        .transpose(1, 2)?
        .reshape((b, s, nh * hd))
}

/// What a decoder layer's hand-written backward reads from its forward.
struct LayerSaved {
    h1: Tensor,
    /// q, k, v's (or the fused qkv's).
    s_qkv: Vec<LinearSaved>,
    /// q and k `[b, s, heads, head_dim]` before their per-head norms (Qwen3).
    qk_pre: Option<(Tensor, Tensor)>,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The attention probabilities when they were small enough to keep.
    probs: Option<crate::ops::attention::Kept>,
    attn: Tensor,
    so: LinearSaved,
    x2: Tensor,
    h2: Tensor,
    gate: Tensor,
    up: Tensor,
    /// gate, up's (or the fused gate_up's).
    s_gu: Vec<LinearSaved>,
    m: Tensor,
    sd: LinearSaved,
}

/// What `layer_forward` computes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Pass {
    /// The output alone, keeping nothing (a checkpointed layer's forward): the last projection
    /// and the adapters accumulate into the residual in place.
    Output,
    /// What the backward reads and not the output (a checkpointed layer's replay). Dequantized
    /// weights are held for the backward, which follows at once.
    Replay,
    /// The output and what the backward reads (training without checkpointing). What is kept
    /// lives until the backward reaches the layer, so weights stay packed in it.
    Keep,
}

/// A decoder layer's forward with nothing tracked, x `[b·s, hidden]`: the output, what
/// `layer_backward` reads, or both, as `pass` says. Draws from `rng` as `decoder_layer` does.
fn layer_forward(
    layer: &DecoderLayer,
    ctx: &LayerCtx,
    x: &Tensor,
    (b, s): (usize, usize),
    mut rng: Option<&mut Rng>,
    pass: Pass,
) -> Result<(Option<Tensor>, Option<LayerSaved>)> {
    let (hd, nh, nkv, eps) = (ctx.head_dim, ctx.heads, ctx.kv_heads, ctx.eps);
    let rows = b * s;
    let hold = pass == Pass::Replay;
    let h1 = rms_norm(x, &layer.input_norm, eps)?;
    let (qkv, s_qkv) = layer
        .qkv((hd, nh, nkv))
        .forward_saving(&h1, rng.as_deref_mut(), hold)?;
    let [qp, kp, vp]: [Tensor; 3] = qkv.try_into().expect("q, k and v");
    let (qp, kp) = (qp.reshape((b, s, nh, hd))?, kp.reshape((b, s, nkv, hd))?);
    let (q, k, qk_pre) = match &layer.qk_norm {
        Some((qn, kn)) => {
            let (q, k) = (rms_norm(&qp, qn, eps)?, rms_norm(&kp, kn, eps)?);
            (q, k, (pass != Pass::Output).then_some((qp, kp)))
        }
        None => (qp, kp, None),
    };
    let q = rope(&q, &ctx.cos, &ctx.sin)?;
    let k = rope(&k, &ctx.cos, &ctx.sin)?;
    let v = vp.reshape((b, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let (attn, probs) = ctx
        .attention(pass)
        .forward(&q, &k, &v, pass != Pass::Output)?;
    let attn = attn.reshape((rows, nh * hd))?;
    let (o, so) = layer.o().forward_saving(&attn, rng.as_deref_mut(), hold)?;
    let x2 = (x + o)?;
    let h2 = rms_norm(&x2, &layer.post_norm, eps)?;
    let (gu, s_gu) = layer
        .gate_up()
        .forward_saving(&h2, rng.as_deref_mut(), hold)?;
    let [gate, up]: [Tensor; 2] = gu.try_into().expect("gate and up");
    let m = swiglu(&gate, &up)?;
    let down = layer.down();
    let (y, sd) = match pass {
        Pass::Output => return Ok((Some(down.forward_add(x2, &m, rng)?), None)),
        Pass::Replay => (None, down.saving_only(&m, rng)?),
        Pass::Keep => {
            let (d, sd) = down.forward_saving(&m, rng, false)?;
            (Some((d + &x2)?), sd)
        }
    };
    let saved = LayerSaved {
        h1,
        s_qkv,
        qk_pre,
        q,
        k,
        v,
        probs,
        attn,
        so,
        x2,
        h2,
        gate,
        up,
        s_gu,
        m,
        sd,
    };
    Ok((y, Some(saved)))
}

/// A decoder layer's backward by hand, from what its forward kept (`saved`, or a replay of
/// the forward with the same dropout draws from `rng` when it kept nothing). x is the layer's
/// input `[b, s, hidden]`. Returns dL/dx and `(var, gradient)` for every adapter weight.
/// candle's autograd would add a zero-initialised full-size accumulation for every edge of
/// the layer's graph.
fn layer_backward(
    layer: &DecoderLayer,
    ctx: &LayerCtx,
    x: &Tensor,
    saved: Option<LayerSaved>,
    rng: Option<&mut Rng>,
    gy: &Tensor,
) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
    let (b, s, hidden) = x.dims3()?;
    let (hd, nh, nkv, eps) = (ctx.head_dim, ctx.heads, ctx.kv_heads, ctx.eps);
    let l = &layer.linears;
    let rows = b * s;
    let x = x.reshape((rows, hidden))?;
    let gy = gy.to_dtype(x.dtype())?.reshape((rows, hidden))?;
    let fwd = match saved {
        Some(saved) => saved,
        None => layer_forward(layer, ctx, &x, (b, s), rng, Pass::Replay)?
            .1
            .expect("a replay saves"),
    };

    let mut grads = Vec::new();
    let mut keep = |i: usize, g: Option<(Tensor, Tensor)>| {
        if let (Some(a), Some((ga, gb))) = (&l[i].adapter, g) {
            grads.push((a.a.as_tensor().clone(), ga));
            grads.push((a.b.as_tensor().clone(), gb));
        }
    };
    // Each part lets go of what it read, and of its own temporaries, before the next: the
    // attention backward's [s, s] buffers make the layer's peak, and the MLP's weights and
    // activations need not be held beside them.
    let (o_at, down_at) = (layer.o_index(), l.len() - 1);
    let gx2 = {
        let (gm, g) = l[down_at].backward(&fwd.m, &fwd.sd, &gy, None)?;
        keep(down_at, g);
        let (g_gate, g_up) = swiglu_bwd(&fwd.gate, &fwd.up, &gm)?;
        drop(gm);
        let gh2 = layer
            .gate_up()
            .backward(&fwd.h2, &fwd.s_gu, vec![g_gate, g_up], &mut keep)?;
        (&gy + rms_norm_bwd(&fwd.x2, &layer.post_norm, eps, &gh2)?)?
    };
    drop((
        fwd.m, fwd.sd, fwd.gate, fwd.up, fwd.h2, fwd.s_gu, fwd.x2, gy,
    ));
    let (gq, gk, gv) = {
        let (g_attn, g) = l[o_at].backward(&fwd.attn, &fwd.so, &gx2, None)?;
        keep(o_at, g);
        ctx.attention(Pass::Replay)
            .backward(&fwd.q, &fwd.k, &fwd.v, fwd.probs, &g_attn)?
    };
    drop((fwd.attn, fwd.so, fwd.q, fwd.k, fwd.v));
    let mut gqp = rope_bwd(&gq, &ctx.cos, &ctx.sin)?;
    let mut gkp = rope_bwd(&gk, &ctx.cos, &ctx.sin)?;
    if let (Some((qn, kn)), Some((qp, kp))) = (&layer.qk_norm, &fwd.qk_pre) {
        gqp = rms_norm_bwd(qp, qn, eps, &gqp)?;
        gkp = rms_norm_bwd(kp, kn, eps, &gkp)?;
    }
    drop(fwd.qk_pre);
    let gqp = gqp.reshape((rows, nh * hd))?;
    let gkp = gkp.reshape((rows, nkv * hd))?;
    let gvp = gv.transpose(1, 2)?.reshape((rows, nkv * hd))?;
    let gh1 =
        layer
            .qkv((hd, nh, nkv))
            .backward(&fwd.h1, &fwd.s_qkv, vec![gqp, gkp, gvp], &mut keep)?;
    let gx = (gx2 + rms_norm_bwd(&x, &layer.input_norm, eps, &gh1)?)?;
    Ok((gx.reshape((b, s, hidden))?, grads))
}

/// Adapter gradients produced in decoder layers' hand-written backward, merged after the outer
/// pass.
#[derive(Clone, Default)]
pub(super) struct GradSink(Arc<std::sync::Mutex<Vec<(Tensor, Tensor)>>>);

impl GradSink {
    fn push(&self, var: Tensor, grad: Tensor) {
        self.0.lock().expect("grad sink lock").push((var, grad));
    }

    pub(super) fn drain_into(&self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        let pending = std::mem::take(&mut *self.0.lock().expect("grad sink lock"));
        for (var, g) in pending {
            let total = match grads.get(&var) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert(&var, total);
        }
        Ok(())
    }
}

/// One decoder layer as a single autograd op with a hand-written backward: the gradient of its
/// input is returned, its adapters' go into `sink`. `pass` is `Output` for gradient
/// checkpointing (the layer's activations are not kept; backward replays the layer with the
/// same dropout masks) or `Keep` (they are kept until backward reaches the layer).
pub(super) fn layer_op(
    layer: DecoderLayer,
    ctx: Arc<LayerCtx>,
    x: &Tensor,
    rng: Option<&mut Rng>,
    sink: &GradSink,
    pass: Pass,
) -> Result<Tensor> {
    let start = rng.as_ref().map(|r| **r);
    let mut fwd_rng = start;
    let (b, sq, hidden) = x.dims3()?;
    let (y, kept) = layer_forward(
        &layer,
        &ctx,
        &x.detach().reshape((b * sq, hidden))?,
        (b, sq),
        fwd_rng.as_mut(),
        pass,
    )?;
    let y = y
        .expect("an output unless replaying")
        .reshape((b, sq, hidden))?;
    if let (Some(outer), Some(after)) = (rng, fwd_rng) {
        *outer = after;
    }
    // The first layer's input (embeddings) is not tracked, so one of the layer's adapter
    // weights anchors the op; with no adapter nothing of this layer trains, and an untracked x
    // needs no gradient.
    let anchor = layer
        .linears
        .iter()
        .find_map(|l| l.adapter.as_ref().map(|a| a.a.as_tensor().clone()));
    // What the forward kept, taken by the backward; None for a checkpointed layer, whose
    // backward replays the forward from the dropout stream as it began.
    let kept = std::sync::Mutex::new(kept);
    let sink = sink.clone();
    let backward: Backward = Box::new(move |x: &Tensor, gy: &Tensor| {
        let mut rng = start;
        let kept = kept.lock().expect("decoder layer lock").take();
        let (gx, grads) =
            layer_backward(&layer, &ctx, &x.detach(), kept, rng.as_mut(), &gy.detach())?;
        for (var, g) in grads {
            sink.push(var, g);
        }
        Ok(Some(gx))
    });
    hand_written("decoder-layer", x, anchor.as_ref(), y, backward)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::{DType, Device, Tensor};

    use super::super::{CausalLm, LoadOptions};
    use crate::rng::Rng;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/lm")
            .join(name)
    }

    /// The decoder layers' hand-written backward, from kept activations and from a
    /// checkpoint's replay, against candle's autograd through the plain layers, with dropout on
    /// (the same draws), left padding and trained, non-zero adapters.
    #[test]
    fn hand_written_layer_backward_equals_autograd_with_dropout() {
        for name in ["llama-gqa", "qwen2", "qwen3", "phi3", "phi3-longrope"] {
            let mut m = CausalLm::load(&fixture(name), &LoadOptions::default()).unwrap();
            m.load_adapter(&fixture(&format!("{name}-lora"))).unwrap();
            for (_, lin) in m.linears_mut() {
                if let Some(a) = lin.adapter.as_mut() {
                    a.dropout = 0.2;
                }
            }
            let ids = Tensor::from_vec(
                (0..24u32).map(|i| i * 7 % 50).collect(),
                (2, 12),
                &Device::Cpu,
            )
            .unwrap();
            let mut mask = vec![1i64; 24];
            mask[12] = 0; // left padding in the second row
            let mask = Tensor::from_vec(mask, (2, 12), &Device::Cpu).unwrap();
            let labels = ids.to_dtype(DType::I64).unwrap();
            let no_dropout = m
                .forward_loss(&ids, Some(&mask), &labels, None)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let mut run = |autograd: bool, checkpointing: bool| {
                m.set_autograd_layers(autograd);
                m.set_gradient_checkpointing(checkpointing);
                let mut rng = Rng::new(11);
                let loss = m
                    .forward_loss(&ids, Some(&mask), &labels, Some(&mut rng))
                    .unwrap();
                let grads = m.backward(&loss).unwrap();
                let out: Vec<(String, Vec<f32>)> = m
                    .trainable()
                    .into_iter()
                    .map(|(k, v)| {
                        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{k}"));
                        (k, g.flatten_all().unwrap().to_vec1().unwrap())
                    })
                    .collect();
                (loss.to_scalar::<f32>().unwrap(), out)
            };
            let (loss_plain, plain) = run(true, false);
            assert_ne!(loss_plain, no_dropout, "{name}: dropout is on");
            let linears = if name.starts_with("phi3") { 4 } else { 7 };
            assert_eq!(plain.len(), 2 * 2 * linears, "{name}");
            for checkpointing in [false, true] {
                let (loss, hand) = run(false, checkpointing);
                assert!(
                    (loss_plain - loss).abs() <= 1e-6 * loss_plain,
                    "{name}, checkpointing {checkpointing}: forward {loss_plain} vs {loss}"
                );
                for ((key, a), (_, b)) in plain.iter().zip(&hand) {
                    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                    assert!(scale > 0.0, "{name}: {key} has a zero gradient");
                    assert!(
                        diff <= 1e-5 * scale,
                        "{name}, checkpointing {checkpointing}: {key} differs by {diff} \
                         (scale {scale})"
                    );
                }
            }
        }
    }
}
