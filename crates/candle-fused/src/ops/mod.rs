//! The fused ops, one folder each: the Candle `CustomOp` (CPU forward, backward, and with the
//! `cuda` feature the CUDA forward and backward kernels) plus the free functions below.
//!
//! All ops work over the last dimension, accept inputs of any rank >= 1 in f32, f64, f16 and
//! bf16 (half types accumulate in f32), copy non-contiguous inputs to contiguous ones first
//! (so strided views give the right answer), return empty outputs for empty inputs and give a
//! clear `Err` naming the op and the argument for bad input.

pub mod add_rms_norm;
pub mod cross_entropy;
pub mod linear_cross_entropy;
pub mod lora;
pub mod matmul;
pub mod rms_norm;
pub mod softmax;

pub use add_rms_norm::{add_rms_norm, add_rms_norm_backward};
pub use cross_entropy::{cross_entropy, cross_entropy_backward, CrossEntropyConfig, Reduction};
pub use linear_cross_entropy::{
    linear_cross_entropy, linear_cross_entropy_forward_backward, LinearCrossEntropy,
};
pub use lora::{lora_linear, lora_linear_backward, lora_linear_composed, LoraGrads};
pub use matmul::matmul;
pub use rms_norm::{rms_norm, rms_norm_backward};
pub use softmax::{masked_softmax, softmax_backward, softmax_last_dim};
