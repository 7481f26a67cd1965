//! RMSNorm over the last dimension (length `D`):
//! `y = x · r ⊙ w` with `r = 1 / sqrt(mean(x²) + eps)` (`w` optional).
//!
//! Backward, with `x̂ = x·r` and `g = dy ⊙ w` (or `dy` without weight):
//! `dx = r · (g − x̂ · ⟨g, x̂⟩ / D)` and `dw = Σ_rows dy ⊙ x̂`.
//! `r` is recomputed in the backward from the row of `x` that the backward reads anyway (the
//! same pass that forms `⟨g, x⟩`), so saving it would not save a byte of memory traffic.
//! `dw` accumulates in f32 (f64 for f64) per fixed block of rows and the blocks are summed in
//! a fixed order: deterministic run to run.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::ops::packed;
use crate::validate;

/// The arguments of the backward kernels. `fused_add` (add+RMSNorm): `x` is the forward's
/// stacked output `[normed; sum]` (the backward reads `sum`) and `dy` is the stacked gradient
/// `[d normed; d sum]`, whose second half is added to `dx`.
pub(crate) struct BwdArgs<'a, S> {
    pub x: (&'a S, &'a Layout),
    pub w: Option<(&'a S, &'a Layout)>,
    pub dy: (&'a S, &'a Layout),
    pub fused_add: bool,
}

impl<'a, S> BwdArgs<'a, S> {
    pub fn plain(
        xs: &'a S,
        xl: &'a Layout,
        w: Option<(&'a S, &'a Layout)>,
        gs: &'a S,
        gl: &'a Layout,
    ) -> Self {
        Self {
            x: (xs, xl),
            w,
            dy: (gs, gl),
            fused_add: false,
        }
    }
}

/// The forward op (CustomOp1 without weight, CustomOp2 with).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsNorm {
    pub eps: f64,
}

/// The backward op. Without weight: `(x, dy) -> dx`. With weight: `(x, w, dy) -> [dx; dw]`
/// stacked as `[rows + 1, D]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsNormBwd {
    pub eps: f64,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "candle-fused-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::forward(self.eps, s, l, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self.eps, s, l, None)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dx = x.apply_op2_no_bwd(&dy.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        Ok(Some(dx))
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "candle-fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::forward(self.eps, s, l, Some((ws, wl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self.eps, s, l, Some((ws, wl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = backward_op(x, w, dy, self.eps)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `(x, dy) -> dx` (no weight).
impl CustomOp2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "candle-fused-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::backward(self.eps, BwdArgs::plain(xs, xl, None, gs, gl))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(self.eps, BwdArgs::plain(xs, xl, None, gs, gl))
    }
}

/// `(x, w, dy) -> [dx; dw]`.
impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "candle-fused-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::backward(self.eps, BwdArgs::plain(xs, xl, Some((ws, wl)), gs, gl))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(self.eps, BwdArgs::plain(xs, xl, Some((ws, wl)), gs, gl))
    }
}

fn backward_op(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &RmsNormBwd { eps })?;
    packed::split_rows_last(&packed, x.dims())
}

/// Checks shared by the RMSNorm ops: the input `x` (named `arg` in messages; rank >= 1,
/// float), `eps`, and a weight of shape `[D]` with `x`'s dtype and device.
pub(crate) fn check(op: &str, arg: &str, x: &Tensor, w: Option<&Tensor>, eps: f64) -> Result<()> {
    validate::rank_ge1(op, arg, x)?;
    validate::float_dtype(op, arg, x)?;
    validate::eps(op, eps)?;
    if let Some(w) = w {
        validate::same_dtype_device(op, "weight", w, x)?;
        let d = x.dim(candle_core::D::Minus1)?;
        validate::shape_eq(op, "weight", w, &[d], &format!("the last dim of {arg}"))?;
    }
    Ok(())
}

/// RMSNorm over the last dim, differentiable in `x` and `weight`:
/// `x / sqrt(mean(x², -1) + eps) * weight`. `weight` has shape `[D]`; `None` means no scaling.
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    const OP: &str = "rms_norm";
    check(OP, "x", x, weight, eps)?;
    if x.elem_count() == 0 {
        return x.zeros_like();
    }
    let x = x.contiguous()?;
    match weight {
        None => x.apply_op1(RmsNorm { eps }),
        Some(w) => x.apply_op2(&w.contiguous()?, RmsNorm { eps }),
    }
}

/// The RMSNorm backward on its own: from the forward's input `x`, its `weight` and the output
/// gradient `dy`, returns `(dx, dweight)` (`dweight` is `None` without weight).
pub fn rms_norm_backward(
    x: &Tensor,
    weight: Option<&Tensor>,
    dy: &Tensor,
    eps: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    const OP: &str = "rms_norm_backward";
    check(OP, "x", x, weight, eps)?;
    validate::same_dtype_device(OP, "dy", dy, x)?;
    validate::shape_eq(OP, "dy", dy, x.dims(), "the shape of x")?;
    if x.elem_count() == 0 {
        return Ok((x.zeros_like()?, weight.map(|w| w.zeros_like()).transpose()?));
    }
    let x = x.contiguous()?;
    match weight {
        None => Ok((
            x.apply_op2_no_bwd(&dy.contiguous()?, &RmsNormBwd { eps })?,
            None,
        )),
        Some(w) => {
            let (dx, dw) = backward_op(&x, &w.contiguous()?, dy, eps)?;
            Ok((dx, Some(dw)))
        }
    }
}
