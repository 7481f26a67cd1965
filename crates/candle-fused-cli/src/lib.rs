//! The machinery behind the `candle-fused` command line: the benchmark harness ([`bench`]).
//! The correctness sweep lives in `candle_fused_testkit::check`.

pub mod bench;
