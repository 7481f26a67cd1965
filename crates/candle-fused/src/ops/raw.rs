//! Running kernels outside Candle's autograd, on the storages of any number of tensors, and
//! wrapping results as fresh (untracked) tensors. The backward kernels use it: gradients are
//! not differentiated again, and it lifts the three-inputs/one-output limit of `CustomOp`.

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, Device, Shape, Storage, Tensor};

use crate::validate::err;

/// The CPU storage of `s` (all inputs of a kernel share one device, checked by the caller).
pub(crate) fn cpu<'a>(s: &'a Storage, arg: &str) -> candle_core::Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => Err(err("backward", format!("{arg} is not on the CPU like x"))),
    }
}

/// The CUDA storage of `s`.
#[cfg(feature = "cuda")]
pub(crate) fn cuda<'a>(
    s: &'a Storage,
    arg: &str,
) -> candle_core::Result<&'a candle_core::CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => Err(err(
            "backward",
            format!("{arg} is not on the CUDA device like x"),
        )),
    }
}

/// The error for a device without kernels (e.g. Metal, or CUDA without the `cuda` feature).
pub(crate) fn unsupported(op: &str, device: &Device) -> candle_core::Error {
    err(
        op,
        format!(
            "no kernel for device {:?} (built without its feature?)",
            device.location()
        ),
    )
}

/// A fresh contiguous tensor over `storage`, outside the autograd graph.
pub(crate) fn tensor(storage: Storage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}
