//! GPU checks of the linear cross-entropy (module of the single GPU test target `tests/gpu.rs`,
//! behind the `cuda` feature).
//!
//! - [`sweep_vs_reference_and_cpu`]: the linear rows of `check_loss::sweep` (chunks of 1, odd,
//!   more than the tokens and the default, with and without dW) on f32/f16/bf16, vs the f64
//!   reference and vs the CPU backend.
//! - [`large_shapes_vs_composed_f64`]: Llama-3-sized and Qwen2-sized heads (V = 128256 with
//!   H = 4096, V = 151936 with H = 896) against the composed f64 path on the GPU (cuBLAS), loss,
//!   dh and dw, with the rounded-logits floor for bf16.
//! - [`memory_is_chunk_sized`]: the pool's peak while running 8192 tokens × 4096 × 128256 bf16
//!   (no dW) stays near dh + one (1024-row) chunk, far below the 2.1 GB of bf16 logits.
//! - [`device_mismatch`]: `w` or the targets on another device are clear errors.

use candle_core::{DType, Device, Tensor, Var};
use candle_fused::ops::{CrossEntropyConfig, LinearCrossEntropy};
use candle_fused_testkit::check_loss::{self, LossCase, LossOp};
use candle_fused_testkit::{reference, testing};

use super::cross_entropy::{gpu, k, run_loss_cases};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

pub fn sweep_vs_reference_and_cpu() {
    let cases: Vec<LossCase> = check_loss::sweep(&DTYPES)
        .into_iter()
        .filter(|c| matches!(c.op, LossOp::Linear { .. }))
        .collect();
    run_loss_cases(&cases);
}

/// The composed f64 path on the device: `(loss, dh, dw)` of `loss`, on logits rounded to
/// `round` when given.
fn composed64(
    h: &Tensor,
    w: &Tensor,
    t: &Tensor,
    cfg: &CrossEntropyConfig,
    round: Option<DType>,
) -> (Tensor, Tensor, Tensor) {
    let (h, w) = (
        h.to_dtype(DType::F64).unwrap(),
        w.to_dtype(DType::F64).unwrap(),
    );
    let mut logits = h.matmul(&w.t().unwrap()).unwrap();
    if let Some(dt) = round {
        logits = logits.to_dtype(dt).unwrap().to_dtype(DType::F64).unwrap();
    }
    let z = Var::from_tensor(&logits).unwrap();
    let loss = reference::cross_entropy(z.as_tensor(), t, cfg).unwrap();
    let mut dz = loss.backward().unwrap().get(&z).unwrap().clone();
    if let Some(dt) = round {
        dz = dz.to_dtype(dt).unwrap().to_dtype(DType::F64).unwrap();
    }
    let dh = dz.matmul(&w).unwrap();
    let dw = dz.t().unwrap().matmul(&h).unwrap();
    (loss, dh, dw)
}

pub fn large_shapes_vs_composed_f64() {
    let dev = gpu();
    let cfg = CrossEntropyConfig {
        label_smoothing: 0.1,
        ..Default::default()
    };
    for (n, hd, v, dt, train_w) in [
        (256, 4096, 128256, DType::BF16, false),
        (512, 896, 151936, DType::BF16, true),
        (300, 1024, 32000, DType::F32, true),
    ] {
        let h = testing::randn(&[n, hd], 1.0, dt, &dev).unwrap();
        let w = testing::randn(&[v, hd], 2.0 / (hd as f64).sqrt(), dt, &dev).unwrap();
        let t = check_loss::random_targets(&[n], v, 0.2, -100, &dev).unwrap();
        let r: LinearCrossEntropy = k()
            .linear_cross_entropy_forward_backward(&h, &w, &t, &cfg, None, train_w, 1.0)
            .unwrap();
        let (rl, rdh, rdw) = composed64(&h, &w, &t, &cfg, None);
        let half = dt != DType::F32;
        let rounded = half.then(|| composed64(&h, &w, &t, &cfg, Some(dt)));
        let tol = testing::tolerance(dt);
        let floor =
            |ours_ref: &Tensor, pick: &dyn Fn(&(Tensor, Tensor, Tensor)) -> Tensor| -> f64 {
                let fl = rel_err(&ours_ref.to_dtype(dt).unwrap(), ours_ref);
                let rr = rounded
                    .as_ref()
                    .map_or(0.0, |r| rel_err(&pick(r), ours_ref));
                tol.max(2.0 * fl).max(2.0 * rr)
            };
        let check = |what: &str, a: &Tensor, b: &Tensor, t: f64| {
            let e = rel_err(a, b);
            println!(
                "linear_cross_entropy [{n}, {hd}] x V={v} {dt:?} {what}: {e:.3e} (tol {t:.1e}) {}",
                if e <= t { "PASS" } else { "FAIL" }
            );
            assert!(e <= t, "{what}: {e:.3e} > {t:.1e}");
        };
        let tl = if half {
            floor(&rl, &|r| r.0.clone()).max(1e-5)
        } else {
            1e-5
        };
        check("loss", &r.loss, &rl, tl);
        check("dh", &r.dh, &rdh, floor(&rdh, &|r| r.1.clone()));
        if let Some(dw) = &r.dw {
            check("dw", dw, &rdw, floor(&rdw, &|r| r.2.clone()));
        }
    }
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    testing::rel_err(
        &a.to_device(&Device::Cpu).unwrap(),
        &b.to_device(&Device::Cpu).unwrap(),
    )
    .unwrap()
}

