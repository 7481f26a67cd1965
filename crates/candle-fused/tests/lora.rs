//! The fused LoRA linear on the CPU: forward vs the f64 reference (composed Candle ops), the
//! adapter term on its own, backward vs autograd through the composed ops and vs finite
//! differences, property tests over random shapes, bad input. (The `LoraLinear` module is
//! tested in `tests/nn/lora.rs`.)
//!
//! Inputs make the adapter term as large as the base term at every rank (`B ~ N(0, 1/(s²r))`),
//! so a wrong adapter shows in the output; it is also checked alone (`W = 0`, no bias).

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_fused::ops::lora_linear;
use candle_fused::prelude::*;
use candle_fused::{KernelConfig, Kernels};
use candle_fused_testkit::testing::{self, poisoned, rel_err, tolerance};
use proptest::prelude::*;

const CPU: Device = Device::Cpu;

/// Fresh inputs `(x, w, bias, a, b)` in `dtype` for scale `s`: x `[lead.., K]` and the base
/// term of unit variance, the adapter term `s·(x·Aᵀ)·Bᵀ` too (`B ~ N(0, 1/(s²r))`).
fn inputs(
    lead: &[usize],
    k: usize,
    n: usize,
    r: usize,
    s: f64,
    dtype: DType,
) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
    let mut xs = lead.to_vec();
    xs.push(k);
    let x = testing::randn(&xs, 1.0, dtype, &CPU)?;
    let w = testing::randn(&[n, k], 1.0 / (k as f64).sqrt(), dtype, &CPU)?;
    let bias = testing::randn(&[n], 0.5, dtype, &CPU)?;
    let a = testing::randn(&[r, k], 1.0 / (k as f64).sqrt(), dtype, &CPU)?;
    let b = testing::randn(&[n, r], 1.0 / (s * (r as f64).sqrt()), dtype, &CPU)?;
    Ok((x, w, bias, a, b))
}

fn f64(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F64)
}

fn abs64(t: &Tensor) -> Tensor {
    f64(t).unwrap().abs().unwrap()
}

/// The reference: the LoRA linear from composed ops on `ins = [x, w, bias, a, b]` (any dtype),
/// with `u = s·x·Aᵀ` rounded to `round` when given (the dtype the kernels store `u_ext` in: the
/// backward reads it as stored, the forward multiplies it by `B` as stored).
fn composed(ins: &[Tensor], s: f64, bias: bool, round: Option<DType>) -> Result<Tensor> {
    let (x, w, a, b) = (&ins[0], &ins[1], &ins[3], &ins[4]);
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let x2 = x.reshape(((), k))?;
    let mut u = x2.matmul(&a.t()?)?.affine(s, 0.0)?;
    if let Some(dt) = round {
        u = u.to_dtype(dt)?.to_dtype(x.dtype())?;
    }
    let mut y = (x2.matmul(&w.t()?)? + u.matmul(&b.t()?)?)?;
    if bias {
        y = y.broadcast_add(&ins[2])?;
    }
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}

/// The tolerance of a LoRA result against its f64 reference `want`: the dtype's, or twice what
/// no kernel can avoid, whichever is larger: the reference rounded to the dtype; the change of
/// the reference when `u_ext` is rounded to the dtype (`at_u`, the reference evaluated so);
/// and the rounding of the accumulation of `n` terms in f32 (f64 for f64), by the
/// probabilistic bound `λ·√n·u·‖mag‖/‖want‖` (Higham & Mary 2019, λ = 6) with `mag` the same
/// computation on the inputs' absolute values (the size of the terms).
fn tol_of(want: &Tensor, at_u: &Tensor, mag: &Tensor, n: usize, dt: DType) -> f64 {
    let norm = |t: &Tensor| -> f64 {
        let v = f64(t).unwrap().sqr().unwrap().sum_all().unwrap();
        v.to_scalar::<f64>().unwrap().sqrt()
    };
    let acc = if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let u = testing::unit_roundoff(acc);
    let accumulation = 6.0 * (n as f64).sqrt() * u * norm(mag) / norm(want).max(f64::MIN_POSITIVE);
    let rounded = rel_err(&want.to_dtype(dt).unwrap(), want).unwrap();
    let at_u = rel_err(at_u, want).unwrap();
    tolerance(dt).max(2.0 * rounded.max(at_u).max(accumulation))
}

