//! The fused LoRA linear on the CPU: forward vs the f64 reference (composed Candle ops),
//! backward vs autograd through the composed ops and vs finite differences, property tests over
//! random shapes, bad input, and the `LoraLinear` module (training, merge, enable/disable).

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_fused::ops::{lora_linear, lora_linear_backward, lora_linear_composed};
use candle_fused::prelude::*;
use candle_fused_testkit::testing::{self, rel_err, tolerance};
use proptest::prelude::*;

const CPU: Device = Device::Cpu;

/// Fresh inputs `(x, w, bias, a, b)` in `dtype`: x `[lead.., K]`, unit-variance outputs.
fn inputs(
    lead: &[usize],
    k: usize,
    n: usize,
    r: usize,
    dtype: DType,
) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
    let mut xs = lead.to_vec();
    xs.push(k);
    let x = testing::randn(&xs, 1.0, dtype, &CPU)?;
    let w = testing::randn(&[n, k], 1.0 / (k as f64).sqrt(), dtype, &CPU)?;
    let bias = testing::randn(&[n], 0.5, dtype, &CPU)?;
    let a = testing::randn(&[r, k], 1.0 / (k as f64).sqrt(), dtype, &CPU)?;
    let b = testing::randn(&[n, r], 1.0 / (r as f64).sqrt(), dtype, &CPU)?;
    Ok((x, w, bias, a, b))
}

fn f64(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F64)
}

/// The error of `got` against `want`: relative to `‖want‖`, or, where the result cancels
/// (tiny shapes: one output that is a sum of a few terms of either sign), relative to the
/// magnitude the rounding error scales with, `‖mag‖` with `mag` the same computation on the
/// absolute values of every input (`Σ |terms|`). The smaller of the two is returned.
fn err_vs(got: &Tensor, want: &Tensor, mag: &Tensor) -> f64 {
    let rel = rel_err(got, want).unwrap();
    let diff = (got.to_dtype(DType::F64).unwrap() - want).unwrap();
    let num = diff
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    let den = mag
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    if den > 0.0 {
        rel.min(num / den)
    } else {
        rel
    }
}

fn abs64(t: &Tensor) -> Tensor {
    f64(t).unwrap().abs().unwrap()
}

/// Forward of the fused op vs the f64 reference on the same (rounded) inputs.
fn check_forward(lead: &[usize], k: usize, n: usize, r: usize, dtype: DType, with_bias: bool) {
    let (x, w, bias, a, b) = inputs(lead, k, n, r, dtype).unwrap();
    let s = 2.0 / r as f64;
    let bias = with_bias.then_some(&bias);
    let y = lora_linear(&x, &w, bias, &a, &b, s).unwrap();
    let mut out = lead.to_vec();
    out.push(n);
    assert_eq!(y.dims(), out.as_slice());
    assert_eq!(y.dtype(), dtype);
    let reference = |f: fn(&Tensor) -> Tensor| {
        let bias64 = bias.map(f);
        lora_linear_composed(&f(&x), &f(&w), bias64.as_ref(), &f(&a), &f(&b), s).unwrap()
    };
    let want = reference(|t| f64(t).unwrap());
    let mag = reference(abs64);
    let err = err_vs(&y, &want, &mag);
    assert!(
        err <= tolerance(dtype),
        "fwd {lead:?} K={k} N={n} r={r} {dtype:?} bias={with_bias}: rel err {err:.3e}"
    );
}

#[test]
fn forward_matches_f64_reference() {
    testing::set_poison(true);
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for &(lead, k, n, r) in &[
            (&[1usize][..], 1usize, 1usize, 1usize),
            (&[5][..], 7, 3, 2),
            (&[2, 3][..], 33, 17, 8),
            (&[][..], 64, 48, 16),
            (&[4, 1, 3][..], 50, 70, 50),
            (&[128][..], 512, 512, 8),
            (&[3][..], 300, 280, 256),
        ] {
            for with_bias in [false, true] {
                check_forward(lead, k, n, r, dtype, with_bias);
            }
        }
    }
}

/// Gradients of `Σ y ⊙ probe` w.r.t. (x, w, bias, a, b), by the fused op or the composed one.
fn grads(
    fused: bool,
    ins: [&Tensor; 5],
    s: f64,
    probe: &Tensor,
    with_bias: bool,
) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    let vars: Vec<Var> = ins
        .iter()
        .map(|t| Var::from_tensor(t))
        .collect::<Result<_>>()?;
    let [x, w, bias, a, b] = [0, 1, 2, 3, 4].map(|i| vars[i].as_tensor().clone());
    let bias = with_bias.then_some(&bias);
    let y = if fused {
        lora_linear(&x, &w, bias, &a, &b, s)?
    } else {
        lora_linear_composed(&x, &w, bias, &a, &b, s)?
    };
    let g = (&y * probe)?.sum_all()?.backward()?;
    Ok((y, vars.iter().map(|v| g.get(v).cloned()).collect()))
}

