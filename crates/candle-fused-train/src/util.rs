//! Shared helpers: error construction (`err`, `fail!`), atomic file writes (temp + rename),
//! and the seeded SplitMix64 RNG used for initialisation, dropout, data shuffling and sampling
//! (its whole state is one `u64`, so checkpoints store it exactly).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Result, Tensor};

/// An error whose message starts with `what: `.
pub(crate) fn err(what: &str, msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what}: {msg}"))
}

/// `return Err(err(what, format!(..)))`.
macro_rules! fail {
    ($what:expr, $($arg:tt)*) => {
        return Err($crate::util::err($what, format!($($arg)*)))
    };
}
pub(crate) use fail;

/// Adds `context` in front of an error's message.
pub(crate) trait Context<T> {
    fn context(self, what: &str, context: impl std::fmt::Display) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: &str, context: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| err(what, format!("{context}: {e}")))
    }
}

/// The temporary name `path` is written under before the rename: `.<name>.tmp` in the same
/// directory (so the rename stays on one file system).
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, flushed and
/// synced, then renamed over `path`. On any error the temporary is removed and `path` is left
/// as it was (a full disk never leaves a half-written file under the final name).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })
}

/// Atomic write through a closure that writes the file at the temporary path it is given.
pub(crate) fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<()> {
    const WHAT: &str = "write";
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).context(WHAT, format!("cannot create {}", dir.display()))?;
    }
    let tmp = temp_path(path);
    let res = write(&tmp).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        fail!(WHAT, "cannot write {}: {e}", path.display())
    }
    Ok(())
}

/// Saves `tensors` as a safetensors file at `path`, atomically (see [`write_atomic`]), with
/// optional string metadata.
pub(crate) fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        views.push((name.clone(), t.contiguous()?));
    }
    let bytes = safetensors::serialize(views.iter().map(|(n, t)| (n.as_str(), t)), metadata)
        .context("write", format!("cannot serialise {}", path.display()))?;
    write_atomic(path, &bytes)
}

/// SplitMix64: a tiny, fast, well-mixed generator whose whole state is one `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMix64 {
    /// The state (what a checkpoint stores).
    pub state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for the stream `(seed, a, b)`: independent streams per layer and module.
    pub fn keyed(seed: u64, a: u64, b: u64) -> Self {
        let mut g = Self::new(seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let x = g.next_u64() ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        Self::new(x)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Shuffles `v` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Keeps freed memory in the process, so that each training step (or kernel call) reuses the
/// pages of the one before instead of faulting in fresh zeroed pages from the kernel (glibc on
/// Linux; elsewhere nothing is done and `false` is returned). A step frees and allocates the
/// same buffers every time; glibc hands chunks above its mmap threshold back to the kernel on
/// free (and trims the top of its heap), so each step paid page faults and kernel page zeroing
/// again: on the CPU training bench (`cpu-h256`, 10 steps) 244k page faults and 7.2 s of CPU
/// time, 29k and 6.4–6.7 s with a 32 MiB mmap threshold. Sets `M_MMAP_MAX` to 0 (no chunk is
/// mmap'ed, so even outputs above glibc's largest mmap threshold of 32 MiB come from the heap:
/// the op bench's 64 MiB softmax output at [4096, 4096] f32 took 15.5 ms per forward with
/// fresh pages, 4.8 ms from the heap) and `M_TRIM_THRESHOLD` to 2 GiB (the heap is not shrunk
/// until that much is free), both process-wide; the resident set stays near its peak, as with
/// PyTorch's caching allocators. `candle-fused finetune` and the benches call it (`bench
/// --host-heap release` does not); a Rust program that trains can call it once before its
/// first step.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes glibc's allocation parameters; no memory is touched.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Keeps freed device memory in the process, as [`keep_freed_memory`] does for host memory:
/// Candle allocates with `cuMemAllocAsync` from the device's default memory pool, whose release
/// threshold is 0, so every synchronisation (each training step reads its loss back) hands
/// the freed memory back to the driver and the next step maps it afresh. Sets the release
/// threshold to its maximum (freed memory stays mapped in the pool for reuse, like PyTorch's
/// caching allocator). Returns `false` for a CPU device (nothing to do); `finetune` and the
/// training bench call it once the device exists.
pub fn keep_freed_device_memory(device: &candle_core::Device) -> candle_core::Result<bool> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => {
            use candle_core::cuda_backend::cudarc::driver::sys;
            let ctx = d.cuda_stream().context().clone();
            let fail = |what: &str, r: sys::CUresult| {
                candle_core::Error::Msg(format!("keep_freed_device_memory: {what} failed: {r:?}"))
            };
            ctx.bind_to_thread()
                .map_err(|e| candle_core::Error::Msg(format!("keep_freed_device_memory: {e:?}")))?;
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            let mut threshold: u64 = u64::MAX;
            // SAFETY: plain driver calls on the context's device with valid out-pointers.
            unsafe {
                let r = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
                if r != sys::CUresult::CUDA_SUCCESS {
                    return Err(fail("cuDeviceGetDefaultMemPool", r));
                }
                let r = sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut threshold as *mut u64 as *mut std::ffi::c_void,
                );
                if r != sys::CUresult::CUDA_SUCCESS {
                    return Err(fail("cuMemPoolSetAttribute", r));
                }
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    /// glibc accepts both thresholds (an out-of-range value makes mallopt return 0).
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn keep_freed_memory_is_accepted_by_glibc() {
        assert!(super::keep_freed_memory());
    }

    /// A CPU device has no device pool: nothing to do, no error.
    #[test]
    fn keep_freed_device_memory_is_a_no_op_on_the_cpu() {
        assert!(!super::keep_freed_device_memory(&candle_core::Device::Cpu).unwrap());
    }
}
