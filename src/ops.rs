//! Fused autograd ops of the training graph, each with a CPU and a CUDA forward that compute
//! the same thing, and a backward: hash dropout, masked attention softmax, cross-entropy,
//! RMSNorm, rotary embedding, SwiGLU. Fewer, larger kernels: on a GPU the composed versions
//! spend more time launching than computing.
//!
//! Candle's own fused softmax records no backward; these do, and keep what backward needs small:
//! dropout stores no mask (backward regenerates it from the seed), softmax keeps its bf16 output,
//! cross-entropy keeps nothing but the logits it was given.
//!
//! `hand_written` records a whole composed computation (a decoder layer, the LM head's loss) as
//! one op whose backward is written by hand.

pub mod attention;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use half::{bf16, f16};
use rayon::prelude::*;

/// Element types the fused ops take, with f32 math inside.
trait Float: candle_core::WithDType + Send + Sync {
    fn f32(self) -> f32;
    fn of(v: f32) -> Self;
}

impl Float for f32 {
    fn f32(self) -> f32 {
        self
    }
    fn of(v: f32) -> Self {
        v
    }
}

impl Float for bf16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
    fn of(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Float for f16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
    fn of(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// The contiguous slice of a CPU storage under `layout`.
fn slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("fused op: input is not contiguous"),
    }
}

fn owned<T: candle_core::WithDType>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}

// ---------------------------------------------------------------------------------------------
// Dropout

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Inverted dropout: element i is zeroed when the top 24 bits of a counter hash of (seed, i)
/// fall below p·2²⁴, the rest are scaled by 1/(1−p). The same on every device, and
/// reproducible from the seed, so backward and checkpoint replays need no stored mask.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    seed: u64,
    threshold: u32,
    keep_scale: f32,
}

impl Dropout {
    pub fn new(p: f64, seed: u64) -> Self {
        Dropout {
            seed,
            threshold: (p.clamp(0.0, 1.0) * (1u64 << 24) as f64).round() as u32,
            keep_scale: (1.0 / (1.0 - p)) as f32,
        }
    }

    fn keep(&self, i: usize) -> bool {
        let h = splitmix64(self.seed.wrapping_add((i as u64 + 1).wrapping_mul(GOLDEN)));
        ((h >> 40) as u32) >= self.threshold
    }

    fn apply<T: Float>(&self, x: &[T]) -> Vec<T> {
        x.par_iter()
            .enumerate()
            .map(|(i, &v)| {
                if self.keep(i) {
                    T::of(v.f32() * self.keep_scale)
                } else {
                    T::of(0.0)
                }
            })
            .collect()
    }
}

pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Dropout::new(p, seed))
}

use crate::profile::span;

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "hash-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!("fused op", s.dtype(), T => owned(self.apply(slice::<T>(s, l)?)));
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::dropout(s, l, self.seed, self.threshold, self.keep_scale)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        span("LoRA dropout backward", || {
            Ok(Some(grad.contiguous()?.apply_op1(*self)?))
        })
    }
}

/// `acc + dropout(x, p, seed)`: a dropout's backward accumulated into the gradient beside it.
/// On a GPU one kernel updates `acc` in place, so `acc` must be contiguous and not shared.
pub fn dropout_add(acc: Tensor, x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if acc.device().is_cuda() && acc.is_contiguous() {
        let d = Dropout::new(p, seed);
        crate::cuda::dropout_add(&acc, &x.contiguous()?, d.seed, d.threshold, d.keep_scale)?;
        return Ok(acc);
    }
    acc + dropout(x, p, seed)?
}

/// `acc + a · bᵀ` (`b_transposed`, b `[n, k]`) or `acc + a · b` (b `[k, n]`) for 2-D a and acc.
/// On a GPU cuBLAS accumulates into `acc` in place (no `[m, n]` product is made), so `acc`
/// must be contiguous and not shared.
pub fn matmul_add(acc: Tensor, a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if acc.device().is_cuda() && acc.is_contiguous() {
        crate::cuda::matmul_add(&acc, &a.contiguous()?, &b.contiguous()?, b_transposed)?;
        return Ok(acc);
    }
    let b = if b_transposed { b.t()? } else { b.clone() };
    acc + a.matmul(&b)?
}

// ---------------------------------------------------------------------------------------------
// Attention softmax

