//! The RoPE cos/sin table: inverse frequencies from `rope_theta` and the `rope_scaling` kinds
//! real checkpoints use (the formulas of Hugging Face transformers' `modeling_rope_utils`),
//! evaluated in f64 and stored as f32 `[max_positions, rotary_dim / 2]` tensors with the
//! attention scaling (YaRN's) folded in.
//!
//! With `dim = rotary_dim`, `i = 0..dim/2` and `θ = theta`:
//!
//! - default: `inv_freq[i] = θ^(−2i/dim)`, attention factor 1;
//! - `Linear { factor }`: `inv_freq / factor`;
//! - `Dynamic { factor, original_max_positions: L }` (NTK-aware): the default frequencies of
//!   the base `θ' = θ·(factor·S/L − (factor − 1))^(dim/(dim − 2))` with `S = max(max_positions,
//!   L)`. Transformers recomputes this for the current sequence length `S` (the largest
//!   position + 1); a table of `max_positions = S` rows is exactly its table for that length;
//! - `Llama3 { factor, low_freq_factor: lo, high_freq_factor: hi, original_max_positions: L }`:
//!   with `λ = 2π / inv_freq`, frequencies of `λ < L/hi` stay, those of `λ > L/lo` are divided
//!   by `factor`, and in between `(1 − s)·f/factor + s·f` with `s = (L/λ − lo)/(hi − lo)`;
//! - `Yarn { factor, original_max_positions: L, beta_fast, beta_slow, mscale, mscale_all_dim,
//!   attention_factor }`: with `corr(r) = dim·ln(L/(2π r)) / (2 ln θ)`,
//!   `low = max(⌊corr(beta_fast)⌋, 0)`, `high = min(⌈corr(beta_slow)⌉, dim − 1)` (transformers'
//!   default `truncate = true`), `ramp[i] = clamp((i − low)/(high − low), 0, 1)` (`high` nudged
//!   by 0.001 when equal) and `e = 1 − ramp`: `inv_freq = f/factor·(1 − e) + f·e`. The
//!   attention factor is `attention_factor` if given, else `m(factor, mscale)/m(factor,
//!   mscale_all_dim)` when both are given and non-zero, else `m(factor, 1)`, with
//!   `m(s, k) = 1` for `s <= 1` and `0.1·k·ln s + 1` otherwise. `factor` is used as given
//!   (transformers >= 4.56 replaces it by `max_position_embeddings / original_max_position_
//!   embeddings` when the config has the latter; pass that ratio to match those versions).
//!
//! The table holds `cos(p·inv_freq[i])·a` and `sin(p·inv_freq[i])·a` (`a`: the attention
//! factor), `p = 0..max_positions`. Transformers evaluates the same products in f32
//! (`inv_freq @ position_ids` in float32), so at position `p` its angles carry an error of
//! about `p·6e-8` rad; the table here is the exact value rounded once to f32.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Result, Tensor, TensorId};
use rayon::prelude::*;

use crate::validate::fail;

/// How many positions tensors a [`RopeTable`] remembers as range-checked on a GPU.
pub(crate) const CHECKED_IDS: usize = 16;

/// The `rope_scaling` kinds (Hugging Face `rope_type`), see the module doc for the formulas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `"linear"`: positions interpolated by `factor`.
    Linear { factor: f64 },
    /// `"dynamic"`: NTK-aware base scaling for sequences beyond `original_max_positions`.
    Dynamic {
        factor: f64,
        original_max_positions: usize,
    },
    /// `"llama3"` (Llama 3.1 / 3.2).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: usize,
    },
    /// `"yarn"` (Qwen2.5 long context, DeepSeek). Transformers' defaults: `beta_fast` 32,
    /// `beta_slow` 1.
    Yarn {
        factor: f64,
        original_max_positions: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
    },
}

/// What a [`RopeTable`] is built from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// The head dim `D` of the q/k tensors the table is applied to.
    pub head_dim: usize,
    /// Dims rotated (even, `<= head_dim`; transformers' `head_dim·partial_rotary_factor`);
    /// the rest of each head passes through unchanged.
    pub rotary_dim: usize,
    /// `rope_theta`.
    pub theta: f64,
    /// Rows of the table: positions `0..max_positions` (a larger position is an error).
    pub max_positions: usize,
    pub scaling: Option<RopeScaling>,
}

