//! The models the service answers with: a `model` name resolved to a base and an adapter (a
//! succeeded job's `fine_tuned_model` or a checkpoint's, only for the key that owns the job),
//! engines loaded on first use and kept (at most `inference.max_models`, the least recently
//! used dropped), every load and generation on a blocking thread.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{FineTuned, Scope, Service};
use crate::config::InferenceConfig;
use crate::infer::{Engine, InferError};
use crate::model::llama::LoadOptions;

/// Why a model cannot answer.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// No base of that name, or a fine-tuned model this key cannot see.
    #[error("model {0:?} does not exist")]
    UnknownModel(String),
    #[error(transparent)]
    Infer(#[from] InferError),
    /// A thread that loads or generates did not come back.
    #[error("{0}")]
    Internal(String),
}

/// What a request's `model` names.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The base model's file or directory.
    pub base: PathBuf,
    pub adapter: Option<PathBuf>,
}

/// Loaded engines by base path, most recently used last.
pub struct Inference {
    config: InferenceConfig,
    engines: tokio::sync::Mutex<Vec<(PathBuf, Arc<Mutex<Engine>>)>>,
}

impl Inference {
    pub fn new(config: &InferenceConfig) -> Inference {
        Inference {
            config: config.clone(),
            engines: tokio::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn config(&self) -> &InferenceConfig {
        &self.config
    }

    /// How a base loads for generation.
    fn load_options(&self) -> Result<LoadOptions, ServeError> {
        let bad = |m: String| ServeError::Internal(format!("inference config: {m}"));
        let device = crate::model::parse_device(&self.config.device).map_err(bad)?;
        let quant = match self.config.quantization.as_str() {
            "none" => None,
            q => {
                let quant_type = match q {
                    "nf4" => crate::quant::QuantType::Nf4,
                    "fp4" => crate::quant::QuantType::Fp4,
                    other => {
                        return Err(bad(format!(
                            "quantization {other:?} is not nf4, fp4 or none"
                        )))
                    }
                };
                Some(crate::quant::QuantConfig {
                    quant_type,
                    block_size: 64,
                    double_quant: true,
                })
            }
        };
        let dtype = if device.is_cuda() {
            candle_core::DType::BF16
        } else {
            candle_core::DType::F32
        };
        Ok(LoadOptions {
            quant,
            dtype,
            device,
            gradient_checkpointing: false,
        })
    }

    /// The engine of base `dir`, loading it (and dropping the least recently used one when
    /// `max_models` are loaded).
    pub async fn engine(&self, dir: PathBuf) -> Result<Arc<Mutex<Engine>>, ServeError> {
        let mut engines = self.engines.lock().await;
        if let Some(i) = engines.iter().position(|(p, _)| *p == dir) {
            let entry = engines.remove(i);
            let engine = entry.1.clone();
            engines.push(entry);
            return Ok(engine);
        }
        let opts = self.load_options()?;
        let max_adapters = self.config.max_adapters;
        let path = dir.clone();
        let engine = tokio::task::spawn_blocking(move || Engine::load(&path, &opts, max_adapters))
            .await
            .map_err(|e| ServeError::Internal(format!("loading the model: {e}")))??;
        if engines.len() >= self.config.max_models.max(1) {
            engines.remove(0);
        }
        let engine = Arc::new(Mutex::new(engine));
        engines.push((dir, engine.clone()));
        Ok(engine)
    }
}

impl Service {
    /// Resolve a request's `model`: a base in the model roots, or a fine-tuned model (a job's or
    /// a checkpoint's) of a job `scope` can see.
    pub async fn inference_target(
        &self,
        model: &str,
        scope: Scope<'_>,
    ) -> Result<Target, ServeError> {
        let unknown = || ServeError::UnknownModel(model.to_string());
        let (base, adapter) = if FineTuned::parse(model).is_some() {
            let src = self
                .model_source(model, scope)
                .await
                .map_err(|_| unknown())?;
            (src.base, src.adapter)
        } else {
            (model.to_string(), None)
        };
        let base = self.layout.model(&base).ok_or_else(unknown)?;
        Ok(Target { base, adapter })
    }

    /// The fine-tuned models `scope` can use: every succeeded job's, newest first, with the
    /// time its job finished.
    pub async fn fine_tuned_models(
        &self,
        scope: Scope<'_>,
    ) -> Result<Vec<(String, i64)>, super::JobsError> {
        let jobs = self
            .store
            .jobs_where(
                Some(super::Status::Succeeded),
                &super::store::MetadataFilter::Any,
                None,
                i64::MAX,
                scope,
            )
            .await?;
        Ok(jobs
            .iter()
            .map(|j| {
                (
                    super::fine_tuned_name(j),
                    j.finished_at.unwrap_or(j.created_at),
                )
            })
            .collect())
    }
}
