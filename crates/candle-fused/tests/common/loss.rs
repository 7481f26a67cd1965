//! Helpers of the loss suites (cross-entropy, linear cross-entropy): a fresh seed per test,
//! printed so a failure can be rerun, random targets with ignored entries, and the option sets.

use candle_core::{DType, Tensor};
use candle_fused::ops::{CrossEntropyConfig, Reduction};

use super::{SeededRng, CPU};

/// A fresh seed (from the clock), or `CANDLE_FUSED_SEED` when set; printed (the harness shows
/// it when the test fails).
pub fn fresh_seed(test: &str) -> u64 {
    let seed = std::env::var("CANDLE_FUSED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            t ^ (std::process::id() as u64).rotate_left(32)
        });
    eprintln!("{test}: seed {seed} (rerun with CANDLE_FUSED_SEED={seed})");
    seed
}

impl SeededRng {
    /// Classes in `0..v` (i64, shape `rows`), each replaced by `ignore` with probability
    /// `p_ignore`.
    pub fn targets(&mut self, rows: &[usize], v: usize, p_ignore: f64, ignore: i64) -> Tensor {
        let n: usize = rows.iter().product();
        let t: Vec<i64> = (0..n)
            .map(|_| {
                if self.uniform() < p_ignore {
                    ignore
                } else {
                    ((self.uniform() * v as f64) as i64).min(v as i64 - 1)
                }
            })
            .collect();
        Tensor::from_vec(t, rows, &CPU).unwrap()
    }
}

/// The option sets every suite runs: plain, label smoothing, soft-capping, z-loss, all of
/// them with Sum.
pub fn ce_configs() -> Vec<(&'static str, CrossEntropyConfig)> {
    let d = CrossEntropyConfig::default();
    vec![
        ("plain", d),
        (
            "smoothing",
            CrossEntropyConfig {
                label_smoothing: 0.1,
                ..d
            },
        ),
        (
            "softcap",
            CrossEntropyConfig {
                softcap: Some(5.0),
                ..d
            },
        ),
        ("z_loss", CrossEntropyConfig { z_loss: 1e-2, ..d }),
        (
            "all+sum",
            CrossEntropyConfig {
                reduction: Reduction::Sum,
                label_smoothing: 0.2,
                softcap: Some(3.0),
                z_loss: 1e-3,
                ..d
            },
        ),
    ]
}

/// The loss's tolerance: it is an f32 scalar for every dtype.
pub fn loss_tol(dt: DType) -> f64 {
    match dt {
        DType::F64 => 1e-6,
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}
