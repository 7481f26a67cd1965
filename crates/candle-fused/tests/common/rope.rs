//! Helpers of the RoPE suites (`rope.rs`, `rope_errors.rs`, `rope_table.rs`).

use candle_core::{DType, Tensor};
use candle_fused::ops::{RopeConfig, RopeLayout, RopeScaling, RopeTable};

use super::{rand, CPU};

pub const LAYOUTS: [RopeLayout; 2] = [RopeLayout::Bhtd, RopeLayout::Bthd];

/// A table for head dim `d`, rotary dim `rot`, θ = 10000.
pub fn table(
    d: usize,
    rot: usize,
    max_positions: usize,
    scaling: Option<RopeScaling>,
) -> RopeTable {
    let cfg = RopeConfig {
        rotary_dim: rot,
        scaling,
        ..RopeConfig::new(d, 10_000.0, max_positions)
    };
    RopeTable::new(&cfg, &CPU).unwrap()
}

/// x's dims in the layout's order.
pub fn dims(layout: RopeLayout, b: usize, h: usize, t: usize, d: usize) -> Vec<usize> {
    match layout {
        RopeLayout::Bhtd => vec![b, h, t, d],
        RopeLayout::Bthd => vec![b, t, h, d],
    }
}

/// Random positions in `0..max` of `shape` and `dtype` (u32 or i64).
pub fn positions(shape: &[usize], max: usize, dtype: DType) -> Tensor {
    rand(shape, 0.0, max as f64, DType::F64)
        .floor()
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A `yarn` scaling with transformers' defaults for the betas.
pub fn yarn(factor: f64, orig: usize) -> RopeScaling {
    RopeScaling::Yarn {
        factor,
        original_max_positions: orig,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: None,
        mscale_all_dim: None,
        attention_factor: None,
    }
}
