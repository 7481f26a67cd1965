//! Every CPU kernel (softmax plain / causal / masked, RMSNorm with and without weight,
//! add+RMSNorm; forward and backward through autograd) at every SIMD level this CPU has
//! (`KernelConfig.cpu.simd` forced), against the f64 reference with the suites' tolerances.
//! This is how the AVX2 and scalar fallbacks run on an AVX-512 machine; a forced level the
//! CPU lacks must be a clear error.

mod common;

use candle_core::{DType, Result, Tensor};
use candle_fused::config::CpuConfig;
use candle_fused::{KernelConfig, Kernels, SimdLevel};
use candle_fused_testkit::reference;
use common::*;

const EPS: f64 = 1e-5;

fn kernels(level: SimdLevel) -> Kernels {
    Kernels::new(KernelConfig {
        poison: true,
        cpu: CpuConfig {
            simd: level,
            ..CpuConfig::default()
        },
        ..KernelConfig::default()
    })
}

/// Row lengths with vector tails, one block, several blocks; the last shape is large enough
/// for the parallel path (above `CpuConfig::serial_below`).
const SHAPES: &[&[usize]] = &[&[1], &[5, 17], &[2, 3, 100], &[3, 4097], &[520, 600]];

fn levels() -> Vec<SimdLevel> {
    let l = SimdLevel::available();
    eprintln!("SIMD levels on this CPU: {l:?}");
    assert!(l.contains(&SimdLevel::Scalar));
    l
}

#[test]
fn softmax_at_every_level() {
    for level in levels() {
        let k = kernels(level);
        for &dt in &DTYPES {
            for shape in SHAPES {
                let ctx = format!("{level:?} softmax {shape:?} {dt:?}");
                let x = randn(shape, 3.0, dt);
                let probe = randn(shape, 1.0, dt);
                let f =
                    |a: &[Tensor]| -> Result<Vec<Tensor>> { Ok(vec![k.softmax_last_dim(&a[0])?]) };
                let r =
                    |a: &[Tensor]| -> Result<Vec<Tensor>> { Ok(vec![reference::softmax(&a[0])?]) };
                let both = run_both(&f, &r, &[x], &[true], std::slice::from_ref(&probe));
                compare_softmax(
                    &ctx,
                    &both,
                    &probe,
                    &["x"],
                    &[true],
                    &[1.0],
                    dt,
                    &[&identity],
                );
            }
        }
    }
}

#[test]
fn masked_and_causal_softmax_at_every_level() {
    for level in levels() {
        let k = kernels(level);
        for &dt in &DTYPES {
            for shape in [
                &[2usize, 3, 7, 40][..],
                &[1, 2, 33, 1030],
                &[2, 2, 130, 130],
            ] {
                let (s, t) = (shape[shape.len() - 2], shape[shape.len() - 1]);
                for (causal, with_mask) in [(true, false), (false, true), (true, true)] {
                    let ctx = format!("{level:?} masked_softmax {shape:?} {dt:?} causal {causal} mask {with_mask}");
                    let x = randn(shape, 3.0, dt);
                    let probe = randn(shape, 1.0, dt);
                    let mut inputs = vec![x];
                    let mut diff = vec![true];
                    if with_mask {
                        // Finite: a row hidden by chance would test the zero-row rule, which
                        // the masked_softmax suite covers.
                        inputs.push(randn(&[s, t], 1.0, dt));
                        diff.push(true);
                    }
                    let f = |a: &[Tensor]| -> Result<Vec<Tensor>> {
                        Ok(vec![k.masked_softmax(&a[0], 0.125, a.get(1), causal)?])
                    };
                    let r = |a: &[Tensor]| -> Result<Vec<Tensor>> {
                        Ok(vec![reference::masked_softmax(
                            &a[0],
                            0.125,
                            a.get(1),
                            causal,
                        )?])
                    };
                    let both = run_both(&f, &r, &inputs, &diff, std::slice::from_ref(&probe));
                    let mdims = vec![s, t];
                    let to_mask = move |g: &Tensor| sum_to(g, &mdims);
                    compare_softmax(
                        &ctx,
                        &both,
                        &probe,
                        &["x", "mask"],
                        &diff,
                        &[0.125, 1.0],
                        dt,
                        &[&identity, &to_mask],
                    );
                }
            }
        }
    }
}

