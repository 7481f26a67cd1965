//! Softmax over the last dimension, plain and attention-style.
//!
//! Forward, for each row `x` of length `T` (row `i` of the `[.., S, T]` score matrix):
//! `z_j = s·x_j + m_j` for visible columns and `z_j = -inf` for causally hidden ones (with
//! `causal`, row `i` sees columns `0..=i + (T - S)`: the KV-cache offset), then
//! `y = exp(z - max z) / Σ exp(z - max z)`. The additive mask `m` broadcasts over the leading
//! dims (`[T]`, `[S, T]`, `[B, 1, S, T]`, `[B, H, S, T]`, ...).
//!
//! **Fully masked rows** (every `z_j = -inf`) of `masked_softmax` give zeros, not NaN, and a
//! zero gradient. Plain `softmax_last_dim` follows the math (and PyTorch): a row of only `-inf`
//! gives NaN. NaN and `+inf` inputs propagate as in the f64 reference.
//!
//! Backward: with `g = y ⊙ (dy − ⟨dy, y⟩)` (per row), `dx = s·g`, and the mask (if it is a
//! tracked variable) gets `g` summed over the dims it was broadcast along.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::validate;

/// The forward op: `softmax(scale·x + mask)` with optional causal masking.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Softmax {
    pub scale: f64,
    pub causal: bool,
    /// Fully masked rows give zeros (`masked_softmax`) instead of NaN (`softmax_last_dim`).
    pub zero_masked_rows: bool,
}

/// The backward op: `dx = scale · y ⊙ (dy − ⟨dy, y⟩)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SoftmaxBwd {
    pub scale: f64,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "candle-fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::forward(self, s, l, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, s, l, None)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(backward_op(y, dy, self.scale)?))
    }
}

impl CustomOp2 for Softmax {
    fn name(&self) -> &'static str {
        "candle-fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::forward(self, s, l, Some((ms, ml)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        ms: &candle_core::CudaStorage,
        ml: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, s, l, Some((ms, ml)))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        mask: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = backward_op(y, dy, self.scale)?;
        // The mask's gradient is g = dx / scale; Candle's broadcast backward then sums it over
        // the broadcast dims. Only computed when the mask is tracked (e.g. a learned bias), and
        // by its own kernel call unless scale = 1: dividing dx by scale would give NaN for
        // scale = 0 and lose range for tiny scales.
        let dmask = if !mask.track_op() {
            None
        } else if self.scale == 1.0 {
            Some(dx.clone())
        } else {
            Some(backward_op(y, dy, 1.0)?)
        };
        Ok((Some(dx), dmask))
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "candle-fused-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::backward(self, ys, yl, gs, gl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(self, ys, yl, gs, gl)
    }
}

fn backward_op(y: &Tensor, dy: &Tensor, scale: f64) -> Result<Tensor> {
    y.contiguous()?
        .apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxBwd { scale })
}

fn check_x(op: &str, arg: &str, x: &Tensor) -> Result<()> {
    validate::rank_ge1(op, arg, x)?;
    validate::float_dtype(op, arg, x)
}

/// Softmax over the last dimension, differentiable. A row of only `-inf` gives NaN (as the
/// math and PyTorch do); use [`masked_softmax`] for attention, where such rows give zeros.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "softmax_last_dim";
    check_x(OP, "x", x)?;
    if x.elem_count() == 0 {
        return x.zeros_like();
    }
    x.contiguous()?.apply_op1(Softmax {
        scale: 1.0,
        causal: false,
        zero_masked_rows: false,
    })
}

/// Attention softmax `softmax(scale·x + mask)` over the last dim, differentiable in `x` and (if
/// tracked) in `mask`.
///
/// * `mask`: additive, same dtype and device as `x`, broadcastable to `x`'s shape (`-inf`
///   hides a column). It is read through its broadcast strides, never expanded in memory.
/// * `causal`: for scores `[.., S, T]`, row `i` sees columns `0..=i + (T - S)` (the KV-cache
///   offset when `T > S`; with `T < S` the first `S - T` rows see nothing). Rank-1 input is one
///   row (`S = 1`).
///
/// Rows with every column masked give zeros and a zero gradient.
pub fn masked_softmax(
    x: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    causal: bool,
) -> Result<Tensor> {
    const OP: &str = "masked_softmax";
    check_x(OP, "x", x)?;
    validate::finite(OP, "scale", scale)?;
    if let Some(m) = mask {
        validate::same_dtype_device(OP, "mask", m, x)?;
        validate::broadcastable(OP, "mask", m.dims(), x.dims())?;
    }
    if x.elem_count() == 0 {
        return x.zeros_like();
    }
    let op = Softmax {
        scale,
        causal,
        zero_masked_rows: true,
    };
    let x = x.contiguous()?;
    match mask {
        None => x.apply_op1(op),
        Some(m) => x.apply_op2(&m.broadcast_as(x.shape())?, op),
    }
}

/// The softmax backward on its own: `dx = scale · y ⊙ (dy − ⟨dy, y⟩)` per row of the last dim,
/// from the forward's output `y` and the output gradient `dy` (same shape).
pub fn softmax_backward(y: &Tensor, dy: &Tensor, scale: f64) -> Result<Tensor> {
    const OP: &str = "softmax_backward";
    check_x(OP, "y", y)?;
    validate::same_dtype_device(OP, "dy", dy, y)?;
    validate::shape_eq(OP, "dy", dy, y.dims(), "the shape of y")?;
    validate::finite(OP, "scale", scale)?;
    if y.elem_count() == 0 {
        return y.zeros_like();
    }
    backward_op(y, dy, scale)
}
