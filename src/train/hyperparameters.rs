//! The optimization settings of a run: steps or epochs, batch and accumulation, learning rate
//! and its schedule, clipping, sequence length, seed, checkpointing. The `hyperparameters`
//! object of a job spec.

use serde::{Deserialize, Serialize};

use super::Schedule;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hyperparameters {
    /// Passes over the training set (ignored when `max_steps` is set).
    pub n_epochs: usize,
    /// Optimizer steps to run; overrides `n_epochs`.
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub lr_scheduler: Schedule,
    /// Fraction of steps spent warming up (rounded up), unless `warmup_steps` is given.
    pub warmup_ratio: f64,
    pub warmup_steps: Option<usize>,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables.
    pub max_grad_norm: f64,
    pub max_seq_len: usize,
    pub seed: u64,
    /// Recompute each decoder layer in backward: less memory, about a third more compute.
    pub gradient_checkpointing: bool,
    /// `adamw_torch` (f32 moments) or `adamw_bnb_8bit` (bitsandbytes' 8-bit blockwise
    /// moments, `adamw_8bit` too), as transformers names them.
    pub optimizer: super::OptimizerKind,
}

impl Default for Hyperparameters {
    /// artidoro/qlora's defaults where it has them (lr 2e-4, constant schedule, warmup 3%,
    /// clip 0.3).
    fn default() -> Self {
        Hyperparameters {
            n_epochs: 3,
            max_steps: None,
            batch_size: 4,
            gradient_accumulation_steps: 1,
            learning_rate: 2e-4,
            lr_scheduler: Schedule::Constant,
            warmup_ratio: 0.03,
            warmup_steps: None,
            weight_decay: 0.0,
            max_grad_norm: 0.3,
            max_seq_len: 2048,
            seed: 42,
            gradient_checkpointing: false,
            optimizer: super::OptimizerKind::AdamwTorch,
        }
    }
}
