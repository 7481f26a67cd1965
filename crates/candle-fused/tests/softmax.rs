//! Plain softmax over the last dim (`softmax_last_dim`, `softmax_fused`, `softmax_backward`):
//! forward and backward against the f64 reference, finite differences, NaN/inf semantics,
//! large logits, long f16 rows, strided views and empty tensors.

mod common;

use candle_core::{DType, IndexOp, Result, Tensor, D};
use candle_fused::ops;
use candle_fused::prelude::*;
use candle_fused_testkit::{reference, testing};
use common::*;

fn fused(a: &[Tensor]) -> Result<Vec<Tensor>> {
    Ok(vec![poisoned().softmax_last_dim(&a[0])?])
}

fn refr(a: &[Tensor]) -> Result<Vec<Tensor>> {
    Ok(vec![reference::softmax(&a[0])?])
}

/// Forward and the gradient of `x` against the f64 reference (autograd through the composed
/// ops), in `dt`. The gradient gets the floor of a backward that reads the rounded `y`.
fn check(ctx: &str, x: &Tensor, dt: DType) {
    let probe = randn(x.dims(), 1.0, dt);
    let both = run_both(
        &fused,
        &refr,
        std::slice::from_ref(x),
        &[true],
        std::slice::from_ref(&probe),
    );
    compare_softmax(
        ctx,
        &both,
        &probe,
        &["x"],
        &[true],
        &[1.0],
        dt,
        &[&identity],
    );
}

const SHAPES: &[&[usize]] = &[
    &[1],
    &[2],
    &[3],
    &[7],
    &[4, 13],
    &[2, 3, 1000],
    &[3, 4097],
    &[1, 2, 2, 251],
    &[2, 1, 1, 1, 5],
];

#[test]
fn forward_and_backward_match_reference_all_dtypes() {
    for &dt in &DTYPES {
        for shape in SHAPES {
            let x = randn(shape, 3.0, dt);
            check(&format!("softmax {shape:?}"), &x, dt);
        }
    }
}

#[test]
fn prelude_method_is_the_free_function() {
    for &dt in &DTYPES {
        let x = randn(&[3, 17], 2.0, dt);
        assert_same(
            "softmax_fused",
            &x.softmax_fused().unwrap(),
            &ops::softmax_last_dim(&x).unwrap(),
        );
    }
}

#[test]
fn forward_matches_naive_loop() {
    // Independent of Candle's composed ops: a plain f64 loop per row.
    let x = randn(&[6, 11], 2.0, DType::F64);
    let y = vec64(&poisoned().softmax_last_dim(&x).unwrap());
    let xv = vec64(&x);
    for r in 0..6 {
        let want = naive_softmax_row(&xv[r * 11..(r + 1) * 11], false);
        for (j, w) in want.iter().enumerate() {
            assert!((y[r * 11 + j] - w).abs() < 1e-14, "row {r} col {j}");
        }
    }
}

#[test]
fn backward_matches_finite_differences() {
    for shape in [&[5usize][..], &[3, 4], &[2, 3, 6], &[4, 1]] {
        let x = randn(shape, 1.5, DType::F64);
        let probe = randn(shape, 1.0, DType::F64);
        let (_, g) = fwd_bwd(
            &fused,
            std::slice::from_ref(&x),
            &[true],
            std::slice::from_ref(&probe),
        )
        .unwrap();
        let want = fd(&fused, std::slice::from_ref(&x), 0, 0, &probe);
        assert_close_tol(
            &format!("dx vs finite differences {shape:?}"),
            g[0].as_ref().unwrap(),
            &want,
            FD_TOL,
        );
        // The public backward on its own, from the forward's output.
        let y = poisoned().softmax_last_dim(&x).unwrap();
        let dx = poisoned().softmax_backward(&y, &probe, 1.0).unwrap();
        assert_close_tol("softmax_backward vs finite differences", &dx, &want, FD_TOL);
    }
}

#[test]
fn softmax_backward_matches_its_formula_on_the_same_inputs() {
    // The backward kernel against `scale·y⊙(dy − ⟨dy, y⟩)` in f64 on the same rounded y, dy.
    for &dt in &DTYPES {
        for shape in [&[9usize][..], &[4, 33], &[2, 3, 1000], &[2, 4097]] {
            // y: a real softmax output (rows sum to 1), stored in dt.
            let y = reference::softmax(&randn(shape, 1.0, DType::F64))
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let dy = randn(shape, 1.0, dt);
            for scale in [1.0, 0.125, -0.7] {
                let got = poisoned().softmax_backward(&y, &dy, scale).unwrap();
                assert_eq!(got.dtype(), dt);
                let want = softmax_bwd64(&y, &dy, scale);
                assert_close(
                    &format!("softmax_backward {shape:?} s={scale}"),
                    &got,
                    &want,
                    dt,
                );
            }
        }
    }
    // Strided y and dy give the same as contiguous copies.
    let y = reference::softmax(&randn(&[7, 5], 1.0, DType::F32))
        .unwrap()
        .t()
        .unwrap();
    let dy = randn(&[7, 5], 1.0, DType::F32).t().unwrap();
    assert_same(
        "softmax_backward strided",
        &poisoned().softmax_backward(&y, &dy, 0.5).unwrap(),
        &poisoned()
            .softmax_backward(&y.contiguous().unwrap(), &dy.contiguous().unwrap(), 0.5)
            .unwrap(),
    );
}