/// Asserts `rel_err(got, want) <= tol_of(..)`.
fn assert_lora(what: &str, got: &Tensor, want: &Tensor, at_u: &Tensor, mag: &Tensor, n: usize) {
    let dt = got.dtype();
    let err = rel_err(got, want).unwrap();
    let tol = tol_of(want, at_u, mag, n, dt);
    assert!(
        err <= tol,
        "{what} {dt:?}: rel err {err:.3e} > tol {tol:.1e} (shape {:?})",
        want.dims()
    );
}

/// `[x, w, bias, a, b]` as f64 copies (`f`) or their absolute values.
fn map5(ins: &[&Tensor; 5], f: fn(&Tensor) -> Tensor) -> Vec<Tensor> {
    ins.iter().map(|t| f(t)).collect()
}

/// Forward of the fused op vs the f64 reference on the same (rounded) inputs, and the adapter
/// term alone (`W = 0`, no bias) likewise.
fn check_forward(
    kern: &Kernels,
    lead: &[usize],
    k: usize,
    n: usize,
    r: usize,
    dtype: DType,
    with_bias: bool,
) {
    let s = 2.0 / r as f64;
    let (x, w, bias, a, b) = inputs(lead, k, n, r, s, dtype).unwrap();
    let ctx = format!("fwd {lead:?} K={k} N={n} r={r} bias={with_bias}");
    let zero_w = w.zeros_like().unwrap();
    for (what, w, bias_on) in [("", &w, with_bias), (" adapter alone", &zero_w, false)] {
        let y = kern
            .lora_linear(&x, w, bias_on.then_some(&bias), &a, &b, s)
            .unwrap();
        let mut out = lead.to_vec();
        out.push(n);
        assert_eq!(y.dims(), out.as_slice());
        assert_eq!(y.dtype(), dtype);
        let ins = [&x, w, &bias, &a, &b];
        let want = composed(&map5(&ins, |t| f64(t).unwrap()), s, bias_on, None).unwrap();
        let at_u = composed(&map5(&ins, |t| f64(t).unwrap()), s, bias_on, Some(dtype)).unwrap();
        let mag = composed(&map5(&ins, abs64), s, bias_on, None).unwrap();
        assert_lora(&format!("{ctx}{what}"), &y, &want, &at_u, &mag, k + r + 2);
    }
}

#[test]
fn forward_matches_f64_reference() {
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
                check_forward(&poisoned(), lead, k, n, r, dtype, with_bias);
            }
        }
    }
}

/// Gradients of `Σ y ⊙ probe` w.r.t. `ins = [x, w, bias, a, b]` (all tracked), by the fused op
/// on `kern` or by the composed reference (`u` rounded to `round` when given).
fn grads(
    kern: Option<&Kernels>,
    ins: &[Tensor],
    s: f64,
    probe: &Tensor,
    with_bias: bool,
    round: Option<DType>,
) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    let vars: Vec<Var> = ins.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let t: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = match kern {
        Some(kern) => {
            kern.lora_linear(&t[0], &t[1], with_bias.then_some(&t[2]), &t[3], &t[4], s)?
        }
        None => composed(&t, s, with_bias, round)?,
    };
    let g = (&y * probe)?.sum_all()?.backward()?;
    Ok((y, vars.iter().map(|v| g.get(v).cloned()).collect()))
}

const NAMES: [&str; 5] = ["x", "w", "bias", "a", "b"];

/// The f64 references of the gradients of `[x, w, bias, a, b]` for `Σ y ⊙ probe`: exact, at the
/// rounded `u_ext`, and of the computation on absolute values (the terms' size).
type Refs = [Vec<Option<Tensor>>; 3];

