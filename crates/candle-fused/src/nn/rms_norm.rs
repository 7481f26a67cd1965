//! `RmsNorm`: drop-in for `candle_nn::RmsNorm` (same constructor, same weight name
//! `weight`, init ones), whose weight gets a gradient.

use candle_core::{Module, Result, Tensor};

use crate::config::Kernels;

/// RMSNorm over the last dim with a learned weight `[D]`. `forward` uses the fused op for any
/// input layout and is differentiable in both the input and the weight.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    kernels: Kernels,
}

impl RmsNorm {
    /// On the default [`Kernels`] (see [`Self::with_kernels`]).
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps,
            kernels: Kernels::default(),
        }
    }

    /// This module running on `kernels` (e.g. `Kernels::new(KernelConfig::poisoned())` in
    /// tests, or a tuned configuration).
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// The kernels this module runs on.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Pre-norm residual step: returns `(self(x + residual), x + residual)` in one fused op.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        self.kernels
            .add_rms_norm(x, residual, &self.weight, self.eps)
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.kernels.rms_norm(xs, Some(&self.weight), self.eps)
    }
}

impl From<candle_nn::RmsNorm> for RmsNorm {
    fn from(m: candle_nn::RmsNorm) -> Self {
        Self::new(m.weight().clone(), m.eps())
    }
}

/// Builds an [`RmsNorm`] of size `size` from a `VarBuilder`, like `candle_nn::rms_norm`: the
/// weight is `vb["weight"]` (or `vb["gamma"]` if only that exists), initialised to ones.
pub fn rms_norm(size: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<RmsNorm> {
    let name = if !vb.contains_tensor("weight") && vb.contains_tensor("gamma") {
        "gamma"
    } else {
        "weight"
    };
    let weight = vb.get_with_hints(size, name, candle_nn::Init::Const(1.))?;
    Ok(RmsNorm::new(weight, eps))
}
