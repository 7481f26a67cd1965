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
//!
//! Kernels: [`SoftmaxFwd`] `(x, mask?) -> y` (the mask read through its broadcast strides,
//! never expanded) and [`SoftmaxBwd`] `(y, dy) -> dx`.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use candle_core::{Result, Tensor};

use crate::config::{KernelConfig, Kernels};
use crate::seam::{self, Kernel};
use crate::validate;

/// Forward kernel: `softmax(scale·x + mask)` with optional causal masking; inputs
/// `(x, mask?)` (the mask broadcast to x's shape, read through its strides), output `y`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SoftmaxFwd {
    pub scale: f64,
    pub causal: bool,
    /// Fully masked rows give zeros (`masked_softmax`) instead of NaN (`softmax_last_dim`).
    pub zero_masked_rows: bool,
    pub name: &'static str,
}

/// Backward kernel: `dx = scale · y ⊙ (dy − ⟨dy, y⟩)`; inputs `(y, dy)`, output `dx`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SoftmaxBwd {
    pub scale: f64,
    pub name: &'static str,
}

impl Kernel for SoftmaxFwd {
    fn name(&self) -> &'static str {
        self.name
    }
    fn inputs(&self) -> &'static [&'static str] {
        &["x", "mask"]
    }
    fn strided(&self, i: usize) -> bool {
        i == 1
    }
    seam::backends!(cpu::forward, cuda::forward);
}

impl Kernel for SoftmaxBwd {
    fn name(&self) -> &'static str {
        self.name
    }
    fn inputs(&self) -> &'static [&'static str] {
        &["y", "dy"]
    }
    seam::backends!(cpu::backward, cuda::backward);
}

/// The backward kernel outside autograd.
fn backward(
    cfg: &KernelConfig,
    name: &'static str,
    y: &Tensor,
    dy: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    seam::run1(
        &SoftmaxBwd { scale, name },
        cfg,
        &[Some(y), Some(dy)],
        y.shape().clone(),
    )
}

fn check_x(op: &str, arg: &str, x: &Tensor) -> Result<()> {
    validate::rank_ge1(op, arg, x)?;
    validate::float_dtype(op, arg, x)
}

impl Kernels {
    /// The forward and its graph node: gradients to `x` and (when tracked) the broadcast mask.
    fn softmax_node(&self, op: SoftmaxFwd, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let cfg = self.config;
        let y = seam::run(&op, &cfg, &[Some(x), mask])?.remove(0);
        let parents: Vec<&Tensor> = std::iter::once(x).chain(mask).collect();
        let (name, scale) = (op.name, op.scale);
        let has_mask = mask.is_some();
        let mask_tracked = mask.is_some_and(|m| m.track_op());
        seam::attach(name, y, x.shape().clone(), &parents, move |y, dy| {
            let dx = backward(&cfg, name, y, dy, scale)?;
            if !has_mask {
                return Ok(vec![Some(dx)]);
            }
            if !mask_tracked {
                return Ok(vec![Some(dx), None]);
            }
            // The mask's gradient is g = dx / scale; Candle's broadcast backward then sums it
            // over the broadcast dims. Its own kernel call unless scale = 1: dividing dx by
            // scale would give NaN for scale = 0 and lose range for tiny scales.
            let dmask = if scale == 1.0 {
                dx.clone()
            } else {
                backward(&cfg, name, y, dy, 1.0)?
            };
            Ok(vec![Some(dx), Some(dmask)])
        })
    }

    /// [`softmax_last_dim`] with this handle's configuration.
    pub fn softmax_last_dim(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "softmax_last_dim";
        check_x(OP, "x", x)?;
        if x.elem_count() == 0 {
            return x.zeros_like();
        }
        let op = SoftmaxFwd {
            scale: 1.0,
            causal: false,
            zero_masked_rows: false,
            name: OP,
        };
        self.softmax_node(op, x, None)
    }

    /// [`masked_softmax`] with this handle's configuration.
    pub fn masked_softmax(
        &self,
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
        let op = SoftmaxFwd {
            scale,
            causal,
            zero_masked_rows: true,
            name: OP,
        };
        let mask = mask.map(|m| m.broadcast_as(x.shape())).transpose()?;
        self.softmax_node(op, x, mask.as_ref())
    }

    /// [`softmax_backward`] with this handle's configuration.
    pub fn softmax_backward(&self, y: &Tensor, dy: &Tensor, scale: f64) -> Result<Tensor> {
        const OP: &str = "softmax_backward";
        check_x(OP, "y", y)?;
        validate::like(OP, "dy", dy, y, y.dims(), "the shape of y")?;
        validate::finite(OP, "scale", scale)?;
        if y.elem_count() == 0 {
            return y.zeros_like();
        }
        backward(&self.config, OP, y, dy, scale)
    }
}

/// Softmax over the last dimension, differentiable. A row of only `-inf` gives NaN (as the
/// math and PyTorch do); use [`masked_softmax`] for attention, where such rows give zeros.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    Kernels::default().softmax_last_dim(x)
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
    Kernels::default().masked_softmax(x, scale, mask, causal)
}

/// The softmax backward on its own: `dx = scale · y ⊙ (dy − ⟨dy, y⟩)` per row of the last dim,
/// from the forward's output `y` and the output gradient `dy` (same shape).
pub fn softmax_backward(y: &Tensor, dy: &Tensor, scale: f64) -> Result<Tensor> {
    Kernels::default().softmax_backward(y, dy, scale)
}
