//! Direct preference optimization (Rafailov et al., 2023) as TRL's `DPOTrainer` computes it:
//! each answer's summed log-probability under the policy and under the reference (the model as
//! the run starts, computed once), the sigmoid loss over the pairs of a micro-batch, and TRL's
//! `rewards/*` and `logps/*` metrics. The loss is a function of a few numbers per pair, so it
//! and its gradient are computed on the host; the gradient flows back into the model through
//! the log-probabilities (`CausalLm::sequence_logps_packed`).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{EvalResult, Result, TrainError};
use crate::data::batch::collate_packed;
use crate::data::Example;
use crate::model::llama::CausalLm;

/// The DPO objective's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpoConfig {
    /// How far the policy may move from the reference: the log-ratio's scale in the sigmoid.
    pub beta: f64,
    /// The probability that a pair's preference is flipped (conservative DPO): the loss becomes
    /// `-(1-ε)·log σ(βΔ) - ε·log σ(-βΔ)`. 0 is TRL's `sigmoid` loss.
    pub label_smoothing: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            beta: 0.1,
            label_smoothing: 0.0,
        }
    }
}

/// The reference log-probabilities of each pair's answers, index for index with the pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    pub chosen: Vec<f32>,
    pub rejected: Vec<f32>,
}

/// The references of a run: the training pairs', and the validation pairs' when there are any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct References {
    pub train: Reference,
    pub eval: Option<Reference>,
}

/// TRL's per-step preference metrics, under TRL's names: means over the pairs of a
/// micro-batch, then over the step's micro-batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PreferenceMetrics {
    /// β · (log π(y_w|x) − log π_ref(y_w|x)).
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f32,
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f32,
    /// The share of pairs whose chosen reward is above the rejected one.
    #[serde(rename = "rewards/accuracies")]
    pub rewards_accuracies: f32,
    #[serde(rename = "rewards/margins")]
    pub rewards_margins: f32,
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f32,
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f32,
}

impl PreferenceMetrics {
    /// The mean of several micro-batches' metrics, as TRL averages them over a logging step.
    pub fn mean(list: &[PreferenceMetrics]) -> PreferenceMetrics {
        let n = list.len().max(1) as f32;
        let sum = |f: fn(&PreferenceMetrics) -> f32| list.iter().map(f).sum::<f32>() / n;
        PreferenceMetrics {
            rewards_chosen: sum(|m| m.rewards_chosen),
            rewards_rejected: sum(|m| m.rewards_rejected),
            rewards_accuracies: sum(|m| m.rewards_accuracies),
            rewards_margins: sum(|m| m.rewards_margins),
            logps_chosen: sum(|m| m.logps_chosen),
            logps_rejected: sum(|m| m.logps_rejected),
        }
    }

    /// The metrics as JSON fields (`rewards/chosen`, ...), with `prefix` before each name.
    pub fn fields(&self, prefix: &str) -> serde_json::Map<String, serde_json::Value> {
        let serde_json::Value::Object(m) = serde_json::to_value(self).expect("plain numbers")
        else {
            unreachable!("a struct serializes as an object")
        };
        m.into_iter()
            .map(|(k, v)| (format!("{prefix}{k}"), v))
            .collect()
    }
}

/// The loss of a micro-batch of pairs and its gradient with respect to each answer's
/// log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct PairLoss {
    /// The mean over the pairs.
    pub loss: f64,
    pub grad_chosen: Vec<f64>,
    pub grad_rejected: Vec<f64>,
    pub metrics: PreferenceMetrics,
}

/// `log σ(x)`, without overflow for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    -(((-x).max(0.0)) + (-x.abs()).exp().ln_1p())
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The DPO loss of `k` pairs from the policy's and the reference's log-probabilities of each
/// chosen and rejected answer: `mean(-(1-ε)·log σ(βΔ) - ε·log σ(-βΔ))` with
/// `Δ = (π_w − ref_w) − (π_l − ref_l)`, and its gradient.
pub fn pair_loss(
    cfg: &DpoConfig,
    chosen: &[f32],
    rejected: &[f32],
    ref_chosen: &[f32],
    ref_rejected: &[f32],
) -> PairLoss {
    let k = chosen.len();
    let (beta, eps) = (cfg.beta, cfg.label_smoothing);
    let mut loss = 0f64;
    let (mut grad_chosen, mut grad_rejected) = (Vec::with_capacity(k), Vec::with_capacity(k));
    let mut m = PreferenceMetrics::default();
    for i in 0..k {
        let (lc, lr) = (chosen[i] - ref_chosen[i], rejected[i] - ref_rejected[i]);
        let z = beta * (lc as f64 - lr as f64);
        loss += -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
        // d/dz: -(1-ε)·σ(-z) + ε·σ(z); dz/dπ_w = β, dz/dπ_l = -β.
        let dz = (-(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z)) / k as f64;
        grad_chosen.push(beta * dz);
        grad_rejected.push(-beta * dz);
        // The metrics in f32, as TRL computes them.
        let (rc, rr) = (beta as f32 * lc, beta as f32 * lr);
        m.rewards_chosen += rc;
        m.rewards_rejected += rr;
        m.rewards_accuracies += (rc > rr) as u8 as f32;
        m.rewards_margins += rc - rr;
        m.logps_chosen += chosen[i];
        m.logps_rejected += rejected[i];
    }
    let n = k.max(1) as f32;
    let metrics = PreferenceMetrics {
        rewards_chosen: m.rewards_chosen / n,
        rewards_rejected: m.rewards_rejected / n,
        rewards_accuracies: m.rewards_accuracies / n,
        rewards_margins: m.rewards_margins / n,
        logps_chosen: m.logps_chosen / n,
        logps_rejected: m.logps_rejected / n,
    };
    PairLoss {
        loss: loss / k.max(1) as f64,
        grad_chosen,
        grad_rejected,
        metrics,
    }
}

