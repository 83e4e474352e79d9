//! The job spec: one JSON object for `qlorad train --spec` and `POST /jobs`. Every field but
//! `model` and `training_file` has a default; unknown fields are rejected.

use serde::{Deserialize, Serialize};

use crate::data::DataFormat;
use crate::lora::{LoraConfig, TargetModules};
use crate::quant::{QuantConfig, QuantType};
use crate::train::Hyperparameters;

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
    /// Sort examples by length within windows so similar lengths share a batch.
    pub group_by_length: bool,
    /// Pack examples into rows of `max_seq_len` tokens by best-fit decreasing, as TRL packs
    /// them: a micro-batch is `batch_size` rows, attention stays inside each example, and the
    /// loss is normalised over the label tokens of the whole step.
    pub packing: bool,
    /// Whether text and prompt/completion records start with BOS (`auto`: where the model's
    /// tokenizer adds it itself).
    pub bos: crate::data::encode::BosRule,
}

/// What the adapter learns from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodKind {
    /// Next-token prediction on the completions (the default).
    #[default]
    Supervised,
    /// Direct preference optimization on pairs of a preferred and a rejected answer, against
    /// the model as the job starts (the base, or the base with the adapter it continues).
    Dpo,
}

/// The training method: `{"type": "dpo", "beta": 0.1}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodSpec {
    #[serde(rename = "type")]
    pub kind: MethodKind,
    /// DPO: how far the policy may move from the reference (TRL's default 0.1).
    pub beta: f64,
    /// DPO: the probability that a pair's preference is flipped (conservative DPO); 0 is TRL's
    /// sigmoid loss.
    pub label_smoothing: f64,
}

impl Default for MethodSpec {
    fn default() -> Self {
        let d = crate::train::dpo::DpoConfig::default();
        MethodSpec {
            kind: MethodKind::Supervised,
            beta: d.beta,
            label_smoothing: d.label_smoothing,
        }
    }
}

impl MethodSpec {
    /// DPO's settings, for a DPO job.
    pub fn dpo(&self) -> Option<crate::train::dpo::DpoConfig> {
        (self.kind == MethodKind::Dpo).then_some(crate::train::dpo::DpoConfig {
            beta: self.beta,
            label_smoothing: self.label_smoothing,
        })
    }
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
    /// Supervised (the default) or DPO.
    pub method: MethodSpec,
    pub lora: LoraSpec,
    pub quantization: QuantizationSpec,
    pub data: DataSpec,
    /// Save a checkpoint every N optimizer steps (and always at the end).
    pub checkpoint_every: Option<usize>,
    /// Checkpoints to keep; older ones are deleted.
    pub keep_checkpoints: usize,
    /// Evaluate on the validation file every N steps (and at the end).
    pub eval_every: Option<usize>,
    /// Stop when the validation loss has not improved (by `min_delta`) for `patience`
    /// evaluations.
    pub early_stopping: Option<crate::train::trainer::EarlyStopping>,
    /// The adapter (and exports) of the lowest validation loss rather than the last step's.
    pub load_best: bool,
    /// Conversations the model answers (greedily, up to 64 tokens) at every evaluation and at
    /// the end, recorded as events: how the answers change as it trains.
    pub eval_prompts: Vec<Vec<crate::data::Message>>,
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
            method: MethodSpec::default(),
            lora: LoraSpec::default(),
            quantization: QuantizationSpec::default(),
            data: DataSpec::default(),
            checkpoint_every: None,
            keep_checkpoints: 3,
            eval_every: None,
            early_stopping: None,
            load_best: false,
            eval_prompts: Vec::new(),
            export: ExportSpec::default(),
            device: "cpu".into(),
            priority: 0,
        }
    }
}

/// A spec that cannot run, with the field at fault (`hyperparameters.max_steps`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("spec: field `{field}`: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            message: message.into(),
        }
    }
}

