//! Residual add + RMSNorm (`add_rms_norm`, `add_rms_norm_fused`, `add_rms_norm_backward`,
//! `nn::RmsNorm::forward_add`): both outputs and the gradients of x, residual and weight
//! through both outputs, against the f64 reference and finite differences; strided inputs,
//! NaN/inf, empty tensors.

mod common;

use candle_core::{DType, Module, Result, Tensor};
use candle_fused::prelude::*;
use candle_fused::{nn, ops};
use candle_fused_testkit::reference;
use common::*;

const EPS: f64 = 1e-5;

fn fused(a: &[Tensor]) -> Result<Vec<Tensor>> {
    let (n, s) = poisoned().add_rms_norm(&a[0], &a[1], &a[2], EPS)?;
    Ok(vec![n, s])
}

fn refr(a: &[Tensor]) -> Result<Vec<Tensor>> {
    let (n, s) = reference::add_rms_norm(&a[0], &a[1], &a[2], EPS)?;
    Ok(vec![n, s])
}

const NAMES: [&str; 3] = ["x", "residual", "weight"];

/// Both outputs and the three gradients (loss through both outputs) against the reference.
fn check(ctx: &str, x: &Tensor, res: &Tensor, w: &Tensor, dt: DType) {
    let probes = [randn(x.dims(), 1.0, dt), randn(x.dims(), 1.0, dt)];
    let both = run_both(
        &fused,
        &refr,
        &[x.clone(), res.clone(), w.clone()],
        &[true; 3],
        &probes,
    );
    let fl = add_rms_floors(x, res, w, &probes[0], &probes[1], EPS, dt);
    let floor = |k: usize| if k < 2 { fl[0] } else { fl[1] };
    compare_all(
        ctx,
        &both,
        &["normed", "sum"],
        &NAMES,
        &[true; 3],
        dt,
        &floor,
    );
    // dx and dresidual are the same gradient.
    assert_same(
        &format!("{ctx}: dx == dresidual"),
        both.2[0].as_ref().unwrap(),
        both.2[1].as_ref().unwrap(),
    );
}

#[test]
fn forward_and_backward_match_reference_all_dtypes() {
    for &dt in &DTYPES {
        for shape in [
            &[1usize][..],
            &[3, 1],
            &[6],
            &[4, 7],
            &[2, 3, 64],
            &[3, 1000],
            &[2, 4097],
            &[1, 2, 2, 13],
        ] {
            let d = *shape.last().unwrap();
            let x = randn(shape, 2.0, dt);
            let res = randn(shape, 1.0, dt);
            let w = randn(&[d], 1.0, dt);
            check(&format!("add_rms_norm {shape:?}"), &x, &res, &w, dt);
        }
    }
}

#[test]
fn backward_matches_finite_differences() {
    for shape in [&[5usize][..], &[3, 4], &[2, 2, 3], &[4, 1]] {
        let d = *shape.last().unwrap();
        let inputs = [
            randn(shape, 1.0, DType::F64),
            randn(shape, 1.0, DType::F64),
            randn(&[d], 1.0, DType::F64),
        ];
        let (p0, p1) = (randn(shape, 1.0, DType::F64), randn(shape, 1.0, DType::F64));
        // Loss through both outputs: Σ normed ⊙ p0 + Σ sum ⊙ p1.
        let both_out = |a: &[Tensor]| -> Result<Vec<Tensor>> {
            let (n, s) = poisoned().add_rms_norm(&a[0], &a[1], &a[2], EPS)?;
            Ok(vec![((n * &p0)? + (s * &p1)?)?])
        };
        let ones = Tensor::ones(shape, DType::F64, &CPU).unwrap();
        let (_, g) = fwd_bwd(&fused, &inputs, &[true; 3], &[p0.clone(), p1.clone()]).unwrap();
        for (k, name) in NAMES.iter().enumerate() {
            let want = fd(&both_out, &inputs, k, 0, &ones);
            assert_close_tol(
                &format!("d{name} vs finite differences {shape:?}"),
                g[k].as_ref().unwrap(),
                &want,
                FD_TOL,
            );
        }
    }
}

