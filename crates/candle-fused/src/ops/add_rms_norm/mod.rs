//! Residual add + RMSNorm, the pre-norm transformer's `h = x + residual; y = rms_norm(h)`:
//! returns `(normed, sum)` with `sum = x + residual` (the residual stream for the next layer)
//! and `normed = sum · r ⊙ w`, `r = 1 / sqrt(mean(sum²) + eps)`, in one pass (read `x` and
//! `residual` once, write both outputs once). For half types `normed` is computed from the f32
//! sum, before it is rounded to the output dtype.
//!
//! Backward, through both outputs: with `g = d_normed ⊙ w` and `ŝ = sum·r`,
//! `d_sum_total = r·(g − ŝ·⟨g, ŝ⟩/D) + d_sum`, `dx = dresidual = d_sum_total`,
//! `dw = Σ_rows d_normed ⊙ ŝ`.
//!
//! Kernels: [`AddRmsNormFwd`] `(x, residual, weight) -> (normed, sum)`; the backward is
//! RMSNorm's kernel with `d_sum` (one pass: `dx` and `dw` with `d_sum` added). Through autograd
//! the two outputs are two graph nodes of one kernel run, so Candle adds `d_sum` itself.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use candle_core::{Result, Tensor};

use crate::config::Kernels;
use crate::ops::rms_norm;
use crate::seam::{self, Kernel};
use crate::validate;

/// Forward kernel: inputs `(x, residual, weight)`, outputs `(normed, sum)` (x's shape).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AddRmsNormFwd {
    pub eps: f64,
}

impl Kernel for AddRmsNormFwd {
    fn name(&self) -> &'static str {
        "add_rms_norm"
    }
    fn inputs(&self) -> &'static [&'static str] {
        &["x", "residual", "weight"]
    }
    seam::backends!(cpu::forward, cuda::forward);
}

impl Kernels {
    /// [`add_rms_norm`] with this handle's configuration.
    pub fn add_rms_norm(
        &self,
        x: &Tensor,
        residual: &Tensor,
        weight: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "add_rms_norm";
        rms_norm::check(OP, "x", x, Some(weight), eps)?;
        validate::like(OP, "residual", residual, x, x.dims(), "the shape of x")?;
        if x.elem_count() == 0 {
            return Ok((x.zeros_like()?, (x + residual)?));
        }
        let cfg = self.config;
        let mut out = seam::run(
            &AddRmsNormFwd { eps },
            &cfg,
            &[Some(x), Some(residual), Some(weight)],
        )?
        .into_iter();
        let (Some(normed), Some(sum)) = (out.next(), out.next()) else {
            validate::fail!(OP, "internal: the kernel did not return both outputs")
        };
        let shape = x.shape().clone();
        let sum = seam::attach(OP, sum, shape.clone(), &[x, residual], |_, g| {
            Ok(vec![Some(g.clone()), Some(g.clone())])
        })?;
        let (s, w) = (sum.detach(), weight.detach());
        let normed = seam::attach(OP, normed, shape, &[x, residual, weight], move |_, dy| {
            let (ds, dw) = rms_norm::backward(&cfg, OP, &s, Some(&w), dy, None, eps)?;
            Ok(vec![Some(ds.clone()), Some(ds), dw])
        })?;
        Ok((normed, sum))
    }

    /// [`add_rms_norm_backward`] with this handle's configuration.
    pub fn add_rms_norm_backward(
        &self,
        sum: &Tensor,
        weight: &Tensor,
        d_normed: &Tensor,
        d_sum: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "add_rms_norm_backward";
        rms_norm::check(OP, "sum", sum, Some(weight), eps)?;
        for (name, t) in [("d_normed", d_normed), ("d_sum", d_sum)] {
            validate::like(OP, name, t, sum, sum.dims(), "the shape of sum")?;
        }
        if sum.elem_count() == 0 {
            return Ok((sum.zeros_like()?, weight.zeros_like()?));
        }
        let (ds, dw) = rms_norm::backward(
            &self.config,
            OP,
            sum,
            Some(weight),
            d_normed,
            Some(d_sum),
            eps,
        )?;
        match dw {
            Some(dw) => Ok((ds, dw)),
            None => validate::fail!(OP, "internal: the backward returned no dweight"),
        }
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
    Kernels::default().add_rms_norm(x, residual, weight, eps)
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
    Kernels::default().add_rms_norm_backward(sum, weight, d_normed, d_sum, eps)
}
