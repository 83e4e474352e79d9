//! LoRA adapters: configuration, the adapted linear layer, and the PEFT file format.

pub mod layer;
pub mod peft;

use serde::{Deserialize, Serialize};

pub use layer::{FrozenLinear, LoraAdapter, LoraLinear};

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("{path}: {message}")]
    Invalid {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON at line {line}, column {column}: {source}", line = source.line(), column = source.column())]
    Json {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("lora: field `{field}`: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, LoraError>;

/// Which linear layers get adapters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names (`q_proj`) or full paths (`model.layers.0.self_attn.q_proj`).
    Names(Vec<String>),
    /// `"all-linear"`: every linear layer of the decoder blocks (not `lm_head`), as PEFT.
    Keyword(String),
}

impl TargetModules {
    pub fn all_linear() -> Self {
        TargetModules::Keyword("all-linear".into())
    }

    /// Whether the module at `path` (e.g. `model.layers.3.mlp.up_proj`) is targeted.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            TargetModules::Keyword(_) => true,
            TargetModules::Names(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
        }
    }
}

/// LoRA hyperparameters, with PEFT's meanings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: usize,
    /// Scale numerator: the update is multiplied by `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    pub dropout: f64,
    pub target_modules: TargetModules,
    /// Rank-stabilized scaling `alpha / sqrt(r)`.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    /// r=16, alpha=32, dropout 0.05 on all linears: a common QLoRA setting for small budgets
    /// (the paper used r=64, alpha=16).
    fn default() -> Self {
        LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: TargetModules::all_linear(),
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(LoraError::Config {
                field: "r",
                message: "must be at least 1".into(),
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::Config {
                field: "dropout",
                message: "must be in [0, 1)".into(),
            });
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(LoraError::Config {
                field: "alpha",
                message: "must be a positive number".into(),
            });
        }
        if let TargetModules::Keyword(k) = &self.target_modules {
            if k != "all-linear" {
                return Err(LoraError::Config {
                    field: "target_modules",
                    message: format!("{k:?}: expected \"all-linear\" or a list of module names"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_names_and_paths() {
        let t = TargetModules::Names(vec!["q_proj".into(), "model.layers.1.mlp.up_proj".into()]);
        assert!(t.matches("model.layers.0.self_attn.q_proj"));
        assert!(t.matches("model.layers.1.mlp.up_proj"));
        assert!(!t.matches("model.layers.0.mlp.up_proj"));
        assert!(TargetModules::all_linear().matches("model.layers.0.mlp.down_proj"));
    }

    #[test]
    fn scale_and_validation() {
        let mut c = LoraConfig {
            r: 16,
            alpha: 32.0,
            use_rslora: false,
            ..Default::default()
        };
        assert_eq!(c.scale(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scale(), 8.0);
        c.r = 0;
        assert!(c.validate().unwrap_err().to_string().contains("`r`"));
    }
}