fn grad_refs(ins: &[&Tensor; 5], s: f64, probe: &Tensor, with_bias: bool, dt: DType) -> Refs {
    let exact = map5(ins, |t| f64(t).unwrap());
    let (p64, pabs) = (f64(probe).unwrap(), abs64(probe));
    let g = |ins: &[Tensor], p: &Tensor, round| grads(None, ins, s, p, with_bias, round).unwrap().1;
    [
        g(&exact, &p64, None),
        g(&exact, &p64, Some(dt)),
        g(&map5(ins, abs64), &pabs, None),
    ]
}

/// Asserts the gradient of input `i` against the references.
fn assert_grad(ctx: &str, i: usize, got: &Tensor, refs: &Refs, n: usize) {
    let r = |k: usize| refs[k][i].as_ref().expect("reference gradient");
    assert_eq!(got.dims(), r(0).dims(), "{ctx}: d{} shape", NAMES[i]);
    assert_lora(&format!("{ctx}: d{}", NAMES[i]), got, r(0), r(1), r(2), n);
}

/// Every gradient of the fused op vs autograd through the composed ops in f64.
fn check_backward(
    kern: &Kernels,
    lead: &[usize],
    k: usize,
    n: usize,
    r: usize,
    dtype: DType,
    with_bias: bool,
) {
    let s = 1.5 / r as f64;
    let (x, w, bias, a, b) = inputs(lead, k, n, r, s, dtype).unwrap();
    let mut out = lead.to_vec();
    out.push(n);
    let probe = testing::randn(&out, 1.0, dtype, &CPU).unwrap();
    let ins = [&x, &w, &bias, &a, &b];
    let (_, got) = grads(
        Some(kern),
        &map5(&ins, |t| t.clone()),
        s,
        &probe,
        with_bias,
        None,
    )
    .unwrap();
    let refs = grad_refs(&ins, s, &probe, with_bias, dtype);
    let m: usize = lead.iter().product();
    let ctx = format!("bwd {lead:?} K={k} N={n} r={r} bias={with_bias}");
    for (i, name) in NAMES.iter().enumerate() {
        if *name == "bias" && !with_bias {
            assert!(got[i].is_none(), "unused bias got a gradient");
            continue;
        }
        let g = got[i]
            .as_ref()
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dtype(), dtype);
        assert_grad(&ctx, i, g, &refs, m.max(n).max(k) + r + 2);
    }
}

#[test]
fn backward_matches_autograd_through_composed_ops() {
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
                check_backward(&poisoned(), lead, k, n, r, dtype, with_bias);
            }
        }
    }
}

