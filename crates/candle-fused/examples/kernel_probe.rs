//! A quick kernel-timing probe for tuning (the real benchmark is `candle-fused bench`):
//! medians of synchronized timings of each op's forward and standalone backward on a few large
//! shapes, with the device copy bandwidth measured in the same run.
//! `cargo run --release --features cuda --example kernel_probe`

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_fused::ops;
use candle_fused_testkit::testing;

fn median_us(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        let out = f()?;
        dev.synchronize()?;
        ts.push(t.elapsed().as_secs_f64() * 1e6);
        drop(out);
    }
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(ts[reps / 2])
}

fn main() -> Result<()> {
    let dev = if candle_core::utils::cuda_is_available() {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let big = testing::randn(&[1 << 28], 1.0, DType::F32, &dev)?;
    let copy = median_us(&dev, 10, || big.copy())?;
    let copy_gbps = (2 * 4 * (1usize << 28)) as f64 / copy / 1e3;
    println!("copy: {copy:.0} us, {copy_gbps:.0} GB/s (read + write)");
    drop(big);
    let shapes: &[(&[usize], DType)] = &[
        (&[1, 128, 1024], DType::F32),
        (&[4096, 4096], DType::F32),
        (&[4096, 4096], DType::BF16),
        (&[32768, 4096], DType::BF16),
        (&[8192, 32768], DType::BF16),
        (&[16384, 8192], DType::F32),
        (&[1024, 262144], DType::F32),
    ];
    println!(
        "{:<14} {:<18} {:<5} {:>9} {:>8} {:>6}",
        "op", "shape", "dtype", "us", "GB/s", "%copy"
    );
    // Optional argument: only the shape with this index (for profiling one case).
    let only: Option<usize> = std::env::args().nth(1).and_then(|a| a.parse().ok());
    for (i, &(shape, dt)) in shapes.iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let n: usize = shape.iter().product();
        let d = *shape.last().unwrap();
        let es = dt.size_in_bytes();
        let x = testing::randn(shape, 1.0, dt, &dev)?;
        let r = testing::randn(shape, 1.0, dt, &dev)?;
        let dy = testing::randn(shape, 1.0, dt, &dev)?;
        let w = testing::rand(&[d], 0.5, 1.5, dt, &dev)?;
        let y = ops::softmax_last_dim(&x)?;
        let s = (&x + &r)?;
        // PROBE_OPS: only rows whose name starts with one of these comma-separated prefixes.
        let ops_env = std::env::var("PROBE_OPS").unwrap_or_default();
        let wanted = |name: &str| {
            ops_env.is_empty() || ops_env.split(',').any(|p| name.starts_with(p.trim()))
        };
        let row = |name: &str, bytes: usize, f: &mut dyn FnMut() -> Result<f64>| -> Result<()> {
            if !wanted(name) {
                return Ok(());
            }
            let us = f()?;
            let gbps = bytes as f64 / us / 1e3;
            println!(
                "{name:<14} {:<18} {:<5} {us:>9.1} {gbps:>8.0} {:>5.0}%",
                format!("{shape:?}"),
                format!("{dt:?}"),
                100.0 * gbps / copy_gbps
            );
            Ok(())
        };
        row("softmax fwd", 2 * n * es, &mut || {
            median_us(&dev, 20, || ops::softmax_last_dim(&x))
        })?;
        row("softmax bwd", 3 * n * es, &mut || {
            median_us(&dev, 20, || ops::softmax_backward(&y, &dy, 1.0))
        })?;
        row("rms fwd", 2 * n * es, &mut || {
            median_us(&dev, 20, || ops::rms_norm(&x, Some(&w), 1e-6))
        })?;
        row("rms bwd", 3 * n * es, &mut || {
            median_us(&dev, 20, || {
                Ok(ops::rms_norm_backward(&x, Some(&w), &dy, 1e-6)?.0)
            })
        })?;
        row("add_rms fwd", 4 * n * es, &mut || {
            median_us(&dev, 20, || Ok(ops::add_rms_norm(&x, &r, &w, 1e-6)?.0))
        })?;
        row("add_rms bwd", 4 * n * es, &mut || {
            median_us(&dev, 20, || {
                Ok(ops::add_rms_norm_backward(&s, &w, &dy, &r, 1e-6)?.0)
            })
        })?;
        row("candle sm", 2 * n * es, &mut || {
            median_us(&dev, 20, || candle_nn::ops::softmax_last_dim(&x))
        })?;
        row("candle rms", 2 * n * es, &mut || {
            median_us(&dev, 20, || candle_nn::ops::rms_norm(&x, &w, 1e-6))
        })?;
        if shape == [32768, 4096] && dt == DType::BF16 && wanted("masked") {
            let (b, h, sq) = (32usize, 32usize, 2048usize);
            // 2^32 elements: Candle's own elementwise kernels index with u32, so build the
            // scores by concatenating random [1, H, S, S] blocks.
            let blocks: Vec<Tensor> = (0..4)
                .map(|_| Tensor::randn(0f32, 1., (1, h, sq, sq), &dev)?.to_dtype(dt))
                .collect::<Result<_>>()?;
            let parts: Vec<&Tensor> = (0..b).map(|i| &blocks[i % 4]).collect();
            let xa = Tensor::cat(&parts, 0)?;
            let na = b * h * sq * sq;
            let scale = 0.125;
            println!("-- masked softmax [32,32,2048,2048] bf16");
            row("masked causal", 2 * na * es, &mut || {
                median_us(&dev, 10, || ops::masked_softmax(&xa, scale, None, true))
            })?;
            let m = testing::randn(&[sq, sq], 1.0, dt, &dev)?;
            row("masked [S,T]", 2 * na * es + sq * sq * es, &mut || {
                median_us(&dev, 10, || {
                    ops::masked_softmax(&xa, scale, Some(&m), false)
                })
            })?;
        }
    }
    Ok(())
}