/// Softmax of attention scores `[b, h, q, k]` scaled by `scale`, over keys that are visible:
/// `keep[b, j]` (u8 `[b, k]`, 1 for a real token) and, when causal, `j <= i + k - q`. Computed in
/// f32, returned in the scores' dtype. A row that sees no key is uniform, with zero gradient.
pub fn attn_softmax(scores: &Tensor, keep: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let (b, h, q, k) = scores.dims4()?;
    if keep.dims() != [b, k] || keep.dtype() != DType::U8 {
        candle_core::bail!(
            "attn_softmax: keep is {:?} {:?}, expected u8 [{b}, {k}]",
            keep.dtype(),
            keep.dims()
        );
    }
    let scores = scores.contiguous()?;
    span("attention softmax", || {
        scores.apply_op1(AttnSoftmax {
            keep: keep.contiguous()?,
            heads: h,
            q,
            k,
            scale: scale as f32,
            causal,
        })
    })
}

/// dL/dscores of `attn_softmax` from its output `probs` and dL/dprobs, for hand-written
/// backward passes (the scale included).
pub fn attn_softmax_bwd(
    probs: &Tensor,
    grad: &Tensor,
    keep: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let (_, h, q, k) = probs.dims4()?;
    let op = AttnSoftmax {
        keep: keep.contiguous()?,
        heads: h,
        q,
        k,
        scale: scale as f32,
        causal,
    };
    input_grad(op.bwd(probs, probs, grad)?)
}

fn input_grad(g: Option<Tensor>) -> Result<Tensor> {
    g.ok_or_else(|| candle_core::Error::Msg("fused op gave no input gradient".into()))
}

#[derive(Clone)]
struct AttnSoftmax {
    keep: Tensor,
    heads: usize,
    q: usize,
    k: usize,
    scale: f32,
    causal: bool,
}

impl AttnSoftmax {
    /// The last visible key of query i, or None when the row sees none through causality.
    fn last(&self, i: usize) -> usize {
        if self.causal {
            (i + self.k - self.q).min(self.k - 1)
        } else {
            self.k - 1
        }
    }

    fn keep_host(&self) -> Result<Vec<u8>> {
        self.keep.flatten_all()?.to_vec1::<u8>()
    }

    fn rows(&self) -> impl Fn(usize) -> (usize, usize) + '_ {
        move |row| (row / self.q / self.heads, row % self.q)
    }

    #[cfg(feature = "cuda")]
    fn geometry(&self) -> crate::cuda::AttnRows {
        crate::cuda::AttnRows {
            heads: self.heads,
            q: self.q,
            k: self.k,
            scale: self.scale,
            causal: self.causal,
        }
    }

    fn forward<T: Float>(&self, s: &[T], keep: &[u8]) -> Vec<T> {
        let k = self.k;
        let at = self.rows();
        let mut out = vec![T::of(0.0); s.len()];
        out.par_chunks_mut(k)
            .zip(s.par_chunks(k))
            .enumerate()
            .for_each(|(row, (o, x))| {
                let (b, i) = at(row);
                let kb = &keep[b * k..(b + 1) * k];
                let last = self.last(i);
                let mut m = f32::NEG_INFINITY;
                for j in 0..=last {
                    if kb[j] != 0 {
                        m = m.max(x[j].f32() * self.scale);
                    }
                }
                if m == f32::NEG_INFINITY {
                    o.fill(T::of(1.0 / k as f32));
                    return;
                }
                let mut sum = 0f32;
                for j in 0..=last {
                    if kb[j] != 0 {
                        sum += (x[j].f32() * self.scale - m).exp();
                    }
                }
                for j in 0..k {
                    let e = if j <= last && kb[j] != 0 {
                        (x[j].f32() * self.scale - m).exp() / sum
                    } else {
                        0.0
                    };
                    o[j] = T::of(e);
                }
            });
        out
    }

    fn backward<T: Float>(&self, p: &[T], dp: &[T], keep: &[u8]) -> Vec<T> {
        let k = self.k;
        let at = self.rows();
        let mut out = vec![T::of(0.0); p.len()];
        out.par_chunks_mut(k)
            .zip(p.par_chunks(k).zip(dp.par_chunks(k)))
            .enumerate()
            .for_each(|(row, (o, (p, dp)))| {
                let (b, i) = at(row);
                let kb = &keep[b * k..(b + 1) * k];
                let last = self.last(i);
                if !kb[..=last].iter().any(|&v| v != 0) {
                    return;
                }
                let dot: f32 = (0..=last).map(|j| p[j].f32() * dp[j].f32()).sum();
                for j in 0..=last {
                    if kb[j] != 0 {
                        o[j] = T::of(self.scale * p[j].f32() * (dp[j].f32() - dot));
                    }
                }
            });
        out
    }
}

