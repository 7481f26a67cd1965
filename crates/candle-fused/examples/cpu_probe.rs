//! CPU tuning probe (the real benchmark is `candle-fused bench`): times each CPU kernel at
//! every SIMD level this CPU has and with and without the thread pool, the variants
//! interleaved round by round so they see the same machine load; prints the minimum and the
//! median of the rounds. Inputs rotate among sets of >= 64 MiB so they come from DRAM.
//! `cargo run --release -p candle-fused --example cpu_probe [-- rounds]`

use std::time::Instant;

use candle_core::{DType, Result, Tensor};
use candle_fused::config::CpuConfig;
use candle_fused::{KernelConfig, Kernels, SimdLevel};
use candle_fused_testkit::testing;

type Op = fn(&Kernels, &[Tensor]) -> Result<Tensor>;

fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dev = candle_core::Device::Cpu;
    let ops: &[(&str, usize, Op)] = &[
        ("softmax fwd", 1, |k, a| k.softmax_last_dim(&a[0])),
        ("softmax bwd", 2, |k, a| {
            k.softmax_backward(&a[0], &a[1], 1.0)
        }),
        ("causal fwd", 1, |k, a| {
            k.masked_softmax(&a[0], 0.125, None, true)
        }),
        ("rms fwd", 2, |k, a| k.rms_norm(&a[0], Some(&a[1]), 1e-5)),
        ("rms bwd", 3, |k, a| {
            Ok(k.rms_norm_backward(&a[0], Some(&a[1]), &a[2], 1e-5)?.0)
        }),
        ("add_rms fwd", 3, |k, a| {
            Ok(k.add_rms_norm(&a[0], &a[2], &a[1], 1e-5)?.0)
        }),
    ];
    let shapes: &[(&[usize], DType)] = &[
        (&[1, 128, 1024], DType::F32),
        (&[1024, 1024], DType::BF16),
        (&[4096, 4096], DType::F32),
        (&[4096, 4096], DType::BF16),
    ];
    let mut variants: Vec<(String, Kernels)> = vec![];
    for l in SimdLevel::available() {
        for serial in [false, true] {
            let mut cpu = CpuConfig {
                simd: l,
                ..CpuConfig::default()
            };
            if serial {
                cpu.serial_below = usize::MAX;
            } else {
                cpu.serial_below = 0;
            }
            let name = format!("{}{}", l.as_str(), if serial { "/1t" } else { "/pool" });
            variants.push((
                name,
                Kernels::new(KernelConfig {
                    cpu,
                    ..KernelConfig::default()
                }),
            ));
        }
    }
    println!("rounds {rounds}; min / median us per variant");
    for &(shape, dt) in shapes {
        let n: usize = shape.iter().product();
        let d = *shape.last().unwrap();
        let sets = (64usize << 20)
            .div_ceil(3 * n * dt.size_in_bytes())
            .clamp(1, 32);
        let inputs: Vec<Vec<Tensor>> = (0..sets)
            .map(|_| -> Result<Vec<Tensor>> {
                Ok(vec![
                    testing::randn(shape, 1.0, dt, &dev)?,
                    testing::rand(&[d], 0.5, 1.5, dt, &dev)?,
                    testing::randn(shape, 1.0, dt, &dev)?,
                ])
            })
            .collect::<Result<_>>()?;
        for &(name, nargs, op) in ops {
            let mut times: Vec<Vec<f64>> = vec![vec![]; variants.len()];
            for r in 0..rounds + 2 {
                for (v, (_, k)) in variants.iter().enumerate() {
                    let set = &inputs[(r * variants.len() + v) % sets];
                    let args: Vec<Tensor> = if nargs == 2 && name.starts_with("softmax") {
                        vec![set[0].clone(), set[2].clone()]
                    } else {
                        set[..nargs.max(1)].to_vec()
                    };
                    let t = Instant::now();
                    let out = op(k, &args)?;
                    let us = t.elapsed().as_secs_f64() * 1e6;
                    drop(out);
                    if r >= 2 {
                        times[v].push(us);
                    }
                }
            }
            let mut line = format!("{name:<12} {shape:?} {dt:?}:");
            for (v, (vn, _)) in variants.iter().enumerate() {
                let t = &mut times[v];
                t.sort_by(|a, b| a.total_cmp(b));
                line.push_str(&format!(" {vn} {:.0}/{:.0}", t[0], t[t.len() / 2]));
            }
            println!("{line}");
        }
    }
    Ok(())
}
