//! Learning-rate schedules with linear warmup, as transformers' `get_*_schedule_with_warmup`.
//! Step k (0-based) of the optimizer uses `base_lr * factor(k)`.

use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(format!(
                "unknown lr_scheduler {other:?} (constant, linear, cosine)"
            )),
        }
    }
}

impl Schedule {
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => {
                ((total - step.min(total)) as f64 / (total - warmup).max(1) as f64).max(0.0)
            }
            Schedule::Cosine => {
                let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        assert_eq!(Schedule::Linear.factor(0, 2, 10), 0.0);
        assert_eq!(Schedule::Linear.factor(1, 2, 10), 0.5);
        assert_eq!(Schedule::Linear.factor(2, 2, 10), 1.0);
        assert_eq!(Schedule::Linear.factor(6, 2, 10), 0.5);
        assert_eq!(Schedule::Linear.factor(10, 2, 10), 0.0);
        assert!((Schedule::Cosine.factor(6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::Constant.factor(9, 0, 10), 1.0);
    }
}
