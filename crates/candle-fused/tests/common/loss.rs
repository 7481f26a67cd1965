//! Helpers of the loss suites (cross-entropy, linear cross-entropy): a seed per test from the
//! run's seed, random targets with ignored entries, and the option sets.

use candle_core::{DType, Tensor};
use candle_fused::ops::{CrossEntropyConfig, Reduction};

use super::{SeededRng, CPU};

/// The seed of test `test`: drawn from the run's seed (`candle_fused_testkit::rng`: fresh each
/// run, `CANDLE_FUSED_SEED` fixes it, printed with every failure), the same for the same run
/// seed and test.
pub fn fresh_seed(test: &str) -> u64 {
    candle_fused_testkit::rng::Rng::stream(test).next_u64()
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
/// The loss's rounding floor (absolute): the loss is a sum of row terms like `lse − z_t`
/// computed from f32 values of magnitude up to `max|z|`, so a tiny loss (V = 1 with only the
/// z-loss, or nearly one-hot rows) cancels to a few f32 ulps of those magnitudes;
/// `4·ε_f32·(1 + 2λ·max|z|)·Σ_rows max|z|` (times the reduction's scale). `logits` `[.., V]`
/// (any float dtype), `targets` its leading shape.
pub fn loss_floor(logits: &Tensor, targets: &Tensor, cfg: &CrossEntropyConfig) -> f64 {
    let d = logits.dims().last().copied().unwrap_or(1).max(1);
    let xv = super::vec64(logits);
    let row_max: Vec<f64> = xv
        .chunks(d)
        .map(|r| r.iter().fold(0f64, |m, v| m.max(v.abs())))
        .collect();
    let zmax = row_max.iter().fold(0f64, |m, &v| m.max(v));
    let counted = super::vec64(&targets.to_dtype(DType::F64).unwrap())
        .iter()
        .filter(|&&v| v as i64 != cfg.ignore_index && v >= 0.0)
        .count()
        .max(1);
    let scale = match cfg.reduction {
        Reduction::Mean => 1.0 / counted as f64,
        _ => 1.0,
    };
    4.0 * f32::EPSILON as f64
        * (1.0 + 2.0 * cfg.z_loss * zmax)
        * row_max.iter().sum::<f64>()
        * scale
}

pub fn loss_tol(dt: DType) -> f64 {
    match dt {
        DType::F64 => 1e-6,
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}