impl CustomOp1 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "attn-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let keep = self.keep_host()?;
        let out = float_dispatch!("fused op", s.dtype(), T => owned(self.forward(slice::<T>(s, l)?, &keep)));
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::attn_softmax(s, l, &self.keep, self.geometry())?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.to_dtype(res.dtype())?.contiguous()?;
        span("attention softmax", || {
            Ok(Some(
                res.contiguous()?
                    .apply_op2_no_bwd(&grad, &AttnSoftmaxBwd(self.clone()))?,
            ))
        })
    }
}

struct AttnSoftmaxBwd(AttnSoftmax);

impl CustomOp2 for AttnSoftmaxBwd {
    fn name(&self) -> &'static str {
        "attn-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        dp: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let keep = self.0.keep_host()?;
        let out = float_dispatch!("fused op", p.dtype(), T => owned(
            self.0.backward(slice::<T>(p, pl)?, slice::<T>(dp, dl)?, &keep)
        ));
        Ok((out, pl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        dp: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::attn_softmax_bwd(p, pl, dp, dl, &self.0.keep, self.0.geometry())?;
        Ok((out, pl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-written backward over a composed forward

/// The backward of a `hand_written` op: dL/dinput from the input and dL/doutput.
pub(crate) type Backward = Box<dyn Fn(&Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync>;

/// Record `out`, computed from `x` with nothing tracked, as one op on the gradient path whose
/// backward is `backward`. candle records an op only when an input is tracked: `anchor`, a
/// tracked tensor the op reads nothing of, records it when x is not (the anchor's gradient is
/// None here; `backward` delivers the real ones its own way). The op's result is a copy of
/// `out`, which is dropped then.
pub(crate) fn hand_written(
    name: &'static str,
    x: &Tensor,
    anchor: Option<&Tensor>,
    out: Tensor,
    backward: Backward,
) -> Result<Tensor> {
    let op = HandWritten {
        name,
        out: std::sync::Mutex::new(Some(out)),
        backward,
    };
    match anchor {
        Some(anchor) => x.contiguous()?.apply_op2(anchor, op),
        None => x.contiguous()?.apply_op1(op),
    }
}

struct HandWritten {
    name: &'static str,
    out: std::sync::Mutex<Option<Tensor>>,
    backward: Backward,
}

impl HandWritten {
    /// A copy of the stored output's storage, on whichever backend holds it; the stored output
    /// is dropped, so that it is not held twice for as long as the graph lives.
    fn output<S: BackendStorage>(
        &self,
        pick: fn(&candle_core::Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let Some(out) = self.out.lock().expect("hand-written op lock").take() else {
            candle_core::bail!("{}: the forward ran twice", self.name);
        };
        let (storage, layout) = out.storage_and_layout();
        let Some(s) = pick(&storage) else {
            candle_core::bail!("{}: output is on another device than the input", self.name);
        };
        if layout.contiguous_offsets() != Some((0, layout.shape().elem_count())) {
            candle_core::bail!("{}: output is not a whole contiguous tensor", self.name);
        }
        Ok((s.try_clone(layout)?, out.shape().clone()))
    }
}

fn cpu_storage(s: &candle_core::Storage) -> Option<&CpuStorage> {
    match s {
        candle_core::Storage::Cpu(c) => Some(c),
        _ => None,
    }
}

#[cfg(feature = "cuda")]
fn cuda_storage(s: &candle_core::Storage) -> Option<&candle_core::CudaStorage> {
    match s {
        candle_core::Storage::Cuda(c) => Some(c),
        _ => None,
    }
}

impl CustomOp1 for HandWritten {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output(cpu_storage)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output(cuda_storage)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.backward)(arg, grad)
    }
}

impl CustomOp2 for HandWritten {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.output(cpu_storage)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output(cuda_storage)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok(((self.backward)(arg, grad)?, None))
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

/// Negative log-likelihood per row, f32 `[n]`, of logits `[n, v]` (any float dtype) at u32
/// targets `[n]`. Backward recomputes the softmax from the logits, so no `[n, v]` f32 tensor
/// is ever kept.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    if targets.dims() != [n] || targets.dtype() != DType::U32 {
        candle_core::bail!(
            "cross_entropy: targets are {:?} {:?}, expected u32 [{n}]",
            targets.dtype(),
            targets.dims()
        );
    }
    let op = CrossEntropy {
        targets: targets.contiguous()?,
    };
    span("cross-entropy", || logits.contiguous()?.apply_op1(op))
}

/// dL/dlogits of `cross_entropy` given dL/dnll (f32 `[n]`), for hand-written backward passes.
pub fn cross_entropy_grad(logits: &Tensor, targets: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let op = CrossEntropy {
        targets: targets.contiguous()?,
    };
    input_grad(op.bwd(logits, logits, grad)?)
}

#[derive(Clone)]
struct CrossEntropy {
    targets: Tensor,
}

/// Max and log-sum-exp (after the shift) of a row.
fn row_lse<T: Float>(x: &[T]) -> (f32, f32) {
    let m = x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v.f32()));
    let sum: f32 = x.iter().map(|v| (v.f32() - m).exp()).sum();
    (m, sum.ln())
}

impl CrossEntropy {
    fn forward<T: Float>(&self, x: &[T], v: usize, t: &[u32]) -> Vec<f32> {
        x.par_chunks(v)
            .zip(t.par_iter())
            .map(|(row, &t)| {
                let (m, lse) = row_lse(row);
                lse - (row[t as usize].f32() - m)
            })
            .collect()
    }

    fn backward<T: Float>(&self, x: &[T], v: usize, t: &[u32], g: &[f32]) -> Vec<T> {
        let mut out = vec![T::of(0.0); x.len()];
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(t.par_iter().zip(g.par_iter()))
            .for_each(|((o, row), (&t, &g))| {
                let (m, lse) = row_lse(row);
                for (j, (o, x)) in o.iter_mut().zip(row).enumerate() {
                    let p = (x.f32() - m - lse).exp();
                    *o = T::of(g * (p - if j == t as usize { 1.0 } else { 0.0 }));
                }
            });
        out
    }

    fn check(&self, v: usize) -> Result<Vec<u32>> {
        let t = self.targets.to_vec1::<u32>()?;
        if let Some(bad) = t.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("cross_entropy: target {bad} is outside the vocabulary of {v}");
        }
        Ok(t)
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        let t = self.check(v)?;
        let out =
            float_dispatch!("fused op", s.dtype(), T => self.forward(slice::<T>(s, l)?, v, &t));
        Ok((CpuStorage::F32(out), n.into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, _) = l.shape().dims2()?;
        Ok((crate::cuda::cross_entropy(s, l, &self.targets)?, n.into()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_dtype(DType::F32)?.contiguous()?;
        span("cross-entropy", || {
            Ok(Some(
                arg.contiguous()?
                    .apply_op2_no_bwd(&g, &CrossEntropyBwd(self.clone()))?,
            ))
        })
    }
}

struct CrossEntropyBwd(CrossEntropy);

impl CustomOp2 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, v) = xl.shape().dims2()?;
        let t = self.0.check(v)?;
        let g = slice::<f32>(g, gl)?;
        let out = float_dispatch!("fused op", x.dtype(), T => owned(
            self.0.backward(slice::<T>(x, xl)?, v, &t, g)
        ));
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::cross_entropy_bwd(x, xl, &self.0.targets, g, gl)?;
        Ok((out, xl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// transformers' LlamaRMSNorm over the last dimension: `x · 1/sqrt(mean(x²) + eps)` in f32,
/// rounded to x's dtype, times the frozen weight `w` `[hidden]`. Gradient for x only.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dim(candle_core::D::Minus1)?;
    if w.dims() != [h] {
        candle_core::bail!("rms_norm: weight {:?} for rows of {h}", w.dims());
    }
    let op = RmsNorm {
        w: w.to_dtype(x.dtype())?.contiguous()?.detach(),
        eps: eps as f32,
    };
    span("rmsnorm", || x.contiguous()?.apply_op1(op))
}

/// dL/dx of `rms_norm(x, w, eps)` given dL/dy.
pub fn rms_norm_bwd(x: &Tensor, w: &Tensor, eps: f64, grad: &Tensor) -> Result<Tensor> {
    let op = RmsNorm {
        w: w.to_dtype(x.dtype())?.contiguous()?.detach(),
        eps: eps as f32,
    };
    input_grad(op.bwd(x, x, grad)?)
}

#[derive(Clone)]
struct RmsNorm {
    w: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward<T: Float>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let h = w.len();
        let mut out = vec![T::of(0.0); x.len()];
        out.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(o, x)| {
                let ss: f32 = x.iter().map(|v| v.f32() * v.f32()).sum();
                let r = 1.0 / (ss / h as f32 + self.eps).sqrt();
                for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                    *o = T::of(T::of(x.f32() * r).f32() * w.f32());
                }
            });
        out
    }

    fn backward<T: Float>(&self, x: &[T], dy: &[T], w: &[T]) -> Vec<T> {
        let h = w.len();
        let mut out = vec![T::of(0.0); x.len()];
        out.par_chunks_mut(h)
            .zip(x.par_chunks(h).zip(dy.par_chunks(h)))
            .for_each(|(o, (x, dy))| {
                let ss: f32 = x.iter().map(|v| v.f32() * v.f32()).sum();
                let gx: f32 = x
                    .iter()
                    .zip(dy)
                    .zip(w)
                    .map(|((x, d), w)| d.f32() * w.f32() * x.f32())
                    .sum();
                let r = 1.0 / (ss / h as f32 + self.eps).sqrt();
                let c = r * gx / h as f32;
                for (((o, x), d), w) in o.iter_mut().zip(x).zip(dy).zip(w) {
                    let g = d.f32() * w.f32();
                    *o = T::of(r * (g - x.f32() * r * c));
                }
            });
        out
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!("fused op", s.dtype(), T => {
            let w = self.w.to_vec1::<T>()?;
            owned(self.forward(slice::<T>(s, l)?, &w))
        });
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            crate::cuda::rms_norm(s, l, &self.w, self.eps)?,
            l.shape().clone(),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.to_dtype(arg.dtype())?.contiguous()?;
        span("rmsnorm", || {
            Ok(Some(
                arg.contiguous()?
                    .apply_op2_no_bwd(&grad, &RmsNormBwd(self.clone()))?,
            ))
        })
    }
}

struct RmsNormBwd(RmsNorm);

impl CustomOp2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        dy: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!("fused op", x.dtype(), T => {
            let w = self.0.w.to_vec1::<T>()?;
            owned(self.0.backward(slice::<T>(x, xl)?, slice::<T>(dy, dl)?, &w))
        });
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        dy: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::rms_norm_bwd(x, xl, dy, dl, &self.0.w, self.0.eps)?;
        Ok((out, xl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding

/// Rotary embedding fused with the move to heads: x `[b, s, n, d]` (as a projection's output
/// reshapes) to `[b, n, s, d]`, `x·cos + rotate_half(x)·sin` with each product and the sum
/// rounded to x's dtype as transformers computes it. cos and sin are `[s, d]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, s, _, d) = x.dims4()?;
    if cos.dims() != [s, d] || sin.dims() != [s, d] || d % 2 != 0 {
        candle_core::bail!("rope: cos/sin {:?} for x {:?}", cos.dims(), x.dims());
    }
    let op = Rope {
        cos: cos.to_dtype(x.dtype())?.contiguous()?,
        sin: sin.to_dtype(x.dtype())?.contiguous()?,
        dims: x.dims4()?,
    };
    span("rope", || x.contiguous()?.apply_op1(op))
}

/// dL/dx `[b, s, n, d]` of `rope(x, cos, sin)` given dL/dy `[b, n, s, d]`.
pub fn rope_bwd(grad: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, n, s, d) = grad.dims4()?;
    let op = Rope {
        cos: cos.to_dtype(grad.dtype())?.contiguous()?,
        sin: sin.to_dtype(grad.dtype())?.contiguous()?,
        dims: (b, s, n, d),
    };
    input_grad(op.bwd(grad, grad, grad)?)
}

#[derive(Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// `(b, s, n, d)` of the input.
    dims: (usize, usize, usize, usize),
}

