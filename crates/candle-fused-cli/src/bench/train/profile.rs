//! The GEMM side of the training bench: the GEMM rate the efficiency is measured against, and
//! the time of each GEMM shape of the step on its own (the profile: how much of a step the
//! matmuls alone take at the speed of `ops::matmul` (on the CPU the `gemm` crate, as Candle's
//! matmul, with batched products spread over the threads one per task; on CUDA Candle's
//! cuBLAS matmul), and so how much is everything else).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use serde_json::{json, Value};

use super::shapes::{gemms, Gemm, Shape};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `[batch ×] [m, k] x [k, n]` in `dtype` (random operands), `reps` timed
/// after `warm` untimed.
fn time_gemm(g: &Gemm, dtype: DType, dev: &Device, warm: usize, reps: usize) -> Result<f64> {
    let shape = |a: usize, b: usize| {
        if g.batch == 1 {
            vec![a, b]
        } else {
            vec![g.batch, a, b]
        }
    };
    let a = Tensor::randn(0f32, 1.0, shape(g.m, g.k), dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, shape(g.k, g.n), dev)?.to_dtype(dtype)?;
    let mut t = vec![];
    for i in 0..warm + reps {
        dev.synchronize()?;
        let t0 = Instant::now();
        // The step's matmul entry point (batched products: one head per task on the CPU).
        let c = candle_fused::ops::matmul(&a, &b, false, false)?;
        dev.synchronize()?;
        if i >= warm {
            t.push(t0.elapsed().as_secs_f64());
        }
        drop(c);
    }
    Ok(median(t))
}

/// TFLOP/s of `ops::matmul` on the GEMM-rate shape (CPU: the step's MLP up-projection
/// `[B*T, hidden] x [hidden, intermediate]`; CUDA: 8192³), median of 20 after 5 warm-ups.
pub fn gemm_rate(s: &Shape, m: usize, dtype: DType, dev: &Device) -> Result<(f64, [usize; 3])> {
    let (m, k, n) = if dev.is_cuda() {
        (8192, 8192, 8192)
    } else {
        (m, s.hidden, s.intermediate)
    };
    let g = Gemm {
        what: "rate".into(),
        batch: 1,
        m,
        k,
        n,
        count: 1,
    };
    Ok((
        g.flops() / time_gemm(&g, dtype, dev, 5, 20)? / 1e12,
        [m, k, n],
    ))
}

/// Every GEMM shape of the step timed alone: (total ms of all the step's GEMMs at these speeds,
/// the per-shape rows). On CUDA, shapes with an operand of 2^32 elements or more are listed as
/// skipped and left out of the total.
pub fn gemm_profile(
    s: &Shape,
    batch: usize,
    seq: usize,
    rank: usize,
    dtype: DType,
    dev: &Device,
) -> Result<(f64, Value)> {
    let mut total = 0.0;
    let mut rows = vec![];
    for g in gemms(s, batch, seq, rank) {
        // Candle's CUDA kernels count elements in u32 (`randn`, `to_dtype` of 2^32 elements
        // fail or stall: seen on the H200, 2026-12-02), so such shapes are not timed here.
        let biggest = (g.batch * g.m * g.k)
            .max(g.batch * g.k * g.n)
            .max(g.batch * g.m * g.n);
        if dev.is_cuda() && biggest >= u32::MAX as usize {
            rows.push(json!({ "what": g.what, "batch": g.batch, "m": g.m, "k": g.k, "n": g.n, "count": g.count,
                              "skipped": "an operand of 2^32 elements or more (Candle's CUDA element counts are u32)" }));
            continue;
        }
        let sec = time_gemm(&g, dtype, dev, 2, 5)?;
        total += sec * g.count as f64;
        rows.push(json!({ "what": g.what, "batch": g.batch, "m": g.m, "k": g.k, "n": g.n, "count": g.count,
                          "ms_each": sec * 1e3, "tflops": g.flops() / g.count as f64 / sec / 1e12 }));
    }
    Ok((total * 1e3, Value::Array(rows)))
}
