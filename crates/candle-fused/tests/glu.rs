//! SwiGLU / GeGLU (`ops::glu`, `glu_packed`, `swiglu`, `glu_backward`,
//! `glu_packed_backward`, the prelude): forward and both gradients vs the f64 reference
//! (the formulas written out from elementary Candle ops) and finite differences, the packed
//! layout vs the two-tensor one, saturated gates, NaN, strided inputs, bad input, empty.
//!
//! Inputs are fresh random values each run from the testkit's seeded stream (`common::randn`;
//! the seed is printed on failure, `CANDLE_FUSED_SEED` replays it).

mod common;

use candle_core::{DType, Result, Tensor, D};
use candle_fused::ops::{self, GluKind};
use candle_fused::prelude::*;
use candle_fused::{KernelConfig, Kernels};
use candle_fused_testkit::reference;
use common::*;

const KINDS: [GluKind; 2] = [GluKind::SwiGlu, GluKind::GeGluTanh];

fn k() -> Kernels {
    Kernels::new(KernelConfig::poisoned())
}

const SHAPES: &[&[usize]] = &[
    &[1],
    &[3, 1],
    &[5],
    &[4, 7],
    &[2, 3, 64],
    &[2, 3, 1000],
    &[3, 4097],
    &[1, 2, 2, 13],
];

fn pair(kind: GluKind) -> impl Fn(&[Tensor]) -> Result<Vec<Tensor>> {
    move |a| Ok(vec![k().glu(kind, &a[0], &a[1])?])
}

fn pair_ref(kind: GluKind) -> impl Fn(&[Tensor]) -> Result<Vec<Tensor>> {
    move |a| Ok(vec![reference::glu(kind, &a[0], &a[1])?])
}

fn packed(kind: GluKind) -> impl Fn(&[Tensor]) -> Result<Vec<Tensor>> {
    move |a| Ok(vec![k().glu_packed(kind, &a[0])?])
}

fn packed_ref(kind: GluKind) -> impl Fn(&[Tensor]) -> Result<Vec<Tensor>> {
    move |a| Ok(vec![reference::glu_packed(kind, &a[0])?])
}

fn doubled(shape: &[usize]) -> Vec<usize> {
    let mut s = shape.to_vec();
    *s.last_mut().unwrap() *= 2;
    s
}

#[test]
fn forward_and_backward_match_reference_all_dtypes() {
    for &dt in &DTYPES {
        for kind in KINDS {
            for shape in SHAPES {
                for std in [1.0, 4.0] {
                    let (g, u) = (randn(shape, std, dt), randn(shape, 1.0, dt));
                    let probe = randn(shape, 1.0, dt);
                    let both = run_both(
                        &pair(kind),
                        &pair_ref(kind),
                        &[g.clone(), u.clone()],
                        &[true, true],
                        std::slice::from_ref(&probe),
                    );
                    let ctx = format!("{kind:?} {shape:?} std {std}");
                    let fl = gate_floor(kind, &g, &u, &probe, rgrad(&both, 0));
                    compare_all(
                        &ctx,
                        &both,
                        &["y"],
                        &["gate", "up"],
                        &[true, true],
                        dt,
                        &|k| if k == 0 { fl } else { 0.0 },
                    );
                    // The standalone backward is the autograd gradient, bit for bit.
                    let (dg, du) = k().glu_backward(kind, &g, &u, &probe).unwrap();
                    assert_equal(&format!("{ctx}: dgate"), &dg, both.2[0].as_ref().unwrap());
                    assert_equal(&format!("{ctx}: dup"), &du, both.2[1].as_ref().unwrap());

                    let gu = randn(&doubled(shape), std, dt);
                    let both = run_both(
                        &packed(kind),
                        &packed_ref(kind),
                        std::slice::from_ref(&gu),
                        &[true],
                        std::slice::from_ref(&probe),
                    );
                    let fl = packed_gate_floor(kind, &gu, &probe, rgrad(&both, 0));
                    compare_all(
                        &format!("{ctx} packed"),
                        &both,
                        &["y"],
                        &["gate_up"],
                        &[true],
                        dt,
                        &|_| fl,
                    );
                    let dgu = k().glu_packed_backward(kind, &gu, &probe).unwrap();
                    assert_equal(
                        &format!("{ctx}: packed backward"),
                        &dgu,
                        both.2[0].as_ref().unwrap(),
                    );
                }
            }
        }
    }
}

