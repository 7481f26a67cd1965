//! Drop-in `candle_nn` modules built on the fused ops. Unlike candle-nn's, they train: every
//! parameter gets its gradient.

mod rms_norm;

pub use rms_norm::{rms_norm, RmsNorm};