impl RopeConfig {
    /// Full rotary dim, no scaling.
    pub fn new(head_dim: usize, theta: f64, max_positions: usize) -> Self {
        Self {
            head_dim,
            rotary_dim: head_dim,
            theta,
            max_positions,
            scaling: None,
        }
    }

    /// Checks the configuration (each error names the field and the value).
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "rope_table";
        let (d, r) = (self.head_dim, self.rotary_dim);
        if r == 0 || r % 2 != 0 || r > d {
            fail!(
                OP,
                "rotary_dim must be even, > 0 and <= head_dim ({d}), got {r}"
            )
        }
        if !(self.theta.is_finite() && self.theta > 0.0) {
            fail!(OP, "theta must be a finite number > 0, got {}", self.theta)
        }
        if self.max_positions == 0 {
            fail!(OP, "max_positions must be > 0")
        }
        match (self.max_positions as u64).checked_mul(r as u64 / 2) {
            Some(n) if n <= i32::MAX as u64 && self.max_positions <= u32::MAX as usize => {}
            _ => fail!(
                OP,
                "a table of {} positions x {} frequencies is too large (at most 2^31 - 1 \
                 entries)",
                self.max_positions,
                r / 2
            ),
        }
        let pos = |name: &str, v: f64| -> Result<()> {
            if !(v.is_finite() && v > 0.0) {
                fail!(OP, "{name} must be a finite number > 0, got {v}")
            }
            Ok(())
        };
        let orig = |v: usize| -> Result<()> {
            if v == 0 {
                fail!(OP, "original_max_positions must be > 0")
            }
            Ok(())
        };
        match self.scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => pos("factor", factor)?,
            Some(RopeScaling::Dynamic {
                factor,
                original_max_positions,
            }) => {
                pos("factor", factor)?;
                orig(original_max_positions)?;
                if r <= 2 {
                    fail!(OP, "dynamic scaling needs rotary_dim > 2 (its exponent is dim/(dim - 2)), got {r}")
                }
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            }) => {
                pos("factor", factor)?;
                pos("low_freq_factor", low_freq_factor)?;
                pos("high_freq_factor", high_freq_factor)?;
                orig(original_max_positions)?;
                if high_freq_factor <= low_freq_factor {
                    fail!(
                        OP,
                        "llama3 scaling needs high_freq_factor > low_freq_factor, got {high_freq_factor} and {low_freq_factor}"
                    )
                }
            }
            Some(RopeScaling::Yarn {
                factor,
                original_max_positions,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
            }) => {
                pos("factor", factor)?;
                orig(original_max_positions)?;
                pos("beta_fast", beta_fast)?;
                pos("beta_slow", beta_slow)?;
                if self.theta <= 1.0 {
                    fail!(
                        OP,
                        "yarn scaling needs theta > 1 (it divides by ln theta), got {}",
                        self.theta
                    )
                }
                for (name, v) in [("mscale", mscale), ("mscale_all_dim", mscale_all_dim)] {
                    if let Some(v) = v {
                        if !v.is_finite() {
                            fail!(OP, "{name} must be finite, got {v}")
                        }
                    }
                }
                if let Some(a) = attention_factor {
                    pos("attention_factor", a)?;
                }
            }
        }
        Ok(())
    }

    /// The inverse frequencies (`rotary_dim / 2` of them) and the attention factor, in f64
    /// (see the module doc).
    pub fn inv_freq(&self) -> Result<(Vec<f64>, f64)> {
        self.validate()?;
        let dim = self.rotary_dim as f64;
        let half = self.rotary_dim / 2;
        let default = |base: f64| -> Vec<f64> {
            (0..half)
                .map(|i| 1.0 / base.powf(2.0 * i as f64 / dim))
                .collect()
        };
        Ok(match self.scaling {
            None => (default(self.theta), 1.0),
            Some(RopeScaling::Linear { factor }) => (
                default(self.theta)
                    .into_iter()
                    .map(|f| f / factor)
                    .collect(),
                1.0,
            ),
            Some(RopeScaling::Dynamic {
                factor,
                original_max_positions,
            }) => {
                let l = original_max_positions as f64;
                let s = self.max_positions.max(original_max_positions) as f64;
                let base = self.theta * (factor * s / l - (factor - 1.0)).powf(dim / (dim - 2.0));
                (default(base), 1.0)
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_positions,
            }) => {
                let l = original_max_positions as f64;
                let (low_wavelen, high_wavelen) = (l / lo, l / hi);
                let inv = default(self.theta)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let s = (l / wavelen - lo) / (hi - lo);
                            (1.0 - s) * f / factor + s * f
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
            Some(RopeScaling::Yarn {
                factor,
                original_max_positions,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
            }) => {
                let l = original_max_positions as f64;
                let ln_base = self.theta.ln();
                let corr = |rot: f64| {
                    dim * (l / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * ln_base)
                };
                let low = corr(beta_fast).floor().max(0.0);
                let mut high = corr(beta_slow).ceil().min(dim - 1.0);
                if low == high {
                    high += 0.001;
                }
                let inv = default(self.theta)
                    .into_iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let e = 1.0 - ramp;
                        f / factor * (1.0 - e) + f * e
                    })
                    .collect();
                let m = |s: f64, k: f64| {
                    if s <= 1.0 {
                        1.0
                    } else {
                        0.1 * k * s.ln() + 1.0
                    }
                };
                let a = match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => a,
                    (None, Some(ms), Some(ma)) if ms != 0.0 && ma != 0.0 => {
                        m(factor, ms) / m(factor, ma)
                    }
                    _ => m(factor, 1.0),
                };
                (inv, a)
            }
        })
    }
}

