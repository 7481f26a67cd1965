//! # candle-fused
//!
//! Fused, **trainable** transformer kernels for [Candle](https://github.com/huggingface/candle):
//! softmax over the last dimension (plain, and attention-style with scale, additive mask and
//! causal masking), RMSNorm, and residual-add + RMSNorm. Every op has a forward *and* a
//! backward pass, so gradients flow through `Tensor::backward` (Candle's own fused
//! `softmax_last_dim`/`rms_norm` silently drop them).
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use candle_fused::prelude::*;
//!
//! let x = Var::randn(0f32, 1., (2, 8, 64), &Device::Cpu)?;
//! let w = Var::ones(64, candle_core::DType::F32, &Device::Cpu)?;
//! let y = x.rms_norm_fused(&w, 1e-6)?.softmax_fused()?;
//! let grads = (y.sqr()?.sum_all()?).backward()?;
//! assert!(grads.get(&w).is_some());
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! Layout: one folder per op under [`ops`] (the Candle `CustomOp` with its CPU forward, its
//! backward and, with the `cuda` feature, its CUDA kernel). Shared pieces live once:
//! argument checks in `validate`, the CPU row drivers in `cpu` and their runtime-dispatched
//! vector math in `simd`, the CUDA
//! launch helpers in `cuda`.

pub mod config;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod nn;
pub mod ops;
#[doc(hidden)]
pub mod poison;
pub mod prelude;
pub(crate) mod seam;
pub(crate) mod simd;
pub(crate) mod validate;

pub use config::{KernelConfig, Kernels, SimdLevel};
pub use prelude::FusedOps;

/// The README's Rust example, compiled and run as a doctest.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
