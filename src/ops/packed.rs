//! Candle's `CustomOp`s return one tensor. Ops with two results (add+RMSNorm's normalized
//! output and residual sum; a backward's dx and dweight) return them stacked in one buffer,
//! split here into views (no copy). This never reaches the public API.

use candle_core::{Result, Tensor};

/// Splits `[2, ...]` into its two halves.
pub(crate) fn split2(packed: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((packed.get(0)?, packed.get(1)?))
}

/// Splits a `[rows + 1, d]` buffer into `dx` (the first `rows` rows, reshaped to `dims`) and
/// the last row (`dw`, of length `d`).
pub(crate) fn split_rows_last(packed: &Tensor, dims: &[usize]) -> Result<(Tensor, Tensor)> {
    let rows = packed.dim(0)? - 1;
    let dx = packed.narrow(0, 0, rows)?.reshape(dims)?;
    let dw = packed.get(rows)?;
    Ok((dx, dw))
}
