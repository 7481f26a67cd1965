//! Helpers of the op test suites: the generic ones are the testkit's
//! (`candle_fused_testkit::asserts`), the op-specific floors live here (`rms.rs`, `softmax.rs`).
#![allow(dead_code)]

mod rms;
mod softmax;

// Not every suite uses every helper.
#[allow(unused_imports)]
pub use candle_fused_testkit::asserts::*;
#[allow(unused_imports)]
pub use rms::*;
#[allow(unused_imports)]
pub use softmax::*;

/// Proptest's configuration with its case generator seeded from the run's seed (so
/// `CANDLE_FUSED_SEED` reruns the same cases, and each run draws new ones).
pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases,
        rng_seed: proptest::test_runner::RngSeed::Fixed(candle_fused_testkit::rng::run_seed()),
        ..proptest::test_runner::Config::default()
    }
}

/// A generator of the values of one property-test case, from the case's own seed.
pub fn case_rng(seed: u64) -> candle_fused_testkit::rng::Rng {
    candle_fused_testkit::rng::Rng::new(seed)
}