impl Rope {
    fn forward<T: Float>(&self, x: &[T], cos: &[T], sin: &[T]) -> Vec<T> {
        let (_, s, n, d) = self.dims;
        let half = d / 2;
        let mut out = vec![T::of(0.0); x.len()];
        // out [b, n, s, d], one (b, n, s) row per chunk.
        out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
            let (bh, p) = (row / s, row % s);
            let (bb, hh) = (bh / n, bh % n);
            let xr = &x[((bb * s + p) * n + hh) * d..][..d];
            for j in 0..d {
                let rh = if j < half {
                    -xr[j + half].f32()
                } else {
                    xr[j - half].f32()
                };
                let a = T::of(xr[j].f32() * cos[p * d + j].f32()).f32();
                let c = T::of(rh * sin[p * d + j].f32()).f32();
                o[j] = T::of(a + c);
            }
        });
        out
    }

    fn backward<T: Float>(&self, dy: &[T], cos: &[T], sin: &[T]) -> Vec<T> {
        let (_, s, n, d) = self.dims;
        let half = d / 2;
        let mut out = vec![T::of(0.0); dy.len()];
        // out [b, s, n, d], one (b, s, n) row per chunk.
        out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
            let (bs, hh) = (row / n, row % n);
            let (bb, p) = (bs / s, bs % s);
            let g = &dy[((bb * n + hh) * s + p) * d..][..d];
            for j in 0..d {
                let mut v = g[j].f32() * cos[p * d + j].f32();
                if j < half {
                    v += g[j + half].f32() * sin[p * d + j + half].f32();
                } else {
                    v -= g[j - half].f32() * sin[p * d + j - half].f32();
                }
                o[j] = T::of(v);
            }
        });
        out
    }

    fn out_shape(&self, backward: bool) -> Shape {
        let (b, s, n, d) = self.dims;
        if backward {
            (b, s, n, d).into()
        } else {
            (b, n, s, d).into()
        }
    }

    fn run_cpu(&self, st: &CpuStorage, l: &Layout, backward: bool) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!("fused op", st.dtype(), T => {
            let cos = self.cos.flatten_all()?.to_vec1::<T>()?;
            let sin = self.sin.flatten_all()?.to_vec1::<T>()?;
            let x = slice::<T>(st, l)?;
            owned(if backward { self.backward(x, &cos, &sin) } else { self.forward(x, &cos, &sin) })
        });
        Ok((out, self.out_shape(backward)))
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run_cpu(s, l, false)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::rope(s, l, &self.cos, &self.sin, self.dims, false)?;
        Ok((out, self.out_shape(false)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.to_dtype(arg.dtype())?.contiguous()?;
        span("rope", || {
            Ok(Some(grad.apply_op1_no_bwd(&RopeBwd(self.clone()))?))
        })
    }
}

