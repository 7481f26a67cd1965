//! Peak memory of a call, for the bench rows that report it (the linear cross-entropy).
//!
//! * CPU: [`Counting`], a global allocator that forwards to the system allocator and counts
//!   the bytes live and their high-water mark; the `candle-fused` binary installs it. Where it
//!   is not installed (criterion benches, tests) nothing is counted and [`peak_during`] gives
//!   `None`.
//! * CUDA: the high-water mark of the device's default memory pool (Candle allocates from it
//!   with `cuMemAllocAsync`), reset before the call.
//!
//! Either way the result is the peak **above** what was live before the call: what the call
//! itself needs (its outputs included).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::{Device, Result};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static USED: AtomicBool = AtomicBool::new(false);

/// The counting global allocator (install with `#[global_allocator]`).
pub struct Counting;

fn grow(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call forwards to the system allocator unchanged; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        USED.store(true, Ordering::Relaxed);
        let p = System.alloc(l);
        if !p.is_null() {
            grow(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        USED.store(true, Ordering::Relaxed);
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            grow(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            if new >= l.size() {
                grow(new - l.size());
            } else {
                CURRENT.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

/// Runs `f` and returns its result with the peak bytes allocated above what was live before
/// (`None` where nothing is counted: a CPU run without [`Counting`] installed).
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
            if !USED.load(Ordering::Relaxed) {
                return Ok((f()?, None));
            }
            let base = CURRENT.load(Ordering::Relaxed);
            PEAK.store(base, Ordering::Relaxed);
            let r = f()?;
            Ok((r, Some(PEAK.load(Ordering::Relaxed).saturating_sub(base))))
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