/// The packed layout is the two-tensor op on the halves, forward and gradient, bit for bit:
/// the packed gradient is `[dgate | dup]` per row.
#[test]
fn packed_equals_the_two_halves() {
    for &dt in &DTYPES {
        for kind in KINDS {
            for shape in [&[1usize, 2][..], &[5, 14], &[2, 3, 2002]] {
                let gu = randn(shape, 2.0, dt);
                let i = shape[shape.len() - 1] / 2;
                let (g, u) = (
                    gu.narrow(D::Minus1, 0, i).unwrap(),
                    gu.narrow(D::Minus1, i, i).unwrap(),
                );
                let y = k().glu_packed(kind, &gu).unwrap();
                assert_same("packed fwd", &y, &k().glu(kind, &g, &u).unwrap());
                let dy = randn(y.dims(), 1.0, dt);
                let (dg, du) = k()
                    .glu_backward(
                        kind,
                        &g.contiguous().unwrap(),
                        &u.contiguous().unwrap(),
                        &dy,
                    )
                    .unwrap();
                let dgu = k().glu_packed_backward(kind, &gu, &dy).unwrap();
                assert_same(
                    "packed bwd",
                    &dgu,
                    &Tensor::cat(&[dg, du], D::Minus1).unwrap(),
                );
            }
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    for kind in KINDS {
        for shape in [&[5usize][..], &[3, 4], &[2, 2, 3]] {
            let (g, u) = (randn(shape, 2.0, DType::F64), randn(shape, 1.0, DType::F64));
            let probe = randn(shape, 1.0, DType::F64);
            let f = pair(kind);
            let inputs = [g, u];
            let (_, grads) =
                fwd_bwd(&f, &inputs, &[true, true], std::slice::from_ref(&probe)).unwrap();
            for (i, name) in [(0, "dgate"), (1, "dup")] {
                let want = fd(&f, &inputs, i, 0, &probe);
                assert_close_tol(
                    &format!("{kind:?} {name} vs fd {shape:?}"),
                    grads[i].as_ref().unwrap(),
                    &want,
                    FD_TOL,
                );
            }
            let gu = randn(&doubled(shape), 2.0, DType::F64);
            let f = packed(kind);
            let (_, grads) = fwd_bwd(
                &f,
                std::slice::from_ref(&gu),
                &[true],
                std::slice::from_ref(&probe),
            )
            .unwrap();
            let want = fd(&f, &[gu], 0, 0, &probe);
            assert_close_tol(
                &format!("{kind:?} dgate_up vs fd {shape:?}"),
                grads[0].as_ref().unwrap(),
                &want,
                FD_TOL,
            );
        }
    }
}

/// Gates far into both tails (σ saturated, `g³` large for gelu): finite, and right (the f64
/// reference itself overflows beyond |g| ~ 700, so the largest values are checked against
/// their limits: `act(g) → g` and `act' → 1` for `g → +∞`, both `→ 0` for `g → −∞`).
#[test]
fn saturated_gates() {
    for &dt in &DTYPES {
        let vals = [-300.0, -90.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 90.0, 300.0];
        let g = Tensor::new(&vals, &CPU).unwrap().to_dtype(dt).unwrap();
        let u = randn(&[vals.len()], 1.0, dt);
        let dy = randn(&[vals.len()], 1.0, dt);
        for kind in KINDS {
            let both = run_both(
                &pair(kind),
                &pair_ref(kind),
                &[g.clone(), u.clone()],
                &[true, true],
                std::slice::from_ref(&dy),
            );
            compare_all(
                &format!("{kind:?} saturated"),
                &both,
                &["y"],
                &["gate", "up"],
                &[true, true],
                dt,
                &|_| 0.0,
            );
            let big = if dt == DType::F16 { 6e4 } else { 1e6 };
            let g = Tensor::new(&[-big, big], &CPU)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let one = g.ones_like().unwrap();
            let y = vec64(&k().glu(kind, &g, &one).unwrap());
            let (dg, du) = k().glu_backward(kind, &g, &one, &one).unwrap();
            let (dg, du) = (vec64(&dg), vec64(&du));
            let big = vec64(&g)[1]; // as rounded to dt
            assert!(y[0] == 0.0 && y[1] == big, "{kind:?} {dt:?}: {y:?}");
            assert!(
                dg == [0.0, 1.0] && du == [0.0, big],
                "{kind:?} {dt:?}: {dg:?} {du:?}"
            );
        }
    }
}

#[test]
fn nan_propagates() {
    for &dt in &DTYPES {
        let g = Tensor::new(&[0.5f64, f64::NAN, -1.0], &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let u = Tensor::new(&[1.0f64, 1.0, f64::NAN], &CPU)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        for kind in KINDS {
            let y = vec64(&ops::glu(kind, &g, &u).unwrap());
            assert!(
                y[0].is_finite() && y[1].is_nan() && y[2].is_nan(),
                "{kind:?}: {y:?}"
            );
            let (dg, du) = ops::glu_backward(kind, &g, &u, &g.ones_like().unwrap()).unwrap();
            let (dg, du) = (vec64(&dg), vec64(&du));
            assert!(
                dg[0].is_finite() && dg[1].is_nan() && dg[2].is_nan() && du[1].is_nan(),
                "{kind:?}: {dg:?} {du:?}"
            );
        }
    }
}

/// Strided gate, up and dy: bit for bit the contiguous result, gradients through the views.
#[test]
fn strided_inputs_match_contiguous_copies() {
    for &dt in &DTYPES {
        for kind in KINDS {
            let gb = randn(&[7, 5], 1.0, dt);
            let ub = randn(&[5, 9], 1.0, dt);
            let (g, u) = (gb.t().unwrap(), ub.narrow(1, 2, 7).unwrap());
            assert!(!g.is_contiguous() && !u.is_contiguous());
            let (gc, uc) = (g.contiguous().unwrap(), u.contiguous().unwrap());
            assert_same(
                "strided fwd",
                &ops::glu(kind, &g, &u).unwrap(),
                &ops::glu(kind, &gc, &uc).unwrap(),
            );
            let dy = randn(&[7, 5], 1.0, dt).t().unwrap();
            let (a, b) = ops::glu_backward(kind, &g, &u, &dy).unwrap();
            let (ac, bc) = ops::glu_backward(kind, &gc, &uc, &dy.contiguous().unwrap()).unwrap();
            assert_same("strided dgate", &a, &ac);
            assert_same("strided dup", &b, &bc);
            let gu = randn(&[8, 6], 1.0, dt).t().unwrap();
            assert_same(
                "strided packed",
                &ops::glu_packed(kind, &gu).unwrap(),
                &ops::glu_packed(kind, &gu.contiguous().unwrap()).unwrap(),
            );
            let f = move |a: &[Tensor]| -> Result<Vec<Tensor>> {
                Ok(vec![k().glu(kind, &a[0].t()?, &a[1])?])
            };
            let r = move |a: &[Tensor]| -> Result<Vec<Tensor>> {
                Ok(vec![reference::glu(kind, &a[0].t()?, &a[1])?])
            };
            let probe = randn(&[5, 7], 1.0, dt);
            let both = run_both(&f, &r, &[gb.clone(), uc.clone()], &[true, true], &[probe]);
            compare_all(
                "strided autograd",
                &both,
                &["y"],
                &["gate", "up"],
                &[true, true],
                dt,
                &|_| 0.0,
            );
        }
    }
}

#[test]
fn prelude_swiglu_and_free_functions_agree() {
    let (g, u) = (
        randn(&[3, 8], 1.0, DType::F32),
        randn(&[3, 8], 1.0, DType::F32),
    );
    let y = ops::glu(GluKind::SwiGlu, &g, &u).unwrap();
    assert_same("swiglu", &ops::swiglu(&g, &u).unwrap(), &y);
    assert_same("swiglu_fused", &g.swiglu_fused(&u).unwrap(), &y);
    assert_same(
        "glu_fused",
        &g.glu_fused(GluKind::GeGluTanh, &u).unwrap(),
        &ops::glu(GluKind::GeGluTanh, &g, &u).unwrap(),
    );
    let gu = Tensor::cat(&[&g, &u], 1).unwrap();
    assert_same(
        "glu_packed_fused",
        &gu.glu_packed_fused(GluKind::SwiGlu).unwrap(),
        &y,
    );
    // Candle's own silu / gelu (tanh) composed agree with the formulas.
    for kind in KINDS {
        let a = reference::glu_builtin(kind, &f64t(&g), &f64t(&u)).unwrap();
        let b = reference::glu(kind, &f64t(&g), &f64t(&u)).unwrap();
        assert_close_tol("builtin vs formula", &a, &b, 1e-12);
    }
}

fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
    no_panic("glu bad input", || r.unwrap_err().to_string())
}

#[test]
fn bad_input_gives_clear_errors() {
    let g = randn(&[3, 8], 1.0, DType::F32);
    let s = GluKind::SwiGlu;
    let cases: Vec<(&str, String)> = vec![
        (
            "up has shape",
            err(ops::glu(s, &g, &randn(&[3, 7], 1.0, DType::F32))),
        ),
        (
            "up has dtype",
            err(ops::glu(s, &g, &g.to_dtype(DType::F16).unwrap())),
        ),
        (
            "gate has dtype",
            err(ops::glu(
                s,
                &g.to_dtype(DType::U32).unwrap(),
                &g.to_dtype(DType::U32).unwrap(),
            )),
        ),
        (
            "rank >= 1",
            err(ops::glu(
                s,
                &Tensor::new(1f32, &CPU).unwrap(),
                &Tensor::new(1f32, &CPU).unwrap(),
            )),
        ),
        (
            "must be even",
            err(ops::glu_packed(s, &randn(&[3, 7], 1.0, DType::F32))),
        ),
        (
            "gate_up has dtype",
            err(ops::glu_packed(s, &g.to_dtype(DType::I64).unwrap())),
        ),
        (
            "dy has shape",
            err(ops::glu_backward(
                s,
                &g,
                &g,
                &randn(&[3, 4], 1.0, DType::F32),
            )),
        ),
        (
            "dy has dtype",
            err(ops::glu_backward(
                s,
                &g,
                &g,
                &g.to_dtype(DType::BF16).unwrap(),
            )),
        ),
        ("dy has shape", err(ops::glu_packed_backward(s, &g, &g))),
    ];
    for (want, got) in cases {
        assert!(
            got.contains("candle-fused glu") && got.contains(want),
            "expected {want:?} in: {got}"
        );
    }
}

#[test]
fn empty_inputs_give_empty_outputs() {
    for shape in [&[0usize][..], &[2, 0], &[0, 4]] {
        let g = Tensor::zeros(shape, DType::F32, &CPU).unwrap();
        for kind in KINDS {
            assert_eq!(ops::glu(kind, &g, &g).unwrap().dims(), shape);
            let (a, b) = ops::glu_backward(kind, &g, &g, &g).unwrap();
            assert_eq!((a.dims(), b.dims()), (shape, shape));
            let y = ops::glu_packed(kind, &g).unwrap();
            let mut half = shape.to_vec();
            *half.last_mut().unwrap() /= 2;
            assert_eq!(y.dims(), half.as_slice());
            assert_eq!(
                ops::glu_packed_backward(kind, &g, &y).unwrap().dims(),
                shape
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests: random shapes (last dim 1, odd, primes, 4097; 0 to 3 leading dims, some 0),
// both kinds, both layouts, dtypes, gate scales, from a seed that is part of the case.

mod props {
    use super::*;
    use proptest::prelude::*;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 300,
            failure_persistence: None,
            max_shrink_iters: 100,
            ..ProptestConfig::default()
        }
    }

    fn shape() -> impl Strategy<Value = Vec<usize>> {
        let last = prop_oneof![
            Just(1usize),
            Just(2),
            Just(3),
            Just(7),
            Just(13),
            Just(251),
            Just(1009),
            Just(4097),
            4usize..64
        ];
        let lead = prop::collection::vec(prop_oneof![1 => Just(0usize), 12 => 1usize..=5], 0..=3);
        (lead, last).prop_map(|(mut lead, last)| {
            lead.push(last);
            lead
        })
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn glu_matches_reference(
            shape in shape(), seed in any::<u64>(), gelu in any::<bool>(), is_packed in any::<bool>(),
            dt in prop_oneof![Just(DType::F32), Just(DType::F64), Just(DType::F16), Just(DType::BF16)],
            std in prop_oneof![Just(0.1), Just(1.0), Just(5.0)],
        ) {
            let kind = if gelu { GluKind::GeGluTanh } else { GluKind::SwiGlu };
            let mut rng = SeededRng::new(seed);
            let probe = rng.randn(&shape, 1.0, dt);
            let ctx = format!("seed {seed}: {kind:?} packed {is_packed} {shape:?} {dt:?} std {std}");
            if is_packed {
                let gu = rng.randn(&doubled(&shape), std, dt);
                if shape.contains(&0) {
                    let y = ops::glu_packed(kind, &gu).unwrap();
                    prop_assert_eq!(y.dims(), shape.as_slice());
                    return Ok(());
                }
                let both = run_both(&packed(kind), &packed_ref(kind), std::slice::from_ref(&gu), &[true], std::slice::from_ref(&probe));
                let fl = packed_gate_floor(kind, &gu, &probe, rgrad(&both, 0));
                compare_all(&ctx, &both, &["y"], &["gate_up"], &[true], dt, &|_| fl);
            } else {
                let (g, u) = (rng.randn(&shape, std, dt), rng.randn(&shape, 1.0, dt));
                if shape.contains(&0) {
                    let y = ops::glu(kind, &g, &u).unwrap();
                    prop_assert_eq!(y.dims(), shape.as_slice());
                    return Ok(());
                }
                let both = run_both(&pair(kind), &pair_ref(kind), &[g.clone(), u.clone()], &[true, true], std::slice::from_ref(&probe));
                let fl = gate_floor(kind, &g, &u, &probe, rgrad(&both, 0));
                compare_all(&ctx, &both, &["y"], &["gate", "up"], &[true, true], dt, &|k| if k == 0 { fl } else { 0.0 });
            }
        }
    }
}