fn spec_err(field: &str, message: impl Into<String>) -> SpecError {
    SpecError::new(field, message)
}

/// A deserialization error with the path of the value at fault (`hyperparameters.max_steps`),
/// an unknown field by its own name, or `(json)` when the document itself is wrong.
fn type_err(e: serde_path_to_error::Error<serde_json::Error>) -> SpecError {
    let path = e.path().to_string();
    let message = e.into_inner().to_string();
    let field = if path.is_empty() || path == "." {
        "(json)".to_string()
    } else if message.starts_with("unknown field") {
        // The field at fault is the unknown one itself; the message lists the known ones.
        path.rsplit('.').next().unwrap_or(&path).to_string()
    } else {
        path
    };
    SpecError::new(&field, message)
}

impl JobSpec {
    /// Parse and validate; errors name the field.
    pub fn from_json(text: &str) -> Result<Self, SpecError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let spec: JobSpec = serde_path_to_error::deserialize(de).map_err(type_err)?;
        spec.validate()?;
        Ok(spec)
    }

    /// From a JSON value (a request body); validated, errors name the field.
    pub fn from_value(value: serde_json::Value) -> Result<Self, SpecError> {
        let spec: JobSpec = serde_path_to_error::deserialize(value).map_err(type_err)?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
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
        let m = &self.method;
        if !(m.beta.is_finite() && m.beta > 0.0) {
            return Err(spec_err("method.beta", "must be a positive number"));
        }
        if !(0.0..0.5).contains(&m.label_smoothing) {
            return Err(spec_err("method.label_smoothing", "must be in [0, 0.5)"));
        }
        if m.kind == MethodKind::Dpo && self.data.packing {
            return Err(spec_err(
                "data.packing",
                "is for supervised data: DPO keeps each pair's answers whole and lays a micro-batch's pairs end to end already",
            ));
        }
        if self.eval_prompts.len() > 16 {
            return Err(spec_err("eval_prompts", "at most 16 conversations"));
        }
        for (i, chat) in self.eval_prompts.iter().enumerate() {
            let last = chat.last().map(|m| m.role.as_str());
            if last.is_none() || last == Some("assistant") {
                return Err(spec_err(
                    &format!("eval_prompts[{i}]"),
                    "must be a conversation that ends with a user (or system) message",
                ));
            }
            if let Some(j) = chat
                .iter()
                .position(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant"))
            {
                return Err(spec_err(
                    &format!("eval_prompts[{i}][{j}].role"),
                    "must be system, user or assistant",
                ));
            }
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
        if let Some(e) = &self.early_stopping {
            if e.patience == 0 {
                return Err(spec_err("early_stopping.patience", "must be at least 1"));
            }
            if !(e.min_delta.is_finite() && e.min_delta >= 0.0) {
                return Err(spec_err(
                    "early_stopping.min_delta",
                    "must be a number >= 0",
                ));
            }
        }
        for (field, on) in [
            ("early_stopping", self.early_stopping.is_some()),
            ("load_best", self.load_best),
        ] {
            if on && self.eval_every.is_none() {
                return Err(spec_err(
                    field,
                    "needs eval_every (and a validation_file): it works on the validation loss",
                ));
            }
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

    #[test]
    fn type_errors_name_their_field() {
        let e = JobSpec::from_json(r#"{"hyperparameters": {"max_steps": -1}}"#).unwrap_err();
        assert_eq!(e.field, "hyperparameters.max_steps");
        assert!(e.message.contains("-1"), "{e}");
        let e = JobSpec::from_value(serde_json::json!({"lora": {"dropout": "high"}})).unwrap_err();
        assert_eq!(e.field, "lora.dropout");
        let e = JobSpec::from_json(r#"{"lora": {"rank": 8}}"#).unwrap_err();
        assert_eq!(e.field, "rank");
        let e = JobSpec::from_json("42").unwrap_err();
        assert_eq!(e.field, "(json)");
    }
}