/// The summed answer log-probabilities of the pairs `idx` in one row (every chosen side, then
/// every rejected side): f32 `[2k]`, with a backward. Also the row's tokens.
pub fn pair_logps(
    model: &CausalLm,
    chosen: &[Example],
    rejected: &[Example],
    idx: &[usize],
) -> Result<(Tensor, usize)> {
    let sides: Vec<&Example> = idx
        .iter()
        .map(|&i| &chosen[i])
        .chain(idx.iter().map(|&i| &rejected[i]))
        .collect();
    let batch = collate_packed(&sides, model.device())?;
    // No dropout: TRL's DPOTrainer turns it off (disable_dropout), so the reference and the
    // policy see the same network.
    let logps =
        model.sequence_logps_packed(&batch.input_ids, &batch.lengths, &batch.labels, None)?;
    Ok((logps, batch.tokens))
}

/// One micro-batch: the loss's value, a tensor whose gradient is the loss's (the answers'
/// log-probabilities weighted by the loss's gradient with respect to them), the metrics and the
/// tokens.
pub struct MicroBatch {
    pub loss: f64,
    pub objective: Tensor,
    pub metrics: PreferenceMetrics,
    pub tokens: usize,
}

/// The pairs of one data set with their references.
#[derive(Clone, Copy)]
pub struct PairSet<'a> {
    pub chosen: &'a [Example],
    pub rejected: &'a [Example],
    pub reference: &'a Reference,
}

impl PairSet<'_> {
    /// Forward and loss of the pairs `idx`.
    pub fn micro_batch(
        &self,
        model: &CausalLm,
        cfg: &DpoConfig,
        idx: &[usize],
    ) -> Result<MicroBatch> {
        let (logps, tokens) = pair_logps(model, self.chosen, self.rejected, idx)?;
        let values: Vec<f32> = logps.detach().to_dtype(DType::F32)?.to_vec1()?;
        let k = idx.len();
        let pick = |r: &[f32]| idx.iter().map(|&i| r[i]).collect::<Vec<f32>>();
        let out = pair_loss(
            cfg,
            &values[..k],
            &values[k..],
            &pick(&self.reference.chosen),
            &pick(&self.reference.rejected),
        );
        let grad: Vec<f32> = out
            .grad_chosen
            .iter()
            .chain(&out.grad_rejected)
            .map(|&g| g as f32)
            .collect();
        let grad = Tensor::from_vec(grad, 2 * k, model.device())?;
        let objective = (logps * grad)?.sum_all()?;
        Ok(MicroBatch {
            loss: out.loss,
            objective,
            metrics: out.metrics,
            tokens,
        })
    }

    /// The mean loss and metrics over all pairs (in micro-batches of `batch_size`, without a
    /// gradient); `accuracy` is `rewards/accuracies`.
    pub fn evaluate(
        &self,
        model: &CausalLm,
        cfg: &DpoConfig,
        batch_size: usize,
    ) -> Result<(EvalResult, PreferenceMetrics)> {
        let batches = in_order(self.chosen.len(), batch_size);
        let (c, r, tokens) = answer_logps(model, self.chosen, self.rejected, &batches)?;
        let out = pair_loss(
            cfg,
            &c,
            &r,
            &self.reference.chosen,
            &self.reference.rejected,
        );
        let result = EvalResult {
            loss: out.loss as f32,
            accuracy: out.metrics.rewards_accuracies,
            tokens,
        };
        Ok((result, out.metrics))
    }
}

