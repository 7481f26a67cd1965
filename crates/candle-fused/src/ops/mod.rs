//! The fused ops, one folder each: the op's kernels (plain data implementing the seam's
//! `Kernel`), its CPU and CUDA backends (forward and backward side by side), its validation,
//! and its public functions, re-exported here. Every op is also a method of
//! [`crate::Kernels`] (with an explicit [`crate::KernelConfig`]); the functions here use the
//! default configuration.
//!
//! RoPE ([`rope`]) works on `[B, H, T, D]` / `[B, T, H, D]` q/k with a [`RopeTable`]; GLU
//! ([`glu`], [`glu_packed`]) is elementwise. The other ops work over the last dimension. All
//! accept f32, f64, f16 and bf16 (half types computed in f32; f64 on the CPU only), any
//! leading dims (RoPE: rank 4), copy non-contiguous inputs to contiguous ones first (so
//! strided views give the right answer), return empty outputs for empty inputs and give a
//! clear `Err` naming the op and the argument for bad input.

mod add_rms_norm;
mod cross_entropy;
mod glu;
mod linear_cross_entropy;
mod lora;
mod matmul;
mod rms_norm;
mod rope;
mod softmax;

pub use add_rms_norm::{add_rms_norm, add_rms_norm_backward};
pub use cross_entropy::{cross_entropy, cross_entropy_backward, CrossEntropyConfig, Reduction};
pub use glu::{glu, glu_backward, glu_packed, glu_packed_backward, swiglu, GluKind};
pub use linear_cross_entropy::{
    default_chunk as linear_cross_entropy_chunk, default_chunk_dw as linear_cross_entropy_chunk_dw,
    default_chunk_on as linear_cross_entropy_chunk_on, linear_cross_entropy,
    linear_cross_entropy_forward_backward, LinearCrossEntropy,
};
pub(crate) use lora::check as check_lora;
pub use lora::{linear, lora_linear, lora_linear_backward, LoraGrads};
pub use matmul::matmul;
pub use rms_norm::{rms_norm, rms_norm_backward};
pub use rope::{rope, rope_backward, RopeConfig, RopeLayout, RopeScaling, RopeStyle, RopeTable};
pub use softmax::{masked_softmax, softmax_backward, softmax_last_dim};
