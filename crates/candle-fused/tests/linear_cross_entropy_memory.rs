//! Peak extra memory of the linear cross-entropy on the CPU, measured by a counting global
//! allocator (this binary holds only this test, so nothing else allocates meanwhile).
//!
//! Case: 8192 tokens, hidden 64, vocabulary 65536, f32. The full logits would take
//! 8192·65536·4 B = 2 GiB (and the composed backward several times that). The bound, from what
//! the chunk loop holds at once (`C` = chunk rows, `e` = 4 bytes):
//!
//! ```text
//! without dW:  dh (N·H·e) + logits chunk (C·V·e) + its dh_c (C·H·e) + targets (N·16 B)
//!              + row losses (N·e) + 8 MiB slack (GEMM packing buffers, rayon, the harness)
//! with dW:     the above + the f32 accumulator (V·H·e) + the dW GEMM's packed copy of
//!              dlogitsᵀ (C·V·e: the gemm crate packs its left operand)
//! ```
//!
//! With the default chunk (C = 128 rows here: N·H/V = 8, raised to the 128-row floor) that is
//! about 42 MiB without dW and 90 MiB with it (measured: 34 and 66 MiB), under 5% of the full
//! logits.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_fused::ops::{
    self, linear_cross_entropy_chunk as default_chunk,
    linear_cross_entropy_chunk_dw as default_chunk_dw, CrossEntropyConfig,
};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grow(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::SeqCst) + n;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call forwards to the system allocator unchanged; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            grow(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            grow(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        CURRENT.fetch_sub(l.size(), Ordering::SeqCst);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            if new >= l.size() {
                grow(new - l.size());
            } else {
                CURRENT.fetch_sub(l.size() - new, Ordering::SeqCst);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`, returning its result and the peak bytes allocated above what was live before.
fn peak_extra<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let r = f();
    (r, PEAK.load(Ordering::SeqCst) - base)
}

const MIB: f64 = 1024.0 * 1024.0;

#[test]
fn peak_extra_memory_is_bounded_by_the_chunk() {
    let (n, hd, v) = (8192usize, 64usize, 65536usize);
    let dev = Device::Cpu;
    let h = Tensor::randn(0f32, 1.0, (n, hd), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.125, (v, hd), &dev).unwrap();
    let t = Tensor::rand(0f32, v as f32, n, &dev)
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .clamp(0i64, v as i64 - 1)
        .unwrap();
    let cfg = CrossEntropyConfig::default();
    let c = default_chunk(n, hd, v);
    assert_eq!(c, 128);
    // With dW the chunk grows to half the accumulator's bytes (H·4/(2·4) = 32 rows here), but
    // never below the default.
    let c_dw = default_chunk_dw(n, hd, v, DType::F32);
    assert_eq!(c_dw, 128);
    // Warm-up on a few rows: thread pools and per-thread GEMM buffers exist before measuring.
    let hs = h.narrow(0, 0, 64).unwrap();
    let ts = t.narrow(0, 0, 64).unwrap();
    ops::linear_cross_entropy_forward_backward(&hs, &w, &ts, &cfg, None, true, 1.0).unwrap();

    let e = 4usize;
    let slack = 8 << 20;
    let full_logits = n * v * e;
    let base_bound = n * hd * e + c * v * e + c * hd * e + n * 16 + n * e + slack;
    for need_dw in [false, true] {
        let bound = base_bound
            + if need_dw {
                v * hd * e + c_dw * v * e
            } else {
                0
            };
        let t0 = std::time::Instant::now();
        let (r, extra) = peak_extra(|| {
            ops::linear_cross_entropy_forward_backward(&h, &w, &t, &cfg, None, need_dw, 1.0)
                .unwrap()
        });
        let loss = r.loss.to_scalar::<f32>().unwrap();
        eprintln!(
            "dW {need_dw}: peak extra {:.1} MiB, bound {:.1} MiB, full logits {:.0} MiB, loss {loss}, {:.1} s",
            extra as f64 / MIB,
            bound as f64 / MIB,
            full_logits as f64 / MIB,
            t0.elapsed().as_secs_f64()
        );
        // Random logits of std ~1: the loss is about ln V + 1/2.
        assert!(
            loss.is_finite() && (loss - (v as f32).ln()).abs() < 2.0,
            "loss {loss}"
        );
        assert!(
            extra <= bound,
            "dW {need_dw}: peak extra allocation {:.1} MiB exceeds the bound {:.1} MiB",
            extra as f64 / MIB,
            bound as f64 / MIB
        );
        assert!(extra * 20 < full_logits, "more than 5% of the full logits");
        drop(r);
    }
}