#[test]
fn gradient_through_one_output_only() {
    for &dt in &DTYPES {
        let shape = [3usize, 40];
        let inputs = [
            randn(&shape, 2.0, dt),
            randn(&shape, 1.0, dt),
            randn(&[40], 1.0, dt),
        ];
        for which in [0usize, 1] {
            let pick = move |f: fn(&[Tensor]) -> Result<Vec<Tensor>>| {
                move |a: &[Tensor]| -> Result<Vec<Tensor>> { Ok(vec![f(a)?.swap_remove(which)]) }
            };
            let probe = randn(&shape, 1.0, dt);
            let both = run_both(
                &pick(fused),
                &pick(refr),
                &inputs,
                &[true; 3],
                std::slice::from_ref(&probe),
            );
            if which == 1 {
                // Only `sum` is used: dx = dresidual = probe, and the weight is not in the
                // loss's graph: no gradient (as with the composed ops), or an all-zero one.
                assert_same("d sum only", both.2[0].as_ref().unwrap(), &probe);
                if let Some(dw) = both.2[2].as_ref() {
                    let dw = vec64(dw);
                    assert!(dw.iter().all(|&v| v == 0.0), "{dt:?}: dweight {dw:?}");
                }
                let both2 = (both.0, both.1, both.2[..2].to_vec(), both.3[..2].to_vec());
                compare_all(
                    "sum only",
                    &both2,
                    &["sum"],
                    &NAMES,
                    &[true; 2],
                    dt,
                    &|_| 0.0,
                );
            } else {
                let zero = Tensor::zeros(&shape, dt, &CPU).unwrap();
                let [a, b, c] = &inputs;
                let fl = add_rms_floors(a, b, c, &probe, &zero, EPS, dt);
                let floor = |k: usize| if k < 2 { fl[0] } else { fl[1] };
                compare_all(
                    "normed only",
                    &both,
                    &["normed"],
                    &NAMES,
                    &[true; 3],
                    dt,
                    &floor,
                );
            }
        }
    }
}

#[test]
fn public_backward_matches_reference_autograd() {
    for &dt in &DTYPES {
        for shape in [&[6usize][..], &[4, 33], &[2, 3, 1000]] {
            let d = *shape.last().unwrap();
            let (x, res, w) = (
                randn(shape, 2.0, dt),
                randn(shape, 1.0, dt),
                randn(&[d], 1.0, dt),
            );
            let (dn, ds) = (randn(shape, 1.0, dt), randn(shape, 1.0, dt));
            let both = run_both(
                &refr,
                &refr,
                &[x.clone(), res.clone(), w.clone()],
                &[true; 3],
                &[dn.clone(), ds.clone()],
            );
            // The backward reads the forward's `sum` (rounded to dt), as the op's autograd.
            let (_, sum) = poisoned().add_rms_norm(&x, &res, &w, EPS).unwrap();
            let (dsum, dw) = poisoned()
                .add_rms_norm_backward(&sum, &w, &dn, &ds, EPS)
                .unwrap();
            assert_eq!((dsum.dtype(), dw.dtype()), (dt, dt));
            let fl = add_rms_floors(&x, &res, &w, &dn, &ds, EPS, dt);
            let (rds, rdw) = (both.3[0].as_ref().unwrap(), both.3[2].as_ref().unwrap());
            assert_close_floor("add_rms_norm_backward dsum", &dsum, rds, dt, fl[0]);
            assert_close_floor("add_rms_norm_backward dw", &dw, rdw, dt, fl[1]);
        }
    }
}