/// Bytes in use and the high-water mark of the device's default memory pool (Candle allocates
/// from it with `cuMemAllocAsync`).
mod pool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::Device;

    fn pool(dev: &Device) -> sys::CUmemoryPool {
        let stream = dev.as_cuda_device().unwrap().cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().unwrap();
        let mut p: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a plain driver query with a valid out-pointer.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut p, ctx.cu_device()) };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
        p
    }

    fn attr(dev: &Device, a: sys::CUmemPool_attribute) -> u64 {
        let mut v: u64 = 0;
        // SAFETY: the attribute is a u64 and v is a valid out-pointer.
        let r = unsafe { sys::cuMemPoolGetAttribute(pool(dev), a, &mut v as *mut u64 as *mut _) };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
        v
    }

    /// Resets the high-water mark to the bytes in use; returns them.
    pub fn reset(dev: &Device) -> u64 {
        dev.synchronize().unwrap();
        let mut zero: u64 = 0;
        // SAFETY: resetting USED_MEM_HIGH takes a u64 0.
        let r = unsafe {
            sys::cuMemPoolSetAttribute(
                pool(dev),
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut _,
            )
        };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
        attr(
            dev,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        )
    }

    pub fn high(dev: &Device) -> u64 {
        dev.synchronize().unwrap();
        attr(dev, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }
}

pub fn memory_is_chunk_sized() {
    let dev = gpu();
    let (n, hd, v) = (8192usize, 4096usize, 128256usize);
    let h = testing::randn(&[n, hd], 1.0, DType::BF16, &dev).unwrap();
    let w = testing::randn(&[v, hd], 1.0 / 64.0, DType::BF16, &dev).unwrap();
    let t = check_loss::random_targets(&[n], v, 0.1, -100, &dev).unwrap();
    let cfg = CrossEntropyConfig::default();
    // Warm-up (cuBLAS workspace, kernels loaded).
    k().linear_cross_entropy_forward_backward(
        &h.narrow(0, 0, 64).unwrap(),
        &w,
        &t.narrow(0, 0, 64).unwrap(),
        &cfg,
        None,
        false,
        1.0,
    )
    .unwrap();
    let base = pool::reset(&dev);
    let r = k()
        .linear_cross_entropy_forward_backward(&h, &w, &t, &cfg, None, false, 1.0)
        .unwrap();
    let extra = pool::high(&dev) - base;
    let c = candle_fused::ops::linear_cross_entropy_chunk_on(&dev, n, hd, v, DType::BF16, false);
    assert_eq!(c, 1024, "the GPU default chunk of this head");
    let bound = (n * hd * 2 + 2 * c * v * 2 + c * hd * 2 + n * 16 + (64 << 20)) as u64;
    let full = (n * v * 2) as u64;
    println!(
        "linear CE memory: peak extra {:.1} MiB (bound {:.1} MiB, bf16 logits {:.0} MiB), loss {}",
        extra as f64 / 1048576.0,
        bound as f64 / 1048576.0,
        full as f64 / 1048576.0,
        r.loss
    );
    assert!(extra <= bound, "peak extra {extra} > bound {bound}");
}

pub fn device_mismatch() {
    let dev = gpu();
    let cfg = CrossEntropyConfig::default();
    let h = testing::randn(&[4, 8], 1.0, DType::F32, &dev).unwrap();
    let w = testing::randn(&[10, 8], 1.0, DType::F32, &dev).unwrap();
    let t = check_loss::random_targets(&[4], 10, 0.0, -100, &dev).unwrap();
    let wc = w.to_device(&Device::Cpu).unwrap();
    let e = k()
        .linear_cross_entropy(&h, &wc, &t, &cfg, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("candle-fused linear_cross_entropy:") && e.contains("w is on device"),
        "{e}"
    );
    let tc = t.to_device(&Device::Cpu).unwrap();
    let e = k()
        .linear_cross_entropy_forward_backward(&h, &w, &tc, &cfg, None, true, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("targets is on device"), "{e}");
    println!("linear CE device mismatch: PASS");
}
