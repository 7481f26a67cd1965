//! Helpers of the op test suites: the generic ones are the testkit's
//! (`candle_fused_testkit::asserts`), the op-specific floors live here (`rms.rs`, `softmax.rs`).
#![allow(dead_code)]

mod exact;
mod glu;
mod loss;
mod rms;
mod rope;
mod softmax;

// Not every suite uses every helper.
#[allow(unused_imports)]
pub use candle_fused_testkit::asserts::*;
#[allow(unused_imports)]
pub use exact::*;
#[allow(unused_imports)]
pub use glu::*;
#[allow(unused_imports)]
pub use loss::*;
#[allow(unused_imports)]
pub use rms::*;
#[allow(unused_imports)]
pub use rope::*;
#[allow(unused_imports)]
pub use softmax::*;

/// Proptest's configuration with its case generator seeded from the run's seed (so
/// `CANDLE_FUSED_SEED` reruns the same cases, and each run draws new ones). Failures print the
/// minimal case; no regression files are written into the source tree.
pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(candle_fused_testkit::rng::run_seed()),
        ..proptest::test_runner::Config::default()
    }
}

/// A seeded generator of CPU test tensors: the testkit's [`Rng`](candle_fused_testkit::rng::Rng)
/// drawing on the CPU, with the seed a property-test case (or [`fresh_seed`]) gives it.
pub struct SeededRng(pub candle_fused_testkit::rng::Rng);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self(candle_fused_testkit::rng::Rng::new(seed))
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.0.uniform()
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        self.0.normal()
    }

    /// `N(0, std²)` values of `shape` in `dt`.
    pub fn randn(
        &mut self,
        shape: &[usize],
        std: f64,
        dt: candle_core::DType,
    ) -> candle_core::Tensor {
        self.0.randn(shape, std, dt, &CPU).unwrap()
    }

    /// Uniform values in `[lo, hi)` in `dt`.
    pub fn rand(
        &mut self,
        shape: &[usize],
        lo: f64,
        hi: f64,
        dt: candle_core::DType,
    ) -> candle_core::Tensor {
        self.0.rand(shape, lo, hi, dt, &CPU).unwrap()
    }

    /// An additive mask: `N(0, 1)` values, each `-inf` with probability `p_hide`.
    pub fn mask(
        &mut self,
        shape: &[usize],
        p_hide: f64,
        dt: candle_core::DType,
    ) -> candle_core::Tensor {
        self.0.mask(shape, p_hide, dt, &CPU).unwrap()
    }
}