/// Every gradient of the fused op vs autograd through the composed ops in f64.
fn check_backward(lead: &[usize], k: usize, n: usize, r: usize, dtype: DType, with_bias: bool) {
    let (x, w, bias, a, b) = inputs(lead, k, n, r, dtype).unwrap();
    let s = 1.5 / r as f64;
    let mut out = lead.to_vec();
    out.push(n);
    let probe = testing::randn(&out, 1.0, dtype, &CPU).unwrap();
    let (_, got) = grads(true, [&x, &w, &bias, &a, &b], s, &probe, with_bias).unwrap();
    let reference = |f: fn(&Tensor) -> Tensor| {
        let ins: Vec<Tensor> = [&x, &w, &bias, &a, &b].iter().map(|t| f(t)).collect();
        let refs = [&ins[0], &ins[1], &ins[2], &ins[3], &ins[4]];
        let (_, g) = grads(false, refs, s, &f(&probe), with_bias).unwrap();
        (ins, g)
    };
    let (ins64, want) = reference(|t| f64(t).unwrap());
    // The gradients of the computation on absolute values: the magnitudes the errors scale with.
    let (_, mag) = reference(abs64);
    for (i, name) in ["x", "w", "bias", "a", "b"].iter().enumerate() {
        if *name == "bias" && !with_bias {
            assert!(got[i].is_none(), "unused bias got a gradient");
            continue;
        }
        let g = got[i]
            .as_ref()
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dims(), ins64[i].dims(), "d{name} shape");
        assert_eq!(g.dtype(), dtype);
        let err = err_vs(g, want[i].as_ref().unwrap(), mag[i].as_ref().unwrap());
        assert!(
            err <= tolerance(dtype),
            "d{name} {lead:?} K={k} N={n} r={r} {dtype:?} bias={with_bias}: rel err {err:.3e}"
        );
    }
}

#[test]
fn backward_matches_autograd_through_composed_ops() {
    testing::set_poison(true);
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for &(lead, k, n, r) in &[
            (&[1usize][..], 1usize, 1usize, 1usize),
            (&[5][..], 7, 3, 2),
            (&[2, 3][..], 33, 17, 8),
            (&[][..], 64, 48, 16),
            (&[64][..], 96, 80, 32),
            (&[3][..], 260, 257, 256),
        ] {
            for with_bias in [false, true] {
                check_backward(lead, k, n, r, dtype, with_bias);
            }
        }
    }
}

