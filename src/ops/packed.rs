//! Candle's `CustomOp`s return one tensor. add+RMSNorm's forward has two results (the
//! normalized output and the residual sum): its op returns them stacked as `[2, ...]` and they
//! are split here into views (no copy). This never reaches the public API.

use candle_core::{Result, Tensor};

/// Splits `[2, ...]` into its two halves.
pub(crate) fn split2(packed: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((packed.get(0)?, packed.get(1)?))
}
