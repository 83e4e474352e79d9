//! The job spec: one JSON object for `qlorad train --spec` and `POST /jobs`. Every field but
//! `model` and `training_file` has a default; unknown fields are rejected.

use serde::{Deserialize, Serialize};

use super::{Schedule, TrainError};
use crate::data::DataFormat;
use crate::lora::{LoraConfig, TargetModules};
use crate::quant::{QuantConfig, QuantType};

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
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
}

impl Default for LoraSpec {
    fn default() -> Self {
        let c = LoraConfig::default();
        LoraSpec {
            r: c.r,
            alpha: c.alpha,
            dropout: c.dropout,
            target_modules: c.target_modules,
            use_rslora: c.use_rslora,
        }
    }
}

impl LoraSpec {
    pub fn config(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            target_modules: self.target_modules.clone(),
            use_rslora: self.use_rslora,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantSpecType {
    Nf4,
    Fp4,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDType {
    F32,
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuantizationSpec {
    #[serde(rename = "type")]
    pub kind: QuantSpecType,
    pub block_size: usize,
    pub double_quant: bool,
    pub compute_dtype: ComputeDType,
}

impl Default for QuantizationSpec {
    fn default() -> Self {
        QuantizationSpec {
            kind: QuantSpecType::Nf4,
            block_size: 64,
            double_quant: true,
            compute_dtype: ComputeDType::F32,
        }
    }
}

impl QuantizationSpec {
    pub fn config(&self) -> Option<QuantConfig> {
        let quant_type = match self.kind {
            QuantSpecType::Nf4 => QuantType::Nf4,
            QuantSpecType::Fp4 => QuantType::Fp4,
            QuantSpecType::None => return None,
        };
        Some(QuantConfig {
            quant_type,
            block_size: self.block_size,
            double_quant: self.double_quant,
        })
    }

    pub fn dtype(&self) -> candle_core::DType {
        match self.compute_dtype {
            ComputeDType::F32 => candle_core::DType::F32,
            ComputeDType::Bf16 => candle_core::DType::BF16,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSpec {
    /// Detected from the first record when absent.
    pub format: Option<DataFormat>,
    /// Also learn the prompt / user turns.
    pub train_on_prompt: bool,
    /// Sort examples by length within windows so batches carry less padding.
    pub group_by_length: bool,
}

/// Files made from the trained adapter when a job finishes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportSpec {
    /// Merged GGUF files of these types: f32, f16, bf16, q8_0, q4_0, q4_k_m.
    pub gguf: Vec<String>,
    /// A merged Hugging Face safetensors directory.
    pub merged_safetensors: bool,
    /// The adapter alone as a GGUF LoRA.
    pub gguf_lora: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobSpec {
    pub model: Option<String>,
    pub training_file: Option<String>,
    pub validation_file: Option<String>,
    pub hyperparameters: Hyperparameters,
    pub lora: LoraSpec,
    pub quantization: QuantizationSpec,
    pub data: DataSpec,
    /// Save a checkpoint every N optimizer steps (and always at the end).
    pub checkpoint_every: Option<usize>,
    /// Checkpoints to keep; older ones are deleted.
    pub keep_checkpoints: usize,
    /// Evaluate on the validation file every N steps (and at the end).
    pub eval_every: Option<usize>,
    pub export: ExportSpec,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Higher runs first in the service's queue.
    pub priority: i64,
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec {
            model: None,
            training_file: None,
            validation_file: None,
            hyperparameters: Hyperparameters::default(),
            lora: LoraSpec::default(),
            quantization: QuantizationSpec::default(),
            data: DataSpec::default(),
            checkpoint_every: None,
            keep_checkpoints: 3,
            eval_every: None,
            export: ExportSpec::default(),
            device: "cpu".into(),
            priority: 0,
        }
    }
}

fn spec_err(field: &str, message: impl Into<String>) -> TrainError {
    TrainError::Spec {
        field: field.into(),
        message: message.into(),
    }
}

impl JobSpec {
    /// Parse and validate; errors name the field.
    pub fn from_json(text: &str) -> Result<Self, TrainError> {
        let spec: JobSpec =
            serde_json::from_str(text).map_err(|e| spec_err("(json)", format!("{e}")))?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        let h = &self.hyperparameters;
        if h.batch_size == 0 {
            return Err(spec_err("hyperparameters.batch_size", "must be at least 1"));
        }
        if h.gradient_accumulation_steps == 0 {
            return Err(spec_err(
                "hyperparameters.gradient_accumulation_steps",
                "must be at least 1",
            ));
        }
        if h.n_epochs == 0 && h.max_steps.is_none() {
            return Err(spec_err(
                "hyperparameters.n_epochs",
                "must be at least 1 (or set max_steps)",
            ));
        }
        if h.max_steps == Some(0) {
            return Err(spec_err("hyperparameters.max_steps", "must be at least 1"));
        }
        if !(h.learning_rate.is_finite() && h.learning_rate > 0.0) {
            return Err(spec_err(
                "hyperparameters.learning_rate",
                "must be a positive number",
            ));
        }
        if !(0.0..1.0).contains(&h.warmup_ratio) {
            return Err(spec_err(
                "hyperparameters.warmup_ratio",
                "must be in [0, 1)",
            ));
        }
        if h.weight_decay < 0.0 || !h.weight_decay.is_finite() {
            return Err(spec_err(
                "hyperparameters.weight_decay",
                "must be a non-negative number",
            ));
        }
        if h.max_grad_norm < 0.0 || !h.max_grad_norm.is_finite() {
            return Err(spec_err(
                "hyperparameters.max_grad_norm",
                "must be a non-negative number",
            ));
        }
        if h.max_seq_len < 2 {
            return Err(spec_err(
                "hyperparameters.max_seq_len",
                "must be at least 2",
            ));
        }
        self.lora.config().validate().map_err(|e| match e {
            crate::lora::LoraError::Config { field, message } => {
                spec_err(&format!("lora.{field}"), message)
            }
            other => spec_err("lora", other.to_string()),
        })?;
        if let Some(q) = self.quantization.config() {
            q.validate()
                .map_err(|e| spec_err("quantization.block_size", e.to_string()))?;
        }
        if self.checkpoint_every == Some(0) {
            return Err(spec_err("checkpoint_every", "must be at least 1"));
        }
        if self.eval_every == Some(0) {
            return Err(spec_err("eval_every", "must be at least 1"));
        }
        if self.keep_checkpoints == 0 {
            return Err(spec_err("keep_checkpoints", "must be at least 1"));
        }
        for t in &self.export.gguf {
            t.parse::<crate::export::GgufType>()
                .map_err(|e| spec_err("export.gguf", e.to_string()))?;
        }
        let cuda_ordinal = self
            .device
            .strip_prefix("cuda:")
            .map(|n| n.parse::<usize>().is_ok());
        if self.device != "cpu" && cuda_ordinal != Some(true) {
            return Err(spec_err(
                "device",
                format!("{:?}: expected cpu or cuda:N", self.device),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in_and_unknown_fields_are_rejected() {
        let s =
            JobSpec::from_json(r#"{"hyperparameters": {"learning_rate": 1e-3}, "lora": {"r": 8}}"#)
                .unwrap();
        assert_eq!(s.hyperparameters.learning_rate, 1e-3);
        assert_eq!(s.hyperparameters.batch_size, 4);
        assert_eq!(s.lora.r, 8);
        let e = JobSpec::from_json(r#"{"hyperparameters": {"lr": 1}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `lr`"), "{e}");
        let e = JobSpec::from_json(r#"{"lora": {"r": 0}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lora.r"), "{e}");
        let e = JobSpec::from_json(r#"{"quantization": {"block_size": 100}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("quantization.block_size"), "{e}");
        let e = JobSpec::from_json(r#"{"hyperparameters": {"lr_scheduler": "step"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("step"), "{e}");
    }
}