/// The standalone backward (given dy) equals autograd through the fused op (W frozen) and the
/// f64 reference, and checks dy.
#[test]
fn standalone_backward_matches_autograd() {
    testing::set_poison(true);
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        for &(lead, k, n, r) in &[
            (&[1usize][..], 1usize, 1usize, 1usize),
            (&[2, 3][..], 33, 17, 8),
            (&[64][..], 96, 80, 32),
        ] {
            for with_bias in [false, true] {
                let (x, w, bias, a, b) = inputs(lead, k, n, r, dtype).unwrap();
                let s = 1.5 / r as f64;
                let mut out = lead.to_vec();
                out.push(n);
                let dy = testing::randn(&out, 1.0, dtype, &CPU).unwrap();
                let bias_opt = with_bias.then_some(&bias);
                let g = lora_linear_backward(&x, &w, bias_opt, &a, &b, s, &dy).unwrap();
                assert_eq!(g.dbias.is_some(), with_bias);
                // Autograd through the fused op with a frozen (plain) W.
                let vars: Vec<Var> = [&x, &bias, &a, &b]
                    .iter()
                    .map(|t| Var::from_tensor(t).unwrap())
                    .collect();
                let [xv, bv, av, bbv] = [0, 1, 2, 3].map(|i| vars[i].as_tensor().clone());
                let y = lora_linear(&xv, &w, with_bias.then_some(&bv), &av, &bbv, s).unwrap();
                let auto = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                let mut pairs = vec![
                    ("x", &g.dx, auto.get(&vars[0]).unwrap()),
                    ("a", &g.da, auto.get(&vars[2]).unwrap()),
                    ("b", &g.db, auto.get(&vars[3]).unwrap()),
                ];
                if let Some(db) = g.dbias.as_ref() {
                    pairs.push(("bias", db, auto.get(&vars[1]).unwrap()));
                }
                // And the f64 reference (autograd through the composed ops).
                let (_, want) = grads(
                    false,
                    [
                        &f64(&x).unwrap(),
                        &f64(&w).unwrap(),
                        &f64(&bias).unwrap(),
                        &f64(&a).unwrap(),
                        &f64(&b).unwrap(),
                    ],
                    s,
                    &f64(&dy).unwrap(),
                    with_bias,
                )
                .unwrap();
                let (_, mag) = grads(
                    false,
                    [
                        &abs64(&x),
                        &abs64(&w),
                        &abs64(&bias),
                        &abs64(&a),
                        &abs64(&b),
                    ],
                    s,
                    &abs64(&dy),
                    with_bias,
                )
                .unwrap();
                for (name, got, via_autograd) in pairs {
                    assert_eq!(got.dims(), via_autograd.dims(), "d{name} shape");
                    assert_eq!(got.dtype(), dtype);
                    let same = rel_err(got, &f64(via_autograd).unwrap()).unwrap();
                    assert!(
                        same <= 1e-6,
                        "d{name} {dtype:?}: standalone vs autograd {same:.3e}"
                    );
                    let i = ["x", "w", "bias", "a", "b"]
                        .iter()
                        .position(|v| *v == name)
                        .unwrap();
                    let err = err_vs(got, want[i].as_ref().unwrap(), mag[i].as_ref().unwrap());
                    assert!(
                        err <= tolerance(dtype),
                        "d{name} {dtype:?} K={k} N={n} r={r}: {err:.3e}"
                    );
                }
            }
        }
    }
    // dy must have x's dtype.
    let (x, w, _, a, b) = inputs(&[4], 8, 6, 2, DType::F32).unwrap();
    let dy = testing::randn(&[4, 6], 1.0, DType::BF16, &CPU).unwrap();
    let e = lora_linear_backward(&x, &w, None, &a, &b, 1.0, &dy)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_linear_backward")
            && e.contains("dy")
            && e.to_lowercase().contains("dtype"),
        "{e}"
    );
    // dy must have the output's shape.
    let dy = testing::randn(&[4, 5], 1.0, DType::F32, &CPU).unwrap();
    let e = lora_linear_backward(&x, &w, None, &a, &b, 1.0, &dy)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_linear_backward") && e.contains("dy"),
        "{e}"
    );
}

#[test]
fn backward_matches_finite_differences() {
    let (m, k, n, r) = (3, 5, 4, 2);
    let (x, w, bias, a, b) = inputs(&[m], k, n, r, DType::F64).unwrap();
    let s = 0.7;
    let probe = testing::randn(&[m, n], 1.0, DType::F64, &CPU).unwrap();
    let (_, got) = grads(true, [&x, &w, &bias, &a, &b], s, &probe, true).unwrap();
    let f = |t: &[Tensor]| lora_linear(&t[0], &t[1], Some(&t[2]), &t[3], &t[4], s);
    let ins = [x, w, bias, a, b];
    for (i, name) in ["x", "w", "bias", "a", "b"].iter().enumerate() {
        let fd = testing::finite_diff(f, &ins, i, &probe, 1e-5).unwrap();
        let err = rel_err(got[i].as_ref().unwrap(), &fd).unwrap();
        assert!(
            err < 1e-7,
            "d{name} vs finite differences: rel err {err:.3e}"
        );
    }
}

#[test]
fn frozen_weight_and_untracked_input_get_no_gradient() {
    let (x, w, bias, a, b) = inputs(&[4], 6, 5, 2, DType::F32).unwrap();
    let av = Var::from_tensor(&a).unwrap();
    let bv = Var::from_tensor(&b).unwrap();
    let biasv = Var::from_tensor(&bias).unwrap();
    // x and w plain tensors: only the adapter and the bias get gradients.
    let y = lora_linear(&x, &w, Some(biasv.as_tensor()), &av, &bv, 0.5).unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_none() && g.get(&w).is_none());
    assert!(g.get(&av).is_some() && g.get(&bv).is_some() && g.get(&biasv).is_some());
    // A tracked W that is detached gets nothing either.
    let wv = Var::from_tensor(&w).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let y = lora_linear(&xv, &wv.as_tensor().detach(), None, &av, &bv, 0.5).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&wv).is_none());
    assert!(g.get(&xv).is_some());
}

