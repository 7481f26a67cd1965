//! The machinery behind the `candle-fused` command line: the training commands
//! ([`train_cmd`]: finetune, generate, eval, merge) and the benchmark harness ([`bench`]).
//! The correctness sweep lives in `candle_fused_testkit::check`.

pub mod bench;
pub mod train_cmd;
