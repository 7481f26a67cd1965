//! Residual add + RMSNorm, the pre-norm transformer's `h = x + residual; y = rms_norm(h)`:
//! returns `(normed, sum)` with `sum = x + residual` (the residual stream for the next layer)
//! and `normed = sum · r ⊙ w`, `r = 1 / sqrt(mean(sum²) + eps)`, in one pass (read `x` and
//! `residual` once, write both outputs once). For half types `normed` is computed from the f32
//! sum, before it is rounded to the output dtype.
//!
//! Backward, through both outputs: with `g = d_normed ⊙ w` and `ŝ = sum·r`,
//! `d_sum_total = r·(g − ŝ·⟨g, ŝ⟩/D) + d_sum`, `dx = dresidual = d_sum_total`,
//! `dw = Σ_rows d_normed ⊙ ŝ`.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::ops::packed;
use crate::ops::rms_norm;
use crate::validate;

/// The forward op `(x, residual, w) -> [normed; sum]`, stacked as `[2, ...x.shape]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AddRmsNorm {
    pub eps: f64,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "candle-fused-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::forward(self.eps, (xs, xl), (rs, rl), (ws, wl))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        rs: &candle_core::CudaStorage,
        rl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self.eps, (xs, xl), (rs, rl), (ws, wl))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _residual: &Tensor,
        w: &Tensor,
        packed_out: &Tensor,
        packed_grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Views into the stacked buffers, no copies: x = sum, dy = d normed, dres = d sum.
        let grad = packed_grad.contiguous()?;
        let (ds, dw) = rms_norm::backward_raw(
            &packed_out.get(1)?,
            Some(w),
            &grad.get(0)?,
            Some(&grad.get(1)?),
            self.eps,
        )?;
        Ok((Some(ds.clone()), Some(ds), dw))
    }
}

/// Fused residual add + RMSNorm, differentiable in `x`, `residual` and `weight` through both
/// results: returns `(rms_norm(x + residual) * weight, x + residual)`.
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "add_rms_norm";
    rms_norm::check(OP, "x", x, Some(weight), eps)?;
    validate::same_dtype_device(OP, "residual", residual, x)?;
    validate::shape_eq(OP, "residual", residual, x.dims(), "the shape of x")?;
    if x.elem_count() == 0 {
        return Ok((x.zeros_like()?, (x + residual)?));
    }
    let packed = x.contiguous()?.apply_op3(
        &residual.contiguous()?,
        &weight.contiguous()?,
        AddRmsNorm { eps },
    )?;
    packed::split2(&packed)
}

/// The add+RMSNorm backward on its own: from the forward's `sum = x + residual`, `weight`, and
/// the gradients of both outputs, returns `(d sum_total, dweight)`; `d sum_total` is the
/// gradient of both `x` and `residual`.
pub fn add_rms_norm_backward(
    sum: &Tensor,
    weight: &Tensor,
    d_normed: &Tensor,
    d_sum: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "add_rms_norm_backward";
    rms_norm::check(OP, "sum", sum, Some(weight), eps)?;
    for (name, t) in [("d_normed", d_normed), ("d_sum", d_sum)] {
        validate::same_dtype_device(OP, name, t, sum)?;
        validate::shape_eq(OP, name, t, sum.dims(), "the shape of sum")?;
    }
    if sum.elem_count() == 0 {
        return Ok((sum.zeros_like()?, weight.zeros_like()?));
    }
    let (ds, dw) = rms_norm::backward_raw(sum, Some(weight), d_normed, Some(d_sum), eps)?;
    Ok((ds, dw.expect("a weight gives dw")))
}