#[test]
fn non_contiguous_inputs_give_the_right_answer() {
    let (x, w, bias, a, b) = inputs(&[6], 10, 8, 3, DType::F32).unwrap();
    let xt = x.t().unwrap().contiguous().unwrap().t().unwrap(); // [6, 10], strided
    let wt = w.t().unwrap().contiguous().unwrap().t().unwrap();
    let at = a.t().unwrap().contiguous().unwrap().t().unwrap();
    let bt = b.t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!xt.is_contiguous() && !wt.is_contiguous() && !bt.is_contiguous());
    let y1 = lora_linear(&x, &w, Some(&bias), &a, &b, 0.3).unwrap();
    let y2 = lora_linear(&xt, &wt, Some(&bias), &at, &bt, 0.3).unwrap();
    assert_eq!(rel_err(&y1, &y2).unwrap(), 0.0);
    // Narrowed rows of a larger x.
    let big = testing::randn(&[9, 10], 1.0, DType::F32, &CPU).unwrap();
    let part = big.narrow(0, 2, 6).unwrap();
    let y3 = lora_linear(&part, &w, None, &a, &b, 0.3).unwrap();
    let want = lora_linear(&part.contiguous().unwrap(), &w, None, &a, &b, 0.3).unwrap();
    assert_eq!(rel_err(&y3, &want).unwrap(), 0.0);
}

#[test]
fn empty_rows_give_empty_output_and_prelude_matches() {
    let (_, w, bias, a, b) = inputs(&[1], 8, 6, 2, DType::F32).unwrap();
    let x = Tensor::zeros((0, 8), DType::F32, &CPU).unwrap();
    let y = lora_linear(&x, &w, Some(&bias), &a, &b, 1.0).unwrap();
    assert_eq!(y.dims(), &[0, 6]);
    let x = Tensor::zeros((2, 0, 8), DType::F32, &CPU).unwrap();
    assert_eq!(
        x.lora_linear_fused(&w, None, &a, &b, 1.0).unwrap().dims(),
        &[2, 0, 6]
    );
    let x = testing::randn(&[3, 8], 1.0, DType::F32, &CPU).unwrap();
    let y1 = x.lora_linear_fused(&w, Some(&bias), &a, &b, 0.25).unwrap();
    let y2 = lora_linear(&x, &w, Some(&bias), &a, &b, 0.25).unwrap();
    assert_eq!(rel_err(&y1, &y2).unwrap(), 0.0);
}

