//! Peak device memory of the training bench: the high-water mark of the CUDA memory pool
//! Candle allocates from (nothing on the CPU, where the RSS and the counting allocator count).

use candle_core::{Device, Result};

pub struct Pool {
    #[cfg(feature = "cuda")]
    pool: Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool>,
}

#[cfg(not(feature = "cuda"))]
impl Pool {
    pub fn new(_dev: &Device) -> Result<Self> {
        Ok(Self {})
    }
    pub fn reset_peak(&self) -> Result<()> {
        Ok(())
    }
    pub fn peak_mb(&self) -> Result<Option<f64>> {
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
impl Pool {
    pub fn new(dev: &Device) -> Result<Self> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let Device::Cuda(_) = dev else {
            return Ok(Self { pool: None });
        };
        let ctx = dev.as_cuda_device()?.cuda_stream().context().clone();
        ctx.bind_to_thread()
            .map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a driver query on the context's device with a valid out-pointer.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            candle_core::bail!("cuDeviceGetDefaultMemPool: {r:?}")
        }
        Ok(Self { pool: Some(pool) })
    }
    fn attr(
        &self,
        a: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
        set: Option<u64>,
    ) -> Result<Option<u64>> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let Some(pool) = self.pool else {
            return Ok(None);
        };
        let mut v: u64 = set.unwrap_or(0);
        let p = &mut v as *mut u64 as *mut std::ffi::c_void;
        // SAFETY: the pool is the device's default pool; `p` points to a u64 as the attribute needs.
        let r = unsafe {
            if set.is_some() {
                sys::cuMemPoolSetAttribute(pool, a, p)
            } else {
                sys::cuMemPoolGetAttribute(pool, a, p)
            }
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            candle_core::bail!("cuMemPool attribute {a:?}: {r:?}")
        }
        Ok(Some(v))
    }
    pub fn reset_peak(&self) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        self.attr(CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0))
            .map(|_| ())
    }
    pub fn peak_mb(&self) -> Result<Option<f64>> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        Ok(self
            .attr(CU_MEMPOOL_ATTR_USED_MEM_HIGH, None)?
            .map(|b| b as f64 / (1 << 20) as f64))
    }
}
