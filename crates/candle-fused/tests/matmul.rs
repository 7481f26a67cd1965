//! `ops::matmul`: forward and both gradients against Candle's matmul in f64 on upcast inputs,
//! every dtype, every transpose combination, the GEMV (`M = 1`) and GEMM paths, batched `a`,
//! batched products (`b` of rank >= 3: fewer and more products than threads), every SIMD level
//! and serial/parallel `gemm`; argument errors name the op and argument.

mod common;

use candle_core::{DType, Result, Tensor};
use candle_fused::config::CpuConfig;
use candle_fused::ops;
use candle_fused::prelude::*;
use candle_fused::{KernelConfig, Kernels, SimdLevel};
use candle_fused_testkit::testing;
use common::*;

/// op(a)·op(b) in f64 through Candle's matmul (the reference).
fn reference(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    let a = if ta { a.t()? } else { a.clone() };
    let b = if tb { b.t()? } else { b.clone() };
    if b.rank() > 2 {
        a.contiguous()?.matmul(&b.contiguous()?)
    } else {
        a.broadcast_matmul(&b)
    }
}

/// Stored shapes of a and b for op(a) = [.., M, K], op(b) = [K, N].
fn shapes(
    lead: &[usize],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
) -> (Vec<usize>, Vec<usize>) {
    let mut a = lead.to_vec();
    a.extend(if ta { [k, m] } else { [m, k] });
    let b = if tb { vec![n, k] } else { vec![k, n] };
    (a, b)
}

fn check(
    k: &Kernels,
    ctx: &str,
    lead: &[usize],
    size: (usize, usize, usize),
    ta: bool,
    tb: bool,
    dt: DType,
) {
    check_b(k, ctx, lead, size, ta, tb, dt, false)
}

/// `batched`: `b` gets `a`'s leading dims too (one product per leading index).
#[allow(clippy::too_many_arguments)]
fn check_b(
    k: &Kernels,
    ctx: &str,
    lead: &[usize],
    (m, kk, n): (usize, usize, usize),
    ta: bool,
    tb: bool,
    dt: DType,
    batched: bool,
) {
    let (sa, mut sb) = shapes(lead, m, kk, n, ta, tb);
    if batched {
        sb = [lead, &sb[..]].concat();
    }
    let a = randn(&sa, 1.0, dt);
    let b = randn(&sb, 1.0 / (kk as f64).sqrt(), dt);
    let mut out = lead.to_vec();
    out.extend([m, n]);
    let probe = randn(&out, 1.0, dt);
    let f = |x: &[Tensor]| -> Result<Vec<Tensor>> { Ok(vec![k.matmul(&x[0], &x[1], ta, tb)?]) };
    let r = |x: &[Tensor]| -> Result<Vec<Tensor>> { Ok(vec![reference(&x[0], &x[1], ta, tb)?]) };
    let both = run_both(&f, &r, &[a, b], &[true, true], std::slice::from_ref(&probe));
    compare_all(ctx, &both, &["c"], &["a", "b"], &[true, true], dt, &|_| 0.0);
}

/// (M, K, N): GEMV (both weight layouts, and `N = 1`), tails, a 1024-long inner dim, non-square.
const SIZES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 300, 257),
    (1, 1030, 70),
    (257, 300, 1),
    (3, 5, 7),
    (17, 64, 33),
    (64, 1024, 48),
    (130, 96, 250),
];

#[test]
fn matches_reference_every_dtype_and_transpose() {
    let k = Kernels::new(KernelConfig::poisoned());
    for &dt in &DTYPES {
        for &size in SIZES {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let ctx = format!("matmul {size:?} ta {ta} tb {tb} {dt:?}");
                check(&k, &ctx, &[], size, ta, tb, dt);
            }
        }
    }
}

/// f16 products with one output row or column accumulate in f32: the gemm crate's f16 GEMV
/// paths accumulate in f16 (Candle's CPU matmul: relative error ~1e-2 at K = 4096), so ours
/// must stay within a few f16 roundings of the f64 result there.
#[test]
fn f16_gemv_accumulates_in_f32() {
    let k = Kernels::new(KernelConfig::poisoned());
    let kk = 4096;
    for (m, n) in [(1, 64), (64, 1), (1, 2), (2, 1)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let (sa, sb) = shapes(&[], m, kk, n, ta, tb);
            let a = randn(&sa, 1.0, DType::F16);
            let b = randn(&sb, 1.0, DType::F16);
            let c = k.matmul(&a, &b, ta, tb).unwrap();
            let r = reference(&f64t(&a), &f64t(&b), ta, tb).unwrap();
            let err = testing::rel_err(&c, &r).unwrap();
            let bound = 4.0 * unit_roundoff(DType::F16);
            assert!(
                err <= bound,
                "f16 matmul M={m} K={kk} N={n} ta {ta} tb {tb}: relative error {err:.2e} > {bound:.1e}"
            );
        }
    }
}

#[test]
fn batched_a_folds_into_rows() {
    let k = Kernels::new(KernelConfig::poisoned());
    for &dt in &DTYPES {
        for tb in [false, true] {
            check(
                &k,
                &format!("matmul [2,3] lead tb {tb} {dt:?}"),
                &[2, 3],
                (5, 40, 9),
                false,
                tb,
                dt,
            );
            check(
                &k,
                &format!("matmul [4] lead M=1 tb {tb} {dt:?}"),
                &[4],
                (1, 40, 9),
                false,
                tb,
                dt,
            );
        }
    }
}

