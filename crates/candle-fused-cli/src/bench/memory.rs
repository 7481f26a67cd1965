//! Peak memory of a call, for the bench rows that report it (the linear cross-entropy).
//!
//! * CPU: the counting global allocator of [`crate::alloc`] (the `candle-fused` binary
//!   installs it). Where it is not installed (criterion benches, tests) nothing is counted and
//!   [`peak_during`] gives `None`.
//! * CUDA: the high-water mark of the device's default memory pool (Candle allocates from it
//!   with `cuMemAllocAsync`), reset before the call.
//!
//! Either way the result is the peak **above** what was live before the call: what the call
//! itself needs (its outputs included).

use candle_core::{Device, Result};

use crate::alloc;

/// Runs `f` and returns its result with the peak bytes allocated above what was live before
/// (`None` where nothing is counted: a CPU run without the counting allocator installed).
pub fn peak_during<R>(
    device: &Device,
    f: impl FnOnce() -> Result<R>,
) -> Result<(R, Option<usize>)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let base = cuda::reset(device)?;
            let r = f()?;
            let high = cuda::high(device)?;
            Ok((r, Some(high.saturating_sub(base) as usize)))
        }
        _ => {
            if !alloc::installed() {
                return Ok((f()?, None));
            }
            let base = alloc::current();
            alloc::reset_peak();
            let r = f()?;
            Ok((r, Some(alloc::peak().saturating_sub(base))))
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::{Device, Result};

    fn check(r: sys::CUresult, what: &str) -> Result<()> {
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            candle_core::bail!("candle-fused bench: {what} failed: {r:?}")
        }
    }

    fn pool(dev: &Device) -> Result<sys::CUmemoryPool> {
        let stream = dev.as_cuda_device()?.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread()
            .map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
        let mut p: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a plain driver query with a valid out-pointer.
        check(
            unsafe { sys::cuDeviceGetDefaultMemPool(&mut p, ctx.cu_device()) },
            "cuDeviceGetDefaultMemPool",
        )?;
        Ok(p)
    }

    fn attr(dev: &Device, a: sys::CUmemPool_attribute) -> Result<u64> {
        let mut v: u64 = 0;
        // SAFETY: the pool attributes read here are u64s; v is a valid out-pointer.
        check(
            unsafe { sys::cuMemPoolGetAttribute(pool(dev)?, a, &mut v as *mut u64 as *mut _) },
            "cuMemPoolGetAttribute",
        )?;
        Ok(v)
    }

    /// Resets the pool's high-water mark to the bytes in use and returns them.
    pub fn reset(dev: &Device) -> Result<u64> {
        dev.synchronize()?;
        let mut zero: u64 = 0;
        let a = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        // SAFETY: resetting USED_MEM_HIGH takes a u64 zero.
        check(
            unsafe { sys::cuMemPoolSetAttribute(pool(dev)?, a, &mut zero as *mut u64 as *mut _) },
            "cuMemPoolSetAttribute",
        )?;
        attr(
            dev,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        )
    }

    /// The pool's high-water mark since the last [`reset`].
    pub fn high(dev: &Device) -> Result<u64> {
        dev.synchronize()?;
        attr(dev, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }
}
