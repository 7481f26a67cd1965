//! Test helpers shared by the candle-fused test suites, `candle-fused check`, the bench and the
//! probe: seeded random inputs ([`rng`]), composed-Candle references ([`reference`]),
//! verification helpers ([`testing`]), the test suites' assertions ([`asserts`]) and the
//! correctness sweep ([`check`]) that `candle-fused check` prints.

pub mod asserts;
pub mod check;
pub mod check_loss;
pub mod check_rope_glu;
pub mod reference;
pub mod rng;
pub mod testing;
