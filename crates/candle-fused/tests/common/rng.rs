//! A seeded generator for the property tests.

use candle_core::{DType, Tensor};

use super::CPU;

/// A small seeded generator (SplitMix64) for the property tests, so a failing case is
/// reproduced from the seed proptest prints.
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A tensor of `N(0, std²)` values in `dt`.
    pub fn randn(&mut self, shape: &[usize], std: f64, dt: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| std * self.normal()).collect();
        Tensor::from_vec(v, shape, &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    /// A tensor of uniform values in `[lo, hi)` in `dt`.
    pub fn rand(&mut self, shape: &[usize], lo: f64, hi: f64, dt: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| lo + (hi - lo) * self.uniform()).collect();
        Tensor::from_vec(v, shape, &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    /// An additive mask: `N(0, 1)` values, each `-inf` with probability `p_hide`.
    pub fn mask(&mut self, shape: &[usize], p_hide: f64, dt: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                if self.uniform() < p_hide {
                    f64::NEG_INFINITY
                } else {
                    self.normal()
                }
            })
            .collect();
        Tensor::from_vec(v, shape, &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }
}