/// Every pair's chosen and rejected log-probabilities, computed in the micro-batches `batches`
/// (which cover every pair once), and the tokens seen.
fn answer_logps(
    model: &CausalLm,
    chosen: &[Example],
    rejected: &[Example],
    batches: &[Vec<usize>],
) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    let n = chosen.len();
    let (mut c, mut r, mut tokens) = (vec![f32::NAN; n], vec![f32::NAN; n], 0);
    for idx in batches {
        let (logps, t) = pair_logps(model, chosen, rejected, idx)?;
        let values: Vec<f32> = logps.detach().to_dtype(DType::F32)?.to_vec1()?;
        for (j, &i) in idx.iter().enumerate() {
            c[i] = values[j];
            r[i] = values[idx.len() + j];
        }
        tokens += t;
    }
    Ok((c, r, tokens))
}

/// The reference log-probabilities of every pair under `model` as it is now (the starting
/// model), in the micro-batches `batches` (which must cover every pair once). Computed in the
/// same micro-batches as the first epoch trains, the first step sees a policy equal to its
/// reference to the bit.
pub fn reference_logps(
    model: &CausalLm,
    chosen: &[Example],
    rejected: &[Example],
    batches: &[Vec<usize>],
) -> Result<Reference> {
    let (c, r, _) = answer_logps(model, chosen, rejected, batches)?;
    if let Some(i) = c
        .iter()
        .zip(&r)
        .position(|(a, b)| !(a.is_finite() && b.is_finite()))
    {
        return Err(TrainError::Spec {
            field: "training_file".into(),
            message: format!("pair {i}: its reference log-probability is not finite"),
        });
    }
    Ok(Reference {
        chosen: c,
        rejected: r,
    })
}

/// Micro-batches of `batch_size` pairs in order, for evaluation and the validation reference.
pub fn in_order(n: usize, batch_size: usize) -> Vec<Vec<usize>> {
    (0..n)
        .step_by(batch_size.max(1))
        .map(|s| (s..n.min(s + batch_size.max(1))).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written gradient is the loss's: central differences in every log-probability,
    /// with and without label smoothing, at margins from very negative to very positive.
    #[test]
    fn pair_loss_gradient_matches_finite_differences() {
        let chosen = [-12.5f32, -3.0, -40.0, -7.25];
        let rejected = [-11.0f32, -9.5, -2.0, -7.25];
        let ref_chosen = [-12.0f32, -6.0, -30.0, -8.0];
        let ref_rejected = [-12.0f32, -6.0, -30.0, -6.0];
        for eps in [0.0, 0.2] {
            let cfg = DpoConfig {
                beta: 0.5,
                label_smoothing: eps,
            };
            let out = pair_loss(&cfg, &chosen, &rejected, &ref_chosen, &ref_rejected);
            // A power of two, so that every bumped value is exact in f32.
            let h = 1.0 / 64.0f32;
            for i in 0..chosen.len() {
                for side in 0..2 {
                    let bump = |d: f32| {
                        let (mut c, mut r) = (chosen, rejected);
                        if side == 0 {
                            c[i] += d
                        } else {
                            r[i] += d
                        }
                        pair_loss(&cfg, &c, &r, &ref_chosen, &ref_rejected).loss
                    };
                    let numeric = (bump(h) - bump(-h)) / (2.0 * h as f64);
                    let analytic = if side == 0 {
                        out.grad_chosen[i]
                    } else {
                        out.grad_rejected[i]
                    };
                    assert!(
                        (numeric - analytic).abs() <= 1e-6 + 1e-4 * analytic.abs(),
                        "eps {eps} pair {i} side {side}: {numeric} vs {analytic}"
                    );
                }
            }
        }
    }

    /// At the reference the loss is log 2 and every reward 0; label smoothing is the flipped
    /// pair's weight; huge margins neither overflow nor lose the gradient's sign.
    #[test]
    fn pair_loss_values() {
        let cfg = DpoConfig::default();
        let at_ref = pair_loss(
            &cfg,
            &[-5.0, -9.0],
            &[-4.0, -1.0],
            &[-5.0, -9.0],
            &[-4.0, -1.0],
        );
        assert!((at_ref.loss - std::f64::consts::LN_2).abs() < 1e-12);
        assert_eq!(at_ref.metrics.rewards_accuracies, 0.0);
        assert_eq!(at_ref.metrics.rewards_margins, 0.0);
        assert_eq!(at_ref.metrics.logps_chosen, -7.0);
        let far = pair_loss(&cfg, &[-1e4], &[0.0], &[0.0], &[0.0]);
        assert!((far.loss - 1000.0).abs() < 1e-9, "{}", far.loss);
        assert!(far.grad_chosen[0] < 0.0 && far.grad_rejected[0] > 0.0);
        let smooth = DpoConfig {
            beta: 1.0,
            label_smoothing: 0.25,
        };
        let z: f64 = 2.0;
        let out = pair_loss(&smooth, &[2.0], &[0.0], &[0.0], &[0.0]);
        let expect = -0.75 * (1.0 / (1.0 + (-z).exp())).ln() - 0.25 * (1.0 / (1.0 + z.exp())).ln();
        assert!((out.loss - expect).abs() < 1e-12);
        assert_eq!(out.metrics.rewards_accuracies, 1.0);
    }
}
