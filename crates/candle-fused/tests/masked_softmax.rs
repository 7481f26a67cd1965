//! Attention softmax `masked_softmax(x, scale, mask, causal)` / `masked_softmax_fused`:
//! forward and backward (x and a tracked mask) against the f64 reference and finite
//! differences, the mask broadcast family, causal masking with KV-cache offsets, fully masked
//! rows, NaN/inf, large logits, strided inputs and masks, empty tensors.

mod common;

use candle_core::{DType, Result, Tensor, D};
use candle_fused::ops;
use candle_fused::prelude::*;
use candle_fused_testkit::{reference, testing};
use common::*;

/// Forward, dx and (when `learned`) dmask against the f64 reference, with a fresh probe.
fn check(
    ctx: &str,
    x: &Tensor,
    mask: Option<&Tensor>,
    learned: bool,
    scale: f64,
    causal: bool,
    dt: DType,
) {
    let probe = randn(x.dims(), 1.0, dt);
    check_masked_softmax(ctx, x, mask, learned, scale, causal, dt, &probe);
}

#[test]
fn mask_broadcast_family_and_causal_match_reference() {
    testing::set_poison(true);
    let scales = [1.0, 0.125, 0.3, -0.5, 2.0];
    let mut n = 0usize;
    for &dt in &DTYPES {
        for &(b, h, s, t) in &[(2, 3, 5, 7), (2, 2, 6, 4), (1, 2, 4, 4), (1, 1, 1, 9)] {
            let masks: Vec<Option<Vec<usize>>> = vec![
                None,
                Some(vec![t]),
                Some(vec![1, t]),
                Some(vec![s, t]),
                Some(vec![s, 1]),
                Some(vec![b, 1, s, t]),
                Some(vec![b, h, s, t]),
                Some(vec![1, h, 1, t]),
                Some(vec![b, h, s, 1]),
                Some(vec![h, s, t]),
            ];
            for ms in &masks {
                for causal in [false, true] {
                    n += 1;
                    let scale = scales[n % scales.len()];
                    let learned = n.is_multiple_of(2);
                    let x = randn(&[b, h, s, t], 2.0, dt);
                    let m = ms.as_ref().map(|ms| mask(ms, 0.2, dt));
                    let ctx = format!(
                        "x {:?} mask {ms:?} causal {causal} scale {scale} learned {learned}",
                        [b, h, s, t]
                    );
                    check(&ctx, &x, m.as_ref(), learned, scale, causal, dt);
                }
            }
        }
    }
    assert_eq!(n, 4 * 4 * 10 * 2);
}

#[test]
fn backward_matches_finite_differences() {
    for causal in [false, true] {
        for ms in [&[3usize, 4][..], &[4], &[2, 3, 4], &[2, 1, 4]] {
            let x = randn(&[2, 3, 4], 1.5, DType::F64);
            let m = mask(ms, 0.25, DType::F64);
            let probe = randn(&[2, 3, 4], 1.0, DType::F64);
            let scale = 0.7;
            let f = move |a: &[Tensor]| -> Result<Vec<Tensor>> {
                Ok(vec![ops::masked_softmax(
                    &a[0],
                    scale,
                    Some(&a[1]),
                    causal,
                )?])
            };
            let inputs = [x, m];
            let (_, g) = fwd_bwd(&f, &inputs, &[true, true], std::slice::from_ref(&probe)).unwrap();
            for (k, name) in [(0, "dx"), (1, "dmask")] {
                let want = fd(&f, &inputs, k, 0, &probe);
                assert_close_tol(
                    &format!("{name} vs finite differences, mask {ms:?} causal {causal}"),
                    g[k].as_ref().unwrap(),
                    &want,
                    FD_TOL,
                );
            }
        }
    }
}

