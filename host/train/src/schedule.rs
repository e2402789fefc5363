//! Learning-rate schedules with linear warmup, matching transformers' `get_*_schedule_with_warmup`:
//! the rate used by optimizer step `s` (0-based) is `lr · factor(s)`.

use serde::{Deserialize, Serialize};

/// The shape after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Half a cosine from `lr` to 0 at the last step.
    #[default]
    Cosine,
    /// Straight line from `lr` to 0 at the last step.
    Linear,
    /// `lr` throughout.
    Constant,
}

/// Warmup plus decay over a known number of optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Decay shape.
    pub kind: ScheduleKind,
    /// Warmup steps (`lr · s / warmup` while `s < warmup`).
    pub warmup: usize,
    /// Total optimizer steps.
    pub total: usize,
}

impl LrSchedule {
    /// The multiplier of `lr` at step `s`.
    pub fn factor(&self, s: usize) -> f64 {
        let (s, w, t) = (s as f64, self.warmup as f64, self.total as f64);
        if s < w {
            return s / w.max(1.0);
        }
        let progress = (s - w) / (t - w).max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate at step `s`.
    pub fn at(&self, s: usize) -> f64 {
        self.lr * self.factor(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_zero() {
        let s = LrSchedule {
            lr: 1.0,
            kind: ScheduleKind::Cosine,
            warmup: 2,
            total: 10,
        };
        assert_eq!(s.at(0), 0.0);
        assert_eq!(s.at(1), 0.5);
        assert_eq!(s.at(2), 1.0);
        assert!((s.at(6) - 0.5).abs() < 1e-12);
        assert!(s.at(10).abs() < 1e-12);
        let l = LrSchedule {
            kind: ScheduleKind::Linear,
            ..s
        };
        assert!((l.at(6) - 0.5).abs() < 1e-12);
    }
}
