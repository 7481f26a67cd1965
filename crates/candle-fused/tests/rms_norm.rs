//! RMSNorm (`rms_norm`, `rms_norm_fused`, `rms_norm_backward`): forward and backward (x and
//! weight) against the f64 reference and finite differences, deterministic weight gradient,
//! NaN/inf, large values, strided inputs and weights, empty tensors.

mod common;

use candle_core::{DType, IndexOp, Result, Tensor};
use candle_fused::ops;
use candle_fused::prelude::*;
use candle_fused_testkit::reference;
use common::*;

fn fused(eps: f64) -> impl Fn(&[Tensor]) -> Result<Vec<Tensor>> {
    move |a: &[Tensor]| Ok(vec![poisoned().rms_norm(&a[0], a.get(1), eps)?])
}

fn refr(eps: f64) -> impl Fn(&[Tensor]) -> Result<Vec<Tensor>> {
    move |a: &[Tensor]| Ok(vec![reference::rms_norm(&a[0], a.get(1), eps)?])
}

/// Forward, dx and dweight against the f64 reference (autograd through the composed ops).
fn check(ctx: &str, x: &Tensor, w: Option<&Tensor>, eps: f64, dt: DType) {
    let mut inputs = vec![x.clone()];
    inputs.extend(w.cloned());
    let diff = vec![true; inputs.len()];
    let probe = randn(x.dims(), 1.0, dt);
    let both = run_both(
        &fused(eps),
        &refr(eps),
        &inputs,
        &diff,
        std::slice::from_ref(&probe),
    );
    let (fx, fw) = rms_floors(x, w, &probe, eps, dt);
    let floor = |k: usize| if k == 0 { fx } else { fw };
    compare_all(ctx, &both, &["y"], &["x", "weight"], &diff, dt, &floor);
}

const SHAPES: &[&[usize]] = &[
    &[1],
    &[3, 1],
    &[5],
    &[4, 7],
    &[2, 3, 64],
    &[3, 1000],
    &[2, 4097],
    &[1, 2, 2, 13],
];

#[test]
fn forward_and_backward_match_reference_all_dtypes() {
    for &dt in &DTYPES {
        for shape in SHAPES {
            let d = *shape.last().unwrap();
            for (k, eps) in [1e-5, 1e-2, 1.0].into_iter().enumerate() {
                let x = randn(shape, [3.0, 0.5, 1.0][k], dt);
                let w = randn(&[d], 1.0, dt);
                check(
                    &format!("rms_norm {shape:?} eps {eps}"),
                    &x,
                    Some(&w),
                    eps,
                    dt,
                );
                check(
                    &format!("rms_norm(no w) {shape:?} eps {eps}"),
                    &x,
                    None,
                    eps,
                    dt,
                );
            }
        }
    }
}

#[test]
fn forward_matches_naive_loop() {
    let (rows, d, eps) = (5, 9, 1e-3);
    let x = randn(&[rows, d], 2.0, DType::F64);
    let w = randn(&[d], 1.0, DType::F64);
    let y = vec64(&poisoned().rms_norm(&x, Some(&w), eps).unwrap());
    let (xv, wv) = (vec64(&x), vec64(&w));
    for r in 0..rows {
        let row = &xv[r * d..(r + 1) * d];
        let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
        for j in 0..d {
            let want = row[j] / (ms + eps).sqrt() * wv[j];
            assert!((y[r * d + j] - want).abs() < 1e-14, "({r}, {j})");
        }
    }
}

#[test]
fn backward_matches_finite_differences() {
    for shape in [&[5usize][..], &[3, 4], &[2, 2, 3], &[4, 1]] {
        let d = *shape.last().unwrap();
        // For D = 1 and a small eps the gradient, eps·dy·w/(x² + eps)^1.5 ~ 1e-5, drowns in
        // the differences' noise: there eps = 0.1 only (the f64 autograd comparison covers it).
        let epss: &[f64] = if d == 1 { &[0.1] } else { &[1e-5, 0.1] };
        for &eps in epss {
            let x = randn(shape, 1.0, DType::F64);
            let w = randn(&[d], 1.0, DType::F64);
            let probe = randn(shape, 1.0, DType::F64);
            let f = fused(eps);
            let inputs = [x, w];
            let (_, g) = fwd_bwd(&f, &inputs, &[true, true], std::slice::from_ref(&probe)).unwrap();
            for (k, name) in [(0, "dx"), (1, "dweight")] {
                let want = fd(&f, &inputs, k, 0, &probe);
                let ctx = format!("{name} vs finite differences {shape:?} eps {eps}");
                assert_close_tol(&ctx, g[k].as_ref().unwrap(), &want, FD_TOL);
            }
            // Without weight.
            let (_, g) = fwd_bwd(&f, &inputs[..1], &[true], std::slice::from_ref(&probe)).unwrap();
            let want = fd(&f, &inputs[..1], 0, 0, &probe);
            assert_close_tol(
                "dx (no weight) vs fd",
                g[0].as_ref().unwrap(),
                &want,
                FD_TOL,
            );
        }
    }
}