/// The standalone backward (given dy) against the f64 reference (autograd through the composed
/// ops), and equal to autograd through the fused op with a frozen W (the same kernel: the
/// comparison shows the two entry points agree, the reference that they are right); checks dy.
#[test]
fn standalone_backward_matches_the_reference_and_autograd() {
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        for &(lead, k, n, r) in &[
            (&[1usize][..], 1usize, 1usize, 1usize),
            (&[2, 3][..], 33, 17, 8),
            (&[64][..], 96, 80, 32),
        ] {
            for with_bias in [false, true] {
                let s = 1.5 / r as f64;
                let (x, w, bias, a, b) = inputs(lead, k, n, r, s, dtype).unwrap();
                let mut out = lead.to_vec();
                out.push(n);
                let dy = testing::randn(&out, 1.0, dtype, &CPU).unwrap();
                let bias_opt = with_bias.then_some(&bias);
                let kern = poisoned();
                let g = kern
                    .lora_linear_backward(&x, &w, bias_opt, &a, &b, s, &dy)
                    .unwrap();
                assert_eq!(g.dbias.is_some(), with_bias);
                // The independent reference.
                let refs = grad_refs(&[&x, &w, &bias, &a, &b], s, &dy, with_bias, dtype);
                let m: usize = lead.iter().product();
                let ctx = format!("standalone {lead:?} K={k} N={n} r={r} bias={with_bias}");
                let mut pairs = vec![(0, &g.dx), (3, &g.da), (4, &g.db)];
                if let Some(db) = g.dbias.as_ref() {
                    pairs.push((2, db));
                }
                for &(i, got) in &pairs {
                    assert_eq!(got.dtype(), dtype);
                    assert_grad(&ctx, i, got, &refs, m.max(n).max(k) + r + 2);
                }
                // Autograd through the fused op with a frozen (plain) W.
                let vars: Vec<Var> = [&x, &bias, &a, &b]
                    .iter()
                    .map(|t| Var::from_tensor(t).unwrap())
                    .collect();
                let [xv, bv, av, bbv] = [0, 1, 2, 3].map(|i| vars[i].as_tensor().clone());
                let y = kern
                    .lora_linear(&xv, &w, with_bias.then_some(&bv), &av, &bbv, s)
                    .unwrap();
                let auto = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                let var_of = |i: usize| &vars[[0, 0, 1, 2, 3][i]];
                for &(i, got) in &pairs {
                    let via = auto.get(var_of(i)).unwrap();
                    assert_eq!(got.dims(), via.dims(), "d{} shape", NAMES[i]);
                    let same = rel_err(got, &f64(via).unwrap()).unwrap();
                    assert!(
                        same <= 1e-6,
                        "d{} {dtype:?}: standalone vs autograd {same:.3e}",
                        NAMES[i]
                    );
                }
            }
        }
    }
    // dy must have x's dtype.
    let (x, w, _, a, b) = inputs(&[4], 8, 6, 2, 1.0, DType::F32).unwrap();
    let dy = testing::randn(&[4, 6], 1.0, DType::BF16, &CPU).unwrap();
    let e = candle_fused::ops::lora_linear_backward(&x, &w, None, &a, &b, 1.0, &dy)
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
    let e = candle_fused::ops::lora_linear_backward(&x, &w, None, &a, &b, 1.0, &dy)
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
    let s = 0.7;
    let (x, w, bias, a, b) = inputs(&[m], k, n, r, s, DType::F64).unwrap();
    let probe = testing::randn(&[m, n], 1.0, DType::F64, &CPU).unwrap();
    let ins = [x, w, bias, a, b];
    let kern = poisoned();
    let (_, got) = grads(Some(&kern), &ins, s, &probe, true, None).unwrap();
    let f = |t: &[Tensor]| kern.lora_linear(&t[0], &t[1], Some(&t[2]), &t[3], &t[4], s);
    for (i, name) in NAMES.iter().enumerate() {
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
    let (x, w, bias, a, b) = inputs(&[4], 6, 5, 2, 1.0, DType::F32).unwrap();
    let av = Var::from_tensor(&a).unwrap();
    let bv = Var::from_tensor(&b).unwrap();
    let biasv = Var::from_tensor(&bias).unwrap();
    // x and w plain tensors: only the adapter and the bias get gradients.
    let y = poisoned()
        .lora_linear(&x, &w, Some(biasv.as_tensor()), &av, &bv, 0.5)
        .unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_none() && g.get(&w).is_none());
    assert!(g.get(&av).is_some() && g.get(&bv).is_some() && g.get(&biasv).is_some());
    // A tracked W that is detached gets nothing either.
    let wv = Var::from_tensor(&w).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let y = poisoned()
        .lora_linear(&xv, &wv.as_tensor().detach(), None, &av, &bv, 0.5)
        .unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&wv).is_none());
    assert!(g.get(&xv).is_some());
}

