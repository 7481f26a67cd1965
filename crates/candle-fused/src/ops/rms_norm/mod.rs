//! RMSNorm over the last dimension (length `D`):
//! `y = x · r ⊙ w` with `r = 1 / sqrt(mean(x²) + eps)` (`w` optional).
//!
//! Backward, with `x̂ = x·r` and `g = dy ⊙ w` (or `dy` without weight):
//! `dx = r · (g − x̂ · ⟨g, x̂⟩ / D)` and `dw = Σ_rows dy ⊙ x̂`.
//! `r` is recomputed in the backward from the row of `x` that the backward reads anyway (the
//! same pass that forms `⟨g, x⟩`), so saving it would not save a byte of memory traffic.
//! `dw` accumulates in f32 (f64 for f64) per fixed block of rows and the blocks are summed in
//! a fixed order: deterministic run to run.
//!
//! Kernels: [`RmsNormFwd`] `(x, weight?) -> y` and [`RmsNormBwd`]
//! `(x, weight?, dy, d_sum?) -> (dx, dw?)`; the backward's optional `d_sum` is added to `dx`
//! (add+RMSNorm's fused-add mode, see [`crate::ops::add_rms_norm`]).

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;

use candle_core::{Result, Tensor};

use crate::config::{KernelConfig, Kernels};
use crate::seam::{self, Kernel};
use crate::validate;

/// Forward kernel: inputs `(x, weight?)`, output `y` (x's shape).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsNormFwd {
    pub eps: f64,
}

/// Backward kernel: inputs `(x, weight?, dy, d_sum?)`, outputs `dx` (x's shape) and, with a
/// weight, `dw` (`[D]`). `name` is the public op it serves (for error messages).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsNormBwd {
    pub eps: f64,
    pub name: &'static str,
}

impl Kernel for RmsNormFwd {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn inputs(&self) -> &'static [&'static str] {
        &["x", "weight"]
    }
    seam::backends!(cpu::forward, cuda::forward);
}

impl Kernel for RmsNormBwd {
    fn name(&self) -> &'static str {
        self.name
    }
    fn inputs(&self) -> &'static [&'static str] {
        &["x", "weight", "dy", "d_sum"]
    }
    seam::backends!(cpu::backward, cuda::backward);
}

/// The backward kernels outside autograd: `(dx, dw)` (`dw` when there is a weight), `d_sum`
/// added to `dx` when given. Shared by the autograd closures and the standalone backwards.
pub(crate) fn backward(
    cfg: &KernelConfig,
    name: &'static str,
    x: &Tensor,
    w: Option<&Tensor>,
    dy: &Tensor,
    d_sum: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    let k = RmsNormBwd { eps, name };
    let mut out = seam::run(&k, cfg, &[Some(x), w, Some(dy), d_sum])?.into_iter();
    let dx = out.next().map(|s| seam::tensor(s, x.shape().clone()));
    let d = x.dim(candle_core::D::Minus1)?;
    let dw = out.next().map(|s| seam::tensor(s, d));
    match dx {
        Some(dx) => Ok((dx, dw)),
        None => Err(validate::err(name, "internal: the backward returned no dx")),
    }
}

/// Checks shared by the RMSNorm ops: the input `x` (named `arg` in messages; rank >= 1,
/// float), `eps`, and a weight of shape `[D]` with `x`'s dtype and device.
pub(crate) fn check(op: &str, arg: &str, x: &Tensor, w: Option<&Tensor>, eps: f64) -> Result<()> {
    validate::rank_ge1(op, arg, x)?;
    validate::float_dtype(op, arg, x)?;
    validate::eps(op, eps)?;
    if let Some(w) = w {
        let d = x.dim(candle_core::D::Minus1)?;
        validate::like(op, "weight", w, x, &[d], &format!("the last dim of {arg}"))?;
    }
    Ok(())
}

impl Kernels {
    /// [`rms_norm`] with this handle's configuration.
    pub fn rms_norm(&self, x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        const OP: &str = "rms_norm";
        check(OP, "x", x, weight, eps)?;
        if x.elem_count() == 0 {
            return x.zeros_like();
        }
        let cfg = self.config;
        let y = seam::run(&RmsNormFwd { eps }, &cfg, &[Some(x), weight])?.remove(0);
        let (xs, ws) = (x.detach(), weight.map(|w| w.detach()));
        let parents: Vec<&Tensor> = std::iter::once(x).chain(weight).collect();
        seam::attach(OP, y, x.shape().clone(), &parents, move |_, dy| {
            let (dx, dw) = backward(&cfg, OP, &xs, ws.as_ref(), dy, None, eps)?;
            Ok(std::iter::once(Some(dx))
                .chain(ws.as_ref().map(|_| dw))
                .collect())
        })
    }

    /// [`rms_norm_backward`] with this handle's configuration.
    pub fn rms_norm_backward(
        &self,
        x: &Tensor,
        weight: Option<&Tensor>,
        dy: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Option<Tensor>)> {
        const OP: &str = "rms_norm_backward";
        check(OP, "x", x, weight, eps)?;
        validate::like(OP, "dy", dy, x, x.dims(), "the shape of x")?;
        if x.elem_count() == 0 {
            return Ok((x.zeros_like()?, weight.map(|w| w.zeros_like()).transpose()?));
        }
        backward(&self.config, OP, x, weight, dy, None, eps)
    }
}

/// RMSNorm over the last dim, differentiable in `x` and `weight`:
/// `x / sqrt(mean(x², -1) + eps) * weight`. `weight` has shape `[D]`; `None` means no scaling.
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    Kernels::default().rms_norm(x, weight, eps)
}

/// The RMSNorm backward on its own: from the forward's input `x`, its `weight` and the output
/// gradient `dy`, returns `(dx, dweight)` (`dweight` is `None` without weight).
pub fn rms_norm_backward(
    x: &Tensor,
    weight: Option<&Tensor>,
    dy: &Tensor,
    eps: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    Kernels::default().rms_norm_backward(x, weight, dy, eps)
}
