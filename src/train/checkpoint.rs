//! Training checkpoints: `checkpoint-<step>/` holds the adapter (PEFT format), the optimizer
//! moments (`optimizer.safetensors`) and `trainer_state.json` (step, data position, RNG), so a
//! resumed run continues exactly as the uninterrupted one would have.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::optim::{AdamW, Moments};
use super::{io_err, Result, TrainError};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Where training stands; everything needed to continue besides weights and moments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    pub total_steps: usize,
    /// Position of the next micro-batch: epoch and index within it.
    pub epoch: usize,
    pub batch_in_epoch: usize,
    /// Dropout RNG state.
    pub rng_state: u64,
    pub tokens_seen: usize,
    /// What the data order depends on; a resume with different values is refused.
    pub examples: usize,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub seed: u64,
    pub last_loss: Option<f32>,
    /// The lowest validation loss so far and its step (early stopping, the best adapter).
    #[serde(default)]
    pub best_eval: Option<(usize, f32)>,
    /// Evaluations since `best_eval` improved.
    #[serde(default)]
    pub evals_since_best: usize,
}

pub fn checkpoint_dir(out: &Path, step: usize) -> PathBuf {
    out.join(format!("checkpoint-{step}"))
}

/// Checkpoint directories under `out`, oldest first.
pub fn list(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join(STATE_FILE).exists().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

pub fn latest(out: &Path) -> Option<PathBuf> {
    list(out).pop().map(|(_, p)| p)
}

/// Write the optimizer state and trainer state into `dir` (the adapter is written beside).
pub fn write_state(
    dir: &Path,
    state: &TrainState,
    names: &[String],
    optimizer: &AdamW,
) -> Result<()> {
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let moments = optimizer.moments()?;
    for (name, m) in names.iter().zip(moments.iter()) {
        for (kind, v) in [("exp_avg", &m.exp_avg), ("exp_avg_sq", &m.exp_avg_sq)] {
            bytes.push((
                format!("{kind}.{name}"),
                vec![v.len()],
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .expect("sizes agree"),
            )
        })
        .collect();
    let meta: HashMap<String, String> =
        [("optimizer_step".to_string(), optimizer.step.to_string())].into();
    let path = dir.join(OPTIMIZER_FILE);
    safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| {
        TrainError::Checkpoint {
            path: path.clone(),
            message: e.to_string(),
        }
    })?;
    let path = dir.join(STATE_FILE);
    let text = serde_json::to_string_pretty(state).expect("state serializes") + "\n";
    std::fs::write(&path, text).map_err(io_err(&path))
}

/// Read the trainer state and restore the optimizer's moments for `names` (in order).
pub fn read_state(dir: &Path, names: &[String], optimizer: &mut AdamW) -> Result<TrainState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read(&path).map_err(io_err(&path))?;
    let state: TrainState = serde_json::from_slice(&text).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        message: format!("unreadable: {e}"),
    })?;
    let path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| TrainError::Checkpoint {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("optimizer_step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| TrainError::Checkpoint {
            path: path.clone(),
            message: "no optimizer_step".into(),
        })?;
    let mut moments = Vec::with_capacity(names.len());
    let sizes: Vec<usize> = optimizer
        .moments()?
        .iter()
        .map(|m| m.exp_avg.len())
        .collect();
    for (name, &size) in names.iter().zip(&sizes) {
        let read = |kind: &str| -> Result<Vec<f32>> {
            let key = format!("{kind}.{name}");
            let t = st.tensor(&key).map_err(|_| TrainError::Checkpoint {
                path: path.clone(),
                message: format!(
                    "{key} is missing (was the checkpoint made with another LoRA config?)"
                ),
            })?;
            let v: Vec<f32> = bytemuck::pod_collect_to_vec(t.data());
            if v.len() != size {
                return Err(TrainError::Checkpoint {
                    path: path.clone(),
                    message: format!("{key} has the wrong size"),
                });
            }
            Ok(v)
        };
        moments.push(Moments {
            exp_avg: read("exp_avg")?,
            exp_avg_sq: read("exp_avg_sq")?,
        });
    }
    optimizer.set_moments(moments, step);
    Ok(state)
}

/// Remove all but the newest `keep` checkpoints.
pub fn prune(out: &Path, keep: usize) -> Result<()> {
    let all = list(out);
    for (_, p) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(p).map_err(io_err(p))?;
    }
    Ok(())
}