#[test]
fn rms_norm_at_every_level() {
    for level in levels() {
        let k = kernels(level);
        for &dt in &DTYPES {
            for shape in SHAPES {
                for weighted in [true, false] {
                    let ctx = format!("{level:?} rms_norm {shape:?} {dt:?} weight {weighted}");
                    let d = *shape.last().unwrap();
                    let x = randn(shape, 1.0, dt);
                    let w = weighted.then(|| rand(&[d], 0.5, 1.5, dt));
                    let probe = randn(shape, 1.0, dt);
                    let mut inputs = vec![x.clone()];
                    inputs.extend(w.clone());
                    let diff = vec![true; inputs.len()];
                    let f = |a: &[Tensor]| -> Result<Vec<Tensor>> {
                        Ok(vec![k.rms_norm(&a[0], a.get(1), EPS)?])
                    };
                    let r = |a: &[Tensor]| -> Result<Vec<Tensor>> {
                        Ok(vec![reference::rms_norm(&a[0], a.get(1), EPS)?])
                    };
                    let both = run_both(&f, &r, &inputs, &diff, std::slice::from_ref(&probe));
                    let (fx, fw) = rms_floors(&x, w.as_ref(), &probe, EPS, dt);
                    let floor = |i: usize| if i == 0 { fx } else { fw };
                    compare_all(&ctx, &both, &["y"], &["x", "weight"], &diff, dt, &floor);
                }
            }
        }
    }
}

#[test]
fn add_rms_norm_at_every_level() {
    for level in levels() {
        let k = kernels(level);
        for &dt in &DTYPES {
            for shape in SHAPES {
                let ctx = format!("{level:?} add_rms_norm {shape:?} {dt:?}");
                let d = *shape.last().unwrap();
                let x = randn(shape, 1.0, dt);
                let res = randn(shape, 1.0, dt);
                let w = rand(&[d], 0.5, 1.5, dt);
                let probes = [randn(shape, 1.0, dt), randn(shape, 1.0, dt)];
                let f = |a: &[Tensor]| -> Result<Vec<Tensor>> {
                    let (n, s) = k.add_rms_norm(&a[0], &a[1], &a[2], EPS)?;
                    Ok(vec![n, s])
                };
                let r = |a: &[Tensor]| -> Result<Vec<Tensor>> {
                    let (n, s) = reference::add_rms_norm(&a[0], &a[1], &a[2], EPS)?;
                    Ok(vec![n, s])
                };
                let both = run_both(
                    &f,
                    &r,
                    &[x.clone(), res.clone(), w.clone()],
                    &[true; 3],
                    &probes,
                );
                let fl = add_rms_floors(&x, &res, &w, &probes[0], &probes[1], EPS, dt);
                let floor = |i: usize| if i < 2 { fl[0] } else { fl[1] };
                compare_all(
                    &ctx,
                    &both,
                    &["normed", "sum"],
                    &["x", "residual", "weight"],
                    &[true; 3],
                    dt,
                    &floor,
                );
            }
        }
    }
}

#[test]
fn a_level_the_cpu_lacks_is_an_error_naming_the_op() {
    let all = [
        SimdLevel::Avx512,
        SimdLevel::Avx2,
        SimdLevel::Neon,
        SimdLevel::Scalar,
    ];
    let avail = SimdLevel::available();
    let x = randn(&[4, 8], 1.0, DType::F32);
    for level in all.into_iter().filter(|l| !avail.contains(l)) {
        let k = kernels(level);
        let e = k.softmax_last_dim(&x).unwrap_err().to_string();
        assert!(
            e.contains("softmax_last_dim") && e.contains(level.as_str()),
            "{level:?}: {e}"
        );
        let e = k.rms_norm(&x, None, EPS).unwrap_err().to_string();
        assert!(e.contains("rms_norm") && e.contains("not available"), "{e}");
    }
    // On every CPU at least one of the four is missing (NEON and AVX are exclusive).
    assert!(avail.len() < all.len());
}
