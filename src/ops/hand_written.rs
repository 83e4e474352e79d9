//! A composed computation recorded as one op whose backward is written by hand: a decoder
//! layer, the LM head's loss.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

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