/// Batched products (attention's `[B, H, T, D]` operands): 1, fewer and more products than
/// the pool's threads (one product per task), every transpose, `M = 1` (decode), every dtype,
/// on a serial and a 2-thread `gemm`.
#[test]
fn batched_products_every_dtype_transpose_and_count() {
    for threads in [1, 2] {
        let k = Kernels::new(KernelConfig {
            cpu: CpuConfig {
                gemm_threads: threads,
                ..CpuConfig::default()
            },
            ..KernelConfig::poisoned()
        });
        for &dt in &DTYPES {
            for (lead, size) in [
                (&[1][..], (5, 40, 9)),
                (&[3][..], (17, 33, 8)),
                (&[2, 3][..], (1, 40, 9)),
                (&[2, 4][..], (16, 24, 16)),
            ] {
                for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                    let ctx = format!(
                        "batched matmul {lead:?} {size:?} ta {ta} tb {tb} {dt:?} threads {threads}"
                    );
                    check_b(&k, &ctx, lead, size, ta, tb, dt, true);
                }
            }
        }
    }
}

#[test]
fn every_simd_level_thread_count_and_gemv_switch() {
    for level in SimdLevel::available() {
        for gemm_threads in [0, 1] {
            for gemv in [true, false] {
                let k = Kernels::new(KernelConfig {
                    poison: true,
                    cpu: CpuConfig {
                        simd: level,
                        gemm_threads,
                        gemv,
                        ..CpuConfig::default()
                    },
                    ..KernelConfig::default()
                });
                for dt in [DType::F32, DType::BF16] {
                    for &size in &[(1, 1030, 70), (1, 4096, 300), (33, 100, 20)] {
                        for tb in [false, true] {
                            let ctx = format!("matmul {level:?} threads {gemm_threads} gemv {gemv} {size:?} tb {tb} {dt:?}");
                            check(&k, &ctx, &[], size, false, tb, dt);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn free_function_and_prelude_agree_with_the_handle() {
    let a = randn(&[6, 10], 1.0, DType::F32);
    let b = randn(&[4, 10], 1.0, DType::F32);
    let x = ops::matmul(&a, &b, false, true).unwrap();
    let y = a.matmul_fused(&b, false, true).unwrap();
    let z = Kernels::default().matmul(&a, &b, false, true).unwrap();
    assert_same("prelude", &x, &y);
    assert_same("handle", &x, &z);
    assert_eq!(x.dims(), &[6, 4]);
}

#[test]
fn empty_operands_give_zeros_of_the_output_shape() {
    for (sa, sb, want) in [
        (vec![0, 5], vec![5, 3], vec![0, 3]),
        (vec![4, 0], vec![0, 3], vec![4, 3]),
        (vec![4, 5], vec![5, 0], vec![4, 0]),
    ] {
        let a = Tensor::zeros(sa, DType::F32, &CPU).unwrap();
        let b = Tensor::zeros(sb, DType::F32, &CPU).unwrap();
        let c = ops::matmul(&a, &b, false, false).unwrap();
        assert_eq!(c.dims(), &want[..]);
        assert!(vec64(&c).iter().all(|&v| v == 0.0));
    }
}

#[test]
fn bad_arguments_are_errors_naming_the_problem() {
    let a = randn(&[4, 5], 1.0, DType::F32);
    let cases: Vec<(Tensor, Tensor, bool, bool, &str)> = vec![
        (
            a.clone(),
            randn(&[6, 3], 1.0, DType::F32),
            false,
            false,
            "inner dimensions differ",
        ),
        (
            a.clone(),
            randn(&[5, 3], 1.0, DType::F64),
            false,
            false,
            "dtype",
        ),
        (
            randn(&[5], 1.0, DType::F32),
            randn(&[5, 3], 1.0, DType::F32),
            false,
            false,
            "rank >= 2",
        ),
        (
            a.clone(),
            randn(&[2, 5, 3], 1.0, DType::F32),
            false,
            false,
            "same leading dims",
        ),
        (
            randn(&[3, 4, 5], 1.0, DType::F32),
            randn(&[2, 5, 3], 1.0, DType::F32),
            false,
            false,
            "same leading dims",
        ),
        (
            randn(&[2, 4, 5], 1.0, DType::F32),
            randn(&[2, 4, 3], 1.0, DType::F32),
            false,
            false,
            "inner dimensions differ",
        ),
        (
            randn(&[2, 5, 4], 1.0, DType::F32),
            randn(&[5, 3], 1.0, DType::F32),
            true,
            false,
            "rank 2",
        ),
        (
            Tensor::zeros((4, 5), DType::U32, &CPU).unwrap(),
            Tensor::zeros((5, 3), DType::U32, &CPU).unwrap(),
            false,
            false,
            "dtype",
        ),
    ];
    for (x, y, ta, tb, want) in cases {
        let e = ops::matmul(&x, &y, ta, tb).unwrap_err().to_string();
        assert!(
            e.contains("matmul") && e.contains(want),
            "expected {want:?} in: {e}"
        );
    }
}