#[test]
fn strided_inputs_match_contiguous_copies() {
    for &dt in &DTYPES {
        let d = 10;
        let x = randn(&[d, 4], 2.0, dt).t().unwrap(); // transposed
        let res = randn(&[4, d + 5], 1.0, dt).narrow(1, 2, d).unwrap(); // narrowed
        let w = randn(&[d, 3], 1.0, dt)
            .narrow(1, 1, 1)
            .unwrap()
            .squeeze(1)
            .unwrap(); // strided
        let (n, s) = poisoned().add_rms_norm(&x, &res, &w, EPS).unwrap();
        let cont = |t: &Tensor| t.contiguous().unwrap();
        let (nc, sc) = poisoned()
            .add_rms_norm(&cont(&x), &cont(&res), &cont(&w), EPS)
            .unwrap();
        assert_same("strided normed", &n, &nc);
        assert_same("strided sum", &s, &sc);
        check("strided", &x, &res, &w, dt);
        // A residual broadcast over rows (a view with stride 0) of a tracked base: the base's
        // gradient is Candle's sum of the 4 rows of dresidual, in dt.
        let res_base = randn(&[1, d], 1.0, dt);
        let res_b = res_base.broadcast_as((4, d)).unwrap();
        let probes = [randn(&[4, d], 1.0, dt), randn(&[4, d], 1.0, dt)];
        let (_, g) = fwd_bwd(
            &refr,
            &[f64t(&x), f64t(&res_b).contiguous().unwrap(), f64t(&w)],
            &[false, true, false],
            &[f64t(&probes[0]), f64t(&probes[1])],
        )
        .unwrap();
        let fl = sum_floor(g[1].as_ref().unwrap(), &|t| t.sum_keepdim(0).unwrap(), dt);
        let f = move |a: &[Tensor]| -> Result<Vec<Tensor>> {
            fused(&[a[0].clone(), a[1].broadcast_as((4, d))?, a[2].clone()])
        };
        let r = move |a: &[Tensor]| -> Result<Vec<Tensor>> {
            refr(&[a[0].clone(), a[1].broadcast_as((4, d))?, a[2].clone()])
        };
        let inputs = [x.clone(), res_base, w.clone()];
        let both = run_both(&f, &r, &inputs, &[true; 3], &probes);
        let names = ["normed", "sum"];
        let fa = add_rms_floors(&x, &res_b, &w, &probes[0], &probes[1], EPS, dt);
        let floor = |k: usize| match k {
            0 => fa[0],
            1 => fl.max(fa[0]),
            _ => fa[1],
        };
        compare_all(
            "broadcast residual",
            &both,
            &names,
            &NAMES,
            &[true; 3],
            dt,
            &floor,
        );
    }
}

#[test]
fn nan_and_inf_propagate_like_the_reference() {
    let (nan, inf) = (f64::NAN, f64::INFINITY);
    for &dt in &DTYPES {
        let x = Tensor::from_vec(
            vec![0.3, nan, 1.0, -2.0, 0.5, inf, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            (3, 4),
            &CPU,
        )
        .unwrap()
        .to_dtype(dt)
        .unwrap();
        let res = randn(&[3, 4], 1.0, dt);
        let w = randn(&[4], 1.0, dt);
        let (n, s) = poisoned().add_rms_norm(&x, &res, &w, EPS).unwrap();
        let (rn, rs) = reference::add_rms_norm(&f64t(&x), &f64t(&res), &f64t(&w), EPS).unwrap();
        assert_close("add_rms_norm NaN/inf normed", &n, &rn, dt);
        assert_close("add_rms_norm NaN/inf sum", &s, &rs, dt);
        assert!(vec64(&n)[..4].iter().all(|v| v.is_nan()));
    }
}

#[test]
fn prelude_and_module_are_the_free_function() {
    for &dt in &DTYPES {
        let (x, res, w) = (
            randn(&[3, 17], 2.0, dt),
            randn(&[3, 17], 1.0, dt),
            randn(&[17], 1.0, dt),
        );
        let (n, s) = ops::add_rms_norm(&x, &res, &w, EPS).unwrap();
        let (pn, ps) = x.add_rms_norm_fused(&res, &w, EPS).unwrap();
        assert_same("add_rms_norm_fused normed", &pn, &n);
        assert_same("add_rms_norm_fused sum", &ps, &s);
        let m = nn::RmsNorm::new(w.clone(), EPS);
        let (mn, ms) = m.forward_add(&x, &res).unwrap();
        assert_same("RmsNorm::forward_add normed", &mn, &n);
        assert_same("RmsNorm::forward_add sum", &ms, &s);
        // normed is the module's forward on the sum.
        assert_close("normed == forward(sum)", &n, &m.forward(&s).unwrap(), dt);
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
            let (n, s) = poisoned().add_rms_norm(&x, &x, &w, EPS).unwrap();
            assert_eq!((n.dims(), s.dims()), (xs, xs));
            assert_eq!((n.dtype(), s.dtype()), (dt, dt));
            let (dsum, dw) = poisoned()
                .add_rms_norm_backward(&x, &w, &x, &x, EPS)
                .unwrap();
            assert_eq!((dsum.dims(), dw.dims()), (xs, &[d][..]));
            assert!(vec64(&dw).iter().all(|&v| v == 0.0));
        }
    }
}