struct RopeBwd(Rope);

impl CustomOp1 for RopeBwd {
    fn name(&self) -> &'static str {
        "rope-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.run_cpu(s, l, true)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::rope(s, l, &self.0.cos, &self.0.sin, self.0.dims, true)?;
        Ok((out, self.0.out_shape(true)))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(gate) · up`, the activation rounded to the inputs' dtype first as torch's
/// `act_fn(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() || gate.dtype() != up.dtype() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        );
    }
    span("swiglu", || {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
    })
}

/// dL/dgate and dL/dup of `swiglu(gate, up)` given dL/dy.
pub fn swiglu_bwd(gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let (dg, du) = SwiGlu.bwd(gate, up, grad, grad)?;
    Ok((input_grad(dg)?, input_grad(du)?))
}

struct SwiGlu;

fn silu_parts(g: f32) -> (f32, f32) {
    let sig = 1.0 / (1.0 + (-g).exp());
    (g / (1.0 + (-g).exp()), sig)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!("fused op", g.dtype(), T => {
            let (g, u) = (slice::<T>(g, gl)?, slice::<T>(u, ul)?);
            owned(g.par_iter().zip(u.par_iter()).map(|(g, u)| {
                T::of(T::of(silu_parts(g.f32()).0).f32() * u.f32())
            }).collect::<Vec<T>>())
        });
        Ok((out, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::swiglu(g, gl, u, ul, None)?, gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(g.dtype())?.contiguous()?;
        let both = span("swiglu", || {
            g.contiguous()?
                .apply_op3_no_bwd(&u.contiguous()?, &grad, &SwiGluBwd)
        })?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// dgate and dup stacked as `[2, ...]`.
struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
        dy: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = float_dispatch!("fused op", g.dtype(), T => {
            let (g, u, dy) = (slice::<T>(g, gl)?, slice::<T>(u, ul)?, slice::<T>(dy, dl)?);
            let n = g.len();
            let mut out = vec![T::of(0.0); 2 * n];
            let (dg, du) = out.split_at_mut(n);
            dg.par_iter_mut().zip(du.par_iter_mut()).enumerate().for_each(|(i, (dg, du))| {
                let gv = g[i].f32();
                let (act, sig) = silu_parts(gv);
                let d = dy[i].f32();
                *dg = T::of(d * u[i].f32() * sig * (1.0 + gv * (1.0 - sig)));
                *du = T::of(d * act);
            });
            owned(out)
        });
        Ok((out, stacked(gl.shape())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
        dy: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::swiglu(g, gl, u, ul, Some((dy, dl)))?;
        Ok((out, stacked(gl.shape())))
    }
}

fn stacked(shape: &Shape) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(shape.dims());
    dims.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The composed reference: additive mask, then softmax from differentiable primitives.
    fn reference_softmax(s: &Tensor, keep: &[u8], scale: f64) -> Tensor {
        let (b, _, q, k) = s.dims4().unwrap();
        let mut bias = vec![0f32; b * q * k];
        for bi in 0..b {
            for i in 0..q {
                for j in 0..k {
                    if j > i + k - q || keep[bi * k + j] == 0 {
                        bias[(bi * q + i) * k + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (b, 1, q, k), &Device::Cpu).unwrap();
        let x = (s * scale).unwrap().broadcast_add(&bias).unwrap();
        let m = x.max_keepdim(D::Minus1).unwrap().detach();
        let e = x.broadcast_sub(&m).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
    }

    #[test]
    fn attn_softmax_matches_the_composed_softmax_and_its_gradient() {
        let dev = Device::Cpu;
        let (b, h, q, k) = (2, 3, 5, 5);
        let s = Var::from_tensor(&Tensor::randn(0f32, 2.0, (b, h, q, k), &dev).unwrap()).unwrap();
        let keep_v: Vec<u8> = vec![1, 1, 1, 1, 1, 0, 0, 1, 1, 1];
        let keep = Tensor::from_vec(keep_v.clone(), (b, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (b, h, q, k), &dev).unwrap();
        let p = attn_softmax(s.as_tensor(), &keep, 0.7, true).unwrap();
        let g = (&p * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = g.get(s.as_tensor()).unwrap().clone();

        let r = reference_softmax(s.as_tensor(), &keep_v, 0.7);
        // Rows of batch 1 whose visible keys are all padding: uniform here, NaN in the reference.
        let p1 = p.narrow(0, 1, 1).unwrap().narrow(2, 0, 2).unwrap();
        assert!(max_diff(&p1, &Tensor::full(0.2f32, p1.shape(), &dev).unwrap()) < 1e-7);
        let (pv, rv) = (p.narrow(2, 2, 3).unwrap(), r.narrow(2, 2, 3).unwrap());
        assert!(max_diff(&pv, &rv) < 1e-6);
        let p0 = p.narrow(0, 0, 1).unwrap();
        assert!(max_diff(&p0, &r.narrow(0, 0, 1).unwrap()) < 1e-6);

        let gr = (&r.narrow(2, 2, 3).unwrap() * &w.narrow(2, 2, 3).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grs = gr.get(s.as_tensor()).unwrap();
        assert!(max_diff(&gs.narrow(2, 2, 3).unwrap(), &grs.narrow(2, 2, 3).unwrap()) < 1e-6);
        // No gradient through rows that see nothing.
        let dead = gs.narrow(0, 1, 1).unwrap().narrow(2, 0, 2).unwrap();
        assert_eq!(
            dead.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn attn_softmax_bf16_is_the_f32_result_rounded() {
        let dev = Device::Cpu;
        let s = Tensor::randn(0f32, 1.0, (1, 2, 4, 4), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let keep = Tensor::ones((1, 4), DType::U8, &dev).unwrap();
        let p16 = attn_softmax(&s, &keep, 0.5, true).unwrap();
        let p32 = attn_softmax(&s.to_dtype(DType::F32).unwrap(), &keep, 0.5, true).unwrap();
        assert_eq!(
            p16.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            p32.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }

    #[test]
    fn cross_entropy_matches_log_softmax_and_its_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (4, 11), &dev).unwrap()).unwrap();
        let t = Tensor::new(&[3u32, 0, 10, 7], &dev).unwrap();
        let w = Tensor::new(&[1f32, -2.0, 0.5, 3.0], &dev).unwrap();
        let nll = cross_entropy(x.as_tensor(), &t).unwrap();
        let g = (&nll * &w).unwrap().sum_all().unwrap().backward().unwrap();

        let logp = crate::model::llama::log_softmax_last_dim(x.as_tensor()).unwrap();
        let r = logp
            .gather(&t.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        let gr = (&r * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(&nll, &r) < 1e-5);
        assert!(
            max_diff(
                g.get(x.as_tensor()).unwrap(),
                gr.get(x.as_tensor()).unwrap()
            ) < 1e-6
        );
        let bad = Tensor::new(&[11u32, 0, 0, 0], &dev).unwrap();
        let err = cross_entropy(x.as_tensor(), &bad).unwrap_err().to_string();
        assert!(err.contains("outside the vocabulary of 11"), "{err}");
    }

    /// Values and input gradients of `f` and `reference` under a random downstream weighting.
    fn same_values_and_grads(
        x: &Tensor,
        f: impl Fn(&Tensor) -> Tensor,
        reference: impl Fn(&Tensor) -> Tensor,
    ) -> (f32, f32) {
        let run = |g: &dyn Fn(&Tensor) -> Tensor| {
            let v = Var::from_tensor(x).unwrap();
            let y = g(v.as_tensor());
            let w = Tensor::randn(0f32, 1.0, y.shape(), &Device::Cpu).unwrap();
            (y, v, w)
        };
        let (y, v, w) = run(&f);
        let gy = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let vr = Var::from_tensor(x).unwrap();
        let yr = reference(vr.as_tensor());
        let gr = (&yr * &w).unwrap().sum_all().unwrap().backward().unwrap();
        (
            max_diff(&y, &yr),
            max_diff(
                gy.get(v.as_tensor()).unwrap(),
                gr.get(vr.as_tensor()).unwrap(),
            ),
        )
    }

    #[test]
    fn rms_norm_matches_transformers_arithmetic_and_its_gradient() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 3, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
        let reference = |x: &Tensor| {
            let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let r = (var + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
            x.broadcast_mul(&r).unwrap().broadcast_mul(&w).unwrap()
        };
        let (dv, dg) = same_values_and_grads(&x, |x| rms_norm(x, &w, 1e-5).unwrap(), reference);
        assert!(dv < 1e-5 && dg < 1e-5, "{dv} {dg}");
    }

    #[test]
    fn rope_matches_the_composed_rotation_and_its_gradient() {
        let dev = Device::Cpu;
        let (b, s, n, d) = (2, 5, 3, 8);
        let x = Tensor::randn(0f32, 1.0, (b, s, n, d), &dev).unwrap();
        let ang = Tensor::randn(0f32, 1.0, (s, d), &dev).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let reference = |x: &Tensor| {
            let x = x.transpose(1, 2).unwrap().contiguous().unwrap();
            crate::model::llama::apply_rope(&x, &cos, &sin).unwrap()
        };
        let (dv, dg) = same_values_and_grads(&x, |x| rope(x, &cos, &sin).unwrap(), reference);
        assert!(dv < 1e-6 && dg < 1e-6, "{dv} {dg}");
    }

    #[test]
    fn swiglu_matches_silu_times_up_and_both_gradients() {
        let dev = Device::Cpu;
        let g = Tensor::randn(0f32, 2.0, (3, 7), &dev).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap()).unwrap();
        let (dv, dg) = same_values_and_grads(
            &g,
            |g| swiglu(g, u.as_tensor()).unwrap(),
            |g| (g.silu().unwrap() * u.as_tensor()).unwrap(),
        );
        assert!(dv < 1e-6 && dg < 1e-5, "{dv} {dg}");
        // The gradient of up is silu(gate) · dy.
        let gv = Var::from_tensor(&g).unwrap();
        let grads = swiglu(gv.as_tensor(), u.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_diff(grads.get(u.as_tensor()).unwrap(), &g.silu().unwrap()) < 1e-6);
    }

    #[test]
    fn dropout_backward_reuses_the_forward_mask() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::ones((64, 64), DType::F32, &dev).unwrap()).unwrap();
        let y = dropout(x.as_tensor(), 0.25, 42).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        // d(sum y)/dx is the mask itself: the forward's values at x = 1.
        assert_eq!(
            g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
            y.to_vec2::<f32>().unwrap()
        );
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((dropped - 0.25).abs() < 0.03, "{dropped}");
        assert!(v.iter().all(|&x| x == 0.0 || x == 1.0 / 0.75));
        // Another seed, another mask; the same seed, the same mask.
        let other = dropout(x.as_tensor(), 0.25, 43).unwrap();
        assert_ne!(other.to_vec2::<f32>().unwrap(), y.to_vec2::<f32>().unwrap());
        let again = dropout(x.as_tensor(), 0.25, 42).unwrap();
        assert_eq!(again.to_vec2::<f32>().unwrap(), y.to_vec2::<f32>().unwrap());
    }
}
