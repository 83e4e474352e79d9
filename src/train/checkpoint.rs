//! Training checkpoints: `checkpoint-<step>/` holds the adapter (PEFT format), the optimizer
//! moments (`optimizer.safetensors`) and `trainer_state.json` (step, data position, RNG), so a
//! resumed run continues exactly as the uninterrupted one would have.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::adamw8bit::State8;
use super::optim::{Moments, Optimizer};
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
/// f32 moments are `exp_avg.<name>` and `exp_avg_sq.<name>`; 8-bit ones `state1.<name>`,
/// `state2.<name>` (u8 codes) with `absmax1.<name>` and `absmax2.<name>`, bitsandbytes' names.
pub fn write_state(
    dir: &Path,
    state: &TrainState,
    names: &[String],
    optimizer: &Optimizer,
) -> Result<()> {
    let mut bytes: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let put_moments = |bytes: &mut Vec<_>, name: &str, m: &Moments| {
        for (kind, v) in [("exp_avg", &m.exp_avg), ("exp_avg_sq", &m.exp_avg_sq)] {
            bytes.push((
                format!("{kind}.{name}"),
                safetensors::Dtype::F32,
                vec![v.len()],
                f32s(v),
            ));
        }
    };
    match optimizer {
        Optimizer::Torch(o) => {
            for (name, m) in names.iter().zip(o.moments()?.iter()) {
                put_moments(&mut bytes, name, m);
            }
        }
        Optimizer::Bnb8bit(o) => {
            for (name, st) in names.iter().zip(o.states()) {
                match st {
                    State8::Full(m) => put_moments(&mut bytes, name, m),
                    State8::Blockwise {
                        m,
                        v,
                        absmax_m,
                        absmax_v,
                    } => {
                        for (kind, codes) in [("state1", m), ("state2", v)] {
                            let t = (format!("{kind}.{name}"), safetensors::Dtype::U8);
                            bytes.push((t.0, t.1, vec![codes.len()], codes.clone()));
                        }
                        for (kind, a) in [("absmax1", absmax_m), ("absmax2", absmax_v)] {
                            let t = (format!("{kind}.{name}"), safetensors::Dtype::F32);
                            bytes.push((t.0, t.1, vec![a.len()], f32s(a)));
                        }
                    }
                }
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, dt, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), b).expect("sizes agree"),
            )
        })
        .collect();
    let meta: HashMap<String, String> = [
        ("optimizer_step".to_string(), optimizer.steps().to_string()),
        (
            "optimizer".to_string(),
            optimizer.kind().as_str().to_string(),
        ),
    ]
    .into();
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

/// Read the trainer state and restore the optimizer's state for `names` (in order).
pub fn read_state(dir: &Path, names: &[String], optimizer: &mut Optimizer) -> Result<TrainState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read(&path).map_err(io_err(&path))?;
    let state: TrainState = serde_json::from_slice(&text).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        message: format!("unreadable: {e}"),
    })?;
    let path = dir.join(OPTIMIZER_FILE);
    let bad = |message: String| TrainError::Checkpoint {
        path: path.clone(),
        message,
    };
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let step = meta
        .get("optimizer_step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no optimizer_step".into()))?;
    // Checkpoints from before 8-bit moments name no optimizer: they are AdamW's.
    let written = meta.get("optimizer").map_or("adamw_torch", |s| s.as_str());
    if written != optimizer.kind().as_str() {
        return Err(bad(format!(
            "written by optimizer {written}; this run trains with {} (hyperparameters.optimizer)",
            optimizer.kind().as_str()
        )));
    }
    let read = |key: String, elems: usize, dtype: safetensors::Dtype| -> Result<Vec<u8>> {
        let t = st.tensor(&key).map_err(|_| {
            bad(format!(
                "{key} is missing (was the checkpoint made with another LoRA config?)"
            ))
        })?;
        if t.dtype() != dtype || t.data().len() * 8 != elems * dtype.bitsize() {
            return Err(bad(format!("{key} has the wrong size")));
        }
        Ok(t.data().to_vec())
    };
    let read_f32 = |key: String, elems: usize| -> Result<Vec<f32>> {
        Ok(bytemuck::pod_collect_to_vec(&read(
            key,
            elems,
            safetensors::Dtype::F32,
        )?))
    };
    let read_moments = |name: &str, n: usize| -> Result<Moments> {
        Ok(Moments {
            exp_avg: read_f32(format!("exp_avg.{name}"), n)?,
            exp_avg_sq: read_f32(format!("exp_avg_sq.{name}"), n)?,
        })
    };
    match optimizer {
        Optimizer::Torch(o) => {
            let sizes: Vec<usize> = o.moments()?.iter().map(|m| m.exp_avg.len()).collect();
            let moments = names
                .iter()
                .zip(&sizes)
                .map(|(name, &n)| read_moments(name, n))
                .collect::<Result<Vec<_>>>()?;
            o.set_moments(moments, step);
        }
        Optimizer::Bnb8bit(o) => {
            let mut states = Vec::with_capacity(names.len());
            for (name, st) in names.iter().zip(o.states()) {
                let n = st.len();
                states.push(match st {
                    State8::Full(_) => State8::Full(read_moments(name, n)?),
                    State8::Blockwise { absmax_m, .. } => {
                        let blocks = absmax_m.len();
                        State8::Blockwise {
                            m: read(format!("state1.{name}"), n, safetensors::Dtype::U8)?,
                            v: read(format!("state2.{name}"), n, safetensors::Dtype::U8)?,
                            absmax_m: read_f32(format!("absmax1.{name}"), blocks)?,
                            absmax_v: read_f32(format!("absmax2.{name}"), blocks)?,
                        }
                    }
                });
            }
            o.set_states(states, step);
        }
    }
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
