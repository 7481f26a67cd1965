//! Output buffers of the CPU kernels: [`alloc`] (zeroed, or NaN under poison) for outputs a
//! kernel fills itself, and [`OutBuf`] for outputs the row drivers fill: each task first
//! writes its own rows (zeros, or NaN under poison) and then runs the kernel on them, so an
//! output is initialised once, in parallel and while its rows are in cache, instead of being
//! zeroed by one thread before the kernel starts.
//!
//! Why it matters: a zeroed allocation is free only when it is fresh pages (calloc of a new
//! mapping); once freed memory stays in the heap ([`crate::keep_freed_host_memory`]), calloc
//! zeroes it with a single-threaded memset, an extra pass over the output.

use super::Elem;

/// A raw output pointer shared by the tasks of the row drivers, which write disjoint rows.
#[derive(Clone, Copy)]
pub(super) struct OutPtr<T>(pub(super) *mut T);
// SAFETY: each task of a row driver derives slices for its own, disjoint, rows only.
unsafe impl<T: Send> Send for OutPtr<T> {}
unsafe impl<T: Sync> Sync for OutPtr<T> {}

/// An output buffer: NaN when `poison` is on (tests, [`crate::KernelConfig::poison`]), else
/// zeros from a zeroed allocation (calloc: a large buffer is fresh, untouched pages, which
/// [`huge_pages`] can still back with 2 MiB pages). `vec![T::zero(); n]` does that only for
/// the primitive types: for bf16/f16 it writes every element on one thread, first-touching
/// 4 KiB pages.
pub(crate) fn alloc<T: Elem>(n: usize, poison: bool) -> Vec<T> {
    if poison {
        vec![T::nan(); n]
    } else {
        let v: Vec<T> = bytemuck::allocation::zeroed_vec(n);
        huge_pages(v.as_ptr(), std::mem::size_of_val(v.as_slice()));
        v
    }
}

/// An output of `n` elements that a row driver ([`super::rows_at`], [`super::par_rows`])
/// fills: room for `n` elements, none initialised until the driver's tasks write their rows.
/// [`OutBuf::into_vec`] hands the filled buffer on.
pub(crate) struct OutBuf<T> {
    v: Vec<T>,
    n: usize,
    poison: bool,
}

impl<T: Elem> OutBuf<T> {
    pub(crate) fn new(n: usize, poison: bool) -> Self {
        let v: Vec<T> = Vec::with_capacity(n);
        huge_pages(v.as_ptr(), n * std::mem::size_of::<T>());
        Self { v, n, poison }
    }

    pub(crate) fn len(&self) -> usize {
        self.n
    }

    pub(super) fn ptr(&mut self) -> OutPtr<T> {
        OutPtr(self.v.as_mut_ptr())
    }

    pub(super) fn poison(&self) -> bool {
        self.poison
    }

    /// Marks the buffer filled.
    ///
    /// # Safety
    /// Every element `0..len()` has been written (through [`init_range`] and the kernel).
    pub(super) unsafe fn assume_filled(&mut self) {
        // SAFETY: the capacity is `n` and the caller guarantees all `n` elements are written.
        unsafe { self.v.set_len(self.n) }
    }

    /// The filled buffer (a driver ran over it).
    pub(crate) fn into_vec(self) -> Vec<T> {
        assert_eq!(
            self.v.len(),
            self.n,
            "output buffer not filled by a row driver"
        );
        self.v
    }
}

/// Writes zeros (NaN under `poison`) to elements `start..end` of an output.
///
/// # Safety
/// `p` points to an allocation of at least `end` elements of `T`, and no other thread
/// accesses `start..end` meanwhile.
pub(super) unsafe fn init_range<T: Elem>(p: OutPtr<T>, start: usize, end: usize, poison: bool) {
    if end <= start {
        return;
    }
    // SAFETY: `start..end` lies inside the allocation (caller); an all-zero byte pattern is a
    // valid `T` (`bytemuck::Zeroable`), and writing through the raw pointer initialises it.
    unsafe {
        let base = p.0.add(start);
        if poison {
            for i in 0..end - start {
                base.add(i).write(T::nan());
            }
        } else {
            std::ptr::write_bytes(base, 0, end - start);
        }
    }
}

/// Outputs of at least this many bytes ask for transparent huge pages.
const HUGE_BYTES: usize = 4 << 20;

/// Asks the kernel to back a large, not yet touched, buffer with 2 MiB pages
/// (`madvise(MADV_HUGEPAGE)` on its 2 MiB-aligned part; Linux only, a hint that may be
/// ignored). A fresh 20 MB output otherwise takes ~4900 page faults when first written, and
/// glibc returns freed large chunks to the system, so a kernel with two such outputs gets new
/// pages on every call: the SwiGLU f32 backward at 1024×4864 took 18.0 ms with 9696 faults per
/// call, 7.7 ms with 1009 after this (its bf16 twin, reusing heap memory, 5.6 ms).
fn huge_pages<T>(start: *const T, len_bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = start as usize;
        if len_bytes < HUGE_BYTES {
            return;
        }
        let lo = start.next_multiple_of(HUGE);
        let hi = (start + len_bytes) / HUGE * HUGE;
        if hi > lo {
            // SAFETY: [lo, hi) lies inside the buffer's allocation, which this process owns;
            // the advice changes how its pages are backed, never their contents.
            unsafe {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, len_bytes, HUGE_BYTES);
}
