//! The machinery behind the `candle-fused` command line: the training commands
//! ([`train_cmd`]: finetune, generate, eval, merge), the benchmark harness ([`bench`], with the
//! training-step bench in [`bench::train`]) and the counting allocator ([`alloc`]).
//! The correctness sweep lives in `candle_fused_testkit::check`.

pub mod alloc;
pub mod bench;
pub mod train_cmd;
