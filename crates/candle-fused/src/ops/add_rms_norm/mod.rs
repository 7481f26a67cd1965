//! Residual add + RMSNorm, the pre-norm transformer's `h = x + residual; y = rms_norm(h)`:
//! returns `(normed, sum)` with `sum = x + residual` (the residual stream for the next layer)
//! and `normed = sum · r ⊙ w`, `r = 1 / sqrt(mean(sum²) + eps)`, in one pass (read `x` and
//! `residual` once, write both outputs once). For half types `normed` is computed from the f32
//! sum, before it is rounded to the output dtype.
//!
//! Backward, through both outputs: with `g = d_normed ⊙ w` and `ŝ = sum·r`,
//! `d_sum_total = r·(g − ŝ·⟨g, ŝ⟩/D) + d_sum`, `dx = dresidual = d_sum_total`,
//! `dw = Σ_rows d_normed ⊙ ŝ`. The two outputs are two graph nodes (the fused op, which also
//! computes the sum, and a node that owns the sum), so Candle adds `d_sum` to the normed path's
//! gradient itself and no stacked buffer has to be split or padded.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use crate::ops::rms_norm;
use crate::validate;

/// Hands the forward's second result (`sum`) from [`AddRmsNorm`], which computes both results in
/// one kernel, to [`SumOut`], the graph node that owns it; and `sum` itself back to
/// `AddRmsNorm`'s backward, which reads it. Never reaches the public API.
#[derive(Debug, Default)]
pub(crate) struct Handoff {
    storage: Mutex<Option<Storage>>,
    sum: Mutex<Option<Tensor>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn missing(what: &str) -> candle_core::Error {
    validate::err(
        "add_rms_norm",
        format!("internal: {what} was not handed over"),
    )
}

/// The forward op `(x, residual, w) -> normed`; it also computes `sum` in the same pass and
/// leaves it in the handoff. Its backward covers the `normed` path (gradients of x, residual
/// through the sum, and w); the `sum` path is [`SumOut`]'s.
#[derive(Debug, Clone)]
pub(crate) struct AddRmsNorm {
    pub eps: f64,
    pub handoff: Arc<Handoff>,
}

/// `(x, residual) -> sum`: returns the sum computed by [`AddRmsNorm`]; backward passes the
/// gradient of `sum` to both inputs.
#[derive(Debug, Clone)]
pub(crate) struct SumOut {
    pub handoff: Arc<Handoff>,
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
        let (normed, sum) = cpu::forward(self.eps, (xs, xl), (rs, rl), (ws, wl))?;
        *lock(&self.handoff.storage) = Some(Storage::Cpu(sum));
        Ok((normed, xl.shape().clone()))
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
        let (normed, sum) = cuda::forward(self.eps, (xs, xl), (rs, rl), (ws, wl))?;
        *lock(&self.handoff.storage) = Some(Storage::Cuda(sum));
        Ok((normed, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _residual: &Tensor,
        w: &Tensor,
        _normed: &Tensor,
        d_normed: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sum = lock(&self.handoff.sum)
            .clone()
            .ok_or_else(|| missing("sum"))?;
        let (ds, dw) = rms_norm::backward_raw(&sum, Some(w), d_normed, None, self.eps)?;
        Ok((Some(ds.clone()), Some(ds), dw))
    }
}

impl CustomOp2 for SumOut {
    fn name(&self) -> &'static str {
        "candle-fused-add-rms-norm-sum"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        xl: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match lock(&self.handoff.storage).take() {
            Some(Storage::Cpu(s)) => Ok((s, xl.shape().clone())),
            _ => Err(missing("the CPU sum")),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        xl: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        match lock(&self.handoff.storage).take() {
            Some(Storage::Cuda(s)) => Ok((s, xl.shape().clone())),
            _ => Err(missing("the CUDA sum")),
        }
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _residual: &Tensor,
        _sum: &Tensor,
        d_sum: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(d_sum.clone()), Some(d_sum.clone())))
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
    // One kernel computes both results; the sum gets its own graph node so each output's
    // gradient flows without stacking (Candle's backward of a split would copy both halves).
    let handoff = Arc::new(Handoff::default());
    let (x, residual) = (x.contiguous()?, residual.contiguous()?);
    let normed = x.apply_op3(
        &residual,
        &weight.contiguous()?,
        AddRmsNorm {
            eps,
            handoff: handoff.clone(),
        },
    )?;
    let sum = x.apply_op2(
        &residual,
        SumOut {
            handoff: handoff.clone(),
        },
    )?;
    *lock(&handoff.sum) = Some(sum.detach());
    Ok((normed, sum))
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