#[test]
fn non_contiguous_inputs_give_the_right_answer() {
    let (x, w, bias, a, b) = inputs(&[6], 10, 8, 3, 1.0, DType::F32).unwrap();
    let xt = x.t().unwrap().contiguous().unwrap().t().unwrap(); // [6, 10], strided
    let wt = w.t().unwrap().contiguous().unwrap().t().unwrap();
    let at = a.t().unwrap().contiguous().unwrap().t().unwrap();
    let bt = b.t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!xt.is_contiguous() && !wt.is_contiguous() && !bt.is_contiguous());
    let y1 = poisoned()
        .lora_linear(&x, &w, Some(&bias), &a, &b, 0.3)
        .unwrap();
    let y2 = poisoned()
        .lora_linear(&xt, &wt, Some(&bias), &at, &bt, 0.3)
        .unwrap();
    assert_eq!(rel_err(&y1, &y2).unwrap(), 0.0);
    // Narrowed rows of a larger x.
    let big = testing::randn(&[9, 10], 1.0, DType::F32, &CPU).unwrap();
    let part = big.narrow(0, 2, 6).unwrap();
    let y3 = poisoned()
        .lora_linear(&part, &w, None, &a, &b, 0.3)
        .unwrap();
    let want = poisoned()
        .lora_linear(&part.contiguous().unwrap(), &w, None, &a, &b, 0.3)
        .unwrap();
    assert_eq!(rel_err(&y3, &want).unwrap(), 0.0);
}

#[test]
fn empty_rows_give_empty_output_and_prelude_matches() {
    let (_, w, bias, a, b) = inputs(&[1], 8, 6, 2, 1.0, DType::F32).unwrap();
    let x = Tensor::zeros((0, 8), DType::F32, &CPU).unwrap();
    let y = poisoned()
        .lora_linear(&x, &w, Some(&bias), &a, &b, 1.0)
        .unwrap();
    assert_eq!(y.dims(), &[0, 6]);
    let x = Tensor::zeros((2, 0, 8), DType::F32, &CPU).unwrap();
    assert_eq!(
        x.lora_linear_fused(&w, None, &a, &b, 1.0).unwrap().dims(),
        &[2, 0, 6]
    );
    let x = testing::randn(&[3, 8], 1.0, DType::F32, &CPU).unwrap();
    let y1 = x.lora_linear_fused(&w, Some(&bias), &a, &b, 0.25).unwrap();
    let y2 = poisoned()
        .lora_linear(&x, &w, Some(&bias), &a, &b, 0.25)
        .unwrap();
    assert_eq!(rel_err(&y1, &y2).unwrap(), 0.0);
}

#[test]
fn nan_in_a_row_stays_in_that_row() {
    let (x, w, bias, a, b) = inputs(&[4], 8, 6, 2, 1.0, DType::F32).unwrap();
    let mut v = x.to_vec2::<f32>().unwrap();
    v[1][3] = f32::NAN;
    let x = Tensor::new(v, &CPU).unwrap();
    let y = poisoned()
        .lora_linear(&x, &w, Some(&bias), &a, &b, 1.0)
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
    let (x, w, bias, a, b) = inputs(&[4], 8, 6, 2, 1.0, DType::F32).unwrap();
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
    // The cases from the run's seed (CANDLE_FUSED_SEED reruns them); the inputs of a case from
    // the calling thread's seeded stream.
    #![proptest_config(ProptestConfig {
        rng_seed: proptest::test_runner::RngSeed::Fixed(candle_fused_testkit::rng::run_seed()),
        cases: 160,
        ..ProptestConfig::default()
    })]

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
        check_forward(&poisoned(), &lead, k, n, r, dtype, with_bias);
        check_backward(&poisoned(), &lead, k, n, r, dtype, with_bias);
    }
}

#[test]
fn half_types_accumulate_across_row_blocks() {
    // Blocks of a few rows: the half-type path widens and accumulates block by block.
    let mut cfg = KernelConfig::poisoned();
    cfg.cpu.half_gemm_block = 200;
    let kern = Kernels::new(cfg);
    for dtype in [DType::F16, DType::BF16] {
        check_forward(&kern, &[3, 37], 40, 30, 6, dtype, true);
        check_backward(&kern, &[3, 37], 40, 30, 6, dtype, true);
        check_backward(&kern, &[150], 17, 9, 3, dtype, false);
    }
}

#[test]
fn rank_256_large_dims() {
    check_forward(&poisoned(), &[40], 512, 384, 256, DType::F32, true);
    check_backward(&poisoned(), &[40], 300, 384, 256, DType::BF16, true);
}
