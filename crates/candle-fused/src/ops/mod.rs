//! The fused ops, one folder each: the Candle `CustomOp` (CPU forward, backward, and with the
//! `cuda` feature the CUDA forward and backward kernels) plus the free functions below.
//!
//! RoPE ([`rope`]) works on `[B, H, T, D]` / `[B, T, H, D]` q/k with a [`RopeTable`]; GLU
//! ([`glu`], [`glu_packed`]) is elementwise. The other ops work over the last dimension. All
//! accept f32, f64, f16 and bf16 (half types computed in f32; f64 is CPU-only), any leading
//! dims (RoPE: rank 4), copy non-contiguous inputs to contiguous ones first (so strided views
//! give the right answer), return empty outputs for empty inputs and give a clear `Err`
//! naming the op and the argument for bad input.

pub mod add_rms_norm;
pub mod cross_entropy;
pub mod glu;
pub mod linear_cross_entropy;
pub mod lora;
pub mod matmul;
pub mod rms_norm;
pub mod rope;
pub mod softmax;

pub use add_rms_norm::{add_rms_norm, add_rms_norm_backward};
pub use cross_entropy::{cross_entropy, cross_entropy_backward, CrossEntropyConfig, Reduction};
pub use glu::{glu, glu_backward, glu_packed, glu_packed_backward, swiglu, GluKind};
pub use linear_cross_entropy::{
    linear_cross_entropy, linear_cross_entropy_forward_backward, LinearCrossEntropy,
};
pub use lora::{lora_linear, lora_linear_backward, lora_linear_composed, LoraGrads};
pub use matmul::matmul;
pub use rms_norm::{rms_norm, rms_norm_backward};
pub use rope::{rope, rope_backward, RopeConfig, RopeLayout, RopeScaling, RopeStyle, RopeTable};
pub use softmax::{masked_softmax, softmax_backward, softmax_last_dim};