#[test]
fn all_neg_inf_row_gives_nan_like_the_reference() {
    for &dt in &DTYPES {
        let x = randn(&[3, 5], 1.0, dt);
        let ninf = Tensor::full(f64::NEG_INFINITY, (1, 5), &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let x = Tensor::cat(&[&x.i(0..1).unwrap(), &ninf, &x.i(2..3).unwrap()], 0).unwrap();
        let y = poisoned().softmax_last_dim(&x).unwrap();
        let r = reference::softmax(&f64t(&x)).unwrap();
        let yv = vec64(&y);
        assert!(yv[5..10].iter().all(|v| v.is_nan()), "{dt:?}: {yv:?}");
        assert!(vec64(&r)[5..10].iter().all(|v| v.is_nan()));
        assert!(yv[..5].iter().chain(&yv[10..]).all(|v| v.is_finite()));
        // rel_err requires NaN exactly where the reference has NaN.
        assert_close("softmax with an all -inf row", &y, &r, dt);
    }
}

#[test]
fn nan_and_inf_propagate_like_the_reference() {
    let nan = f64::NAN;
    let inf = f64::INFINITY;
    let rows: Vec<Vec<f64>> = vec![
        vec![0.3, nan, 1.0, -2.0, 0.5, 0.1],   // NaN anywhere: NaN row
        vec![nan, 0.3, 1.0, -2.0, 0.5, 0.1],   // NaN first
        vec![0.3, inf, 1.0, -2.0, 0.5, 0.1],   // +inf: inf - inf = NaN
        vec![0.3, -inf, 1.0, -2.0, -inf, 0.1], // -inf entries: exactly 0
        vec![inf, 1.0, inf, 2.0, 0.0, 0.0],
        vec![-inf, -inf, -inf, -inf, -inf, 7.0], // one finite entry: one-hot
        vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    ];
    let flat: Vec<f64> = rows.concat();
    for &dt in &DTYPES {
        let x = Tensor::from_vec(flat.clone(), (rows.len(), 6), &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let y = poisoned().softmax_last_dim(&x).unwrap();
        let r = reference::softmax(&f64t(&x)).unwrap();
        assert_close("softmax with NaN/inf", &y, &r, dt);
        let yv = vec64(&y);
        assert!(yv[..18].iter().all(|v| v.is_nan()), "{dt:?} rows 0-2 NaN");
        assert!(yv[24..30].iter().all(|v| v.is_nan()), "{dt:?} row 4 NaN");
        assert!(
            yv[18..24].iter().all(|v| v.is_finite()),
            "{dt:?} row 3 finite"
        );
        assert_eq!(yv[19], 0.0);
        assert_eq!(yv[22], 0.0);
        assert_eq!(&yv[30..36], &[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
    }
}

#[test]
fn large_logits_stay_finite() {
    for &dt in &DTYPES {
        // Uniform in ±1e4 (f16 holds up to 65504), plus rows of exact ±1e4.
        let x = rand(&[8, 300], -1e4, 1e4, dt);
        let edge = Tensor::from_vec(vec![1e4f64, -1e4, 1e4, 0.0, -1e4, 1e4], (1, 6), &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        for x in [x, edge] {
            let y = poisoned().softmax_last_dim(&x).unwrap();
            assert!(vec64(&y).iter().all(|v| v.is_finite()), "{dt:?}");
            check("softmax ±1e4 logits", &x, dt);
        }
    }
}

#[test]
fn long_half_rows_sum_to_one() {
    // Candle issue #3727: Candle's CPU softmax accumulates f16 in f16 and long rows sum to ~2.
    // Ours accumulates in f32. Near-uniform rows (small logits) are the hard case.
    for &dt in &HALF {
        for shape in [&[4usize, 4096][..], &[3, 4097], &[2, 8192], &[1, 65536]] {
            let x = randn(shape, 0.1, dt);
            let y = poisoned().softmax_last_dim(&x).unwrap();
            let sums = vec64(&f64t(&y).sum(D::Minus1).unwrap());
            for (r, s) in sums.iter().enumerate() {
                assert!(
                    (s - 1.0).abs() < 1e-3,
                    "{dt:?} {shape:?} row {r} sums to {s}"
                );
            }
            let r = reference::softmax(&f64t(&x)).unwrap();
            assert_close(&format!("long row {shape:?}"), &y, &r, dt);
        }
    }
}

/// The op on a strided view equals the op on a contiguous copy (bitwise) and the reference,
/// and the gradient flows back through the view.
fn check_view(what: &str, base: &Tensor, view: impl Fn(&Tensor) -> Result<Tensor>, dt: DType) {
    check_view_impl(what, base, view, dt, false)
}

/// As [`check_view`] for a view that repeats one value along each row: softmax is then
/// uniform and the base's gradient, `Σ_j y_j (dy_j − ⟨dy, y⟩)`, is exactly 0. Its relative
/// error is meaningless; it must be 0 up to rounding of `‖dy‖`.
fn check_row_broadcast_view(
    what: &str,
    base: &Tensor,
    view: impl Fn(&Tensor) -> Result<Tensor>,
    dt: DType,
) {
    check_view_impl(what, base, view, dt, true)
}

fn check_view_impl(
    what: &str,
    base: &Tensor,
    view: impl Fn(&Tensor) -> Result<Tensor>,
    dt: DType,
    grad_is_zero: bool,
) {
    let v = view(base).unwrap();
    assert!(!v.is_contiguous(), "{what}: the view should be strided");
    let y = poisoned().softmax_last_dim(&v).unwrap();
    let yc = poisoned()
        .softmax_last_dim(&v.contiguous().unwrap())
        .unwrap();
    assert_same(what, &y, &yc);
    let f = |a: &[Tensor]| -> Result<Vec<Tensor>> {
        Ok(vec![poisoned().softmax_last_dim(&view(&a[0])?)?])
    };
    let r = |a: &[Tensor]| -> Result<Vec<Tensor>> { Ok(vec![reference::softmax(&view(&a[0])?)?]) };
    let probe = randn(v.dims(), 1.0, dt);
    let both = run_both(
        &f,
        &r,
        std::slice::from_ref(base),
        &[true],
        std::slice::from_ref(&probe),
    );
    if grad_is_zero {
        assert_close(what, &both.0[0], &both.1[0], dt);
        let g = both.2[0].as_ref().expect("gradient of the base");
        let bound = 4.0 * tol(dt) * testing::max_abs(&probe).unwrap();
        let got = testing::max_abs(g).unwrap();
        assert!(
            got <= bound,
            "{what}: |d base| = {got:.3e}, expected 0 (bound {bound:.1e})"
        );
        return;
    }
    // The base's gradient is the view's pulled back through the view (in f64: the formula's
    // side of the comparison).
    let back = pullback(&view, base.dims());
    compare_softmax(
        what,
        &both,
        &probe,
        &["base"],
        &[true],
        &[1.0],
        dt,
        &[&back],
    );
}

#[test]
fn strided_views_match_contiguous_copies() {
    for &dt in &DTYPES {
        check_view("transposed", &randn(&[9, 6], 2.0, dt), |t| t.t(), dt);
        check_view(
            "narrowed",
            &randn(&[4, 20], 2.0, dt),
            |t| t.narrow(1, 3, 11),
            dt,
        );
        check_view(
            "permuted 3-d",
            &randn(&[3, 4, 5], 2.0, dt),
            |t| t.permute((2, 0, 1)),
            dt,
        );
        check_view(
            "broadcast over rows",
            &randn(&[1, 9], 2.0, dt),
            |t| t.broadcast_as((6, 9)),
            dt,
        );
        check_row_broadcast_view(
            "broadcast along the row",
            &randn(&[6, 1], 2.0, dt),
            |t| t.broadcast_as((6, 9)),
            dt,
        );
        check_view(
            "every other column",
            &randn(&[5, 16], 2.0, dt),
            |t| t.reshape((5, 8, 2))?.i((.., .., 0)),
            dt,
        );
    }
}

#[test]
fn empty_in_empty_out() {
    for &dt in &DTYPES {
        for shape in [&[0usize][..], &[0, 5], &[3, 0], &[2, 0, 4], &[0, 0]] {
            let x = Tensor::zeros(shape, dt, &CPU).unwrap();
            let y = poisoned().softmax_last_dim(&x).unwrap();
            assert_eq!(y.dims(), shape);
            assert_eq!(y.dtype(), dt);
            let g = poisoned().softmax_backward(&y, &y, 0.5).unwrap();
            assert_eq!(g.dims(), shape);
            // Backward through an empty op runs.
            let (outs, _) = fwd_bwd(
                &fused,
                std::slice::from_ref(&x),
                &[true],
                std::slice::from_ref(&y),
            )
            .unwrap();
            assert_eq!(outs[0].dims(), shape);
        }
    }
}