/// Row `i` of `[.., S, T]` scores sees columns `0..=i + T - S`: checked against a plain f64
/// loop that applies that rule (not the reference's mask builder).
#[test]
fn causal_rows_see_the_kv_cache_prefix() {
    for &(s, t) in &[(3, 7), (4, 4), (6, 3), (1, 5), (5, 1), (2, 9), (7, 2)] {
        for with_mask in [false, true] {
            let x = randn(&[2, s, t], 2.0, DType::F64);
            let m = with_mask.then(|| mask(&[s, t], 0.3, DType::F64));
            let scale = 0.5;
            let y = vec64(&ops::masked_softmax(&x, scale, m.as_ref(), true).unwrap());
            let xv = vec64(&x);
            let mv = m.as_ref().map(vec64);
            for bi in 0..2 {
                for i in 0..s {
                    let row = (bi * s + i) * t;
                    let z: Vec<f64> = (0..t)
                        .map(|j| {
                            if j as i64 <= i as i64 + t as i64 - s as i64 {
                                scale * xv[row + j] + mv.as_ref().map_or(0.0, |m| m[i * t + j])
                            } else {
                                f64::NEG_INFINITY
                            }
                        })
                        .collect();
                    let want = naive_softmax_row(&z, true);
                    for j in 0..t {
                        let got = y[row + j];
                        assert!(
                            (got - want[j]).abs() < 1e-13,
                            "S={s} T={t} mask={with_mask} row {i} col {j}: {got} vs {}",
                            want[j]
                        );
                        if z[j] == f64::NEG_INFINITY {
                            assert_eq!(got.to_bits(), 0f64.to_bits(), "hidden entry not +0");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn causal_in_every_dtype() {
    testing::set_poison(true);
    for &dt in &DTYPES {
        for &(s, t) in &[(3, 7), (4, 4), (6, 3)] {
            let x = randn(&[2, s, t], 2.0, dt);
            check(
                &format!("causal S={s} T={t}"),
                &x,
                None,
                false,
                0.25,
                true,
                dt,
            );
            let y = vec64(&ops::masked_softmax(&x, 0.25, None, true).unwrap());
            for (k, v) in y.iter().enumerate() {
                let (i, j) = ((k / t) % s, k % t);
                if j as i64 > i as i64 + t as i64 - s as i64 {
                    assert_eq!(*v, 0.0, "{dt:?} S={s} T={t}: hidden ({i}, {j}) = {v}");
                }
            }
            // T < S: the first S - T rows see nothing and are exactly zero.
            if t < s {
                assert!(y[..(s - t) * t].iter().all(|&v| v == 0.0));
            }
        }
        // Rank 1 is one row (S = 1): causal sees everything.
        let x = randn(&[11], 2.0, dt);
        assert_same(
            "rank-1 causal",
            &ops::masked_softmax(&x, 0.5, None, true).unwrap(),
            &ops::masked_softmax(&x, 0.5, None, false).unwrap(),
        );
    }
}

#[test]
fn fully_masked_rows_give_zeros_and_zero_gradient() {
    testing::set_poison(true);
    let ninf = f64::NEG_INFINITY;
    for &dt in &DTYPES {
        // Rows (0,1) and (1,3) hidden by the mask, row (0,2) all -inf in x itself.
        let m = vec64(&mask(&[2, 4, 6], 0.2, DType::F64));
        let mut m = m;
        for r in [1usize, 7] {
            m[r * 6..(r + 1) * 6].fill(ninf);
        }
        let m = Tensor::from_vec(m, (2, 4, 6), &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let mut xv = vec64(&randn(&[2, 4, 6], 2.0, DType::F64));
        xv[2 * 6..3 * 6].fill(ninf);
        let x = Tensor::from_vec(xv, (2, 4, 6), &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let f = |a: &[Tensor]| -> Result<Vec<Tensor>> {
            Ok(vec![ops::masked_softmax(&a[0], 0.5, Some(&a[1]), false)?])
        };
        let probe = randn(&[2, 4, 6], 1.0, dt);
        let (o, g) = fwd_bwd(&f, &[x.clone(), m.clone()], &[true, true], &[probe]).unwrap();
        let (y, dx, dm) = (
            vec64(&o[0]),
            vec64(g[0].as_ref().unwrap()),
            vec64(g[1].as_ref().unwrap()),
        );
        for r in 0..8 {
            let span = r * 6..(r + 1) * 6;
            let masked = [1, 2, 7].contains(&r);
            for v in [&y, &dx, &dm] {
                assert!(
                    v[span.clone()].iter().all(|v| v.is_finite()),
                    "{dt:?} row {r}"
                );
                if masked {
                    assert!(v[span.clone()].iter().all(|&v| v == 0.0), "{dt:?} row {r}");
                }
            }
            if !masked {
                let s: f64 = y[span].iter().sum();
                assert!(
                    (s - 1.0).abs() < 10.0 * tol(dt),
                    "{dt:?} row {r} sums to {s}"
                );
            }
        }
        check("fully masked rows", &x, Some(&m), true, 0.5, false, dt);
        // Causal with T < S: the first rows see nothing; their gradient is zero too.
        let x = randn(&[3, 5, 2], 1.0, dt);
        let f = |a: &[Tensor]| -> Result<Vec<Tensor>> {
            Ok(vec![ops::masked_softmax(&a[0], 1.0, None, true)?])
        };
        let probe = randn(&[3, 5, 2], 1.0, dt);
        let (_, g) = fwd_bwd(&f, &[x], &[true], &[probe]).unwrap();
        let dx = vec64(g[0].as_ref().unwrap());
        for (k, v) in dx.iter().enumerate() {
            if (k / 2) % 5 < 3 {
                assert_eq!(*v, 0.0, "{dt:?} causal dx[{k}]");
            }
        }
    }
}

#[test]
fn nan_and_inf_propagate_like_the_reference() {
    // S = 6, T = 5, causal: row i sees columns 0..i (row 0 sees nothing).
    let (nan, inf, ninf) = (f64::NAN, f64::INFINITY, f64::NEG_INFINITY);
    let mut xv = vec64(&randn(&[6, 5], 1.0, DType::F64));
    let mut mv = vec64(&randn(&[6, 5], 1.0, DType::F64));
    xv[2] = nan; // row 0: NaN in a hidden column -> zeros (causal) / NaN (not causal)
    mv[5..10].fill(ninf); // row 1: fully masked -> zeros
    xv[11] = nan; // row 2: col 0 masked, col 1 NaN -> "all masked" but NaN: NaN row
    mv[10] = ninf;
    xv[19] = nan; // row 3: NaN in hidden column 4 -> finite with causal
    xv[20] = inf; // row 4: +inf visible -> NaN row, hidden columns included
    mv[28] = nan; // row 5: NaN in the mask -> NaN row
    for &dt in &DTYPES {
        let x = Tensor::from_vec(xv.clone(), (6, 5), &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let m = Tensor::from_vec(mv.clone(), (6, 5), &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        for causal in [true, false] {
            for scale in [1.0, 0.5] {
                let y = ops::masked_softmax(&x, scale, Some(&m), causal).unwrap();
                let r =
                    reference::masked_softmax(&f64t(&x), scale, Some(&f64t(&m)), causal).unwrap();
                assert_close(
                    &format!("NaN/inf masked softmax causal {causal} scale {scale}"),
                    &y,
                    &r,
                    dt,
                );
                let yv = vec64(&y);
                let row = |i: usize| &yv[i * 5..(i + 1) * 5];
                assert!(row(1).iter().all(|&v| v == 0.0), "{dt:?} row 1");
                for i in [2, 4, 5] {
                    assert!(row(i).iter().all(|v| v.is_nan()), "{dt:?} row {i} {causal}");
                }
                if causal {
                    assert!(row(0).iter().all(|&v| v == 0.0), "{dt:?} row 0");
                    assert!(row(3).iter().all(|v| v.is_finite()), "{dt:?} row 3");
                } else {
                    assert!(row(0).iter().all(|v| v.is_nan()), "{dt:?} row 0");
                }
            }
        }
        // No mask, no causal, scale 1 (the plain path): -inf rows are zeros, unless NaN.
        let z = Tensor::from_vec(
            vec![
                ninf, ninf, ninf, ninf, nan, ninf, 0.5, 1.0, 2.0, -1.0, 0.0, 3.0,
            ],
            (3, 4),
            &CPU,
        )
        .unwrap()
        .to_dtype(dt)
        .unwrap();
        let y = ops::masked_softmax(&z, 1.0, None, false).unwrap();
        let r = reference::masked_softmax(&f64t(&z), 1.0, None, false).unwrap();
        assert_close("plain-path masked softmax with -inf/NaN rows", &y, &r, dt);
        let yv = vec64(&y);
        assert_eq!(&yv[..4], &[0.0; 4]);
        assert!(yv[4..8].iter().all(|v| v.is_nan()), "{dt:?}: {yv:?}");
    }
}

/// The logits `scale·x + mask` as the kernel forms them: in the accumulation type (f64 for
/// f64, f32 otherwise), multiply then add, each rounded once.
fn logits_in_acc(x: &Tensor, scale: f64, m: &Tensor) -> Tensor {
    let acc = if x.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let x = x.to_dtype(acc).unwrap().affine(scale, 0.0).unwrap();
    x.broadcast_add(&m.to_dtype(acc).unwrap()).unwrap()
}

#[test]
fn large_logits_stay_finite() {
    for &dt in &DTYPES {
        let x = rand(&[6, 200], -1e4, 1e4, dt);
        // Masks of 0 / -inf and power-of-two scales: the logits are exact in every dtype, so
        // the plain f64 reference applies at the dtype's tolerance.
        let hide = rand(&[200], 0.0, 1.0, DType::F64).lt(0.3).unwrap();
        let m01 = hide
            .where_cond(
                &Tensor::full(f64::NEG_INFINITY, 200, &CPU).unwrap(),
                &Tensor::zeros(200, DType::F64, &CPU).unwrap(),
            )
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        for scale in [1.0, 0.5, 0.125] {
            for causal in [false, true] {
                let ctx = format!("±1e4 logits scale {scale} causal {causal}");
                check(&ctx, &x, Some(&m01), true, scale, causal, dt);
            }
        }
        // Any scale and mask: still finite and normalized. The logits are rounded once in the
        // accumulation type (|z|·2^-24 in f32, ~1e-4 relative at |z| = 3e3, as in any f32
        // softmax), so the reference is the f64 softmax of those rounded logits.
        let m = mask(&[200], 0.2, dt);
        let y = ops::masked_softmax(&x, 0.3, Some(&m), true).unwrap();
        let yv = vec64(&y);
        assert!(yv.iter().all(|v| v.is_finite()), "{dt:?}");
        for r in 0..6 {
            let s: f64 = yv[r * 200..(r + 1) * 200].iter().sum();
            assert!((s - 1.0).abs() < 10.0 * tol(dt), "{dt:?} row {r}: {s}");
        }
        let z = logits_in_acc(&x, 0.3, &m);
        let want = reference::masked_softmax(&f64t(&z), 1.0, None, true).unwrap();
        assert_close("±1e4 logits, scale 0.3 (vs rounded logits)", &y, &want, dt);
    }
}

#[test]
fn long_half_rows_with_mask_sum_to_one() {
    for &dt in &HALF {
        for t in [4096usize, 4097, 10000] {
            let x = randn(&[3, t], 0.1, dt);
            let m = mask(&[t], 0.1, dt);
            let y = ops::masked_softmax(&x, 0.7, Some(&m), false).unwrap();
            for (r, s) in vec64(&f64t(&y).sum(D::Minus1).unwrap()).iter().enumerate() {
                assert!((s - 1.0).abs() < 1e-3, "{dt:?} T={t} row {r}: {s}");
            }
            check(
                &format!("long row T={t}"),
                &x,
                Some(&m),
                false,
                0.7,
                false,
                dt,
            );
        }
    }
}

/// Strided x and masks: bitwise equal to contiguous copies, and forward and backward (through
/// the views, to the bases) equal the reference.
#[test]
fn strided_inputs_and_masks_match_contiguous_copies() {
    testing::set_poison(true);
    let (s, t) = (5usize, 7usize);
    // (name, x base shape, x view, mask base shape, mask view)
    let cases: Vec<ViewCase> = vec![
        (
            "mask transposed",
            vec![2, s, t],
            |x| Ok(x.clone()),
            vec![t, s],
            |m| m.t(),
        ),
        (
            "mask narrowed",
            vec![2, s, t],
            |x| Ok(x.clone()),
            vec![s, t + 5],
            |m| m.narrow(1, 2, 7),
        ),
        (
            "mask [1,T] broadcast view",
            vec![2, s, t],
            |x| Ok(x.clone()),
            vec![1, t],
            |m| m.broadcast_as((5, 7)),
        ),
        (
            "mask [S,1] broadcast view",
            vec![2, s, t],
            |x| Ok(x.clone()),
            vec![s, 1],
            |m| m.broadcast_as((5, 7)),
        ),
        (
            "mask permuted 4-d",
            vec![2, 3, s, t],
            |x| Ok(x.clone()),
            vec![t, s, 3, 2],
            |m| m.permute((3, 2, 1, 0)),
        ),
        (
            "x transposed",
            vec![2, t, s],
            |x| x.transpose(1, 2),
            vec![s, t],
            |m| Ok(m.clone()),
        ),
        (
            "x and mask strided",
            vec![t, 2, s],
            |x| x.permute((1, 2, 0)),
            vec![t, s],
            |m| m.t(),
        ),
        (
            "x broadcast view",
            vec![1, s, t],
            |x| x.broadcast_as((3, 5, 7)),
            vec![t],
            |m| Ok(m.clone()),
        ),
    ];
    for &dt in &DTYPES {
        for (name, xs, xview, ms, mview) in &cases {
            let xb = randn(xs, 2.0, dt);
            let mb = mask(ms, 0.2, dt);
            let (xv, mv) = (xview(&xb).unwrap(), mview(&mb).unwrap());
            assert!(
                !(xv.is_contiguous() && mv.is_contiguous()),
                "{name}: nothing strided"
            );
            for causal in [false, true] {
                let y = ops::masked_softmax(&xv, 0.5, Some(&mv), causal).unwrap();
                let yc = ops::masked_softmax(
                    &xv.contiguous().unwrap(),
                    0.5,
                    Some(&mv.contiguous().unwrap()),
                    causal,
                )
                .unwrap();
                assert_same(&format!("{name} {dt:?} causal {causal}"), &y, &yc);
            }
            // Gradients flow through the views to the bases.
            let (xview, mview) = (*xview, *mview);
            let f = move |a: &[Tensor]| -> Result<Vec<Tensor>> {
                Ok(vec![ops::masked_softmax(
                    &xview(&a[0])?,
                    0.5,
                    Some(&mview(&a[1])?),
                    true,
                )?])
            };
            let r = move |a: &[Tensor]| -> Result<Vec<Tensor>> {
                Ok(vec![reference::masked_softmax(
                    &xview(&a[0])?,
                    0.5,
                    Some(&mview(&a[1])?),
                    true,
                )?])
            };
            let probe = randn(xv.dims(), 1.0, dt);
            let both = run_both(
                &f,
                &r,
                &[xb, mb],
                &[true, true],
                std::slice::from_ref(&probe),
            );
            let per_row_mask = mv.dim(D::Minus1).unwrap() == 1 || ms.last() == Some(&1);
            if per_row_mask {
                let dm = both.2[1].as_ref().unwrap();
                assert_zero_mask_grad(name, dm, &both.0[0], &probe, ms, dt);
            }
            // The formula's side is pulled back through the views to the bases.
            let xback = pullback(&xview, xs);
            let mpull = pullback(&mview, ms);
            let vdims = mv.dims().to_vec();
            let mback = move |t: &Tensor| mpull(&sum_to(t, &vdims));
            let diff = [true, !per_row_mask];
            compare_softmax(
                name,
                &both,
                &probe,
                &["x", "mask"],
                &diff,
                &[0.5, 1.0],
                dt,
                &[&xback, &mback],
            );
        }
    }
}

#[test]
fn zero_and_negative_scale_mask_gradient() {
    // With scale = 0 the output is softmax(mask) and dx = 0, but the mask still has a gradient.
    for &dt in &DTYPES {
        for scale in [0.0, -1.5, 1e-30] {
            let x = randn(&[3, 4, 6], 1.0, dt);
            let m = mask(&[4, 6], 0.2, dt);
            check(
                &format!("scale {scale}"),
                &x,
                Some(&m),
                true,
                scale,
                false,
                dt,
            );
        }
    }
}

#[test]
fn prelude_method_is_the_free_function() {
    for &dt in &DTYPES {
        let x = randn(&[2, 3, 9], 2.0, dt);
        let m = mask(&[3, 9], 0.2, dt);
        assert_same(
            "masked_softmax_fused",
            &x.masked_softmax_fused(0.3, Some(&m), true).unwrap(),
            &ops::masked_softmax(&x, 0.3, Some(&m), true).unwrap(),
        );
    }
}

#[test]
fn empty_in_empty_out() {
    for &dt in &DTYPES {
        for (xs, ms) in [
            (&[0usize, 4][..], Some(&[4usize][..])),
            (&[2, 0], Some(&[0])),
            (&[0, 3, 5], None),
            (&[3, 0, 5], Some(&[1, 5])),
            (&[0], None),
        ] {
            let x = Tensor::zeros(xs, dt, &CPU).unwrap();
            let m = ms.map(|ms| Tensor::zeros(ms, dt, &CPU).unwrap());
            for causal in [false, true] {
                let y = ops::masked_softmax(&x, 0.5, m.as_ref(), causal).unwrap();
                assert_eq!(y.dims(), xs);
                assert_eq!(y.dtype(), dt);
            }
        }
    }
}