#[test]
fn nan_in_a_row_stays_in_that_row() {
    let (x, w, bias, a, b) = inputs(&[4], 8, 6, 2, DType::F32).unwrap();
    let mut v = x.to_vec2::<f32>().unwrap();
    v[1][3] = f32::NAN;
    let x = Tensor::new(v, &CPU).unwrap();
    let y = lora_linear(&x, &w, Some(&bias), &a, &b, 1.0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(y[1].iter().all(|v| v.is_nan()));
    assert!(y[0].iter().chain(&y[2]).chain(&y[3]).all(|v| v.is_finite()));
}

fn err_msg(r: Result<Tensor>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let (x, w, bias, a, b) = inputs(&[4], 8, 6, 2, DType::F32).unwrap();
    let has = |m: String, parts: &[&str]| {
        for p in parts {
            assert!(m.contains(p), "{m:?} lacks {p:?}");
        }
        assert!(m.contains("candle-fused lora_linear"), "{m:?}");
    };
    // Shapes.
    let w_bad = testing::randn(&[6, 7], 1.0, DType::F32, &CPU).unwrap();
    has(
        err_msg(lora_linear(&x, &w_bad, None, &a, &b, 1.0)),
        &["w has shape [6, 7]", "[6, 8]"],
    );
    has(
        err_msg(lora_linear(
            &x,
            &w.flatten_all().unwrap(),
            None,
            &a,
            &b,
            1.0,
        )),
        &["w must have shape [N, K]"],
    );
    let a_bad = testing::randn(&[2, 9], 1.0, DType::F32, &CPU).unwrap();
    has(
        err_msg(lora_linear(&x, &w, None, &a_bad, &b, 1.0)),
        &["a has shape [2, 9]"],
    );
    let b_bad = testing::randn(&[6, 3], 1.0, DType::F32, &CPU).unwrap();
    has(
        err_msg(lora_linear(&x, &w, None, &a, &b_bad, 1.0)),
        &["b has shape [6, 3]", "[6, 2]"],
    );
    let bias_bad = testing::randn(&[5], 1.0, DType::F32, &CPU).unwrap();
    has(
        err_msg(lora_linear(&x, &w, Some(&bias_bad), &a, &b, 1.0)),
        &["bias has shape [5]"],
    );
    let scalar = Tensor::new(1f32, &CPU).unwrap();
    has(
        err_msg(lora_linear(&scalar, &w, None, &a, &b, 1.0)),
        &["x must have rank >= 1"],
    );
    // Ranks r = 0 and r > min(K, N).
    let a0 = Tensor::zeros((0, 8), DType::F32, &CPU).unwrap();
    let b0 = Tensor::zeros((6, 0), DType::F32, &CPU).unwrap();
    has(
        err_msg(lora_linear(&x, &w, None, &a0, &b0, 1.0)),
        &["r = 0"],
    );
    let a7 = testing::randn(&[7, 8], 1.0, DType::F32, &CPU).unwrap();
    let b7 = testing::randn(&[6, 7], 1.0, DType::F32, &CPU).unwrap();
    has(
        err_msg(lora_linear(&x, &w, None, &a7, &b7, 1.0)),
        &["rank r = 7", "min(K, N) = min(8, 6)"],
    );
    // Dtypes.
    let w16 = w.to_dtype(DType::F16).unwrap();
    has(
        err_msg(lora_linear(&x, &w16, None, &a, &b, 1.0)),
        &["w has dtype F16", "expected F32"],
    );
    let b16 = b.to_dtype(DType::BF16).unwrap();
    has(
        err_msg(lora_linear(&x, &w, None, &a, &b16, 1.0)),
        &["b has dtype BF16"],
    );
    let bias64 = bias.to_dtype(DType::F64).unwrap();
    has(
        err_msg(lora_linear(&x, &w, Some(&bias64), &a, &b, 1.0)),
        &["bias has dtype F64"],
    );
    let xi = x.to_dtype(DType::U32).unwrap();
    has(
        err_msg(lora_linear(&xi, &w, None, &a, &b, 1.0)),
        &["x has dtype U32"],
    );
    // Scale.
    has(
        err_msg(lora_linear(&x, &w, None, &a, &b, f64::NAN)),
        &["scale must be finite"],
    );
    has(
        err_msg(lora_linear(&x, &w, None, &a, &b, f64::INFINITY)),
        &["scale must be finite"],
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, .. ProptestConfig::default() })]

    #[test]
    fn random_shapes_forward_and_backward(
        lead in proptest::collection::vec(1usize..6, 0..3),
        k in 1usize..90,
        n in 1usize..90,
        r_frac in 0.0f64..1.0,
        dt in 0usize..4,
        with_bias in any::<bool>(),
    ) {
        let dtype = [DType::F32, DType::F64, DType::F16, DType::BF16][dt];
        let r = 1 + ((k.min(n) - 1) as f64 * r_frac) as usize;
        check_forward(&lead, k, n, r, dtype, with_bias);
        check_backward(&lead, k, n, r, dtype, with_bias);
    }
}

#[test]
fn half_types_accumulate_across_row_blocks() {
    // Blocks of a few rows: the half-type path widens and accumulates block by block.
    candle_fused::ops::lora::set_cpu_block_elems(200);
    for dtype in [DType::F16, DType::BF16] {
        check_forward(&[3, 37], 40, 30, 6, dtype, true);
        check_backward(&[3, 37], 40, 30, 6, dtype, true);
        check_backward(&[150], 17, 9, 3, dtype, false);
    }
    candle_fused::ops::lora::set_cpu_block_elems(1 << 20);
}

#[test]
fn rank_256_large_dims() {
    check_forward(&[40], 512, 384, 256, DType::F32, true);
    check_backward(&[40], 300, 384, 256, DType::BF16, true);
}

/// The `LoraLinear` module.
#[path = "lora/module.rs"]
mod module;

#[test]
fn check_sweep_covers_lora_with_every_gradient() {
    use candle_fused_testkit::check::{self, OpKind};
    let cases: Vec<_> = check::sweep(&[DType::F32])
        .into_iter()
        .filter(|c| matches!(c.op, OpKind::Lora { .. }))
        .collect();
    assert!(cases.len() >= 5);
    for case in &cases {
        let outs = check::run(case, &CPU).unwrap();
        let whats: Vec<&str> = outs.iter().map(|o| o.what.as_str()).collect();
        let bias = matches!(case.op, OpKind::Lora { bias: true, .. });
        let mut want = vec!["fwd", "dx", "dw", "da", "db"];
        if bias {
            want.push("dbias");
        }
        assert_eq!(whats, want, "{}", case.op.name());
        for o in &outs {
            assert!(
                o.pass(),
                "{} {}: {:.3e} > {:.0e}",
                o.op,
                o.what,
                o.rel_err,
                o.tol
            );
        }
    }
}
