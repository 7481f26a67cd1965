//! Test helpers shared by the candle-fused test suites, `candle-fused check` and the bench:
//! composed-Candle references ([`reference`]), verification helpers ([`testing`]) and the
//! correctness sweep ([`check`]) that `candle-fused check` prints.

pub mod check;
pub mod check_loss;
pub mod check_rope_glu;
pub mod reference;
pub mod testing;
