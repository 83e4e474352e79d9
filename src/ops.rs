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
//!
//! Each op's file holds its CPU twin, its CUDA launch and its backward; its kernel is the file
//! of the same name under `kernels/`, and `cuda` holds what the launches share.

pub mod attention;
mod attn_softmax;
mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cudnn")]
pub mod cudnn;
mod dropout;
mod hand_written;
mod matmul;
pub mod profile;
mod rms_norm;
mod rope;
mod swiglu;

pub use attn_softmax::{attn_softmax, attn_softmax_bwd};
pub use cross_entropy::{cross_entropy, cross_entropy_grad};
pub use dropout::{dropout, dropout_add, Dropout};
pub(crate) use hand_written::{hand_written, Backward};
pub use matmul::matmul_add;
pub use rms_norm::{rms_norm, rms_norm_bwd};
pub use rope::{rope, rope_bwd};
pub use swiglu::{swiglu, swiglu_bwd};

use candle_core::{CpuStorage, Layout, Result, Tensor};
use half::{bf16, f16};

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

/// The input gradient of a fused op's backward, for hand-written backward passes.
fn input_grad(g: Option<Tensor>) -> Result<Tensor> {
    g.ok_or_else(|| candle_core::Error::Msg("fused op gave no input gradient".into()))
}

/// What the ops' tests share.
#[cfg(test)]
mod testing {
    use candle_core::{Device, Tensor, Var};

    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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

    /// Values and input gradients of `f` and `reference` under a random downstream weighting.
    pub fn same_values_and_grads(
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
}
