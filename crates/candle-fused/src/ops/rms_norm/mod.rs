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

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};

use crate::ops::raw;
use crate::validate;

/// The arguments of the backward kernels: the forward's input `x`, the weight, the output
/// gradient `dy`, and for add+RMSNorm `dres`, the gradient of the sum, added to `dx`. All are
/// contiguous (possibly offset views into a stacked buffer).
pub(crate) struct BwdArgs<'a, S> {
    pub x: (&'a S, &'a Layout),
    pub w: Option<(&'a S, &'a Layout)>,
    pub dy: (&'a S, &'a Layout),
    pub dres: Option<(&'a S, &'a Layout)>,
}

/// The forward op (CustomOp1 without weight, CustomOp2 with).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsNorm {
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
        Ok(Some(backward_raw(x, None, dy, None, self.eps)?.0))
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
        let (dx, dw) = backward_raw(x, Some(w), dy, None, self.eps)?;
        Ok((Some(dx), dw))
    }
}

/// The backward kernels outside autograd (gradients are not differentiated again): returns
/// `dx` (+ `dres`) and `dw` when there is a weight. Any number of inputs and outputs, so no
/// stacking is needed.
pub(crate) fn backward_raw(
    x: &Tensor,
    w: Option<&Tensor>,
    dy: &Tensor,
    dres: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    let (x, dy) = (x.contiguous()?, dy.contiguous()?);
    let w = w.map(|t| t.contiguous()).transpose()?;
    let dres = dres.map(|t| t.contiguous()).transpose()?;
    let (xs, xl) = x.storage_and_layout();
    let (gs, gl) = dy.storage_and_layout();
    let ws = w.as_ref().map(|t| t.storage_and_layout());
    let rs = dres.as_ref().map(|t| t.storage_and_layout());
    let (dx, dw) = match &*xs {
        Storage::Cpu(xc) => {
            let args = BwdArgs {
                x: (xc, xl),
                w: ws
                    .as_ref()
                    .map(|(s, l)| Ok::<_, candle_core::Error>((raw::cpu(s, "weight")?, *l)))
                    .transpose()?,
                dy: (raw::cpu(&gs, "dy")?, gl),
                dres: rs
                    .as_ref()
                    .map(|(s, l)| Ok::<_, candle_core::Error>((raw::cpu(s, "d_sum")?, *l)))
                    .transpose()?,
            };
            let (dx, dw) = cpu::backward(eps, args)?;
            (Storage::Cpu(dx), dw.map(Storage::Cpu))
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(xc) => {
            let args = BwdArgs {
                x: (xc, xl),
                w: ws
                    .as_ref()
                    .map(|(s, l)| Ok::<_, candle_core::Error>((raw::cuda(s, "weight")?, *l)))
                    .transpose()?,
                dy: (raw::cuda(&gs, "dy")?, gl),
                dres: rs
                    .as_ref()
                    .map(|(s, l)| Ok::<_, candle_core::Error>((raw::cuda(s, "d_sum")?, *l)))
                    .transpose()?,
            };
            let (dx, dw) = cuda::backward(eps, args)?;
            (Storage::Cuda(dx), dw.map(Storage::Cuda))
        }
        _ => return Err(raw::unsupported("rms_norm_backward", x.device())),
    };
    let d = x.dim(candle_core::D::Minus1)?;
    Ok((
        raw::tensor(dx, x.shape().clone()),
        dw.map(|s| raw::tensor(s, d)),
    ))
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
    backward_raw(x, weight, dy, None, eps)
}