#[test]
fn public_backward_matches_reference_autograd() {
    for &dt in &DTYPES {
        for shape in [&[6usize][..], &[4, 33], &[2, 3, 1000]] {
            let d = *shape.last().unwrap();
            let x = randn(shape, 2.0, dt);
            let w = randn(&[d], 1.0, dt);
            let dy = randn(shape, 1.0, dt);
            let eps = 1e-5;
            let both = run_both(
                &refr(eps),
                &refr(eps),
                &[x.clone(), w.clone()],
                &[true, true],
                std::slice::from_ref(&dy),
            );
            let (dx, dw) = poisoned()
                .rms_norm_backward(&x, Some(&w), &dy, eps)
                .unwrap();
            let dw = dw.expect("dweight with a weight");
            assert_eq!((dx.dtype(), dw.dtype()), (dt, dt));
            let (fx, fw) = rms_floors(&x, Some(&w), &dy, eps, dt);
            let (rdx, rdw) = (both.3[0].as_ref().unwrap(), both.3[1].as_ref().unwrap());
            assert_close_floor("rms_norm_backward dx", &dx, rdx, dt, fx);
            assert_close_floor("rms_norm_backward dw", &dw, rdw, dt, fw);
            let both = run_both(
                &refr(eps),
                &refr(eps),
                std::slice::from_ref(&x),
                &[true],
                std::slice::from_ref(&dy),
            );
            let (dx, dw) = poisoned().rms_norm_backward(&x, None, &dy, eps).unwrap();
            assert!(dw.is_none());
            let (fx, _) = rms_floors(&x, None, &dy, eps, dt);
            let rdx = both.3[0].as_ref().unwrap();
            assert_close_floor("rms_norm_backward dx (no w)", &dx, rdx, dt, fx);
        }
    }
}

#[test]
fn weight_gradient_is_bitwise_deterministic() {
    for &dt in &DTYPES {
        for (rows, d) in [(5000usize, 64usize), (5000, 7), (777, 1000)] {
            let x = randn(&[rows, d], 1.0, dt);
            let w = randn(&[d], 1.0, dt);
            let dy = randn(&[rows, d], 1.0, dt);
            let run = || {
                poisoned()
                    .rms_norm_backward(&x, Some(&w), &dy, 1e-5)
                    .unwrap()
            };
            let (dx0, dw0) = run();
            let dw0 = dw0.unwrap();
            for _ in 0..4 {
                let (dx, dw) = run();
                assert_eq!(
                    bits(&dw.unwrap()),
                    bits(&dw0),
                    "{dt:?} {rows}x{d}: dw differs"
                );
                assert_eq!(bits(&dx), bits(&dx0), "{dt:?} {rows}x{d}: dx differs");
            }
            // Also with other thread counts (the row blocks depend on the size only).
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let dw = pool.install(|| run().1.unwrap());
                assert_eq!(
                    bits(&dw),
                    bits(&dw0),
                    "{dt:?} {rows}x{d}: {threads} threads"
                );
            }
            // Through autograd too.
            let f = fused(1e-5);
            let g1 = fwd_bwd(
                &f,
                &[x.clone(), w.clone()],
                &[true, true],
                std::slice::from_ref(&dy),
            )
            .unwrap()
            .1;
            assert_eq!(bits(g1[1].as_ref().unwrap()), bits(&dw0));
            // And right.
            let (_, fw) = rms_floors(&x, Some(&w), &dy, 1e-5, dt);
            let both = run_both(&f, &refr(1e-5), &[x, w], &[true, true], &[dy]);
            let rdw = both.3[1].as_ref().unwrap();
            assert_close_floor("deterministic dw", &dw0, rdw, dt, fw);
        }
    }
}

