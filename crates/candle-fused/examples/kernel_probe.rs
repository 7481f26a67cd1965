//! A quick kernel-timing probe for tuning (the real benchmark is `candle-fused bench`):
//! medians of synchronized timings of each op's forward and standalone backward on a few large
//! shapes, for every kernel configuration of `KernelConfig::candidates()` (its name printed
//! beside each timing), with the device copy bandwidth measured in the same run.
//!
//! `cargo run --release --features cuda --example kernel_probe -- [SHAPE] [--ops P,..] [--configs N,..]`
//! - `SHAPE`: only the shape with this index (for profiling one case);
//! - `--ops`: only rows whose name starts with one of these prefixes (e.g. `rms,softmax fwd`);
//! - `--configs`: only these configurations (default: all candidates).
//!
//! Inputs come from the testkit's seeded streams (`CANDLE_FUSED_SEED` reruns them).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_fused::{KernelConfig, Kernels};
use candle_fused_testkit::rng::{self, Rng};

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
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[reps / 2])
}

/// The command line: `[SHAPE] [--ops P,..] [--configs N,..]`.
struct Args {
    only: Option<usize>,
    ops: Vec<String>,
    configs: Vec<String>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        only: None,
        ops: vec![],
        configs: vec![],
    };
    let mut it = std::env::args().skip(1);
    let list = |v: Option<String>| -> Vec<String> {
        v.unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--ops" => a.ops = list(it.next()),
            "--configs" => a.configs = list(it.next()),
            s => match s.parse() {
                Ok(i) => a.only = Some(i),
                Err(_) => candle_core::bail!(
                    "kernel_probe: unknown argument {s:?} (expected SHAPE, --ops, --configs)"
                ),
            },
        }
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args = args()?;
    let seed = rng::init().map_err(candle_core::Error::msg)?;
    let dev = if candle_core::utils::cuda_is_available() {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let mut r = Rng::stream("kernel_probe");
    let big = r.randn_on(&[1 << 28], 1.0, DType::F32, &dev)?;
    let copy = median_us(&dev, 10, || big.copy())?;
    let copy_gbps = (2 * 4 * (1usize << 28)) as f64 / copy / 1e3;
    println!("seed {seed}; copy: {copy:.0} us, {copy_gbps:.0} GB/s (read + write)");
    drop(big);
    let configs: Vec<(&str, Kernels)> = KernelConfig::candidates()
        .into_iter()
        .filter(|(n, _)| args.configs.is_empty() || args.configs.iter().any(|c| c == n))
        .map(|(n, c)| (n, Kernels::new(c)))
        .collect();
    if configs.is_empty() {
        let names: Vec<&str> = KernelConfig::candidates().iter().map(|c| c.0).collect();
        candle_core::bail!("kernel_probe: no such --configs, expected some of {names:?}")
    }
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
        "{:<14} {:<18} {:<5} {:<18} {:>9} {:>8} {:>6}",
        "op", "shape", "dtype", "config", "us", "GB/s", "%copy"
    );
    let wanted = |name: &str| args.ops.is_empty() || args.ops.iter().any(|p| name.starts_with(p));
    for (i, &(shape, dt)) in shapes.iter().enumerate() {
        if args.only.is_some_and(|o| o != i) {
            continue;
        }
        let n: usize = shape.iter().product();
        let d = *shape.last().unwrap_or(&1);
        let es = dt.size_in_bytes();
        let x = r.randn_on(shape, 1.0, dt, &dev)?;
        let res = r.randn_on(shape, 1.0, dt, &dev)?;
        let dy = r.randn_on(shape, 1.0, dt, &dev)?;
        let w = r.rand_on(&[d], 0.5, 1.5, dt, &dev)?;
        let s = (&x + &res)?;
        let masked = if shape == [32768, 4096] && dt == DType::BF16 && wanted("masked") {
            let (b, h, sq) = (32usize, 32usize, 2048usize);
            // 2^32 elements: Candle's own elementwise kernels index with u32, so build the
            // scores by concatenating random [1, H, S, S] blocks.
            let blocks: Vec<Tensor> = (0..4)
                .map(|_| r.randn_on(&[1, h, sq, sq], 1.0, dt, &dev))
                .collect::<Result<_>>()?;
            let parts: Vec<&Tensor> = (0..b).map(|i| &blocks[i % 4]).collect();
            Some((
                Tensor::cat(&parts, 0)?,
                r.randn_on(&[sq, sq], 1.0, dt, &dev)?,
            ))
        } else {
            None
        };
        for (cname, k) in &configs {
            let y = k.softmax_last_dim(&x)?;
            let row =
                |name: &str, bytes: usize, f: &mut dyn FnMut() -> Result<f64>| -> Result<()> {
                    if !wanted(name) {
                        return Ok(());
                    }
                    let us = f()?;
                    let gbps = bytes as f64 / us / 1e3;
                    println!(
                        "{name:<14} {:<18} {:<5} {cname:<18} {us:>9.1} {gbps:>8.0} {:>5.0}%",
                        format!("{shape:?}"),
                        format!("{dt:?}"),
                        100.0 * gbps / copy_gbps
                    );
                    Ok(())
                };
            row("softmax fwd", 2 * n * es, &mut || {
                median_us(&dev, 20, || k.softmax_last_dim(&x))
            })?;
            row("softmax bwd", 3 * n * es, &mut || {
                median_us(&dev, 20, || k.softmax_backward(&y, &dy, 1.0))
            })?;
            row("rms fwd", 2 * n * es, &mut || {
                median_us(&dev, 20, || k.rms_norm(&x, Some(&w), 1e-6))
            })?;
            row("rms bwd", 3 * n * es, &mut || {
                median_us(&dev, 20, || {
                    Ok(k.rms_norm_backward(&x, Some(&w), &dy, 1e-6)?.0)
                })
            })?;
            row("add_rms fwd", 4 * n * es, &mut || {
                median_us(&dev, 20, || Ok(k.add_rms_norm(&x, &res, &w, 1e-6)?.0))
            })?;
            row("add_rms bwd", 4 * n * es, &mut || {
                median_us(&dev, 20, || {
                    Ok(k.add_rms_norm_backward(&s, &w, &dy, &res, 1e-6)?.0)
                })
            })?;
            if let Some((xa, m)) = &masked {
                let na = xa.elem_count();
                let scale = 0.125;
                println!("-- masked softmax [32,32,2048,2048] bf16, {cname}");
                row("masked causal", 2 * na * es, &mut || {
                    median_us(&dev, 10, || k.masked_softmax(xa, scale, None, true))
                })?;
                row(
                    "masked [S,T]",
                    2 * na * es + m.elem_count() * es,
                    &mut || median_us(&dev, 10, || k.masked_softmax(xa, scale, Some(m), false)),
                )?;
            }
        }
        // Candle's own fused ops once per shape, as the peer.
        let row_peer = |name: &str, us: f64| {
            let gbps = (2 * n * es) as f64 / us / 1e3;
            println!(
                "{name:<14} {:<18} {:<5} {:<18} {us:>9.1} {gbps:>8.0} {:>5.0}%",
                format!("{shape:?}"),
                format!("{dt:?}"),
                "candle",
                100.0 * gbps / copy_gbps
            );
        };
        if wanted("candle sm") {
            row_peer(
                "candle sm",
                median_us(&dev, 20, || candle_nn::ops::softmax_last_dim(&x))?,
            );
        }
        if wanted("candle rms") {
            row_peer(
                "candle rms",
                median_us(&dev, 20, || candle_nn::ops::rms_norm(&x, &w, 1e-6))?,
            );
        }
    }
    Ok(())
}
