//! The QLoRA training loop: AdamW, schedules, accumulation, clipping, evaluation, checkpoints
//! that resume exactly, and events for whoever watches.

pub mod adamw8bit;
pub mod checkpoint;
pub mod dpo;
pub mod hyperparameters;
pub mod optim;
pub mod schedule;
pub mod trainer;

use std::path::PathBuf;

pub use hyperparameters::Hyperparameters;
pub use optim::{AdamW, Optimizer, OptimizerKind};
pub use schedule::Schedule;
pub use trainer::{evaluate, EvalResult, TrainEvent, TrainOutcome, Trainer, TrainerOptions};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("spec: field `{field}`: {message}")]
    Spec { field: String, message: String },
    #[error("the loss became {0} (check the learning rate and data)")]
    Diverged(f32),
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
