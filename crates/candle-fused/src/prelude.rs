//! `use candle_fused::prelude::*;` brings the [`FusedOps`] extension trait on `Tensor`.

use candle_core::{Result, Tensor};

use crate::ops::{self, CrossEntropyConfig, GluKind, RopeLayout, RopeStyle, RopeTable};

/// The fused ops as methods on `Tensor`. All are differentiable; see [`crate::ops`] for the
/// math and the free-function forms.
pub trait FusedOps {
    /// Softmax over the last dim ([`ops::softmax_last_dim`]).
    fn softmax_fused(&self) -> Result<Tensor>;
    /// Attention softmax `softmax(scale·self + mask)` with optional causal masking
    /// ([`ops::masked_softmax`]); fully masked rows give zeros.
    fn masked_softmax_fused(
        &self,
        scale: f64,
        mask: Option<&Tensor>,
        causal: bool,
    ) -> Result<Tensor>;
    /// RMSNorm over the last dim with weight `w` ([`ops::rms_norm`]).
    fn rms_norm_fused(&self, w: &Tensor, eps: f64) -> Result<Tensor>;
    /// Residual add + RMSNorm: returns `(normed, sum)` ([`ops::add_rms_norm`]).
    fn add_rms_norm_fused(
        &self,
        residual: &Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor)>;
    /// LoRA linear `self·Wᵀ (+ bias) + scale·(self·Aᵀ)·Bᵀ` ([`ops::lora_linear`]).
    fn lora_linear_fused(
        &self,
        w: &Tensor,
        bias: Option<&Tensor>,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
    ) -> Result<Tensor>;
    /// RoPE on `self` (q or k) at `positions` ([`ops::rope`]).
    fn rope_fused(
        &self,
        table: &RopeTable,
        positions: &Tensor,
        layout: RopeLayout,
        style: RopeStyle,
    ) -> Result<Tensor>;
    /// `silu(self) ⊙ up` ([`ops::swiglu`]).
    fn swiglu_fused(&self, up: &Tensor) -> Result<Tensor>;
    /// `act(self) ⊙ up` ([`ops::glu`]).
    fn glu_fused(&self, kind: GluKind, up: &Tensor) -> Result<Tensor>;
    /// `self` is the packed `[.., 2I]` gate_up: `act(gate) ⊙ up` ([`ops::glu_packed`]).
    fn glu_packed_fused(&self, kind: GluKind) -> Result<Tensor>;
    /// Cross-entropy of these logits against class indices ([`ops::cross_entropy`]).
    fn cross_entropy_fused(&self, targets: &Tensor, cfg: &CrossEntropyConfig) -> Result<Tensor>;
    /// Cross-entropy of `self·wᵀ` (hidden states times the LM head) without the full logits
    /// ([`ops::linear_cross_entropy`]).
    fn linear_cross_entropy_fused(
        &self,
        w: &Tensor,
        targets: &Tensor,
        cfg: &CrossEntropyConfig,
        chunk: Option<usize>,
    ) -> Result<Tensor>;
    /// `op(self) · op(b)`, each transposed when its flag is set ([`ops::matmul`]).
    fn matmul_fused(&self, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor>;
}

impl FusedOps for Tensor {
    fn softmax_fused(&self) -> Result<Tensor> {
        ops::softmax_last_dim(self)
    }

    fn masked_softmax_fused(
        &self,
        scale: f64,
        mask: Option<&Tensor>,
        causal: bool,
    ) -> Result<Tensor> {
        ops::masked_softmax(self, scale, mask, causal)
    }

    fn rms_norm_fused(&self, w: &Tensor, eps: f64) -> Result<Tensor> {
        ops::rms_norm(self, Some(w), eps)
    }

    fn add_rms_norm_fused(
        &self,
        residual: &Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        ops::add_rms_norm(self, residual, w, eps)
    }

    fn lora_linear_fused(
        &self,
        w: &Tensor,
        bias: Option<&Tensor>,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        ops::lora_linear(self, w, bias, a, b, scale)
    }

    fn rope_fused(
        &self,
        table: &RopeTable,
        positions: &Tensor,
        layout: RopeLayout,
        style: RopeStyle,
    ) -> Result<Tensor> {
        ops::rope(self, table, positions, layout, style)
    }

    fn swiglu_fused(&self, up: &Tensor) -> Result<Tensor> {
        ops::swiglu(self, up)
    }

    fn glu_fused(&self, kind: GluKind, up: &Tensor) -> Result<Tensor> {
        ops::glu(kind, self, up)
    }

    fn glu_packed_fused(&self, kind: GluKind) -> Result<Tensor> {
        ops::glu_packed(kind, self)
    }

    fn cross_entropy_fused(&self, targets: &Tensor, cfg: &CrossEntropyConfig) -> Result<Tensor> {
        ops::cross_entropy(self, targets, cfg)
    }

    fn linear_cross_entropy_fused(
        &self,
        w: &Tensor,
        targets: &Tensor,
        cfg: &CrossEntropyConfig,
        chunk: Option<usize>,
    ) -> Result<Tensor> {
        ops::linear_cross_entropy(self, w, targets, cfg, chunk)
    }

    fn matmul_fused(&self, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
        ops::matmul(self, b, ta, tb)
    }
}
