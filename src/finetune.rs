//! One fine-tune job from its spec: the spec itself (`spec`), and the run that turns it into an
//! adapter and its exports (`run`), reporting progress through a callback. `qlorad train` and
//! the service's workers both run jobs through here, so they cannot drift apart.
//!
//! Errors are typed to the end: [`FinetuneError::retryable`] tells a failure worth another
//! attempt (a full disk, a lost device, memory exhausted) from one that would fail again (bad
//! data, a bad spec, a diverged loss).

pub mod preflight;
pub mod run;
pub mod spec;
pub mod tensorboard;

use std::path::PathBuf;

pub use crate::train::Hyperparameters;
pub use run::{encode_options, load_model, run, Outcome, Plan, RunEvent, Split};
pub use spec::{
    ComputeDType, DataSpec, ExportSpec, JobSpec, LoraSpec, QuantSpecType, QuantizationSpec,
    SpecError,
};

#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("export: {0}")]
    Export(#[from] crate::export::ExportError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, FinetuneError>;

/// What a device or a driver says when it runs out of something or goes away: the same job may
/// well succeed on another attempt, or on another worker.
const RESOURCE_MARKERS: [&str; 6] = [
    "out of memory",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_DEVICE_UNAVAILABLE",
    "CUDA_ERROR_NO_DEVICE",
];

impl FinetuneError {
    /// Whether another attempt could succeed: storage full or over quota, an interrupted or
    /// timed-out I/O call, memory or the device lost. Everything else (the spec, the data, the
    /// model files, a diverged loss) fails the same way every time.
    pub fn retryable(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if e.downcast_ref::<std::io::Error>().is_some_and(transient_io) {
                return true;
            }
            cause = e.source();
        }
        if let FinetuneError::Train(crate::train::TrainError::Diverged(_)) = self {
            return false;
        }
        let text = self.to_string();
        RESOURCE_MARKERS.iter().any(|m| text.contains(m))
    }
}

fn transient_io(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    // ENOMEM, ENOSPC and EDQUOT on Linux.
    matches!(
        e.kind(),
        K::StorageFull | K::QuotaExceeded | K::Interrupted | K::TimedOut | K::OutOfMemory
    ) || matches!(e.raw_os_error(), Some(12 | 28 | 122))
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> FinetuneError {
    let path = path.into();
    move |source| FinetuneError::Io { path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_told_apart_by_what_another_attempt_could_change() {
        let full = FinetuneError::Train(crate::train::TrainError::Io {
            path: "run/checkpoint-4".into(),
            source: std::io::Error::from_raw_os_error(28),
        });
        assert!(full.retryable(), "{full}");
        let oom = FinetuneError::Train(crate::train::TrainError::Candle(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        )));
        assert!(oom.retryable());
        let export_full = FinetuneError::Export(crate::export::ExportError::Io {
            path: "artifacts/model-f16.gguf".into(),
            source: std::io::ErrorKind::StorageFull.into(),
        });
        assert!(export_full.retryable());

        let spec = FinetuneError::Spec(SpecError::new("device", "expected cpu or cuda:N"));
        assert!(!spec.retryable());
        let missing = FinetuneError::Data(crate::data::DataError::Io {
            path: "train.jsonl".into(),
            source: std::io::ErrorKind::NotFound.into(),
        });
        assert!(!missing.retryable(), "a missing file stays missing");
        let diverged = FinetuneError::Train(crate::train::TrainError::Diverged(f32::NAN));
        assert!(!diverged.retryable());
    }
}