#[test]
fn nan_and_inf_propagate_like_the_reference() {
    let (nan, inf) = (f64::NAN, f64::INFINITY);
    let rows = [
        vec![0.3, nan, 1.0, -2.0, 0.5], // NaN: NaN row
        vec![0.3, inf, 1.0, -2.0, 0.5], // inf: rstd = 0, inf·0 = NaN, others 0
        vec![-inf, 0.3, 1.0, -2.0, 0.5],
        vec![0.1, 0.2, 0.3, 0.4, 0.5],
    ];
    for &dt in &DTYPES {
        let x = Tensor::from_vec(rows.concat(), (4, 5), &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let w = randn(&[5], 1.0, dt);
        for wopt in [Some(&w), None] {
            let y = poisoned().rms_norm(&x, wopt, 1e-5).unwrap();
            let r = reference::rms_norm(&f64t(&x), wopt.map(f64t).as_ref(), 1e-5).unwrap();
            assert_close("rms_norm NaN/inf", &y, &r, dt);
            let yv = vec64(&y);
            assert!(yv[..5].iter().all(|v| v.is_nan()));
            assert!(yv[6].is_nan() && yv[10].is_nan());
            assert!(yv[15..].iter().all(|v| v.is_finite()));
        }
        // A NaN weight entry: that column is NaN.
        let wn = Tensor::from_vec(vec![1.0, nan, 1.0, 1.0, 1.0], 5, &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let x = randn(&[3, 5], 1.0, dt);
        let y = poisoned().rms_norm(&x, Some(&wn), 1e-5).unwrap();
        let r = reference::rms_norm(&f64t(&x), Some(&f64t(&wn)), 1e-5).unwrap();
        assert_close("rms_norm NaN weight", &y, &r, dt);
    }
}

#[test]
fn large_and_tiny_values() {
    for &dt in &DTYPES {
        // ±6e4 is near f16's maximum: x² overflows f16 but the sums run in f32.
        let big = if dt == DType::F16 { 6e4 } else { 1e6 };
        let x = rand(&[4, 300], -big, big, dt);
        let w = randn(&[300], 1.0, dt);
        let y = poisoned().rms_norm(&x, Some(&w), 1e-5).unwrap();
        assert!(vec64(&y).iter().all(|v| v.is_finite()), "{dt:?}");
        check("rms_norm large values", &x, Some(&w), 1e-5, dt);
        // Tiny rows: eps dominates.
        let x = randn(&[4, 300], 1e-4, dt);
        check("rms_norm tiny values", &x, Some(&w), 1e-5, dt);
    }
}

/// Strided x and weights: bitwise equal to contiguous copies, gradients through the views.
#[test]
fn strided_inputs_and_weights_match_contiguous_copies() {
    let d = 12usize;
    let cases: Vec<ViewCase> = vec![
        (
            "x transposed",
            vec![d, 5],
            |x| x.t(),
            vec![d],
            |w| Ok(w.clone()),
        ),
        (
            "x narrowed",
            vec![4, d + 6],
            |x| x.narrow(1, 4, 12),
            vec![d],
            |w| Ok(w.clone()),
        ),
        (
            "x broadcast view",
            vec![1, d],
            |x| x.broadcast_as((6, 12)),
            vec![d],
            |w| Ok(w.clone()),
        ),
        (
            "weight every other",
            vec![3, d],
            |x| Ok(x.clone()),
            vec![2 * d],
            |w| w.reshape((12, 2))?.i((.., 1)),
        ),
        (
            "weight narrowed",
            vec![3, d],
            |x| Ok(x.clone()),
            vec![d + 3],
            |w| w.narrow(0, 3, 12),
        ),
        (
            "weight broadcast scalar",
            vec![3, d],
            |x| Ok(x.clone()),
            vec![1],
            |w| w.broadcast_as(12),
        ),
        (
            "both strided",
            vec![2, d, 3],
            |x| x.transpose(1, 2),
            vec![d, 2],
            |w| w.i((.., 0)),
        ),
    ];
    for &dt in &DTYPES {
        for (name, xs, xview, ws, wview) in &cases {
            let (xb, wb) = (randn(xs, 2.0, dt), randn(ws, 1.0, dt));
            let (xv, wv) = (xview(&xb).unwrap(), wview(&wb).unwrap());
            let offset = xv.layout().start_offset() + wv.layout().start_offset();
            assert!(
                !(xv.is_contiguous() && wv.is_contiguous()) || offset > 0,
                "{name}: neither strided nor offset"
            );
            assert_same(
                name,
                &poisoned().rms_norm(&xv, Some(&wv), 1e-5).unwrap(),
                &poisoned()
                    .rms_norm(
                        &xv.contiguous().unwrap(),
                        Some(&wv.contiguous().unwrap()),
                        1e-5,
                    )
                    .unwrap(),
            );
            let (xview, wview) = (*xview, *wview);
            let f = move |a: &[Tensor]| -> Result<Vec<Tensor>> {
                Ok(vec![poisoned().rms_norm(
                    &xview(&a[0])?,
                    Some(&wview(&a[1])?),
                    1e-5,
                )?])
            };
            let r = move |a: &[Tensor]| -> Result<Vec<Tensor>> {
                Ok(vec![reference::rms_norm(
                    &xview(&a[0])?,
                    Some(&wview(&a[1])?),
                    1e-5,
                )?])
            };
            let probe = randn(xv.dims(), 1.0, dt);
            let both = run_both(
                &f,
                &r,
                &[xb, wb],
                &[true, true],
                std::slice::from_ref(&probe),
            );
            // Broadcast views sum gradients in dt inside Candle: the floor of that sum, from
            // the reference gradients of the views themselves.
            let views = [
                f64t(&xv).contiguous().unwrap(),
                f64t(&wv).contiguous().unwrap(),
            ];
            let (_, gv) = fwd_bwd(&refr(1e-5), &views, &[true, true], &[f64t(&probe)]).unwrap();
            let (fx, fw) = rms_floors(&xv, Some(&wv), &probe, 1e-5, dt);
            let fl = [
                sum_floor(gv[0].as_ref().unwrap(), &pullback(&xview, xs), dt).max(fx),
                sum_floor(gv[1].as_ref().unwrap(), &pullback(&wview, ws), dt).max(fw),
            ];
            let names = ["x", "weight"];
            compare_all(name, &both, &["y"], &names, &[true, true], dt, &|k| fl[k]);
            // The public backward with strided arguments.
            let dy = randn(xv.dims(), 1.0, dt)
                .t()
                .unwrap()
                .contiguous()
                .unwrap()
                .t()
                .unwrap();
            let (dx, dw) = poisoned()
                .rms_norm_backward(&xv, Some(&wv), &dy, 1e-5)
                .unwrap();
            let (dxc, dwc) = poisoned()
                .rms_norm_backward(
                    &xv.contiguous().unwrap(),
                    Some(&wv.contiguous().unwrap()),
                    &dy.contiguous().unwrap(),
                    1e-5,
                )
                .unwrap();
            assert_same(&format!("{name} backward dx"), &dx, &dxc);
            assert_same(&format!("{name} backward dw"), &dw.unwrap(), &dwc.unwrap());
        }
    }
}

#[test]
fn prelude_method_is_the_free_function() {
    for &dt in &DTYPES {
        let x = randn(&[3, 17], 2.0, dt);
        let w = randn(&[17], 1.0, dt);
        assert_same(
            "rms_norm_fused",
            &x.rms_norm_fused(&w, 1e-6).unwrap(),
            &ops::rms_norm(&x, Some(&w), 1e-6).unwrap(),
        );
    }
}

#[test]
fn empty_in_empty_out() {
    for &dt in &DTYPES {
        for (xs, d) in [
            (&[0usize, 8][..], 8usize),
            (&[3, 0], 0),
            (&[2, 0, 4], 4),
            (&[0], 0),
        ] {
            let x = Tensor::zeros(xs, dt, &CPU).unwrap();
            let w = Tensor::ones(d, dt, &CPU).unwrap();
            for wopt in [Some(&w), None] {
                let y = poisoned().rms_norm(&x, wopt, 1e-5).unwrap();
                assert_eq!((y.dims(), y.dtype()), (xs, dt));
                let (dx, dw) = poisoned().rms_norm_backward(&x, wopt, &x, 1e-5).unwrap();
                assert_eq!(dx.dims(), xs);
                assert_eq!(dw.map(|t| t.dims().to_vec()), wopt.map(|_| vec![d]));
            }
        }
    }
}