/// The cos/sin table of a [`RopeConfig`] on a device: f32 `[max_positions, rotary_dim / 2]`
/// each, attention factor folded in. Cheap to clone (tensors are shared).
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Tensor,
    sin: Tensor,
    config: RopeConfig,
    inv_freq: Vec<f64>,
    attention_factor: f64,
    /// The last [`CHECKED_IDS`] positions tensors whose range was checked against the table
    /// on a GPU (a device-side min/max read back once per positions tensor, not once per
    /// call; several, so that q and k of a few batches in flight, or rotated inputs, do not
    /// evict each other).
    pub(crate) checked: Arc<Mutex<VecDeque<TensorId>>>,
}

impl RopeTable {
    /// Builds the table (on the CPU, in f64, rounded once to f32) and moves it to `device`.
    pub fn new(cfg: &RopeConfig, device: &Device) -> Result<Self> {
        let (inv_freq, a) = cfg.inv_freq()?;
        let half = inv_freq.len();
        let n = cfg.max_positions * half;
        let mut cos = vec![0f32; n];
        let mut sin = vec![0f32; n];
        cos.par_chunks_mut(half)
            .zip(sin.par_chunks_mut(half))
            .enumerate()
            .for_each(|(p, (c, s))| {
                for ((c, s), &f) in c.iter_mut().zip(s.iter_mut()).zip(&inv_freq) {
                    let (sv, cv) = (p as f64 * f).sin_cos();
                    *c = (cv * a) as f32;
                    *s = (sv * a) as f32;
                }
            });
        let shape = (cfg.max_positions, half);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, &Device::Cpu)?.to_device(device)?,
            sin: Tensor::from_vec(sin, shape, &Device::Cpu)?.to_device(device)?,
            config: *cfg,
            inv_freq,
            attention_factor: a,
            checked: Arc::default(),
        })
    }

    /// `cos(p·inv_freq)·attention_factor`, f32 `[max_positions, rotary_dim / 2]`.
    pub fn cos(&self) -> &Tensor {
        &self.cos
    }

    /// `sin(p·inv_freq)·attention_factor`, f32 `[max_positions, rotary_dim / 2]`.
    pub fn sin(&self) -> &Tensor {
        &self.sin
    }

    pub fn config(&self) -> &RopeConfig {
        &self.config
    }

    /// The inverse frequencies the table was built from (f64).
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// The factor folded into cos and sin (1 except for YaRN).
    pub fn attention_factor(&self) -> f64 {
        self.attention_factor
    }

    /// The same table on another device.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            cos: self.cos.to_device(device)?,
            sin: self.sin.to_device(device)?,
            checked: Arc::default(),
            ..self.clone()
        })
    }
}
